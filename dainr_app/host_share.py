"""Share the host among the DA-INR fits running at once on it (gadget processes of one or several servers, the
local channels of a ``<distributed>`` pipeline, several clients, ``dainr recon``): the CPU cores and the
memory of each device.

**Cores.** Each fit runs torch's OpenMP thread pool.  Idle OpenMP threads spin before they sleep, so two
processes that each use every core steal each other's cycles: two 64² fits that take 6.5 s alone took 212 s
side by side on a 2-core VM, and two clients replaying the README demo data at once 304 s instead of 20–24 s
(``dainr bench --case concurrent``).  Every running CPU fit gets ``cores // running CPU fits`` threads (at
least 1), re-checked whenever the fit reports progress (every epoch of its stopping rule), so the threads in
use stay within the cores.

**Memory.** The memory preflight (:func:`dainr.memory.check_memory`) compares a fit's estimated peak with
what the device has available now.  Fits that start together would each see the same free memory and could
together exceed it (the kernel's OOM killer, or a CUDA out-of-memory error, minutes into a scan).  So each fit
reserves its estimate; a new fit's preflight counts as taken what the other fits on the same device have
reserved but not yet allocated (the reservation less the memory the fit reports in use at its last progress
report, never less than zero), and the check and the reservation happen under one lock of the folder.

Running fits are lock files: a fit holds an exclusive ``flock`` on ``<dir>/<pid>-<uuid>.fit`` while it runs;
the kernel drops the lock when the process ends, however it ends, and a file whose lock can be taken belongs
to a fit that has gone (it is removed).  The file holds ``<device> <reserved bytes> <bytes in use>``.  Where
the folder cannot be used (a read-only temporary directory), the fit runs with the process's threads and the
plain preflight, and a warning is logged.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import stat
import tempfile
import threading
import uuid
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

from dainr import reconstruct
from dainr.memory import check_memory
from dainr.utils import resolve_device

log = logging.getLogger("dainr.host_share")
_FIELD = 20  # digits of the byte counts: a file keeps its length when a fit rewrites what it has in use


def default_directory() -> str:
    """``$DAINR_SHARE_DIR`` (e.g. a folder mounted into several containers on one host; the older name
    ``$DAINR_CPU_SHARE_DIR`` is read too), else a folder of this user's in the temporary directory."""
    return os.environ.get("DAINR_SHARE_DIR") or os.environ.get("DAINR_CPU_SHARE_DIR") or _private_directory()


def _private_directory() -> str:
    return os.path.join(tempfile.gettempdir(), f"dainr-share-{os.getuid()}")


def _check_private(directory: str) -> None:
    """The per-user folder in the shared temporary directory must be this user's own: another user who made it
    first could plant fits that claim every byte (each of ours would then be refused)."""
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise OSError(f"{directory} is not a folder of this user's that only it can write to")


def device_key(device: torch.device) -> str:
    """Names a device the same way in every process on the host: ``cpu``, or a CUDA GPU by its UUID (device
    indices differ between processes with different ``CUDA_VISIBLE_DEVICES``)."""
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda-{getattr(torch.cuda.get_device_properties(index), 'uuid', index)}"


