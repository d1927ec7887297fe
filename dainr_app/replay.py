"""``dainr replay raw.h5``: stream an MRD raw file through a Gadgetron-protocol server and save the images.

Mirrors ``gadgetron_ismrmrd_client``: CONFIG_FILE (``-c`` name) or CONFIG_TEXT (``-C`` local XML), HEADER,
noise scans / acquisitions / waveforms in file order (merged by time stamp), CLOSE; a sender thread and the
receiving loop run concurrently.  Works against ``dainr serve``, a Gadgetron server, and python-ismrmrd-server
(FIRE) conventions: NUL-terminated text is accepted, TEXT (5) log messages are printed, and a server that
never sends ERROR (8) is fine.
"""
from __future__ import annotations

import heapq
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from ._ismrmrd import ismrmrd
from ismrmrd.serialization import ConfigFile, ConfigText, ProtocolSerializer

from .mrd import Key, acquisition_key, iter_acquisitions, open_raw
from .protocol import ACQUISITION, CLOSE, ERROR, HEADER, IMAGE, LAST_IN_SLICE_BIT, NOISE_BIT, RESPONSE, TEXT, WAVEFORM, \
    Frame, FrameReader, Limits, ProtocolError, SocketSink, StreamEnded, query_frame, text_frame


@dataclass
class SliceTiming:
    readouts: int = 0
    last_sent: Optional[float] = None     # seconds since the replay started
    first_image: Optional[float] = None
    last_image: Optional[float] = None


@dataclass
class ReplayResult:
    images: Dict[int, List["ismrmrd.Image"]] = field(default_factory=dict)
    errors: List[str] = field(default_factory=list)
    texts: List[str] = field(default_factory=list)
    returned: int = 0                     # non-image data messages sent back (pass-through pipelines)
    undecodable: int = 0                  # IMAGE messages that ismrmrd could not decode (each also in errors)
    sent: int = 0
    readouts: int = 0
    send_seconds: float = 0.0             # until CLOSE was flushed
    total_seconds: float = 0.0            # until the server's CLOSE
    slices: Dict[Key, SliceTiming] = field(default_factory=dict)
    input_error: Optional[str] = None     # reading the items failed (a damaged file); also in errors

    @property
    def n_images(self) -> int:
        return sum(len(v) for v in self.images.values())


def file_items(path: str, group: str = "dataset"):
    """Header XML and an iterator over the file's acquisitions and waveforms merged by time stamp."""
    header, n_waveforms = open_raw(path, group)

    def waveforms():
        ds = ismrmrd.Dataset(path, group, create_if_needed=False, mode="r")
        try:
            for i in range(n_waveforms):
                yield ds.read_waveform(i)
        finally:
            ds.close()

    if not n_waveforms:
        return header, iter_acquisitions(path, group)
    acqs = ((a.acquisition_time_stamp, 0, i, a) for i, a in enumerate(iter_acquisitions(path, group)))
    wavs = ((w.time_stamp, 1, i, w) for i, w in enumerate(waveforms()))
    return header, (item for *_, item in heapq.merge(acqs, wavs, key=lambda t: t[:3]))


def _image_key(image) -> Key:
    """The acquisition_key of the readouts an image was reconstructed from."""
    return (int(image.slice), int(image.contrast), int(image.repetition), int(image.set))


class ServerUnreachable(ConnectionError):
    """No connection to the server (refused, unknown host, timed out): the server's side, not the input's."""


def _connect(address: Tuple[str, int], timeout: float) -> socket.socket:
    try:
        sock = socket.create_connection(address, timeout=30)
    except OSError as exc:
        raise ServerUnreachable(f"cannot connect to {address[0]}:{address[1]}: {exc}") from exc
    sock.settimeout(timeout)
    return sock


def query(address: Tuple[str, int], queries: List[str], timeout: float = 30.0) -> Tuple[Dict[str, str], List[str]]:
    """Ask a server QUERY (6) messages (``gadgetron_ismrmrd_client -Q`` asks ``gadgetron::info``): the RESPONSE (7)
    texts by query, and the texts of the ERRORs the server sent instead for the others (e.g. an unknown key; the
    session goes on, so one bad key costs no other answer).  A server that answers not every query raises
    :class:`ProtocolError`."""
    queries = list(dict.fromkeys(queries))  # (a key asked twice is asked once: the answers are by key)
    answers: Dict[str, str] = {}
    errors: List[str] = []
    with _connect(address, timeout) as sock:
        sock.sendall(b"".join(query_frame(q, i).raw for i, q in enumerate(queries)) + Frame.of(CLOSE).raw)
        reader = FrameReader(sock)  # (a claimed length costs memory only as its bytes arrive)
        reader.deadline = time.monotonic() + timeout  # one for all the answers: other messages cannot hold us
        while len(answers) + len(errors) < len(queries):
            try:
                frame = reader.frame()
            except StreamEnded:  # e.g. a python-ismrmrd-server, which closes on an id it does not know
                raise ProtocolError("server closed the connection without answering") from None
            except socket.timeout:
                raise ProtocolError(f"no answer to every query within {timeout:g} s") from None
            if frame.mid == RESPONSE:
                if frame.correlation_id >= len(queries):
                    raise ProtocolError(f"RESPONSE to an unknown correlation id {frame.correlation_id}")
                answers[queries[frame.correlation_id]] = frame.text()
            elif frame.mid == ERROR:
                errors.append(frame.text())
            elif frame.mid == CLOSE:
                raise ProtocolError("; ".join(errors + ["server closed without answering every query"]))
    return answers, errors


