"""recipes.reweighting and recipes.cifar: long-tailed splits, the Meta-Weight-Net hypergradient, end to end runs."""

from __future__ import annotations

import importlib.util
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, hessian, jacrev

from hyperopt_torch import implicit_hypergradient, make_solver
from recipes import reweighting
from recipes.cifar import FOLDER, load_cifar10, long_tail_counts, long_tail_split, pair_flip_labels, write_cifar10
from recipes.data import DataError, write_idx_dataset
from recipes.wideresnet import WideResNet

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
ROOT = Path(__file__).parents[1]
# 500 training images, 10 % meta split (5 per class), imbalance 10: 45 ... 4 images per class; 16 x 16 pixels.
TINY = ["--depth", "10", "--width", "1", "--resize", "16", "--imbalance", "10", "--meta-fraction", "0.1",
        "--batch-size", "16", "--meta-batch", "16", "--hyper-every", "2", "--rank", "3", "--iters", "3",
        "--eval-every", "2", "--test-subset", "40", "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_cifar10(root, n_train=500, n_test=50)
    write_idx_dataset(root, "mnist", n_train=500, n_test=50)
    return root


# -- data ----------------------------------------------------------------------------------------
def test_long_tail_counts_follow_cuis_exponential_profile():
    # Long-tailed CIFAR-10 at imbalance 100 as published (Cui et al. 2019; Cao et al. 2019).
    assert long_tail_counts(5000, 10, 100) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    for imbalance in (200, 50):
        counts = long_tail_counts(4900, 10, imbalance)
        assert counts[0] == 4900 and counts[-1] == int(4900 / imbalance)
        for c, n in enumerate(counts):  # the floor of the geometric profile, class by class
            assert n <= 4900 * (1 / imbalance) ** (c / 9) < n + 1
    with pytest.raises(ValueError, match="imbalance"):
        long_tail_counts(100, 10, 0.5)


def test_long_tail_split_has_a_balanced_disjoint_meta_split_and_the_profile():
    labels = torch.arange(10).repeat_interleave(60)[torch.randperm(600, generator=torch.Generator().manual_seed(0))]
    train, meta = long_tail_split(labels, imbalance=20, meta_per_class=6, generator=torch.Generator().manual_seed(1))
    assert torch.bincount(labels[meta], minlength=10).tolist() == [6] * 10
    assert torch.bincount(labels[train], minlength=10).tolist() == long_tail_counts(54, 10, 20)
    assert len(set(train.tolist()) | set(meta.tolist())) == len(train) + len(meta)
    with pytest.raises(ValueError, match="meta split"):
        long_tail_split(labels, imbalance=20, meta_per_class=60, generator=torch.Generator())


def test_cifar_pickles_are_read_in_the_real_layout(data_root):
    assert sorted(p.name for p in (data_root / FOLDER).iterdir()) == [
        "batches.meta", "data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]
    with open(data_root / FOLDER / "data_batch_1", "rb") as f:
        raw = pickle.load(f, encoding="latin1")
    x, y = load_cifar10(data_root, train=True)
    assert x.shape == (500, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    first = torch.tensor(raw["data"][0], dtype=torch.float32).view(3, 32, 32) / 255  # row-major, channel first
    assert torch.allclose(x[0] * torch.tensor([0.2470, 0.2435, 0.2616]).view(3, 1, 1)
                          + torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1), first, atol=1e-6)
    assert y[:len(raw["labels"])].tolist() == raw["labels"]
    assert load_cifar10(data_root, train=False)[0].shape == (50, 3, 32, 32)


@pytest.mark.parametrize("damage, message", [
    (lambda b: b.update(labels=b["labels"][:-1]), r"data_batch_1 holds 100 images but 99 labels"),
    (lambda b: b["labels"].__setitem__(3, 12), r"data_batch_1 holds label 12, outside the classes 0..9"),
    (lambda b: b.update(data=b["data"][:, :3000]), r"data_batch_1: data of shape \(100, 3000\), expected \(N, 3072\)"),
    (lambda b: b.pop("labels"), r"data_batch_1 is not a CIFAR-10 batch \(KeyError"),
])
def test_inconsistent_cifar_batches_are_refused_naming_the_file(tmp_path, damage, message):
    write_cifar10(tmp_path, n_train=500, n_test=10)
    path = tmp_path / FOLDER / "data_batch_1"
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="latin1")
    damage(batch)
    with open(path, "wb") as f:
        pickle.dump(batch, f)
    with pytest.raises(DataError, match=message):
        load_cifar10(tmp_path, train=True)


def test_augment_crops_a_window_of_the_padded_image_or_its_mirror():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    out = reweighting.augment(x, torch.Generator().manual_seed(0))
    padded = F.pad(x, (4, 4, 4, 4), mode="reflect")
    for i in range(2):
        windows = [padded[i, :, r:r + 8, c:c + 8] for r in range(9) for c in range(9)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(2)) for w in windows)


