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
