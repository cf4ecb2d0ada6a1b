"""The benchmarks at a tiny size: structure of their JSON and figures, never their timings."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from benchmarks import accuracy, common, nystrom_overhead, peers, scaling, speed_memory
from recipes.wideresnet import WideResNet, wrn28


def test_time_interleaved_runs_warmup_then_rotated_rounds():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = common.time_interleaved(fns, torch.device("cpu"), warmup=1, repeats=3)
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}


def test_speed_memory_writes_json_table_and_png_with_per_process_cpu_memory(tmp_path):
    data = speed_memory.main([
        "--out", str(tmp_path), "--device", "cpu", "--threads", "1", "--batch", "2", "--ls", "1", "--ks", "2",
        "--warmup", "0", "--repeats", "1", "--methods", "cg,nystrom_space",
    ])
    saved = json.loads((tmp_path / "speed_memory_lenet.json").read_text())
    assert saved["memory"] == "child-process peak RSS"
    labels = [r["label"] for r in saved["results"]]
    assert labels == ["CG l=1", "Nyström k=2 κ=1"]
    for row in saved["results"]:
        assert {"family", "param", "hvps", "seconds_median", "seconds_all", "peak_bytes", "baseline_bytes",
                "extra_bytes", "time_ratio", "memory_ratio"} <= set(row)
        assert row["peak_bytes"] >= row["baseline_bytes"] > 0
    by_label = {r["label"]: r for r in saved["results"]}
    assert by_label["Nyström k=2 κ=1"]["hvps"] == 3  # κ·m(m+1)/2 with m = 2
    assert (tmp_path / "speed_memory_lenet.png").stat().st_size > 0
    assert "| CG l=1 |" in speed_memory.markdown_table(data)


def test_speed_memory_rejects_unknown_methods(tmp_path):
    with pytest.raises(SystemExit):
        speed_memory.main(["--out", str(tmp_path), "--methods", "cg,bogus"])


def test_speed_memory_wrn_case_and_truncated_unroll_run_on_cpu(tmp_path):
    speed_memory.main([
        "--out", str(tmp_path), "--device", "cpu", "--threads", "1", "--model", "wrn", "--width", "1", "--batch", "2",
        "--ls", "1", "2", "--ks", "1", "--warmup", "0", "--repeats", "1", "--no-memory",
        "--methods", "cg,nystrom_time,unrolled_truncated,nystrom_auto",
    ])
    saved = json.loads((tmp_path / "speed_memory_wrn.json").read_text())
    assert saved["model"] == "wrn-28-1" and saved["memory"] is None
    assert [r["label"] for r in saved["results"]] == ["CG l=1", "CG l=2", "Nyström k=1 κ=k", "Nyström k=1 κ=auto",
                                                      "Unrolled T=2 K=1"]
    assert saved["results"][-1]["hvps"] == 1
    auto = saved["results"][3]
    assert auto["chunk_used"] == 1 and saved["results"][2]["chunk_used"] == 1 and saved["results"][0]["chunk_used"] is None
    assert "κ=auto (chose κ=1)" in speed_memory.markdown_table(saved)


def test_accuracy_writes_json_and_all_figures(tmp_path):
    data = accuracy.main([
        "--out", str(tmp_path), "--threads", "1", "--costs", "1", "60", "--seeds", "1",
        "--problems", "ridge,mlp_indefinite",
    ])
    saved = json.loads((tmp_path / "accuracy.json").read_text())
    assert set(saved["problems"]) == {"ridge", "mlp_indefinite"}
    ridge = saved["problems"]["ridge"]
    assert set(ridge["curves"]) == {"CG", "MINRES", "normal-CG", "Neumann α=1/λmax", "ITD (unrolled, T=l)",
                                    "Nyström columns ρ=0.01", "Nyström gaussian ρ=0.01", "Identity"}
    assert "ITD (unrolled, T=l)" not in saved["problems"]["mlp_indefinite"]["curves"]  # no ITD on non-convex
    assert saved["problems"]["mlp_indefinite"]["eigenvalue_min"] < 0
    for pt in ridge["curves"]["CG"]:
        assert {"param", "hvps", "seconds", "error", "cosine"} <= set(pt)
    # At l = p = 60, CG and full-rank Nyström solve the ridge system: CG exactly, Nyström up to ρ's bias.
    assert ridge["curves"]["CG"][-1]["error"] < 1e-8
    assert ridge["curves"]["MINRES"][-1]["error"] < 1e-8
    assert [pt["hvps"] for pt in ridge["curves"]["normal-CG"]] == [1 + 2 * 1, 1 + 2 * 60]
    assert ridge["curves"]["Nyström columns ρ=0.01"][-1]["error"] < 0.1
    for pt in ridge["curves"]["Nyström columns ρ=0.01"]:
        assert -1.0 <= pt["cosine"] <= 1.0
    assert ridge["curves"]["CG"][-1]["cosine"] > 1 - 1e-12
    rob = ridge["robustness"]
    assert rob["settings"] == [0.01, 0.1, 1.0] and rob["sizes"] == [5, 10, 20, 60]  # k, l up to p = 60
    nystrom = rob["methods"]["Nyström (ρ × k)"]
    assert set(nystrom) == {"error", "cosine"} and len(nystrom["cosine"]) == 3 and len(nystrom["cosine"][0]) == 4
    # ridge is full rank with λ_min = 0.26 > ρ = 0.01: below k = p the 1/ρ scaling outside the sketch makes the
    # norm far off while the direction stays close; at k = p only ρ's bias is left.
    assert nystrom["error"][0][0] > 5 and nystrom["cosine"][0][0] > 0.5
    assert nystrom["error"][0][-1] < 0.1 and nystrom["cosine"][0][-1] > 0.99
    assert "(0.9" in accuracy.summary_table(data) and "| ρ=0.01 |" in accuracy.summary_table(data)
    assert set(saved["figure1_errors"]) == {"true inverse", "Nyström k=5", "Nyström k=10", "Nyström k=20", "Neumann l=20"}
    assert saved["figure1_errors"]["true inverse"] == 0
    assert saved["theorem1_max_error_over_bound"] <= 1.0  # Theorem 1 holds on every sampled case
    for name in ("error_vs_cost", "inverse", "theorem1", "robustness"):
        assert (tmp_path / f"accuracy_{name}.png").stat().st_size > 0
    assert "| CG |" in accuracy.summary_table(data)


def test_wrn28_2_has_the_papers_parameter_count_and_cifar_output_shape():
    model = wrn28(2)
    assert sum(p.numel() for p in model.parameters()) == 1_467_610  # "1.5 × 10^6" in the paper
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_wideresnet_rejects_a_depth_not_of_the_form_6n_plus_4():
    with pytest.raises(ValueError, match="Invalid depth"):
        WideResNet(depth=27)


def test_nystrom_overhead_agrees_with_the_reference_and_writes_json_and_png(tmp_path):
    result = nystrom_overhead.main(["--out", str(tmp_path), "--device", "cpu", "--threads", "1", "--batch", "4",
                                    "--rank", "3", "--repeats", "1", "--warmup", "0"])
    assert result["relative_difference_to_reference"] < 1e-4  # same index set, same Eq. 6, float32
    saved = json.loads((tmp_path / "overhead.json").read_text())
    floors = {"floor_func:vmap", "floor_func:loop", "floor_autograd:vmap", "floor_autograd:loop"}
    assert set(saved["median_seconds"]) == {"step", "step_autograd", "reference", "rollback_copies",
                                            "rollback_copies_before", *floors}
    assert saved["floor"] in floors and saved["clock"] == "process_time"
    assert saved["step_over_floor"] > 0 and saved["step_over_reference"] > 0
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "overhead.png").stat().st_size > 0


def test_nystrom_overhead_on_the_reweighting_mlp_times_every_strategy_floor(tmp_path):
    result = nystrom_overhead.main(["--out", str(tmp_path), "--device", "cpu", "--threads", "1", "--model", "mlp",
                                    "--width", "8", "--batch", "4", "--rank", "4", "--repeats", "1", "--warmup", "0"])
    assert set(result["median_seconds"]) == {"step", "step_autograd", "floor_func:vmap", "floor_func:loop",
                                             "floor_func:vmap:2", "floor_autograd:vmap", "floor_autograd:loop",
                                             "rollback_copies", "rollback_copies_before"}
    assert result["params"] == 784 * 8 + 8 + 8 * 8 + 8 + 8 * 10 + 10 and result["relative_difference_to_reference"] is None
    assert result["step_hvp_strategy"] in ("vmap", "loop", "vmap:2") and result["step_engine"] in ("func", "autograd")


class _Fake:
    """A stand-in peer: computes the hypergradient with our own code, so it must agree exactly."""

    def __call__(self, problem, solver, iters):
        return peers.ours(problem, solver, iters)


def test_peers_times_ours_and_installed_peers_and_compares_their_results(tmp_path, monkeypatch):
    monkeypatch.setattr(peers, "available_peers", lambda: {"fake": _Fake()})
    data = peers.main(["--out", str(tmp_path), "--threads", "1", "--problems", "ridge,mlp", "--iters", "2",
                       "--warmup", "0", "--repeats", "2"])
    saved = json.loads((tmp_path / "peers.json").read_text())
    assert [(r["problem"], r["solver"]) for r in saved["rows"]] == [
        ("ridge", "cg"), ("ridge", "neumann"), ("mlp", "cg"), ("mlp", "neumann")]
    assert [r["p"] for r in saved["rows"]] == [200, 200, 754, 754]
    for row in saved["rows"]:
        assert set(row["methods"]) == {"ours", "fake"} and row["fastest_peer"] == "fake"
        assert row["methods"]["fake"]["relative_difference_to_ours"] == 0
        assert row["ours_over_fastest_peer"] > 0 and len(row["methods"]["ours"]["seconds_all"]) == 2
        # ridge is convex: both products spent; Neumann never stops early
        assert row["ours_hvps"] == 2 or (row["solver"] == "cg" and row["ours_negative_curvature"])
    assert saved["missing_peers"] == ["betty", "hypertorch", "torchopt"]
    assert "| ridge | 200 | cg l=2 | 2 |" in peers.markdown_table(data)


def test_peers_rejects_unknown_problems(tmp_path):
    with pytest.raises(SystemExit):
        peers.main(["--out", str(tmp_path), "--problems", "ridge,bogus"])


@pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in peers.PEERS.values()), reason="peers not installed")
def test_installed_peers_agree_with_ours_where_they_solve_the_same_system(tmp_path):
    """hypertorch's and torchopt's CG and torchopt's / betty's Neumann run the same iteration as ours."""
    problem = peers.Problem("logistic", dtype=torch.float64)
    for solver, names in (("cg", ("hypertorch", "torchopt")), ("neumann", ("betty", "torchopt"))):
        ref = peers.ours(problem, solver, 5)()
        for name in names:
            assert peers.relative_difference(getattr(peers, name)(problem, solver, 5)(), ref) < 1e-10, (name, solver)


def test_scaling_writes_both_curves(tmp_path):
    data = scaling.main(["--out", str(tmp_path), "--threads", "1", "--batch", "2", "--ks", "1", "2", "--widths", "4",
                         "--rank", "2", "--warmup", "0", "--repeats", "1"])
    saved = json.loads((tmp_path / "scaling.json").read_text())
    assert [(r["method"], r["k"]) for r in saved["in_k"]] == [("nystrom", 1), ("cg", 1), ("nystrom", 2), ("cg", 2)]
    assert [r["p"] for r in saved["in_p"]] == [784 * 4 + 4 + 4 * 4 + 4 + 4 * 10 + 10] * 2
    assert "| 2 | nystrom |" in scaling.markdown_tables(data)


@pytest.mark.parametrize("name", ["accuracy", "distributed", "fast_paths", "forms", "nystrom_overhead", "peers",
                                  "precision", "scaling", "speed_memory"])
def test_every_benchmark_takes_threads(name, capsys):
    module = importlib.import_module(f"benchmarks.{name}")
    with pytest.raises(SystemExit) as info:
        module.main(["--help"])
    assert info.value.code == 0 and "--threads" in capsys.readouterr().out


def test_forms_benchmark_times_the_three_forms_of_theta_and_they_agree(tmp_path):
    from benchmarks import forms

    result = forms.main(["--out", str(tmp_path), "--threads", "1", "--batch", "4", "--repeats", "1", "--warmup", "0"])
    assert set(result["ratio_to_module_form"]) == {f"{s} {f}" for s in forms.SOLVERS for f in ("dict", "list")}
    assert all(d < 1e-6 for d in result["relative_difference_to_module_form"].values())
    assert (tmp_path / "forms.json").exists()


def test_fast_paths_benchmark_runs_both_ways_with_equal_hypergradients(tmp_path, monkeypatch):
    from benchmarks import fast_paths

    monkeypatch.setattr(fast_paths, "PROBLEMS", ("logistic cg l=10",))
    result = fast_paths.main(["--out", str(tmp_path), "--threads", "1", "--repeats", "1", "--warmup", "0"])
    row = result["problems"]["logistic cg l=10"]
    assert row["relative_difference"] == 0.0 and row["public_over_fast"] > 0
