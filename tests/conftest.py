import pytest
import torch

torch.set_num_threads(2)


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
