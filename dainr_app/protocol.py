"""Framing of the MRD / Gadgetron wire protocol for the embedded server and the replay client.

Objects are (de)serialized by ismrmrd's own classes (``ProtocolSerializer``, ``Acquisition.deserialize_from``,
...).  What this module adds is what a server facing untrusted clients needs and the library does not do:
reading one message as raw bytes with every length checked against :class:`Limits` *before* anything is
allocated, so a relay can forward messages without decoding them and a bad stream becomes a
:class:`ProtocolError` with a reason instead of a hang or a multi-gigabyte allocation.  The fixed-size
message headers are read with ismrmrd's ctypes header classes.
"""
from __future__ import annotations

import ctypes
import io
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

from ._ismrmrd import ismrmrd
import numpy as np
from ismrmrd.serialization import ConfigText, ISMRMRDMessageID, ProtocolDeserializer, ProtocolSerializer

CONFIG_FILE = int(ISMRMRDMessageID.CONFIG_FILE)
CONFIG_TEXT = int(ISMRMRDMessageID.CONFIG_TEXT)
HEADER = int(ISMRMRDMessageID.HEADER)
CLOSE = int(ISMRMRDMessageID.CLOSE)
TEXT = int(ISMRMRDMessageID.TEXT)
QUERY = 6     # Gadgetron: uint64 reserved + uint64 correlation id + uint64 length + query text
RESPONSE = 7  # Gadgetron: uint64 correlation id + uint64 length + answer text
ERROR = 8  # Gadgetron: uint64 length + text; not in ismrmrd's serializer
ACQUISITION = int(ISMRMRDMessageID.ACQUISITION)
IMAGE = int(ISMRMRDMessageID.IMAGE)
WAVEFORM = int(ISMRMRDMessageID.WAVEFORM)
DATA_IDS = (ACQUISITION, IMAGE, WAVEFORM)
NAMES = {CONFIG_FILE: "CONFIG_FILE", CONFIG_TEXT: "CONFIG_TEXT", HEADER: "HEADER", CLOSE: "CLOSE", TEXT: "TEXT",
         QUERY: "QUERY", RESPONSE: "RESPONSE", ERROR: "ERROR", ACQUISITION: "ACQUISITION", IMAGE: "IMAGE", WAVEFORM: "WAVEFORM"}
CONFIG_FILE_SIZE = 1024
NOISE_BIT = 1 << (ismrmrd.ACQ_IS_NOISE_MEASUREMENT - 1)  # acquisition flags as bit masks
LAST_IN_SLICE_BIT = 1 << (ismrmrd.ACQ_LAST_IN_SLICE - 1)

_ACQ_HEADER = ctypes.sizeof(ismrmrd.AcquisitionHeader)
_NS, _CH, _TD = (getattr(ismrmrd.AcquisitionHeader, f).offset
                 for f in ("number_of_samples", "active_channels", "trajectory_dimensions"))
_U16 = struct.Struct("<H")
_ACQ_PREFIX = 2 + _ACQ_HEADER  # message id + header: where an acquisition's sizes are known
# number_of_samples, active_channels, trajectory_dimensions in one unpack, laid out from the ctypes field offsets
_ACQ_SIZES = struct.Struct(f"<{_NS}xH{_CH - _NS - 2}xH{_TD - _CH - 2}xH")
_IMAGE_HEADER = ctypes.sizeof(ismrmrd.ImageHeader)
_WAVEFORM_HEADER = ctypes.sizeof(ismrmrd.WaveformHeader)
_IMAGE_ITEMSIZE = {ismrmrd.DATATYPE_USHORT: 2, ismrmrd.DATATYPE_SHORT: 2, ismrmrd.DATATYPE_UINT: 4,
                   ismrmrd.DATATYPE_INT: 4, ismrmrd.DATATYPE_FLOAT: 4, ismrmrd.DATATYPE_DOUBLE: 8,
                   ismrmrd.DATATYPE_CXFLOAT: 8, ismrmrd.DATATYPE_CXDOUBLE: 16}


