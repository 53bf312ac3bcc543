"""A small vectorised ray caster: analytic primitives, a z-buffer, Lambertian lights (synthnorb's renderer).

Primitives are the unit sphere, the cube [-1,1]³ and the capped cylinder x²+y² <= 1, |z| <= 1, each placed
by a centre, half-extents and a rotation (so ellipsoids, boxes, rods and capsules). Rays are intersected
with every primitive in the primitive's own frame, which keeps the ray parameter t, so one z-buffer serves
all. The scene is a turntable: the object turns by the azimuth, the stereo cameras sit at an elevation, and
4 lights are fixed in the room. Only elementwise float32 ops are used (no reductions whose order could
depend on the thread count), so the same scene gives the same bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

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
STEREO_BASELINE = 0.35  # distance between the two cameras (objects are scaled to radius ~1.1)
SPHERE, BOX, CYLINDER = 0, 1, 2


# ---------------------------------------------------------------------------------------------
# primitives
# ---------------------------------------------------------------------------------------------


@dataclass
class Prim:
    kind: int  # SPHERE (unit ball), BOX ([-1,1]^3) or CYLINDER (x²+y² <= 1, |z| <= 1)
    center: np.ndarray  # 3
    half: np.ndarray  # 3 half-extents along the local axes
    rot: np.ndarray  # 3×3 local -> world
    albedo: float


def rotation(axis: str, angle: float) -> np.ndarray:
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
