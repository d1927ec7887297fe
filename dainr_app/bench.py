"""Benchmarks: quality vs zero-filled, temporal TV and CG-SENSE, the paper's relative claims, speed and memory.

``dainr bench`` runs every case in its own subprocess (so peak memory is per case), prints each
case's results as a JSON line and writes ``bench-out/results.json``.  ``dainr bench --case NAME`` runs one case.
Cases (``--list`` shows them): the 128² × 23 frames × 8 coils cine at 5/13/21 spokes per frame
(DA-INR, zero-filled, temporal TV and CG-SENSE with λ / the iteration count picked by held-out
spokes and, as an oracle that favours the baseline, against the truth; at 13 also with k-space from a 4× finer
grid, without the inverse crime), the ablations (the full model with
the features, which are off by default; no features; plain grid INR without deformation; also with the
reference's uncapped grid, in the paper's acquisition setting, and under the paper's ground-truth checkpoint
pick), temporal ×2, spatial ×2, the real-anatomy cine from ``../shared/data`` and its ablations (skipped when
absent), the learning-rate sweep (``lr``, over the fit's seeds), the README demo timing, the CPU step's
per-part profile, the server's ingest rate, overhead and concurrency, the memory preflight's estimates
against measured peaks, and on CUDA the 32-coil case, its frames-per-step sweep and its per-part profile.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from typing import Callable, Dict, Optional

import numpy as np
import torch

from dainr import DAINRConfig, __version__, reconstruct, upsample_bilinear
from dainr.baselines import cg_sense, temporal_tv, temporal_tv_holdout_lambda
from dainr.memory import proc_bytes
from dainr.metrics import psnr_ssim
from dainr.sim import simulate

from .bench_server import case_concurrent, case_ingest, case_overhead
from .files import replaced_whole
from .server import ROOT

# beside a source checkout (an installed package cannot know where the checkout is: DAINR_REAL_DATA says)
REAL_DATA = os.environ.get("DAINR_REAL_DATA", os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "cine_real_complex_110x110x10.npy"))
TV_LAMBDAS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.04)
TV_ITERATIONS = (100, 200, 400)  # Chambolle–Pock iteration counts the TV picks choose among (100 alone: not converged)
CG_ITERATIONS = 60


def peak_rss_bytes() -> int:
    """This process's peak resident set size since it started (Linux: ``VmHWM``).  Not ``ru_maxrss``: that
    keeps the high-water mark of the image an ``exec`` replaced, so a child started by a large parent (a
    pytest process holding a CUDA context, say) reports the parent's peak as its own."""
    peak = proc_bytes("/proc/self/status", "VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _dainr(scan, cfg: DAINRConfig, gt=None) -> dict:
    t0 = time.perf_counter()
    res = reconstruct(scan.data, cfg)
    wall = time.perf_counter() - t0
    gt = scan.ground_truth if gt is None else gt
    m = psnr_ssim(res.images, gt)
    info = res.info
    out = dict(psnr=m["psnr"], ssim=m["ssim"], seconds=wall, steps=info["steps"], frame_visits=info["frame_visits"],
               seconds_per_step=info["seconds_per_step"], seconds_prepare=info["seconds_prepare"],
               seconds_fit=info["seconds_fit"], stop_reason=info["stop_reason"], best_step=info["best_step"],
               lr_decays=info["lr_decays"], device=info["device"],
               nufft=info["nufft_backend"], grid=info["grid_backend"])
    if info["memory_estimate_bytes"] is not None:  # the preflight's estimate, to hold against the measured peak
        out["memory_estimate_mb"] = info["memory_estimate_bytes"] / 2**20
    if "peak_gpu_bytes" in info:
        out["peak_gpu_mb"] = info["peak_gpu_bytes"] / 2**20
    return out, res


def _phantom_scan(spokes: int = 13, coils: int = 8, golden_angle: str = "true", object_supersample: int = 1):
    return simulate(128, 23, spokes, coils, noise_level=0.02, golden_angle=golden_angle,
                    object_supersample=object_supersample)


def _real_scan(spokes: int = 13, coils: int = 8, golden_angle: str = "true"):
    return simulate(image=np.load(REAL_DATA), spokes=spokes, coils=coils, noise_level=0.02, golden_angle=golden_angle)


def _real_missing() -> Optional[dict]:
    """The result of a real-cine case when the data file is absent (None when it is there)."""
    return None if os.path.exists(REAL_DATA) else dict(
        skipped=f"{REAL_DATA} not present (DAINR_REAL_DATA=path names the file)")


def _quality(scan) -> dict:
    """DA-INR with the default config, zero-filled, temporal TV and CG-SENSE on one scan."""
    ours, res = _dainr(scan, DAINRConfig(device="auto"))
    zf = psnr_ssim(res.zero_filled, scan.ground_truth)
    return dict(dainr=ours, zero_filled=dict(psnr=zf["psnr"], ssim=zf["ssim"]), **_tv(scan, res.coil_maps),
                **_cg(scan, res.coil_maps))


def _cg(scan, coil_maps) -> dict:
    """CG-SENSE with the iteration count chosen by held-out spokes (ground-truth free) and by the truth (oracle).
    One run on all spokes keeps every iterate; both picks are taken from it."""
    held = cg_sense(scan.data, CG_ITERATIONS, coil_maps=coil_maps, holdout_spokes=1)["holdout_residuals"]
    fair = int(np.argmin(held))
    run = cg_sense(scan.data, CG_ITERATIONS, coil_maps=coil_maps, keep_iterates=True)
    scores = [psnr_ssim(x, scan.ground_truth) for x in run["iterates"]]
    best, best_ssim = (int(np.argmax([s[m] for s in scores])) for m in ("psnr", "ssim"))
    return dict(cg_sense_holdout=dict(psnr=scores[fair]["psnr"], ssim=scores[fair]["ssim"], iterations=fair + 1),
                cg_sense_oracle=dict(psnr=scores[best]["psnr"], ssim=scores[best_ssim]["ssim"], iterations=best + 1,
                                     ssim_iterations=best_ssim + 1),
                cg_sense_seconds=run["seconds"])


def _tv(scan, coil_maps) -> dict:
    """Temporal TV twice, λ and the iteration count (``TV_ITERATIONS``; the iteration count regularises too) chosen by
    held-out spokes (ground-truth free, like DA-INR's stopping) and by the truth (oracle: the best PSNR and the best
    SSIM over every (λ, iterations), each picked on its own, as the paper's protocol picks checkpoints).  One run per
    λ keeps the images at each iteration count."""
    scores = {}
    for lam in TV_LAMBDAS:
        run = temporal_tv(scan.data, lam=lam, iterations=TV_ITERATIONS[-1], checkpoints=TV_ITERATIONS,
                          coil_maps=coil_maps)
        scores.update(((lam, n), psnr_ssim(x, scan.ground_truth)) for n, x in run["iterates"].items())
    best, best_ssim = (max(scores, key=lambda k: scores[k][m]) for m in ("psnr", "ssim"))
    t0 = time.perf_counter()
    fair = temporal_tv_holdout_lambda(scan.data, TV_LAMBDAS, iterations=TV_ITERATIONS, coil_maps=coil_maps)
    search = time.perf_counter() - t0  # the held-out solves for every λ and the final one: the ground-truth-free cost
    fair_score = psnr_ssim(fair["images"], scan.ground_truth)
    return dict(temporal_tv_holdout=dict(psnr=fair_score["psnr"], ssim=fair_score["ssim"], lam=fair["lam"],
                                         iterations=fair["iterations"], seconds=fair["seconds"],
                                         seconds_with_search=search),
                temporal_tv_oracle=dict(psnr=scores[best]["psnr"], ssim=scores[best_ssim]["ssim"], lam=best[0],
                                        iterations=best[1], ssim_lam=best_ssim[0], ssim_iterations=best_ssim[1],
                                        sweep={f"{lam}@{n}": (round(s["psnr"], 2), round(s["ssim"], 3))
                                               for (lam, n), s in scores.items()}))


def case_spokes13() -> dict:
    """Phantom, 13 spokes per frame: DA-INR, zero-filled, temporal TV and CG-SENSE."""
    return _quality(_phantom_scan(13))


def case_spokes13_fine() -> dict:
    """The spokes13 case without the inverse crime: the phantom's k-space from a 4× finer grid (truth: its 4 × 4
    block mean) instead of the reconstruction's own operator on the 128² image."""
    return _quality(_phantom_scan(13, object_supersample=4))


def case_spokes5() -> dict:
    """Phantom, 5 spokes per frame: DA-INR, zero-filled, temporal TV and CG-SENSE."""
    return _quality(_phantom_scan(5))


def case_spokes21() -> dict:
    """Phantom, 21 spokes per frame: DA-INR, zero-filled, temporal TV and CG-SENSE."""
    return _quality(_phantom_scan(21))


ABLATIONS = (("full", dict(use_features=True)),  # the paper's model; features are off by default (DAINRConfig)
             ("no_features", dict(use_features=False)),
             ("plain_grid_inr", dict(use_features=False, use_deformation=False)))


def _ablations(scan, **common) -> dict:
    return {name: _dainr(scan, DAINRConfig(**common, **kw))[0] for name, kw in ABLATIONS}


def case_ablation() -> dict:
    """Full model (with features), no features, plain grid INR on the 128² phantom, 13 spokes."""
    return _ablations(_phantom_scan())


def case_ablation_fine() -> dict:
    """The ablation on the phantom without the inverse crime (k-space from a 4× finer grid)."""
    return _ablations(_phantom_scan(object_supersample=4))


def case_ablation_real() -> dict:
    """Full model, no features, plain grid INR on the real-anatomy cine, 13 spokes."""
    return _real_missing() or _ablations(_real_scan())


def case_ablation_paper() -> dict:
    """The three models in the paper's acquisition setting: 32 coils, the reference's 111.246-radian angle step,
    13 spokes; phantom and real cine."""
    setting = dict(coils=32, golden_angle="reference")
    return dict(phantom=_ablations(_phantom_scan(**setting)), real=_real_missing() or _ablations(_real_scan(**setting)))


def case_ablation_refgrid() -> dict:
    """The three models with the reference's uncapped grid (finest level 2048): phantom and real cine, 13 spokes."""
    out = dict(phantom=_ablations(_phantom_scan(), cap_grid_at_matrix=False))
    out["real"] = _real_missing() or _ablations(_real_scan(), cap_grid_at_matrix=False)
    return out


def case_ablation_paper_refgrid() -> dict:
    """The paper's setting and architecture together: 32 coils, 111.246-radian step, uncapped grid; phantom and
    real cine."""
    setting = dict(coils=32, golden_angle="reference")
    out = dict(phantom=_ablations(_phantom_scan(**setting), cap_grid_at_matrix=False))
    out["real"] = _real_missing() or _ablations(_real_scan(**setting), cap_grid_at_matrix=False)
    return out


SEEDS = (0, 1, 2, 3)


def _spread(values) -> dict:
    """Values over the fit's seeds, their mean and sample s.d. (0 for a single value)."""
    v = np.asarray(values, dtype=float)
    return dict(values=v.tolist(), mean=float(v.mean()), sd=float(v.std(ddof=1)) if len(v) > 1 else 0.0)


def _seeded_ablations(scan, **common) -> dict:
    """The three models fitted with each of :data:`SEEDS` (the data fixed): per seed, mean and s.d. per model,
    and the paired differences full − no features and no features − plain per seed."""
    runs = [_ablations(scan, seed=seed, **common) for seed in SEEDS]
    out = {}
    for metric in ("psnr", "ssim"):
        per = {name: np.array([r[name][metric] for r in runs]) for name, _ in ABLATIONS}
        diffs = {"full - no_features": per["full"] - per["no_features"],
                 "no_features - plain_grid_inr": per["no_features"] - per["plain_grid_inr"]}
        out[metric] = {name: _spread(v) for name, v in {**per, **diffs}.items()}
    return dict(seeds=list(SEEDS), **out)


def case_ablation_seeds() -> dict:
    """The default ablation with the fit's seeds 0–3 (initialisation, frame order, held-out spokes; the data
    fixed) on the phantom and the real cine, 13 spokes: how far apart single fits of one model lie."""
    return dict(phantom=_seeded_ablations(_phantom_scan()), real=_real_missing() or _seeded_ablations(_real_scan()))


def _paper_protocol(scan, cfg: DAINRConfig, steps: int = 1001, every: int = 100) -> dict:
    """The reference's protocol: a fixed budget of 1001 steps on every spoke at its constant learning rate 1e-3
    (nothing held out, so no decay), the images scored against the truth every 100 steps and the best kept: an
    oracle no scanner has.  Like the reference, the best PSNR and the best SSIM are kept apart (they may come
    from different checkpoints)."""
    curve = []

    def score(progress) -> None:
        if progress.preview:
            m = psnr_ssim(progress.images, scan.ground_truth)
            curve.append(dict(step=progress.step, psnr=m["psnr"], ssim=m["ssim"]))

    run = cfg.replace(holdout_spokes=0, max_steps=steps, preview_every=every, lr=1e-3)
    reconstruct(scan.data, run, callback=score)
    best = {m: max(curve, key=lambda c: c[m]) for m in ("psnr", "ssim")}
    return dict(psnr=best["psnr"]["psnr"], psnr_step=best["psnr"]["step"], ssim=best["ssim"]["ssim"],
                ssim_step=best["ssim"]["step"], curve=curve)


def case_ablation_oracle() -> dict:
    """The three models (our default grid) under the reference's protocol: fixed 1001 steps, best of 10 scored
    against the truth; phantom and real cine, 13 spokes."""
    def three(scan):
        return {name: _paper_protocol(scan, DAINRConfig(**kw)) for name, kw in ABLATIONS}
    return dict(phantom=three(_phantom_scan()), real=_real_missing() or three(_real_scan()))


def case_temporal2() -> dict:
    """Temporal ×2 at 21 spokes (the paper's AF 6.1 setting), query all 23 frames: fitting frames 0, 2, …, 22
    (ours), and the reference's protocol, frames 1, 3, …, 21 (frames 0 and 22 then extrapolated); the frames
    between two fitted ones also as the mean of those two (``neighbour_mean_psnr``)."""
    full = _phantom_scan(21)

    def protocol(offset: int) -> dict:
        keep = list(range(offset, 23, 2))
        scan = dataclasses.replace(full, data=full.data.select_frames(keep))
        ours, res = _dainr(scan, DAINRConfig(temporal_ratio=2, temporal_offset=offset, temporal_frames=23),
                           gt=full.ground_truth)
        per = psnr_ssim(res.images, full.ground_truth)["psnr_frames"]
        ends = [i for i in (0, 22) if i < keep[0] or i > keep[-1]]
        between = [i for i in range(23) if i not in keep and i not in ends]
        # the plainest interpolation for comparison: each frame between two fitted ones as their mean
        blend = (res.images[[i - 1 for i in between]] + res.images[[i + 1 for i in between]]) / 2
        ours.update(trained_psnr=float(np.mean([per[i] for i in keep])),
                    interpolated_psnr=float(np.mean([per[i] for i in between])),
                    neighbour_mean_psnr=psnr_ssim(blend, full.ground_truth[between])["psnr"])
        if ends:
            ours.update(extrapolated_psnr=float(np.mean([per[i] for i in ends])))
        return ours
    return dict(ours=protocol(0), reference=protocol(1))


def _spatial2(scan) -> dict:
    """Fit ×2 below the scan's matrix on the k-space centre, query the full matrix; compare with bilinear
    upsampling of our low-resolution fit and of the truth's k-space centre."""
    ours, res = _dainr(scan, DAINRConfig(spatial_ratio=2.0))
    gt = torch.from_numpy(scan.ground_truth)
    N, n = gt.shape[-1], res.lowres_images.shape[-1]
    lo = N // 2 - n // 2
    k = torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(gt, dim=(-2, -1))), dim=(-2, -1))[:, lo:lo + n, lo:lo + n]
    low_gt = torch.fft.fftshift(torch.fft.ifft2(torch.fft.ifftshift(k, dim=(-2, -1))), dim=(-2, -1))
    bil_gt = psnr_ssim(upsample_bilinear(low_gt, N), scan.ground_truth)
    bil_ours = psnr_ssim(upsample_bilinear(res.lowres_images, N), scan.ground_truth)
    return dict(dainr=ours, bilinear_of_dainr=dict(psnr=bil_ours["psnr"], ssim=bil_ours["ssim"]),
                bilinear_of_truth=dict(psnr=bil_gt["psnr"], ssim=bil_gt["ssim"]))


