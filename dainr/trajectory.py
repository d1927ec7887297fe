"""Golden-angle radial trajectories (cycles/pixel in [-0.5, 0.5)) and ramp density compensation."""
from __future__ import annotations

import math

import torch

from .config import GOLDEN_ANGLE_DEG, REFERENCE_ANGLE_RAD


def angle_step(golden_angle: str = "true") -> float:
    """Per-spoke angle increment in radians: 180°/φ, or the reference's 111.246 *radians*."""
    if golden_angle == "true":
        return math.radians(GOLDEN_ANGLE_DEG)
    if golden_angle == "reference":
        return REFERENCE_ANGLE_RAD
    raise ValueError(f"golden_angle must be 'true' or 'reference', got {golden_angle!r}")


def spoke_angles(spoke_index, golden_angle: str = "true") -> torch.Tensor:
    """Angle (radians) of each global spoke counter value (0-based)."""
    idx = torch.as_tensor(spoke_index, dtype=torch.float64)
    return idx * angle_step(golden_angle)


def readout_positions(n_samples: int) -> torch.Tensor:
    """Sample positions along a spoke in cycles/pixel: ``(k - n/2) / n`` for k = 0..n-1, in [-0.5, 0.5).

    ``n_samples = 2N`` is the usual 2× readout oversampling for an N×N image.
    """
    return (torch.arange(n_samples, dtype=torch.float64) - n_samples // 2) / n_samples


def radial_trajectory(angles: torch.Tensor, n_samples: int) -> torch.Tensor:
    """(..., n_samples, 2) trajectory (kx, ky) in cycles/pixel for spokes at ``angles`` (radians)."""
    r = readout_positions(n_samples)
    a = torch.as_tensor(angles, dtype=torch.float64)[..., None]
    return torch.stack((r * torch.cos(a), r * torch.sin(a)), dim=-1).float()


def golden_angle_trajectory(n_frames: int, spokes_per_frame: int, n_samples: int, golden_angle: str = "true",
                            first_spoke: int = 0) -> torch.Tensor:
    """(F, S, R, 2) trajectory of one continuous golden-angle sequence split into frames."""
    idx = torch.arange(n_frames * spokes_per_frame) + first_spoke
    return radial_trajectory(spoke_angles(idx, golden_angle), n_samples).reshape(n_frames, spokes_per_frame, n_samples, 2)


def ramp_dcf(traj: torch.Tensor) -> torch.Tensor:
    """Ramp density compensation |k| / 0.5 for a radial trajectory (..., R, 2) → (..., R).

    A sample at the centre gets the share of the central disc (radius Δk/2) it represents instead of zero (the
    reference's linear ramp is ≈ 0 there): in ramp units Δk·m/8, where m is the number of samples a spoke puts
    on each ring near the centre: Δk/4 for a spoke through the centre (m = 2: its ends lie on opposite sides),
    Δk/8 for a centre-out one (m = 1).  Δk, the median step along each spoke, is read from the trajectory, so
    readouts of any scale (scanner interpolation) and centre-out ones get their own weight; the ratio to the usual
    rule 0.25 / R is rounded to 1 % (a spoke written as (i − R/2)/R gets exactly that rule whatever float32 does
    to its steps).
    """
    traj = traj.float()
    k = torch.linalg.vector_norm(traj, dim=-1)
    n = traj.shape[-2]
    if n < 2:
        return torch.clamp(k, min=0.25 / n) / 0.5
    step = torch.linalg.vector_norm(torch.diff(traj, dim=-2), dim=-1).median(dim=-1).values
    through = (traj[..., 0, :] * traj[..., -1, :]).sum(-1) < 0  # its two ends on opposite sides of the centre
    ratio = torch.round(n * step * (1 + through.float()) / 2 * 100) / 100  # float32 whatever the default dtype
    return torch.maximum(k, (0.25 / n) * ratio[..., None]) / 0.5


def omega_from_traj(traj: torch.Tensor) -> torch.Tensor:
    """(..., M, 2) (kx, ky) cycles/pixel → (..., 2, M) radians ordered (ky, kx) for images (H=y, W=x)."""
    return (2 * math.pi) * traj.flip(-1).transpose(-1, -2)
