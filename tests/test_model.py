import pytest
import torch

from dainr.config import DAINRConfig
from dainr.features import FrozenFeatureExtractor, neighbour_frames, normalise_for_extractor, sample_features
from dainr.model import DAINR, pixel_grid


def test_model_shapes_and_parameter_count():
    cfg = DAINRConfig(use_features=True)  # the reference's model
    m = DAINR(cfg)
    xy = pixel_grid(8, 8).expand(3, -1, -1)
    out = m(xy, torch.tensor([0.0, 0.5, 1.0]), torch.randn(3, 64, 128))
    assert out.shape == (3, 64) and out.is_complex()
    mlp = sum(p.numel() for n, p in m.named_parameters() if not n.startswith("grid"))
    assert mlp == 82_624  # the digest's count of MLP weights (bias-free)
    assert all(l.bias is None for l in m.modules() if isinstance(l, torch.nn.Linear))
    assert m.sigma_net[0].in_features == 32 + 42 + 13 + 128
    assert DAINR(DAINRConfig()).sigma_net[0].in_features == 32 + 42 + 13  # features off by default


def test_grid_cap_stops_the_finest_level_below_the_fitting_matrix():
    cfg = DAINRConfig()
    assert cfg.grid.finest_resolution == 2048  # the reference's value stays the configured one
    assert cfg.model_config(128).grid.finest_resolution == 96  # cap_grid_ratio 0.75
    assert cfg.model_config(110).grid.finest_resolution == 82
    assert cfg.replace(cap_grid_ratio=1.0).model_config(128).grid.finest_resolution == 128
    assert cfg.model_config(8).grid.finest_resolution == 16  # never below the base resolution
    with pytest.raises(ValueError, match="cap_grid_ratio"):
        cfg.replace(cap_grid_ratio=0)
    assert cfg.replace(cap_grid_at_matrix=False).model_config(128).grid.finest_resolution == 2048  # the reference
    assert cfg.replace(grid_finest_resolution=64).model_config(128).grid.finest_resolution == 64
    from dainr.config import GridConfig  # a whole grid, as DAINRConfig(grid=...) takes it (raised a TypeError)
    assert cfg.replace(grid=GridConfig(num_levels=8)).grid.num_levels == 8
    assert cfg.replace(grid=dict(num_levels=8), grid_base_resolution=8).grid == GridConfig(num_levels=8,
                                                                                           base_resolution=8)
    given = GridConfig()
    assert cfg.replace(lr=0.1).grid is not cfg.grid and cfg.replace(grid=given).grid is not given  # copies
    with pytest.raises(ValueError, match="grid must be a GridConfig or a dict, got None"):
        cfg.replace(grid=None, grid_num_levels=4)
    changed = cfg.replace(seed=3, lr=2e-3, grid_finest_resolution=512)  # what the images record, and back
    assert changed.changes() == {"grid_finest_resolution": 512, "lr": 2e-3, "seed": 3} and cfg.changes() == {}
    assert DAINRConfig().replace(**changed.changes()) == changed == DAINRConfig(**changed.to_dict())
    capped, ref = (sum(p.numel() for p in DAINR(c.model_config(128)).grid.parameters())
                   for c in (cfg, cfg.replace(cap_grid_at_matrix=False)))
    assert capped < 200_000 < 5_000_000 < ref


def test_the_deformation_moves_the_grid_coordinate():
    """x' = x + Ψ_t(γ(x), γ(t)) is where the grid is read, and Δ depends on t (found by a mutation review: with Δ
    computed but not added, every test passed)."""
    torch.manual_seed(0)
    m = DAINR(DAINRConfig(cap_grid_ratio=1.0).model_config(16))
    xy, t = pixel_grid(16, 16)[None].expand(2, -1, -1), torch.tensor([0.2, 0.7])
    with torch.no_grad():
        for p in m.grid.parameters():  # a grid that varies (at initialisation it is ~1e-4 everywhere)
            p.normal_()
        coords = torch.cat((m.enc_x(xy), m.enc_t(t.reshape(2, 1, 1)).expand(2, 256, -1)), dim=-1)
        delta = m.deform(coords)
        assert torch.equal(m.deformation(xy, t), (xy + delta) - xy)
        assert (delta[0] - delta[1]).abs().max() > 1e-3  # a different shift at each time
        out = m(xy, t)
        assert torch.allclose(out, m.canonical(xy + delta, coords, None), rtol=0, atol=1e-6)
        assert (out - m.canonical(xy, coords, None)).abs().max() > 1e-2 * out.abs().max()