# -- the hypergradient ---------------------------------------------------------------------------
@pytest.mark.parametrize("norm", ["batch", "sum"])
def test_meta_weight_net_hypergradient_matches_a_dense_solve_in_float64(norm):
    """Eq. 3 for f(θ, φ) = mean μ_φ(sg[ℓ_i]) ℓ_i + λ/2 ‖θ‖² (``sum``: Σ μ_φ ℓ_i / Σ μ_φ + ...) on a softmax
    classifier, written out here independently of the recipe: dense Hessian and mixed Jacobian from
    torch.func, solved exactly."""
    g = torch.Generator().manual_seed(0)
    dt, lam = torch.float64, 1e-2
    x, y = torch.randn(40, 6, generator=g, dtype=dt), torch.randint(3, (40,), generator=g)
    xv, yv = torch.randn(25, 6, generator=g, dtype=dt), torch.randint(3, (25,), generator=g)
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3).to(dt)
    weight_net = reweighting.WeightNet(hidden=8).to(dt)
    theta = {k: v.detach() for k, v in model.named_parameters()}
    phi = {k: v.detach() for k, v in weight_net.named_parameters()}

    def f(theta, phi):
        losses = F.cross_entropy(functional_call(model, theta, (x,)), y, reduction="none")
        hidden = torch.relu(losses.detach()[:, None] * phi["0.weight"].T + phi["0.bias"])
        weights = torch.sigmoid(hidden @ phi["2.weight"].T + phi["2.bias"]).squeeze(1)
        data = (weights * losses).mean() if norm == "batch" else (weights * losses).sum() / weights.sum()
        return data + 0.5 * lam * sum(t.square().sum() for t in theta.values())

    def g_val(theta):
        return F.cross_entropy(functional_call(model, theta, (xv,)), yv)

    def flat(tree):
        return torch.cat([t.reshape(-1) for t in tree.values()])

    def rows(tree, n):  # a tree of (n, *shape) blocks -> (n, total)
        return torch.cat([t.reshape(n, -1) for t in tree.values()], dim=1)

    p = sum(t.numel() for t in theta.values())
    H = torch.cat([rows(block, theta[k].numel()) for k, block in hessian(f)(theta, phi).items()])  # (p, p)
    mixed = jacrev(grad(f), argnums=1)(theta, phi)  # ∂/∂φ of ∇_θ f: per θ tensor, per φ tensor
    M = torch.cat([rows(mixed[k], theta[k].numel()) for k in theta])  # (p, h)
    expected = -M.T @ torch.linalg.solve(H, flat(grad(g_val)(theta)))
    assert H.shape == (p, p) and torch.allclose(H, H.T)

    result = implicit_hypergradient(
        list(weight_net.parameters()),
        lambda m: reweighting.inner_objective(m, weight_net, x, y, lam, norm=norm),
        lambda m: F.cross_entropy(m(xv), yv), model, make_solver("exact", rho=0.0))
    got = torch.cat([t.reshape(-1) for t in result.grads])
    assert expected.norm() > 1e-4  # a hypergradient that is really there
    assert (got - expected).norm() / expected.norm() < 1e-9


# -- the recipe end to end -----------------------------------------------------------------------
def test_cifar10_pickles_end_to_end_writes_metrics_plots_and_weight_curves(tmp_path, data_root):
    metrics = reweighting.main(["--data-root", str(data_root), "--outer-steps", "3", "--out", str(tmp_path), *TINY])
    assert metrics == json.loads((tmp_path / "metrics.json").read_text())
    final, curves = metrics["final"], metrics["curves"]
    assert final["train_counts"] == long_tail_counts(45, 10, 10) and final["meta_size"] == 50
    assert len(final["per_class_acc"]) == 10 and 0.0 <= final["test_acc"] <= 1.0
    assert final["inner_steps"] == 6 and curves["hvps"] == [3, 3, 3] and len(curves["val_loss"]) == 3
    assert curves["eval_step"] == [2, 3] and [c["step"] for c in metrics["weight_curves"]] == [2, 3]
    assert all(0.0 < w < 1.0 for w in metrics["weight_curves"][-1]["weights"])
    assert metrics["weight_curves"][0]["weights"] != metrics["weight_curves"][1]["weights"]  # φ moved
    assert json.loads((tmp_path / "config.json").read_text())["lr_milestones"] == [2, 2]  # resolved default
    if HAS_MATPLOTLIB:
        for name in ("weights.png", "curves.png", "per_class.png"):
            assert (tmp_path / name).stat().st_size > 0


