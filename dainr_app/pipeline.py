"""Gadgetron v2 pipeline XML → the nodes the embedded server can run.

The server runs Python ``<external>`` gadgets (``<execute>`` a module from the operator's allowlist, or
``<connect>`` to an allowed address) and ``<distributed>`` blocks whose inner stream it sends to workers.
Anything else (a C++ ``<gadget>``, ``<parallel>``, legacy v1 XML) is refused with the reason, never ignored.
XML is parsed by defusedxml with DTDs and entities forbidden.
"""
from __future__ import annotations

import codecs
import os
import re
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

import defusedxml
import defusedxml.ElementTree as SafeET

def _pipelines_dir() -> str:
    """The repository's ``pipelines/`` (source or editable install), else ``share/dainr/pipelines`` under the
    data directory ``pip install`` put them in (setup.py data_files): the environment's prefix, the user base
    (``--user``), or the scheme's data path (Debian's system Python: ``/usr/local``)."""
    import site
    import sysconfig

    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pipelines")
    if os.path.isdir(here):
        return here
    bases = [sys.prefix, site.getuserbase(), sysconfig.get_path("data")]
    found = [d for d in (os.path.join(b, "share", "dainr", "pipelines") for b in bases) if os.path.isdir(d)]
    return found[0] if found else os.path.join(sys.prefix, "share", "dainr", "pipelines")


PIPELINES_DIR = _pipelines_dir()
# AcquisitionDistributor's parallel_dimension values (Gadgetron's: the encoding counters and user_0 … user_7)
DIMENSIONS = ("slice", "contrast", "phase", "repetition", "set", "average", "segment", "kspace_encode_step_1",
              "kspace_encode_step_2", *(f"user_{i}" for i in range(8)))
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


class PipelineError(ValueError):
    """The pipeline cannot be run here; the message says why."""


LOOPBACK = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class Policy:
    """What a client's pipeline may do, set by the operator (never by the client)."""

    modules: Tuple[str, ...] = ("gadgets",)
    connect_hosts: Tuple[str, ...] = LOOPBACK
    server_port: Optional[int] = None  # the serving port: no <connect> back into the server on this host

    def module_allowed(self, module: str) -> bool:
        return any(module == m or module.startswith(m + ".") for m in self.modules)


@dataclass
class External:
    configuration: str                       # the <configuration> block, sent verbatim as CONFIG (2)
    module: Optional[str] = None             # <execute name=... target=...>
    target: Optional[str] = None
    address: Optional[Tuple[str, int]] = None  # <connect address=... port=...>

    @property
    def label(self) -> str:
        return f"{self.module}.{self.target}" if self.module else f"connect {self.address[0]}:{self.address[1]}"


@dataclass
class Distributed:
    dimension: str
    worker_config: str                       # v2 XML of the inner stream, sent to each worker as CONFIG_TEXT
    nodes: List["Node"] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"distributed by {self.dimension}"


Node = Union[External, Distributed]


@dataclass
class Pipeline:
    nodes: List[Node]
    source: str = "<text>"


def parse_xml(text: str, what: str) -> ET.Element:
    """Parse untrusted XML: no DTDs, no entities, no external references."""
    try:
        return SafeET.fromstring(text, forbid_dtd=True)
    except defusedxml.DefusedXmlException as exc:
        raise PipelineError(f"{what}: DTDs and entities are not allowed ({exc.__class__.__name__})") from exc
    except ET.ParseError as exc:
        raise PipelineError(f"{what} is malformed XML: {exc}") from exc


def parse_pipeline(text: str, policy: Policy = Policy(), source: str = "<text>") -> Pipeline:
    root = parse_xml(text, f"pipeline {source}")
    if root.tag == "gadgetronStreamConfiguration":
        raise PipelineError(f"pipeline {source}: legacy v1 XML (<gadgetronStreamConfiguration>) is not supported; "
                            "use the v2 form (<configuration><version>2</version>...)")
    version = (root.findtext("version") or "").strip()
    if root.tag != "configuration" or version != "2":
        raise PipelineError(f"pipeline {source}: expected <configuration><version>2</version>, "
                            f"got <{root.tag}> version {version or 'none'}")
    nodes = _parse_stream(_one_stream(root, source), policy, source, [0], 0)
    return Pipeline(nodes, source)


