"""synthnorb: a procedural stand-in for smallNORB, rendered offline in minutes (docs/smallnorb_format.md).

Five categories of toy objects in smallNORB's order (animal, human, airplane, truck, car), ten seeded
instances each (train 4,6,7,8,9; test 0,1,2,3,5), built from analytic primitives (ellipsoids, boxes,
capped cylinders; capsules = cylinder + two spheres) and ray-cast with a z-buffer and Lambertian shading.
The object sits on a turntable: 18 azimuths (from a random starting angle per instance, ±30°) × 9 camera
elevations (30°..70°) × 6 lightings (on/off patterns of 4 lights fixed in the room), seen by two
horizontally offset cameras (a stereo pair), 96×96 on a bright uniform background. The six files use
smallNORB's names, format and record order, so the cat files and the testing info file are byte-identical
to the real ones and one loader serves both.
Objects: harness/data/shapes.py; renderer: harness/data/render.py.

    python -m harness.data synth                          # full set into data/synthnorb (~minutes)
    python -m harness.data synth --root /tmp/tiny --image-size 48 --lightings 1 --elevations 3

Same seed, same options -> same bytes (the renderer uses only elementwise float32 ops, no reductions
whose order could depend on threads).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shlex
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from harness.data import register_dataset
from harness.data import smallnorb as sn
from harness.data.base import DataError, DatasetSpec, Part
from harness.data.norb_format import MatrixWriter
from harness.data.render import render_object
from harness.data.shapes import make_object

MANIFEST = "synthnorb.json"


# ---------------------------------------------------------------------------------------------
# the dataset files
# ---------------------------------------------------------------------------------------------


def _spread(n: int, total: int, what: str) -> tuple[int, ...]:
    """n codes spread evenly over 0..total-1 (all of them when n == total)."""
    if not 1 <= n <= total:
        raise ValueError(f"{what} must be in 1..{total}, got {n}")
    return tuple(int(x) for x in np.unique(np.round(np.linspace(0, total - 1, n))))


def factors(*, lightings: int = 6, elevations: int = 9, instances: int = 5) -> dict[str, tuple[int, ...]]:
    """The codes a synthnorb set keeps for the given options."""
    if not 1 <= instances <= 5:
        raise ValueError(f"instances (per split) must be in 1..5, got {instances}")
    return {
        "elevations": _spread(elevations, 9, "elevations"),
        "lightings": _spread(lightings, 6, "lightings"),
        "train_instances": sn.INSTANCES["train"][:instances],
        "test_instances": sn.INSTANCES["test"][:instances],
    }


def labels(
    part: str, *, lightings: int = 6, elevations: int = 9, instances: int = 5
) -> tuple[np.ndarray, np.ndarray]:
    """The cat and info arrays synthesize() writes for ``part`` ("train" | "test"), without rendering."""
    f = factors(lightings=lightings, elevations=elevations, instances=instances)
    return sn.norb_labels(f[f"{part}_instances"], f["elevations"], sn.AZIMUTHS, f["lightings"])


def _render_task(task: tuple) -> np.ndarray:
    seed, category, instance, elevations, lightings, image_size = task
    prims, start = make_object(seed, category, instance)
    return render_object(prims, start, elevations, sn.AZIMUTHS, lightings, image_size)


def _init_worker() -> None:
    torch.set_num_threads(1)


def _auto_workers(n_rays: int) -> int:
    # worker processes pay ~5 s to import torch: worth it only for big sets
    return 1 if n_rays < 50_000_000 else max(1, min(4, os.cpu_count() or 1))


def synthesize(
    root: str | Path,
    *,
    seed: int = 0,
    image_size: int = 96,
    lightings: int = 6,
    elevations: int = 9,
    progress: bool = True,
    instances: int = 5,
    workers: int | None = None,
    compresslevel: int = 1,
) -> dict:
    """Render synthnorb and write the six smallNORB-format files into ``root``; returns the manifest.

    Smaller options give small sets in the same record order over the factors they keep: ``lightings``
    and ``elevations`` keep that many codes spread over the full range, ``instances`` the first k
    instances of each split (all 18 azimuths are always kept). Files are written under temporary names
    and renamed together at the end, then the manifest ``synthnorb.json`` (options + sha256s).
    ``workers``: processes rendering objects in parallel (None: up to 4 for big sets, else 1); the
    bytes do not depend on it.
    """
    if image_size < sn.MIN_SIZE:
        raise ValueError(f"image_size must be at least {sn.MIN_SIZE} (the model's crop), got {image_size}")
    f = factors(lightings=lightings, elevations=elevations, instances=instances)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    per_instance = len(f["elevations"]) * len(sn.AZIMUTHS) * len(f["lightings"]) * len(sn.CLASSES)
    tasks = [
        (seed, category, inst, f["elevations"], f["lightings"], image_size)
        for part in ("train", "test")
        for inst in f[f"{part}_instances"]
        for category in range(len(sn.CLASSES))
    ]  # in file order: part, instance, category
    n_rays = len(tasks) * len(f["elevations"]) * len(sn.AZIMUTHS) * 2 * image_size**2
    workers = _auto_workers(n_rays) if workers is None else max(1, workers)
    bar = tqdm(total=len(tasks), desc=f"synthnorb objects ({workers} worker(s))", disable=not progress)
    tmp_paths: list[Path] = []
    threads = torch.get_num_threads()
    # The arrays are small per op (~0.3M elements): one thread is fastest and never stalls on a busy machine.
    torch.set_num_threads(1)
    pool = None
    try:
        if workers > 1:
            ctx = multiprocessing.get_context("spawn")
            pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker)
            images = pool.map(_render_task, tasks)
        else:
            images = map(_render_task, tasks)
        for part in ("train", "test"):
            insts = f[f"{part}_instances"]
            cat, info = labels(part, lightings=lightings, elevations=elevations, instances=instances)
            tmp_paths += sn.write_labels(root, part, cat, info, suffix=".tmp")
            dat = root / (sn.file_name(part, "dat") + ".tmp")
            tmp_paths.append(dat)
            shape = (per_instance * len(insts), 2, image_size, image_size)
            with MatrixWriter(dat, np.uint8, shape, compresslevel=compresslevel) as w:
                for _ in insts:
                    block = []  # one E×A×L×2×S×S array per category
                    for _ in sn.CLASSES:
                        block.append(next(images))
                        bar.update()
                    # C×E×A×L×2×S×S -> E×A×L×C×2×S×S: category varies fastest, as in smallNORB
                    w.write(np.stack(block, axis=3).reshape(-1, 2, image_size, image_size))
    except BaseException:
        for p in tmp_paths:
            p.unlink(missing_ok=True)
        raise
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        bar.close()
        torch.set_num_threads(threads)
    files = {}
    for p in tmp_paths:
        final = p.with_suffix("")  # drop .tmp
        os.replace(p, final)
        files[final.name] = sn.sha256_file(final)
    manifest = {
        "dataset": "synthnorb",
        "options": dict(
            seed=seed, image_size=image_size, lightings=lightings, elevations=elevations, instances=instances
        ),
        "factors": {k: list(v) for k, v in f.items()},
        "files": files,
    }
    sn._write_json_atomic(root / MANIFEST, manifest)
    return manifest


def read_manifest(folder: str | Path) -> dict | None:
    path = Path(folder) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def synth_command(folder: str | Path, options: dict | None = None) -> str:
    """The command that renders ``folder`` (again), with the render options a manifest recorded."""
    options = options or {}
    order = ("seed", "image_size", "lightings", "elevations", "instances")  # the synth command's flags
    flags = [f"--{key.replace('_', '-')} {options[key]}" for key in order if key in options]
    return " ".join(["python -m harness.data synth --root", shlex.quote(str(folder)), *flags])


# ---------------------------------------------------------------------------------------------
# registration
# ---------------------------------------------------------------------------------------------


def verify(folder: str | Path) -> dict[str, str]:
    """file name -> "ok" | "missing" | the problem, against the manifest synthesize() wrote (re-hashed)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        return {MANIFEST: "missing"}
    status = {}
    for name, digest in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            status[name] = "missing"
        elif (got := sn.cached_sha256(path, rehash=True)) != digest:
            status[name] = f"sha256 {got[:12]}…, expected {digest[:12]}… (from {MANIFEST})"
        else:
            status[name] = "ok"
    return status


def _load_synthnorb(folder: Path, part: str, *, progress: bool = True, **options) -> Part:
    sn._no_options("synthnorb", options)
    manifest = read_manifest(folder)
    if manifest is None:
        raise DataError(
            f"synthnorb is not in {folder}: make it with `{synth_command(folder)}` "
            "(a few minutes; add --image-size 48 --lightings 1 for a quick small set)"
        )
    fix = f"regenerate it: `{synth_command(folder, manifest.get('options'))}`"
    p = sn.load_part(folder, part, fix=fix, expected=manifest["files"], progress=progress)
    return Part(p.images, p.labels, p.meta, p.identity)


register_dataset(
    DatasetSpec(
        name="synthnorb",
        classes=sn.CLASSES,
        input_size=32,
        augment="norb",
        channels=2,
        load=_load_synthnorb,
        doc="procedural smallNORB stand-in in the same format (python -m harness.data synth)",
    )
)
