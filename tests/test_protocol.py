"""Wire framing (limits, truncation, text conventions) and pipeline XML parsing / name resolution."""
import functools
import io
import random
import socket
import struct
import threading

import ismrmrd
import numpy as np
import pytest

from dainr_app.pipeline import Distributed, External, PipelineError, Policy, load_named, parse_pipeline, \
    pipeline_text, resolve_name
from dainr_app.protocol import ACQUISITION, CLOSE, CONFIG_FILE, CONFIG_TEXT, ERROR, HEADER, IMAGE, TEXT, Frame, \
    FrameReader, Limits, ProtocolError, SocketSink, StreamEnded, encode, error_frame, query_frame, read_frame, \
    response_frame, text_frame
from ismrmrd.serialization import ConfigFile


def _acq(samples=16, channels=2):
    data = (np.arange(channels * samples).reshape(channels, samples) * (1 + 1j)).astype(np.complex64)
    return ismrmrd.Acquisition.from_array(data, np.zeros((samples, 2), np.float32))


def frames_of(data: bytes, limits=Limits()):
    stream, out = io.BytesIO(data), []
    while True:
        try:
            out.append(read_frame(stream.read, limits))
        except StreamEnded:
            return out


def test_message_ids_are_gadgetrons():
    """Every id we put on the wire is Gadgetron's (its Python package's constants; found by a mutation review:
    the harness, server and replay client all import our constants, so an ERROR id of 9 passed every test)."""
    from gadgetron.external import constants as gadgetron_ids

    from dainr_app import protocol

    for msg_id, name in protocol.NAMES.items():
        theirs = {"CONFIG_FILE": "FILENAME", "CONFIG_TEXT": "CONFIG", "IMAGE": "ISMRMRD_IMAGE",
                  "ACQUISITION": "ISMRMRD_ACQUISITION", "WAVEFORM": "ISMRMRD_WAVEFORM"}.get(name, name)
        assert getattr(gadgetron_ids, f"GADGET_MESSAGE_{theirs}") == msg_id, name


def test_frames_round_trip_through_ismrmrd_objects():
    acq = _acq()
    img = ismrmrd.Image.from_array(np.arange(2 * 3 * 4 * 5, dtype=np.complex64).reshape(2, 3, 4, 5), transpose=False)
    img.meta = ismrmrd.Meta({"DataRole": "Image"})  # 2 channels × 3 slices: every dimension counts in the framing
    data = encode(ConfigFile("dainr")) + encode(acq) + encode(img) + encode(ismrmrd.Waveform.from_array(
        np.arange(6, dtype=np.uint32).reshape(2, 3))) + error_frame("boom").raw
    frames = frames_of(data)
    assert [f.mid for f in frames] == [CONFIG_FILE, ACQUISITION, IMAGE, 1026, ERROR]
    assert b"".join(f.raw for f in frames) == data  # relayed byte for byte
    assert frames[0].text() == "dainr" and frames[4].text() == "boom"
    assert np.array_equal(frames[1].decode().data, acq.data) and frames[1].acquisition_header().number_of_samples == 16
    assert np.array_equal(frames[2].decode().data, img.data)


def test_text_limits_are_per_message_kind():
    """The MRD header may be as long as max_header; configuration and other texts only max_text (a mutation review:
    max_header for every text passed)."""
    limits = Limits(max_text=10, max_header=100)
    assert frames_of(text_frame(HEADER, "h" * 50).raw, limits)[0].text() == "h" * 50
    for mid in (CONFIG_TEXT, TEXT):
        with pytest.raises(ProtocolError, match="limit"):
            frames_of(text_frame(mid, "t" * 50).raw, limits)
    with pytest.raises(ProtocolError, match="limit"):
        frames_of(error_frame("e" * 50).raw, limits)


