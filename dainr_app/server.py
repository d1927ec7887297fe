"""Embedded Gadgetron-protocol server (``dainr serve``): runs our v2 XML pipelines without a Gadgetron install.

One client connection = one session: CONFIG_FILE (1, a name inside the pipelines folder) or CONFIG_TEXT (2),
HEADER (3), data messages, CLOSE (4).  Before the HEADER a client may send QUERY (6) messages, answered with
RESPONSE (7) as Gadgetron does (:func:`query_answers`); a CLOSE instead of a configuration ends a query-only
session.  ``<external><execute>`` gadgets are launched the way Gadgetron
launches them (a child process that connects back to a port and runs ``gadgetron``'s own ``Connection``),
``<connect>`` gadgets are dialled, ``<distributed>`` blocks send their inner stream to worker servers
(``GADGETRON_REMOTE_WORKER_COMMAND``, as in Gadgetron) or run it locally.  Messages are relayed as raw,
length-checked frames; every stage has its own sender thread and a byte-bounded queue, so a gadget busy
reconstructing one slice never stalls the client's stream (up to ``buffer_bytes`` per session).
Failures reach the client as ERROR (8) with the reason; the session still returns what was received.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

from .mrd import MRDFormatError, parse_header
from .pipeline import PIPELINES_DIR, Distributed, External, Pipeline, PipelineError, Policy, available, \
    load_named, parse_pipeline, parse_xml
from .protocol import ACQUISITION, CLOSE, CONFIG_FILE, CONFIG_TEXT, DATA_IDS, ERROR, HEADER, NOISE_BIT, QUERY, TEXT, \
    Frame, FrameReader, FrameWriter, Limits, ProtocolError, SocketSink, StreamEnded, config_text, read_frame, \
    error_frame, readable, response_frame, send_buffers, text_frame

log = logging.getLogger("dainr.server")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 9002
    pipelines: str = PIPELINES_DIR
    policy: Policy = field(default_factory=Policy)
    limits: Limits = field(default_factory=Limits)
    max_connections: int = 8
    buffer_bytes: int = 512 << 20     # per session: data accepted ahead of a busy gadget
    idle_timeout: float = 600.0       # seconds a client's next message may take to arrive whole
    config_timeout: float = 30.0      # seconds a client may take to send its CONFIG and HEADER (a slot it holds)
    start_timeout: float = 60.0       # for a gadget process to connect back / a worker to answer
    launcher: str = "fork"            # "fork": warm forkserver; "spawn": `python -m gadgetron` per gadget
    local_channels: int = 8           # per <distributed> block without workers: index values beyond share chains
    max_gadgets: int = 32             # gadget processes and connections one session may open (nested blocks)


# ---------------------------------------------------------------- gadget processes

class Child:
    """A launched gadget process (subprocess.Popen or multiprocessing.Process behind one interface)."""

    def __init__(self, proc, tail: Optional[collections.deque] = None):
        self.proc, self.tail = proc, tail if tail is not None else collections.deque(maxlen=1)
        self._lock = threading.Lock()
        self._closed_rc: Optional[int] = None  # the exit code, once closed

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        if self._closed_rc is not None:
            return False
        return self.proc.poll() is None if isinstance(self.proc, subprocess.Popen) else self.proc.is_alive()

    def wait(self, timeout: float) -> Optional[int]:
        if self._closed_rc is not None:
            return self._closed_rc
        if isinstance(self.proc, subprocess.Popen):
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                return None
        try:
            self.proc.join(timeout)
            return self.proc.exitcode
        except ValueError:  # closed meanwhile by close() in another thread (a shutdown's or an abort's)
            return self._closed_rc

    def status_lost(self, rc: Optional[int]) -> bool:
        """Whether ``rc`` is multiprocessing's stand-in for an exit status nobody has: a forked gadget's status
        reaches the server through the forkserver, and 255 is what its handle reads once the forkserver is gone."""
        return rc == 255 and not isinstance(self.proc, subprocess.Popen)

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
        self.wait(10)

    def close(self) -> None:
        """Kill the process if it still runs and free its file descriptors now (a multiprocessing process
        holds two pipes until it is closed or garbage collected; the session's objects form reference
        cycles, so without this a long-running server held them until the cyclic collector ran)."""
        with self._lock:
            if self._closed_rc is not None:
                return
            self.kill()
            rc = self.wait(0)
            if rc is None:  # not dead 10 s after SIGKILL (uninterruptible I/O): a later close tries again
                return
            self._closed_rc = rc  # (first: a wait() in another thread returns it once the process is closed)
            if not isinstance(self.proc, subprocess.Popen):
                self.proc.close()

    def last_lines(self) -> str:
        return " | ".join(self.tail)


def child_env() -> dict:
    path = os.environ.get("PYTHONPATH", "")
    return dict(os.environ, PYTHONPATH=ROOT + (os.pathsep + path if path else ""),
                GADGETRON_EXTERNAL_LOG_LEVEL=os.environ.get("GADGETRON_EXTERNAL_LOG_LEVEL", "INFO"))


def run_external(port: int, module: str, target: str) -> None:
    """What ``python -m gadgetron PORT MODULE TARGET`` runs (gadgetron.__main__.main), except that a target that
    fails to load or raises also sends its reason as an ERROR before the CLOSE (there it reaches only the log)."""
    import gadgetron.__main__ as entry

    from gadgets.connection_eof import raise_on_eof

    raise_on_eof()  # before the Connection reads its config and header
    load = entry.load_target

    def load_target(args):
        def run(connection):
            try:
                load(args)(connection)
            except Exception as exc:
                try:
                    connection.socket.write(error_frame(f"gadget {module}.{target} failed: "
                                                        f"{type(exc).__name__}: {exc}").raw)
                except OSError:
                    pass
                raise
        return run

    entry.load_target = load_target
    try:
        entry.main([str(port), module, target])
    except (ConnectionError, BrokenPipeError) as exc:  # the server ended the session (its client went away): one
        log.warning("gadget %s.%s: its connection closed: %s", module, target, exc)  # line, not a traceback
        sys.exit(1)  # (an uncaught exception's exit code)


class SpawnLauncher:
    """Exactly Gadgetron's launch: ``python -m gadgetron PORT MODULE TARGET`` (imports paid per gadget)."""

    def launch(self, port: int, module: str, target: str) -> Child:
        proc = subprocess.Popen([sys.executable, "-m", "gadgetron", str(port), module, target], env=child_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
        tail = collections.deque(maxlen=20)

        def pump():
            with proc.stdout:  # closed at the gadget's end of output, not left to the garbage collector
                for line in proc.stdout:
                    tail.append(line.rstrip())
                    log.info("[gadget %d] %s", proc.pid, line.rstrip())

        threading.Thread(target=pump, daemon=True).start()
        return Child(proc, tail)


class ForkLauncher:
    """The same gadget entry point, forked from a forkserver that has already imported gadgetron, torch and
    the allowlisted gadget packages: a gadget starts in ~0.1 s instead of ~3 s, still one process per gadget."""

    def __init__(self, preload: List[str]):
        import multiprocessing

        os.environ.update({k: v for k, v in child_env().items() if k.startswith("GADGETRON")})
        if ROOT not in sys.path:
            sys.path.insert(0, ROOT)
        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload(["gadgetron.external", "gadgetron.__main__", "torch", *preload])
        from multiprocessing import forkserver

        forkserver.ensure_running()  # imports start now, in the background, not at the first gadget

    def launch(self, port: int, module: str, target: str) -> Child:
        main = sys.modules.get("__main__")
        path = getattr(main, "__file__", None)
        if getattr(getattr(main, "__spec__", None), "name", None) is None and path and not os.path.isfile(path):
            # multiprocessing re-imports __main__ in the child from its file; code read from stdin has none
            return SpawnLauncher().launch(port, module, target)
        proc = self.ctx.Process(target=run_external, args=(port, module, target), daemon=True)
        proc.start()
        return Child(proc)


def make_launcher(kind: str, policy: Policy):
    if kind == "spawn":
        return SpawnLauncher()
    if kind == "fork":
        return ForkLauncher([m for m in policy.modules if m != "gadgets"] + ["gadgets.dainr_gadget"])
    raise ValueError(f"launcher must be 'fork' or 'spawn', got {kind!r}")


# ---------------------------------------------------------------- stages

class ByteQueue:
    """FIFO of frames bounded by total bytes; frames are put in batches (an oversize batch is always admitted
    into an empty queue).  ``None`` marks the end."""

    def __init__(self, budget: int):
        self.budget, self.used, self.items = budget, 0, collections.deque()
        self.cond = threading.Condition()
        self.closed = False
        self.dropped = 0  # frames put after the consumer went away (reported, never buffered)

    def put(self, items: List[Optional[Frame]]) -> None:
        size = sum(len(item.raw) for item in items if item is not None)
        with self.cond:
            while self.items and self.used + size > self.budget and not self.closed:
                self.cond.wait()
            if self.closed:
                self.dropped += sum(item is not None for item in items)
                return
            self.items.extend(items)
            self.used += size
            self.cond.notify_all()

    def get_batch(self, max_bytes: int = 1 << 20) -> List[Optional[Frame]]:
        """Everything queued (up to ``max_bytes``; at least one item), waiting for one if empty."""
        with self.cond:
            while not self.items:
                self.cond.wait()
            batch, size = [], 0
            while self.items and (not batch or size < max_bytes):
                item = self.items.popleft()
                batch.append(item)
                size += len(item.raw) if item is not None else 0
                if item is None:
                    break
            self.used -= size
            self.cond.notify_all()
            return batch

    def drop_all(self) -> None:
        with self.cond:
            self.closed = True
            self.dropped += sum(item is not None for item in self.items)
            self.items.clear()
            self.items.append(None)
            self.used = 0
            self.cond.notify_all()


class Session:
    """One stream: where output and errors go, shared limits, and the abort switch."""

    def __init__(self, opts: ServerOptions, out: FrameWriter, label: str, launcher):
        self.opts, self.out, self.label, self.launcher = opts, out, label, launcher
        out.on_broken = self._output_failed  # the client went away or stopped reading: stop its gadgets
        self.aborted = threading.Event()
        self.errors: List[str] = []
        self.sent = 0
        self.gadgets = 0  # gadget processes launched and gadgets/workers connected to
        self._stages: List = []
        self._lock = threading.Lock()

    def error(self, text: str) -> None:
        log.warning("%s: %s", self.label, text)
        self.errors.append(text)
        self.out.error(text)

    def _output_failed(self) -> None:
        if not self.aborted.is_set():
            log.warning("%s: sending to the client failed (%s: it went away or stopped reading); session aborted",
                        self.label, self.out.broken_reason)
        self.abort()

    def open_gadget(self, label: str) -> None:
        """Count a gadget process or connection about to be opened; past ``max_gadgets`` a PipelineError (nested
        ``<distributed>`` blocks multiply their channels: 8 per block, 8⁴ processes at 4 levels)."""
        with self._lock:
            if self.gadgets >= self.opts.max_gadgets:
                raise PipelineError(f"{label}: this session already opened {self.gadgets} gadget processes and "
                                    f"connections, the limit (--max-gadgets {self.opts.max_gadgets})")
            self.gadgets += 1

    def emit(self, frames: List[Frame]) -> None:
        """Output to the client; relays flush when their input runs dry (:class:`Peer`), so batches form."""
        self.sent += len(frames)
        self.out.frames(frames, flush=False)

    def register(self, stage) -> None:
        self._stages.append(stage)
        if self.aborted.is_set():
            stage.abort()

    def end(self, reason: str) -> None:
        """Stop the session's gadgets, then send ``reason``: an ERROR of a gadget being stopped does not follow it
        (its late output is dropped: :meth:`Peer._receive`)."""
        self.abort()
        self.error(reason)

    def abort(self) -> None:
        if self.aborted.is_set():
            return
        self.aborted.set()
        for stage in list(self._stages):
            stage.abort()

    def release(self) -> None:
        """At the session's end: break its reference cycles (stages ↔ session, writer → session), so its
        buffers are freed now, not at the next cyclic garbage collection."""
        self._stages.clear()
        self.out.on_broken = None


class Peer:
    """A gadget process or worker server at the other end of a socket: CONFIG + HEADER + frames out on a
    sender thread (byte-bounded queue), frames back on a receiver thread until it sends CLOSE.
    ``close_on_error``: its first ERROR closes its input (CLOSE; what was still to send is counted, not sent), as
    Gadgetron's ``ExternalChannel`` treats an external gadget."""

    def __init__(self, session: Session, sock: socket.socket, config_xml: str, header: str,
                 emit: Callable[[List[Frame]], None], label: str, close_on_error: bool = False):
        self.session, self.sock, self.emit, self.label = session, sock, emit, label
        self.close_on_error = close_on_error
        self.queue = ByteQueue(session.opts.buffer_bytes)
        self.remote_error = False
        self.closed_cleanly = False
        self.problem: Optional[str] = None
        sock.settimeout(None)
        self._preamble = config_text(config_xml) + text_frame(HEADER, header).raw
        self._sender = threading.Thread(target=self._send, daemon=True, name=f"send {label}")
        self._receiver = threading.Thread(target=self._receive, daemon=True, name=f"recv {label}")
        self._sender.start()
        self._receiver.start()

    def put(self, frames: List[Frame]) -> None:
        self.queue.put(frames)

    def finish(self) -> None:
        self.queue.put([None])

    def _send(self) -> None:
        batch = []
        try:
            self.sock.sendall(self._preamble)
            while True:  # batches: one sendmsg for everything queued meanwhile
                batch = self.queue.get_batch()
                done = batch[-1] is None
                send_buffers(self.sock, [f.raw if f is not None else Frame.of(CLOSE).raw for f in batch])
                if done:
                    break
        except OSError:  # the receiver reports the peer's end; drain so producers never block
            self.queue.dropped += sum(f is not None for f in batch)  # (some of it may have gone out)
            self.queue.drop_all()

    def _receive(self) -> None:
        reader = FrameReader(self.sock, self.session.opts.limits)
        try:
            while True:
                frames = reader.frames()  # one message, or a run of acquisitions
                frame = frames[0]
                if self.session.aborted.is_set():  # the session has ended with its reason: late output goes nowhere
                    log.info("%s: %s: %s after the session was aborted, dropped", self.session.label, self.label,
                             f"ERROR {frame.text()!r}" if frame.mid == ERROR else f"{len(frames)} {frame.name}")
                    return
                if frame.mid == CLOSE:
                    self.closed_cleanly = True
                    _shutdown(self.sock, socket.SHUT_WR)  # it reads no more: a blocked sender must not wait forever
                    return
                if frame.mid == ERROR:
                    self.remote_error = True
                    self.session.error(f"{self.label}: {frame.text()}")
                    if self.close_on_error:
                        self.queue.drop_all()
                elif frame.mid == TEXT:
                    log.info("%s: %s: %s", self.session.label, self.label, frame.text())
                elif frame.mid in DATA_IDS:
                    self.emit(frames)
                else:
                    raise ProtocolError(f"unexpected {frame.name} message")
                if not reader.buffered:  # nothing more here yet: push what was relayed to the client
                    self.session.out.flush()
        except (ProtocolError, StreamEnded, OSError) as exc:
            if not self.session.aborted.is_set():
                self.problem = f"{exc}"
        except PipelineError as exc:  # a stage after this one failed (a <distributed> opening a channel)
            self.session.end(str(exc))
        finally:
            self.queue.drop_all()

    def wait(self) -> None:
        self._receiver.join()
        self._sender.join()
        self.sock.close()

    def abort(self) -> None:
        self.queue.drop_all()
        _shutdown(self.sock, socket.SHUT_RDWR)  # wakes both threads; the fd closes when they let go
        self.sock.close()


class ExternalStage:
    def __init__(self, session: Session, node: External, emit: Callable[[List[Frame]], None]):
        self.session, self.node, self.emit = session, node, emit
        self.child: Optional[Child] = None
        self.peer: Optional[Peer] = None
        session.register(self)

    def start(self, header: str) -> None:
        opts = self.session.opts
        self.session.open_gadget(f"gadget {self.node.label}")
        if self.node.module:
            with socket.create_server(("127.0.0.1", 0)) as listener:
                listener.settimeout(0.2)
                self.child = self.session.launcher.launch(listener.getsockname()[1], self.node.module,
                                                          self.node.target)
                deadline = time.monotonic() + opts.start_timeout
                while True:
                    try:
                        sock, _ = listener.accept()
                        break
                    except socket.timeout:
                        if self.session.aborted.is_set():
                            raise PipelineError(f"gadget {self.node.label}: session aborted while starting")
                        if not self.child.alive() or time.monotonic() > deadline:
                            self.child.kill()
                            raise PipelineError(f"gadget {self.node.label} did not start (exit code "
                                                f"{self.child.wait(1)}): {self.child.last_lines()}")
        else:
            try:
                sock = socket.create_connection(self.node.address, timeout=opts.start_timeout)
            except OSError as exc:
                raise PipelineError(f"gadget {self.node.label}: cannot connect: {exc}") from exc
        self.peer = Peer(self.session, sock, self.node.configuration, header, self.emit, f"gadget {self.node.label}",
                         close_on_error=True)

    def put(self, frames: List[Frame]) -> None:
        self.peer.put(frames)

    def drain(self) -> None:
        self.peer.finish()
        self.peer.wait()
        rc = self.child.wait(30) if self.child else 0
        if self.session.aborted.is_set():
            return
        if self.peer.closed_cleanly and self.child and self.child.status_lost(rc):  # finished, not failed
            log.warning("gadget %s: exit status unknown (the forkserver that launched it is gone)", self.node.label)
            rc = 0
        if not self.peer.closed_cleanly:
            # (the messages the server could not send; those sent but not read by the gadget are not counted)
            parts = [self.peer.problem or "no reason"] + ([f"exit code {rc}"] if self.child else []) + \
                ([f"at least {self.peer.queue.dropped} message(s) not delivered"] if self.peer.queue.dropped else [])
            self.session.error(f"gadget {self.node.label} ended without CLOSE ({'; '.join(parts)}"
                               + (f": {self.child.last_lines()}" if self.child and self.child.last_lines() else "") + ")")
        elif rc not in (0, None) and not self.peer.remote_error:
            self.session.error(f"gadget {self.node.label} exited with code {rc}"
                               + (f": {self.child.last_lines()}" if self.child.last_lines() else ""))
        elif self.peer.queue.dropped:
            why = "its ERROR closed its input, as Gadgetron closes it" if self.peer.remote_error else \
                "it closed before reading all input"
            self.session.error(f"gadget {self.node.label}: {self.peer.queue.dropped} message(s) not delivered ({why})")
        if self.child:
            self.child.close()

    def abort(self) -> None:
        if self.peer:
            self.peer.abort()
        if self.child:
            self.child.close()


def discover_workers() -> List[tuple]:
    """Gadgetron's worker discovery: ``GADGETRON_REMOTE_WORKER_COMMAND`` prints a JSON list of "host:port"."""
    command = os.environ.get("GADGETRON_REMOTE_WORKER_COMMAND")
    if not command:
        return []
    try:
        out = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=30, check=True).stdout
        workers = []
        for entry in json.loads(out):
            host, port = str(entry).rsplit(":", 1)
            workers.append((host.strip("[]"), int(port)))
        return workers
    except (subprocess.SubprocessError, ValueError, OSError) as exc:
        raise PipelineError(f"worker discovery (GADGETRON_REMOTE_WORKER_COMMAND) failed: {exc}") from exc


