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
