"""HostShare: concurrent fits on one host split the cores instead of oversubscribing them, and the memory
preflight counts what the other fits on the same device will still allocate."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from dainr import DAINRConfig
from dainr.sim import simulate
from dainr.memory import InsufficientMemoryError
from dainr_app.host_share import HostShare, default_directory, reconstruct_shared
from dainr_app.server import ROOT, child_env


@pytest.fixture
def four_threads():
    saved = torch.get_num_threads()
    torch.set_num_threads(4)
    yield
    torch.set_num_threads(saved)


def test_fits_split_the_cores_and_get_them_back(tmp_path, four_threads):
    d = str(tmp_path)
    with HostShare(d, cores=4) as a:
        assert a.running() == 1 and a.threads == 4 and torch.get_num_threads() == 4
        with HostShare(d, cores=4) as b, HostShare(d, cores=4) as c:
            assert b.threads == 2 and c.threads == 1  # each sees the fits running when it starts
            assert a.update() == 1 and b.update() == 1 and torch.get_num_threads() == 1
        assert a.update() == 4 and torch.get_num_threads() == 4  # the others ended
    assert torch.get_num_threads() == 4 and os.listdir(d) == [".lock"]


def test_overlapping_fits_of_one_process_give_back_the_threads_it_had(tmp_path, four_threads):
    """Fits in threads of one process (``reconstruct_shared`` from threads): one that began while another had cut
    the threads took the cut count as its own, kept it when alone, and left the process at it (a determinism
    review: every later fit ran on 1 thread)."""
    d = str(tmp_path)
    a, b, c = (HostShare(d, cores=4) for _ in range(3))
    a.__enter__()
    b.__enter__()
    assert a.update() == 2 and torch.get_num_threads() == 2
    a.__exit__(None, None, None)
    assert torch.get_num_threads() == 2  # b still runs with its share
    c.__enter__()  # begins at 2 threads
    b.__exit__(None, None, None)
    assert c.update() == 4 and torch.get_num_threads() == 4  # alone: every core the process had
    with HostShare(d, cores=4) as e:  # another share of the process set the threads: each sets its own
        assert c.update() == 2
        with HostShare(d, cores=4):
            assert c.update() == 1 and torch.get_num_threads() == 1
        assert e.update() == 2 and torch.get_num_threads() == 2  # (its own count was 2 all along)
    c.__exit__(None, None, None)
    assert torch.get_num_threads() == 4 and os.listdir(d) == [".lock"]
    for exc in (MemoryError("no room"), KeyboardInterrupt()):  # a refused or interrupted fit counts itself out
        with pytest.raises(type(exc)):
            with HostShare(d, cores=4, preflight=lambda elsewhere, exc=exc: (_ for _ in ()).throw(exc)):
                pass
    torch.set_num_threads(3)
    with HostShare(d, cores=4) as share:  # the next first share of the process takes the threads it finds
        assert share.threads == 3


def test_the_last_share_to_end_restores_the_threads_new_threads_start_with(tmp_path, four_threads):
    """With OpenMP a thread's count is its own and new threads start with the one set last: a fit in another
    thread that cut it and ended first left every later thread at the cut count (a code review)."""
    import threading

    d = str(tmp_path)
    a, b = HostShare(d, cores=4), HostShare(d, cores=4)

    def in_thread(fn):
        t = threading.Thread(target=fn)
        t.start()
        t.join()
    a.__enter__()  # (this thread)
    in_thread(lambda: (b.__enter__(), b.update(), b.__exit__(None, None, None)))  # cut to 2 there, ended first
    assert a.update() == 4
    a.__exit__(None, None, None)
    seen = []
    in_thread(lambda: seen.append(torch.get_num_threads()))
    assert seen == [4]


def test_the_folder_can_be_set_for_the_host(monkeypatch, tmp_path):
    monkeypatch.delenv("DAINR_SHARE_DIR", raising=False)
    monkeypatch.setenv("DAINR_CPU_SHARE_DIR", str(tmp_path / "old"))  # the earlier name still works
    assert HostShare().directory == str(tmp_path / "old") == default_directory()
    monkeypatch.setenv("DAINR_SHARE_DIR", str(tmp_path))
    assert HostShare().directory == str(tmp_path) == default_directory()


def test_a_fit_never_gets_more_threads_than_the_process_had(tmp_path, four_threads):
    with HostShare(str(tmp_path), cores=64) as share:
        assert share.threads == 4


def test_files_of_fits_that_are_gone_are_not_counted(tmp_path):
    (tmp_path / "123-0.fit").write_text("")  # nobody holds its lock
    (tmp_path / "notes.txt").write_text("")
    with HostShare(str(tmp_path), cores=2) as share:
        assert share.running() == 1
    assert sorted(os.listdir(tmp_path)) == [".lock", "notes.txt"]


def test_an_unusable_folder_leaves_the_threads_alone(tmp_path, four_threads, caplog):
    (tmp_path / "file").write_text("")
    with HostShare(str(tmp_path / "file" / "share"), cores=1) as share:  # its parent is a file
        assert share.update() == 4 and torch.get_num_threads() == 4
    assert torch.get_num_threads() == 4 and "host share off" in caplog.text


def test_the_per_user_folder_must_be_the_users_own(monkeypatch, tmp_path, caplog):
    """Another user who made $TMPDIR/dainr-share-<uid> first could plant a fit claiming every byte."""
    import tempfile

    monkeypatch.delenv("DAINR_SHARE_DIR", raising=False)
    monkeypatch.delenv("DAINR_CPU_SHARE_DIR", raising=False)
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))
    folder = tmp_path / f"dainr-share-{os.getuid()}"
    with HostShare(cores=2) as share:  # made by us, 0700: used
        assert share.directory == str(folder) and share.running() == 1
    folder.chmod(0o777)  # writable by others
    with HostShare(cores=2) as share:
        assert share.running() == 0
    assert "not a folder of this user's that only it can write to" in caplog.text
    folder.chmod(0o700)
    folder.rename(tmp_path / "elsewhere")
    folder.symlink_to(tmp_path / "elsewhere")  # a link to a folder someone else controls
    caplog.clear()
    with HostShare(cores=2) as share:
        assert share.running() == 0
    assert "host share off" in caplog.text


def test_a_fit_in_another_process_counts_until_that_process_is_killed(tmp_path):
    code = (f"from dainr_app.host_share import HostShare\nimport time\n"
            f"with HostShare({str(tmp_path)!r}):\n    time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=child_env())
    try:
        deadline = time.monotonic() + 60
        while not any(n.endswith(".fit") for n in os.listdir(tmp_path)):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        share = HostShare(str(tmp_path), cores=2)
        with share:
            assert share.running() == 2 and share.threads == 1
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
            assert share.running() == 1  # the kernel dropped the killed fit's lock
    finally:
        proc.kill()
        proc.wait(30)
    assert os.listdir(tmp_path) == [".lock"]


def test_a_cpu_fit_runs_with_its_share_and_calls_the_callback(monkeypatch, tmp_path, four_threads):
    monkeypatch.setenv("DAINR_SHARE_DIR", str(tmp_path))
    monkeypatch.setattr("dainr_app.host_share.os.sched_getaffinity", lambda pid: {0, 1}, raising=False)
    scan = simulate(32, 4, 5, 2, seed=0)
    seen = []
    cfg = DAINRConfig(device="cpu", max_steps=3, preview_every=1, progress=False)
    with HostShare():  # another fit on this host
        result = reconstruct_shared(scan.data, cfg, callback=lambda p: seen.append(torch.get_num_threads()))
    assert seen == [1, 1, 1] and result.info["steps"] == 3
    assert torch.get_num_threads() == 4 and os.listdir(tmp_path) == [".lock"]


GIB = 2 ** 30


def test_a_fit_counts_what_the_others_on_its_device_have_reserved_but_not_yet_allocated(tmp_path):
    d = str(tmp_path)
    seen = []

    def preflight(reserve):
        def check(elsewhere):
            seen.append(elsewhere)
            return reserve
        return check

    with HostShare(d, preflight=preflight(3 * GIB)) as a:
        with HostShare(d, preflight=preflight(GIB)):
            assert seen == [0, 3 * GIB]  # a has allocated nothing of its estimate yet
            os.pwrite(a._fd, a._record(2 * GIB), 0)  # a reports 2 GiB in use
            assert a.reserved_elsewhere() == GIB  # the second fit's whole reservation
            with HostShare(d, preflight=preflight(0)) as c:
                assert seen[-1] == GIB + GIB and c.reserved_elsewhere() == 2 * GIB
        os.pwrite(a._fd, a._record(5 * GIB), 0)  # more in use than it reserved: nothing outstanding
        with HostShare(d, preflight=preflight(0)):
            assert seen[-1] == 0
    # another device's reservation and a fit that has gone do not count
    with HostShare(d, preflight=preflight(GIB), device=torch.device("meta")):
        (tmp_path / "1-gone.fit").write_text(f"cpu {4 * GIB} 0\n")
        with HostShare(d, preflight=preflight(0)) as e:
            assert seen[-1] == 0 and e.running() == 1  # the meta fit does not take a CPU thread share either
    assert os.listdir(d) == [".lock"]


def test_the_preflight_refuses_what_the_running_fits_leave_too_little_room_for(tmp_path, monkeypatch):
    """Two fits that each fit alone: the second is refused while the first has not allocated its share."""
    monkeypatch.setenv("DAINR_SHARE_DIR", str(tmp_path))
    scan = simulate(32, 4, 5, 2, seed=0)
    cfg = DAINRConfig(device="cpu", max_steps=2)
    from dainr.memory import estimate_memory

    need = estimate_memory(scan.data, cfg, torch.device("cpu")).peak
    monkeypatch.setattr("dainr.memory.available_memory", lambda device: int(1.5 * need))
    assert reconstruct_shared(scan.data, cfg).info["steps"] == 2  # alone it fits
    with HostShare(preflight=lambda elsewhere: need):  # a fit that has just started
        with pytest.raises(InsufficientMemoryError, match="promised to other fits"):
            reconstruct_shared(scan.data, cfg)
        assert reconstruct_shared(scan.data, cfg.replace(check_memory=False)).info["steps"] == 2
    assert reconstruct_shared(scan.data, cfg).info["steps"] == 2  # its reservation went with it
    assert os.listdir(tmp_path) == [".lock"]


def test_preflights_that_start_together_take_turns(tmp_path, monkeypatch):
    """The check and the reservation are one step: a fit whose preflight is running holds the others back."""
    import threading

    monkeypatch.setattr("dainr_app.host_share._in_use", lambda device: 0)  # the two fits share this process

    d = str(tmp_path)
    entered, release, order, second_done = threading.Event(), threading.Event(), [], threading.Event()

    def slow(elsewhere):
        entered.set()
        release.wait(10)
        order.append(("first", elsewhere))
        return GIB

    def fast(elsewhere):
        order.append(("second", elsewhere))
        second_done.set()
        return GIB

    def first():  # registered until the second fit's preflight has run (not for a fixed time)
        with HostShare(d, preflight=slow):
            second_done.wait(10)

    t = threading.Thread(target=first)
    t.start()
    assert entered.wait(10)
    second = threading.Thread(target=lambda: HostShare(d, preflight=fast).__enter__().__exit__())
    second.start()
    time.sleep(0.3)
    assert order == []  # the second waits for the folder's lock
    release.set()
    t.join(10)
    second.join(10)
    assert order == [("first", 0), ("second", GIB)]


def test_a_cuda_fit_counts_the_allocator_cache_it_already_holds(tmp_path, monkeypatch):
    """A resident gadget's next scan on a GPU reuses the cache the last one left reserved: counted as not in use,
    its whole estimate stayed outstanding, on top of the free memory that already excluded the cache."""
    from dainr_app import host_share

    monkeypatch.setattr(host_share, "device_key", lambda device: "cuda-test")
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 3 * GIB)  # left by an earlier scan
    seen = []

    def check(elsewhere):
        seen.append(elsewhere)
        return 0

    with HostShare(str(tmp_path), device=torch.device("cuda"), preflight=lambda elsewhere: 2 * GIB):
        with HostShare(str(tmp_path), device=torch.device("cuda"), preflight=check):
            assert seen == [0]  # the first fit's 2 GiB are within the 3 GiB it holds


def test_a_folder_that_goes_away_mid_fit_leaves_the_fit_running_unshared(tmp_path, four_threads, caplog):
    """A tmp cleaner (or an operator) removing the folder, or another uid's unreadable file: update() raised and
    the reconstruction failed."""
    import shutil

    d = str(tmp_path / "share")
    with HostShare(d, cores=4) as a, HostShare(d, cores=4) as b:
        assert a.update() == b.update() == 2
        shutil.rmtree(d)
        assert a.update() == 2 and a._fd is None and "host share off for the rest of this fit" in caplog.text
    assert torch.get_num_threads() == 4  # given back


def test_a_dead_fit_is_not_counted_while_another_fit_checks_it_too(tmp_path):
    """Checking a file took an exclusive lock: a second checker at that moment saw it locked, as if running."""
    import fcntl

    dead = tmp_path / "999-x.fit"
    dead.write_text(f"cpu {10 ** 12:020d} {0:020d}\n")
    fd = os.open(dead, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # another fit checking it right now
        assert HostShare(str(tmp_path)).reserved_elsewhere() == 0
    finally:
        os.close(fd)


def test_the_share_files_are_readable_by_other_uids_whatever_the_umask(tmp_path):
    """One folder mounted into containers of different uids: files created 0600 left every other uid's fits
    unshared ("Permission denied: .lock")."""
    import stat

    old = os.umask(0o077)
    try:
        with HostShare(str(tmp_path), cores=2) as share:
            modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
            assert share._path.endswith(".fit")
    finally:
        os.umask(old)
    assert set(modes.values()) == {0o644} and ".lock" in modes and len(modes) == 2
