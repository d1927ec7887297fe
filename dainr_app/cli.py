"""``dainr`` command line: simulate, recon, demo, serve, replay, dicom, gadget-server, bench."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import List, Optional

import numpy as np
import torch

from dainr import DAINRConfig, __version__
from dainr.config import NUFFT_BACKENDS
from dainr.metrics import psnr_ssim

from .host_share import reconstruct_shared
from .pipeline import PIPELINES_DIR, pipeline_text, read_xml_file


def truth_path(raw_path: str) -> str:
    """Where ``dainr simulate`` saves the ground truth for ``raw_path``."""
    return os.path.splitext(raw_path)[0] + "_truth.npz"


def _number(cast, ok, what: str, name: str):
    """An argparse type: ``cast(text)``, which must pass ``ok`` (else: "must be ``what``")."""
    def parse(text: str):
        v = cast(text)
        if not ok(v):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return v

    parse.__name__ = name  # argparse names it when ``cast`` fails: "invalid <name> value"
    return parse


_positive_int = _number(int, lambda v: v >= 1, ">= 1", "positive integer")
_nonnegative_int = _number(int, lambda v: v >= 0, ">= 0", "non-negative integer")
_nonnegative = _number(float, lambda v: 0 <= v < float("inf"), ">= 0 and finite", "non-negative number")
_port = _number(int, lambda v: 0 <= v <= 65535, "a port number, 0..65535", "port")
_ratio = _number(float, lambda v: v >= 1, ">= 1", "ratio")
_fraction = _number(float, lambda v: 0 < v <= 1, "in (0, 1]", "fraction")
_positive = _number(float, lambda v: 0 < v < float("inf"), "> 0 and finite", "positive number")


def _series(text: str) -> int:
    from .mrd import series_index

    try:
        return series_index(int(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _preview_path(text: str) -> str:
    if not text.lower().endswith((".gif", ".png")):
        raise argparse.ArgumentTypeError(f"preview must end in .gif or .png, got {text!r}")
    return text


def cmd_simulate(args) -> int:
    from dainr.sim import simulate

    from .mrd import write_raw

    if args.spokes < 2 or args.frames < 2 or args.coils < 1 or args.slices < 1 or args.matrix < 16:
        raise ValueError("need --matrix >= 16, --frames >= 2, --spokes >= 2 (one is held out by the default "
                         "stopping rule), --coils/--slices >= 1")
    check_output(args.output)
    check_output(truth_path(args.output))
    scans = [simulate(args.matrix, args.frames, args.spokes, args.coils, args.noise, args.golden_angle, args.seed + s,
                      object_supersample=args.object_supersample) for s in range(args.slices)]
    noise = scans[0].data.noise  # None without noise: no noise scan
    write_raw(args.output, [s.data for s in scans], noise=None if noise is None else noise.numpy(),
              golden_angle=args.golden_angle)
    np.savez_compressed(truth_path(args.output), images=np.stack([s.ground_truth for s in scans]),
                        coil_maps=np.stack([s.coil_maps for s in scans]), noise_covariance=scans[0].noise_covariance)
    print(f"wrote {args.output} ({args.slices} slice(s) x {args.frames} frames x {args.spokes} spokes x {args.coils} coils, "
          f"{args.matrix}^2) and ground truth {truth_path(args.output)}")
    return 0


def config_from_args(args) -> DAINRConfig:
    changes = dict(device=args.device, seed=args.seed, spatial_ratio=args.sr_ratio, temporal_ratio=args.down_ratio,
                   progress=not args.quiet, use_deformation=not args.no_deformation,
                   cap_grid_at_matrix=not args.reference_grid, check_memory=not args.no_memory_check)
    for name in ("use_features", "max_steps", "max_seconds", "frames_per_step", "holdout_spokes", "nufft_backend",
                 "cap_grid_ratio", "lr"):
        value = getattr(args, name, None)
        if value is not None:
            changes[name] = value
    if args.reference_grid and args.sr_ratio > 1:
        print(f"dainr {args.command}: warning: --reference-grid with --sr-ratio queries the nearest fitted pixel, as "
              "the reference does: the image sits about half an output pixel off its header position", file=sys.stderr)
    return DAINRConfig().replace(**changes)


def run_recon(raw: str, output: str, cfg: DAINRConfig, series: int = 1, preview: Optional[str] = None,
              output_type: str = "magnitude", truth: Optional[str] = None, group: str = "dataset",
              spokes_per_frame: Optional[int] = None, quiet: bool = False,
              golden_angle: Optional[str] = None, truth_found: bool = False) -> List[dict]:
    """Reconstruct every slice of ``raw``/``group`` into MRD images in ``output``/``group``; returns one summary
    per slice.  ``output`` is replaced only when every slice has been reconstructed.  A ``truth`` whose cines do
    not match the slices is refused before any fit, or, where it was only ``truth_found`` beside the raw file (e.g.
    frames re-binned by ``spokes_per_frame``), left out with a warning."""
    from .mrd import ReconParameters, hdf5_output, read_raw, write_header
    from .preview import write_preview

    inputs = (raw, truth) if truth else (raw,)
    check_output(output, *inputs)
    raw_in_output = raw_groups(output)
    if raw_in_output:  # the whole file is replaced
        raise ValueError(f"{output} holds raw MRD data (group {raw_in_output[0]!r}): it would be replaced by the "
                         "images; choose another output file")
    if preview:
        check_output(preview, *inputs)
        if os.path.realpath(preview) == os.path.realpath(output):
            raise ValueError(f"--preview {preview} is the output file {output}: the preview would replace the images")
    scan = read_raw(raw, group, spokes_per_frame, golden_angle)
    if scan.late_noise:
        print(f"dainr recon: warning: {scan.late_noise} noise readouts after the first imaging readout were not used "
              "(the prewhitening uses the noise scan before it, as the gadget and Gadgetron's NoiseAdjustGadget do)",
              file=sys.stderr)
    for space, n in scan.other_encodings.items():
        print(f"dainr recon: warning: {n} readouts of encoding space {space} were not reconstructed (DA-INR "
              "reconstructs the header's first encoding)", file=sys.stderr)
    if scan.empty_readouts:
        print(f"dainr recon: warning: {scan.empty_readouts} readouts without samples were not reconstructed",
              file=sys.stderr)
    for note in (note for raw_slice in scan.slices.values() for note in raw_slice.warnings):
        print(f"dainr recon: warning: {note}", file=sys.stderr)
    truth_images = None
    if truth:
        try:
            if truth_found and spokes_per_frame is not None:
                own = ReconParameters.from_header(scan.header)  # the frames the file's own binning gives
                if own.frames_from_phase or own.spokes_per_frame != spokes_per_frame:
                    raise ValueError(f"frames re-binned by --spokes-per-frame {spokes_per_frame}: the ground truth "
                                     f"{truth} found beside the raw file is of the file's own frames")
            truth_images = matching_truth(load_truth(truth), scan, truth)
        except ValueError as exc:  # named by the user: refused before any fit; found beside the raw file: left out
            if not truth_found:
                raise
            print(f"dainr recon: warning: {exc}: the images are not scored", file=sys.stderr)
    with hdf5_output(output) as out:  # written onto ``output`` once every slice is reconstructed
        summaries, panels = _recon_slices(scan, out, group, cfg, series, output_type, truth_images, quiet,
                                          dict(spokes_per_frame=spokes_per_frame, golden_angle=golden_angle))
        write_header(out, scan.header_text, group)  # the patient and study, for `dainr dicom`
    if preview:
        write_preview(preview, panels)
    return summaries


def check_folder(path: str, what: str) -> None:
    """A folder to write into (made with its parents where missing): its nearest existing part must be a writable
    folder."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"{what} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path}: folder {existing} is not writable")


