"""recipes.imaml and recipes.fewshot: the iMAML meta-gradient against closed forms, and the recipe end to end."""

from __future__ import annotations

import copy
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hyperopt_torch import ConjugateGradient, Exact, Nystrom, implicit_hypergradient
from recipes import imaml
from recipes.data import DataError, write_idx_dataset
from recipes.fewshot import TaskSampler, load_classes, write_omniglot_tree

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
DT = torch.float64
LAM = 0.7
TINY = ["--width", "4", "--query", "2", "--meta-batch", "2", "--inner-steps", "2", "--eval-tasks", "4",
        "--no-progress"]
ROOT = Path(__file__).parents[1]


# -- the meta-gradient ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def softmax_task():
    """Softmax regression on a 3-way 2-shot support set: H_support has rank ≤ 6·2 = 12 < p = 21."""
    g = torch.Generator().manual_seed(0)
    d, ways = 6, 3
    support = (torch.randn(6, d, generator=g, dtype=DT), torch.arange(ways).repeat(2))
    query = (torch.randn(9, d, generator=g, dtype=DT), torch.arange(ways).repeat(3))
    meta = nn.Linear(d, ways).to(DT)
    with torch.no_grad():
        for p in meta.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT))
    model = copy.deepcopy(meta)
    theta0 = list(meta.parameters())
    imaml.adapt(model, theta0, support, LAM, steps=80, lr=0.5)  # contracts by ≤ 1 − lr·λ = 0.65 per step
    grad = torch.autograd.grad(imaml.training_loss(theta0, support, LAM)(model), list(model.parameters()))
    assert torch.cat([g.flatten() for g in grad]).norm() < 1e-13  # the inner problem is solved

    def flat_loss(vector, split):
        weight, bias = vector[: d * ways].view(ways, d), vector[d * ways:]
        return F.cross_entropy(split[0] @ weight.T + bias, split[1])

    theta = torch.cat([p.detach().flatten() for p in model.parameters()])
    hessian = torch.func.hessian(lambda v: flat_loss(v, support))(theta)
    grad_g = torch.func.grad(lambda v: flat_loss(v, query))(theta)
    closed_form = LAM * torch.linalg.solve(hessian + LAM * torch.eye(len(theta), dtype=DT), grad_g)
    return dict(model=model, theta0=theta0, support=support, query=query, closed_form=closed_form,
                hessian=hessian, flat_loss=flat_loss)


def meta_gradient(task, solver, form):
    grads, _ = implicit_hypergradient(task["theta0"], imaml.training_loss(task["theta0"], task["support"], LAM, form),
                                      imaml.query_loss(task["query"]), task["model"], solver,
                                      generator=torch.Generator().manual_seed(0))
    return torch.cat([g.flatten() for g in grads])


def test_closed_form_is_the_derivative_of_the_query_loss_at_the_inner_solution(softmax_task):
    # Central differences of g(θ*(θ₀)) along a random direction, θ* by Newton's method in float64.
    task = softmax_task
    theta0 = torch.cat([p.detach().flatten() for p in task["theta0"]])
    direction = torch.randn(len(theta0), generator=torch.Generator().manual_seed(1), dtype=DT)

    solution = torch.cat([p.detach().flatten() for p in task["model"].parameters()])

    def query_at_solution(anchor):
        theta = solution.clone()  # θ*(θ₀); Newton's method converges quadratically from there to θ*(θ₀ ± εv)
        for _ in range(6):
            f = lambda v: task["flat_loss"](v, task["support"]) + 0.5 * LAM * (v - anchor).square().sum()  # noqa: E731
            theta = theta - torch.linalg.solve(torch.func.hessian(f)(theta), torch.func.grad(f)(theta))
        return task["flat_loss"](theta, task["query"])

    eps = 1e-5
    numeric = (query_at_solution(theta0 + eps * direction) - query_at_solution(theta0 - eps * direction)) / (2 * eps)
    assert torch.isclose(numeric, task["closed_form"] @ direction, rtol=1e-7)


@pytest.mark.parametrize("form", ["hessian", "damping"])
def test_library_meta_gradient_equals_lambda_times_damped_inverse_times_query_gradient(softmax_task, form):
    # hessian form: the solver sees H_s + λI and adds a negligible ρ; damping form: it sees H_s and ρ = λ.
    solver = Exact(rho=1e-13) if form == "hessian" else Exact(rho=LAM)
    h = meta_gradient(softmax_task, solver, form)
    torch.testing.assert_close(h, softmax_task["closed_form"], rtol=1e-10, atol=1e-13)
    cg = ConjugateGradient(iters=40, rho=1e-13 if form == "hessian" else LAM)
    torch.testing.assert_close(meta_gradient(softmax_task, cg, form), softmax_task["closed_form"], rtol=1e-8, atol=1e-12)


