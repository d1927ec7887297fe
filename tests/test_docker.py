"""Docker cannot run here: check what can be checked — everything the image copies exists and parses."""
import pathlib
import re
import xml.etree.ElementTree as ET

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_dockerfile_copies_existing_paths_and_pipelines():
    text = (ROOT / "docker" / "Dockerfile").read_text()
    assert re.search(r"^FROM ghcr\.io/gadgetron/gadgetron/\S+cuda", text, re.M)
    sources = [src for line in re.findall(r"^COPY (.+)$", text, re.M) for src in line.split()[:-1]]
    assert sources and all((ROOT / s).exists() for s in sources), sources
    assert "ismrmrd>=1.15" in text  # the base image pins 1.14.0
    for xml in (ROOT / "pipelines").glob("*.xml"):
        ET.parse(xml)


def test_compose_replays_through_an_existing_pipeline():
    text = (ROOT / "docker" / "compose.yml").read_text()
    name = re.search(r'"-c", "([^"]+)"', text).group(1)
    assert (ROOT / "pipelines" / name).exists()


def test_compose_entrypoints_find_their_tools_without_the_base_images_entrypoint():
    """An overridden entrypoint skips the base image's conda activation: the env's bin must be on PATH."""
    compose = (ROOT / "docker" / "compose.yml").read_text()
    tools = set(re.findall(r'entrypoint: \["([^"]+)"', compose))
    assert tools == {"gadgetron_ismrmrd_client", "dainr"}
    assert re.search(r"^ENV PATH=/opt/conda/envs/gadgetron/bin:\$PATH$", (ROOT / "docker" / "Dockerfile").read_text(), re.M)
