"""CIFAR-10 from its ``cifar-10-batches-py/`` pickles, and long-tailed, label-noisy splits of any dataset.

The pickles are read directly (``data_batch_1`` ... ``data_batch_5``,
``test_batch``) instead of through ``torchvision.datasets.CIFAR10``, which
checks each file's MD5 and so refuses the small batches the tests write and
any re-packed copy.  ``download=True`` still goes through torchvision, which
fetches and extracts the same folder.  :func:`write_cifar10` writes tiny
learnable batches in that layout for tests.

The long-tailed profile is Cui et al.'s exponential one (used by Shu et al.
2019 and the Nyström paper, section 5.4): class ``c`` of ``C`` keeps

    n_c = ⌊n_max · (1 / imbalance)^(c / (C − 1))⌋

images, so class 0 keeps ``n_max`` and class ``C − 1`` keeps ``n_max / imbalance``.

References:
    Cui, Jia, Lin, Song & Belongie, "Class-Balanced Loss Based on Effective
    Number of Samples", CVPR 2019.
    Krizhevsky, "Learning Multiple Layers of Features from Tiny Images", 2009.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .data import DataError, DatasetMissing, import_torchvision

FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# Per-channel pixel statistics of the training split, used to standardise inputs.
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def load_cifar10(root: str | os.PathLike, *, train: bool, download: bool = False) -> tuple[Tensor, Tensor]:
    """One split of CIFAR-10 from ``<root>/cifar-10-batches-py/``.

    Returns ``(images, labels)``: ``images`` float32 ``(N, 3, 32, 32)``
    standardised per channel with :data:`MEAN` / :data:`STD`; ``labels`` int64
    ``(N,)``.  Both on the CPU.  The files are Python pickles, as distributed:
    only read folders you trust.

    Raises:
        DatasetMissing: a batch file is absent (and ``download`` is false, or
            the download failed).
        DataError: a batch file is not a CIFAR batch, or its images, labels
            and label range disagree (the file is named).
    """
    folder = Path(root) / FOLDER
    files = TRAIN_FILES if train else TEST_FILES
    if download and not all((folder / name).exists() for name in files):
        try:
            import_torchvision().datasets.CIFAR10(root=os.fspath(root), train=train, download=True)
        except (RuntimeError, OSError) as error:
            raise DatasetMissing(f"cifar10 download into {root} failed: {error}") from None
    images, labels = [], []
    for name in files:
        path = folder / name
        if not path.exists():
            raise DatasetMissing(
                f"cifar10 not found: expected {path}. Pass --download, or point --data-root at the folder "
                f"that holds {FOLDER}/ (the extracted cifar-10-python.tar.gz)."
            )
        with open(path, "rb") as f:
            try:
                batch = pickle.load(f, encoding="latin1")
                data = np.asarray(batch["data"], dtype=np.uint8)
                targets = np.asarray(batch["labels"], dtype=np.int64)
            except (pickle.UnpicklingError, KeyError, TypeError, ValueError, EOFError, AttributeError, ImportError,
                    IndexError) as error:
                raise DataError(f"{path} is not a CIFAR-10 batch ({type(error).__name__}: {error})") from None
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DataError(f"{path}: data of shape {data.shape}, expected (N, 3072), N images of 3 x 32 x 32 bytes")
        if targets.shape != (len(data),):
            raise DataError(f"{path} holds {len(data)} images but {targets.size} labels")
        if targets.size and not 0 <= targets.min() <= targets.max() < len(CLASSES):
            bad = targets[(targets < 0) | (targets >= len(CLASSES))][0]
            raise DataError(f"{path} holds label {bad}, outside the classes 0..{len(CLASSES) - 1}")
        images.append(torch.from_numpy(data.reshape(-1, 3, 32, 32)))
        labels.append(torch.from_numpy(targets))
    x = torch.cat(images).float().div_(255.0)
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    return x, torch.cat(labels)


def write_cifar10(root: str | os.PathLike, *, n_train: int = 500, n_test: int = 100, seed: int = 0) -> None:
    """Write a tiny learnable CIFAR-10 stand-in in the real ``cifar-10-batches-py/`` layout, for tests.

    ``n_train`` images are spread over the five training batches; each class
    is a bright 8x8 patch at its own position and colour channel plus noise.
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)

    def batch(n: int, label: str) -> dict:
        labels = np.arange(n) % 10
        rng.shuffle(labels)
        images = rng.integers(0, 80, size=(n, 3, 32, 32))
        for i, c in enumerate(labels):
            row, col = 2 + 10 * (c // 4), 2 + 8 * (c % 4)
            images[i, c % 3, row:row + 8, col:col + 8] += 170
        return {"batch_label": label, "labels": labels.tolist(),
                "data": images.astype(np.uint8).reshape(n, 3072), "filenames": [f"{i}.png" for i in range(n)]}

    sizes = np.diff(np.linspace(0, n_train, len(TRAIN_FILES) + 1).astype(int))
    for name, n in [*zip(TRAIN_FILES, sizes), (TEST_FILES[0], n_test)]:
        with open(folder / name, "wb") as f:
            pickle.dump(batch(int(n), name), f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(CLASSES), "num_cases_per_batch": int(sizes[0]), "num_vis": 3072}, f)


