"""MRD images → DICOM MR Image Storage files (pydicom), one folder per ``image_series_index``.

Geometry: MRD ``position`` is the image centre, which the reconstruction (like Gadgetron's centred FFTs) puts at
pixel (ny // 2, nx // 2); DICOM ``ImagePositionPatient`` is the centre of the first (top-left) pixel, so it is
moved back by nx // 2 pixels along the row direction and ny // 2 along the column direction (half the FOV for an
even matrix, as Gadgetron's DICOM writer does).  Pixel spacing is FOV / matrix.  Pixels are stored as unsigned
16-bit scaled to the series' peak, without a Rescale; the window from the meta is written in stored pixel values,
as Gadgetron's writer does, and the image's own units are recoverable through a Real World Value Mapping
(slope = peak / 65535).
``TriggerTime`` is ``physiology_time_stamp[0]`` in 2.5 ms ticks, written where it lies in (0, 60 s), as Gadgetron
does.
"""
from __future__ import annotations

import collections
import json
import logging
import math
import os
import re
import shutil
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ._ismrmrd import ismrmrd
from .files import folder_lock
from .mrd import INTERPOLATED, changed_settings, image_meta, parse_header, processing_history, provenance

log = logging.getLogger("dainr.dicom")
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
TICK_MS = 2.5  # the MRD time stamps' unit, as scanners (Siemens) and Gadgetron count them
FILE_NAME = re.compile(r"IM_\d{5}_s\d{3}\.dcm")  # what write_series names its files
STAGE_PREFIX = ".partial-"  # write_series' staging folder inside the series folder
FIT_SECONDS = re.compile(r", [0-9.]+ s on [^,]+")  # in the history entry of mrd.fit_history: time and device
UID_ROOT = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")  # the components of a DICOM UID
# the value representations' maximum lengths (characters) of the text attributes taken from the MRD header
MAX_LENGTH = dict(PatientName=64, PatientID=64, StudyID=16, AccessionNumber=16, ReferringPhysicianName=64,
                  StudyDescription=64, SeriesDescription=64, PatientPosition=16, Manufacturer=64,
                  ManufacturerModelName=64, InstitutionName=64, StationName=16, DeviceSerialNumber=64,
                  SequenceName=16, ProtocolName=64)


def _first(meta, key, default=None):
    value = meta.get(key, meta.get("GADGETRON_" + key, default))
    return value[0] if isinstance(value, list) and value else value


