"""synthnorb: golden label files, determinism, record order, the ray caster against a float64 reference."""

from __future__ import annotations

import gzip
import hashlib
import math

import numpy as np
import pytest
import torch

from harness.data import DataError, get_dataset, render
from harness.data import norb_format as fmt
from harness.data import smallnorb as sn
from harness.data import synthnorb as syn

TINY = dict(image_size=32, lightings=2, elevations=2, instances=1, progress=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    return root, syn.synthesize(root, seed=0, **TINY)


def test_full_size_label_files_are_smallnorbs(tmp_path):
    """With the full options synthnorb's cat files and testing info file equal the real ones (md5)."""
    for part in ("train", "test"):
        cat, info = syn.labels(part)
        paths = sn.write_labels(tmp_path, part, cat, info)
        md5 = [hashlib.md5(gzip.decompress(p.read_bytes())).hexdigest() for p in paths]
        assert md5[0] == sn.UNCOMPRESSED_MD5["cat"]
        if part == "test":
            assert md5[1] == sn.UNCOMPRESSED_MD5["testing-info"]
        assert info.shape == (24300, 4) and sorted(set(info[:, 0])) == list(sn.INSTANCES[part])


def test_same_seed_same_bytes(tiny, tmp_path):
    root, manifest = tiny
    again = syn.synthesize(tmp_path / "a", seed=0, **TINY)
    assert again == manifest
    for name in manifest["files"]:
        assert (root / name).read_bytes() == (tmp_path / "a" / name).read_bytes()
    other = syn.synthesize(tmp_path / "b", seed=1, **TINY)
    dat = sn.file_name("test", "dat")
    assert other["files"][dat] != manifest["files"][dat]
    assert other["files"][sn.file_name("test", "cat")] == manifest["files"][sn.file_name("test", "cat")]
    assert not list((tmp_path / "a").glob("*.tmp"))
    for name in manifest["files"]:  # published names end in .mat.gz: the files are gzip
        assert (root / name).read_bytes()[:2] == b"\x1f\x8b"


@pytest.mark.slow  # spawning the workers costs ~10 s (each imports torch)
def test_worker_processes_give_the_same_bytes(tiny, tmp_path):
    root, manifest = tiny
    assert syn.synthesize(tmp_path, seed=0, workers=2, **TINY) == manifest


def test_small_set_keeps_record_order(tiny):
    root, manifest = tiny
    f = syn.factors(lightings=2, elevations=2, instances=1)
    assert f["elevations"] == (0, 8) and f["lightings"] == (0, 5)  # spread over the full range
    for part in ("train", "test"):
        info = fmt.read_matrix(root / sn.file_name(part, "info"))
        cat = fmt.read_matrix(root / sn.file_name(part, "cat"))
        want_cat, want_info = sn.norb_labels(
            f[f"{part}_instances"], f["elevations"], sn.AZIMUTHS, f["lightings"]
        )
        np.testing.assert_array_equal(info, want_info)
        np.testing.assert_array_equal(cat, want_cat)
        assert fmt.read_header(root / sn.file_name(part, "dat")) == (np.dtype("u1"), (len(cat), 2, 32, 32))


def test_images_show_objects_in_stereo(tiny):
    root, _ = tiny
    dat = np.asarray(fmt.read_matrix(root / sn.file_name("test", "dat")))  # N×2×32×32
    background = round(render.BACKGROUND * 255)
    assert (dat[:, :, 0, 0] == background).all()  # corners are background
    object_fraction = (dat != background).mean(axis=(2, 3))  # N×2
    assert object_fraction.min() > 0.02, "every view shows the object"
    assert (dat[:, 0] != dat[:, 1]).any(axis=(1, 2)).mean() > 0.95, "the two cameras differ"
    # lightings differ (record order: category fastest, then lighting)
    assert (dat[0] != dat[5]).any()
    # categories differ in silhouette area on average
    areas = [object_fraction[c::5].mean() for c in range(5)]
    assert max(areas) - min(areas) > 0.02


def test_missing_synthnorb_says_how_to_make_it(tmp_path):
    with pytest.raises(DataError, match=r"synthnorb is not in .*python -m harness\.data synth --root"):
        get_dataset("synthnorb", "train", root=tmp_path)


def test_tampered_file_is_detected(tiny, tmp_path):
    root, manifest = tiny
    copy = tmp_path / "copy"
    syn.synthesize(copy, seed=0, **TINY)
    info = copy / sn.file_name("test", "info")
    cat, bad = sn.norb_labels((0,), (0, 8), sn.AZIMUTHS, (0, 5))
    bad = bad.copy()
    bad[0, 1] = 3
    fmt.write_matrix(info, bad)
    assert syn.verify(copy)[info.name].startswith("sha256")
    with pytest.raises(DataError, match=r"testing-info.*does not match.*regenerate it"):
        get_dataset("synthnorb", "test", root=copy, progress=False)


def test_option_errors(tmp_path):
    with pytest.raises(ValueError, match="image_size must be at least 32"):
        syn.synthesize(tmp_path, image_size=16)
    with pytest.raises(ValueError, match="lightings must be in 1..6"):
        syn.factors(lightings=7)


# --- the ray caster against a float64 ray-marching reference -----------------------------------


def _inside(kind: int, p: np.ndarray) -> np.ndarray:
    if kind == render.SPHERE:
        return (p**2).sum(-1) <= 1
    if kind == render.BOX:
        return (np.abs(p) <= 1).all(-1)
    return ((p[..., :2] ** 2).sum(-1) <= 1) & (np.abs(p[..., 2]) <= 1)


@pytest.mark.parametrize("kind", [render.SPHERE, render.BOX, render.CYLINDER])
def test_intersection_matches_float64_marching(kind):
    r = np.random.default_rng(kind)
    rot = render.rotation("x", 0.7) @ render.rotation("y", -0.4) @ render.rotation("z", 1.1)
    prim = render.Prim(kind, np.array([0.2, -0.1, 0.3]), np.array([0.8, 0.5, 0.6]), rot, 0.5)
    origin = np.array([0.3, 0.8, 4.0])
    target = r.uniform(-1.0, 1.0, size=(300, 3))  # rays through points around the primitive
    d = target - origin
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    o_t = [torch.tensor([[origin[k]]], dtype=torch.float32) for k in range(3)]
    d_t = [torch.tensor(d[None, :, k], dtype=torch.float32) for k in range(3)]
    t, normal = render._intersect(prim, o_t, d_t)
    t = t[0].double().numpy()
    # reference: march in float64 and find the first point inside, in the primitive's local frame
    steps = np.arange(2.0, 7.0, 1e-3)
    pts = origin + steps[None, :, None] * d[:, None, :]  # R×T×3
    local = ((pts - prim.center) @ rot) / prim.half
    inside = _inside(kind, local)
    hit_ref = inside.any(1)
    t_ref = np.where(hit_ref, steps[inside.argmax(1)], np.inf)
    both = np.isfinite(t) & hit_ref
    assert hit_ref.sum() > 50 and (~hit_ref).sum() > 50
    assert (np.isfinite(t) == hit_ref).mean() > 0.99  # only grazing rays may disagree
    assert np.abs(t[both] - t_ref[both]).max() < 1.5e-3
    # the normal points back towards the camera at every hit
    n = np.stack([x[0].double().numpy() for x in normal], -1)
    assert ((n[both] * d[both]).sum(-1) < 0).all()


def test_camera_geometry():
    origins, basis = render._cameras(np.array([30.0, 70.0]), np.array([0.0, math.pi / 2]))
    assert origins.shape == (8, 3) and basis.shape == (8, 3, 3)
    left, right = origins[0], origins[1]
    assert np.isclose(np.linalg.norm(right - left), render.STEREO_BASELINE)
    mid = (left + right) / 2
    assert np.isclose(np.degrees(np.arcsin(mid[1] / np.linalg.norm(mid))), 30.0)
    for b in basis:
        np.testing.assert_allclose(b @ b.T, np.eye(3), atol=1e-12)  # orthonormal right/up/forward
