import ast
import pathlib

FORBIDDEN = {"ismrmrd", "gadgetron", "socket", "socketserver", "asyncio"}


def test_method_package_never_imports_io_or_sockets():
    root = pathlib.Path(__file__).resolve().parents[1] / "dainr"
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for n in names:
                assert n.split(".")[0] not in FORBIDDEN, f"{path.name} imports {n}"


def test_importing_our_modules_leaves_the_hosts_warning_filters():
    """ismrmrd's import calls warnings.simplefilter('default'), which overrode a host's filters (a test suite's
    "error"); torch, scipy and scikit-image add their own narrow filters, so they are imported before the check."""
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    modules = ["dainr_app.mrd", "dainr_app.protocol", "dainr_app.replay", "dainr_app.dicom", "dainr_app.bench_server",
               "gadgets"]  # each imports ismrmrd itself (gadgets: through gadgetron)
    probe = ("import importlib, sys, warnings, torch, scipy.special, skimage.metrics\n"
             "warnings.simplefilter('error')\n"
             "for name in sys.argv[1:]:\n"
             "    before = list(warnings.filters)\n"
             "    importlib.import_module(name)\n"
             "    assert warnings.filters == before, (name, warnings.filters[:2])\n")
    for name in modules:  # one process each: the first import of ismrmrd is the one that matters
        run = subprocess.run([sys.executable, "-c", probe, name], cwd=root, capture_output=True, text=True,
                             timeout=120)
        assert run.returncode == 0, run.stderr[-2000:]


def test_a_fit_does_not_import_sympy():
    """nn.utils.skip_init imported torch.fx's symbolic shapes and sympy (487 modules, ~1 s) at the first fit."""
    import subprocess
    import sys

    probe = ("import sys\n"
             "from dainr import DAINRConfig, reconstruct\n"
             "from dainr.sim import simulate\n"
             "scan = simulate(matrix=16, frames=3, spokes=6, coils=2)\n"
             "reconstruct(scan.data, DAINRConfig(device='cpu', max_steps=2, use_features=True))\n"
             "assert 'sympy' not in sys.modules\n")
    run = subprocess.run([sys.executable, "-c", probe], cwd=pathlib.Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