def test_query_and_response_frames():
    q = frames_of(query_frame("gadgetron::info", 7).raw + response_frame(7, "dainr").raw)
    assert [(f.name, f.correlation_id, f.text()) for f in q] == [("QUERY", 7, "gadgetron::info"), ("RESPONSE", 7, "dainr")]
    assert q[0].raw == struct.pack("<HQQQ", 6, 0, 7, 15) + b"gadgetron::info"  # Gadgetron's QueryHandler layout


def test_nul_terminated_text_is_accepted():
    frame = read_frame(io.BytesIO(text_frame(CONFIG_TEXT, "<configuration/>\x00").raw).read)
    assert frame.text() == "<configuration/>"


def test_an_error_or_text_that_is_not_utf8_is_shown_not_refused():
    """A peer's ERROR with invalid UTF-8 raised ProtocolError: the relay and the replay client then dropped the
    messages after it (an image, the peer's CLOSE)."""
    for mid, size in ((ERROR, "<Q"), (TEXT, "<I")):
        frame = read_frame(io.BytesIO(struct.pack("<H" + size[1], mid, 6) + b"ok \xff\xfe!").read)
        assert frame.text() == "ok \ufffd\ufffd!"
    with pytest.raises(ProtocolError, match="not UTF-8"):  # a configuration or header still must be
        read_frame(io.BytesIO(struct.pack("<HI", CONFIG_TEXT, 2) + b"\xff\xfe").read).text()


_SOCKETS: list = []


@pytest.fixture(autouse=True)
def _close_sockets():
    """The test's socket pairs are closed when it ends (not left to the garbage collector)."""
    yield
    while _SOCKETS:
        _SOCKETS.pop().close()


def _socket_reader(data: bytes, pieces: int = 1, size: int = 1 << 20, close: bool = True,
                   limits: Limits = Limits(max_message=1 << 20)):
    """A FrameReader over a socket whose peer sends ``data`` in ``pieces`` random chunks (then closes)."""
    a, b = socket.socketpair()
    _SOCKETS.extend((a, b))
    b.settimeout(10)  # a reader waiting for bytes that never come fails the test instead of hanging it
    cuts = sorted(random.Random(0).sample(range(1, len(data)), pieces - 1)) if pieces > 1 else []

    def send():
        try:
            for lo, hi in zip([0] + cuts, cuts + [len(data)]):
                a.sendall(data[lo:hi])
        except OSError:  # the test ended (and closed the pair) before every byte was read
            return
        if close:
            a.close()
    threading.Thread(target=send, daemon=True).start()
    return FrameReader(b, limits, size=size)


def _frames_from_reader(reader, batches=None):
    """Every frame until the stream ends: one at a time, or with ``FrameReader.frames`` (batches listed)."""
    out = []
    while True:
        try:
            if batches is None:
                out.append(reader.frame())
            else:
                batch = reader.frames()
                batches.append(batch)
                out.extend(batch)
        except StreamEnded:
            return out


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("pieces, size", [(1, 1 << 20), (97, 4096), (5000, 1000)])
def test_frame_reader_matches_read_frame_however_the_stream_is_cut(pieces, size, batched):
    """Chunked reading gives the same frames as read_frame, also when messages straddle receives or are larger
    than the buffer; acquisitions handed out as views stay intact while later data arrives.  ``frames()``
    batches: a message, or a run of acquisitions that were already buffered."""
    img = ismrmrd.Image.from_array(np.arange(40 * 30, dtype=np.float32).reshape(40, 30), transpose=False)
    items = [encode(_acq(16 + 8 * i, 1 + i % 3)) for i in range(40)] + [encode(img), text_frame(CONFIG_TEXT, "x" * 5000).raw]
    data = b"".join(items * 3) + Frame.of(CLOSE).raw
    reader = _socket_reader(data, pieces, size)
    batches = [] if batched else None
    frames = _frames_from_reader(reader, batches)
    assert [bytes(f.raw) for f in frames] == [bytes(f.raw) for f in frames_of(data)]
    assert b"".join(f.raw for f in frames) == data
    assert any(isinstance(f.raw, memoryview) for f in frames)  # the zero-copy path was taken
    if batched:
        assert all(f.mid == ACQUISITION for b in batches if len(b) > 1 for f in b)
        if pieces == 1:  # everything arrives at once: the 40 acquisitions come as a few large batches
            assert max(len(b) for b in batches) >= 10


