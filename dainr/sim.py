"""Simulated golden-angle radial cine: analytic cardiac phantom, smooth coil maps, correlated noise.

The phantom is a short-axis-like torso: subcutaneous fat, lungs with vessels, a beating left
ventricle (blood pool, thickening myocardium, papillary muscles), right ventricle, aorta,
spine and liver with a slower respiratory drift, smooth intensity texture and smooth phase.
Shapes are rasterised with 4× supersampling (partial-volume edges).  k-space is simulated
"retrospectively" with the NUFFT of the coil images on the reconstruction grid, as the paper does, plus complex
Gaussian noise with a coil covariance.  That is an inverse crime: the data are exactly what the reconstruction's
own operator makes of an N × N image, which flatters every method, and not equally (README, Performance:
model-based methods gain more than zero-filled gridding).  ``object_supersample=s`` simulates without it: the
phantom is transformed on a grid s times finer (with finer coil maps), and the ground truth is its s × s block mean.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .data import RadialData, is_count
from .nufft import MulticoilNUFFT
from .trajectory import golden_angle_trajectory, omega_from_traj
from .utils import library_defaults


def _ellipse(xx, yy, cx, cy, ax, ay, angle=0.0):
    c, s = math.cos(angle), math.sin(angle)
    u = (xx - cx) * c + (yy - cy) * s
    v = -(xx - cx) * s + (yy - cy) * c
    return (u / ax) ** 2 + (v / ay) ** 2 <= 1.0


def _smooth_field(n: int, rng: np.random.Generator, n_terms: int = 6, max_freq: float = 2.5) -> np.ndarray:
    ys, xs = np.meshgrid(np.linspace(-1, 1, n), np.linspace(-1, 1, n), indexing="ij")
    out = np.zeros((n, n))
    for _ in range(n_terms):
        fx, fy = rng.uniform(-max_freq, max_freq, 2)
        out += rng.normal() * np.cos(math.pi * (fx * xs + fy * ys) + rng.uniform(0, 2 * math.pi))
    return out / math.sqrt(n_terms)


def cardiac_phantom(n: int = 128, n_frames: int = 23, seed: int = 0, supersample: int = 4) -> np.ndarray:
    """(frames, n, n) complex64 cine; one cardiac cycle over the frames, respiration at 1/3 the rate."""
    rng = np.random.default_rng(seed)
    m = n * supersample
    ys, xs = np.meshgrid(np.linspace(-1, 1, m), np.linspace(-1, 1, m), indexing="ij")
    texture = 1.0 + 0.08 * _smooth_field(n, rng, 8, 4.0)
    phase = 0.6 * _smooth_field(n, rng, 4, 1.0)
    vessels = [(rng.uniform(-0.6, -0.3), rng.uniform(-0.35, 0.25)) for _ in range(5)]
    vessels += [(rng.uniform(0.3, 0.6), rng.uniform(-0.35, 0.25)) for _ in range(5)]
    frames = []
    for f in range(n_frames):
        ph = 2 * math.pi * f / n_frames
        c = 0.5 * (1 - math.cos(ph)) ** 1.2 / (2 ** 0.2)  # contraction 0 (diastole) .. 1 (systole)
        resp = 0.04 * math.sin(2 * math.pi * f / (3 * n_frames) + 0.5)
        img = np.zeros((m, m))
        img[_ellipse(xs, ys, 0, 0.05, 0.9, 0.7)] = 0.75  # subcutaneous fat
        img[_ellipse(xs, ys, 0, 0.05, 0.83, 0.63)] = 0.32  # muscle/soft tissue
        for sx in (-1, 1):  # lungs
            img[_ellipse(xs, ys, sx * 0.43, -0.08 + resp, 0.27, 0.4, sx * 0.15)] = 0.04
        for vx, vy in vessels:
            img[_ellipse(xs, ys, vx, vy + resp, 0.018, 0.018)] = 0.22
        img[_ellipse(xs, ys, 0.05, 0.62 + resp, 0.55, 0.2)] = 0.45  # liver dome
        img[_ellipse(xs, ys, 0.0, 0.58, 0.1, 0.09)] = 0.55  # vertebral body
        img[_ellipse(xs, ys, 0.0, 0.7, 0.035, 0.03)] = 0.9  # spinal canal (CSF)
        img[_ellipse(xs, ys, 0.17, 0.42, 0.055, 0.055)] = 0.95  # descending aorta
        # heart: centre moves slightly with contraction and respiration
        hx, hy = 0.02 - 0.015 * c, 0.02 + 0.5 * resp
        ro, ri = 0.27 * (1 - 0.1 * c), 0.17 * (1 - 0.4 * c)
        rv_ax, rv_ay = 0.2 * (1 - 0.3 * c), 0.13 * (1 - 0.2 * c)
        img[_ellipse(xs, ys, hx - 0.27, hy - 0.05, rv_ax + 0.035, rv_ay + 0.035, 0.4)] = 0.3  # RV wall
        img[_ellipse(xs, ys, hx - 0.27, hy - 0.05, rv_ax, rv_ay, 0.4)] = 0.85  # RV blood
        img[_ellipse(xs, ys, hx, hy, ro, ro * 0.95)] = 0.3  # LV myocardium
        img[_ellipse(xs, ys, hx, hy, ri, ri * 0.92)] = 1.0  # LV blood pool
        for ang in (2.3, 3.6):  # papillary muscles move with the wall
            rr = ri * 0.72
            img[_ellipse(xs, ys, hx + rr * math.cos(ang), hy + rr * math.sin(ang), 0.035 * (1 + 0.3 * c), 0.03)] = 0.3
        low = img.reshape(n, supersample, n, supersample).mean(axis=(1, 3))
        frames.append(low * texture * np.exp(1j * phase))
    return np.asarray(frames, dtype=np.complex64)


def coil_maps(n: int, n_coils: int, seed: int = 0) -> np.ndarray:
    """(C, n, n) smooth complex coil maps around the body, normalised to unit root-sum-of-squares."""
    rng = np.random.default_rng(seed + 1000)
    ys, xs = np.meshgrid(np.linspace(-1, 1, n), np.linspace(-1, 1, n), indexing="ij")
    maps = []
    for c in range(n_coils):
        a = 2 * math.pi * c / n_coils + rng.uniform(-0.2, 0.2)
        px, py = 1.2 * math.cos(a), 1.0 * math.sin(a)
        mag = np.exp(-((xs - px) ** 2 + (ys - py) ** 2) / (2 * 0.75 ** 2))
        ph = rng.uniform(0, 2 * math.pi) + 0.8 * ((xs - px) * math.cos(a + 1) + (ys - py) * math.sin(a + 1))
        maps.append(mag * np.exp(1j * ph))
    maps = np.asarray(maps)
    return (maps / np.sqrt((np.abs(maps) ** 2).sum(0, keepdims=True))).astype(np.complex64)


def noise_covariance(n_coils: int, seed: int = 0, correlation: float = 0.25) -> np.ndarray:
    """A Hermitian positive-definite coil noise covariance with off-diagonal correlation and unequal gains."""
    rng = np.random.default_rng(seed + 2000)
    a = np.eye(n_coils) + correlation * (rng.normal(size=(n_coils, n_coils)) + 1j * rng.normal(size=(n_coils, n_coils))) / math.sqrt(2 * n_coils)
    a = a * rng.uniform(0.8, 1.25, size=(n_coils, 1))
    return (a @ a.conj().T).astype(np.complex64)


@dataclass
class SimulatedScan:
    data: RadialData
    ground_truth: np.ndarray  # (F, N, N) complex
    coil_maps: np.ndarray  # (C, N, N)
    noise_covariance: np.ndarray  # (C, C)
    noise_std: float


@library_defaults
def simulate(matrix: int = 64, frames: int = 12, spokes: int = 13, coils: int = 4, noise_level: float = 0.02,
             golden_angle: str = "true", seed: int = 0, n_noise_samples: int = 1024, readout_oversampling: int = 2,
             image: Optional[np.ndarray] = None, object_supersample: int = 1) -> SimulatedScan:
    """Simulate a golden-angle radial multi-coil cine.

    ``noise_level`` is the noise standard deviation relative to the RMS of the noiseless
    k-space.  ``image`` (F, N, N) replaces the phantom (e.g. real anatomy for benchmarks).
    ``object_supersample`` s > 1: the k-space of the phantom on an (sN)² grid (coil maps there too), each sample
    the sum over the fine pixels at their positions on the N-grid; the ground truth is the fine image's s × s block
    mean (the N-grid's pixels).  1: the phantom's N × N image through the reconstruction's own operator.
    """
    need = dict(spokes=(spokes, 1), coils=(coils, 1), readout_oversampling=(readout_oversampling, 1),
                n_noise_samples=(n_noise_samples, 0), object_supersample=(object_supersample, 1))
    if image is None:
        need.update(matrix=(matrix, 8), frames=(frames, 1))
    bad = [f"{name}={value!r} (need an integer >= {least})" for name, (value, least) in need.items()
           if not is_count(value, least)]
    if bad:
        raise ValueError(f"simulate: {'; '.join(bad)}")
    if not math.isfinite(noise_level) or noise_level < 0:
        raise ValueError(f"simulate: noise_level must be finite and >= 0, got {noise_level}")
    if 0 < n_noise_samples < 2 * coils:  # (what the prewhitener needs to estimate the covariance)
        raise ValueError(f"simulate: n_noise_samples={n_noise_samples}: a noise scan needs at least 2 x coils = "
                         f"{2 * coils} samples (0: none)")
    sup = object_supersample
    if sup > 1 and image is not None:
        raise ValueError("simulate: object_supersample needs the phantom (a given image has no finer grid)")
    if image is None:  # (rasterised at 4 × the matrix either way: 4 // sup within each fine pixel)
        image = cardiac_phantom(matrix * sup, frames, seed, supersample=max(1, 4 // sup))
    image = np.asarray(image, dtype=np.complex64)
    frames, fine = image.shape[0], image.shape[-1]
    if image.shape != (frames, fine, fine):
        raise ValueError(f"image must be (frames, N, N), got {image.shape}")
    matrix = fine // sup
    maps = coil_maps(matrix, coils, seed)
    n_samples = readout_oversampling * matrix
    traj = golden_angle_trajectory(frames, spokes, n_samples, golden_angle)
    op = MulticoilNUFFT(torch.from_numpy(coil_maps(fine, coils, seed) if sup > 1 else maps), backend="auto", eps=1e-6)
    # cycles per fine pixel; the fine grid's centre pixel sits `shift` N-grid pixels from where the N-grid puts it
    omega = omega_from_traj(traj.reshape(frames, spokes * n_samples, 2) / sup)
    with torch.no_grad():
        k = torch.cat([op.forward(torch.from_numpy(image[i:i + 8]), omega[i:i + 8]) for i in range(0, frames, 8)])
    k = k.reshape(frames, coils, spokes, n_samples).numpy()
    if sup > 1:  # fine pixel j at ((j − (sup − 1)/2)/sup − N//2) N-grid pixels: its block's centre
        shift = (fine // 2) / sup - (sup - 1) / (2 * sup) - matrix // 2
        k = k * (np.exp(-2j * np.pi * shift * traj.sum(-1).numpy())[:, None] / sup ** 2)
        image = image.reshape(frames, matrix, sup, matrix, sup).mean(axis=(2, 4))
    psi = noise_covariance(coils, seed)
    L = np.linalg.cholesky(psi.astype(np.complex128))
    rms = float(np.sqrt(np.mean(np.abs(k) ** 2)))
    std = noise_level * rms
    rng = np.random.default_rng(seed + 3000)

    def noise(shape):
        w = (rng.normal(size=(coils,) + shape) + 1j * rng.normal(size=(coils,) + shape)) / math.sqrt(2)
        return std * np.tensordot(L, w, axes=(1, 0))

    k = k + noise((frames, spokes, n_samples)).transpose(1, 0, 2, 3)
    noise_scan = torch.from_numpy(noise((n_noise_samples,)).astype(np.complex64)) if std > 0 and n_noise_samples else None
    data = RadialData(torch.from_numpy(k.astype(np.complex64)), traj, matrix, noise=noise_scan)
    return SimulatedScan(data, image, maps, psi, std)
