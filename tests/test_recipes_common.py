"""recipes.common and recipes.data: flags to solvers, outputs, checkpoints, optional plots, idx files."""

from __future__ import annotations

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
