"""One configuration object for every DA-INR hyperparameter.

Defaults are the released reference code's values (9B8DY6/DA_INR @64f4ffc, see
``shared/reference/dainr-paper.md``).  Every deviation is listed in the docstring of
:class:`DAINRConfig` with its reason.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import List, Literal, Optional, Tuple

GOLDEN_ANGLE_DEG = 180.0 / ((1.0 + math.sqrt(5.0)) / 2.0)  # 111.2461°
"""The true golden angle for radial MRI, 180°/φ = 111.2461°."""

REFERENCE_ANGLE_RAD = 111.246
"""The reference code's per-spoke step: 111.246 passed to cos/sin as *radians* (≡ 73.93° mod 180°)."""


@dataclass
class GridConfig:
    """Multiresolution grid ("hash") encoding of the deformed coordinate (torch-ngp ``GridEncoder``).

    ``backend``: ``torch`` is the reference's encoding on any device; ``tcnn`` (tiny-cuda-nn, CUDA only) is a
    different function of the same size (hashed fine levels, its own initialisation: see
    :class:`~dainr.encodings.TcnnGridEncoding`); ``auto`` picks ``tcnn`` on CUDA where it imports.
    ``init_std`` (torch-ngp's name) is a bound, not a standard deviation: the table starts U(−init_std, init_std)."""

    num_levels: int = 16
    features_per_level: int = 2
    base_resolution: int = 16
    finest_resolution: int = 2048
    log2_table_size: int = 19
    init_std: float = 1e-4
    backend: Literal["auto", "torch", "tcnn"] = "auto"

    @property
    def per_level_scale(self) -> float:
        if self.num_levels == 1:
            return 1.0
        return math.exp(math.log(self.finest_resolution / self.base_resolution) / (self.num_levels - 1))

    @property
    def out_dim(self) -> int:
        return self.num_levels * self.features_per_level


NUFFT_BACKENDS = ("auto", "gather", "torchkbnufft", "finufft")  # see dainr.nufft


