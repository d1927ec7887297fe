import copy
import socket
import subprocess
import sys

import ismrmrd
import numpy as np
import pytest

from dainr import DAINRConfig
from dainr.metrics import psnr_ssim
from dainr.sim import simulate
from dainr_app.mrd import provenance, write_raw
from gadgets.dainr_gadget import options_from_properties

from .gadget_harness import run_gadget

CONFIG = ('<configuration><property name="steps" value="{steps}"/><property name="image_series_index" value="7"/>'
          '{extra}</configuration>')


@pytest.fixture(scope="module")
def two_slices(tmp_path_factory):
    scans = [simulate(matrix=32, frames=6, spokes=9, coils=3, noise_level=0.02, seed=s) for s in range(2)]
    path = str(tmp_path_factory.mktemp("g") / "raw.h5")
    write_raw(path, [s.data for s in scans], noise=scans[0].data.noise.numpy())
    return scans, path


def _load(path):
    """Fresh header and acquisitions for every test (tests modify flags and data in place)."""
    ds = ismrmrd.Dataset(path, "dataset", create_if_needed=False, mode="r")
    try:
        return (ismrmrd.xsd.CreateFromDocument(ds.read_xml_header()),
                [ds.read_acquisition(i) for i in range(ds.number_of_acquisitions())])
    finally:
        ds.close()


def test_execute_mode_two_slices_with_noise_scan(two_slices):
    scans, path = two_slices
    header, acqs = _load(path)
    for a in acqs:
        a.measurement_uid = 4242
    run = run_gadget(CONFIG.format(steps=120, extra=""), header, acqs)
    assert run.errors == [] and run.returncode == 0, run.log[-2000:]
    assert len(run.images) == 12
    for s, scan in enumerate(scans):
        imgs = sorted((im for im in run.images if im.slice == s), key=lambda im: im.image_index)
        assert [im.image_index for im in imgs] == [1 + s + 2 * f for f in range(6)]  # each image its own index
        assert [im.phase for im in imgs] == list(range(6))
        assert all(im.image_series_index == 7 and im.measurement_uid == 4242 for im in imgs)
        assert [im.physiology_time_stamp[0] for im in imgs] == [9 * f + 4 for f in range(6)]  # middle spokes'
        frames = np.stack([im.data[0, 0] for im in imgs])
        ours = psnr_ssim(frames, scan.ground_truth)["psnr"]
        zf = psnr_ssim(simple_zero_filled(scan), scan.ground_truth)["psnr"]
        assert ours > zf + 3, (ours, zf)
    meta = ismrmrd.Meta.deserialize(run.images[0].attribute_string)
    assert meta["GADGETRON_DataRole"] == "Image" and "steps" in meta["ImageProcessingHistory"]


def simple_zero_filled(scan):
    from dainr import zero_filled

    return zero_filled(scan.data).numpy()


def test_close_without_last_in_slice_still_reconstructs(two_slices):
    header, acqs = _load(two_slices[1])
    trimmed = [a for a in acqs if not (a.idx.slice == 1 and not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT))]
    for a in trimmed:
        a.clear_flag(ismrmrd.ACQ_LAST_IN_SLICE)
        a.clear_flag(ismrmrd.ACQ_LAST_IN_MEASUREMENT)
    run = run_gadget(CONFIG.format(steps=5, extra=""), header, trimmed)
    assert run.errors == [] and len(run.images) == 6


def test_failures_become_error_messages_and_other_slices_survive(two_slices):
    header, acqs = _load(two_slices[1])
    bad = []
    for a in acqs:
        if a.idx.slice == 0 and not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT) and a.idx.kspace_encode_step_1 == 3:
            a = ismrmrd.Acquisition.from_array(np.full_like(a.data, np.nan), a.traj)
            a.idx.slice, a.idx.phase = 0, 0
        bad.append(a)
    run = run_gadget(CONFIG.format(steps=5, extra=""), header, bad)
    assert len(run.errors) == 1 and "slice 0" in run.errors[0] and "NaN" in run.errors[0]
    assert len(run.images) == 6 and {im.slice for im in run.images} == {1}
    # Gadgetron closes a gadget's input at its first ERROR: sent at once, it lost every later slice at a scanner
    assert run.errors_come_last() and run.sent == len(bad)


def test_bad_property_is_an_error_message(two_slices):
    header, acqs = _load(two_slices[1])
    run = run_gadget(CONFIG.format(steps="many", extra=""), header, acqs[:3])
    assert len(run.errors) == 2 and "steps" in run.errors[0] and run.images == []
    assert run.errors[1] == "DA-INR: 3 noise readouts not used (the configuration error above)"  # (were "readouts
    # not reconstructed")


def test_buffer_cap_drops_a_slice_that_never_ends_with_an_error(two_slices):
    header, acqs = _load(two_slices[1])
    again = _imaging(_load(two_slices[1])[1], 1)
    for a in _imaging(acqs, 1):
        for flag in (ismrmrd.ACQ_LAST_IN_SLICE, ismrmrd.ACQ_LAST_IN_REPETITION, ismrmrd.ACQ_LAST_IN_MEASUREMENT):
            a.clear_flag(flag)
    from gadgets.dainr_gadget import readout_bytes

    n1 = 2 * len(again)  # slice 1 sent twice before its last readout: 2 x 54 readouts of 3 kB
    noise = sum(a.data.nbytes for a in acqs if a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT))  # counted too
    assert noise + len(again) * readout_bytes(again[0]) < 0.25 * 2 ** 20 < noise + n1 * readout_bytes(again[0])
    run = run_gadget(CONFIG.format(steps=5, extra='<property name="max_buffer_mb" value="0.25"/>'), header,
                     acqs + again)
    assert len(run.errors) == 1 and f"slice 1 (contrast 0, repetition 0, set 0): {n1} readouts dropped" in run.errors[0]
    assert "max_buffer_mb=0.25" in run.errors[0] and {im.slice for im in run.images} == {0} and len(run.images) == 6
    # the well-formed stream under the same cap: each slice is reconstructed, and its buffer freed, at its
    # ACQ_LAST_IN_SLICE (found by a mutation review: a gadget that waited for the end of the stream passed)
    assert 2 * len(again) * readout_bytes(again[0]) > 0.25 * 2 ** 20
    whole = run_gadget(CONFIG.format(steps=5, extra='<property name="max_buffer_mb" value="0.25"/>'), header,
                       _load(two_slices[1])[1])
    assert whole.errors == [] and sorted((im.slice, im.phase) for im in whole.images) == [
        (s, p) for s in (0, 1) for p in range(6)]
    assert options_from_properties({}).max_buffer_mb == 2048
    with pytest.raises(ValueError, match="max_buffer_mb"):
        options_from_properties({"max_buffer_mb": "0"})


