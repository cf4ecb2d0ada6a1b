"""Hypergradient error against the exact one, as a function of cost, robustness, and Theorem 1.

Four problems whose exact hypergradient (Eq. 3 with the true inverse) is
computable from dense matrices (float64, via ``torch.func``, independently of
the library's HVP code):

* ``ridge``: ridge regression with one penalty ``exp(φ_j)`` per feature;
* ``ridge_illcond``: the same with feature scales spanning 10² (Hessian
  condition number about 10⁴);
* ``ridge_lowrank``: features near an 8-dimensional subspace and penalties
  about 10⁻³ (a near-low-rank Hessian, the case Nyström is built for);
* ``logistic``: L2-penalised logistic regression, solved by Newton's method;
* ``mlp_indefinite``: a tanh MLP after a few gradient steps (not converged:
  the Hessian has negative eigenvalues), one log-penalty per parameter.

Part 1 (Grazzi et al. 2020's comparison, plus Nyström): relative error
``‖h − h*‖/‖h*‖`` of every method against its cost (HVPs and wall time):
CG (no damping), MINRES (no damping), normal-equation CG (no damping; ``l``
iterations cost ``1 + 2l`` HVPs), Neumann/fixed-point with α = 1/λ_max,
Nyström with column and Gaussian sketches (ρ = 0.01, mean over ``--seeds``
sketches), identity, and iterative differentiation (ITD: reverse mode through T gradient steps
with step 1/λ_max from θ = 0, convex problems only).  Implicit methods are
evaluated at the exact inner solution (the MLP: at its current point), so
their error is that of the linear solve; ITD's also includes the inner one.

Part 2 (Figure 1): inverses of ``A + ρI`` (40×40, rank-20 A, ρ = 0.1) —
exact, Nyström rank 5/10/20, Neumann — and Theorem 1's bound
``‖h* − h‖ ≤ ‖g‖‖F‖ (1/ρ)‖E‖/(ρ + ‖E‖)`` checked on random PSD problems.

Part 3 (Table 6 / Figures 3–4 idea): relative error and cosine to h* of
Nyström over ρ ∈ {0.01, 0.1, 1} × k ∈ {5, 10, 20, p} next to Neumann over
α ∈ {0.01, 0.1, 1} × l and CG over damping ∈ {0.01, 0.1, 1} × l (our CG has no
step size), on every problem.  The cosine is the direction measure: outside
the sketch Nyström scales b by 1/ρ, so on a full-rank Hessian with ρ below its
small eigenvalues the norm is off by up to 1/(ρλ) while the direction can
still be good.

Usage::

    python -m benchmarks.accuracy --threads 1 --out results/accuracy   # ~45 s of CPU time
    python -m benchmarks.accuracy --full --out results/accuracy    # larger problems, more seeds
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from hyperopt_torch import ConjugateGradient, Identity, Minres, Neumann, NormalCG, Nystrom, implicit_hypergradient
from hyperopt_torch.unrolled import InnerSGD, unrolled_hypergradient

from . import common

DT = torch.float64
RHO = 0.01


class FlatModel(nn.Module):
    """All inner parameters as one flat vector θ, so dense Hessians are one ``torch.func.hessian`` call."""

    def __init__(self, theta: Tensor):
        super().__init__()
        self.theta = nn.Parameter(theta.clone())


@dataclass
class Problem:
    name: str
    theta: Tensor  # θ̂ where the hypergradient is taken
    phi: Tensor  # the hyperparameters (leaf, requires grad)
    f: Callable[[Tensor, Tensor], Tensor]  # training loss f(θ, φ)
    g: Callable[[Tensor], Tensor]  # validation loss g(θ)
    convex: bool

    def __post_init__(self):
        ph = self.phi.detach()
        self.hessian = torch.func.hessian(self.f)(self.theta, ph)
        mixed = torch.func.jacrev(torch.func.grad(self.f), argnums=1)(self.theta, ph)  # (p, h)
        self.exact = -mixed.T @ torch.linalg.solve(self.hessian, torch.func.grad(self.g)(self.theta))
        self.eigenvalues = torch.linalg.eigvalsh(self.hessian)

    def losses(self):
        return (lambda m: self.f(m.theta, self.phi)), (lambda m: self.g(m.theta))

    def error(self, h: Tensor) -> dict:
        """Relative error, and the cosine to h* (the direction is what a tuned outer step rate needs)."""
        return {
            "error": ((h - self.exact).norm() / self.exact.norm()).item(),
            "cosine": (h @ self.exact / (h.norm() * self.exact.norm()).clamp_min(1e-300)).item(),
        }


def _ridge(n: int, d: int, scales: Tensor, gen: torch.Generator, name: str, log_penalty: float,
           rank: int | None = None) -> Problem:
    """Ridge regression; with ``rank``, the features lie near a ``rank``-dimensional subspace
    (the near-low-rank Hessian that Nyström assumes), shared by the training and validation data."""
    if rank is None:
        X = torch.randn(n, d, generator=gen, dtype=DT) * scales
        Xv = torch.randn(n, d, generator=gen, dtype=DT) * scales
    else:
        basis = torch.randn(rank, d, generator=gen, dtype=DT)
        X, Xv = (torch.randn(n, rank, generator=gen, dtype=DT) @ basis + 0.01 * torch.randn(n, d, generator=gen, dtype=DT)
                 for _ in range(2))
    w = torch.randn(d, generator=gen, dtype=DT) / scales
    y, yv = X @ w + 0.3 * torch.randn(n, generator=gen, dtype=DT), Xv @ w + 0.3 * torch.randn(n, generator=gen, dtype=DT)
    phi = (log_penalty + 0.3 * torch.randn(d, generator=gen, dtype=DT)).requires_grad_()

    def f(theta, ph):
        return 0.5 * ((X @ theta - y) ** 2).mean() + 0.5 * (ph.exp() * theta**2).sum()

    theta = torch.linalg.solve(X.T @ X / n + torch.diag(phi.detach().exp()), X.T @ y / n)
    return Problem(name, theta, phi, f, lambda t: 0.5 * ((Xv @ t - yv) ** 2).mean(), convex=True)


def _logistic(n: int, d: int, gen: torch.Generator) -> Problem:
    X, Xv = torch.randn(n, d, generator=gen, dtype=DT), torch.randn(n, d, generator=gen, dtype=DT)
    w = torch.randn(d, generator=gen, dtype=DT)
    y = (X @ w + torch.randn(n, generator=gen, dtype=DT) > 0).to(DT)
    yv = (Xv @ w + torch.randn(n, generator=gen, dtype=DT) > 0).to(DT)
    phi = (-4 + 0.3 * torch.randn(d, generator=gen, dtype=DT)).requires_grad_()
    bce = nn.functional.binary_cross_entropy_with_logits

    def f(theta, ph):
        return bce(X @ theta, y) + 0.5 * (ph.exp() * theta**2).sum()

    theta = torch.zeros(d, dtype=DT)
    for _ in range(50):  # Newton's method: strongly convex, converges to machine precision
        theta = theta - torch.linalg.solve(torch.func.hessian(f)(theta, phi.detach()), torch.func.grad(f)(theta, phi.detach()))
    return Problem("logistic", theta, phi, f, lambda t: bce(Xv @ t, yv), convex=True)


def _mlp(n: int, d: int, hidden: int, gen: torch.Generator) -> Problem:
    shapes = [(hidden, d), (hidden,), (1, hidden), (1,)]
    sizes = [math.prod(s) for s in shapes]
    X, Xv = torch.randn(n, d, generator=gen, dtype=DT), torch.randn(n, d, generator=gen, dtype=DT)
    y, yv = torch.sin(2 * X[:, 0]) + X[:, 1] ** 2, torch.sin(2 * Xv[:, 0]) + Xv[:, 1] ** 2

    def net(theta, inputs):
        W1, b1, W2, b2 = (t.reshape(s) for t, s in zip(torch.split(theta, sizes), shapes))
        return (torch.tanh(inputs @ W1.T + b1) @ W2.T + b2)[:, 0]

    phi = torch.full((sum(sizes),), -5.0, dtype=DT).requires_grad_()

    def f(theta, ph):
        return 0.5 * ((net(theta, X) - y) ** 2).mean() + 0.5 * (ph.exp() * theta**2).sum()

    theta = torch.randn(sum(sizes), generator=gen, dtype=DT) / math.sqrt(d)
    for _ in range(30):  # a few gradient steps: far from a minimum, the Hessian is indefinite
        theta = theta - 0.1 * torch.func.grad(f)(theta, phi.detach())
    return Problem("mlp_indefinite", theta, phi, f, lambda t: 0.5 * ((net(t, Xv) - yv) ** 2).mean(), convex=False)


def build_problems(full: bool, seed: int) -> list[Problem]:
    gen = torch.Generator().manual_seed(seed)
    d = 200 if full else 60
    return [
        _ridge(2 * d, d, torch.ones(d, dtype=DT), gen, "ridge", -2.0),
        _ridge(2 * d, d, torch.logspace(0, -2, d, dtype=DT), gen, "ridge_illcond", -9.0),
        _ridge(2 * d, d, torch.ones(d, dtype=DT), gen, "ridge_lowrank", -7.0, rank=8),
        _logistic(3 * d, d, gen),
        _mlp(200, 4, 40 if full else 16, gen),
    ]


def implicit_point(problem: Problem, solver, seed: int) -> dict:
    model = FlatModel(problem.theta)
    train, val = problem.losses()
    grads, info = implicit_hypergradient([problem.phi], train, val, model, ihvp=solver,
                                         generator=torch.Generator().manual_seed(seed))
    return {"hvps": info.hvps, "seconds": info.seconds, **problem.error(grads[0])}


def itd_point(problem: Problem, steps: int) -> dict:
    model = FlatModel(torch.zeros_like(problem.theta))
    train, val = problem.losses()
    lr = 1.0 / problem.eigenvalues[-1].item()
    grads, info = unrolled_hypergradient([problem.phi], train, val, model, InnerSGD(lr=lr), steps=steps)
    return {"hvps": steps, "seconds": info.seconds, **problem.error(grads[0])}


def _mean_over_seeds(points: list[dict]) -> dict:
    return {key: sum(pt[key] for pt in points) / len(points) for key in points[0]}


def error_vs_cost(problem: Problem, costs: list[int], seeds: int) -> dict:
    """Part 1: one curve per method, points ``{param, hvps, seconds, error}``."""
    p = problem.theta.numel()
    alpha = 1.0 / problem.eigenvalues[-1].item()
    ranks = sorted({min(c, p) for c in costs})
    curves: dict[str, list[dict]] = {}

    def add(name, param, point):
        curves.setdefault(name, []).append({"param": param, **point})

    for l in costs:
        add("CG", l, implicit_point(problem, ConjugateGradient(iters=l), 0))
        add("MINRES", l, implicit_point(problem, Minres(iters=l), 0))
        add("normal-CG", l, implicit_point(problem, NormalCG(iters=l), 0))
        add("Neumann α=1/λmax", l, implicit_point(problem, Neumann(iters=l, alpha=alpha), 0))
        if problem.convex:
            add("ITD (unrolled, T=l)", l, itd_point(problem, l))
    for k in ranks:
        for sketch in ("columns", "gaussian"):
            pts = [implicit_point(problem, Nystrom(rank=k, rho=RHO, sketch=sketch), s) for s in range(seeds)]
            add(f"Nyström {sketch} ρ={RHO}", k, _mean_over_seeds(pts))
    add("Identity", 0, implicit_point(problem, Identity(), 0))
    return curves


def robustness(problem: Problem, seeds: int) -> dict:
    """Part 3: grids over (ρ or α or damping) × (k or l), k and l up to p.

    Returns ``{"settings", "sizes", "methods": {name: {"error": grid, "cosine": grid}}}`` with
    ``grid[i][j]`` for ``settings[i]`` and ``sizes[j]`` (Nyström: the mean over ``seeds`` sketches).
    """
    settings = [0.01, 0.1, 1.0]
    sizes = sorted({n for n in (5, 10, 20) if n < problem.theta.numel()} | {problem.theta.numel()})

    def grid(make, seeded):
        points = [[_mean_over_seeds([implicit_point(problem, make(s, n), sd) for sd in range(seeds if seeded else 1)])
                   for n in sizes] for s in settings]
        return {key: [[pt[key] for pt in row] for row in points] for key in ("error", "cosine")}

    return {
        "settings": settings,
        "sizes": sizes,
        "methods": {
            "Nyström (ρ × k)": grid(lambda s, n: Nystrom(rank=n, rho=s), True),
            "CG (damping × l)": grid(lambda s, n: ConjugateGradient(iters=n, rho=s), False),
            "Neumann (α × l)": grid(lambda s, n: Neumann(iters=n, alpha=s), False),
        },
    }


def dense_inverse(solver, A: Tensor, seed: int) -> Tensor:
    """The matrix ``x ↦ solver(A)⁻¹ x``, column by column, with the same random sketch for every column."""
    cols = [solver.solve(lambda V: V @ A, e, generator=torch.Generator().manual_seed(seed)) for e in torch.eye(A.shape[0], dtype=DT)]
    return torch.stack(cols, dim=1)


def _random_psd(p: int, rank: int, gen: torch.Generator, decay: float) -> Tensor:
    Q, _ = torch.linalg.qr(torch.randn(p, rank, generator=gen, dtype=DT))
    return (Q * decay ** torch.arange(rank, dtype=DT)) @ Q.T


def figure1(seed: int) -> dict:
    """Part 2a: the 40 × 40 example of Figure 1."""
    gen = torch.Generator().manual_seed(seed)
    p, rho = 40, 0.1
    B = torch.randn(p, 20, generator=gen, dtype=DT)
    A = B @ B.T / 20
    true = torch.linalg.inv(A + rho * torch.eye(p, dtype=DT))
    alpha = 1.0 / (torch.linalg.eigvalsh(A)[-1].item() + rho)
    panels = {"true inverse": true}
    for k in (5, 10, 20):
        panels[f"Nyström k={k}"] = dense_inverse(Nystrom(rank=k, rho=rho), A, seed)
    damped = A + rho * torch.eye(p, dtype=DT)
    panels["Neumann l=20"] = dense_inverse(Neumann(iters=20, alpha=alpha), damped, seed)
    return {"matrices": panels, "errors": {k: ((v - true).norm() / true.norm()).item() for k, v in panels.items()}}


def theorem1(seeds: int) -> list[dict]:
    """Part 2b: measured ‖h* − h‖ against the bound of Theorem 1 on random PSD problems."""
    points = []
    p, h = 100, 10
    for s in range(seeds):
        gen = torch.Generator().manual_seed(1000 + s)
        H = _random_psd(p, 60, gen, decay=0.9)
        F = torch.randn(p, h, generator=gen, dtype=DT)
        g = torch.randn(p, generator=gen, dtype=DT)
        for rho in (0.01, 0.1, 1.0):
            h_star = -F.T @ torch.linalg.solve(H + rho * torch.eye(p, dtype=DT), g)
            for sketch in ("columns", "gaussian"):
                for k in (5, 10, 20, 40):
                    M = dense_inverse(Nystrom(rank=k, rho=rho, sketch=sketch), H, s)
                    Hk = torch.linalg.inv(M) - rho * torch.eye(p, dtype=DT)
                    E = torch.linalg.matrix_norm(H - Hk, ord=2).item()
                    bound = g.norm().item() * torch.linalg.matrix_norm(F, ord=2).item() / rho * E / (rho + E)
                    err = (h_star + F.T @ M @ g).norm().item()
                    points.append({"seed": s, "rho": rho, "sketch": sketch, "k": k, "error": err, "bound": bound, "E": E})
    return points


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__.splitlines()[0], "benchmarks.accuracy", full=True)
    p.add_argument("--costs", type=int, nargs="+", default=None,
                   help="iterations / ranks / unrolled steps to sweep (default 1 2 5 10 20 40 60 100 200)")
    p.add_argument("--seeds", type=int, default=None, help="random sketches averaged per Nyström point (default 3, --full 10)")
    p.add_argument("--problems", default="ridge,ridge_illcond,ridge_lowrank,logistic,mlp_indefinite", help="comma-separated subset")
    args = p.parse_args(argv)
    common.apply_threads(args.threads)
    if common.resolve_device(args.device).type != "cpu":
        print("accuracy runs in float64 on small dense problems: using the CPU")
    seeds = args.seeds or (10 if args.full else 3)
    costs = args.costs or [1, 2, 5, 10, 20, 40, 60, 100, 200]
    wanted = args.problems.split(",")
    problems = [q for q in build_problems(args.full, args.seed) if q.name in wanted]

    data = {"benchmark": "accuracy", "machine": common.machine(torch.device("cpu")), "seeds": seeds, "problems": {}}
    for q in problems:
        lam = q.eigenvalues
        data["problems"][q.name] = {
            "parameters": q.theta.numel(),
            "eigenvalue_min": lam[0].item(),
            "eigenvalue_max": lam[-1].item(),
            "curves": error_vs_cost(q, costs, seeds),
        }
        data["problems"][q.name]["robustness"] = robustness(q, seeds)
        print(f"{q.name}: p={q.theta.numel()}, eigenvalues [{lam[0]:.3g}, {lam[-1]:.3g}]")
    fig1 = figure1(args.seed)
    data["figure1_errors"] = fig1["errors"]
    data["theorem1"] = thm = theorem1(seeds)
    data["theorem1_max_error_over_bound"] = max(pt["error"] / pt["bound"] for pt in thm if pt["bound"] > 0)
    print(f"Theorem 1: max measured/bound = {data['theorem1_max_error_over_bound']:.3g} over {len(thm)} cases")
    print(summary_table(data))
    common.write_results(args.out, "accuracy", data)
    common.save_figure(args.out / "accuracy_error_vs_cost.png", lambda fig: _plot_curves(fig, data), figsize=(3.0 * len(problems), 7.5))
    common.save_figure(args.out / "accuracy_inverse.png", lambda fig: _plot_inverse(fig, fig1), figsize=(14, 3.2))
    common.save_figure(args.out / "accuracy_theorem1.png", lambda fig: _plot_theorem(fig, thm), figsize=(5, 4.5))
    if any("robustness" in v for v in data["problems"].values()):
        common.save_figure(args.out / "accuracy_robustness.png", lambda fig: _plot_robustness(fig, data), figsize=(11, 2.6 * len(problems)))
    return data


def summary_table(data: dict) -> str:
    """Relative error (cosine to h*) per method at every cost, then Nyström's ρ × k grid, per problem (Markdown)."""
    out = []
    for name, prob in data["problems"].items():
        out.append(f"\n{name} (p={prob['parameters']}, λ ∈ [{prob['eigenvalue_min']:.2g}, {prob['eigenvalue_max']:.2g}])\n")
        params = sorted({pt["param"] for c in prob["curves"].values() for pt in c})
        out.append("| method: error (cosine) | " + " | ".join(f"l/k/T={n}" for n in params) + " |")
        out.append("|---|" + "---|" * len(params))
        for method, pts in prob["curves"].items():
            by = {pt["param"]: pt for pt in pts}
            out.append(f"| {method} | " + " | ".join(_cell(by[n]["error"], by[n]["cosine"]) if n in by else ""
                                                     for n in params) + " |")
        rob = prob["robustness"]
        nystrom = rob["methods"]["Nyström (ρ × k)"]
        out.append("\n| Nyström: error (cosine) | " + " | ".join(f"k={n}" for n in rob["sizes"]) + " |")
        out.append("|---|" + "---|" * len(rob["sizes"]))
        for i, rho in enumerate(rob["settings"]):
            out.append(f"| ρ={rho:g} | " + " | ".join(_cell(e, c) for e, c in zip(nystrom["error"][i], nystrom["cosine"][i]))
                       + " |")
    return "\n".join(out)


