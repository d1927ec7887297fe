"""Classical baselines on the same operator: temporal-TV SENSE (GRASP-like) and CG-SENSE.

Temporal TV solves ``min_x ½‖W^½(A x − y)‖² + λ‖D_t x‖₁`` (GRASP, Feng et al., MRM 2014:
the ramp DCF ``W`` inside the data term, as GRASP's ``MCNUFFT`` does, preconditions the radial
problem) with the Chambolle–Pock primal-dual algorithm, which handles the non-smooth TV exactly.
The weighted operator is scaled to unit norm (power iteration), so ``λ`` is relative to the
data scale that :class:`~dainr.recon.Problem` normalises to (99th percentile of the
zero-filled image = 1).

CG-SENSE (Pruessmann et al., MRM 2001) solves each frame's DCF-weighted least squares
``min_x ‖W^½(A x − y)‖²`` by conjugate gradients on the normal equations, frames batched; it has no
regulariser, so the iteration count is its regularisation, chosen like TV's λ by held-out spokes.
"""
from __future__ import annotations

import math
import time
from typing import Optional, Sequence, Union

import torch

from .config import DAINRConfig
from .data import RadialData, is_count
from .recon import Problem, _loss, acquired_problem
from .utils import library_defaults


def _time_diff(x: torch.Tensor) -> torch.Tensor:
    return x[1:] - x[:-1]


def _time_diff_adjoint(q: torch.Tensor) -> torch.Tensor:
    zero = q.new_zeros((1,) + q.shape[1:])
    return torch.cat((zero, q)) - torch.cat((q, zero))


def _forward(p: Problem, x: torch.Tensor, batch: int = 8) -> torch.Tensor:
    return torch.cat([p.op.forward(x[i:i + batch], p.omega[i:i + batch]) for i in range(0, len(x), batch)])


def _adjoint(p: Problem, y: torch.Tensor, batch: int = 8) -> torch.Tensor:
    return torch.cat([p.op.adjoint(y[i:i + batch], p.omega[i:i + batch]) for i in range(0, len(y), batch)])


def _holdout_residual(p: Problem, pred: torch.Tensor) -> Optional[float]:
    """Mean L1 residual of predicted k-space ``pred`` (= A x, normalised units) on the held-out spokes."""
    if not p.has_holdout:
        return None
    return float(_loss(pred, p.kdata, p.hold_w, exact=True))  # the fit's held-out number, the same bits at any threads


@library_defaults
def temporal_tv(data: RadialData, lam: float = 0.02, iterations: int = 100, cfg: Optional[DAINRConfig] = None,
                coil_maps: Optional[torch.Tensor] = None, power_iterations: int = 15, holdout_spokes: int = 0,
                checkpoints: Sequence[int] = ()) -> dict:
    """Temporal-TV SENSE reconstruction.  Returns ``dict(images, seconds, iterations, lam, holdout_residual,
    iterates, holdout_residuals)``.

    Images are in data units.  With ``holdout_spokes`` > 0 those spokes per frame (the same
    choice DA-INR's stopping rule makes) are left out and their mean L1 k-space residual is
    returned, so λ can be chosen without ground truth (:func:`temporal_tv_holdout_lambda`).
    ``checkpoints``: iteration counts (≤ ``iterations``) whose images (``iterates``) and held-out residuals
    (``holdout_residuals``) are kept, keyed by the count: one run gives every shorter run's result.
    """
    if not (lam >= 0 and math.isfinite(lam)) or iterations < 0 or power_iterations < 1:
        raise ValueError(f"temporal_tv needs a finite lam >= 0, iterations >= 0 and power_iterations >= 1 (got {lam!r}, "
                         f"{iterations!r}, {power_iterations!r})")
    checkpoints = list(checkpoints)  # (a generator: read once)
    if not all(is_count(n) and n <= iterations for n in checkpoints):
        raise ValueError(f"temporal_tv's checkpoints must be iteration counts from 1 to iterations ({iterations}), "
                         f"got {checkpoints!r}")
    checkpoints = frozenset(checkpoints)
    t0 = time.perf_counter()
    p = acquired_problem(data, cfg, coil_maps, holdout_spokes)
    sqrt_w = (p.dcf * p.train_w).sqrt()[:, None, :]  # zero on padding and held-out spokes

    def A(x):
        return _forward(p, x) * sqrt_w / norm

    def AH(y):
        return _adjoint(p, y * sqrt_w) / norm

    norm = 1.0
    with torch.no_grad():
        # power iteration for ‖A‖ from a fixed start: the step sizes, hence the images, are reproducible
        v = torch.randn(p.zero_filled.shape, dtype=p.zero_filled.dtype, generator=torch.Generator().manual_seed(0))
        v = v.to(p.zero_filled.device)
        for _ in range(power_iterations):
            v = AH(A(v))
            norm_a2 = float(torch.linalg.vector_norm(v))
            v = v / norm_a2
        norm = math.sqrt(norm_a2 * 1.05)  # A and AH now have norm <= 1
        L = math.sqrt(1.0 + 4.0)
        sigma = tau = 1.0 / L
        y = p.kdata * sqrt_w / norm
        x = p.zero_filled_from(p.train_w)  # held-out spokes judge λ: they must not seed the image either
        x_bar = x.clone()
        dual_k = torch.zeros_like(y)
        dual_t = torch.zeros_like(x[1:])
        iterates, residuals = {}, {}
        for n in range(1, iterations + 1):
            dual_k = (dual_k + sigma * (A(x_bar) - y)) / (1 + sigma)
            dual_t = dual_t + sigma * _time_diff(x_bar)
            # projection onto the ball |·| <= λ (λ = 0: the point 0, no regulariser; 0/0 elsewhere)
            dual_t = dual_t / torch.clamp(dual_t.abs() / lam, min=1.0) if lam > 0 else torch.zeros_like(dual_t)
            x_new = x - tau * (AH(dual_k) + _time_diff_adjoint(dual_t))
            x_bar = 2 * x_new - x
            x = x_new
            if n in checkpoints:
                iterates[n] = (x * p.scale).cpu()
                if p.has_holdout:
                    residuals[n] = _holdout_residual(p, _forward(p, x))
    return dict(images=(x * p.scale).cpu(), seconds=time.perf_counter() - t0, iterations=iterations, lam=lam,
                holdout_residual=_holdout_residual(p, _forward(p, x)) if p.has_holdout else None,
                iterates=iterates, holdout_residuals=residuals)


