"""iMAML few-shot learning with any IHVP backend (Hataya & Yamada 2023, section 5.3).

Implicit MAML (Rajeswaran et al. 2019) meta-learns the initialisation θ₀ of
the 4-block conv net of MAML on N-way K-shot tasks.  For each task, the inner
problem adapts θ to the support set (iMAML Eq. 4, approximated by
``--inner-steps`` SGD steps at ``--inner-lr`` started from θ₀)

    f(θ, θ₀) = L_support(θ) + (λ/2) ‖θ − θ₀‖²,

and the outer problem moves θ₀ with Adam (lr 1e-3) along the mean over
``--meta-batch`` tasks of the implicit meta-gradient of the query loss
g = L_query(θ).  With φ = θ₀ in the Nyström paper's Eq. 3, ∂²f/∂θ₀∂θ = −λI,
so (iMAML Eq. 7)

    dg/dθ₀ = λ (H_support + λI)⁻¹ ∇_θ g,     H_support = ∇²_θ L_support.

The solvers compute (H + ρI)⁻¹ b; ``--lam-in`` says where λ goes:

* ``hessian``: the solver sees f itself, H = H_support + λI, and adds its own ρ.
* ``damping``: the solver sees L_support(θ) − λ⟨θ₀, θ⟩, whose gradient differs
  from f's by λθ (no θ₀ in it), so ∂²/∂θ₀∂θ is the same −λI while the Hessian is
  H_support alone; the solver's damping becomes λ + ρ.

Both target λ (H_support + (λ+ρ)I)⁻¹ ∇_θ g and give the same numbers with
``exact`` and ``cg``.  They differ for Nyström: a rank-k sketch of
H_support + λI cannot hold λI outside the span of its k columns, where
(H_k + ρI)⁻¹ is 1/ρ instead of 1/(λ+ρ); sketching H_support alone and
adding λ exactly is exact whenever the sketch spans H_support (a convex
support problem whose Hessian has rank ≤ k, tested).  Neumann has no damping
and takes ``hessian`` only.  ``--check-solvers`` measures every variant against the dense answer in
float64 (docs/recipes.md has the table); ``auto`` picks ``damping`` for the
solvers with a damping and ``hessian`` for the others.

Batch norm uses the statistics of the batch it sees and keeps no running
statistics, as in MAML: each task's support and query sets are normalised
with their own statistics, and f is an ordinary function of θ.  The
convolutions have no bias: batch norm subtracts it again, so its gradient and
its Hessian row are exactly zero, which only wastes Nyström columns.

The no-meta-learning baseline is the same network at its random
initialisation (the θ₀ every method starts from), adapted to each test task by
the same inner loop.

Outputs in ``--out``: ``config.json``, ``metrics.json`` (test accuracy with a
95 % confidence interval per method and for the baseline, and per-outer-step
curves), ``curves.png`` (meta-training curves) and ``accuracy.png`` (accuracy
per solver).  ``--check-solvers`` writes ``solver_check.json`` instead.

Example::

    python -m recipes.imaml --dataset omniglot --data-root data --ihvp all --out runs/imaml
"""

from __future__ import annotations

import argparse
import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hyperopt_torch import HyperOptimizer, implicit_hypergradient

from . import common
from .fewshot import TRAIN_CLASSES, Task, TaskSampler, load_classes

TABLE3 = ("nystrom", "cg", "neumann")  # the rows of the paper's Table 3, run by --ihvp all
DAMPED = ("nystrom", "cg", "exact", "minres", "normal_cg")  # solvers whose damping ρ can carry λ
EXACT_MAX_PARAMS = 20_000  # the exact solver materialises the p × p Hessian
EVAL_SEED = 10_000  # test tasks come from their own generator: the same tasks for every method and the baseline
CHECK_LAMS = (0.1, 1.0, 10.0)
CURVES = ("query_loss", "query_acc", "support_loss", "hvps", "seconds")


