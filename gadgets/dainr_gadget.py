"""The DA-INR gadget: buffer radial readouts per slice, reconstruct with DA-INR, send image frames.

Gadgetron starts it as ``python -m gadgetron PORT gadgets.dainr_gadget dainr_recon``.  Properties
(``<property name=... value=.../>`` in the ``<configuration>`` block): ``spokes_per_frame``,
``steps``, ``max_seconds``, ``holdout_spokes``, ``device``, ``sr_ratio``, ``down_ratio``, ``image_series_index``,
``preview`` (true/false), ``preview_series_index``, ``preview_steps``, ``output``
(magnitude/complex), ``seed``, ``features`` (true/false: the reference's frozen CNN features of the
neighbouring frames; default ``DAINRConfig.use_features``, off), ``max_buffer_mb`` (readouts buffered
at once, all slices together; default 2048), ``check_memory`` (true/false: refuse a slice whose estimated
peak memory exceeds what the device has available; default true), ``cap_grid_ratio`` (the grid's finest
level as a fraction of the fitting matrix; default ``DAINRConfig.cap_grid_ratio``, 0.75),
``frames_per_step`` (default: 4 on CUDA, 1 on CPU; 1 on CUDA gives the CPU's image quality for 2–3× the time),
``lr`` (the initial learning rate; default ``DAINRConfig.lr``, 4e-3), ``golden_angle`` (true/reference: the
angle step of readouts without ``acq.traj`` where the header gives none, as ``dainr recon --golden-angle``).
"""
from __future__ import annotations

import logging
import math
import re
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from dainr_app._ismrmrd import ismrmrd

from dainr import DAINRConfig
from dainr.trajectory import angle_step
from dainr_app.host_share import reconstruct_shared
from dainr_app.mrd import RADIAL_TRAJECTORIES, Key, MRDFormatError, ReconParameters, acquisition_key, ends_cine, \
    fit_history, fit_provenance, is_skipped, make_images, noise_samples, series_index, slice_from_acquisitions, \
    unknown_angles
from dainr_app.protocol import error_frame

log = logging.getLogger("dainr.gadget")


@dataclass
class GadgetOptions:
    cfg: DAINRConfig
    spokes_per_frame: Optional[int] = None
    series: int = 1
    preview: bool = False
    preview_series: int = 101
    output: str = "magnitude"
    max_buffer_mb: float = 2048.0
    golden_angle: Optional[str] = None  # angle step for readouts without acq.traj (default: the header's)


def properties(config, raw: bytes = b"") -> Dict[str, str]:
    """The ``<configuration>`` element's properties, in Gadgetron's two forms: ``<property name= value=/>`` and
    ``<property><name/><value/></property>``.  None with ``raw`` bytes (gadgetron-python could not parse them),
    a property without a name or one given twice raises ValueError: ignored, the fit would run on defaults.

    An ``<external>`` without ``<configuration>`` reaches the gadget from a real Gadgetron as an XML declaration
    alone (pugixml saves an empty document so): no properties.  The legacy v1 ``PythonGadget`` form, which
    Gadgetron turns into an ``<external>``, copies its ``python_path``/``python_module``/``python_class`` into the
    properties: those name the gadget itself and are left out."""
    if config is None:  # (e.g. a C string's trailing NUL, which gadgetron-python's parser refuses)
        body = XML_DECLARATION.sub(b"", bytes(raw).rstrip(b"\x00 \t\r\n"), count=1)
        if not body.strip(b"\x00 \t\r\n"):
            return {}
        try:
            config = ElementTree.fromstring(body)
        except ElementTree.ParseError as exc:
            raise ValueError(f"the gadget's <configuration> is not XML ({exc})") from None
    props: Dict[str, str] = {}
    for p in config.iter("property"):
        name = (p.get("name", p.findtext("name")) or "").strip()
        value = p.get("value", p.findtext("value"))
        if not name or value is None:
            raise ValueError(f"a <property> without a name and a value: {ElementTree.tostring(p, 'unicode')[:200]}")
        if name in props:
            raise ValueError(f"property {name} is given twice")
        if name not in LEGACY_PYTHON_GADGET:
            props[name] = value
    return props


