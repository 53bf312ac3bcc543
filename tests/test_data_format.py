"""smallNORB binary matrix format: round trips, the golden label files, and every corruption error."""

from __future__ import annotations

import gzip
import hashlib

import numpy as np
import pytest

from harness.data import DataError
from harness.data import norb_format as fmt
from harness.data import smallnorb as sn

DTYPES = ["uint8", "int32", "float32", "float64", "int16"]


def _sample(dtype: str, shape) -> np.ndarray:
    r = np.random.default_rng(0)
    if np.dtype(dtype).kind == "f":
        return r.standard_normal(shape).astype(dtype)
    info = np.iinfo(dtype)
    return r.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)


@pytest.mark.parametrize("suffix", [".mat", ".mat.gz"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7,), (5, 3), (4, 2, 3, 3), (2, 1, 2, 1, 3)])
def test_round_trip(tmp_path, dtype, shape, suffix):
    a = _sample(dtype, shape)
    path = tmp_path / f"m{suffix}"
    fmt.write_matrix(path, a)
    b = fmt.read_matrix(path)
    assert b.dtype == np.dtype(dtype) and b.shape == shape
    np.testing.assert_array_equal(b, a)
    assert fmt.read_header(path) == (np.dtype(dtype), shape)
    if suffix == ".mat":  # plain files are memory-mapped
        assert isinstance(b, np.memmap)
    chunks = list(fmt.iter_matrix_rows(path, 2))
    np.testing.assert_array_equal(np.concatenate(chunks), a)


def test_header_layout(tmp_path):
    # ndim 1 still writes 3 dims, unused ones are 1 (as smallNORB's cat files)
    path = tmp_path / "cat.mat"
    fmt.write_matrix(path, np.arange(6, dtype=np.int32))
    words = np.fromfile(path, "<i4")
    assert words[:5].tolist() == [0x1E3D4C54, 1, 6, 1, 1]
    assert words[5:].tolist() == list(range(6))


def test_compression_follows_the_name(tmp_path):
    a = _sample("int16", (3, 2))
    for name, gz in [("a.mat.gz", True), ("a.mat.gz.tmp", True), ("a.mat", False), ("a.mat.tmp", False)]:
        fmt.write_matrix(tmp_path / name, a)
        assert ((tmp_path / name).read_bytes()[:2] == b"\x1f\x8b") == gz
    fmt.write_matrix(tmp_path / "b.mat", a, compress=True)
    assert gzip.decompress((tmp_path / "b.mat").read_bytes())[:4] == (0x1E3D4C56).to_bytes(4, "little")


def test_gzip_is_deterministic(tmp_path):
    a = _sample("uint8", (10, 4))
    fmt.write_matrix(tmp_path / "a.mat.gz", a)
    fmt.write_matrix(tmp_path / "b.mat.gz", a)
    assert (tmp_path / "a.mat.gz").read_bytes() == (tmp_path / "b.mat.gz").read_bytes()


def test_golden_label_files(tmp_path):
    """The label writer reproduces smallNORB's cat files and testing info file byte for byte."""
    cat, info = sn.norb_labels()  # full-size testing set
    assert cat.shape == (24300,) and info.shape == (24300, 4)
    paths = sn.write_labels(tmp_path, "test", cat, info)
    md5 = [hashlib.md5(gzip.decompress(p.read_bytes())).hexdigest() for p in paths]
    assert md5 == [sn.UNCOMPRESSED_MD5["cat"], sn.UNCOMPRESSED_MD5["testing-info"]]
    cat_train, _ = sn.norb_labels(sn.INSTANCES["train"])
    fmt.write_matrix(tmp_path / "train-cat.mat", cat_train)
    assert hashlib.md5((tmp_path / "train-cat.mat").read_bytes()).hexdigest() == sn.UNCOMPRESSED_MD5["cat"]


def test_record_order():
    cat, info = sn.norb_labels()
    assert (cat == np.arange(24300) % 5).all()
    assert info[:7].tolist() == [[0, 0, 0, 0]] * 5 + [[0, 0, 0, 1]] * 2  # category fastest, then lighting
    assert info[30].tolist() == [0, 0, 2, 0]  # then azimuth (even codes)
    assert info[-1].tolist() == [5, 8, 34, 5]


# --- corruption ---------------------------------------------------------------------------------


def _good(tmp_path, suffix=".mat"):
    path = tmp_path / f"x{suffix}"
    fmt.write_matrix(path, _sample("int32", (6, 4)))
    return path