def test_mnist_idx_files_run_long_tailed_with_cg_and_as_baseline(tmp_path, data_root):
    flags = ["--dataset", "mnist", "--data-root", str(data_root), "--outer-steps", "2", *TINY]
    cg = reweighting.main([*flags, "--ihvp", "cg", "--label-noise", "0.4", "--out", str(tmp_path / "cg")])
    # at most 3 products per step: CG stops at a direction of negative curvature (an untrained net's H)
    assert cg["method"] == "cg" and len(cg["curves"]["hvps"]) == 2 and all(1 <= h <= 3 for h in cg["curves"]["hvps"])
    assert 0.15 < cg["final"]["label_noise_actual"] < 0.55  # 40 % redrawn, 9/10 of them to another class
    base = reweighting.main([*flags, "--baseline", "--out", str(tmp_path / "base")])
    assert base["method"] == "baseline" and base["curves"]["hvps"] == [0, 0] and base["weight_curves"] == []
    assert base["curves"]["weight_mean"] == [1.0, 1.0]


def test_resume_matches_an_uninterrupted_run(tmp_path, data_root):
    flags = ["--data-root", str(data_root), "--checkpoint-every", "1", "--lr-milestones", "1", *TINY,
             "--eval-every", "1"]
    straight = reweighting.main([*flags, "--outer-steps", "2", "--out", str(tmp_path / "a")])
    reweighting.main([*flags, "--outer-steps", "1", "--out", str(tmp_path / "b")])
    resumed = reweighting.main([*flags, "--outer-steps", "2", "--out", str(tmp_path / "b"), "--resume"])
    for name in ("val_loss", "train_loss", "weight_mean", "lr", "test_acc"):  # not the timings
        assert resumed["curves"][name] == straight["curves"][name]
    assert resumed["weight_curves"] == straight["weight_curves"]
    assert resumed["final"]["per_class_acc"] == straight["final"]["per_class_acc"]


def test_pair_flip_moves_each_corrupted_label_to_the_next_class():
    labels = torch.arange(10).repeat(200)
    noisy = pair_flip_labels(labels, 0.4, 10, torch.Generator().manual_seed(0))
    changed = noisy != labels
    assert torch.equal(noisy[changed], (labels[changed] + 1) % 10)  # one fixed target per class
    assert 0.35 < changed.float().mean().item() < 0.45


def test_flip_noise_with_an_mlp_records_clean_and_noisy_weights(tmp_path, data_root):
    flags = ["--dataset", "mnist", "--data-root", str(data_root), "--outer-steps", "2", *TINY, "--imbalance", "1",
             "--arch", "mlp", "--mlp-hidden", "32", "--label-noise", "0.4", "--noise-type", "flip",
             "--train-subset", "300"]
    run = reweighting.main([*flags, "--weight-norm", "sum", "--out", str(tmp_path / "mlp")])
    assert sum(run["final"]["train_counts"]) == 300
    assert 0.3 < run["final"]["label_noise_actual"] < 0.5  # flip noise always changes the label
    stats = run["train_stats"]
    assert [s["step"] for s in stats] == [2]  # at every evaluation
    for key in ("weight_clean", "weight_noisy", "loss_clean", "loss_noisy", "fit_clean", "fit_noisy"):
        assert 0.0 <= stats[0][key] < 10.0
    assert len(stats[0]["weight_per_class"]) == 10 and all(0 < w < 1 for w in stats[0]["weight_per_class"])
    base = reweighting.main([*flags, "--baseline", "--out", str(tmp_path / "base")])
    assert base["train_stats"][0]["weight_clean"] is None and base["train_stats"][0]["fit_noisy"] is not None
    clean = reweighting.main([*flags[:-6], "--train-subset", "300", "--baseline", "--out", str(tmp_path / "clean")])
    assert clean["train_stats"][0]["loss_noisy"] is None and clean["final"]["label_noise_actual"] == 0.0


