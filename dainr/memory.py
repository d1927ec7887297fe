"""Memory preflight: what a reconstruction needs at its peak, checked against what the device has.

A fit that does not fit must fail at once with the numbers, not after minutes of swapping or by the
kernel's OOM killer (Linux overcommits, so a CPU allocation rarely fails cleanly; a header that claims a
4096² matrix asks for ≈ 90 GB).  The network's share is measured, not modelled: forward passes of the
actual model on two small patches under ``saved_tensors_hooks`` give the bytes autograd keeps per pixel
(3.78 kB with the defaults), which a fit keeps for every pixel of every frame of a step, and per pass.  The
rest (data, images, coil maps, NUFFT grids, features) follows from the shapes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from .coils import BATCHED_EIGH_MAX, COV_BUDGET, EIGH_CHUNK, EIGH_WORKSPACE_32
from .config import DAINRConfig
from .data import RadialData
from .encodings import grid_backend
from .model import DAINR, pixel_grid
from .utils import library_defaults

PROBE_SIDES = (16, 32)  # the probes' pixels: 16 × 16 and 32 × 32 patches
RUNTIME_BYTES = 128 << 20  # thread pools, FFT plans, libraries loaded on first use (measured on the CPU: ≈ 0.1 GiB)
RENDER_PIXELS = 1 << 18  # output pixels rendered at once (4 frames of 256²), each holding a few kB of intermediates


def render_batch(matrix: int) -> int:
    """Frames rendered at once at an output ``matrix``: 4, fewer where they would exceed :data:`RENDER_PIXELS`."""
    return max(1, min(4, RENDER_PIXELS // matrix ** 2))


class InsufficientMemoryError(MemoryError):
    """The reconstruction would need more memory than the device has available."""


@dataclass
class MemoryEstimate:
    """Bytes at the peak of a reconstruction, and its parts (``parts``: name → bytes)."""

    peak: int
    parts: Dict[str, int]

    def describe(self) -> str:
        return ", ".join(f"{k} {v / 2 ** 30:.2f}" for k, v in self.parts.items() if v >= 2 ** 24)


def autograd_bytes(cfg: DAINRConfig, fit_matrix: int, device: torch.device) -> Tuple[float, float]:
    """Bytes autograd keeps for one training forward pass of the model built for a fit at ``fit_matrix``: (per
    pixel and frame, per pass whatever the pixels).  Measured at two probe sizes (each saved storage counted
    once): the per-pass part is the grid's level images, which ``grid_sample`` keeps once per pass.  A fit
    trains with autograd on, so the probe does too, whatever the caller's grad mode."""
    with torch.inference_mode(False):  # (which turns grad mode on too)
        model = DAINR(cfg.model_config(fit_matrix), device, generator=torch.Generator())  # (global RNG untouched)
        small, large = (_saved_bytes(model, cfg, side, device) for side in PROBE_SIDES)
    per_pixel = (large - small) / (PROBE_SIDES[1] ** 2 - PROBE_SIDES[0] ** 2)
    return per_pixel, max(0.0, small - per_pixel * PROBE_SIDES[0] ** 2)


def _saved_bytes(model: DAINR, cfg: DAINRConfig, side: int, device: torch.device) -> int:
    """Bytes of the storages autograd saves in one forward pass over a ``side × side`` patch of one frame."""
    xy = pixel_grid(side, side, device)[None]
    feats = torch.zeros(1, side ** 2, 2 * cfg.feature_channels, device=device, dtype=xy.dtype) if cfg.use_features \
        else None
    saved: Dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        # detached: a saved output returned as is holds its own grad_fn, a cycle through C++ that the garbage
        # collector cannot see (the probe model would outlive every preflight); the storage stays held
        return t.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(xy, torch.zeros(1, device=device, dtype=xy.dtype), feats)
    return sum(saved.values())


@library_defaults
def estimate_memory(data: RadialData, cfg: DAINRConfig, device: torch.device) -> MemoryEstimate:
    """Peak bytes of ``reconstruct(data, cfg)`` on ``device``: what stays for the whole run plus the largest of
    its phases (coil maps, features, a fit step, rendering)."""
    Fa, C, S, R = data.kdata.shape
    N = data.matrix
    n = cfg.fit_matrix(N)
    F_out = cfg.temporal_layout(Fa)[1]
    B = min(cfg.batch_frames(device.type), Fa)
    c8, f4 = 8, 4  # bytes of complex64, float32
    per_pixel, per_pass = autograd_bytes(cfg, n, device)
    # what tcnn keeps in its own arena, unseen by the probe, for a training pass: the encoding's output gradient
    # w.r.t. the input (dy_dx, 2 per output) until backward
    tcnn_per_pixel = 2 * cfg.grid.out_dim * f4 if grid_backend(cfg.grid, device) == "tcnn" else 0
    widest = max(cfg.deform_width if cfg.use_deformation else 0, cfg.canonical_width)
    render_pixels = render_batch(N) * N ** 2
    stays = {
        "runtime": RUNTIME_BYTES,
        "k-space": 3 * Fa * C * S * R * c8 + 8 * Fa * S * R * f4,  # input, whitened, scaled; trajectory, weights
        "zero-filled": Fa * n * n * c8,
        "coil maps": 2 * C * n * n * c8,
        "features": Fa * cfg.feature_channels * n * n * f4 if cfg.use_features else 0,
    }
    phases = {
        # maps, the covariance strip's copies and, on CUDA, cuSOLVER's workspace for one chunk of batched eigh
        # (taken to grow with the C × C matrices' size): the preparation's peak on an H100, 32 coils, 128²
        # (0.44–0.48 GiB)
        "coil estimation": 2 * C * n * n * c8 + 6 * min(COV_BUDGET, C * C * n * n) * c8
        + (EIGH_CHUNK * EIGH_WORKSPACE_32 * (C / 32) ** 2 if device.type == "cuda" and C <= BATCHED_EIGH_MAX
           else 0),  # (above: power iteration on the strip, whose complex128 copy is 2 of the 6)
        "feature extraction": 3 * min(8, Fa) * cfg.feature_channels * n * n * f4 if cfg.use_features else 0,
        # autograd's saved tensors, plus the gradient of the widest layer's output that the backward pass
        # allocates while they are still held; the NUFFT's oversampled grids
        "fit step": B * n * n * (per_pixel + tcnn_per_pixel + widest * f4) + per_pass + 3 * B * C * (2 * n) ** 2 * c8,
        # no autograd, but live intermediates (the 4 corner evaluations and the anti-ringing pass above the fit
        # matrix); the factors are calibrated against the peak RSS of CPU runs (README, Performance)
        "render": 2 * F_out * N * N * c8 + (F_out * n * n * c8 if n != N else 0)
        + render_pixels * per_pixel * (0.65 if n == N else 0.5) + per_pass,
    }
    phase = max(phases, key=phases.get)
    parts = {k: int(v) for k, v in dict(stays, **{phase: phases[phase]}).items() if v}
    return MemoryEstimate(sum(parts.values()), parts)


