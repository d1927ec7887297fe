import os
import shutil
import tempfile

# Before torch (and the gadget processes, which inherit it) start OpenMP: idle OpenMP threads that spin
# instead of sleeping made a test 70× slower on 2 busy cores (a test fit 61 s instead of 0.9 s).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# The tests' fits share the host among themselves only, not with the user's real fits or a running benchmark.
os.environ["DAINR_SHARE_DIR"] = tempfile.mkdtemp(prefix="dainr-test-share-")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


def pytest_unconfigure(config):
    shutil.rmtree(os.environ["DAINR_SHARE_DIR"], ignore_errors=True)  # (one per run, left in /tmp before)


@pytest.fixture(scope="session")
def small_scan():
    """A small simulated cine: 32², 8 frames, 4 coils, 9 spokes/frame, noise."""
    from dainr.sim import simulate

    return simulate(matrix=32, frames=8, spokes=9, coils=4, noise_level=0.02, seed=1)


@pytest.fixture(scope="module")
def server():
    """An embedded ``dainr serve`` on a free port, one per test module."""
    from .server_harness import running_server

    with running_server() as srv:
        yield srv
