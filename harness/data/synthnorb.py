"""synthnorb: a procedural stand-in for smallNORB, rendered offline in minutes (DESIGN §5).

Five categories of toy objects in smallNORB's order (animal, human, airplane, truck, car), ten seeded
instances each (train 4,6,7,8,9; test 0,1,2,3,5), built from analytic primitives (ellipsoids, boxes,
capped cylinders; capsules = cylinder + two spheres) and ray-cast with a z-buffer and Lambertian shading.
The object sits on a turntable: 18 azimuths (from a random starting angle per instance, ±30°) × 9 camera
elevations (30°..70°) × 6 lightings (on/off patterns of 4 lights fixed in the room), seen by two
horizontally offset cameras (a stereo pair), 96×96 on a bright uniform background. The six files use
smallNORB's names, format and record order, so the cat files and the testing info file are byte-identical
to the real ones and one loader serves both.

    python -m harness.data synth                          # full set into data/synthnorb (~minutes)
    python -m harness.data synth --root /tmp/tiny --image-size 48 --lightings 1 --elevations 3

Same seed, same options -> same bytes (the renderer uses only elementwise float32 ops, no reductions
whose order could depend on threads).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from harness.data import register_dataset
from harness.data import smallnorb as sn
from harness.data.base import DataError, DatasetSpec, Part

MANIFEST = "synthnorb.json"
BACKGROUND = 0.82  # bright uniform background, as smallNORB's
AMBIENT = 0.22
# on/off patterns of the 4 room lights for the 6 lighting conditions
LIGHT_PATTERNS = np.array(
    [[1, 1, 1, 1], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1], [1, 0, 0, 1], [1, 0, 1, 0]], dtype=np.float64
)
LIGHT_AZIMUTHS = np.radians([40.0, 130.0, 220.0, 310.0])  # room frame, around the turntable
LIGHT_ELEVATIONS = np.radians([55.0, 35.0, 60.0, 30.0])
CAMERA_DISTANCE = 5.0
TAN_HALF_FOV = 0.25
STEREO_BASELINE = 0.35  # distance between the two cameras (object radius is ~1.1)
OBJECT_RADIUS = 1.1
# Each instance starts the turntable at a random angle within ±START_JITTER_DEG of its category's canonical
# facing. Uniformly random starts (0..360°) would make every raw azimuth code show every facing somewhere
# in the training instances, and the novel-azimuth split would no longer be novel (measured: cnn_small had
# the same familiar and novel error); smallNORB's azimuth codes likewise mean similar facings per category.
START_JITTER_DEG = 30.0
SPHERE, BOX, CYLINDER = 0, 1, 2


# ---------------------------------------------------------------------------------------------
# objects: lists of primitives
# ---------------------------------------------------------------------------------------------


@dataclass
class Prim:
    kind: int  # SPHERE (unit ball), BOX ([-1,1]^3) or CYLINDER (x²+y² <= 1, |z| <= 1)
    center: np.ndarray  # 3
    half: np.ndarray  # 3 half-extents along the local axes
    rot: np.ndarray  # 3×3 local -> world
    albedo: float


def _rot(axis: str, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    if axis == "x":
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    if axis == "y":
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def _along(direction) -> np.ndarray:
    """A rotation taking the local z axis to ``direction`` (for cylinders)."""
    z = np.asarray(direction, float) / np.linalg.norm(direction)
    helper = np.array([0.0, 1.0, 0.0]) if abs(z[1]) < 0.9 else np.array([1.0, 0.0, 0.0])
    x = np.cross(helper, z)
    x /= np.linalg.norm(x)
    return np.stack([x, np.cross(z, x), z], axis=1)


def ellipsoid(center, half, albedo, rot=None) -> Prim:
    return Prim(
        SPHERE, np.asarray(center, float), np.asarray(half, float), np.eye(3) if rot is None else rot, albedo
    )


def box(center, half, albedo, rot=None) -> Prim:
    return Prim(
        BOX, np.asarray(center, float), np.asarray(half, float), np.eye(3) if rot is None else rot, albedo
    )


def rod(a, b, radius, albedo) -> Prim:
    """A capped cylinder from point a to point b."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    return Prim(
        CYLINDER, (a + b) / 2, np.array([radius, radius, np.linalg.norm(b - a) / 2]), _along(b - a), albedo
    )


def capsule(a, b, radius, albedo) -> list[Prim]:
    return [rod(a, b, radius, albedo), ellipsoid(a, [radius] * 3, albedo), ellipsoid(b, [radius] * 3, albedo)]