XML_DECLARATION = re.compile(rb"^\s*<\?xml[^>]*\?>")
LEGACY_PYTHON_GADGET = ("python_path", "python_module", "python_class")


def integer(value: str) -> int:
    """An integer property; "2.0" too (configurations written with floats), not "2.5"."""
    try:
        return int(value)
    except ValueError:
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not number.is_integer():
            raise ValueError("not an integer") from None
        return int(number)


BOOLEAN_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def boolean(value: str) -> bool:
    word = value.strip().lower()
    if word not in BOOLEAN_WORDS:
        raise ValueError(f"not a boolean (one of {', '.join(BOOLEAN_WORDS)})")
    return BOOLEAN_WORDS[word]


# properties that set a DAINRConfig field of another name (property, field, type)
FIT_PROPERTIES = (("steps", "max_steps", integer), ("max_seconds", "max_seconds", float), ("features", "use_features", boolean),
                  ("check_memory", "check_memory", boolean), ("holdout_spokes", "holdout_spokes", integer),
                  ("cap_grid_ratio", "cap_grid_ratio", float), ("frames_per_step", "frames_per_step", integer),
                  ("lr", "lr", float))
PROPERTIES = ("device", "seed", "sr_ratio", "down_ratio", *(p for p, _, _ in FIT_PROPERTIES), "preview",
              "preview_steps", "image_series_index", "preview_series_index", "output", "max_buffer_mb",
              "spokes_per_frame", "golden_angle")


def options_from_properties(props: Dict[str, str]) -> GadgetOptions:
    """Typed options; a bad value or an unknown name (a misspelt ``step`` would run the default budget) raises
    ValueError naming the property."""
    unknown = sorted(set(props) - set(PROPERTIES))
    if unknown:
        raise ValueError(f"unknown property {', '.join(map(repr, unknown))}; the DA-INR gadget takes "
                         f"{', '.join(PROPERTIES)}")

    def get(name, cast, default=None):
        if name not in props:
            return default
        try:
            return cast(props[name])
        except (TypeError, ValueError) as exc:
            raise ValueError(f"property {name}={props[name]!r}: {exc}") from exc

    changes = dict(device=get("device", str, "auto"), seed=get("seed", integer, 0),
                   spatial_ratio=get("sr_ratio", float, 1.0), temporal_ratio=get("down_ratio", integer, 1))
    for prop, field, cast in FIT_PROPERTIES:
        if prop in props:
            changes[field] = get(prop, cast)
    preview, preview_steps = get("preview", boolean, False), get("preview_steps", integer, 50)
    if preview_steps < 1:
        raise ValueError(f"property preview_steps={preview_steps}: must be >= 1")
    if preview:
        changes["preview_every"] = preview_steps
    series = get("image_series_index", lambda v: series_index(integer(v)), 1)
    output = get("output", str, "magnitude")
    if output not in ("magnitude", "complex"):
        raise ValueError(f"property output={output!r}: must be magnitude or complex")
    max_buffer_mb = get("max_buffer_mb", float, 2048.0)
    if not max_buffer_mb > 0:
        raise ValueError(f"property max_buffer_mb={max_buffer_mb}: must be > 0")
    preview_series = get("preview_series_index", lambda v: series_index(integer(v)), series + 100)
    if preview and preview_series > 0xFFFF:
        raise ValueError(f"property preview_series_index: the default image_series_index + 100 = {preview_series} "
                         "is above 65535; set it")
    if preview and preview_series == series:
        raise ValueError(f"property preview_series_index={preview_series} is the image_series_index: the preview "
                         "and the final images would be one series")
    golden = get("golden_angle", lambda v: angle_step(v) and v)  # "true" or "reference"
    return GadgetOptions(DAINRConfig().replace(**changes), get("spokes_per_frame", integer), series, preview,
                         preview_series, output, max_buffer_mb, golden)


class PeerGone(ConnectionError):
    """Sending failed: Gadgetron (or the client behind it) has gone, so no later slice would reach anyone."""


def send_error(connection, text: str) -> None:
    """ERROR message (id 8: uint64 length + text), which Gadgetron turns into a RemoteError; gadgetron-python
    has no writer for it."""
    connection.socket.write(error_frame(text).raw)


