"""recipes.common and recipes.data: flags to solvers, outputs, checkpoints, optional plots, idx files."""

from __future__ import annotations

import argparse
import builtins
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hyperopt_torch import ConjugateGradient, Exact, Identity, Neumann, Nystrom, make_solver
from recipes import common, data
from recipes.data import DataError, DatasetMissing, import_torchvision, load_split, write_idx_dataset


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


def test_a_solver_flag_the_chosen_solver_does_not_read_is_named_on_stderr(capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    args = parse(["--ihvp", "neumann", "--rank", "3", "--iters", "4"])
    err = capsys.readouterr().err
    assert args.rank == 3 and args.iters == 4  # parsed as given: a sweep may pass one set of flags to every solver
    assert err.count("\n") == 1 and "--rank is ignored: --ihvp neumann does not read it (it reads --iters, --alpha)" in err
    parse(["--ihvp", "identity", "--max-memory", "1"])
    assert "--max-memory is ignored: --ihvp identity does not read it (it reads none" in capsys.readouterr().err
    parse(["--ihvp", "nystrom", "--rank", "3", "--rho", "0.1", "--chunk", "1", "--sketch", "gaussian", "--seed", "2"])
    parse(["--ihvp", "cg", "--iters", "3", "--tol", "1e-3", "--rho", "0.1"])
    parse(["--ihvp", "neumann"])  # the recipe's defaults are never named
    assert capsys.readouterr().err == ""
    all_parser = common.make_parser("recipes.test", "test", outer_steps=3, rank=5, rho=0.01, iters=7, alpha=0.02,
                                    ihvp_choices=(*common.SOLVERS, "all"))
    all_parser.parse_args(["--ihvp", "all", "--rank", "3", "--alpha", "0.1"])  # each read by one of the solvers
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "1")  # under torchrun only rank 0 says it
    parse(["--ihvp", "neumann", "--rank", "3"])
    assert capsys.readouterr().err == ""


def raising(error: BaseException):
    """A recipe's ``main`` under the shared error layer that raises ``error``."""
    @common.command
    def main(argv=None):
        raise error

    return main


@pytest.mark.parametrize("error", [common.RecipeError("no such\n  thing\n"), DataError("no such thing"),
                                   DatasetMissing("no such thing")])
def test_command_turns_recipe_and_data_errors_into_one_line_exit(error):
    with pytest.raises(SystemExit, match="^error: no such thing$"):
        raising(error)()


def test_command_turns_the_librarys_value_errors_into_one_line_and_keeps_other_tracebacks():
    @common.command
    def refused(argv=None):
        make_solver("nystrom", rank=0)  # raised inside hyperopt_torch: a flag choice, not a bug

    with pytest.raises(SystemExit, match="^error: .*rank"):
        refused()
    with pytest.raises(ValueError, match="a bug"):
        raising(ValueError("a bug in the recipe itself"))()


def test_library_keywords_in_a_refusal_are_named_as_the_recipes_flags(monkeypatch):
    monkeypatch.setattr(common, "LIBRARY", Path(__file__).parent)  # treat this file as the library
    with pytest.raises(SystemExit) as info:
        raising(ValueError("too large; raise Exact(max_memory=...) if the device has the memory"))()
    assert str(info.value.code) == "error: too large; raise --max-memory (GiB) if the device has the memory"


def test_command_closes_the_progress_bar_before_the_error_line(capsys):
    @common.command
    def main(argv=None):
        bar = common.progress(parse([]), total=3, initial=0, desc="run")
        bar.update()
        raise common.RecipeError("diverged")

    with pytest.raises(SystemExit):
        main()
    shown = capsys.readouterr().err
    assert "run:" in shown and shown.endswith("\n")  # Python then prints "error: ..." on a fresh line


@pytest.mark.parametrize("text", ["inf", "nan", "-1", "0"])
def test_positive_float_refuses_non_finite_and_non_positive_values(text):
    with pytest.raises(argparse.ArgumentTypeError, match="finite number > 0"):
        common.positive_float(text)


def test_resume_and_overwrite_together_are_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        parse(["--resume", "--overwrite"])
    assert info.value.code == 2 and "not allowed with" in capsys.readouterr().err