def case_spatial2() -> dict:
    """Spatial ×2 (13 spokes): the phantom fitted at 64² on the k-space centre and queried at 128², and the real
    cine at 56² → 110²; against bilinear upsampling."""
    return dict(phantom=_spatial2(_phantom_scan()), real=_real_missing() or _spatial2(_real_scan()))


def case_real() -> dict:
    """Real-anatomy cine, 13 spokes per frame: DA-INR, zero-filled, temporal TV and CG-SENSE."""
    return _real_missing() or dict(source=os.path.basename(REAL_DATA),
                                   shape=list(np.load(REAL_DATA, mmap_mode="r").shape), spokes13=_quality(_real_scan()))


def case_demo() -> dict:
    """The README's main command workload (64², 12 frames, 4 coils, 13 spokes), library part only."""
    scan = simulate(64, 12, 13, 4, noise_level=0.02)
    ours, res = _dainr(scan, DAINRConfig())
    zf = psnr_ssim(res.zero_filled, scan.ground_truth)
    return dict(dainr=ours, zero_filled=dict(psnr=zf["psnr"], ssim=zf["ssim"]))


def case_gpu32() -> dict:
    """128² × 23 frames × 32 coils × 13 spokes on CUDA: the first reconstruction in the process (it pays the
    CUDA context, library handles and lazy imports) and a second one (what a resident gadget's later scans see)."""
    if not torch.cuda.is_available():
        return dict(skipped="no CUDA device")
    scan = _phantom_scan(coils=32)
    first, _ = _dainr(scan, DAINRConfig(device="cuda"))
    warm, _ = _dainr(scan, DAINRConfig(device="cuda"))
    return dict(warm, first_seconds=first["seconds"], first_seconds_prepare=first["seconds_prepare"],
                first_peak_gpu_mb=first["peak_gpu_mb"])