class ProtocolError(ValueError):
    """The stream is malformed; the message is the reason sent to the peer."""


class StreamEnded(EOFError):
    """The peer closed the stream at a message boundary without sending CLOSE."""


@dataclass(frozen=True)
class Limits:
    """Largest accepted messages (bytes).  A scanner readout is kilobytes, an image megabytes."""

    max_text: int = 1 << 20        # CONFIG_TEXT, TEXT, ERROR
    max_header: int = 16 << 20     # the MRD XML header
    max_message: int = 256 << 20   # one acquisition / image / waveform


class Frame:
    """One message exactly as on the wire (``raw``, bytes or a memoryview, includes the 2-byte id), so a relay
    forwards it as is."""

    __slots__ = ("mid", "raw")

    def __init__(self, mid: int, raw: bytes):
        self.mid, self.raw = mid, raw

    @classmethod
    def of(cls, mid: int, payload: bytes = b"") -> "Frame":
        return cls(mid, _U16.pack(mid) + payload)

    @property
    def name(self) -> str:
        return NAMES.get(self.mid, str(self.mid))

    def text(self) -> str:
        """The text of CONFIG_FILE / CONFIG_TEXT / HEADER / TEXT / QUERY / RESPONSE / ERROR; trailing NULs
        (python-ismrmrd-server) removed.  A TEXT or ERROR that is not UTF-8 is read with replacement characters
        (it is only shown; refusing it lost the messages after it)."""
        body = self.raw[2 + {ERROR: 8, CONFIG_FILE: 0, QUERY: 24, RESPONSE: 16}.get(self.mid, 4):]
        if self.mid in (ERROR, TEXT):
            return bytes(body).rstrip(b"\x00").decode("utf-8", errors="replace")
        try:
            return body.split(b"\x00", 1)[0].decode("utf-8") if self.mid == CONFIG_FILE else \
                body.rstrip(b"\x00").decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError(f"{self.name} message is not UTF-8 text: {exc}") from exc

    @property
    def correlation_id(self) -> int:
        """Of a QUERY (after Gadgetron's uint64 reserved field, which must be 0) or a RESPONSE."""
        return struct.unpack_from("<Q", self.raw, 10 if self.mid == QUERY else 2)[0]

    def acquisition_header(self) -> ismrmrd.AcquisitionHeader:
        return ismrmrd.AcquisitionHeader.from_buffer_copy(self.raw[2:2 + _ACQ_HEADER])

    def decode(self):
        """The ismrmrd object (Acquisition, Image, Waveform, header, text), via ismrmrd's deserializer."""
        return next(ProtocolDeserializer(io.BytesIO(self.raw)).deserialize())


def text_frame(mid: int, text: str) -> Frame:
    data = text.encode("utf-8")
    return Frame.of(mid, struct.pack("<Q" if mid == ERROR else "<I", len(data)) + data)


def query_frame(query: str, correlation_id: int = 0) -> Frame:
    data = query.encode("utf-8")
    return Frame.of(QUERY, struct.pack("<QQQ", 0, correlation_id, len(data)) + data)


def response_frame(correlation_id: int, text: str) -> Frame:
    data = text.encode("utf-8")
    return Frame.of(RESPONSE, struct.pack("<QQ", correlation_id, len(data)) + data)


def error_frame(text: str) -> Frame:
    return text_frame(ERROR, text)


def encode(obj) -> bytes:
    """Wire bytes of an ismrmrd object (or ``ConfigText``/``ConfigFile``/TEXT string) via ``ProtocolSerializer``."""
    buf = io.BytesIO()
    ProtocolSerializer(buf).serialize(obj)
    return buf.getvalue()


def config_text(xml: str) -> bytes:
    return encode(ConfigText(xml))


def _acquisition_data_bytes(buf, offset: int) -> int:
    """Trajectory + data bytes of the acquisition whose header starts at ``offset`` in ``buf``."""
    samples, channels, dims = _ACQ_SIZES.unpack_from(buf, offset)
    return samples * (dims * 4 + channels * 8)


