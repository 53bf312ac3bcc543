"""The registry's splits: the paper's familiar/novel viewpoint codes and counts, train/val/test, errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from harness.data import DataError, dataset_folder, familiar_mask, get_dataset, list_datasets
from harness.data import norb_format as fmt
from harness.data import smallnorb as sn
from harness.data import synthnorb as syn

AZ_FAMILIAR = {30, 32, 34, 0, 2, 4}  # 300°, 320°, 340°, 0°, 20°, 40°
EL_FAMILIAR = {0, 1, 2}  # 30°, 35°, 40°


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    # elevations 4 -> codes 0, 3, 5, 8: one familiar and three novel elevations
    syn.synthesize(root / "synthnorb", image_size=32, lightings=1, elevations=4, instances=2, progress=False)
    return root


def _full_meta(part: str) -> pd.DataFrame:
    _, info = sn.norb_labels(sn.INSTANCES[part])
    return pd.DataFrame(info, columns=["instance", "elevation", "azimuth", "lighting"])


@pytest.mark.parametrize("part", ["train", "test"])
def test_paper_split_codes_and_counts(part):
    meta = _full_meta(part)
    az = familiar_mask(meta, "azimuth")
    assert set(meta.azimuth[az]) == AZ_FAMILIAR
    assert set(meta.azimuth[~az]) == set(range(0, 36, 2)) - AZ_FAMILIAR
    assert (az.sum(), (~az).sum()) == (8100, 16200)
    el = familiar_mask(meta, "elevation")
    assert set(meta.elevation[el]) == EL_FAMILIAR and set(meta.elevation[~el]) == set(range(3, 9))
    assert (el.sum(), (~el).sum()) == (8100, 16200)
    assert familiar_mask(meta, None).all()


def test_registry():
    assert {"smallnorb", "synthnorb", "fashion_mnist", "mnist"} <= set(list_datasets())
    with pytest.raises(DataError, match="unknown dataset 'synthnrob': did you mean synthnorb"):
        get_dataset("synthnrob", "train")


def test_default_root_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("CAPSBENCH_DATA", str(tmp_path))
    assert dataset_folder("synthnorb") == tmp_path / "synthnorb"
    assert dataset_folder("synthnorb", tmp_path / "elsewhere") == tmp_path / "elsewhere"


def test_train_val_test(root):
    n_file = 2 * 4 * 18 * 1 * 5  # instances × elevations × azimuths × lightings × categories
    train = get_dataset("synthnorb", "train", root=root, progress=False)  # a data root holding synthnorb/
    val = get_dataset("synthnorb", "val", root=root / "synthnorb", progress=False)
    test = get_dataset("synthnorb", "test", root=root, progress=False)
    assert len(val) == round(0.1 * n_file) and len(train) + len(val) == n_file and len(test) == n_file
    assert set(train.meta.instance) == set(val.meta.instance) == {4, 6}  # validation from the training files
    assert set(test.meta.instance) == {0, 1}
    assert train.images.shape[1:] == (1, 32, 32) and train.images.dtype == torch.uint8
    assert train.input_size == 32 and train.in_channels == 1 and train.classes[2] == "airplane"
    assert set(train.identity) == {sn.file_name("train", k) for k in ("dat", "cat", "info")}
    again = get_dataset("synthnorb", "val", root=root, progress=False)
    assert torch.equal(again.images, val.images) and again.meta.equals(val.meta)
    assert not torch.equal(
        get_dataset("synthnorb", "val", root=root, val_fraction=0.2, progress=False).images[: len(val)],
        val.images,
    )
    stereo = get_dataset("synthnorb", "test", root=root, channels=2, progress=False)
    assert stereo.images.shape[1] == 2 and torch.equal(stereo.images[:, :1], test.images)
    # labels follow the record order (category = row % 5) and meta is row-aligned
    assert (test.labels.numpy() == np.arange(len(test)) % 5).all()


@pytest.mark.parametrize(
    "view,column,familiar,novel_codes",
    [
        ("azimuth", "azimuth", AZ_FAMILIAR, set(range(0, 36, 2)) - AZ_FAMILIAR),
        ("elevation", "elevation", {0}, {3, 5, 8}),
    ],
)
def test_view_splits(root, view, column, familiar, novel_codes):
    train = get_dataset("synthnorb", "train", view=view, root=root, progress=False)
    val = get_dataset("synthnorb", "val", view=view, root=root, progress=False)
    assert set(train.meta[column]) == familiar and set(val.meta[column]) <= familiar
    fam = get_dataset("synthnorb", "test", view=view, subset="familiar", root=root, progress=False)
    nov = get_dataset("synthnorb", "test", view=view, subset="novel", root=root, progress=False)
    every = get_dataset("synthnorb", "test", view=view, subset="all", root=root, progress=False)
    assert set(fam.meta[column]) == familiar and set(nov.meta[column]) == novel_codes
    assert len(fam) + len(nov) == len(every) == 720
    n_codes = 18 if column == "azimuth" else 4
    assert len(fam) == 720 * len(familiar) // n_codes
    # the familiar rows of the test set with view=None are the same images
    mask = familiar_mask(every.meta, view)
    assert torch.equal(every.images[torch.from_numpy(mask)], fam.images)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(split="train", view="azimuth", subset="novel"), "applies to the test split only"),
        (dict(split="test", subset="familiar"), "needs a viewpoint split"),
        (dict(split="test", view="roll"), "unknown view 'roll': use one of 'azimuth', 'elevation'"),
        (dict(split="testing"), "unknown split 'testing': use one of 'train', 'val', 'test'"),
        (dict(split="test", channels=3), "use channels in 1..2"),
        (dict(split="val", val_fraction=0.0), "no validation split"),
        (dict(split="train", val_fraction=1.5), r"val_fraction must be in \[0, 1\)"),
        (dict(split="train", color=True), "takes no loader options"),
    ],
)
def test_bad_arguments(root, kwargs, message):
    split = kwargs.pop("split")
    with pytest.raises(DataError, match=message):
        get_dataset("synthnorb", split, root=root, progress=False, **kwargs)


def test_missing_smallnorb_says_how_to_download(tmp_path):
    with pytest.raises(DataError, match=r"smallnorb is not in .*python -m harness\.data download smallnorb"):
        get_dataset("smallnorb", "test", root=tmp_path)


def test_cache_is_rebuilt_when_the_source_changes(tmp_path):
    cat, info = sn.norb_labels((0,), (0,), sn.AZIMUTHS, (0,))
    sn.write_labels(tmp_path, "test", cat, info)
    dat_path = tmp_path / sn.file_name("test", "dat")
    rng = np.random.default_rng(0)
    for _ in range(2):
        dat = rng.integers(0, 256, (len(cat), 2, 96, 96), dtype=np.uint8)
        fmt.write_matrix(dat_path, dat)
        part = sn.load_part(tmp_path, "test", fix="FIX", progress=False)
        ref = np.round(
            dat.astype(np.float64).reshape(-1, 2, 48, 2, 48, 2).mean(axis=(3, 5))
        )  # float64 2×2 box
        np.testing.assert_array_equal(np.asarray(part.images), ref)
        assert part.identity[dat_path.name] == sn.sha256_file(dat_path)
    assert (tmp_path / "cache" / f"{sn.PREFIX['test']}-dat-48.npy").is_file()
    assert not list((tmp_path / "cache").glob("*.tmp"))


def test_smallnorb_files_must_match_the_published_checksums(tmp_path):
    cat, info = sn.norb_labels((0,), (0,), sn.AZIMUTHS, (0,))
    sn.write_labels(tmp_path, "test", cat, info)
    fmt.write_matrix(tmp_path / sn.file_name("test", "dat"), np.zeros((len(cat), 2, 96, 96), np.uint8))
    with pytest.raises(DataError, match=r"sha256 .* does not match .*download smallnorb --root .* --force"):
        get_dataset("smallnorb", "test", root=tmp_path, progress=False)
