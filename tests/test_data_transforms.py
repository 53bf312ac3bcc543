"""Batched preprocessing against float64 numpy references, and iterate()'s determinism."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from harness.data import ArrayDataset, iterate, transforms


def _images(n=6, c=2, s=48, seed=0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, c, s, s), dtype=np.uint8))


def test_downsample_is_a_2x2_box_filter():
    x = _images(s=96)
    ref = x.numpy().astype(np.float64).reshape(6, 2, 48, 2, 48, 2).mean(axis=(3, 5))  # float64 2×2 means
    got = transforms.downsample(x, 48)
    assert got.dtype == torch.uint8 and got.shape == (6, 2, 48, 48)
    np.testing.assert_array_equal(got.numpy(), np.round(ref))
    assert transforms.downsample(got, 48) is got


def test_crop_matches_slicing():
    x = transforms.to_float(_images())
    top, left = torch.tensor([0, 16, 3, 7, 16, 0]), torch.tensor([16, 0, 9, 2, 16, 0])
    out = transforms.crop(x, top, left, 32)
    for n in range(6):
        t, l = int(top[n]), int(left[n])
        np.testing.assert_array_equal(out[n].numpy(), x[n, :, t : t + 32, l : l + 32].numpy())
    np.testing.assert_array_equal(transforms.center_crop(x, 32).numpy(), x[:, :, 8:40, 8:40].numpy())


def test_brightness_contrast_matches_float64():
    x = transforms.to_float(_images())
    delta = torch.tensor([0.1, -0.1, 0.0, 0.05, -0.12, 0.125])
    factor = torch.tensor([0.5, 1.5, 1.0, 0.8, 1.2, 1.45])
    got = transforms.adjust_brightness_contrast(x, delta, factor).numpy()
    xd = x.numpy().astype(np.float64) + delta.numpy().astype(np.float64)[:, None, None, None]
    mean = xd.mean(axis=(2, 3), keepdims=True)
    ref = np.clip((xd - mean) * factor.numpy().astype(np.float64)[:, None, None, None] + mean, 0, 1)
    np.testing.assert_allclose(got, ref, atol=1e-6)


def test_uint8_to_float():
    x = torch.tensor([0, 1, 128, 255], dtype=torch.uint8)
    np.testing.assert_allclose(transforms.to_float(x).numpy(), np.array([0, 1, 128, 255]) / 255.0, rtol=1e-7)


def test_norb_train_preprocess_is_seeded():
    x = _images()
    a = transforms.norb_preprocess(x, train=True, generator=torch.Generator().manual_seed(3))
    b = transforms.norb_preprocess(x, train=True, generator=torch.Generator().manual_seed(3))
    c = transforms.norb_preprocess(x, train=True, generator=torch.Generator().manual_seed(4))
    assert a.shape == (6, 2, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1
    e = transforms.norb_preprocess(x, train=False)
    assert torch.equal(e, transforms.to_float(x)[:, :, 8:40, 8:40])


def test_crop_too_large_is_an_error():
    with pytest.raises(ValueError, match="cannot crop 32×32 from 28×28"):
        transforms.center_crop(torch.zeros(1, 1, 28, 28), 32)


def _dataset(n=50) -> ArrayDataset:
    meta = pd.DataFrame({"instance": 0, "elevation": 0, "azimuth": np.arange(n) % 18 * 2, "lighting": 0})
    return ArrayDataset(
        "toy", "train", _images(n, 1), torch.arange(n) % 5, meta, list("abcde"), 32, {}, augment="norb"
    )


def test_iterate_is_deterministic_and_complete():
    ds = _dataset()
    run = lambda seed: list(iterate(ds, 16, shuffle=True, train=True, seed=seed, device="cpu"))  # noqa: E731
    a, b, c = run(0), run(0), run(1)
    assert [len(i) for _, _, i in a] == [16, 16, 16, 2]
    assert sorted(torch.cat([i for _, _, i in a]).tolist()) == list(range(50))
    for (xa, ya, ia), (xb, yb, ib) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(ia, ib)
    assert not torch.equal(a[0][2], c[0][2])
    x, y, i = a[0]
    assert x.shape == (16, 1, 32, 32) and y.dtype == torch.int64 and torch.equal(y, ds.labels[i])


def test_iterate_eval_is_centre_crop_in_order():
    ds = _dataset()
    x, y, i = next(iterate(ds, 50, shuffle=False, train=False, seed=0, device="cpu"))
    assert torch.equal(i, torch.arange(50))
    assert torch.equal(x, transforms.to_float(ds.images)[:, :, 8:40, 8:40])
    item, label = ds[3]
    assert torch.equal(item, x[3]) and label == int(y[3])


def test_select():
    ds = _dataset()
    sub = ds.select([4, 2])
    assert len(sub) == 2 and sub.meta.azimuth.tolist() == [8, 4] and torch.equal(sub.images[0], ds.images[4])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_iterate_on_cuda():
    ds = _dataset()
    a = list(iterate(ds, 16, shuffle=True, train=True, seed=0, device="cuda"))
    b = list(iterate(ds, 16, shuffle=True, train=True, seed=0, device="cuda"))
    assert a[0][0].device.type == "cuda" and a[0][1].device.type == "cuda" and a[0][2].device.type == "cpu"
    assert all(torch.equal(xa, xb) for (xa, _, _), (xb, _, _) in zip(a, b))
    x_gpu, _, _ = next(iterate(ds, 50, shuffle=False, train=False, seed=0, device="cuda"))
    x_cpu, _, _ = next(iterate(ds, 50, shuffle=False, train=False, seed=0, device="cpu"))
    assert torch.equal(x_gpu.cpu(), x_cpu)
