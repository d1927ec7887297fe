import numpy as np
import pytest
import torch

from dainr.coils import apply_prewhitener, noise_prewhitener, walsh_coil_maps
from dainr.config import DAINRConfig
from dainr.recon import Problem
from dainr.sim import coil_maps, noise_covariance, simulate


def test_walsh_recovers_known_maps_from_radial_data():
    scan = simulate(matrix=48, frames=8, spokes=24, coils=6, noise_level=0.005, seed=3)
    cfg = DAINRConfig(use_features=False, holdout_spokes=0)
    est = Problem(scan.data, cfg, None, torch.device("cpu")).op.smaps.numpy()
    true = scan.coil_maps
    # the maps are defined up to a per-pixel common phase: compare |<s_est, s_true>| over coils
    corr = np.abs((est.conj() * true).sum(0)) / (np.linalg.norm(est, axis=0) * np.linalg.norm(true, axis=0))
    obj = np.abs(scan.ground_truth).mean(0) > 0.15 * np.abs(scan.ground_truth).max()
    assert corr[obj].mean() > 0.98
    assert np.allclose(np.linalg.norm(est, axis=0), 1, atol=1e-4)  # unit norm over coils


def test_walsh_on_exact_coil_images():
    maps = coil_maps(32, 4, seed=0)
    img = np.ones((32, 32), dtype=np.complex64)
    est = walsh_coil_maps(torch.from_numpy(maps * img), kernel=5).numpy()
    corr = np.abs((est.conj() * maps).sum(0))
    assert corr.min() > 0.995 and corr.mean() > 0.999


def test_prewhitener_whitens_correlated_noise():
    psi = noise_covariance(6, seed=2)
    L = np.linalg.cholesky(psi)
    rng = np.random.default_rng(0)
    n = L @ ((rng.normal(size=(6, 20000)) + 1j * rng.normal(size=(6, 20000))) / np.sqrt(2))
    W = noise_prewhitener(torch.from_numpy(n.astype(np.complex64)))
    white = apply_prewhitener(torch.from_numpy(n.astype(np.complex64))[None], W, coil_dim=1)[0].numpy()
    cov = white @ white.conj().T / white.shape[1]
    assert np.allclose(cov, np.eye(6), atol=0.05)


def test_prewhitener_rejects_bad_noise():
    with pytest.raises(ValueError, match="at least"):
        noise_prewhitener(torch.ones(4, 3, dtype=torch.complex64))
    bad = torch.randn(2, 100, dtype=torch.complex64)
    bad[0, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        noise_prewhitener(bad)
    dup = torch.randn(1, 100, dtype=torch.complex64).repeat(2, 1)  # two identical channels
    with pytest.raises(ValueError, match="positive definite"):
        noise_prewhitener(dup)
    dead = torch.randn(4, 100, dtype=torch.complex64)
    dead[2] *= 1e-5  # a channel with (almost) no noise: named, with what to do
    with pytest.raises(ValueError, match=r"coil\(s\) \[2\] carry \(almost\) no noise .* leave it out"):
        noise_prewhitener(dead)


def test_walsh_in_strips_equals_the_whole_image():
    """The covariance is built in strips of rows (bounded memory); the kernel's halo rows make every strip's
    smoothing see the same neighbourhoods as the whole image."""
    g = torch.Generator().manual_seed(0)
    x = torch.view_as_complex(torch.randn(4, 37, 29, 2, generator=g)).contiguous()
    whole = walsh_coil_maps(x, kernel=7, budget=1 << 30)
    for budget in (1, 4 * 4 * 29 * 3, 4 * 4 * 29 * 10 + 7):  # 1, 3 and 10 rows per strip
        assert torch.allclose(walsh_coil_maps(x, kernel=7, budget=budget), whole, atol=1e-6, rtol=0)


def test_power_iteration_maps_match_eigh_above_the_batched_eigh_limit():
    """On CUDA, above 32 coils cuSOLVER's eigh runs one call per pixel; the maps come from power iteration there."""
    maps = coil_maps(32, 40, seed=1)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[-1:1:32j, -1:1:32j]
    obj = (xx ** 2 + yy ** 2 < 0.6).astype(np.complex64) * (1 + 0.3 * xx)
    noise = 0.02 * (rng.standard_normal(maps.shape) + 1j * rng.standard_normal(maps.shape))
    coil_images = torch.from_numpy((maps * obj + noise).astype(np.complex64))
    eig = walsh_coil_maps(coil_images, power=False).numpy()
    power = walsh_coil_maps(coil_images, power=True).numpy()
    inside = np.abs(obj) > 0
    assert np.abs(power - eig).max(0)[inside].max() < 1e-3  # the same vectors, phase convention included
    assert np.allclose(np.linalg.norm(power, axis=0), 1, atol=1e-5)


def test_a_single_coil_scan_gets_a_map_of_ones_and_reconstructs_the_images_phase():
    """One receive channel (a body coil, or data combined on the scanner): no covariance to decompose, and its
    phase referenced to itself (the rule for more coils) leaves 1. The map was the zero-filled image's own phase:
    the images lost the object's phase and the fit 0.5-0.7 dB (32², seeds 1, 2, 300 steps), the map taking up
    the noisy background's phase."""
    from dainr import reconstruct, zero_filled
    from dainr.metrics import psnr_ssim

    image = torch.randn(1, 6, 5, dtype=torch.complex64)
    assert torch.equal(walsh_coil_maps(image), torch.ones(1, 6, 5, dtype=torch.complex64))
    scan = simulate(matrix=32, frames=8, spokes=13, coils=1, noise_level=0.02, seed=1)
    cfg = DAINRConfig(device="cpu", max_steps=150, progress=False)
    zf = psnr_ssim(zero_filled(scan.data, cfg).numpy(), scan.ground_truth)["psnr"]
    res = reconstruct(scan.data, cfg)
    gain = res.coil_maps.abs()  # in the data's coil space: the prewhitener's scale, the same at every pixel
    assert gain.shape == (1, 32, 32) and torch.allclose(gain, gain.mean().expand_as(gain), rtol=1e-4)
    assert psnr_ssim(res.images.numpy(), scan.ground_truth)["psnr"] > zf + 8
    truth = torch.from_numpy(scan.ground_truth)
    body = truth.abs() > 0.3 * truth.abs().max()
    # the object's phase (a smooth field spanning ~1 rad here) is the images', with the coil's own (one coil cannot
    # tell them apart), up to one constant
    offset = (res.images * (truth * torch.from_numpy(scan.coil_maps)).conj())[body]
    assert float((offset * offset.sum().conj()).angle().abs().quantile(0.9)) < 0.1
    assert float(truth[body].angle().std()) > 0.2
