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
QUERY = 6
ERROR = 8  # Gadgetron: uint64 length + text; not in ismrmrd's serializer
ACQUISITION = int(ISMRMRDMessageID.ACQUISITION)
IMAGE = int(ISMRMRDMessageID.IMAGE)
WAVEFORM = int(ISMRMRDMessageID.WAVEFORM)
DATA_IDS = (ACQUISITION, IMAGE, WAVEFORM)
NAMES = {CONFIG_FILE: "CONFIG_FILE", CONFIG_TEXT: "CONFIG_TEXT", HEADER: "HEADER", CLOSE: "CLOSE", TEXT: "TEXT",
         QUERY: "QUERY", ERROR: "ERROR", ACQUISITION: "ACQUISITION", IMAGE: "IMAGE", WAVEFORM: "WAVEFORM"}
CONFIG_FILE_SIZE = 1024

_ACQ_HEADER = ctypes.sizeof(ismrmrd.AcquisitionHeader)
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


@dataclass(frozen=True)
class Frame:
    """One message: its id and everything after the id, exactly as on the wire."""

    mid: int
    payload: bytes = b""

    def to_bytes(self) -> bytes:
        return struct.pack("<H", self.mid) + self.payload

    @property
    def name(self) -> str:
        return NAMES.get(self.mid, str(self.mid))

    def text(self) -> str:
        """CONFIG_FILE / CONFIG_TEXT / HEADER / TEXT / ERROR as text; trailing NULs (python-ismrmrd-server) removed."""
        body = self.payload[{ERROR: 8, CONFIG_FILE: 0}.get(self.mid, 4):]
        try:
            return body.split(b"\x00", 1)[0].decode("utf-8") if self.mid == CONFIG_FILE else \
                body.rstrip(b"\x00").decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError(f"{self.name} message is not UTF-8 text: {exc}") from exc

    def acquisition_header(self) -> ismrmrd.AcquisitionHeader:
        return ismrmrd.AcquisitionHeader.from_buffer_copy(self.payload[:_ACQ_HEADER])

    def decode(self):
        """The ismrmrd object (Acquisition, Image, Waveform, header, text), via ismrmrd's deserializer."""
        return next(ProtocolDeserializer(io.BytesIO(self.to_bytes())).deserialize())


def text_frame(mid: int, text: str) -> Frame:
    data = text.encode("utf-8")
    return Frame(mid, struct.pack("<Q" if mid == ERROR else "<I", len(data)) + data)


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
    if not head:
        raise StreamEnded("stream ended without CLOSE")
    mid = _unpack("<H", head, "message id")
    name = NAMES.get(mid, str(mid))
    parts = []

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
        return Frame(mid)
    if mid == CONFIG_FILE:
        exact(CONFIG_FILE_SIZE, "config name")
    elif mid in (CONFIG_TEXT, HEADER, TEXT):
        n = _unpack("<I", exact(4, "length"), "length")
        exact(check(n, limits.max_header if mid == HEADER else limits.max_text, "text"), "text")
    elif mid == ERROR:
        n = _unpack("<Q", exact(8, "length"), "length")
        exact(check(n, limits.max_text, "text"), "text")
    elif mid == ACQUISITION:
        h = ismrmrd.AcquisitionHeader.from_buffer_copy(exact(_ACQ_HEADER, "header"))
        n = h.number_of_samples * (h.trajectory_dimensions * 4 + h.active_channels * 8)
        exact(check(n, limits.max_message, "data"), "data")
    elif mid == IMAGE:
        h = ismrmrd.ImageHeader.from_buffer_copy(exact(_IMAGE_HEADER, "header"))
        itemsize = _IMAGE_ITEMSIZE.get(h.data_type)
        if itemsize is None:
            raise ProtocolError(f"IMAGE message has unknown data_type {h.data_type}")
        n_attr = check(_unpack("<Q", exact(8, "attribute length"), "length"), limits.max_text, "attribute string")
        n = h.channels * h.matrix_size[0] * h.matrix_size[1] * h.matrix_size[2] * itemsize
        exact(n_attr, "attributes")
        exact(check(n, limits.max_message, "data"), "data")
    elif mid == WAVEFORM:
        h = ismrmrd.WaveformHeader.from_buffer_copy(exact(_WAVEFORM_HEADER, "header"))
        exact(check(h.channels * h.number_of_samples * 4, limits.max_message, "data"), "data")
    else:
        raise ProtocolError(f"unknown message id {mid}")
    return Frame(mid, b"".join(parts))


def _unpack(fmt: str, data: bytes, what: str) -> int:
    if len(data) != struct.calcsize(fmt):
        raise ProtocolError(f"truncated message: {what} ended after {len(data)} bytes")
    return struct.unpack(fmt, data)[0]


class FrameWriter:
    """Thread-safe writer of frames to a socket or file; remembers whether the peer went away."""

    def __init__(self, stream):
        self._stream = stream
        self._lock = threading.Lock()
        self.on_broken: Optional[Callable[[], None]] = None
        self.broken = False
        self.closed = False

    def write(self, data: bytes) -> bool:
        with self._lock:
            if self.broken or self.closed:
                return False
            try:
                self._stream.write(data)
                self._stream.flush()
                return True
            except (OSError, ValueError):
                self.broken = True
        if self.on_broken is not None:
            self.on_broken()
        return False

    def frame(self, frame: Frame) -> bool:
        return self.write(frame.to_bytes())

    def error(self, text: str) -> bool:
        return self.frame(error_frame(text))

    def close(self) -> None:
        """Send CLOSE once."""
        if not self.closed:
            self.frame(Frame(CLOSE))
            self.closed = True