class DistributedStage:
    """AcquisitionDistributor: one channel (remote worker or local chain) per value of ``parallel_dimension``.
    Noise scans go to every channel (each worker prewhitens its own data); other messages pass by."""

    def __init__(self, session: Session, node: Distributed, emit: Callable[[List[Frame]], None]):
        self.session, self.node, self.emit = session, node, emit
        self.channels, self.noise, self.workers = {}, [], []
        self.noise_bytes, self.noise_dropped = 0, 0  # the noise kept for later channels: within --buffer-mb
        self.header = ""
        session.register(self)

    def start(self, header: str) -> None:
        self.header = header
        self.workers = discover_workers()

    def _open(self, key: int):
        if self.workers:
            address = self.workers[len(self.channels) % len(self.workers)]
            self.session.open_gadget(f"worker {address[0]}:{address[1]}")
            try:
                sock = socket.create_connection(address, timeout=self.session.opts.start_timeout)
            except OSError as exc:
                raise PipelineError(f"worker {address[0]}:{address[1]}: cannot connect: {exc}") from exc
            channel = Peer(self.session, sock, self.node.worker_config, self.header, self.emit,
                           f"worker {address[0]}:{address[1]} ({self.node.dimension} {key})")
        elif len(self.channels) >= self.session.opts.local_channels:
            # a bound on local gadget processes (a malformed stream could name 65536 slices): round robin, as
            # channels go to workers; a chain's gadget reconstructs several index values one after another
            channel = self._distinct()[len(self.channels) % self.session.opts.local_channels]
            self.channels[key] = channel
            return channel
        else:
            channel = Chain(self.session, self.node.nodes, self.emit)
            channel.start(self.header)
        if self.noise:
            channel.put(list(self.noise))
        self.channels[key] = channel
        return channel

    def _distinct(self) -> list:
        return list({id(c): c for c in self.channels.values()}.values())

    def put(self, frames: List[Frame]) -> None:
        for frame in frames:
            self._route(frame)

    def _route(self, frame: Frame) -> None:
        if frame.mid != ACQUISITION:  # not distributed: passes by (as in Gadgetron)
            self.emit([frame])
            self.session.out.flush()
            return
        head = frame.acquisition_header()
        if head.flags & NOISE_BIT:
            if self.noise_bytes + len(frame.raw) > self.session.opts.buffer_bytes:
                self.noise_dropped += 1
                return
            frame = Frame(frame.mid, bytes(frame.raw))  # kept for the whole session: not a view into a buffer
            self.noise.append(frame)
            self.noise_bytes += len(frame.raw)
            for channel in self._distinct():
                channel.put([frame])
            return
        dim = self.node.dimension
        key = int(head.idx.user[int(dim[5:])] if dim.startswith("user_") else getattr(head.idx, dim))
        (self.channels.get(key) or self._open(key)).put([frame])

    def drain(self) -> None:
        if self.noise_dropped:
            self.session.error(f"distributor: {self.noise_dropped} noise readouts past --buffer-mb "
                               f"({self.session.opts.buffer_bytes / 2 ** 20:g} MiB) were dropped; the channels "
                               f"prewhiten with the first {len(self.noise)}")
        for channel in self._distinct():
            if isinstance(channel, Peer):
                channel.finish()
        for channel in self._distinct():
            if isinstance(channel, Peer):
                channel.wait()
                if not channel.closed_cleanly and not self.session.aborted.is_set():
                    self.session.error(f"{channel.label} ended without CLOSE ({channel.problem})")
            else:
                channel.drain()

    def abort(self) -> None:
        for channel in self._distinct():
            channel.abort()


