"""A resident gadget process for ``<connect port=.../>`` pipelines: Gadgetron connects to it per scan.

Imports, the torch runtime and (on a GPU) the CUDA context stay warm across scans; each connection
is handled by :func:`gadgets.dainr_gadget.dainr_recon` exactly as in execute mode.
"""
from __future__ import annotations

import logging
import socket
import time
from typing import Optional

from dainr_app.protocol import Limits

log = logging.getLogger("dainr.gadget")


# CONFIG (file name or text) and HEADER together, with their framing: ``dainr serve``'s two limits summed
START_BYTES = Limits().max_text + Limits().max_header + 64


class _StartTimeout:
    """The socket as gadgetron-python's ``Connection`` sees it: its ``settimeout(None)`` is ignored, and until
    :meth:`started` every read shares one deadline and one byte budget, so a peer that connects and stalls (a port
    probe left open, a lost host), sends a byte now and then (each read would wait anew), or claims a huge CONFIG
    or HEADER is closed instead of blocking every later scan (the limits of ``dainr serve``)."""

    def __init__(self, sock, seconds: float, budget: int):
        self._sock = sock
        self._deadline: Optional[float] = time.monotonic() + seconds
        self._budget = self._limit = budget

    def started(self) -> None:
        self._deadline = None
        self._sock.settimeout(None)  # a scan's fit may keep it quiet for long

    def settimeout(self, value) -> None:
        pass

    def recv(self, n: int, *flags):
        if self._deadline is None:
            return self._sock.recv(n, *flags)
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("CONFIG and HEADER not received in time")
        if n > self._budget:
            raise _TooLarge(f"a CONFIG and HEADER of more than {self._limit} bytes")
        self._sock.settimeout(left)
        data = self._sock.recv(n, *flags)
        self._budget -= len(data)
        return data

    def __getattr__(self, name):
        return getattr(self._sock, name)


class _TooLarge(ValueError):
    pass


def _refuse(sock, text: str) -> None:
    """ERROR and CLOSE to a connection whose gadget never started (Gadgetron shows the ERROR to its client;
    without it the client saw only a reset connection)."""
    from dainr_app.protocol import CLOSE, Frame, error_frame

    try:
        sock.sendall(error_frame(text).raw + Frame.of(CLOSE).raw)
    except OSError:
        pass


def serve(port: int, connections: Optional[int] = None, start_timeout: float = 60.0, host: str = "") -> None:
    """Accept Gadgetron connections on ``port`` (0: a free one, logged) one after another (``connections``: stop
    after that many); a connection that has not sent its CONFIG and HEADER within ``start_timeout`` seconds is
    closed.  ``host``: the address to listen on ('': every interface, IPv4 and IPv6, as gadgetron-python's
    ``listen()``, for a Gadgetron on another host; '127.0.0.1' for one on this host only).

    One listening socket for the life of the process (gadgetron-python's ``listen()`` binds a new one per
    connection and leaves the old one to the garbage collector, so a connection arriving between two scans
    was refused or reset). TCP keepalive ends a scan whose host is lost without a FIN or RST (within about 2
    minutes)."""
    import torch
    from gadgetron.external.connection import Connection

    from .dainr_gadget import dainr_recon  # its import makes a closed connection raise (connection_eof)
    # '': dual stack, IPv4 clients too
    server = socket.socket(socket.AF_INET6 if host == "" or ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind((host, port))
        server.listen(8)
        address, port = server.getsockname()[:2]
    except OSError as exc:
        server.close()
        raise ValueError(f"cannot listen on port {port}{f' of {host}' if host else ''}: {exc}") from exc
    if torch.cuda.is_available():
        torch.zeros(1, device="cuda")  # create the CUDA context once, before the first scan
    with server:
        served = 0
        while connections is None or served < connections:
            log.info("DA-INR gadget waiting for Gadgetron on port %d (address %s)", port, address)
            sock, address = server.accept()
            served += 1
            log.info("connection %d from %s", served, address[0])
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            for option, value in (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 6)):  # ~2 min, not 2 h
                if hasattr(socket, option):
                    sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
            try:
                with sock:
                    try:
                        wrapped = _StartTimeout(sock, start_timeout, START_BYTES)
                        conn = Connection(wrapped)
                    except (OSError, _TooLarge):  # (logged below: nothing to answer, or too much to read)
                        raise
                    except Exception as exc:  # its CONFIG or HEADER does not parse
                        _refuse(sock, f"DA-INR gadget-server: the connection's CONFIG or HEADER cannot be read: "
                                      f"{type(exc).__name__}: {exc}")
                        raise
                    wrapped.started()
                    with conn:
                        dainr_recon(conn)
            except socket.timeout:
                log.warning("connection %d from %s sent no CONFIG and HEADER in %g s; closed", served, address[0],
                            start_timeout)
            except _TooLarge as exc:
                log.warning("connection %d from %s sent %s; closed", served, address[0], exc)
            except ConnectionError as exc:  # Gadgetron went away mid-scan (the gadget logged where)
                log.warning("connection %d from %s ended without CLOSE: %s", served, address[0], exc)
            except Exception:  # a broken scan must not take the resident process down
                log.exception("connection failed")
