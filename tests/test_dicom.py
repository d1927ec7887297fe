import os
import re

import ismrmrd
import numpy as np
import pydicom
import pytest
import torch

from dainr import RadialData, zero_filled
from dainr.trajectory import golden_angle_trajectory
from dainr_app import cli
from dainr_app.dicom import mrd_to_dicom
from dainr_app.mrd import Geometry, make_images, read_images, write_images


def _images(series, n=3, shape=(24, 32)):
    rng = np.random.default_rng(series)
    frames = rng.uniform(0, 5, size=(n,) + shape).astype(np.float32)
    geo = Geometry(position=(10.0, -20.0, 30.0), read_dir=(0.0, 1.0, 0.0), phase_dir=(1.0, 0.0, 0.0),
                   slice_dir=(0.0, 0.0, -1.0))
    return frames, make_images(frames, series, 2, (320.0, 240.0, 8.0), geo)


def test_dicom_geometry_pixels_and_series(tmp_path):
    f1, im1 = _images(1)
    f2, im2 = _images(101)
    written = mrd_to_dicom({1: im1, 101: im2}, str(tmp_path))
    assert sorted(written) == [1, 101] and all(len(v) == 3 for v in written.values())
    dss = [pydicom.dcmread(p) for p in written[1]]
    ds = dss[0]
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4" and ds.Modality == "MR"
    assert [d.InstanceNumber for d in dss] == [1, 2, 3] and ds.SeriesNumber == 1
    assert [d.TemporalPositionIdentifier for d in dss] == [1, 2, 3]  # 1-based: the MRD phases 0, 1, 2
    assert (ds.Rows, ds.Columns) == (24, 32)
    assert [float(v) for v in ds.PixelSpacing] == pytest.approx([240 / 24, 320 / 32])  # row, column spacing
    assert [float(v) for v in ds.ImageOrientationPatient] == [0, 1, 0, 1, 0, 0]
    # the centre (MRD position) is pixel (ny // 2, nx // 2): IPP = centre - (nx // 2) dx read - (ny // 2) dy phase
    expected = np.array([10.0, -20.0, 30.0]) - 16 * 10.0 * np.array([0, 1, 0]) - 12 * 10.0 * np.array([1, 0, 0])
    assert [float(v) for v in ds.ImagePositionPatient] == pytest.approx(expected.tolist())
    # stored values without a Modality LUT, their data units through the Real World Value Mapping
    mapping = ds.RealWorldValueMappingSequence[0]
    assert "RescaleSlope" not in ds and mapping.RealWorldValueIntercept == 0
    slope = mapping.RealWorldValueSlope
    assert np.allclose(ds.pixel_array * slope, f1[0], atol=slope)
    # the window in stored values, >= 1 as DICOM requires: a viewer (pydicom's VOI LUT) shows c ± w/2 of the
    # images' 99.5th percentile, as the MRD meta says (its window was in data units, ≈ 0.1–1 here: refused)
    hi = np.percentile(f1, 99.5)
    assert float(ds.WindowCenter) * slope == pytest.approx(hi / 2, abs=slope)
    assert float(ds.WindowWidth) * slope == pytest.approx(hi, abs=slope)
    from pydicom.pixels import apply_voi_lut
    shown = apply_voi_lut(ds.pixel_array, ds)
    assert 0.001 < np.mean(shown >= shown.max()) < 0.02  # about 0.5 % saturated
    assert (mapping.RealWorldValueFirstValueMapped, mapping.RealWorldValueLastValueMapped) == (0, 65535)
    assert mapping.MeasurementUnitsCodeSequence[0].CodeValue == "1"  # (type 1: UCUM's "no units")
    other = pydicom.dcmread(written[101][0])
    assert other.SeriesInstanceUID != ds.SeriesInstanceUID and other.StudyInstanceUID == ds.StudyInstanceUID


def test_frame_time_stamps_reach_the_images_and_dicom_trigger_time(tmp_path):
    frames = np.ones((3, 8, 8), np.float32)
    stamps = np.array([[1000, 5, 7, 9], [1008, 12, 0, 0], [1016, 24000, 0, 0]], np.uint32)  # 24000 ticks: 60 s
    images = make_images(frames, 1, 0, (320.0, 320.0, 8.0), Geometry(), time_stamps=stamps, measurement_uid=77)
    assert [(im.acquisition_time_stamp, list(im.physiology_time_stamp), im.measurement_uid) for im in images] == \
        [(1000, [5, 7, 9], 77), (1008, [12, 0, 0], 77), (1016, [24000, 0, 0], 77)]
    dss = [pydicom.dcmread(p) for p in mrd_to_dicom({1: images}, str(tmp_path))[1]]
    assert [d.get("TriggerTime") for d in dss] == [12.5, 30.0, None]  # ms; none beyond a minute, as Gadgetron
    assert "TriggerTime" not in pydicom.dcmread(mrd_to_dicom({2: _images(2)[1]}, str(tmp_path))[2][0])  # no stamps
    for n_stamps, n_images in ((2, 3), (3, 2)):
        with pytest.raises(ValueError, match=f"{n_stamps} frames of time stamps for {n_images} images"):
            make_images(frames[:n_images], 1, 0, (320.0, 320.0, 8.0), Geometry(), time_stamps=stamps[:n_stamps])


