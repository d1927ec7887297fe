import numpy as np
import pytest
import torch

from dainr.metrics import psnr_ssim


def test_psnr_normalises_each_frame_by_its_own_range():
    """The paper's protocol with the reference's bug fixed: each frame's magnitude mapped to [0, 1] by its own
    minimum and maximum, PSNR with data range 1, the mean over frames (found by a mutation review: dividing by the
    maximum only, the reference's bug, passed every test; on frames in [1, 2] it reads 28.75 instead of 24.22 dB)."""
    rng = np.random.default_rng(0)
    truth = 1 + rng.uniform(size=(3, 16, 16))
    truth[:, 0, :2] = 1, 2  # each frame spans exactly [1, 2]
    noisy = truth + 0.05 * rng.standard_normal(truth.shape)
    recon = torch.from_numpy(noisy * np.exp(0.3j))  # complex: its magnitude is compared

    def unit(x):
        lo, hi = x.min(axis=(1, 2), keepdims=True), x.max(axis=(1, 2), keepdims=True)
        return (x - lo) / (hi - lo)
    psnr = 10 * np.log10(1 / ((unit(noisy) - unit(truth)) ** 2).mean(axis=(1, 2)))
    out = psnr_ssim(recon, truth)
    assert out["psnr_frames"] == pytest.approx(psnr) and out["psnr"] == pytest.approx(psnr.mean())
    # a gain and an offset per frame change neither metric
    gain, offset = np.array([3.0, 0.5, 7.0])[:, None, None], np.array([5.0, 0.1, 2.0])[:, None, None]
    moved = psnr_ssim(gain * noisy + offset, 10 * truth - 4)
    assert moved["psnr"] == pytest.approx(out["psnr"]) and moved["ssim"] == pytest.approx(out["ssim"])
    assert 0.5 < out["ssim"] < 1
