"""synthnorb's toy objects: five categories in smallNORB's order, built from analytic primitives.

Each maker draws its proportions and pose from a seeded generator, so (seed, category, instance) fixes
an object. ``make_object`` centres it, scales it to OBJECT_RADIUS and draws its turntable start.
"""

from __future__ import annotations

import math

import numpy as np

from harness.data.render import Prim, box, capsule, ellipsoid, rod, rotation

OBJECT_RADIUS = 1.1
# Each instance starts the turntable at a random angle within ±START_JITTER_DEG of its category's canonical
# facing. Uniformly random starts (0..360°) would make every raw azimuth code show every facing somewhere
# in the training instances, and the novel-azimuth split would no longer be novel (measured: cnn_small had
# the same familiar and novel error); smallNORB's azimuth codes likewise mean similar facings per category.
START_JITTER_DEG = 30.0


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
                rotation("y", s * sweep),
            )
        )
    fin_h = r.uniform(0.2, 0.35)
    prims.append(box([-L * 0.9, y + R + fin_h / 2, 0], [0.15, fin_h / 2, 0.02], c * 0.9, rotation("z", 0.3)))
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