def test_nystrom_is_exact_for_a_low_rank_support_hessian_only_when_lambda_is_its_damping(softmax_task):
    assert torch.linalg.matrix_rank(softmax_task["hessian"]) <= 12
    closed_form = softmax_task["closed_form"]
    damping = meta_gradient(softmax_task, Nystrom(rank=16, rho=LAM), "damping")
    torch.testing.assert_close(damping, closed_form, rtol=1e-9, atol=1e-12)
    # A rank-16 sketch of H_s + λI (p = 21) drops λI on 5 directions, where it divides by ρ instead of λ + ρ.
    sketched = meta_gradient(softmax_task, Nystrom(rank=16, rho=0.01), "hessian")
    assert (sketched - closed_form).norm() / closed_form.norm() > 0.5


# -- tasks ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def omniglot_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("omniglot")
    write_omniglot_tree(root, alphabets=2, characters=3, drawers=20)
    return root


@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("mnist")
    write_idx_dataset(root, "mnist", n_train=120, n_test=60)
    return root


def test_omniglot_split_and_tasks_follow_the_real_layout(omniglot_root):
    train, test = load_classes("omniglot", omniglot_root, train_classes=8)
    assert len(train) == 8 and len(test) == 4  # 12 characters: 2 sets × 2 alphabets × 3
    assert all(c.shape == (20, 1, 28, 28) for c in train + test)
    assert 0.0 <= float(torch.cat(train).min()) and float(torch.cat(train).max()) <= 1.0
    assert torch.cat(train).mean() < 0.5  # strokes are 1 on a 0 background
    task = TaskSampler(test, ways=5, shots=2, query=3, generator=torch.Generator().manual_seed(0)).sample()
    assert task.support[0].shape == (10, 1, 28, 28) and task.query[0].shape == (15, 1, 28, 28)
    assert sorted(task.support[1].tolist()) == sorted(list(range(5)) * 2)
    assert torch.cat([task.support[1], task.query[1]]).bincount().tolist() == [5] * 5


def test_sampler_rejects_more_ways_or_images_than_the_data_has(omniglot_root):
    _, test = load_classes("omniglot", omniglot_root, train_classes=8)
    with pytest.raises(ValueError, match="ways"):
        TaskSampler(test, ways=17, shots=1, query=1, generator=torch.Generator())
    with pytest.raises(ValueError, match="shots"):
        TaskSampler(test, ways=5, shots=5, query=16, generator=torch.Generator())


# -- the recipe end to end -----------------------------------------------------------------------
def test_runs_all_solvers_on_a_generated_omniglot_tree(tmp_path, omniglot_root):
    metrics = imaml.main(["--data-root", str(omniglot_root), "--train-classes", "8", "--ihvp", "all",
                          "--outer-steps", "2", "--eval-every", "2", "--out", str(tmp_path), *TINY])
    assert metrics == json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics["methods"]) == {"nystrom", "cg", "neumann"}
    for method, result in metrics["methods"].items():
        assert len(result["curves"]["query_loss"]) == 2 and result["curves"]["eval_step"] == [2]
        acc = result["final"]["test_acc"]
        assert 0.0 <= acc["mean"] <= 1.0 and acc["ci95"] > 0 and acc["tasks"] == 4
        assert result["final"]["lam_in"] == ("hessian" if method == "neumann" else "damping")
    assert metrics["methods"]["nystrom"]["final"]["hvps_per_task"] == 10
    assert 0.0 <= metrics["baseline"]["mean"] <= 1.0
    if HAS_MATPLOTLIB:
        assert (tmp_path / "curves.png").stat().st_size > 0 and (tmp_path / "accuracy.png").stat().st_size > 0


def test_resume_on_mnist_idx_files_matches_an_uninterrupted_run(tmp_path, mnist_root):
    flags = ["--dataset", "mnist", "--data-root", str(mnist_root), "--checkpoint-every", "1", "--eval-every", "2",
             *TINY]
    straight = imaml.main([*flags, "--outer-steps", "3", "--out", str(tmp_path / "a")])
    imaml.main([*flags, "--outer-steps", "2", "--out", str(tmp_path / "b")])
    resumed = imaml.main([*flags, "--outer-steps", "3", "--out", str(tmp_path / "b"), "--resume"])
    for name, curve in straight["methods"]["nystrom"]["curves"].items():
        if name != "seconds":  # wall time
            assert resumed["methods"]["nystrom"]["curves"][name] == curve, name
    assert straight["methods"]["nystrom"]["curves"]["eval_step"] == [2]
    assert resumed["methods"]["nystrom"]["final"]["test_acc"] == straight["methods"]["nystrom"]["final"]["test_acc"]
    assert resumed["baseline"] == straight["baseline"]