def _sweep(scans: dict, device: str, settings: Dict[str, dict], seeds=SEEDS, **config) -> dict:
    """Per scan and setting (name → config changes): PSNR, SSIM, seconds, steps, time per step and (on CUDA)
    peak GPU memory over the fit's seeds (values, mean, sample s.d.)."""
    out = {}
    for name, scan in scans.items():
        for label, changes in settings.items():
            runs = [_dainr(scan, DAINRConfig(device=device, seed=s, **config, **changes))[0] for s in seeds]
            out[f"{name}, {label}"] = {key: _spread([r[key] for r in runs])
                                       for key in ("psnr", "ssim", "seconds", "steps", "seconds_per_step",
                                                   "peak_gpu_mb") if key in runs[0]}
    return out


def case_gpu_frames_per_step() -> dict:
    """Frames per step on CUDA (1, 2, 4), fit seeds 0–3: the 128² phantom at 32 and 8 coils and the real cine,
    13 spokes.  A CUDA step costs about the same at any of them, so fewer frames buy quality with time."""
    if not torch.cuda.is_available():
        return dict(skipped="no CUDA device")
    scans = {"phantom, 32 coils": _phantom_scan(coils=32), "phantom, 8 coils": _phantom_scan()}
    if _real_missing() is None:
        scans["real cine, 8 coils"] = _real_scan()
    reconstruct(scans["phantom, 8 coils"].data, DAINRConfig(device="cuda", max_steps=20))  # CUDA start-up
    return _sweep(scans, "cuda", {f"{b} frames/step": dict(frames_per_step=b) for b in (1, 2, 4)})


