"""The embedded server: sessions, pipelines, bad input, concurrency, shutdown, stream mode, fuzzing."""
import contextlib
import copy
import ctypes
import gc
import os
import random
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import h5py
import ismrmrd
import numpy as np
import pydicom
import pytest
from ismrmrd.serialization import ConfigFile, ConfigText

from dainr.sim import simulate
from dainr_app.mrd import iter_acquisitions, open_raw, write_raw
from dainr_app.protocol import ACQUISITION, CLOSE, CONFIG_TEXT, ERROR, HEADER, IMAGE, TEXT, ProtocolError, \
    StreamEnded, encode, error_frame, read_frame, text_frame
from dainr_app.replay import ReplayResult, SliceTiming, replay, timing_table

from dainr_app.server import Server, ServerOptions, child_env
from .server_harness import errors, raw_session, running_server, small_pipeline, stream, wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    scans = [simulate(matrix=32, frames=6, spokes=8, coils=3, noise_level=0.02, seed=s) for s in range(2)]
    path = str(tmp_path_factory.mktemp("srv") / "raw.h5")
    write_raw(path, [s.data for s in scans], noise=scans[0].data.noise.numpy())
    return path


def load(path):
    """Header text and fresh acquisitions (tests modify them)."""
    return open_raw(path)[0], list(iter_acquisitions(path))


def images(frames):
    return [f.decode() for f in frames if f.mid == IMAGE]


def settled_history(server) -> int:
    """The number of finished sessions once none is running: an earlier test's aborted session is recorded when its
    thread gets round to it, which a count taken at once (and a check of ``history[-1]``) could race."""
    assert wait_until(lambda: not server.sessions, 30)
    return len(server.history)


def test_passthrough_returns_every_message_in_order(server, raw):
    header, acqs = load(raw)
    frames = raw_session(server.port, stream(ConfigFile("passthrough"), header, acqs))
    back = [f for f in frames if f.mid == ACQUISITION]
    assert errors(frames) == [] and frames[-1].mid == CLOSE
    assert [f.raw for f in back] == [encode(a) for a in acqs]


def test_relay_gadget_returns_the_bytes_unchanged(server, raw):
    header, acqs = load(raw)
    frames = raw_session(server.port, stream(ConfigFile("relay"), header, acqs))
    assert errors(frames) == [] and [f.raw for f in frames if f.mid == ACQUISITION] == [encode(a) for a in acqs]


def test_replay_client_reconstructs_two_slices_and_times_them(server, raw):
    header, acqs = load(raw)
    res = replay(iter(acqs), header, ("127.0.0.1", server.port), config_xml=small_pipeline(steps=5, preview="true",
                                                                                             preview_steps=2))
    assert res.errors == []
    assert sorted(res.images) == [1, 101] and len(res.images[1]) == 12 and len(res.images[101]) == 12
    # one series, each image its own index (Gadgetron's numbering: slice fastest), whichever process made it
    assert {(im.slice, im.image_index) for im in res.images[1]} == \
        {(s, 1 + s + 2 * f) for s in (0, 1) for f in range(6)}
    assert res.readouts == 96 and res.sent == len(acqs)
    for key in ((0, 0, 0, 0), (1, 0, 0, 0)):
        t = res.slices[key]
        assert t.readouts == 48 and t.last_sent <= t.first_image <= t.last_image


def test_replay_of_a_file_that_fails_mid_way_ends_at_once_with_the_reason(server, raw):
    header, acqs = load(raw)

    def damaged():
        yield from acqs[:30]
        raise OSError("Can't read data (wrong B-tree signature)")  # what h5py raises for a damaged record

    t0 = time.monotonic()
    res = replay(damaged(), header, ("127.0.0.1", server.port), config_xml=small_pipeline(), timeout=120)
    assert time.monotonic() - t0 < 30 and res.sent == 30
    assert "replay stopped after 30 items" in res.errors[0] and "B-tree" in res.errors[0], res.errors
    assert replay(iter(acqs), header, ("127.0.0.1", server.port), config_xml=small_pipeline()).errors == []


def test_replay_keeps_the_images_around_one_it_cannot_decode(raw):
    """A server that sends an image ismrmrd cannot decode (an attribute string that is not UTF-8) between two
    good ones: replay reports it and keeps both good images."""
    header = open_raw(raw)[0]
    good = [ismrmrd.Image.from_array(np.full((4, 4), v, np.float32)) for v in (1, 2)]
    raw_good = [encode(im) for im in good]
    cut = 2 + ctypes.sizeof(ismrmrd.ImageHeader)  # message id + image header, then the attribute length
    bad = raw_good[0][:cut] + struct.pack("<Q", 2) + b"\xff\xfe" + raw_good[0][cut + 8:]
    with socket.create_server(("127.0.0.1", 0)) as listener:
        def serve():
            conn, _ = listener.accept()
            with conn:
                conn.sendall(raw_good[0] + bad + raw_good[1] + struct.pack("<H", CLOSE))
                conn.recv(1 << 16)

        threading.Thread(target=serve, daemon=True).start()
        res = replay(iter([]), header, listener.getsockname(), config="x", timeout=30)
    assert [float(im.data.max()) for im in res.images[0]] == [1.0, 2.0]
    assert res.undecodable == 1 and len(res.errors) == 1 and "image message 2 could not be decoded" in res.errors[0]


def test_next_slice_is_accepted_while_the_previous_one_reconstructs(server, raw):
    """The whole scan (both slices and CLOSE) is sent before the first slice's images come back."""
    header, acqs = load(raw)
    res = replay(iter(acqs), header, ("127.0.0.1", server.port), config_xml=small_pipeline(steps=40))
    assert res.errors == [] and len(res.images[1]) == 12
    first_image = min(t.first_image for t in res.slices.values())
    assert res.send_seconds < first_image, (res.send_seconds, first_image)


def test_python_ismrmrd_server_client_conventions(server, raw):
    """client.py sends CONFIG_FILE and NUL-terminated config/header text, plus an optional JSON TEXT."""
    header, acqs = load(raw)
    data = (encode(ConfigFile("passthrough")) + text_frame(HEADER, header + "\x00").raw
            + encode('{"parameters": {}}') + b"".join(encode(a) for a in acqs[:5]) + struct.pack("<H", CLOSE))
    frames = raw_session(server.port, data)
    assert errors(frames) == [] and sum(f.mid == ACQUISITION for f in frames) == 5
    text = small_pipeline().replace("dainr_gadget", "passthrough").replace("dainr_recon", "passthrough") + "\x00"
    frames = raw_session(server.port, text_frame(CONFIG_TEXT, text).raw + stream(ConfigText(""), header, acqs[:3])[
        len(encode(ConfigText(""))):])
    assert errors(frames) == [] and sum(f.mid == ACQUISITION for f in frames) == 3


def test_replay_command_writes_images_dicom_and_reports_server_errors(server, raw, tmp_path, capsys):
    from dainr_app import cli
    from dainr_app.mrd import read_images

    pipeline = tmp_path / "small.xml"
    pipeline.write_text(small_pipeline())
    out, dicom = str(tmp_path / "out.h5"), str(tmp_path / "dicom")
    port = str(server.port)
    assert cli.main(["replay", raw, "-p", port, "-C", str(pipeline), "-o", out, "--dicom", dicom]) == 0
    text = capsys.readouterr().out
    assert "received 12 images" in text and "latency" in text
    assert len(read_images(out)[1]) == 12 and len(os.listdir(os.path.join(dicom, "series_001"))) == 12
    named = str(tmp_path / "named.h5")  # the DICOM files carry the raw data's patient (a mutation review: untested)
    shutil.copy(raw, named)
    ds = ismrmrd.Dataset(named, "dataset", create_if_needed=False)
    hdr = ismrmrd.xsd.CreateFromDocument(ds.read_xml_header())
    hdr.subjectInformation = ismrmrd.xsd.subjectInformationType(patientName="Probe^Patient")
    ds.write_xml_header(ismrmrd.xsd.ToXML(hdr))
    ds.close()
    assert cli.main(["replay", named, "-p", port, "-C", str(pipeline), "-o", str(tmp_path / "n.h5"),
                     "--dicom", str(tmp_path / "ndcm")]) == 0
    first = sorted(os.listdir(tmp_path / "ndcm" / "series_001"))[0]
    assert str(pydicom.dcmread(tmp_path / "ndcm" / "series_001" / first).PatientName) == "Probe^Patient"
    assert cli.main(["replay", raw, "-p", port, "-c", "nope", "-o", out]) == 1
    assert "server error: unknown pipeline 'nope'" in capsys.readouterr().err
    assert cli.main(["replay", raw, "-p", str(_free_port()), "-o", out]) == 1  # the server's side
    assert "cannot connect" in capsys.readouterr().err
    damaged = str(tmp_path / "damaged.h5")  # a readout whose header claims more samples than it stores
    shutil.copy(raw, damaged)
    with h5py.File(damaged, "a") as f:
        rec = f["dataset/data"][20]
        rec["head"]["number_of_samples"] = 100
        f["dataset/data"][20] = rec
    assert cli.main(["replay", damaged, "-p", port, "-C", str(pipeline), "-o", out]) == 2  # the file's fault
    err = capsys.readouterr().err
    assert "dainr replay: error: " in err and "replay stopped after 20 items" in err and "acquisition 20" in err
    assert "server error: replay stopped" not in err
    # refused before connecting: both -c and -C (-C won silently), an empty -C file ("not both", misleading),
    # a timeout that is not a positive number (a session was opened, then a socket error)
    empty = tmp_path / "empty.xml"
    empty.write_text(" \n")
    sessions = settled_history(server)
    notes = tmp_path / "notes.txt"  # an existing file that is not HDF5: found only after the whole reconstruction
    notes.write_text("someone's notes")
    for args, reason in ((["-c", "relay", "-C", str(pipeline)], "(-c) or a local pipeline XML (-C), not both"),
                         (["-C", str(empty)], "empty.xml: the pipeline XML file is empty"),
                         (["-C", str(pipeline), "-o", str(notes)], "notes.txt exists and is not an HDF5 file")):
        assert cli.main(["replay", raw, "-p", port, "-o", out, *args]) == 2
        assert reason in capsys.readouterr().err
    assert notes.read_text() == "someone's notes"
    for bad in ("0", "-1", "nan"):
        with pytest.raises(SystemExit):
            cli.main(["replay", raw, "-p", port, "--timeout", bad, "-o", out])
        assert "--timeout" in capsys.readouterr().err
    assert len(server.history) == sessions  # no session was opened


