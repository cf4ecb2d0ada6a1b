"""N-way K-shot classification tasks from Omniglot or the MNIST family, for meta-learning recipes.

A *base class* is an Omniglot character (20 drawings) or an MNIST digit; each
base class rotated by 0°, 90°, 180° and 270° gives four classes (Santoro et al.
2016; Finn et al. 2017).  The base classes are split once into meta-training
and meta-test classes, so no meta-test class is ever seen during
meta-training:

* Omniglot: the 964 characters of ``images_background`` and the 659 of
  ``images_evaluation`` (1,623 in all, sorted by alphabet and character name)
  are permuted with a fixed seed; the first 1,200 are meta-training
  characters and the other 423 meta-test characters (the split of MAML and
  iMAML; the permutation itself is ours).
* MNIST / Fashion-MNIST: classes 0–5 of the training split are meta-training
  classes, classes 6–9 of the test split meta-test classes.

Omniglot is read from the extracted tree that torchvision's download leaves,
``<root>/omniglot-py/images_background/<alphabet>/<character>/*.png`` (and
``images_evaluation``), directly: torchvision's ``Omniglot`` class checks the
MD5 of the zip archives and refuses a tree whose archives are gone or that a
test generated.  ``download=True`` still goes through torchvision.  Images are
resized from 105×105 to 28×28 and inverted so that strokes are 1 and the
background 0.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from .data import DataError, DatasetMissing, import_torchvision, load_split

OMNIGLOT_DIR = "omniglot-py"
OMNIGLOT_SETS = ("images_background", "images_evaluation")
OMNIGLOT_SPLIT_SEED = 1  # fixed: the meta-train / meta-test split must not change with --seed
TRAIN_CLASSES = {"omniglot": 1200, "mnist": 6, "fashion-mnist": 6}
ROTATIONS = 4
IMAGE_SIZE = 28


class Task(NamedTuple):
    """One N-way K-shot task: ``support`` of ``N·K`` and ``query`` of ``N·Q`` examples.

    ``support = (x, y)`` with ``x`` float32 ``(N·K, 1, 28, 28)`` and ``y`` int64
    labels in ``0..N−1`` (likewise ``query``).
    """

    support: tuple[Tensor, Tensor]
    query: tuple[Tensor, Tensor]


def omniglot_characters(root: str | os.PathLike) -> list[Path]:
    """The character folders of the extracted Omniglot tree under ``root``, in a fixed order.

    ``root`` may hold ``omniglot-py/`` (torchvision's layout) or be that folder.

    Raises:
        DatasetMissing: neither ``images_background`` nor ``images_evaluation`` is there,
            or they hold no characters.
    """
    base = Path(root) / OMNIGLOT_DIR if (Path(root) / OMNIGLOT_DIR).is_dir() else Path(root)
    sets = [base / name for name in OMNIGLOT_SETS if (base / name).is_dir()]
    characters = sorted(c for s in sets for alphabet in s.iterdir() if alphabet.is_dir()
                        for c in alphabet.iterdir() if c.is_dir())
    if not characters:
        raise DatasetMissing(
            f"omniglot not found: expected {Path(root) / OMNIGLOT_DIR / OMNIGLOT_SETS[0]}/<alphabet>/<character>/*.png. "
            "Pass --download, or point --data-root at the folder holding omniglot-py/."
        )
    return characters


def read_omniglot_character(folder: Path) -> Tensor:
    """The drawings of one character as float32 ``(n, 1, 28, 28)``: strokes 1, background 0.

    Raises:
        DatasetMissing: the folder holds no ``.png`` drawings.
        DataError: a drawing cannot be decoded (a truncated PNG, for example).
    """
    from PIL import Image  # torchvision's dependency; only the Omniglot path needs it

    images = []
    for path in sorted(folder.glob("*.png")):
        try:
            with Image.open(path) as image:
                small = image.convert("L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
        except (OSError, ValueError, SyntaxError) as error:  # PIL: truncated or not an image at all
            raise DataError(f"{path} is not a readable image ({error})") from None
        images.append(1.0 - np.asarray(small, dtype=np.float32) / 255.0)
    if not images:
        raise DatasetMissing(f"omniglot character folder {folder} holds no .png drawings")
    return torch.from_numpy(np.stack(images)).unsqueeze(1)


def download_omniglot(root: str | os.PathLike) -> None:
    """Let torchvision download and extract both Omniglot archives into ``root/omniglot-py``.

    Raises:
        DatasetMissing: the download failed.
    """
    torchvision = import_torchvision()
    for background in (True, False):
        try:
            torchvision.datasets.Omniglot(os.fspath(root), background=background, download=True)
        except (RuntimeError, OSError) as error:
            raise DatasetMissing(f"omniglot download into {root} failed: {error}") from None


def load_classes(dataset: str, root: str | os.PathLike, *, train_classes: int | None = None,
                 download: bool = False) -> tuple[list[Tensor], list[Tensor]]:
    """Meta-training and meta-test base classes: two lists of float32 ``(n_i, 1, 28, 28)`` image tensors.

    ``train_classes`` base classes go to meta-training (default
    :data:`TRAIN_CLASSES`), the rest to meta-test; see the module docstring.

    Raises:
        ValueError: unknown ``dataset``, or ``train_classes`` that leaves either
            side empty.
        DatasetMissing: the files are not under ``root`` (and ``download`` is false).
        DataError: a file is damaged (named in the message).
    """
    if dataset not in TRAIN_CLASSES:
        raise ValueError(f"Invalid dataset: {dataset!r}; expected one of {sorted(TRAIN_CLASSES)}")
    n_train = TRAIN_CLASSES[dataset] if train_classes is None else train_classes
    if dataset == "omniglot":
        if download:
            download_omniglot(root)
        characters = omniglot_characters(root)
        _check_split(n_train, len(characters), "characters")
        order = torch.randperm(len(characters), generator=torch.Generator().manual_seed(OMNIGLOT_SPLIT_SEED))
        chosen = [characters[i] for i in order.tolist()]
        return ([read_omniglot_character(c) for c in chosen[:n_train]],
                [read_omniglot_character(c) for c in chosen[n_train:]])
    n_classes = 10
    _check_split(n_train, n_classes, f"{dataset} classes")
    pools = []
    for train, classes in ((True, range(n_train)), (False, range(n_train, n_classes))):
        images, labels = load_split(dataset, root, train=train, download=download)
        pools.append([images[labels == c] for c in classes])
    return pools[0], pools[1]


def _check_split(n_train: int, total: int, what: str) -> None:
    if not 1 <= n_train < total:
        raise ValueError(f"Invalid train_classes: {n_train}; the data has {total} {what}, "
                         f"so expected 1..{total - 1} (the rest are meta-test classes)")


class TaskSampler:
    """Draws N-way K-shot tasks from base classes, each rotated by a multiple of 90° as its own class.

    Args:
        classes: base classes, each a tensor ``(n_i, C, H, W)`` of its images.
        ways, shots, query: ``N``, ``K`` and the query examples per class ``Q``.
        generator: CPU generator for every draw; its state is the sampler's state.

    Raises:
        ValueError: fewer than ``ways`` classes (base classes × 4 rotations),
            or a base class with fewer than ``shots + query`` images.
    """

    def __init__(self, classes: list[Tensor], ways: int, shots: int, query: int, generator: torch.Generator):
        self.classes, self.ways, self.shots, self.query = classes, ways, shots, query
        self.generator = generator
        if ways > ROTATIONS * len(classes):
            raise ValueError(f"Invalid ways: {ways}; only {ROTATIONS * len(classes)} classes "
                             f"({len(classes)} base classes × {ROTATIONS} rotations)")
        smallest = min(len(c) for c in classes)
        if shots + query > smallest:
            raise ValueError(f"Invalid shots + query: {shots} + {query}; a class has only {smallest} images")

    def sample(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Task:
        """One task; labels ``0..N−1`` are assigned to the drawn classes in random order."""
        n = self.shots + self.query
        chosen = torch.randperm(ROTATIONS * len(self.classes), generator=self.generator)[: self.ways].tolist()
        images = []
        for c in chosen:
            base, quarter_turns = divmod(c, ROTATIONS)
            pool = self.classes[base]
            index = torch.randperm(len(pool), generator=self.generator)[:n]
            images.append(torch.rot90(pool[index], quarter_turns, dims=(-2, -1)))
        x = torch.stack(images).to(device=device, dtype=dtype)  # (N, K + Q, C, H, W)
        y = torch.arange(self.ways, device=device)[:, None].expand(self.ways, n)
        support = (x[:, : self.shots].flatten(0, 1), y[:, : self.shots].flatten())
        query = (x[:, self.shots:].flatten(0, 1), y[:, self.shots:].flatten())
        return Task(support, query)


def write_omniglot_tree(root: str | os.PathLike, *, alphabets: int = 2, characters: int = 4, drawers: int = 20,
                        seed: int = 0) -> Path:
    """Write a tiny learnable Omniglot stand-in in the real extracted layout, for tests.

    ``alphabets`` alphabets in each of ``images_background`` and
    ``images_evaluation``, ``characters`` characters each, ``drawers`` 105×105
    binary PNGs per character named as the real ones.  Each character is a
    distinct set of black bars on white, plus jitter.  Returns the
    ``omniglot-py`` folder.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = Path(root) / OMNIGLOT_DIR
    number = 0
    for set_name in OMNIGLOT_SETS:
        for a in range(alphabets):
            for c in range(characters):
                number += 1
                folder = base / set_name / f"Alphabet_{set_name[7:]}_{a}" / f"character{c + 1:02d}"
                folder.mkdir(parents=True, exist_ok=True)
                bars = rng.integers(0, 90, size=(3, 2))
                for d in range(drawers):
                    canvas = np.full((105, 105), 255, dtype=np.uint8)
                    for r, col in bars + rng.integers(-3, 4, size=(3, 2)):
                        canvas[max(r, 0):max(r, 0) + 12, max(col, 0):max(col, 0) + 30] = 0
                    Image.fromarray(canvas).convert("1").save(folder / f"{number:04d}_{d + 1:02d}.png")
    return base