def _cell(error: float, cosine: float) -> str:
    return f"{error:.2g} ({cosine:.2f})"


def _plot_curves(fig, data: dict) -> None:
    probs = data["problems"]
    axes = fig.subplots(3, len(probs), squeeze=False)
    rows = (("hvps", "error", "HVPs (identity drawn at 0.5)"), ("seconds", "error", "wall time (s)"), ("hvps", "cosine", "HVPs"))
    # one colour per method in every panel (a problem without ITD would otherwise shift the colour cycle)
    methods = dict.fromkeys(m for prob in probs.values() for m in prob["curves"])
    colours = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    for j, (name, prob) in enumerate(probs.items()):
        for method, pts in prob["curves"].items():
            style = "--" if "gaussian" in method else "-"
            for i, (x, y, _) in enumerate(rows):
                # a skipped (NaN) solve is drawn at the top of the error axis and left out of the cosine's
                ys = [min(pt[y], 1e6) if math.isfinite(pt[y]) else (1e6 if y == "error" else math.nan) for pt in pts]
                xs = [max(pt[x], 0.5 if x == "hvps" else 1e-5) for pt in pts]
                axes[i][j].plot(xs, ys, style, marker=".", label=method, color=colours[method])
        for i, (_, y, xlabel) in enumerate(rows):
            ax = axes[i][j]
            ax.set_xscale("log")
            if y == "error":
                ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("relative error ‖h−h*‖/‖h*‖" if y == "error" else "cosine(h, h*)")
            ax.grid(True, which="both", alpha=0.3)
        axes[0][j].set_title(f"{name} (p={prob['parameters']}, λmin={prob['eigenvalue_min']:.2g})", fontsize=9)
    axes[0][0].legend(fontsize=7)