def _readout(slice_index: int, last: bool = False, coils: int = 2, samples: int = 64, traj: bool = False):
    acq = ismrmrd.Acquisition.from_array(np.ones((coils, samples), np.complex64),
                                         np.zeros((samples, 2), np.float32) if traj else None)
    acq.idx.slice = slice_index
    if last:
        acq.set_flag(ismrmrd.ACQ_LAST_IN_SLICE)
    return acq


def test_the_buffer_cap_drops_the_slice_that_stopped_growing_not_the_one_streaming_now():
    """Slice 0's end never came (its ACQ_LAST_IN_SLICE lost): under the cap every later slice was dropped in turn
    and slice 0 reconstructed at the end of the stream, 7 of 8 slices lost instead of the one."""
    from gadgets.dainr_gadget import SliceBuffers, readout_bytes

    buffers = SliceBuffers(max_bytes=17.5 * readout_bytes(_readout(0)))
    for _ in range(10):
        assert buffers.add(_readout(0)) is None
    ended = []
    for s in range(1, 8):
        for i in range(10):
            key = buffers.add(_readout(s, last=i == 9))
        acqs, dropped = buffers.pop(key)
        ended.append((key[0], len(acqs), dropped))
    assert ended == [(s, 10, 0) for s in range(1, 8)]
    assert buffers.add(_readout(0)) is None and buffers.keys() == [(0, 0, 0, 0)]
    assert buffers.pop((0, 0, 0, 0)) == ([], 11) and buffers.used == 0
    # interleaved slices (each grows in turn): one slice is lost (the one that grew longest ago), the others whole
    buffers = SliceBuffers(max_bytes=8.5 * readout_bytes(_readout(0)))
    for _ in range(3):
        for s in range(3):
            buffers.add(_readout(s))
    assert {k[0]: len(v) for k, v in buffers.buffers.items()} == {1: 3, 2: 3} and buffers.dropped == {(0, 0, 0, 0): 3}


def test_the_buffer_cap_orders_by_last_growth_evicts_enough_and_only_counts_dropped_slices():
    from gadgets.dainr_gadget import SliceBuffers, readout_bytes

    size = readout_bytes(_readout(0))
    buffers = SliceBuffers(max_bytes=4.5 * size)
    for s in (0, 1, 0, 0):  # slice 0 began first but grew last: slice 1 is the stalest
        buffers.add(_readout(s))
    buffers.add(_readout(2))
    assert buffers.dropped == {(1, 0, 0, 0): 1} and len(buffers.buffers[(0, 0, 0, 0)]) == 3
    buffers = SliceBuffers(max_bytes=4.5 * size)
    for s in (0, 1, 2, 2):
        buffers.add(_readout(s))
    buffers.add(_readout(3, samples=192))  # a readout that needs two buffers' room
    assert buffers.used <= buffers.max_bytes and set(buffers.dropped) == {(0, 0, 0, 0), (1, 0, 0, 0)}
    buffers = SliceBuffers(max_bytes=3.5 * size)
    for s in (0, 0, 0, 0, 1, 1, 1, 0):  # slice 0 dropped itself; its later readout is counted, not buffered
        buffers.add(_readout(s))
    assert len(buffers.buffers[(1, 0, 0, 0)]) == 3 and buffers.dropped == {(0, 0, 0, 0): 5}


def test_the_buffer_cap_counts_what_a_buffered_readout_holds():
    """Only the samples were counted: with acq.traj and each readout's header and objects, 2 coils x 64 samples
    took 2.3 times the memory counted (a 2048 MB cap could hold ~2.8 GB of 4-coil readouts)."""
    import io
    import tracemalloc

    from ismrmrd.serialization import ProtocolDeserializer, ProtocolSerializer

    from gadgets.dainr_gadget import SliceBuffers

    for coils, samples in ((2, 64), (4, 256)):
        stream = io.BytesIO()
        ser = ProtocolSerializer(stream)
        for _ in range(200):
            ser.serialize(_readout(0, coils=coils, samples=samples, traj=True))
        items = ProtocolDeserializer(io.BytesIO(stream.getvalue())).deserialize()
        buffers = SliceBuffers()
        tracemalloc.start()
        try:
            for _ in range(200):  # as the gadget receives them
                buffers.add(next(items))
            held = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        assert 0.8 * buffers.used < held <= buffers.used, (coils, samples, held, buffers.used)


def test_noise_readouts_count_against_the_buffer_cap():
    """The noise scan was kept outside ``max_buffer_mb`` (200 MB of noise under a 1 MB cap)."""
    from gadgets.dainr_gadget import SliceBuffers

    buffers = SliceBuffers(max_bytes=10_000)
    for _ in range(10):  # 1.5 kB each: 6 fit
        noise = ismrmrd.Acquisition.from_array(np.ones((3, 64), np.complex64))
        noise.set_flag(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)
        buffers.add(noise)
    assert (len(buffers.noise), buffers.noise_dropped, buffers.used) == (6, 4, 6 * 1536)


def test_a_misspelt_property_is_an_error_not_the_default():
    """``step``, ``max_second`` or ``devices`` ran the default 3000-step fit on the default device."""
    for props in ({"step": "5"}, {"steps": "5", "max_second": "3", "devices": "cpu"}):
        with pytest.raises(ValueError, match="unknown property 'step'" if "step" in props else
                           "unknown property 'devices', 'max_second'; the DA-INR gadget takes device, seed"):
            options_from_properties(props)
    opts = options_from_properties({"steps": "5", "max_seconds": "3", "device": "cpu", "spokes_per_frame": "9",
                                    "preview": "true", "preview_steps": "7", "preview_series_index": "9"})
    assert (opts.cfg.max_steps, opts.cfg.max_seconds, opts.cfg.device, opts.spokes_per_frame,
            opts.cfg.preview_every, opts.preview_series) == (5, 3.0, "cpu", 9, 7, 9)


def test_integer_properties_written_as_floats_are_taken():
    """down_ratio="2.0" (a configuration written with floats) was an ERROR, though DAINRConfig takes 2.0."""
    opts = options_from_properties({"down_ratio": "2.0", "steps": "300.0", "seed": "1234567890123456789",
                                    "image_series_index": "3.0"})
    assert (opts.cfg.temporal_ratio, opts.cfg.max_steps, opts.cfg.seed, opts.series) == (2, 300, 1234567890123456789, 3)
    more = options_from_properties({"spokes_per_frame": "9.0", "frames_per_step": "2.0", "holdout_spokes": "1.0",
                                    "preview": "true", "preview_steps": "5.0", "preview_series_index": "9.0"})
    assert (more.spokes_per_frame, more.cfg.frames_per_step, more.cfg.holdout_spokes, more.cfg.preview_every,
            more.preview_series) == (9, 2, 1, 5, 9)
    for name, value in (("down_ratio", "2.5"), ("steps", "many"), ("holdout_spokes", "nan"), ("seed", "inf")):
        with pytest.raises(ValueError, match=f"property {name}={value!r}: not an integer"):
            options_from_properties({name: value})