# what a buffered readout holds besides its samples and acq.traj: its header and the Python objects around them
READOUT_OVERHEAD = 1024


def readout_bytes(acq) -> int:
    return acq.data.nbytes + acq.traj.nbytes + READOUT_OVERHEAD


class SliceBuffers:
    """Readouts per (slice, contrast, repetition, set), plus the noise scan, within ``max_bytes`` in all.

    A readout that would take the total over ``max_bytes`` drops the buffer that has waited longest for a readout
    (a slice whose end never came), or its own when no other is left; a dropped key's further readouts are only
    counted, and :meth:`pop` reports the count when the key is flushed, so the loss reaches the client as an ERROR
    instead of exhausting the gadget's memory.
    """

    def __init__(self, max_bytes: float = float("inf"), last_average: int = 0):
        self.last_average = last_average  # averages are one cine: a slice ends with its last average's last readout
        self.noise: List[np.ndarray] = []
        self.noise_dwell_us = 0.0  # the noise scan's sample_time_us (its first readout's)
        self.buffers: Dict[Key, list] = {}
        self.max_bytes, self.used = max_bytes, 0
        self.dropped: Dict[Key, int] = {}
        self.noise_dropped = 0  # noise readouts past the cap (prewhitening uses those before it)

    def add(self, acq) -> Optional[Key]:
        """Buffer one readout; returns its key when it closes the slice."""
        if acq.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
            if self.used + acq.data.nbytes > self.max_bytes:
                self.noise_dropped += 1
            else:
                self.noise_dwell_us = self.noise_dwell_us or float(acq.sample_time_us)
                self.noise.append(acq.data.copy())
                self.used += acq.data.nbytes
            return None
        key, size = acquisition_key(acq), readout_bytes(acq)
        while key not in self.dropped and self.used + size > self.max_bytes:
            # the buffers are in the order they last grew: the first other one is the stalest (its own if alone)
            stalest = next((k for k in self.buffers if k != key), key)
            self.dropped[stalest] = len(self.pop(stalest)[0])
        if key in self.dropped:
            self.dropped[key] += 1
        else:
            self.buffers[key] = self.buffers.pop(key, [])  # to the end of the order
            self.buffers[key].append(acq)
            self.used += size
        return key if ends_cine(acq, self.last_average) else None

    def pop(self, key: Key) -> Tuple[list, int]:
        """The key's buffered readouts and how many of its readouts were dropped at the memory cap."""
        acqs = self.buffers.pop(key, [])
        self.used -= sum(map(readout_bytes, acqs))
        return acqs, self.dropped.pop(key, 0)

    def keys(self) -> List[Key]:
        return list(self.buffers) + [k for k in self.dropped if k not in self.buffers]


def reconstruct_slice(connection, key: Key, acqs: list, params: ReconParameters, opts: GadgetOptions,
                      noise: Optional[torch.Tensor], report: Callable[[str], None], noise_dwell_us: float = 0.0) -> None:
    """Reconstruct one buffered slice and send its frames (and a preview series when enabled)."""
    s, contrast, rep, set_index = key
    t0 = time.perf_counter()
    raw = slice_from_acquisitions(acqs, params, noise, s, noise_dwell_us)
    for note in raw.warnings:
        report(f"DA-INR {note}")
    data = raw.data.every_rth_frame(opts.cfg.temporal_ratio)  # fit every r-th frame, query all
    sent_preview = []

    acquired = opts.cfg.temporal_layout(data.n_frames)[0]  # the output frames the fit sees (all, without ×r)

    def emit(images, series, history, provenance=None):
        for im in make_images(images.numpy(), series, s, params.fov_mm, raw.geometry, opts.output,
                              comment="DA-INR" if series == opts.series else "DA-INR preview", history=history,
                              repetition=rep, contrast=contrast, set_index=set_index, first_phase=raw.first_phase,
                              time_stamps=raw.time_stamps, measurement_uid=raw.measurement_uid,
                              strides=params.strides, acquired_frames=acquired, provenance=provenance):
            try:
                connection.send(im)
            except OSError as exc:
                raise PeerGone(f"slice {s}'s images could not be sent ({exc}): the connection is gone") from exc

    def on_progress(progress):
        if progress.preview and not sent_preview:  # one preview series: later ones are not rendered
            emit(progress.images, opts.preview_series, [f"DA-INR preview at step {progress.step}"])
            sent_preview.append(time.perf_counter() - t0)
            log.info("slice %s: preview sent %.2f s after the last readout", key, sent_preview[0])

    # other CPU fits on this host (other slices' gadget processes, other clients) share the cores
    result = reconstruct_shared(data, opts.cfg, callback=on_progress if opts.preview else None)
    info = result.info
    emit(result.images, opts.series, [fit_history(info, time.perf_counter() - t0, len(result.images), acquired,
                                                  raw.data.matrix)],
         fit_provenance(opts.cfg, info, opts.spokes_per_frame, opts.golden_angle))
    log.info("slice %s: %d frames sent %.2f s after the last readout", key, len(result.images), time.perf_counter() - t0)