def test_replay_needs_exactly_one_pipeline():
    """Neither a pipeline name nor an XML was refused as "not both"."""
    with pytest.raises(ValueError, match="local pipeline XML$"):
        replay([], "", ("127.0.0.1", _free_port()))
    with pytest.raises(ValueError, match="one of them, not both"):
        replay([], "", ("127.0.0.1", _free_port()), "dainr", "<configuration/>")


# ----------------------------------------------------------------- bad input, one test each

def _expect_error(server, data, pattern, **kw):
    frames = raw_session(server.port, data, **kw)
    errs = errors(frames)
    assert any(pattern in e for e in errs), errs
    assert frames[-1].mid == CLOSE
    return frames


def test_queries_are_answered_before_the_configuration(server, raw, capsys, tmp_path):
    """gadgetron_ismrmrd_client -Q: QUERY (reserved 0, correlation id, text) -> RESPONSE (correlation id, text)."""
    from dainr import __version__
    from dainr_app import cli
    from dainr_app.protocol import QUERY, RESPONSE, query_frame
    from dainr_app.replay import query

    answers, errs = query(("127.0.0.1", server.port), ["dainr::pipelines", "gadgetron::info", "ismrmrd::version"])
    assert errs == []
    assert {"dainr.xml", "passthrough.xml", "relay.xml"} <= set(answers["dainr::pipelines"].split("\n"))
    assert f"dainr serve {__version__}" in answers["gadgetron::info"] and "Pipelines" in answers["gadgetron::info"]
    assert answers["ismrmrd::version"].startswith("1.")
    # a query before the header of a normal session, an unknown one, and one with the reserved field set
    header, acqs = load(raw)
    bad_reserved = query_frame("dainr::version", 9).raw
    bad_reserved = bad_reserved[:2] + struct.pack("<Q", 1) + bad_reserved[10:]
    data = (encode(ConfigFile("passthrough")) + query_frame("dainr::version", 41).raw + query_frame("what", 2).raw
            + bad_reserved + stream(ConfigText(""), header, acqs[:3])[len(encode(ConfigText(""))):])
    frames = raw_session(server.port, data)
    responses = [f for f in frames if f.mid == RESPONSE]
    assert [(f.correlation_id, f.text()) for f in responses] == [(41, __version__)]
    errs = errors(frames)
    assert len(errs) == 2 and "unknown query 'what'; known:" in errs[0] and "reserved" in errs[1]
    assert sum(f.mid == ACQUISITION for f in frames) == 3 and frames[-1].mid == CLOSE
    assert QUERY == 6 and RESPONSE == 7
    assert cli.main(["replay", "-p", str(server.port), "--query", "dainr::version", "--query", "dainr::version"]) == 0
    assert capsys.readouterr().out.strip() == __version__  # (asked once)
    assert cli.main(["replay", "-p", str(server.port), "--query", "nope"]) == 1
    assert "unknown query 'nope'" in capsys.readouterr().err
    # one unknown key costs no other answer (the session goes on), and the replay still runs; the exit status says
    assert cli.main(["replay", "-p", str(server.port), "--query", "nope", "--query", "dainr::version",
                     raw, "-c", "passthrough", "-o", str(tmp_path / "out.h5"), "--quiet"]) == 1
    out, err = capsys.readouterr()
    assert f"dainr::version: {__version__}" in out and "unknown query 'nope'" in err and "sent " in out
    assert cli.main(["replay", "-p", str(server.port)]) == 2  # neither a file nor a query


def test_unknown_pipeline_name(server, raw):
    _expect_error(server, stream(ConfigFile("nope"), load(raw)[0], []), "unknown pipeline 'nope'")


def test_path_escape_in_pipeline_name(server, raw):
    _expect_error(server, stream(ConfigFile("../pipelines/dainr"), load(raw)[0], []), "invalid pipeline name")


def test_malformed_pipeline_xml(server, raw):
    _expect_error(server, stream(ConfigText("<configuration><version>2"), load(raw)[0], []), "malformed XML")


def test_cpp_gadget_is_refused(server, raw):
    xml = ("<configuration><version>2</version><stream><gadget><name>Noise</name><dll>gadgetron_mricore</dll>"
           "<classname>NoiseAdjustGadget</classname></gadget></stream></configuration>")
    _expect_error(server, stream(ConfigText(xml), load(raw)[0], []), "C++ Gadgetron gadget")


def test_header_that_does_not_parse(server):
    _expect_error(server, stream(ConfigFile("passthrough"), "<ismrmrdHeader><bogus/>", []), "MRD header")


def test_messages_out_of_order_get_an_error_naming_what_was_expected(server, raw):
    header, acqs = load(raw)
    config, head = encode(ConfigFile("passthrough")), text_frame(HEADER, header).raw
    for data, pattern in ((head + config, "expected CONFIG_FILE (1) or CONFIG_TEXT (2) first, got HEADER"),
                          (config + encode(acqs[1]), "expected HEADER (3) after the configuration, got ACQUISITION"),
                          (config + head + encode(acqs[1]) + config,
                           "unexpected CONFIG_FILE message in the data stream")):
        frames = _expect_error(server, data + struct.pack("<H", CLOSE), pattern)
        assert len(errors(frames)) == 1
    assert sum(f.mid == ACQUISITION for f in frames) == 1  # the readout before the stray CONFIG still went through


def test_unknown_message_id_after_data_keeps_what_was_received(server, raw):
    header, acqs = load(raw)
    data = stream(ConfigFile("passthrough"), header, acqs[:4], close=False) + struct.pack("<H", 999)
    frames = _expect_error(server, data, "unknown message id 999")
    assert sum(f.mid == ACQUISITION for f in frames) == 4  # nothing received is silently dropped


def test_data_after_close_gets_an_error_and_the_stream_before_it_is_kept(server, raw):
    header, acqs = load(raw)
    # sent with the rest: already in the server's receive buffer when CLOSE is read
    frames = _expect_error(server, stream(ConfigFile("passthrough"), header, acqs[:4]) + encode(acqs[4]),
                           "data after CLOSE ignored")
    assert sum(f.mid == ACQUISITION for f in frames) == 4 and len(errors(frames)) == 1
    # sent later, while the gadget still reconstructs the closed stream (after its first preview, at step 5 of
    # at least 40: the rule's min_steps)
    spokes = [a for a in acqs if not a.flags & 1 and a.idx.slice == 0]
    with socket.create_connection(("127.0.0.1", server.port), timeout=120) as sock, sock.makefile("rb") as rf:
        sock.sendall(stream(ConfigText(small_pipeline(steps=200, preview="true", preview_steps=5)), header, spokes))
        got = [read_frame(rf.read)]
        while got[-1].mid != IMAGE:
            got.append(read_frame(rf.read))
        sock.sendall(encode(spokes[0]))
        while got[-1].mid != CLOSE:
            got.append(read_frame(rf.read))
    assert errors(got) == ["data after CLOSE ignored: CLOSE must be the client's last message"]
    assert sum(im.image_series_index == 1 for im in images(got)) == 6  # the closed stream's frames


@pytest.mark.parametrize("leaves", ["before the preview", "with the preview unread"])
def test_a_client_that_leaves_after_its_close_is_noticed_at_the_preview(server, raw, leaves):
    """The first image sent to a client that has closed completely still goes out (the kernel takes it) and
    only the next send fails: its reset ends the session at the preview, not when the whole fit is done. A
    client that closes with the preview unread sends the reset itself (no end of stream first)."""
    header, acqs = load(raw)
    spokes = [a for a in acqs if not a.flags & 1 and a.idx.slice == 0]
    done = settled_history(server)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(stream(ConfigText(small_pipeline(steps=100000, preview="true", preview_steps=5,
                                                      holdout_spokes=0, max_seconds=60)), header, spokes))
        if leaves == "before the preview":
            time.sleep(0.3)
        else:
            assert select.select([sock], [], [], 60)[0]
            time.sleep(1.0)
    t0 = time.monotonic()  # (gone, without reading anything)
    assert wait_until(lambda: len(server.history) > done, 40)
    assert server.history[-1]["aborted"] and server.history[-1]["sent"] <= 6  # at most the preview series
    assert time.monotonic() - t0 < 40  # (the fit alone runs 60 s)


def test_a_stream_without_imaging_readouts_gets_an_error(server, raw):
    header, acqs = load(raw)
    noise = [a for a in acqs if a.flags & 1]  # ACQ_IS_NOISE_MEASUREMENT
    frames = _expect_error(server, stream(ConfigText(small_pipeline()), header, noise), "no imaging readouts")
    assert not images(frames)