def _plot_inverse(fig, fig1: dict) -> None:
    mats = fig1["matrices"]
    vmax = max(m.abs().max().item() for m in mats.values())
    axes = fig.subplots(1, len(mats))
    for ax, (name, m) in zip(axes, mats.items()):
        im = ax.imshow(m.numpy(), cmap="RdBu_r", vmin=-vmax, vmax=vmax)
        ax.set_title(f"{name}\nrel. error {fig1['errors'][name]:.2g}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=list(axes), shrink=0.8)


def _plot_theorem(fig, points: list[dict]) -> None:
    ax = fig.subplots()
    for rho, marker in zip((0.01, 0.1, 1.0), "o^s"):
        pts = [pt for pt in points if pt["rho"] == rho]
        ax.scatter([pt["bound"] for pt in pts], [pt["error"] for pt in pts], marker=marker, s=12, label=f"ρ={rho}")
    lo = min(min(pt["error"] for pt in points), min(pt["bound"] for pt in points))
    hi = max(pt["bound"] for pt in points)
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="error = bound")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("Theorem 1 bound  ‖g‖‖F‖(1/ρ)‖E‖/(ρ+‖E‖)")
    ax.set_ylabel("measured ‖h* − h‖")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)


def _plot_robustness(fig, data: dict) -> None:
    rows = [(n, p["robustness"]) for n, p in data["problems"].items() if "robustness" in p]
    methods = list(rows[0][1]["methods"])
    axes = fig.subplots(len(rows), len(methods), squeeze=False)
    for i, (name, rob) in enumerate(rows):
        for j, method in enumerate(methods):
            ax = axes[i][j]
            errors, cosines = rob["methods"][method]["error"], rob["methods"][method]["cosine"]
            grid = torch.tensor(errors, dtype=DT).nan_to_num(nan=1e6, posinf=1e6).clamp(1e-6, 1e6)
            ax.imshow(grid.log10().numpy(), cmap="viridis", vmin=-6, vmax=2)
            for a in range(grid.shape[0]):
                for b in range(grid.shape[1]):
                    v, c = errors[a][b], cosines[a][b]
                    text = f"{v:.1g}\n{c:.2f}" if math.isfinite(v) and v < 1e6 else "div"
                    ax.text(b, a, text, ha="center", va="center", color="w", fontsize=7)
            ax.set_xticks(range(len(rob["sizes"])), [str(s) for s in rob["sizes"]])
            ax.set_yticks(range(len(rob["settings"])), [str(s) for s in rob["settings"]])
            ax.set_title(f"{name}: {method}", fontsize=9)
            ax.set_xlabel("k" if "Nyström" in method else "l")
    fig.suptitle("relative hypergradient error (top number, log10 colour; 'div': diverged) "
                 "and cosine to the exact hypergradient (bottom number)", fontsize=9)


if __name__ == "__main__":
    main()