def _number(value) -> Optional[float]:
    """``value`` as a finite float (meta values are text), else None."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _magnitude(image) -> np.ndarray:
    """The (y, x) magnitude of a single-channel 2D image; a clear error for anything this export would lose."""
    data = np.asarray(image.data)
    if data.ndim != 4 or data.shape[0] != 1 or data.shape[1] != 1:
        raise ValueError(f"DICOM export takes single-channel 2D images; series {image.image_series_index} image "
                         f"{image.image_index} has (channels, z, y, x) = {data.shape}")
    mag = np.abs(data[0, 0].astype(np.complex64 if np.iscomplexobj(data) else np.float32))
    if not np.isfinite(mag).all():
        raise ValueError(f"series {image.image_series_index} image {image.image_index} (slice {image.slice}) has "
                         f"{int((~np.isfinite(mag)).sum())} NaN/Inf pixels")
    return mag


def _dicom_date(value) -> str:
    return str(value or "").replace("-", "")[:8]


def _dicom_time(value) -> str:
    """HHMMSS from an xs:time (its fraction and a time-zone suffix, which a TM value cannot hold, dropped)."""
    return re.split(r"[.+Z-]", str(value or "").replace(":", ""))[0]


def _uid(value: str, name: str) -> str:
    """A UID from the header as it is where it is one (digits and dots, components without leading zeros, ≤ 64
    characters); else one derived from it (the same value gives the same UID), with a warning: a strict PACS
    refuses every instance that carries an invalid UID."""
    from pydicom.uid import PYDICOM_ROOT_UID, generate_uid

    if len(value) <= 64 and UID_ROOT.fullmatch(value):
        return value
    log.warning("the header's %s %r is not a DICOM UID: a UID derived from it is written instead", name, value)
    return generate_uid(PYDICOM_ROOT_UID, entropy_srcs=[name, value])


def _decimal(value, scale: float = 1.0) -> str:
    """A DICOM decimal string (DS, at most 16 characters) of ``value`` × ``scale`` to 10 significant digits (so
    63.6e6 Hz × 1e-6 is 63.6, not 63.599999999999); '' for none, or a value that is not finite."""
    from pydicom.valuerep import format_number_as_ds

    x = float(value) * scale if value else 0.0
    return format_number_as_ds(float(f"{x:.10g}")) if x and math.isfinite(x) else ""


def study_attributes(header: Optional[str]) -> Dict[str, str]:
    """Patient, study, frame-of-reference, equipment and sequence attributes from the raw data's MRD header
    (``subjectInformation``, ``studyInformation``, ``measurementInformation``, ``acquisitionSystemInformation``,
    ``experimentalConditions``, ``sequenceParameters``, as Gadgetron's DICOM writer reads them), so the images
    file with their source study and carry the MR Image module's type-2 attributes; new UIDs and empty type-2
    values where the header has none.  UIDs the header lacks are derived from the header's text, so exporting
    the same scan again files it in the same study (without a header: new ones)."""
    from pydicom.uid import PYDICOM_ROOT_UID, generate_uid


    def uid(obj, name: str) -> str:
        given = text(obj, name)
        if given:
            return _uid(given, name)
        return generate_uid(PYDICOM_ROOT_UID, entropy_srcs=[name, header]) if header else generate_uid()

    hdr = parse_header(header) if header else None
    part = lambda name: getattr(hdr, name, None)  # noqa: E731
    subject, study, measurement = part("subjectInformation"), part("studyInformation"), part("measurementInformation")
    system, sequence = part("acquisitionSystemInformation"), part("sequenceParameters")
    get = lambda obj, name: getattr(obj, name, None) if obj is not None else None  # noqa: E731
    # one value: a backslash would split it into several (DICOM's value delimiter)
    text = lambda obj, name: str(get(obj, name) or "").replace("\\", "/")  # noqa: E731
    first = lambda obj, name: (get(obj, name) or [None])[0]  # noqa: E731  (TR, TE and the flip angle are lists)
    gender = get(subject, "patientGender")
    sex = str(getattr(gender, "value", gender) or "")[:1].upper()
    position = get(measurement, "patientPosition")
    return dict(
        PatientName=text(subject, "patientName") or "DAINR^ANONYMOUS", PatientID=text(subject, "patientID"),
        PatientBirthDate=_dicom_date(get(subject, "patientBirthdate")),
        PatientSex=sex if sex in ("M", "F", "O") else "",
        StudyInstanceUID=uid(study, "studyInstanceUID"),
        StudyDate=_dicom_date(get(study, "studyDate")), StudyTime=_dicom_time(get(study, "studyTime")),
        StudyID=text(study, "studyID"), AccessionNumber=text(study, "accessionNumber"),
        ReferringPhysicianName=text(study, "referringPhysicianName"), StudyDescription=text(study, "studyDescription"),
        FrameOfReferenceUID=uid(measurement, "frameOfReferenceUID"),
        PatientPosition=str(getattr(position, "value", position) or ""),
        SeriesDate=_dicom_date(get(measurement, "seriesDate")), SeriesTime=_dicom_time(get(measurement, "seriesTime")),
        SequenceName=text(measurement, "sequenceName"), ProtocolName=text(measurement, "protocolName"),
        SeriesDescription=text(measurement, "seriesDescription"),  # the scan's; write_series adds the series
        Manufacturer=text(system, "systemVendor"), ManufacturerModelName=text(system, "systemModel"),
        InstitutionName=text(system, "institutionName"), StationName=text(system, "stationName"),
        DeviceSerialNumber=text(system, "deviceSerialNumber"),
        MagneticFieldStrength=_decimal(get(system, "systemFieldStrength_T")),
        ImagingFrequency=_decimal(get(part("experimentalConditions"), "H1resonanceFrequency_Hz"), 1e-6),  # MHz
        RepetitionTime=_decimal(first(sequence, "TR")), EchoTime=_decimal(first(sequence, "TE")),
        FlipAngle=_decimal(first(sequence, "flipAngle_deg")),
    )


def series_numbering(header: Optional[str]) -> Tuple[int, Optional[str]]:
    """What Gadgetron's DICOM writer takes from ``measurementInformation`` for the series: SeriesNumber =
    ``initialSeriesNumber`` × 100 + ``image_series_index`` (so a study's scans keep their own numbers), and the
    prefix of new series UIDs (the first 20 characters of ``seriesInstanceUIDRoot``, where they form a UID root;
    None: pydicom's)."""

    measurement = getattr(parse_header(header), "measurementInformation", None) if header else None
    initial = getattr(measurement, "initialSeriesNumber", None) or 0
    root = str(getattr(measurement, "seriesInstanceUIDRoot", None) or "")[:20].rstrip(".")
    prefix = root + "." if UID_ROOT.fullmatch(root) else None
    return int(initial) * 100, prefix


def write_series(images: Sequence["ismrmrd.Image"], folder: str, study: Dict[str, str], series_base: int = 0,
                 uid_prefix: Optional[str] = None) -> List[str]:
    """Write one series (images sharing ``image_series_index``) into ``folder``; returns the file paths.
    ``study``: :func:`study_attributes`; the series is described by its images' ``ImageComment``;
    ``series_base`` and ``uid_prefix``: :func:`series_numbering`."""
    # numbered in order within the series (other writers' MRD image_index may restart per slice or repetition)
    images = sorted(images, key=lambda im: (im.slice, im.contrast, im.repetition, im.set, im.phase, im.image_index))
    mags = [_magnitude(im) for im in images]
    os.makedirs(folder, exist_ok=True)
    # written into a hidden folder inside it first (the same file system, wherever the folder is mounted or
    # linked): an earlier export of this series number is replaced (not mixed in) only once every file is written
    # (a full disk left it deleted and a truncated file in its place); exports into one folder take turns, so
    # the stages a killed export left behind (DICOM files a recursive PACS import would send) can go
    with folder_lock(folder):
        for name in os.listdir(folder):
            if name.startswith(STAGE_PREFIX):
                shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
        stage = tempfile.mkdtemp(prefix=STAGE_PREFIX, dir=folder)
        try:
            staged = _write_files(images, mags, stage, study, series_base, uid_prefix, folder)
        except BaseException as exc:  # (a full disk, Ctrl-C, a bug): no staging folder left behind
            shutil.rmtree(stage, ignore_errors=True)
            if isinstance(exc, OSError):
                raise OSError(exc.errno, f"cannot write DICOM series {folder}: {exc.strerror or exc}") from None
            raise
        for name in os.listdir(folder):
            if FILE_NAME.fullmatch(name):
                os.remove(os.path.join(folder, name))
        paths = []
        for path in staged:
            paths.append(os.path.join(folder, os.path.basename(path)))
            os.replace(path, paths[-1])
        os.rmdir(stage)
    return paths


def _write_files(images, mags, folder: str, study: Dict[str, str], series_base: int,
                 uid_prefix: Optional[str], label: str) -> List[str]:
    """:func:`write_series`'s files, into ``folder``; ``label``: the series folder, for the log."""
    import hashlib

    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import PYDICOM_ROOT_UID, ExplicitVRLittleEndian, generate_uid


    # UIDs from the study's, the series number and the pixels: the same images exported again are the same
    # instances (a PACS files them once), other images (another reconstruction) a series of their own
    pixels = hashlib.sha256(b"".join(m.astype("<f4").tobytes() for m in mags)).hexdigest()
    series_number = series_base + int(images[0].image_series_index) if images else series_base
    root = uid_prefix or PYDICOM_ROOT_UID
    series_uid = generate_uid(root, entropy_srcs=[study["StudyInstanceUID"], str(series_number), pixels])
    description = str(_first(image_meta(images[0]), "ImageComment", "DA-INR")).replace(INTERPOLATED, "") if images \
        else "DA-INR"
    # the scan's description (the header's) before the series' own: DA-INR series of different scans differ
    series_description = f"{study.get('SeriesDescription', '')} {description}".strip()
    frames = collections.Counter((im.slice, im.contrast, im.repetition, im.set) for im in images)
    peak = max(float(m.max()) for m in mags) if mags else 1.0
    slope = peak / 65535.0 if peak > 0 else 1.0
    paths, unset, unreadable_window = [], 0, 0
    for number, (im, mag) in enumerate(zip(images, mags), start=1):
        ny, nx = mag.shape
        fov = [float(v) for v in im.field_of_view]
        dx, dy = fov[0] / nx, fov[1] / ny
        read, phase = np.asarray(im.read_dir, float), np.asarray(im.phase_dir, float)
        if not (np.linalg.norm(read) > 0.5 and np.linalg.norm(phase) > 0.5):  # unset: DICOM needs unit cosines
            read, phase, unset = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0]), unset + 1
        corner = np.asarray(im.position, float) - (nx // 2) * dx * read - (ny // 2) * dy * phase
        fm = FileMetaDataset()
        fm.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
        fm.MediaStorageSOPInstanceUID = generate_uid(root, entropy_srcs=[series_uid, str(number)])
        fm.TransferSyntaxUID = ExplicitVRLittleEndian
        path = os.path.join(folder, f"IM_{number:05d}_s{im.slice:03d}.dcm")
        ds = FileDataset(path, {}, file_meta=fm, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = MR_IMAGE_STORAGE, fm.MediaStorageSOPInstanceUID
        ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: names from the MRD header keep every character
        ds.Modality, ds.ImageType = "MR", ["DERIVED", "PRIMARY", "M"]
        for key, value in study.items():
            setattr(ds, key, value[:MAX_LENGTH.get(key, len(value))])
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber, ds.InstanceNumber = series_number, number
        ds.EchoNumbers, ds.AcquisitionNumber = int(im.contrast) + 1, int(im.repetition) + 1  # (they tell them apart)
        ds.SeriesDescription = series_description[:MAX_LENGTH["SeriesDescription"]]
        meta = image_meta(im)
        ds.ImageComments = str(_first(meta, "ImageComment", description))
        ds.ScanningSequence, ds.SequenceVariant = "GR", "NONE"  # type 1 in MR Image; radial gradient echo
        ds.ScanOptions, ds.MRAcquisitionType, ds.EchoTrainLength = "", "2D", "1"  # type 2 (one echo per readout)
        ds.PositionReferenceIndicator = ""  # type 2 (Frame of Reference)
        ds.ContentDate, ds.ContentTime = ds.SeriesDate, ds.SeriesTime  # type 2C: the images are temporally related
        ds.Rows, ds.Columns = ny, nx
        ds.PixelSpacing = [f"{dy:.6g}", f"{dx:.6g}"]  # row spacing, column spacing
        ds.SliceThickness = f"{fov[2]:.6g}"
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*read, *phase)]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in corner]
        ds.SliceLocation = f"{float(np.dot(np.asarray(im.position, float), np.asarray(im.slice_dir, float))):.6g}"
        ds.TemporalPositionIdentifier = int(im.phase) + 1
        # the cine's frames (type 3; viewers recognise and loop a cine by them)
        ds.NumberOfTemporalPositions = ds.CardiacNumberOfImages = frames[im.slice, im.contrast, im.repetition, im.set]
        trigger_ms = int(im.physiology_time_stamp[0]) * TICK_MS
        if 0 < trigger_ms < 60000:  # as Gadgetron's DICOM writer (a cine frame's time since the R wave)
            ds.TriggerTime = f"{trigger_ms:.6g}"
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        # the window in stored pixel values, as Gadgetron's writer (no Rescale: the MR Image IOD has no Modality
        # LUT, and after one the window of images in data units (≈ 1) would be below DICOM's minimum width 1);
        # the data units stay recoverable through the Real World Value Mapping, which does not change the display
        ds.RealWorldValueMappingSequence = [_real_world_value_mapping(slope)]
        _derivation(ds, im)
        center, width = (_number(_first(meta, key)) for key in ("WindowCenter", "WindowWidth"))
        if center is not None and width is not None:
            ds.WindowCenter = f"{center / slope:.0f}"
            ds.WindowWidth = f"{max(1.0, width / slope):.0f}"
        elif _first(meta, "WindowCenter") is not None or _first(meta, "WindowWidth") is not None:
            unreadable_window += 1
        # (float64: a float32 image's division by a slope below float32's range gave inf, a white series)
        ds.PixelData = np.round(mag.astype(np.float64) / slope).clip(0, 65535).astype("<u2").tobytes()
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    if unreadable_window:
        log.warning("%s: %d image(s) with a WindowCenter/WindowWidth that is not a pair of finite numbers: written "
                    "without a window (a viewer picks one)", label, unreadable_window)
    if unset:
        log.warning("%s: %d image(s) without read/phase directions (zeros in the raw data): written as an axial "
                    "slice, ImageOrientationPatient 1\\0\\0\\0\\1\\0", label, unset)
    return paths