class Chain:
    """Stages in order; each stage's output is the next one's input, the last one's goes to ``emit``."""

    def __init__(self, session: Session, nodes, emit: Callable[[List[Frame]], None]):
        self.stages = []
        for node in reversed(nodes):
            cls = ExternalStage if isinstance(node, External) else DistributedStage
            stage = cls(session, node, emit)
            self.stages.insert(0, stage)
            emit = stage.put

    def start(self, header: str) -> None:
        for stage in self.stages:
            stage.start(header)

    def put(self, frames: List[Frame]) -> None:
        self.stages[0].put(frames)

    def drain(self) -> None:
        for stage in self.stages:
            stage.drain()

    def abort(self) -> None:
        for stage in self.stages:
            stage.abort()


# ---------------------------------------------------------------- sessions

def check_header(frame: Frame) -> str:
    """HEADER text, NUL-stripped, parsed safely and by ismrmrd's schema; the text gadgets will receive."""
    if frame.mid != HEADER:
        raise ProtocolError(f"expected HEADER (3) after the configuration, got {frame.name}")
    text = frame.text()
    try:
        parse_xml(text, "MRD header")
        parse_header(text)
    except (PipelineError, MRDFormatError) as exc:
        raise ProtocolError(str(exc)) from exc
    return text


@dataclass
class Stats:
    received: int = 0
    acquisitions: int = 0  # noise scans included
    t_start: float = field(default_factory=time.monotonic)