# -- configuration -------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    parser = common.make_parser("recipes.imaml", __doc__.split("\n\n")[0], outer_steps=50_000, rank=10, rho=0.01,
                                iters=10, alpha=0.01, threads=1, ihvp_choices=(*common.SOLVERS, "all"))
    parser.set_defaults(checkpoint_every=100)
    data = parser.add_argument_group("tasks (defaults: Omniglot 5-way 1-shot, paper section 5.3)")
    data.add_argument("--dataset", choices=tuple(TRAIN_CLASSES), default="omniglot")
    data.add_argument("--data-root", default="data",
                      help="folder holding omniglot-py/images_{background,evaluation}/ or <MNIST|FashionMNIST>/raw/")
    data.add_argument("--download", action="store_true", help="let torchvision download the dataset into --data-root")
    data.add_argument("--train-classes", type=common.positive_int, default=None,
                      help="base classes for meta-training, the rest for meta-test; default 1200 Omniglot characters, "
                           "MNIST classes 0-5")
    data.add_argument("--ways", type=common.positive_int, default=5, help="classes per task [N]")
    data.add_argument("--shots", type=common.positive_int, default=1, help="support images per class [K]")
    data.add_argument("--query", type=common.positive_int, default=15, help="query images per class")
    meta = parser.add_argument_group("model, inner and outer problems")
    meta.add_argument("--width", type=common.positive_int, default=64, help="channels of each conv block")
    meta.add_argument("--inner-steps", type=common.positive_int, default=10, help="inner SGD steps per task")
    meta.add_argument("--inner-lr", type=common.positive_float, default=0.1, help="inner SGD learning rate")
    meta.add_argument("--lam", type=common.positive_float, default=1.0, help="proximal strength [λ]")
    meta.add_argument("--lam-in", choices=("auto", "hessian", "damping"), default="auto",
                      help="where the solver sees λ (module docstring); auto: damping for nystrom, cg, exact")
    meta.add_argument("--outer-lr", type=common.positive_float, default=1e-3, help="outer Adam learning rate")
    meta.add_argument("--meta-batch", type=common.positive_int, default=32, help="tasks per outer step")
    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--eval-tasks", type=common.positive_int, default=600, help="held-out test tasks")
    evaluation.add_argument("--eval-every", type=common.positive_int, default=1000,
                            help="outer steps between test evaluations (one more at the end)")
    evaluation.add_argument("--check-solvers", action="store_true",
                            help="instead of training: compare each solver's meta-gradient with the dense one in "
                                 f"float64 for λ in {CHECK_LAMS} (use a small --width) and write solver_check.json")
    evaluation.add_argument("--check-tasks", type=common.positive_int, default=5, help="tasks per λ for --check-solvers")
    return parser.parse_args(argv)


def lam_form(args: argparse.Namespace, method: str) -> str:
    if args.lam_in == "auto":
        return "damping" if method in DAMPED else "hessian"
    if args.lam_in == "damping" and method not in DAMPED:
        raise common.RecipeError(f"--lam-in damping needs a solver with a damping ρ ({', '.join(DAMPED)}), "
                                 f"not {method}")
    return args.lam_in


def make_solver(args: argparse.Namespace, method: str, form: str, lam: float):
    """The solver for ``method``; in the ``damping`` form its ρ is ``--rho`` + λ."""
    rho = args.rho + lam if form == "damping" else args.rho
    return common.solver_from_args(argparse.Namespace(**{**vars(args), "rho": rho}), method)


# -- model ---------------------------------------------------------------------------------------
class ConvNet4(nn.Sequential):
    """The conv net of MAML / iMAML for ``(B, 1, 28, 28)`` images: logits ``(B, ways)``.

    Four blocks of 3×3 convolution (``width`` channels, no bias), batch norm
    with batch statistics only, ReLU and 2×2 max pooling (28 → 14 → 7 → 3 → 1),
    then a linear layer.  About 112k parameters at width 64.
    """

    def __init__(self, ways: int, width: int = 64, channels: int = 1):
        blocks: list[nn.Module] = []
        for fan_in in (channels, width, width, width):
            blocks += [nn.Conv2d(fan_in, width, 3, padding=1, bias=False),
                       nn.BatchNorm2d(width, track_running_stats=False), nn.ReLU(), nn.MaxPool2d(2)]
        super().__init__(*blocks, nn.Flatten(), nn.Linear(width, ways))


