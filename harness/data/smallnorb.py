"""smallNORB: the six files, record order, download, verification and loading (docs/smallnorb_format.md).

The files use the NORB matrix format (harness/data/norb_format.py), gzip-compressed as published or
plain (memory-mapped). The 96×96 stereo images are downsampled once to 48×48 and cached in
``<folder>/cache`` (rebuilt when the source changes). Any folder with the six file names loads the
same way, which is how synthnorb is read.

    python -m harness.data download smallnorb        # resumable, sha256-checked
    python -m harness.data verify smallnorb
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from harness.data import register_dataset, transforms
from harness.data.base import META_COLUMNS, DataError, DatasetSpec, Part
from harness.data.norb_format import iter_matrix_rows, read_header, read_matrix, write_matrix

# ---------------------------------------------------------------------------------------------
# the dataset's files, record order and viewpoint codes
# ---------------------------------------------------------------------------------------------

URL = "https://cs.nyu.edu/~ylclab/data/norb-v1.0-small/"
CLASSES = ("animal", "human", "airplane", "truck", "car")
PREFIX = {
    "train": "smallnorb-5x46789x9x18x6x2x96x96-training",
    "test": "smallnorb-5x01235x9x18x6x2x96x96-testing",
}
INSTANCES = {"train": (4, 6, 7, 8, 9), "test": (0, 1, 2, 3, 5)}
ELEVATIONS = tuple(range(9))  # codes; degrees = 30 + 5 * code
AZIMUTHS = tuple(range(0, 36, 2))  # codes; degrees = 10 * code
LIGHTINGS = tuple(range(6))
KINDS = ("dat", "cat", "info")


@dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int  # bytes of the .mat.gz
    sha256: str  # of the .mat.gz


FILES = {
    f.name: f
    for f in [
        RemoteFile(
            f"{PREFIX['train']}-dat.mat.gz",
            131_896_188,
            "5ffd6272a07d32695ee1082a26a41a93a37aab8c28da047f8c34ed348d214873",
        ),
        RemoteFile(
            f"{PREFIX['train']}-cat.mat.gz",
            348,
            "2784e542c1922060691090952b6cd6278879a216c90f81476f0f00256d42cdaa",
        ),
        RemoteFile(
            f"{PREFIX['train']}-info.mat.gz",
            71_052,
            "de7eb932ebe7a4ee16217fead60660d0eb3d23632c2f4d1c51f88c501c17bf32",
        ),
        RemoteFile(
            f"{PREFIX['test']}-dat.mat.gz",
            130_799_817,
            "cf7104eed3e51174d2f65b66d1e5878b9da233b886f161b0d88f4510ba2c7474",
        ),
        RemoteFile(
            f"{PREFIX['test']}-cat.mat.gz",
            347,
            "ecaf6d5bb8c3bc5eab9cf0258f6d2198dd474e016e374836fc097f2e5ff509ff",
        ),
        RemoteFile(
            f"{PREFIX['test']}-info.mat.gz",
            10_428,
            "16adf314226327ee006d1a44db8cfef52773c06c829951d5653a9f6f310248a2",
        ),
    ]
}
# md5 of the uncompressed files (synthnorb reproduces the cat and testing-info files exactly)
UNCOMPRESSED_MD5 = {
    "cat": "fd5120d3f770ad57ebe620eb61a0b633",
    "testing-info": "7c5b871cc69dcadec1bf6a18141f5edc",
    "training-info": "19faee774120001fc7e17980d6960451",
    "training-dat": "8138a0902307b32dfa0025a36dfa45ec",
    "testing-dat": "e9920b7f7b2869a8f1a12e945b2c166c",
}


def file_name(part: str, kind: str) -> str:
    """Published file name, e.g. file_name("test", "cat") -> 'smallnorb-5x01235x...-testing-cat.mat.gz'."""
    return f"{PREFIX[part]}-{kind}.mat.gz"


def find_file(folder: Path, part: str, kind: str) -> Path | None:
    """The file on disk: the published .mat.gz, or a decompressed .mat next to it."""
    gz = folder / file_name(part, kind)
    plain = gz.with_suffix("")  # .mat
    return gz if gz.is_file() else plain if plain.is_file() else None


def norb_labels(
    instances=INSTANCES["test"],
    elevations=ELEVATIONS,
    azimuths=AZIMUTHS,
    lightings=LIGHTINGS,
    categories: int = 5,
) -> tuple[np.ndarray, np.ndarray]:
    """(cat int32 N, info int32 N×4) in smallNORB's record order.

    Category varies fastest (category = row % 5); then lighting, azimuth, elevation, instance (slowest).
    With the default arguments these are exactly the testing cat and info files.
    """
    grid = np.stack(
        np.meshgrid(instances, elevations, azimuths, lightings, range(categories), indexing="ij"), axis=-1
    ).reshape(-1, 5)  # N×(instance, elevation, azimuth, lighting, category)
    return grid[:, 4].astype("<i4"), np.ascontiguousarray(grid[:, :4].astype("<i4"))


def write_labels(
    folder: str | Path, part: str, cat: np.ndarray, info: np.ndarray, *, suffix: str = ""
) -> list[Path]:
    """Write a part's cat and info files (names as published, plus ``suffix``, e.g. '.tmp')."""
    folder = Path(folder)
    paths = [folder / (file_name(part, "cat") + suffix), folder / (file_name(part, "info") + suffix)]
    write_matrix(paths[0], cat)
    write_matrix(paths[1], info)
    return paths


