"""The radial multi-coil input container, validated once at the library boundary."""
from __future__ import annotations

import functools
import numbers
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch

from .utils import library_defaults

# the largest magnitude of k-space or noise samples the fit takes: it computes in float32 (complex64) after dividing
# by a power of two near the peak, and the calibration's sums of squares need headroom on both sides
FLOAT32_PEAK_RANGE = (1e-30, 1e30)


def is_count(value, least: int = 1) -> bool:
    """``value`` is an integer (Python's or numpy's, not a bool) of at least ``least``."""
    return not isinstance(value, bool) and isinstance(value, numbers.Integral) and value >= least


def as_tensor(x) -> torch.Tensor:
    """``torch.as_tensor``, also for numpy arrays torch cannot view: negative strides (``a[..., ::-1]``) and a
    non-native byte order (big-endian arrays from HDF5 or MAT files), and read-only ones (``np.load(mmap_mode="r")``,
    ``np.frombuffer``: torch warned of undefined behaviour on writes, which the package never makes) as a copy."""
    if isinstance(x, np.ndarray) and (any(s < 0 for s in x.strides) or not x.dtype.isnative
                                      or not x.flags.writeable):
        x = np.array(x, dtype=x.dtype.newbyteorder("="), order="C")  # (a copy)
    return torch.as_tensor(x)


def check_float32_range(x: torch.Tensor, what: str) -> None:
    """Refuse samples (finite, e.g. complex128) whose largest magnitude float32 arithmetic does not hold."""
    peak = float(x.abs().amax()) if x.numel() else 0.0
    low, high = FLOAT32_PEAK_RANGE
    if peak > 0 and not low <= peak <= high:
        raise ValueError(f"{what}'s largest magnitude {peak:.3g} is outside what the fit's float32 arithmetic holds "
                         f"({low:g} to {high:g}): rescale it")


