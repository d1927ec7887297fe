"""Coordinate encodings: frequency (torch-ngp ``FreqEncoder``) and 2D multiresolution grid.

The grid encoding has two backends behind one interface:

* ``torch`` — pure PyTorch (CPU and GPU); the reference and CI path.  Two table layouts:
  ``"ngp"`` reproduces torch-ngp's ``GridEncoder(gridtype='tiled', align_corners=False)`` that
  DA-INR uses (row stride ``res+1``, levels larger than the table wrap modulo its size, inputs
  outside [0, 1] get zero features), and ``"tcnn"`` reproduces tiny-cuda-nn's ``HashGrid``
  index math so the two backends can be compared parameter for parameter.
* ``tcnn`` — tiny-cuda-nn's ``HashGrid`` (CUDA only, used when importable), fp32 parameters,
  inputs mapped to [0, 1].
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch
from torch import nn

from .config import GridConfig

_TCNN_PRIME = 2654435761  # tiny-cuda-nn fast_hash prime for dimension 1 (dimension 0 uses 1)


class FrequencyEncoding(nn.Module):
    """``[x, sin(2^0 x), cos(2^0 x), …, sin(2^(L-1) x), cos(2^(L-1) x)]`` with torch-ngp's layout.

    Output channel order (torch-ngp ``freqencoder``): the ``D`` raw inputs, then for each
    frequency ``k`` the ``D`` sines followed by the ``D`` cosines.  No π factor.  ``max_freq``: the sines and
    cosines of frequencies above it are zero (the layout and width stay).
    """

    def __init__(self, input_dim: int, degree: int, max_freq: Optional[float] = None):
        super().__init__()
        self.input_dim = input_dim
        self.degree = degree
        freqs = 2.0 ** torch.arange(degree, dtype=torch.float32)
        self.register_buffer("freqs", freqs, persistent=False)
        kept = freqs <= max_freq if max_freq is not None else torch.ones(degree, dtype=torch.bool)
        self.kept = int(kept.sum())
        # (L, 1, 1) multiplier of the (L, 2, D) sines/cosines, None when every band is kept (bit-identical output)
        self.register_buffer("band_mask", None if bool(kept.all()) else kept.float()[:, None, None], persistent=False)

    @property
    def out_dim(self) -> int:
        return self.input_dim * (1 + 2 * self.degree)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.input_dim:
            raise ValueError(f"FrequencyEncoding expects last dim {self.input_dim}, got {tuple(x.shape)}")
        scaled = x.unsqueeze(-2) * self.freqs.to(x.dtype)[:, None]  # (..., L, D)
        sc = torch.stack((torch.sin(scaled), torch.cos(scaled)), dim=-2)  # (..., L, 2, D)
        if self.band_mask is not None:
            sc = sc * self.band_mask.to(sc.dtype)
        return torch.cat((x, sc.flatten(-3)), dim=-1)


def _level_geometry(cfg: GridConfig, layout: str) -> List[dict]:
    """Per-level scale, resolution, row stride, table size and offset for a layout."""
    levels, offset = [], 0
    log2_scale = math.log2(cfg.per_level_scale)
    max_entries = 2 ** cfg.log2_table_size
    for level in range(cfg.num_levels):
        scale = 2.0 ** (level * log2_scale) * cfg.base_resolution - 1.0
        res = int(math.ceil(scale)) + 1
        if layout == "ngp":
            stride = res + 1
            size = min(max_entries, stride * stride)
            size = int(math.ceil(size / 8) * 8)
            hashed = False
        elif layout == "tcnn":
            stride = res
            size = min(int(math.ceil(res * res / 8) * 8), max_entries)
            hashed = res * res > size
        else:
            raise ValueError(f"unknown grid layout {layout!r}")
        levels.append(dict(scale=scale, res=res, stride=stride, size=size, offset=offset, hashed=hashed))
        offset += size
    return levels


class TorchGridEncoding(nn.Module):
    """Pure-PyTorch 2D multiresolution grid encoding (bilinear interpolation).

    Input: coordinates in [-1, 1] (``(..., 2)``).  Output: ``(..., num_levels * F)``, level-major.

    Two paths, the same function: the levels stored densely (torch-ngp layout, not wrapped: the first
    :attr:`n_dense`, all of them with the grid capped below the matrix) are rows of an image that
    ``F.grid_sample`` reads, one batch entry per level; the rest (levels wrapped modulo the table, and every
    level of the ``tcnn`` layout) gather their four corners with ``index_select``.  On 2 CPU cores, 16 levels at
    16 384 points, forward and backward took 5 ms on the first path and 30 ms on the second, whose backward is
    a scatter-add of 4 corners × 16 levels per point.
    """

    def __init__(self, cfg: GridConfig, layout: str = "ngp", generator: Optional[torch.Generator] = None):
        super().__init__()
        self.cfg = cfg
        self.layout = layout
        geo = _level_geometry(cfg, layout)
        self.n_entries = geo[-1]["offset"] + geo[-1]["size"]
        table = torch.empty(self.n_entries, cfg.features_per_level, dtype=torch.float32)
        self.table = nn.Parameter(table.uniform_(-cfg.init_std, cfg.init_std, generator=generator))
        as_t = lambda key, dt: torch.tensor([g[key] for g in geo], dtype=dt)
        self.register_buffer("scales", as_t("scale", torch.float32), persistent=False)
        self.register_buffer("strides", as_t("stride", torch.int64), persistent=False)
        self.register_buffer("sizes", as_t("size", torch.int64), persistent=False)
        self.register_buffer("offsets", as_t("offset", torch.int64), persistent=False)
        self.register_buffer("hashed", as_t("hashed", torch.bool), persistent=False)
        wrapped = [i for i, g in enumerate(geo) if g["stride"] ** 2 > g["size"]]
        self.first_wrapped = wrapped[0] if wrapped else len(geo)  # levels grow, so wrapped ones are a suffix
        self.n_dense = self.first_wrapped if layout == "ngp" else 0
        self._dense_strides = [g["stride"] for g in geo[: self.n_dense]]
        self._dense_sizes = [g["size"] for g in geo[: self.n_dense]]
        # corner offsets (dx, dy) in the order torch-ngp / tcnn enumerate them
        self.register_buffer("corners", torch.tensor([[0, 0], [1, 0], [0, 1], [1, 1]], dtype=torch.int64), persistent=False)

    @property
    def out_dim(self) -> int:
        return self.cfg.out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        u = (x.reshape(-1, 2).to(self.table.dtype) + 1.0) * 0.5  # [-1, 1] -> [0, 1]
        if self.layout == "ngp":  # torch-ngp: inputs outside [0, 1] get zero features and gradient
            inside = ((u >= 0) & (u <= 1)).all(dim=-1)
            u = torch.where(inside[:, None], u, u.detach().clamp(0, 1))
        k = self.n_dense
        parts = ([self._sample_dense(u)] if k > 0 else []) + ([self._gather(u, k)] if k < len(self.scales) else [])
        out = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]  # (N, L, F)
        if self.layout == "ngp":
            out = out * inside[:, None, None]
        return out.reshape(*lead, self.out_dim)

    def _sample_dense(self, u: torch.Tensor) -> torch.Tensor:
        """Levels ``[0, n_dense)`` at ``u`` (N, 2) in [0, 1] → (N, n_dense, F).

        Level ``l`` is a ``stride × stride`` image (row ``y``, column ``x``: table row ``x + y·stride``), padded
        to the largest level's size ``W``; the corner-aligned sampling position ``u·scale + 0.5`` (pixels) is
        grid_sample's ``align_corners=True`` coordinate ``2·pos / (W − 1) − 1``.  It never exceeds
        ``res − 0.5 < stride − 1``, so the padding is never read."""
        k, F, W = self.n_dense, self.table.shape[1], self._dense_strides[-1]
        levels = self.table[: sum(self._dense_sizes)].split(self._dense_sizes)
        images = torch.stack([nn.functional.pad(rows[: s * s].reshape(s, s, F).permute(2, 0, 1), (0, W - s, 0, W - s))
                              for rows, s in zip(levels, self._dense_strides)])  # (k, F, W, W)
        pos = u[None] * self.scales[:k, None, None] + 0.5  # (k, N, 2)
        out = nn.functional.grid_sample(images, (pos * (2.0 / (W - 1)) - 1)[:, None], mode="bilinear",
                                        padding_mode="zeros", align_corners=True)  # (k, F, 1, N)
        return out[:, :, 0].permute(2, 0, 1)

    def _gather(self, u: torch.Tensor, k: int) -> torch.Tensor:
        """Levels ``[k, L)`` at ``u`` (N, 2) in [0, 1] by gathering their four corners → (N, L − k, F)."""
        pos = u[:, None, :] * self.scales[None, k:, None] + 0.5  # (N, L - k, 2)
        base = torch.floor(pos.detach())
        frac = pos - base
        fx, fy = frac[..., 0], frac[..., 1]
        gx, fx1 = 1 - fx, fx
        w = torch.stack((gx * (1 - fy), fx1 * (1 - fy), gx * fy, fx1 * fy), dim=-1)  # (N, L - k, 4)
        idx = self._corner_index(base.long(), k)
        vals = self.table.index_select(0, idx.reshape(-1)).reshape(*idx.shape, -1)  # (N, L - k, 4, F)
        return (vals * w.unsqueeze(-1)).sum(dim=2)

    def _corner_index(self, base: torch.Tensor, k: int) -> torch.Tensor:
        """Table rows (N, L − k, 4) of the four corners (x, y), (x+1, y), (x, y+1), (x+1, y+1) of levels k…"""
        bx, by = base[..., 0], base[..., 1]
        strides, sizes, offsets = self.strides[k:], self.sizes[k:], self.offsets[k:]
        if self.layout == "ngp":
            i00 = bx + by * strides
            idx = torch.stack((i00, i00 + 1, i00 + strides, i00 + strides + 1), dim=-1)
            wrap = self.first_wrapped - k  # only the levels larger than the table wrap
            if wrap < len(sizes):
                idx[:, wrap:] = idx[:, wrap:] % sizes[wrap:, None]
            return idx + offsets[:, None]
        cx = bx[..., None] + self.corners[:, 0]
        cy = by[..., None] + self.corners[:, 1]
        dense = cx + cy * strides[:, None]
        hashed = torch.bitwise_xor(cx, (cy * _TCNN_PRIME) & 0xFFFFFFFF)
        idx = torch.where(self.hashed[k:, None], hashed, dense)
        return idx % sizes[:, None] + offsets[:, None]


class TcnnGridEncoding(nn.Module):
    """tiny-cuda-nn ``HashGrid`` in fp32 (CUDA only).  Same interface as :class:`TorchGridEncoding`, not the same
    function: tcnn hashes the levels whose grid exceeds the table (torch-ngp tiles them), initialises its table
    itself (uniform in ±1e-4, ``GridConfig.init_std`` does not apply) with a seed drawn from ``generator`` (so the
    fit's seed decides it; None: torch's global generator), and, by our reading of its source (not run here:
    tinycudann could not be installed on the GPU machines we were lent), does not zero coordinates outside
    [0, 1] as torch-ngp does.  ``backend="torch"`` gives the reference's encoding on CUDA too."""

    def __init__(self, cfg: GridConfig, generator: Optional[torch.Generator] = None):
        super().__init__()
        import tinycudann as tcnn  # noqa: WPS433 (optional dependency)

        self.cfg = cfg
        seed = int(torch.randint(0, 2 ** 31 - 1, (), generator=generator))  # tcnn's seed is an unsigned 32-bit int
        self.encoding = tcnn.Encoding(
            n_input_dims=2,
            encoding_config={
                "otype": "HashGrid",
                "n_levels": cfg.num_levels,
                "n_features_per_level": cfg.features_per_level,
                "log2_hashmap_size": cfg.log2_table_size,
                "base_resolution": cfg.base_resolution,
                "per_level_scale": cfg.per_level_scale,
                "interpolation": "Linear",
            },
            seed=seed,
            dtype=torch.float32,
        )

    @property
    def out_dim(self) -> int:
        return self.cfg.out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        u = ((x.reshape(-1, 2).float() + 1.0) * 0.5).contiguous()
        return self.encoding(u).float().reshape(*lead, self.out_dim)


def tcnn_available() -> bool:
    """True when tinycudann imports and CUDA is usable (it has no CPU path)."""
    if not torch.cuda.is_available():
        return False
    try:
        import tinycudann  # noqa: F401
    except Exception:  # ImportError, or EnvironmentError raised at import without CUDA
        return False
    return True


def grid_backend(cfg: GridConfig, device: torch.device) -> str:
    """The backend ``cfg.backend`` resolves to on ``device``: ``auto`` → tcnn on CUDA when importable."""
    if cfg.backend == "auto":
        return "tcnn" if device.type == "cuda" and tcnn_available() else "torch"
    return cfg.backend


def make_grid_encoding(cfg: GridConfig, device: torch.device, generator: Optional[torch.Generator] = None) -> nn.Module:
    """Build the grid encoding for ``cfg.backend`` (``auto`` → tcnn on CUDA when importable)."""
    backend = grid_backend(cfg, device)
    if backend == "tcnn":
        if device.type != "cuda" or not tcnn_available():
            raise RuntimeError("grid backend 'tcnn' needs tinycudann and a CUDA device; use backend='torch'")
        return TcnnGridEncoding(cfg, generator)
    return TorchGridEncoding(cfg, layout="ngp", generator=generator)
