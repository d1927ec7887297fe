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
import struct
import threading
from dataclasses import dataclass
from typing import Callable, Optional

import ismrmrd
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

_ACQ_HEADER = ctypes.sizeof(ismrmrd.AcquisitionHeader)
_NS, _CH, _TD = (getattr(ismrmrd.AcquisitionHeader, f).offset
                 for f in ("number_of_samples", "active_channels", "trajectory_dimensions"))
_U16 = struct.Struct("<H")
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
    """One message exactly as on the wire (``raw`` includes the 2-byte id), so a relay forwards it as is."""

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
        (python-ismrmrd-server) removed."""
        body = self.raw[2 + {ERROR: 8, CONFIG_FILE: 0, QUERY: 24, RESPONSE: 16}.get(self.mid, 4):]
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
            n = _U16.unpack_from(h, _NS)[0] * (_U16.unpack_from(h, _TD)[0] * 4 + _U16.unpack_from(h, _CH)[0] * 8)
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


def readable(sock) -> bool:
    """Whether more bytes are already waiting on ``sock`` (then a relay can defer its flush)."""
    return bool(select.select([sock], [], [], 0)[0])


class FrameWriter:
    """Thread-safe writer of frames to a socket or file; remembers whether the peer went away."""

    def __init__(self, stream):
        self._stream = stream
        self._lock = threading.Lock()
        self.on_broken: Optional[Callable[[], None]] = None
        self.broken = False
        self.closed = False

    def write(self, data: bytes, flush: bool = True) -> bool:
        """Write (and by default flush); ``flush=False`` lets a relay batch messages into fewer syscalls."""
        with self._lock:
            if self.broken or self.closed:
                return False
            try:
                self._stream.write(data)
                if flush:
                    self._stream.flush()
                return True
            except (OSError, ValueError):
                self.broken = True
        if self.on_broken is not None:
            self.on_broken()
        return False

    def frame(self, frame: Frame, flush: bool = True) -> bool:
        return self.write(frame.raw, flush)

    def flush(self) -> bool:
        return self.write(b"")

    def error(self, text: str) -> bool:
        return self.frame(error_frame(text))

    def close(self) -> None:
        """Send CLOSE once."""
        if not self.closed:
            self.frame(Frame.of(CLOSE))
            self.closed = True