def _need_holdout(holdout_spokes) -> None:
    if not is_count(holdout_spokes):
        raise ValueError(f"choosing by the held-out residual needs holdout_spokes >= 1, got {holdout_spokes!r}")


def temporal_tv_holdout_lambda(data: RadialData, lambdas=(0.001, 0.002, 0.005, 0.01, 0.02), holdout_spokes: int = 1,
                               iterations: Union[int, Sequence[int]] = 100, **kwargs) -> dict:
    """Pick λ, and the iteration count where ``iterations`` offers several, by the held-out-spoke residual (no
    ground truth), then reconstruct from all spokes with them.  ``holdout_scores``: the residual per
    ``(λ, iterations)``."""
    _need_holdout(holdout_spokes)
    if not len(lambdas):
        raise ValueError("give at least one λ to choose from")
    counts = list(iterations) if isinstance(iterations, (list, tuple, range)) else [iterations]
    if not counts or not all(is_count(n) for n in counts):
        raise ValueError(f"iterations must be a count >= 1 or several, got {iterations!r}")
    counts = sorted(set(counts))
    scores = {}
    for lam in lambdas:
        run = temporal_tv(data, lam=lam, iterations=counts[-1], checkpoints=counts, holdout_spokes=holdout_spokes,
                          **kwargs)
        scores.update(((lam, n), residual) for n, residual in run["holdout_residuals"].items())
    lam, n = min(scores, key=scores.get)
    out = temporal_tv(data, lam=lam, iterations=n, **kwargs)
    out["holdout_scores"] = scores
    return out


@library_defaults
def cg_sense(data: RadialData, iterations: int = 10, cfg: Optional[DAINRConfig] = None,
             coil_maps: Optional[torch.Tensor] = None, holdout_spokes: int = 0, keep_iterates: bool = False) -> dict:
    """CG-SENSE, every frame on its own (batched).  Returns ``dict(images, seconds, iterations,
    holdout_residuals, iterates)``: images in data units after ``iterations`` CG steps, the held-out
    residual after each step (with ``holdout_spokes`` > 0), and every iterate if ``keep_iterates``.
    """
    if iterations < 1:
        raise ValueError(f"cg_sense needs iterations >= 1, got {iterations!r}")
    t0 = time.perf_counter()
    p = acquired_problem(data, cfg, coil_maps, holdout_spokes)
    w = (p.dcf * p.train_w)[:, None, :]  # zero on padding and held-out spokes

    def dot(a, b):  # per-frame real inner product, shaped to broadcast over images
        return (a.conj() * b).real.sum(dim=(1, 2), keepdim=True)

    with torch.no_grad():
        x, ax = torch.zeros_like(p.zero_filled), torch.zeros_like(p.kdata)  # ax = A x: the held-out residual
        r = _adjoint(p, p.kdata * w)
        d, rr = r.clone(), dot(r, r)
        held, iterates = [], []
        for _ in range(iterations):
            ad = _forward(p, d)
            q = _adjoint(p, ad * w)  # the normal operator Aᴴ W A applied to d
            alpha = rr / dot(d, q).clamp_min(1e-30)
            x, ax = x + alpha * d, ax + alpha * ad
            r = r - alpha * q
            rr_new = dot(r, r)
            d = r + (rr_new / rr.clamp_min(1e-30)) * d
            rr = rr_new
            held.append(_holdout_residual(p, ax))
            if keep_iterates:
                iterates.append((x * p.scale).cpu())
    return dict(images=(x * p.scale).cpu(), seconds=time.perf_counter() - t0, iterations=iterations,
                holdout_residuals=held, iterates=iterates)


def cg_sense_holdout_iterations(data: RadialData, max_iterations: int = 30, holdout_spokes: int = 1, **kwargs) -> dict:
    """Pick the CG iteration count by the held-out-spoke residual (no ground truth), then run it on all spokes."""
    _need_holdout(holdout_spokes)
    held = cg_sense(data, max_iterations, holdout_spokes=holdout_spokes, **kwargs)["holdout_residuals"]
    best = 1 + min(range(len(held)), key=held.__getitem__)
    out = cg_sense(data, best, **kwargs)
    out["holdout_scores"] = held
    return out
