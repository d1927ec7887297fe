import importlib
import pathlib
import xml.etree.ElementTree as ET

import pytest

from gadgets.dainr_gadget import options_from_properties, properties

PIPELINES = sorted((pathlib.Path(__file__).resolve().parents[1] / "pipelines").glob("*.xml"))


def test_there_are_pipelines():
    assert PIPELINES


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.name)
def test_pipeline_parses_and_its_gadgets_import(path):
    root = ET.parse(path).getroot()
    assert root.tag == "configuration" and root.findtext("version").strip() == "2"
    externals = root.findall(".//external")
    assert externals, "no <external> gadget"
    for ext in externals:
        execute = ext.find("execute")
        if execute is None:
            assert ext.find("connect") is not None
            continue
        assert execute.get("type") == "python"
        target = getattr(importlib.import_module(execute.get("name")), execute.get("target"))
        assert callable(target)
        options_from_properties(properties(ext.find("configuration")))  # every property value is valid


def test_installed_pipelines_are_found_after_a_user_install(monkeypatch, tmp_path):
    """`pip install --user` puts them under the user base, not sys.prefix: `dainr serve` found none."""
    import os
    import site
    import sys

    from dainr_app import pipeline

    user = tmp_path / "user" / "share" / "dainr" / "pipelines"
    user.mkdir(parents=True)
    repo = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(pipeline.__file__))), "pipelines")
    isdir = os.path.isdir
    monkeypatch.setattr(os.path, "isdir", lambda p: False if p == repo else isdir(p))  # not a source checkout
    monkeypatch.setattr(site, "getuserbase", lambda: str(tmp_path / "user"))
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "venv"))
    assert pipeline._pipelines_dir() == str(user)


def gadgetron_worker_copy(worker_config: str) -> str:
    """A ``<distributed>`` inner stream as a real Gadgetron sends it to each worker: its XMLSerializer
    (apps/gadgetron/connection/config/Config.cpp) writes an ``<execute>`` with name= and type= only (no target=)
    and a ``<connect>`` with port= only (no address=: the worker dials its own host)."""
    root = ET.fromstring(worker_config)
    for execute in root.iter("execute"):
        execute.attrib.pop("target", None)
    for connect in root.iter("connect"):
        connect.attrib.pop("address", None)
    return ET.tostring(root, "unicode")


def test_the_gadgetron_distributed_pipeline_survives_gadgetrons_copy_for_its_workers():
    """dainr_distributed.xml's workers, on a real Gadgetron, ran ``python -m gadgetron PORT gadgets.dainr_gadget``
    without its target: no images, no ERROR. The pipeline for a real Gadgetron connects to a resident gadget on
    each worker's host; the <execute> one is for dainr serve only and is not installed into Gadgetron's folder."""
    import re

    from dainr_app.pipeline import Distributed, PipelineError, parse_pipeline

    root = PIPELINES[0].parent

    def worker(name):
        (node,) = [n for n in parse_pipeline((root / name).read_text()).nodes if isinstance(n, Distributed)]
        return parse_pipeline(gadgetron_worker_copy(node.worker_config))

    distributed = ET.parse(root / "dainr_distributed_connect.xml").getroot().find("stream/distributed")
    # what the workers send back (images; readouts passed on) must be read and written on the way
    assert {r.findtext("classname") for r in distributed.iter("reader")} >= {"ImageReader", "AcquisitionReader"}
    assert {w.findtext("classname") for w in distributed.iter("writer")} >= {"ImageWriter", "AcquisitionWriter"}
    (ext,) = worker("dainr_distributed_connect.xml").nodes
    assert ext.address == ("localhost", 18000) and ext.module is None
    assert options_from_properties(properties(ET.fromstring(ext.configuration))).cfg.max_steps == 3000
    with pytest.raises(PipelineError, match="needs name= .module. and target="):
        worker("dainr_distributed.xml")
    dockerfile = (root.parent / "docker" / "Dockerfile").read_text()
    installed = re.search(r"cp (.*) \"\$\{CONDA_PREFIX\}/share/gadgetron/config/\"", dockerfile).group(1).split()
    assert "/opt/dainr/pipelines/dainr_distributed_connect.xml" in installed
    assert not any(p.endswith(("*.xml", "/dainr_distributed.xml")) for p in installed), installed


def test_pipeline_files_are_read_in_the_encoding_their_declaration_names(tmp_path):
    """A pipeline declared ISO-8859-1 (a "ü" in a comment) was refused with only "'utf-8' codec can't decode"."""
    from dainr_app.pipeline import PipelineError, load_named, pipeline_text, read_xml_file

    text = (pathlib.Path(__file__).parent.parent / "pipelines" / "passthrough.xml").read_text(encoding="utf-8")
    latin = text.replace('encoding="UTF-8"', 'encoding="ISO-8859-1"').replace("<configuration>",
                                                                              "<!-- Grüße --><configuration>", 1)
    (tmp_path / "latin.xml").write_bytes(latin.encode("iso-8859-1"))
    assert read_xml_file(str(tmp_path / "latin.xml")) == latin
    assert load_named("latin", folder=str(tmp_path)).nodes
    assert "Grüße" in pipeline_text("latin", str(tmp_path))  # (the demo's and benchmarks' CONFIG_TEXT)
    (tmp_path / "utf16.xml").write_bytes(latin.replace("ISO-8859-1", "UTF-16").encode("utf-16"))  # (with its BOM)
    assert read_xml_file(str(tmp_path / "utf16.xml")) == latin.replace("ISO-8859-1", "UTF-16")
    (tmp_path / "bad.xml").write_bytes(latin.replace('encoding="ISO-8859-1"', "").encode("iso-8859-1"))
    with pytest.raises(PipelineError, match=r"bad\.xml is not utf-8 text as XML needs it"):
        read_xml_file(str(tmp_path / "bad.xml"))
    (tmp_path / "unknown.xml").write_bytes(latin.replace("ISO-8859-1", "x-unknown").encode("iso-8859-1"))
    with pytest.raises(PipelineError, match=r"unknown\.xml is not x-unknown text as XML needs it"):
        read_xml_file(str(tmp_path / "unknown.xml"))