def read_frame(read: Callable[[int], bytes], limits: Limits = Limits()) -> Frame:
    """Read one message with ``read(n)`` (a buffered file's ``read``: short only at end of stream).

    Raises :class:`StreamEnded` at a clean end of stream, :class:`ProtocolError` for a truncated message,
    an unknown id or a length over ``limits``.
    """
    head = read(2)
    if len(head) != 2:
        if not head:
            raise StreamEnded("stream ended without CLOSE")
        raise ProtocolError("truncated message: message id ended after 1 byte")
    mid = _U16.unpack(head)[0]
    if mid == ACQUISITION:  # the hot path of a scanner stream: sizes read at the header's field offsets
        h = read(_ACQ_HEADER)
        if len(h) == _ACQ_HEADER:
            n = _acquisition_data_bytes(h, 0)
            if n > limits.max_message:
                raise ProtocolError(f"ACQUISITION message data is {n} bytes, over the limit of {limits.max_message} bytes")
            data = read(n) if n else b""
            if len(data) == n:
                return Frame(mid, head + h + data)
            raise ProtocolError(f"truncated ACQUISITION message: data ended after {len(data)} of {n} bytes")
        raise ProtocolError(f"truncated ACQUISITION message: header ended after {len(h)} of {_ACQ_HEADER} bytes")
    name = NAMES.get(mid, str(mid))
    parts = [head]

    def exact(n: int, what: str) -> bytes:
        data = read(n) if n else b""
        if len(data) != n:
            raise ProtocolError(f"truncated {name} message: {what} ended after {len(data)} of {n} bytes")
        parts.append(data)
        return data

    def check(n: int, cap: int, what: str) -> int:
        if n > cap:
            raise ProtocolError(f"{name} message {what} is {n} bytes, over the limit of {cap} bytes")
        return n

    if mid == CLOSE:
        return Frame(mid, head)
    if mid == CONFIG_FILE:
        exact(CONFIG_FILE_SIZE, "config name")
    elif mid in (CONFIG_TEXT, HEADER, TEXT):
        n = struct.unpack("<I", exact(4, "length"))[0]
        exact(check(n, limits.max_header if mid == HEADER else limits.max_text, "text"), "text")
    elif mid in (ERROR, QUERY, RESPONSE):
        exact({ERROR: 0, QUERY: 16, RESPONSE: 8}[mid], "correlation id")
        n = struct.unpack("<Q", exact(8, "length"))[0]
        exact(check(n, limits.max_text, "text"), "text")
    elif mid == IMAGE:
        h = ismrmrd.ImageHeader.from_buffer_copy(exact(_IMAGE_HEADER, "header"))
        itemsize = _IMAGE_ITEMSIZE.get(h.data_type)
        if itemsize is None:
            raise ProtocolError(f"IMAGE message has unknown data_type {h.data_type}")
        n_attr = check(struct.unpack("<Q", exact(8, "attribute length"))[0], limits.max_text, "attribute string")
        n = h.channels * h.matrix_size[0] * h.matrix_size[1] * h.matrix_size[2] * itemsize
        exact(n_attr, "attributes")
        exact(check(n, limits.max_message, "data"), "data")
    elif mid == WAVEFORM:
        h = ismrmrd.WaveformHeader.from_buffer_copy(exact(_WAVEFORM_HEADER, "header"))
        exact(check(h.channels * h.number_of_samples * 4, limits.max_message, "data"), "data")
    else:
        raise ProtocolError(f"unknown message id {mid}")
    return Frame(mid, b"".join(parts))


_CHUNK = 1 << 24  # a large message is received 16 MiB at a time


def readable(sock, seconds: float) -> bool:
    """Whether ``sock`` has input (or its end, or an error) within ``seconds`` (rounded up to the next ms: False
    means the time is up); poll, not select, so any descriptor number works."""
    poller = select.poll()
    poller.register(sock, select.POLLIN | select.POLLHUP | select.POLLERR)
    return bool(poller.poll(int(seconds * 1000) + 1))


