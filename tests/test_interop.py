"""Interoperability with the C++ ISMRMRD library, the one Gadgetron parses headers and files with (Debian's
``ismrmrd-tools``): our raw headers parse in C++, a raw file the C++ library wrote replays through our server
byte for byte, and its Cartesian data gets a clear error from every DA-INR path.  Skipped where the tools are
not installed (``scripts/bootstrap.sh`` installs them when it runs as root on Debian/Ubuntu)."""
from __future__ import annotations

import shutil
import subprocess

import ismrmrd.xsd
import pytest
from ismrmrd.serialization import ConfigFile

from dainr.sim import simulate
from dainr_app import cli
from dainr_app.mrd import build_header, open_raw, write_raw
from dainr_app.protocol import ACQUISITION, encode
from dainr_app.replay import file_items, replay

from .server_harness import errors, raw_session, small_pipeline, stream

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("ismrmrd_generate_cartesian_shepp_logan", "ismrmrd_test_xml")),
    reason="C++ ismrmrd-tools not installed (apt-get install ismrmrd-tools)")


def cpp_parses(xml: str, tmp_path) -> subprocess.CompletedProcess:
    """Run the C++ header deserializer (``ismrmrd_test_xml``) on ``xml``, in ``tmp_path``: it writes its
    round-tripped ``raw.xml``/``processed.xml`` into the working directory."""
    path = tmp_path / "header.xml"
    path.write_text(xml)
    return subprocess.run(["ismrmrd_test_xml", str(path)], capture_output=True, text=True, timeout=60, cwd=tmp_path)


@pytest.fixture(scope="module")
def cpp_raw(tmp_path_factory):
    """A Cartesian Shepp-Logan raw file written by the C++ library: noise scan, 2 repetitions, k-space coordinates."""
    path = tmp_path_factory.mktemp("cpp") / "shepp_logan.h5"
    subprocess.run(["ismrmrd_generate_cartesian_shepp_logan", "-o", str(path), "-m", "32", "-c", "2", "-r", "2",
                    "-C", "-k"], check=True, capture_output=True, timeout=60)
    return str(path)


def test_cpp_library_parses_the_headers_we_write(tmp_path):
    scan = simulate(matrix=16, frames=2, spokes=4, coils=2)
    path = str(tmp_path / "raw.h5")
    write_raw(path, [scan.data], noise=scan.data.noise.numpy())
    headers = {"simulated raw file": open_raw(path)[0],
               "no phase range, spokes_per_frame": ismrmrd.xsd.ToXML(build_header(32, 64, 2, 1, 40, 1, spokes_per_frame=8)),
               "reference angle": ismrmrd.xsd.ToXML(build_header(32, 64, 2, 5, 40, 2, golden_angle="reference"))}
    for name, xml in headers.items():
        res = cpp_parses(xml, tmp_path)
        assert res.returncode == 0, (name, res.stderr[-2000:])
    # the check can fail: the same parser rejects a header that lacks a required element
    xml = headers["simulated raw file"]
    broken = cpp_parses(xml.replace("<experimentalConditions>", "<x>").replace("</experimentalConditions>", "</x>"),
                        tmp_path)
    assert broken.returncode != 0 and "experimentalConditions" in broken.stderr


def test_raw_file_written_by_cpp_replays_byte_for_byte(server, cpp_raw):
    header, items = file_items(cpp_raw)
    acqs = list(items)
    assert len(acqs) == 65 and acqs[0].trajectory_dimensions == 0 and acqs[1].trajectory_dimensions == 2
    frames = raw_session(server.port, stream(ConfigFile("relay"), header, acqs))
    assert errors(frames) == [] and [f.raw for f in frames if f.mid == ACQUISITION] == [encode(a) for a in acqs]
    res = replay(iter(acqs), header, ("127.0.0.1", server.port), config="passthrough")
    assert res.errors == [] and res.returned == len(acqs)


def test_cartesian_data_gets_a_clear_error_everywhere(server, cpp_raw, tmp_path, capsys):
    assert cli.main(["recon", cpp_raw, "-o", str(tmp_path / "out.h5"), "--spokes-per-frame", "8"]) == 2
    assert "trajectory is 'cartesian'" in capsys.readouterr().err
    header, items = file_items(cpp_raw)
    res = replay(items, header, ("127.0.0.1", server.port), config_xml=small_pipeline(steps=2, spokes_per_frame=8))
    assert res.n_images == 0 and len(res.errors) == 2 and "trajectory is 'cartesian'" in res.errors[0]
    assert res.errors[1].endswith("DA-INR: 64 readouts not reconstructed and 1 noise readouts not used "
                                  "(the configuration error above)")


def cpp_read_image(path: str, series: int, index: int):
    """``ismrmrd_read_image`` of the C library (libismrmrd, which ismrmrd-tools installs) through ctypes: (status,
    number of images, the image header's ``attribute_string_len``, the meta bytes it read).  ISMRMRD 1.x's
    structs are packed to 2 bytes: the 198-byte image header (``attribute_string_len`` at 194), then the meta
    pointer."""
    import ctypes
    import ctypes.util

    lib = ctypes.CDLL(ctypes.util.find_library("ismrmrd") or "libismrmrd.so.1.8")
    lib.ismrmrd_get_number_of_images.restype = ctypes.c_uint32
    dataset, image = ctypes.create_string_buffer(256), ctypes.create_string_buffer(512)
    lib.ismrmrd_init_dataset(dataset, path.encode(), b"dataset")
    assert lib.ismrmrd_open_dataset(dataset, 0) == 0
    try:
        var = f"image_{series}".encode()
        count = lib.ismrmrd_get_number_of_images(dataset, var)
        lib.ismrmrd_init_image(image)
        status = lib.ismrmrd_read_image(dataset, var, ctypes.c_uint32(index), image)
        length = ctypes.c_uint32.from_buffer(image, 194).value
        pointer = ctypes.c_void_p.from_buffer(image, 198).value
        meta = ctypes.string_at(pointer, length) if pointer and length else b""
        lib.ismrmrd_cleanup_image(image)
    finally:
        lib.ismrmrd_close_dataset(dataset)
    return status, count, length, meta


def test_cpp_library_reads_the_image_files_we_write(tmp_path):
    """Gadgetron's C library read none of our image files (the meta stored as a UTF-8 string, which HDF5 does not
    convert to the ASCII one it asks for; and a zero ``attribute_string_len``, so no meta even then)."""
    import numpy as np

    from dainr_app.mrd import Geometry, make_images, write_images

    frames = np.random.default_rng(0).uniform(0, 1, (3, 8, 8)).astype(np.float32)
    images = make_images(frames, 1, 0, (200.0, 200.0, 8.0), Geometry(), comment="DA-INR ×2 (spatial)")
    path = str(tmp_path / "images.h5")
    write_images(path, images[:2])
    write_images(path, images[2:])  # appended
    for index, image in enumerate(images):
        status, count, length, meta = cpp_read_image(path, 1, index)
        assert (status, count) == (0, 3)
        assert length == len(meta) > 0 and meta.decode("utf-8") == image.attribute_string
    assert "DA-INR ×2 (spatial)" in images[0].attribute_string
