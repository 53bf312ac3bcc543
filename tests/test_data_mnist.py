"""Fashion-MNIST from Debian's dataset-fashion-mnist files (offline), and MNIST-like errors."""

from __future__ import annotations

import pytest
import torch

from harness.data import DataError, get_dataset, iterate, mnist

needs_debian = pytest.mark.skipif(
    not (mnist.DEBIAN_FASHION / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian's dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)",
)


@needs_debian
def test_fashion_mnist_from_debian(tmp_path):
    test = get_dataset("fashion_mnist", "test", root=tmp_path, download=False, progress=False)
    assert test.images.shape == (10000, 1, 28, 28) and test.images.dtype == torch.uint8
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    assert test.meta is None and test.input_size == 28 and test.classes[9] == "Ankle boot"
    assert set(test.identity) == {"t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"}
    assert (tmp_path / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").is_file()
    train = get_dataset("fashion_mnist", "train", root=tmp_path, download=False, progress=False)
    val = get_dataset("fashion_mnist", "val", root=tmp_path, download=False, progress=False)
    assert (len(train), len(val)) == (54000, 6000)
    x, y, _ = next(iterate(train, 8, shuffle=True, train=True, seed=0, device="cpu"))
    assert x.shape == (8, 1, 28, 28) and 0 <= x.min() and x.max() <= 1
    assert torch.equal(x, train.images[_].float() / 255)  # no augmentation for MNIST-likes
    with pytest.raises(DataError, match="has no viewpoint metadata"):
        get_dataset("fashion_mnist", "test", view="azimuth", root=tmp_path, download=False)
    with pytest.raises(DataError, match="has 1 channel"):
        get_dataset("fashion_mnist", "test", channels=2, root=tmp_path, download=False)


def test_classes_match_torchvision():
    import torchvision.datasets

    assert mnist.CLASSES["fashion_mnist"] == tuple(torchvision.datasets.FashionMNIST.classes)
    assert mnist.CLASSES["mnist"] == tuple(torchvision.datasets.MNIST.classes)


def test_missing_mnist_without_download(tmp_path):
    with pytest.raises(DataError, match=r"mnist is not in .*python -m harness\.data download mnist"):
        get_dataset("mnist", "test", root=tmp_path, download=False)
