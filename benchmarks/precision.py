"""Hypergradients of bfloat16, float16 and autocast models against float64 (docs/methods.md, mixed precision).

The problem: L2-penalised logistic regression with one weight decay ``exp(φ_j)``
per feature, ``p = 256`` parameters, ``n = 512`` examples, solved to machine
precision in float64 by Newton's method.  The same model, data and sketch
(the same generator seed) are then cast to each dtype, and the hypergradient
``dg/dφ`` of each is compared with the float64 one: relative error
``‖g − g₆₄‖/‖g₆₄‖`` and cosine.  ``reduction="sum"`` (a loss summed over the
examples, a Hessian ``n`` times larger) is the float32 full-rank case of
issue 8.

``--sketch-by-k`` measures instead how the Gaussian sketch's error in half
precision grows as ``k`` approaches ``p`` (docs/methods.md, Nyström): a tanh
MLP 5-4-3 (``p = 39``) with one log weight decay, in bfloat16 and in float32
under bfloat16 autocast, each against the float32 hypergradient with the same
sketch (the Gaussian rows are drawn in float32 for all three), median over
five seeds, for both sketches.

Usage::

    python -m benchmarks.precision                  # the table in docs/methods.md
    python -m benchmarks.precision --sketch-by-k    # the Gaussian sketch against k
"""

from __future__ import annotations

import argparse
import copy
import statistics
from typing import Callable

import torch
from torch import nn

from hyperopt_torch import ConjugateGradient, Exact, Nystrom, implicit_hypergradient

from . import common

DT = torch.float64
# name, model dtype, autocast dtype (None: no autocast)
PRECISIONS = (
    ("float32", torch.float32, None),
    ("bfloat16", torch.bfloat16, None),
    ("float16", torch.float16, None),
    ("float32 + bf16 autocast", torch.float32, torch.bfloat16),
)


def logistic_problem(d: int = 256, n: int = 512, reduction: str = "mean", decay: float = -4.0,
                     spread: float = 0.0, seed: int = 0) -> Callable:
    """Build the problem; return ``hypergradient(dtype, solver, autocast=None) -> float64 (d,)``.

    ``spread`` scales the features by ``logspace(0, -spread)`` (a wider Hessian
    spectrum); ``decay`` is the mean of ``φ``.
    """
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(0, -spread, d, dtype=DT)
    X = torch.randn(n, d, generator=g, dtype=DT) * scale
    Xv = torch.randn(n, d, generator=g, dtype=DT) * scale
    w = torch.randn(d, generator=g, dtype=DT) / scale
    y = (X @ w + 0.5 * torch.randn(n, generator=g, dtype=DT) > 0).to(DT)
    yv = (Xv @ w + 0.5 * torch.randn(n, generator=g, dtype=DT) > 0).to(DT)
    phi0 = 0.3 * torch.randn(d, generator=g, dtype=DT) + decay
    c = 1.0 if reduction == "sum" else 1.0 / n
    theta = torch.zeros(d, dtype=DT)
    for _ in range(40):  # Newton's method on a strongly convex problem
        s = torch.sigmoid(X @ theta)
        grad = c * X.T @ (s - y) + phi0.exp() * theta
        H = c * (X.T * (s * (1 - s))) @ X + torch.diag(phi0.exp())
        theta = theta - torch.linalg.solve(H, grad)
    bce = nn.functional.binary_cross_entropy_with_logits

    def hypergradient(dtype: torch.dtype, solver, autocast: torch.dtype | None = None) -> torch.Tensor:
        model = nn.Linear(d, 1, bias=False).to(dtype)
        with torch.no_grad():
            model.weight.copy_(theta[None])
        phi = phi0.to(torch.float32 if dtype != DT else DT).clone().requires_grad_()
        Xd, yd, Xvd, yvd = X.to(dtype), y.to(dtype), Xv.to(dtype), yv.to(dtype)

        def train(m):
            return bce(m(Xd).squeeze(1), yd, reduction=reduction) + 0.5 * (phi.to(dtype).exp() * m.weight[0] ** 2).sum()

        def val(m):
            return bce(m(Xvd).squeeze(1), yvd)

        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            (grad,), info = implicit_hypergradient([phi], train, val, model, solver,
                                                   generator=torch.Generator().manual_seed(0))
        assert not info.skipped
        return grad.double()

    return hypergradient


