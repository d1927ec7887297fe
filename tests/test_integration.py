"""Pipeline integration cases (tests/integration/cases/*.cfg) through the embedded server."""
import pytest

from .integration.runner import case_names, compare, run_case


@pytest.mark.parametrize("name", case_names())
def test_integration_case(name, tmp_path):
    out = run_case(name, str(tmp_path))
    assert compare(name, out) == []
