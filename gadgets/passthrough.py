"""Pass-through gadgets: every message goes back unchanged (protocol benchmarks and tests).

``passthrough`` iterates gadgetron-python's ``Connection`` (each message decoded into an ismrmrd object and
encoded again), like ``gadgetron.examples.pass_through``.  ``relay`` only frames the messages
(:func:`dainr_app.protocol.read_frame`) and writes their bytes back, batching writes while more input is
waiting: the cost of the transport alone, which is what the ingest benchmark measures.
"""
from dainr_app.protocol import CLOSE, read_frame, readable


def passthrough(connection) -> None:
    """``<execute name="gadgets.passthrough" target="passthrough" type="python"/>``"""
    for item in connection:
        connection.send(item)


def relay(connection) -> None:
    """``<execute name="gadgets.passthrough" target="relay" type="python"/>``"""
    sock = connection.socket.socket  # after CONFIG and HEADER, which Connection() has read
    with sock.makefile("rb", buffering=1 << 20) as rf, sock.makefile("wb", buffering=1 << 20) as wf:
        while True:
            frame = read_frame(rf.read)
            if frame.mid == CLOSE:
                break
            wf.write(frame.raw)
            if not readable(sock):
                wf.flush()
        wf.flush()
