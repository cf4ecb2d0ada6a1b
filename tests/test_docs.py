"""The code in the docs runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from recipes.data import import_torchvision, write_idx_dataset

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.S | re.M)


def test_quickstart_example_runs_as_written_and_its_validation_loss_falls(tmp_path, monkeypatch, capsys):
    block = python_blocks(ROOT / "docs" / "quickstart.md")[0]
    assert "HyperOptimizer(" in block and "torch.set_num_threads(1)" in block
    write_idx_dataset(tmp_path / "data", "mnist", n_train=1500, n_test=10)  # generated, in MNIST's layout
    import_torchvision()  # `import torchvision` also where a CUDA torchvision sits next to a CPU torch
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    try:
        exec(compile(block, "quickstart.md", "exec"), {"__name__": "quickstart"})
    finally:
        torch.set_num_threads(threads)
    losses = [float(v) for v in re.findall(r"val loss ([\d.]+)", capsys.readouterr().out)]
    assert len(losses) == 20 and losses[-1] < 0.9 * losses[0]
