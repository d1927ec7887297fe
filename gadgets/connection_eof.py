"""gadgetron-python's ``Connection.SocketWrapper.read`` loops on ``recv`` forever once the peer has closed
the socket (``recv`` returns ``b""`` at end of stream): a gadget whose Gadgetron went away without CLOSE
(an aborted scan, a port probe of a resident gadget) spins at 100 % CPU and never ends.
:func:`raise_on_eof` makes that read raise :class:`ConnectionResetError` instead; the gadget process ends
(execute mode) or returns to waiting for the next scan (``<connect>`` mode, :mod:`gadgets.resident`)."""
from __future__ import annotations

import socket
import warnings


def _read(self, nbytes: int) -> bytes:
    data = b""
    while len(data) < nbytes:
        chunk = self.socket.recv(nbytes - len(data), socket.MSG_WAITALL)
        if not chunk:
            raise ConnectionResetError(f"Gadgetron closed the connection ({len(data)} of {nbytes} bytes read)")
        data += chunk
    return data


def raise_on_eof() -> None:
    """Patch gadgetron-python's socket reader (idempotent); a no-op without gadgetron-python."""
    try:
        with warnings.catch_warnings():  # gadgetron imports ismrmrd, which resets the filters (dainr_app._ismrmrd)
            from gadgetron.external.connection import Connection
    except ImportError:
        return
    Connection.SocketWrapper.read = _read
