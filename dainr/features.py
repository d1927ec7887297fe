"""Frozen CNN features of the neighbouring frames' zero-filled images.

The reference builds EDSR-repo MDSR but only the head conv (3→64, 3×3) and the scale-2
``pre_process`` (two residual blocks of 5×5 convs) reach its output, with PyTorch's default
random initialisation and no weights loaded (``dainr-paper.md`` §1.3).  :class:`FrozenFeatureExtractor`
is that encoder, its weights drawn in MDSR's order after ``torch.manual_seed(seed)`` (MDSR first builds its two
1×1 ``MeanShift`` convs, which draw random numbers too): frozen random features.  In the release the extractor is
the first random draw after ``torch.manual_seed(opt.seed)`` (``Solver.__init__`` loads the ground truth, then calls
``make_mdsr``), so ``feature_seed`` = its ``--seed`` gives its weights exactly.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .model import GridUpsampling, drawn_layer


def _conv(c_in: int, c_out: int, k: int, generator: torch.Generator) -> nn.Conv2d:
    return drawn_layer(nn.Conv2d, generator, c_in, c_out, k, padding=k // 2)


class _ResBlock(nn.Module):
    def __init__(self, ch: int, k: int, generator: torch.Generator):
        super().__init__()
        self.body = nn.Sequential(_conv(ch, ch, k, generator), nn.ReLU(inplace=True), _conv(ch, ch, k, generator))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class FrozenFeatureExtractor(nn.Module):
    """Head conv 3×3 (3→C) + two 5×5 residual blocks, frozen random weights from ``seed``."""

    def __init__(self, channels: int = 64, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        _conv(3, 3, 1, g), _conv(3, 3, 1, g)  # MDSR's sub_mean and add_mean: drawn, then unused
        self.head = _conv(3, channels, 3, g)
        self.blocks = nn.Sequential(_ResBlock(channels, 5, g), _ResBlock(channels, 5, g))
        self.channels = channels
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    @torch.no_grad()
    def forward(self, magnitude: torch.Tensor) -> torch.Tensor:
        """``magnitude`` (B, H, W) in [-1, 1] → features (B, C, H, W)."""
        x = magnitude[:, None].expand(-1, 3, -1, -1)
        return self.blocks(self.head(x))


def neighbour_frames(acquired: Sequence[int], query: Sequence[int]) -> torch.Tensor:
    """For each query frame, the nearest acquired frame strictly before and strictly after it.

    Returns (len(query), 2) positions into ``acquired``.  At the sequence ends both slots hold
    the single existing neighbour (as the reference does for frames 0 and N−1).  With
    ``acquired == query == range(F)`` this is the reference's t−1 / t+1 rule; with temporal
    interpolation it is the reference's t ± r rule, restricted to frames that were acquired.
    """
    acq = torch.as_tensor(list(acquired), dtype=torch.int64)
    if acq.numel() < 2:
        raise ValueError("feature extraction needs at least two acquired frames")
    q = torch.as_tensor(list(query), dtype=torch.int64)
    before = torch.searchsorted(acq, q, right=False) - 1  # last acquired < q
    after = torch.searchsorted(acq, q, right=True)  # first acquired > q
    before = torch.where(before < 0, after, before)
    after = torch.where(after >= acq.numel(), before, after)
    return torch.stack((before, after), dim=1)


def normalise_for_extractor(images: torch.Tensor) -> torch.Tensor:
    """Complex zero-filled images (F, H, W) → magnitude min-max normalised per frame, in [-1, 1].

    Per frame, as the released code prepares them (``syn_radial_img[..., f] = minmaxnorm(frame)``; its later
    min-max over the whole sequence then changes nothing), with the range max − min where its ``minmaxnorm``
    divides by max."""
    mag = images.abs()
    lo, hi = mag.amin((-2, -1), keepdim=True), mag.amax((-2, -1), keepdim=True)
    span = hi - lo
    return (mag - lo) / torch.where(span > 0, span, torch.ones_like(span)) * 2.0 - 1.0  # (any units: no floor)


def sample_features(features: torch.Tensor, out_hw: Sequence[int], pixel_centred: bool = True) -> torch.Tensor:
    """Bilinearly resample square feature maps (B, C, n, n) onto an ``out_hw`` pixel grid of the same FOV → (B, H, W, C).

    ``pixel_centred``: at the pixels themselves, on a finer output grid where they lie on the fitted FFT grid
    (:class:`~dainr.model.GridUpsampling`).  Otherwise the reference's sampling: ``grid_sample`` with
    ``align_corners=False`` at ``linspace(-1, 1, N)`` (a sub-pixel shift at the same size)."""
    H, W = out_hw
    if not pixel_centred:
        # the reference samples at linspace(-1, 1, N) with align_corners=False, whatever the maps' size
        ys = torch.linspace(-1, 1, H, device=features.device, dtype=features.dtype)
        xs = torch.linspace(-1, 1, W, device=features.device, dtype=features.dtype)
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)[None].expand(features.shape[0], -1, -1, -1)
        features = F.grid_sample(features, grid, mode="bilinear", align_corners=False)
    elif features.shape[-2:] != (H, W):
        if H != W or features.shape[-1] != features.shape[-2]:
            raise ValueError("feature resampling needs square grids")
        features = GridUpsampling(features.shape[-1], H, features.device).bilinear(features)
    return features.permute(0, 2, 3, 1)