def run_session(session: Session, next_frames: Callable[[], List[Frame]], pipeline: Pipeline, header: str,
                stats: Stats, on_disconnect: Callable[[], bool] = lambda: False,
                on_close: Callable[[], None] = lambda: None) -> None:
    """Start the pipeline, relay the client's messages into it until CLOSE, then drain its output.
    ``next_frames`` returns the next message, or a run of acquisitions (:meth:`FrameReader.frames`);
    ``on_close`` is called when the client's CLOSE arrives, before the drain.

    A bad message ends the input with an ERROR; what arrived before it is still processed and returned,
    unless the client is gone (``on_disconnect`` says so), in which case the gadgets are stopped."""
    chain = Chain(session, pipeline.nodes, session.emit)
    try:
        chain.start(header)
    except PipelineError as exc:
        session.end(str(exc))
        return
    try:
        while True:
            frames = next_frames()
            frame = frames[0]
            if frame.mid == CLOSE:
                on_close()
                break
            if frame.mid in DATA_IDS:
                stats.received += len(frames)
                stats.acquisitions += len(frames) if frame.mid == ACQUISITION else 0
                chain.put(frames)
            elif frame.mid == TEXT:  # python-ismrmrd-server clients may send a JSON config here
                log.info("%s: client text: %.200r", session.label, frame.text())  # (repr: no forged log lines)
            else:
                raise ProtocolError(f"unexpected {frame.name} message in the data stream")
    except (ProtocolError, StreamEnded, socket.timeout, OSError) as exc:
        if not session.aborted.is_set():  # (else its reason is out already)
            reason = (f"no complete message within {session.opts.idle_timeout:g} s" if isinstance(exc, socket.timeout)
                      else str(exc))
            session.error(f"input ended: {reason} (after {stats.received} data messages; those are processed)")
        if isinstance(exc, ConnectionError) or on_disconnect():  # (an idle client is not a gone one)
            session.abort()
    except PipelineError as exc:
        session.end(str(exc))
    if session.aborted.is_set():
        chain.abort()
    else:
        try:
            chain.drain()
        except PipelineError as exc:
            session.error(str(exc))
            chain.abort()


