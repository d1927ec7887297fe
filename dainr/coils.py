"""Coil sensitivity estimation (Walsh/Inati adaptive combine) and noise prewhitening.

Coil maps come from the time-averaged data of all spokes: with a golden-angle sequence the
union of all frames' spokes samples k-space nearly uniformly, so its DCF-weighted adjoint
gives artefact-poor low-resolution coil images.  The Walsh method (Walsh et al., MRM 2000; the
method in Gadgetron's ``coil_map_2d_Inati``) takes the dominant eigenvector of the locally
smoothed coil covariance per pixel.  It is a dozen tensor operations here (batched
``eigh``), runs on the GPU too, and avoids pulling in sigpy/numba or BART just for this step.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


EIGH_CHUNK = 128  # pixels per batched eigh call
EIGH_WORKSPACE_32 = 1.44e6  # CUDA bytes of batched eigh workspace per pixel, 32 coils (measured on an H100)
COV_BUDGET = 1 << 22  # covariance entries (coils² × pixels) held at once: ≈ 32 MB per complex64 copy
BATCHED_EIGH_MAX = 32  # cuSOLVER's batched eigh (syevjBatched) takes at most 32 × 32; larger go one call per matrix
POWER_ITERATIONS = 60


def walsh_coil_maps(coil_images: torch.Tensor, kernel: int = 7, budget: int = COV_BUDGET,
                    power: Optional[bool] = None) -> torch.Tensor:
    """Coil images (C, H, W) complex → maps (C, H, W), unit norm over coils at every pixel.

    The phase is referenced to the coil with the most energy, so maps are smooth where that
    coil has signal (one coil: a map of ones).  The (C, C) covariance per pixel is built, smoothed and decomposed in strips
    of rows with ``budget`` entries at most (plus the kernel's halo rows), so memory stays bounded
    (the whole image at once took 5 copies of C² × H × W complex values: 2.7 GB for 256² × 32 coils);
    the maps equal those from the whole image at once (to float rounding).  ``power`` (default: on CUDA above
    32 coils, where cuSOLVER would run one eigh per pixel, 16k calls for 128²) takes the eigenvectors by batched
    power iteration instead.
    """
    if coil_images.ndim != 3 or not coil_images.is_complex():
        raise ValueError(f"coil_images must be complex (C, H, W), got {tuple(coil_images.shape)}")
    C, H, W = coil_images.shape
    if C == 1:
        return torch.ones_like(coil_images)  # (the reference coil's phase taken out, as below: |map| = 1, phase 0)
    x = coil_images / coil_images.abs().amax().clamp_min(1e-30)
    rows = max(1, budget // (C * C * W))
    if power is None:
        power = x.is_cuda and C > BATCHED_EIGH_MAX
    maps = torch.cat([_dominant_eigenvectors(x, r, min(H, r + rows), kernel, power) for r in range(0, H, rows)])
    maps = maps.to(coil_images.dtype)
    ref = int(coil_images.abs().pow(2).sum((1, 2)).argmax())
    maps = maps * torch.exp(-1j * maps[:, ref].angle())[:, None]
    return maps.T.reshape(C, H, W).contiguous()


def _dominant_eigenvectors(x: torch.Tensor, r0: int, r1: int, kernel: int, power: bool = False) -> torch.Tensor:
    """(pixels, C) dominant eigenvectors of the smoothed coil covariance of rows ``r0:r1`` of ``x`` (C, H, W)."""
    C, H, W = x.shape
    pad = kernel // 2
    a, b = max(0, r0 - pad), min(H, r1 + pad)  # halo rows: every window of rows r0:r1 lies inside a:b
    xs = x[:, a:b]
    cov = xs[:, None] * xs[None].conj()  # (C, C, h, W)
    flat = torch.view_as_real(cov.reshape(C * C, b - a, W)).permute(0, 3, 1, 2).reshape(1, C * C * 2, b - a, W)
    smooth = F.avg_pool2d(flat, kernel, stride=1, padding=pad, count_include_pad=False)[..., r0 - a:r1 - a, :]
    smooth = smooth.reshape(C * C, 2, r1 - r0, W).permute(0, 2, 3, 1).contiguous()
    cov = torch.view_as_complex(smooth).reshape(C, C, (r1 - r0) * W).permute(2, 0, 1)  # (pixels, C, C)
    cov = 0.5 * (cov + cov.conj().transpose(-1, -2))
    if power:  # (a few batched matrix-vector products, from the column of largest norm)
        cov = cov.to(torch.complex128)
        v = cov[torch.arange(len(cov)), :, cov.abs().pow(2).sum(-2).argmax(-1)]
        for _ in range(POWER_ITERATIONS):
            v = (cov @ v[..., None])[..., 0]
            v = v / torch.linalg.vector_norm(v, dim=-1, keepdim=True).clamp_min(1e-300)
        return v
    # in chunks: batched eigh's workspace grows with the batch (measured on an H100: 24 GB for all
    # 128² pixels of 32 coils at once)
    return torch.cat([torch.linalg.eigh(c.to(torch.complex128))[1][..., -1] for c in cov.split(EIGH_CHUNK)])


def noise_prewhitener(noise: torch.Tensor) -> torch.Tensor:
    """Noise samples (C, n) complex → whitening matrix W (C, C) with ``cov(W n) = I``.

    ``W = L^{-1}`` for the Cholesky factor ``Ψ = L Lᴴ`` of the noise covariance.
    """
    if noise.ndim != 2 or not noise.is_complex():
        raise ValueError(f"noise must be complex (coils, samples), got {tuple(noise.shape)}")
    C, n = noise.shape
    if n < 2 * C:
        raise ValueError(f"need at least {2 * C} noise samples per coil to estimate a {C}x{C} covariance, got {n}")
    if not torch.isfinite(torch.view_as_real(noise)).all():
        raise ValueError("noise samples contain NaN or Inf")
    x = noise.to(torch.complex128)
    psi = (x @ x.conj().T) / (n - 1)
    eig = torch.linalg.eigvalsh(psi)
    var = psi.diagonal().real
    dead = torch.nonzero(var <= 1e-8 * var.amax()).flatten().tolist()
    if dead:
        raise ValueError(f"noise scan: coil(s) {dead} carry (almost) no noise (variance {float(var[dead[0]]):.3g} vs "
                         f"{float(var.amax()):.3g}): a dead or disconnected channel; leave it out of the data and "
                         "the noise scan")
    if not bool(eig[0] > 1e-8 * eig[-1]):  # duplicated channels
        raise ValueError(f"noise covariance is not positive definite (eigenvalues {float(eig[0]):.3g} .. {float(eig[-1]):.3g}); "
                         "check for dead or duplicated channels")
    L = torch.linalg.cholesky(psi)
    eye = torch.eye(C, dtype=torch.complex128, device=noise.device)
    return torch.linalg.solve_triangular(L, eye, upper=False).to(noise.dtype)


def apply_prewhitener(kdata: torch.Tensor, whitener: torch.Tensor, coil_dim: int = 1) -> torch.Tensor:
    """Apply a (C, C) whitening matrix along ``coil_dim`` of ``kdata``."""
    x = kdata.movedim(coil_dim, -1)
    return (x @ whitener.T).movedim(-1, coil_dim)