def long_tail_counts(n_max: int, num_classes: int, imbalance: float) -> list[int]:
    """Cui et al.'s exponential profile ``n_c = ⌊n_max · imbalance^(−c / (C − 1))⌋``, ``c = 0 .. C − 1``.

    Raises:
        ValueError: ``imbalance < 1``, ``num_classes < 2`` or ``n_max < 1``.
    """
    if not imbalance >= 1:
        raise ValueError(f"Invalid imbalance: {imbalance} (expected a number >= 1, e.g. 100)")
    if num_classes < 2 or n_max < 1:
        raise ValueError(f"Invalid profile: n_max={n_max}, num_classes={num_classes} (expected >= 1 and >= 2)")
    return [int(n_max * imbalance ** (-c / (num_classes - 1))) for c in range(num_classes)]


def long_tail_split(labels: Tensor, *, imbalance: float, meta_per_class: int,
                    generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Indices of a balanced meta split and a long-tailed training split of a balanced dataset.

    ``meta_per_class`` random images of every class go to the meta split
    first; the long tail is then drawn at random from the rest with
    ``n_max`` = the smallest remaining class count, so every class can supply
    its quota.  Returns ``(train_index, meta_index)``, int64 and disjoint.

    Raises:
        ValueError: a class has too few images for its meta share plus one
            training image, or an invalid ``imbalance``.
    """
    classes = int(labels.max()) + 1
    per_class = [torch.nonzero(labels == c).flatten() for c in range(classes)]
    smallest = min(len(index) for index in per_class)
    if meta_per_class < 1 or smallest - meta_per_class < 1:
        raise ValueError(f"a meta split of {meta_per_class} per class leaves no training images "
                         f"(the smallest class has {smallest})")
    counts = long_tail_counts(smallest - meta_per_class, classes, imbalance)
    train, meta = [], []
    for index, n in zip(per_class, counts):
        index = index[torch.randperm(len(index), generator=generator)]
        meta.append(index[:meta_per_class])
        train.append(index[meta_per_class:meta_per_class + max(n, 1)])
    return torch.cat(train), torch.cat(meta)


def flip_labels(labels: Tensor, fraction: float, num_classes: int, generator: torch.Generator) -> Tensor:
    """Uniform label noise (Shu et al. 2019's "uniform" corruption): each label is, with
    probability ``fraction``, replaced by a class drawn uniformly from all ``num_classes``
    (so it may land on the true one).  Returns a new tensor."""
    flip = torch.rand(len(labels), generator=generator) < fraction
    random = torch.randint(num_classes, (len(labels),), generator=generator)
    return torch.where(flip, random, labels)


def pair_flip_labels(labels: Tensor, fraction: float, num_classes: int, generator: torch.Generator) -> Tensor:
    """Flip noise (Shu et al. 2019's "flip" corruption, one fixed target per class): each label ``c``
    becomes ``(c + 1) mod num_classes`` with probability ``fraction``.  Shu et al.'s code draws each
    class's target at random; a fixed cyclic pairing is the same corruption up to relabelling.
    Unlike uniform noise it is systematic: above ``fraction`` 0.5 the wrong class is the majority label,
    so no reweighting by loss can recover it.  Returns a new tensor."""
    flip = torch.rand(len(labels), generator=generator) < fraction
    return torch.where(flip, (labels + 1) % num_classes, labels)