def check_output(path: str, *inputs: str) -> None:
    """Before any work: the folder must exist and be writable (the folder of the file a link names: that file is
    replaced), an existing output must not be write-protected, and the output must not be one of the inputs."""
    folder = os.path.dirname(os.path.realpath(path))
    if os.path.isdir(path):
        raise ValueError(f"cannot write {path}: it is a folder")
    if os.path.exists(path) and not os.path.isfile(path):  # a device (/dev/null), a FIFO: it would be replaced
        raise ValueError(f"cannot write {path}: it is not a regular file (a device or a pipe), which the output "
                         "would replace")
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise ValueError(f"cannot write {path}: folder {folder} {'is not writable' if os.path.isdir(folder) else 'does not exist'}")
    # (no write bit at all: refused for root too, who may write anything, as `chmod a-w` says "keep this")
    if os.path.isfile(path) and not (os.access(path, os.W_OK) and os.stat(path).st_mode & 0o222):
        raise ValueError(f"cannot write {path}: it is write-protected (make it writable, or choose another output)")
    check_not_input(path, *inputs)


def check_not_input(path: str, *inputs: str) -> None:
    for src in inputs:
        if os.path.exists(path) and os.path.exists(src) and os.path.samefile(path, src):
            raise ValueError(f"output {path} is the input file {src}: writing it would destroy that input")


def load_truth(path: str) -> np.ndarray:
    try:
        with np.load(path) as npz:  # (a .npy array is no context manager: TypeError)
            images = npz["images"] if "images" in npz else None
    except Exception as exc:  # a damaged file fails in zipfile, zlib, numpy's header parser, ...: all the same here
        raise ValueError(f"{path} is not a ground truth written by `dainr simulate` (an .npz with an 'images' "
                         f"array): {exc}") from None
    if images is None or images.ndim != 4:
        raise ValueError(f"{path} has no 'images' array of (slices, frames, N, N) (a ground truth written by "
                         "`dainr simulate` has)")
    return images


def matching_truth(images: np.ndarray, scan, path: str) -> np.ndarray:
    """``images`` if it holds a (frames, N, N) cine for every slice of ``scan``, which the images are scored
    against; else a ValueError saying where it differs."""
    bad = []
    # by key: a slice index can have several cines (repetitions, contrasts), each held against that slice's truth
    for (s, *_), raw_slice in sorted(scan.slices.items(), key=lambda item: item[0]):
        want = (raw_slice.data.n_frames, scan.matrix, scan.matrix)
        got = tuple(images[s].shape) if s < len(images) else None
        if got != want:
            bad.append(f"slice {s} has {want[0]} frames of {want[1]}×{want[2]}, the truth "
                       + (f"{got[0]} frames of {got[1]}×{got[2]}" if got and len(got) == 3 else f"{got or 'none'}"))
    if bad:
        raise ValueError(f"the ground truth {path} does not match the raw data ({bad[0]}; frames re-binned by "
                         "--spokes-per-frame?)")
    return images


