"""examples/: the file a user copies, run end to end on generated MNIST idx files."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from recipes.data import import_torchvision, write_idx_dataset

EXAMPLES = Path(__file__).parents[1] / "examples"


def load_example(name: str):
    # The example imports torchvision plainly, as on a normal install; this machine's CUDA wheel of
    # torchvision needs the operator schemas defined first (recipes.data.import_torchvision).
    import_torchvision()
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mnist_weight_decay_example_lowers_the_validation_loss_on_torchvision_files(tmp_path, capsys):
    write_idx_dataset(tmp_path, "mnist", n_train=120, n_test=40)
    example = load_example("mnist_weight_decay")
    result = example.main(["--data-root", str(tmp_path), "--n-train", "60", "--n-val", "60", "--hidden", "16",
                           "--inner-steps", "5", "--outer-steps", "10"])
    first = float(re.search(r"step +1: validation loss ([0-9.]+)", capsys.readouterr().out).group(1))
    assert result["val_loss"] < 0.8 * first and 0.0 <= result["test_acc"] <= 1.0


def test_the_example_is_short_and_uses_torch_torchvision_and_the_library_only():
    source = (EXAMPLES / "mnist_weight_decay.py").read_text()
    assert len(source.splitlines()) <= 120
    imports = set(re.findall(r"^(?:from|import) ([\w.]+)", source, flags=re.MULTILINE))
    assert {name.split(".")[0] for name in imports} <= {"__future__", "argparse", "math", "torch", "torchvision",
                                                         "hyperopt_torch"}
