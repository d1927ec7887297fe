"""DA-INR reconstruction: prepare the data, fit the network, render frames.

>>> result = reconstruct(RadialData(kdata, traj, matrix=128), DAINRConfig())
>>> result.images  # (frames, 128, 128) complex, in the units of the (prewhitened) data

Pipeline: prewhiten → (spatial ×s: keep the k-space centre, fit at N/s) → coil maps from all
spokes → zero-filled images → frozen features → batched fit with a held-out-spoke stopping
rule → render every output frame (temporal ×r: frames between the acquired ones too).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import math
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import numpy as np
import torch

from .coils import apply_prewhitener, noise_prewhitener, walsh_coil_maps
from .config import DAINRConfig
from .data import RadialData, as_tensor, is_count
from .features import FrozenFeatureExtractor, neighbour_frames, normalise_for_extractor, sample_features
from .memory import check_memory, render_batch
from .model import DAINR, GridUpsampling, pixel_grid
from .nufft import MulticoilNUFFT
from .optim import AdamW
from .trajectory import omega_from_traj, ramp_dcf
from .utils import library_defaults, resolve_device


@dataclass
class FitProgress:
    """What a progress callback receives.

    ``preview`` is True every ``cfg.preview_every`` steps; ``images`` then renders every output frame
    (once, on first access, so a callback that does not look costs nothing) and is None otherwise. It renders
    the live model, so it can be read only until the callback returns (keep the tensor, not the progress).
    ``holdout_residual`` is the stopping rule's number (the held-out spokes' mean L1 k-space residual, in the fit's
    scaled data units) at the end of an epoch, and None on a preview-only call or without held-out spokes.
    """

    step: int
    elapsed: float
    loss: float
    holdout_residual: Optional[float]
    preview: bool = False
    _render: Optional[Callable[[], torch.Tensor]] = field(default=None, repr=False)
    _images: Optional[torch.Tensor] = field(default=None, repr=False)

    @property
    def images(self) -> Optional[torch.Tensor]:
        if self.preview and self._images is None:
            if self._render is None:
                raise RuntimeError(f"the preview of step {self.step} was not read inside the callback and the model "
                                   "has moved on since: read progress.images there and keep that tensor")
            self._images = self._render()
        return self._images if self.preview else None


@dataclass
class ReconResult:
    images: torch.Tensor  # (F_out, N, N) complex64, CPU
    zero_filled: torch.Tensor  # (F_acq, n, n) complex64 at the fitting resolution
    coil_maps: torch.Tensor  # (C, n, n), in the data's coil space (before noise prewhitening)
    acquired_frames: List[int]  # positions of the acquired frames among the output frames
    info: dict = field(default_factory=dict)
    lowres_images: Optional[torch.Tensor] = None  # spatial interpolation: the frames at the fitting matrix


class Problem:
    """Everything the fit needs, on one device, built once from :class:`RadialData`."""

    def __init__(self, data: RadialData, cfg: DAINRConfig, coil_maps: Optional[torch.Tensor], device: torch.device):
        data = dataclasses.replace(data)  # validated again: its fields may have been set since it was built
        self.cfg = cfg
        self.device = device
        self.out_matrix = data.matrix
        traj, spoke_mask = data.traj.to(device, torch.float32), data.spoke_mask.to(device)
        kdata = data.kdata.to(device, torch.complex64)
        self.scale = 1.0  # network units → (whitened) data units
        self.whitener = None  # W: the fit runs in whitened coil space (data W·y, coil maps W·S)
        if data.noise is not None:  # (its covariance is computed in float64)
            self.whitener = noise_prewhitener(data.noise.to(device, torch.complex64))
            # data and a noise scan in far apart units (each within float32's range) whiten to values float32
            # does not hold: both divided by a power of two near their peaks first (exact, so no result changes)
            k_scale, w_scale = _power_of_two(kdata), _power_of_two(self.whitener)
            kdata = kdata / k_scale  # (its own line: the device copy of the input goes before the product is made)
            kdata = apply_prewhitener(kdata, self.whitener / w_scale)
            self.scale = k_scale * w_scale
        # divided by a power of two near the peak |k|: exact in float32, so results do not change, but the
        # calibration's sums of squares hold for data at any scale float32 holds
        p2 = _power_of_two(kdata)
        self.scale *= p2
        kdata = kdata / p2
        self.matrix = data.matrix
        if cfg.spatial_ratio > 1:
            self.matrix = cfg.fit_matrix(data.matrix)
            keep = torch.linalg.vector_norm(traj, dim=-1).amax(dim=(0, 1)) < 0.5 * self.matrix / data.matrix
            kdata, traj = kdata[..., keep], traj[:, :, keep] * (data.matrix / self.matrix)
            if int(keep.sum()) < 2:
                raise ValueError(f"spatial_ratio {cfg.spatial_ratio} leaves fewer than 2 samples per spoke")
        Fa, C, S, R = kdata.shape
        self.n_acq, self.n_coils = Fa, C
        self.acquired, self.n_out = cfg.temporal_layout(Fa)
        self.acquired_t = torch.tensor(self.acquired, device=device)
        self.t_acq = torch.tensor(self.acquired, dtype=torch.float32, device=device) / max(self.n_out - 1, 1)

        self.omega = omega_from_traj(traj.reshape(Fa, S * R, 2))  # (Fa, 2, M)
        self.kdata = kdata.reshape(Fa, C, S * R)
        sample_valid = spoke_mask[:, :, None].expand(Fa, S, R)
        counts = spoke_mask.sum(1).clamp_min(1).float()
        self.dcf = (ramp_dcf(traj) * sample_valid).reshape(Fa, S * R) / counts[:, None]  # per frame: one image scale
        # held-out spokes: never in the loss, only in the stopping rule
        holdout = torch.zeros(Fa, S, dtype=torch.bool, device=device)
        if cfg.holdout_spokes > 0:
            gen = torch.Generator().manual_seed(cfg.seed + 1)
            for f in range(Fa):
                valid = torch.nonzero(spoke_mask[f].cpu()).flatten()
                if valid.numel() > cfg.holdout_spokes:
                    pick = valid[torch.randperm(valid.numel(), generator=gen)[: cfg.holdout_spokes]]
                    holdout[f, pick.to(device)] = True
        self.has_holdout = bool(holdout.any())
        if cfg.holdout_spokes > 0 and not self.has_holdout:
            raise ValueError(f"holdout_spokes={cfg.holdout_spokes} leaves no frame with a spoke to fit "
                             f"(at most {int(spoke_mask.sum(1).max())} spokes per frame): hold out fewer (a DA-INR "
                             "fit without held-out spokes, holdout_spokes=0, runs a fixed budget: max_steps/max_seconds)")
        self.train_w = (spoke_mask & ~holdout)[:, :, None].expand(Fa, S, R).reshape(Fa, S * R).float()
        self.hold_w = holdout[:, :, None].expand(Fa, S, R).reshape(Fa, S * R).float()
        # gradient weighting (reference: the ramp DCF, normalised to a mean of 1 over the samples), without the
        # division by the frame's spoke count, which the loss's mean over the frame's samples already makes
        # (exactly the previous weights when every frame has as many spokes)
        grad_w = (self.dcf.clamp_min(0) * (counts / counts.mean())[:, None]) ** cfg.dcf_power * self.train_w
        self.dcf_grad = grad_w / (_sum64(grad_w) / _sum64(self.train_w).clamp_min(1)).clamp_min(1e-30)

        given_maps = coil_maps is not None
        self.map_scale = 1.0  # self.op's maps × map_scale = the maps in (whitened) data units
        if coil_maps is None:
            coil_maps = self._estimate_coil_maps()
        else:
            # complex128 until the scaling below: maps in any units, no overflow
            coil_maps = torch.as_tensor(coil_maps).detach().to(device, torch.complex128)
            if coil_maps.shape != (C, self.matrix, self.matrix):
                raise ValueError(f"coil_maps must be {(C, self.matrix, self.matrix)}, got {tuple(coil_maps.shape)}")
            if not bool(torch.isfinite(coil_maps).all()) or not bool(coil_maps.abs().amax() > 0):
                raise ValueError("coil_maps must be finite and not all zero")
            if self.whitener is not None:  # given in the data's coil space
                coil_maps = apply_prewhitener(coil_maps, self.whitener.to(torch.complex128), coil_dim=0)
            # divided by a power of two near their peak root-sum-of-squares (exact): the fit's gradients (∝ 1/|S|
            # through the SENSE-normalised backward) and clamps then see unit-scale maps whatever units the maps
            # and the noise scan come in (whitened maps scale as 1/σ); the image is map_scale × smaller
            peak = float(coil_maps.abs().amax())  # (|S|² itself overflows float64 beyond 1e154)
            self.map_scale = 2.0 ** round(math.log2(peak) + 0.5 * math.log2(float(
                ((coil_maps / peak).abs() ** 2).sum(0).amax())))
            coil_maps = coil_maps / self.map_scale
            self.scale /= self.map_scale
        self.op = MulticoilNUFFT(coil_maps.to(device, torch.complex64), backend=cfg.nufft_backend)
        # the coil combination's normalisation Σ|S_c|²: 1 for Walsh maps; given maps (and whitened ones) need it
        self.combine_norm = self.support = None
        if given_maps:
            norm = self.op.sens_norm
            self.combine_norm = norm.clamp_min(1e-3 * float(norm.amax()))
            # pixels where every given map is zero (ESPIRiT's crop, a body mask) are seen by no sample: the images
            # are zero there, as the zero-filled ones are (the network alone would fill them with anything)
            support = self.op.smaps.abs().amax(0) > 0
            self.support = None if bool(support.all()) else support

        zf = self.zero_filled_from(self.train_w + self.hold_w)
        if not bool(torch.isfinite(zf).all()) or not bool(zf.abs().amax() > 0):
            peak = float(self.kdata.abs().amax())
            raise ValueError("the k-space is all zero: nothing to reconstruct" if peak == 0 else
                             f"the zero-filled images came out {'all zero' if bool(torch.isfinite(zf).all()) else 'not finite'}"
                             f" (max |k| {peak:.3g} after scaling and prewhitening): check the noise scan and the data")
        fit_scale = 1.0  # network units → self.kdata's units
        if cfg.data_scale == "p99":
            fit_scale = float(torch.quantile(zf.abs().flatten()[:: max(1, zf.numel() // 200000)], 0.99).clamp_min(1e-30))
        self.kdata = self.kdata / fit_scale
        self.zero_filled = zf / fit_scale
        self.scale *= fit_scale  # network units → data units
        # outputs in the data units of the output grid: a pixel of the fitting grid covers (N/n)² output pixels,
        # so its value is (N/n)² times theirs (spatial ×s: the k-space was cropped, not rescaled)
        self.output_scale = self.scale * (self.matrix / self.out_matrix) ** 2
        self._check_output_range(given_maps)

        self.feature_maps = None
        if cfg.use_features:
            if Fa < 2:
                raise ValueError("use_features=True needs at least 2 acquired frames (features come from neighbours)")
            extractor = FrozenFeatureExtractor(cfg.feature_channels, cfg.feature_seed).to(device)
            self.feature_maps = torch.cat([extractor(x) for x in normalise_for_extractor(self.zero_filled).split(8)])
            self.neighbours = neighbour_frames(self.acquired, range(self.n_out)).to(device)

    def _check_output_range(self, given_maps: bool) -> None:
        """Refuse outputs float32 cannot hold (they came out inf or 0, without an error): each input is within its
        range, but given coil maps or a noise scan in units far from the data's put the images beyond it."""
        peak = float(self.zero_filled.abs().amax()) * self.output_scale
        if 1e-37 <= peak <= 1e37:  # float32's normal range, with room for the network's overshoot
            return
        causes = []
        if given_maps:
            causes.append(f"the coil maps' scale (root-sum-of-squares peak {self.map_scale:.3g}) is far from the "
                          "data's: rescale the maps")
        if self.whitener is not None:
            causes.append("the data's scale is far from the noise scan's σ (whitened samples are in units of σ): "
                          "check the noise scan's units")
        raise ValueError(f"the images in {'whitened ' if self.whitener is not None else ''}data units would peak near "
                         f"{peak:.3g}, beyond what float32 holds; {'; or '.join(causes) or 'rescale the data'}")

    def coil_maps_in_data_space(self) -> torch.Tensor:
        """The coil maps in the data's (unwhitened) coil space, as ``coil_maps`` arguments take them."""
        maps = self.op.smaps * self.map_scale
        if self.whitener is None:
            return maps
        return apply_prewhitener(maps, torch.linalg.inv(self.whitener), coil_dim=0)

    def zero_filled_from(self, w: torch.Tensor) -> torch.Tensor:
        """Zero-filled images (F_acq, n, n) of the samples weighted by ``w`` (F_acq, M), DCF gridding calibrated
        so that A(zf) best matches those samples (least squares, one scalar)."""
        zf = self._batched(lambda sl: self.op.adjoint(self.kdata[sl], self.omega[sl], self.dcf[sl] * w[sl]))
        if self.combine_norm is not None:
            zf = zf / self.combine_norm
        pred = self._batched(lambda sl: self.op.forward(zf[sl], self.omega[sl]))
        w = w[:, None, :]
        return zf * (_sum64(pred.conj() * self.kdata * w).real / _sum64(pred.abs() ** 2 * w).clamp_min(1e-30))

    def _batched(self, fn: Callable, batch: int = 8) -> torch.Tensor:
        return torch.cat([fn(slice(i, i + batch)) for i in range(0, self.n_acq, batch)])

    def _estimate_coil_maps(self) -> torch.Tensor:
        """Walsh maps from the DCF-weighted adjoint of all spokes of all frames together."""
        Fa, C, M = self.kdata.shape
        omega_all = self.omega.permute(1, 0, 2).reshape(1, 2, Fa * M)
        kd = (self.kdata * self.dcf[:, None]).permute(1, 0, 2).reshape(1, C, Fa * M)
        ident = MulticoilNUFFT(torch.ones(1, self.matrix, self.matrix, dtype=torch.complex64, device=self.device),
                               backend=self.cfg.nufft_backend)
        coil_images = ident.coil_adjoint(kd, omega_all)[0]
        return walsh_coil_maps(coil_images, self.cfg.coil_map_kernel)

    def features_for(self, frames: torch.Tensor, hw) -> Optional[torch.Tensor]:
        """(B, H*W, 2C) features of output frames ``frames`` sampled on an ``hw`` grid."""
        if self.feature_maps is None:
            return None
        nb = self.neighbours[frames]  # (B, 2)
        maps = self.feature_maps[nb.flatten()].reshape(len(frames), -1, *self.feature_maps.shape[-2:])
        return sample_features(maps, hw, self.cfg.pixel_centred_features).reshape(len(frames), hw[0] * hw[1], -1)