def _pass_through(connection, report: Callable[[str], None], imaging: int = 0, noise: int = 0,
                  error: str = "the configuration error") -> None:
    """After an error that stops every reconstruction (``imaging`` and ``noise`` readouts received so far): what
    the gadget would not have consumed passes on, the readouts it would have used are counted in one ERROR."""
    for item in connection:
        if isinstance(item, ismrmrd.Acquisition) and not is_skipped(item):
            if item.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
                noise += 1
            else:
                imaging += 1
        else:
            connection.send(item)
    counts = [f"{imaging} readouts not reconstructed"] * bool(imaging) + [f"{noise} noise readouts not used"] * bool(noise)
    if counts:
        report(f"DA-INR: {' and '.join(counts)} ({error} above)")


def dainr_recon(connection) -> None:
    """Gadget entry point (``<execute name="gadgets.dainr_gadget" target="dainr_recon" type="python"/>``).

    Its ERROR messages (a slice that failed, readouts it could not use) are logged at once but sent when the
    stream has ended, after every image: Gadgetron closes a gadget's input at the gadget's first ERROR
    (``ExternalChannel``), so an ERROR about one slice sent at once would lose every slice after it."""
    errors: List[str] = []

    def report(text: str) -> None:
        log.warning("%s", text)
        errors.append(text)
    try:
        _reconstruct_stream(connection, report)
    finally:
        for text in errors:
            try:
                send_error(connection, text)
            except OSError:  # the connection is gone (each was logged): its own error is the one to raise
                break