class FrameReader:
    """Messages from a socket, received in large chunks: one ``recv_into`` brings in many readouts, and
    :attr:`buffered` tells a relay whether more input is already here, so it flushes its output only when its
    input runs dry, with no ``select`` per message.  Every message is checked by :func:`read_frame`'s rules.
    Acquisitions, the bulk of a stream, are returned without a copy: their ``raw`` is a memoryview into the
    receive buffer, which is therefore never overwritten (a full buffer is replaced by a fresh one and lives on
    while frames point into it).  Whoever keeps such a frame for long copies it (``bytes(frame.raw)``)."""

    def __init__(self, sock, limits: Limits = Limits(), size: int = 1 << 20, message_timeout: Optional[float] = None):
        self._sock, self.limits = sock, limits
        self._buf = np.empty(size, np.uint8)  # (not bytearray(size): that zeroes every new 1 MiB buffer)
        self._view = memoryview(self._buf)
        self._start = self._end = 0
        # deadlines (time.monotonic()) that raise socket.timeout: each message must be complete within
        # ``message_timeout`` of the call that reads it (a client dripping a byte at a time cannot hold a session),
        # and :attr:`deadline`, when set, bounds every read (e.g. the configuration phase)
        self.message_timeout, self.deadline = message_timeout, None
        self._until: Optional[float] = None

    def _recv_into(self, view) -> int:
        if self._until is not None:  # waited for with poll: the socket's own timeout (its sends') is left alone
            left = self._until - time.monotonic()
            if left <= 0 or not readable(self._sock, left):
                raise socket.timeout("timed out")
        return self._sock.recv_into(view)

    @property
    def buffered(self) -> int:
        return self._end - self._start

    def _fill(self, need: int) -> None:
        """Receive until ``need`` (at most the buffer size) bytes are buffered, or the stream ends."""
        if self._start + need > len(self._buf):  # a fresh buffer, starting with the unread rest
            rest = self._end - self._start
            buf = np.empty(len(self._buf), np.uint8)
            buf[:rest] = self._view[self._start:self._end]
            self._buf, self._view = buf, memoryview(buf)
            self._start, self._end = 0, rest
        while self._end - self._start < need:
            k = self._recv_into(self._view[self._end:])
            if not k:
                return
            self._end += k

    def read(self, n: int) -> bytes:
        """Exactly ``n`` bytes, fewer only where the stream ends (the ``read`` of :func:`read_frame`)."""
        if n > len(self._buf):  # a message larger than the buffer (a big image): received in chunks, so the
            # memory follows the bytes that arrive, not the length a header claims
            chunks = [bytes(self._view[self._start:self._end])]
            got = len(chunks[0])
            self._start = self._end  # (not rewound to 0: earlier frames may still point into the buffer)
            while got < n:
                chunk = bytearray(min(n - got, _CHUNK))
                view, filled = memoryview(chunk), 0
                while filled < len(chunk):
                    k = self._recv_into(view[filled:])
                    if not k:
                        break
                    filled += k
                chunks.append(view[:filled])
                got += filled
                if filled < len(chunk):  # the stream ended
                    break
            return b"".join(chunks)
        self._fill(n)
        k = min(n, self._end - self._start)
        data = bytes(self._view[self._start:self._start + k])
        self._start += k
        return data

    def frame(self) -> Frame:
        """The next message (:func:`read_frame`: same limits, same errors).  Never waits for more bytes than
        the message needs, so a short last message (CLOSE) is not held up."""
        ends = [t for t in (self.deadline, self.message_timeout and time.monotonic() + self.message_timeout) if t]
        self._until = min(ends) if ends else None
        if self._end - self._start < _ACQ_PREFIX:
            if self._end - self._start < 2:
                self._fill(2)
            if self._end - self._start >= 2 and _U16.unpack_from(self._buf, self._start)[0] == ACQUISITION:
                self._fill(_ACQ_PREFIX)
        s, b = self._start, self._buf
        if self._end - s >= _ACQ_PREFIX and _U16.unpack_from(b, s)[0] == ACQUISITION:
            n = _acquisition_data_bytes(b, s + 2)
            total = _ACQ_PREFIX + n
            if n <= self.limits.max_message and total <= len(b):
                if self._end - s < total:
                    self._fill(total)
                    s = self._start
                if self._end - s >= total:
                    self._start = s + total
                    return Frame(ACQUISITION, self._view[s:s + total])
        return read_frame(self.read, self.limits)

    def frames(self) -> List[Frame]:
        """The next message (:meth:`frame`) and, when it is an acquisition, every further complete acquisition
        already buffered: a relay hands them on as one batch (one queue operation, one lock) instead of one
        at a time."""
        out = [self.frame()]
        if out[0].mid != ACQUISITION:
            return out
        s, end, b, view, cap = self._start, self._end, self._buf, self._view, self.limits.max_message
        while end - s >= _ACQ_PREFIX and _U16.unpack_from(b, s)[0] == ACQUISITION:
            n = _acquisition_data_bytes(b, s + 2)
            if n > cap or end - s < _ACQ_PREFIX + n:
                break  # incomplete (or too large: frame() reports it): left for the next call
            out.append(Frame(ACQUISITION, view[s:s + _ACQ_PREFIX + n]))
            s += _ACQ_PREFIX + n
        self._start = s
        return out