def _recon_slices(scan, output, group: str, cfg: DAINRConfig, series: int, output_type: str,
                  truth_images: Optional[np.ndarray], quiet: bool, read_options: dict):
    from .mrd import changed_settings, fit_history, fit_provenance, index_strides, make_images, write_images

    summaries, panels, strides = [], [], index_strides(scan.header)
    for (s, contrast, repetition, set_index), raw_slice in scan.slices.items():
        data = raw_slice.data.every_rth_frame(cfg.temporal_ratio)  # the paper's protocol: fit every r-th, query all
        t0 = time.perf_counter()
        result = reconstruct_shared(data, cfg)  # several `dainr recon` at once share the host
        seconds = time.perf_counter() - t0
        info = result.info
        n_out = len(result.images)
        history = [fit_history(info, seconds, n_out, result.acquired_frames, raw_slice.data.matrix)]
        images = make_images(result.images.numpy(), series, s, scan.fov_mm, raw_slice.geometry, output_type,
                             history=history, repetition=repetition, contrast=contrast, set_index=set_index,
                             first_phase=raw_slice.first_phase, time_stamps=raw_slice.time_stamps,
                             measurement_uid=raw_slice.measurement_uid, strides=strides,
                             acquired_frames=result.acquired_frames,
                             provenance=fit_provenance(cfg, info, **read_options))
        write_images(output, images, group)
        summary = dict(slice=s, contrast=contrast, repetition=repetition, set=set_index, frames=len(images), seconds=round(seconds, 2), steps=info["steps"],
                       stop_reason=info["stop_reason"], fit_matrix=info["fit_matrix"],
                       seconds_per_step=round(info["seconds_per_step"], 4),
                       device=info["device"], nufft=info["nufft_backend"], dainr=__version__,
                       config=changed_settings(cfg.to_dict()))
        if truth_images is not None:
            gt = truth_images[s]
            m = psnr_ssim(result.images, gt)
            zf_gt = gt[result.acquired_frames] if cfg.spatial_ratio == 1 else None
            summary.update(psnr=round(m["psnr"], 2), ssim=round(m["ssim"], 4))
            if zf_gt is not None:
                z = psnr_ssim(result.zero_filled, zf_gt)
                summary.update(zero_filled_psnr=round(z["psnr"], 2), zero_filled_ssim=round(z["ssim"], 4))
            panels = [gt, result.zero_filled.numpy(), result.images.numpy()] if not panels else panels
        elif not panels:
            panels = [result.zero_filled.numpy(), result.images.numpy()]
        summaries.append(summary)
        if not quiet:
            print(json.dumps(summary))
    return summaries, panels


def cmd_recon(args) -> int:
    cfg = config_from_args(args)
    truth, found = args.truth, False
    if truth is None and os.path.exists(truth_path(args.raw)):
        truth, found = truth_path(args.raw), True
    run_recon(args.raw, args.output, cfg, args.series, args.preview, args.output_type, truth, args.group,
              args.spokes_per_frame, golden_angle=args.golden_angle, truth_found=found)
    print(f"wrote {args.output}" + (f" and {args.preview}" if args.preview else ""), file=sys.stderr)
    return 0