def test_boolean_properties_and_bad_booleans():
    assert options_from_properties({"features": "true"}).cfg.use_features
    assert not options_from_properties({"features": "no"}).cfg.use_features
    assert options_from_properties({}).cfg.use_features is DAINRConfig().use_features
    assert options_from_properties({}).cfg.check_memory
    assert not options_from_properties({"check_memory": "false"}).cfg.check_memory
    assert options_from_properties({"holdout_spokes": "0"}).cfg.holdout_spokes == 0  # a fixed budget
    assert options_from_properties({"cap_grid_ratio": "1"}).cfg.cap_grid_ratio == 1
    with pytest.raises(ValueError, match="cap_grid_ratio"):
        options_from_properties({"cap_grid_ratio": "2"})
    assert options_from_properties({"frames_per_step": "1"}).cfg.batch_frames("cuda") == 1
    assert options_from_properties({}).cfg.batch_frames("cuda") == 4
    with pytest.raises(ValueError, match="frames_per_step"):
        options_from_properties({"frames_per_step": "0"})
    assert options_from_properties({"lr": "1e-3"}).cfg.lr == 1e-3
    for bad in ("0", "nan", "fast"):
        with pytest.raises(ValueError, match="lr"):
            options_from_properties({"lr": bad})
    for prop in ("features", "preview", "check_memory"):
        with pytest.raises(ValueError, match=f"property {prop}='maybe': not a boolean"):
            options_from_properties({prop: "maybe"})


def test_series_indices_must_fit_the_image_header():
    """image_series_index is a uint16: -1 wrote series 65535 and 70000 series 4464, silently."""
    for prop, value in (("image_series_index", "-1"), ("image_series_index", "70000"), ("preview_series_index", "-5")):
        with pytest.raises(ValueError, match=f"property {prop}={value!r}: image series index must be 0..65535"):
            options_from_properties({prop: value})
    assert options_from_properties({"image_series_index": "65535"}).series == 65535  # preview off: no clash
    with pytest.raises(ValueError, match="preview_series_index"):
        options_from_properties({"image_series_index": "65535", "preview": "true"})
    # the preview in the final series: 6 preview and 6 final images of one series, indices twice (accepted)
    with pytest.raises(ValueError, match="preview_series_index=4 is the image_series_index"):
        options_from_properties({"image_series_index": "4", "preview_series_index": "4", "preview": "true"})
    assert options_from_properties({"image_series_index": "4", "preview_series_index": "4"}).series == 4  # no preview


def test_preview_series_comes_before_the_final_one(two_slices):
    opts = options_from_properties({"preview": "true", "preview_steps": "3", "image_series_index": "2"})
    assert opts.preview and opts.cfg.preview_every == 3 and opts.preview_series == 102
    header, acqs = _load(two_slices[1])
    extra = '<property name="preview" value="true"/><property name="preview_steps" value="4"/>'
    run = run_gadget(CONFIG.format(steps=10, extra=extra), header, acqs)
    assert run.errors == []
    for s in (0, 1):
        series = [im.image_series_index for im in run.images if im.slice == s]
        assert series == [107] * 6 + [7] * 6  # the quick preview cine first, then the final one
    preview_meta = ismrmrd.Meta.deserialize(run.images[0].attribute_string)
    assert preview_meta["ImageComment"] == "DA-INR preview"


def _cpu_seconds(pid: int) -> float:
    import os

    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _resident(*options):
    """A `dainr gadget-server` process on a free port (it takes `-p 0` and logs the port)."""
    from dainr_app.bench_server import Listening

    return Listening("gadget-server", *options)