@dataclass
class RadialData:
    """Golden-angle radial multi-coil k-space of one slice, grouped into frames.

    * ``kdata`` — (F, C, S, R) complex: frames × coils × spokes × readout samples.
    * ``traj`` — (F, S, R, 2) float: (kx, ky) in cycles/pixel of the ``matrix`` grid, within [-0.5, 0.5].
    * ``matrix`` — reconstruction matrix N (images are N × N).
    * ``spoke_mask`` — (F, S) bool, False for padding when frames have different spoke counts (padding
      k-space and trajectory are ignored: set to 0 in a copy).
    * ``noise`` — optional (C, n) complex noise-only samples for prewhitening.

    The convention (ISMRMRD's, BART's): a sample at k is Σ image[y, x] · exp(−2πi (kx·(x − N//2) + ky·(y − N//2)))
    over pixels, x the image's column, y its row, pixel (N//2, N//2) the centre.  Data of the opposite exponent sign
    come out mirrored through the centre, swapped (ky, kx) transposed: convert first (negate traj; reverse its last
    axis).  A trajectory in radians/sample (±π, finufft's and torchkbnufft's ω) is traj = ω / 2π.
    """

    kdata: torch.Tensor
    traj: torch.Tensor
    matrix: int
    spoke_mask: Optional[torch.Tensor] = None
    noise: Optional[torch.Tensor] = None

    @library_defaults
    def __post_init__(self) -> None:
        # measured data, not parameters: detached, so a caller's autograd graph never reaches the fit
        # (contiguous: the same values in another memory layout gave other float rounding in the DCF)
        self.kdata = as_tensor(self.kdata).detach().contiguous()
        self.traj = as_tensor(self.traj).detach().contiguous()
        if not self.kdata.is_complex():
            pairs = (" (real/imaginary pairs in a last axis of 2: torch.view_as_complex(kdata.contiguous()))"
                     if self.kdata.is_floating_point() and self.kdata.ndim and self.kdata.shape[-1] == 2 else "")
            raise ValueError(f"kdata must be complex, got {self.kdata.dtype}{pairs}")
        if not self.traj.is_floating_point():
            raise ValueError(f"traj must be real (kx, ky) in cycles/pixel, got {self.traj.dtype}")
        if isinstance(self.matrix, bool) or not isinstance(self.matrix, numbers.Real) \
                or not float(self.matrix).is_integer():
            raise ValueError(f"matrix must be an integer, got {self.matrix!r}")
        if self.kdata.ndim != 4:
            raise ValueError(f"kdata must be (frames, coils, spokes, samples), got shape {tuple(self.kdata.shape)}")
        F_, C, S, R = self.kdata.shape
        if self.traj.shape != (F_, S, R, 2):
            raise ValueError(f"traj must be {(F_, S, R, 2)} to match kdata {tuple(self.kdata.shape)}, got {tuple(self.traj.shape)}")
        if self.spoke_mask is None:
            self.spoke_mask = torch.ones(F_, S, dtype=torch.bool)
        self.spoke_mask = as_tensor(self.spoke_mask).to(torch.bool)
        if self.spoke_mask.shape != (F_, S):
            raise ValueError(f"spoke_mask must be {(F_, S)}, got {tuple(self.spoke_mask.shape)}")
        if int(self.matrix) < 8:
            raise ValueError(f"matrix must be >= 8, got {self.matrix}")
        self.matrix = int(self.matrix)
        if F_ < 1 or C < 1 or S < 1 or R < 2:
            raise ValueError(f"empty data: shape {tuple(self.kdata.shape)}")
        counts = self.spoke_mask.sum(1)
        if bool((counts == 0).any()):
            raise ValueError(f"frames {torch.nonzero(counts == 0).flatten().tolist()} have no spokes")
        if not bool(self.spoke_mask.all()):  # padding spokes: whatever they hold, they must not reach the fit
            pad = ~self.spoke_mask
            self.kdata = self.kdata.masked_fill(pad[:, None, :, None], 0)
            self.traj = self.traj.masked_fill(pad[:, :, None, None], 0)
        valid = self.spoke_mask[:, None, :, None].expand_as(self.kdata)
        samples = self.kdata[valid]  # (one copy for both checks)
        if not torch.isfinite(torch.view_as_real(samples)).all():
            raise ValueError("kdata contains NaN or Inf")
        check_float32_range(samples, "kdata")
        t = self.traj[self.spoke_mask]
        if not torch.isfinite(t).all():
            raise ValueError("trajectory contains NaN or Inf")
        k_max = float(t.abs().max())
        if k_max > 0.5 + 1e-3:
            raise ValueError(f"trajectory must be in cycles/pixel of the {self.matrix}-pixel grid, within [-0.5, 0.5]; "
                             f"max |k| = {k_max:.3f} (a trajectory in units of ±1, ±π (radians: divide by 2π) or ±N/2 "
                             "needs rescaling)")
        if k_max < 1 / self.matrix:  # e.g. every sample at k = 0 (a FOV of 0 in a header)
            raise ValueError(f"trajectory spans less than one k-space sample of the {self.matrix}-pixel grid "
                             f"(max |k| = {k_max:.3g} cycles/pixel): not a radial acquisition")
        if self.noise is not None:
            self.noise = as_tensor(self.noise).detach().resolve_conj()
            if not self.noise.is_complex():
                raise ValueError(f"noise must be complex samples, got {self.noise.dtype}")
            if self.noise.ndim != 2 or self.noise.shape[0] != C:
                raise ValueError(f"noise must be (coils={C}, samples), got {tuple(self.noise.shape)}")
            if bool(torch.isfinite(torch.view_as_real(self.noise)).all()):  # (NaN/Inf: the prewhitener says so)
                check_float32_range(self.noise, "noise")

    def select_frames(self, frames: Sequence[int]) -> "RadialData":
        """The given frames only, e.g. ``range(0, n, r)`` to fit every r-th frame (temporal interpolation)."""
        idx = list(frames)
        return RadialData(self.kdata[idx], self.traj[idx], self.matrix, self.spoke_mask[idx], self.noise)

    def every_rth_frame(self, r: int) -> "RadialData":
        """Frames 0, r, 2r, …: what a temporal ×r fit sees; it then renders (fitted − 1)·r + 1 frames, so the
        last frame must be among them, or the frames after the last fitted one would get no image.  r = 1: self."""
        if not is_count(r):
            raise ValueError(f"the temporal ratio must be an integer >= 1, got {r!r}")
        if r == 1:
            return self
        if (self.n_frames - 1) % r:
            raise ValueError(f"temporal ratio {r} needs (frames − 1) divisible by {r}: with {self.n_frames} frames "
                             f"the last {(self.n_frames - 1) % r} would not be reconstructed")
        return self.select_frames(range(0, self.n_frames, r))

    @property
    def n_frames(self) -> int:
        return self.kdata.shape[0]

    @property
    def n_coils(self) -> int:
        return self.kdata.shape[1]

    @classmethod
    @library_defaults
    def from_frames(cls, kdata: Sequence[torch.Tensor], traj: Sequence[torch.Tensor], matrix: int,
                    noise: Optional[torch.Tensor] = None) -> "RadialData":
        """Build from per-frame (C, S_f, R) k-space and (S_f, R, 2) trajectories, padding unequal S_f."""
        if len(kdata) != len(traj) or not len(kdata):
            raise ValueError("need the same, non-zero number of k-space and trajectory frames")
        kdata, traj = [as_tensor(k) for k in kdata], [as_tensor(t) for t in traj]
        for f, (k, t) in enumerate(zip(kdata, traj)):
            if k.ndim != 3 or not k.is_complex():
                raise ValueError(f"frame {f}: k-space must be complex (coils, spokes, samples), got {k.dtype} "
                                 f"{tuple(k.shape)}")
        C, _, R = kdata[0].shape
        S = max(k.shape[1] for k in kdata)
        F_ = len(kdata)
        # the inputs' own precision (a cast to complex64 here turned complex128 values beyond float32 into inf, and
        # RadialData's range check into "contains NaN or Inf")
        k_out = torch.zeros(F_, C, S, R, dtype=functools.reduce(torch.promote_types, (k.dtype for k in kdata)))
        t_out = torch.zeros(F_, S, R, 2, dtype=functools.reduce(torch.promote_types, (t.dtype for t in traj),
                                                                 torch.float32))
        mask = torch.zeros(F_, S, dtype=torch.bool)
        for f, (k, t) in enumerate(zip(kdata, traj)):
            if k.shape[0] != C or k.shape[2] != R:
                raise ValueError(f"frame {f}: k-space shape {tuple(k.shape)} does not match (coils={C}, *, samples={R})")
            if t.shape != (k.shape[1], R, 2):
                raise ValueError(f"frame {f}: trajectory shape {tuple(t.shape)} does not match {(k.shape[1], R, 2)}")
            n = k.shape[1]
            k_out[f, :, :n] = k
            t_out[f, :n] = t
            mask[f, :n] = True
        return cls(k_out, t_out, matrix, mask, noise)