def cmd_demo(args) -> int:
    """The built-in default job: simulate a small cine, replay it through the embedded server running the
    ``dainr`` pipeline, and leave MRD images, DICOM series, a preview GIF and the quality reached."""
    import importlib
    import threading

    from dainr import zero_filled

    from .dicom import mrd_to_dicom
    from .mrd import changed_settings, processing_history, provenance, read_raw
    from .preview import write_preview
    from .replay import file_items, replay, timing_table
    from .server import Server, ServerOptions

    from dainr.utils import resolve_device

    resolve_device(args.device)  # a bad --device now, not after the simulation and the server's start
    demo_folder(args.outdir)
    server = Server(ServerOptions(port=0))  # loopback, free port; gadget processes start warming up now
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        raw = os.path.join(args.outdir, "raw.h5")
        cmd_simulate(argparse.Namespace(output=raw, matrix=64, frames=12, spokes=13, coils=4, slices=1, noise=0.02,
                                        golden_angle="true", seed=args.seed, object_supersample=1))
        xml = pipeline_text("dainr", steps=args.max_steps, device=args.device)
        header, items = file_items(raw)
        # the metrics' scipy/skimage imports (~1.5 s) happen while this process only waits for images
        # (skimage.metrics loads its submodules lazily, so name the one psnr_ssim uses)
        threading.Thread(target=importlib.import_module, args=("skimage.metrics.simple_metrics",),
                         daemon=True).start()
        res = replay(items, header, ("127.0.0.1", server.port), config_xml=xml)
    finally:
        server.stopping.set()
    if res.errors or 1 not in res.images:
        raise ValueError(f"the server reported: {res.errors or 'no images'}")
    out, gif, dicom = (os.path.join(args.outdir, f) for f in ("images.h5", "preview.gif", "dicom"))
    save_images(res.images, out, "dataset", header)
    written = mrd_to_dicom(res.images, dicom, header)
    frames = np.stack([im.data[0, 0] for im in sorted(res.images[1], key=lambda im: im.image_index)])
    truth = np.load(truth_path(raw))["images"][0]
    zf = zero_filled(next(iter(read_raw(raw).slices.values())).data).numpy()
    write_preview(gif, [truth, zf, frames])
    ours, base = psnr_ssim(frames, truth), psnr_ssim(zf, truth)
    history, made_by = processing_history(res.images[1][0]), provenance(res.images[1][0])
    summary = dict(psnr=round(ours["psnr"], 2), ssim=round(ours["ssim"], 4), zero_filled_psnr=round(base["psnr"], 2),
                   zero_filled_ssim=round(base["ssim"], 4), reconstruction=history,
                   software=made_by["software"], config=changed_settings(made_by["config_fields"]),
                   replay_seconds=round(res.total_seconds, 2), images=res.n_images,
                   dicom_files=sum(len(v) for v in written.values()))
    with open(os.path.join(args.outdir, "metrics.json"), "w") as fh:
        json.dump(summary, fh, indent=2)
    if not args.quiet:
        print(timing_table(res))
    print(f"zero-filled: PSNR {summary['zero_filled_psnr']:.2f} dB  SSIM {summary['zero_filled_ssim']:.3f}")
    print(f"DA-INR     : PSNR {summary['psnr']:.2f} dB  SSIM {summary['ssim']:.3f}  ({history}; replay through "
          f"dainr serve {summary['replay_seconds']} s)")
    print(f"wrote {out} (series " + ", ".join(str(s) for s in sorted(res.images)) + f"), {dicom}/ "
          f"({summary['dicom_files']} DICOM files), {gif} (truth | zero-filled | DA-INR), "
          f"{os.path.join(args.outdir, 'metrics.json')}")
    return 0


DEMO_MARK = ".dainr-demo"  # in a demo's output folder: a later demo may replace what is there


def demo_folder(path: str) -> None:
    """Create ``path``, or take one that is empty or holds an earlier demo's output (marked, or a metrics.json of
    one), which the demo replaces; any other folder (someone's raw.h5, metrics.json) is refused."""
    check_folder(path, "demo output")
    if os.path.isdir(path) and os.listdir(path) and not os.path.exists(os.path.join(path, DEMO_MARK)):
        try:
            with open(os.path.join(path, "metrics.json"), encoding="utf-8") as fh:
                earlier = {"psnr", "reconstruction", "replay_seconds"} <= set(json.load(fh))
        except (OSError, ValueError, TypeError):
            earlier = False
        if not earlier:
            raise ValueError(f"{path} holds files that are not an earlier demo's output (the demo writes raw.h5, "
                             "images.h5, dicom/, preview.gif and metrics.json there): give a new or empty folder")
    os.makedirs(path, exist_ok=True)
    open(os.path.join(path, DEMO_MARK), "w").close()


def cmd_dicom(args) -> int:
    from .dicom import mrd_to_dicom
    from .mrd import read_header_text, read_images

    check_folder(args.outdir, "DICOM output")  # (a read-only file system: a raw OSError after reading the images)
    images = read_images(args.images, args.group)
    if not images:
        raise ValueError(f"{args.images} has no image_<series> groups in {args.group!r}")
    written = mrd_to_dicom(images, args.outdir, read_header_text(args.images, args.group))
    for series, paths in written.items():
        print(f"series {series}: {len(paths)} files in {os.path.dirname(paths[0]) if paths else args.outdir}")
    return 0


def cmd_gadget_server(args) -> int:
    import logging
    import signal

    from gadgets.resident import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def stop(signum, _frame):  # `docker stop`, systemd: a logged exit 0 (a scan being fitted is abandoned)
        logging.getLogger("dainr.gadget").info("DA-INR gadget stopped by %s", signal.Signals(signum).name)
        raise SystemExit(0)
    signal.signal(signal.SIGTERM, stop)
    serve(args.port, args.connections, args.start_timeout, args.host)
    return 0


def server_options(args):
    from .pipeline import Policy
    from .protocol import Limits
    from .server import ServerOptions

    policy = Policy(modules=("gadgets", *args.allow_module), connect_hosts=Policy().connect_hosts + tuple(args.allow_connect))
    if not os.path.isdir(args.pipelines):
        raise ValueError(f"pipelines folder {args.pipelines} does not exist")
    return ServerOptions(host=args.host, port=args.port, pipelines=os.path.abspath(args.pipelines), policy=policy,
                         limits=Limits(max_message=args.max_message_mb << 20), max_connections=args.max_connections,
                         buffer_bytes=args.buffer_mb << 20, idle_timeout=args.idle_timeout, launcher=args.launcher,
                         local_channels=args.local_channels, config_timeout=args.config_timeout,
                         max_gadgets=args.max_gadgets)