def make_animal(r: np.random.Generator) -> list[Prim]:
    """Four legs, a body, a neck, a head and a tail; proportions vary from dachshund to giraffe."""
    c = r.uniform(0.45, 0.9)
    L, H, W = r.uniform(0.55, 0.95), r.uniform(0.2, 0.32), r.uniform(0.18, 0.3)
    leg, lr = r.uniform(0.25, 0.7), r.uniform(0.05, 0.09)
    y = leg + H * 0.6
    prims = [ellipsoid([0, y, 0], [L, H, W], c)]
    for sx in (-1, 1):
        for sz in (-1, 1):
            x, z = sx * L * 0.65, sz * W * 0.6
            prims.append(rod([x, y - H * 0.3, z], [x + r.uniform(-0.08, 0.08), 0.0, z], lr, c * 0.9))
    neck_len, neck_up = r.uniform(0.2, 0.75), r.uniform(0.3, 1.3)
    n0 = np.array([L * 0.8, y + H * 0.3, 0])
    n1 = n0 + neck_len * np.array([math.cos(neck_up), math.sin(neck_up), 0])
    prims.append(rod(n0, n1, lr * 1.2, c))
    hs = r.uniform(0.12, 0.2)
    prims.append(ellipsoid(n1 + [hs * 0.6, 0, 0], [hs * 1.5, hs, hs * 0.9], c * 1.05))
    for sz in (-1, 1):  # ears
        prims.append(ellipsoid(n1 + [0, hs * 0.9, sz * hs * 0.5], [0.04, hs * 0.6, 0.04], c))
    t_up = r.uniform(-0.6, 0.9)
    prims.append(
        rod([-L * 0.9, y, 0], [-L * 0.9 - 0.4 * math.cos(t_up), y + 0.4 * math.sin(t_up), 0], 0.035, c)
    )
    return prims


def make_human(r: np.random.Generator) -> list[Prim]:
    """Legs, torso, head and two arms in a random pose."""
    c = r.uniform(0.45, 0.9)
    leg, hip, sh = r.uniform(0.7, 0.9), r.uniform(0.1, 0.16), r.uniform(0.2, 0.3)
    torso = r.uniform(0.55, 0.75)
    prims = []
    stride = r.uniform(-0.35, 0.35)
    for s in (-1, 1):
        prims += capsule([0, leg, s * hip], [s * stride * leg * 0.5, 0.05, s * hip * 1.1], 0.07, c * 0.85)
    prims.append(ellipsoid([0, leg + torso / 2, 0], [0.13, torso / 2, sh], c))
    head = r.uniform(0.11, 0.15)
    prims.append(ellipsoid([0, leg + torso + head * 1.1, 0], [head * 0.9, head * 1.1, head * 0.85], c * 1.05))
    for s in (-1, 1):
        up, fwd = r.uniform(-1.3, 1.4), r.uniform(-0.6, 0.6)
        a = np.array([0, leg + torso * 0.92, s * sh])
        d = np.array([math.sin(fwd) * math.cos(up), math.sin(up), s * abs(math.cos(up)) * 0.7])
        prims += capsule(a, a + 0.6 * d / np.linalg.norm(d), 0.055, c * 0.95)
    return prims


def make_airplane(r: np.random.Generator) -> list[Prim]:
    """Fuselage capsule, swept wings, tail fin and stabilisers, optional engines."""
    c = r.uniform(0.5, 0.95)
    L, R = r.uniform(0.9, 1.2), r.uniform(0.09, 0.14)
    y = 0.4
    prims = capsule([-L, y, 0], [L, y, 0], R, c)
    span, chord, sweep = r.uniform(0.8, 1.15), r.uniform(0.16, 0.3), r.uniform(-0.1, 0.6)
    wx, wy = r.uniform(-0.2, 0.25), y + r.uniform(-0.7, 0.7) * R
    for s in (-1, 1):
        prims.append(
            box(
                [wx - 0.5 * span * math.sin(sweep) * 0.6, wy, s * span / 2],
                [chord, 0.025, span / 2],
                c * 0.95,
                _rot("y", s * sweep),
            )
        )
    fin_h = r.uniform(0.2, 0.35)
    prims.append(box([-L * 0.9, y + R + fin_h / 2, 0], [0.15, fin_h / 2, 0.02], c * 0.9, _rot("z", 0.3)))
    prims.append(box([-L * 0.9, y + r.uniform(0, 1.0) * R, 0], [0.1, 0.02, r.uniform(0.2, 0.35)], c * 0.9))
    if r.random() < 0.6:
        for s in (-1, 1):
            prims.append(
                rod(
                    [wx + 0.3, wy - 0.1, s * span * 0.35],
                    [wx - 0.05, wy - 0.1, s * span * 0.35],
                    0.06,
                    c * 0.6,
                )
            )
    return prims