def test_truncated_message(server, raw):
    header, acqs = load(raw)
    data = stream(ConfigFile("passthrough"), header, acqs[:3], close=False) + encode(acqs[3])[:100]
    frames = _expect_error(server, data, "truncated ACQUISITION")
    assert sum(f.mid == ACQUISITION for f in frames) == 3


def test_length_fields_claiming_gigabytes(server, raw):
    header = load(raw)[0]
    t0 = time.monotonic()
    _expect_error(server, struct.pack("<HI", CONFIG_TEXT, 0xFFFFFFF0), "over the limit")
    head = ismrmrd.AcquisitionHeader()
    head.number_of_samples, head.active_channels = 65535, 65535
    data = stream(ConfigFile("passthrough"), header, [], close=False) + struct.pack("<H", ACQUISITION) + bytes(head)
    _expect_error(server, data, "over the limit")
    assert time.monotonic() - t0 < 10


def test_zero_sample_acquisition_is_reported_and_the_slice_still_reconstructs(server, raw):
    header, acqs = load(raw)
    empty = ismrmrd.Acquisition.from_array(np.zeros((3, 0), np.complex64))
    empty.scan_counter = 4242
    items = acqs[:60] + [empty] + acqs[60:]
    frames = _expect_error(server, stream(ConfigText(small_pipeline()), header, items),
                           "1 readouts with 0 samples were passed on, not reconstructed")
    assert len(images(frames)) == 12
    assert [f.decode().scan_counter for f in frames if f.mid == ACQUISITION] == [4242]  # passed on, not dropped


def test_nan_data_is_reported_per_slice_and_other_slices_survive(server, raw):
    header, acqs = load(raw)
    bad = next(a for a in acqs if a.idx.slice == 1 and not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT))
    bad.data[0, 3] = np.nan
    frames = _expect_error(server, stream(ConfigText(small_pipeline()), header, acqs), "NaN/Inf")
    assert {im.slice for im in images(frames)} == {0} and len(images(frames)) == 6


def test_header_claiming_a_huge_matrix_is_refused_per_slice_not_by_the_oom_killer(server, raw):
    header, acqs = load(raw)
    recon_space = header.index("<reconSpace>")
    huge = header[:recon_space] + header[recon_space:].replace("<x>32</x>", "<x>20000</x>", 1).replace(
        "<y>32</y>", "<y>20000</y>", 1)
    t0 = time.monotonic()
    frames = _expect_error(server, stream(ConfigText(small_pipeline()), huge, acqs), "matrix 20000")
    assert time.monotonic() - t0 < 60 and images(frames) == []
    assert sum("needs about" in e and "GiB" in e for e in errors(frames)) == 2  # one per slice


def test_stream_without_last_in_slice_flag_is_still_reconstructed(server, raw):
    header, acqs = load(raw)
    for a in acqs:
        a.clear_flag(ismrmrd.ACQ_LAST_IN_SLICE)
    frames = raw_session(server.port, stream(ConfigText(small_pipeline()), header, acqs))
    assert errors(frames) == [] and len(images(frames)) == 12


def test_client_disconnect_mid_stream_does_not_affect_the_next_client(server, raw):
    header, acqs = load(raw)
    done = settled_history(server)
    raw_session(server.port, stream(ConfigText(small_pipeline(steps=200)), header, acqs, close=False)[:-5000],
                close="full")
    assert wait_until(lambda: len(server.history) > done, 30)  # the abandoned session (and its gadget) is gone
    assert server.history[-1]["aborted"] and server.history[-1]["sent"] == 0
    frames = raw_session(server.port, stream(ConfigFile("passthrough"), header, acqs[:3]))
    assert errors(frames) == [] and sum(f.mid == ACQUISITION for f in frames) == 3


def test_finished_sessions_leave_no_file_descriptors_for_the_garbage_collector(server, raw):
    header, acqs = load(raw)
    data = stream(ConfigFile("passthrough"), header, acqs[:3])
    raw_session(server.port, data)  # (the first session may start the fork server)
    gc.collect()
    gc.disable()  # a long-running server must not depend on the cyclic collector for its descriptors
    try:
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(4):
            assert raw_session(server.port, data)[-1].mid == CLOSE
        assert wait_until(lambda: len(os.listdir("/proc/self/fd")) <= before, timeout=5), \
            (before, len(os.listdir("/proc/self/fd")))
    finally:
        gc.enable()


def test_finished_sessions_are_freed_without_the_garbage_collector(server, raw, monkeypatch):
    """A session, its stages and their buffers formed reference cycles: six large sessions held 2 GB until a
    cyclic collection. Checked with a relay and with a distributor around it (noise kept for later channels)."""
    import weakref

    from dainr_app import server as server_module

    monkeypatch.delenv("GADGETRON_REMOTE_WORKER_COMMAND", raising=False)
    alive, init = [], server_module.Session.__init__

    def recording(self, *args, **kw):
        init(self, *args, **kw)
        alive.append(weakref.ref(self))
    monkeypatch.setattr(server_module.Session, "__init__", recording)
    header, acqs = load(raw)
    relay = '<external><execute name="gadgets.passthrough" target="relay" type="python"/></external>'
    distributed = ("<distributed><distributor><classname>AcquisitionDistributor</classname><property "
                   f"name='parallel_dimension' value='slice'/></distributor><stream>{relay}</stream></distributed>")
    gc.collect()
    gc.disable()
    try:
        for inner in (relay, distributed):
            xml = f"<configuration><version>2</version><stream>{inner}</stream></configuration>"
            frames = raw_session(server.port, stream(ConfigText(xml), header, acqs[:40]))
            assert errors(frames) == [] and sum(f.mid == ACQUISITION for f in frames) == 40
        assert len(alive) == 2 and wait_until(lambda: all(ref() is None for ref in alive), timeout=10)
    finally:
        gc.enable()


def test_the_distributors_noise_copy_is_bounded_and_what_it_drops_is_reported(raw, monkeypatch):
    monkeypatch.delenv("GADGETRON_REMOTE_WORKER_COMMAND", raising=False)
    header, acqs = load(raw)
    noise = [a for a in acqs if a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)]
    imaging = [a for a in acqs if not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)][:10]
    size = len(encode(noise[0]))
    xml = ("<configuration><version>2</version><stream><distributed><distributor><classname>AcquisitionDistributor"
           "</classname><property name='parallel_dimension' value='slice'/></distributor><stream><external><execute "
           "name='gadgets.passthrough' target='relay' type='python'/></external></stream></distributed></stream>"
           "</configuration>")
    with running_server(buffer_bytes=5 * size + 10) as srv:  # 5 of the 16 noise readouts
        frames = raw_session(srv.port, stream(ConfigText(xml), header, noise + imaging))
    assert errors(frames) == [f"distributor: {len(noise) - 5} noise readouts past --buffer-mb "
                              f"({(5 * size + 10) / 2 ** 20:g} MiB) were dropped; the channels prewhiten with the first 5"]
    assert sum(f.mid == ACQUISITION for f in frames) == 15


def test_a_distributor_after_a_gadget_reports_a_worker_it_cannot_reach(server, raw, monkeypatch):
    """The channel opens on the upstream gadget's receiver thread, which died with the error in the log: the
    client got only "gadget … ended without CLOSE"."""
    monkeypatch.setenv("GADGETRON_REMOTE_WORKER_COMMAND", f"echo '[\"127.0.0.1:{_free_port()}\"]'")
    header, acqs = load(raw)
    relay = '<external><execute name="gadgets.passthrough" target="relay" type="python"/></external>'
    xml = (f"<configuration><version>2</version><stream>{relay}<distributed><distributor><classname>"
           "AcquisitionDistributor</classname><property name='parallel_dimension' value='slice'/></distributor>"
           f"<stream>{relay}</stream></distributed></stream></configuration>")
    frames = raw_session(server.port, stream(ConfigText(xml), header, acqs[:40]))
    assert len(errors(frames)) == 1 and "cannot connect" in errors(frames)[0], errors(frames)  # (and it ended)
    assert frames[-1].mid == CLOSE


def test_the_server_reads_ahead_of_a_busy_gadget(raw):
    """While the gadget is busy (here: it reads nothing until released), the server keeps taking the scanner's
    data into the session's queue: a 20 MB stream, far more than the sockets buffer, is accepted whole.
    (The replay test above cannot tell: its small scan fits into the kernel's buffers.)"""
    header, acqs = load(raw)
    listener, release = socket.create_server(("127.0.0.1", 0)), threading.Event()

    def gadget():
        conn, _ = listener.accept()
        with conn, conn.makefile("rb") as rf:
            read_frame(rf.read)
            read_frame(rf.read)
            release.wait(60)
            while read_frame(rf.read).mid != CLOSE:
                pass
            conn.sendall(struct.pack("<H", CLOSE))
    threading.Thread(target=gadget, daemon=True).start()
    xml = _pipeline_xml(f'<connect address="localhost" port="{listener.getsockname()[1]}"/>')
    data = stream(ConfigText(xml), header, acqs * 100)
    with running_server() as srv, socket.create_connection(("127.0.0.1", srv.port), timeout=60) as sock:
        sender = threading.Thread(target=sock.sendall, args=(data,), daemon=True)
        sender.start()
        sender.join(30)
        accepted = not sender.is_alive()
        release.set()
        with sock.makefile("rb") as rf:
            frames = [read_frame(rf.read)]
            while frames[-1].mid != CLOSE:
                frames.append(read_frame(rf.read))
    listener.close()
    assert len(data) > 16 << 20 and accepted and errors(frames) == []