def available_memory(device: torch.device) -> Optional[int]:
    """Bytes this process can still allocate on ``device``: CUDA free memory plus what PyTorch holds cached; on
    the CPU the kernel's ``MemAvailable``, or less where a cgroup (container) limit or an address-space limit
    (``ulimit -v``) leaves less.  None if unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    found = [b for b in (proc_bytes("/proc/meminfo", "MemAvailable"), _cgroup_headroom(), _address_space_headroom())
             if b is not None]
    return min(found) if found else None


def _address_space_headroom() -> Optional[int]:
    """The soft address-space limit (``ulimit -v``, RLIMIT_AS) minus this process's ``VmSize``; None without one
    (allocations past it fail as if the memory were gone)."""
    try:
        import resource
    except ImportError:  # (not POSIX)
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    used = proc_bytes("/proc/self/status", "VmSize")
    if soft == resource.RLIM_INFINITY or used is None:
        return None
    return max(0, soft - used)


def proc_bytes(path: str, key: str) -> Optional[int]:
    """A ``key:  N kB`` line of a /proc file (``/proc/meminfo``, ``/proc/self/status``) in bytes; None if absent."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _cgroup_headroom(root: str = "/sys/fs/cgroup", self_cgroup: str = "/proc/self/cgroup") -> Optional[int]:
    """Limit minus usage, less reclaimable page cache, of this process's memory cgroup (v2, else v1); None
    without a limit."""
    v2 = ("memory.max", "memory.current", "inactive_file")
    v1 = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
    layouts = []
    for line in (_read(self_cgroup) or "").splitlines():  # "0::/path" (v2), "4:memory:/path" (v1)
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        path = path.strip().rstrip("/")
        if controllers == "" and path:
            layouts.append((root + path, *v2))
        elif "memory" in controllers.split(",") and path:
            layouts.append((os.path.join(root, "memory") + path, *v1))
    layouts += [(root, *v2), (os.path.join(root, "memory"), *v1)]  # inside a container: its own cgroup is the root
    for folder, limit_file, usage_file, cache_key in layouts:
        limit, usage = _read(os.path.join(folder, limit_file)), _read(os.path.join(folder, usage_file))
        if limit is None or usage is None:
            continue
        if not limit.strip().isdigit() or int(limit) >= 1 << 60:  # "max" (v2) or a huge number (v1): no limit
            return None
        stat = dict(line.split(None, 1) for line in (_read(os.path.join(folder, "memory.stat")) or "").splitlines()
                    if " " in line)
        cache = int(stat.get(cache_key, "0").strip() or 0)
        return max(0, int(limit) - int(usage) + cache)
    return None


@library_defaults
def check_memory(data: RadialData, cfg: DAINRConfig, device: torch.device,
                 reserved_elsewhere: int = 0) -> MemoryEstimate:
    """The estimate (:func:`estimate_memory`); raises :class:`InsufficientMemoryError` when it exceeds
    :func:`available_memory` (where that is known) less ``reserved_elsewhere``, the bytes other fits running
    at the same time will still allocate on the device."""
    need, free = estimate_memory(data, cfg, device), available_memory(device)
    have = None if free is None else max(0, free - reserved_elsewhere)
    if have is not None and need.peak > have:
        Fa, C, S, R = data.kdata.shape
        raise InsufficientMemoryError(
            f"DA-INR needs about {need.peak / 2 ** 30:.1f} GiB on {device} for this scan (matrix {data.matrix}, "
            f"{Fa} frames, {C} coils, {S} spokes × {R} samples, {min(cfg.batch_frames(device.type), Fa)} frame(s) "
            f"per step; GiB: {need.describe()}) but {have / 2 ** 30:.1f} GiB is available"
            + (f" ({reserved_elsewhere / 2 ** 30:.1f} GiB more is promised to other fits running on this host)"
               if reserved_elsewhere else "") + ". Check the matrix size, "
            "or lower frames_per_step, fit at a lower resolution (spatial_ratio), or turn the features off; "
            "check_memory=False skips this check")
    return need