def _wheels(xs, half_width, radius, y=None) -> list[Prim]:
    y = radius if y is None else y
    return [
        rod([x, y, s * half_width], [x, y, s * (half_width + 0.1)], radius, 0.25) for x in xs for s in (-1, 1)
    ]


def make_truck(r: np.random.Generator) -> list[Prim]:
    """A cab and a taller cargo box on 4 or 6 wheels."""
    c = r.uniform(0.45, 0.95)
    wheel = r.uniform(0.14, 0.2)
    W = r.uniform(0.32, 0.42)
    cab_l, cargo_l = r.uniform(0.25, 0.35), r.uniform(0.6, 0.9)
    base = wheel * 1.2
    cab_h, cargo_h = r.uniform(0.3, 0.45), r.uniform(0.45, 0.7)
    x_cab = cargo_l + 0.05 + cab_l
    prims = [
        box([x_cab - cargo_l * 0.5, base + cab_h, 0], [cab_l, cab_h, W], c),
        box([-cargo_l * 0.5, base + cargo_h + 0.03, 0], [cargo_l, cargo_h, W * 1.05], r.uniform(0.45, 0.95)),
        box(
            [(x_cab - cargo_l) / 2 - cargo_l * 0.25, base * 0.9, 0],
            [(x_cab + cab_l + cargo_l) / 2, 0.05, W * 0.9],
            0.35,
        ),
    ]
    xs = [x_cab - cargo_l * 0.5, -cargo_l * 0.9] + ([-cargo_l * 0.5] if r.random() < 0.5 else [])
    return prims + _wheels(xs, W * 0.9, wheel)


def make_car(r: np.random.Generator) -> list[Prim]:
    """A low body, a cabin (sedan, hatchback or pick-up), four wheels."""
    c = r.uniform(0.45, 0.95)
    L, W, H = r.uniform(0.8, 1.05), r.uniform(0.33, 0.42), r.uniform(0.13, 0.2)
    wheel = r.uniform(0.13, 0.17)
    base = wheel * 1.1
    style = r.integers(3)
    cab_l = L * (0.45, 0.6, 0.3)[style]
    cab_x = (0.0, -L + cab_l + 0.05, 0.15)[style]
    cab_h = r.uniform(0.12, 0.18)
    prims = [
        box([0, base + H, 0], [L, H, W], c),
        box([cab_x, base + 2 * H + cab_h, 0], [cab_l, cab_h, W * 0.85], c * 0.8),
    ]
    return prims + _wheels([L * 0.65, -L * 0.65], W * 0.85, wheel)


MAKERS = (make_animal, make_human, make_airplane, make_truck, make_car)


def make_object(seed: int, category: int, instance: int) -> tuple[list[Prim], float]:
    """The primitives of one object, centred and scaled to OBJECT_RADIUS, and its starting azimuth."""
    r = np.random.default_rng([seed, category, instance])
    prims = MAKERS[category](r)
    start = math.radians(r.uniform(-START_JITTER_DEG, START_JITTER_DEG))
    # centre and scale from the corners of every primitive's bounding box
    corners = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], float)
    pts = np.concatenate([p.center + (corners * p.half) @ p.rot.T for p in prims])
    mid = (pts.min(0) + pts.max(0)) / 2
    scale = OBJECT_RADIUS / np.linalg.norm(pts - mid, axis=1).max()
    for p in prims:
        p.center = (p.center - mid) * scale
        p.half = p.half * scale
    return prims, start


# ---------------------------------------------------------------------------------------------
# ray casting
# ---------------------------------------------------------------------------------------------


def _cameras(elev_deg: np.ndarray, turn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Camera origins and bases (V×3, V×3×3 rows right/up/forward) in the object's frame, left and right.

    The turntable turns the object by ``turn``; in the object's frame the camera (and the room's lights)
    turn by -turn. Output views are ordered (elevation, azimuth, camera).
    """
    th = np.radians(elev_deg)[:, None]  # E×1
    ph = -np.asarray(turn)[None, :]  # 1×A
    pos = CAMERA_DISTANCE * np.stack(
        np.broadcast_arrays(np.cos(th) * np.sin(ph), np.sin(th), np.cos(th) * np.cos(ph)), -1
    )  # E×A×3
    fwd = -pos / np.linalg.norm(pos, axis=-1, keepdims=True)
    right = np.cross(fwd, [0.0, 1.0, 0.0])
    right /= np.linalg.norm(right, axis=-1, keepdims=True)
    up = np.cross(right, fwd)
    origins = np.stack(
        [pos - right * STEREO_BASELINE / 2, pos + right * STEREO_BASELINE / 2], axis=2
    )  # E×A×2×3
    basis = np.stack([right, up, fwd], axis=-2)[:, :, None].repeat(2, axis=2)  # E×A×2×3×3
    return origins.reshape(-1, 3), basis.reshape(-1, 3, 3)


def _light_dirs(turn: np.ndarray) -> np.ndarray:
    """Unit directions to the 4 room lights in the object's frame, per azimuth: A×4×3."""
    ph = LIGHT_AZIMUTHS[None, :] - np.asarray(turn)[:, None]  # A×4
    el = LIGHT_ELEVATIONS[None, :]
    return np.stack(np.broadcast_arrays(np.cos(el) * np.sin(ph), np.sin(el), np.cos(el) * np.cos(ph)), -1)


