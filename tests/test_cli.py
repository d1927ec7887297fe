import json
import os
import re
import shutil
import time
import sys
import warnings

import h5py
import ismrmrd
import numpy as np
import pydicom
import pytest
import torch

from dainr import DAINRConfig, zero_filled
from dainr.metrics import psnr_ssim
from dainr_app import cli
from dainr_app.mrd import MRDFormatError, read_images, read_raw, write_raw

SIM = ["--matrix", "32", "--frames", "6", "--spokes", "9", "--coils", "3"]


@pytest.fixture(scope="module")
def raw2(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("raw") / "raw.h5")
    assert cli.main(["simulate", "-o", path, *SIM, "--slices", "2"]) == 0
    return path


def test_simulated_raw_file_is_written_like_a_scanner(raw2):
    ds = ismrmrd.Dataset(raw2, "dataset", create_if_needed=False, mode="r")
    try:
        hdr = ismrmrd.xsd.CreateFromDocument(ds.read_xml_header())
        acqs = [ds.read_acquisition(i) for i in range(ds.number_of_acquisitions())]
    finally:
        ds.close()
    enc = hdr.encoding[0]
    assert enc.reconSpace.matrixSize.x == 32 and enc.encodedSpace.matrixSize.x == 64
    assert enc.encodingLimits.phase.maximum == 5 and enc.encodingLimits.slice.maximum == 1
    assert enc.reconSpace.fieldOfView_mm.x > 0
    noise = [a for a in acqs if a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)]
    img = [a for a in acqs if not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)]
    assert noise and acqs[0].is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)  # leading noise scan
    assert len(img) == 2 * 6 * 9
    s0 = [a for a in img if a.idx.slice == 0]
    assert [a.idx.kspace_encode_step_1 for a in s0] == list(range(54))  # global spoke counter
    assert [a.idx.phase for a in s0] == [i // 9 for i in range(54)]
    assert [a.is_flag_set(ismrmrd.ACQ_LAST_IN_SLICE) for a in s0] == [False] * 53 + [True]
    assert s0[0].traj.shape == (64, 2) and float(np.abs(s0[0].traj).max()) <= 0.5
    assert os.path.exists(raw2.replace(".h5", "_truth.npz"))
    # the reader hands every slice the noise scan for prewhitening
    scan = read_raw(raw2)
    noise_samples = torch.from_numpy(np.concatenate([a.data for a in noise], axis=1))
    assert all(torch.equal(s.data.noise, noise_samples) for s in scan.slices.values()) and len(scan.slices) == 2


def test_noise_after_imaging_is_not_used_and_is_reported(raw2, tmp_path, capsys):
    """As in the gadget (and Gadgetron's NoiseAdjustGadget) the prewhitener is the noise scan before the first
    imaging readout: recon mixed a trailing noise scan in (found by a review), so the two gave different images."""
    ds = ismrmrd.Dataset(raw2, "dataset", create_if_needed=False, mode="r")
    try:
        xml, acqs = ds.read_xml_header(), [ds.read_acquisition(i) for i in range(ds.number_of_acquisitions())]
    finally:
        ds.close()
    noise = [a for a in acqs if a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)]
    path = str(tmp_path / "late.h5")
    out = ismrmrd.Dataset(path, "dataset", create_if_needed=True)
    out.write_xml_header(xml)
    late = [ismrmrd.Acquisition.from_array(3 * a.data) for a in noise]  # a second noise scan at the end
    for a in late:
        a.set_flag(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)
    for a in acqs + late:
        out.append_acquisition(a)
    out.close()
    scan = read_raw(path)
    assert scan.late_noise == len(noise) and torch.equal(scan.noise, read_raw(raw2).noise)
    assert cli.main(["recon", path, "-o", str(tmp_path / "img.h5"), "--steps", "2", "--quiet"]) == 0
    assert f"dainr recon: warning: {len(noise)} noise readouts after the first imaging readout were not used" in \
        capsys.readouterr().err
    # a noise scan of fewer channels: the slices unwhitened with a warning (as the gadget and Gadgetron), not refused
    path = str(tmp_path / "other_channels.h5")
    out = ismrmrd.Dataset(path, "dataset", create_if_needed=True)
    out.write_xml_header(xml)
    for a in late:
        a.resize(a.number_of_samples, 1)
    for a in late + [a for a in acqs if not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)]:
        out.append_acquisition(a)
    out.close()
    assert all(s.data.noise is None for s in read_raw(path).slices.values())
    assert cli.main(["recon", path, "-o", str(tmp_path / "img2.h5"), "--steps", "2", "--quiet"]) == 0
    assert "dainr recon: warning: slice 1: 3 channels but the noise scan has 1: reconstructed without " \
        "prewhitening" in capsys.readouterr().err


def test_recon_round_trip_two_slices(raw2, tmp_path, capsys):
    out, gif = str(tmp_path / "img.h5"), str(tmp_path / "p.gif")
    rc = cli.main(["recon", raw2, "-o", out, "--steps", "60", "--preview", gif, "--series", "3", "--quiet"])
    assert rc == 0
    lines = [json.loads(l) for l in capsys.readouterr().out.splitlines() if l.startswith("{")]
    assert [l["slice"] for l in lines] == [0, 1]
    assert all(l["psnr"] > l["zero_filled_psnr"] for l in lines)
    truth = np.load(raw2.replace(".h5", "_truth.npz"))["images"]
    for s, line in enumerate(lines):  # each slice is scored against its own slice's truth
        zf = zero_filled(read_raw(raw2).slices[(s, 0, 0, 0)].data, DAINRConfig(device="cpu"))
        assert line["zero_filled_psnr"] == round(psnr_ssim(zf, truth[s])["psnr"], 2)
    images = read_images(out)
    assert list(images) == [3]
    imgs = images[3]
    assert len(imgs) == 12
    # numbered as Gadgetron numbers a series (slice fastest, then frame): an image_index of its own for each image
    assert [(i.slice, i.phase, i.image_index) for i in imgs] == \
        [(s, f, 1 + s + 2 * f) for s in (0, 1) for f in range(6)]
    assert imgs[0].data.shape == (1, 1, 32, 32) and imgs[0].image_series_index == 3
    assert imgs[0].field_of_view[0] == pytest.approx(320.0)
    meta = ismrmrd.Meta.deserialize(imgs[0].attribute_string)
    assert meta["DataRole"] == "Image" and meta["GADGETRON_DataRole"] == "Image" and "WindowWidth" in meta
    assert imgs[6].position[2] != imgs[0].position[2]  # slice geometry from the acquisitions
    # each frame's timing: its middle spoke's time stamps (the simulated trigger restarts each slice, at 2.5 ms a TR)
    assert [list(i.physiology_time_stamp) for i in imgs] == [[9 * f + 4, 0, 0] for f in range(6)] * 2
    ticks = [i.acquisition_time_stamp for i in imgs]
    assert np.diff(ticks).tolist() == [9] * 11 and ticks[0] > 4  # one readout a tick, after the noise scan
    assert os.path.getsize(gif) > 0


def test_the_images_say_what_made_them_and_the_recorded_settings_refit_them_bit_for_bit(raw2, tmp_path, capsys):
    import dainr
    from dainr import reconstruct
    from dainr_app.mrd import provenance

    out = str(tmp_path / "img.h5")
    assert cli.main(["recon", raw2, "-o", out, "--steps", "6", "--seed", "3", "--lr", "2e-3",
                     "--spokes-per-frame", "9", "--golden-angle", "true"]) == 0
    line = json.loads(capsys.readouterr().out.splitlines()[0])  # (progress, shown, changes no result: left out)
    assert line["dainr"] == dainr.__version__ and line["config"] == {"lr": 2e-3, "max_steps": 6, "seed": 3}
    images = [im for im in read_images(out)[1] if im.slice == 0]
    made_by = provenance(images[0])
    assert made_by["software"][:2] == [f"dainr {dainr.__version__}", f"torch {torch.__version__}"]
    assert made_by["read_options"] == {"spokes_per_frame": 9, "golden_angle": "true"}
    cfg = made_by["config"]
    assert (cfg.seed, cfg.lr, cfg.max_steps, cfg.device) == (3, 2e-3, 6, "cpu") and cfg.nufft_backend != "auto"
    if cfg.nufft_backend in ("finufft", "torchkbnufft"):  # the NUFFT library the fit ran on, with its version
        import importlib.metadata

        assert made_by["software"][-1] == f"{cfg.nufft_backend} {importlib.metadata.version(cfg.nufft_backend)}"
    refit = reconstruct(read_raw(raw2, spokes_per_frame=9).slices[(0, 0, 0, 0)].data, cfg)
    assert np.array_equal(np.stack([im.data[0, 0] for im in images]), np.abs(refit.images.numpy()))


def test_a_truth_that_does_not_match_the_frames_is_refused_or_left_out(raw2, tmp_path, capsys):
    """`--spokes-per-frame 6` re-bins 54 spokes into 9 frames: the simulated 6-frame truth beside the raw file made
    the finished fit fail ("must be frames of the same shape"), or, with fewer frames, scored them against the
    wrong frames; and where the re-binned frames were as many as the truth's (9 spokes per frame re-binned by 10:
    6 frames, the last of 4 spokes) they were scored against other time windows, with no warning."""
    out = str(tmp_path / "o.h5")
    assert cli.main(["recon", raw2, "-o", out, "--steps", "2", "--spokes-per-frame", "6"]) == 0
    captured = capsys.readouterr()
    truth_file = raw2.replace('.h5', '_truth.npz')
    rebinned = (f"dainr recon: warning: frames re-binned by --spokes-per-frame {{}}: the ground truth {truth_file} "
                "found beside the raw file is of the file's own frames: the images are not scored\n")
    assert captured.err == rebinned.format(6) + f"wrote {out}\n"
    lines = [json.loads(line) for line in captured.out.splitlines()]  # stdout: JSON lines only (`| jq` works)
    assert [line["frames"] for line in lines] == [9, 9] and not any("psnr" in line for line in lines)
    assert [im.physiology_time_stamp[0] for im in read_images(out)[1][:9]] == [6 * f + 3 for f in range(9)]
    assert cli.main(["recon", raw2, "-o", out, "--steps", "2", "--spokes-per-frame", "10"]) == 0
    captured = capsys.readouterr()
    assert captured.err == rebinned.format(10) + f"wrote {out}\n"
    assert [json.loads(line)["frames"] for line in captured.out.splitlines()] == [6, 6]
    # a file binned by its own spokes_per_frame (no phase range): the same N is its own frames, scored
    own = _rewrite(raw2, str(tmp_path / "own.h5"), lambda a: a,
                   header=lambda xml: re.sub(r"<phase>.*?</phase>", "", xml, flags=re.S))
    shutil.copy(raw2.replace(".h5", "_truth.npz"), own.replace(".h5", "_truth.npz"))
    for n, scored in ((9, True), (10, False)):
        assert cli.main(["recon", own, "-o", out, "--steps", "2", "--spokes-per-frame", str(n), "--quiet"]) == 0
        captured = capsys.readouterr()
        assert all(("psnr" in json.loads(line)) is scored for line in captured.out.splitlines()), captured
        assert ("frames re-binned" in captured.err) is not scored
    truth = np.load(raw2.replace(".h5", "_truth.npz"))["images"]
    np.savez(tmp_path / "one_slice.npz", images=truth[:1])  # named by the user: refused before the fit
    assert cli.main(["recon", raw2, "-o", str(tmp_path / "new.h5"), "--truth", str(tmp_path / "one_slice.npz"),
                     "--quiet"]) == 2
    assert "(slice 1 has 6 frames of 32×32, the truth none;" in capsys.readouterr().err
    np.savez(tmp_path / "coarse.npz", images=truth[..., :16])  # the right frames of another shape
    assert cli.main(["recon", raw2, "-o", str(tmp_path / "new.h5"), "--truth", str(tmp_path / "coarse.npz"),
                     "--quiet"]) == 2
    assert "(slice 0 has 6 frames of 32×32, the truth 6 frames of 32×16;" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "new.h5")


