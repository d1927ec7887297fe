"""Pass-through gadgets: every message goes back unchanged (protocol benchmarks and tests).

``passthrough`` iterates gadgetron-python's ``Connection`` (each message decoded into an ismrmrd object and
encoded again), like ``gadgetron.examples.pass_through``.  ``relay`` only frames the messages
(:class:`dainr_app.protocol.FrameReader`) and sends their bytes back (:class:`~dainr_app.protocol.SocketSink`),
batched while more input is buffered: the cost of the transport alone, which is what the ingest benchmark measures.
"""
from dainr_app.protocol import CLOSE, FrameReader, SocketSink


def passthrough(connection) -> None:
    """``<execute name="gadgets.passthrough" target="passthrough" type="python"/>``"""
    for item in connection:
        connection.send(item)


def relay(connection) -> None:
    """``<execute name="gadgets.passthrough" target="relay" type="python"/>``"""
    sock = connection.socket.socket  # after CONFIG and HEADER, which Connection() has read
    reader, out = FrameReader(sock), SocketSink(sock)
    while True:
        frames = reader.frames()
        if frames[0].mid == CLOSE:
            break
        for frame in frames:
            out.write(frame.raw)
        if not reader.buffered:
            out.flush()
    out.flush()