def _sum64(x: torch.Tensor, dim=None) -> torch.Tensor:
    """``x.sum(dim)`` accumulated in double precision and rounded back to ``x``'s dtype.  Torch's CPU sum splits its
    work by the thread count, so a float32 sum's last bits depended on it (from about 65k elements), and through
    the data's calibration and the stopping rule a fit's images did (OMP_NUM_THREADS, a container's CPU limit,
    the host share's threads); the double sum's own order differences lie some 1e-8 below float32's rounding."""
    wide = torch.complex128 if x.is_complex() else torch.float64
    return (x.sum(dtype=wide) if dim is None else x.sum(dim, dtype=wide)).to(x.dtype)


def _l1_per_frame(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, exact: bool = False) -> torch.Tensor:
    """(B,) L1(Re) + L1(Im) of each frame over its weighted samples (B, C, M) × (B, M), summed over coils × samples
    (``exact``: in double precision, the same bits whatever the thread count, for the stopping rule)."""
    diff = (pred - target) * weight[:, None, :]
    total = _sum64 if exact else torch.sum
    return total(diff.real.abs(), (1, 2)) + total(diff.imag.abs(), (1, 2))


def _loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, exact: bool = False) -> torch.Tensor:
    """L1(Re) + L1(Im) over the weighted samples (the reference's loss), mean over coils × samples."""
    return _l1_per_frame(pred, target, weight, exact).sum() / (weight.sum().clamp_min(1) * target.shape[1])