# -- inner problem -------------------------------------------------------------------------------
def training_loss(theta0: list[Tensor], support: tuple[Tensor, Tensor], lam: float, form: str = "hessian"):
    """``model ↦ f``: the inner objective in the form the solver sees (see ``--lam-in``).

    ``hessian``: L_support(θ) + (λ/2)‖θ − θ₀‖²; ``damping``: L_support(θ) − λ⟨θ₀, θ⟩.
    θ₀ enters differentiably: pass the hyperparameters themselves for a
    meta-gradient, detached copies for the inner SGD.
    """
    x, y = support

    def loss(model: nn.Module) -> Tensor:
        data = F.cross_entropy(model(x), y)
        pairs = zip(model.parameters(), theta0)
        if form == "hessian":
            return data + 0.5 * lam * sum((p - p0).square().sum() for p, p0 in pairs)
        return data - lam * sum((p * p0).sum() for p, p0 in pairs)

    return loss


def query_loss(query: tuple[Tensor, Tensor]):
    x, y = query
    return lambda model: F.cross_entropy(model(x), y)


def adapt(model: nn.Module, theta0: list[Tensor], support: tuple[Tensor, Tensor], lam: float, steps: int,
          lr: float) -> float:
    """Inner problem (iMAML Eq. 4): set ``model`` to θ₀ and take ``steps`` SGD steps on f.

    Returns the support cross-entropy after adaptation.
    """
    anchor = [p.detach() for p in theta0]
    with torch.no_grad():
        for p, p0 in zip(model.parameters(), anchor):
            p.copy_(p0)
    f = training_loss(anchor, support, lam)
    inner_opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        inner_opt.zero_grad()
        f(model).backward()
        inner_opt.step()
    with torch.no_grad():
        return F.cross_entropy(model(support[0]), support[1]).item()


@torch.no_grad()
def accuracy(model: nn.Module, split: tuple[Tensor, Tensor]) -> float:
    return (model(split[0]).argmax(1) == split[1]).float().mean().item()


# -- evaluation ----------------------------------------------------------------------------------
def evaluate(model: nn.Module, theta0: list[Tensor], classes: list[Tensor], args, device) -> dict:
    """Adapt from θ₀ to ``--eval-tasks`` held-out tasks; mean query accuracy and its 95 % interval."""
    tasks = TaskSampler(classes, args.ways, args.shots, args.query, torch.Generator().manual_seed(EVAL_SEED + args.seed))
    accs = []
    for _ in range(args.eval_tasks):
        task = tasks.sample(device)
        adapt(model, theta0, task.support, args.lam, args.inner_steps, args.inner_lr)
        accs.append(accuracy(model, task.query))
    values = torch.tensor(accs, dtype=torch.float64)
    half = 1.96 * values.std().item() / math.sqrt(len(accs)) if len(accs) > 1 else None  # no spread from one task
    return {"mean": values.mean().item(), "ci95": half, "tasks": len(accs)}