def test_a_point_lands_where_the_dicom_geometry_puts_it(tmp_path):
    """End to end against a direct DFT in Gadgetron's convention (s(k) = Σ ρ(r) e^{−2πi k·r}, r in pixels from
    the slice's position, kx along read): the brightest pixel of the zero-filled image of a point at (+5 read,
    −9 phase) pixels must sit, by the DICOM geometry, at position + 5 dx read − 9 dy phase.  (IPP was half a pixel
    off along both directions: the reconstruction puts the centre at pixel N // 2, not (N − 1) / 2.)"""
    n, a, b = 32, 5, -9
    traj = golden_angle_trajectory(1, 64, 2 * n)
    kdata = torch.exp(-2j * torch.pi * (traj[..., 0] * a + traj[..., 1] * b).double()).to(torch.complex64)
    data = RadialData(kdata[:, None], traj, n)
    image = zero_filled(data, coil_maps=torch.ones(1, n, n, dtype=torch.complex64)).numpy()
    geo = Geometry(position=(10.0, -20.0, 30.0), read_dir=(0.0, 0.6, 0.8), phase_dir=(1.0, 0.0, 0.0),
                   slice_dir=(0.0, 0.8, -0.6))
    fov = 320.0
    ds = pydicom.dcmread(mrd_to_dicom({1: make_images(image, 1, 0, (fov, fov, 8.0), geo)}, str(tmp_path))[1][0])
    row, col = np.unravel_index(np.argmax(ds.pixel_array), ds.pixel_array.shape)
    assert (row, col) == (n // 2 + b, n // 2 + a)
    row_dir, col_dir = np.reshape([float(v) for v in ds.ImageOrientationPatient], (2, 3))
    row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
    at = np.array([float(v) for v in ds.ImagePositionPatient]) + col * col_spacing * row_dir + row * row_spacing * col_dir
    truth = np.array(geo.position) + a * fov / n * np.array(geo.read_dir) + b * fov / n * np.array(geo.phase_dir)
    assert at == pytest.approx(truth, abs=1e-4)


def test_dicom_command_converts_an_mrd_file(tmp_path, capsys):
    _, im = _images(4)
    path = str(tmp_path / "img.h5")
    write_images(path, im)
    assert list(read_images(path)) == [4]
    # several series in one call, and complex images, read back as written
    both = str(tmp_path / "both.h5")
    frames = np.random.default_rng(1).normal(size=(2, 8, 8)) + 1j * np.random.default_rng(2).normal(size=(2, 8, 8))
    complex_images = make_images(frames, 5, 0, (200.0, 200.0, 8.0), Geometry(), output="complex")
    write_images(both, im + complex_images)
    back = read_images(both)
    assert sorted(back) == [4, 5] and [len(v) for _, v in sorted(back.items())] == [3, 2]
    assert all(np.array_equal(a.data, b.data) and a.attribute_string == b.attribute_string
               for a, b in zip(im + complex_images, back[4] + back[5]))
    assert back[5][0].data.dtype == np.complex64 and np.allclose(back[5][1].data[0, 0], frames[1])
    out = str(tmp_path / "dcm")
    assert cli.main(["dicom", path, "-o", out]) == 0
    assert sorted(os.listdir(os.path.join(out, "series_004"))) == [f"IM_0000{i}_s002.dcm" for i in (1, 2, 3)]
    assert cli.main(["dicom", str(tmp_path / "missing.h5"), "-o", out]) == 2
    capsys.readouterr()
    assert cli.main(["dicom", path, "-o", os.path.join(path, "dcm")]) == 2  # checked before the images are read
    assert f"DICOM output {os.path.join(path, 'dcm')}: {path} is a file, not a folder" in capsys.readouterr().err


def test_images_of_several_slices_and_repetitions_get_their_own_files_and_numbers(tmp_path):
    """Other writers' MRD image_index may restart for every slice and repetition; no DICOM file may overwrite
    another."""
    images = []
    for repetition in (0, 1):
        im = _images(7)[1]
        for image in im:
            image.repetition = repetition
        images += im
    paths = mrd_to_dicom({7: images}, str(tmp_path))[7]
    assert len(set(paths)) == 6 and len(os.listdir(tmp_path / "series_007")) == 6
    assert sorted(pydicom.dcmread(p).InstanceNumber for p in paths) == [1, 2, 3, 4, 5, 6]
    # which repetition (AcquisitionNumber) and contrast (EchoNumbers) an image is: nothing else told them apart
    assert sorted((int(d.AcquisitionNumber), int(d.EchoNumbers)) for d in map(pydicom.dcmread, paths)) == \
        [(1, 1)] * 3 + [(2, 1)] * 3


def _with_nan(im):
    im.data[0, 0, 3, 4] = np.nan
    return im


@pytest.mark.parametrize("spoil, match", [
    (_with_nan, "1 NaN/Inf pixels"),
    (lambda im: ismrmrd.Image.from_array(np.ones((2, 1, 24, 32), np.float32)), "single-channel 2D"),  # 2 coils
])
def test_images_the_export_would_spoil_are_a_clear_error(tmp_path, spoil, match):
    _, im = _images(5)
    im[1] = spoil(im[1])
    with pytest.raises(ValueError, match=match):
        mrd_to_dicom({5: im}, str(tmp_path))


def test_patient_and_study_come_from_the_raw_header(tmp_path):
    from ismrmrd import xsd
    from xsdata.models.datatype import XmlDate

    from dainr_app.mrd import build_header

    hdr = build_header(32, 64, 2, 6, 10, 1)
    hdr.subjectInformation = xsd.subjectInformationType(patientName="DOE^JANE", patientID="P123",
                                                        patientBirthdate=XmlDate(1970, 5, 17),
                                                        patientGender="F")
    hdr.studyInformation = xsd.studyInformationType(studyInstanceUID="1.2.3.4", accessionNumber=42)
    hdr.measurementInformation = xsd.measurementInformationType(patientPosition=xsd.patientPositionType.HFS,
                                                                seriesDate=XmlDate(2026, 11, 26),
                                                                seriesTime="10:42:07.250", sequenceName="tfl2d",
                                                                protocolName="tf_radial_cine", initialSeriesNumber=7,
                                                                seriesInstanceUIDRoot="1.3.12.2.1107.5.2.3245.16")
    system = hdr.acquisitionSystemInformation
    system.systemVendor, system.systemModel, system.systemFieldStrength_T = "ACME", "Model 7", 1.5
    system.institutionName, system.stationName, system.deviceSerialNumber = "Clinic", "S" * 20, "SN1"
    hdr.sequenceParameters = xsd.sequenceParametersType(TR=[3.1, 5.0], TE=[1.45, 2.9], flipAngle_deg=[12.0, 8.0])
    _, im = _images(3)
    paths = mrd_to_dicom({3: im}, str(tmp_path), xsd.ToXML(hdr))[3]
    ds = pydicom.dcmread(paths[0])
    assert (str(ds.PatientName), ds.PatientID, ds.PatientBirthDate, ds.PatientSex) == ("DOE^JANE", "P123", "19700517", "F")
    assert ds.StudyInstanceUID == "1.2.3.4" and ds.AccessionNumber == "42" and ds.StudyDate == ""
    assert ds.SeriesDescription == "DA-INR" and ds.ScanningSequence == "GR"
    # the series as Gadgetron's DICOM writer numbers it: initialSeriesNumber × 100 + image_series_index, and its
    # UID under the first 20 characters of the header's series UID root (it was series 3 whatever the scan)
    assert ds.SeriesNumber == 703 and ds.SeriesInstanceUID.startswith("1.3.12.2.1107.5.2.32.")  # 20, not 21
    assert ds.PatientPosition == "HFS"  # the enum's value, not its name ("patientPositionType.HFS")
    # the equipment and sequence, as Gadgetron's DICOM writer takes them from the header
    assert (ds.Manufacturer, float(ds.MagneticFieldStrength), float(ds.ImagingFrequency)) == ("ACME", 1.5, 63.87)
    assert (ds.ManufacturerModelName, ds.InstitutionName, ds.StationName, ds.DeviceSerialNumber, ds.SequenceName) \
        == ("Model 7", "Clinic", "S" * 16, "SN1", "tfl2d")  # (a station name is at most 16 characters)
    assert (float(ds.RepetitionTime), float(ds.EchoTime), float(ds.FlipAngle)) == (3.1, 1.45, 12.0)  # the first
    assert (ds.ProtocolName, ds.SeriesDate, ds.SeriesTime, ds.ContentDate, ds.ContentTime) == \
        ("tf_radial_cine", "20261126", "104207", "20261126", "104207")
    anonymous = pydicom.dcmread(mrd_to_dicom({3: im}, str(tmp_path / "no_header"))[3][0])  # no header: new UIDs
    assert anonymous.PatientID == "" and anonymous.StudyInstanceUID not in ("", "1.2.3.4")
    assert anonymous.SeriesNumber == 3 and not anonymous.SeriesInstanceUID.startswith("1.3.12.2.1107.5.2.32.")
    hdr.measurementInformation.seriesInstanceUIDRoot = "1.3.12.x"  # not a UID root: pydicom's
    assert pydicom.dcmread(mrd_to_dicom({3: im}, str(tmp_path / "bad_root"), xsd.ToXML(hdr))[3][0]).SeriesInstanceUID \
        .startswith("1.2.826.0.1.3680043.8.498.")
    # the MR Image, General Equipment and Frame of Reference modules' type-2 attributes are present, empty if unknown
    for keyword in ("EchoTime", "RepetitionTime", "ScanOptions", "MRAcquisitionType", "EchoTrainLength",
                    "Manufacturer", "PositionReferenceIndicator", "ContentDate", "ContentTime", "SliceThickness"):
        assert keyword in anonymous, keyword
    assert (anonymous.EchoTime, anonymous.Manufacturer, anonymous.MRAcquisitionType) == (None, "", "2D")
    assert anonymous.EchoTrainLength == 1


def test_names_keep_every_character_and_long_values_fit_their_representation(tmp_path):
    """Without a character set pydicom wrote '?' for 'Ł' and Cyrillic (a warning only) and over-long SH values."""
    from ismrmrd import xsd

    from dainr_app.mrd import build_header

    hdr = build_header(32, 64, 2, 6, 10, 1)
    hdr.subjectInformation = xsd.subjectInformationType(patientName="Łukasiewicz^Jan Иванов")
    hdr.studyInformation = xsd.studyInformationType(studyID="S" * 20)
    _, im = _images(3)
    ds = pydicom.dcmread(mrd_to_dicom({3: im}, str(tmp_path), xsd.ToXML(hdr, encoding="utf-8"))[3][0])
    assert ds.SpecificCharacterSet == "ISO_IR 192" and str(ds.PatientName) == "Łukasiewicz^Jan Иванов"
    assert ds.StudyID == "S" * 16


def test_the_same_scan_exported_again_keeps_its_uids_and_header_text_stays_valid(tmp_path):
    """Found by a PACS-side review: every export drew new UIDs (a re-export of a scan without UIDs in its header
    landed in a second study), UIDs from the header went out as they were (letters, leading zeros, 84 characters:
    refused by a strict PACS), a backslash split one value into several, an xs:time's zone suffix made an invalid
    TM, and the scan's series description and the cine's frame count were not written."""
    from ismrmrd import xsd

    from dainr_app.mrd import build_header

    hdr = build_header(32, 64, 2, 6, 10, 1)
    hdr.subjectInformation = xsd.subjectInformationType(patientName="Doe\\Jane", patientID="A\\B")
    hdr.measurementInformation = xsd.measurementInformationType(patientPosition=xsd.patientPositionType.HFS,
                                                                seriesDescription="SAX radial cine",
                                                                seriesTime="13:14:15+02:00")
    header = xsd.ToXML(hdr)
    _, im = _images(3)

    def export(name, images=im, text=header):
        return [pydicom.dcmread(p) for p in mrd_to_dicom({3: images}, str(tmp_path / name), text)[3]]
    a, b = export("a"), export("b")
    uids = ("StudyInstanceUID", "FrameOfReferenceUID", "SeriesInstanceUID", "SOPInstanceUID")
    assert [[d[k].value for k in uids] for d in a] == [[d[k].value for k in uids] for d in b]
    assert len({d.SOPInstanceUID for d in a}) == 3
    other = export("other", _images(3, n=3)[1][:2])  # other images of the same scan: its study, a series of its own
    assert other[0].StudyInstanceUID == a[0].StudyInstanceUID and other[0].SeriesInstanceUID != a[0].SeriesInstanceUID
    assert not {d.SOPInstanceUID for d in other} & {d.SOPInstanceUID for d in a}
    assert export("none", text=None)[0].StudyInstanceUID != export("none2", text=None)[0].StudyInstanceUID
    ds = a[0]
    assert (str(ds.PatientName), ds.PatientID, ds.SeriesTime) == ("Doe/Jane", "A/B", "131415")  # one value each
    assert ds.SeriesDescription == "SAX radial cine DA-INR"
    assert ds.NumberOfTemporalPositions == ds.CardiacNumberOfImages == 3
    hdr.studyInformation = xsd.studyInformationType(studyInstanceUID="1.2.840.0123.abc")
    hdr.measurementInformation.frameOfReferenceUID = "1." + "2" * 82
    bad = export("bad", text=xsd.ToXML(hdr))[0]
    for key in ("StudyInstanceUID", "FrameOfReferenceUID"):
        value = bad[key].value
        assert len(value) <= 64 and re.fullmatch(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*", value), (key, value)
    assert bad.StudyInstanceUID == export("bad2", text=xsd.ToXML(hdr))[0].StudyInstanceUID  # derived, not drawn


def test_exporting_again_replaces_the_series_files(tmp_path):
    """A 3-frame export over an earlier 5-frame one of the same series number left 2 files of the old series."""
    out = str(tmp_path / "dcm")
    mrd_to_dicom({6: _images(6, n=5)[1]}, out)
    keep = tmp_path / "dcm" / "series_006" / "notes.txt"
    keep.write_text("not ours")
    paths = mrd_to_dicom({6: _images(6, n=3)[1]}, out)[6]
    assert sorted(os.listdir(tmp_path / "dcm" / "series_006")) == sorted([os.path.basename(p) for p in paths] + ["notes.txt"])
    assert len({pydicom.dcmread(p).SeriesInstanceUID for p in paths}) == 1


def test_recon_then_dicom_files_the_images_with_their_study(tmp_path, capsys):
    """`dainr recon` stores the raw header beside the images, so `dainr dicom` gets the patient and study."""
    import re

    raw, img = str(tmp_path / "raw.h5"), str(tmp_path / "img.h5")
    assert cli.main(["simulate", "-o", raw, "--matrix", "16", "--frames", "3", "--spokes", "4", "--coils", "2"]) == 0
    ds = ismrmrd.Dataset(raw, "dataset", create_if_needed=False)
    xml = ds.read_xml_header()
    xml = xml.decode() if isinstance(xml, bytes) else xml
    xml = re.sub(r"(<ismrmrdHeader[^>]*>)", r"\1<subjectInformation><patientName>DOE^JANE</patientName>"
                 r"</subjectInformation><studyInformation><studyInstanceUID>1.2.3.4</studyInstanceUID>"
                 r"</studyInformation>", xml, count=1)
    ds.write_xml_header(xml)
    ds.close()
    assert cli.main(["recon", raw, "-o", img, "--steps", "2", "--quiet", "--holdout-spokes", "0"]) == 0
    assert cli.main(["dicom", img, "-o", str(tmp_path / "dcm")]) == 0
    first = pydicom.dcmread(sorted((tmp_path / "dcm" / "series_001").iterdir())[0])
    assert (str(first.PatientName), first.StudyInstanceUID) == ("DOE^JANE", "1.2.3.4")
    assert cli.main(["dicom", raw, "-o", str(tmp_path / "none")]) == 2  # a raw file has no images
    assert "has no image_<series> groups" in capsys.readouterr().err


def test_mrd_images_magnitude_complex_and_window():
    """`output` complex keeps the complex values and says so in image_type; the window is centred on half the
    99.5th magnitude percentile, its width that percentile (a mutation review found neither tested)."""
    rng = np.random.default_rng(0)
    frames = (rng.uniform(0, 4, (3, 8, 8)) * np.exp(1j * rng.uniform(0, 6, (3, 8, 8)))).astype(np.complex64)
    geo = Geometry(position=(0.0, 0.0, 0.0), read_dir=(1.0, 0.0, 0.0), phase_dir=(0.0, 1.0, 0.0),
                   slice_dir=(0.0, 0.0, 1.0))
    mag, cplx = (make_images(frames, 1, 0, (320.0, 320.0, 8.0), geo, output=o) for o in ("magnitude", "complex"))
    assert mag[0].image_type == ismrmrd.IMTYPE_MAGNITUDE and mag[0].data.dtype == np.float32
    assert np.allclose(mag[1].data[0, 0], np.abs(frames[1]))
    assert cplx[0].image_type == ismrmrd.IMTYPE_COMPLEX and cplx[0].data.dtype == np.complex64
    assert np.array_equal(cplx[2].data[0, 0], frames[2])
    meta = ismrmrd.Meta.deserialize(mag[0].attribute_string)
    hi = np.percentile(np.abs(frames), 99.5)
    assert float(meta["WindowCenter"]) == pytest.approx(hi / 2, rel=1e-5)
    assert float(meta["WindowWidth"]) == pytest.approx(hi, rel=1e-5)


def test_decimal_strings_fit_sixteen_characters_and_keep_their_value():
    """A DS value is at most 16 characters: cutting '-1.234567891e-100' there made it e-10; NaN is no DS."""
    from dainr_app.dicom import _decimal

    assert _decimal(63.87e6, 1e-6) == "63.87" and _decimal(2.5) == "2.5"  # 10 significant digits, no float tail
    for value in (-1.234567891e-100, 1.0 / 3.0, 123456789012345678.0, -0.000012345678901):
        text = _decimal(value)
        assert len(text) <= 16 and float(text) == pytest.approx(value, rel=1e-8), text
    assert [_decimal(v) for v in (None, 0, float("nan"), float("inf"))] == ["", "", "", ""]


def test_image_indices_number_the_series_as_gadgetron_does():
    """Slice fastest, then contrast, frame, set and repetition, within the header's counts: each image of a
    series has its own index (it restarted at 1 for every cine: duplicate DICOM InstanceNumbers downstream of
    Gadgetron's DICOM writer or the scanner's)."""
    from ismrmrd import xsd

    from dainr_app.mrd import build_header, index_strides

    hdr = build_header(32, 64, 2, 3, 10, 2)
    limits = hdr.encoding[0].encodingLimits
    limits.contrast, limits.set = (xsd.limitType(minimum=0, maximum=1, center=0) for _ in range(2))
    strides = index_strides(hdr)
    assert strides == (2, 2, 3, 2)
    frames = np.ones((3, 8, 8), np.float32)
    numbers = {(s, c, t, r, f): im.image_index for s in (0, 1) for c in (0, 1) for t in (0, 1) for r in (0, 1)
               for f, im in enumerate(make_images(frames, 1, s, (320.0, 320.0, 8.0), Geometry(), repetition=r,
                                                  contrast=c, set_index=t, strides=strides))}
    assert sorted(numbers.values()) == list(range(1, 49))
    assert [numbers[(s, c, 0, 0, 0)] for c in (0, 1) for s in (0, 1)] == [1, 2, 3, 4]  # slice, then contrast
    assert (numbers[(0, 0, 0, 0, 1)], numbers[(0, 0, 1, 0, 0)], numbers[(0, 0, 0, 1, 0)]) == (5, 13, 25)  # frame,
    # set, repetition; a cine of fewer frames than the header's phases keeps the header's stride
    short = make_images(frames[:2], 1, 0, (320.0, 320.0, 8.0), Geometry(), repetition=1, strides=strides)
    assert [im.image_index for im in short] == [25, 29]
    late = make_images(frames, 1, 1, (320.0, 320.0, 8.0), Geometry(), repetition=40000, strides=(2, 1, 1, 1))
    assert [im.image_index for im in late] == [(1 + 2 * (f + 3 * 40000)) % 65535 + 1 for f in range(3)]  # uint16


def test_unset_directions_are_written_as_an_axial_slice_with_a_warning(tmp_path, caplog):
    """A converter that leaves read_dir/phase_dir zero: ImageOrientationPatient 0\\0\\0\\0\\0\\0 is no DICOM (unit
    direction cosines, PS3.3 C.7.6.2.1.1); it was written silently."""
    frames = np.ones((1, 8, 8), np.float32)
    images = [im for read in ((0.0, 0.0, 0.0), (0.0, 1.0, 0.0))  # both unset, or only the phase direction
              for im in make_images(frames, 1, 0, (320.0, 320.0, 8.0),
                                    Geometry(position=(1.0, 2.0, 3.0), read_dir=read, phase_dir=(0.0, 0.0, 0.0)))]
    with caplog.at_level("WARNING", logger="dainr.dicom"):
        paths = mrd_to_dicom({1: images}, str(tmp_path))[1]
    ds = pydicom.dcmread(paths[0])
    assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert [float(v) for v in ds.ImagePositionPatient] == [1 - 4 * 40.0, 2 - 4 * 40.0, 3]  # the corner pixel
    assert "2 image(s) without read/phase directions" in caplog.text


def test_the_window_is_at_least_one_stored_value_and_written_only_when_whole(tmp_path, caplog):
    frames = np.zeros((2, 32, 32), np.float32)
    frames[:, 3, 4] = 1.0  # one hot pixel: the 99.5th percentile, hence the window, is 0
    images = make_images(frames, 1, 0, (320.0, 320.0, 8.0), Geometry())
    ds = pydicom.dcmread(mrd_to_dicom({1: images}, str(tmp_path / "zero"))[1][0])
    assert (float(ds.WindowCenter), float(ds.WindowWidth)) == (0, 1)  # DICOM: width >= 1
    for im in images:  # a centre without a width (another writer's meta): no window rather than half of one
        meta = im.meta
        del meta["WindowWidth"], meta["GADGETRON_WindowWidth"]
        im.meta = meta
    ds = pydicom.dcmread(mrd_to_dicom({1: images}, str(tmp_path / "half"))[1][0])
    assert "WindowCenter" not in ds and "WindowWidth" not in ds
    for centre, width in (("abc", "1"), ("1", "nan")):  # not numbers (another writer's meta): the export failed
        for im in images:  # with float()'s bare message, or wrote a NaN width as 1
            meta = im.meta
            meta["WindowCenter"], meta["WindowWidth"] = centre, width
            im.meta = meta
        caplog.clear()
        with caplog.at_level("WARNING", logger="dainr.dicom"):
            ds = pydicom.dcmread(mrd_to_dicom({1: images}, str(tmp_path / "text"))[1][0])
        assert "WindowCenter" not in ds and "WindowWidth" not in ds
        assert "2 image(s) with a WindowCenter/WindowWidth that is not a pair of finite numbers" in caplog.text


def test_images_in_tiny_units_keep_their_stored_values(tmp_path):
    """A float32 image divided by a slope below float32's range gave inf: at 1e-44 the series was all white, at
    1e-40 its values 20 % high (MRD images from another tool; ours stay above 1e-37)."""
    frames = np.random.default_rng(0).uniform(0.1, 1, (2, 16, 16)).astype(np.float32)
    stored = {}
    for scale in (1.0, 1e-40, 1e-44):
        images = make_images(frames * np.float32(scale), 1, 0, (320.0, 320.0, 8.0), Geometry())
        ds = pydicom.dcmread(mrd_to_dicom({1: images}, str(tmp_path / f"s{scale:g}"))[1][0])
        stored[scale] = ds.pixel_array.astype(int)
    assert np.abs(stored[1e-40] - stored[1.0]).max() <= 2  # (1e-40 is a float32 denormal: 5 digits)
    assert stored[1e-44].max() == 65535 and stored[1e-44].min() < 30000  # (1e-44: 7 steps of 1.4e-45)


def test_interpolated_frames_keep_their_comment_and_not_the_series_description(tmp_path):
    images = make_images(np.ones((3, 8, 8), np.float32), 1, 0, (200.0, 200.0, 8.0), Geometry(),
                         acquired_frames=[1])
    written = mrd_to_dicom({1: images}, str(tmp_path))
    dcm = [pydicom.dcmread(p) for p in written[1]]
    assert {d.SeriesDescription for d in dcm} == {"DA-INR"}  # frame 0 (interpolated) names the series
    assert [d.ImageComments for d in dcm] == ["DA-INR (interpolated frame)", "DA-INR", "DA-INR (interpolated frame)"]


def test_a_failed_export_keeps_the_earlier_one(tmp_path, monkeypatch):
    """On a full disk the earlier export of the series was deleted first, then a truncated file was left in its
    place with pydicom's message (a traceback inside it)."""
    earlier = mrd_to_dicom({1: _images(1)[1]}, str(tmp_path))[1]
    before = {p: open(p, "rb").read() for p in earlier}
    real, calls = pydicom.dcmwrite, []

    def full_disk(path, ds, **kw):
        calls.append(path)
        if len(calls) == 2:
            open(path, "wb").write(b"trunc")
            raise OSError(28, "No space left on device")
        return real(path, ds, **kw)
    monkeypatch.setattr(pydicom, "dcmwrite", full_disk)
    with pytest.raises(OSError, match=r"cannot write DICOM series .*series_001: No space left on device"):
        mrd_to_dicom({1: _images(1, n=4)[1]}, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["series_001"]  # no staging folder left
    assert {p: open(p, "rb").read() for p in earlier} == before and len(os.listdir(tmp_path / "series_001")) == 3
    calls.clear()

    def interrupted(path, ds, **kw):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(path, ds, **kw)
    monkeypatch.setattr(pydicom, "dcmwrite", interrupted)
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C (dainr dicom's 130) left the staging folder behind
        mrd_to_dicom({1: _images(1, n=4)[1]}, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["series_001"]
    monkeypatch.setattr(pydicom, "dcmwrite", real)
    assert len(mrd_to_dicom({1: _images(1, n=4)[1]}, str(tmp_path))[1]) == 4  # a good export still replaces it
    assert len(os.listdir(tmp_path / "series_001")) == 4 and sorted(os.listdir(tmp_path)) == ["series_001"]


def test_the_series_names_da_inr_as_processing_equipment_with_its_settings(tmp_path):
    import json

    from dainr import DAINRConfig
    from dainr_app.mrd import fit_history, fit_provenance

    frames = np.ones((2, 8, 8), np.float32)
    info = dict(steps=5, stop_reason="converged", device="cpu", fit_matrix=8, nufft_backend="finufft")
    history = [fit_history(info, 3.2, 2, range(2), 8)]
    made_by = fit_provenance(DAINRConfig(seed=4), info, spokes_per_frame=9)

    def export(provenance, name):
        images = make_images(frames, 1, 0, (200.0, 200.0, 8.0), Geometry(), history=history, provenance=provenance)
        return pydicom.dcmread(mrd_to_dicom({1: images}, str(tmp_path / name))[1][0])

    ds = export(made_by, "a")
    # the fit's wall time is left out: a re-run's identical pixels are the same instances with the same attributes
    assert ds.DerivationDescription == ('DA-INR 5 steps (converged); settings: {"seed": 4, "nufft_backend": '
                                        '"finufft", "device": "cpu"}; read options: {"spokes_per_frame": 9}')
    equipment = ds.ContributingEquipmentSequence[0]
    assert equipment.Manufacturer == "DA-INR (dainr)" and list(equipment.SoftwareVersions) == made_by["DAINR_Software"]
    assert equipment.SoftwareVersions[0].startswith("dainr ") and equipment.SoftwareVersions[-1].startswith("finufft ")
    assert equipment.ContributionDescription == "DA-INR 5 steps (converged)"
    assert equipment.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
    assert "SoftwareVersions" not in ds  # (General Equipment: the scanner's, from the raw header)
    # one software entry, one over LO's 64 characters; a configuration of a later version (a field this one lacks);
    # a malformed one: what can be read is still written
    later = dict(json.loads(made_by["DAINR_Config"]), field_of_a_later_version=1)
    ds = export(dict(made_by, DAINR_Software=["x" * 80], DAINR_Config=json.dumps(later)), "b")
    assert ds.ContributingEquipmentSequence[0].SoftwareVersions == "x" * 64  # (one value: a string)
    assert '"field_of_a_later_version": 1' in ds.DerivationDescription and '"seed": 4' in ds.DerivationDescription
    ds = export(dict(made_by, DAINR_Config="{bad"), "c")
    assert "settings" not in ds.DerivationDescription and "ContributingEquipmentSequence" in ds
    # images another program made (no DA-INR meta) name no DA-INR equipment
    theirs = pydicom.dcmread(mrd_to_dicom({1: make_images(frames, 1, 0, (200.0, 200.0, 8.0), Geometry())},
                                          str(tmp_path / "d"))[1][0])
    assert "ContributingEquipmentSequence" not in theirs


def test_the_nufft_library_version_without_package_metadata(monkeypatch):
    import importlib.metadata

    import finufft

    from dainr import DAINRConfig
    from dainr_app.mrd import fit_provenance

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(importlib.metadata, "version", missing)  # (built from source onto the path)
    software = fit_provenance(DAINRConfig(), dict(device="cpu", nufft_backend="finufft"))["DAINR_Software"]
    assert software[-1] == f"finufft {getattr(finufft, '__version__', 'unknown')}"


def test_a_series_folder_on_another_file_system_is_replaced_whole(tmp_path):
    """The series was staged beside its folder: with the folder a link onto another file system (a mount), the
    move failed (EXDEV) after the earlier export had been deleted, and the new files were left in the stage."""
    import shutil
    import tempfile

    if not os.path.isdir("/dev/shm") or os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on a file system of its own")
    elsewhere = tempfile.mkdtemp(dir="/dev/shm")
    try:
        os.symlink(elsewhere, tmp_path / "series_001")
        mrd_to_dicom({1: _images(1)[1]}, str(tmp_path))
        paths = mrd_to_dicom({1: _images(1, n=4)[1]}, str(tmp_path))[1]
        assert sorted(os.listdir(elsewhere)) == sorted(os.path.basename(p) for p in paths) and len(paths) == 4
        assert sorted(os.listdir(tmp_path)) == ["series_001"]
    finally:
        shutil.rmtree(elsewhere)


def test_an_export_killed_midway_leaves_no_files_for_a_recursive_import(tmp_path):
    """A killed export left its staging folder, DICOM files inside, within the series folder for good."""
    stale = tmp_path / "series_001" / ".partial-killed"
    stale.mkdir(parents=True)
    (stale / "IM_00001_s000.dcm").write_bytes(b"stale")
    paths = mrd_to_dicom({1: _images(1)[1]}, str(tmp_path))[1]
    assert sorted(os.listdir(tmp_path / "series_001")) == sorted(os.path.basename(p) for p in paths)