def send_buffers(sock, buffers) -> None:
    """``sendall`` of several buffers without joining them into one (``sendmsg``, partial sends resumed)."""
    views = [memoryview(b) for b in buffers if len(b)]
    i = 0
    while i < len(views):
        sent = sock.sendmsg(views[i:i + 512])
        while sent:
            n = views[i].nbytes
            if sent < n:
                views[i] = views[i][sent:]
                break
            sent -= n
            i += 1


class SocketSink:
    """A ``write``/``flush`` file over a socket that keeps the written ``bytes`` and memoryviews instead of
    copying them, and sends them with one ``sendmsg`` at ``flush`` (or once ``size`` bytes are pending).  Other
    buffers (mutable ctypes headers, bytearrays) are copied; a memoryview must not change after it is written
    (a :class:`FrameReader` frame never does)."""

    def __init__(self, sock, size: int = 1 << 20):
        self._sock, self._size = sock, size
        self._items: list = []
        self._pending = 0

    def write(self, data) -> None:
        if not isinstance(data, (bytes, memoryview)):
            data = bytes(data)
        self._items.append(data)
        self._pending += len(data)
        if self._pending >= self._size:
            self.flush()

    def flush(self) -> None:
        items, self._items, self._pending = self._items, [], 0
        send_buffers(self._sock, items)


class FrameWriter:
    """Thread-safe writer of frames to a socket or file; remembers whether the peer went away."""

    def __init__(self, stream):
        self._stream = stream
        self._lock = threading.Lock()
        self.on_broken: Optional[Callable[[], None]] = None
        self.broken_reason = ""
        self.broken = False
        self.closed = False

    def write(self, data: bytes, flush: bool = True) -> bool:
        """Write (and by default flush); ``flush=False`` lets a relay batch messages into fewer syscalls."""
        return self._write((data,), flush)

    def frame(self, frame: Frame, flush: bool = True) -> bool:
        return self._write((frame.raw,), flush)

    def frames(self, frames: List[Frame], flush: bool = True) -> bool:
        """Several frames under one lock (a relayed batch)."""
        return self._write([f.raw for f in frames], flush)

    def _write(self, buffers, flush: bool) -> bool:
        with self._lock:
            if self.broken or self.closed:
                return False
            try:
                for data in buffers:
                    self._stream.write(data)
                if flush:
                    self._stream.flush()
                return True
            except (OSError, ValueError) as exc:
                self.broken = True
                self.broken_reason = f"{exc}" or type(exc).__name__
        if self.on_broken is not None:
            self.on_broken()
        return False

    def flush(self) -> bool:
        return self.write(b"")

    def error(self, text: str) -> bool:
        return self.frame(error_frame(text))

    def close(self) -> None:
        """Send CLOSE once."""
        if not self.closed:
            self.frame(Frame.of(CLOSE))
            self.closed = True