def test_connect_mode_resident_process_serves_two_scans(two_slices):
    import time

    from ismrmrd.serialization import ConfigText, ProtocolSerializer

    from .gadget_harness import connect_gadget, dial

    header, acqs = _load(two_slices[1])
    server = _resident("--connections", "4")
    proc, port = server.proc, server.port
    try:
        # a port probe, then a scan whose Gadgetron goes away without CLOSE: neither may wedge the process
        # (gadgetron-python's reader spun on the closed socket forever: gadgets/connection_eof.py)
        dial(port).close()
        with dial(port) as gone, gone.makefile("wb") as wf:
            ser = ProtocolSerializer(wf)
            for item in [ConfigText(CONFIG.format(steps=5, extra="")), header] + acqs[:20]:
                ser.serialize(item)
        deadline, cpu = time.monotonic() + 30, _cpu_seconds(proc.pid)
        while time.monotonic() < deadline:  # it notices and returns to waiting (its CPU time stops growing) ...
            time.sleep(0.5)
            cpu, before = _cpu_seconds(proc.pid), cpu
            if cpu - before < 0.05:
                break
        time.sleep(2)
        assert _cpu_seconds(proc.pid) - cpu < 0.4  # ... and does not spin meanwhile (that burns the whole 2 s)
        for _ in range(2):  # the same process handles consecutive scans
            run = connect_gadget(port, CONFIG.format(steps=5, extra=""), header, acqs)
            assert run.errors == [] and len(run.images) == 12
        assert proc.wait(60) == 0
        log = server.log()
        assert "ended without CLOSE" in log and "Traceback" not in log, log[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_resident_gadget_answers_a_header_it_cannot_read_with_an_error_and_serves_on(two_slices):
    """Its gadget never started, and the client (Gadgetron) saw only a reset connection; the reason was in the
    resident's log alone (a traceback)."""
    from dainr_app.protocol import CLOSE, ERROR, HEADER, config_text, read_frame, text_frame

    from .gadget_harness import connect_gadget, dial

    header, acqs = _load(two_slices[1])
    server = _resident("--connections", "2")
    try:
        with dial(server.port) as sock, sock.makefile("rb") as rf:
            sock.sendall(config_text(CONFIG.format(steps=5, extra="")) + text_frame(HEADER, "<ismrmrdHeader><bogus/>"
                                                                                    "</ismrmrdHeader>").raw)
            frames = [read_frame(rf.read)]
            while frames[-1].mid != CLOSE:
                frames.append(read_frame(rf.read))
        assert [f.mid for f in frames] == [ERROR, CLOSE]
        assert frames[0].text().startswith("DA-INR gadget-server: the connection's CONFIG or HEADER cannot be read")
        run = connect_gadget(server.port, CONFIG.format(steps=3, extra=""), header, _imaging(acqs, 0))
        assert run.errors == [] and len(run.images) == 6
        assert server.proc.wait(60) == 0
    finally:
        if server.proc.poll() is None:
            server.proc.kill()


def test_the_distributed_connect_pipeline_reaches_the_resident_gadget_slice_by_slice(two_slices):
    """pipelines/dainr_distributed_connect.xml (the distributed pipeline for a real Gadgetron, whose workers keep
    <connect port=> only) run by dainr serve without workers: each slice's chain connects to the one resident
    gadget, which serves them one after another; both slices come back whole."""
    import pathlib

    from dainr_app.replay import file_items, replay

    from .server_harness import running_server

    xml = (pathlib.Path(__file__).resolve().parents[1] / "pipelines" / "dainr_distributed_connect.xml").read_text()
    resident = _resident("--connections", "2")
    try:
        for old, new in (('port="18000"', f'port="{resident.port}"'), ('"steps" value="3000"', '"steps" value="5"'),
                         ('"device" value="auto"', '"device" value="cpu"')):
            assert old in xml
            xml = xml.replace(old, new)
        with running_server() as server:
            header, items = file_items(two_slices[1])
            run = replay(items, header, ("127.0.0.1", server.port), config_xml=xml, timeout=120)
        assert run.errors == []
        images = [im for ims in run.images.values() for im in ims]
        assert sorted((im.slice, im.phase) for im in images) == [(s, f) for s in (0, 1) for f in range(6)]
        assert resident.proc.wait(60) == 0  # one connection per slice
    finally:
        if resident.proc.poll() is None:
            resident.proc.kill()


def test_a_gadget_whose_gadgetron_went_away_stops_after_the_slice_it_was_fitting(two_slices):
    """Sending slice 0's images failed (Gadgetron gone) and the gadget fitted slice 1 from the readouts still in
    its socket anyway, logged that as a slice failure, and went on (a resident gadget kept the next scan waiting)."""
    import tempfile

    from ismrmrd.serialization import ConfigText, ProtocolSerializer

    from dainr_app.server import child_env

    header, acqs = _load(two_slices[1])
    listener = socket.create_server(("127.0.0.1", 0))
    with listener, tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen([sys.executable, "-m", "gadgetron", str(listener.getsockname()[1]),
                                 "gadgets.dainr_gadget", "dainr_recon"], env=child_env(), stdout=out,
                                stderr=subprocess.STDOUT, text=True)
        try:
            listener.settimeout(60)
            conn, _ = listener.accept()
            with conn, conn.makefile("wb") as wf:  # both slices whole, then gone before any image (no CLOSE)
                ser = ProtocolSerializer(wf)
                for item in [ConfigText(CONFIG.format(steps=5, extra="")), header] + acqs:
                    ser.serialize(item)
            assert proc.wait(120) != 0
        finally:
            if proc.poll() is None:
                proc.kill()
        out.seek(0)
        log = out.read()
    assert "slice 0's images could not be sent" in log and "later slices are not reconstructed" in log, log[-3000:]
    assert "(1, 0, 0, 0)" not in log and "slice 1" not in log, log[-3000:]  # never fitted
    # a resident gadget: the same, one line, and back to waiting (no traceback)
    from .gadget_harness import dial

    resident = _resident("--connections", "1")
    try:
        with dial(resident.port) as conn, conn.makefile("wb") as wf:
            ser = ProtocolSerializer(wf)
            for item in [ConfigText(CONFIG.format(steps=5, extra="")), header] + _load(two_slices[1])[1]:
                ser.serialize(item)
        assert resident.proc.wait(120) == 0
    finally:
        if resident.proc.poll() is None:
            resident.proc.kill()
    log = resident.log()
    assert "could not be sent" in log and "ended without CLOSE" in log and "Traceback" not in log, log[-3000:]
    assert "(1, 0, 0, 0)" not in log


def test_a_connection_that_sends_nothing_does_not_block_the_resident_process(two_slices):
    """Connections are served one after another: an idle one blocked every later scan."""
    from .gadget_harness import connect_gadget, dial

    header, acqs = _load(two_slices[1])
    server = _resident("--connections", "2", "--start-timeout", "2")
    proc, port = server.proc, server.port
    try:
        with dial(port) as idle:
            run = connect_gadget(port, CONFIG.format(steps=5, extra=""), header, acqs, timeout=120)
            assert run.errors == [] and len(run.images) == 12
            idle.settimeout(5)
            assert idle.recv(1) == b""  # it was closed
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "sent no CONFIG and HEADER in 2 s; closed" in server.log()
    assert f"waiting for Gadgetron on port {port} (address ::)" in server.log()  # every interface (dual stack)


def test_a_connection_that_dribbles_or_claims_a_huge_config_does_not_block_the_resident_process(two_slices):
    """--start-timeout limited each read, not CONFIG and HEADER together: a peer sending a byte every second held
    the resident process (and every scan queued behind it) for as long as it liked; a 1 GiB CONFIG length was
    read as claimed."""
    import struct
    import threading
    import time

    from dainr_app.protocol import CONFIG_TEXT, HEADER, Limits
    from gadgets.resident import START_BYTES

    from .gadget_harness import connect_gadget, dial

    header, acqs = _load(two_slices[1])
    server = _resident("--connections", "4", "--start-timeout", "2")
    proc, port = server.proc, server.port
    stop = threading.Event()
    limits = Limits()

    def dribble(sock):
        sock.sendall(struct.pack("<HI", CONFIG_TEXT, 1000))
        while not stop.wait(0.5):
            try:
                sock.sendall(b"x")
            except OSError:  # closed by the resident process
                return
    try:
        with dial(port) as slow, dial(port) as huge:
            dripping = threading.Thread(target=dribble, args=(slow,))
            dripping.start()
            huge.sendall(struct.pack("<HI", CONFIG_TEXT, 1 << 30) + b"<" * 4096)
            with dial(port) as big:  # within each limit, not within both: the budget is shared
                big.sendall(struct.pack("<HI", CONFIG_TEXT, limits.max_text) + b" " * limits.max_text +
                            struct.pack("<HI", HEADER, limits.max_header + 100))
                t0 = time.monotonic()
                # the deadline ends with the HEADER: a scan whose readouts come later than it still runs
                run = connect_gadget(port, CONFIG.format(steps=5, extra=""), header, acqs, timeout=120, pause=3)
            assert run.errors == [] and len(run.images) == 12
            assert time.monotonic() - t0 < 60  # (it waited as long as the dribble lasted: forever)
            stop.set()
            dripping.join()
        assert proc.wait(60) == 0
    finally:
        stop.set()
        if proc.poll() is None:
            proc.kill()
    assert "connection 1 from" in server.log() and "sent no CONFIG and HEADER in 2 s; closed" in server.log()
    assert "connection 2 from" in server.log() and server.log().count(f"sent a CONFIG and HEADER of more than {START_BYTES} bytes") == 2


def test_the_resident_process_can_listen_on_this_host_only():
    server = _resident("--connections", "1", "--start-timeout", "1", "--host", "127.0.0.1")
    proc, port = server.proc, server.port
    try:
        from .gadget_harness import dial

        dial(port).close()  # (counted; it exits)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert f"waiting for Gadgetron on port {port} (address 127.0.0.1)" in server.log()


def test_the_resident_process_stops_on_sigterm_with_a_line_and_exit_0():
    """`docker stop` / systemd send SIGTERM: the process died with 143 and no word in its log."""
    import signal

    server = _resident()
    server.proc.send_signal(signal.SIGTERM)
    try:
        assert server.proc.wait(60) == 0
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
    assert "DA-INR gadget stopped by SIGTERM" in server.log()


def _imaging(acqs, s):
    return [a for a in acqs if a.idx.slice == s and not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)]