def case_lr() -> dict:
    """Learning rate (1, 2, 4, 8 × 10⁻³; the reference's is 1e-3, the default 4e-3) on the CPU, 1 frame per step,
    fit seeds 0–3, 8 coils: the 128² phantom at 13 and 5 spokes and the real cine at 13."""
    scans = {"phantom": _phantom_scan()}
    if _real_missing() is None:
        scans["real cine"] = _real_scan()
    scans["phantom, 5 spokes"] = _phantom_scan(spokes=5)
    return _sweep(scans, "cpu", {f"lr {lr:g}": dict(lr=lr) for lr in (1e-3, 2e-3, 4e-3, 8e-3)})


def case_profile() -> dict:
    """Where a CPU step goes: 128², 8 coils, 13 spokes, one frame per step (ms, median of 10)."""
    return _profile(torch.device("cpu"), coils=8)


def case_gpu_profile() -> dict:
    """Where a CUDA step goes: 128², 32 coils, 13 spokes, the CUDA batch of frames (ms, median of 10)."""
    if not torch.cuda.is_available():
        return dict(skipped="no CUDA device")
    return _profile(torch.device("cuda"), coils=32)


def _profile(device: torch.device, coils: int) -> dict:
    from dainr.recon import Fitter, Problem

    scan = _phantom_scan(coils=coils)
    cfg = DAINRConfig(device=device.type)
    prob = Problem(scan.data, cfg, None, device)
    fit = Fitter(prob, cfg)
    model, B, P = fit.model, fit.batch, 128 * 128
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(fn, n=10):
        fn()
        ts = []
        for _ in range(n):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t0)
        return 1000 * float(np.median(ts))

    coords = torch.randn(B, P, model.deform[0].in_features, device=device)
    warped = (torch.rand(B, P, 2, device=device) * 2 - 1).requires_grad_(True)
    canon_in = torch.randn(B, P, model.sigma_net[0].in_features, device=device)
    acq = torch.arange(B, device=device)
    img = fit.predict_acquired(acq).detach().requires_grad_(True)

    def nufft():
        pred = prob.op.preconditioned_forward(img, prob.omega[acq], prob.dcf_grad[acq])
        (pred.real.sum() + pred.imag.sum()).backward()

    return dict(
        frames_per_step=B,
        step_total=timed(fit.step),
        grid_fwd_bwd=timed(lambda: model.grid(warped).sum().backward()),
        deformation_mlp_fwd_bwd=timed(lambda: model.deform(coords).sum().backward()),
        canonical_mlp_fwd_bwd=timed(lambda: model.color_net(model.sigma_net(canon_in)).sum().backward()),
        **{f"nufft_fwd_bwd_{coils}coils": timed(nufft)},
        **({"features_sampling": timed(lambda: prob.features_for(acq, (128, 128)))} if cfg.use_features else {}),
        adamw_step=timed(fit.opt.step),
    )


