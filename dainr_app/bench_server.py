"""Protocol benchmarks (``dainr bench --case ingest|overhead``): the embedded server in its own process,
the replay client in this one, as a scanner integration would run them.

* ``ingest``: a pass-through pipeline replaying 40,000 readouts of 8 coils × 256 samples (HDF5 file read,
  serialize, server relay, gadget process, and back), also from memory, and the pass-through gadget alone
  (gadgetron-python's ``Connection`` with a parent that does no parsing).  Target ≥ 25k readouts/s.
* ``overhead``: the DA-INR pipeline on the README demo data: replay wall time vs the reconstruction time the
  gadget reports in each image's processing history.  Target: overhead ≤ 5 % of the reconstruction time;
  also whether the second slice was fully sent before the first slice's images came back.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import torch

import ismrmrd

from dainr.data import RadialData
from dainr.sim import simulate

from .mrd import iter_acquisitions, write_raw
from .protocol import CLOSE, HEADER, Frame, config_text, encode, text_frame
from .replay import file_items, replay

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@contextlib.contextmanager
def server_process():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "dainr_app.cli", "serve", "-p", str(port)], cwd=ROOT,
                            stderr=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=ROOT))
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("dainr serve did not start")
                time.sleep(0.1)
        yield ("127.0.0.1", port)
    finally:
        proc.terminate()
        proc.wait(30)


def _large_raw(path: str, slices: int = 2, frames: int = 200, spokes: int = 100, coils: int = 8, samples: int = 256):
    rng = np.random.default_rng(0)
    data = []
    for _ in range(slices):
        k = (rng.standard_normal((frames, coils, spokes, samples)) + 1j * rng.standard_normal(
            (frames, coils, spokes, samples))).astype(np.complex64)
        t = rng.uniform(-0.5, 0.5, (frames, spokes, samples, 2)).astype(np.float32)
        data.append(RadialData(torch.from_numpy(k), torch.from_numpy(t), samples // 2))
    write_raw(path, data)


def case_ingest() -> dict:
    """Pass-through pipeline: 40k readouts (8 coils x 256 samples) replayed end to end through dainr serve."""
    reps = 10
    with tempfile.TemporaryDirectory() as work:
        path = os.path.join(work, "large.h5")
        _large_raw(path, frames=20)  # 4,000 readouts, replayed 10 times in one session
        header, _ = file_items(path)
        n = reps * sum(1 for _ in iter_acquisitions(path))
        in_memory = list(iter_acquisitions(path)) * reps
        with server_process() as address:
            replay(in_memory[:10], header, address, config="passthrough")  # start the gadget forkserver
            from_file = replay(itertools.chain.from_iterable(iter_acquisitions(path) for _ in range(reps)), header,
                               address, config="passthrough")
            from_memory = replay(iter(in_memory), header, address, config="passthrough")
        ceiling = _gadget_alone(header, in_memory)
    for res in (from_file, from_memory):
        assert not res.errors and res.returned == n, (res.errors, res.returned, n)
    return dict(readouts=n, replay_from_file_readouts_per_s=n / from_file.total_seconds,
                replay_from_memory_readouts_per_s=n / from_memory.total_seconds,
                passthrough_gadget_alone_readouts_per_s=ceiling,
                mb_per_s_each_way=n * (340 + 256 * 2 * 4 + 8 * 256 * 8) / 2**20 / from_memory.total_seconds)


def _gadget_alone(header: str, acqs) -> float:
    """The pass-through gadget (gadgetron-python's Connection) fed pre-encoded bytes by a parent that does no
    parsing: the ceiling any server can reach with this gadget."""
    data = config_text("<configuration/>") + text_frame(HEADER, header).to_bytes() + \
        b"".join(encode(a) for a in acqs) + Frame.of(CLOSE).raw
    with socket.create_server(("127.0.0.1", 0)) as listener:
        proc = subprocess.Popen([sys.executable, "-m", "gadgetron", str(listener.getsockname()[1]), "gadgets.passthrough",
                                 "passthrough"], env=dict(os.environ, PYTHONPATH=ROOT, GADGETRON_EXTERNAL_LOG_LEVEL="WARNING"))
        sock, _ = listener.accept()
    t0 = time.perf_counter()
    threading.Thread(target=sock.sendall, args=(data,), daemon=True).start()
    total = 0
    while True:
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        total += len(chunk)
    seconds = time.perf_counter() - t0
    proc.wait(30)
    sock.close()
    return len(acqs) / seconds


def case_overhead() -> dict:
    """DA-INR pipeline on the demo data (2 slices): replay wall time vs the gadget's reconstruction time."""
    with tempfile.TemporaryDirectory() as work:
        path = os.path.join(work, "raw.h5")
        scans = [simulate(64, 12, 13, 4, noise_level=0.02, seed=s) for s in range(2)]
        write_raw(path, [s.data for s in scans], noise=scans[0].data.noise.numpy())
        out = {}
        with server_process() as address:
            for run in ("cold", "warm"):  # cold: the server's gadget forkserver starts during this replay
                header, items = file_items(path)
                res = replay(items, header, address, config="dainr")
                assert not res.errors, res.errors
                recon = sum(_recon_seconds(im) for im in res.images[1] if im.image_index == 1)
                timing = sorted(res.slices.items())
                out[run] = dict(total_seconds=res.total_seconds, recon_seconds=recon,
                                overhead_seconds=res.total_seconds - recon,
                                overhead_percent=100 * (res.total_seconds - recon) / recon,
                                all_sent_at=res.send_seconds, first_image_at=min(t.first_image for _, t in timing),
                                per_slice_latency=[t.last_image - t.last_sent for _, t in timing])
    return out


def _recon_seconds(image) -> float:
    """The reconstruction time the gadget wrote into the image's processing history."""
    history = ismrmrd.Meta.deserialize(image.attribute_string)["ImageProcessingHistory"]
    history = history if isinstance(history, list) else [history]
    return float(re.search(r"([0-9.]+) s on", history[-1]).group(1))
