"""Gadget latency on this machine: from a slice's last readout to its first preview and its final images.

Runs the real execute-mode launch (``python -m gadgetron PORT gadgets.dainr_gadget dainr_recon``) through
the test harness on a simulated 2-slice scan and prints the gadget's own per-slice timings.
Usage: .venv/bin/python scripts/gadget_latency.py [--matrix 64 --frames 12 --spokes 13 --coils 4]
"""
import argparse
import os
import re
import sys
import tempfile

import ismrmrd

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dainr.sim import simulate  # noqa: E402
from dainr_app.mrd import write_raw  # noqa: E402
from tests.gadget_harness import run_gadget  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--matrix", type=int, default=64)
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--spokes", type=int, default=13)
    p.add_argument("--coils", type=int, default=4)
    p.add_argument("--preview-steps", type=int, default=50)
    a = p.parse_args()
    scans = [simulate(a.matrix, a.frames, a.spokes, a.coils, seed=s) for s in range(2)]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "raw.h5")
        write_raw(path, [s.data for s in scans], noise=scans[0].data.noise.numpy())
        ds = ismrmrd.Dataset(path, "dataset", create_if_needed=False, mode="r")
        header = ismrmrd.xsd.CreateFromDocument(ds.read_xml_header())
        acqs = [ds.read_acquisition(i) for i in range(ds.number_of_acquisitions())]
        ds.close()
    cfg = ('<configuration><property name="preview" value="true"/>'
           f'<property name="preview_steps" value="{a.preview_steps}"/></configuration>')
    run = run_gadget(cfg, header, acqs)
    if run.errors:
        print("errors:", run.errors)
        return 1
    for line in run.log.splitlines():
        m = re.search(r"slice \((\d+),.*?: (preview sent|\d+ frames sent) ([\d.]+) s after the last readout", line)
        if m:
            print(f"slice {m.group(1)}: {m.group(2)} {m.group(3)} s after its last readout")
    print(f"{len(run.images)} images received ({a.matrix}^2, {a.frames} frames, {a.spokes} spokes, {a.coils} coils)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
