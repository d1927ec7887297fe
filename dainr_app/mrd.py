"""ISMRMRD (MRD) raw and image I/O: what the CLI and the gadget read from MRD headers and readouts, and the images
they write (the method modules in ``dainr`` never import ``ismrmrd``).

Raw files are written the way a scanner converter writes radial data: a leading noise scan
(``ACQ_IS_NOISE_MEASUREMENT``), then per slice every spoke with ``acq.traj`` (samples, 2) in
cycles/pixel, ``idx.kspace_encode_step_1`` = global spoke counter, ``idx.phase`` = frame,
``idx.slice``, and ``ACQ_LAST_IN_SLICE`` on the slice's last spoke.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import io
import json
import logging
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ._ismrmrd import ismrmrd
import ismrmrd.xsd as xsd
from xsdata.exceptions import ConverterWarning

from dainr import __version__
from dainr.config import GOLDEN_ANGLE_DEG, DAINRConfig, changed_fields
from dainr.data import RadialData, frame_groups, frames_from_spokes
from dainr.trajectory import angle_step, radial_trajectory

from .files import folder_lock, replaced_whole

ANGLE_PARAM = "angle_increment_rad"
log = logging.getLogger("dainr.mrd")
Key = Tuple[int, int, int, int]  # (slice, contrast, repetition, set): readouts reconstructed together
SPOKES_PARAM = "spokes_per_frame"
# readouts that are not image data: skipped by the file reader, passed through by the gadget (navigators,
# phase correction, dummy scans, real-time/HP feedback such as Siemens PACE, surface-coil correction, phase
# stabilisation; pure parallel-imaging calibration unless it is also imaging data: :func:`is_skipped`)
SKIP_FLAGS = (ismrmrd.ACQ_IS_NAVIGATION_DATA, ismrmrd.ACQ_IS_PHASECORR_DATA, ismrmrd.ACQ_IS_DUMMYSCAN_DATA,
              ismrmrd.ACQ_IS_RTFEEDBACK_DATA, ismrmrd.ACQ_IS_HPFEEDBACK_DATA,
              ismrmrd.ACQ_IS_SURFACECOILCORRECTIONSCAN_DATA, ismrmrd.ACQ_IS_PHASE_STABILIZATION,
              ismrmrd.ACQ_IS_PHASE_STABILIZATION_REFERENCE)
RADIAL_TRAJECTORIES = ("radial", "goldenangle")  # angles derivable from the spoke index when acq.traj is absent
ACCEPTED_TRAJECTORIES = RADIAL_TRAJECTORIES + ("other",)  # the ramp DCF is radial; "other" needs acq.traj


def is_skipped(acq: ismrmrd.Acquisition) -> bool:
    """True for a readout that is not radial image data (:data:`SKIP_FLAGS`, calibration-only readouts)."""
    if any(acq.is_flag_set(f) for f in SKIP_FLAGS):
        return True
    return acq.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION) and not acq.is_flag_set(
        ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING)


class MRDFormatError(ValueError):
    """A raw or image file that cannot be used, with the reason."""


@dataclass
class Geometry:
    """Slice geometry taken from the acquisitions (patient coordinates, mm)."""

    position: Sequence[float] = (0.0, 0.0, 0.0)
    read_dir: Sequence[float] = (1.0, 0.0, 0.0)
    phase_dir: Sequence[float] = (0.0, 1.0, 0.0)
    slice_dir: Sequence[float] = (0.0, 0.0, 1.0)
    patient_table_position: Sequence[float] = (0.0, 0.0, 0.0)

    @classmethod
    def from_acquisition(cls, acq) -> "Geometry":
        return cls(tuple(acq.position), tuple(acq.read_dir), tuple(acq.phase_dir), tuple(acq.slice_dir),
                   tuple(acq.patient_table_position))


@dataclass
class RawSlice:
    slice: int
    data: RadialData
    geometry: Geometry
    n_spokes: int
    first_phase: int = 0  # idx.phase of frame 0 (frames from idx.phase), the images' phase labels start there
    # (frames, 4) uint32: acquisition_time_stamp and physiology_time_stamp[0..2] of each frame's middle readout
    time_stamps: Optional[np.ndarray] = None
    measurement_uid: int = 0
    warnings: List[str] = field(default_factory=list)  # what was done differently, for the user


def acquisition_key(acq) -> Key:
    """The buffer an imaging readout belongs to (the file reader and the gadget group by the same key)."""
    idx = acq.idx
    return (idx.slice, idx.contrast, idx.repetition, idx.set)


@dataclass
class RawScan:
    matrix: int
    fov_mm: tuple
    slices: Dict[Key, RawSlice]
    noise: Optional[torch.Tensor]
    header: object = field(repr=False, default=None)
    header_text: Optional[str] = field(repr=False, default=None)
    late_noise: int = 0  # noise readouts after the first imaging readout: not used, as the gadget does
    # readouts per encoding space other than the header's first: not reconstructed, as the gadget does
    other_encodings: Dict[int, int] = field(default_factory=dict)
    empty_readouts: int = 0  # imaging readouts without samples: not reconstructed, as the gadget does


def build_header(matrix: int, n_samples: int, n_coils: int, n_frames: int, n_spokes: int, n_slices: int,
                 fov_mm: float = 320.0, slice_thickness_mm: float = 8.0, golden_angle: str = "true",
                 spokes_per_frame: Optional[int] = None) -> "xsd.ismrmrdHeader":
    """MRD header for a 2D golden-angle radial cine (floats as Python floats: xsdata needs them)."""
    def limit(maximum: int, centre: int = 0):
        return xsd.limitType(minimum=0, maximum=int(maximum), center=int(centre))

    oversampling = n_samples / matrix
    encoded = xsd.encodingSpaceType(
        matrixSize=xsd.matrixSizeType(x=int(n_samples), y=int(matrix), z=1),
        fieldOfView_mm=xsd.fieldOfViewMm(x=float(fov_mm * oversampling), y=float(fov_mm), z=float(slice_thickness_mm)))
    recon = xsd.encodingSpaceType(
        matrixSize=xsd.matrixSizeType(x=int(matrix), y=int(matrix), z=1),
        fieldOfView_mm=xsd.fieldOfViewMm(x=float(fov_mm), y=float(fov_mm), z=float(slice_thickness_mm)))
    limits = xsd.encodingLimitsType(
        kspace_encoding_step_0=limit(n_samples - 1, n_samples // 2), kspace_encoding_step_1=limit(n_spokes - 1),
        kspace_encoding_step_2=limit(0), slice=limit(n_slices - 1), phase=limit(n_frames - 1), contrast=limit(0),
        repetition=limit(0), set=limit(0), average=limit(0), segment=limit(0))
    longs = [xsd.userParameterLongType(name=SPOKES_PARAM, value=int(spokes_per_frame))] if spokes_per_frame else []
    desc = xsd.trajectoryDescriptionType(
        identifier="golden_angle_radial", userParameterLong=longs,
        userParameterDouble=[xsd.userParameterDoubleType(name=ANGLE_PARAM, value=float(angle_step(golden_angle)))],
        comment=f"golden angle {'180/phi = %.4f deg' % GOLDEN_ANGLE_DEG if golden_angle == 'true' else '111.246 rad (reference code)'}")
    encoding = xsd.encodingType(encodedSpace=encoded, reconSpace=recon, encodingLimits=limits,
                                trajectory=xsd.trajectoryType.GOLDENANGLE, trajectoryDescription=desc)
    return xsd.ismrmrdHeader(
        experimentalConditions=xsd.experimentalConditionsType(H1resonanceFrequency_Hz=63_870_000),
        acquisitionSystemInformation=xsd.acquisitionSystemInformationType(receiverChannels=int(n_coils)),
        encoding=[encoding])


@contextlib.contextmanager
def hdf5_output(path: str, keep: bool = False) -> Iterator[io.BytesIO]:
    """An HDF5 file built in memory (what ``h5py.File`` and ``ismrmrd.Dataset`` open) and written to ``path`` whole
    once the block succeeds, through a temporary file beside it renamed onto it: a failed write (disk full, a file
    size limit) is an OSError naming ``path``, which is left as it was.  (Written by HDF5 itself, such a file was
    left truncated under its name and the interpreter crashed at exit: libhdf5's exit handler closing the file
    whose close had failed, exit 139.)  ``keep``: start from ``path``'s content (a group added to a file), under a
    lock on its folder, so that processes adding groups to one file at once each keep the others'."""
    buffer = io.BytesIO()
    with folder_lock(os.path.dirname(os.path.realpath(path))) if keep else contextlib.nullcontext():
        if keep and os.path.isfile(path):
            with open(path, "rb") as fh:
                buffer.write(fh.read())
        yield buffer
        with replaced_whole(path) as partial, open(partial, "wb") as fh:
            fh.write(buffer.getbuffer())


