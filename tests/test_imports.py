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
