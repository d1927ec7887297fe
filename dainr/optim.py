"""AdamW without ``torch.optim``.

``torch.optim``'s optimizers import ``torch._dynamo`` on first use (``Optimizer.add_param_group`` is wrapped in
``torch._disable_dynamo``): about 800 modules (sympy, mpmath, ...) and 1.8 s on this project's 2-core CPU, in
every fresh process — a ``dainr recon``, a gadget, a first reconstruction on a cold GPU machine.  The fit needs
none of it.  :class:`AdamW` runs the kernel ``torch.optim.AdamW(fused=True)`` runs (``torch._fused_adamw_``,
CPU and CUDA) on the same state, so its updates are bit for bit the same.
"""
from __future__ import annotations

from typing import Iterable

import torch


class AdamW:
    """AdamW (decoupled weight decay, no AMSGrad) over float parameters on one CPU or CUDA device."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float,
                 betas=(0.9, 0.999), eps: float = 1e-8):
        self.params = [p for p in params if p.requires_grad]
        devices = {p.device for p in self.params}
        if len(devices) > 1 or any(d.type not in ("cpu", "cuda") for d in devices) or \
                not all(p.is_floating_point() for p in self.params):
            dtypes = sorted({str(p.dtype) for p in self.params})
            raise ValueError(f"AdamW needs float parameters on one CPU or CUDA device, got {dtypes} on "
                             f"{sorted(map(str, devices))}")
        self.lr, self.weight_decay, self.betas, self.eps = lr, weight_decay, tuple(betas), eps
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        self.steps = [torch.zeros((), dtype=torch.float32, device=p.device) for p in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        idx = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not idx:
            return
        steps = [self.steps[i] for i in idx]
        torch._foreach_add_(steps, 1)
        torch._fused_adamw_([self.params[i] for i in idx], [self.params[i].grad for i in idx],
                            [self.exp_avg[i] for i in idx], [self.exp_avg_sq[i] for i in idx], [], steps,
                            amsgrad=False, lr=self.lr, beta1=self.betas[0], beta2=self.betas[1],
                            weight_decay=self.weight_decay, eps=self.eps, maximize=False)