# -- one meta-training run -----------------------------------------------------------------------
def run(args: argparse.Namespace, method: str, pools, device: torch.device) -> dict:
    """Meta-train θ₀ with ``method`` for ``--outer-steps``; returns curves and the final test accuracy."""
    torch.manual_seed(args.seed)
    meta_model = ConvNet4(args.ways, args.width).to(device)  # its parameters are θ₀, the hyperparameters
    model = copy.deepcopy(meta_model)  # θ, adapted to one task at a time
    theta0 = list(meta_model.parameters())
    form = lam_form(args, method)
    hopt = HyperOptimizer(theta0, base=torch.optim.Adam, ihvp=make_solver(args, method, form, args.lam),
                          lr=args.outer_lr)
    tasks = TaskSampler(pools[0], args.ways, args.shots, args.query, torch.Generator().manual_seed(args.seed))

    checkpoint = common.Checkpoint(args, f"{method}-seed{args.seed}")
    curves = {name: [] for name in (*CURVES, "eval_step", "test_acc")}
    state = checkpoint.load()
    if state is not None:
        meta_model.load_state_dict(state["meta_model"])
        hopt.load_state_dict(state["hopt"])
        tasks.generator.set_state(state["tasks"])
        curves = state["curves"]

    def save() -> None:
        checkpoint.save({"meta_model": meta_model.state_dict(), "hopt": hopt.state_dict(),
                         "tasks": tasks.generator.get_state(), "curves": curves})

    start = len(curves["query_loss"])
    bar = common.progress(args, total=args.outer_steps, initial=start, desc=f"imaml {method}")
    for step in range(start, args.outer_steps):
        hopt.zero_grad()
        sums = dict.fromkeys(CURVES, 0.0)
        for _ in range(args.meta_batch):
            task: Task = tasks.sample(device)
            sums["support_loss"] += adapt(model, theta0, task.support, args.lam, args.inner_steps, args.inner_lr)
            # the meta-batch mean of the tasks' meta-gradients, added into θ₀'s .grad as backward() would
            info = hopt.accumulate(training_loss(theta0, task.support, args.lam, form), query_loss(task.query), model,
                                   weight=1 / args.meta_batch)
            common.check_hypergradient(info, f"{method}, outer step {step + 1}", "lower --inner-lr")
            sums["query_acc"] += accuracy(model, task.query)
            sums["query_loss"] += info.val_loss
            sums["hvps"] += info.hvps
            sums["seconds"] += info.seconds
        hopt.step()

        for name in CURVES:
            curves[name].append(sums[name] / (1 if name in ("hvps", "seconds") else args.meta_batch))
        if (step + 1) % args.eval_every == 0:  # not at the budget's end: a resumed run must see the same curves
            curves["eval_step"].append(step + 1)
            curves["test_acc"].append(evaluate(model, theta0, pools[1], args, device)["mean"])
            bar.write(f"{method} step {step + 1}: test accuracy {curves['test_acc'][-1]:.4f}")
        bar.update()
        bar.set_postfix(query=f"{curves['query_loss'][-1]:.4f}")
        if (step + 1) % args.checkpoint_every == 0:
            save()
    bar.close()
    save()
    return {"final": {"test_acc": evaluate(model, theta0, pools[1], args, device), "lam_in": form,
                      "hvps_per_task": curves["hvps"][-1] / args.meta_batch,
                      "hypergrad_seconds_per_task": sum(curves["seconds"]) / len(curves["seconds"]) / args.meta_batch},
            "curves": curves}


def baseline(args: argparse.Namespace, pools, device: torch.device) -> dict:
    """No meta-learning: the random initialisation every method starts from, adapted by the same inner loop."""
    torch.manual_seed(args.seed)
    model = ConvNet4(args.ways, args.width).to(device)
    theta0 = [p.detach().clone() for p in model.parameters()]
    return evaluate(model, theta0, pools[1], args, device)


# -- the solver check ----------------------------------------------------------------------------
def check_solvers(args: argparse.Namespace, pools) -> dict:
    """Each solver's meta-gradient against λ(H_support + λI)⁻¹∇g (:func:`dense_meta_gradient`), float64, CPU.

    For each λ in :data:`CHECK_LAMS`, ``--check-tasks`` meta-training tasks
    are adapted from the random θ₀ by the recipe's inner loop; the relative
    error ‖h − h*‖/‖h*‖ and the cosine with h* are averaged over the tasks.
    A solve that gives no meta-gradient (a diverged Neumann series) is left
    out of the means: its row's ``status`` says why (``"ok"``, ``"diverged"``,
    ``"not finite"``), ``failed_tasks`` how often, and the means are ``None``
    (``null`` in the JSON) when no task is left.
    """
    torch.manual_seed(args.seed)
    meta_model = ConvNet4(args.ways, args.width).double()
    model = copy.deepcopy(meta_model)
    theta0 = list(meta_model.parameters())
    p = sum(t.numel() for t in theta0)
    tasks = TaskSampler(pools[0], args.ways, args.shots, args.query, torch.Generator().manual_seed(args.seed))
    variants = [(m, form) for m in ("nystrom", "cg", "exact") for form in ("hessian", "damping")]
    variants += [("neumann", "hessian"), ("identity", "hessian")]
    rows = []
    for lam in CHECK_LAMS:
        errors = {v: [] for v in variants}
        cosines = {v: [] for v in variants}
        failed = {v: [] for v in variants}  # why a task's solve gave no meta-gradient: "diverged" or "not finite"
        above, lowest, highest = [], [], []
        for _ in range(args.check_tasks):
            task = tasks.sample(dtype=torch.float64)
            adapt(model, theta0, task.support, lam, args.inner_steps, args.inner_lr)
            exact, eigenvalues = dense_meta_gradient(model, task, lam)
            above.append(int((eigenvalues > lam / 100).sum()))
            lowest.append(eigenvalues[0].item())
            highest.append(eigenvalues[-1].item())
            for method, form in variants:
                solver = make_solver(args, method, form, lam)
                grads, info = implicit_hypergradient(theta0, training_loss(theta0, task.support, lam, form),
                                                     query_loss(task.query), model, solver,
                                                     generator=torch.Generator().manual_seed(args.seed))
                if info.skipped:  # a diverged Neumann series, for one: no number to compare
                    failed[(method, form)].append("diverged" if info.diverged else "not finite")
                    continue
                h = torch.cat([g.flatten() for g in grads])
                errors[(method, form)].append(((h - exact).norm() / exact.norm()).item())
                cosines[(method, form)].append(F.cosine_similarity(h, exact, dim=0).item())
        for method, form in variants:
            reasons = failed[(method, form)]
            rows.append({"lam": lam, "ihvp": method, "lam_in": form, "rel_error": _mean(errors[(method, form)]),
                         "cosine": _mean(cosines[(method, form)]), "status": reasons[0] if reasons else "ok",
                         "failed_tasks": len(reasons)})
        rows.append({"lam": lam, "ihvp": "H_support", "lam_in": "", "eigenvalues_above_lam_over_100": _mean(above),
                     "lowest_eigenvalue": min(lowest), "highest_eigenvalue": max(highest)})
    return {"width": args.width, "ways": args.ways, "shots": args.shots, "params": p, "tasks": args.check_tasks,
            "rank": args.rank, "rho": args.rho, "iters": args.iters, "alpha": args.alpha, "rows": rows}