def test_a_slice_sent_again_after_its_last_readout_is_reconstructed_with_an_error(two_slices):
    """A second pass of a cine (a re-acquired slice, or a converter that numbers slices by position only) came back
    as images repeating the first pass's (series, slice, image_index), without an ERROR (`dainr recon` refuses it);
    a second pass with its own repetition index is another cine, without one."""
    header, acqs = _load(two_slices[1])
    again = _imaging(_load(two_slices[1])[1], 0)
    run = run_gadget(CONFIG.format(steps=3, extra=""), header, acqs + again)
    assert len(run.images) == 18 and len(run.errors) == 1, run.errors
    assert run.errors[0].startswith(f"DA-INR slice 0 (contrast 0, repetition 0, set 0): readout "
                                    f"{again[0].scan_counter} comes after that cine's last readout")
    assert "give each pass its own repetition" in run.errors[0]
    for a in again:
        a.idx.repetition = 1
    run = run_gadget(CONFIG.format(steps=3, extra=""), header, _load(two_slices[1])[1] + again)
    assert len(run.images) == 18 and run.errors == []


def test_slice_with_fewer_spokes_than_frames_is_an_error(two_slices):
    header, acqs = _load(two_slices[1])
    noise = [a for a in acqs if a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)]
    short = _imaging(acqs, 0)[:4]
    short[-1].set_flag(ismrmrd.ACQ_LAST_IN_SLICE)
    run = run_gadget(CONFIG.format(steps=5, extra=""), header, noise + short + _imaging(acqs, 1))
    assert len(run.errors) == 1 and "4 spokes for 6 frames" in run.errors[0]
    assert {im.slice for im in run.images} == {1} and len(run.images) == 6
    assert "4 spokes for 6 frames" in run.log and "Traceback" not in run.log  # data it cannot use: one line
    bug = run_gadget(CONFIG.format(steps=5, extra=""), header, noise + _imaging(acqs, 1), module="tests.gadget_harness",
                     target="failing_dainr_recon")
    assert bug.errors == ["DA-INR slice 1 (contrast 0, repetition 0, set 0): a bug"]
    assert "Traceback" in bug.log and "RuntimeError: a bug" in bug.log  # a bug: its traceback


def test_missing_trajectory_with_unknown_trajectory_type_is_an_error(two_slices):
    header, acqs = _load(two_slices[1])
    hdr = copy.deepcopy(header)
    hdr.encoding[0].trajectory = ismrmrd.xsd.trajectoryType.OTHER
    items = []
    for a in acqs:
        if a.idx.slice == 0 and not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
            b = ismrmrd.Acquisition.from_array(a.data)  # no acq.traj
            b.idx, b.flags = a.idx, a.flags
            a = b
        items.append(a)
    run = run_gadget(CONFIG.format(steps=5, extra=""), hdr, items)
    assert len(run.errors) == 1 and "no trajectory" in run.errors[0] and "'other'" in run.errors[0]
    assert {im.slice for im in run.images} == {1}


def test_golden_angle_property_reads_a_radial_header_without_its_angle(two_slices):
    """A uniform ``radial`` header without the angle parameter and readouts without acq.traj (siemens_to_ismrmrd's
    golden-angle scans): `dainr recon --golden-angle` read it, the gadget had no way to (found by a review)."""

    header, acqs = _load(two_slices[1])
    hdr = copy.deepcopy(header)
    hdr.encoding[0].trajectory = ismrmrd.xsd.trajectoryType.RADIAL
    hdr.encoding[0].trajectoryDescription = None
    items = []
    for a in acqs:
        b = ismrmrd.Acquisition.from_array(a.data)  # no acq.traj
        b.idx, b.flags = a.idx, a.flags
        items.append(b)
    # refused at the first imaging readout, once, not at the end of every slice; what was not used is counted
    refused = run_gadget(CONFIG.format(steps=5, extra=""), hdr, items)
    n_noise = sum(a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT) for a in items)
    assert len(refused.errors) == 2 and "gadget property golden_angle" in refused.errors[0] and not refused.images
    assert refused.errors[1] == f"DA-INR: {len(items) - n_noise} readouts not reconstructed and {n_noise} noise " \
                                "readouts not used (the error above)"
    capped = run_gadget(CONFIG.format(steps=5, extra='<property name="max_buffer_mb" value="0.01"/>'), hdr, items)
    assert capped.errors[1].endswith(f"and {n_noise} noise readouts not used (the error above)")  # kept or dropped
    run = run_gadget(CONFIG.format(steps=5, extra='<property name="golden_angle" value="true"/>'), hdr, items)
    assert run.errors == [] and len(run.images) == 12
    assert provenance(run.images[0])["read_options"] == {"golden_angle": "true"}  # the images say how they were read
    # readouts with acq.traj under that header need no angle step; a first dummy readout without samples (or traj)
    # is ignored, not taken for the stream's layout (it refused the whole stream)
    with_traj = [a for a in acqs if a.idx.slice == 0]
    dummy = ismrmrd.Acquisition.from_array(np.zeros((with_traj[0].active_channels, 0), np.complex64))
    dummy.idx.slice, dummy.scan_counter = 0, 9999
    n_noise = sum(a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT) for a in with_traj)
    run = run_gadget(CONFIG.format(steps=5, extra=""), hdr, with_traj[:n_noise] + [dummy] + with_traj[n_noise:])
    assert run.errors == ["DA-INR: 1 readouts with 0 samples were passed on, not reconstructed"]
    assert len(run.images) == 6 and [a.scan_counter for a in run.passthrough] == [9999]
    with pytest.raises(ValueError, match="golden_angle"):
        options_from_properties({"golden_angle": "111"})


def test_the_frames_a_temporal_fit_did_not_see_say_so(two_slices):
    """down_ratio: the frames the model interpolated were labelled as the fitted ones (preview series too)."""
    header, acqs = _load(two_slices[1])
    run = run_gadget(CONFIG.format(steps=3, extra='<property name="down_ratio" value="5"/><property name="preview" '
                                                  'value="true"/><property name="preview_steps" value="1"/>'),
                     header, acqs)
    assert run.errors == [] and len(run.images) == 24
    for im in run.images:
        meta = ismrmrd.Meta.deserialize(im.attribute_string)
        comment = "DA-INR" if im.image_series_index == 7 else "DA-INR preview"
        assert meta["ImageComment"] == comment + (" (interpolated frame)" if im.phase not in (0, 5) else "")
        if im.image_series_index == 7:
            assert meta["ImageProcessingHistory"].endswith("s on cpu, 2 of 6 frames fitted")
    # the final series carries the configuration it was fitted with (the preview, drawn mid-fit, does not)
    made_by = [provenance(im) for im in run.images]
    assert {(im.image_series_index, "config" in p) for im, p in zip(run.images, made_by)} == {(7, True), (107, False)}
    cfg = next(p["config"] for p in made_by if p)
    assert (cfg.temporal_ratio, cfg.max_steps, cfg.device, cfg.nufft_backend) == (5, 3, "cpu", "finufft")