def test_frame_reader_does_not_wait_for_more_than_the_message():
    """A short last message (CLOSE) is returned while the peer keeps the connection open and silent."""
    reader = _socket_reader(encode(_acq()) + Frame.of(CLOSE).raw, close=False)
    assert reader.frame().mid == ACQUISITION and reader.frame().mid == CLOSE and reader.buffered == 0


def test_socket_sink_sends_everything_in_order_through_partial_sends():
    a, b = socket.socketpair()
    _SOCKETS.extend((a, b))
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    a.settimeout(10)  # non-blocking underneath: sendmsg sends part of a large batch
    header, scratch = ismrmrd.AcquisitionHeader(), bytearray(b"before")
    header.number_of_samples = 7
    parts = [bytes(range(256)) * 200, memoryview(bytes(range(100)) * 3000)[5:], header, scratch, b"", b"end"]
    expected = b"".join(bytes(p) for p in parts)
    got = []
    reader = threading.Thread(target=lambda: got.extend(iter(lambda: b.recv(1 << 16), b"")))
    reader.start()
    sink = SocketSink(a, size=1 << 30)
    for p in parts:
        sink.write(p)
    scratch[:] = b"AFTER!"  # a mutable buffer is copied when written
    sink.flush()
    a.close()
    reader.join(10)
    assert b"".join(got) == expected


@pytest.mark.parametrize("data, reason", [
    (struct.pack("<H", 999), "unknown message id 999"),
    (struct.pack("<HI", CONFIG_TEXT, 0xFFFFFFF0), "over the limit"),
    (struct.pack("<HI", CONFIG_TEXT, 10) + b"abc", "truncated CONFIG_TEXT"),
    (struct.pack("<H", ACQUISITION) + b"\0" * 10, "truncated ACQUISITION"),
    (b"\x08", "truncated"),
    (struct.pack("<HQQQ", 6, 0, 1, 1 << 40), "QUERY message text is 1099511627776 bytes, over the limit"),
    (struct.pack("<HQ", 6, 0), "truncated QUERY message: correlation id"),
])
def test_bad_frames_raise_protocol_error(data, reason):
    with pytest.raises(ProtocolError, match=reason):
        read_frame(io.BytesIO(data).read)
    with pytest.raises(ProtocolError, match=reason):
        _socket_reader(data).frame()


def test_gigabyte_acquisition_is_refused_before_reading_it():
    head = ismrmrd.AcquisitionHeader()
    head.number_of_samples, head.active_channels = 65535, 65535  # claims 34 GB
    stream, requested = io.BytesIO(struct.pack("<H", ACQUISITION) + bytes(head)), []

    def read(n):
        requested.append(n)
        return stream.read(n)
    with pytest.raises(ProtocolError, match="over the limit"):
        read_frame(read, Limits(max_message=1 << 20))
    assert max(requested) == 340  # only the header was read
    reader = _socket_reader(struct.pack("<H", ACQUISITION) + bytes(head), close=False)
    with pytest.raises(ProtocolError, match="over the limit"):  # at once, not after waiting for 34 GB
        reader.frame()
    reader = _socket_reader(encode(_acq()) + struct.pack("<H", ACQUISITION) + bytes(head), close=False)
    assert [f.mid for f in reader.frames()] == [ACQUISITION]  # a batch stops before the oversize one
    with pytest.raises(ProtocolError, match="over the limit"):
        reader.frames()