def test_lenet_refuses_resized_images_with_one_line(tmp_path, data_root):
    with pytest.raises(SystemExit, match="^error: --arch lenet takes 28 x 28 images, got 16 x 16"):
        reweighting.main(["--dataset", "mnist", "--data-root", str(data_root), "--outer-steps", "1", *TINY,
                          "--arch", "lenet", "--out", str(tmp_path)])


def test_bad_values_and_missing_data_exit_with_one_line(tmp_path, data_root):
    with pytest.raises(SystemExit, match="^error: Invalid depth: 12"):
        reweighting.main(["--data-root", str(data_root), "--outer-steps", "1", *TINY, "--depth", "12",
                          "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="^error: --meta-fraction 0.99: .* leaves no training images"):
        reweighting.main(["--data-root", str(data_root), "--outer-steps", "1", *TINY, "--meta-fraction", "0.99",
                          "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"^error: cifar10 not found: expected .*data_batch_1\. Pass --download"):
        reweighting.main(["--data-root", str(tmp_path / "none"), "--out", str(tmp_path / "out"), *TINY])


@pytest.mark.parametrize("flags", [["--inner-lr", "1e6"], ["--baseline", "--inner-lr", "1e6"]])
def test_a_diverging_inner_loop_stops_with_one_line_and_exit_status_1(tmp_path, data_root, flags):
    with pytest.raises(SystemExit) as info:
        reweighting.main(["--data-root", str(data_root), "--outer-steps", "2", *TINY, *flags, "--out", str(tmp_path)])
    message = str(info.value.code)
    assert message.startswith("error: ") and "the inner loop diverged; lower --inner-lr" in message
    assert not (tmp_path / "metrics.json").exists()


@pytest.mark.parametrize("flag", [["--imbalance", "0.5"], ["--label-noise", "1.5"], ["--ihvp", "lbfgs"],
                                  ["--momentum", "-0.5"], ["--momentum", "nan"], ["--weight-decay", "-1"],
                                  ["--inner-lr", "inf"]])
def test_bad_flags_are_usage_errors(flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        reweighting.parse_args(flag)
    assert exit_info.value.code == 2 and flag[0] in capsys.readouterr().err


def test_curves_plot_keeps_accuracy_whole_labels_log_axes_and_counts_steps_in_integers(figures):
    args = reweighting.parse_args(["--outer-steps", "3"])
    steps = 3
    metrics = {"method": "nystrom", "curves": {"train_loss": [2.3, 0.4, 0.05], "val_loss": [1.9, 1.8, 1.7],
                                               "eval_step": [3], "test_acc": [0.4575]}}
    reweighting.plot_curves("curves.png", metrics, args)
    train_ax, meta_ax, acc_ax = figures["curves.png"].axes
    assert acc_ax.get_ylim() == (0.0, 1.0)  # 0.4575 alone is not blown up to fill the axis
    for ax in (train_ax, meta_ax, acc_ax):
        assert all(float(tick).is_integer() for tick in ax.get_xticks() if 1 <= tick <= steps)
    assert train_ax.get_yscale() == "log" and meta_ax.get_yscale() == "linear"  # 0.05..2.3 spans a decade; 1.7..1.9 not
    low, high = train_ax.get_ylim()
    labelled = [t for t in train_ax.get_yticks() if low <= t <= high]
    assert len(labelled) >= 4 and train_ax.yaxis.get_major_formatter()(labelled[1], 1) in ("0.1", "0.2", "0.5")


def test_runs_as_module_with_help():
    result = subprocess.run([sys.executable, "-m", "recipes.reweighting", "--help"], capture_output=True, text=True,
                            cwd=ROOT, check=True)
    for flag in ("--imbalance", "--meta-fraction", "--hyper-every", "--baseline", "--amp", "--depth", "--outer-steps"):
        assert flag in result.stdout


def test_wideresnet_has_the_standard_parameter_counts_and_takes_mnist_sized_input():
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        counts = {(d, k): sum(p.numel() for p in WideResNet(d, k).parameters())
                  for d, k in ((28, 10), (28, 2), (10, 1))}
    assert counts == {(28, 10): 36_479_194, (28, 2): 1_467_610, (10, 1): 77_850}  # 36.5M and 1.47M (Zagoruyko)
    assert WideResNet(10, 1, num_classes=7, channels=1)(torch.randn(2, 1, 28, 28)).shape == (2, 7)