def compare(g: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """``(relative error, cosine)`` of ``g`` against ``ref``."""
    return ((g - ref).norm() / ref.norm()).item(), (g @ ref / (g.norm() * ref.norm())).item()


def sketch_by_k(rho: float = 0.01, seeds: int = 5) -> None:
    """Print the median relative error of a bfloat16 and an autocast Nyström hypergradient against float32's."""
    torch.manual_seed(0)
    X, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    Xv, yv = torch.randn(64, 5), torch.randint(0, 3, (64,))
    base = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    p = sum(q.numel() for q in base.parameters())

    def hypergradient(dtype: torch.dtype, autocast: bool, sketch: str, k: int, seed: int) -> float:
        model = copy.deepcopy(base).to(dtype)
        phi = torch.full((1,), -2.0, dtype=dtype, requires_grad=True)

        def loss(m: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out = m(inputs.to(dtype))
            return nn.functional.cross_entropy(out.float(), targets)

        def train(m: nn.Module) -> torch.Tensor:
            decay = phi.exp().squeeze().float() * sum((q.float() ** 2).sum() for q in m.parameters())
            return loss(m, X, y) + decay

        solver = Nystrom(rank=k, rho=rho, sketch=sketch, seed=seed)
        return implicit_hypergradient([phi], train, lambda m: loss(m, Xv, yv), model, solver).grads[0].double().item()

    print(f"p = {p}; median relative error over {seeds} seeds against float32 with the same sketch")
    print("| sketch | k | bfloat16 model | float32 + bf16 autocast |")
    print("|---|---|---|---|")
    for sketch in ("columns", "gaussian"):
        for k in (10, p // 2, 25, 30, 35, p - 1, p):
            cells = []
            for dtype, autocast in ((torch.bfloat16, False), (torch.float32, True)):
                errors = []
                for seed in range(seeds):
                    ref = hypergradient(torch.float32, False, sketch, k, seed)
                    errors.append(abs(hypergradient(dtype, autocast, sketch, k, seed) - ref) / abs(ref))
                cells.append(f"{statistics.median(errors):.2g}")
            print(f"| {sketch} | {k} | " + " | ".join(cells) + " |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.precision", description=__doc__.split("\n\n")[0],
                                     formatter_class=common.HelpFormatter)
    parser.add_argument("--rho", type=float, default=0.01, help="damping ρ of the Nyström, exact and CG solves")
    parser.add_argument("--sketch-by-k", action="store_true",
                        help="the Gaussian and the columns sketch in half precision as k approaches p")
    common.add_threads(parser, default=1)
    args = parser.parse_args(argv)
    common.apply_threads(args.threads)
    if args.sketch_by_k:
        sketch_by_k(args.rho)
        return
    problem = logistic_problem()
    solvers = [Nystrom(rank=k, rho=args.rho) for k in (16, 64, 200, 256)] + [Exact(rho=args.rho), ConjugateGradient(30, rho=args.rho)]
    print("| solver | " + " | ".join(name for name, _, _ in PRECISIONS) + " |")
    print("|---|" + "---|" * len(PRECISIONS))
    for solver in solvers:
        ref = problem(DT, solver)
        cells = [compare(problem(dtype, solver, autocast), ref) for _, dtype, autocast in PRECISIONS]
        label = {"nystrom": lambda: f"Nyström k = {solver.rank}", "exact": lambda: "Exact",
                 "cg": lambda: f"CG l = {solver.iters}"}[solver.name]()
        print(f"| {label} | " + " | ".join(f"{e:.1e} / {c:.5f}" for e, c in cells) + " |")


if __name__ == "__main__":
    main()
