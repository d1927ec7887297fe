#!/usr/bin/env bash
# GPU checks for a lent CUDA machine (no network there): installs wheels carried in .whl/ (see README,
# "GPU"), then runs the CUDA tests, the 32-coil benchmark and a per-kernel profile of a fit step; `frames` (not
# in `all`, about 5 minutes) runs the frames-per-step sweep (with the real cine where DAINR_REAL_DATA points to it).
# Usage: bash scripts/gpu_check.sh [tests|bench|profile|frames|all]   (logs and JSON under $OUT, default gpu-out/)
set -u
rc=0  # the test suite's exit status (the script's own)
what=${1:-all}
case "$what" in tests|bench|profile|frames|all) ;; *) echo "usage: $0 [tests|bench|profile|frames|all]" >&2; exit 2;; esac
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(), 'tcnn:', end=' ');
import importlib.util as u; print(u.find_spec('tinycudann') is not None)"

if [ "$what" = tests ] || [ "$what" = all ]; then
    # the suite with CUDA present: device="auto" picks the GPU, the CUDA-only tests run
    timeout 420 python3 -m pytest -q -p no:cacheprovider -rs tests 2>&1 | tee "$OUT/pytest.log" | tail -25
    rc=${PIPESTATUS[0]}
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
    for i in $(seq "${BENCH_RUNS:-2}"); do python3 -m dainr_app.cli bench --case gpu32 --case gpu_profile --threads 8 --out "$OUT/run$i"; done
fi
if [ "$what" = frames ]; then
    python3 -m dainr_app.cli bench --case gpu_frames_per_step --threads 8 --out "$OUT/frames"
fi
if [ "$what" = profile ] || [ "$what" = all ]; then
    # a cold process: where the one-time CUDA start-up goes
    python3 -m cProfile -s cumtime -m dainr_app.cli bench --inline --case gpu32 2>&1 | head -60 > "$OUT/cold_cprofile.txt"
    python3 - <<'PY' 2>&1 | tee "$OUT/stages.txt" | tail -60
import functools, time
import torch
from torch.profiler import ProfilerActivity, profile
import dainr.recon as R
from dainr import DAINRConfig, reconstruct
from dainr.sim import simulate

def staged(owner, name):  # print wall time of each call and the run's peak GPU memory so far (no reset: the
    fn = getattr(owner, name)  # stages nest, and reconstruct's own peak_gpu_bytes must cover its whole run)
    @functools.wraps(fn)
    def wrapper(*a, **k):
        torch.cuda.synchronize(); t0 = time.perf_counter()
        out = fn(*a, **k)
        torch.cuda.synchronize()
        print(f"{name:22s} {1000 * (time.perf_counter() - t0):9.1f} ms  peak so far {torch.cuda.max_memory_allocated() / 2**20:8.1f} MiB")
        return out
    setattr(owner, name, wrapper)

for owner, name in [(R, "walsh_coil_maps"), (R.Problem, "_estimate_coil_maps"), (R.Problem, "__init__"),
                    (R.Fitter, "__init__"), (R.Fitter, "render")]:
    staged(owner, name)
scan = simulate(128, 23, 13, 32, noise_level=0.02)
torch.zeros(1, device="cuda")
for _ in range(2):
    t0 = time.perf_counter(); res = reconstruct(scan.data, DAINRConfig(device="cuda"))
    print("reconstruct", time.perf_counter() - t0, {k: res.info[k] for k in ("steps", "seconds_prepare", "seconds_fit", "seconds_per_step",
                                                                         "peak_gpu_bytes", "memory_estimate_bytes")})
cfg = DAINRConfig(device="cuda")
fit = R.Fitter(R.Problem(scan.data, cfg, None, torch.device("cuda")), cfg)
for _ in range(20):
    fit.step()
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    for _ in range(20):
        fit.step()
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=50))
PY
fi
exit "$rc"