def _reconstruct_stream(connection, report: Callable[[str], None]) -> None:
    try:
        opts = options_from_properties(properties(connection.config, connection.raw_bytes.config or b""))
        params = ReconParameters.from_header(connection.header, opts.spokes_per_frame, opts.golden_angle)
    except (ValueError, MRDFormatError) as exc:
        report(f"DA-INR gadget configuration: {exc}")
        _pass_through(connection, report)
        return
    buffers = SliceBuffers(opts.max_buffer_mb * 2 ** 20, params.last_average)
    # the averages of each cine's readouts, buffered and reconstructed: a readout of a cine already reconstructed
    # (a slice index sent again, a converter that numbers slices by position only) starts a second pass
    pending: Dict[Key, set] = {}
    done: Dict[Key, set] = {}

    def flush(key: Key) -> None:
        done.setdefault(key, set()).update(pending.pop(key, ()))
        acqs, dropped = buffers.pop(key)
        if dropped:
            report(f"DA-INR slice {key[0]} (contrast {key[1]}, repetition {key[2]}, set {key[3]}): "
                   f"{dropped} readouts dropped, not reconstructed: the buffered readouts exceeded "
                   f"max_buffer_mb={opts.max_buffer_mb:g} before the slice's last readout")
            return
        if not acqs:
            return
        try:
            reconstruct_slice(connection, key, acqs, params, opts, noise_samples(buffers.noise), report,
                              buffers.noise_dwell_us)
        except PeerGone as exc:  # the readouts still buffered in the socket are nobody's any more: stop
            log.warning("%s; the scan's later slices are not reconstructed", exc)
            raise
        except Exception as exc:  # one slice failing must not lose the others
            # data it cannot use, or a scan too large (the report logs its line): the traceback only for a bug
            log.log(logging.DEBUG if isinstance(exc, (ValueError, MemoryError)) else logging.ERROR,
                    "slice %s failed", key, exc_info=True)
            report(f"DA-INR slice {key[0]} (contrast {key[1]}, repetition {key[2]}, set {key[3]}): {exc}")

    connection.filter(lambda item: isinstance(item, ismrmrd.Acquisition) and not is_skipped(item))
    imaging, late_noise, undeclared_average, repeated = 0, 0, False, set()
    passed_on: Dict[str, int] = {}
    # a radial header without the angle step: if its first usable imaging readout has no acq.traj, every slice
    # would fail, so the ERROR comes at once (an 'other' header: readouts without acq.traj fail slice by slice)
    angle_problem = unknown_angles(params) if params.trajectory in RADIAL_TRAJECTORIES else None
    for acq in connection:
        if acq.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT) and imaging:
            # as Gadgetron's NoiseAdjustGadget: the prewhitener is fixed at the first imaging readout (a noise scan
            # between slices prewhitened only the later ones)
            late_noise += 1
            continue
        if acq.idx.average > params.last_average and not undeclared_average:
            undeclared_average = True
            report(f"DA-INR: readout {acq.scan_counter} is of average {acq.idx.average}, beyond the "
                   f"header's encodingLimits average maximum {params.last_average}: a slice's "
                   "readouts up to each ACQ_LAST_IN_SLICE are reconstructed as a cine of their own "
                   "(declared averages are combined into one)")
        unusable = None
        if acq.number_of_samples == 0:
            unusable = "with 0 samples"
        elif acq.encoding_space_ref != 0 and not acq.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
            unusable = f"of encoding space {acq.encoding_space_ref} (DA-INR reconstructs the header's first)"
        if unusable:  # passed on as a readout the gadget does not use, counted in one ERROR; its flags still count
            passed_on[unusable] = passed_on.get(unusable, 0) + 1
            connection.send(acq)
            key = acquisition_key(acq) if acq.is_flag_set(ismrmrd.ACQ_LAST_IN_SLICE) else None
        else:
            # (a readout it does not use does not fix the prewhitener, as in dainr recon)
            imaging += not acq.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)
            if angle_problem and not acq.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
                if acq.trajectory_dimensions == 0:
                    report(f"DA-INR: {angle_problem}")
                    _pass_through(connection, report, 1, len(buffers.noise) + buffers.noise_dropped, "the error")
                    return
                angle_problem = None  # the readouts carry acq.traj: no angles needed
            if not acq.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
                cine = acquisition_key(acq)
                if acq.idx.average in done.get(cine, ()) and cine not in repeated:
                    repeated.add(cine)
                    report(f"DA-INR slice {cine[0]} (contrast {cine[1]}, repetition {cine[2]}, set {cine[3]}): "
                           f"readout {acq.scan_counter} comes after that cine's last readout; the readouts after "
                           "it are reconstructed as a cine of their own, whose images repeat the first one's "
                           "image_index (give each pass its own repetition, or declare the passes as averages)")
                pending.setdefault(cine, set()).add(acq.idx.average)
            key = buffers.add(acq)
        if key is not None:
            flush(key)
        if acq.is_flag_set(ismrmrd.ACQ_LAST_IN_REPETITION) or acq.is_flag_set(ismrmrd.ACQ_LAST_IN_MEASUREMENT):
            for k in buffers.keys():
                flush(k)
    for k in buffers.keys():  # end of stream: reconstruct whatever is still buffered
        flush(k)
    for what, n in passed_on.items():
        report(f"DA-INR: {n} readouts {what} were passed on, not reconstructed")
    if late_noise:
        report(f"DA-INR: {late_noise} noise readouts after the first imaging readout were not used "
               "(the prewhitening is fixed there, as in Gadgetron's NoiseAdjustGadget)")
    if buffers.noise_dropped:
        report(f"DA-INR: {buffers.noise_dropped} noise readouts past max_buffer_mb="
               f"{opts.max_buffer_mb:g} were dropped; the prewhitening used the first "
               f"{len(buffers.noise)}")
    if not imaging:
        report(f"DA-INR: the stream held no imaging readouts ({len(buffers.noise)} noise readouts): "
               "nothing to reconstruct")
