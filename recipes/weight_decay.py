"""Per-parameter weight decay by implicit differentiation (Hataya & Yamada 2023, section 5.1).

Synthetic binary classification: ``x ~ N(0, I_D)``, ``y = [w*ᵀx + ε > 0]``,
500 training and 500 validation points, ``D = 100``.  The inner problem
trains θ with plain SGD (lr 0.1) on

    f(θ, φ) = BCE(model_θ(x), y) + ½ Σ_i φ_i θ_i²,

one decay φ_i per parameter; θ is reset to the same initial values every 100
inner steps.  After those 100 steps one outer step updates φ with SGD (lr 1.0,
momentum 0.9) along the implicit hypergradient of the validation BCE, then
projects φ onto φ ≥ 0 (a negative decay makes f unbounded below).

The ½ makes φ exactly ``torch.optim.SGD``'s ``weight_decay`` and keeps inner
SGD stable for φ < 2 / lr = 20; the paper's text writes θᵀdiag(φ)θ, with which
the large first steps of the Nyström hypergradient push some φ past 1 / lr and
the inner loop diverges.  ``--model mlp`` gives one decay per weight of an MLP
(as many hyperparameters as parameters, Lorraine et al. 2020), with 400 inner
steps per outer step and decays starting at 0.1 by default.

Outputs in ``--out``: ``config.json``, ``metrics.json`` (final numbers and
per-outer-step curves for every method and seed), ``losses.png`` (validation
loss per outer step, top; training loss per inner step, bottom: the paper's
Figure 2) and ``accuracy.png``.

Example::

    python -m recipes.weight_decay --ihvp all --seeds 5 --out runs/weight_decay
    torchrun --nproc_per_node=2 -m recipes.weight_decay --out runs/weight_decay_2ranks  # data-parallel, CPU
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hyperopt_torch import HyperOptimizer

from . import common
from .models import MLP, LogisticRegression

SAWTOOTH_OUTER_STEPS = 30  # the bottom panel shows the inner losses of the first outer steps only, to stay legible
# φ = 1 on every MLP weight shrinks it by (1 - 0.1)^100 within one inner loop: the net collapses to
# zero output, where the hypergradient vanishes too.
INIT_DECAY = {"logistic": 1.0, "mlp": 0.1}
# The MLP needs longer inner loops to fit its training set (100 steps leave it at ~96 %).
INNER_STEPS = {"logistic": 100, "mlp": 400}
# One line style per solver: several solvers give nearly the same curves (cg, exact and identity on the
# logistic problem), and colour alone would hide all but the last one drawn.
STYLES = {
    "nystrom": {"linestyle": "-"},
    "cg": {"linestyle": "--", "marker": "o"},
    "neumann": {"linestyle": "-", "marker": "x"},
    "identity": {"linestyle": "-.", "marker": "s"},
    "exact": {"linestyle": ":", "marker": "^", "linewidth": 2.0},
}
# --ihvp all: the solvers of the comparison in docs/recipes.md (the later minres and normal_cg are run by name)
ALL = ("nystrom", "cg", "neumann", "identity", "exact")
# Why Nyström can beat "exact" here, under the loss plot (docs/recipes.md, docs/methods.md).
NYSTROM_NOTE = ("Nyström below exact is not a more exact hypergradient: outside its k = {rank} sketched directions it "
                "divides by ρ = {rho:g}\n(×{scale:g}), a larger outer step where the curvature is small; see docs/methods.md, "
                "\"What the Nyström hypergradient is\"")
CURVES = ("val_loss", "train_loss", "test_loss", "val_acc", "train_acc", "test_acc", "decay_mean", "hvps", "seconds")


# -- configuration -------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    parser = common.make_parser(
        "recipes.weight_decay", __doc__.split("\n\n")[0],
        outer_steps=200, rank=5, rho=0.01, iters=5, alpha=0.01, threads=1, ihvp_choices=(*common.SOLVERS, "all"),
    )
    task = parser.add_argument_group("task (defaults: paper section 5.1)")
    task.add_argument("--model", choices=("logistic", "mlp"), default="logistic",
                      help="logistic: θᵀx, one decay per coordinate; mlp: one decay per weight")
    task.add_argument("--hidden", type=common.positive_int, default=32, help="MLP hidden width")
    task.add_argument("--dim", type=common.positive_int, default=100, help="input dimension D")
    task.add_argument("--n-train", type=common.positive_int, default=500, help="training points")
    task.add_argument("--n-val", type=common.positive_int, default=500, help="validation points")
    task.add_argument("--n-test", type=common.positive_int, default=500, help="held-out test points (reported only)")
    task.add_argument("--noise", type=common.nonnegative_float, default=0.1, help="std of the label noise ε")
    task.add_argument("--inner-steps", type=common.positive_int, default=None,
                      help="inner SGD steps per outer step (θ is reset after them); default 100 for logistic (paper), "
                           "400 for mlp")
    task.add_argument("--inner-lr", type=common.positive_float, default=0.1, help="inner SGD learning rate")
    task.add_argument("--outer-lr", type=common.positive_float, default=1.0, help="outer SGD learning rate")
    task.add_argument("--momentum", type=common.nonnegative_float, default=0.9, help="outer SGD momentum")
    task.add_argument("--init-decay", type=common.nonnegative_float, default=None,
                      help="initial value of every φ_i; default 1 for logistic (paper), 0.1 for mlp")
    task.add_argument("--seeds", type=common.positive_int, default=1,
                      help="runs with seeds --seed, --seed+1, ...; curves are averaged")
    return parser.parse_args(argv)


# -- data ----------------------------------------------------------------------------------------
def make_data(seed: int, args: argparse.Namespace, device: torch.device) -> dict[str, tuple[Tensor, Tensor]]:
    """Train / val / test splits of ``y = [w*ᵀx + ε > 0]``; the same for every method at one seed."""
    g = torch.Generator().manual_seed(seed)
    w_star = torch.randn(args.dim, generator=g)
    sizes = {"train": args.n_train, "val": args.n_val, "test": args.n_test}
    x = torch.randn(sum(sizes.values()), args.dim, generator=g)
    y = (x @ w_star + args.noise * torch.randn(len(x), generator=g) > 0).float()
    splits, start = {}, 0
    for name, n in sizes.items():
        splits[name] = (x[start:start + n].to(device), y[start:start + n].to(device))
        start += n
    return splits


# -- model and objectives -----------------------------------------------------------------------
def build_model(args: argparse.Namespace) -> nn.Module:
    if args.model == "logistic":
        return LogisticRegression(args.dim)
    return MLP(args.dim, hidden=(args.hidden,), out_features=1)


def inner_objective(model: nn.Module, x: Tensor, y: Tensor, decay: list[Tensor]) -> tuple[Tensor, Tensor]:
    """``(f, BCE)``: the training objective f(θ, φ) = BCE + ½ Σ φ θ², and its data term alone."""
    data_loss = F.binary_cross_entropy_with_logits(model(x), y)
    penalty = sum((phi * p.square()).sum() for phi, p in zip(decay, model.parameters()))
    return data_loss + 0.5 * penalty, data_loss


@torch.no_grad()
def evaluate(model: nn.Module, split: tuple[Tensor, Tensor]) -> tuple[float, float]:
    """``(BCE, accuracy)`` of ``model`` on ``split``."""
    x, y = split
    logits = model(x)
    return F.binary_cross_entropy_with_logits(logits, y).item(), ((logits > 0).float() == y).float().mean().item()


# -- one run: one solver, one seed ---------------------------------------------------------------
def run(args: argparse.Namespace, method: str, seed: int, device: torch.device) -> dict:
    """Optimise φ for ``args.outer_steps`` outer steps; returns per-outer-step curves and inner losses."""
    data = make_data(seed, args, device)
    # Under torchrun each rank trains and validates on its shard (evaluation uses the full splits).
    x_train, y_train = map(common.shard, data["train"])
    x_val, y_val = map(common.shard, data["val"])
    torch.manual_seed(seed)
    model = common.data_parallel(build_model(args).to(device))
    theta_init = {k: v.clone() for k, v in model.state_dict().items()}
    init_decay = INIT_DECAY[args.model] if args.init_decay is None else args.init_decay
    decay = [torch.full_like(p, init_decay, requires_grad=True) for p in model.parameters()]
    hopt = HyperOptimizer(decay, base=torch.optim.SGD, ihvp=common.solver_from_args(args, method, seed=seed),
                          lr=args.outer_lr, momentum=args.momentum)

    checkpoint = common.Checkpoint(args, f"{method}-seed{seed}")
    curves = {name: [] for name in CURVES}
    inner_losses = []  # one (inner_steps,) tensor of training BCE per outer step
    state = checkpoint.load()
    if state is not None:
        with torch.no_grad():
            for phi, saved in zip(decay, state["decay"]):
                phi.copy_(saved)
        hopt.load_state_dict(state["hopt"])
        curves = state["curves"]
        inner_losses = list(state["inner_losses"].to(device).unbind())

    def save() -> None:
        checkpoint.save({"decay": [phi.detach() for phi in decay], "hopt": hopt.state_dict(), "curves": curves,
                         "inner_losses": torch.stack(inner_losses) if inner_losses else torch.empty(0)})

    def train_loss_fn(m: nn.Module) -> Tensor:
        return inner_objective(m, x_train, y_train, decay)[0]

    def val_loss_fn(m: nn.Module) -> Tensor:
        return F.binary_cross_entropy_with_logits(m(x_val), y_val)

    start = len(curves["val_loss"])
    bar = common.progress(args, total=args.outer_steps, initial=start, desc=f"{method} seed {seed}")
    for step in range(start, args.outer_steps):
        # Inner problem: the user's plain SGD loop from the same initial θ, with φ held fixed.
        model.load_state_dict(theta_init)
        inner_opt = torch.optim.SGD(model.parameters(), lr=args.inner_lr)
        fixed_decay = [phi.detach() for phi in decay]
        losses = torch.empty(args.inner_steps, device=device)
        for t in range(args.inner_steps):
            inner_opt.zero_grad()
            loss, data_loss = inner_objective(model, x_train, y_train, fixed_decay)
            loss.backward()
            inner_opt.step()
            losses[t] = data_loss.detach()
        # Averaged over the ranks first, so every rank takes the same decision.
        losses = common.mean_over_ranks(losses)
        common.check_finite(losses, f"{method}, seed {seed}, outer step {step + 1}: the inner training loss",
                            "lower --inner-lr (plain SGD diverges once lr exceeds 2 / the largest curvature)")
        inner_losses.append(losses)

        # Outer step at the inner solution θ_T, then projection onto φ ≥ 0.
        info = hopt.step(train_loss_fn, val_loss_fn, model)
        common.check_hypergradient(info, f"{method}, seed {seed}, outer step {step + 1}", "lower --inner-lr")
        with torch.no_grad():
            for phi in decay:
                phi.clamp_(min=0.0)

        for split in ("train", "val", "test"):
            loss_value, acc = evaluate(model, data[split])
            curves[f"{split}_loss"].append(loss_value)
            curves[f"{split}_acc"].append(acc)
        curves["decay_mean"].append(torch.cat([phi.detach().flatten() for phi in decay]).mean().item())
        curves["hvps"].append(info.hvps)
        curves["seconds"].append(info.seconds)
        bar.update()
        bar.set_postfix(val=f"{info.val_loss:.4f}")
        if (step + 1) % args.checkpoint_every == 0:
            save()
    bar.close()
    save()
    return {"curves": curves, "inner_losses": torch.stack(inner_losses).cpu()}


# -- outputs -------------------------------------------------------------------------------------
def mean_std(rows: list[list[float]]) -> tuple[Tensor, Tensor]:
    values = torch.tensor(rows, dtype=torch.float64)
    return values.mean(0), (values.std(0) if len(rows) > 1 else torch.zeros_like(values[0]))


def summarize(results: dict[str, list[dict]], seeds: list[int]) -> dict:
    """metrics.json: per method, the final value of every curve (mean and std over seeds) and the curves."""
    methods = {}
    for method, runs in results.items():
        final = {}
        for name in CURVES:
            mean, std = mean_std([[r["curves"][name][-1]] for r in runs])
            final[name] = {"mean": mean.item(), "std": std.item()}
        best_val = torch.tensor([min(r["curves"]["val_loss"]) for r in runs])
        final["best_val_loss"] = {"mean": best_val.mean().item(), "std": best_val.std().item() if len(runs) > 1 else 0.0}
        methods[method] = {"final": final, "curves": {name: [r["curves"][name] for r in runs] for name in CURVES}}
    return {"recipe": "weight_decay", "seeds": seeds, "methods": methods}


def draw_band(ax, x: Tensor, rows: list[list[float]], label: str) -> None:
    mean, std = mean_std(rows)
    x = x.tolist()
    style = {"linewidth": 1.2, "markersize": 4, "fillstyle": "none", "markevery": 0.1, **STYLES.get(label, {})}
    line, = ax.plot(x, mean.tolist(), label=label, **style)
    if len(rows) > 1:
        ax.fill_between(x, (mean - std).tolist(), (mean + std).tolist(), color=line.get_color(), alpha=0.2, linewidth=0)


def plot_losses(path, results: dict[str, list[dict]], args: argparse.Namespace) -> None:
    def draw(fig) -> None:
        top, bottom = fig.subplots(2, 1)
        for method, runs in results.items():
            outer = torch.arange(1, len(runs[0]["curves"]["val_loss"]) + 1)
            draw_band(top, outer, [r["curves"]["val_loss"] for r in runs], method)
            inner = [r["inner_losses"][:SAWTOOTH_OUTER_STEPS].flatten().tolist() for r in runs]
            draw_band(bottom, torch.arange(len(inner[0])), inner, method)
        band = f" (mean ± std over {args.seeds} seeds)" if args.seeds > 1 else ""
        top.set(xlabel="outer step", ylabel="validation loss", title=f"Per-parameter weight decay, {args.model}{band}")
        bottom.set(xlabel=f"inner step (θ reset every {args.inner_steps}; first {SAWTOOTH_OUTER_STEPS} outer steps)",
                   ylabel="training loss (BCE)")
        top.legend()
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
        common.integer_steps(top)
        if "nystrom" in results and set(results) & {"cg", "exact", "identity"}:
            fig.supxlabel(NYSTROM_NOTE.format(rank=args.rank, rho=args.rho, scale=1 / args.rho), fontsize="small")

    common.save_figure(path, draw)


def plot_accuracy(path, results: dict[str, list[dict]], args: argparse.Namespace) -> None:
    def draw(fig) -> None:
        axes = fig.subplots(1, 3, sharey=True)
        for ax, split in zip(axes, ("train", "val", "test")):
            for method, runs in results.items():
                outer = torch.arange(1, len(runs[0]["curves"]["val_loss"]) + 1)
                draw_band(ax, outer, [r["curves"][f"{split}_acc"] for r in runs], method)
            ax.set(xlabel="outer step", title=f"{split} accuracy")
            ax.grid(alpha=0.3)
            common.integer_steps(ax)
        axes[0].legend()

    common.save_figure(path, draw, figsize=(10.0, 3.5))


@common.command
def main(argv=None) -> dict:
    args = parse_args(argv)
    # Record the values used, so --resume notices a changed default.
    if args.init_decay is None:
        args.init_decay = INIT_DECAY[args.model]
    if args.inner_steps is None:
        args.inner_steps = INNER_STEPS[args.model]
    methods = list(ALL) if args.ihvp == "all" else [args.ihvp]
    for method in methods:
        common.solver_from_args(args, method)  # reject bad solver flags before any work
    device = common.init_torchrun(common.resolve_device(args.device, args.threads))
    out = common.prepare_out(args)
    seeds = list(range(args.seed, args.seed + args.seeds))
    results = {method: [run(args, method, seed, device) for seed in seeds] for method in methods}

    metrics = summarize(results, seeds)
    common.write_json(out / "metrics.json", metrics)
    for method in methods if common.is_main() else ():
        final = metrics["methods"][method]["final"]
        spread = f" ± {final['val_loss']['std']:.4f}" if len(seeds) > 1 else ""  # no spread from one seed
        print(f"{method:>9}: val loss {final['val_loss']['mean']:.4f}{spread}  "
              f"accuracy train {final['train_acc']['mean']:.3f} val {final['val_acc']['mean']:.3f} "
              f"test {final['test_acc']['mean']:.3f}")
    plot_losses(out / "losses.png", results, args)
    plot_accuracy(out / "accuracy.png", results, args)
    return metrics


if __name__ == "__main__":
    main()
