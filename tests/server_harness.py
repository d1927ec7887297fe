"""An embedded server on a free port in a background thread, and a raw-socket client that can send anything."""
from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import List

from dainr_app.protocol import CLOSE, ERROR, HEADER, Frame, ProtocolError, StreamEnded, encode, read_frame, text_frame
from dainr_app.server import Server, ServerOptions

SMALL = ('<configuration><version>2</version><stream><external>'
         '<execute name="gadgets.dainr_gadget" target="dainr_recon" type="python"/>'
         '<configuration><property name="steps" value="{steps}"/>{extra}</configuration>'
         '</external></stream></configuration>')


def stream(config, header: str, items, close: bool = True) -> bytes:
    """A whole client stream as bytes: config, header, the items, and CLOSE (unless ``close=False``)."""
    parts = [encode(config), text_frame(HEADER, header).raw] + [encode(i) for i in items]
    return b"".join(parts) + (Frame.of(CLOSE).raw if close else b"")


def small_pipeline(steps: int = 5, **props) -> str:
    """A DA-INR pipeline XML with few steps (and extra properties) for fast tests."""
    extra = "".join(f'<property name="{k}" value="{v}"/>' for k, v in props.items())
    return SMALL.format(steps=steps, extra=extra)


@contextlib.contextmanager
def running_server(**options):
    server = Server(ServerOptions(port=0, **options))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stopping.set()
        thread.join(30)


def raw_session(port: int, data: bytes, timeout: float = 120.0, close: str = "half") -> List[Frame]:
    """Send ``data`` as is, then half-close (or fully close); return every frame the server sends back."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    frames: List[Frame] = []

    def send():
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    if close == "full":
        sender.join()
        sock.close()
        return frames
    with sock, sock.makefile("rb") as rf:
        try:
            while True:
                frame = read_frame(rf.read)
                frames.append(frame)
                if frame.mid == CLOSE:
                    break
        except (StreamEnded, ProtocolError, ConnectionError):
            pass
    sender.join(timeout)
    return frames


def errors(frames: List[Frame]) -> List[str]:
    return [f.text() for f in frames if f.mid == ERROR]


def wait_until(condition, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()