def dense_meta_gradient(model: nn.Module, task: Task, lam: float) -> tuple[Tensor, Tensor]:
    """``(λ(H_support + λI)⁻¹∇_θ g, eigenvalues of H_support)`` from the dense Hessian at the model's parameters.

    Independent of the library (``torch.func`` Hessian, LAPACK solve); the
    result is flattened in ``parameters()`` order.  Costs p Hessian-vector
    products: keep ``--width`` small.
    """
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().flatten() for p in model.parameters()])

    def loss_at(vector: Tensor, split) -> Tensor:
        params = dict(zip(names, (v.view(s) for v, s in zip(vector.split([s.numel() for s in shapes]), shapes))))
        return F.cross_entropy(torch.func.functional_call(model, params, (split[0],)), split[1])

    hessian = torch.func.jacrev(torch.func.grad(lambda v: loss_at(v, task.support)), chunk_size=128)(theta)
    hessian = 0.5 * (hessian + hessian.T)
    grad_g = torch.func.grad(lambda v: loss_at(v, task.query))(theta)
    eye = torch.eye(len(theta), dtype=theta.dtype)
    return lam * torch.linalg.solve(hessian + lam * eye, grad_g), torch.linalg.eigvalsh(hessian)


def _mean(values) -> float | None:
    return sum(values) / len(values) if values else None


def _with_ci(acc: dict) -> str:
    return f"{acc['mean']:.4f}" + (f" ± {acc['ci95']:.4f}" if acc["ci95"] is not None else "")


def print_check(check: dict) -> None:
    print(f"meta-gradient vs λ(H_support + λI)⁻¹∇g, float64, width {check['width']} (p = {check['params']}), "
          f"{check['ways']}-way {check['shots']}-shot, mean of {check['tasks']} tasks")
    print(f"{'λ':>6} {'ihvp':>9} {'lam-in':>8} {'rel. error':>11} {'cosine':>8}")
    for row in check["rows"]:
        if row["ihvp"] == "H_support":
            print(f"{row['lam']:>6} H_support: {row['eigenvalues_above_lam_over_100']:.1f} of {check['params']} "
                  f"eigenvalues above λ/100, lowest {row['lowest_eigenvalue']:.3g}, highest {row['highest_eigenvalue']:.3g}")
        elif row["rel_error"] is None:
            print(f"{row['lam']:>6} {row['ihvp']:>9} {row['lam_in']:>8} {row['status']:>11} {'-':>8}  "
                  f"(in all {check['tasks']} tasks: no meta-gradient)")
        else:
            note = f"  ({row['status']} in {row['failed_tasks']} of {check['tasks']} tasks)" if row["failed_tasks"] else ""
            print(f"{row['lam']:>6} {row['ihvp']:>9} {row['lam_in']:>8} {row['rel_error']:>11.3g} {row['cosine']:>8.4f}"
                  + note)