def test_a_spatial_fit_names_the_matrix_it_was_fitted_at(two_slices):
    from dainr_app.mrd import fit_history

    info = dict(steps=5, stop_reason="max_steps", device="cpu", fit_matrix=16)
    assert fit_history(info, 1.0, 8, range(8), 32) == "DA-INR 5 steps (max_steps), 1.00 s on cpu, fitted at 16² for 32²"
    assert fit_history(dict(info, fit_matrix=32), 1.0, 8, range(8), 32) == "DA-INR 5 steps (max_steps), 1.00 s on cpu"
    header, acqs = _load(two_slices[1])
    run = run_gadget(CONFIG.format(steps=3, extra='<property name="sr_ratio" value="2"/>'), header, acqs)
    assert run.errors == [] and len(run.images) == 12
    assert all(ismrmrd.Meta.deserialize(im.attribute_string)["ImageProcessingHistory"].endswith(
        "fitted at 16² for 32²") for im in run.images)


def test_complex_output_property(two_slices):
    header, acqs = _load(two_slices[1])
    run = run_gadget(CONFIG.format(steps=3, extra='<property name="output" value="complex"/>'), header,
                     _imaging(acqs, 0))
    assert run.errors == [] and len(run.images) == 6
    assert all(im.image_type == ismrmrd.IMTYPE_COMPLEX and im.data.dtype == np.complex64 for im in run.images)
    assert np.abs(np.angle(run.images[0].data)).max() > 0.1  # phase kept


def test_mismatched_channel_counts_are_an_error(two_slices):
    header, acqs = _load(two_slices[1])
    items = []
    for a in acqs:
        if a.idx.slice == 0 and a.idx.kspace_encode_step_1 == 7 and not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
            b = ismrmrd.Acquisition.from_array(a.data[:2], a.traj)  # 2 channels instead of 3
            b.idx, b.flags = a.idx, a.flags
            a = b
        items.append(a)
    run = run_gadget(CONFIG.format(steps=5, extra=""), header, items)
    assert len(run.errors) == 1 and "different (channels, samples)" in run.errors[0]
    assert {im.slice for im in run.images} == {1}


def test_readouts_of_a_second_encoding_space_are_passed_on_not_merged(two_slices):
    """They joined slice 0's buffer (one cine of two encodings' spokes); then each got an ERROR of its own and was
    dropped (a second encoding of thousands of readouts: thousands of ERRORs)."""
    header, acqs = _load(two_slices[1])
    other = [a for a in acqs if a.idx.slice == 0 and not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)][:3]
    for a in other:
        a.encoding_space_ref = 1
    run = run_gadget(CONFIG.format(steps=5, extra=""), header, acqs)
    assert run.errors == ["DA-INR: 3 readouts of encoding space 1 (DA-INR reconstructs the header's first) were "
                          "passed on, not reconstructed"]
    assert len(run.images) == 12  # slice 0 from the readouts of encoding 0
    assert [a.scan_counter for a in run.passthrough] == [a.scan_counter for a in other]
    # one before the noise scan: counted as the first imaging readout, it threw the noise scan away (dainr recon
    # prewhitened with it)
    first = copy.deepcopy(other[0])
    run = run_gadget(CONFIG.format(steps=5, extra=""), header, [first] + [a for a in acqs if a not in other])
    assert run.errors == ["DA-INR: 1 readouts of encoding space 1 (DA-INR reconstructs the header's first) were "
                          "passed on, not reconstructed"] and len(run.images) == 12


def test_unconsumed_items_pass_through_unchanged(two_slices):
    header, acqs = _load(two_slices[1])
    nav = ismrmrd.Acquisition.from_array(acqs[-1].data * 2, acqs[-1].traj)
    nav.set_flag(ismrmrd.ACQ_IS_NAVIGATION_DATA)
    nav.idx.slice, nav.scan_counter = 1, 9999
    # a real-time feedback readout (e.g. Siemens PACE: another length) and a calibration-only readout
    feedback = ismrmrd.Acquisition.from_array(np.ones((acqs[-1].data.shape[0], 7), np.complex64))
    feedback.set_flag(ismrmrd.ACQ_IS_RTFEEDBACK_DATA)
    calibration = ismrmrd.Acquisition.from_array(acqs[-1].data, acqs[-1].traj)
    calibration.set_flag(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION)
    run = run_gadget(CONFIG.format(steps=5, extra=""), header, acqs[:-1] + [nav, feedback, calibration, acqs[-1]])
    assert run.errors == [] and len(run.images) == 12
    back, *others = run.passthrough
    assert back.scan_counter == 9999 and back.is_flag_set(ismrmrd.ACQ_IS_NAVIGATION_DATA)
    assert np.array_equal(back.data, nav.data)
    assert [a.is_flag_set(ismrmrd.ACQ_IS_RTFEEDBACK_DATA) for a in others] == [True, False]


def test_failing_reconstruction_is_reported_per_slice(two_slices):
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA to make the reconstruction fail")
    header, acqs = _load(two_slices[1])
    run = run_gadget(CONFIG.format(steps=5, extra='<property name="device" value="cuda"/>'), header, acqs)
    assert len(run.errors) == 2 and all("CUDA is not available" in e for e in run.errors)
    assert {e.split(" (")[0] for e in run.errors} == {"DA-INR slice 0", "DA-INR slice 1"}
    assert run.images == [] and run.returncode == 0