def query_answers(opts: ServerOptions) -> Dict[str, Callable[[], str]]:
    """QUERY (6) texts this server answers: Gadgetron's own keys (``gadgetron_ismrmrd_client -Q`` asks for
    ``gadgetron::info``), answered for this server, plus ``dainr::version`` and ``dainr::pipelines``."""
    import importlib.metadata

    import torch

    from dainr import __version__

    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    def memory() -> str:
        return str(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))

    def pipelines() -> str:
        return "\n".join(available(opts.pipelines))

    def info() -> str:
        return "\n".join([
            f"dainr serve {__version__} (Gadgetron-protocol server; external Python gadgets only)",
            f"  -- ismrmrd (python)  : {version('ismrmrd')}",
            f"  -- gadgetron (python): {version('gadgetron')}",
            f"  -- torch             : {torch.__version__}",
            f"  -- Python support    : YES ({sys.version.split()[0]})",
            "  -- Matlab support    : NO",
            f"  -- CUDA support      : {'YES' if torch.cuda.is_available() else 'NO'} "
            f"({torch.cuda.device_count()} devices)",
            f"  -- System memory     : {int(memory()) >> 20} MB",
            f"  -- Pipelines         : {', '.join(available(opts.pipelines)) or 'none'}",
        ])

    return {
        "ismrmrd::version": lambda: version("ismrmrd"),
        "gadgetron::version": lambda: f"dainr-serve {__version__}",
        "gadgetron::build": lambda: "none (dainr serve)",
        "gadgetron::info": info,
        "gadgetron::info::memory": memory,
        "gadgetron::info::python": lambda: "1",
        "gadgetron::info::matlab": lambda: "0",
        "gadgetron::info::cuda": lambda: str(int(torch.cuda.is_available())),
        "gadgetron::cuda::devices": lambda: str(torch.cuda.device_count()),
        "dainr::version": lambda: __version__,
        "dainr::pipelines": pipelines,
    }