MAX_NODES = 64   # <external> nodes in a whole pipeline: each is a gadget process (or a connection) per session
MAX_NESTING = 4  # <distributed> inside <distributed>


def _one_stream(el: ET.Element, source: str) -> ET.Element:
    streams = el.findall("stream")
    if len(streams) != 1:
        raise PipelineError(f"pipeline {source}: <{el.tag}> must hold one <stream>, it has {len(streams)}")
    return streams[0]


def _parse_stream(stream: ET.Element, policy: Policy, source: str, count: List[int], depth: int) -> List[Node]:
    nodes: List[Node] = []
    for el in stream:
        if el.tag == "external":
            count[0] += 1
            if count[0] > MAX_NODES:
                raise PipelineError(f"pipeline {source}: more than {MAX_NODES} <external> nodes")
            nodes.append(_parse_external(el, policy, source))
        elif el.tag == "distributed":
            if depth >= MAX_NESTING:
                raise PipelineError(f"pipeline {source}: <distributed> nested more than {MAX_NESTING} deep")
            nodes.append(_parse_distributed(el, policy, source, count, depth + 1))
        elif el.tag == "gadget":
            raise PipelineError(
                f"pipeline {source}: <gadget> {el.findtext('name') or ''} ({el.findtext('dll')}/"
                f"{el.findtext('classname')}) is a C++ Gadgetron gadget; this server runs only Python <external> "
                "and <distributed> nodes (run this pipeline on a Gadgetron server)")
        else:
            raise PipelineError(f"pipeline {source}: <{el.tag}> nodes are not supported by this server "
                                "(only <external> and <distributed>)")
    if not nodes:
        raise PipelineError(f"pipeline {source}: the <stream> is empty")
    return nodes


def _parse_external(el: ET.Element, policy: Policy, source: str) -> External:
    conf = el.find("configuration")
    configuration = ET.tostring(conf, encoding="unicode") if conf is not None else "<configuration/>"
    execute, connect = el.find("execute"), el.find("connect")
    if len(el.findall("execute")) + len(el.findall("connect")) > 1:
        raise PipelineError(f"pipeline {source}: an <external> takes one <execute> or one <connect>, not several")
    if execute is not None:
        module, target = execute.get("name", "").strip(), execute.get("target", "").strip()
        kind = execute.get("type", "python").strip().lower()
        if kind != "python":
            raise PipelineError(f"pipeline {source}: <execute type={kind!r}> is not supported (python only)")
        if not module or not target:
            raise PipelineError(f"pipeline {source}: <execute> needs name= (module) and target= (callable)")
        if not all(_NAME.match(p) for p in module.split(".")) or not _NAME.match(target):
            raise PipelineError(f"pipeline {source}: invalid module/target {module!r}/{target!r}")
        if not policy.module_allowed(module):
            raise PipelineError(f"pipeline {source}: module {module!r} is not in the server's allowlist "
                                f"{list(policy.modules)} (the operator extends it with --allow-module)")
        return External(configuration, module=module, target=target)
    if connect is not None:
        host = connect.get("address", "localhost").strip()
        try:
            port = int(connect.get("port", ""))
            if not 0 < port < 65536:
                raise ValueError
        except ValueError:
            raise PipelineError(f"pipeline {source}: <connect port={connect.get('port')!r}> is not a port") from None
        if host not in policy.connect_hosts:
            raise PipelineError(f"pipeline {source}: <connect address={host!r}> is not an allowed host "
                                f"{list(policy.connect_hosts)} (the operator extends it with --allow-connect)")
        if port == policy.server_port and host in LOOPBACK:  # (each level a session slot: nested, they took all)
            raise PipelineError(f"pipeline {source}: <connect port={port}> is this server's own port")
        return External(configuration, address=(host, port))
    raise PipelineError(f"pipeline {source}: <external> needs <execute> or <connect>")


