"""A resident gadget process for ``<connect port=.../>`` pipelines: Gadgetron connects to it per scan.

Imports, the torch runtime and (on a GPU) the CUDA context stay warm across scans; each connection
is handled by :func:`gadgets.dainr_gadget.dainr_recon` exactly as in execute mode.
"""
from __future__ import annotations

import logging
from typing import Optional

log = logging.getLogger("dainr.gadget")


def serve(port: int, connections: Optional[int] = None) -> None:
    """Accept Gadgetron connections on ``port`` one after another (``connections``: stop after that many)."""
    import socket

    import torch
    from gadgetron.external import listen

    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:  # the address listen() binds
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", port))
        except OSError as exc:
            raise ValueError(f"cannot listen on port {port}: {exc}") from exc

    from .dainr_gadget import dainr_recon

    if torch.cuda.is_available():
        torch.zeros(1, device="cuda")  # create the CUDA context once, before the first scan
    served = 0
    while connections is None or served < connections:
        log.info("DA-INR gadget waiting for Gadgetron on port %d", port)
        try:
            listen(port, dainr_recon)
        except Exception:  # a broken scan must not take the resident process down
            log.exception("connection failed")
        served += 1
