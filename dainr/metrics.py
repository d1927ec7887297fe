"""Image quality metrics with the paper's normalisation.

Per frame: magnitude → min-max normalised to [0, 1] → scikit-image PSNR/SSIM with
``data_range=1`` (default 7×7 window), averaged over frames; full image, no mask.  The
reference's ``minmaxnorm`` divides by ``max + 1e-6`` instead of ``max − min`` (a bug,
``dainr-paper.md`` §1.7.5); we use the correct range, which differs only when min ≠ 0.
"""
from __future__ import annotations

from typing import Any, Dict

import numpy as np
import torch


def _as_np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def minmax(frames) -> np.ndarray:
    """Per-frame min-max normalisation of the magnitude, (F, H, W) → [0, 1]."""
    mag = np.abs(_as_np(frames)).astype(np.float64)
    lo = mag.min(axis=(-2, -1), keepdims=True)
    hi = mag.max(axis=(-2, -1), keepdims=True)
    span = hi - lo  # (a floor such as 1e-12 flattened images in small units: 1e-13 scored 12 dB against itself)
    return np.divide(mag - lo, span, out=np.zeros_like(mag), where=span != 0)  # (a NaN frame stays NaN)


def psnr_ssim(recon, reference) -> Dict[str, Any]:
    """Mean PSNR (dB) and SSIM over frames (F, H, W) (``psnr``, ``ssim``: floats), plus per-frame lists
    (``psnr_frames``, ``ssim_frames``)."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    a, b = minmax(recon), minmax(reference)
    if a.shape != b.shape:
        raise ValueError(f"recon {a.shape} and reference {b.shape} must be frames of the same shape (F, H, W)")
    if a.ndim != 3:
        raise ValueError(f"recon and reference must be frames (F, H, W), got {a.ndim}-d {a.shape}"
                         + (" (one image: give x[None])" if a.ndim == 2 else ""))
    if min(a.shape[1:]) < 7:
        raise ValueError(f"frames of {a.shape[1]} x {a.shape[2]} pixels: SSIM's 7 x 7 window needs at least 7 x 7")
    with np.errstate(divide="ignore"):  # identical frames: PSNR inf, without a warning per frame
        psnr = [peak_signal_noise_ratio(r, x, data_range=1.0) for r, x in zip(b, a)]
    ssim = [structural_similarity(r, x, data_range=1.0) for r, x in zip(b, a)]
    return dict(psnr=float(np.mean(psnr)), ssim=float(np.mean(ssim)), psnr_frames=psnr, ssim_frames=ssim)