# -- outputs -------------------------------------------------------------------------------------
def plot_curves(path, results: dict, base: dict, args: argparse.Namespace) -> None:
    def draw(fig) -> None:
        left, right = fig.subplots(1, 2)
        for method, result in results.items():
            loss = torch.tensor(result["curves"]["query_loss"])
            window = max(1, len(loss) // 50)
            smooth = loss.unfold(0, window, 1).mean(1)
            left.plot(range(window, window + len(smooth)), smooth.tolist(), marker=common.marker_for(len(smooth)),
                      label=method)
            steps = [*result["curves"]["eval_step"], args.outer_steps]
            accs = [*result["curves"]["test_acc"], result["final"]["test_acc"]["mean"]]
            right.plot(steps, accs, marker="o", label=method)
        right.axhline(base["mean"], color="gray", linestyle="--", label="no meta-learning")
        left.set(xlabel="outer step", ylabel="query loss after adaptation (meta-training tasks)",
                 title=f"iMAML {args.dataset} {args.ways}-way {args.shots}-shot")
        right.set(xlabel="outer step", ylabel="test accuracy (held-out classes)", ylim=(0, 1))
        for ax in (left, right):
            ax.grid(alpha=0.3)
            ax.legend()
        common.integer_steps(left, right)

    common.save_figure(path, draw, figsize=(10.0, 3.8))


def plot_accuracy(path, results: dict, base: dict, args: argparse.Namespace) -> None:
    names = [*results, "no meta-learning"]
    accs = [*(r["final"]["test_acc"] for r in results.values()), base]

    def draw(fig) -> None:
        ax = fig.subplots()
        ax.bar(names, [a["mean"] for a in accs], yerr=[a["ci95"] or 0.0 for a in accs], capsize=4, color="tab:blue")
        ax.set(ylabel=f"test accuracy (mean ± 95 % CI, {args.eval_tasks} tasks)", ylim=(0, 1),
               title=f"iMAML {args.dataset} {args.ways}-way {args.shots}-shot, {args.outer_steps} outer steps")
        ax.grid(alpha=0.3, axis="y")

    common.save_figure(path, draw, figsize=(6.0, 4.0))


@common.command
def main(argv=None) -> dict:
    args = parse_args(argv)
    methods = list(TABLE3) if args.ihvp == "all" else [args.ihvp]
    for method in methods:  # reject bad solver flags before any work
        make_solver(args, method, lam_form(args, method), args.lam)
    params = sum(p.numel() for p in ConvNet4(args.ways, args.width).parameters())
    if ("exact" in methods or args.check_solvers) and params > EXACT_MAX_PARAMS:
        what = "--check-solvers" if args.check_solvers else "--ihvp exact"
        raise common.RecipeError(f"{what} materialises the p × p Hessian: use --width 8 or smaller "
                                 f"(at most {EXACT_MAX_PARAMS} parameters, got {params})")
    device = common.resolve_device(args.device, args.threads)
    try:
        pools = load_classes(args.dataset, args.data_root, train_classes=args.train_classes, download=args.download)
        for pool in pools:  # checks ways, shots and query against the data
            TaskSampler(pool, args.ways, args.shots, args.query, torch.Generator())
    except ValueError as error:
        raise common.RecipeError(str(error)) from None
    out = common.prepare_out(args)
    if args.check_solvers:
        check = check_solvers(args, pools)
        common.write_json(out / "solver_check.json", check)
        print_check(check)
        return check
    results = {method: run(args, method, pools, device) for method in methods}

    base = baseline(args, pools, device)
    metrics = {"recipe": "imaml", "dataset": args.dataset, "ways": args.ways, "shots": args.shots,
               "outer_steps": args.outer_steps, "baseline": base, "methods": results}
    common.write_json(out / "metrics.json", metrics)
    for method, result in results.items():
        acc = result["final"]["test_acc"]
        print(f"{method:>9}: test accuracy {_with_ci(acc)} ({acc['tasks']} tasks)")
    print(f"{'baseline':>9}: test accuracy {_with_ci(base)} (random init, no meta-learning)")
    plot_curves(out / "curves.png", results, base, args)
    plot_accuracy(out / "accuracy.png", results, base, args)
    return metrics


if __name__ == "__main__":
    main()