def _parse_distributed(el: ET.Element, policy: Policy, source: str, count: List[int], depth: int) -> Distributed:
    dist = el.find("distributor")
    classname = (dist.findtext("classname") or "").strip() if dist is not None else ""
    if classname != "AcquisitionDistributor":
        raise PipelineError(f"pipeline {source}: <distributor> {classname or '(none)'} is not supported "
                            "(AcquisitionDistributor only)")
    props = {}
    for p in dist.iter("property"):  # <property name= value=/>, or the older <property><name/><value/></property>
        name, value = p.get("name", p.findtext("name")), p.get("value", p.findtext("value"))
        if (name or "").strip() != "parallel_dimension":
            raise PipelineError(f"pipeline {source}: distributor property {name!r} is not supported "
                                "(parallel_dimension only)")
        props["parallel_dimension"] = (value or "").strip()
    dimension = props.get("parallel_dimension", "slice")
    if dimension not in DIMENSIONS:
        raise PipelineError(f"pipeline {source}: parallel_dimension {dimension!r} is not one of {DIMENSIONS}")
    inner = _one_stream(el, source)
    nodes = _parse_stream(inner, policy, source, count, depth)
    parts = ["<configuration><version>2</version>"]
    for tag in ("readers", "writers"):
        if el.find(tag) is not None:
            parts.append(ET.tostring(el.find(tag), encoding="unicode"))
    parts += [ET.tostring(inner, encoding="unicode"), "</configuration>"]
    return Distributed(dimension, "".join(parts), nodes)


def resolve_name(name: str, folder: str = PIPELINES_DIR) -> str:
    """A CONFIG_FILE name → the XML file inside ``folder``; nothing outside it can be named."""
    name = name.strip()
    base = name if name.endswith(".xml") else name + ".xml"
    if not _NAME.match(base) or ".." in base:
        raise PipelineError(f"invalid pipeline name {name!r}: a plain file name inside the pipelines folder is "
                            "expected (no paths)")
    path = os.path.join(folder, base)
    if os.path.dirname(os.path.realpath(path)) != os.path.realpath(folder) or not os.path.isfile(path):
        raise PipelineError(f"unknown pipeline {name!r}; available: {', '.join(available(folder)) or 'none'}")
    return path


def available(folder: str = PIPELINES_DIR) -> Sequence[str]:
    return sorted(f for f in os.listdir(folder) if f.endswith(".xml")) if os.path.isdir(folder) else []


def pipeline_text(name: str, folder: str = PIPELINES_DIR, **properties) -> str:
    """The XML of a pipeline in ``folder`` with the values of some ``<property name=... value=.../>`` replaced
    (the demo and benchmarks send it as CONFIG_TEXT); a property the file does not set is an error."""
    xml = read_xml_file(resolve_name(name, folder))
    for key, value in properties.items():
        xml, n = re.subn(rf'(<property\s+name="{re.escape(key)}"\s+value=")[^"]*', rf"\g<1>{value}", xml)
        if not n:
            raise PipelineError(f"pipeline {name!r} has no property {key!r}")
    return xml


XML_ENCODING = re.compile(rb"""^\s*<\?xml[^>]*?\sencoding\s*=\s*["']([A-Za-z0-9._-]+)["']""")


def read_xml_file(path: str) -> str:
    """A pipeline XML file's text: in the encoding its byte order mark (UTF-8, UTF-16) or else its XML declaration
    names (ISO-8859-1, ...), UTF-8 without either; anything else is a PipelineError naming the file."""
    with open(path, "rb") as fh:
        data = fh.read()
    boms = ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
    declared = XML_ENCODING.match(data)
    encoding = next((name for bom, name in boms if data.startswith(bom)), None) or \
        (declared.group(1).decode() if declared else "utf-8")
    try:
        return data.decode(encoding)
    except (LookupError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{path} is not {encoding} text as XML needs it ({exc})") from None


def load_named(name: str, policy: Policy = Policy(), folder: str = PIPELINES_DIR, max_bytes: int = 1 << 20) -> Pipeline:
    path = resolve_name(name, folder)
    if os.path.getsize(path) > max_bytes:
        raise PipelineError(f"pipeline {name!r} is over {max_bytes} bytes")
    return parse_pipeline(read_xml_file(path), policy, os.path.basename(path))