def _intersect(prim: Prim, o: list[torch.Tensor], d: list[torch.Tensor]):
    """Entry distance t (inf = miss) and local normal of rays o + t d with one primitive.

    o: 3 tensors V×1 (ray origins), d: 3 tensors V×P (directions), world frame. The primitive's local
    frame is p_l = A (p - c) with A = diag(1/half) Rᵀ, which keeps t, so all primitives share one z-buffer.
    """
    A = (prim.rot / prim.half[None, :]).T  # 3×3: rows = local axes scaled
    oc = [o[k] - float(prim.center[k]) for k in range(3)]
    ol = [sum(float(A[i, k]) * oc[k] for k in range(3)) for i in range(3)]  # 3 × V×1
    dl = [sum(float(A[i, k]) * d[k] for k in range(3)) for i in range(3)]  # 3 × V×P
    inf = torch.full_like(dl[0], math.inf)
    if prim.kind == SPHERE:
        t0, t1 = _quadratic(ol, dl, 3)
        t = torch.where(t0 < t1, t0, inf)
        hit = [ol[k] + t.clamp_max(1e9) * dl[k] for k in range(3)]
        normal = hit
    elif prim.kind == BOX:
        near, far, axis = _slabs(ol, dl, range(3))
        t = torch.where(near <= far, near, inf)
        normal = [torch.where(axis == k, -torch.sign(dl[k]), 0.0) for k in range(3)]
    else:  # capped cylinder: infinite cylinder ∩ slab |z| <= 1
        t0, t1 = _quadratic(ol, dl, 2)
        zn, zf, _ = _slabs(ol, dl, [2])
        near, far = torch.maximum(t0, zn), torch.minimum(t1, zf)
        t = torch.where((near <= far) & (t0 < t1), near, inf)
        side = t0 >= zn
        tc = t.clamp_max(1e9)
        normal = [
            torch.where(side, ol[0] + tc * dl[0], 0.0),
            torch.where(side, ol[1] + tc * dl[1], 0.0),
            torch.where(side, 0.0, -torch.sign(dl[2])),
        ]
    t = torch.where(t > 1e-4, t, inf)
    # local normal n_l -> world normal Aᵀ n_l (normalised later)
    world = [sum(float(A[i, k]) * normal[i] for i in range(3)) for k in range(3)]
    return t, world


