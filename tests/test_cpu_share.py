"""CpuShare: concurrent CPU fits on one host split the cores instead of oversubscribing them."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from dainr import DAINRConfig
from dainr.sim import simulate
from dainr_app.cpu_share import CpuShare, default_directory, reconstruct_sharing_cpu
from dainr_app.server import ROOT, child_env


@pytest.fixture
def four_threads():
    saved = torch.get_num_threads()
    torch.set_num_threads(4)
    yield
    torch.set_num_threads(saved)


def test_fits_split_the_cores_and_get_them_back(tmp_path, four_threads):
    d = str(tmp_path)
    with CpuShare(d, cores=4) as a:
        assert a.running() == 1 and a.threads == 4 and torch.get_num_threads() == 4
        with CpuShare(d, cores=4) as b, CpuShare(d, cores=4) as c:
            assert b.threads == 2 and c.threads == 1  # each sees the fits running when it starts
            assert a.update() == 1 and b.update() == 1 and torch.get_num_threads() == 1
        assert a.update() == 4 and torch.get_num_threads() == 4  # the others ended
    assert torch.get_num_threads() == 4 and os.listdir(d) == []


def test_the_folder_can_be_set_for_the_host(monkeypatch, tmp_path):
    monkeypatch.setenv("DAINR_CPU_SHARE_DIR", str(tmp_path))
    assert CpuShare().directory == str(tmp_path) == default_directory()


def test_a_fit_never_gets_more_threads_than_the_process_had(tmp_path, four_threads):
    with CpuShare(str(tmp_path), cores=64) as share:
        assert share.threads == 4


def test_files_of_fits_that_are_gone_are_not_counted(tmp_path):
    (tmp_path / "123-0.fit").write_text("")  # nobody holds its lock
    (tmp_path / "notes.txt").write_text("")
    with CpuShare(str(tmp_path), cores=2) as share:
        assert share.running() == 1
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]


def test_an_unusable_folder_leaves_the_threads_alone(tmp_path, four_threads, caplog):
    (tmp_path / "file").write_text("")
    with CpuShare(str(tmp_path / "file" / "share"), cores=1) as share:  # its parent is a file
        assert share.update() == 4 and torch.get_num_threads() == 4
    assert torch.get_num_threads() == 4 and "CPU share off" in caplog.text


def test_a_fit_in_another_process_counts_until_that_process_is_killed(tmp_path):
    code = (f"from dainr_app.cpu_share import CpuShare\nimport time\n"
            f"with CpuShare({str(tmp_path)!r}):\n    time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=child_env())
    try:
        deadline = time.monotonic() + 60
        while not any(n.endswith(".fit") for n in os.listdir(tmp_path)):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        share = CpuShare(str(tmp_path), cores=2)
        with share:
            assert share.running() == 2 and share.threads == 1
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
            assert share.running() == 1  # the kernel dropped the killed fit's lock
    finally:
        proc.kill()
        proc.wait(30)
    assert os.listdir(tmp_path) == []


def test_a_cpu_fit_runs_with_its_share_and_calls_the_callback(monkeypatch, tmp_path, four_threads):
    monkeypatch.setenv("DAINR_CPU_SHARE_DIR", str(tmp_path))
    monkeypatch.setattr("dainr_app.cpu_share.os.sched_getaffinity", lambda pid: {0, 1}, raising=False)
    scan = simulate(32, 4, 5, 2, seed=0)
    seen = []
    cfg = DAINRConfig(device="cpu", max_steps=3, preview_every=1, progress=False)
    with CpuShare():  # another fit on this host
        result = reconstruct_sharing_cpu(scan.data, cfg, callback=lambda p: seen.append(torch.get_num_threads()))
    assert seen == [1, 1, 1] and result.info["steps"] == 3
    assert torch.get_num_threads() == 4 and os.listdir(tmp_path) == []