class Fitter:
    """Owns the model and optimiser for one :class:`Problem`."""

    def __init__(self, problem: Problem, cfg: DAINRConfig):
        self.p, self.cfg = problem, cfg
        self.model = DAINR(cfg.model_config(problem.matrix), problem.device, cfg.max_t_freq(problem.n_acq),
                           torch.Generator().manual_seed(cfg.seed))  # the weights: from the seed alone
        self.opt = AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        n = problem.matrix
        self.xy = pixel_grid(n, n, problem.device)
        self.train_frames = torch.arange(problem.n_acq)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self._queue = torch.empty(0, dtype=torch.long, device=problem.device)
        self._queue_host = torch.empty(0, dtype=torch.long)  # the same frames, for the refill's choice (no sync)
        self.batch = min(cfg.batch_frames(problem.device.type), problem.n_acq)
        self.params = [q for q in self.model.parameters() if q.requires_grad]
        self.ema = [q.detach().clone() for q in self.params] if cfg.ema_decay > 0 else None
        # Each acquired frame's latest held-out residual (NaN until visited, and for frames holding none out).
        self.heldout = torch.full((problem.n_acq,), math.nan, device=problem.device, dtype=torch.float32)
        # the same number for an all-zero image: a fit whose best is far above it has failed, not converged
        count = problem.hold_w.sum(1)
        zero = _l1_per_frame(torch.zeros((), dtype=problem.kdata.dtype, device=problem.device), problem.kdata,
                             problem.hold_w, exact=True) / (count.clamp_min(1) * problem.n_coils)
        self.zero_image_residual = float(torch.where(count > 0, zero, math.nan).nanmean())

    def weights(self) -> dict:
        """The weights to render with: the EMA when enabled, else the live ones (a copy)."""
        if self.ema is None:
            return copy.deepcopy(self.model.state_dict())
        with self.swapped_ema():
            return copy.deepcopy(self.model.state_dict())

    @contextlib.contextmanager
    def swapped_ema(self):
        if self.ema is None:
            yield
            return
        live = [q.detach().clone() for q in self.params]
        with torch.no_grad():
            torch._foreach_copy_(self.params, self.ema)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.params, live)

    def decay_lr(self, factor: float) -> None:
        self.opt.lr *= factor

    def _next_batch(self) -> torch.Tensor:
        """The next frames (B,) on the device: the queue of shuffled passes lives there, refilled once per pass
        from pinned memory without blocking (a per-step host-to-device copy would wait for the previous step)."""
        B = self.batch
        while len(self._queue_host) < B:
            order = self.train_frames[torch.randperm(self.p.n_acq, generator=self.gen)]
            left = self._queue_host
            if len(left):  # the batch that spans two passes takes none of the new pass's frames twice
                head = order[~torch.isin(order, left)][:B - len(left)]
                order = torch.cat([head, order[~torch.isin(order, head)]])
            self._queue_host = torch.cat([left, order])
            if self.p.device.type == "cuda":
                order = order.pin_memory()
            self._queue = torch.cat([self._queue, order.to(self.p.device, non_blocking=True)])
        batch, self._queue, self._queue_host = self._queue[:B], self._queue[B:], self._queue_host[B:]
        return batch

    def predict_acquired(self, acq: torch.Tensor) -> torch.Tensor:
        """Images (B, n, n) of acquired frames ``acq`` at the fitting resolution."""
        p, n = self.p, self.p.matrix
        feats = p.features_for(p.acquired_t[acq], (n, n))
        img = self.model(self.xy.expand(len(acq), -1, -1), p.t_acq[acq], feats)
        return img.reshape(len(acq), n, n)

    def step(self) -> torch.Tensor:
        """One optimisation step on the next batch of frames; returns the training loss (0-d, on the device).

        The prediction at the held-out spokes comes from the same forward pass: it updates the batch's
        entries of :attr:`heldout`, so the stopping rule costs nothing and nothing here waits for the device.
        """
        p = self.p
        acq = self._next_batch()
        img = self.predict_acquired(acq)
        if self.cfg.dcf_power > 0:
            pred = p.op.preconditioned_forward(img, p.omega[acq], p.dcf_grad[acq])
        else:
            pred = p.op.forward(img, p.omega[acq])
        target = p.kdata[acq]
        loss = _loss(pred, target, p.train_w[acq])
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            if self.ema is not None:
                torch._foreach_lerp_(self.ema, self.params, 1.0 - self.cfg.ema_decay)
            w = p.hold_w[acq]
            count = w.sum(1)
            per_frame = _l1_per_frame(pred.detach(), target, w, exact=True) / (count.clamp_min(1) * target.shape[1])
            self.heldout[acq] = torch.where(count > 0, per_frame, self.heldout[acq])
        return loss.detach()

    def heldout_residual(self) -> float:
        """Mean over frames of each frame's latest held-out residual (the stopping rule's number; syncs).

        Frames, not the spokes of the last epoch: an epoch is rarely a whole number of passes, and the
        frames' residuals differ by ~20 %, so averaging the frames an epoch happened to visit made the
        number jump by ~2 % with the model fixed — ten times the ``min_improvement`` it is judged by.
        """
        return float(self.heldout.nanmean())

    @torch.no_grad()
    def render(self, matrix: Optional[int] = None) -> torch.Tensor:
        """All output frames (default: at the output matrix), in data units, (F_out, N, N) complex on CPU, a few
        frames at a time (:func:`~dainr.memory.render_batch`: up to 4, fewer for large matrices).

        Above the fitting matrix (spatial ×s) the output pixels lie between the fitted ones
        (:class:`~dainr.model.GridUpsampling`).  With ``cap_grid_at_matrix`` the network is evaluated once
        with the inputs of each of the 4 surrounding fitted pixels — γ(x), γ(t) and the deformation Δ (γ(x)'s
        finest frequencies alias on the fitting grid, so evaluating them in between would inject patterns the
        fit never constrained) — the grid read at the output pixel moved by that Δ, the features sampled
        bilinearly; the 4 outputs are blended bilinearly and, with ``spatial_antiring``, clamped to the
        magnitude range of the 4 fitted pixels.  Without the cap: the reference's rule, every input but the
        features from the nearest fitted pixel.
        """
        p, N, n = self.p, matrix or self.p.out_matrix, self.p.matrix
        t_all = torch.arange(p.n_out, device=p.device, dtype=torch.float32) / max(p.n_out - 1, 1)
        xy = pixel_grid(min(N, n), min(N, n), p.device)
        up = GridUpsampling(n, N, p.device) if N > n else None
        frames = []
        for sl in torch.arange(p.n_out, device=p.device).split(render_batch(N)):
            B = len(sl)
            coords, warped = self.model.encode(xy.expand(B, -1, -1), t_all[sl])
            feats = p.features_for(sl, (N, N))
            if up is None:
                img = self.model.canonical(warped, coords, feats)
            elif not self.cfg.cap_grid_at_matrix:
                img = self.model.canonical(warped[:, up.nearest], coords[:, up.nearest], feats)
            else:
                delta = warped - xy
                img = sum(w * self.model.canonical(up.xy + delta[:, i], coords[:, i], feats) for i, w in up.corners())
                if self.cfg.spatial_antiring:
                    low = self.model.canonical(warped, coords, p.features_for(sl, (n, n)))
                    img = up.antiring(img, low)
            frames.append(img.reshape(B, N, N).cpu())
        images = torch.cat(frames) * p.output_scale
        if p.support is not None:  # (an output pixel is seen where a fitted pixel it is blended from is)
            images *= (p.support if up is None else up.bilinear(p.support.float()) > 0).cpu()
        return images