def test_resume_refuses_a_run_with_different_settings(tmp_path):
    common.prepare_out(parse(["--out", str(tmp_path), "--rank", "5"]))
    assert json.loads((tmp_path / "config.json").read_text())["rank"] == 5
    common.prepare_out(parse(["--out", str(tmp_path), "--outer-steps", "9", "--resume"]))  # a longer budget is fine
    with pytest.raises(common.RecipeError, match="rank"):
        common.prepare_out(parse(["--out", str(tmp_path), "--rank", "6", "--resume"]))
    with pytest.raises(common.RecipeError, match="no earlier run"):
        common.prepare_out(parse(["--out", str(tmp_path / "empty"), "--resume"]))


def test_a_fresh_run_refuses_a_folder_holding_another_run_and_overwrite_deletes_only_its_files(tmp_path):
    common.prepare_out(parse(["--out", str(tmp_path)]))
    common.Checkpoint(parse(["--out", str(tmp_path)]), "nystrom-seed0").save({"x": torch.zeros(1)})
    (tmp_path / "losses.png").write_bytes(b"png")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(common.RecipeError, match=r"holds an earlier run \(config.json, "
                                                 r"checkpoints/nystrom-seed0.pt, losses.png\): pass --resume .* --overwrite"):
        common.prepare_out(parse(["--out", str(tmp_path), "--rank", "3"]))
    common.prepare_out(parse(["--out", str(tmp_path), "--rank", "3", "--overwrite"]))
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["checkpoints", "config.json", "notes.txt"]
    assert json.loads((tmp_path / "config.json").read_text())["rank"] == 3


def test_a_run_killed_before_its_first_checkpoint_never_resumes_another_runs_state(tmp_path):
    # Issue 17 A1: the old run's checkpoint must not be continued under the new run's config.json.
    old = parse(["--out", str(tmp_path), "--resume"])
    common.prepare_out(parse(["--out", str(tmp_path)]))
    common.Checkpoint(old, "nystrom-seed0").save({"x": torch.zeros(1)})
    new = parse(["--out", str(tmp_path), "--rank", "3", "--overwrite"])
    common.prepare_out(new)  # ... and killed here, before it saves anything
    assert common.Checkpoint(parse(["--out", str(tmp_path), "--rank", "3", "--resume"]), "nystrom-seed0").load() is None
    # A checkpoint of other settings put there by hand is refused by name.
    common.Checkpoint(old, "nystrom-seed0").save({"x": torch.zeros(1)})
    with pytest.raises(common.RecipeError, match=r"checkpoints/nystrom-seed0.pt was written by a run with other "
                                                 r"settings \(rank: 5 -> 3\)"):
        common.Checkpoint(parse(["--out", str(tmp_path), "--rank", "3", "--resume"]), "nystrom-seed0").load()


def test_checkpoint_round_trips_and_is_ignored_without_resume(tmp_path):
    state = {"x": torch.arange(3.0), "curves": {"val_loss": [1.0, 0.5]}, "gen": torch.Generator().get_state()}
    common.Checkpoint(parse(["--out", str(tmp_path)]), "run").save(state)
    assert common.Checkpoint(parse(["--out", str(tmp_path)]), "run").load() is None
    loaded = common.Checkpoint(parse(["--out", str(tmp_path), "--outer-steps", "9", "--resume"]), "run").load()
    assert torch.equal(loaded["x"], state["x"]) and loaded["curves"] == state["curves"] and set(loaded) == set(state)


def test_unreadable_run_files_and_out_paths_are_one_line_errors_naming_them(tmp_path):
    resume = parse(["--out", str(tmp_path), "--resume"])
    (tmp_path / "config.json").write_text('{"rank": 5,')
    with pytest.raises(common.RecipeError, match=r"config.json is unreadable"):
        common.prepare_out(resume)
    common.prepare_out(parse(["--out", str(tmp_path), "--overwrite"]))
    common.Checkpoint(resume, "run").save({"x": torch.zeros(100)})
    path = tmp_path / "checkpoints" / "run.pt"
    path.write_bytes(path.read_bytes()[:200])  # truncated, as by a full disk
    with pytest.raises(common.RecipeError, match=f"checkpoint {path} is unreadable"):
        common.Checkpoint(resume, "run").load()
    with pytest.raises(common.RecipeError, match="is a file, not a folder"):
        common.prepare_out(parse(["--out", str(tmp_path / "config.json")]))