def write_raw(path: str, slices: Sequence[RadialData], noise: Optional[np.ndarray] = None, golden_angle: str = "true",
              fov_mm: float = 320.0, slice_thickness_mm: float = 8.0, slice_gap_mm: float = 2.0) -> None:
    """Write slices (equal frames × spokes each) as an MRD raw file with a leading noise scan."""
    first = slices[0]
    F_, C, S, R = first.kdata.shape
    for d in slices:
        if tuple(d.kdata.shape) != (F_, C, S, R) or not bool(d.spoke_mask.all()):
            raise ValueError("write_raw needs slices of equal shape without padding")
    header = build_header(first.matrix, R, C, F_, F_ * S, len(slices), fov_mm, slice_thickness_mm, golden_angle, S)
    with hdf5_output(path) as out:
        _write_acquisitions(out, header, slices, noise, slice_thickness_mm + slice_gap_mm)


def _write_acquisitions(out, header, slices: Sequence[RadialData], noise: Optional[np.ndarray], spacing: float):
    F_, C, S, R = slices[0].kdata.shape
    ds = ismrmrd.Dataset(out, "dataset", create_if_needed=True)
    try:
        ds.write_xml_header(ismrmrd.xsd.ToXML(header, encoding="utf-8"))  # (its default, ascii, breaks on names)
        counter = 0
        if noise is not None:
            noise = np.asarray(noise, dtype=np.complex64)
            for chunk in np.array_split(noise, max(1, noise.shape[1] // R), axis=1):
                acq = ismrmrd.Acquisition.from_array(np.ascontiguousarray(chunk))
                acq.set_flag(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)
                acq.scan_counter = counter
                counter += 1
                ds.append_acquisition(acq)
        for s, d in enumerate(slices):
            k = d.kdata.numpy()
            t = d.traj.numpy()
            z = (s - (len(slices) - 1) / 2) * spacing
            for f in range(F_):
                for j in range(S):
                    acq = ismrmrd.Acquisition.from_array(np.ascontiguousarray(k[f, :, j]), np.ascontiguousarray(t[f, j]))
                    acq.center_sample = R // 2
                    acq.idx.kspace_encode_step_1 = f * S + j
                    acq.idx.phase = f
                    acq.idx.slice = s
                    acq.position[:] = (0.0, 0.0, float(z))
                    acq.read_dir[:] = (1.0, 0.0, 0.0)
                    acq.phase_dir[:] = (0.0, 1.0, 0.0)
                    acq.slice_dir[:] = (0.0, 0.0, 1.0)
                    acq.scan_counter = counter
                    acq.acquisition_time_stamp = counter  # ticks of 2.5 ms (a TR), as Siemens scanners count
                    acq.physiology_time_stamp[0] = f * S + j  # since the slice's trigger: one heartbeat per cine
                    counter += 1
                    if f == 0 and j == 0:
                        acq.set_flag(ismrmrd.ACQ_FIRST_IN_SLICE)
                    if f == F_ - 1 and j == S - 1:
                        acq.set_flag(ismrmrd.ACQ_LAST_IN_SLICE)
                        if s == len(slices) - 1:
                            acq.set_flag(ismrmrd.ACQ_LAST_IN_MEASUREMENT)
                    ds.append_acquisition(acq)
    finally:
        ds.close()


def parse_header(text) -> "xsd.ismrmrdHeader":
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    text = text.rstrip("\x00")
    try:
        with warnings.catch_warnings():  # a value xsdata cannot convert stays a string; the fields we read are
            warnings.simplefilter("ignore", ConverterWarning)  # checked (_header_number) with a clearer message
            return xsd.CreateFromDocument(text)
    except Exception as exc:  # xsdata raises several parser error types
        raise MRDFormatError(f"MRD header does not parse: {exc}") from exc


@dataclass
class ReconParameters:
    """What a reconstruction needs from the MRD header."""

    matrix: int
    fov_mm: tuple
    frames_from_phase: bool
    n_frames: Optional[int]
    spokes_per_frame: Optional[int]
    angle_step_rad: Optional[float]  # None: not derivable (uniform "radial" without the angle parameter)
    trajectory: str
    encoded_fov_x: Optional[float] = None  # mm: with the readout's samples, their spacing in k-space
    first_phase: int = 0  # the header's phase minimum
    last_average: int = 0  # the header's average maximum: averages are one cine, complete at the last one's end
    encoded_x: Optional[int] = None  # encodedSpace matrix x: readouts of twice as many samples are oversampled ×2
    strides: Tuple[int, int, int, int] = (1, 1, 1, 1)  # the header's (slices, contrasts, phases, sets): numbering

    def recon_pixels_per_encoded_pixel(self) -> float:
        """The reconSpace pixel over the encodedSpace pixel (1 without the encoded matrix or FOV): a k-space
        position in cycles per encoded pixel times this is in cycles per reconSpace pixel."""
        if not (self.encoded_x and self.encoded_fov_x):
            return 1.0
        return self.fov_mm[0] * self.encoded_x / (self.matrix * self.encoded_fov_x)

    def oversampling(self, n_samples: int, kept: int) -> float:
        """A readout's samples per encoded-matrix sample: 2 where the readout (or its ``kept`` samples) has twice
        the encodedSpace matrix's samples, ½ where it has half of them under an encoded FOV twice the reconSpace's
        (oversampling removed upstream, as ``RemoveROOversamplingGadget`` decides it), else 1."""
        if not self.encoded_x:
            return 1
        if 2 * self.encoded_x in (n_samples, kept):
            return 2
        if self.encoded_x == 2 * n_samples and self.encoded_fov_x and \
                abs(self.encoded_fov_x - 2 * self.fov_mm[0]) <= 1e-3 * self.fov_mm[0]:
            return 0.5
        return 1

    @classmethod
    def from_header(cls, header, spokes_per_frame: Optional[int] = None,
                    golden_angle: Optional[str] = None) -> "ReconParameters":
        """``golden_angle`` ("true" or "reference") overrides the header's angle step for readouts without
        ``acq.traj``; ``spokes_per_frame`` bins the spokes in acquisition order instead of by the header's phase
        range or its ``spokes_per_frame`` parameter (a real-time re-binning)."""
        if not header.encoding:
            raise MRDFormatError("MRD header has no <encoding>")
        enc = header.encoding[0]
        try:
            matrix, fov = enc.reconSpace.matrixSize.x, enc.reconSpace.fieldOfView_mm
            fov = (fov.x, fov.y, fov.z)
        except AttributeError as exc:
            raise MRDFormatError("MRD header lacks reconSpace matrixSize/fieldOfView_mm") from exc
        matrix = _header_number(matrix, "reconSpace matrixSize x")
        fov_mm = tuple(_header_number(v, f"reconSpace fieldOfView_mm {a}", float) for a, v in zip("xyz", fov))
        if not all(math.isfinite(v) and v > 0 for v in fov_mm[:2]) or not math.isfinite(fov_mm[2]) or fov_mm[2] < 0:
            raise MRDFormatError(f"reconSpace fieldOfView_mm is {fov_mm}: x and y must be finite and positive")
        if matrix < 8:
            raise MRDFormatError(f"reconSpace matrix {matrix} is too small")
        matrix_y = _header_number(enc.reconSpace.matrixSize.y or matrix, "reconSpace matrixSize y")
        if matrix_y != matrix or (fov_mm[1] > 0 and abs(fov_mm[1] - fov_mm[0]) > 0.01 * fov_mm[0]):
            raise MRDFormatError(f"reconSpace is {matrix} x {matrix_y} pixels over {fov_mm[0]:g} x {fov_mm[1]:g} mm: "
                                 "DA-INR reconstructs radial data on a square grid of square pixels")
        kz = _partitions(enc)
        if kz > 1:
            raise MRDFormatError(f"header encodes {kz} partitions (a 3D encoding): DA-INR reconstructs 2D radial "
                                 "slices, one per idx.slice")
        traj = enc.trajectory.value if hasattr(enc.trajectory, "value") else str(enc.trajectory)
        if traj not in ACCEPTED_TRAJECTORIES:
            raise MRDFormatError(f"header encoding trajectory is {traj!r}: DA-INR reconstructs radial k-space "
                                 "(trajectory radial or goldenangle, or other with acq.traj on every readout)")
        phase = enc.encodingLimits.phase if enc.encodingLimits is not None else None
        from_phase = spokes_per_frame is None and phase is not None and phase.maximum is not None and \
            _header_number(phase.maximum, "phase maximum") > 0
        step = angle_step("true") if traj == "goldenangle" else None
        desc = enc.trajectoryDescription
        if desc is not None:
            for p in desc.userParameterDouble or []:
                if p.name == ANGLE_PARAM:
                    step = _header_number(p.value, ANGLE_PARAM, float)
            for p in desc.userParameterLong or []:
                if p.name == SPOKES_PARAM and spokes_per_frame is None:
                    spokes_per_frame = _header_number(p.value, SPOKES_PARAM)
        if golden_angle is not None:
            step = angle_step(golden_angle)
        first_phase = _header_number(phase.minimum or 0, "phase minimum") if from_phase else 0
        n_frames = int(phase.maximum) - first_phase + 1 if from_phase else None
        enc_fov = getattr(getattr(enc.encodedSpace, "fieldOfView_mm", None), "x", None)
        enc_fov = _header_number(enc_fov, "encodedSpace fieldOfView_mm x", float) if enc_fov else None
        if enc_fov is not None and not (math.isfinite(enc_fov) and enc_fov > 0):
            raise MRDFormatError(f"encodedSpace fieldOfView_mm x is {enc_fov:g}: it must be finite and positive")
        average = enc.encodingLimits.average if enc.encodingLimits is not None else None
        last_average = _header_number(average.maximum, "average maximum") if average is not None and \
            average.maximum is not None else 0
        enc_x = getattr(getattr(enc.encodedSpace, "matrixSize", None), "x", None)
        enc_x = _header_number(enc_x, "encodedSpace matrixSize x") if enc_x else None
        return cls(matrix, fov_mm, from_phase, n_frames, spokes_per_frame, step, traj, enc_fov, first_phase,
                   last_average, enc_x, index_strides(header))


def _header_number(value, what: str, cast=int):
    """A numeric header value (``cast``: int or float); a clear :class:`MRDFormatError` naming the element
    otherwise."""
    try:
        return cast(value)
    except (TypeError, ValueError):
        kind = "an integer" if cast is int else "a number"
        raise MRDFormatError(f"MRD header {what} is {value!r}, not {kind}") from None


def _partitions(enc) -> int:
    """Partitions (kspace_encode_step_2 positions) of an encoding: the encoded z matrix, or the step-2 range."""
    z = getattr(getattr(enc.encodedSpace, "matrixSize", None), "z", None) or 1
    z = _header_number(z, "encodedSpace matrixSize z")
    lim = getattr(enc.encodingLimits, "kspace_encoding_step_2", None)
    if lim is not None and lim.maximum is not None:
        z = max(z, _header_number(lim.maximum, "kspace_encoding_step_2 maximum")
                - _header_number(lim.minimum or 0, "kspace_encoding_step_2 minimum") + 1)
    return z


def unknown_angles(params: ReconParameters) -> Optional[str]:
    """Why the angles of readouts without ``acq.traj`` cannot be derived from ``params`` (None when they can)."""
    if params.trajectory not in RADIAL_TRAJECTORIES:
        return (f"acquisition has no trajectory and the header trajectory type is {params.trajectory!r}; "
                "cannot derive radial angles")
    if params.angle_step_rad is None:
        return (f"readouts have no acq.traj and the header trajectory is {params.trajectory!r} without the "
                f"{ANGLE_PARAM!r} trajectory parameter: the spokes' angles are unknown (give each readout acq.traj, "
                "or the header's trajectory goldenangle or that parameter; `dainr recon --golden-angle "
                "true|reference` or the gadget property golden_angle reads such a file as golden-angle ordered)")
    return None


def spoke_trajectory(acq, params: ReconParameters, n_samples: int, pre: int = 0, post: int = 0,
                     spoke: Optional[int] = None) -> np.ndarray:
    """(kept samples, 2) trajectory of one readout of ``n_samples`` whose first ``pre`` and last ``post`` samples
    are discarded: ``acq.traj`` when present (it gives every stored sample's position, so it already accounts for
    a reversed readout; a third column of a 2-D encoding is a density weight, as Gadgetron's trajectory gadgets
    write it, and is not needed), else from the golden-angle index ``spoke`` (default
    ``idx.kspace_encode_step_1``), with the echo (``center_sample``, counted in the whole readout) in the middle of
    the kept samples.  Without ``acq.traj`` spokes are taken as symmetric, as Gadgetron's radial gadgets take
    them: ``center_sample`` 0 is read as not set, so a centre-out readout needs ``acq.traj``.  A readout of twice
    the encodedSpace matrix's samples (or as many kept samples) is oversampled ×2 (how siemens_to_ismrmrd describes
    radial readouts); one of half as many, under an encoded FOV twice the reconSpace's, had its oversampling removed
    upstream (Gadgetron's ``RemoveROOversamplingGadget`` does not rewrite the header).  ``acq.traj`` is in cycles
    per encodedSpace pixel (±0.5 at the encoded matrix's Nyquist, as Gadgetron's radial gadgets read it): scaled to
    the reconSpace pixel where the two differ (scanner interpolation)."""
    if acq.trajectory_dimensions >= 2:
        if acq.trajectory_dimensions > 3 and np.any(acq.traj[:, 3:]):
            raise MRDFormatError(f"readout {acq.scan_counter} has a {acq.trajectory_dimensions}-D acq.traj: a 2D "
                                 "radial readout has (kx, ky) and at most a density weight")
        traj = np.asarray(acq.traj[pre:n_samples - post, :2], dtype=np.float32)
        scale = params.recon_pixels_per_encoded_pixel()
        return traj * np.float32(scale) if abs(scale - 1) > 1e-3 else traj
    if acq.trajectory_dimensions == 1:
        raise MRDFormatError(f"readout {acq.scan_counter} has a 1-D acq.traj: a radial readout needs (kx, ky)")
    unknown = unknown_angles(params)
    if unknown:
        raise MRDFormatError(unknown)
    n = n_samples - pre - post
    if acq.center_sample == 0 and pre != post:  # 0: not set by the converter
        raise MRDFormatError(f"readout {acq.scan_counter} discards {pre} samples before and {post} after, without "
                             "center_sample or acq.traj: whether its echo is the middle of the readout or of the kept "
                             "samples is unknown (set center_sample, or give acq.traj)")
    if acq.center_sample != 0 and acq.center_sample - pre != n // 2:
        where = f" ({n} kept after discard_pre {pre}, discard_post {post})" if pre or post else ""
        raise MRDFormatError(f"readout {acq.scan_counter} has its echo at sample {acq.center_sample} of {n_samples}"
                             f"{where} (asymmetric echo) and no acq.traj: the sample positions cannot be derived")
    angle = (acq.idx.kspace_encode_step_1 if spoke is None else spoke) * params.angle_step_rad
    traj = radial_trajectory(torch.tensor([angle]), n)[0].numpy()  # kept sample i at (i − n/2)/n cycles/pixel
    if params.encoded_fov_x:
        # the samples are 1/FOV_encoded apart, (FOV_recon/N)/FOV_encoded cycles/pixel, or half that where the
        # readout, whole or its kept samples, has twice the encoded matrix's samples (oversampled ×2, also where
        # scanner interpolation or discards of half the readout leave the kept samples spanning less than ±0.5),
        # or twice that where its oversampling was removed upstream
        factor = n * params.fov_mm[0] / (params.matrix * params.encoded_fov_x * params.oversampling(n_samples, n))
        if factor > 1.001:
            raise MRDFormatError(f"{n} readout samples over an encoded FOV of {params.encoded_fov_x:g} mm reach "
                                 f"{0.5 * factor:.3g} cycles/pixel of the {params.matrix}-pixel, {params.fov_mm[0]:g} mm "
                                 "reconSpace: its matrix is coarser than the acquisition (give acq.traj)")
        if factor < 0.999:  # reconSpace finer than acquired (scanner interpolation): the samples span less
            traj = traj * np.float32(factor)
    # ACQ_IS_REVERSE: the samples are stored in acquisition order, which ran the spoke backwards through the same
    # echo sample: the spoke at angle + π
    return -traj if acq.is_flag_set(ismrmrd.ACQ_IS_REVERSE) else traj


def spoke_indices(acqs: List) -> List[int]:
    """The golden-angle index of each readout of one cine: ``idx.kspace_encode_step_1`` where it counts the
    spokes of each average (averages may repeat the same spokes), else their order of arrival in each average, as
    Gadgetron's radial gadgets count (a counter restarting every frame gave every frame the first frame's
    angles)."""
    steps = [int(a.idx.kspace_encode_step_1) for a in acqs]
    if len({(a.idx.average, step) for a, step in zip(acqs, steps)}) == len(steps):
        return steps
    log.info("kspace_encode_step_1 repeats within an average: the spokes' golden-angle index is their arrival order")
    counted: Dict[int, int] = {}
    order = []
    for a in acqs:
        order.append(counted.get(a.idx.average, 0))
        counted[a.idx.average] = order[-1] + 1
    return order


def iter_acquisitions(path: str, group: str = "dataset", chunk: int = 2048) -> Iterator["ismrmrd.Acquisition"]:
    """The acquisitions of an MRD file in file order, read in chunks (``Dataset.read_acquisition`` reads
    the record three times per call: ~10x slower for replaying large files)."""
    import h5py

    with h5py.File(path, "r") as h5:
        if group not in h5 or "data" not in h5[group]:
            return
        records = h5[group]["data"]
        for start in range(0, records.shape[0], chunk):
            for i, rec in enumerate(records[start:start + chunk], start):
                acq = ismrmrd.Acquisition(rec["head"])
                try:
                    acq.data[:] = rec["data"].view(np.complex64).reshape(acq.active_channels, acq.number_of_samples)
                    if acq.traj.size:
                        acq.traj[:] = rec["traj"].reshape(acq.number_of_samples, acq.trajectory_dimensions)
                except ValueError:
                    raise MRDFormatError(
                        f"{path}: acquisition {i} (scan counter {acq.scan_counter}): its header's {acq.active_channels} "
                        f"channels × {acq.number_of_samples} samples (trajectory dimensions {acq.trajectory_dimensions})"
                        f" do not match its stored {rec['data'].size // 2} data and {rec['traj'].size} trajectory "
                        "values") from None
                yield acq


def open_raw(path: str, group: str = "dataset") -> Tuple[str, int]:
    """The header XML of an MRD raw file and its number of waveforms; a clear error for anything else."""
    import h5py

    if not os.path.exists(path):
        raise MRDFormatError(f"{path}: no such file")
    try:
        with h5py.File(path, "r") as h5:
            if not isinstance(h5.get(group), h5py.Group):
                raise MRDFormatError(f"{path}: not an MRD/HDF5 file with group '{group}' (its groups: "
                                     f"{', '.join(list(h5)[:8]) or 'none'})")
            xml, data = h5[group].get("xml"), h5[group].get("data")
            if not isinstance(xml, h5py.Dataset) or xml.dtype.kind not in "OSU" or xml.shape[:1] != (1,):
                raise MRDFormatError(f"{path}: no MRD header: {group}/xml is "
                                     f"{'missing' if xml is None else 'not header text'}")
            if data is not None and not (isinstance(data, h5py.Dataset) and data.dtype.names is not None and
                                         {"head", "data", "traj"} <= set(data.dtype.names)):
                raise MRDFormatError(f"{path}: {group}/data is not an MRD acquisition table")
            text = xml[0]
            waveforms = h5[group].get("waveforms")
            n_waveforms = waveforms.size if isinstance(waveforms, h5py.Dataset) else 0
    except OSError as exc:
        raise MRDFormatError(f"{path}: not an MRD/HDF5 file: {exc}") from exc
    return (text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text)), n_waveforms


def read_raw(path: str, group: str = "dataset", spokes_per_frame: Optional[int] = None,
             golden_angle: Optional[str] = None) -> RawScan:
    """Read an MRD raw radial file into one :class:`RadialData` per slice (noise scans → prewhitening);
    ``golden_angle`` overrides the header's angle step where readouts carry no ``acq.traj``."""
    text = open_raw(path, group)[0]
    header = parse_header(text)
    params = ReconParameters.from_header(header, spokes_per_frame, golden_angle)
    noise, per_key, late_noise, other_encodings, empty, noise_dwell = [], {}, 0, {}, 0, 0.0
    for acq in iter_acquisitions(path, group):
        if acq.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
            if per_key:  # the gadget's prewhitener is fixed at the first imaging readout: the same images here
                late_noise += 1
            else:
                noise_dwell = noise_dwell or float(acq.sample_time_us)
                noise.append(acq.data.copy())
        elif acq.number_of_samples == 0 and not is_skipped(acq):  # as the gadget: not used, counted
            empty += 1
        elif acq.encoding_space_ref != 0 and not is_skipped(acq):
            other_encodings[acq.encoding_space_ref] = other_encodings.get(acq.encoding_space_ref, 0) + 1
        elif not is_skipped(acq):
            per_key.setdefault(acquisition_key(acq), []).append(acq)
    if not per_key:
        raise MRDFormatError(f"{path}: no imaging acquisitions" + (
            f" of the first encoding (the readouts are of encoding space(s) {sorted(other_encodings)})"
            if other_encodings else ""))
    for key, acqs in per_key.items():
        _check_one_pass(path, key, acqs, params.last_average)
    noise_t = noise_samples(noise)
    slices = {key: slice_from_acquisitions(acqs, params, noise_t, key[0], noise_dwell)
              for key, acqs in sorted(per_key.items())}
    return RawScan(params.matrix, params.fov_mm, slices, noise_t, header, text, late_noise, other_encodings, empty)


def ends_cine(acq, last_average: int) -> bool:
    """Whether a readout ends its slice's cine: the ``ACQ_LAST_IN_SLICE`` of the header's last average (declared
    averages are one cine).  The file reader and the gadget split cines by the same rule."""
    return acq.is_flag_set(ismrmrd.ACQ_LAST_IN_SLICE) and acq.idx.average >= last_average


def _check_one_pass(path: str, key: Key, acqs: List, last_average: int) -> None:
    """One (slice, contrast, repetition, set) is one cine, as the gadget reconstructs it: its readouts end with the
    ``ACQ_LAST_IN_SLICE`` of its last declared average (if flagged at all), and no readout is of a later average."""
    where = f"{path}: slice {key[0]} (contrast {key[1]}, repetition {key[2]}, set {key[3]})"
    for i, a in enumerate(acqs):
        if a.idx.average > last_average:
            raise MRDFormatError(f"{where}: readout {a.scan_counter} is of average {a.idx.average}, beyond the "
                                 f"header's encodingLimits average maximum {last_average}")
        if i < len(acqs) - 1 and ends_cine(a, last_average):
            raise MRDFormatError(f"{where}: {len(acqs) - 1 - i} readouts follow the ACQ_LAST_IN_SLICE of readout "
                                 f"{a.scan_counter}; a streaming reconstruction makes them a cine of their own "
                                 "(give each pass its own repetition, or declare the passes as averages)")


def noise_samples(scans: Sequence[np.ndarray]) -> Optional[torch.Tensor]:
    """Noise-scan readouts (channels, samples) → one (C, n) tensor for prewhitening (None without any)."""
    if not scans:
        return None
    if len({x.shape[0] for x in scans}) != 1:
        raise MRDFormatError("noise scans have different channel counts")
    if not all(np.isfinite(x).all() for x in scans):
        raise MRDFormatError("the noise scan contains NaN/Inf samples")
    return torch.from_numpy(np.concatenate(scans, axis=1))


def dwell_matched(noise: Optional[torch.Tensor], noise_dwell_us: float, dwell_us: float) -> Optional[torch.Tensor]:
    """The noise scan's samples at the readouts' bandwidth: white noise's variance grows with the bandwidth
    (1 / dwell time), so a noise scan sampled at another dwell time whitens the readouts to a variance of noise
    dwell / readout dwell instead of 1 (Gadgetron's NoiseAdjustGadget scales its whitener by the same ratio, and
    by the receiver's noise bandwidth for SNR units, which this does not claim).  As given where either is 0."""
    if noise is None or not (noise_dwell_us > 0 and dwell_us > 0) or noise_dwell_us == dwell_us:
        return noise
    return noise * math.sqrt(noise_dwell_us / dwell_us)


def geometry_spread(acqs: List) -> Optional[str]:
    """How far one slice's readouts disagree on where the slice is (None within float32 rounding): a converter
    writing per-spoke rotated directions, or readouts of two slices under one index, would otherwise be labelled
    silently with one readout's geometry."""
    pos = np.array([a.position for a in acqs], dtype=np.float64)
    dirs = np.array([(a.read_dir, a.phase_dir, a.slice_dir) for a in acqs], dtype=np.float64)
    shift = float(np.linalg.norm(pos - pos[-1], axis=1).max())  # mm
    # the angle between two unit vectors from their chord; the largest over the three directions
    turn = float(np.degrees(2 * np.arcsin(np.clip(np.linalg.norm(dirs - dirs[-1], axis=2).max() / 2, 0, 1))))
    spread = ([f"position differs by up to {shift:.3g} mm"] if shift > 1e-2 else []) + \
        ([f"read/phase/slice directions differ by up to {turn:.3g}°"] if turn > 1e-2 else [])
    return " and ".join(spread) or None


def _check_trajectory_units(acqs: List, params: ReconParameters, n_samples: int, pre: int, post: int, s: int,
                            notes: List[str]) -> None:
    """``acq.traj``'s step from sample to sample against the header's (1 / (encoded matrix × oversampling) cycles
    per encoded pixel): another unit (cycles per reconSpace pixel under scanner interpolation, 1/mm, radians) gave
    a wrong image silently.  Off by more than 1.5× either way: refused; by more than 10 %: noted (ramp sampling,
    a header rounded)."""
    if not (acqs and params.encoded_x and params.encoded_fov_x):
        return
    step = float(np.median(np.concatenate([np.linalg.norm(np.diff(a.traj[pre:n_samples - post, :2], axis=0), axis=1)
                                           for a in acqs])))
    # a partial echo's readout is shorter than the whole echo its oversampling is judged by (center_sample set)
    centre = int(acqs[0].center_sample)
    whole = 2 * max(centre, n_samples - centre) if centre else n_samples
    expected = 1 / (params.encoded_x * params.oversampling(whole, n_samples - pre - post))
    if 1 / 1.1 <= step / expected <= 1.1:
        return
    text = (f"slice {s}: acq.traj moves {step:.4g} from sample to sample where the header implies {expected:.4g} "
            f"cycles per encoded pixel (encodedSpace x {params.encoded_x} over {params.encoded_fov_x:g} mm, readouts of "
            f"{n_samples} samples)")
    if not 1 / 1.5 <= step / expected <= 1.5:
        raise MRDFormatError(f"{text}: it is in other units (ISMRMRD radial trajectories are in cycles per encoded "
                             "pixel, ±0.5 at the encoded matrix's Nyquist)")
    notes.append(f"{text}: reconstructed with acq.traj as given")


def slice_from_acquisitions(acqs: List, params: ReconParameters, noise: Optional[torch.Tensor], s: int,
                            noise_dwell_us: float = 0.0) -> RawSlice:
    """One slice's imaging readouts (in order) → :class:`RawSlice`; a clear :class:`MRDFormatError` otherwise.
    ``noise_dwell_us``: the noise scan's ``sample_time_us`` (0: unknown), see :func:`dwell_matched`."""
    shapes = {a.data.shape for a in acqs}
    if len(shapes) != 1:
        raise MRDFormatError(f"slice {s}: readouts have different (channels, samples): {sorted(shapes)}")
    C, R = shapes.pop()
    if R < 2:
        raise MRDFormatError(f"slice {s}: readouts have {R} samples")
    notes = []
    if noise is not None and noise.shape[0] != C:  # as Gadgetron's NoiseAdjustGadget: passed on as it is
        notes.append(f"slice {s}: {C} channels but the noise scan has {noise.shape[0]}: reconstructed without "
                     "prewhitening")
        noise = None
    noise = dwell_matched(noise, noise_dwell_us, float(acqs[0].sample_time_us))
    moved = geometry_spread(acqs)
    if moved:
        notes.append(f"slice {s}: the readouts' {moved}: the images carry the last readout's geometry")
    discards = {(int(a.discard_pre), int(a.discard_post)) for a in acqs}  # samples the scanner marks as unusable
    if len(discards) != 1:
        raise MRDFormatError(f"slice {s}: readouts discard different samples (discard_pre, discard_post): "
                             f"{sorted(discards)}")
    pre, post = discards.pop()
    if R - pre - post < 2:
        raise MRDFormatError(f"slice {s}: discard_pre {pre} + discard_post {post} leave {R - pre - post} of {R} samples")
    keep = slice(pre, R - post)
    kdata = torch.from_numpy(np.stack([a.data[:, keep] for a in acqs]).astype(np.complex64))
    finite = torch.isfinite(torch.view_as_real(kdata)).flatten(1).all(1)
    if not finite.all():
        bad = (~finite).nonzero().flatten().tolist()
        raise MRDFormatError(f"slice {s}: {len(bad)} readout(s) contain NaN/Inf samples "
                             f"(scan counters {[int(acqs[i].scan_counter) for i in bad[:5]]})")
    if all(a.trajectory_dimensions < 2 for a in acqs):  # positions derived as symmetric spokes: is the echo there?
        peak = int(kdata.abs().sum(dim=(0, 1)).argmax())
        off = peak - (R - pre - post) // 2
        where = f"the readouts have no acq.traj and their k-space centre (the largest samples) lies at sample " \
                f"{peak + pre} of {R}"
        if abs(off) > (R - pre - post) // 4:
            raise MRDFormatError(f"slice {s}: {where}, not in the middle: centre-out or asymmetric readouts need "
                                 "acq.traj")
        if abs(off) > max(2, (R - pre - post) // 32):  # more than a gradient delay: a partial echo read as whole
            notes.append(f"slice {s}: {where}, {abs(off)} from the middle: reconstructed as symmetric spokes (an "
                         "asymmetric echo needs acq.traj)")
    traj = torch.from_numpy(np.stack([spoke_trajectory(a, params, R, pre, post, spoke)
                                      for a, spoke in zip(acqs, spoke_indices(acqs))]))
    frame_index = torch.tensor([a.idx.phase for a in acqs]) if params.frames_from_phase else None
    if frame_index is not None and params.n_frames:
        if len(acqs) < params.n_frames:
            raise MRDFormatError(f"slice {s}: {len(acqs)} spokes for {params.n_frames} frames (header phase range)")
        phases = set(frame_index.tolist())
        # the header's phase range where the data lie in it, else (a scanner numbering its phases from elsewhere)
        # the same number of frames from the lowest phase received
        first = params.first_phase if min(phases) >= params.first_phase and \
            max(phases) < params.first_phase + params.n_frames else min(phases)
        missing = sorted(set(range(first, first + params.n_frames)) - phases)
        if missing:
            raise MRDFormatError(f"slice {s}: frames {missing} have no spokes (these {len(acqs)} readouts, of phases "
                                 f"{min(phases)}..{max(phases)}, are one cine: a slice's readouts up to its "
                                 "ACQ_LAST_IN_SLICE)")
        beyond = sorted(phases - set(range(first, first + params.n_frames)))
        if beyond:
            raise MRDFormatError(f"slice {s}: readouts of phase(s) {beyond[:10]} lie beyond the header's "
                                 f"{params.n_frames} frames (encodingLimits phase, from {first})")
    if frame_index is None and params.spokes_per_frame is None:
        raise MRDFormatError("the header has no phase range (encodingLimits phase) and no spokes per frame were "
                             "given: give them (`dainr recon --spokes-per-frame`, the gadget property "
                             "spokes_per_frame) to bin the spokes into frames in acquisition order")
    try:
        data = frames_from_spokes(kdata, traj, frame_index, params.matrix, params.spokes_per_frame, noise)
    except ValueError as exc:
        raise MRDFormatError(f"slice {s}: {exc}") from exc
    _check_trajectory_units([a for a in acqs if a.trajectory_dimensions >= 2], params, R, pre, post, s, notes)
    first_phase = int(frame_index.min()) if frame_index is not None else 0
    # each frame's timing: its middle readout's (in arrival order) acquisition_time_stamp and physiology_time_stamp
    # (the time since the trigger: a cine frame's trigger time)
    middle = [acqs[int(g[len(g) // 2])] for g in frame_groups(len(acqs), frame_index, params.spokes_per_frame)]
    stamps = np.array([(a.acquisition_time_stamp, *a.physiology_time_stamp[:3]) for a in middle], dtype=np.uint32)
    return RawSlice(s, data, Geometry.from_acquisition(acqs[-1]), len(acqs), first_phase, stamps,
                    int(acqs[-1].measurement_uid), notes)


def series_index(value: int) -> int:
    """``value`` if it fits ``image_series_index`` (uint16), else ValueError (it would wrap silently)."""
    if not 0 <= value <= 0xFFFF:
        raise ValueError(f"image series index must be 0..65535, got {value}")
    return value


def index_strides(header) -> Tuple[int, int, int, int]:
    """(slices, contrasts, phases, sets) of the header's first encoding (the encodingLimits maxima + 1, as
    Gadgetron counts them; 1 where absent): the strides of the image numbering (:func:`make_images`)."""
    limits = header.encoding[0].encodingLimits if header is not None and header.encoding else None

    def count(name: str) -> int:
        limit = getattr(limits, name, None)
        return 1 if limit is None or limit.maximum is None else \
            max(1, _header_number(limit.maximum, f"{name} maximum") + 1)
    return count("slice"), count("contrast"), count("phase"), count("set")


def make_images(frames: np.ndarray, series: int, slice_index: int, fov_mm: Sequence[float], geometry: Geometry,
                output: str = "magnitude", comment: str = "DA-INR", history: Sequence[str] = (),
                repetition: int = 0, contrast: int = 0, set_index: int = 0, first_phase: int = 0,
                time_stamps: Optional[np.ndarray] = None, measurement_uid: int = 0,
                strides: Tuple[int, int, int, int] = (1, 1, 1, 1),
                acquired_frames: Optional[Sequence[int]] = None,
                provenance: Optional[Dict[str, object]] = None) -> List["ismrmrd.Image"]:
    """One ``ismrmrd.Image`` per frame with series/index/geometry/meta set (both meta key families);
    ``time_stamps`` (:attr:`RawSlice.time_stamps`, one row per frame) give each image its frame's time stamps;
    frames not among ``acquired_frames`` (temporal ×r: not fitted; None: every frame fitted) say so in their
    ``ImageComment``; ``provenance`` (:func:`fit_provenance`) is added to every image's meta.

    ``image_index`` numbers the series' images as Gadgetron's recon gadgets do (``ImageArraySendMixin``): slice
    fastest, then contrast, frame, set and repetition, with ``strides`` = (slices, contrasts, phases, sets) from
    the header (:func:`index_strides`; the frames' stride is the larger of the header's phases and this cine's
    frames), so every image of a series has its own index (DICOM InstanceNumber), whichever process
    reconstructed its slice, where the indices lie within the header's limits and the cines have the header's
    frame count (cines re-binned by spokes per frame into different counts can share indices); 1-based,
    wrapping past 65535 as the uint16 field does."""
    if output not in ("magnitude", "complex"):
        raise ValueError(f"output must be 'magnitude' or 'complex', got {output!r}")
    series_index(series)
    frames = np.asarray(frames)
    arr = np.abs(frames).astype(np.float32) if output == "magnitude" else frames.astype(np.complex64)
    mag = np.abs(frames)
    hi = float(np.percentile(mag, 99.5)) if mag.size else 1.0
    window = dict(WindowCenter=f"{hi / 2:.6g}", WindowWidth=f"{hi:.6g}")
    if time_stamps is not None and len(time_stamps) != len(arr):
        raise ValueError(f"{len(time_stamps)} frames of time stamps for {len(arr)} images")
    slices, contrasts, phases, sets = strides
    per_frame = max(phases, len(arr))  # the frames' stride
    fitted = set(range(len(arr)) if acquired_frames is None else acquired_frames)
    images = []
    for f, img in enumerate(arr):
        im = ismrmrd.Image.from_array(np.ascontiguousarray(img), transpose=False)
        im.measurement_uid = measurement_uid
        if time_stamps is not None:
            im.acquisition_time_stamp = int(time_stamps[f, 0])
            im.physiology_time_stamp[:] = [int(v) for v in time_stamps[f, 1:]]
        im.image_type = ismrmrd.IMTYPE_MAGNITUDE if output == "magnitude" else ismrmrd.IMTYPE_COMPLEX
        im.image_series_index = int(series)
        number = slice_index + slices * (contrast + contrasts * (f + per_frame * (set_index + sets * repetition)))
        im.image_index = number % 65535 + 1
        im.slice, im.phase, im.repetition, im.contrast, im.set = slice_index, first_phase + f, repetition, contrast, set_index
        im.field_of_view[:] = tuple(float(v) for v in fov_mm)
        im.position[:] = geometry.position
        im.read_dir[:] = geometry.read_dir
        im.phase_dir[:] = geometry.phase_dir
        im.slice_dir[:] = geometry.slice_dir
        im.patient_table_position[:] = geometry.patient_table_position
        meta = ismrmrd.Meta()
        for prefix in ("", "GADGETRON_"):
            meta[prefix + "DataRole"] = "Image"
            meta[prefix + "ImageComment"] = comment + INTERPOLATED if f not in fitted else comment
            meta[prefix + "WindowCenter"] = window["WindowCenter"]
            meta[prefix + "WindowWidth"] = window["WindowWidth"]
            meta[prefix + "ImageProcessingHistory"] = list(history) or ["DA-INR"]
        meta["ImageRowDir"] = [f"{v:.6f}" for v in geometry.read_dir]
        meta["ImageColumnDir"] = [f"{v:.6f}" for v in geometry.phase_dir]
        for key, value in (provenance or {}).items():
            meta[key] = value
        im.attribute_string = meta.serialize()
        images.append(im)
    return images


INTERPOLATED = " (interpolated frame)"  # an ImageComment's suffix on the frames a temporal ×r fit did not see


def fit_history(info: dict, seconds: float, n_frames: int, acquired_frames: Sequence[int], matrix: int) -> str:
    """The ``ImageProcessingHistory`` entry of a fit's images: steps, stop reason, time and device, and under
    interpolation the matrix it was fitted at and how many of the frames it saw."""
    text = f"DA-INR {info['steps']} steps ({info['stop_reason']}), {seconds:.2f} s on {info['device']}"
    if info["fit_matrix"] != matrix:
        text += f", fitted at {info['fit_matrix']}² for {matrix}²"
    if len(acquired_frames) != n_frames:
        text += f", {len(acquired_frames)} of {n_frames} frames fitted"
    return text


def fit_provenance(cfg: DAINRConfig, info: dict, spokes_per_frame: Optional[int] = None,
                   golden_angle: Optional[str] = None) -> Dict[str, object]:
    """The meta entries saying what produced a fit's images: ``DAINR_Software`` (dainr, torch, numpy and the
    NUFFT library the fit ran on), ``DAINR_Config`` (every configuration field as JSON, ``device`` and
    ``nufft_backend`` as the fit resolved them: ``DAINRConfig(**json.loads(value))`` gives the bit-identical fit
    of the same data on the same device and software) and, where given, ``DAINR_ReadOptions``
    (``spokes_per_frame``, ``golden_angle``: how the readouts were binned and placed, where that overrode the
    header)."""
    software = [f"dainr {__version__}", f"torch {torch.__version__}", f"numpy {np.__version__}"]
    library = info["nufft_backend"]
    if library in ("finufft", "torchkbnufft"):
        try:
            version = importlib.metadata.version(library)
        except importlib.metadata.PackageNotFoundError:  # (built from source onto the path: no package metadata)
            version = str(getattr(importlib.import_module(library), "__version__", "unknown"))
        software.append(f"{library} {version}")
    meta: Dict[str, object] = {
        "DAINR_Software": software,
        "DAINR_Config": json.dumps(cfg.replace(device=info["device"], nufft_backend=library).to_dict(),
                                   separators=(",", ":")),
    }
    options = {k: v for k, v in (("spokes_per_frame", spokes_per_frame), ("golden_angle", golden_angle)) if v}
    if options:
        meta["DAINR_ReadOptions"] = json.dumps(options, separators=(",", ":"))
    return meta


def changed_settings(fields: dict) -> dict:
    """The configuration fields (a :meth:`DAINRConfig.to_dict`) that differ from the defaults, for a summary:
    without ``progress``, which changes only what is printed."""
    return {k: v for k, v in changed_fields(fields).items() if k != "progress"}


def image_meta(image: "ismrmrd.Image") -> "ismrmrd.Meta":
    """An image's meta (empty where it has none, or where its XML is malformed: another program's)."""
    try:
        return ismrmrd.Meta.deserialize(image.attribute_string) if image.attribute_string else ismrmrd.Meta()
    except Exception:
        return ismrmrd.Meta()


def provenance(image: "ismrmrd.Image") -> Dict[str, object]:
    """An image's :func:`fit_provenance` entries, decoded each on its own (one that is malformed is left out):
    ``software`` (list), ``config_fields`` (the configuration's fields, a dict; a later version's too),
    ``config`` (a :class:`DAINRConfig`, where this version knows every field) and ``read_options`` (dict)."""
    meta = image_meta(image)
    out: Dict[str, object] = {}
    if "DAINR_Software" in meta:
        software = meta["DAINR_Software"]
        out["software"] = software if isinstance(software, list) else [software]
    for key, name in (("DAINR_Config", "config_fields"), ("DAINR_ReadOptions", "read_options")):
        with contextlib.suppress(ValueError, TypeError):
            value = json.loads(meta[key]) if key in meta else None
            if isinstance(value, dict):
                out[name] = value
    if "config_fields" in out:
        with contextlib.suppress(ValueError, TypeError):
            out["config"] = DAINRConfig(**out["config_fields"])
    return out


def processing_history(image: "ismrmrd.Image") -> str:
    """The last ``ImageProcessingHistory`` (or ``GADGETRON_…``) entry of an image's meta ('' when absent)."""
    meta = image_meta(image)
    history = meta.get("ImageProcessingHistory", meta.get("GADGETRON_ImageProcessingHistory", ""))
    return str(history[-1] if isinstance(history, list) and history else history or "")


def write_images(path, images: Sequence["ismrmrd.Image"], group: str = "dataset") -> None:
    """Append images to ``path`` (a file name, or :func:`hdf5_output`'s buffer) under ``<group>/image_<series>``,
    in the layout of ismrmrd-python's ``append_image`` except where the C library (Gadgetron's,
    ``ismrmrd_read_image``) could not read it back: the meta as an ASCII-typed string (its UTF-8 bytes: HDF5
    converts no UTF-8 string to the ASCII one the C library asks for) and its length in the header's
    ``attribute_string_len`` (the C library reads that many bytes; ismrmrd-python sets it only on the wire)."""
    import h5py
    from ismrmrd.hdf5 import get_hdf5type, image_header_dtype

    by_series: Dict[int, List["ismrmrd.Image"]] = {}
    for im in images:
        by_series.setdefault(im.image_series_index, []).append(im)
    with h5py.File(path, "a") as h5:
        for series, ims in by_series.items():
            node = h5.require_group(group).require_group(f"image_{series}")
            metas = [(im.attribute_string or "").encode("utf-8") for im in ims]
            heads = np.concatenate([np.frombuffer(im.getHead(), dtype=image_header_dtype) for im in ims])
            heads["attribute_string_len"] = [len(m) for m in metas]
            data = np.stack([im.data.view(get_hdf5type(im.data_type)) for im in ims])
            if "header" not in node:
                node.create_dataset("header", (0,), maxshape=(None,), dtype=image_header_dtype)
                node.create_dataset("attributes", (0,), maxshape=(None,), dtype=h5py.string_dtype("ascii"))
                node.create_dataset("data", (0,) + data.shape[1:], maxshape=(None,) + data.shape[1:],
                                    dtype=data.dtype)
            start = node["header"].shape[0]
            for name, values in (("header", heads), ("attributes", metas), ("data", data)):
                node[name].resize(start + len(ims), axis=0)
                node[name][start:] = values


def write_header(path, header: Optional[str], group: str = "dataset") -> None:
    """Store the raw data's MRD header text beside images (``<group>/xml``; nothing for None)."""
    if header is None:
        return
    ds = ismrmrd.Dataset(path, group, create_if_needed=True)
    try:
        ds.write_xml_header(header.encode("utf-8"))  # (a str is stored as ASCII: a patient's "ü" failed)
    finally:
        ds.close()


def read_header_text(path: str, group: str = "dataset") -> Optional[str]:
    """The MRD header text stored in ``<group>/xml`` of a file (None without one)."""
    import h5py

    with h5py.File(path, "r") as h5:
        if group not in h5 or "xml" not in h5[group]:
            return None
        text = h5[group]["xml"][0]
    return text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text)


def read_images(path: str, group: str = "dataset") -> Dict[int, List["ismrmrd.Image"]]:
    """All images of an MRD file, by series index."""
    import h5py

    out: Dict[int, List] = {}
    with h5py.File(path, "r") as h5:
        if group not in h5:
            raise MRDFormatError(f"{path}: no group '{group}'")
        names = [k for k in h5[group].keys() if k.startswith("image_")]
        for name in names:
            node = h5[group][name]
            if not name[6:].isdigit() or not isinstance(node, h5py.Group) or \
                    not {"header", "data", "attributes"} <= set(node.keys()):
                raise MRDFormatError(f"{path}: {group}/{name} is not an MRD image series (image_<series index> with "
                                     "header, data and attributes)")
    ds = ismrmrd.Dataset(path, group, create_if_needed=False, mode="r")
    try:
        for name in names:
            out[int(name.split("_", 1)[1])] = [ds.read_image(name, i) for i in range(ds.number_of_images(name))]
    finally:
        ds.close()
    return out