def test_a_connect_peer_that_drops_the_connection_is_one_error_without_made_up_numbers(server, raw):
    """A <connect> peer gone mid-stream was reported "…; exit code 0; 0 message(s) not delivered)": it has no
    exit code, and the server cannot count what the peer received but never read."""
    header, acqs = load(raw)
    listener = socket.create_server(("127.0.0.1", 0))

    def peer():  # reads the config, the header and 2 readouts, then drops the connection (a crash)
        conn, _ = listener.accept()
        with conn, conn.makefile("rb") as rf:
            for _ in range(4):
                read_frame(rf.read)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST, as a dead process
    threading.Thread(target=peer, daemon=True).start()
    xml = _pipeline_xml(f'<connect address="localhost" port="{listener.getsockname()[1]}"/>')
    frames = raw_session(server.port, stream(ConfigText(xml), header, acqs[:6]))
    listener.close()
    (error,) = errors(frames)
    assert "ended without CLOSE (" in error and "exit code" not in error and "0 message(s)" not in error, error
    assert frames[-1].mid == CLOSE


def test_a_peer_that_closes_early_and_stops_reading_does_not_hang_the_session(raw):
    """After a <connect> peer's CLOSE the sender thread stayed blocked on the peer's full buffers."""
    header, acqs = load(raw)
    listener = socket.create_server(("127.0.0.1", 0))
    done = threading.Event()

    def peer():  # reads the config and header; once the server's sender is stuck on the full socket buffers,
        conn, _ = listener.accept()  # answers CLOSE and holds the socket open without reading
        with conn, conn.makefile("rb") as rf:
            read_frame(rf.read)
            read_frame(rf.read)
            time.sleep(3)
            conn.sendall(struct.pack("<H", CLOSE))
            done.wait(60)
    threading.Thread(target=peer, daemon=True).start()
    xml = _pipeline_xml(f'<connect address="localhost" port="{listener.getsockname()[1]}"/>')
    with running_server() as srv:
        t0 = time.monotonic()
        frames = raw_session(srv.port, stream(ConfigText(xml), header, acqs * 100), timeout=60)  # ~20 MB
        done.set()
    listener.close()
    assert time.monotonic() - t0 < 30 and frames[-1].mid == CLOSE
    assert any("closed before reading all input" in e for e in errors(frames)), errors(frames)


def test_a_gadgets_error_closes_its_input_as_gadgetron_does(raw):
    """Gadgetron's ExternalChannel closes an external gadget's input at the gadget's first ERROR; the embedded
    server kept feeding it, so a gadget that reported an error mid-stream worked here and lost data there."""
    header, acqs = load(raw)
    listener = socket.create_server(("127.0.0.1", 0))
    received = []

    def peer():  # reads one acquisition, reports an error, then reads (slowly) until the server's CLOSE
        conn, _ = listener.accept()
        with conn, conn.makefile("rb") as rf:
            read_frame(rf.read)
            read_frame(rf.read)
            read_frame(rf.read)
            conn.sendall(error_frame("slice 0 failed").raw)
            time.sleep(1)  # meanwhile the server's sender is held by the full socket buffers
            while read_frame(rf.read).mid != CLOSE:
                received.append(1)
            conn.sendall(struct.pack("<H", CLOSE))
    thread = threading.Thread(target=peer, daemon=True)
    thread.start()
    xml = _pipeline_xml(f'<connect address="localhost" port="{listener.getsockname()[1]}"/>')
    sent = acqs * 100  # ~20 MB: more than the socket buffers hold
    with running_server() as srv:
        frames = raw_session(srv.port, stream(ConfigText(xml), header, sent), timeout=60)
    thread.join(30)
    listener.close()
    assert frames[-1].mid == CLOSE and len(received) < len(sent) - 1
    errs, dropped = errors(frames), len(sent) - 1 - len(received)
    assert errs[0].endswith("slice 0 failed") and any(
        f"{dropped} message(s) not delivered (its ERROR closed its input" in e for e in errs), errs


@pytest.mark.parametrize("dimension", ["user_3", "kspace_encode_step_2"])
def test_the_distributor_takes_gadgetrons_other_dimensions(server, raw, monkeypatch, dimension):
    monkeypatch.delenv("GADGETRON_REMOTE_WORKER_COMMAND", raising=False)
    header, acqs = load(raw)
    acqs = [a for a in acqs if not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)][:30]  # (noise: to every channel)
    for i, a in enumerate(acqs):
        if dimension == "user_3":
            a.idx.user[3] = i % 3
        else:
            a.idx.kspace_encode_step_2 = i % 3
    xml = ("<configuration><version>2</version><stream><distributed><distributor><classname>AcquisitionDistributor"
           f"</classname><property name='parallel_dimension' value='{dimension}'/></distributor><stream><external>"
           "<execute name='gadgets.passthrough' target='relay' type='python'/></external></stream></distributed>"
           "</stream></configuration>")
    frames = raw_session(server.port, stream(ConfigText(xml), header, acqs))
    assert errors(frames) == []
    back = sorted(f.decode().scan_counter for f in frames if f.mid == ACQUISITION)
    assert back == sorted(a.scan_counter for a in acqs)


def test_concurrent_clients_one_crashing(server, raw):
    header, acqs = load(raw)
    crash = ('<configuration><version>2</version><stream><external><execute name="gadgets.passthrough" '
             'target="does_not_exist" type="python"/></external></stream></configuration>')
    results = {}

    def run(name, data):
        results[name] = raw_session(server.port, data)
    jobs = [threading.Thread(target=run, args=(f"ok{i}", stream(ConfigFile("passthrough"), header, acqs)))
            for i in range(3)]
    jobs.append(threading.Thread(target=run, args=("crash", stream(ConfigText(crash), header, acqs))))
    for j in jobs:
        j.start()
    for j in jobs:
        j.join(120)
    for i in range(3):
        assert errors(results[f"ok{i}"]) == [] and sum(f.mid == ACQUISITION for f in results[f"ok{i}"]) == len(acqs)
    assert errors(results["crash"]) and results["crash"][-1].mid == CLOSE


def test_busy_server_refuses_extra_sessions_clearly(raw):
    header, acqs = load(raw)
    with running_server(max_connections=1) as srv:
        sock = socket.create_connection(("127.0.0.1", srv.port))
        sock.sendall(stream(ConfigFile("passthrough"), header, [], close=False))
        assert wait_until(lambda: len(srv.sessions) == 1)
        assert any("server busy" in e for e in errors(raw_session(srv.port, b"")))
        sock.close()


