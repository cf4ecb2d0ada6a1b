"""Datasets for the recipes: torchvision's MNIST-format loaders, and tiny idx files for tests.

The recipes read MNIST and Fashion-MNIST with the real torchvision classes
(``torchvision.datasets.MNIST(root, train, download)``), so a folder prepared
for torchvision works unchanged.  :func:`write_idx_dataset` writes the same
on-disk format (uncompressed idx files under ``<root>/<Class>/raw/``), which
is how the tests drive the recipes without a download.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

# Per-dataset pixel statistics of the training split, used to standardise inputs.
DATASETS = {
    "mnist": ("MNIST", 0.1307, 0.3081),
    "fashion-mnist": ("FashionMNIST", 0.2860, 0.3530),
}

IDX_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

_OPS_WITH_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_torchvision_library = None


class DatasetMissing(RuntimeError):
    """Raised when a dataset is not on disk and ``download`` was not requested."""


def import_torchvision():
    """Import and return ``torchvision``, also where its compiled operators are absent.

    Some torchvision wheels (e.g. a CUDA build installed next to a CPU-only
    torch) register fake kernels for ``torchvision::nms`` and ``qnms`` at import
    time and fail with "operator torchvision::nms does not exist" because the
    compiled library that defines those operators did not load.  Defining the two
    schemas first lets the import finish; datasets, transforms and models work,
    only the compiled ops (NMS, image decoding) do not.  Nothing is defined when
    the operators already exist, so with a matching torchvision this is a plain
    ``import torchvision``.
    """
    global _torchvision_library
    missing = [name for name in _OPS_WITH_SCHEMAS if not _op_exists(name)]
    if missing and _torchvision_library is None:
        _torchvision_library = torch.library.Library("torchvision", "DEF")
        for name in missing:
            _torchvision_library.define(_OPS_WITH_SCHEMAS[name])
    import torchvision

    return torchvision


def _op_exists(name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
    except RuntimeError:
        return False
    return True


def load_split(name: str, root: str | os.PathLike, *, train: bool, download: bool = False) -> tuple[Tensor, Tensor]:
    """Load one split of ``name`` ("mnist" or "fashion-mnist") through torchvision.

    Returns ``(images, labels)``: ``images`` float32 of shape ``(N, 1, 28, 28)``,
    standardised with the training split's mean and std; ``labels`` int64 of
    shape ``(N,)``.  Both on the CPU.

    Raises:
        ValueError: unknown ``name``.
        DatasetMissing: the files are not under ``root`` and ``download`` is false,
            or the download failed.
    """
    if name not in DATASETS:
        raise ValueError(f"Invalid dataset: {name!r}; expected one of {sorted(DATASETS)}")
    class_name, mean, std = DATASETS[name]
    torchvision = import_torchvision()
    dataset_class = getattr(torchvision.datasets, class_name)
    try:
        dataset = dataset_class(root=os.fspath(root), train=train, download=download)
    except (RuntimeError, OSError) as error:
        expected = Path(root) / class_name / "raw" / IDX_FILES[train][0]
        if download:  # the files were asked for and could not be fetched: say why, not "pass --download"
            raise DatasetMissing(
                f"could not download {name} into {root}: {_download_failure(error)}. Without a network, write the "
                f"files with `python -m scripts.prepare_offline_data` and point --data-root at them "
                f"({expected} is expected)."
            ) from None
        raise DatasetMissing(
            f"{name} not found: expected {expected} ({error}). "
            f"Pass --download, or point --data-root at a folder laid out for torchvision.datasets.{class_name}."
        ) from None
    # The uint8 tensors are read directly: torchvision's __getitem__ goes through PIL one image at a time.
    images = dataset.data.unsqueeze(1).float().div_(255.0).sub_(mean).div_(std)
    return images, dataset.targets.long()


def _download_failure(error: Exception) -> str:
    """The causes in torchvision's multi-line download error ("Tried <mirror>, got: <cause>"), once each."""
    lines = [line.strip() for line in str(error).splitlines()]
    causes = [line for line in lines if line and not line.startswith(("Tried ", "Error downloading "))]
    return "; ".join(dict.fromkeys(causes)) or " ".join(lines)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write a uint8 array (1 to 3 dimensions) as an uncompressed idx file, the MNIST on-disk format."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    # Magic number: two zero bytes, type code 0x08 (unsigned byte), number of dimensions; sizes big-endian.
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with open(path, "wb") as f:
        f.write(header)
        f.write(array.tobytes())


def write_split(root: str | os.PathLike, name: str, *, train: bool, images: np.ndarray, labels: np.ndarray) -> None:
    """Write ``images`` (uint8, ``(N, 28, 28)``) and ``labels`` (``(N,)``) where torchvision reads ``name``'s split."""
    raw = Path(root) / DATASETS[name][0] / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    image_file, label_file = IDX_FILES[train]
    write_idx(raw / image_file, images)
    write_idx(raw / label_file, labels)


def write_idx_dataset(root: str | os.PathLike, name: str = "mnist", *, n_train: int = 200, n_test: int = 100,
                      seed: int = 0) -> None:
    """Write a tiny learnable stand-in for ``name`` in torchvision's on-disk format, for tests.

    Each class ``c`` is a bright 7x7 square at one of ten fixed positions plus
    noise, so a small CNN separates the classes after a few steps.
    """
    rng = np.random.default_rng(seed)
    for train, n in ((True, n_train), (False, n_test)):
        labels = np.arange(n) % 10
        rng.shuffle(labels)
        images = rng.integers(0, 60, size=(n, 28, 28))
        for i, c in enumerate(labels):
            row, col = 3 + 9 * (c // 4), 3 + 7 * (c % 4)
            images[i, row:row + 7, col:col + 7] += 180
        write_split(root, name, train=train, images=images, labels=labels)