@pytest.mark.parametrize("suffix", [".mat", ".mat.gz"])
def test_wrong_magic(tmp_path, suffix):
    path = _good(tmp_path, suffix)
    raw = bytearray(gzip.decompress(path.read_bytes()) if suffix.endswith("gz") else path.read_bytes())
    raw[0:4] = (0x12345678).to_bytes(4, "little")
    path.write_bytes(gzip.compress(bytes(raw)) if suffix.endswith("gz") else bytes(raw))
    with pytest.raises(DataError, match=r"x\.mat.*wrong magic 0x12345678.*re-download"):
        fmt.read_matrix(path)


@pytest.mark.parametrize("suffix", [".mat", ".mat.gz"])
def test_truncated_data(tmp_path, suffix):
    path = _good(tmp_path, suffix)
    raw = gzip.decompress(path.read_bytes()) if suffix.endswith("gz") else path.read_bytes()
    cut = raw[:-5]
    path.write_bytes(gzip.compress(cut) if suffix.endswith("gz") else cut)
    with pytest.raises(DataError, match="truncated"):
        fmt.read_matrix(path)
    with pytest.raises(DataError, match="truncated"):
        list(fmt.iter_matrix_rows(path, 4))


def test_truncated_header(tmp_path):
    path = tmp_path / "h.mat"
    path.write_bytes(np.array([0x1E3D4C55, 4, 10], "<i4").tobytes())
    with pytest.raises(DataError, match="truncated.*header dims"):
        fmt.read_matrix(path)


def test_truncated_gzip_stream(tmp_path):
    path = _good(tmp_path, ".mat.gz")
    path.write_bytes(path.read_bytes()[:-12])  # cut the gzip trailer and some data
    with pytest.raises(DataError, match="x.mat.gz.*(corrupted gzip|truncated)"):
        fmt.read_matrix(path)


@pytest.mark.parametrize("suffix", [".mat", ".mat.gz"])
def test_shape_does_not_match_data(tmp_path, suffix):
    path = _good(tmp_path, suffix)
    raw = gzip.decompress(path.read_bytes()) if suffix.endswith("gz") else path.read_bytes()
    raw = raw + b"\0" * 16  # one more record than the header says
    path.write_bytes(gzip.compress(raw) if suffix.endswith("gz") else raw)
    with pytest.raises(DataError, match="does not match"):
        fmt.read_matrix(path)


def test_bad_ndim(tmp_path):
    path = tmp_path / "n.mat"
    path.write_bytes(np.array([0x1E3D4C55, 40, 1, 1, 1], "<i4").tobytes())
    with pytest.raises(DataError, match="ndim=40"):
        fmt.read_matrix(path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        fmt.read_matrix(tmp_path / "nope.mat")


def test_writer_checks_record_count(tmp_path):
    with pytest.raises(ValueError, match="wrote 1 records, the header declares 2"):
        with fmt.MatrixWriter(tmp_path / "w.mat", np.uint8, (2, 3)) as w:
            w.write(np.zeros((1, 3), np.uint8))


def test_checksum_mismatch(tmp_path):
    """load_part checks sha256s against the expected table and names the file and the fix."""
    cat, info = sn.norb_labels((0,), (0,), sn.AZIMUTHS, (0,))
    sn.write_labels(tmp_path, "test", cat, info)
    fmt.write_matrix(tmp_path / sn.file_name("test", "dat"), np.zeros((len(cat), 2, 32, 32), np.uint8))
    part = sn.load_part(tmp_path, "test", fix="FIX", progress=False)
    assert part.images.shape == (90, 2, 32, 32)
    name = sn.file_name("test", "cat")
    with pytest.raises(DataError, match=rf"{name}: sha256 .* does not match .*; FIX"):
        sn.load_part(tmp_path, "test", fix="FIX", expected={name: "0" * 64}, progress=False)


def test_files_disagree(tmp_path):
    cat, info = sn.norb_labels((0,), (0,), sn.AZIMUTHS, (0,))
    sn.write_labels(tmp_path, "test", cat, info)
    fmt.write_matrix(tmp_path / sn.file_name("test", "dat"), np.zeros((len(cat) - 1, 2, 32, 32), np.uint8))
    with pytest.raises(DataError, match="dat has 89 records"):
        sn.load_part(tmp_path, "test", fix="FIX", progress=False)
