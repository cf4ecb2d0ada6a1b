"""recipes.common and recipes.data: flags to solvers, outputs, checkpoints, optional plots, idx files."""

from __future__ import annotations

import argparse
import builtins
import json

import pytest
import torch

from hyperopt_torch import ConjugateGradient, Exact, Identity, Neumann, Nystrom
from recipes import common
from recipes.data import DatasetMissing, import_torchvision, load_split, write_idx_dataset


def parse(argv):
    parser = common.make_parser("recipes.test", "test", outer_steps=3, rank=5, rho=0.01, iters=7, alpha=0.02)
    return parser.parse_args(argv)


@pytest.mark.parametrize("name, cls", [("nystrom", Nystrom), ("cg", ConjugateGradient), ("neumann", Neumann),
                                       ("identity", Identity), ("exact", Exact)])
def test_solver_from_args_builds_every_solver_from_the_same_flags(name, cls):
    # All flags carry values; only the ones a solver takes may reach make_solver.
    args = parse(["--ihvp", name, "--chunk", "2"])
    assert isinstance(common.solver_from_args(args), cls)


def test_every_solver_setting_of_the_library_is_a_flag_and_reaches_the_solver():
    from hyperopt_torch.ihvp import SOLVER_SETTINGS

    args = parse(["--sketch", "gaussian", "--tol", "1e-5", "--seed", "3"])
    assert all(hasattr(args, setting) for settings in SOLVER_SETTINGS.values() for setting in settings)
    nystrom = common.solver_from_args(args)
    assert (nystrom.sketch, nystrom.seed) == ("gaussian", 3)
    assert common.solver_from_args(args, "nystrom", seed=8).seed == 8  # a recipe's per-run seed
    assert common.solver_from_args(args, "cg", seed=8).tol == 1e-5  # seed does not apply to cg: ignored


def test_solver_from_args_turns_invalid_combinations_into_recipe_error():
    with pytest.raises(common.RecipeError, match="chunk"):
        common.solver_from_args(parse(["--chunk", "9"]))  # κ must not exceed the rank k = 5


def test_bad_flag_value_is_a_usage_error_not_a_traceback(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(["--rank", "0"])
    assert exit_info.value.code == 2
    assert "expected an integer >= 1" in capsys.readouterr().err


def test_clean_errors_turns_recipe_errors_into_one_line_exit():
    with pytest.raises(SystemExit, match="^error: no such thing$"):
        with common.clean_errors():
            raise common.RecipeError("no such thing")


def test_resume_refuses_a_run_with_different_settings(tmp_path):
    common.prepare_out(parse(["--out", str(tmp_path), "--rank", "5"]))
    assert json.loads((tmp_path / "config.json").read_text())["rank"] == 5
    common.prepare_out(parse(["--out", str(tmp_path), "--outer-steps", "9", "--resume"]))  # a longer budget is fine
    with pytest.raises(common.RecipeError, match="rank"):
        common.prepare_out(parse(["--out", str(tmp_path), "--rank", "6", "--resume"]))
    with pytest.raises(common.RecipeError, match="no earlier run"):
        common.prepare_out(parse(["--out", str(tmp_path / "empty"), "--resume"]))


def test_checkpoint_round_trips_and_is_ignored_without_resume(tmp_path):
    state = {"x": torch.arange(3.0), "curves": {"val_loss": [1.0, 0.5]}, "gen": torch.Generator().get_state()}
    common.Checkpoint(tmp_path, "run", resume=False).save(state)
    assert common.Checkpoint(tmp_path, "run", resume=False).load() is None
    loaded = common.Checkpoint(tmp_path, "run", resume=True).load()
    assert torch.equal(loaded["x"], state["x"]) and loaded["curves"] == state["curves"]


def test_save_figure_is_skipped_with_a_message_without_matplotlib(tmp_path, monkeypatch, capsys):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert common.save_figure(tmp_path / "x.png", lambda fig: None) is False
    assert "plot skipped" in capsys.readouterr().out
    assert not (tmp_path / "x.png").exists()


def test_import_torchvision_is_idempotent():
    assert import_torchvision() is import_torchvision()


def test_written_idx_files_load_through_torchvision(tmp_path):
    write_idx_dataset(tmp_path, "fashion-mnist", n_train=30, n_test=20)
    images, labels = load_split("fashion-mnist", tmp_path, train=True)
    assert images.shape == (30, 1, 28, 28) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and set(labels.tolist()) == set(range(10))
    assert load_split("fashion-mnist", tmp_path, train=False)[0].shape == (20, 1, 28, 28)


def test_missing_dataset_raises_dataset_missing_naming_the_file(tmp_path):
    with pytest.raises(DatasetMissing, match="train-images-idx3-ubyte"):
        load_split("mnist", tmp_path, train=True)


def test_nonnegative_float_accepts_zero_and_refuses_negatives_and_nan():
    assert common.nonnegative_float("0") == 0.0
    for bad in ("-1", "nan"):
        with pytest.raises(argparse.ArgumentTypeError, match=">= 0"):
            common.nonnegative_float(bad)


def test_check_finite_passes_finite_values_and_names_the_first_bad_one():
    common.check_finite(torch.tensor([1.0, 2.0]), "loss", "hint")
    common.check_finite(0.5, "loss", "hint")
    with pytest.raises(common.RecipeError, match=r"^inner loss became inf: the inner loop diverged; lower it$"):
        common.check_finite(torch.tensor([1.0, float("inf"), float("nan")]), "inner loss", "lower it")
    with pytest.raises(common.RecipeError, match="became nan"):
        common.check_finite(float("nan"), "inner loss", "lower it")


def test_outer_step_turns_the_librarys_value_error_into_a_recipe_error():
    class Refusing:
        def step(self, *args):
            raise ValueError("Exact() builds the dense 9x9 Hessian")

    with pytest.raises(common.RecipeError, match=r"^--ihvp exact: Exact\(\) builds"):
        common.outer_step(Refusing(), None, None, None, "exact")


def test_clean_errors_folds_a_multi_line_message_onto_one_line():
    with pytest.raises(SystemExit, match="^error: first second$"):
        with common.clean_errors():
            raise common.RecipeError("first\n  second\n")


def test_failed_download_names_the_network_cause_not_pass_download(tmp_path, monkeypatch):
    torchvision = import_torchvision()

    def offline(root, train, download):  # what torchvision's MNIST.download raises without a network
        assert download
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\n"
                           "Tried https://a.example/, got:\n<urlopen error [Errno -2] Name or service not known>\n"
                           "Tried http://b.example/, got:\n<urlopen error [Errno -2] Name or service not known>\n")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    with pytest.raises(DatasetMissing) as info:
        load_split("mnist", tmp_path, train=True, download=True)
    message = str(info.value)
    assert message.startswith(f"could not download mnist into {tmp_path}: <urlopen error [Errno -2] Name or service "
                              "not known>. Without a network")
    assert "Pass --download" not in message and "\n" not in message