def raise_open_file_limit() -> None:
    """A server's sessions hold sockets, pipes and gadget processes: the soft limit of open files (often 1024) up
    to the hard one (whose descriptors poll() handles; nothing here uses select())."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError) as exc:  # (e.g. above a system's per-process maximum): serve with what it has
            print(f"dainr serve: open-file limit stays {soft} ({exc})", file=sys.stderr)


def cmd_serve(args) -> int:
    import contextlib
    import logging
    import signal

    from .pipeline import PipelineError, load_named, parse_pipeline
    from .server import Server, Terminated, run_stream

    # SIGHUP too: the terminal that started the server closed, its ssh session dropped (it killed the server with
    # every session in flight, no ERROR, no CLOSE, the forkserver's socket folder left behind)
    # (not where it is ignored: `nohup dainr serve` keeps serving when its terminal closes)
    stop_signals = (signal.SIGINT, signal.SIGTERM) + \
        ((signal.SIGHUP,) if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN else ())

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    given = [flag for flag, value in (("-c", args.config), ("-i", args.input), ("-o", args.output)) if value]
    if given and not args.from_stream:
        raise ValueError(f"{'/'.join(given)} only go with --from_stream (a TCP server takes its pipeline from each "
                         "client's CONFIG)")
    opts = server_options(args)
    raise_open_file_limit()
    if args.from_stream:
        if not args.config:
            raise ValueError("--from_stream needs -c PIPELINE (a name in the pipelines folder or an XML file)")
        try:
            if os.path.isfile(args.config):
                pipeline = parse_pipeline(read_xml_file(args.config), opts.policy, args.config)
            else:
                pipeline = load_named(args.config, opts.policy, opts.pipelines)
        except PipelineError as exc:
            raise ValueError(str(exc)) from exc

        def terminate(signum, _frame):
            raise Terminated(signal.Signals(signum).name)

        for sig in stop_signals:
            signal.signal(sig, terminate)
        for given_file, stream, name, flag in ((args.input, sys.stdin, "input", "-i"),
                                               (args.output, sys.stdout, "output", "-o")):
            if not given_file and stream is None:
                raise ValueError(f"standard {name} is closed: give {flag} FILE")
        if args.output:  # (a FIFO or /dev/stdout is fine: the stream is written into it, not replaced)
            check_not_input(args.output, *[args.input] * bool(args.input))
        with contextlib.ExitStack() as files:
            inp = files.enter_context(open(args.input, "rb")) if args.input else sys.stdin.buffer
            outp = files.enter_context(open(args.output, "wb")) if args.output else sys.stdout.buffer
            return run_stream(pipeline, inp, outp, opts)
    server = Server(opts)  # (it logs "listening on" once serving, after these handlers are in place)
    for sig in stop_signals:
        signal.signal(sig, lambda *_: server.stopping.set())
    server.serve_forever()
    return 0


def cmd_replay(args) -> int:
    from .replay import ServerUnreachable

    try:
        return _replay(args)
    except ServerUnreachable as exc:  # the server's side (exit 1), not the input's (2)
        print(f"dainr replay: server error: {exc}", file=sys.stderr)
        return 1


def _replay(args) -> int:
    from .protocol import ProtocolError
    from .replay import ReplayResult, file_items, query, replay, timing_table

    queries = list(dict.fromkeys((["gadgetron::info"] if args.info else []) + (args.query or [])))  # (each once)
    query_failed = False
    if queries:
        try:
            answers, errors = query((args.address, args.port), queries, args.timeout)
        except ProtocolError as exc:
            print(f"dainr replay: server error: {exc}", file=sys.stderr)
            return 1
        for q in queries:
            if q in answers:
                print(answers[q] if len(queries) == 1 else f"{q}: {answers[q]}")
        for text in errors:
            print(f"dainr replay: server error: {text}", file=sys.stderr)
        query_failed = bool(errors)
        if args.raw is None:
            return 1 if query_failed else 0
    if args.raw is None:
        raise ValueError("give a raw MRD file to replay (or -Q / --query to only ask the server)")
    check_output(args.output, args.raw)
    check_image_group(args.output, args.out_group)
    if args.dicom:  # before the session, not after a scan's whole reconstruction
        check_folder(args.dicom, "--dicom")
    if args.config and args.config_local:
        raise ValueError("give a pipeline name on the server (-c) or a local pipeline XML (-C), not both")
    config_xml = None
    if args.config_local:
        config_xml = read_xml_file(args.config_local)  # (a PipelineError is a ValueError)
        if not config_xml.strip():
            raise ValueError(f"{args.config_local}: the pipeline XML file is empty")
    header, items = file_items(args.raw, args.in_group)
    res, interrupted = ReplayResult(), False
    try:
        replay(items, header, (args.address, args.port), None if config_xml else args.config or "dainr",
               config_xml, timeout=args.timeout, result=res)
    except KeyboardInterrupt:  # the images received so far are kept
        interrupted = True
        print(f"dainr replay: interrupted after {res.n_images} images; writing those", file=sys.stderr)
    save_images(res.images, args.output, args.out_group, header)
    print(f"sent {res.sent} messages ({res.readouts} readouts) in {res.send_seconds:.2f} s; received "
          f"{res.n_images} images in {len(res.images)} series"
          + (f" and {res.returned} other messages" if res.returned else "") + f" in {res.total_seconds:.2f} s")
    if res.images:
        print(f"wrote {args.output} (group {args.out_group}: "
              + ", ".join(f"image_{s} x{len(v)}" for s, v in sorted(res.images.items())) + ")")
    if not args.quiet:
        print(timing_table(res))
    if args.dicom and res.images:
        from .dicom import mrd_to_dicom

        written = mrd_to_dicom(res.images, args.dicom, header)  # the raw data's patient and study
        print("wrote DICOM: " + ", ".join(f"series {s}: {len(p)} files" for s, p in sorted(written.items()))
              + f" under {args.dicom}")
    for text in res.errors:
        if text != res.input_error:
            print(f"dainr replay: server error: {text}", file=sys.stderr)
    if res.input_error:  # the file's fault, not the server's
        print(f"dainr replay: error: {args.raw}: {res.input_error}", file=sys.stderr)
        return 2
    if interrupted:
        return 130
    return 1 if res.errors or query_failed else 0


def check_image_group(path: str, group: str) -> None:
    """``save_images`` replaces ``group`` of ``path`` and keeps the file's other groups: refuse where that group holds
    raw acquisitions, or where ``path`` exists but is not an HDF5 file (found only once the images had come)."""
    import h5py

    if os.path.isfile(path) and not h5py.is_hdf5(path):
        raise ValueError(f"{path} exists and is not an HDF5 file: the images are added to an MRD (HDF5) file; "
                         "remove it or choose another output file")
    if group in raw_groups(path):
        raise ValueError(f"group {group!r} of {path} holds raw MRD data (acquisitions): choose another output "
                         "group (-G) or file; it would be replaced by the images")


def raw_groups(path: str) -> List[str]:
    """The groups of an existing HDF5 file that hold MRD acquisitions ([] for no file, or not HDF5)."""
    import h5py

    if not os.path.isfile(path) or not h5py.is_hdf5(path):
        return []
    with h5py.File(path, "r") as h5:
        return [name for name, g in h5.items() if isinstance(g, h5py.Group) and "data" in g]


def save_images(images: dict, path: str, group: str, header: Optional[str] = None) -> None:
    """Write received images to ``path``/``group``/image_<series>, replacing that group if it exists, with the raw
    data's MRD ``header`` (the patient and study, for `dainr dicom`)."""
    import h5py

    from .mrd import hdf5_output, write_header, write_images

    if not images:
        return
    check_image_group(path, group)
    with hdf5_output(path, keep=True) as out:
        with h5py.File(out, "a") as h5:
            if group in h5:
                del h5[group]
        write_images(out, [im for series in sorted(images) for im in images[series]], group)
        write_header(out, header, group)