def test_recon_writes_into_the_group_it_reads(raw2, tmp_path, capsys):
    """`--group g2` read g2 but wrote the images and header to `dataset`, so `dainr dicom --group g2` found none."""
    raw, out = str(tmp_path / "g2.h5"), str(tmp_path / "img.h5")
    with h5py.File(raw2, "r") as src, h5py.File(raw, "w") as dst:
        src.copy("dataset", dst, name="g2")
    assert cli.main(["recon", raw, "-o", out, "--group", "g2", "--steps", "5", "--quiet"]) == 0
    with h5py.File(out, "r") as h5:
        assert list(h5) == ["g2"] and "xml" in h5["g2"]
    assert len(read_images(out, "g2")[1]) == 12
    assert cli.main(["dicom", out, "-o", str(tmp_path / "dcm"), "--group", "g2"]) == 0
    assert len(os.listdir(tmp_path / "dcm" / "series_001")) == 12


def test_recon_options_reach_the_config(capsys):
    def cfg(*extra):
        return cli.config_from_args(cli.build_parser().parse_args(["recon", "raw.h5", "-o", "o.h5", *extra]))

    c = cfg("--reference-grid", "--features", "--steps", "7", "--sr-ratio", "2")
    assert not c.cap_grid_at_matrix and c.use_features and c.max_steps == 7 and c.spatial_ratio == 2
    # (the reference's nearest-pixel query: the image half an output pixel off its header position)
    assert "half an output pixel off its header position" in capsys.readouterr().err
    cfg("--reference-grid")
    cfg("--sr-ratio", "2")
    assert capsys.readouterr().err == ""
    default = cfg()
    assert default.cap_grid_at_matrix and default.use_features is DAINRConfig().use_features
    assert not cfg("--no-features").use_features
    # recon's --steps and demo's --max-steps: each command takes both spellings
    assert cfg("--max-steps", "9").max_steps == 9
    demo = cli.build_parser().parse_args(["demo", "--steps", "11"])
    assert demo.max_steps == 11 and cli.build_parser().parse_args(["demo"]).max_steps == 300
    assert default.check_memory and not cfg("--no-memory-check").check_memory
    assert default.cap_grid_ratio == DAINRConfig().cap_grid_ratio and cfg("--cap-grid-ratio", "1").cap_grid_ratio == 1
    for bad in ("0", "1.5", "nan"):
        with pytest.raises(SystemExit):
            cfg("--cap-grid-ratio", bad)
    assert default.lr == DAINRConfig().lr and cfg("--lr", "1e-3").lr == 1e-3
    for bad in ("0", "-1e-3", "nan", "inf", "fast"):
        with pytest.raises(SystemExit):
            cfg("--lr", bad)


def _rewrite(src_path: str, dst_path: str, transform, header=None) -> str:
    """Copy an MRD raw file, passing each acquisition through ``transform`` (None drops it) and the header's XML
    through ``header``."""
    src = ismrmrd.Dataset(src_path, "dataset", create_if_needed=False, mode="r")
    dst = ismrmrd.Dataset(dst_path, "dataset", create_if_needed=True)
    try:
        xml = src.read_xml_header()
        xml = xml.decode() if isinstance(xml, bytes) else xml
        dst.write_xml_header(header(xml) if header else xml)
        for i in range(src.number_of_acquisitions()):
            acq = transform(src.read_acquisition(i))
            if acq is not None:
                dst.append_acquisition(acq)
    finally:
        src.close()
        dst.close()
    return dst_path


def test_trajectory_from_golden_angle_index_matches_stored_traj(raw2, tmp_path):
    a = read_raw(raw2).slices[(0, 0, 0, 0)].data

    # rewrite slice 0 without acq.traj: the reader must derive the same angles from kspace_encode_step_1
    def drop_traj(acq):
        if acq.idx.slice != 0:
            return None
        new = ismrmrd.Acquisition.from_array(acq.data)
        new.idx = acq.idx
        new.flags = acq.flags
        return new
    dst_path = _rewrite(raw2, str(tmp_path / "notraj.h5"), drop_traj)
    b = read_raw(dst_path).slices[(0, 0, 0, 0)].data
    assert torch.allclose(a.traj, b.traj, atol=1e-5) and torch.equal(a.kdata, b.kdata)
    # `dainr recon --golden-angle reference`: the reference's 111.246-radian step instead of the header's
    from dainr.trajectory import golden_angle_trajectory

    ref = read_raw(dst_path, golden_angle="reference").slices[(0, 0, 0, 0)].data.traj
    F_, S, R = ref.shape[:3]
    assert torch.allclose(ref, golden_angle_trajectory(F_, S, R, "reference"), atol=1e-3)  # float32 angles
    assert not torch.allclose(ref, a.traj, atol=1e-2)
    assert cli.main(["recon", dst_path, "-o", str(tmp_path / "ref.h5"), "--golden-angle", "reference",
                     "--steps", "2", "--quiet"]) == 0
    for centre in (R // 2, R // 2 - 5):  # the echo where the derived positions put it / an asymmetric echo
        def with_centre(acq):
            new = drop_traj(acq)
            if new is not None:
                new.center_sample = centre
            return new
        path = _rewrite(raw2, str(tmp_path / f"centre{centre}.h5"), with_centre)
        if centre == R // 2:
            assert torch.allclose(read_raw(path).slices[(0, 0, 0, 0)].data.traj, a.traj, atol=1e-5)
        else:
            with pytest.raises(MRDFormatError, match="asymmetric echo"):
                read_raw(path)


def test_bad_files_and_arguments(tmp_path, capsys):
    missing = str(tmp_path / "nope.h5")
    assert cli.main(["recon", missing, "-o", str(tmp_path / "o.h5")]) == 2
    assert "no such file" in capsys.readouterr().err
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5 at all")
    assert cli.main(["recon", str(junk), "-o", str(tmp_path / "o.h5")]) == 2
    assert "not an MRD/HDF5 file" in capsys.readouterr().err
    with h5py.File(tmp_path / "empty.h5", "w") as f:
        f.create_group("dataset")
    assert cli.main(["recon", str(tmp_path / "empty.h5"), "-o", str(tmp_path / "o.h5")]) == 2
    assert "header" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["recon", missing, "-o", "x.h5", "--sr-ratio", "0.5"])
    with pytest.raises(SystemExit):
        cli.main(["recon", missing, "-o", "x.h5", "--steps", "0"])
    with pytest.raises(SystemExit):  # rejected before any reconstruction work
        cli.main(["recon", missing, "-o", "x.h5", "--preview", "out.jpg"])
    for argv in (["recon", missing, "-o", "x.h5", "--series", "-1"], ["recon", missing, "-o", "x.h5", "--series", "70000"],
                 ["simulate", "-o", "x.h5", "--noise", "-1"]):  # a wrapped series index; negative noise
        with pytest.raises(SystemExit):
            cli.main(argv)