def _memory_child(arg: str) -> None:
    """The fresh process of :func:`memory_peak`: one reconstruction, its result printed as JSON."""
    from dainr import RadialData
    from dainr.memory import estimate_memory

    a = json.loads(arg)
    torch.set_num_threads(a["threads"])
    d = simulate(matrix=min(a["matrix"], 128), frames=a["frames"], spokes=a["spokes"], coils=a["coils"]).data
    data = RadialData(d.kdata, d.traj, a["matrix"], d.spoke_mask, d.noise)
    cfg = DAINRConfig(device="cpu", max_steps=2, check_memory=False, **a["config"])
    est = estimate_memory(data, cfg, torch.device("cpu"))
    # the peak from here on, above the resident set now (the simulation's transient peak was subtracted: at 256²
    # × 32 coils its high-water mark stood 86 MiB above the resident set); "5" resets VmHWM (Linux ≥ 4.0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = proc_bytes("/proc/self/status", "VmRSS")
    reconstruct(data, cfg)
    peak = peak_rss_bytes()
    print(json.dumps(dict(estimate=est.peak, parts=est.parts, measured=peak - base)))


def memory_peak(matrix: int, frames: int, coils: int = 8, spokes: int = 13, threads: int = 2, **config) -> dict:
    """Peak RSS of one CPU ``reconstruct`` (2 steps) in a fresh process, above its resident set just before, and
    the preflight's estimate (bytes).  The data are a simulated scan of at most 128² declared at ``matrix``."""
    arg = json.dumps(dict(matrix=matrix, frames=frames, coils=coils, spokes=spokes, threads=threads, config=config))
    child = "import sys; from dainr_app.bench import _memory_child; _memory_child(sys.argv[1])"
    out = subprocess.run([sys.executable, "-c", child, arg], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


MEMORY_RUNS = [dict(matrix=128, frames=23), dict(matrix=256, frames=23), dict(matrix=512, frames=23),
               dict(matrix=1024, frames=12), dict(matrix=256, frames=23, coils=32),
               dict(matrix=256, frames=23, use_features=True), dict(matrix=512, frames=12, spatial_ratio=2.0),
               dict(matrix=128, frames=23, frames_per_step=8)]


def case_memory() -> dict:
    """Peak RSS of CPU reconstructions (128² to 1024², coils, features, spatial ×2, frames per step) against
    the memory preflight's estimate (GiB), each in a fresh process."""
    runs = []
    for run in MEMORY_RUNS:
        r = memory_peak(**run, threads=torch.get_num_threads())  # (`dainr bench --threads`)
        runs.append(dict(run, measured_gib=r["measured"] / 2 ** 30, estimate_gib=r["estimate"] / 2 ** 30,
                         ratio=r["estimate"] / r["measured"], parts_gib={k: v / 2 ** 30 for k, v in r["parts"].items()}))
    return dict(runs=runs)


CASES: Dict[str, Callable[[], dict]] = {
    "demo": case_demo, "spokes13": case_spokes13, "spokes13_fine": case_spokes13_fine, "spokes5": case_spokes5,
    "spokes21": case_spokes21,
    "ablation": case_ablation, "ablation_fine": case_ablation_fine, "ablation_real": case_ablation_real,
    "ablation_refgrid": case_ablation_refgrid,
    "ablation_paper": case_ablation_paper, "ablation_paper_refgrid": case_ablation_paper_refgrid,
    "ablation_oracle": case_ablation_oracle, "ablation_seeds": case_ablation_seeds,
    "temporal2": case_temporal2, "spatial2": case_spatial2, "real": case_real,
    "gpu32": case_gpu32, "gpu_frames_per_step": case_gpu_frames_per_step, "lr": case_lr, "profile": case_profile,
    "gpu_profile": case_gpu_profile, "ingest": case_ingest, "overhead": case_overhead,
    "concurrent": case_concurrent, "memory": case_memory,
}


def add_arguments(p) -> None:
    p.add_argument("--case", choices=sorted(CASES), action="append", help="run only these cases (repeatable)")
    from .cli import _positive_int

    p.add_argument("--out", default="bench-out", help="folder for results.json (default bench-out)")
    p.add_argument("--threads", type=_positive_int, default=2,
                   help="torch/finufft threads (default 2: the target machine has 2 cores)")
    p.add_argument("--list", action="store_true", help="list the cases and what each measures")
    p.add_argument("--inline", action="store_true", help=argparse.SUPPRESS)


def _run_inline(name: str, threads: int) -> dict:
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    result = CASES[name]()
    result["case_seconds"] = time.perf_counter() - t0
    result["peak_rss_mb"] = peak_rss_bytes() / 2**20
    result["environment"] = environment(threads)
    return result


def environment(threads: int) -> dict:
    """Where and when a case ran: results.json keeps the cases of several runs side by side."""
    cuda = torch.cuda.is_available()
    return dict(finished=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                dainr=__version__, torch=torch.__version__, numpy=np.__version__, python=platform.python_version(),
                device=torch.cuda.get_device_name() if cuda else f"cpu ({platform.machine()}, {os.cpu_count()} cores)",
                threads=threads)


def main(args) -> int:
    if args.list:
        width = max(map(len, CASES))
        for name, fn in CASES.items():
            print(f"{name:{width}s}  {' '.join((fn.__doc__ or '').split(chr(10) * 2)[0].split())}")
        return 0
    names = args.case or list(CASES)
    if args.inline:
        print(json.dumps({n: _run_inline(n, args.threads) for n in names}, default=float))
        return 0
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.json")
    results = {}
    if os.path.exists(path):  # earlier cases' results are kept
        try:
            with open(path, encoding="utf-8") as fh:
                results = json.load(fh)
        except ValueError as exc:
            raise ValueError(f"{path} is not a results file (JSON: {exc}): move it away or choose another --out") \
                from None
    for name in names:  # (progress on stderr: stdout is a JSON line per case)
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        cmd = [sys.executable, "-m", "dainr_app.cli", "bench", "--inline", "--threads", str(args.threads), "--case", name]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            results[name] = dict(error=proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}")
        else:
            results.update(json.loads(proc.stdout.strip().splitlines()[-1]))
        with replaced_whole(path) as partial, open(partial, "w") as fh:  # (a bench stopped meanwhile keeps the last)
            json.dump(results, fh, indent=2, default=float)
        print(json.dumps({name: results[name]}, default=lambda v: round(float(v), 3)), flush=True)
    print(f"wrote {path}", file=sys.stderr)
    failed = [n for n in names if "error" in results[n]]
    if failed:
        print(f"dainr bench: {', '.join(failed)} failed (their errors are in {path})", file=sys.stderr)
    return 1 if failed else 0
