"""Datasets for the recipes: torchvision's MNIST-format loaders, and tiny idx files for tests.

The recipes read MNIST and Fashion-MNIST with the real torchvision classes
(``torchvision.datasets.MNIST(root, train, download)``), so a folder prepared
for torchvision works unchanged.  :func:`write_idx_dataset` writes the same
on-disk format (uncompressed idx files under ``<root>/<Class>/raw/``), which
is how the tests drive the recipes without a download.
"""

from __future__ import annotations

import math
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


class DataError(RuntimeError):
    """A dataset that cannot be used: a missing, corrupt or inconsistent file, named in a one-line message."""


class DatasetMissing(DataError):
    """Raised when a dataset is not on disk and ``download`` was not requested, or the download failed."""


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
    # Public lookup: torch.ops.<namespace> raises AttributeError for an operator nobody defined.
    missing = [name for name in _OPS_WITH_SCHEMAS if not hasattr(torch.ops.torchvision, name)]
    if missing and _torchvision_library is None:
        _torchvision_library = torch.library.Library("torchvision", "DEF")
        for name in missing:
            _torchvision_library.define(_OPS_WITH_SCHEMAS[name])
    import torchvision

    return torchvision


def load_split(name: str, root: str | os.PathLike, *, train: bool, download: bool = False) -> tuple[Tensor, Tensor]:
    """Load one split of ``name`` ("mnist" or "fashion-mnist") through torchvision.

    Returns ``(images, labels)``: ``images`` float32 of shape ``(N, 1, 28, 28)``,
    standardised with the training split's mean and std; ``labels`` int64 of
    shape ``(N,)`` in ``0..9``.  Both on the CPU.  The idx files are checked
    before torchvision reads them (header, size, 28 × 28 images, as many labels
    as images, labels in range), so a damaged file is named, not misread.

    Raises:
        ValueError: unknown ``name``.
        DatasetMissing: the files are not under ``root`` and ``download`` is false,
            or the download failed.
        DataError: a file is corrupt or the two files disagree.
    """
    if name not in DATASETS:
        raise ValueError(f"Invalid dataset: {name!r}; expected one of {sorted(DATASETS)}")
    class_name, mean, std = DATASETS[name]
    torchvision = import_torchvision()
    dataset_class = getattr(torchvision.datasets, class_name)
    image_file, label_file = (Path(root) / class_name / "raw" / file for file in IDX_FILES[train])
    if download and not (image_file.exists() and label_file.exists()):
        try:
            dataset_class(root=os.fspath(root), train=train, download=True)
        except (RuntimeError, OSError) as error:  # the files were asked for and could not be fetched: say why
            raise DatasetMissing(
                f"could not download {name} into {root}: {_download_failure(error)}. Without a network, write the "
                f"files with `python -m scripts.prepare_offline_data` and point --data-root at them "
                f"({image_file} is expected)."
            ) from None
    for file in (image_file, label_file):
        if not file.exists():
            raise DatasetMissing(
                f"{name} not found: expected {file}. Pass --download, or point --data-root at a folder laid out for "
                f"torchvision.datasets.{class_name} (python -m scripts.prepare_offline_data writes one)."
            )
    n_images = check_idx(image_file, (28, 28))
    n_labels = check_idx(label_file, ())
    if n_images != n_labels:
        raise DataError(f"{image_file} holds {n_images} images but {label_file} holds {n_labels} labels")
    try:
        dataset = dataset_class(root=os.fspath(root), train=train, download=False)
    except Exception as error:  # the headers were fine: whatever torchvision trips on, name the folder
        raise DataError(f"torchvision could not read {image_file.parent}: {error}") from None
    labels = dataset.targets.long()
    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < 10:
        bad = labels[(labels < 0) | (labels >= 10)][0].item()
        raise DataError(f"{label_file} holds label {bad}, outside the classes 0..9")
    # The uint8 tensors are read directly: torchvision's __getitem__ goes through PIL one image at a time.
    images = dataset.data.unsqueeze(1).float().div_(255.0).sub_(mean).div_(std)
    return images, labels


def check_idx(path: Path, item_shape: tuple[int, ...]) -> int:
    """The number of items in the uint8 idx file ``path``, after checking its header against the file.

    ``item_shape`` is the shape of one item: ``(28, 28)`` for images, ``()`` for labels.

    Raises:
        DataError: not an idx file of unsigned bytes with ``1 + len(item_shape)``
            dimensions, items of another shape, or a file shorter or longer than its header says.
    """
    ndim = 1 + len(item_shape)
    header_size = 4 + 4 * ndim
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            header = f.read(header_size)
    except OSError as error:
        raise DataError(f"{path} is unreadable: {error.strerror or error}") from None
    if len(header) < header_size:
        raise DataError(f"{path} is corrupt: {size} bytes, shorter than an idx header")
    # Magic number: two zero bytes, type code 0x08 (unsigned byte), number of dimensions; sizes big-endian.
    if header[:3] != b"\x00\x00\x08" or header[3] != ndim:
        raise DataError(f"{path} is corrupt: its header {header[:4].hex()} is not that of an idx file of unsigned "
                        f"bytes with {ndim} dimensions (00000801 for labels, 00000803 for images)")
    shape = struct.unpack(f">{ndim}I", header[4:])
    if shape[1:] != item_shape:
        raise DataError(f"{path} holds items of shape {shape[1:]}, expected {item_shape}")
    data = size - header_size
    if data != math.prod(shape):
        raise DataError(f"{path} is corrupt: its header promises {math.prod(shape)} bytes ({' x '.join(map(str, shape))}), "
                        f"the file holds {data}{' (truncated)' if data < math.prod(shape) else ''}")
    return shape[0]


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