def test_recon_refuses_a_scan_that_cannot_fit_in_memory(tmp_path, capsys):
    from dainr import RadialData
    from dainr.sim import simulate

    d = simulate(matrix=32, frames=6, spokes=9, coils=3).data
    path = str(tmp_path / "huge.h5")
    write_raw(path, [RadialData(d.kdata, d.traj, 20000, d.spoke_mask)])  # a header claiming 20000²
    assert cli.main(["recon", path, "-o", str(tmp_path / "o.h5"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "needs about" in err and "matrix 20000" in err and not os.path.exists(tmp_path / "o.h5")


def test_repetitions_of_a_slice_are_reconstructed_separately(raw2, tmp_path):
    def to_repetition(acq):
        if acq.idx.slice == 1:  # slice 1 of the file becomes repetition 1 of slice 0
            acq.idx.slice, acq.idx.repetition = 0, 1
        return acq
    path = _rewrite(raw2, str(tmp_path / "reps.h5"), to_repetition)
    assert sorted(read_raw(path).slices) == [(0, 0, 0, 0), (0, 0, 1, 0)]  # not merged into one cine
    # each repetition is scored against its slice's truth (checking it raised TypeError: two cines of slice 0)
    truth = str(tmp_path / "truth.npz")
    np.savez(truth, images=np.load(raw2.replace(".h5", "_truth.npz"))["images"][:1])
    assert cli.main(["recon", path, "-o", str(tmp_path / "o.h5"), "--truth", truth, "--steps", "2", "--quiet"]) == 0


def test_inconsistent_channels_are_reported(tmp_path):
    from dainr.sim import simulate

    a = simulate(matrix=16, frames=2, spokes=4, coils=2).data
    b = simulate(matrix=16, frames=2, spokes=4, coils=3).data
    path = str(tmp_path / "mix.h5")
    write_raw(path, [a], noise=b.noise.numpy())  # noise scan with 3 channels, data with 2
    (raw_slice,) = read_raw(path).slices.values()  # unwhitened, as Gadgetron's NoiseAdjustGadget passes it on
    assert raw_slice.data.noise is None
    assert raw_slice.warnings == ["slice 0: 2 channels but the noise scan has 3: reconstructed without prewhitening"]


def test_readouts_that_disagree_on_the_slice_geometry_are_reported(raw2, tmp_path):
    def move(acq, counter=iter(range(10**6))):  # the second half of each slice 40 mm along z, last readout turned
        i = next(counter)
        if i % 2:
            acq.position = tuple(np.add(acq.position, (0.0, 0.0, 40.0)))
        if i == n - 1:
            acq.read_dir, acq.phase_dir = (0.0, 1.0, 0.0), (-1.0, 0.0, 0.0)
        return acq

    (raw_slice,) = (s for k, s in read_raw(raw2).slices.items() if k[0] == 0)
    assert raw_slice.warnings == []  # the simulator's readouts agree
    src = ismrmrd.Dataset(raw2, "dataset", create_if_needed=False, mode="r")
    n = src.number_of_acquisitions()
    src.close()
    slices = read_raw(_rewrite(raw2, str(tmp_path / "moved.h5"), move)).slices
    notes = [note for s in slices.values() for note in s.warnings]
    assert notes[-1] == ("slice 1: the readouts' position differs by up to 40 mm and read/phase/slice directions "
                         "differ by up to 90°: the images carry the last readout's geometry")
    assert notes[0].startswith("slice 0: the readouts' position differs by up to 40 mm: the images")
    assert slices[max(slices)].geometry.read_dir == (0.0, 1.0, 0.0)

    def nudge(acq, counter=iter(range(10**6))):  # one readout 0.1 mm off, another turned by 1°
        i = next(counter)
        if i == n // 2:
            acq.position = tuple(np.add(acq.position, (0.1, 0.0, 0.0)))
        if i == n // 2 + 1:
            c, s_ = np.cos(np.radians(1)), np.sin(np.radians(1))
            acq.read_dir, acq.phase_dir = (c, s_, 0.0), (-s_, c, 0.0)
        return acq
    notes = [note for s in read_raw(_rewrite(raw2, str(tmp_path / "nudged.h5"), nudge)).slices.values()
             for note in s.warnings]
    assert notes == ["slice 0: the readouts' position differs by up to 0.1 mm and read/phase/slice directions differ "
                     "by up to 1°: the images carry the last readout's geometry"]


def test_demo_command(tmp_path, capsys):
    out = str(tmp_path / "demo")
    assert cli.main(["demo", "-o", out, "--max-steps", "150", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "DA-INR" in text and "zero-filled" in text
    m = json.load(open(os.path.join(out, "metrics.json")))
    assert m["psnr"] > m["zero_filled_psnr"]
    assert m["software"][0].startswith("dainr ") and m["config"]["max_steps"] == 150  # (from the gadget's images)
    for name in ("raw.h5", "images.h5", "preview.gif"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    assert m["images"] == 24 and m["dicom_files"] == 24  # final + preview series, via the embedded server
    assert sorted(os.listdir(os.path.join(out, "dicom"))) == ["series_001", "series_101"]


def test_header_without_phase_range_uses_spokes_per_frame():
    from dainr_app.mrd import ReconParameters, build_header, parse_header

    import ismrmrd.xsd

    hdr = parse_header(ismrmrd.xsd.ToXML(build_header(32, 64, 2, 1, 40, 1, spokes_per_frame=8)))
    p = ReconParameters.from_header(hdr)
    assert not p.frames_from_phase and p.spokes_per_frame == 8 and p.matrix == 32
    assert ReconParameters.from_header(hdr, spokes_per_frame=5).spokes_per_frame == 5  # the caller's value wins
    with pytest.raises(MRDFormatError, match="does not parse"):
        parse_header("<ismrmrdHeader><bogus/></ismrmrdHeader>")
    hdr.encoding[0].encodingLimits.kspace_encoding_step_2.maximum = 7  # stack of stars: 8 partitions
    with pytest.raises(MRDFormatError, match="8 partitions"):
        ReconParameters.from_header(hdr, spokes_per_frame=5)
    hdr.encoding[0].encodingLimits.kspace_encoding_step_2.maximum = 0
    hdr.encoding[0].encodedSpace.matrixSize.z = 16
    with pytest.raises(MRDFormatError, match="16 partitions"):
        ReconParameters.from_header(hdr, spokes_per_frame=5)
    hdr.encoding[0].encodedSpace.matrixSize.z = 1
    for axis, size, match in (("matrixSize", 24, "32 x 24 pixels"), ("fieldOfView_mm", 240.0, "over 320 x 240 mm")):
        original = getattr(hdr.encoding[0].reconSpace, axis).y
        getattr(hdr.encoding[0].reconSpace, axis).y = size  # a rectangular grid would be labelled wrongly
        with pytest.raises(MRDFormatError, match=match):
            ReconParameters.from_header(hdr, spokes_per_frame=5)
        getattr(hdr.encoding[0].reconSpace, axis).y = original
    hdr.encoding[0].trajectory = ismrmrd.xsd.trajectoryType.CARTESIAN  # radial only (tests/test_interop.py: C++ data)
    with pytest.raises(MRDFormatError, match="trajectory is 'cartesian'"):
        ReconParameters.from_header(hdr, spokes_per_frame=5)
    # values the XML binding could not convert stay text (xsdata warns): the error names the element
    text = ismrmrd.xsd.ToXML(build_header(32, 64, 2, 6, 10, 1))
    limits = text.index("<encodingLimits>")
    for old, new, element in (("<maximum>5</maximum>", "<maximum>nan</maximum>", "phase maximum"),
                              ("<x>320.0</x>", "<x>wide</x>", "reconSpace fieldOfView_mm x")):
        start = limits if element.startswith("phase") else text.index("<reconSpace>")
        bad = text[:start] + text[start:].replace(old, new, 1)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # our error alone (xsdata's ConverterWarning was printed before it)
            with pytest.raises(MRDFormatError, match=f"MRD header {element} is '"):
                ReconParameters.from_header(parse_header(bad))


def test_outputs_that_would_destroy_data_or_waste_a_fit_are_refused_first(raw2, tmp_path, capsys):
    import shutil

    raw = str(tmp_path / "raw.h5")
    shutil.copy(raw2, raw)
    before = read_raw(raw).slices.keys()
    assert cli.main(["recon", raw, "-o", raw, "--steps", "2", "--quiet"]) == 2  # the raw file as the output
    assert "is the input file" in capsys.readouterr().err and read_raw(raw).slices.keys() == before
    assert cli.main(["replay", raw, "-o", raw, "-p", "1"]) == 2  # refused before connecting anywhere
    assert "is the input file" in capsys.readouterr().err and read_raw(raw).slices.keys() == before
    other = str(tmp_path / "copy.h5")
    shutil.copy(raw2, other)  # replay's output group is the raw group of another file
    assert cli.main(["replay", raw, "-o", other, "-G", "dataset", "-p", "1"]) == 2
    assert "holds raw MRD data" in capsys.readouterr().err and read_raw(other).slices.keys() == before
    assert cli.main(["recon", raw, "-o", other, "--steps", "2", "--quiet"]) == 2  # recon replaces the whole file
    assert "holds raw MRD data" in capsys.readouterr().err and read_raw(other).slices.keys() == before
    assert cli.main(["recon", raw, "-o", str(tmp_path), "--quiet"]) == 2  # a folder: refused before the fit
    assert "it is a folder" in capsys.readouterr().err
    assert cli.main(["simulate", "-o", str(tmp_path / "s.h5"), "--spokes", "1"]) == 2  # not SystemExit's 1
    assert "dainr simulate: error: need" in capsys.readouterr().err
    assert cli.main(["recon", raw, "-o", str(tmp_path / "nodir" / "o.h5"), "--quiet"]) == 2  # before the fit
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["recon", raw, "-o", str(tmp_path / "o.h5"), "--preview", str(tmp_path / "nodir" / "p.gif"),
                     "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err and not os.path.exists(tmp_path / "o.h5")
    kept = str(tmp_path / "kept.h5")
    assert cli.main(["recon", raw, "-o", kept, "--steps", "2", "--quiet"]) == 0
    size = os.path.getsize(kept)
    assert cli.main(["recon", raw, "-o", kept, "--steps", "2", "--device", "foo", "--quiet"]) == 2  # a failed run
    assert "is not a device" in capsys.readouterr().err
    assert os.path.getsize(kept) == size and len(read_images(kept)[1]) == 12  # keeps the previous output
    np.savez(tmp_path / "t.npz", other=np.zeros(3))
    assert cli.main(["recon", raw, "-o", kept, "--truth", str(tmp_path / "t.npz"), "--quiet"]) == 2
    assert "no 'images' array" in capsys.readouterr().err
    # a preview onto the images (exit 0, the images lost), a link to a missing folder (refused after the fit), a
    # write-protected file (replaced, exit 0): refused before any work
    assert cli.main(["recon", raw, "-o", str(tmp_path / "same.gif"), "--preview",
                     os.path.join(str(tmp_path), ".", "same.gif"), "--steps", "2", "--quiet"]) == 2
    assert "the preview would replace the images" in capsys.readouterr().err
    os.symlink(tmp_path / "nodir" / "x.h5", tmp_path / "dangling.h5")
    assert cli.main(["recon", raw, "-o", str(tmp_path / "dangling.h5"), "--steps", "2", "--quiet"]) == 2
    assert f"folder {tmp_path / 'nodir'} does not exist" in capsys.readouterr().err
    os.chmod(kept, 0o444)
    for argv in (["recon", raw, "-o", kept, "--steps", "2", "--quiet"], ["simulate", "-o", kept]):
        assert cli.main(argv) == 2
        assert f"cannot write {kept}: it is write-protected" in capsys.readouterr().err
    assert os.path.getsize(kept) == size
    stream = str(tmp_path / "stream.bin")
    open(stream, "wb").write(b"not empty")
    assert cli.main(["serve", "--from_stream", "-c", "passthrough", "-i", stream, "-o", stream]) == 2
    assert "is the input file" in capsys.readouterr().err and open(stream, "rb").read() == b"not empty"


def test_phase_labels_and_temporal_ratio_follow_the_file(raw2, tmp_path, capsys):
    def shift_phase(acq):
        acq.idx.phase += 3
        return acq
    path = _rewrite(raw2, str(tmp_path / "phase3.h5"), shift_phase)  # phases 3..8, as a scanner may number them
    out = str(tmp_path / "o.h5")
    assert cli.main(["recon", path, "-o", out, "--steps", "2", "--quiet"]) == 0
    assert sorted({int(im.phase) for im in read_images(out)[1]}) == list(range(3, 9))
    # 6 frames: ×2 would fit 0, 2, 4 and render 5 frames, losing the last; ×5 fits 0 and 5
    assert cli.main(["recon", path, "-o", out, "--steps", "2", "--down-ratio", "2", "--quiet"]) == 2
    assert "the last 1 would not be reconstructed" in capsys.readouterr().err
    assert cli.main(["recon", path, "-o", out, "--steps", "2", "--down-ratio", "5", "--quiet"]) == 0
    images = read_images(out)[1]
    assert len(images) == 12
    # which frames a model that never saw their data made, and what it saw, are in the images (they were not)
    meta = {(im.slice, im.phase): ismrmrd.Meta.deserialize(im.attribute_string) for im in images}
    assert {k: m["ImageComment"] for k, m in meta.items()} == {
        (s, p): "DA-INR" if p in (3, 8) else "DA-INR (interpolated frame)" for s in (0, 1) for p in range(3, 9)}
    assert all(m["ImageProcessingHistory"].endswith("s on cpu, 2 of 6 frames fitted") for m in meta.values())
    assert cli.main(["dicom", out, "-o", str(tmp_path / "dcm")]) == 0
    dcm = [pydicom.dcmread(f) for f in sorted((tmp_path / "dcm" / "series_001").iterdir())]
    assert {d.SeriesDescription for d in dcm} == {"DA-INR"}
    assert sum(d.ImageComments == "DA-INR (interpolated frame)" for d in dcm) == 8
    capsys.readouterr()
    assert cli.main(["recon", path, "-o", out, "--steps", "2", "--sr-ratio", "2", "--quiet"]) == 0
    assert [json.loads(line)["fit_matrix"] for line in capsys.readouterr().out.splitlines()] == [16, 16]
    assert ismrmrd.Meta.deserialize(read_images(out)[1][0].attribute_string)["ImageProcessingHistory"].endswith(
        f"s on cpu, fitted at {images[0].matrix_size[0] // 2}² for {images[0].matrix_size[0]}²")


@pytest.mark.parametrize("with_traj", [True, False])
def test_samples_the_scanner_marks_as_discarded_are_dropped(raw2, tmp_path, with_traj):
    def mark(acq):
        if not acq.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
            data = acq.data.copy()
            data[:, :4] = data[:, -3:] = 1e3  # what the scanner says not to use
            traj = acq.traj.copy()
            acq.resize(acq.number_of_samples, acq.active_channels, 2 if with_traj else 0)
            acq.data[:] = data
            if with_traj:
                acq.traj[:] = traj
            acq.discard_pre, acq.discard_post = 4, 3
        return acq
    header_angle = None if with_traj else "true"
    ref = read_raw(raw2, golden_angle=header_angle).slices[(0, 0, 0, 0)].data
    got = read_raw(_rewrite(raw2, str(tmp_path / "discard.h5"), mark), golden_angle=header_angle).slices[(0, 0, 0, 0)].data
    assert got.kdata.shape[-1] == ref.kdata.shape[-1] - 7
    assert torch.equal(got.kdata, ref.kdata[..., 4:-3]) and torch.allclose(got.traj, ref.traj[:, :, 4:-3], atol=1e-3)  # (a sample is 1/64)


@pytest.mark.parametrize("pre, post", [(4, 4), (4, 0), (0, 4)])
def test_discarded_samples_around_the_encoded_readout_without_trajectory(raw2, tmp_path, pre, post):
    """A scanner's readout with extra samples it marks as discarded (siemens_to_ismrmrd fills discard_pre/post and
    center_sample from the MDH; radial data comes without acq.traj): the kept samples are the encoded readout.
    The positions were derived from the whole readout: every slice was refused ("coarser than the acquisition",
    or "asymmetric echo")."""
    def pad(acq):
        if acq.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
            return acq
        data = acq.data.copy()
        C, R = data.shape
        acq.resize(R + pre + post, C, 0)
        acq.data[:] = 1e3  # what the scanner says not to use
        acq.data[:, pre:pre + R] = data
        acq.discard_pre, acq.discard_post, acq.center_sample = pre, post, pre + R // 2
        return acq
    ref = read_raw(raw2, golden_angle="true").slices[(0, 0, 0, 0)].data
    got = read_raw(_rewrite(raw2, str(tmp_path / "padded.h5"), pad), golden_angle="true").slices[(0, 0, 0, 0)].data
    assert torch.equal(got.kdata, ref.kdata) and torch.allclose(got.traj, ref.traj, atol=1e-5)

    def unmarked(acq):  # the same without center_sample: the echo's place is known only where the discards match
        acq = pad(acq)
        acq.center_sample = 0
        return _without_traj(acq)
    path = _rewrite(raw2, str(tmp_path / "unmarked.h5"), unmarked)
    if pre == post:
        assert torch.allclose(read_raw(path).slices[(0, 0, 0, 0)].data.traj, ref.traj, atol=1e-5)
    else:  # it put the echo in the middle of the kept samples, 2 samples off, and the centre check let it pass
        with pytest.raises(MRDFormatError, match=f"discards {pre} samples before and {post} after, without center"):
            read_raw(path)


def test_reversed_readouts_without_trajectory_get_the_reversed_positions(raw2, tmp_path):
    """A reversed readout runs the spoke backwards through the same echo sample (``center_sample`` = n/2): stored
    sample i lies where the forward spoke's sample n − i does (the old rule, the forward positions reversed, put
    k = 0 one sample off)."""
    def strip(acq, reverse=False):
        if acq.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
            return acq
        data = acq.data.copy()
        acq.resize(acq.number_of_samples, acq.active_channels, 0)  # no acq.traj: positions from the angle index
        if reverse:  # sample 0 (+0.5 cycles/pixel) is not on the forward spoke: left zero
            acq.data[:] = 0
            acq.data[:, 1:] = data[:, :0:-1]
            acq.set_flag(ismrmrd.ACQ_IS_REVERSE)
        else:
            acq.data[:] = data
        assert acq.center_sample == acq.number_of_samples // 2
        return acq
    ref = read_raw(_rewrite(raw2, str(tmp_path / "fwd.h5"), strip), golden_angle="true").slices[(0, 0, 0, 0)].data
    got = read_raw(_rewrite(raw2, str(tmp_path / "rev.h5"), lambda a: strip(a, True)),
                   golden_angle="true").slices[(0, 0, 0, 0)].data
    assert torch.equal(got.kdata[..., 1:].flip(-1), ref.kdata[..., 1:])
    assert torch.allclose(got.traj[..., 1:, :].flip(-2), ref.traj[..., 1:, :], atol=1e-6)
    centre = ref.kdata.shape[-1] // 2
    assert float(got.traj[..., centre, :].abs().max()) < 1e-6  # the echo sample is k = 0


def _without_traj(acq):
    """An imaging readout without acq.traj: the reader derives the positions from the header and the index."""
    if not acq.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
        data = acq.data.copy()
        acq.resize(acq.number_of_samples, acq.active_channels, 0)
        acq.data[:] = data
    return acq


def test_readouts_of_a_second_encoding_space_are_counted_not_reconstructed(raw2, tmp_path, capsys):
    """They refused the whole file (the gadget passes them on and reconstructs the first encoding)."""
    def second(acq):
        if acq.idx.slice == 1 and not acq.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
            acq.encoding_space_ref = 1
        return acq
    path = _rewrite(raw2, str(tmp_path / "enc.h5"), second)
    scan = read_raw(path)
    assert [k[0] for k in scan.slices] == [0] and scan.other_encodings == {1: 6 * 9}  # a slice: 6 frames × 9 spokes
    assert torch.equal(scan.slices[0, 0, 0, 0].data.kdata, read_raw(raw2).slices[0, 0, 0, 0].data.kdata)
    assert cli.main(["recon", path, "-o", str(tmp_path / "o.h5"), "--steps", "2", "--quiet"]) == 0
    assert "warning: 54 readouts of encoding space 1 were not reconstructed" in capsys.readouterr().err
    with pytest.raises(MRDFormatError, match=r"no imaging acquisitions of the first encoding \(the readouts are of "
                                             r"encoding space\(s\) \[1\]\)"):
        read_raw(_rewrite(raw2, str(tmp_path / "enc1.h5"), lambda a: second(a) if a.idx.slice == 1 else None))


def test_readouts_without_samples_are_counted_not_reconstructed(raw2, tmp_path, capsys):
    """As the gadget passes them on (the README said so); recon refused the slice ("different (channels, samples)")."""
    def empty(acq, counter=iter(range(10**6))):
        if next(counter) == 40 and not acq.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
            acq.resize(0, acq.active_channels, 0)
        return acq
    path = _rewrite(raw2, str(tmp_path / "empty.h5"), empty)
    assert read_raw(path).empty_readouts == 1
    assert cli.main(["recon", path, "-o", str(tmp_path / "o.h5"), "--steps", "2", "--quiet"]) == 0
    assert "warning: 1 readouts without samples were not reconstructed" in capsys.readouterr().err


def test_uniform_radial_without_trajectory_needs_the_angle_step(raw2, tmp_path):
    """A uniform ``radial`` header without acq.traj and without the angle parameter was read with golden angles."""
    def radial(xml):
        return re.sub(r"<trajectory>goldenangle</trajectory>", "<trajectory>radial</trajectory>",
                      re.sub(r"<trajectoryDescription>.*</trajectoryDescription>", "", xml, flags=re.S))
    path = _rewrite(raw2, str(tmp_path / "radial.h5"), _without_traj, header=radial)
    with pytest.raises(MRDFormatError, match="the spokes' angles are unknown"):
        read_raw(path)
    assert read_raw(path, golden_angle="true").slices[(0, 0, 0, 0)].data.kdata.shape[-1] == 64


def test_scanner_converter_layouts_give_the_same_trajectory(raw2, tmp_path):
    """Found by a review with the layouts of scanner converters and Gadgetron's examples: each gives the positions of
    the file with a global spoke counter and an encoded matrix of the readout's samples (or is refused)."""
    key = (0, 0, 0, 0)
    ref = read_raw(_rewrite(raw2, str(tmp_path / "ref.h5"), _without_traj)).slices[key].data
    spokes = ref.traj.shape[1]

    def restart(acq):  # a spoke counter restarting every frame: every frame got frame 0's angles
        acq = _without_traj(acq)
        acq.idx.kspace_encode_step_1 %= spokes
        return acq
    assert torch.equal(read_raw(_rewrite(raw2, str(tmp_path / "restart.h5"), restart)).slices[key].data.traj, ref.traj)

    def siemens(xml):  # siemens_to_ismrmrd's radial header: the image's 32 over 320 mm for readouts of 64 samples
        enc = re.search(r"<encodedSpace>.*?</encodedSpace>", xml, re.S).group(0)
        return xml.replace(enc, enc.replace("<x>64</x>", "<x>32</x>").replace("<x>640.0</x>", "<x>320.0</x>"))
    path = _rewrite(raw2, str(tmp_path / "siemens.h5"), _without_traj, header=siemens)
    assert "<x>320.0</x>" in read_raw(path).header_text  # (it was refused: "its matrix is coarser")
    assert torch.equal(read_raw(path).slices[key].data.traj, ref.traj)

    def weighted(acq):  # (kx, ky, density weight) in a 2D encoding, as Gadgetron's trajectory gadgets write it
        if not acq.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
            data, traj = acq.data.copy(), acq.traj.copy()
            acq.resize(acq.number_of_samples, acq.active_channels, 3)
            acq.data[:], acq.traj[:, :2] = data, traj
            acq.traj[:, 2] = np.linalg.norm(traj, axis=1)
        return acq
    assert torch.equal(read_raw(_rewrite(raw2, str(tmp_path / "w.h5"), weighted)).slices[key].data.traj,
                       read_raw(raw2).slices[key].data.traj)  # (it was refused as a non-zero kz)

    def centre_out(shift):  # the echo moved ``shift`` samples towards the start
        def f(acq):
            acq = _without_traj(acq)
            if not acq.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
                acq.data[:] = np.roll(acq.data, -shift, axis=1)
            return acq
        return f
    # at the first sample: read as symmetric spokes it gave a meaningless image
    with pytest.raises(MRDFormatError, match="centre-out or asymmetric readouts need acq.traj"):
        read_raw(_rewrite(raw2, str(tmp_path / "out.h5"), centre_out(32)))
    # a partial echo within a quarter of the middle was read as whole without a word; a gradient delay is not noted
    assert read_raw(_rewrite(raw2, str(tmp_path / "p.h5"), centre_out(8))).slices[key].warnings == [
        "slice 0: the readouts have no acq.traj and their k-space centre (the largest samples) lies at sample 24 of "
        "64, 8 from the middle: reconstructed as symmetric spokes (an asymmetric echo needs acq.traj)"]
    assert read_raw(_rewrite(raw2, str(tmp_path / "d.h5"), centre_out(2))).slices[key].warnings == []
    assert "3 from the middle" in read_raw(_rewrite(raw2, str(tmp_path / "e.h5"), centre_out(3))).slices[key].warnings[0]


def test_spoke_indices_count_each_average():
    from dainr_app.mrd import spoke_indices

    def acq(step, average):
        a = ismrmrd.Acquisition()
        a.idx.kspace_encode_step_1, a.idx.average = step, average
        return a
    assert spoke_indices([acq(s, 0) for s in (3, 4, 5, 6)]) == [3, 4, 5, 6]  # a global counter
    assert spoke_indices([acq(s % 2, 0) for s in range(4)]) == [0, 1, 2, 3]  # restarting per frame: arrival order
    assert spoke_indices([acq(s, a) for a in (0, 1) for s in (5, 6)]) == [5, 6, 5, 6]  # averages repeat their spokes
    assert spoke_indices([acq(s % 2, a) for a in (0, 1) for s in range(4)]) == [0, 1, 2, 3] * 2


def test_a_finer_recon_space_than_acquired_scales_the_derived_positions(raw2, tmp_path):
    """Scanner interpolation: 2× the reconSpace matrix over the same FOV; the samples then span ±0.25 cycles/pixel."""
    def finer(xml, n=64):
        recon = re.search(r"<reconSpace>.*?</reconSpace>", xml, re.S).group(0)
        return xml.replace(recon, re.sub(r"<x>32</x>", f"<x>{n}</x>", re.sub(r"<y>32</y>", f"<y>{n}</y>", recon)))
    ref = read_raw(_rewrite(raw2, str(tmp_path / "a.h5"), _without_traj), golden_angle="true").slices[(0, 0, 0, 0)].data
    got = read_raw(_rewrite(raw2, str(tmp_path / "b.h5"), _without_traj, header=finer), golden_angle="true").slices[(0, 0, 0, 0)].data
    assert got.matrix == 64 and torch.allclose(got.traj, ref.traj / 2)
    with pytest.raises(MRDFormatError, match="coarser than the acquisition"):
        read_raw(_rewrite(raw2, str(tmp_path / "c.h5"), _without_traj, header=lambda x: finer(x, 16)),
                 golden_angle="true")


def test_oversampling_removed_upstream_and_trajectory_units_against_the_header(raw2, tmp_path):
    """Found by a review with scanner layouts; each gave a wrong image without a word: readouts whose ×2 readout
    oversampling Gadgetron's RemoveROOversamplingGadget removed (the header still says encodedSpace 64 over 640 mm:
    the 32 samples were read at ±0.25), acq.traj in cycles per encoded pixel under scanner interpolation (read as
    reconSpace cycles/pixel) and acq.traj in other units within ±0.5 (1/mm at 10 mm pixels, ±0.25)."""
    key = (0, 0, 0, 0)
    full = read_raw(raw2).slices[key].data  # 64 samples over ±0.5 of the 32-pixel grid

    def removed(acq):  # the oversampling removed: 32 samples 1/32 apart (every other position of the 64)
        acq = _without_traj(acq)
        if not acq.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
            data = acq.data[:, ::2].copy()
            acq.resize(data.shape[1], acq.active_channels, 0)
            acq.data[:], acq.center_sample = data, acq.center_sample // 2
        return acq
    got = read_raw(_rewrite(raw2, str(tmp_path / "ro.h5"), removed)).slices[key].data
    assert got.kdata.shape[-1] == 32 and torch.allclose(got.traj, full.traj[..., ::2, :], atol=1e-4)

    def scaled(factor):
        def f(acq):
            if not acq.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
                acq.traj[:] = acq.traj * factor
            return acq
        return f

    def finer(xml):  # scanner interpolation: reconSpace 64 over the same FOV
        recon = re.search(r"<reconSpace>.*?</reconSpace>", xml, re.S).group(0)
        return xml.replace(recon, recon.replace("<x>32</x>", "<x>64</x>").replace("<y>32</y>", "<y>64</y>"))
    got = read_raw(_rewrite(raw2, str(tmp_path / "interp.h5"), scaled(1.0), header=finer)).slices[key]
    assert got.data.matrix == 64 and torch.allclose(got.data.traj, full.traj / 2) and got.warnings == []
    for factor in (0.1, 0.5, 0.6):  # (beyond ±0.5: refused as before)
        with pytest.raises(MRDFormatError, match=rf"slice 0: acq.traj moves {1 / 64 * factor:.4g} from sample to sample "
                                                 r"where the header implies 0.01562 cycles per encoded pixel \(encodedSpace "
                                                 r"x 64 over 640 mm, readouts of 64 samples\): it is in other units"):
            read_raw(_rewrite(raw2, str(tmp_path / f"{factor}.h5"), scaled(factor)))
    for factor, noted in ((0.8, True), (0.88, True), (0.95, False)):  # noted beyond 10 %
        got = read_raw(_rewrite(raw2, str(tmp_path / f"ramp{factor}.h5"), scaled(factor))).slices[key]
        assert [w.endswith("readouts of 64 samples): reconstructed with acq.traj as given") for w in got.warnings] \
            == [True] * noted, factor
        assert torch.allclose(got.data.traj, full.traj * factor)

    def steeper(factor, cut):  # above 1: only the central samples kept (discarded), to stay within ±0.5
        def f(acq):
            acq = scaled(factor)(acq)
            if not acq.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
                acq.discard_pre = acq.discard_post = cut
            return acq
        return f
    assert read_raw(_rewrite(raw2, str(tmp_path / "s1.h5"), steeper(1.2, 6))).slices[key].warnings[0].endswith(
        "reconstructed with acq.traj as given")
    with pytest.raises(MRDFormatError, match="it is in other units"):
        read_raw(_rewrite(raw2, str(tmp_path / "s2.h5"), steeper(1.6, 12)))

    def same_fov(xml):  # 32 samples under encodedSpace 64 over the reconSpace's FOV: not oversampling removed
        enc = re.search(r"<encodedSpace>.*?</encodedSpace>", xml, re.S).group(0)
        return xml.replace(enc, enc.replace("<x>640.0</x>", "<x>320.0</x>"))
    got = read_raw(_rewrite(raw2, str(tmp_path / "same.h5"), removed, header=same_fov)).slices[key].data
    assert torch.allclose(got.traj, full.traj[..., ::2, :], atol=1e-4)  # 1/320 mm apart, as the FOV says


def test_readouts_oversampled_twice_the_encoded_matrix_whatever_the_recon_space_or_discards(raw2, tmp_path):
    """siemens_to_ismrmrd's radial header (encodedSpace 32 over 320 mm, readouts of 64 samples: oversampled ×2).
    With scanner interpolation (reconSpace 64) or discards of half the readout the kept samples span ±0.25
    cycles/pixel; the ×2 was only applied where the readout would otherwise reach beyond the reconSpace, so these
    spokes were read twice as long (the image at half its size); with 4 + 4 discarded samples around the 64, the
    file was refused ("coarser than the acquisition")."""
    key = (0, 0, 0, 0)
    ref = read_raw(_rewrite(raw2, str(tmp_path / "ref.h5"), _without_traj)).slices[key].data

    def siemens(xml, recon=32):
        enc = re.search(r"<encodedSpace>.*?</encodedSpace>", xml, re.S).group(0)
        xml = xml.replace(enc, enc.replace("<x>64</x>", "<x>32</x>").replace("<x>640.0</x>", "<x>320.0</x>"))
        rec = re.search(r"<reconSpace>.*?</reconSpace>", xml, re.S).group(0)
        return xml.replace(rec, rec.replace("<x>32</x>", f"<x>{recon}</x>").replace("<y>32</y>", f"<y>{recon}</y>"))

    def read(name, transform=_without_traj, **kw):
        path = _rewrite(raw2, str(tmp_path / name), transform, header=lambda x: siemens(x, **kw))
        return read_raw(path).slices[key].data

    interpolated = read("interpolated.h5", recon=64)
    assert interpolated.matrix == 64 and torch.allclose(interpolated.traj, ref.traj / 2)

    def discard(pre, post, pad=False):
        def transform(acq):
            acq = _without_traj(acq)
            if not acq.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
                if pad:  # samples around the readout, marked as discarded
                    data = acq.data.copy()
                    acq.resize(acq.number_of_samples + pre + post, acq.active_channels, 0)
                    acq.data[:, pre:pre + data.shape[1]] = data
                acq.discard_pre, acq.discard_post = pre, post
                acq.center_sample = acq.number_of_samples // 2
            return acq
        return transform
    half = read("half.h5", discard(16, 16))  # the central 32 of 64 samples, the encoded matrix's count
    assert half.traj.shape[2] == 32 and torch.allclose(half.traj, ref.traj[:, :, 16:48])
    padded = read("padded.h5", discard(4, 4, pad=True))
    assert torch.allclose(padded.traj, ref.traj, atol=1e-6)
    # with acq.traj (cycles per encoded pixel: 64 samples 1/64 apart), whole or padded with discarded samples:
    # the file's positions, without a note
    stored = read_raw(raw2).slices[key].data.traj

    def padded_traj(acq):
        if not acq.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
            data, traj = acq.data.copy(), acq.traj.copy()
            acq.resize(acq.number_of_samples + 8, acq.active_channels, 2)
            acq.data[:, 4:-4], acq.traj[4:-4], acq.traj[:4], acq.traj[-4:] = data, traj, 7.0, 7.0
            acq.discard_pre = acq.discard_post = 4
        return acq
    def partial_echo(acq):  # the first 16 of the 64 samples not acquired: the echo at sample 16 of 48
        if not acq.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
            data, traj = acq.data[:, 16:].copy(), acq.traj[16:].copy()
            acq.resize(48, acq.active_channels, 2)
            acq.data[:], acq.traj[:], acq.center_sample = data, traj, 16
        return acq
    for name, transform, samples in (("traj.h5", lambda a: a, slice(None)), ("padded_traj.h5", padded_traj,
                                     slice(None)), ("partial.h5", partial_echo, slice(16, None))):
        got = read_raw(_rewrite(raw2, str(tmp_path / name), transform, header=siemens)).slices[key]
        assert got.warnings == [] and torch.equal(got.data.traj, stored[..., samples, :]), name


def test_bench_lists_every_case_with_its_description(capsys):
    from dainr_app.bench import CASES

    assert cli.main(["bench", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    described = {line.split()[0]: line.split(None, 1)[1] for line in lines if len(line.split()) > 1}
    assert set(described) == set(CASES)


def test_bench_seeded_ablations_pair_the_models_by_seed(monkeypatch):
    from dainr.sim import simulate
    from dainr_app import bench

    monkeypatch.setattr(bench, "SEEDS", (0, 1))
    scan = simulate(24, 4, 9, 2, noise_level=0.02)
    out = bench._seeded_ablations(scan, device="cpu", max_steps=5)
    psnr = out["psnr"]
    full, nofeat = psnr["full"]["values"], psnr["no_features"]["values"]
    assert out["seeds"] == [0, 1] and len(full) == 2 and full[0] != full[1]  # the seed reaches the fit
    assert psnr["full - no_features"]["values"] == pytest.approx([a - b for a, b in zip(full, nofeat)])
    assert psnr["full"]["mean"] == pytest.approx(sum(full) / 2)
    assert psnr["full"]["sd"] == pytest.approx(abs(full[0] - full[1]) / 2 ** 0.5)
    assert set(out["ssim"]) == set(psnr)


def test_bench_temporal2_scores_the_frames_between_fitted_ones_against_their_neighbours_mean(monkeypatch):
    from dainr import reconstruct
    from dainr.metrics import psnr_ssim
    from dainr.sim import simulate
    from dainr_app import bench

    scan = simulate(16, 23, 4, 2, noise_level=0.02)
    monkeypatch.setattr(bench, "_phantom_scan", lambda spokes: scan)
    fits = []
    monkeypatch.setattr(bench, "reconstruct", lambda data, cfg: fits.append(reconstruct(
        data, cfg.replace(max_steps=3, device="cpu"))) or fits[-1])
    out = bench.case_temporal2()
    images, between = fits[0].images, list(range(1, 22, 2))  # ours: fitted 0, 2, …, 22
    blend = (images[[i - 1 for i in between]] + images[[i + 1 for i in between]]) / 2
    assert out["ours"]["neighbour_mean_psnr"] == pytest.approx(psnr_ssim(blend, scan.ground_truth[between])["psnr"])
    assert out["ours"]["interpolated_psnr"] == pytest.approx(
        psnr_ssim(images[between], scan.ground_truth[between])["psnr"])
    assert "extrapolated_psnr" in out["reference"] and "extrapolated_psnr" not in out["ours"]


def test_bench_sweep_reaches_the_fit():
    from dainr.sim import simulate
    from dainr_app import bench

    scan = simulate(24, 4, 9, 2, noise_level=0.02)
    settings = {"a": dict(frames_per_step=1), "b": dict(frames_per_step=2)}
    out = bench._sweep({"s": scan}, "cpu", settings, seeds=(0, 1), max_steps=5)
    one, two = out["s, a"], out["s, b"]
    assert set(out) == {"s, a", "s, b"}
    assert set(one) == {"psnr", "ssim", "seconds", "steps", "seconds_per_step"}  # and peak_gpu_mb on CUDA
    assert one["steps"]["values"] == [5, 5] and one["psnr"]["values"] != two["psnr"]["values"]
    assert one["psnr"]["values"][0] != one["psnr"]["values"][1]  # the seed reaches the fit
    assert one["psnr"]["mean"] == pytest.approx(sum(one["psnr"]["values"]) / 2)


def test_bench_paper_protocol_keeps_the_best_scored_checkpoints():
    from dainr.sim import simulate
    from dainr_app.bench import _paper_protocol

    scan = simulate(24, 4, 9, 2, noise_level=0.02)
    out = _paper_protocol(scan, DAINRConfig(device="cpu"), steps=30, every=10)
    assert [c["step"] for c in out["curve"]] == [10, 20, 30]
    assert out["psnr"] == max(c["psnr"] for c in out["curve"]) and out["ssim"] == max(c["ssim"] for c in out["curve"])
    assert {out["psnr_step"], out["ssim_step"]} <= {10, 20, 30}
    assert len({round(c["psnr"], 6) for c in out["curve"]}) == 3  # scored on the live images of each checkpoint


def test_bench_baseline_oracles_pick_each_metric_on_its_own(monkeypatch):
    """The oracle's SSIM was the one at its best-PSNR λ / iteration count (21 spokes: 0.889, where another λ of the
    same sweep reached 0.903)."""
    from dainr.sim import simulate
    from dainr_app import bench

    scan = simulate(24, 4, 9, 2, noise_level=0.02)
    monkeypatch.setattr(bench, "TV_ITERATIONS", (3, 9))
    out = bench._tv(scan, None) | bench._cg(scan, None)
    sweep = out["temporal_tv_oracle"]["sweep"]
    assert sorted(sweep) == sorted(f"{lam}@{n}" for lam in bench.TV_LAMBDAS for n in (3, 9))  # every (λ, iterations)
    oracle, held = out["temporal_tv_oracle"], out["temporal_tv_holdout"]
    assert sweep[f"{oracle['lam']}@{oracle['iterations']}"][0] == round(oracle["psnr"], 2)
    assert sweep[f"{oracle['ssim_lam']}@{oracle['ssim_iterations']}"][1] == round(oracle["ssim"], 3)
    assert held["iterations"] in (3, 9) and held["lam"] in bench.TV_LAMBDAS
    assert out["temporal_tv_oracle"]["psnr"] == pytest.approx(max(p for p, _ in sweep.values()), abs=0.005)
    assert out["temporal_tv_oracle"]["ssim"] == pytest.approx(max(q for _, q in sweep.values()), abs=0.0005)
    assert out["temporal_tv_holdout"]["seconds_with_search"] > out["temporal_tv_holdout"]["seconds"]
    scores = iter([dict(psnr=30.0, ssim=0.8), dict(psnr=31.0, ssim=0.7), dict(psnr=29.0, ssim=0.9)])
    monkeypatch.setattr(bench, "psnr_ssim", lambda *a: next(scores))
    monkeypatch.setattr(bench, "cg_sense", lambda *a, **k: dict(holdout_residuals=[3.0, 2.0, 1.0],
                                                                   iterates=[0, 1, 2], seconds=0.0))
    oracle = bench._cg(scan, None)["cg_sense_oracle"]
    assert (oracle["psnr"], oracle["ssim"], oracle["iterations"], oracle["ssim_iterations"]) == (31.0, 0.9, 2, 3)


def test_preview_panels_of_any_size_ratio_line_up():
    """Spatial ×1.5 fits 22² of a 32² scan: the integer repeat made 22 → 22 rows and the concatenation failed."""
    from dainr_app.preview import side_by_side

    big, small = np.random.default_rng(0).random((2, 32, 32)), np.ones((2, 22, 22))
    out = side_by_side([big, small, np.ones((2, 16, 16))])
    assert out.shape == (2, 32, 96) and out.dtype == np.uint8
    assert (out[:, :, 32:] == 255).all()  # the constant panels stay constant after resizing
    for scale in (1e-15, 1e-300):  # a floor of 1e-12 blacked out images in small units
        assert np.array_equal(side_by_side([big * scale]), side_by_side([big]))
    assert not side_by_side([np.zeros((2, 8, 8))]).any()
    from dainr.model import GridUpsampling
    from dainr_app.preview import _nearest

    for n, N in ((22, 32), (21, 32), (21, 33), (16, 33)):  # the same nearest pixels as the library's upsampling
        assert np.array_equal(_nearest(n, N), (GridUpsampling(n, N).nearest.reshape(N, N)[0] % n).numpy()), (n, N)
    # each fitted pixel lands where it lies on the output grid (FFT grids of one FOV, centres at pixel N // 2):
    # the rows showing fitted row j centre on (j − 11)·32/22 + 16 (the old floor(p·22/32) put them 0.7 px late)
    dot = np.zeros((1, 22, 22))
    for j in range(1, 21):
        dot[:] = 0
        dot[0, j, 5] = 1
        rows = np.nonzero(side_by_side([big[:1], dot])[0, :, 32 + 7])[0]
        assert abs(rows.mean() - ((j - 11) * 32 / 22 + 16)) < 0.3, (j, rows)


def test_preview_stretches_a_shorter_panel_and_keeps_every_frame(tmp_path):
    """Temporal ×2: the 4 fitted frames beside 7 output frames are held, not wrapped around; the GIF has all 7
    (found by a mutation review: neither was tested)."""
    from PIL import Image, ImageSequence

    from dainr_app.preview import side_by_side, write_preview

    frames = np.arange(7, dtype=float)[:, None, None] * np.ones((7, 8, 8))
    frames[:, 0, 0] = 6  # every panel frame spans 0..6: its grey level is its frame number
    fitted = frames[::2]
    out = side_by_side([frames, fitted])
    assert [int(round(f[1, 9] / 255 * 6)) for f in out] == [0, 0, 2, 4, 4, 4, 6]  # nearest fitted frame, in order
    write_preview(str(tmp_path / "p.gif"), [frames, fitted])
    with Image.open(tmp_path / "p.gif") as gif:
        assert sum(1 for _ in ImageSequence.Iterator(gif)) == 7
    write_preview(str(tmp_path / "p.PNG"), [frames, fitted])  # a montage: one row of panels per frame
    with Image.open(tmp_path / "p.PNG") as png:
        assert png.format == "PNG" and np.array_equal(np.asarray(png), np.concatenate(list(out)))
    with pytest.raises(ValueError, match="preview must end in .gif or .png, got 'p.jpg'"):
        write_preview("p.jpg", [frames])
    real = Image.Image.save

    def full_disk(self, fp, *args, **kwargs):  # a full disk: part written, then ENOSPC
        open(fp, "wb").write(b"GIF8")
        raise OSError(28, "No space left on device")
    Image.Image.save = full_disk
    try:
        with pytest.raises(OSError, match=r"cannot write .*p2.gif: No space left on device"):
            write_preview(str(tmp_path / "p2.gif"), [frames])
    finally:
        Image.Image.save = real
    assert sorted(os.listdir(tmp_path)) == ["p.PNG", "p.gif"]  # nothing half-written under the name


def _recon_error(path: str, tmp_path, capsys, *extra) -> str:
    """``dainr recon`` of ``path``: must exit 2 with a one-line error (no traceback); returns it."""
    assert cli.main(["recon", path, "-o", str(tmp_path / "out.h5"), "--steps", "2", "--quiet", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dainr recon: error: ") and "Traceback" not in err, err
    return err


def test_headers_and_trajectories_that_would_give_a_wrong_image_are_refused(raw2, tmp_path, capsys):
    """Found by a file fuzz: each of these reconstructed without a word (a FOV of 0 put every sample at k = 0, a
    negative one turned the image by 180°, NaN reached the DICOM geometry)."""
    def fov(v):
        return lambda xml: re.sub(r"(<reconSpace>.*?<fieldOfView_mm>\s*<x>)[^<]*(</x>\s*<y>)[^<]*",
                                  rf"\g<1>{v}\g<2>{v}", xml, flags=re.S)
    for v in ("0.0", "-320.0", "nan", "inf"):
        err = _recon_error(_rewrite(raw2, str(tmp_path / "fov.h5"), _without_traj, header=fov(v)), tmp_path, capsys)
        assert "reconSpace fieldOfView_mm" in err and "finite and positive" in err

    def scaled(factor, dims=2):
        def f(acq):
            if not acq.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
                data, traj = acq.data.copy(), acq.traj.copy()
                acq.resize(acq.number_of_samples, acq.active_channels, dims)
                acq.data[:] = data
                acq.traj[:, :min(dims, 2)] = traj[:, :min(dims, 2)] * factor
                acq.traj[:, 2:] = 0.3
            return acq
        return f
    assert "less than one k-space sample" in _recon_error(_rewrite(raw2, str(tmp_path / "zero.h5"), scaled(0.0)),
                                                          tmp_path, capsys)
    assert "cycles/pixel of the 32-pixel grid, within [-0.5, 0.5]; max |k| = 1.000 (a trajectory in units of ±1" in \
        _recon_error(_rewrite(raw2, str(tmp_path / "two.h5"), scaled(2.0)), tmp_path, capsys)
    assert "4-D acq.traj" in _recon_error(_rewrite(raw2, str(tmp_path / "k4.h5"), scaled(1.0, 4)), tmp_path, capsys)
    assert "1-D acq.traj" in _recon_error(_rewrite(raw2, str(tmp_path / "k1.h5"), scaled(1.0, 1)), tmp_path, capsys)


def test_phases_and_passes_the_gadget_would_split_are_refused(raw2, tmp_path, capsys):
    """recon merged what the gadget reconstructs apart or refuses: phases beyond the header's range (relabelled as
    the next frame), readouts after a slice's ACQ_LAST_IN_SLICE, an average beyond the header's."""
    def phase9(acq):
        if acq.idx.slice == 0 and acq.idx.phase == 5 and acq.idx.kspace_encode_step_1 % 2:
            acq.idx.phase = 9  # the header's range is 0..5
        return acq
    err = _recon_error(_rewrite(raw2, str(tmp_path / "p9.h5"), phase9), tmp_path, capsys)
    assert "phase(s) [9] lie beyond the header's 6 frames" in err
    n = read_raw(raw2).slices[(0, 0, 0, 0)].n_spokes

    def flag_mid(acq):
        if acq.idx.slice == 0 and acq.idx.kspace_encode_step_1 == n // 2:
            acq.set_flag(ismrmrd.ACQ_LAST_IN_SLICE)
        return acq
    assert "readouts follow the ACQ_LAST_IN_SLICE" in _recon_error(_rewrite(raw2, str(tmp_path / "mid.h5"), flag_mid),
                                                                   tmp_path, capsys)

    def average1(acq):
        if acq.idx.slice == 1:
            acq.idx.average = 1  # the header declares none
        return acq
    assert "average 1, beyond the header's encodingLimits average maximum 0" in _recon_error(
        _rewrite(raw2, str(tmp_path / "avg.h5"), average1), tmp_path, capsys)


def test_malformed_files_get_a_clear_error(raw2, tmp_path, capsys):
    """Each of these was a traceback (exit 1) or an unhelpful message."""
    cases = {"xml": lambda g: (g.__delitem__("xml"), g.create_dataset("xml", data=np.arange(3))),
             "data": lambda g: (g.__delitem__("data"), g.create_dataset("data", data=np.arange(10.0))),
             "group": lambda g: (g.__delitem__("data"), g.create_group("data"))}
    for name, damage in cases.items():
        path = str(tmp_path / f"{name}.h5")
        shutil.copy(raw2, path)
        with h5py.File(path, "a") as f:
            damage(f["dataset"])
        err = _recon_error(path, tmp_path, capsys)
        assert ("xml is not header text" if name == "xml" else "dataset/data is not an MRD acquisition table") in err
    assert "not an MRD/HDF5 file with group 'nope' (its groups: dataset)" in _recon_error(raw2, tmp_path, capsys,
                                                                                           "--group", "nope")
    path = str(tmp_path / "size.h5")
    shutil.copy(raw2, path)
    with h5py.File(path, "a") as f:
        rec = f["dataset/data"][30]
        rec["head"]["number_of_samples"] = 100
        f["dataset/data"][30] = rec
    err = _recon_error(path, tmp_path, capsys)
    assert "acquisition 30" in err and "100 samples" in err and "do not match" in err
    # dicom: an image group without its datasets
    out = str(tmp_path / "img.h5")
    assert cli.main(["recon", raw2, "-o", out, "--steps", "2", "--quiet"]) == 0
    with h5py.File(out, "a") as f:
        f["dataset"].create_group("image_7")
    assert cli.main(["dicom", out, "-o", str(tmp_path / "dcm")]) == 2
    assert "dataset/image_7 is not an MRD image series" in capsys.readouterr().err


def test_a_non_ascii_patient_name_survives_recon_and_dicom(raw2, tmp_path):
    """The header was stored as ASCII: the whole reconstruction ran, then failed on "ü"."""
    import pydicom

    def patient(xml):
        assert "<experimentalConditions>" in xml
        return xml.replace("<experimentalConditions>", "<subjectInformation><patientName>Müller^Jürgen</patientName>"
                           "</subjectInformation><experimentalConditions>", 1).encode("utf-8")
    raw = _rewrite(raw2, str(tmp_path / "name.h5"), lambda a: a, header=patient)
    out = str(tmp_path / "img.h5")
    assert cli.main(["recon", raw, "-o", out, "--steps", "2", "--quiet"]) == 0
    assert cli.main(["dicom", out, "-o", str(tmp_path / "dcm")]) == 0
    first = sorted(os.listdir(tmp_path / "dcm" / "series_001"))[0]
    assert str(pydicom.dcmread(tmp_path / "dcm" / "series_001" / first).PatientName) == "Müller^Jürgen"


def test_spokes_per_frame_rebins_a_file_with_a_phase_range(raw2, tmp_path):
    """--spokes-per-frame was ignored (silently) when the header had a phase range."""
    scan = read_raw(raw2, spokes_per_frame=3)
    assert scan.slices[(0, 0, 0, 0)].data.n_frames == 18  # 54 spokes of 6 frames × 9, in acquisition order
    assert read_raw(raw2).slices[(0, 0, 0, 0)].data.n_frames == 6


def test_the_ground_truth_is_an_input_and_a_bad_one_is_named(raw2, tmp_path, capsys):
    """`recon -o <raw>_truth.npz` overwrote the ground truth; an unreadable truth beside the raw file then stopped
    every recon with numpy's "pickled (object) data" message, naming no file."""
    truth = raw2.replace(".h5", "_truth.npz")
    assert cli.main(["recon", raw2, "-o", truth, "--steps", "2", "--quiet"]) == 2
    assert f"output {truth} is the input file {truth}: writing it would destroy that input" in capsys.readouterr().err
    assert "images" in np.load(truth)  # untouched
    junk = tmp_path / "raw.h5"
    shutil.copy(raw2, junk)
    (tmp_path / "raw_truth.npz").write_text("junk")
    out = str(tmp_path / "o.h5")
    assert cli.main(["recon", str(junk), "-o", out, "--steps", "2", "--quiet"]) == 0  # found, not named: left out
    err = capsys.readouterr().err
    assert f"warning: {tmp_path / 'raw_truth.npz'} is not a ground truth written by `dainr simulate`" in err
    assert cli.main(["recon", str(junk), "-o", out, "--steps", "2", "--quiet", "--truth", raw2]) == 2  # named
    assert f"error: {raw2} is not a ground truth written by `dainr simulate`" in capsys.readouterr().err
    # a damaged one (zlib's error is neither a ValueError nor an OSError: it was a traceback), one of no image shape
    good = np.load(truth)["images"]
    np.savez_compressed(tmp_path / "raw_truth.npz", images=good)
    data = bytearray((tmp_path / "raw_truth.npz").read_bytes())
    data[len(data) // 2:len(data) // 2 + 200] = bytes(200)  # inside the compressed array
    (tmp_path / "raw_truth.npz").write_bytes(bytes(data))
    for damage in ("damaged", "0-d"):
        if damage == "0-d":
            np.savez(tmp_path / "raw_truth.npz", images=np.float64(1.0))
        assert cli.main(["recon", str(junk), "-o", out, "--steps", "2", "--quiet"]) == 0
        assert "the images are not scored" in capsys.readouterr().err


def test_the_demo_writes_only_into_a_new_empty_or_earlier_demo_folder(tmp_path):
    """`demo -o` into a folder holding someone's raw.h5 and metrics.json replaced them without a word."""
    fresh, empty, theirs, earlier, marked = (tmp_path / n for n in ("fresh", "empty", "theirs", "earlier", "marked"))
    empty.mkdir()
    theirs.mkdir()
    (theirs / "raw.h5").write_text("a scan")
    (theirs / "metrics.json").write_text('{"psnr": 30}')
    earlier.mkdir()
    (earlier / "metrics.json").write_text('{"psnr": 31, "reconstruction": "DA-INR", "replay_seconds": 9}')
    marked.mkdir()
    (marked / cli.DEMO_MARK).touch()
    (marked / "raw.h5").write_text("an earlier demo's")
    for folder in (fresh, empty, earlier, marked):
        cli.demo_folder(str(folder))
        assert (folder / cli.DEMO_MARK).exists()
    with pytest.raises(ValueError, match="holds files that are not an earlier demo's output"):
        cli.demo_folder(str(theirs))
    with pytest.raises(ValueError, match="raw.h5 is a file, not a folder"):
        cli.demo_folder(str(theirs / "raw.h5"))
    assert (theirs / "raw.h5").read_text() == "a scan" and not (theirs / cli.DEMO_MARK).exists()
    assert cli.main(["demo", "-o", str(theirs), "--device", "gpu"]) == 2  # (the device first, before any work)
    assert cli.main(["demo", "-o", str(theirs)]) == 2 and (theirs / "raw.h5").read_text() == "a scan"


def test_replay_checks_its_dicom_folder_first_and_a_server_it_cannot_reach_is_a_server_error(raw2, tmp_path, capsys):
    """--dicom onto a file failed only after the whole reconstruction; a refused connection exited 2 (bad input)."""
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    out = str(tmp_path / "o.h5")
    for dicom in (raw2, os.path.join(raw2, "dcm")):
        assert cli.main(["replay", raw2, "-p", port, "-o", out, "--dicom", dicom]) == 2
        assert f"--dicom {dicom}: {raw2} is a file, not a folder" in capsys.readouterr().err
    cli.check_folder(str(tmp_path / "no" / "dcm"), "--dicom")  # missing folders are made (as `dainr dicom` does)
    for extra in ([], ["-Q"]):
        assert cli.main(["replay", raw2, "-p", port, "-o", out, *extra]) == 1
        assert f"dainr replay: server error: cannot connect to localhost:{port}" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["serve", "-p", "99999"], "must be a port number, 0..65535"),
    (["gadget-server", "-p", "-5"], "must be a port number, 0..65535"),
    (["replay", "raw.h5", "-p", "70000"], "must be a port number, 0..65535"),
    (["simulate", "-o", "x.h5", "--noise", "inf"], "must be >= 0 and finite"),
    (["simulate", "-o", "x.h5", "--seed", "-1"], "--seed: must be >= 0"),
    (["recon", "raw.h5", "-o", "o.h5", "--max-seconds", "-1"], "--max-seconds: must be > 0"),
    (["bench", "--threads", "0"], "--threads: must be >= 1"),
])
def test_bad_option_values_name_the_option(argv, message, capsys):
    """A port out of range was a traceback (OverflowError from bind), the others raw library messages."""
    with pytest.raises(SystemExit) as stop:
        cli.main(argv)
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_serve_takes_its_stream_options_only_with_from_stream():
    """-c/-i/-o without --from_stream were ignored: a TCP server started (in a process: that would not end)."""
    import subprocess
    import sys

    from dainr_app.server import child_env

    out = subprocess.run([sys.executable, "-m", "dainr_app.cli", "serve", "-p", "0", "-c", "dainr", "-o", "x.bin"],
                         env=child_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "-c/-o only go with --from_stream" in out.stderr, out.stderr


def test_bench_exits_1_when_a_case_failed_and_keeps_stdout_to_json(tmp_path, monkeypatch, capsys):
    import subprocess

    from dainr_app import bench

    monkeypatch.setattr(bench.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1, "", "Boom: x\n"))
    assert cli.main(["bench", "--case", "demo", "--out", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert [json.loads(line) for line in captured.out.splitlines()] == [{"demo": {"error": "Boom: x"}}]
    assert "demo failed" in captured.err
    assert json.loads((tmp_path / "results.json").read_text()) == {"demo": {"error": "Boom: x"}}
    assert os.listdir(tmp_path) == ["results.json"]  # written whole, through a partial file renamed onto it
    (tmp_path / "results.json").write_text('{"demo": {"psnr": 3')  # a bench killed while writing (before)
    assert cli.main(["bench", "--case", "demo", "--out", str(tmp_path)]) == 2
    assert f"{tmp_path / 'results.json'} is not a results file (JSON: " in capsys.readouterr().err


def test_bench_results_say_where_and_when_each_case_ran(monkeypatch):
    import datetime

    import dainr
    from dainr_app import bench

    monkeypatch.setitem(bench.CASES, "tiny", lambda: {"psnr": 1.0})
    threads = torch.get_num_threads()
    try:
        out = bench._run_inline("tiny", 1)
    finally:
        torch.set_num_threads(threads)
    env = out["environment"]
    assert (env["dainr"], env["torch"], env["threads"]) == (dainr.__version__, torch.__version__, 1)
    finished = datetime.datetime.fromisoformat(env["finished"])
    assert abs(datetime.datetime.now(datetime.timezone.utc) - finished) < datetime.timedelta(minutes=1)


def test_a_reader_that_goes_away_or_an_encoding_without_the_names_characters_stops_no_command(tmp_path):
    """`dainr recon … | head -n1` under PYTHONUNBUFFERED=1 failed with "Broken pipe" before writing its images (at
    exit otherwise: exit 120); a name stdout's encoding lacks failed the command after its files were written."""
    import subprocess
    import sys

    from dainr_app.server import child_env

    command = [sys.executable, "-m", "dainr_app.cli", "simulate", "--matrix", "16", "--frames", "3", "--spokes", "4",
               "--coils", "2", "-o"]
    buffered = {k: v for k, v in child_env().items() if k != "PYTHONUNBUFFERED"}
    for env in (dict(buffered, PYTHONUNBUFFERED="1"), buffered):
        proc = subprocess.Popen(command + [str(tmp_path / "gone.h5")], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        proc.stdout.close()  # the reader went away before the command printed
        assert proc.wait(timeout=120) == 0 and b"Exception ignored" not in proc.stderr.read()
        assert (tmp_path / "gone.h5").is_file() and (tmp_path / "gone_truth.npz").is_file()
        (tmp_path / "gone.h5").unlink()
    from dainr_app.mrd import Geometry, make_images, write_images

    write_images(str(tmp_path / "img.h5"), make_images(np.ones((2, 8, 8), np.float32), 1, 0, (200.0,) * 3, Geometry()))
    proc = subprocess.Popen([sys.executable, "-m", "dainr_app.cli", "dicom", str(tmp_path / "img.h5"), "-o",
                             str(tmp_path / "dcm")], env=buffered, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # (a command that prints without flushing: the last flush is at its end)
    assert proc.wait(timeout=120) == 0 and b"Exception ignored" not in proc.stderr.read()
    out = subprocess.run(command + [str(tmp_path / "rép.h5")], env=dict(child_env(), PYTHONIOENCODING="ascii"),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "r\\xe9p.h5" in out.stdout, out.stderr


def test_pipeline_files_in_their_declared_encoding_reach_serve_and_replay(raw2, tmp_path, capsys):
    """`serve --from_stream -c latin.xml` and `replay -C latin.xml` refused an ISO-8859-1 pipeline ("'utf-8' codec
    can't decode"); a FIFO or /dev/stdout as --from_stream's output is written into, not refused."""
    import pathlib
    import threading

    text = (pathlib.Path(cli.PIPELINES_DIR) / "passthrough.xml").read_text(encoding="utf-8")
    latin = str(tmp_path / "latin.xml")
    with open(latin, "wb") as fh:
        fh.write(text.replace('encoding="UTF-8"', 'encoding="ISO-8859-1"').replace(
            "<configuration>", "<!-- Grüße --><configuration>", 1).encode("iso-8859-1"))
    assert cli.main(["replay", raw2, "-C", latin, "-p", "1"]) == 1  # read, then no server there
    assert "server error" in capsys.readouterr().err
    empty, fifo = str(tmp_path / "empty.bin"), str(tmp_path / "out.fifo")
    open(empty, "wb").close()
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(open(fifo, "rb").read()), daemon=True)
    reader.start()
    rc = cli.main(["serve", "--from_stream", "-c", latin, "-i", empty, "-o", fifo])
    reader.join(timeout=60)
    err = capsys.readouterr().err
    assert "codec" not in err and "not a regular file" not in err and rc in (0, 1), err
    assert received and not reader.is_alive()


def test_a_closed_standard_stream_is_named_by_serve_from_stream(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", None)  # (`dainr serve --from_stream <&-`: an AttributeError traceback)
    assert cli.main(["serve", "--from_stream", "-c", "passthrough"]) == 2
    assert "standard input is closed: give -i FILE" in capsys.readouterr().err


def test_ctrl_c_ends_a_command_with_one_line_and_130(monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "run_recon", interrupted)
    assert cli.main(["recon", "raw.h5", "-o", "o.h5"]) == 130
    assert capsys.readouterr().err == "dainr recon: interrupted\n"


def test_the_file_reader_scales_a_noise_scan_at_another_dwell_time_to_the_readouts(raw2, tmp_path):
    """As the gadget: noise variance ∝ bandwidth = 1 / dwell time (``sample_time_us``); unscaled where either
    dwell time is not given (0, as converters that do not fill it in)."""
    def dwell(noise_us, imaging_us):
        def set_dwell(acq):
            noisy = acq.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)
            acq.sample_time_us = noise_us if noisy else imaging_us
            return acq
        out = str(tmp_path / f"dwell_{noise_us}_{imaging_us}.h5")
        return [s.data.noise for s in read_raw(_rewrite(raw2, out, set_dwell)).slices.values()]

    given = [s.data.noise for s in read_raw(raw2).slices.values()]
    for noise_us, imaging_us, factor in ((2.5, 5.0, np.sqrt(0.5)), (10.0, 5.0, np.sqrt(2)), (5.0, 5.0, 1.0),
                                         (0.0, 5.0, 1.0), (2.5, 0.0, 1.0)):
        for got, ref in zip(dwell(noise_us, imaging_us), given, strict=True):
            assert torch.allclose(got, ref * factor, rtol=1e-6, atol=0), (noise_us, imaging_us)


def test_simulate_without_the_inverse_crime(tmp_path):
    plain, fine = str(tmp_path / "a.h5"), str(tmp_path / "b.h5")
    assert cli.main(["simulate", "-o", plain, *SIM, "--noise", "0"]) == 0
    assert cli.main(["simulate", "-o", fine, *SIM, "--noise", "0", "--object-supersample", "4"]) == 0
    a, b = (np.load(cli.truth_path(p))["images"] for p in (plain, fine))
    assert a.shape == b.shape and 0 < np.linalg.norm(b - a) / np.linalg.norm(a) < 0.02  # the same object
    ka, kb = (next(iter(read_raw(p).slices.values())).data.kdata for p in (plain, fine))
    assert 0.01 < float((kb - ka).norm() / ka.norm()) < 0.1  # its k-space not the operator's image of the truth
    with pytest.raises(SystemExit):
        cli.main(["simulate", "-o", fine, "--object-supersample", "0"])


def test_a_full_disk_is_one_clear_error_and_leaves_no_half_written_file(raw2, tmp_path):
    """Past a file size limit (as on a full disk) HDF5 left a truncated file under the output's name, and the
    interpreter crashed at exit in libhdf5's exit handler (exit 139, after tracebacks): `simulate`, `recon`,
    `replay`, `demo`. The files are now built in memory and written whole through a renamed temporary file."""
    import resource
    import subprocess
    import sys

    from dainr_app.server import child_env

    def limited(*args):  # (Python ignores SIGXFSZ: the write fails with EFBIG)
        return subprocess.run([sys.executable, "-m", "dainr_app.cli", *args], capture_output=True, text=True,
                              env=child_env(), timeout=120, cwd=tmp_path,
                              preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000)))

    out = limited("simulate", "-o", "sim.h5", *SIM)
    assert out.returncode == 2 and "dainr simulate: error: [Errno 27] cannot write sim.h5: File too large" in out.stderr
    assert "Traceback" not in out.stderr and os.listdir(tmp_path) == [], out.stderr
    old = tmp_path / "images.h5"
    old.write_bytes(b"an earlier output")
    out = limited("recon", raw2, "-o", "images.h5", "--steps", "1", "--quiet")
    assert out.returncode == 2 and "cannot write images.h5: File too large" in out.stderr, out.stderr
    assert old.read_bytes() == b"an earlier output" and sorted(os.listdir(tmp_path)) == ["images.h5"]


def test_an_output_that_is_a_device_or_a_pipe_is_refused(raw2, tmp_path, capsys):
    """`-o /dev/null` (metrics only) replaced the device node with a regular file when run as root; a FIFO
    was replaced by recon, or failed replay after the whole session ("Illegal seek")."""
    fifo = str(tmp_path / "out.h5")
    os.mkfifo(fifo)
    for argv in (["recon", raw2, "-o", fifo, "--steps", "1"], ["recon", raw2, "-o", os.devnull, "--steps", "1"],
                 ["replay", raw2, "-p", "1", "-o", fifo]):
        assert cli.main(argv) == 2
        assert "it is not a regular file (a device or a pipe)" in capsys.readouterr().err
    assert os.path.exists(os.devnull) and not os.path.isfile(os.devnull)


def test_replay_output_groups_are_added_and_replaced_through_links_keeping_the_mode(tmp_path):
    """save_images (replay, demo) adds its group to an existing MRD file and replaces that group alone; written
    whole since the files are built in memory, it must still keep the other groups, follow a symbolic link to
    the file it names, and keep that file's permissions."""
    from dainr_app.mrd import Geometry, make_images

    def images(n):
        return {1: make_images(np.ones((n, 8, 8), np.float32), 1, 0, (320.0, 320.0, 8.0), Geometry())}

    target, link = tmp_path / "shared.h5", tmp_path / "link.h5"
    cli.save_images(images(3), str(target), "a")
    os.chmod(target, 0o664)
    link.symlink_to(target)
    cli.save_images(images(2), str(link), "b")
    cli.save_images(images(1), str(link), "a")  # replaced, not appended to
    assert link.is_symlink() and os.stat(target).st_mode & 0o777 == 0o664
    assert [len(read_images(str(target), g)[1]) for g in ("a", "b")] == [1, 2]
    assert sorted(os.listdir(tmp_path)) == ["link.h5", "shared.h5"]


def test_groups_added_at_once_are_all_kept_and_a_replaced_file_keeps_its_group(tmp_path, monkeypatch):
    """Two `dainr replay -o` into one file at once each kept only their own group (both exit 0); a replaced
    file took the writer's group (root:users 0640 became root:root: the group lost its access)."""
    import threading

    from dainr_app import mrd
    from dainr_app.mrd import Geometry, make_images

    images = {1: make_images(np.ones((2, 8, 8), np.float32), 1, 0, (320.0, 320.0, 8.0), Geometry())}
    target = str(tmp_path / "shared.h5")
    real = mrd.write_images

    def slow(*args, **kwargs):  # both read the file before either writes it back
        time.sleep(0.3)
        return real(*args, **kwargs)
    monkeypatch.setattr(mrd, "write_images", slow)
    threads = [threading.Thread(target=cli.save_images, args=(images, target, g)) for g in ("a", "b", "c")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [len(read_images(target, g)[1]) for g in ("a", "b", "c")] == [2, 2, 2]
    assert os.listdir(tmp_path) == ["shared.h5"]
    other = next((g for g in ([os.getgid() + 1] if os.geteuid() == 0 else os.getgroups()) if g != os.getgid()), None)
    if other is not None:
        os.chown(target, -1, other)
        cli.save_images(images, target, "d")
        assert os.stat(target).st_gid == other
    if os.geteuid() == 0:  # root replacing a user's file leaves it the user's
        os.chown(target, 65534, -1)
        cli.save_images(images, target, "e")
        assert os.stat(target).st_uid == 65534
    # a folder that cannot be locked (no read permission, as a drop box; some network file systems): unlocked, as
    # before, rather than failing after the whole session
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda path, *a, **k: (_ for _ in ()).throw(PermissionError(13, "denied"))
                        if os.path.isdir(path) else real_open(path, *a, **k))
    cli.save_images(images, target, "f")
    monkeypatch.undo()
    expected = ["a", "b", "c"] + ["d"] * (other is not None) + ["e"] * (os.geteuid() == 0) + ["f"]
    assert [g for g in expected if len(read_images(target, g)[1]) == 2] == expected


def test_an_output_name_as_long_as_the_file_system_takes_is_written(tmp_path):
    """The temporary name was the output's with ".partial-<pid>" added: past 255 bytes for a long name, an error
    after the fit."""
    name = "心臓" * 40 + "abcde.h5"  # 248 bytes: its ground truth's name is 255
    undecodable = os.fsdecode(b"scan\xff.h5")  # (a name that is not UTF-8)
    for n in (name, undecodable):
        out = str(tmp_path / n)
        assert cli.main(["simulate", "-o", out, "--matrix", "16", "--frames", "3", "--spokes", "4", "--coils", "2"]) == 0
    assert sorted(os.listdir(tmp_path)) == sorted([name, name[:-3] + "_truth.npz", undecodable,
                                                   undecodable[:-3] + "_truth.npz"])
