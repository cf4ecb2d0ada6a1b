"""recipes.weight_decay end to end on a small instance of the paper's section 5.1 problem."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recipes import weight_decay

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
SMALL = ["--dim", "20", "--n-train", "100", "--n-val", "100", "--n-test", "50", "--inner-steps", "30", "--no-progress"]


def test_all_solvers_run_on_two_seeds_and_nystrom_lowers_validation_loss(tmp_path):
    metrics = weight_decay.main(["--ihvp", "all", "--seeds", "2", "--outer-steps", "6", "--out", str(tmp_path), *SMALL])
    assert metrics == json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics["methods"]) == {"nystrom", "cg", "neumann", "identity", "exact"}
    for method in metrics["methods"].values():
        assert len(method["curves"]["val_loss"]) == 2 and len(method["curves"]["val_loss"][0]) == 6
        assert method["final"]["val_loss"]["std"] > 0  # two different seeds were averaged
    for val_loss in metrics["methods"]["nystrom"]["curves"]["val_loss"]:
        assert val_loss[-1] < val_loss[0]
    assert json.loads((tmp_path / "config.json").read_text())["ihvp"] == "all"
    if HAS_MATPLOTLIB:
        assert (tmp_path / "losses.png").stat().st_size > 0 and (tmp_path / "accuracy.png").exists()


def test_mlp_has_one_decay_per_weight_and_keeps_decays_nonnegative(tmp_path):
    metrics = weight_decay.main(["--model", "mlp", "--hidden", "8", "--outer-steps", "4", "--out", str(tmp_path), *SMALL])
    curves = metrics["methods"]["nystrom"]["curves"]
    assert all(0.0 <= acc <= 1.0 for acc in curves["val_acc"][0])
    assert all(decay >= 0.0 for decay in curves["decay_mean"][0])
    assert curves["val_loss"][0][-1] < curves["val_loss"][0][0]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["init_decay"] == 0.1  # the model's default, recorded so --resume can compare it


def test_resume_continues_exactly_where_an_uninterrupted_run_goes(tmp_path):
    flags = ["--ihvp", "nystrom", "--checkpoint-every", "1", *SMALL]
    straight = weight_decay.main([*flags, "--outer-steps", "5", "--out", str(tmp_path / "a")])
    weight_decay.main([*flags, "--outer-steps", "2", "--out", str(tmp_path / "b")])
    resumed = weight_decay.main([*flags, "--outer-steps", "5", "--out", str(tmp_path / "b"), "--resume"])
    for name in ("val_loss", "decay_mean"):
        assert resumed["methods"]["nystrom"]["curves"][name] == straight["methods"]["nystrom"]["curves"][name]


def test_invalid_solver_settings_exit_with_one_line(tmp_path):
    with pytest.raises(SystemExit, match="^error: .*chunk"):
        weight_decay.main(["--rank", "3", "--chunk", "4", "--out", str(tmp_path), *SMALL])


def test_runs_as_module_with_help():
    result = subprocess.run([sys.executable, "-m", "recipes.weight_decay", "--help"], capture_output=True, text=True,
                            cwd=Path(__file__).parents[1], check=True)
    assert "--ihvp" in result.stdout and "--outer-steps" in result.stdout and "--seeds" in result.stdout


def test_exact_on_a_model_too_large_for_it_exits_with_one_line_naming_the_solver(tmp_path, capsys):
    # The command: a 100 -> 300 -> 1 MLP has 30,601 parameters, too many for a dense Hessian.
    with pytest.raises(SystemExit) as info:
        weight_decay.main(["--ihvp", "exact", "--model", "mlp", "--hidden", "300", "--n-train", "50", "--n-val", "50",
                           "--n-test", "10", "--inner-steps", "1", "--outer-steps", "1", "--no-progress",
                           "--out", str(tmp_path)])
    message = str(info.value.code)
    assert message.startswith("error: Exact() needs about ") and "\n" not in message
    assert "raise --max-memory (GiB) if the device has the memory" in message  # the flag, not Exact(max_memory=...)


def test_max_memory_flag_reaches_the_exact_solver(tmp_path):
    with pytest.raises(SystemExit, match=r"^error: Exact\(\) needs .* more than max_memory=0.00 GiB"):
        weight_decay.main(["--ihvp", "exact", "--max-memory", "1e-6", "--outer-steps", "1", "--out", str(tmp_path),
                           *SMALL])


def test_a_new_run_in_an_occupied_folder_needs_overwrite_and_never_resumes_the_old_runs_state(tmp_path, monkeypatch):
    flags = ["--outer-steps", "2", "--checkpoint-every", "1", "--out", str(tmp_path / "run"), *SMALL, "--inner-steps", "5"]
    weight_decay.main(flags)
    with pytest.raises(SystemExit, match=r"^error: --out .*run holds an earlier run \(config.json, metrics.json"):
        weight_decay.main([*flags, "--rank", "3"])

    def killed(*args):  # the new run dies before its first checkpoint
        raise KeyboardInterrupt

    monkeypatch.setattr(weight_decay, "run", killed)
    with pytest.raises(KeyboardInterrupt):
        weight_decay.main([*flags, "--rank", "3", "--overwrite"])
    monkeypatch.undo()
    resumed = weight_decay.main([*flags, "--rank", "3", "--resume"])  # starts afresh: the old checkpoint is gone
    fresh = weight_decay.main([*flags, "--rank", "3", "--out", str(tmp_path / "fresh")])
    assert resumed["methods"]["nystrom"]["curves"]["val_loss"] == fresh["methods"]["nystrom"]["curves"]["val_loss"]


@pytest.mark.parametrize("device, message", [("meta", "--device meta cannot run a recipe"), ("cuda:0", "CUDA"),
                                             ("nonsense", "invalid --device 'nonsense'")])
def test_unusable_devices_are_one_line_errors(tmp_path, device, message):
    if device == "cuda:0" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(SystemExit, match=f"^error: .*{message}"):
        weight_decay.main(["--device", device, "--out", str(tmp_path), *SMALL])


def test_out_pointing_at_a_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match=r"^error: --out .*file is a file, not a folder"):
        weight_decay.main(["--out", str(tmp_path / "file"), *SMALL])


@pytest.mark.parametrize("flag", ["--init-decay", "--momentum", "--noise"])
def test_negative_values_of_nonnegative_flags_are_usage_errors(tmp_path, flag, capsys):
    with pytest.raises(SystemExit) as info:
        weight_decay.main([flag, "-1", "--out", str(tmp_path), *SMALL])
    assert info.value.code == 2 and "expected a finite number >= 0" in capsys.readouterr().err


def test_a_diverging_inner_loop_stops_with_a_message_and_nonzero_exit(tmp_path):
    with pytest.raises(SystemExit) as info:
        weight_decay.main(["--inner-lr", "100", "--outer-steps", "3", "--out", str(tmp_path), *SMALL])
    message = str(info.value.code)  # a string code: Python prints it and exits with status 1
    assert message.startswith("error: nystrom, seed 0, outer step 1: the inner training loss became ")
    assert "lower --inner-lr" in message


def test_one_seed_prints_no_spread(tmp_path, capsys):
    weight_decay.main(["--ihvp", "identity", "--outer-steps", "2", "--out", str(tmp_path), *SMALL])
    line = [row for row in capsys.readouterr().out.splitlines() if "val loss" in row][0]
    assert "±" not in line


def test_the_loss_plot_gives_every_solver_a_style_says_why_nystrom_beats_exact_and_counts_steps_in_integers(
        tmp_path, figures):
    weight_decay.main(["--ihvp", "all", "--outer-steps", "2", "--out", str(tmp_path), *SMALL])
    fig = figures["losses.png"]
    for ax in fig.axes:
        styles = {(line.get_linestyle(), line.get_marker()) for line in ax.get_lines()}
        assert len(styles) == 5  # cg, exact and identity overlap on this problem: colour alone hides them
    assert "divides by ρ = 0.01" in fig.get_supxlabel() and "exact" in fig.get_supxlabel()
    assert all(float(tick).is_integer() for tick in fig.axes[0].get_xticks())  # 2 steps: no 1.25, 1.5, ...
