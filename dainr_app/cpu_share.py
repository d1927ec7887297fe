"""Share the CPU cores among the DA-INR fits running at once on this host (gadget processes of one or
several servers, the local channels of a ``<distributed>`` pipeline, several clients).

Each fit runs torch's OpenMP thread pool.  Idle OpenMP threads spin before they sleep, so two processes
that each use every core steal each other's cycles: two 64² fits that take 6.5 s alone took 212 s side by
side on a 2-core VM, and two clients replaying the README demo data at once 304 s instead of 20–24 s
(``dainr bench --case concurrent``).  :class:`CpuShare` gives every running CPU fit ``cores // running
fits`` threads (at least 1) and re-checks whenever the fit reports progress (every epoch of its stopping
rule), so the threads in use stay within the cores.

Running fits are counted with lock files: a fit holds an exclusive ``flock`` on ``<dir>/<pid>-<uuid>.fit``
while it runs; the kernel drops the lock when the process ends, however it ends, and a file whose lock can
be taken belongs to a fit that has gone (it is removed).  Where the folder cannot be used (a read-only
temporary directory), the fit runs with the process's threads as before and a warning is logged.
"""
from __future__ import annotations

import fcntl
import logging
import os
import tempfile
import uuid
from typing import Callable, Optional

import torch

from dainr import reconstruct
from dainr.utils import resolve_device

log = logging.getLogger("dainr.cpu_share")


def default_directory() -> str:
    """``$DAINR_CPU_SHARE_DIR`` (e.g. a folder mounted into several containers on one host), else a folder of
    this user's in the temporary directory."""
    return os.environ.get("DAINR_CPU_SHARE_DIR") or os.path.join(tempfile.gettempdir(), f"dainr-cpu-{os.getuid()}")


class CpuShare:
    """``with CpuShare():`` around a CPU fit; call :meth:`update` now and then during the fit."""

    def __init__(self, directory: Optional[str] = None, cores: Optional[int] = None):
        self.directory = directory or default_directory()
        if cores is None:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self.cores = cores
        self.threads = self.base = torch.get_num_threads()
        self._fd: Optional[int] = None

    def __enter__(self) -> "CpuShare":
        self.threads = self.base = torch.get_num_threads()
        name = f"{os.getpid()}-{uuid.uuid4().hex}"  # unique across PID namespaces sharing the folder
        partial = os.path.join(self.directory, name + ".new")
        self._path = os.path.join(self.directory, name + ".fit")
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            self._fd = os.open(partial, os.O_CREAT | os.O_RDWR, 0o600)
            fcntl.flock(self._fd, fcntl.LOCK_EX)  # locked before it is visible as a running fit
            os.rename(partial, self._path)
        except OSError as exc:
            log.warning("CPU share off, the fit keeps %d threads: %s", self.base, exc)
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            return self
        self.update()
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is None:
            return
        torch.set_num_threads(self.base)
        self.threads = self.base
        try:
            os.unlink(self._path)
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None

    def running(self) -> int:
        """Fits running on this host now (this one included); removes the files of fits that have gone."""
        count = 0
        for name in os.listdir(self.directory):
            if not name.endswith(".fit"):
                continue
            path = os.path.join(self.directory, name)
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:  # its fit just ended
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                count += 1
            else:
                os.unlink(path)
            finally:
                os.close(fd)
        return count

    def update(self) -> int:
        """Set this process's torch threads to its share of the cores; returns it."""
        if self._fd is None:
            return self.threads
        threads = max(1, min(self.base, self.cores // max(1, self.running())))
        if threads != self.threads:
            torch.set_num_threads(threads)
            self.threads = threads
        return threads


def reconstruct_sharing_cpu(data, cfg, callback: Optional[Callable] = None):
    """:func:`dainr.reconstruct`, sharing the cores with the other CPU fits on this host (the gadget and
    ``dainr recon`` run fits this way; a GPU fit runs as it is)."""
    if resolve_device(cfg.device).type != "cpu":
        return reconstruct(data, cfg, callback=callback)
    with CpuShare() as share:
        def on_progress(progress):
            share.update()  # another fit may have started or ended since the last epoch
            return callback(progress) if callback is not None else None

        return reconstruct(data, cfg, callback=on_progress)