def _quadratic(ol, dl, dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Both roots of |o + t d|² = 1 over the first ``dims`` coordinates; (inf, -inf) when there are none."""
    a = sum(dl[k] * dl[k] for k in range(dims)).clamp_min(1e-12)
    b = sum(ol[k] * dl[k] for k in range(dims))
    c = sum(ol[k] * ol[k] for k in range(dims)) - 1.0
    disc = b * b - a * c
    ok = disc >= 0
    root = disc.clamp_min(0).sqrt()
    t0 = torch.where(ok, (-b - root) / a, math.inf)
    t1 = torch.where(ok, (-b + root) / a, -math.inf)
    return t0, t1


def _slabs(ol, dl, axes) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Entry/exit t of the slabs |x_k| <= 1 for k in axes, and the axis of entry."""
    near = far = axis = None
    for k in axes:
        dk = torch.where(dl[k].abs() < 1e-12, 1e-12, dl[k])
        ta, tb = (-1.0 - ol[k]) / dk, (1.0 - ol[k]) / dk
        lo, hi = torch.minimum(ta, tb), torch.maximum(ta, tb)
        if near is None:
            near, far, axis = lo, hi, torch.full_like(lo, k)
        else:
            axis = torch.where(lo > near, float(k), axis)
            near, far = torch.maximum(near, lo), torch.minimum(far, hi)
    return near, far, axis


def render_object(
    prims: list[Prim], start: float, elevations, azimuths, lightings, image_size: int, chunk_views: int = 36
) -> np.ndarray:
    """uint8 images E×A×L×2×S×S of one object: elevation/azimuth/lighting codes, left and right camera."""
    E, A, L, S = len(elevations), len(azimuths), len(lightings), image_size
    turn = start + np.radians(10.0 * np.asarray(azimuths, float))
    origins, basis = _cameras(30.0 + 5.0 * np.asarray(elevations, float), turn)  # V×3, V×3×3 (V = E·A·2)
    lights = _light_dirs(turn)  # A×4×3
    weights = LIGHT_PATTERNS[list(lightings)]  # L×4
    weights = weights * (0.95 / np.sqrt(weights.sum(1, keepdims=True)))  # dimmer per light when more are on
    # pixel grid: ndc x to the right, y up, centres of pixels
    u = (torch.arange(S, dtype=torch.float64) + 0.5) / S * 2 - 1
    px = (u * TAN_HALF_FOV)[None, :].expand(S, S).reshape(-1)  # P
    py = (-u * TAN_HALF_FOV)[:, None].expand(S, S).reshape(-1)  # P
    out = np.empty((E * A * 2, L, S * S), np.uint8)
    V = len(origins)
    for v0 in range(0, V, chunk_views):
        sl = slice(v0, min(V, v0 + chunk_views))
        bs = torch.from_numpy(basis[sl])  # v×3×3
        o = [torch.from_numpy(origins[sl, k]).float()[:, None] for k in range(3)]  # 3 × v×1
        d = [(bs[:, 2, k, None] + px * bs[:, 0, k, None] + py * bs[:, 1, k, None]).float() for k in range(3)]
        depth = torch.full_like(d[0], math.inf)
        normal = [torch.zeros_like(d[0]) for _ in range(3)]
        albedo = torch.zeros_like(d[0])
        for p in prims:
            t, n = _intersect(p, o, d)
            closer = t < depth
            depth = torch.where(closer, t, depth)
            normal = [torch.where(closer, n[k], normal[k]) for k in range(3)]
            albedo = torch.where(closer, p.albedo, albedo)
        length = (
            (normal[0] * normal[0] + normal[1] * normal[1] + normal[2] * normal[2]).sqrt().clamp_min(1e-12)
        )
        normal = [n / length for n in normal]
        # lights depend on the azimuth of each view: view index = (e*A + a)*2 + camera
        az_index = (np.arange(sl.start, sl.stop) // 2) % A
        ld = torch.from_numpy(lights[az_index]).float()  # v×4×3
        lam = [
            (
                normal[0] * ld[:, j, 0, None] + normal[1] * ld[:, j, 1, None] + normal[2] * ld[:, j, 2, None]
            ).clamp_min(0)
            for j in range(4)
        ]  # 4 × v×P
        hit = torch.isfinite(depth)
        for li in range(L):
            w = [float(x) for x in weights[li]]
            shade = AMBIENT + w[0] * lam[0] + w[1] * lam[1] + w[2] * lam[2] + w[3] * lam[3]
            img = torch.where(hit, albedo * shade, BACKGROUND)
            out[sl, li] = (img.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    # V×L×P -> E×A×2×L×S×S -> E×A×L×2×S×S
    return out.reshape(E, A, 2, L, S, S).transpose(0, 1, 3, 2, 4, 5)


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
            with sn.MatrixWriter(dat, np.uint8, shape, compresslevel=compresslevel) as w:
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


# ---------------------------------------------------------------------------------------------
# registration
# ---------------------------------------------------------------------------------------------


def verify(folder: str | Path) -> dict[str, str]:
    """file name -> "ok" | "missing" | the problem, against the manifest written by synthesize()."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        return {MANIFEST: "missing"}
    status = {}
    for name, digest in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            status[name] = "missing"
        elif (got := sn.cached_sha256(path)) != digest:
            status[name] = f"sha256 {got[:12]}…, expected {digest[:12]}… (from {MANIFEST})"
        else:
            status[name] = "ok"
    return status


def _load_synthnorb(folder: Path, part: str, *, progress: bool = True, **options) -> Part:
    sn._no_options("synthnorb", options)
    fix = f"make it with `python -m harness.data synth --root {folder}`"
    manifest = read_manifest(folder)
    if manifest is None or sn.find_file(folder, part, "dat") is None:
        raise DataError(
            f"synthnorb is not in {folder}: {fix} "
            "(a few minutes; add --image-size 48 --lightings 1 for a quick small set)"
        )
    p = sn.load_part(folder, part, fix=f"regenerate it: {fix}", expected=manifest["files"], progress=progress)
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
