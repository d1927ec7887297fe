import math

import pytest
import torch

from dainr.config import GridConfig
from dainr.encodings import FrequencyEncoding, TorchGridEncoding, _level_geometry, make_grid_encoding, tcnn_available


def test_frequency_encoding_layout_and_values():
    enc = FrequencyEncoding(2, 3)
    x = torch.tensor([[0.3, -0.7]])
    out = enc(x)[0]
    assert enc.out_dim == 14 and out.shape == (14,)
    expected = [0.3, -0.7]
    for k in range(3):  # torch-ngp order: per frequency, the D sines then the D cosines; no pi factor
        expected += [math.sin(2 ** k * 0.3), math.sin(2 ** k * -0.7), math.cos(2 ** k * 0.3), math.cos(2 ** k * -0.7)]
    assert torch.allclose(out, torch.tensor(expected), atol=1e-6)


def test_frequency_encoding_band_limit_zeroes_only_the_bands_above_it():
    x = torch.linspace(0, 1, 11)[:, None]
    full, limited = FrequencyEncoding(1, 6)(x), FrequencyEncoding(1, 6, max_freq=6.3)(x)  # keeps 1, 2, 4
    assert limited.shape == full.shape and FrequencyEncoding(1, 6, max_freq=6.3).kept == 3
    assert torch.equal(limited[:, :7], full[:, :7]) and not limited[:, 7:].any()
    assert torch.equal(FrequencyEncoding(1, 6, max_freq=100.0)(x), full)  # every band kept: the same bits


def test_reference_encoding_sizes():
    assert FrequencyEncoding(2, 10).out_dim == 42 and FrequencyEncoding(1, 6).out_dim == 13


def test_frequency_gradient():
    x = torch.tensor([[0.2, 0.1]], requires_grad=True)
    FrequencyEncoding(2, 2)(x)[0, 2].backward()  # sin(x0)
    assert x.grad[0, 0] == pytest.approx(math.cos(0.2), abs=1e-6) and x.grad[0, 1] == 0


def test_reference_grid_geometry():
    cfg = GridConfig()
    geo = _level_geometry(cfg, "ngp")
    res = [g["res"] for g in geo]
    assert res == [16, 23, 31, 43, 59, 81, 112, 154, 213, 295, 407, 562, 777, 1073, 1483, 2048]
    assert cfg.per_level_scale == pytest.approx(1.3819, abs=1e-4)
    assert [g["size"] == 2 ** 19 for g in geo] == [False] * 12 + [True] * 4  # four wrapped (tiled) levels
    assert sum(g["size"] for g in geo) == 2_764_976  # the digest's hand count of grid entries


def test_grid_interpolates_a_linear_table_exactly():
    cfg = GridConfig(num_levels=1, base_resolution=16, finest_resolution=16)
    enc = TorchGridEncoding(cfg)
    stride = enc.strides[0].item()
    j, i = torch.meshgrid(torch.arange(stride), torch.arange(stride), indexing="ij")
    with torch.no_grad():
        enc.table[: stride * stride].copy_(torch.stack((i.flatten(), j.flatten()), dim=1).float())
    x = torch.rand(500, 2) * 2 - 1
    u = (x + 1) / 2
    expected = u * enc.scales[0] + 0.5  # bilinear interpolation of a linear function is exact
    assert torch.allclose(enc(x), expected, atol=1e-4)


def test_grid_output_range_zero_outside_and_gradients():
    enc = TorchGridEncoding(GridConfig(num_levels=4, finest_resolution=64))
    x = torch.tensor([[0.1, -0.2], [1.5, 0.0], [0.0, -1.01]], requires_grad=True)
    out = enc(x)
    assert out.shape == (3, 8)
    assert float(out[0].detach().abs().max()) <= 1e-4 + 1e-7  # |features| <= init range
    assert torch.all(out[1:] == 0)  # torch-ngp: inputs outside [-1, 1] give zero features ...
    out.sum().backward()
    assert torch.all(x.grad[1:] == 0) and torch.isfinite(x.grad).all()  # ... and zero gradient
    assert enc.table.grad is not None and float(enc.table.grad.abs().sum()) > 0


def test_grid_input_gradient_matches_finite_difference():
    torch.manual_seed(0)
    enc = TorchGridEncoding(GridConfig(num_levels=3, finest_resolution=40, init_std=1.0)).double()
    x = torch.tensor([[0.123, -0.456]], dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64)
    (enc(x).double() @ w).backward()
    eps = 1e-6
    for d in range(2):
        xp, xm = x.detach().clone(), x.detach().clone()
        xp[0, d] += eps
        xm[0, d] -= eps
        fd = ((enc(xp).double() @ w) - (enc(xm).double() @ w)) / (2 * eps)
        assert x.grad[0, d].item() == pytest.approx(fd.item(), rel=1e-3)


@pytest.mark.parametrize("cfg, dense", [
    (GridConfig(num_levels=16, finest_resolution=96, init_std=1.0), 16),  # the default grid capped at 0.75 × 128
    (GridConfig(num_levels=6, finest_resolution=300, log2_table_size=14, init_std=1.0), 4),  # two levels wrap
])
def test_dense_levels_sampled_like_the_gathered_corners(cfg, dense):
    """The grid_sample path of the dense levels is the same function as gathering their corners: values,
    the table's gradient and the input's gradient, including points outside [-1, 1]."""
    torch.manual_seed(0)
    fast = TorchGridEncoding(cfg).double()
    slow = TorchGridEncoding(cfg).double()
    with torch.no_grad():
        slow.table.copy_(fast.table)
    slow.n_dense = 0  # every level through the gather path
    assert fast.n_dense == dense
    x0 = torch.cat((torch.rand(3000, 2, dtype=torch.float64) * 2 - 1, torch.tensor([[1.2, 0.0], [-0.3, -1.5]],
                    dtype=torch.float64)))
    go = torch.randn(len(x0), cfg.out_dim, dtype=torch.float64)
    outs = []
    for enc in (fast, slow):
        x = x0.clone().requires_grad_(True)
        out = enc(x)
        (out * go).sum().backward()
        outs.append((out.detach(), enc.table.grad, x.grad))
    for a, b in zip(*outs):
        assert torch.allclose(a, b, atol=1e-9, rtol=1e-7)
    assert torch.all(outs[0][0][-2:] == 0) and torch.all(outs[0][2][-2:] == 0)