class Server:
    def __init__(self, opts: ServerOptions = ServerOptions()):
        try:
            self.listener = socket.create_server((opts.host, opts.port), reuse_port=False)
        except OSError as exc:
            raise ValueError(f"cannot listen on {opts.host}:{opts.port}: {exc}") from exc
        self.port = self.listener.getsockname()[1]
        self.opts = opts = dataclasses.replace(opts, policy=dataclasses.replace(opts.policy, server_port=self.port))
        self.launcher = make_launcher(opts.launcher, opts.policy)
        self.stopping = threading.Event()
        self.sessions: dict = {}
        self.history = collections.deque(maxlen=1000)  # summaries of finished sessions
        self.lock = threading.Lock()
        self.answers = query_answers(opts)

    def serve_forever(self) -> None:
        log.info("dainr serve: listening on %s:%d (pipelines %s, launcher %s)", self.opts.host, self.port,
                 self.opts.pipelines, self.opts.launcher)
        self.listener.settimeout(0.2)
        warned = -math.inf
        while not self.stopping.is_set():
            try:
                conn, addr = self.listener.accept()
            except socket.timeout:
                continue
            except OSError as exc:
                # out of file descriptors or memory, or a connection aborted before its accept: transient (the
                # server stopped for good on it, so a client opening connections could shut the service down)
                if self.stopping.is_set() or self.listener.fileno() < 0:  # (closed by a shutdown)
                    break
                if time.monotonic() - warned > 10:
                    log.warning("dainr serve: accept failed (%s); retrying", exc)
                    warned = time.monotonic()
                time.sleep(0.1)
                continue
            thread = threading.Thread(target=self._handle, args=(conn, addr), daemon=True)
            thread.start()
        self.shutdown()

    def shutdown(self, grace: float = 10.0) -> None:
        self.stopping.set()
        self.listener.close()
        with self.lock:
            sessions = list(self.sessions.items())
        notices = []
        for session, (thread, conn) in sessions:
            # told on a thread of its own: a client that does not read blocks the send (and its writer's lock)
            notice = threading.Thread(target=_end_session, args=(session, "server is shutting down"), daemon=True)
            notice.start()
            notices.append((notice, conn))
        deadline = time.monotonic() + 2.0
        for notice, conn in notices:
            notice.join(max(0.0, deadline - time.monotonic()))
            # told (and aborted): a session waiting for its client's next message has its input ended; a client
            # that does not read has its blocked send failed
            _shutdown(conn, socket.SHUT_RDWR if notice.is_alive() else socket.SHUT_RD)
        for _, (thread, _) in sessions:
            thread.join(grace)
        log.info("dainr serve: stopped")

    def _pipeline(self, frame: Frame) -> Pipeline:
        if frame.mid == CONFIG_FILE:
            return load_named(frame.text(), self.opts.policy, self.opts.pipelines, self.opts.limits.max_text)
        if frame.mid == CONFIG_TEXT:
            return parse_pipeline(frame.text(), self.opts.policy)
        raise ProtocolError(f"expected CONFIG_FILE (1) or CONFIG_TEXT (2) first, got {frame.name}")

    def _after_queries(self, next_frame: Callable[[], Frame], session: Session) -> Frame:
        """The next message that is not a QUERY; every QUERY is answered (RESPONSE, or ERROR if unknown)."""
        while True:
            frame = next_frame()
            if frame.mid != QUERY:
                return frame
            query = frame.text()
            answer = self.answers.get(query)
            if frame.raw[2:10] != bytes(8):
                session.error(f"QUERY {query!r}: Gadgetron's reserved field must be 0")
            elif answer is None:
                session.error(f"unknown query {query!r}; known: {', '.join(sorted(self.answers))}")
            else:
                session.out.frame(response_frame(frame.correlation_id, answer()))

    def _handle(self, conn: socket.socket, addr) -> None:
        label = f"client {addr[0]}:{addr[1]}"
        conn.settimeout(self.opts.idle_timeout)
        reader = FrameReader(conn, self.opts.limits, message_timeout=self.opts.idle_timeout)
        reader.deadline = time.monotonic() + self.opts.config_timeout
        out = FrameWriter(SocketSink(conn))
        session = Session(self.opts, out, label, self.launcher)
        stats = Stats()
        pipeline_name = "?"
        closed = threading.Event()  # the session is over: stops the watch after the client's CLOSE
        with self.lock:
            busy = len(self.sessions) >= self.opts.max_connections
            if not busy:
                self.sessions[session] = (threading.current_thread(), conn)
        try:
            if busy:
                session.error(f"server busy: {self.opts.max_connections} sessions running; try again later")
                return
            try:
                first = self._after_queries(reader.frame, session)
                if first.mid == CLOSE:  # a query-only connection (gadgetron_ismrmrd_client -Q / -q)
                    pipeline_name = "(queries only)"
                    return
                pipeline = self._pipeline(first)
                pipeline_name = pipeline.source
                header = check_header(self._after_queries(reader.frame, session))
                reader.deadline = None
            except (ProtocolError, PipelineError, StreamEnded, OSError) as exc:
                if not session.aborted.is_set():  # (else the reason is out: the server is shutting down)
                    session.error(str(exc) if not isinstance(exc, socket.timeout) else
                                  f"no CONFIG and HEADER within {self.opts.config_timeout:g} s"
                                  if time.monotonic() >= reader.deadline else
                                  f"no complete message within {self.opts.idle_timeout:g} s")
                return
            watch = threading.Thread(target=_watch_after_close, args=(conn, reader, session, closed),
                                     daemon=True)
            run_session(session, reader.frames, pipeline, header, stats, on_disconnect=lambda: _client_gone(conn),
                        on_close=watch.start)
        except Exception as exc:  # never let one session take the server down
            log.exception("%s: internal error", label)
            session.end(f"internal server error: {exc!r}")
        finally:
            # recorded before CLOSE goes out, so a client that has its CLOSE also finds its session in the history
            summary = dict(client=label, pipeline=pipeline_name, received=stats.received,
                           acquisitions=stats.acquisitions, sent=session.sent, errors=list(session.errors),
                           aborted=session.aborted.is_set(),
                           seconds=round(time.monotonic() - stats.t_start, 3))
            with self.lock:
                self.sessions.pop(session, None)
                self.history.append(summary)
            closed.set()
            out.close()
            _close_gracefully(conn)
            session.release()
            log.info("%s pipeline=%s: %d messages in (%d acquisitions), %d out, %d error(s), %.2f s%s", label,
                     pipeline_name, stats.received, stats.acquisitions, session.sent, len(session.errors),
                     summary["seconds"], " [aborted]" if summary["aborted"] else "")


