"""Run one integration case: simulate its raw file, replay it through ``dainr serve``, compare with the reference."""
from __future__ import annotations

import configparser
import contextlib
import json
import os
from typing import Dict, List

import numpy as np

from dainr_app.cli import main as cli
from dainr_app.replay import file_items, replay

from ..server_harness import running_server, wait_until

HERE = os.path.dirname(os.path.abspath(__file__))
CASES, PIPELINES, REFERENCES = (os.path.join(HERE, d) for d in ("cases", "pipelines", "references"))


def case_names() -> List[str]:
    return sorted(f[:-4] for f in os.listdir(CASES) if f.endswith(".cfg"))


def load_case(name: str) -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    if not cfg.read(os.path.join(CASES, name + ".cfg")):
        raise FileNotFoundError(f"no case {name}")
    return cfg


@contextlib.contextmanager
def _env(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def run_case(name: str, workdir: str) -> Dict[str, np.ndarray]:
    """The case's output images: one (n, y, x) magnitude stack per series, ordered by slice/.../index."""
    cfg = load_case(name)
    d = cfg["dataset"]
    raw = os.path.join(workdir, name + ".h5")
    cli(["simulate", "-o", raw, "--matrix", d["matrix"], "--frames", d["frames"], "--spokes", d["spokes"],
         "--coils", d["coils"], "--slices", d["slices"], "--noise", d["noise"], "--seed", d["seed"]])
    nodes = cfg.getint("distributed", "nodes", fallback=0)
    with contextlib.ExitStack() as stack:
        workers = [stack.enter_context(running_server(pipelines=PIPELINES)) for _ in range(nodes)]
        if workers:
            addresses = json.dumps([f"127.0.0.1:{w.port}" for w in workers])
            stack.enter_context(_env("GADGETRON_REMOTE_WORKER_COMMAND", f"echo '{addresses}'"))
        server = stack.enter_context(running_server(pipelines=PIPELINES))
        header, items = file_items(raw)
        res = replay(items, header, ("127.0.0.1", server.port), config=cfg["reconstruction"]["configuration"])
        if res.errors:
            raise AssertionError(f"case {name}: server errors {res.errors}")
        for w in workers:  # each worker really ran a share of the stream (its log line follows its CLOSE)
            assert wait_until(lambda: len(w.history) == 1, 10), w.history
            assert w.history[0]["acquisitions"] > 0 and not w.history[0]["errors"], w.history
    key = lambda im: (im.slice, im.contrast, im.repetition, im.set, im.image_index)
    return {f"series_{s}": np.stack([np.abs(im.data[0, 0]) for im in sorted(v, key=key)]).astype(np.float32)
            for s, v in res.images.items()}


def compare(name: str, out: Dict[str, np.ndarray]) -> List[str]:
    """Problems (empty when the case passes)."""
    test = load_case(name)["test"]
    ref = dict(np.load(os.path.join(REFERENCES, test["reference_file"])))
    value_t, scale_t = float(test["value_comparison_threshold"]), float(test["scale_comparison_threshold"])
    problems = []
    if sorted(out) != sorted(ref):
        return [f"series {sorted(out)} != reference {sorted(ref)}"]
    for series, r in ref.items():
        o = out[series]
        if o.shape != r.shape:
            problems.append(f"{series}: shape {o.shape} != reference {r.shape}")
            continue
        value = float(np.linalg.norm(o - r) / np.linalg.norm(r))
        scale = abs(float(o.sum() / r.sum()) - 1)
        if value > value_t or scale > scale_t:
            problems.append(f"{series}: relative difference {value:.4f} (limit {value_t}), scale {scale:.4f} "
                            f"(limit {scale_t})")
    return problems


def regenerate(names: List[str], workdir: str) -> None:
    """Rewrite the references of ``names``; a case that shares another case's reference is checked against it."""
    own = lambda n: os.path.splitext(load_case(n)["test"]["reference_file"])[0] == n
    for name in sorted(names, key=lambda n: not own(n)):  # owners first
        out = run_case(name, workdir)
        if own(name):
            target = os.path.join(REFERENCES, name + ".npz")
            np.savez_compressed(target, **out)
            print(f"{name}: wrote {target} ({', '.join(f'{k} {v.shape}' for k, v in out.items())})")
        else:
            problems = compare(name, out)
            print(f"{name}: shares {load_case(name)['test']['reference_file']}: {'; '.join(problems) or 'ok'}")