# ---------------------------------------------------------------------------------------------
# checksums (cached next to the data for loading, keyed by size, modification time and inode;
# `verify` always re-hashes: a file damaged in place with its mtime kept passes the cache key)
# ---------------------------------------------------------------------------------------------


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def cached_sha256(path: Path, *, rehash: bool = False) -> str:
    """sha256 of ``path``, remembered in <folder>/cache/sha256.json while its size, mtime and inode are
    unchanged; ``rehash`` reads the file again whatever the cache says (and updates the cache)."""
    st = path.stat()
    key = [st.st_size, st.st_mtime_ns, st.st_ino]
    store = path.parent / "cache" / "sha256.json"
    table = _read_json(store)
    entry = table.get(path.name)
    if entry and entry.get("stat") == key and not rehash:
        return entry["sha256"]
    digest = sha256_file(path)
    table[path.name] = {"stat": key, "sha256": digest}
    try:
        store.parent.mkdir(exist_ok=True)
        _write_json_atomic(store, table)
    except OSError:  # read-only data folder: just don't remember
        pass
    return digest


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# download and verify
# ---------------------------------------------------------------------------------------------


def download(
    folder: str | Path,
    *,
    base_url: str = URL,
    files: dict[str, RemoteFile] = FILES,
    force: bool = False,
    progress: bool = True,
    timeout: float = 30.0,
) -> list[Path]:
    """Download the files into ``folder``: resumable (HTTP Range on ``<name>.part``), sha256-verified.

    A file is renamed to its final name only after its checksum matches; files already present and
    correct are skipped (``force`` re-downloads them). Fails at once with a DataError when offline.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for rf in files.values():
        final = folder / rf.name
        if final.is_file() and not force:
            if final.stat().st_size == rf.size and sha256_file(final) == rf.sha256:
                out.append(final)
                continue
            final.unlink()  # wrong size or checksum: fetch again
        _fetch(base_url.rstrip("/") + "/" + rf.name, folder / (rf.name + ".part"), rf, progress, timeout)
        os.replace(folder / (rf.name + ".part"), final)
        out.append(final)
    return out


def _fetch(url: str, part: Path, rf: RemoteFile, progress: bool, timeout: float) -> None:
    have = part.stat().st_size if part.is_file() else 0
    if have > rf.size:  # longer than the real file: start over
        part.unlink()
        have = 0
    if have < rf.size:
        req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            resp = urllib.request.urlopen(req, timeout=timeout)
        except urllib.error.HTTPError as e:
            if e.code != 416:  # 416: nothing left to send, the .part is complete
                raise DataError(
                    f"download of {url} failed: HTTP {e.code} {e.reason}; try again later"
                ) from None
            resp = None
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise DataError(
                f"cannot reach {url} ({reason}): check the internet connection, "
                f"or copy the files into {part.parent}"
            ) from None
        if resp is not None:
            with resp:
                resumed = have > 0 and resp.status == 206
                if not resumed:
                    have = 0
                with (
                    open(part, "ab" if resumed else "wb") as f,
                    tqdm(
                        total=rf.size,
                        initial=have,
                        unit="B",
                        unit_scale=True,
                        desc=rf.name,
                        disable=not progress,
                    ) as bar,
                ):
                    while chunk := resp.read(1 << 20):
                        f.write(chunk)
                        bar.update(len(chunk))
    size = part.stat().st_size
    digest = sha256_file(part)
    if size != rf.size or digest != rf.sha256:
        part.unlink()
        raise DataError(
            f"{rf.name}: downloaded {size} bytes with sha256 {digest[:12]}…, expected {rf.size} bytes "
            f"{rf.sha256[:12]}…; the partial file was removed, run the download again"
        )


def verify(folder: str | Path, files: dict[str, RemoteFile] = FILES) -> dict[str, str]:
    """file name -> "ok" | "missing" | a description of the problem, for every expected file (re-hashed)."""
    folder = Path(folder)
    status = {}
    for rf in files.values():
        path = folder / rf.name
        if not path.is_file():
            plain = path.with_suffix("")
            status[rf.name] = (
                f"decompressed copy {plain.name} present (not checked)" if plain.is_file() else "missing"
            )
        elif path.stat().st_size != rf.size:
            status[rf.name] = f"size {path.stat().st_size}, expected {rf.size}"
        elif (digest := cached_sha256(path, rehash=True)) != rf.sha256:
            status[rf.name] = f"sha256 {digest[:12]}…, expected {rf.sha256[:12]}…"
        else:
            status[rf.name] = "ok"
    return status


# ---------------------------------------------------------------------------------------------
# loading a part (train or test file set) of any smallNORB-format folder
# ---------------------------------------------------------------------------------------------

STORED_SIZE = 48  # the paper downsamples 96 -> 48
MIN_SIZE = 32  # the model's crop


@dataclass
class NorbPart:
    images: np.ndarray  # uint8 N×2×S×S (S = 48, or less for small synthetic sets), memory-mapped cache
    labels: np.ndarray  # int64 N
    meta: pd.DataFrame  # META_COLUMNS, raw codes
    identity: dict[str, str]  # file name -> sha256


def load_part(
    folder: str | Path, part: str, *, fix: str, expected: dict[str, str] | None = None, progress: bool = True
) -> NorbPart:
    """Read the dat/cat/info files of ``part`` ("train" or "test") from ``folder``, checking them.

    ``fix`` is the command that (re)creates the data, used in error messages; ``expected`` maps file
    names to sha256s that the files must have (published checksums, or a synthnorb manifest).
    """
    folder = Path(folder)
    paths = {}
    for kind in KINDS:
        p = find_file(folder, part, kind)
        if p is None:
            raise DataError(f"{folder / file_name(part, kind)} is missing; {fix}")
        paths[kind] = p
    identity = {p.name: cached_sha256(p) for p in paths.values()}
    for name, digest in identity.items():
        want = (expected or {}).get(name)
        if want is not None and digest != want:
            raise DataError(
                f"{folder / name}: sha256 {digest[:12]}… does not match the expected {want[:12]}…; {fix}"
            )
    cat = np.asarray(read_matrix(paths["cat"], fix=fix))
    info = np.asarray(read_matrix(paths["info"], fix=fix))
    _, dat_shape = read_header(paths["dat"], fix=fix)
    n = dat_shape[0]
    if cat.shape != (n,) or info.shape != (n, 4):
        raise DataError(
            f"{folder}: {part} files disagree: dat has {n} records, cat {cat.shape}, info {info.shape}; {fix}"
        )
    if len(dat_shape) != 4 or dat_shape[1] != 2 or dat_shape[2] != dat_shape[3] or dat_shape[2] < MIN_SIZE:
        raise DataError(
            f"{paths['dat']}: images of shape {dat_shape[1:]}, expected 2×S×S with S >= {MIN_SIZE}; {fix}"
        )
    if cat.min(initial=0) < 0 or cat.max(initial=0) >= len(CLASSES):
        raise DataError(f"{paths['cat']}: category codes outside 0..{len(CLASSES) - 1}; {fix}")
    images = cached_images(
        paths["dat"], min(STORED_SIZE, dat_shape[2]), identity[paths["dat"].name], fix, progress
    )
    meta = pd.DataFrame(info.astype(np.int64), columns=list(META_COLUMNS))
    return NorbPart(images, cat.astype(np.int64), meta, identity)


def cached_images(dat: Path, size: int, sha256: str, fix: str, progress: bool = True) -> np.ndarray:
    """The dat file's images downsampled to size×size, from <folder>/cache (built once, atomically).

    The cache records the source's sha256; a changed source file rebuilds it.
    """
    cache = dat.parent / "cache"
    stem = dat.name.split(".")[0]
    npy, key_file = cache / f"{stem}-{size}.npy", cache / f"{stem}-{size}.json"
    key = {"source": dat.name, "sha256": sha256, "size": size}
    if npy.is_file() and _read_json(key_file) == key:
        return np.load(npy, mmap_mode="r")
    cache.mkdir(exist_ok=True)
    _, shape = read_header(dat, fix=fix)
    n = shape[0]
    tmp = cache / f".{npy.name}.{os.getpid()}.tmp"
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, 2, size, size))
    rows, start = 512, 0
    with tqdm(total=n, desc=f"downsample {dat.name} -> {size}", unit="img", disable=not progress) as bar:
        for chunk in iter_matrix_rows(dat, rows, fix=fix):  # k×2×S×S
            k = len(chunk)
            out[start : start + k] = transforms.downsample(torch.from_numpy(chunk.copy()), size).numpy()
            start += k
            bar.update(k)
    out.flush()
    del out
    os.replace(tmp, npy)
    _write_json_atomic(key_file, key)
    return np.load(npy, mmap_mode="r")


# ---------------------------------------------------------------------------------------------
# registration
# ---------------------------------------------------------------------------------------------


def _load_smallnorb(folder: Path, part: str, *, progress: bool = True, **options) -> Part:
    _no_options("smallnorb", options)
    fix = f"download it with `python -m harness.data download smallnorb --root {shlex.quote(str(folder))}`"
    if find_file(folder, part, "dat") is None:
        raise DataError(f"smallnorb is not in {folder}: {fix} (about 260 MB)")
    p = load_part(
        folder,
        part,
        fix=fix + " --force",
        expected={n: f.sha256 for n, f in FILES.items()},
        progress=progress,
    )
    return Part(p.images, p.labels, p.meta, p.identity)


def _no_options(name: str, options: dict) -> None:
    if options:
        raise DataError(f"{name} takes no loader options, got {', '.join(sorted(options))}; remove them")


register_dataset(
    DatasetSpec(
        name="smallnorb",
        classes=CLASSES,
        input_size=32,
        augment="norb",
        channels=2,
        load=_load_smallnorb,
        doc="NYU smallNORB v1.0 (LeCun et al. 2004): 5 toy categories, 24,300 stereo pairs per split",
    )
)
