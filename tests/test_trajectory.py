import math

import numpy as np
import pytest
import torch

from dainr.trajectory import angle_step, golden_angle_trajectory, omega_from_traj, ramp_dcf, readout_positions, spoke_angles


def _gaps_deg(n, mode):
    a = np.sort(np.mod(spoke_angles(torch.arange(n), mode).numpy(), math.pi))
    gaps = np.diff(np.concatenate([a, [a[0] + math.pi]]))
    return np.degrees(gaps.min()), np.degrees(gaps.max())


def test_true_golden_angle_step_is_180_over_phi():
    assert math.degrees(angle_step("true")) == pytest.approx(180 / ((1 + 5 ** 0.5) / 2), abs=1e-9)
    assert math.degrees(angle_step("true")) == pytest.approx(111.246, abs=1e-3)


def test_reference_step_is_111_246_radians():
    # the reference passes 111.246 to cos/sin as radians: 73.93 degrees mod 180
    assert math.degrees(angle_step("reference")) % 180 == pytest.approx(73.93, abs=0.01)


@pytest.mark.parametrize("mode,n,lo,hi", [("true", 13, 10.03, 16.23), ("true", 21, 6.20, 10.03),
                                          ("reference", 13, 9.63, 22.52), ("reference", 21, 3.25, 12.88)])
def test_angular_gaps_match_the_digest(mode, n, lo, hi):
    gmin, gmax = _gaps_deg(n, mode)
    assert gmin == pytest.approx(lo, abs=0.01) and gmax == pytest.approx(hi, abs=0.01)


def test_consecutive_frames_continue_one_sequence():
    t = golden_angle_trajectory(3, 5, 64)
    assert t.shape == (3, 5, 64, 2)
    ang = torch.atan2(t[..., -1, 1], t[..., -1, 0]).flatten()  # last sample points along +angle
    step = torch.remainder(ang[1:] - ang[:-1], 2 * math.pi)
    assert torch.allclose(step, torch.full_like(step, angle_step("true") % (2 * math.pi)), atol=1e-5)


def test_readout_in_cycles_per_pixel_and_centre_sample():
    r = readout_positions(128)
    assert r.min() == -0.5 and r.max() < 0.5 and r[64] == 0
    t = golden_angle_trajectory(2, 3, 128)
    assert float(torch.linalg.vector_norm(t, dim=-1).max()) <= 0.5 + 1e-6


def test_ramp_dcf_is_proportional_to_radius_with_nonzero_centre():
    t = golden_angle_trajectory(1, 2, 64)[0]
    w = ramp_dcf(t)
    k = torch.linalg.vector_norm(t, dim=-1)
    assert float(w.min()) > 0
    outer = k > 0.05
    assert torch.allclose(w[outer], k[outer] / 0.5, rtol=1e-5)
    first_ring = w[(k - 1 / 64).abs() < 1e-6]
    assert first_ring.numel() == 4 and torch.allclose(w[k == 0], first_ring[:2] / 4)  # DC: a quarter of ring 1


def _spokes(angles, positions):
    a = torch.as_tensor(angles, dtype=torch.float64)[:, None]
    return torch.stack((positions * torch.cos(a), positions * torch.sin(a)), dim=-1).float()


@pytest.mark.parametrize("n", [31, 64, 65, 256])
def test_ramp_dcf_centre_weight_follows_the_spokes_own_spacing(n):
    """The centre sample represents a disc of radius Δk/2 shared by the spokes: Δk/4 (ramp units) for spokes
    through the centre, Δk/8 for centre-out ones (each puts one sample, not two, on every ring). The rule
    0.25 / n took every spoke as a full one spanning ±0.5: centre-out readouts (Δk = 0.5/n) had their centre
    weighted 4×, and readouts spanning ±0.25 (scanner interpolation) 2×."""
    angles = torch.arange(5) * 2.4
    full = golden_angle_trajectory(1, 5, n)[0]
    rule = torch.clamp(torch.linalg.vector_norm(full, dim=-1), min=0.25 / n) / 0.5
    assert torch.equal(ramp_dcf(full), rule)  # the usual rule, bit for bit, odd and even n
    out = _spokes(angles, torch.arange(n, dtype=torch.float64) * (0.5 / n))
    assert torch.allclose(ramp_dcf(out)[:, 0], torch.full((5,), (0.5 / n) / 8 / 0.5))
    assert torch.allclose(ramp_dcf(out)[:, 1:], torch.linalg.vector_norm(out[:, 1:], dim=-1) / 0.5)
    assert torch.allclose(ramp_dcf(full / 2)[:, n // 2], torch.full((5,), (0.5 / n) / 4 / 0.5))
    # ramp sampling (wider steps on the outer eighth at each end): Δk is the steps' median, the centre's
    steps = torch.ones(n - 1, dtype=torch.float64)
    steps[: n // 8], steps[-(n // 8):] = 2.0, 2.0
    positions = torch.cat((torch.zeros(1, dtype=torch.float64), steps.cumsum(0)))
    ramped = _spokes(angles, (positions - positions[n // 2]) / n)
    assert torch.allclose(ramp_dcf(ramped)[:, n // 2], torch.full((5,), (1 / n) / 4 / 0.5))


def test_centre_out_readouts_grid_as_well_as_full_spokes():
    """Zero-filled images of the same object from full spokes and from twice as many centre-out half spokes
    (the same samples in all): equally close to it (normalised error 0.171 against 0.092 before)."""
    from dainr import DAINRConfig, RadialData
    from dainr.nufft import MulticoilNUFFT
    from dainr.recon import zero_filled
    from dainr.sim import cardiac_phantom, coil_maps

    n, spokes = 32, 80
    image, maps = torch.from_numpy(cardiac_phantom(n, 2)), torch.from_numpy(coil_maps(n, 4))
    op = MulticoilNUFFT(maps)
    step = math.radians(180 / ((1 + 5 ** 0.5) / 2))

    def error(traj):
        kdata = op.forward(image, omega_from_traj(traj.reshape(2, -1, 2))).reshape(2, 4, *traj.shape[1:3])
        zf = zero_filled(RadialData(kdata, traj, n), DAINRConfig(device="cpu"), coil_maps=maps)
        scale = (zf.conj() * image).sum() / (zf.abs() ** 2).sum()
        return float((scale * zf - image).norm() / image.norm())
    full = _spokes(torch.arange(2 * spokes) * step, (torch.arange(2 * n, dtype=torch.float64) - n) / (2 * n))
    out = _spokes(torch.arange(4 * spokes) * 2 * step, torch.arange(n, dtype=torch.float64) / (2 * n))
    e_full, e_out = error(full.reshape(2, spokes, 2 * n, 2)), error(out.reshape(2, 2 * spokes, n, 2))
    assert e_full < 0.12 and e_out < e_full + 0.02, (e_full, e_out)


def test_omega_orders_rows_then_columns():
    traj = torch.tensor([[[0.25, -0.125]]])  # kx, ky
    om = omega_from_traj(traj)
    assert om.shape == (1, 2, 1)
    assert om[0, 0, 0] == pytest.approx(2 * math.pi * -0.125) and om[0, 1, 0] == pytest.approx(2 * math.pi * 0.25)