def test_fuzzed_streams_never_kill_the_server_and_always_get_an_answer(server, raw):
    header, acqs = load(raw)
    good = stream(ConfigFile("passthrough"), header, acqs[:4])
    rng = random.Random(1234)
    cases = []
    for i in range(240):
        data = bytearray(good)
        kind = i % 4
        if kind == 0:  # flip bytes
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif kind == 1:  # truncate
            data = data[: rng.randrange(len(data))]
        elif kind == 2:  # splice random bytes in
            pos = rng.randrange(len(data))
            data[pos:pos] = rng.randbytes(rng.randint(1, 64))
        else:  # random message ids / lengths at a message boundary
            data = data[: 2 + 1024] + struct.pack("<HI", rng.choice([3, 5, 7, 999, 1022, 65535]), rng.getrandbits(32))
        cases.append(bytes(data))
    answered = []

    def worker(chunk):
        for data in chunk:
            frames = raw_session(server.port, data, timeout=60)
            answered.append(bool(frames) and frames[-1].mid == CLOSE)
    threads = [threading.Thread(target=worker, args=(cases[k::4],)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert len(answered) == len(cases) and all(answered)
    frames = raw_session(server.port, good)  # still serving
    assert errors(frames) == [] and sum(f.mid == ACQUISITION for f in frames) == 4


# ----------------------------------------------------------------- process-level behaviour

@contextlib.contextmanager
def _sighup_default():
    """Processes started inside get SIGHUP's default action: one the tests run under ignores (nohup, some CI
    runners) would be inherited, and an ignored SIGHUP stays ignored by `dainr serve` (as it should)."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGHUP, previous)


def _cli(*args, **kw):
    env = child_env()
    return subprocess.Popen([sys.executable, "-m", "dainr_app.cli", *args], cwd=ROOT, env=env, **kw)


def test_a_server_started_with_sighup_ignored_keeps_serving_on_sighup():
    """`nohup dainr serve &`: the SIGHUP handler replaced the inherited SIG_IGN, so the terminal closing stopped it."""
    proc = _cli("serve", "-p", "0", stderr=subprocess.PIPE, text=True,
                preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    try:
        while "listening on" not in proc.stderr.readline():
            assert proc.poll() is None
        proc.send_signal(signal.SIGHUP)
        time.sleep(1)
        assert proc.poll() is None  # still serving
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        proc.kill()


def test_a_gadget_whose_session_ended_logs_one_line_not_a_traceback(raw):
    """A client that left mid-stream: the server closes its gadget's connection, and the forked gadget printed a
    ~45-line traceback (ConnectionResetError, then BrokenPipeError from gadgetron-python's Connection.__exit__)
    into the server's log, for 1 in 5 such sessions (a soak review)."""
    from .server_harness import stream
    header, acqs = load(raw)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        code = f"from dainr_app.server import run_external; run_external({listener.getsockname()[1]}, " \
               "'gadgets.passthrough', 'passthrough')"
        proc = subprocess.Popen([sys.executable, "-c", code], env=child_env(), stderr=subprocess.PIPE, text=True)
        listener.settimeout(60)
        conn, _ = listener.accept()
        with conn:
            conn.sendall(stream(ConfigText("<configuration/>"), header, acqs[:3], close=False))
            conn.recv(1)  # the first readout back: the gadget is inside its loop
        err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 1 and "Traceback" not in err, err
    assert "gadget gadgets.passthrough.passthrough: its connection closed: " in err, err


def test_a_lost_forkserver_does_not_fail_a_finished_gadget(raw):
    """The gadgets' forkserver killed (the OOM killer may pick it: it holds torch) during a session: the gadget
    finished and sent CLOSE, but its exit status, which only the forkserver had, read 255, and the client got
    "exited with code 255" for a good session (a soak review)."""
    from multiprocessing import forkserver

    header, acqs = load(raw)
    with running_server() as srv, socket.create_connection(("127.0.0.1", srv.port), timeout=60) as sock:
        sock.sendall(stream(ConfigFile("passthrough"), header, acqs[:3], close=False))
        with sock.makefile("rb") as rf:
            frames = [read_frame(rf.read)]
            while frames[-1].mid != ACQUISITION:  # the gadget runs
                frames.append(read_frame(rf.read))
            os.kill(forkserver._forkserver._forkserver_pid, signal.SIGKILL)
            sock.sendall(b"".join(encode(a) for a in acqs[3:]) + struct.pack("<H", CLOSE))
            while frames[-1].mid != CLOSE:
                frames.append(read_frame(rf.read))
    assert errors(frames) == [] and sum(f.mid == ACQUISITION for f in frames) == len(acqs)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# SIGHUP (the terminal that started it closed, an ssh session dropped) killed the server at once: no ERROR, no CLOSE
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_ends_sessions_with_an_error_and_exits_cleanly(raw, sig):
    from dainr_app.bench_server import Listening

    header, acqs = load(raw)
    with _sighup_default():
        server = Listening("serve")
    proc, port = server.proc, server.port
    try:
        frames = []
        sock = socket.create_connection(("127.0.0.1", port))
        # no CLOSE: the session is still open at the signal however fast the machine fits (an H100 could finish
        # a closed one within the 4 s)
        sock.sendall(stream(ConfigText(small_pipeline(steps=500)), header, acqs, close=False))

        def read():
            with sock.makefile("rb") as rf:
                while True:
                    frames.append(read_frame(rf.read))
                    if frames[-1].mid == CLOSE:
                        return
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        time.sleep(4)
        proc.send_signal(sig)
        assert proc.wait(30) == 0
        reader.join(10)
        assert any("shutting down" in e for e in errors(frames)) and frames[-1].mid == CLOSE
    finally:
        proc.kill()
        log = server.log()
    assert "stopped" in log, log[-2000:]


def test_from_stream_mode_in_a_shell_pipe(raw, tmp_path):
    header, acqs = load(raw)
    data = text_frame(HEADER, header).raw + b"".join(encode(a) for a in acqs) + struct.pack("<H", CLOSE)
    pipeline = tmp_path / "small.xml"
    pipeline.write_text(small_pipeline())
    proc = _cli("serve", "--from_stream", "-c", str(pipeline), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE)
    out, err = proc.communicate(data, timeout=300)
    assert proc.returncode == 0, err.decode()[-2000:]
    import io
    rf, frames = io.BytesIO(out), []
    while not frames or frames[-1].mid != CLOSE:
        frames.append(read_frame(rf.read))
    assert frames[0].mid == HEADER and frames[0].text() == header  # the header is echoed, as Gadgetron does
    assert len(images(frames)) == 12 and rf.read() == b""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_from_stream_mode_ends_with_an_error_and_close_on_sigterm(raw, sig):
    header, acqs = load(raw)
    with _sighup_default():
        proc = _cli("serve", "--from_stream", "-c", "dainr", stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE)
    watchdog = threading.Timer(120, proc.kill)  # a signal it ignores: a failure, not a hang of the suite
    watchdog.start()
    try:
        proc.stdin.write(text_frame(HEADER, header).raw + b"".join(encode(a) for a in acqs[:20]))
        proc.stdin.flush()  # no CLOSE: the stream is still open when the signal comes
        assert read_frame(proc.stdout.read).mid == HEADER
        time.sleep(2)
        proc.send_signal(sig)
        frames = [read_frame(proc.stdout.read)]
        while frames[-1].mid != CLOSE:
            frames.append(read_frame(proc.stdout.read))
        assert proc.wait(30) == 1
    finally:
        watchdog.cancel()
        proc.kill()
    assert errors(frames) == [f"terminated by {sig.name}: the stream's gadgets were stopped"]


def _fire_style_server(reply: bytes):
    """A python-ismrmrd-server stand-in: reads a whole session, answers with ``reply`` (no ERROR message type)."""
    listener = socket.create_server(("127.0.0.1", 0))
    received = []

    def serve():
        conn, _ = listener.accept()
        with conn, conn.makefile("rb") as rf:
            while True:
                frame = read_frame(rf.read)
                received.append(frame.mid)
                if frame.mid == CLOSE:
                    break
            conn.sendall(reply)
        listener.close()
    threading.Thread(target=serve, daemon=True).start()
    return listener.getsockname()[1], received


def test_replay_against_python_ismrmrd_server_conventions(raw):
    header, acqs = load(raw)
    image = ismrmrd.Image.from_array(np.ones((8, 8), np.float32), transpose=False, image_series_index=3)
    reply = (text_frame(5, "INFO: processing\x00").raw + encode(image)
             + text_frame(5, "ERROR: something failed\x00").raw + struct.pack("<H", CLOSE))
    port, received = _fire_style_server(reply)
    res = replay(iter(acqs), header, ("127.0.0.1", port), config="invertcontrast")
    assert received[:2] == [1, HEADER] and received.count(ACQUISITION) == len(acqs) and received[-1] == CLOSE
    assert len(res.images[3]) == 1 and res.texts == ["INFO: processing", "ERROR: something failed"]
    assert res.errors == ["ERROR: something failed"]  # its log channel is how that server reports failures


def test_waveforms_are_replayed_in_time_order_and_pass_through(server, raw, tmp_path):
    from dainr_app.replay import file_items

    path = str(tmp_path / "wav.h5")
    header, acqs = load(raw)
    ds = ismrmrd.Dataset(path, "dataset", create_if_needed=True)
    ds.write_xml_header(header)
    for a in acqs[:20]:
        ds.append_acquisition(a)
    stamps = [acqs[17].acquisition_time_stamp, acqs[19].acquisition_time_stamp]  # imaging readouts 17 and 19
    for t in stamps:
        w = ismrmrd.Waveform.from_array(np.arange(8, dtype=np.uint32).reshape(2, 4))
        w.time_stamp = t
        ds.append_waveform(w)
    ds.close()
    header, items = file_items(path)
    items = list(items)
    kinds = [type(i).__name__ for i in items]
    assert [i for i, k in enumerate(kinds) if k == "Waveform"] == [18, 21] and len(items) == 22  # after 17 and 19
    res = replay(iter(items), header, ("127.0.0.1", server.port), config="passthrough")
    assert res.errors == [] and res.returned == 22


def test_server_embedded_in_code_read_from_stdin_still_launches_gadgets(raw, tmp_path):
    """multiprocessing cannot re-import a __main__ read from stdin; the launcher falls back to spawning."""
    code = ("import logging, sys\n"
            "logging.basicConfig(level=logging.INFO, stream=sys.stderr)  # the server's steps, should it hang\n"
            "from tests.server_harness import running_server\n"
            "from dainr_app.replay import file_items, replay\n"
            f"header, items = file_items({raw!r})\n"
            "with running_server() as srv:\n"
            "    res = replay(items, header, ('127.0.0.1', srv.port), config='passthrough', timeout=90)\n"
            "print(res.errors, res.returned, flush=True)\n")
    # output to files, not pipes: the forkserver the server started keeps the process's stdout and stderr open
    # until its imports end, after the process itself (reading pipes to their end would wait for it too)
    (tmp_path / "code.py").write_text(code)
    with open(tmp_path / "code.py") as stdin, open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        proc = subprocess.Popen([sys.executable, "-"], stdin=stdin, stdout=out, stderr=err, cwd=ROOT, env=child_env())
        try:
            proc.wait(150)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    stdout, stderr = (tmp_path / "out").read_text(), (tmp_path / "err").read_text()[-4000:]
    assert proc.returncode == 0 and stdout.strip().splitlines()[-1:] == ["[] 112"], (proc.returncode, stdout, stderr)


def test_distributed_without_workers_runs_the_inner_stream_locally(server, raw, monkeypatch):
    monkeypatch.delenv("GADGETRON_REMOTE_WORKER_COMMAND", raising=False)
    inner = small_pipeline()[len("<configuration><version>2</version><stream>"):-len("</stream></configuration>")]
    xml = ("<configuration><version>2</version><stream><distributed><distributor>"
           "<classname>AcquisitionDistributor</classname><property name='parallel_dimension' value='slice'/>"
           f"</distributor><stream>{inner}</stream></distributed></stream></configuration>")
    header, acqs = load(raw)
    res = replay(iter(acqs), header, ("127.0.0.1", server.port), config_xml=xml)
    assert res.errors == [] and sorted((im.slice, im.image_index) for im in res.images[1]) == \
        [(s, 1 + s + 2 * f) for s in (0, 1) for f in range(6)]  # each image its own index, though two processes


def test_distributed_locally_starts_at_most_local_channels_chains(raw, monkeypatch):
    """Index values beyond ``local_channels`` share the chains round robin (a stream naming thousands of
    slices must not fork thousands of gadget processes); every slice is still reconstructed."""
    import copy

    from dainr_app import server as server_module

    monkeypatch.delenv("GADGETRON_REMOTE_WORKER_COMMAND", raising=False)
    started = []
    start = server_module.Chain.start
    monkeypatch.setattr(server_module.Chain, "start", lambda self, header: (started.append(self), start(self, header)))
    inner = small_pipeline()[len("<configuration><version>2</version><stream>"):-len("</stream></configuration>")]
    xml = ("<configuration><version>2</version><stream><distributed><distributor>"
           "<classname>AcquisitionDistributor</classname><property name='parallel_dimension' value='slice'/>"
           f"</distributor><stream>{inner}</stream></distributed></stream></configuration>")
    header, acqs = load(raw)
    third = [copy.deepcopy(a) for a in acqs if a.idx.slice == 1 and not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)]
    for a in third:
        a.idx.slice = 2
    with running_server(local_channels=2) as srv:
        res = replay(iter(acqs + third), header, ("127.0.0.1", srv.port), config_xml=xml)
    assert res.errors == [] and sorted({im.slice for im in res.images[1]}) == [0, 1, 2]
    assert len(res.images[1]) == 18 and len(started) == 1 + 2  # the session's chain and two local channels


def test_session_queue_is_bounded_in_bytes():
    """A busy gadget back-pressures the client once --buffer-mb is queued, instead of growing memory."""
    from dainr_app.protocol import Frame
    from dainr_app.server import ByteQueue

    q = ByteQueue(budget=1000)
    q.put([Frame(ACQUISITION, b"x" * 600)])
    blocked = threading.Thread(target=q.put, args=([Frame(ACQUISITION, b"y" * 300)] * 2,), daemon=True)
    blocked.start()
    blocked.join(0.3)
    assert blocked.is_alive() and q.used == 600  # the second batch waits
    assert [f.raw[:1] for f in q.get_batch()] == [b"x"]
    blocked.join(2)
    assert not blocked.is_alive() and q.used == 600
    q.drop_all()  # the consumer is gone: what it had not taken is counted as not delivered ...
    assert q.dropped == 2
    q.put([Frame(ACQUISITION, b"z")] * 2)  # ... and so is what comes after, never queued
    assert q.dropped == 4 and q.get_batch() == [None]


def test_idle_client_gets_a_clear_error_and_what_it_sent_is_processed(raw):
    """As the ERROR says ("those are processed"): an idle client is not a gone one (its data was dropped)."""
    header, acqs = load(raw)
    with running_server(idle_timeout=1.0) as srv:
        sock = socket.create_connection(("127.0.0.1", srv.port))
        sock.sendall(stream(ConfigText(small_pipeline(steps=150)), header, acqs, close=False))  # then nothing
        with sock.makefile("rb") as rf:
            frames = [read_frame(rf.read)]
            while frames[-1].mid != CLOSE:
                frames.append(read_frame(rf.read))
        sock.close()
    n = len(acqs)
    assert errors(frames) == [f"input ended: no complete message within 1 s (after {n} data messages; those are "
                              "processed)"]
    assert len(images(frames)) == 12  # both slices' cines (the fits outlast the timeout)


def _pipeline_xml(external: str) -> str:
    return f"<configuration><version>2</version><stream><external>{external}</external></stream></configuration>"


@pytest.mark.parametrize("module, target, reason", [
    ("gadgets.nosuch", "run", "ModuleNotFoundError: No module named 'gadgets.nosuch'"),
    ("gadgets.passthrough", "nosuch", "TypeError: Unable to initialize suitable target using symbol 'nosuch'"),
])
def test_a_gadget_that_fails_to_load_says_why(server, raw, module, target, reason):
    """The client got only "exited with code 1" (the reason reached the server's log alone)."""
    header, acqs = load(raw)
    xml = _pipeline_xml(f'<execute name="{module}" target="{target}" type="python"/>')
    frames = raw_session(server.port, stream(ConfigText(xml), header, acqs[:3]))
    assert any(reason in e for e in errors(frames)), errors(frames)
    assert frames[-1].mid == CLOSE


def test_shutdown_ends_a_session_waiting_for_its_client_at_once(raw):
    """A client mid-stream (connected, no CLOSE yet) kept the shutdown waiting 10 s, and never got its CLOSE."""
    header, acqs = load(raw)
    with running_server() as srv:
        sock = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
        sock.sendall(stream(ConfigFile("passthrough"), header, acqs[:3], close=False))
        assert wait_until(lambda: srv.sessions, 10)
        t0 = time.monotonic()
        srv.stopping.set()  # what SIGTERM does
        with sock, sock.makefile("rb") as rf:
            frames = [read_frame(rf.read)]
            while frames[-1].mid != CLOSE:
                frames.append(read_frame(rf.read))
        assert time.monotonic() - t0 < 5
    # the reason, then CLOSE: nothing of the stopped gadgets after it (what they returned before it is relayed)
    assert errors(frames) == ["server is shutting down"] and [f.mid for f in frames[-2:]] == [ERROR, CLOSE]
    assert sum(f.mid == ACQUISITION for f in frames) <= 3


def test_a_relayed_image_followed_by_a_text_message_is_not_held_back(raw):
    """Images went out only when no more bytes were buffered after a data message; a TEXT (python-ismrmrd-server's
    log channel) right after the image kept it back until the gadget's CLOSE.  Nor is a burst's last image."""
    header, acqs = load(raw)
    image = ismrmrd.Image.from_array(np.ones((8, 8), np.float32))
    release, burst = threading.Event(), threading.Event()
    listener = socket.create_server(("127.0.0.1", 0))

    def gadget():  # IMAGE + TEXT at its first acquisition, a burst of 2 IMAGEs on request, then CLOSE when released
        conn, _ = listener.accept()
        with conn, conn.makefile("rb") as rf:
            while read_frame(rf.read).mid != ACQUISITION:
                pass
            conn.sendall(encode(image) + text_frame(TEXT, "log line").raw)
            burst.wait(20)
            conn.sendall(encode(image) + encode(image))
            release.wait(20)
            conn.sendall(struct.pack("<H", CLOSE))
            try:  # (the server may end the connection before it forwards the client's CLOSE: no matter here)
                while read_frame(rf.read).mid != CLOSE:
                    pass
            except StreamEnded:
                pass
    threading.Thread(target=gadget, daemon=True).start()
    xml = _pipeline_xml(f'<connect address="localhost" port="{listener.getsockname()[1]}"/>')
    with running_server() as srv, socket.create_connection(("127.0.0.1", srv.port), timeout=30) as sock:
        sock.sendall(stream(ConfigText(xml), header, acqs[:3]))
        t0 = time.monotonic()
        with sock.makefile("rb") as rf:
            first = read_frame(rf.read)
            waited = time.monotonic() - t0
            burst.set()
            t1 = time.monotonic()  # (a mutation review: flushing only while more was buffered kept the last back)
            burst_frames = [read_frame(rf.read).mid for _ in range(2)]
            waited_burst = time.monotonic() - t1
            release.set()
            while read_frame(rf.read).mid != CLOSE:
                pass
    listener.close()
    assert first.mid == IMAGE and waited < 10, (first.name, waited)
    assert burst_frames == [IMAGE, IMAGE] and waited_burst < 10, (burst_frames, waited_burst)


def test_from_stream_mode_fails_when_its_output_reader_goes_away(raw):
    header, acqs = load(raw)
    proc = _cli("serve", "--from_stream", "-c", "passthrough", stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE)
    try:
        proc.stdin.write(text_frame(HEADER, header).raw)
        proc.stdin.flush()
        assert read_frame(proc.stdout.read).mid == HEADER
        proc.stdout.close()  # the consumer is gone
        try:
            for _ in range(20):
                proc.stdin.write(b"".join(encode(a) for a in acqs))
            proc.stdin.write(struct.pack("<H", CLOSE))
            proc.stdin.close()
        except BrokenPipeError:
            pass
        assert proc.wait(60) == 1
    finally:
        proc.kill()
    assert re.search(r"--from_stream: the output failed \(.*Broken pipe.*: its reader went away, or a full disk\)",
                     proc.stderr.read().decode())


def test_query_to_a_server_that_closes_without_answering_is_a_clear_error(capsys):
    """A python-ismrmrd-server closes on an id it does not know: the client crashed with a traceback."""
    from dainr_app import cli

    port, _ = _fire_style_server(b"")
    assert cli.main(["replay", "-Q", "gadgetron::info", "-p", str(port)]) == 1
    assert "server closed the connection without answering" in capsys.readouterr().err


def test_query_reports_the_errors_before_a_close_and_asks_a_repeated_key_once(server):
    from dainr_app.protocol import ERROR, text_frame
    from dainr_app.replay import query

    port, _ = _fire_style_server(text_frame(ERROR, "no such key").raw + struct.pack("<H", CLOSE))
    with pytest.raises(ProtocolError, match="no such key; server closed without answering every query"):
        query(("127.0.0.1", port), ["a", "b"], timeout=10)
    answers, errs = query(("127.0.0.1", server.port), ["dainr::version", "dainr::version"], timeout=30)
    assert list(answers) == ["dainr::version"] and errs == []  # (it waited for a second answer that never came)


def test_query_has_one_deadline_for_all_its_answers():
    """A server that keeps sending other messages held `query` past its timeout (which bounded each receive)."""
    from dainr_app.replay import query

    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def chatter():
        conn, _ = listener.accept()
        with conn:
            while not stop.wait(0.2):
                conn.sendall(text_frame(5, "INFO: still here").raw)
    threading.Thread(target=chatter, daemon=True).start()
    outcome = []

    def ask():
        try:
            query(listener.getsockname(), ["gadgetron::info"], timeout=1.0)
        except ProtocolError as exc:
            outcome.append(str(exc))
    asker = threading.Thread(target=ask, daemon=True)
    asker.start()
    asker.join(5)
    stop.set()
    listener.close()
    assert outcome == ["no answer to every query within 1 s"]


RELAY = '<external><execute name="gadgets.passthrough" target="relay" type="python"/></external>'


def _nested(dims, inner=RELAY) -> str:
    for dim in reversed(dims):
        inner = ("<distributed><distributor><classname>AcquisitionDistributor</classname><property "
                 f"name='parallel_dimension' value='{dim}'/></distributor><stream>{inner}</stream></distributed>")
    return f"<configuration><version>2</version><stream>{inner}</stream></configuration>"


def test_nested_distributors_cannot_multiply_gadget_processes_past_the_limit(raw, monkeypatch):
    """Each block opens up to --local-channels chains, and each chain its own nested blocks: 8⁴ processes from one
    small stream at 4 levels (27 at 3 levels × 3 values were started before)."""
    monkeypatch.delenv("GADGETRON_REMOTE_WORKER_COMMAND", raising=False)
    header, acqs = load(raw)
    acq = [a for a in acqs if not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)][0]
    items = []
    for c in range(3):
        for p in range(3):
            a = copy.deepcopy(acq)
            a.idx.contrast, a.idx.phase = c, p
            items.append(a)
    with running_server(max_gadgets=4) as srv:
        frames = raw_session(srv.port, stream(ConfigText(_nested(["contrast", "phase"])), header, items))
        assert frames[-1].mid == CLOSE and srv.history[-1]["aborted"]
    assert any("the limit (--max-gadgets 4)" in e for e in errors(frames)), errors(frames)
    # the limit is exact: one block over the 3 contrasts opens 3 relays (a mutation review: ">=" → ">" passed)
    for limit, aborted in ((3, False), (2, True)):
        with running_server(max_gadgets=limit) as srv:
            frames = raw_session(srv.port, stream(ConfigText(_nested(["contrast"])), header, items))
            assert srv.history[-1]["aborted"] == aborted, errors(frames)


def test_a_client_must_send_its_configuration_in_time_even_byte_by_byte(raw):
    """Silent or dripping clients held their session slot for the idle timeout (600 s) or for ever: 8 of them
    locked every scanner out."""
    with running_server(config_timeout=1.0) as srv:
        silent = socket.create_connection(("127.0.0.1", srv.port))
        dripping = socket.create_connection(("127.0.0.1", srv.port))
        config = encode(ConfigFile("passthrough"))
        t0, got = time.monotonic(), {}

        def read(name, sock):
            with sock.makefile("rb") as rf:
                frames = [read_frame(rf.read)]
                while frames[-1].mid != CLOSE:
                    frames.append(read_frame(rf.read))
            got[name] = (errors(frames), time.monotonic() - t0)
        readers = [threading.Thread(target=read, args=item, daemon=True)
                   for item in (("silent", silent), ("dripping", dripping))]
        for r in readers:
            r.start()
        for byte in config[:12]:  # one byte every 0.25 s: each receive is quick, the message never completes
            if "dripping" in got:
                break
            dripping.sendall(bytes([byte]))
            time.sleep(0.25)
        for r in readers:
            r.join(10)
        silent.close()
        dripping.close()
    for name in ("silent", "dripping"):
        errs, seconds = got[name]
        assert errs == ["no CONFIG and HEADER within 1 s"] and seconds < 3, (name, errs, seconds)


def test_each_message_must_arrive_whole_within_the_idle_timeout(raw):
    """A byte every 0.25 s kept a session open although --idle-timeout was 1 s (it bounded each receive)."""
    header, acqs = load(raw)
    with running_server(idle_timeout=1.0) as srv:
        sock = socket.create_connection(("127.0.0.1", srv.port))
        sock.sendall(stream(ConfigFile("passthrough"), header, acqs[:3], close=False))
        frames, t0 = [], time.monotonic()

        def read():
            with sock.makefile("rb") as rf:
                frames.append(read_frame(rf.read))
                while frames[-1].mid != CLOSE:
                    frames.append(read_frame(rf.read))
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        for byte in encode(acqs[3])[:40]:
            if not reader.is_alive():
                break
            sock.sendall(bytes([byte]))
            time.sleep(0.25)
        reader.join(10)
        sock.close()
    assert frames and frames[-1].mid == CLOSE and time.monotonic() - t0 < 5
    assert any("no complete message within 1 s" in e for e in errors(frames)), errors(frames)


def test_shutdown_is_not_held_up_by_a_client_that_does_not_read(raw):
    """The shutdown ERROR waited on the writer's lock, held by a send blocked on the silent client: SIGTERM took
    the idle timeout (55 s of 60) per such session."""
    header, acqs = load(raw)
    server = Server(ServerOptions(port=0, idle_timeout=60.0))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    data = stream(ConfigFile("passthrough"), header, acqs * 60, close=False)  # ~10 MB echoed, never read
    threading.Thread(target=lambda: _send_quietly(sock, data), daemon=True).start()
    assert wait_until(lambda: server.sessions and any(s.sent for s in server.sessions), 30)
    time.sleep(1)  # the echo fills the client's buffers: the relay's send blocks
    t0 = time.monotonic()
    server.stopping.set()
    thread.join(30)
    sock.close()
    assert not thread.is_alive() and time.monotonic() - t0 < 8


def _send_quietly(sock, data):
    try:
        sock.sendall(data)
    except OSError:
        pass


def test_a_refused_session_still_gets_its_error_and_close_while_the_client_sends(raw):
    """The socket was closed with the client's input unread: the reset that makes discarded the CLOSE (3 to 5 in
    10 sessions got ERROR, then 'stream ended without CLOSE' or a ConnectionResetError)."""
    header, acqs = load(raw)
    data = stream(ConfigFile("nosuch"), header, acqs * 100)  # ~17 MB, still being sent at the refusal
    with running_server() as srv:
        for _ in range(20):
            sock = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
            threading.Thread(target=_send_quietly, args=(sock, data), daemon=True).start()
            names = []
            with sock.makefile("rb") as rf:
                try:
                    while not names or names[-1] != "CLOSE":
                        names.append(read_frame(rf.read).name)
                except (StreamEnded, OSError) as exc:
                    names.append(type(exc).__name__)
            sock.close()
            assert names == ["ERROR", "CLOSE"], names


def test_a_query_answer_claiming_a_huge_length_costs_no_memory_until_its_bytes_arrive():
    """`replay -Q` read answers through a buffered file, which allocates a claimed length (up to 256 MiB) at once."""
    import tracemalloc

    from dainr_app.replay import query

    listener = socket.create_server(("127.0.0.1", 0))

    def liar():
        conn, _ = listener.accept()
        with conn:
            conn.recv(1 << 16)  # the QUERY and CLOSE (unread input would make our close a reset)
            head = ismrmrd.ImageHeader()
            head.data_type, head.channels, head.matrix_size[:] = ismrmrd.DATATYPE_CXFLOAT, 1, (4096, 4096, 1)
            conn.sendall(struct.pack("<H", IMAGE) + bytes(head) + struct.pack("<Q", 0) + b"x" * 1000)  # 128 MiB
            time.sleep(0.5)
    threading.Thread(target=liar, daemon=True).start()
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError, match="truncated IMAGE"):
            query(listener.getsockname(), ["gadgetron::info"], timeout=5.0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        listener.close()
    assert peak < 40 << 20, peak


def test_a_stream_runs_its_nodes_in_order(server, raw):
    """DA-INR then a relay: the client gets the DA-INR images (a mutation review: with the chain's stages stored in
    reverse the input went to the relay, and every test passed)."""
    header, acqs = load(raw)
    two = small_pipeline(steps=2).replace("</external></stream>", "</external>" + RELAY + "</stream>")
    frames = raw_session(server.port, stream(ConfigText(two), header, acqs))
    assert errors(frames) == [] and frames[-1].mid == CLOSE
    assert sum(f.mid == IMAGE for f in frames) == 12 and not any(f.mid == ACQUISITION for f in frames)


def test_timing_table_latency_is_last_image_after_last_readout():
    res = ReplayResult(slices={(1, 0, 0, 0): SliceTiming(54, last_sent=2.0, first_image=3.5, last_image=9.25),
                               (0, 0, 0, 0): SliceTiming(54, last_sent=1.0)})
    rows = timing_table(res).splitlines()
    assert rows[1].split()[:5] == ["0", "0", "0", "0", "54"] and rows[1].rstrip().endswith("-")  # no images yet
    assert rows[2].split()[-2:] == ["7.25", "s"]  # 9.25 − 2.0: until the slice's last image


def test_a_gadget_process_closed_while_its_session_waits_for_it():
    """SIGTERM during a session: the shutdown closes the gadget's process while the session thread waits for it
    (multiprocessing's join / exitcode then raise 'process object is closed': an internal server error)."""
    from dainr_app.server import Child

    class Process:  # multiprocessing.Process's semantics, the waiter held until the close
        pid = 1

        def __init__(self):
            self.dead, self.closed = threading.Event(), threading.Event()

        def is_alive(self):
            return not self.dead.is_set()

        def kill(self):
            self.dead.set()

        def join(self, timeout=None):
            if self.closed.is_set():
                raise ValueError("process object is closed")
            self.dead.wait(timeout)
            if threading.current_thread() is waiter:
                self.closed.wait(5)

        @property
        def exitcode(self):
            if self.closed.is_set():
                raise ValueError("process object is closed")
            return -9 if self.dead.is_set() else None

        def close(self):
            self.closed.set()
            time.sleep(0.2)  # (the waiter reads the exit code while close() is still running)

    child = Child(Process())
    got = []
    waiter = threading.Thread(target=lambda: got.append(child.wait(30)))
    waiter.start()
    time.sleep(0.1)
    child.close()
    waiter.join(10)
    assert got == [-9] and child.wait(0) == -9 and not child.alive()


def test_the_server_survives_accept_failures(caplog):
    """Out of file descriptors (a client opening connections by the hundred), accept() raises EMFILE: the server
    stopped for good on any accept error. It retries, pausing (the pending connection stays queued: no busy
    loop) and warning once, not per failure."""
    import errno
    import logging

    from dainr_app.replay import query

    class Listener:  # the server's listening socket, whose accept fails for a while
        def __init__(self, sock, failures):
            self.sock, self.failures, self.calls = sock, failures, 0

        def accept(self):
            self.calls += 1
            if self.failures:
                self.failures -= 1
                raise OSError(errno.EMFILE, "Too many open files")
            return self.sock.accept()

        def __getattr__(self, name):
            return getattr(self.sock, name)

    server = Server(ServerOptions(port=0))
    server.listener = Listener(server.listener, 5)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    with caplog.at_level(logging.WARNING, logger="dainr.server"):
        thread.start()
        try:
            assert query(("127.0.0.1", server.port), ["dainr::version"], timeout=30)[0]
            assert thread.is_alive() and server.listener.failures == 0
            server.listener.failures = 10 ** 6  # failing on: paced (0.1 s a retry)
            calls = server.listener.calls
            time.sleep(0.5)
            assert server.listener.calls - calls <= 8
        finally:
            server.stopping.set()
            thread.join(30)
    assert not thread.is_alive()
    assert sum("accept failed" in r.getMessage() for r in caplog.records) == 1


def test_the_open_file_limit_rises_to_the_hard_one_and_a_refusal_is_no_failure(monkeypatch):
    import resource

    from dainr_app import cli

    calls = []
    monkeypatch.setattr(resource, "setrlimit", lambda which, limits: calls.append(limits))
    for soft, hard, expected in ((1024, 4096, (4096, 4096)), (1024, resource.RLIM_INFINITY,
                                                              (65536, resource.RLIM_INFINITY)), (4096, 4096, None)):
        calls.clear()
        monkeypatch.setattr(resource, "getrlimit", lambda which: (soft, hard))
        cli.raise_open_file_limit()
        assert calls == ([expected] if expected else [])

    def refuse(which, limits):
        raise ValueError("not allowed")
    monkeypatch.setattr(resource, "getrlimit", lambda which: (1024, 4096))
    monkeypatch.setattr(resource, "setrlimit", refuse)
    cli.raise_open_file_limit()  # (the server starts with the limit it has)
    # and `dainr serve` raises it
    raised = []
    monkeypatch.setattr(cli, "raise_open_file_limit", lambda: raised.append(True))
    assert cli.main(["serve", "--from_stream", "-c", "no-such-pipeline"]) == 2 and raised  # (before the pipeline)


def test_serve_raises_its_open_file_limit():
    """Sessions hold sockets, pipes and gadget processes: at a soft limit of 1024 descriptors a few hundred
    connections exhausted them."""
    code = ("import resource; from dainr_app.cli import raise_open_file_limit; "
            "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]; "
            "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)); raise_open_file_limit(); "
            "soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]; "
            "print(soft == hard or (hard == resource.RLIM_INFINITY and soft >= 65536))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=child_env())
    assert res.stdout.strip() == "True", res.stderr


def test_a_clients_text_cannot_forge_log_lines(server, raw, caplog):
    import logging

    header, acqs = load(raw)
    forged = "x\n2026-11-26 09:00:00,000 INFO dainr.server: client 10.0.0.5:4242 pipeline=dainr.xml: forged"
    data = stream(ConfigFile("passthrough"), header, [], close=False) + text_frame(TEXT, forged).raw + \
        encode(acqs[0]) + struct.pack("<H", CLOSE)
    with caplog.at_level(logging.INFO, logger="dainr.server"):
        frames = raw_session(server.port, data)
    assert errors(frames) == [] and sum(f.mid == ACQUISITION for f in frames) == 1
    texts = [r.getMessage() for r in caplog.records if "client text" in r.getMessage()]
    assert len(texts) == 1 and "\n" not in texts[0] and "forged" in texts[0]


def test_a_pipeline_cannot_connect_back_into_the_server(server, raw):
    """Nested <connect>s to the server's own port held a session slot at every level: one client took them all."""
    header = load(raw)[0]
    for host in ("localhost", "127.0.0.1"):
        xml = _pipeline_xml(f'<connect address="{host}" port="{server.port}"/>')
        _expect_error(server, stream(ConfigText(xml), header, []), "is this server's own port")


def test_an_interrupted_replay_writes_the_images_it_received(raw, tmp_path):
    """Ctrl-C during `dainr replay` (a long scan, a server that stopped answering) printed a traceback and wrote
    nothing: the images already received were lost. A server here sends one image and then nothing."""
    image = ismrmrd.Image.from_array(np.ones((8, 8), np.float32), transpose=False)
    image.image_series_index = 3
    listener = socket.create_server(("127.0.0.1", 0))
    out = tmp_path / "images.h5"

    def default_sigint():  # a runner's background job (`cmd &`) passes SIGINT on ignored: Python then never raises
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    with listener:
        proc = _cli("replay", raw, "-p", str(listener.getsockname()[1]), "-o", str(out), "-c", "dainr",
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
        try:
            listener.settimeout(60)
            conn, _ = listener.accept()
            with conn:
                conn.sendall(encode(image))
                deadline = time.monotonic() + 30
                conn.settimeout(1)
                while time.monotonic() < deadline:  # the client's whole stream (its CLOSE last) has arrived ...
                    data = conn.recv(1 << 20)
                    if data.endswith(struct.pack("<H", CLOSE)) or not data:
                        break
                time.sleep(1)  # ... and the image before it was read
                proc.send_signal(signal.SIGINT)
                stdout, stderr = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    assert "interrupted after 1 images; writing those" in stderr
    with h5py.File(out, "r") as h5:
        assert "image_3" in h5["dataset"] and h5["dataset/image_3/data"].shape[0] == 1


def test_a_gadgets_output_after_its_session_was_aborted_goes_nowhere():
    """A stopped gadget's late ERROR (a partial slice it reconstructed as its input ended) reached the client after
    the session's own reason ("terminated by SIGTERM: the stream's gadgets were stopped"), and was counted."""
    import io

    from dainr_app.protocol import FrameWriter
    from dainr_app.server import Peer, Session

    out = io.BytesIO()
    session = Session(ServerOptions(port=0), FrameWriter(out), "client x", launcher=None)
    session.end("terminated by SIGTERM: the stream's gadgets were stopped")
    sent = out.getvalue()
    ours, gadget = socket.socketpair()
    with ours, gadget:
        emitted = []
        peer = Peer(session, ours, "<configuration/>", "<header/>", emitted.extend, "gadget g")
        image = ismrmrd.Image.from_array(np.ones((4, 4), np.float32), transpose=False)
        gadget.sendall(error_frame("slice 0: 4 spokes for 6 frames").raw + encode(image) + struct.pack("<H", CLOSE))
        peer.finish()
        peer.wait()
    assert session.errors == ["terminated by SIGTERM: the stream's gadgets were stopped"] and emitted == []
    assert out.getvalue() == sent and session.aborted.is_set()


def test_a_session_ends_once_with_its_gadgets_stopped_before_its_reason(monkeypatch):
    """Session.end: the gadgets are stopped first (a stopped gadget's ERROR must not follow the reason), and a
    session that has ended takes no second reason."""
    import io

    from dainr_app.protocol import FrameWriter
    from dainr_app.server import Session, _end_session

    session = Session(ServerOptions(port=0), FrameWriter(io.BytesIO()), "client x", launcher=None)
    stopped_first, error = [], session.error
    monkeypatch.setattr(session, "error", lambda text: (stopped_first.append(session.aborted.is_set()), error(text)))
    session.end("bye")
    _end_session(session, "again")
    assert stopped_first == [True] and session.errors == ["bye"]


def test_a_pipeline_that_fails_to_start_ends_its_session():
    """A chain that cannot start (its <connect> gadget unreachable) reports it and ends the session, reading no
    input."""
    import io

    from dainr_app.pipeline import parse_pipeline
    from dainr_app.protocol import FrameWriter
    from dainr_app.server import Session, Stats, run_session

    pipeline = parse_pipeline(f'<configuration><version>2</version><stream><external><connect address="127.0.0.1" '
                              f'port="{_free_port()}"/></external></stream></configuration>')
    session = Session(ServerOptions(port=0), FrameWriter(io.BytesIO()), "client x", launcher=None)
    run_session(session, lambda: pytest.fail("input read after the chain failed to start"), pipeline, "<header/>",
                Stats())
    assert len(session.errors) == 1 and session.aborted.is_set(), session.errors
