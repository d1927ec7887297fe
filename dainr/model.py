"""The DA-INR network: deformation MLP + grid-encoded canonical MLP (reference ``NeRFNetwork``)."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .config import DAINRConfig
from .encodings import FrequencyEncoding, make_grid_encoding


def drawn_layer(cls, generator: Optional[torch.Generator], *args, **kwargs) -> nn.Module:
    """``cls(*args, **kwargs)`` (``nn.Linear``, ``nn.Conv2d``) in float32, its weights drawn from ``generator`` as
    PyTorch's ``reset_parameters`` draws them (the same numbers as ``torch.manual_seed(s)`` then ``cls(...)`` for a
    generator seeded with ``s``), without touching torch's global generator (None: from it, as PyTorch does):
    the weights depend on the seed alone, whatever other threads draw meanwhile."""
    with torch.device("meta"):  # no draws (nn.utils.skip_init does the same, but imports sympy: ~1 s, 487 modules)
        layer = cls(*args, dtype=torch.float32, **kwargs)
    for name, p in list(layer.named_parameters(recurse=False)):
        setattr(layer, name, nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="cpu")))
    nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
    if layer.bias is not None:
        bound = 1 / math.sqrt(layer.weight[0].numel())  # 1 / sqrt(fan in)
        nn.init.uniform_(layer.bias, -bound, bound, generator=generator)
    return layer


def _mlp(widths, generator: Optional[torch.Generator], final_relu: bool = False) -> nn.Sequential:
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(drawn_layer(nn.Linear, generator, a, b, bias=False))
        if i < len(widths) - 2 or final_relu:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class DAINR(nn.Module):
    """(x, y, t) → complex image value.

    * deformation Ψ_t: [γ(x) 42, γ(t) 13] → 128 ×4 → Δ (2), bias-free, ReLU; x' = x + Δ.
    * canonical Ψ_x: [grid(x') 32, γ(x) 42, γ(t) 13, features 128] → 64 ReLU → 64 → 64 ReLU
      → 64 ReLU → (Re, Im), bias-free (the reference's "sigma_net" + "color_net").

    ``use_deformation=False`` gives the plain grid INR baseline (x' = x); ``use_features=False``
    drops the CNN features.  ``generator``: where the initial weights are drawn from (None: torch's global
    generator, as PyTorch's layers draw).
    """

    def __init__(self, cfg: DAINRConfig, device: torch.device = torch.device("cpu"),
                 max_t_freq: Optional[float] = None, generator: Optional[torch.Generator] = None):
        super().__init__()
        self.cfg = cfg
        self.enc_x = FrequencyEncoding(2, cfg.freq_degree_xy)
        self.enc_t = FrequencyEncoding(1, cfg.freq_degree_t, max_t_freq)  # (DAINRConfig.temporal_bandlimit)
        self.grid = make_grid_encoding(cfg.grid, device, generator)
        coord_dim = self.enc_x.out_dim + self.enc_t.out_dim
        w = cfg.deform_width
        self.deform = _mlp([coord_dim] + [w] * (cfg.deform_layers - 1) + [2], generator) if cfg.use_deformation \
            else None
        feat_dim = 2 * cfg.feature_channels if cfg.use_features else 0
        c = cfg.canonical_width
        in_dim = self.grid.out_dim + (coord_dim if cfg.canonical_coords else 0) + feat_dim
        self.sigma_net = _mlp([in_dim, c, c], generator)
        self.color_net = _mlp([c, c, c, 2], generator)
        self.to(device)

    def forward(self, xy: torch.Tensor, t: torch.Tensor, features: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``xy`` (B, P, 2) in [-1, 1], ``t`` (B,) in [0, 1], ``features`` (B, P, 2C) → complex (B, P)."""
        coords, warped = self.encode(xy, t)
        return self.canonical(warped, coords, features)

    def encode(self, xy: torch.Tensor, t: torch.Tensor):
        """The coordinate part: ([γ(x), γ(t)] (B, P, 55), deformed coordinate x' (B, P, 2))."""
        B, P, _ = xy.shape
        gt = self.enc_t(t.reshape(B, 1, 1).to(xy.dtype)).expand(B, P, -1)
        coords = torch.cat((self.enc_x(xy), gt), dim=-1)
        warped = xy + self.deform(coords) if self.deform is not None else xy
        return coords, warped

    def canonical(self, warped: torch.Tensor, coords: torch.Tensor, features: Optional[torch.Tensor]) -> torch.Tensor:
        """Canonical network on [grid(x'), γ(x), γ(t), features] → complex (B, P)."""
        parts = [self.grid(warped), coords] if self.cfg.canonical_coords else [self.grid(warped)]
        if self.cfg.use_features:
            if features is None:
                raise ValueError("model was built with use_features=True but no features were given")
            parts.append(features)
        out = self.color_net(self.sigma_net(torch.cat(parts, dim=-1)))
        return torch.complex(out[..., 0], out[..., 1])

    def deformation(self, xy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Δ (B, P, 2) for inspection (zeros without a deformation network)."""
        coords, warped = self.encode(xy, t)
        return warped - xy


def pixel_grid(h: int, w: int, device=None) -> torch.Tensor:
    """Coordinates (h*w, 2) as (x, y) in [-1, 1] (``linspace(-1, 1, N)``, row-major y then x)."""
    ys = torch.linspace(-1, 1, h, device=device, dtype=torch.float32)
    xs = torch.linspace(-1, 1, w, device=device, dtype=torch.float32)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((xx, yy), dim=-1).reshape(-1, 2)


class GridUpsampling:
    """Where the pixels of an ``N``² output grid lie on an ``n``² fitted grid of the same FOV (spatial ×s).

    Both are FFT grids: the fit sees k-space cropped to its central ``n`` samples, so fitted pixel ``i`` sits
    at ``(i − n//2)`` fitted pixels from the centre (pixel ``n//2``, as the NUFFT places it), the same point as
    output pixel ``(i − n//2)·N/n + N//2``.  Output pixel ``p`` is therefore at ``u = (p − N//2)·n/N + n//2``
    fitted pixels (for even sizes ``p·n/N``: pixel 0 and the centre coincide; for an odd ``N`` the centre
    pixels do).  Corner alignment (``linspace``, ``align_corners=True``) would misplace the output by up to a
    pixel towards the far edges.
    """

    def __init__(self, n: int, N: int, device=None):
        self.n, self.N = n, N
        u = (torch.arange(N, device=device, dtype=torch.float32) - N // 2) * (n / N) + n // 2
        i0 = u.floor().long()
        w = u - u.floor()
        # 1-D bilinear taps (index, weight), clamped to the edge pixels (before the first fitted pixel, which an
        # odd n puts there, and beyond the last)
        self.taps = ((i0.clamp(0, n - 1), 1 - w), ((i0 + 1).clamp(0, n - 1), w))
        near = (u + 0.5).floor().long().clamp(0, n - 1)
        self.nearest = (near[:, None] * n + near[None, :]).reshape(-1)  # row-major index into the n² grid
        # the output pixels in the fitted pixel_grid's [-1, 1] labels; outside the fitted pixels (the last
        # (N/n − 1) output rows/columns) clamped to the edge, like the taps, so the grid is never read outside [-1, 1]
        s = (-1 + 2 * u / max(n - 1, 1)).clamp(-1.0, 1.0)
        yy, xx = torch.meshgrid(s, s, indexing="ij")
        self.xy = torch.stack((xx, yy), dim=-1).reshape(-1, 2)

    def corners(self):
        """The 4 bilinear taps in 2-D: (row-major index into the n² grid, weight), each (N²,)."""
        for rows, wr in self.taps:
            for cols, wc in self.taps:
                yield (rows[:, None] * self.n + cols[None, :]).reshape(-1), (wr[:, None] * wc[None, :]).reshape(-1)

    def bilinear(self, x: torch.Tensor) -> torch.Tensor:
        """(..., n, n) real or complex → (..., N, N)."""
        rows = sum(x[..., i, :] * w[:, None] for i, w in self.taps)
        return sum(rows[..., i] * w for i, w in self.taps)

    def antiring(self, high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        """Complex ``high`` (..., N²) with each magnitude clamped to the range of the 4 fitted pixels of ``low``
        (..., n²) around it (:meth:`corners`), phase kept (the anti-ringing clamp of image scalers)."""
        mag = low.abs()
        corners = torch.stack([mag[..., i] for i, _ in self.corners()])
        clamped = torch.minimum(torch.maximum(high.abs(), corners.amin(0)), corners.amax(0))
        return torch.polar(clamped, high.angle())