def test_a_claimed_length_costs_no_memory_until_its_bytes_arrive():
    """A 3.6 kB message claiming 256 MiB took 256 MiB at once (zero-filled), held while the client dripped."""
    import tracemalloc

    head = ismrmrd.AcquisitionHeader()
    head.number_of_samples, head.active_channels = 65535, 500  # 262 MB, under the 256 MiB limit
    tracemalloc.start()
    try:
        reader = _socket_reader(struct.pack("<H", ACQUISITION) + bytes(head) + b"\0" * 100_000, limits=Limits())
        with pytest.raises(ProtocolError, match="truncated ACQUISITION"):
            reader.frame()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 40 << 20, peak  # one 16 MiB chunk (and the 1 MiB receive buffer), not 262 MB
    big = encode(_acq(samples=4096, channels=300))  # 9.8 MB: a large message still arrives whole
    assert bytes(_socket_reader(big, limits=Limits()).frame().raw) == big


XML = ('<configuration><version>2</version><stream>{}</stream></configuration>')
EXT = ('<external><execute name="gadgets.dainr_gadget" target="dainr_recon" type="python"/>'
       '<configuration><property name="steps" value="3"/></configuration></external>')


DIST = ('<distributed><distributor><classname>AcquisitionDistributor</classname>{}</distributor>'
        '<stream>{}</stream></distributed>')


def test_pipeline_text_replaces_property_values_and_refuses_missing_ones():
    xml = pipeline_text("dainr", steps=7, device="cpu")
    node = parse_pipeline(xml).nodes[0]
    assert 'name="steps" value="7"' in node.configuration and 'name="device" value="cpu"' in node.configuration
    with pytest.raises(PipelineError, match="no property 'nonsense'"):
        pipeline_text("dainr", nonsense=1)
    with pytest.raises(PipelineError, match="unknown pipeline"):
        pipeline_text("no_such_pipeline", steps=1)


def test_parse_pipeline_external_and_distributed():
    p = parse_pipeline(XML.format(EXT))
    assert isinstance(p.nodes[0], External) and p.nodes[0].module == "gadgets.dainr_gadget"
    assert 'name="steps"' in p.nodes[0].configuration
    dist = ('<distributed><distributor><classname>AcquisitionDistributor</classname>'
            '<property name="parallel_dimension" value="repetition"/></distributor><stream>' + EXT + '</stream></distributed>')
    d = parse_pipeline(XML.format(dist)).nodes[0]
    assert isinstance(d, Distributed) and d.dimension == "repetition" and isinstance(d.nodes[0], External)
    assert isinstance(parse_pipeline(d.worker_config).nodes[0], External)  # what a worker receives parses