def epoch_steps(n_frames: int, batch: int, cfg: DAINRConfig) -> int:
    """Steps per epoch of the stopping rule: one pass over the frames, and at least ``cfg.min_epoch_frames`` frame
    visits, but short enough that the whole decay schedule ((max_decays + 1) plateaus of ``patience`` epochs)
    fits twice into ``max_steps`` (a short budget keeps one-pass epochs)."""
    schedule = 2 * cfg.patience * (cfg.max_decays + 1)
    floor = min(cfg.min_epoch_frames, cfg.max_steps * batch // schedule)
    return math.ceil(max(n_frames, floor) / batch)


@torch.inference_mode(False)
@torch.enable_grad()  # a fit under the caller's no_grad() / inference_mode() (an evaluation loop) still learns
@library_defaults
def reconstruct(data: RadialData, cfg: Optional[DAINRConfig] = None, coil_maps: Optional[torch.Tensor] = None,
                callback: Optional[Callable[[FitProgress], Optional[bool]]] = None) -> ReconResult:
    """Fit DA-INR to ``data`` and return every output frame.

    ``coil_maps`` (C, n, n) at the fitting matrix, in the data's coil space (physical maps; with a noise scan
    the fit whitens them as it whitens the data); None estimates Walsh maps from all spokes. Where every given map
    is zero (ESPIRiT's crop, a body mask) the images are zero, as no sample sees those pixels.
    ``callback(progress)`` is called at the end of every epoch of the stopping rule (with the held-out
    residual when spokes are held out; a fixed-budget fit is called too, so it can be stopped) and every
    ``cfg.preview_every`` steps (``progress.images`` renders the frames on those); returning True stops
    the fit (any other return value is ignored).
    """
    cfg = _checked_arguments(data, cfg)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable, got {type(callback).__name__}")
    device = resolve_device(cfg.device)
    t0 = time.perf_counter()
    estimate = check_memory(data, cfg, device) if cfg.check_memory else None
    if device.type == "cuda":
        torch.cuda.init()  # (resetting the statistics of an explicit cuda:N before CUDA's lazy start-up raises)
        torch.cuda.reset_peak_memory_stats(device)
    problem = Problem(data, cfg, coil_maps, device)
    fitter = Fitter(problem, cfg)
    t_prep = time.perf_counter() - t0

    epoch = epoch_steps(problem.n_acq, fitter.batch, cfg)
    best_res, best_step, best_state, bad_epochs, decays = math.inf, 0, None, 0, 0
    history, reason, step, loss_t = [], "max_steps", 0, torch.tensor(math.nan)
    # (closed on an exception too: a bar left open drew the next fit's a line down)
    with _progress_bar(cfg) or contextlib.nullcontext() as bar:
        t_fit0 = time.perf_counter()
        for step in range(1, cfg.max_steps + 1):
            loss_t = fitter.step()
            elapsed = time.perf_counter() - t_fit0
            res = None
            if step % epoch == 0:  # the only per-epoch device syncs
                res = fitter.heldout_residual() if problem.has_holdout else None
                loss = float(loss_t)
                improved = res is not None and res < best_res * (1 - cfg.min_improvement)
                state = fitter.weights() if improved else None
                if not (math.isfinite(loss) and (res is None or math.isfinite(res)) and _finite(state)):
                    if best_state is None:
                        raise _diverged(step, cfg)
                    reason = "diverged"  # keep the last good checkpoint
                    break
            if res is not None:
                history.append((step, loss, res))
                if improved:
                    best_res, best_step, bad_epochs, best_state = res, step, 0, state
                else:
                    bad_epochs += 1
                    if bad_epochs >= cfg.patience and decays < cfg.max_decays:
                        fitter.decay_lr(cfg.lr_decay)
                        decays, bad_epochs = decays + 1, 0
            if bar is not None:
                bar.update(1)
                if step % epoch == 0:  # where the loss was read (a read per step would wait for the device each step)
                    bar.set_postfix(loss=f"{loss:.4g}", holdout=f"{best_res:.4g}")
            stop = False
            if callback is not None:
                want_preview = cfg.preview_every > 0 and step % cfg.preview_every == 0
                if want_preview or step % epoch == 0:
                    progress = FitProgress(step, elapsed, float(loss_t), res, want_preview,
                                           functools.partial(_render_live, fitter))
                    try:
                        # only True stops: a lambda's incidental return (a list, plot handles, a tensor) does not
                        answer = callback(progress)
                        stop = answer is True or (isinstance(answer, np.bool_) and bool(answer))
                    finally:
                        progress._render = None  # a later read would render a later step's model
            if stop:
                reason = "callback"
                break
            if cfg.max_seconds is not None and elapsed >= cfg.max_seconds:
                reason = "max_seconds"
                break
            if (problem.has_holdout and step >= cfg.min_steps and bad_epochs >= cfg.patience
                    and decays >= cfg.max_decays):
                reason = "holdout_converged"
                break
    t_fit = time.perf_counter() - t_fit0
    # failed, not converged: far above an all-zero image's held-out residual, or converged to hardly below it
    zero_res = fitter.zero_image_residual
    if math.isfinite(best_res) and best_res > FAILED_RESIDUAL * zero_res:
        raise ValueError(f"the fit failed: its best held-out residual {best_res:.3g} is {best_res / zero_res:.3g} "
                         f"times an all-zero image's ({zero_res:.3g}); lower lr (now {cfg.lr:g})")
    if math.isfinite(best_res) and reason == "holdout_converged" and best_res > 0.99 * zero_res:
        # (a rate too high diverges above; here the fit converged without moving from a zero image's residual)
        raise ValueError(f"the fit found no image: its held-out residual converged to {best_res / zero_res:.3g} times "
                         f"an all-zero image's ({zero_res:.3g}): the held-out spokes cannot tell an image from noise "
                         f"(data too noisy or nearly empty), or the rate is too small to move the model (lr "
                         f"{cfg.lr:g}); check the data and lr, or fit a fixed budget (holdout_spokes=0 with "
                         "max_steps or max_seconds)")
    checkpoint = best_state is not None  # else (no held-out spokes, or stopped before an epoch) the last weights
    if not checkpoint:
        best_state, best_step = fitter.weights(), step
        if not _finite(best_state):
            raise _diverged(step, cfg)
    fitter.model.load_state_dict(best_state)
    images = fitter.render()
    if not bool(images.abs().amax() > 0):
        raise ValueError(f"the fit collapsed to all-zero images (every ReLU of the network switched off, as a too "
                         f"large step does); lower lr (now {cfg.lr:g})")
    lowres = fitter.render(problem.matrix) if problem.matrix != problem.out_matrix else None
    total = time.perf_counter() - t0
    info = dict(
        steps=step, best_step=best_step, stop_reason=reason,
        frame_visits=step * fitter.batch, lr_decays=decays, seconds_total=total, seconds_prepare=t_prep,
        seconds_fit=t_fit, seconds_per_step=t_fit / max(step, 1), holdout_residual=best_res if checkpoint else None,
        history=history, final_loss=float(loss_t), device=str(device), nufft_backend=problem.op.backend,
        grid_backend=type(fitter.model.grid).__name__, fit_matrix=problem.matrix,
        grid_finest_resolution=fitter.model.cfg.grid.finest_resolution,
        n_params=sum(p.numel() for p in fitter.model.parameters()),
        memory_estimate_bytes=estimate.peak if estimate is not None else None,
    )
    if device.type == "cuda":
        info["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(device)
    return ReconResult(images=images, zero_filled=(problem.zero_filled * problem.output_scale).cpu(),
                       coil_maps=problem.coil_maps_in_data_space().cpu(), acquired_frames=problem.acquired, info=info,
                       lowres_images=lowres)


FAILED_RESIDUAL = 4.0  # a best held-out residual this many times an all-zero image's: a failed fit (real ones: < 1×)


def _finite(state: Optional[dict]) -> bool:
    """Whether every float tensor of a state dict is finite (True for None; one device sync)."""
    if state is None:
        return True
    return bool(torch.stack([torch.isfinite(v).all() for v in state.values() if v.is_floating_point()]).all())


def _diverged(step: int, cfg: DAINRConfig) -> ValueError:
    return ValueError(f"the fit diverged (non-finite loss, held-out residual or weights by step {step}) before any "
                      f"checkpoint; lower lr (now {cfg.lr:g})")


def _render_live(fitter: Fitter) -> torch.Tensor:
    with fitter.swapped_ema():
        return fitter.render()


def _power_of_two(x: torch.Tensor) -> float:
    """A power of two near the peak |x| (1 for all-zero or non-finite ``x``): dividing by it is exact."""
    peak = float(x.abs().amax())
    return 2.0 ** round(math.log2(peak)) if 0 < peak < math.inf else 1.0


def _progress_bar(cfg: DAINRConfig):
    if not cfg.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.max_steps, desc="DA-INR fit", unit="step", leave=False, disable=None, mininterval=0.5)


def _checked_arguments(data: RadialData, cfg: Optional[DAINRConfig]) -> DAINRConfig:
    """``cfg`` (the defaults for None), validated; a clear TypeError for arguments of another kind."""
    if not isinstance(data, RadialData):
        raise TypeError(f"data must be a dainr.RadialData(kdata, traj, matrix), got {type(data).__name__}")
    cfg = DAINRConfig() if cfg is None else cfg
    if not isinstance(cfg, DAINRConfig):
        raise TypeError(f"cfg must be a DAINRConfig (DAINRConfig(**options)), got {type(cfg).__name__}")
    # a copy made as at construction: fields set since (cfg.seed = np.int64(3), cfg.grid = dict(...)) are
    # converted and validated as DAINRConfig(...) does, and the caller's object stays as it was
    grid = dataclasses.replace(cfg.grid) if dataclasses.is_dataclass(cfg.grid) else cfg.grid
    return dataclasses.replace(cfg, grid=grid)


@library_defaults
def acquired_problem(data: RadialData, cfg: Optional[DAINRConfig], coil_maps: Optional[torch.Tensor] = None,
                     holdout_spokes: int = 0) -> Problem:
    """A :class:`Problem` of the acquired frames at the acquired matrix (no features, no spatial or temporal
    interpolation): what the zero-filled images and the classical baselines work on."""
    cfg = _checked_arguments(data, cfg).replace(use_features=False, holdout_spokes=holdout_spokes, spatial_ratio=1.0,
                                                temporal_ratio=1, temporal_offset=0, temporal_frames=None)
    return Problem(data, cfg, coil_maps, resolve_device(cfg.device))


@library_defaults
def zero_filled(data: RadialData, cfg: Optional[DAINRConfig] = None, coil_maps: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Zero-filled (DCF gridding, coil-combined) images (F, N, N) in data units, no fitting.  Always at the
    acquired matrix N (``cfg``'s spatial and temporal ratios are ignored), so ``coil_maps`` are (C, N, N) here, not
    a spatial ×s fit's (C, n, n)."""
    p = acquired_problem(data, cfg, coil_maps)
    return (p.zero_filled * p.output_scale).cpu()


@library_defaults
def upsample_bilinear(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear upsampling of real or complex frames (..., n, n) → (..., size, size) of the same FOV (the spatial
    baseline), on the FFT-grid geometry of :class:`~dainr.model.GridUpsampling`; numpy arrays are taken.  A ``size``
    below n samples the frames at the coarser grid's points, with no anti-aliasing."""
    if isinstance(images, np.ndarray):
        images = as_tensor(images)
    if not isinstance(images, torch.Tensor) or images.ndim < 2 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"images must be a tensor of square frames (..., n, n), got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    if not is_count(size):
        raise ValueError(f"size must be an integer >= 1, got {size!r}")
    return GridUpsampling(images.shape[-1], size, images.device).bilinear(images)