def test_device_that_cannot_hold_numbers_is_refused():
    with pytest.raises(common.RecipeError, match="--device meta cannot run a recipe"):
        common.resolve_device("meta")
    assert common.resolve_device("cpu") == torch.device("cpu")


def test_write_json_writes_strict_json_with_null_for_non_finite_numbers(tmp_path):
    common.write_json(tmp_path / "m.json", {"a": [1.0, float("nan")], "b": {"c": float("inf")}, "d": (2, "x")})
    text = (tmp_path / "m.json").read_text()
    assert json.loads(text, parse_constant=lambda name: pytest.fail(name)) == {"a": [1.0, None], "b": {"c": None},
                                                                                "d": [2, "x"]}


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


def test_missing_dataset_raises_dataset_missing_naming_the_file_in_the_clis_words(tmp_path):
    with pytest.raises(DatasetMissing, match="train-images-idx3-ubyte") as info:
        load_split("mnist", tmp_path, train=True)
    assert "--download" in str(info.value) and "download=True" not in str(info.value)  # not torchvision's wording


def damage_idx(raw: Path, how: str) -> None:
    images, labels = raw / "train-images-idx3-ubyte", raw / "train-labels-idx1-ubyte"
    if how == "empty":
        images.write_bytes(b"")
    elif how == "truncated":
        images.write_bytes(images.read_bytes()[:-100])
    elif how == "extra image":
        data.write_idx(images, np.zeros((31, 28, 28)))
    elif how == "label 12":
        data.write_idx(labels, np.full(30, 12))
    elif how == "not idx":
        labels.write_bytes(b"\x00\x00\x0d\x01" + bytes(34))  # float32 labels


@pytest.mark.parametrize("how, message", [
    ("empty", r"train-images-idx3-ubyte is corrupt: 0 bytes, shorter than an idx header"),
    ("truncated", r"train-images-idx3-ubyte is corrupt: its header promises 23520 bytes \(30 x 28 x 28\), the file "
                  r"holds 23420 \(truncated\)"),
    ("extra image", r"train-images-idx3-ubyte holds 31 images but .*train-labels-idx1-ubyte holds 30 labels"),
    ("label 12", r"train-labels-idx1-ubyte holds label 12, outside the classes 0..9"),
    ("not idx", r"train-labels-idx1-ubyte is corrupt: its header 00000d01 is not"),
])
def test_damaged_idx_files_are_named_in_one_line_before_torchvision_reads_them(tmp_path, how, message):
    write_idx_dataset(tmp_path, "mnist", n_train=30, n_test=20)
    damage_idx(tmp_path / "MNIST" / "raw", how)
    with pytest.raises(DataError, match=message):
        load_split("mnist", tmp_path, train=True)
    assert load_split("mnist", tmp_path, train=False)[0].shape == (20, 1, 28, 28)  # the other split is fine


def test_operators_are_looked_up_through_public_torch_ops():
    # A schema torch has never seen is missing; once defined through torch.library it is found (no torch._C).
    assert not hasattr(torch.ops.hyperopt_torch_test, "nms")
    library = torch.library.Library("hyperopt_torch_test", "DEF")
    library.define("nms(Tensor x) -> Tensor")
    assert hasattr(torch.ops.hyperopt_torch_test, "nms")
    assert "torch._C" not in Path(data.__file__).read_text()
    import_torchvision()
    assert all(hasattr(torch.ops.torchvision, name) for name in ("nms", "qnms"))


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


def test_check_hypergradient_stops_on_a_skipped_step_but_not_on_a_diverged_neumann_series():
    class Info:
        skipped, diverged, train_loss, val_loss = True, False, 1e31, float("nan")

    with pytest.raises(common.RecipeError, match=r"^outer step 2: the step was skipped.*training loss 1e\+31, "
                                                 r"validation loss nan\): the inner loop diverged; lower it$"):
        common.check_hypergradient(Info(), "outer step 2", "lower it")
    Info.diverged = True  # the solver's own failure: the library warns and the run goes on
    common.check_hypergradient(Info(), "outer step 2", "lower it")


def test_exact_takes_max_memory_from_its_flag():
    solver = common.solver_from_args(parse(["--ihvp", "exact", "--max-memory", "0.5"]))
    assert isinstance(solver, Exact) and solver.max_memory == 2**29


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
