"""A resident gadget process for ``<connect port=.../>`` pipelines: Gadgetron connects to it per scan.

Imports, the torch runtime and (on a GPU) the CUDA context stay warm across scans; each connection
is handled by :func:`gadgets.dainr_gadget.dainr_recon` exactly as in execute mode.
"""
from __future__ import annotations

import logging
from typing import Optional

log = logging.getLogger("dainr.gadget")


def serve(port: int, connections: Optional[int] = None) -> None:
    """Accept Gadgetron connections on ``port`` one after another (``connections``: stop after that many).

    One listening socket for the life of the process (gadgetron-python's ``listen()`` binds a new one per
    connection and leaves the old one to the garbage collector, so a connection arriving between two scans
    was refused or reset)."""
    import socket

    import torch
    from gadgetron.external.connection import Connection

    from .dainr_gadget import dainr_recon  # its import makes a closed connection raise (connection_eof)
    server = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)  # dual stack: IPv4 clients too
    try:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("", port))
        server.listen(8)
    except OSError as exc:
        server.close()
        raise ValueError(f"cannot listen on port {port}: {exc}") from exc
    if torch.cuda.is_available():
        torch.zeros(1, device="cuda")  # create the CUDA context once, before the first scan
    with server:
        served = 0
        while connections is None or served < connections:
            log.info("DA-INR gadget waiting for Gadgetron on port %d", port)
            sock, address = server.accept()
            served += 1
            log.info("connection %d from %s", served, address[0])
            try:
                with sock, Connection(sock) as conn:
                    dainr_recon(conn)
            except Exception:  # a broken scan must not take the resident process down
                log.exception("connection failed")
