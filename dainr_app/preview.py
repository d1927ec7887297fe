"""Preview images: an animated GIF (or a PNG montage) of one or more cines side by side."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

from .files import replaced_whole


def _to_uint8(frames: np.ndarray) -> np.ndarray:
    mag = np.abs(np.asarray(frames)).astype(np.float64)
    hi = np.percentile(mag, 99.5) if mag.size else 0.0
    hi = hi if hi > 0 else (mag.max() if mag.size else 0.0)  # (a floor such as 1e-12 blacked out small units)
    return (np.clip(mag / hi, 0, 1) * 255).astype(np.uint8) if hi > 0 else np.zeros(mag.shape, np.uint8)


def _nearest(n: int, N: int) -> np.ndarray:
    """For each pixel of an ``N``-pixel FFT grid, the nearest of an ``n``-pixel one of the same FOV (centres at
    pixels N // 2 and n // 2, as the reconstruction puts them; ``model.GridUpsampling``)."""
    u = (np.arange(N) - N // 2) * (n / N) + n // 2
    return np.clip(np.floor(u + 0.5), 0, n - 1).astype(int)


def side_by_side(panels: Sequence[np.ndarray]) -> np.ndarray:
    """Panels of (F, H, W) (each scaled to its own 99.5th percentile, resized to the largest H) → (F, H, ΣW) uint8."""
    height = max(p.shape[-2] for p in panels)
    n_frames = max(p.shape[0] for p in panels)
    cols = []
    for p in panels:
        u8 = _to_uint8(p)
        h, w = u8.shape[-2:]
        if h != height:  # nearest upsampling keeps pixels honest (any ratio: spatial ×1.5 fits 22² of 32²)
            width = round(w * height / h)
            u8 = u8[:, _nearest(h, height)][:, :, _nearest(w, width)]
        if u8.shape[0] != n_frames:  # e.g. temporally interpolated vs acquired frames
            u8 = u8[np.linspace(0, u8.shape[0] - 1, n_frames).round().astype(int)]
        cols.append(u8)
    return np.concatenate(cols, axis=-1)


def write_preview(path: str, panels: Sequence[np.ndarray], fps: float = 12.0) -> None:
    """``.gif`` → animated cine; ``.png`` → montage with one row per frame."""
    if not path.lower().endswith((".gif", ".png")):
        raise ValueError(f"preview must end in .gif or .png, got {path!r}")
    frames = side_by_side(panels)
    with replaced_whole(path) as partial:  # (a full disk left a 0-byte file under the name)
        if path.lower().endswith(".gif"):
            imgs = [Image.fromarray(f, mode="L") for f in frames]
            imgs[0].save(partial, format="GIF", save_all=True, append_images=imgs[1:], duration=int(1000 / fps),
                         loop=0)
        else:
            Image.fromarray(np.concatenate(list(frames), axis=0), mode="L").save(partial, format="PNG")
