"""Small runtime helpers: device choice, optional-dependency probes."""
from __future__ import annotations

import contextlib
import functools

import torch


def library_defaults(fn):
    """Run ``fn`` with torch's default device the CPU and autocast off, as the package's code assumes (tensors for
    the fit's device are placed there explicitly; the network is float32 and the physics complex): a caller's
    ``torch.set_default_device("cuda")`` put CPU-generator draws on CUDA and host-side bookkeeping on the device,
    and a caller's ``torch.autocast`` failed the fit (bfloat16 matmuls against float32 ones; no complex float16).
    ``cfg.device`` says where a reconstruction runs."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with contextlib.ExitStack() as modes:
            if torch.get_default_device().type != "cpu":
                modes.enter_context(torch.device("cpu"))
            for kind in ("cpu", "cuda"):
                if torch.is_autocast_enabled(kind):
                    modes.enter_context(torch.autocast(kind, enabled=False))
            return fn(*args, **kwargs)
    return wrapper


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` → CUDA when available, else CPU.  Anything else is passed to ``torch.device``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device {device!r} is not a device: use 'auto', 'cpu', 'cuda' or 'cuda:N'") from exc
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: DA-INR runs on 'cpu' or 'cuda' ('auto' picks one)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use 'cpu' or 'auto'")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


@functools.lru_cache(maxsize=None)
def finufft_available() -> bool:
    try:
        import finufft  # noqa: F401
    except ImportError:
        return False
    return True
