"""Fashion-MNIST and MNIST through torchvision (28×28 grey, 10 classes, no viewpoint metadata).

Fashion-MNIST is taken offline from Debian's ``dataset-fashion-mnist`` (/usr/share/datasets/fashion-mnist)
when it is installed: its idx .gz files are decompressed once into torchvision's layout
(<folder>/FashionMNIST/raw) and read by torchvision. Otherwise torchvision downloads into the folder.

    python -m harness.data download fashion_mnist
"""

from __future__ import annotations

import gzip
import os
import shlex
import shutil
import urllib.error
from pathlib import Path

from harness.data import register_dataset
from harness.data.base import DataError, DatasetSpec, Part
from harness.data.smallnorb import cached_sha256

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
RAW = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
TV_NAME = {"fashion_mnist": "FashionMNIST", "mnist": "MNIST"}  # torchvision class = folder name
# the classes as torchvision names them (torchvision is imported only when data is read: it is slow to import)
CLASSES = {
    "fashion_mnist": (
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),
    "mnist": (
        "0 - zero",
        "1 - one",
        "2 - two",
        "3 - three",
        "4 - four",
        "5 - five",
        "6 - six",
        "7 - seven",
        "8 - eight",
        "9 - nine",
    ),
}


def _tv_class(name: str):
    import torchvision.datasets

    return getattr(torchvision.datasets, TV_NAME[name])


def raw_folder(name: str, folder: Path) -> Path:
    return Path(folder) / TV_NAME[name] / "raw"


def install_from_debian(folder: Path, debian_dir: Path = DEBIAN_FASHION) -> bool:
    """Decompress Debian's Fashion-MNIST idx files into torchvision's layout; False if Debian's are absent."""
    raw = raw_folder("fashion_mnist", folder)
    names = [n for pair in RAW.values() for n in pair]
    if not all((debian_dir / f"{n}.gz").is_file() for n in names):
        return False
    raw.mkdir(parents=True, exist_ok=True)
    for n in names:
        if (raw / n).is_file():
            continue
        tmp = raw / f".{n}.{os.getpid()}.tmp"
        with gzip.open(debian_dir / f"{n}.gz", "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(tmp, raw / n)
    return True


def fetch(name: str, folder: str | Path) -> Path:
    """Fetch ``name`` (fashion_mnist | mnist) into folder (Debian's copy first for Fashion-MNIST)."""
    folder = Path(folder)
    if name == "fashion_mnist" and install_from_debian(folder):
        return raw_folder(name, folder)
    try:
        for train in (True, False):
            _tv_class(name)(str(folder), train=train, download=True)
    except (RuntimeError, urllib.error.URLError, OSError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(
            f"cannot download {name} into {folder} ({reason}): "
            f"check the internet connection, or copy the idx files into {raw_folder(name, folder)}"
        ) from None
    return raw_folder(name, folder)


def _loader(name: str):
    def load(
        folder: Path, part: str, *, progress: bool = True, download: bool = True, debian_dir=DEBIAN_FASHION
    ) -> Part:
        raw = raw_folder(name, folder)
        files = [raw / n for n in RAW[part]]
        if not all(f.is_file() for f in files):
            if name == "fashion_mnist" and install_from_debian(folder, Path(debian_dir)):
                pass
            elif download:
                fetch(name, folder)
            else:
                raise DataError(
                    f"{name} is not in {folder}: get it with "
                    f"`python -m harness.data download {name} --root {shlex.quote(str(folder))}`"
                )
        try:
            ds = _tv_class(name)(str(folder), train=part == "train", download=False)
        except RuntimeError as e:
            raise DataError(
                f"{name} in {raw} cannot be read ({e}); delete the folder and download again"
            ) from None
        images = ds.data.unsqueeze(1).contiguous()  # N×28×28 -> N×1×28×28 uint8
        identity = {f.name: cached_sha256(f) for f in files}
        return Part(images, ds.targets.numpy().astype("int64"), None, identity)

    return load


register_dataset(
    DatasetSpec(
        name="fashion_mnist",
        classes=CLASSES["fashion_mnist"],
        input_size=28,
        augment="none",
        channels=1,
        load=_loader("fashion_mnist"),
        doc="Zalando Fashion-MNIST (Xiao et al. 2017): 10 clothing classes, 60k train / 10k test, 28×28",
    )
)
register_dataset(
    DatasetSpec(
        name="mnist",
        classes=CLASSES["mnist"],
        input_size=28,
        augment="none",
        channels=1,
        load=_loader("mnist"),
        doc="LeCun MNIST digits: 10 classes, 60k train / 10k test, 28×28",
    )
)
