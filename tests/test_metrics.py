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


def test_metrics_edge_cases_are_clear(recwarn):
    """Identical frames scored inf with one numpy warning per frame; one 2-D image was refused as if its shape
    differed ("(32, 32) and (32, 32) must be ... the same shape"); frames under 7 x 7 got skimage's win_size error."""
    x = np.random.default_rng(0).uniform(size=(3, 16, 16))
    assert psnr_ssim(x, x)["psnr"] == np.inf and psnr_ssim(x, x)["ssim"] == pytest.approx(1)
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
    with pytest.raises(ValueError, match=r"got 2-d \(16, 16\) \(one image: give x\[None\]\)"):
        psnr_ssim(x[0], x[0])
    for h, w in ((5, 6), (6, 6), (7, 6)):
        with pytest.raises(ValueError, match=f"frames of {h} x {w} pixels: SSIM's 7 x 7 window"):
            psnr_ssim(x[:, :h, :w], x[:, :h, :w])
    with pytest.raises(ValueError, match="must be frames of the same shape"):
        psnr_ssim(x, x[:2])
    for scale in (1e-13, 1e-200):  # a floor of 1e-12 on the range flattened them: 12 dB against themselves
        assert psnr_ssim(x * scale, x)["psnr"] > 100 and psnr_ssim(x * scale, x)["ssim"] == pytest.approx(1)
    assert psnr_ssim(np.zeros_like(x), x)["psnr"] < 10  # a constant frame is all 0
    broken = x.copy()
    broken[1, 3, 3] = np.nan  # a frame with a NaN scores NaN, not as a black frame
    assert np.isnan(psnr_ssim(broken, x)["psnr_frames"][1]) and not np.isnan(psnr_ssim(broken, x)["psnr_frames"][0])