def _derivation(ds, image) -> None:
    """What produced the image, from its meta (:func:`~dainr_app.mrd.fit_provenance`): ``DerivationDescription``
    (the fit's processing history and the settings that differ from the defaults), and for DA-INR's images a
    ``ContributingEquipmentSequence`` item naming DA-INR, with its software versions, as the processing equipment
    (the General Equipment attributes stay the scanner's, from the raw header)."""
    from pydicom.dataset import Dataset


    # without the fit's wall time: a re-run's identical pixels are the same instances (their UIDs), with the same
    # attributes
    history = FIT_SECONDS.sub("", processing_history(image))
    made_by = provenance(image)
    settings, options = made_by.get("config_fields"), made_by.get("read_options")
    description = history + (f"; settings: {json.dumps(changed_settings(settings))}" if settings else "") \
        + (f"; read options: {json.dumps(options)}" if options else "")
    if description:
        ds.DerivationDescription = description[:1024]  # (ST)
    if "software" not in made_by:
        return
    purpose = Dataset()
    purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning = "109102", "DCM", "Processing Equipment"
    equipment = Dataset()
    equipment.Manufacturer = "DA-INR (dainr)"
    equipment.SoftwareVersions = [str(v)[:64] for v in made_by["software"]]  # (LO)
    equipment.PurposeOfReferenceCodeSequence = [purpose]
    if history:
        equipment.ContributionDescription = history[:1024]  # (ST)
    ds.ContributingEquipmentSequence = [equipment]