class _InputFailed(Exception):
    """Reading the next item to send failed (raised from the reader's exception)."""


def _guarded(items):
    """``items``, with a failure to produce the next one raised as :class:`_InputFailed`."""
    it = iter(items)
    while True:
        try:
            item = next(it)
        except StopIteration:
            return
        except Exception as exc:
            raise _InputFailed() from exc
        yield item


def replay(items, header: str, address: Tuple[str, int], config: Optional[str] = None,
           config_xml: Optional[str] = None, timeout: float = 600.0, limits: Limits = Limits(),
           on_image=None, result: Optional[ReplayResult] = None) -> ReplayResult:
    """Send ``header`` and ``items`` (ismrmrd objects) to a server; collect what comes back until CLOSE (into
    ``result`` if given: what arrived before an exception such as a KeyboardInterrupt is kept there)."""
    if (config is None) == (config_xml is None):
        raise ValueError("give a remote pipeline name or a local pipeline XML: one of them, not both"
                         if config is not None else "give a remote pipeline name or a local pipeline XML")
    sock = _connect(address, timeout)
    res = result if result is not None else ReplayResult()
    t0 = time.monotonic()

    def send():
        try:
            out = SocketSink(sock)
            ser = ProtocolSerializer(out)
            ser.serialize(ConfigFile(config) if config is not None else ConfigText(config_xml))
            out.write(text_frame(HEADER, header).raw)  # the file's header text, verbatim
            for item in _guarded(items):
                ser.serialize(item)
                res.sent += 1
                if isinstance(item, ismrmrd.Acquisition) and not (flags := item.flags) & NOISE_BIT:
                    res.readouts += 1
                    timing = res.slices.setdefault(acquisition_key(item), SliceTiming())
                    timing.readouts += 1
                    if flags & LAST_IN_SLICE_BIT:
                        out.flush()  # a finished slice goes out now, not when the buffer fills
                    timing.last_sent = time.monotonic() - t0
            ser.close()  # CLOSE, flushed
            res.send_seconds = time.monotonic() - t0
        except _InputFailed as exc:  # a damaged file: say so and end the session now, without CLOSE
            res.input_error = f"replay stopped after {res.sent} items: {exc.__cause__}"
            res.errors.append(res.input_error)
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        except (OSError, ValueError):  # the server ended the session; the receiver reports why
            pass

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    reader = FrameReader(sock, limits)
    try:
        while True:
            frames = reader.frames()  # one message, or a run of acquisitions
            frame = frames[0]
            if frame.mid == CLOSE:
                break
            if frame.mid == IMAGE:
                try:
                    image = frame.decode()
                except Exception as exc:  # one bad image must not cost the others already received
                    res.errors.append(f"image message {res.n_images + res.undecodable + 1} could not be decoded "
                                      f"and was skipped: {exc!r}")
                    res.undecodable += 1
                    continue
                now = time.monotonic() - t0
                res.images.setdefault(image.image_series_index, []).append(image)
                timing = res.slices.setdefault(_image_key(image), SliceTiming())
                timing.first_image = timing.first_image if timing.first_image is not None else now
                timing.last_image = now
                if on_image is not None:
                    on_image(image)
            elif frame.mid == ERROR:
                res.errors.append(frame.text())
            elif frame.mid == TEXT:  # python-ismrmrd-server logs to the client this way
                text = frame.text()
                res.texts.append(text)
                if text.startswith("ERROR"):
                    res.errors.append(text)
            elif frame.mid in (ACQUISITION, WAVEFORM):
                res.returned += len(frames)
            elif frame.mid != HEADER:
                raise ProtocolError(f"server sent an unexpected {frame.name} message")
    except socket.timeout:
        res.errors.append(f"no answer from the server for {timeout:g} s")
    except (StreamEnded, ProtocolError, ConnectionError) as exc:
        res.errors.append(f"connection to the server ended without CLOSE: {exc}")
    finally:
        res.total_seconds = time.monotonic() - t0
        sock.close()
        sender.join(5)
    return res


def timing_table(res: ReplayResult) -> str:
    """Per-slice summary: readouts, when the last one was sent, when its images came back."""
    rows = ["slice contrast repetition set  readouts  last readout sent  first image  last image  latency"]
    fmt = lambda v: f"{v:8.2f} s" if v is not None else "       -  "
    for (s, c, r, st), t in sorted(res.slices.items()):
        latency = t.last_image - t.last_sent if t.last_image is not None and t.last_sent is not None else None
        rows.append(f"{s:5d} {c:8d} {r:10d} {st:3d}  {t.readouts:8d}  {fmt(t.last_sent):>17}  {fmt(t.first_image):>11}"
                    f"  {fmt(t.last_image):>10}  {fmt(latency)}")
    return "\n".join(rows)