def test_auto_backend_is_torch_on_cpu():
    assert isinstance(make_grid_encoding(GridConfig(), torch.device("cpu")), TorchGridEncoding)
    with pytest.raises(RuntimeError, match="tcnn"):
        make_grid_encoding(GridConfig(backend="tcnn"), torch.device("cpu"))


def test_the_fits_generator_seeds_tiny_cuda_nn(monkeypatch):
    """tcnn initialises its table itself, from the seed it is given (1337 unless told): the seed comes from the
    fit's generator, so the fit's seed decides the grid's initial values on that backend too (a stand-in module:
    tinycudann is CUDA only)."""
    import sys
    import types

    seeds = []

    class Encoding(torch.nn.Module):
        def __init__(self, n_input_dims, encoding_config, seed=1337, dtype=None):
            super().__init__()
            seeds.append(seed)

    monkeypatch.setitem(sys.modules, "tinycudann", types.SimpleNamespace(Encoding=Encoding))
    monkeypatch.setattr("dainr.encodings.tcnn_available", lambda: True)

    def tcnn_seed(fit_seed):
        make_grid_encoding(GridConfig(backend="tcnn"), torch.device("cuda"), torch.Generator().manual_seed(fit_seed))
        return seeds[-1]

    state = torch.random.get_rng_state()
    assert tcnn_seed(0) == tcnn_seed(0) != tcnn_seed(1) and all(isinstance(s, int) and 0 <= s < 2 ** 32 for s in seeds)
    assert torch.equal(torch.random.get_rng_state(), state)  # drawn from the fit's generator, not torch's


@pytest.mark.skipif(not tcnn_available(), reason="tinycudann with CUDA not available")
def test_tcnn_and_torch_backends_agree():
    from dainr.encodings import TcnnGridEncoding

    cfg = GridConfig(backend="tcnn")
    tc = TcnnGridEncoding(cfg).cuda()
    ref = TorchGridEncoding(cfg, layout="tcnn").cuda()
    params = tc.encoding.params.detach().float()
    assert params.numel() == ref.table.numel(), "tcnn parameter count differs from the torch tcnn layout"
    with torch.no_grad():
        ref.table.copy_(params.reshape(ref.table.shape))
    x = (torch.rand(4096, 2, device="cuda") * 2 - 1).requires_grad_(True)
    a, b = tc(x), ref(x)
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    g = torch.randn_like(a)
    ga = torch.autograd.grad((a * g).sum(), tc.encoding.params)[0].reshape(ref.table.shape)
    gb = torch.autograd.grad((b * g).sum(), ref.table)[0]
    assert torch.allclose(ga.float(), gb, atol=1e-4, rtol=1e-3)


def test_every_corner_index_stays_in_its_levels_table():
    """The reference grid's levels finer than the table wrap (a mutation review: leaving the first of them unwrapped
    read the next level's rows, and every test passed)."""
    enc = TorchGridEncoding(GridConfig())  # finest level 2048, table 2^19: the finer levels wrap
    k = enc.n_dense
    assert k < len(enc.scales) and enc.first_wrapped < len(enc.scales)
    pos = torch.rand(20000, 1, 2, generator=torch.Generator().manual_seed(0)) * enc.scales[None, k:, None] + 0.5
    idx = enc._corner_index(torch.floor(pos).long(), k)
    lo = enc.offsets[k:, None]
    assert ((idx >= lo) & (idx < lo + enc.sizes[k:, None])).all()


def test_tcnn_layout_hashes_like_tiny_cuda_nn():
    """tiny-cuda-nn's 2D fast_hash: x · 1 XOR y · 2654435761 (uint32), modulo the level's size (pinned here
    because the agreement test with tinycudann itself cannot run without it)."""
    enc = TorchGridEncoding(GridConfig(), layout="tcnn")
    level = int(enc.hashed.nonzero()[0])
    base = torch.tensor([[[5, 7]], [[1000, 3]], [[123456, 654321]]]).expand(3, len(enc.scales) - level, 2)
    corner = enc._corner_index(base, level)[:, 0, 0]  # the first hashed level, corner (x, y)
    x, y = base[:, 0, 0], base[:, 0, 1]
    expected = torch.bitwise_xor(x, (y * 2654435761) & 0xFFFFFFFF) % enc.sizes[level] + enc.offsets[level]
    assert torch.equal(corner, expected)


def test_auto_resolves_to_tcnn_only_on_cuda_where_it_imports(monkeypatch):
    from dainr import encodings
    from dainr.encodings import grid_backend

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(encodings, "tcnn_available", lambda: True)
    assert grid_backend(GridConfig(), cuda) == "tcnn" and grid_backend(GridConfig(), cpu) == "torch"
    assert grid_backend(GridConfig(backend="torch"), cuda) == "torch"
    assert grid_backend(GridConfig(backend="tcnn"), cpu) == "tcnn"  # (make_grid_encoding refuses it there)
    monkeypatch.setattr(encodings, "tcnn_available", lambda: False)
    assert grid_backend(GridConfig(), cuda) == "torch"