def test_gadget_server_on_a_busy_port_fails_clearly(capsys):
    import socket

    from dainr_app import cli

    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as busy:
        busy.bind(("", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        assert cli.main(["gadget-server", "--port", str(port), "--connections", "1"]) == 2
    assert f"cannot listen on port {port}" in capsys.readouterr().err


def test_fits_run_under_the_hosts_share(two_slices, tmp_path, monkeypatch):
    """While the gadget fits, its lock file is in the share folder; none is left afterwards."""
    import os
    import threading
    import time

    monkeypatch.setenv("DAINR_SHARE_DIR", str(tmp_path))  # the gadget process inherits it
    header, acqs = _load(two_slices[1])
    runs, seen = [], set()
    worker = threading.Thread(target=lambda: runs.append(run_gadget(
        CONFIG.format(steps=60, extra='<property name="device" value="cpu"/>'), header, acqs)))
    worker.start()
    while worker.is_alive():
        seen.update(n for n in os.listdir(tmp_path) if n.endswith(".fit"))
        time.sleep(0.01)
    worker.join()
    assert runs[0].errors == [] and len(runs[0].images) == 12, runs[0].log[-2000:]
    assert len(seen) == 2 and os.listdir(tmp_path) == [".lock"]  # one fit per slice, each under its own lock


@pytest.mark.parametrize("module", ["gadgets.passthrough", "gadgets.dainr_gadget", "gadgets.resident"])
def test_every_gadget_module_makes_the_connection_raise_at_end_of_stream(module):
    """A real Gadgetron (and ``--launcher spawn``) imports the gadget's module and nothing of ours before it:
    the import alone must replace gadgetron-python's spinning reader (gadgets/connection_eof.py)."""
    import subprocess
    import sys

    from dainr_app.server import child_env

    code = ("import socket, importlib; importlib.import_module(%r)\n"
            "from gadgetron.external.connection import Connection\n"
            "a, b = socket.socketpair(); b.close()\n"
            "try:\n    Connection.SocketWrapper(a).read(4)\nexcept ConnectionResetError:\n    print('raised')\n" % module)
    out = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True, text=True, timeout=20)
    assert out.stdout.strip() == "raised", out.stderr[-2000:]


def test_properties_in_gadgetrons_other_form_twice_or_unparsable_are_not_ignored():
    """``<property><name/><value/></property>`` (which Gadgetron accepts) was skipped, and an unparsable
    ``<configuration>`` (gadgetron-python passes None) or a property given twice went by: the defaults ran."""
    import xml.etree.ElementTree as ElementTree

    from gadgets.dainr_gadget import properties

    def props(xml):
        return properties(ElementTree.fromstring(xml))
    assert props('<configuration><property><name>steps</name><value>5</value></property>'
                 '<property name="device" value="cpu"/></configuration>') == {"steps": "5", "device": "cpu"}
    with pytest.raises(ValueError, match="property steps is given twice"):
        props('<configuration><property name="steps" value="5"/><property><name>steps</name><value>9</value>'
              '</property></configuration>')
    with pytest.raises(ValueError, match="a <property> without a name and a value"):
        props('<configuration><property value="5"/></configuration>')
    with pytest.raises(ValueError, match="<configuration> is not XML"):
        properties(None, b'<configuration><property name="steps" value="5"></configuration>')
    assert properties(None, b"") == {} and properties(None, b"\x00") == {}
    # what a real Gadgetron sends for an <external> without <configuration>: pugixml's empty document
    assert properties(None, b'<?xml version="1.0"?>\n') == {} == properties(None, b"<?xml version='1.0'?>\x00")
    with pytest.raises(ValueError, match="<configuration> is not XML"):
        properties(None, b'<?xml version="1.0"?>\n<configuration>')
    # valid XML that gadgetron-python could not parse (a trailing NUL): its properties, not silently the defaults
    assert properties(None, b'<configuration><property name="steps" value="5"/></configuration>\x00') == {"steps": "5"}
    # Gadgetron's legacy v1 PythonGadget: its own python_* properties are copied into <configuration>
    assert props('<configuration><property name="python_module" value="gadgets.dainr_gadget"/><property '
                 'name="python_class" value="dainr_recon"/><property name="python_path" value="/opt"/>'
                 '<property name="steps" value="5"/></configuration>') == {"steps": "5"}
    with pytest.raises(ValueError, match="preview_steps=0: must be >= 1"):  # accepted, then no preview was sent
        options_from_properties({"preview": "true", "preview_steps": "0"})


def test_after_a_configuration_error_what_the_gadget_does_not_consume_passes_on(two_slices):
    header, acqs = _load(two_slices[1])
    image = ismrmrd.Image.from_array(np.ones((4, 4), np.float32), transpose=False)
    image.image_series_index = 55
    navigator = ismrmrd.Acquisition.from_array(acqs[-1].data.copy())
    navigator.set_flag(ismrmrd.ACQ_IS_NAVIGATION_DATA)
    run = run_gadget(CONFIG.format(steps="many", extra=""), header, acqs[:20] + [image, navigator] + acqs[20:])
    n_noise = sum(a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT) for a in acqs)
    assert run.errors[0].startswith("DA-INR gadget configuration: property steps='many'")
    assert run.errors[1:] == [f"DA-INR: {len(acqs) - n_noise} readouts not reconstructed and {n_noise} noise "
                              "readouts not used (the configuration error above)"] and n_noise > 0
    assert [im.image_series_index for im in run.images] == [55] and len(run.passthrough) == 1


def test_a_stream_of_noise_alone_past_the_cap_gets_both_errors_and_no_images(two_slices):
    header, acqs = _load(two_slices[1])
    noise = [a for a in acqs if a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)] * 8  # 128 readouts of 1.5 kB
    kept = int(0.12 * 2 ** 20) // noise[0].data.nbytes
    assert kept == 81 < len(noise)
    run = run_gadget(CONFIG.format(steps=3, extra='<property name="max_buffer_mb" value="0.12"/>'), header, noise)
    assert run.errors == [f"DA-INR: {len(noise) - kept} noise readouts past max_buffer_mb=0.12 were dropped; the "
                          f"prewhitening used the first {kept}",
                          f"DA-INR: the stream held no imaging readouts ({kept} noise readouts): nothing to "
                          "reconstruct"]
    assert run.images == [] and run.returncode == 0


def test_the_output_property_takes_magnitude_or_complex():
    assert options_from_properties({}).output == "magnitude"
    assert options_from_properties({"output": "complex"}).output == "complex"
    with pytest.raises(ValueError, match="property output='phase': must be magnitude or complex"):
        options_from_properties({"output": "phase"})


def test_noise_after_imaging_is_reported_not_used_for_some_slices(two_slices):
    """A noise scan between the slices prewhitened only the second one, silently."""
    header, acqs = _load(two_slices[1])
    noise = [a for a in acqs if a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)]
    config = CONFIG.format(steps=3, extra="")
    late = run_gadget(config, header, _imaging(acqs, 0) + noise + _imaging(acqs, 1))
    without = run_gadget(config, header, _imaging(acqs, 0) + _imaging(acqs, 1))
    assert late.errors == [f"DA-INR: {len(noise)} noise readouts after the first imaging readout were not used "
                           "(the prewhitening is fixed there, as in Gadgetron's NoiseAdjustGadget)"]
    assert [im.data.tobytes() for im in late.images] == [im.data.tobytes() for im in without.images]


def test_a_noise_scan_of_other_channels_leaves_the_data_unwhitened_with_a_warning(two_slices):
    """As Gadgetron's NoiseAdjustGadget passes such data on: the slices were refused."""
    header, acqs = _load(two_slices[1])
    noise = [ismrmrd.Acquisition.from_array(a.data[:2]) for a in acqs
             if a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)]
    for a in noise:
        a.set_flag(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)
    config = CONFIG.format(steps=3, extra="")
    imaging = _imaging(acqs, 0) + _imaging(acqs, 1)
    run = run_gadget(config, header, noise + imaging)
    assert run.errors == [f"DA-INR slice {s}: 3 channels but the noise scan has 2: reconstructed without prewhitening"
                          for s in (0, 1)] and run.errors_come_last
    assert [im.data.tobytes() for im in run.images] == [im.data.tobytes() for im in run_gadget(config, header,
                                                                                               imaging).images]
    assert len(run.images) == 12