def cmd_bench(args) -> int:
    from .bench import main as bench_main

    return bench_main(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dainr", description="DA-INR dynamic MRI reconstruction")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("simulate", help="write a simulated golden-angle radial cine as MRD raw data")
    s.add_argument("-o", "--output", required=True, help="MRD raw file to write (the ground truth goes beside it, "
                                                          "<name>_truth.npz)")
    s.add_argument("--matrix", type=int, default=64, help="image matrix N (N x N; default 64)")
    s.add_argument("--frames", type=int, default=12, help="cine frames (default 12)")
    s.add_argument("--spokes", type=int, default=13, help="spokes per frame (default 13)")
    s.add_argument("--coils", type=int, default=4, help="receive coils (default 4)")
    s.add_argument("--slices", type=int, default=1, help="slices, each its own simulated cine (default 1)")
    s.add_argument("--noise", type=_nonnegative, default=0.02, help="noise std relative to k-space RMS (default 0.02)")
    s.add_argument("--golden-angle", choices=("true", "reference"), default="true",
                   help="true: 111.246° steps (default); reference: the released code's 111.246-radian step")
    s.add_argument("--seed", type=_nonnegative_int, default=0,
                   help="phantom, coil maps and noise (default 0; slice k: seed + k)")
    s.add_argument("--object-supersample", type=_positive_int, default=1, metavar="S",
                   help="k-space from the phantom on an S times finer grid, the truth its S x S block mean (default 1: "
                        "the reconstruction's own operator on the N x N phantom, the paper's inverse crime)")
    s.set_defaults(func=cmd_simulate)

    r = sub.add_parser("recon", help="reconstruct an MRD raw file into MRD images")
    r.add_argument("raw", help="ISMRMRD raw data file (.h5)")
    r.add_argument("-o", "--output", required=True, help="MRD image file to write (replaced once every slice is done)")
    r.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N (default auto)")
    r.add_argument("--steps", "--max-steps", dest="max_steps", type=_positive_int,
                   help=f"most optimisation steps (default {DAINRConfig.max_steps}; the held-out rule stops earlier)")
    r.add_argument("--max-seconds", type=_positive, help="stop fitting after this many seconds (default: no limit)")
    r.add_argument("--frames-per-step", type=_positive_int, help="frames per optimisation step (default "
                   f"{DAINRConfig().batch_frames('cpu')} on the CPU, {DAINRConfig().batch_frames('cuda')} on CUDA)")
    r.add_argument("--lr", type=_positive, help=f"initial learning rate (default {DAINRConfig.lr:g})")
    r.add_argument("--holdout-spokes", type=_nonnegative_int, help=f"spokes per frame held out for the stopping rule (default "
                                                      f"{DAINRConfig.holdout_spokes}; 0: a fixed budget of --steps)")
    r.add_argument("--sr-ratio", type=_ratio, default=1.0,
                   help="spatial interpolation: fit at N/ratio, query N (default 1: none)")
    r.add_argument("--down-ratio", type=_positive_int, default=1,
                   help="temporal interpolation: fit every r-th frame, query all (default 1: none)")
    r.add_argument("--nufft-backend", choices=NUFFT_BACKENDS,
                   help="default auto: finufft on the CPU when installed, else gather (our gridding)")
    r.add_argument("--golden-angle", choices=("true", "reference"),
                   help="angle step for readouts without acq.traj (default: the header's; a goldenangle header "
                        "without one: the true golden angle)")
    r.add_argument("--features", dest="use_features", action=argparse.BooleanOptionalAction,
                   help="the reference's frozen CNN features of the neighbouring frames (default: off, see README)")
    r.add_argument("--no-deformation", action="store_true",
                   help="a plain grid INR without the deformation MLP (the paper's ablation baseline)")
    r.add_argument("--no-memory-check", action="store_true",
                   help="fit even when the estimated peak memory exceeds what the device has available")
    r.add_argument("--reference-grid", action="store_true",
                   help="the reference's grid (finest level 2048 whatever the matrix) instead of capping it below")
    r.add_argument("--cap-grid-ratio", type=_fraction,
                   help="the capped grid's finest level as a fraction of the fitting matrix (default 0.75; 1 = the matrix)")
    r.add_argument("--preview", type=_preview_path, help="write a .gif/.png preview")
    r.add_argument("--series", type=_series, default=1, help="output image_series_index (0..65535; default 1)")
    r.add_argument("--output-type", choices=("magnitude", "complex"), default="magnitude",
                   help="image type (default magnitude)")
    r.add_argument("--truth", help="ground truth .npz (default: <raw>_truth.npz when present)")
    r.add_argument("--group", default="dataset",
                   help="the raw file's group; the images go to the same group (default dataset)")
    r.add_argument("--spokes-per-frame", type=_positive_int,
                   help="frames of N spokes in acquisition order (overrides the header's phase range)")
    r.add_argument("--seed", type=_nonnegative_int, default=0,
                   help="the network's initial weights, frame order and held-out spokes (default 0)")
    r.add_argument("--quiet", action="store_true", help="no progress bar (the per-slice JSON lines stay)")
    r.set_defaults(func=cmd_recon)

    d = sub.add_parser("demo", help="simulate a small cine, replay it through the embedded server, write MRD "
                                    "images, DICOM, preview and metrics")
    d.add_argument("-o", "--outdir", default="dainr-demo", help="output folder, new, empty or an earlier demo's, "
                   "whose files it replaces (default dainr-demo)")
    d.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N (default auto)")
    d.add_argument("--max-steps", "--steps", dest="max_steps", type=_positive_int, default=300,
                   help="fit budget (default 300, inside the 30 s target on 2 CPU cores; the held-out rule alone "
                        "stops this small cine after about 1000 steps, about 15 s: README, Performance)")
    d.add_argument("--seed", type=_nonnegative_int, default=0, help="the simulated scan's seed (default 0)")
    d.add_argument("--quiet", action="store_true",
                   help="no per-slice timing table (the gadget's log lines stay on stderr)")
    d.set_defaults(func=cmd_demo)

    dc = sub.add_parser("dicom", help="convert an MRD image file to DICOM (one folder per series)")
    dc.add_argument("images", help="MRD image file (from recon or replay)")
    dc.add_argument("-o", "--outdir", required=True, help="folder for series_<n>/ subfolders")
    dc.add_argument("--group", default="dataset", help="the images' group in the file (default dataset)")
    dc.set_defaults(func=cmd_dicom)

    g = sub.add_parser("gadget-server", help="resident DA-INR gadget for <connect port=.../> pipelines")
    g.add_argument("-p", "--port", type=_port, default=18000, help="port to listen on (0: a free one, logged; default 18000)")
    g.add_argument("--host", default="", help="address to listen on (default: every interface, as gadgetron-python, "
                   "for a Gadgetron on another host; 127.0.0.1: this host only)")
    g.add_argument("--connections", type=_positive_int, help="exit after this many connections, scans or not (one "
                   "closed by --start-timeout counts; default: serve forever)")
    g.add_argument("--start-timeout", type=_positive, default=60.0,
                   help="seconds a connection may take to send CONFIG and HEADER before it is closed (default 60)")
    g.set_defaults(func=cmd_gadget_server)

    sv = sub.add_parser("serve", help="Gadgetron-protocol server running the XML pipelines (or --from_stream)")
    sv.add_argument("-p", "--port", type=_port, default=9002, help="port to listen on (0: a free one, printed; default 9002)")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    sv.add_argument("--pipelines", default=PIPELINES_DIR, help=f"folder CONFIG_FILE names resolve in (default {PIPELINES_DIR})")
    sv.add_argument("--allow-module", action="append", default=[], metavar="MODULE",
                    help="also allow <execute> of this Python package (default: gadgets only)")
    sv.add_argument("--allow-connect", action="append", default=[], metavar="HOST",
                    help="also allow <connect> to this host (default: localhost)")
    sv.add_argument("--max-connections", type=_positive_int, default=8,
                    help="sessions at once (default 8); more get an ERROR 'server busy'")
    sv.add_argument("--buffer-mb", type=_positive_int, default=512,
                    help="per session, data queued ahead of a gadget (default 512)")
    sv.add_argument("--local-channels", type=_positive_int, default=8,
                    help="<distributed> without workers: at most this many local chains; further index values share "
                         "them (default 8)")
    sv.add_argument("--max-message-mb", type=_positive_int, default=256,
                    help="largest accepted data message (default 256)")
    sv.add_argument("--idle-timeout", type=_positive, default=600.0,
                    help="seconds a client's next message may take to arrive whole before its session ends (default 600)")
    sv.add_argument("--config-timeout", type=_positive, default=30.0,
                    help="seconds a client may take to send its CONFIG and HEADER (it holds a session slot; default 30)")
    sv.add_argument("--max-gadgets", type=_positive_int, default=32,
                    help="gadget processes and connections one session may open (nested <distributed> blocks; "
                         "default 32)")
    sv.add_argument("--launcher", choices=("fork", "spawn"), default="fork",
                    help="fork: gadgets forked from a warm forkserver (default); spawn: `python -m gadgetron` per gadget")
    sv.add_argument("--from_stream", "--from-stream", action="store_true",
                    help="MRD stream on stdin (or -i), images on stdout (or -o), like gadgetron --from_stream")
    sv.add_argument("-c", "--config", help="--from_stream: pipeline name or XML file")
    sv.add_argument("-i", "--input", help="--from_stream: input stream file (default stdin)")
    sv.add_argument("-o", "--output", help="--from_stream: output stream file (default stdout)")
    sv.set_defaults(func=cmd_serve)

    rp = sub.add_parser("replay", help="stream an MRD raw file through a Gadgetron-protocol server, save the images")
    rp.add_argument("raw", nargs="?", help="MRD raw file (optional with -Q / --query)")
    rp.add_argument("-a", "--address", default="localhost", help="server host (default localhost)")
    rp.add_argument("-p", "--port", type=_port, default=9002, help="server port (default 9002)")
    rp.add_argument("-c", "--config", help="pipeline name on the server, sent as CONFIG_FILE (default dainr: "
                                           "pipelines/dainr.xml on our server)")
    rp.add_argument("-C", "--config-local", help="local pipeline XML sent as CONFIG_TEXT (instead of -c)")
    rp.add_argument("-o", "--output", default="out.h5", help="MRD file the images go to (default out.h5)")
    rp.add_argument("-g", "--in-group", default="dataset", help="the raw data's group (default dataset)")
    rp.add_argument("-G", "--out-group", default="dataset", help="the images' group in the output (default dataset)")
    rp.add_argument("--dicom", metavar="DIR", help="also write the images as DICOM series under DIR")
    rp.add_argument("--timeout", type=_positive, default=600.0, help="seconds to wait for the server (default 600)")
    rp.add_argument("--quiet", action="store_true", help="no per-slice timing table")
    rp.add_argument("-Q", "--info", action="store_true", help="print the server's gadgetron::info (QUERY)")
    rp.add_argument("--query", action="append", metavar="KEY",
                    help="ask the server a QUERY key, e.g. dainr::pipelines, gadgetron::version (repeatable)")
    rp.set_defaults(func=cmd_replay)

    b = sub.add_parser("bench", help="quality/speed benchmarks (a JSON line per case, and results.json)")
    from .bench import add_arguments

    add_arguments(b)
    b.set_defaults(func=cmd_bench)
    return p


class _Stdout:
    """Standard output for a command whose work is its files: a reader that went away (``dainr recon … | head
    -n1``) stops the printing, not the command (the rest goes to /dev/null), and a character the terminal's
    encoding lacks (a file name under ``PYTHONIOENCODING=ascii``) is printed escaped."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            try:
                return self._stream.write(text)
            except UnicodeEncodeError:
                encoding = self._stream.encoding or "ascii"
                return self._stream.write(text.encode(encoding, "backslashreplace").decode(encoding))
        except BrokenPipeError:
            self._reader_gone()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._reader_gone()

    def _reader_gone(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())  # (what is still buffered is flushed there)
        os.close(devnull)
        self._stream.flush()

    def __getattr__(self, name):
        return getattr(self._stream, name)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    stdout = sys.stdout
    if stdout is not None:
        sys.stdout = _Stdout(stdout)
    try:
        return args.func(args)
    except (ValueError, OSError, MemoryError) as exc:  # bad files and arguments: a clear message, no traceback
        print(f"dainr {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # torch's allocators: out of memory past the preflight's estimate
        text = str(exc).strip()
        if not (isinstance(exc, torch.OutOfMemoryError) or "can't allocate memory" in text):
            raise
        first = text.splitlines()[0] if text else type(exc).__name__
        print(f"dainr {args.command}: error: out of memory: {first}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line, the shell's exit status for SIGINT
        print(f"dainr {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if stdout is not None:
            sys.stdout.flush()
            sys.stdout = stdout


if __name__ == "__main__":
    sys.exit(main())