def test_feature_extractor_is_a_head_and_two_residual_blocks():
    """(a residual block without its skip connection passed every test: a mutation review)"""
    ext = FrozenFeatureExtractor(channels=8, seed=3)
    mag = torch.rand(2, 12, 12) * 2 - 1
    x = ext.head(mag[:, None].expand(-1, 3, -1, -1))
    for block in ext.blocks:
        x = x + block.body(x)
    assert torch.allclose(ext(mag), x, atol=1e-6)
    assert [tuple(c.kernel_size) for c in ext.modules() if isinstance(c, torch.nn.Conv2d)] == [(3, 3)] + [(5, 5)] * 4


def test_ablation_variants():
    plain = DAINR(DAINRConfig(use_features=False, use_deformation=False))
    xy = pixel_grid(4, 4)[None]
    assert plain.deform is None and torch.all(plain.deformation(xy, torch.zeros(1)) == 0)
    assert plain(xy, torch.zeros(1)).shape == (1, 16)
    assert plain.sigma_net[0].in_features == 32 + 42 + 13


def test_feature_extractor_frozen_and_seeded():
    a, b = FrozenFeatureExtractor(seed=0), FrozenFeatureExtractor(seed=0)
    assert not any(p.requires_grad for p in a.parameters())
    x = torch.rand(2, 16, 16) * 2 - 1
    fa = a(x)
    assert fa.shape == (2, 64, 16, 16) and torch.equal(fa, b(x))
    assert not torch.equal(fa, FrozenFeatureExtractor(seed=1)(x))
    torch.manual_seed(123)
    r1 = torch.rand(1)
    torch.manual_seed(123)
    FrozenFeatureExtractor(seed=0)
    assert torch.equal(r1, torch.rand(1))  # building it does not disturb the global RNG stream


def test_neighbour_rule():
    nb = neighbour_frames(range(5), range(5))  # t-1 / t+1, single neighbour duplicated at the ends
    assert nb.tolist() == [[1, 1], [0, 2], [1, 3], [2, 4], [3, 3]]
    nb2 = neighbour_frames([0, 2, 4], range(5))  # temporal x2: nearest acquired before/after
    assert nb2.tolist() == [[1, 1], [0, 1], [0, 2], [1, 2], [1, 1]]


def test_extractor_input_normalisation_is_per_frame():
    """As the released code prepares them: every frame spans [-1, 1], a dim frame as much as a bright one."""
    z = torch.randn(3, 8, 8, dtype=torch.complex64) * torch.tensor([1.0, 0.5, 3.0])[:, None, None]
    n = normalise_for_extractor(z)
    assert torch.equal(n.amin((1, 2)), -torch.ones(3)) and torch.equal(n.amax((1, 2)), torch.ones(3))
    assert torch.allclose(n[1], normalise_for_extractor(z[1:2] * 2)[0])  # a frame's scale does not matter
    assert torch.allclose(n[1], normalise_for_extractor(z[1:2] * 1e-15)[0], atol=1e-5)  # (a 1e-12 floor flattened it)
    assert torch.equal(normalise_for_extractor(torch.ones(1, 4, 4, dtype=torch.complex64)), -torch.ones(1, 4, 4))


def test_extractor_weights_are_drawn_in_mdsrs_order():
    """MDSR draws its two 1×1 MeanShift convs before the head."""
    torch.manual_seed(0)
    nn = torch.nn
    nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)
    head = nn.Conv2d(3, 64, 3, padding=1)
    blocks = [nn.Conv2d(64, 64, 5, padding=2) for _ in range(4)]  # two residual blocks of two convs
    ours = FrozenFeatureExtractor(seed=0).state_dict()  # weights and biases, as PyTorch's layers draw them
    theirs = [head] + blocks
    assert len(ours) == 2 * len(theirs)
    assert all(torch.equal(a, b) for a, b in zip(ours.values(), [t for c in theirs for t in (c.weight, c.bias)]))


def test_reference_feature_sampling_is_grid_sample_at_linspace_whatever_the_size():
    """``pixel_centred_features=False`` reproduces the reference: grid_sample(align_corners=False) at
    linspace(-1, 1, N), on the fitting grid and on a finer output grid alike (an edge sample blends with zero)."""
    maps = torch.rand(2, 3, 8, 8)
    for n in (8, 16):
        got = sample_features(maps, (n, n), pixel_centred=False)
        u = torch.linspace(-1, 1, n)
        # by hand: pixel j of an 8-pixel map sits at (2j + 1) / 8 - 1; bilinear weights, zero outside
        pos = (u + 1) * 8 / 2 - 0.5
        lo = pos.floor().long()
        frac = pos - lo
        W = torch.zeros(n, 8)
        for i in range(n):
            for j, w in ((lo[i], 1 - frac[i]), (lo[i] + 1, frac[i])):
                if 0 <= j < 8:
                    W[i, j] += w
        expected = torch.einsum("yj,bcjk,xk->byxc", W, maps, W)
        assert torch.allclose(got, expected, atol=1e-5), n