@pytest.mark.parametrize("xml, reason", [
    (XML.format("<gadget><name>N</name><dll>gadgetron_mricore</dll><classname>NoiseAdjustGadget</classname></gadget>"),
     "C\\+\\+ Gadgetron gadget"),
    (XML.format('<external><execute name="os" target="system" type="python"/></external>'), "allowlist"),
    (XML.format('<external><execute name="gadgets.x" target="y" type="matlab"/></external>'), "python only"),
    (XML.format('<external><connect address="evil.example" port="80"/></external>'), "not an allowed host"),
    (XML.format("<parallel/>"), "not supported"),
    (XML.format(""), "empty"),
    ("<gadgetronStreamConfiguration/>", "legacy v1"),
    ("<configuration><version>2</version><stream>", "malformed XML"),
    ('<?xml version="1.0"?><!DOCTYPE lol [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;">]>'
     '<configuration>&b;</configuration>', "DTDs and entities"),
    # parts that were silently ignored, and sizes that were unbounded
    (XML.format(EXT), None),  # (valid: the control)
    (XML.format(EXT).replace("</configuration>", "<stream>" + EXT + "</stream></configuration>"), "one <stream>"),
    (XML.format(EXT.replace("</external>", '<connect address="evil.example" port="80"/></external>')), "not several"),
    (XML.format(DIST.format('<property><name>parallel_dimension</name><value>phase</value></property>', EXT)), None),
    (XML.format(DIST.format('<property name="paralel_dimension" value="phase"/>', EXT)), "not supported"),
    (XML.format(DIST.format('<property name="parallel_dimension" value=""/>', EXT)), "is not one of"),
    (XML.format(EXT * 65), "more than 64 <external>"),
    ("<configuration><stream/></configuration>", r"expected <configuration><version>2</version>, got <configuration> "
                                                 "version none"),
    (XML.format(EXT).replace("<configuration>", "<config>").replace("</configuration>", "</config>"),
     "got <config> version 2"),
    (XML.format('<external><execute name="gadgets.x" type="python"/></external>'),
     r"needs name= \(module\) and target="),
    (XML.format('<external><execute name="gadgets..x" target="y"/></external>'),
     "invalid module/target 'gadgets..x'/'y'"),
    (XML.format('<external><execute name="gadgets.x" target="y()"/></external>'), "invalid module/target"),
    (XML.format('<external><connect address="localhost" port="0"/></external>'), "<connect port='0'> is not a port"),
    (XML.format('<external><configuration/></external>'), "<external> needs <execute> or <connect>"),
    (XML.format(DIST.format("", EXT).replace("AcquisitionDistributor", "ImageDistributor")),
     "<distributor> ImageDistributor is not supported"),
    (XML.format(functools.reduce(lambda inner, _: DIST.format("", inner), range(5), EXT)), "nested more than 4"),
])
def test_unrunnable_pipelines_are_refused(xml, reason):
    if reason is None:  # a valid neighbour of the refused cases
        assert parse_pipeline(xml).nodes
        return
    with pytest.raises(PipelineError, match=reason):
        parse_pipeline(xml)


def test_old_style_distributor_property_is_read():
    d = parse_pipeline(XML.format(DIST.format('<property><name>parallel_dimension</name><value>phase</value>'
                                              '</property>', EXT))).nodes[0]
    assert d.dimension == "phase"
    nested = functools.reduce(lambda inner, _: DIST.format("", inner), range(4), EXT)  # 4 deep: allowed
    assert isinstance(parse_pipeline(XML.format(nested)).nodes[0], Distributed)


def test_allowlist_is_extendable_by_the_operator():
    xml = XML.format('<external><execute name="mysite.recon" target="f" type="python"/></external>')
    assert parse_pipeline(xml, Policy(modules=("gadgets", "mysite"))).nodes[0].module == "mysite.recon"


@pytest.mark.parametrize("name", ["../pipelines/dainr", "/etc/passwd", "sub/dainr", "..", "dainr\\x", ""])
def test_pipeline_names_cannot_escape_the_folder(name):
    with pytest.raises(PipelineError, match="invalid pipeline name"):
        resolve_name(name)


def test_named_pipelines_resolve_and_unknown_names_list_the_available_ones():
    assert load_named("dainr").nodes[0].module == "gadgets.dainr_gadget"
    assert load_named("dainr.xml").source == "dainr.xml"
    with pytest.raises(PipelineError, match="unknown pipeline 'nope'.*dainr.xml"):
        load_named("nope")


def test_connect_refuses_the_servers_own_port_on_this_host_only():
    policy = Policy(connect_hosts=("localhost", "127.0.0.1", "::1", "10.0.0.5"), server_port=9002)
    for host in ("localhost", "127.0.0.1", "::1"):
        with pytest.raises(PipelineError, match="is this server's own port"):
            parse_pipeline(XML.format(f'<external><connect address="{host}" port="9002"/></external>'), policy)
    for host, port in (("10.0.0.5", 9002), ("localhost", 9003)):  # another host's 9002, another port here
        node = parse_pipeline(XML.format(f'<external><connect address="{host}" port="{port}"/></external>'),
                              policy).nodes[0]
        assert node.address == (host, port)
