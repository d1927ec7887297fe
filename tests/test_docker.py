"""Docker cannot run here: check what can be checked — everything the image copies exists and parses."""
import os
import pathlib
import re
import xml.etree.ElementTree as ET

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_dockerfile_copies_existing_paths_and_pipelines():
    text = (ROOT / "docker" / "Dockerfile").read_text()
    # the name Gadgetron's CI publishes its runtime images under (gadgetron_ubuntu_* is no longer built)
    assert re.search(r"^FROM ghcr\.io/gadgetron/gadgetron/ubuntu22\.04_rt_cuda:", text, re.M)
    copies = re.findall(r"^COPY (.+)$", text, re.M)
    sources = [src for line in copies for src in line.split()[:-1] if not src.startswith("--")]
    assert sources and all((ROOT / s).exists() for s in sources), sources
    # the base image ends as its user 1000: pip builds in the source folder, which must be that user's
    assert all(line.startswith("--chown=1000:conda ") for line in copies), copies
    assert "ismrmrd>=1.15" in text  # the base image pins 1.14.0
    for xml in (ROOT / "pipelines").glob("*.xml"):
        ET.parse(xml)


def test_compose_replays_through_a_pipeline_the_image_installs_for_gadgetron():
    text = (ROOT / "docker" / "compose.yml").read_text()
    installed = re.search(r"cp (.*) \"\$\{CONDA_PREFIX\}/share/gadgetron/config/\"",
                          (ROOT / "docker" / "Dockerfile").read_text()).group(1).split()
    names = {os.path.basename(p) for p in installed}
    assert all((ROOT / "pipelines" / name).exists() for name in names)
    assert set(re.findall(r'"-c", "([^"]+\.xml)"', text)) | {"dainr_connect.xml"} <= names


def test_compose_entrypoints_find_their_tools_without_the_base_images_entrypoint():
    """An overridden entrypoint skips the base image's conda activation: the env's bin must be on PATH."""
    compose = (ROOT / "docker" / "compose.yml").read_text()
    tools = set(re.findall(r'entrypoint: \["([^"]+)"', compose))
    assert tools == {"gadgetron_ismrmrd_client", "dainr"}
    assert re.search(r"^ENV PATH=/opt/conda/envs/gadgetron/bin:\$PATH$", (ROOT / "docker" / "Dockerfile").read_text(), re.M)


def test_compose_runs_the_resident_gadget_where_the_connect_pipelines_dial_it():
    """dainr_connect.xml and dainr_distributed_connect.xml dial localhost:18000 from the Gadgetron container:
    nothing listened there."""
    compose = (ROOT / "docker" / "compose.yml").read_text()
    service = re.search(r"^  gadget-server:\n((?:    .*\n)+)", compose, re.M).group(1)
    assert 'network_mode: "service:gadgetron"' in service and "capabilities: [gpu]" in service
    port = re.search(r'entrypoint: \["dainr", "gadget-server", "-p", "(\d+)"\]', service).group(1)
    for name in ("dainr_connect.xml", "dainr_distributed_connect.xml"):
        (connect,) = ET.parse(ROOT / "pipelines" / name).getroot().iter("connect")
        assert connect.get("port") == port and connect.get("address") is None