def test_a_noise_scan_at_another_dwell_time_is_scaled_to_the_readouts_bandwidth(two_slices):
    """Noise variance grows with the bandwidth: a noise scan sampled twice as fast (Siemens' noise adjust scans
    keep their own bandwidth) whitened the readouts to a variance of 0.5, not 1, so the images came out √2 too
    small; they are now those of a noise scan at the readouts' dwell time (as Gadgetron's NoiseAdjustGadget)."""
    header, acqs = _load(two_slices[1])
    imaging = _imaging(acqs, 0)
    noise = [a for a in acqs if a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)]
    for a in imaging:
        a.sample_time_us = 5.0
    for a in noise:
        a.sample_time_us = 2.5
    config = CONFIG.format(steps=3, extra="")
    fast = run_gadget(config, header, noise + imaging)
    for a in noise:  # the same noise scan at the readouts' dwell time: its samples' variance twice as large
        a.data[:] = a.data * np.float32(np.sqrt(0.5))
        a.sample_time_us = 5.0
    same = run_gadget(config, header, noise + imaging)
    assert fast.errors == same.errors == [] and len(fast.images) == 6
    for a, b in zip(fast.images, same.images):
        assert np.allclose(a.data, b.data, rtol=1e-4, atol=1e-6 * np.abs(b.data).max())


def test_averages_are_one_cine_per_slice(two_slices):
    """Averages in the outer loop end each average with ACQ_LAST_IN_SLICE: two cines per slice with the same
    labels, each from half the spokes. Declared in the header they are combined; undeclared, an ERROR says so."""

    header, acqs = _load(two_slices[1])
    noise = [a for a in acqs if a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)]
    items = list(noise)
    for average in (0, 1):
        for s in (0, 1):
            for a in _imaging(acqs, s):
                b = copy.deepcopy(a)
                b.idx.average = average
                b.idx.kspace_encode_step_1 += 1000 * average  # the golden-angle counter goes on
                if average == 0:
                    b.clear_flag(ismrmrd.ACQ_LAST_IN_MEASUREMENT)
                items.append(b)
    declared = copy.deepcopy(header)
    declared.encoding[0].encodingLimits.average = ismrmrd.xsd.limitType(minimum=0, maximum=1, center=0)
    run = run_gadget(CONFIG.format(steps=3, extra=""), declared, items)
    assert run.errors == [] and sorted((im.slice, int(im.phase)) for im in run.images) == \
        sorted((s, p) for s in (0, 1) for p in range(6))  # one cine per slice, from both averages
    run = run_gadget(CONFIG.format(steps=3, extra=""), header, items)
    assert len(run.errors) == 1 and "of average 1, beyond the header's encodingLimits average maximum 0" in run.errors[0]


def test_the_reader_refuses_malformed_headers_noise_and_readouts_with_the_reason(two_slices):
    from dainr_app.mrd import MRDFormatError, ReconParameters, noise_samples, slice_from_acquisitions

    header, acqs = _load(two_slices[1])
    params = ReconParameters.from_header(header)
    for change, match in ((lambda h: setattr(h, "encoding", []), "MRD header has no <encoding>"),
                          (lambda h: setattr(h.encoding[0].reconSpace.matrixSize, "x", 4),
                           "reconSpace matrix 4 is too small"),
                          (lambda h: setattr(h.encoding[0].encodedSpace.fieldOfView_mm, "x", -320.0),
                           "encodedSpace fieldOfView_mm x is -320: it must be finite and positive")):
        bad = copy.deepcopy(header)
        change(bad)
        with pytest.raises(MRDFormatError, match=match):
            ReconParameters.from_header(bad)
    no_phase = copy.deepcopy(header)
    no_phase.encoding[0].encodingLimits.phase = no_phase.encoding[0].trajectoryDescription = None
    with pytest.raises(MRDFormatError, match=r"no phase range .*\(`dainr recon --spokes-per-frame`, the gadget "
                                             r"property spokes_per_frame\)"):
        slice_from_acquisitions(_imaging(acqs, 0), ReconParameters.from_header(no_phase), None, 0)
    noise = [a.data for a in acqs if a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)]
    with pytest.raises(MRDFormatError, match="noise scans have different channel counts"):
        noise_samples(noise[:-1] + [noise[-1][:2]])
    with pytest.raises(MRDFormatError, match="the noise scan contains NaN/Inf samples"):
        noise_samples(noise[:-1] + [np.full_like(noise[-1], np.inf)])
    one = _imaging(_load(two_slices[1])[1], 0)
    one[5].discard_pre = 2
    with pytest.raises(MRDFormatError, match=r"slice 0: readouts discard different samples \(discard_pre, "
                                             r"discard_post\): \[\(0, 0\), \(2, 0\)\]"):
        slice_from_acquisitions(one, params, None, 0)
    for a in one:
        a.discard_pre, a.discard_post = 40, 23
    with pytest.raises(MRDFormatError, match=r"slice 0: discard_pre 40 \+ discard_post 23 leave 1 of 64 samples"):
        slice_from_acquisitions(one, params, None, 0)
    short = [ismrmrd.Acquisition.from_array(a.data[:, :1].copy()) for a in _imaging(acqs, 0)]
    with pytest.raises(MRDFormatError, match="slice 0: readouts have 1 samples"):
        slice_from_acquisitions(short, params, None, 0)


def test_a_missing_frame_is_named_by_the_headers_phase_range(two_slices):
    from dainr_app.mrd import MRDFormatError, ReconParameters, slice_from_acquisitions

    header, acqs = _load(two_slices[1])
    params = ReconParameters.from_header(header)
    without_first = [a for a in _imaging(acqs, 0) if a.idx.phase != 0]
    with pytest.raises(MRDFormatError, match=r"frames \[0\] have no spokes"):  # was "frames [6]"
        slice_from_acquisitions(without_first, params, None, 0)
    # ACQ_LAST_IN_SLICE on every frame's last readout: each ERROR says what a cine is (it named missing frames only)
    per_frame = _imaging(_load(two_slices[1])[1], 0)
    for a in per_frame:
        if a.idx.kspace_encode_step_1 % 9 == 8:
            a.set_flag(ismrmrd.ACQ_LAST_IN_SLICE)
    run = run_gadget(CONFIG.format(steps=5, extra=""), header, per_frame)
    assert len(run.errors) == 7 and not run.images
    passes = [e for e in run.errors if "comes after that cine's last readout" in e]  # (once: the second pass)
    assert len(passes) == 1 and passes[0].startswith("DA-INR slice 0 (contrast 0, repetition 0, set 0): readout")
    assert all("have no spokes" in e and "up to its ACQ_LAST_IN_SLICE" in e for e in run.errors if e not in passes)
