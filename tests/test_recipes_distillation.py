"""recipes.distillation end to end on tiny MNIST-format idx files read by torchvision."""

from __future__ import annotations

import importlib.util
import json

import pytest

from recipes import distillation
from recipes.data import write_idx_dataset

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
TINY = ["--inner-steps", "5", "--val-batch", "32", "--eval-every", "2", "--no-progress"]
SMALL = ["--outer-steps", "3", *TINY]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    for name in ("mnist", "fashion-mnist"):
        write_idx_dataset(root, name, n_train=120, n_test=60)
    return root


@pytest.mark.parametrize("dataset", ["mnist", "fashion-mnist"])
def test_runs_on_torchvision_files_and_writes_metrics_and_images(tmp_path, data_root, dataset):
    metrics = distillation.main(["--dataset", dataset, "--data-root", str(data_root), "--out", str(tmp_path), *SMALL])
    assert metrics == json.loads((tmp_path / "metrics.json").read_text())
    assert len(metrics["curves"]["val_loss"]) == 3 and metrics["curves"]["eval_step"] == [2, 3]
    assert 0.0 <= metrics["final"]["test_acc"] <= 1.0 and metrics["final"]["hvps_per_step"] >= 10
    if HAS_MATPLOTLIB:
        assert (tmp_path / "distilled.png").stat().st_size > 0 and (tmp_path / "curves.png").exists()


def test_resume_matches_an_uninterrupted_run(tmp_path, data_root):
    flags = ["--data-root", str(data_root), "--checkpoint-every", "1", "--ihvp", "neumann", *TINY]
    straight = distillation.main([*flags, "--outer-steps", "3", "--out", str(tmp_path / "a")])
    distillation.main([*flags, "--outer-steps", "2", "--out", str(tmp_path / "b")])
    resumed = distillation.main([*flags, "--outer-steps", "3", "--out", str(tmp_path / "b"), "--resume"])
    assert resumed["curves"]["val_loss"] == straight["curves"]["val_loss"]
    assert resumed["final"]["test_acc"] == straight["final"]["test_acc"]


def test_missing_or_corrupt_dataset_exits_with_one_line_naming_the_file(tmp_path):
    with pytest.raises(SystemExit, match=r"^error: mnist not found: expected .*train-images-idx3-ubyte\. Pass "
                                         r"--download"):
        distillation.main(["--data-root", str(tmp_path / "none"), "--out", str(tmp_path / "out"), *SMALL])
    write_idx_dataset(tmp_path / "bad", "mnist", n_train=20, n_test=10)
    (tmp_path / "bad" / "MNIST" / "raw" / "train-images-idx3-ubyte").write_bytes(b"")  # zero bytes
    with pytest.raises(SystemExit, match=r"^error: .*train-images-idx3-ubyte is corrupt: 0 bytes"):
        distillation.main(["--data-root", str(tmp_path / "bad"), "--out", str(tmp_path / "out"), *SMALL])


def test_plots_label_the_classes_and_keep_the_accuracy_axis_readable(tmp_path, data_root, figures):
    distillation.main(["--dataset", "fashion-mnist", "--data-root", str(data_root), "--out", str(tmp_path), *SMALL])
    image_axes = figures["distilled.png"].axes
    assert [ax.get_title() for ax in image_axes[:10]] == list(distillation.CLASS_NAMES["fashion-mnist"])
    loss_ax, acc_ax = figures["curves.png"].axes
    assert [text.get_text() for text in loss_ax.get_legend().get_texts()] == ["per step"]  # no "mean of 1"
    assert acc_ax.get_ylim() == (0.0, 1.0)
    for ax in (loss_ax, acc_ax):  # 3 outer steps, 2 evaluations: whole steps only
        assert all(float(tick).is_integer() for tick in ax.get_xticks())


def test_a_diverging_inner_loop_stops_with_a_message_and_nonzero_exit(tmp_path, data_root):
    with pytest.raises(SystemExit) as info:
        distillation.main(["--data-root", str(data_root), "--out", str(tmp_path), "--inner-lr", "1e6", *SMALL])
    message = str(info.value.code)
    assert message.startswith("error: outer step 1: the inner training loss became ") and "lower --inner-lr" in message