def test_check_solvers_reproduces_the_dense_meta_gradient_with_the_exact_solver(tmp_path, mnist_root, capsys):
    # ρ → 0: the exact solver must then agree with the dense solve, in both forms, even where H_s + λI
    # is indefinite (a random net after two inner steps is far from a minimum).
    # --alpha 100 makes every Neumann series diverge: its rows say so, in strict JSON and in the printout.
    check = imaml.main(["--dataset", "mnist", "--data-root", str(mnist_root), "--check-solvers", "--check-tasks", "1",
                        "--rho", "1e-9", "--alpha", "100", "--out", str(tmp_path), *TINY, "--width", "2"])
    text = (tmp_path / "solver_check.json").read_text()
    assert check == json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} is not strict JSON"))
    rows = {(r["lam"], r["ihvp"], r["lam_in"]): r for r in check["rows"]}
    for lam in imaml.CHECK_LAMS:
        neumann = rows[(lam, "neumann", "hessian")]
        assert (neumann["status"], neumann["rel_error"], neumann["cosine"], neumann["failed_tasks"]) == (
            "diverged", None, None, 1)
        assert rows[(lam, "exact", "hessian")]["status"] == "ok"
    printed = [line for line in capsys.readouterr().out.splitlines() if " neumann " in line]
    assert len(printed) == 3 and all("diverged" in line and "nan" not in line for line in printed)
    for lam in imaml.CHECK_LAMS:
        for form in ("hessian", "damping"):
            assert rows[(lam, "exact", form)]["rel_error"] < 1e-5 and rows[(lam, "exact", form)]["cosine"] > 1 - 1e-9
        assert rows[(lam, "cg", "damping")]["rel_error"] == pytest.approx(rows[(lam, "cg", "hessian")]["rel_error"],
                                                                          rel=1e-4)
        assert rows[(lam, "H_support", "")]["lowest_eigenvalue"] < rows[(lam, "H_support", "")]["highest_eigenvalue"]


def test_damping_form_with_neumann_is_refused_with_one_line(tmp_path, mnist_root):
    with pytest.raises(SystemExit, match="^error: --lam-in damping needs a solver with a damping"):
        imaml.main(["--dataset", "mnist", "--data-root", str(mnist_root), "--ihvp", "neumann", "--lam-in", "damping",
                    "--out", str(tmp_path), *TINY])
    with pytest.raises(SystemExit, match="^error: --check-solvers materialises the p × p Hessian"):
        imaml.main(["--dataset", "mnist", "--data-root", str(mnist_root), "--check-solvers", "--width", "64",
                    "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="^error: Invalid train_classes: 10"):
        imaml.main(["--dataset", "mnist", "--data-root", str(mnist_root), "--train-classes", "10",
                    "--out", str(tmp_path), *TINY])


def test_bad_flag_or_missing_data_exits_non_zero_with_one_error_line(tmp_path, capsys):
    flags = ["--data-root", str(tmp_path / "none"), "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match=r"^error: omniglot not found: expected .*omniglot-py/images_background"):
        imaml.main(flags)  # clean_errors: one line, exit status 1
    with pytest.raises(SystemExit) as exit_info:
        imaml.main([*flags, "--ways", "0"])
    assert exit_info.value.code == 2  # argparse prints its usage, then the one error line
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "recipes.imaml: error: argument --ways: expected an integer >= 1, got 0")


def test_a_diverging_inner_loop_stops_with_one_line_instead_of_skipping_every_step(tmp_path, mnist_root):
    with pytest.raises(SystemExit, match=r"^error: nystrom, outer step 1: the step was skipped, .*: the inner loop "
                                         r"diverged; lower --inner-lr$"):
        with pytest.warns(RuntimeWarning, match="skipped"):  # the library's own word, before the recipe stops
            imaml.main(["--dataset", "mnist", "--data-root", str(mnist_root), "--inner-lr", "1e8", "--outer-steps", "3",
                        "--out", str(tmp_path), *TINY])


def test_a_truncated_omniglot_drawing_is_named(tmp_path):
    base = write_omniglot_tree(tmp_path, alphabets=1, characters=1, drawers=2)
    drawing = sorted(base.rglob("*.png"))[0]
    drawing.write_bytes(drawing.read_bytes()[:60])
    with pytest.raises(DataError, match=f"{drawing} is not a readable image"):
        load_classes("omniglot", tmp_path, train_classes=1)


def test_runs_as_module_with_help():
    result = subprocess.run([sys.executable, "-m", "recipes.imaml", "--help"], capture_output=True, text=True,
                            cwd=ROOT, check=True)
    for flag in ("--ihvp", "--rank", "--outer-steps", "--resume", "--ways", "--shots", "--lam", "--lam-in",
                 "--meta-batch", "--eval-tasks", "--dataset", "--download", "--check-solvers"):
        assert flag in result.stdout