@dataclass
class DAINRConfig:
    """Every hyperparameter of a DA-INR reconstruction.

    Architecture, encodings, optimiser and loss follow the reference code exactly (see
    ``dainr-paper.md`` §1.2–1.5).  Deviations, and why (the measurements in the bullets before
    ``use_features`` were taken with the features on, the default until then, and at the reference's lr 1e-3
    unless they name the rate):

    * ``frames_per_step`` (reference: 1 frame per step in a Python loop, run once per step).
      Frames of a step go through one batched forward/NUFFT/backward, and frames are drawn
      as shuffled epochs so every frame is visited equally often.  ``None`` = auto: 4 on
      CUDA, where extra frames are almost free, and 1 on CPU, where the cost is linear in
      frames and more, smaller updates converge faster per FLOP (measured: 128², 13 spokes,
      28.3 dB after 100 frame visits with 1 frame/step vs 23.7 dB after 200 with 4).  On CUDA
      the 4 buys time, not quality: an H100 step takes ≈ 10 ms at 1, 2 or 4 frames (launch
      bound), and fewer frames per step reach better images in more steps.  Mean PSNR dB over
      the fit's seeds 0–3 at 1 / 2 / 4 frames (time for 128², 23 frames, 32 coils): phantom,
      32 coils 35.69 / 35.28 / 35.05 (10–16 / 7–8 / 4–5 s); 8 coils 34.87 / 34.70 / 34.19;
      real cine 27.65 / 26.97 / 26.36 (the CPU's 1 frame/step: 34.93 and 27.67).  4 keeps the
      issue's 32-coil case under its 10 s with room (2 measured 10.5 s on a slower machine);
      ``frames_per_step=1`` gives the CPU's quality for 2–3× the time.
      ``max_steps`` counts steps; frame visits = steps × frames_per_step.
    * ``max_steps``/``holdout_spokes``/``patience`` (reference: 1001 fixed steps, best
      checkpoint chosen against the *ground truth*, which a scanner does not have).  We
      hold ``holdout_spokes`` spokes per frame out of the loss and keep each frame's latest
      k-space residual on them (taken from the training forward pass, so it costs nothing);
      at the end of each epoch the mean over frames is the rule's number.  (Averaging the
      spokes an epoch visited instead made it jump by ~2 % with the model fixed, since an epoch
      is rarely a whole number of passes and the frames' residuals differ by ~20 %: ten times
      ``min_improvement``, so noise drove the decays, the stop and the best checkpoint.)
      When it has not improved by ``min_improvement``
      (relative) for ``patience`` epochs the learning rate is multiplied by ``lr_decay``;
      after ``max_decays`` such decays the next plateau stops the fit, and the weights of
      the best epoch are returned.  This replaces the reference's StepLR(2000, 0.5), which
      never fires within its 1001 steps (a constant rate).  ``patience=3``: the per-epoch
      residual of one held-out spoke per frame is noisy, and with 2 epochs the rate decays and
      the fit stops early.  Measured, PSNR dB / SSIM, patience 3 vs 2 (128², 23 frames, 8 coils):
      5 spokes 30.25 / 0.804 vs 29.34 / 0.799, 13 spokes 34.43 / 0.909 vs 34.36 / 0.909,
      21 spokes 34.47 / 0.937 vs 33.49 / 0.937, real cine 26.34 / 0.839 vs 26.10 / 0.833, for
      about 20 % more steps (patience 4 reached the 1001-step cap at 21 spokes: 35.24 / 0.933).
      ``max_steps`` defaults to 3000, three times the reference's budget: it only bounds a fit that never
      settles, and the rule ends every fit of the default configuration (features off) that we measured
      first (at 1e-3 after 1020–1680 steps, at 4e-3 after 900–1800). With the reference's 1001 every one of
      them ran to the cap instead; letting the rule stop them gained, per fit's seed 0–3 (PSNR dB, 1001 →
      rule), phantom at 13 spokes 35.27 → 35.28, 34.62 → 34.82, 34.68 → 34.76, 34.81 → 34.84 and real
      cine 27.79 → 28.08, 27.48 → 27.53, 27.27 → 27.51, 27.47 → 27.57, for 2–68 % more steps (5 spokes
      31.44 → 31.55; 21 spokes stopped at 1020 with the same 35.75).
      With ``holdout_spokes=0`` the fit runs a fixed budget (``max_steps`` / ``max_seconds``).
    * ``min_epoch_frames``: an "epoch" of the stopping rule spans at least this many frame
      visits (steps × frames per step), not only one pass over the frames.  With few frames, or
      several per step, a pass is only a few updates and the patience runs out before the fit
      has converged.  Measured on CPU (PSNR dB / SSIM), one pass vs ≥ 30 visits, 1 frame/step:
      real cine (10 frames) 26.34 / 0.839 vs 26.93 / 0.844; 128² phantom (23 frames) at 5 spokes
      30.25 / 0.804 vs 30.37 / 0.807, at 13 34.43 / 0.909 vs 34.42 / 0.909, at 21 34.47 / 0.937
      vs 34.72 / 0.937; the fits then run to about the 1001-step cap (13 spokes: 920 → 1001
      steps).  At 4 frames/step (the CUDA default) the real cine stopped after 108 steps at
      20.45 / 0.631 with one pass (3 steps) per epoch and reached 25.84 / 0.809 with 10-step
      epochs; the phantom gave 33.43 / 0.910 in 282 steps with 6-step epochs and 33.77 / 0.908 in
      430 with 10 (30 visits are 8 steps there).  A short ``max_steps`` lowers the floor so that the
      decay schedule still fits twice into it (``dainr.recon.epoch_steps``): the demo's 300 steps keep
      its one-pass epochs of 12 steps (30.25 / 0.936; with 30-visit epochs 29.16 / 0.934).
    * The golden angle is the acquisition's, not a fitting parameter: the library takes trajectories.
      Where they are generated (``dainr.trajectory``, ``simulate``, and MRD readouts without ``acq.traj``)
      the default is the true golden angle (111.246°); ``"reference"`` reproduces the reference's
      111.246-*radian* step (73.93° mod 180°) for paper comparisons.
    * ``data_scale``: measured data are rescaled so the zero-filled image has its 99th
      magnitude percentile at 1 (the reference used raw simulated values).  Scanner data
      have arbitrary units; without this the fixed learning rate would not transfer.  Before that, the
      k-space (and given coil maps, by their peak root-sum-of-squares) are divided by a power of two, which is
      exact: data at ×2^±20 give bit-identical images in their units (float32 sums of squares overflowed at
      ×1e20, and whitened maps scale as 1/σ, which AdamW's eps felt).
    * ``nufft_backend`` (the reference: python_nufft's CPU type-3 ``nufft2d3``; the issue names torchkbnufft).  ``auto`` is finufft on CPU (about 10× faster than
      torchkbnufft here, each call on one thread and the calls side by side, so results are bit-identical at any
      thread count) and ``dainr.nufft``'s own Kaiser–Bessel gridding (``gather``) on CUDA, where torchkbnufft
      with a trajectory per frame was launch bound (148 ms per 32-coil step vs 11–13 ms).  torchkbnufft stays
      selectable and is the tests' cross-check.
    * ``pixel_centred_features``: features are sampled at the pixels themselves (on a finer spatial ×s
      output grid, where those lie on the fitted FFT grid), removing the reference's half-pixel shift and
      zero-padded last row/column (§1.2).
    * ``cap_grid_at_matrix`` (reference: finest grid level 2048 for a 128² image, its four finest levels
      wrapping around the 2^19-entry table).  The finest level is capped at ``cap_grid_ratio`` (0.75)
      times the fitting matrix.  The loss sees the image only at pixel centres, so levels finer than
      the pixel pitch give every pixel cells of its own: the grid turns into a per-pixel lookup table
      that fits noise and aliasing as readily as anatomy, and nothing in the loss ties those cells
      together.  Measured with patience 2 (128², 23 frames, 8 coils, 13 spokes, noise): 34.36 dB / 0.909
      capped at the matrix vs 32.62 / 0.832 at 2048; finest 256: 33.31 / 0.863.  Real cine (110², 10
      frames): 26.10 / 0.833 capped vs 26.35 / 0.814.  Below the matrix, with the per-frame stopping
      rule (phantom at 13 spokes; real cine), finest = matrix: 34.92 / 0.926, 27.53 / 0.864; 0.75 ×:
      35.00 / 0.952, 27.69 / 0.883 (0.87 × on the real cine 27.66 / 0.875); 0.5 ×: 35.43 / 0.972,
      26.99 / 0.867.  0.75 gains SSIM everywhere and PSNR but at 5 spokes (5 / 21 spokes: 31.84 /
      0.811 → 31.41 / 0.852, 35.67 / 0.946 → 36.02 / 0.972); 0.5 loses 0.5 dB on the real cine, whose
      texture is finer than the phantom's.  The grid shrinks from 5.5 M to 0.09 M parameters.  Spatial ×s: the
      full-resolution query reads the grid between fitted pixels through trained vertices, at
      x' = x + Δ of each of the 4 surrounding fitted pixels, with their γ(x), γ(t) (γ(x)'s finest
      frequencies alias on the fitting grid), and blends the 4 outputs bilinearly (``Fitter.render``).
      ``cap_grid_at_matrix=False`` restores the reference in both respects (its query takes every input
      but the features from the nearest fitted pixel, by our FFT-grid geometry: the release's nearest pixel
      lies about one output pixel the other way, README *Faithfulness*).
    * ``lr`` 4e-3 (reference: 1e-3, constant over its 1001 steps).  Our stopping rule halves the rate on
      plateaus, so a higher start pays: mean over the fit's seeds 0–3, 1 frame per step, 8 coils, PSNR dB /
      SSIM at 1e-3 / 2e-3 / 4e-3 / 8e-3: phantom at 13 spokes 34.93 / 0.950, 35.50 / 0.953, 36.03 / 0.953,
      35.50 / 0.969 (scattered: 0.944–0.984); real cine 27.67 / 0.876, 28.41 / 0.893, 28.65 / 0.896,
      28.23 / 0.876; phantom at 5 spokes 31.76 / 0.855, 32.45 / 0.845, 31.95 / 0.863, 30.51 / 0.894
      (``dainr bench --case lr``), where the rates above 2e-3 scatter (4e-3: 30.90–32.39 dB, 0.826–0.932).
      At 4 frames per step (the CUDA default) the same fits on the CPU gain 1.2–1.8 dB (seeds 0, 1; README,
      Learning rate).  The measurements in the other bullets were taken at 1e-3 unless they say otherwise.
    * ``use_features`` defaults to off (the reference feeds the frozen features of the neighbouring frames'
      zero-filled images to the canonical MLP; ``True`` restores that). With the capped grid (above) the
      features lowered SSIM on every data set and setting we measured, and PSNR on all but one. Features on vs
      off, mean over the fit's seeds 0–3, PSNR dB / SSIM, lr 4e-3: phantom at 13 spokes 34.85 / 0.936 vs
      35.76 / 0.955 (−0.92 ± 0.26 dB paired by seed), real cine 27.62 / 0.870 vs 28.71 / 0.897 (−1.10 ± 0.47
      dB), lower for every seed in both metrics (at 1e-3: −0.29 ± 0.30 and −0.69 ± 0.10 dB); at 1e-3 also
      lower at 5 and 21 spokes, for temporal and spatial ×2, in the demo and in the paper's acquisition
      setting; under the reference's ground-truth checkpoint pick the phantom's best PSNR is higher with them,
      its SSIM lower (README, Performance). Off is also ≈ 17 % faster and needs no second frame. The frozen
      random encoder passes the neighbours' streaks on. With the reference's uncapped grid, which fits noise,
      the features pay in PSNR (phantom; real cine at 8 coils), but every uncapped model is below the capped ones.
    * ``temporal_bandlimit`` (not in the reference): when the output has frames that were not fitted (temporal
      ×r), γ(t)'s bands above π over the fitted frames' spacing in t ∈ [0, 1] are zeroed (:meth:`max_t_freq`),
      in the fit and the query: between the fitted frames those bands are aliased.  Measured (64², 25 frames,
      every 4th fitted, 21 spokes, 8 coils, seeds 0, 1; PSNR dB / SSIM of the interpolated frames): without
      30.01 / 0.958, 30.63 / 0.961; with 34.50 / 0.976, 34.46 / 0.971 (fitted frames 35.38 → 35.51,
      35.78 → 35.56).  The paper's 23 frames at ×2 keep every band, so they are unchanged.
    * ``spatial_antiring`` (not in the reference): the spatial ×s output's magnitude is clamped to the range of
      the 4 fitted pixels around each output pixel, as image scalers' anti-ringing does; the fit has no data
      beyond its k-space band to support new extrema between its pixels.  Measured with features on,
      128² → fit 64², 13 spokes, PSNR dB / SSIM, model seeds 0, 1, 2, without → with: 27.75 / 0.888 →
      27.84 / 0.892, 27.88 / 0.885 → 27.98 / 0.892, 27.48 / 0.890 → 27.52 / 0.894 (bilinear upsampling of
      the same 64² fits: 26.46 / 0.886, 26.58 / 0.890, 26.36 / 0.890); real cine 110² → 56²: 26.20 / 0.836 →
      26.25 / 0.840 (bilinear 26.10 / 0.840).

    Options whose default is the reference behaviour (measured alternatives in the README):

    * ``dcf_power``: the reference's custom backward (ramp-DCF weighted adjoint, SENSE
      normalised) is the gradient of an L1 loss weighted by the DCF ``w``.  The gradient uses
      ``w ** dcf_power``: 1 reproduces the reference, 0 is the plain autograd adjoint.
    * ``canonical_coords``: the reference also feeds γ(x), γ(t) to the canonical MLP.
    * ``use_deformation``: ``False`` is the plain grid INR ablation (x' = x).
    * ``ema_decay``: render with an exponential moving average of the weights (0 = off).  The stopping rule
      still judges the live weights (their held-out residual comes free with the training pass; the
      average's would cost a forward pass per step); the average kept at the best epoch is returned.
    * ``temporal_offset``, ``temporal_frames``: temporal ×r places the acquired frames at output frames
      ``temporal_offset + i·r`` of ``temporal_frames`` (default: through the last acquired one).  The default
      offset 0 fits frames 0, r, 2r, … and renders none beyond them; the reference's protocol fits 1, 1 + r, …
      of all 23 frames (offset 1, 23 frames) and so also extrapolates frame 0 and, for ×2, frame 22.

    Runtime: ``device`` (``auto``: CUDA when available), ``progress`` (a tqdm bar), ``preview_every`` (steps
    between preview renders for the callback, 0 = none), ``check_memory`` (refuse a reconstruction whose
    estimated peak memory exceeds what the device has available, :mod:`dainr.memory`, instead of letting the
    kernel's OOM killer end it).
    """

    # --- encodings -------------------------------------------------------------------
    grid: GridConfig = field(default_factory=GridConfig)
    cap_grid_at_matrix: bool = True
    cap_grid_ratio: float = 0.75
    freq_degree_xy: int = 10
    freq_degree_t: int = 6
    # --- networks --------------------------------------------------------------------
    deform_width: int = 128
    deform_layers: int = 5
    canonical_width: int = 64
    use_deformation: bool = True
    use_features: bool = False
    canonical_coords: bool = True
    feature_channels: int = 64
    feature_seed: int = 0
    pixel_centred_features: bool = True
    # --- optimisation ----------------------------------------------------------------
    lr: float = 4e-3
    weight_decay: float = 0.01
    frames_per_step: Optional[int] = None
    max_steps: int = 3000
    max_seconds: Optional[float] = None
    holdout_spokes: int = 1
    patience: int = 3
    min_epoch_frames: int = 30
    min_improvement: float = 0.002
    ema_decay: float = 0.0
    lr_decay: float = 0.5
    max_decays: int = 3
    min_steps: int = 40
    dcf_power: float = 1.0
    seed: int = 0
    # --- physics ---------------------------------------------------------------------
    nufft_backend: Literal["auto", "gather", "torchkbnufft", "finufft"] = "auto"
    coil_map_kernel: int = 7
    data_scale: Literal["p99", "none"] = "p99"
    # --- interpolation ---------------------------------------------------------------
    spatial_ratio: float = 1.0
    spatial_antiring: bool = True
    temporal_ratio: int = 1
    temporal_offset: int = 0
    temporal_frames: Optional[int] = None
    temporal_bandlimit: bool = True
    # --- runtime ---------------------------------------------------------------------
    device: str = "auto"
    progress: bool = False
    preview_every: int = 0
    check_memory: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.grid, dict):
            self.grid = GridConfig(**self.grid)
        if not isinstance(self.grid, GridConfig):
            raise ValueError(f"invalid DAINRConfig: grid must be a GridConfig or a dict, got {self.grid!r}")
        for owner in (self, self.grid):  # numpy scalars (np.int64, np.float32) as Python numbers
            for f in dataclasses.fields(owner):
                value = getattr(owner, f.name)
                if "int" in f.type and isinstance(value, numbers.Integral) and not isinstance(value, bool):
                    setattr(owner, f.name, int(value))
                elif (f.name == "temporal_ratio" and isinstance(value, numbers.Real) and not isinstance(value, bool)
                      and math.isfinite(value) and int(value) == value):  # 2.0 (a ratio written as a float) is 2
                    setattr(owner, f.name, int(value))
                elif "float" in f.type and isinstance(value, numbers.Real) and not isinstance(value, bool):
                    setattr(owner, f.name, float(value))
        self.validate()

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"invalid DAINRConfig: {msg}")

        for owner in (self, self.grid):
            for f in dataclasses.fields(owner):
                value = getattr(owner, f.name)
                if f.type == "bool":
                    need(isinstance(value, bool), f"{f.name} must be True or False, got {value!r}")
                if f.type == "int" or (f.type == "Optional[int]" and value is not None):
                    need(isinstance(value, numbers.Integral) and not isinstance(value, bool),
                         f"{f.name} must be an integer, got {value!r}")
                if f.type == "float" or (f.type == "Optional[float]" and value is not None):
                    need(isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value),
                         f"{f.name} must be a finite number, got {value!r}")
        need(0 <= self.seed < 2 ** 63 - 1, "seed must be in [0, 2**63 - 1) (seed + 1 seeds the held-out spokes)")
        need(0 <= self.feature_seed < 2 ** 63, "feature_seed must be in [0, 2**63)")
        need(min(self.deform_width, self.canonical_width, self.feature_channels, self.grid.features_per_level) >= 1,
             "network widths, feature_channels and grid features_per_level must be >= 1")
        need(0 <= min(self.freq_degree_xy, self.freq_degree_t) and max(self.freq_degree_xy, self.freq_degree_t) <= 24,
             "frequency encoding degrees must be in [0, 24] (frequencies up to 2^(degree-1); a float32 coordinate "
             "carries 24 bits, so higher ones are rounding noise)")
        need(self.frames_per_step is None or self.frames_per_step >= 1, "frames_per_step must be >= 1 (or None = auto)")
        need(0 <= self.ema_decay < 1, "ema_decay must be in [0, 1)")
        need(0 < self.lr_decay <= 1 and self.max_decays >= 0, "lr_decay must be in (0, 1] and max_decays >= 0")
        need(self.max_steps >= 1, "max_steps must be >= 1")
        need(self.holdout_spokes >= 0, "holdout_spokes must be >= 0")
        need(self.patience >= 1, "patience must be >= 1")
        need(self.min_steps >= 0, "min_steps must be >= 0")
        need(self.preview_every >= 0, "preview_every must be >= 0 (0: no previews)")
        need(self.min_epoch_frames >= 1, "min_epoch_frames must be >= 1")
        need(0 <= self.min_improvement < 1, "min_improvement must be in [0, 1)")
        need(self.lr > 0, "lr must be finite and > 0")
        need(self.weight_decay >= 0, "weight_decay must be >= 0")
        need(self.grid.init_std > 0, "grid init_std must be > 0")
        need(self.spatial_ratio >= 1.0, "spatial_ratio must be >= 1 (fit low-res, query the full grid)")
        need(self.temporal_ratio >= 1, "temporal_ratio must be an integer >= 1")
        need(self.temporal_offset >= 0 and (self.temporal_frames is None or self.temporal_frames >= 1),
             "temporal_offset must be >= 0 and temporal_frames >= 1 (or None)")
        need(self.deform_layers >= 2, "deform_layers must be >= 2")
        need(self.grid.num_levels >= 1 and self.grid.base_resolution >= 2, "grid levels/base resolution")
        need(1 <= self.grid.log2_table_size <= 30, "grid log2_table_size must be in [1, 30]")
        need(self.grid.finest_resolution >= self.grid.base_resolution, "finest_resolution < base_resolution")
        need(0 < self.cap_grid_ratio <= 1, "cap_grid_ratio must be in (0, 1]")
        need(0.0 <= self.dcf_power <= 2.0, "dcf_power must be in [0, 2]")
        need(self.nufft_backend in NUFFT_BACKENDS, f"unknown nufft_backend {self.nufft_backend!r}")
        need(self.grid.backend in ("auto", "torch", "tcnn"), f"unknown grid backend {self.grid.backend!r}")
        need(self.max_seconds is None or self.max_seconds > 0, "max_seconds must be > 0")
        need(self.data_scale in ("p99", "none"), f"unknown data_scale {self.data_scale!r}")
        need(self.coil_map_kernel >= 1 and self.coil_map_kernel % 2 == 1, "coil_map_kernel must be odd and >= 1")

    def replace(self, **changes) -> "DAINRConfig":
        """A copy with ``changes`` applied; nested grid fields as ``grid_<name>=...``."""
        grid_changes = {k[5:]: changes.pop(k) for k in list(changes) if k.startswith("grid_")}
        grid = changes.pop("grid", self.grid)
        if isinstance(grid, dict):
            grid = GridConfig(**grid)
        if isinstance(grid, GridConfig):
            grid = dataclasses.replace(grid, **grid_changes)  # a copy: the copy's grid is its own
        elif grid_changes:
            raise ValueError(f"invalid DAINRConfig: grid must be a GridConfig or a dict, got {grid!r}")
        return dataclasses.replace(self, grid=grid, **changes)

    def to_dict(self) -> dict:
        """Every field (the grid's as a nested dict): ``DAINRConfig(**cfg.to_dict()) == cfg``."""
        return dataclasses.asdict(self)

    def changes(self) -> dict:
        """The fields that differ from the defaults, the grid's as ``grid_<name>``:
        ``DAINRConfig().replace(**cfg.changes()) == cfg``."""
        return changed_fields(self.to_dict())

    def fit_matrix(self, matrix: int) -> int:
        """The matrix the network is fitted at: ``matrix``, or for spatial ×s ``int(matrix / s)`` rounded up to even
        (the reference's rule)."""
        if self.spatial_ratio <= 1:
            return matrix
        m = int(matrix / self.spatial_ratio)
        m += m % 2
        if m < 8:
            raise ValueError(f"spatial_ratio {self.spatial_ratio:g} fits a {matrix}² scan at {m}², below the smallest "
                             "matrix (8)")
        return m

    def temporal_layout(self, n_acquired: int) -> Tuple[List[int], int]:
        """The acquired frames' positions among the output frames (``temporal_offset + i·temporal_ratio``) and the
        number of output frames (``temporal_frames``, default through the last acquired one)."""
        acquired = [self.temporal_offset + i * self.temporal_ratio for i in range(n_acquired)]
        n_out = self.temporal_frames or acquired[-1] + 1
        if n_out <= acquired[-1]:
            raise ValueError(f"temporal_frames {n_out} ends before the last acquired frame (output frame "
                             f"{acquired[-1]}: offset {self.temporal_offset} + ({n_acquired} − 1) × "
                             f"{self.temporal_ratio})")
        return acquired, n_out

    def max_t_freq(self, n_acquired: int) -> Optional[float]:
        """``temporal_bandlimit``: the highest γ(t) frequency the fitted frames sample (π over their spacing in
        t ∈ [0, 1]) when the output has frames that were not fitted; None (every band) otherwise."""
        n_out = self.temporal_layout(n_acquired)[1]
        if not self.temporal_bandlimit or n_out == n_acquired or n_acquired < 2:
            return None
        return math.pi * (n_out - 1) / self.temporal_ratio

    def model_config(self, fit_matrix: int) -> "DAINRConfig":
        """The configuration the network is built with for a fit at ``fit_matrix``: ``cap_grid_at_matrix`` caps the
        grid's finest level at the fitting matrix."""
        cap = max(round(self.cap_grid_ratio * fit_matrix), self.grid.base_resolution)
        if not self.cap_grid_at_matrix or self.grid.finest_resolution <= cap:
            return self
        return self.replace(grid_finest_resolution=cap)

    def batch_frames(self, device_type: str) -> int:
        """Frames per optimisation step: ``frames_per_step`` or the device-dependent default."""
        if self.frames_per_step is not None:
            return self.frames_per_step
        return 4 if device_type == "cuda" else 1


def changed_fields(fields: dict) -> dict:
    """The entries of a :meth:`DAINRConfig.to_dict` (also one of another version, with fields this one lacks: they
    are kept) that differ from the defaults, the grid's as ``grid_<name>``."""
    def flat(d: dict) -> dict:
        grid = d.get("grid")
        return {**{f"grid_{k}": v for k, v in (grid.items() if isinstance(grid, dict) else ())},
                **{k: v for k, v in d.items() if k != "grid"}}

    default, missing = flat(DAINRConfig().to_dict()), object()
    return {k: v for k, v in flat(fields).items() if default.get(k, missing) != v}