@library_defaults
def frames_from_spokes(kdata: torch.Tensor, traj: torch.Tensor, frame_index: Optional[torch.Tensor], matrix: int,
                       spokes_per_frame: Optional[int] = None, noise: Optional[torch.Tensor] = None) -> RadialData:
    """Group a slice's spokes, in acquisition order, into frames.

    ``kdata`` (S, C, R), ``traj`` (S, R, 2).  Frames come from ``frame_index`` (S,) (e.g. MRD
    ``idx.phase``) when given, otherwise consecutive runs of ``spokes_per_frame`` spokes; a
    final partial run becomes a shorter frame, so no received spoke is dropped.
    """
    kdata, traj = as_tensor(kdata), as_tensor(traj)
    if kdata.ndim != 3 or traj.shape != (kdata.shape[0], kdata.shape[-1], 2):
        raise ValueError(f"kdata must be (spokes, coils, samples) and traj (spokes, samples, 2); got "
                         f"{tuple(kdata.shape)} and {tuple(traj.shape)}")
    if kdata.shape[0] == 0:
        raise ValueError("no spokes to reconstruct")
    groups = frame_groups(kdata.shape[0], frame_index, spokes_per_frame)
    return RadialData.from_frames([kdata[g].transpose(0, 1) for g in groups], [traj[g] for g in groups], matrix, noise)


@library_defaults
def frame_groups(n_spokes: int, frame_index: Optional[torch.Tensor] = None,
                 spokes_per_frame: Optional[int] = None) -> List[torch.Tensor]:
    """Each frame's spokes (indices in acquisition order), frames in ascending order of ``frame_index`` (S,), or
    consecutive runs of ``spokes_per_frame`` spokes without it (a final partial run is a shorter frame)."""
    if frame_index is None:
        if not is_count(spokes_per_frame):
            raise ValueError(f"without frame indices, spokes_per_frame must be given (an integer >= 1), got "
                             f"{spokes_per_frame!r}")
        frame_index = torch.arange(n_spokes) // spokes_per_frame
    frame_index = torch.as_tensor(frame_index, dtype=torch.int64)
    if frame_index.shape != (n_spokes,):
        raise ValueError(f"frame_index must have one entry per spoke ({n_spokes}), got {tuple(frame_index.shape)}")
    return [torch.nonzero(frame_index == f).flatten() for f in torch.unique(frame_index, sorted=True)]
