"""Plays Gadgetron's side of the external-Python-gadget protocol, exactly as Gadgetron launches one.

Opens a port, spawns ``python -m gadgetron PORT MODULE TARGET``, sends CONFIG (the ``<configuration>``
block), HEADER and the acquisitions with ismrmrd's ``ProtocolSerializer`` on a sender thread, and reads
images / pass-through items / ERROR messages back until CLOSE.  As Gadgetron's ``ExternalChannel`` does, the
gadget's first ERROR closes its input: the items not sent by then never reach it (``GadgetRun.sent`` counts
those that did).
"""
from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import List

from ismrmrd.serialization import ConfigText, ProtocolSerializer

from dainr_app.protocol import ACQUISITION, CLOSE, ERROR, IMAGE, read_frame
from dainr_app.server import child_env


@dataclass
class GadgetRun:
    images: List = field(default_factory=list)
    passthrough: List = field(default_factory=list)
    errors: List[str] = field(default_factory=list)
    kinds: List[str] = field(default_factory=list)  # "image", "acquisition", "error": every reply in arrival order
    sent: int = 0  # items sent before CLOSE
    returncode: int = None
    log: str = ""

    def errors_come_last(self) -> bool:
        """Every ERROR arrived after every other reply (it closes the gadget's input in Gadgetron)."""
        return "error" not in self.kinds or self.kinds[self.kinds.index("error"):] == ["error"] * len(self.errors)


def run_gadget(config_xml: str, header, items, module: str = "gadgets.dainr_gadget", target: str = "dainr_recon",
               timeout: float = 300.0) -> GadgetRun:
    """Execute mode: open a port, spawn ``python -m gadgetron PORT MODULE TARGET``, exchange, wait for exit."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(60)
    port = server.getsockname()[1]
    with tempfile.TemporaryFile("w+") as out:  # a file, not a pipe: a chatty gadget can never block on it
        proc = subprocess.Popen([sys.executable, "-m", "gadgetron", str(port), module, target], env=child_env(),
                                stdout=out, stderr=subprocess.STDOUT, text=True)
        try:
            conn, _ = server.accept()
            run = exchange(conn, config_xml, header, items, timeout)
            run.returncode = proc.wait(timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            server.close()
            out.seek(0)
            log = out.read()
    run.log = log
    return run


def failing_dainr_recon(connection) -> None:
    """The DA-INR gadget with a bug in its slice reconstruction (a RuntimeError), run as a gadget target."""
    from gadgets import dainr_gadget

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")
    dainr_gadget.reconstruct_slice = broken
    dainr_gadget.dainr_recon(connection)


def dial(port: int) -> socket.socket:
    """A connection to a resident gadget process on ``port`` (retrying while it starts)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return socket.create_connection(("localhost", port), timeout=5)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def connect_gadget(port: int, config_xml: str, header, items, timeout: float = 300.0, pause: float = 0.0) -> GadgetRun:
    """Connect mode: Gadgetron connects to a resident gadget process on ``port``."""
    return exchange(dial(port), config_xml, header, items, timeout, pause)


def exchange(conn: socket.socket, config_xml: str, header, items, timeout: float, pause: float = 0.0) -> GadgetRun:
    """Send CONFIG, HEADER, items and CLOSE on a thread (``pause`` seconds between the HEADER and the items) while
    reading replies until CLOSE."""
    conn.settimeout(timeout)
    run = GadgetRun()
    closed = threading.Event()  # set at the gadget's first ERROR

    def send():
        with conn.makefile("wb") as wf:
            ser = ProtocolSerializer(wf)
            ser.serialize(ConfigText(config_xml))
            ser.serialize(header)
            if pause:
                wf.flush()
                time.sleep(pause)
            for item in items:
                if closed.is_set():
                    break
                ser.serialize(item)
                run.sent += 1
            ser.close()

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    with conn.makefile("rb") as rf:
        while True:
            frame = read_frame(rf.read)
            if frame.mid == CLOSE:
                break
            if frame.mid == ERROR:
                closed.set()
                run.errors.append(frame.text())
                run.kinds.append("error")
            elif frame.mid == IMAGE:
                run.images.append(frame.decode())
                run.kinds.append("image")
            elif frame.mid == ACQUISITION:
                run.passthrough.append(frame.decode())
                run.kinds.append("acquisition")
            else:
                raise AssertionError(f"unexpected message {frame.name}")
    sender.join(timeout)
    conn.close()
    return run