def _real_world_value_mapping(slope: float):
    """The mapping of stored pixel values to the images' data units (prewhitened, no physical unit)."""
    from pydicom.dataset import Dataset

    unit = Dataset()
    unit.CodeValue, unit.CodingSchemeDesignator, unit.CodeMeaning = "1", "UCUM", "no units"
    item = Dataset()
    item.RealWorldValueFirstValueMapped, item.RealWorldValueLastValueMapped = 0, 65535
    item.RealWorldValueIntercept, item.RealWorldValueSlope = 0.0, float(slope)
    item.LUTExplanation, item.LUTLabel = "DA-INR data units (prewhitened k-space)", "DAINR"
    item.MeasurementUnitsCodeSequence = [unit]
    return item


def mrd_to_dicom(images_by_series: Dict[int, Sequence["ismrmrd.Image"]], outdir: str,
                 header: Optional[str] = None) -> Dict[int, List[str]]:
    """Every series to ``outdir/series_<n>/``, in one study and frame of reference: the raw data's (its MRD
    ``header`` text, when given), else new ones."""
    study, (base, prefix) = study_attributes(header), series_numbering(header)
    return {series: write_series(imgs, os.path.join(outdir, f"series_{series:03d}"), study, base, prefix)
            for series, imgs in sorted(images_by_series.items())}