def _end_session(session: Session, reason: str) -> None:
    if not session.aborted.is_set():
        session.end(reason)


def _shutdown(conn: socket.socket, how: int) -> None:
    try:
        conn.shutdown(how)
    except OSError:
        pass


def _close_gracefully(conn: socket.socket, linger: float = 2.0) -> None:
    """Close after the output: a socket closed with unread input resets the connection, and the reset can
    discard the ERROR and CLOSE just sent to a client still sending (a refused session).  Its input is read
    and dropped until it ends, for at most ``linger`` seconds."""
    _shutdown(conn, socket.SHUT_WR)
    deadline = time.monotonic() + linger
    try:
        while (left := deadline - time.monotonic()) > 0 and readable(conn, left):
            if not conn.recv(1 << 16):
                break
    except (OSError, ValueError):
        pass
    conn.close()


def _watch_after_close(conn: socket.socket, reader: FrameReader, session: Session, closed: threading.Event) -> None:
    """While the images of a closed stream are still coming: anything the client sends after its CLOSE is
    reported (one ERROR) and discarded.  After its end of stream (it may have shut only its sending side and
    still be reading), a reset says it has closed completely: the first image sent to such a client still goes
    out (the kernel takes it) and only the next send would fail, so the session ends at the reset, not at the
    next image (the whole fit, without a preview)."""
    pending, reported, reset = reader.buffered > 0, False, False  # (bytes the reader received beyond CLOSE)
    while True:
        if pending and not reported:
            session.error("data after CLOSE ignored: CLOSE must be the client's last message")
            reported = True
        if closed.is_set():
            return
        try:
            if not readable(conn, 0.2):
                continue
            pending = bool(conn.recv(1 << 16))
        except ConnectionError:  # a reset: the client closed with images unread
            reset = True
            break
        except (OSError, ValueError):  # the session closed the socket meanwhile
            return
        if not pending:
            break
    while not reset and not closed.wait(0.2):
        try:
            reset = _reset(conn)
        except OSError:  # the session closed the socket meanwhile
            return
    if reset and not closed.is_set():
        log.warning("%s: the client closed after its CLOSE (reset); session aborted", session.label)
        session.abort()