def _in_use(device: torch.device) -> int:
    """Bytes this process holds now: what the CUDA caching allocator holds, or the resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_reserved(device)
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


@dataclass
class RunningFit:
    device: str  # device_key; "cpu" for a file without one
    reserved: int  # bytes its preflight estimated
    in_use: int  # bytes it has allocated since it started, at its last report

    @property
    def outstanding(self) -> int:
        """Reserved but not yet allocated."""
        return max(0, self.reserved - self.in_use)


def _parse(text: str) -> RunningFit:
    parts = text.split()
    try:
        return RunningFit(parts[0], int(parts[1]), int(parts[2]))
    except (IndexError, ValueError):  # an older version's empty file, or one read mid-rewrite
        return RunningFit("cpu", 0, 0)


def _open_shared(path: str, flags: int) -> int:
    """Open (creating) a file of the share folder, readable by every uid sharing the folder whatever the umask."""
    fd = os.open(path, flags, 0o644)
    with contextlib.suppress(OSError):  # (another uid's existing file: its owner set the mode)
        if os.fstat(fd).st_uid == os.geteuid():
            os.fchmod(fd, 0o644)
    return fd


_process_lock = threading.Lock()
_process_shares = 0  # this process's running shares (fits in threads)
_process_threads = 1  # torch's threads when the first of them began: the most any gets, restored by the last


def _process_share_begins() -> int:
    """Count a share of this process in; returns torch's threads from before the process's first running share
    (a fit in a thread that began while another had cut the threads took that as its own and left it so)."""
    global _process_shares, _process_threads
    with _process_lock:
        if _process_shares == 0:
            _process_threads = torch.get_num_threads()
        _process_shares += 1
        return _process_threads


def _process_share_ends() -> None:
    global _process_shares
    with _process_lock:
        _process_shares -= 1
        if _process_shares == 0:  # (always: with OpenMP a thread's count is its own, and the one new threads
            torch.set_num_threads(_process_threads)  # start with was set by whichever fit set it last)


class HostShare:
    """``with HostShare(device=..., preflight=...):`` around a fit; call :meth:`update` now and then during it.

    ``preflight(reserved_elsewhere)`` (optional) runs under the folder's lock before the fit is registered:
    it gets the bytes other fits on the same device have reserved but not yet allocated, raises when the fit
    does not fit, and returns the bytes to reserve (:func:`dainr.memory.check_memory` does both)."""

    def __init__(self, directory: Optional[str] = None, cores: Optional[int] = None,
                 device: torch.device = torch.device("cpu"),
                 preflight: Optional[Callable[[int], int]] = None):
        self.directory = directory or default_directory()
        if cores is None:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self.cores = cores
        self.device = device
        self.key = device_key(device)
        self.preflight = preflight
        self.reserved = 0
        self.threads = self.base = torch.get_num_threads()
        self._fd: Optional[int] = None
        self._path: Optional[str] = None

    def _record(self, in_use: int) -> bytes:
        return f"{self.key} {self.reserved:0{_FIELD}d} {max(0, in_use):0{_FIELD}d}\n".encode()

    def __enter__(self) -> "HostShare":
        self.base = _process_share_begins()
        self.threads = torch.get_num_threads()
        try:
            return self._enter()
        except BaseException:  # the preflight refused the fit, or an interrupt
            self._unregister()
            _process_share_ends()
            raise

    def _enter(self) -> "HostShare":
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            if self.directory == _private_directory():
                _check_private(self.directory)
            # readable by all (flock needs no write access): fits of other uids sharing one folder (containers)
            folder = _open_shared(os.path.join(self.directory, ".lock"), os.O_CREAT | os.O_RDONLY)
        except OSError as exc:
            return self._alone(exc)
        try:
            fcntl.flock(folder, fcntl.LOCK_EX)  # preflight and reservation as one step among the host's fits
            try:
                elsewhere = self.reserved_elsewhere()
            except OSError as exc:
                return self._alone(exc)
            if self.preflight is not None:
                self.reserved = self.preflight(elsewhere)
            self._register()
        finally:
            os.close(folder)  # releases the folder's lock
        self.update()
        return self

    def _alone(self, exc: OSError) -> "HostShare":
        log.warning("host share off, the fit keeps %d threads and counts no other fit's memory: %s", self.base, exc)
        if self.preflight is not None:
            self.reserved = self.preflight(0)
        return self

    def _register(self) -> None:
        name = f"{os.getpid()}-{uuid.uuid4().hex}"  # unique across PID namespaces sharing the folder
        partial, path = (os.path.join(self.directory, name + ext) for ext in (".new", ".fit"))
        # on the CPU what the process held before the fit is not the fit's; on CUDA the caching allocator keeps what
        # this process's earlier fits reserved, the fit reuses it, and other processes' free memory (mem_get_info)
        # already excludes it: all of it counts as in use (else a resident gadget's estimate stayed outstanding)
        self._base_in_use = _in_use(self.device) if self.device.type == "cpu" else 0
        try:
            fd = _open_shared(partial, os.O_CREAT | os.O_RDWR)
        except OSError as exc:
            log.warning("host share off, the fit keeps %d threads: %s", self.base, exc)
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # locked before it is visible as a running fit
            os.pwrite(fd, self._record(0), 0)
            os.rename(partial, path)
        except OSError as exc:
            log.warning("host share off, the fit keeps %d threads: %s", self.base, exc)
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(partial)
            return
        self._fd, self._path = fd, path

    def __exit__(self, *exc) -> None:
        self._unregister()
        _process_share_ends()  # the process's last running share restores its threads
        self.threads = torch.get_num_threads()

    def _unregister(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self._path)
        os.close(self._fd)
        self._fd = None

    def others(self) -> List[RunningFit]:
        """The other fits running on this host now; removes the files of fits that have gone."""
        found = []
        for name in os.listdir(self.directory):
            path = os.path.join(self.directory, name)
            if not name.endswith(".fit") or path == self._path:
                continue
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:  # its fit just ended
                continue
            except PermissionError:  # another uid's file of an older version (0600): cannot tell, not counted
                continue
            try:
                # shared: it fails only against the running fit's exclusive lock, not against another fit
                # checking the same file at this moment (which made a dead fit count as running)
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                found.append(_parse(os.pread(fd, 256, 0).decode("ascii", "replace")))
            else:
                with contextlib.suppress(FileNotFoundError, PermissionError):  # removed first by another fit; or
                    os.unlink(path)  # another uid's in a sticky folder: left for a fit of that uid
            finally:
                os.close(fd)
        return found

    def running(self) -> int:
        """CPU fits running on this host now (this one included, when it is a CPU fit)."""
        mine = int(self._fd is not None and self.device.type == "cpu")
        return mine + sum(fit.device == "cpu" for fit in self.others())

    def reserved_elsewhere(self) -> int:
        """Bytes the other fits on this device have reserved and not yet allocated."""
        return sum(fit.outstanding for fit in self.others() if fit.device == self.key)

    def update(self) -> int:
        """Report the memory this fit holds; a CPU fit sets its torch threads to its share of the cores.
        Returns the threads."""
        if self._fd is None:
            return self.threads
        try:
            os.pwrite(self._fd, self._record(_in_use(self.device) - self._base_in_use), 0)
            if self.device.type != "cpu":
                return self.threads
            running = self.running()
        except OSError as exc:  # the folder removed (a tmp cleaner), unreadable, full: the fit goes on unshared
            log.warning("host share off for the rest of this fit, which keeps %d threads: %s", self.threads, exc)
            self._unregister()
            return self.threads
        threads = max(1, min(self.base, self.cores // max(1, running)))
        if threads != torch.get_num_threads():  # (another share of this process may have set them)
            torch.set_num_threads(threads)
        self.threads = threads
        return threads


def reconstruct_shared(data, cfg, callback: Optional[Callable] = None):
    """:func:`dainr.reconstruct`, sharing the host with the other fits on it: a CPU fit shares the cores, and
    the memory preflight counts what the other fits on the same device have reserved (the gadget and
    ``dainr recon`` run fits this way)."""
    device = resolve_device(cfg.device)
    preflight = (lambda elsewhere: check_memory(data, cfg, device, elsewhere).peak) if cfg.check_memory else None
    with HostShare(device=device, preflight=preflight) as share:
        def on_progress(progress):
            share.update()  # another fit may have started or ended since the last epoch
            return callback(progress) if callback is not None else None

        return reconstruct(data, cfg, callback=on_progress)  # its own check, now alone, passes as ours did
