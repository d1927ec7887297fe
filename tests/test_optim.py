import subprocess
import sys

import pytest
import torch

from dainr import DAINRConfig
from dainr.model import DAINR, pixel_grid
from dainr.optim import AdamW


def _grads(model, seed):
    gen, dev = torch.Generator().manual_seed(seed), next(model.parameters()).device
    xy = pixel_grid(8, 8)[None].expand(2, -1, -1)
    t = torch.rand(2, generator=gen)
    feats = torch.randn(2, 64, 2 * model.cfg.feature_channels, generator=gen)
    model(xy.to(dev), t.to(dev), feats.to(dev)).abs().sum().backward()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_adamw_is_bit_for_bit_torch_fused_adamw(device):
    """Same kernel, same state: identical weights after steps with a learning-rate change in between."""
    cfg = DAINRConfig(grid={"finest_resolution": 16, "log2_table_size": 10, "backend": "torch"})
    ours, ref = DAINR(cfg, torch.device(device)), DAINR(cfg, torch.device(device))
    ref.load_state_dict(ours.state_dict())
    initial = [p.detach().clone() for p in ours.parameters()]
    opt = AdamW(ours.parameters(), lr=1e-3, weight_decay=0.01)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.01, fused=True)
    for step in range(6):
        if step == 3:
            opt.lr *= 0.5
            opt_ref.param_groups[0]["lr"] *= 0.5
        for model, o in ((ours, opt), (ref, opt_ref)):
            o.zero_grad()
            _grads(model, step)
            o.step()
    for a, b in zip(ours.parameters(), ref.parameters()):
        assert torch.equal(a, b)
    assert all(not torch.equal(a, b) for a, b in zip(ours.parameters(), initial))  # every parameter was stepped


def test_a_fit_does_not_import_torch_dynamo():
    """torch.optim would import torch._dynamo (~800 modules, ~2 s) in every fresh process."""
    code = ("import sys, torch; from dainr import DAINRConfig, reconstruct; from dainr.sim import simulate; "
            "s = simulate(16, 3, 5, 2, noise_level=0.0); reconstruct(s.data, DAINRConfig(device='cpu', max_steps=3)); "
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_adamw_rejects_what_the_fused_kernel_cannot_take():
    with pytest.raises(ValueError, match="float parameters.*complex64"):
        AdamW([torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))], lr=1e-3, weight_decay=0.01)
