import math

import pytest
import torch

from dainr.nufft import MulticoilNUFFT
from dainr.utils import finufft_available

BACKENDS = ["torchkbnufft"] + (["finufft"] if finufft_available() else [])


def _setup(backend, B=2, C=3, N=24, M=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    smaps = torch.randn(C, N, N, dtype=torch.complex64, generator=g)
    op = MulticoilNUFFT(smaps, backend=backend)
    omega = (torch.rand(B, 2, M, generator=g) - 0.5) * 2 * math.pi
    x = torch.randn(B, N, N, dtype=torch.complex64, generator=g)
    y = torch.randn(B, C, M, dtype=torch.complex64, generator=g)
    return op, omega, x, y


@pytest.mark.parametrize("backend", BACKENDS)
def test_adjointness(backend):
    op, omega, x, y = _setup(backend)
    lhs = torch.vdot(op.forward(x, omega).flatten(), y.flatten())
    rhs = torch.vdot(x.flatten(), op.adjoint(y, omega).flatten())
    assert abs(lhs - rhs) / abs(lhs) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_matches_direct_dft(backend):
    op, omega, x, _ = _setup(backend, B=1, C=1, N=16, M=50)
    n = torch.arange(16) - 8
    ny, nx = torch.meshgrid(n, n, indexing="ij")
    ph = torch.exp(-1j * (omega[0, 0][:, None, None].double() * ny + omega[0, 1][:, None, None].double() * nx))
    ref = (ph * (x[0] * op.smaps[0]).to(torch.complex128)).sum((1, 2))
    got = op.forward(x, omega)[0, 0].to(torch.complex128)
    assert float((got - ref).norm() / ref.norm()) < 2e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_autograd_gradient_is_adjoint(backend):
    op, omega, x, y = _setup(backend)
    x = x.clone().requires_grad_(True)
    r = op.forward(x, omega) - y
    (r.abs() ** 2).sum().backward()
    expected = 2 * op.adjoint(r.detach(), omega)
    assert float((x.grad - expected).norm() / expected.norm()) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_preconditioned_gradient_is_dcf_weighted_sense_combined(backend):
    op, omega, x, y = _setup(backend)
    dcf = torch.rand(omega.shape[0], omega.shape[-1]) + 0.1
    x = x.clone().requires_grad_(True)
    pred = op.preconditioned_forward(x, omega, dcf)
    assert torch.allclose(pred, op.forward(x.detach(), omega), atol=1e-5)
    g = torch.randn_like(pred)
    (pred * g.conj()).real.sum().backward()
    expected = op.adjoint(g * dcf[:, None], omega) / (op.smaps.abs() ** 2).sum(0)
    assert float((x.grad - expected).norm() / expected.norm()) < 1e-4


@pytest.mark.skipif(not finufft_available(), reason="finufft not installed")
def test_backends_agree():
    a, omega, x, _ = _setup("torchkbnufft")
    b = MulticoilNUFFT(a.smaps, backend="finufft")
    ya, yb = a.forward(x, omega), b.forward(x, omega)
    assert float((ya - yb).norm() / ya.norm()) < 2e-3


def test_bad_backend_and_maps():
    with pytest.raises(ValueError, match="unknown NUFFT backend"):
        MulticoilNUFFT(torch.ones(1, 8, 8, dtype=torch.complex64), backend="bart")
    with pytest.raises(ValueError, match="complex"):
        MulticoilNUFFT(torch.ones(1, 8, 8), backend="torchkbnufft")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batched_nufft_stays_on_device():
    op, omega, x, y = _setup("torchkbnufft")
    dev = MulticoilNUFFT(op.smaps.cuda(), backend="auto")
    assert dev.backend == "torchkbnufft"
    out = dev.forward(x.cuda(), omega.cuda())
    assert out.is_cuda and torch.allclose(out.cpu(), op.forward(x, omega), atol=1e-3)
