"""Small runtime helpers: device choice, seeded layer initialisation, optional-dependency probes."""
from __future__ import annotations

import contextlib
import functools
import threading
from typing import Iterator

import torch

_RNG_LOCK = threading.RLock()


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


@contextlib.contextmanager
def seeded(seed: int, device: torch.device = torch.device("cpu")) -> Iterator[None]:
    """Torch's global generators (the CPU's, and ``device``'s when it is CUDA) as if just seeded with ``seed``,
    for the layers that initialise themselves from them (``nn.Linear``, ``nn.Conv2d``); the caller's generator
    states are restored afterwards.  One process-wide lock: fits started in threads at once would otherwise
    draw from each other's streams (the same seed gave different weights)."""
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with _RNG_LOCK, torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(seed)
        for index in cuda:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


@functools.lru_cache(maxsize=None)
def finufft_available() -> bool:
    try:
        import finufft  # noqa: F401
    except ImportError:
        return False
    return True
