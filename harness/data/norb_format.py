"""The NORB binary matrix format (smallNORB's .mat files): read, stream and write, gzip or plain.

Layout: little-endian int32 magic (the dtype), int32 ndim, max(3, ndim) int32 dims (unused ones are 1),
then the data in C order. Plain files are memory-mapped; gzip files are detected by their magic bytes,
whatever their name. Every malformed file raises a one-line DataError naming the file and the fix.

    a = read_matrix("smallnorb-...-testing-cat.mat.gz")          # int32 (24300,)
    write_matrix("x.mat.gz", np.zeros((3, 4), np.float32))       # gzip because of the name
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from harness.data.base import DataError

MAGIC_TO_DTYPE = {
    0x1E3D4C55: np.dtype("u1"),
    0x1E3D4C54: np.dtype("<i4"),
    0x1E3D4C51: np.dtype("<f4"),
    0x1E3D4C53: np.dtype("<f8"),
    0x1E3D4C56: np.dtype("<i2"),
}
DTYPE_TO_MAGIC = {dt: magic for magic, dt in MAGIC_TO_DTYPE.items()}
_MAX_NDIM = 16
DEFAULT_FIX = "re-download or regenerate the file"


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def _open(path: Path):
    return gzip.open(path, "rb") if _is_gzip(path) else open(path, "rb")


def _read_exact(f, n: int, path: Path, what: str, fix: str) -> bytes:
    try:
        b = f.read(n)
    except (EOFError, OSError, zlib.error) as e:  # truncated or damaged gzip stream
        raise DataError(f"{path}: corrupted gzip data while reading the {what} ({e}); {fix}") from None
    if len(b) != n:
        raise DataError(f"{path}: truncated: the {what} needs {n} bytes but only {len(b)} remain; {fix}")
    return b


def _read_header(f, path: Path, fix: str) -> tuple[np.dtype, tuple[int, ...], int]:
    """(dtype, shape, header bytes) from an open stream positioned at the start."""
    magic, ndim = np.frombuffer(_read_exact(f, 8, path, "header", fix), "<i4").tolist()
    magic &= 0xFFFFFFFF
    if magic not in MAGIC_TO_DTYPE:
        known = ", ".join(f"0x{m:08X}" for m in MAGIC_TO_DTYPE)
        raise DataError(
            f"{path}: wrong magic 0x{magic:08X} (expected one of {known}); not a NORB matrix file; {fix}"
        )
    if not 1 <= ndim <= _MAX_NDIM:
        raise DataError(f"{path}: header says ndim={ndim}, which is not in 1..{_MAX_NDIM}; {fix}")
    nd = max(3, ndim)
    dims = np.frombuffer(_read_exact(f, 4 * nd, path, "header dims", fix), "<i4").tolist()
    if any(d < 0 for d in dims):
        raise DataError(f"{path}: header has negative dims {dims}; {fix}")
    return MAGIC_TO_DTYPE[magic], tuple(dims[:ndim]), 8 + 4 * nd


def read_header(path: str | Path, *, fix: str = DEFAULT_FIX) -> tuple[np.dtype, tuple[int, ...]]:
    """dtype and shape of a matrix file, reading only its header."""
    path = Path(path)
    with _open(path) as f:
        dtype, shape, _ = _read_header(f, path, fix)
    return dtype, shape


def read_matrix(path: str | Path, *, mmap: bool = True, fix: str = DEFAULT_FIX) -> np.ndarray:
    """The array stored in a matrix file (gzip or plain); plain files are memory-mapped read-only if ``mmap``.

    Raises DataError for a wrong magic, a truncated file, or data whose length does not match the header.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; {fix}")
    if not _is_gzip(path):
        with open(path, "rb") as f:
            dtype, shape, offset = _read_header(f, path, fix)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        size = path.stat().st_size
        _check_length(path, size - offset, nbytes, shape, fix)
        if mmap and nbytes > 0:
            return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
        return np.fromfile(path, dtype=dtype, count=int(np.prod(shape)), offset=offset).reshape(shape)
    with gzip.open(path, "rb") as f:
        dtype, shape, _ = _read_header(f, path, fix)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        data = _read_exact(f, nbytes, path, f"data of shape {shape}", fix)
        _check_no_trailing(f, path, shape, fix)
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def iter_matrix_rows(path: str | Path, rows: int, *, fix: str = DEFAULT_FIX) -> Iterator[np.ndarray]:
    """Stream a matrix file in chunks of up to ``rows`` records along the first axis (checks the length)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; {fix}")
    with _open(path) as f:
        dtype, shape, _ = _read_header(f, path, fix)
        per_row = int(np.prod(shape[1:])) * dtype.itemsize
        for start in range(0, shape[0], rows):
            k = min(rows, shape[0] - start)
            chunk = _read_exact(
                f, k * per_row, path, f"records {start}..{start + k - 1} of shape {shape}", fix
            )
            yield np.frombuffer(chunk, dtype=dtype).reshape((k, *shape[1:]))
        _check_no_trailing(f, path, shape, fix)


def _check_length(path: Path, have: int, need: int, shape: tuple[int, ...], fix: str) -> None:
    if have < need:
        raise DataError(
            f"{path}: truncated: header shape {shape} needs {need} data bytes, file has {have}; {fix}"
        )
    if have > need:
        raise DataError(
            f"{path}: {have - need} bytes after the data: the header shape {shape} does not match; {fix}"
        )


def _check_no_trailing(f, path: Path, shape: tuple[int, ...], fix: str) -> None:
    try:
        extra = len(f.read(1 << 16))
    except (EOFError, OSError, zlib.error) as e:
        raise DataError(f"{path}: corrupted gzip data after the matrix ({e}); {fix}") from None
    if extra:
        raise DataError(
            f"{path}: data continues past the header shape {shape}: the shape does not match; {fix}"
        )


class MatrixWriter:
    """Stream a matrix file: header first, then records in order; gzip when the name ends in .gz[.tmp].

    gzip output is deterministic (no time stamp, no file name), so the same arrays give the same bytes.

        with MatrixWriter(path, np.uint8, (24300, 2, 96, 96)) as w:
            for chunk in chunks: w.write(chunk)
    """

    def __init__(
        self,
        path: str | Path,
        dtype,
        shape: tuple[int, ...],
        *,
        compress: bool | None = None,
        compresslevel: int = 6,
    ):
        self.path = Path(path)
        self.dtype = np.dtype(dtype).newbyteorder("<") if np.dtype(dtype).itemsize > 1 else np.dtype(dtype)
        if self.dtype not in DTYPE_TO_MAGIC:
            raise ValueError(
                f"dtype {np.dtype(dtype)} has no NORB magic; use one of uint8, int32, float32, float64, int16"
            )
        self.shape = tuple(int(d) for d in shape)
        self.row_shape = self.shape[1:]
        self.written = 0
        self._raw = open(self.path, "wb")
        gz = _gz_name(self.path) if compress is None else compress
        self._f = (
            gzip.GzipFile(filename="", mode="wb", fileobj=self._raw, mtime=0, compresslevel=compresslevel)
            if gz
            else self._raw
        )
        dims = list(self.shape) + [1] * (3 - len(self.shape))
        self._f.write(np.array([DTYPE_TO_MAGIC[self.dtype], len(self.shape), *dims], "<i4").tobytes())

    def write(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.shape[1:] != self.row_shape:
            raise ValueError(f"{self.path}: records of shape {rows.shape[1:]}, expected {self.row_shape}")
        if self.written + len(rows) > self.shape[0]:
            raise ValueError(f"{self.path}: more than the declared {self.shape[0]} records")
        self._f.write(rows.tobytes())
        self.written += len(rows)

    def close(self) -> None:
        if self._f is not self._raw:
            self._f.close()
        self._raw.close()
        if self.written != self.shape[0]:
            raise ValueError(
                f"{self.path}: wrote {self.written} records, the header declares {self.shape[0]}"
            )

    def __enter__(self) -> MatrixWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # leave no half-written file that looks valid
            self._raw.close()
            self.path.unlink(missing_ok=True)


def _gz_name(path: Path) -> bool:
    """Whether a file name asks for gzip: it ends in .gz, also under a temporary name ending in .tmp."""
    name = path.name.removesuffix(".tmp")
    return name.endswith(".gz")


def write_matrix(
    path: str | Path, array: np.ndarray, *, compress: bool | None = None, compresslevel: int = 6
) -> None:
    """Write ``array`` (any of the five dtypes, ndim >= 1) as a matrix file (gzip: see MatrixWriter)."""
    array = np.asarray(array)
    if array.ndim == 0:
        raise ValueError("a matrix file needs at least one dimension")
    with MatrixWriter(path, array.dtype, array.shape, compress=compress, compresslevel=compresslevel) as w:
        w.write(array) if array.shape[0] else None