def _reset(conn: socket.socket) -> bool:
    """Whether the socket has an error pending (a peer that closed completely answers what we send with a reset)."""
    return conn.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0


def _client_gone(conn: socket.socket) -> bool:
    """After an end of stream without CLOSE: has the client closed completely (vs. only its sending side)?
    Our ERROR was just sent; a fully closed peer answers it with a reset, which sets the socket error."""
    time.sleep(0.1)
    try:
        return _reset(conn)
    except OSError:
        return True


class Terminated(BaseException):
    """Raised in the main thread by ``dainr serve --from_stream``'s SIGTERM/SIGINT handler (the signal name)."""


def run_stream(pipeline: Pipeline, inp, outp, opts: ServerOptions = ServerOptions()) -> int:
    """``--from_stream``: MRD stream (HEADER first, no CONFIG) on ``inp``, the header echoed then images on
    ``outp``, CLOSE at the end.  Returns 0, or 1 when an ERROR was written.  :class:`Terminated` (a signal)
    stops the gadgets and ends the output with an ERROR and CLOSE."""
    out = FrameWriter(outp)
    session = Session(opts, out, "stream", make_launcher(opts.launcher, opts.policy))
    try:
        first = read_frame(inp.read, opts.limits)
        header = check_header(first)
        out.frame(first)
        run_session(session, lambda: [read_frame(inp.read, opts.limits)], pipeline, header, Stats())
    except (ProtocolError, StreamEnded) as exc:
        session.error(str(exc))
    except Terminated as exc:
        session.end(f"terminated by {exc}: the stream's gadgets were stopped")
    finally:
        out.close()
        session.release()
    if out.broken:
        log.error("--from_stream: the output failed (%s: its reader went away, or a full disk); the stream's "
                  "gadgets were stopped", out.broken_reason)
    return 1 if session.errors or out.broken else 0
