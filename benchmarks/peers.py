"""Small problems against the peers: CG and Neumann hypergradients in betty, hypertorch and torchopt.

Each problem is solved in one process by hyperopt_torch's
:func:`~hyperopt_torch.implicit_hypergradient` with its default settings
(``ConjugateGradient(iters=l)``: undamped; ``Neumann(iters=l)``: α = 0.01)
and by every peer that is installed, at the same ``θ`` (the problem's
parameters as drawn; the timing does not depend on θ being optimal):

* ``ridge``: linear regression, 200 features, one log-L2 penalty per weight (p = 200);
* ``logistic``: binary logistic regression, 100 features + bias, penalty per weight (p = 101);
* ``softmax``: 64 features, 10 classes (p = 650), penalty per weight;
* ``mlp``: tanh MLP 20-24-10 (p = 754), penalty per weight.

The peers, called through their own hypergradient functions (never copied here):

* hypertorch (``hypergrad`` package, Grazzi et al. 2020, not on PyPI):
  ``hypergrad.CG`` and ``hypergrad.fixed_point`` over the fixed-point map
  ``θ − α∇_θ f`` with α = 1 (CG) or α = 0.01 (fixed point, = Neumann);
* betty (``betty-ml``): ``betty.hypergradient.cg`` / ``.neumann`` called
  directly with two minimal problem objects (their ``Engine`` adds its own
  bookkeeping on top, so this is a lower bound on betty's time);
* torchopt: ``torchopt.diff.implicit.custom_root`` with
  ``linear_solve.solve_cg(maxiter=l)`` / ``solve_inv(ns=True, maxiter=l, alpha=0.01)``
  around a solver that returns θ, then ``torch.autograd.grad`` of the outer loss.

Every peer runs exactly ``l`` iterations (torchopt's ``rtol`` is set to 0 so
that its CG does not stop early; hypertorch's default ``tol = 1e-10`` is kept).
Ours runs ``l`` too, except that our CG returns at the first direction of
negative curvature (truncated Newton, see :mod:`hyperopt_torch.ihvp.cg`): on
an indefinite Hessian (the ``mlp`` problem) it spends fewer products, and its
answer differs from the peers' (which step along that direction); the table's
"our HVPs" column says how many it spent.
Each method's hypergradient is compared with ours (relative difference):
betty's CG updates its search direction from the previous residual, and
hypertorch's fixed point sums ``l`` terms to our ``l + 1``, so those two differ
by design; the others agree to float32 rounding.

Timing: ``torch.set_num_threads(--threads)``, CPU time (``time.process_time``)
per call, interleaved rounds, median and interquartile range of ``--repeats``.
The peers are an optional extra (``pip install --no-deps torchopt betty-ml``
and their small dependencies): a missing peer is reported and skipped.

    python -m benchmarks.peers --threads 1 --repeats 41 --out results/peers
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import statistics
import time
import warnings
from types import SimpleNamespace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from hyperopt_torch import ConjugateGradient, Neumann, implicit_hypergradient

from . import common

PROBLEMS = ("ridge", "logistic", "softmax", "mlp")
SOLVERS = ("cg", "neumann")
PEERS = {"hypertorch": "hypergrad", "betty": "betty", "torchopt": "torchopt"}
ALPHA = 0.01  # Neumann step: our default, used for every peer


class Problem:
    """A model θ, hyperparameters φ (one log penalty per parameter entry) and the two losses.

    ``inner(params, hparams)`` and ``outer(params)`` take θ as a list of tensors in
    ``model.parameters()`` order, for the peers' functional interfaces;
    ``train_loss(model)`` / ``val_loss(model)`` are the same losses for ours.
    """

    def __init__(self, name: str, seed: int = 0, dtype: torch.dtype = torch.float32):
        g = torch.Generator().manual_seed(seed)
        n = 200
        if name == "ridge":
            d, out, self.model = 200, 1, nn.Linear(200, 1, bias=False)
        elif name == "logistic":
            d, out, self.model = 100, 1, nn.Linear(100, 1)
        elif name == "softmax":
            d, out, self.model = 64, 10, nn.Linear(64, 10)
        elif name == "mlp":
            d, out, self.model = 20, 10, nn.Sequential(nn.Linear(20, 24), nn.Tanh(), nn.Linear(24, 10))
        else:
            raise ValueError(f"Invalid problem: {name!r} (expected one of {PROBLEMS})")
        self.name = name
        self.model = self.model.to(dtype)
        with torch.no_grad():
            for q in self.model.parameters():
                q.copy_(0.3 * torch.randn(q.shape, generator=g, dtype=dtype))
        self.X, self.Xv = (torch.randn(n, d, generator=g, dtype=dtype) for _ in range(2))
        if name == "ridge":
            self.y, self.yv = (torch.randn(n, generator=g, dtype=dtype) for _ in range(2))
        elif name == "logistic":
            self.y, self.yv = (torch.randint(0, 2, (n,), generator=g).to(dtype) for _ in range(2))
        else:
            self.y, self.yv = (torch.randint(0, out, (n,), generator=g) for _ in range(2))
        self.names = [k for k, _ in self.model.named_parameters()]
        self.hparams = [torch.full_like(q, -3.0, requires_grad=True) for q in self.model.parameters()]

    def _data_loss(self, out: Tensor, y: Tensor) -> Tensor:
        if self.name == "ridge":
            return F.mse_loss(out[:, 0], y)
        if self.name == "logistic":
            return F.binary_cross_entropy_with_logits(out[:, 0], y)
        return F.cross_entropy(out, y)

    def inner(self, params, hparams) -> Tensor:
        out = functional_call(self.model, dict(zip(self.names, params)), (self.X,))
        return self._data_loss(out, self.y) + sum((h.exp() * q**2).sum() for h, q in zip(hparams, params))

    def outer(self, params) -> Tensor:
        return self._data_loss(functional_call(self.model, dict(zip(self.names, params)), (self.Xv,)), self.yv)

    def train_loss(self, model: nn.Module) -> Tensor:
        params = list(model.parameters())
        return self._data_loss(model(self.X), self.y) + sum((h.exp() * q**2).sum() for h, q in zip(self.hparams, params))

    def val_loss(self, model: nn.Module) -> Tensor:
        return self._data_loss(model(self.Xv), self.yv)

    @property
    def numel(self) -> int:
        return sum(q.numel() for q in self.model.parameters())


def ours(problem: Problem, solver: str, iters: int) -> Callable[[], list[Tensor]]:
    method = ConjugateGradient(iters=iters) if solver == "cg" else Neumann(iters=iters, alpha=ALPHA)

    def call():
        result = implicit_hypergradient(problem.hparams, problem.train_loss, problem.val_loss, problem.model, method)
        call.info = result.info  # HVPs spent: CG returns at negative curvature on the CPU
        return list(result.grads)

    return call


def hypertorch(problem: Problem, solver: str, iters: int) -> Callable[[], list[Tensor]]:
    hg = importlib.import_module("hypergrad")
    lr = 1.0 if solver == "cg" else ALPHA  # CG's result does not depend on the map's step; Neumann's does

    def fp_map(params, hparams):
        grads = torch.autograd.grad(problem.inner(params, hparams), params, create_graph=True)
        return [w - lr * g for w, g in zip(params, grads)]

    method = hg.CG if solver == "cg" else hg.fixed_point
    theta = [q.detach() for q in problem.model.parameters()]

    def call():
        return method(theta, problem.hparams, iters, fp_map, lambda params, hparams: problem.outer(params),
                      set_grad=False)

    return call


def betty(problem: Problem, solver: str, iters: int) -> Callable[[], list[Tensor]]:
    hypergradient = importlib.import_module("betty.hypergradient")
    theta = [q.detach().requires_grad_() for q in problem.model.parameters()]
    config = SimpleNamespace(cg_iterations=iters, cg_alpha=1.0, neumann_iterations=iters, neumann_alpha=ALPHA)
    # The two attributes and three methods betty's cg/neumann read from its Problem objects.
    lower = SimpleNamespace(paths=[], config=config, cur_batch=None,
                            training_step_exec=lambda batch: problem.inner(theta, problem.hparams),
                            trainable_parameters=lambda: theta, parameters=lambda: theta)
    upper = SimpleNamespace(trainable_parameters=lambda: problem.hparams)
    method = hypergradient.cg if solver == "cg" else hypergradient.neumann

    def call():
        vector = torch.autograd.grad(problem.outer(theta), theta)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return list(method(vector, lower, upper))

    return call


def torchopt(problem: Problem, solver: str, iters: int) -> Callable[[], list[Tensor]]:
    to = importlib.import_module("torchopt")
    if solver == "cg":
        solve = to.linear_solve.solve_cg(maxiter=iters, rtol=0.0)
    else:
        solve = to.linear_solve.solve_inv(ns=True, maxiter=iters, alpha=ALPHA)
    n = len(problem.names)

    def optimality(params, *hparams):  # torchopt differentiates it with torch.func: ∇_θ f as a function
        return torch.func.grad(lambda ps: problem.inner(list(ps), list(hparams)))(params)

    @to.diff.implicit.custom_root(optimality, argnums=tuple(range(1, n + 1)), solve=solve)
    def inner_solution(params, *hparams):
        return params  # θ is already the inner solution

    theta = tuple(q.detach() for q in problem.model.parameters())

    def call():
        params = inner_solution(theta, *problem.hparams)
        return list(torch.autograd.grad(problem.outer(list(params)), problem.hparams))

    return call


def available_peers() -> dict[str, Callable]:
    return {name: globals()[name] for name, module in PEERS.items() if importlib.util.find_spec(module) is not None}


def time_process(fns: dict[str, Callable[[], object]], warmup: int, repeats: int) -> dict[str, list[float]]:
    """CPU seconds (``process_time``) per call, ``warmup`` untimed calls each, then interleaved rotated rounds."""
    return common.time_interleaved(fns, torch.device("cpu"), warmup, repeats, clock=time.process_time)


def relative_difference(a: list[Tensor], b: list[Tensor]) -> float:
    va = torch.cat([t.detach().reshape(-1).double() for t in a])
    vb = torch.cat([t.detach().reshape(-1).double() for t in b])
    return float((va - vb).norm() / vb.norm())


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__.splitlines()[0], "benchmarks.peers", device=False)
    p.add_argument("--problems", default=",".join(PROBLEMS), help=f"comma-separated subset of {','.join(PROBLEMS)}")
    p.add_argument("--iters", type=int, default=10, help="CG / Neumann iterations l")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per method first")
    p.add_argument("--repeats", type=int, default=15, help="interleaved timed calls per method (median reported)")
    args = p.parse_args(argv)
    common.apply_threads(args.threads)
    problems = [x for x in args.problems.split(",") if x]
    unknown = sorted(set(problems) - set(PROBLEMS))
    if unknown:
        p.error(f"unknown --problems {','.join(unknown)} (expected a subset of {','.join(PROBLEMS)})")
    peers = available_peers()
    missing = sorted(set(PEERS) - set(peers))
    if missing:
        print(f"not installed, skipped: {', '.join(missing)}")
    rows = []
    for name in problems:
        problem = Problem(name, args.seed)
        for solver in SOLVERS:
            fns = {"ours": ours(problem, solver, args.iters)}
            fns.update({peer: build(problem, solver, args.iters) for peer, build in peers.items()})
            reference = fns["ours"]()
            difference = {peer: relative_difference(fn(), reference) for peer, fn in fns.items()}
            times = time_process(fns, args.warmup, args.repeats)
            info = fns["ours"].info
            row = {"problem": name, "p": problem.numel, "solver": solver, "iters": args.iters, "methods": {},
                   "ours_hvps": info.hvps, "ours_negative_curvature": info.negative_curvature}
            for method, seconds in times.items():
                q = statistics.quantiles(seconds, n=4) if len(seconds) > 1 else [seconds[0]] * 3
                row["methods"][method] = {**common.summarise(seconds), "seconds_q1": q[0], "seconds_q3": q[2],
                                          "relative_difference_to_ours": difference[method]}
            fastest = min((m for m in row["methods"] if m != "ours"), key=lambda m: row["methods"][m]["seconds_median"],
                          default=None)
            if fastest is not None:
                row["fastest_peer"] = fastest
                row["ours_over_fastest_peer"] = (row["methods"]["ours"]["seconds_median"]
                                                 / row["methods"][fastest]["seconds_median"])
            rows.append(row)
            print(table_row(row), flush=True)
    ratios = [r["ours_over_fastest_peer"] for r in rows if "ours_over_fastest_peer" in r]
    data = {
        "benchmark": "peers",
        "clock": "process_time",
        "repeats": args.repeats,
        "machine": common.machine(torch.device("cpu")),
        "peers": sorted(peers),
        "missing_peers": missing,
        "rows": rows,
        "geometric_mean_ours_over_fastest_peer": math.exp(statistics.fmean(map(math.log, ratios))) if ratios else None,
    }
    common.write_results(args.out, "peers", data)
    print(markdown_table(data))
    return data


def table_row(row: dict) -> str:
    cells = [f"{m} {1e3 * v['seconds_median']:.2f} ms (IQR {1e3 * v['seconds_q1']:.2f}–{1e3 * v['seconds_q3']:.2f}, "
             f"diff {v['relative_difference_to_ours']:.1e})" for m, v in row["methods"].items()]
    return f"{row['problem']} p={row['p']} {row['solver']} l={row['iters']}: " + "; ".join(cells)


def markdown_table(data: dict) -> str:
    """One line per problem and solver: median ms (interquartile range) per method, and ours / fastest peer."""
    methods = ["ours", *data["peers"]]
    head = "| problem | p | solver | our HVPs | " + " | ".join(f"{m} ms" for m in methods) + " | ours / fastest peer |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in data["rows"]:
        cells = [r["problem"], str(r["p"]), f"{r['solver']} l={r['iters']}",
                 f"{r['ours_hvps']}" + (" (negative curvature)" if r["ours_negative_curvature"] else "")]
        for m in methods:
            v = r["methods"][m]
            cells.append(f"{1e3 * v['seconds_median']:.2f} ({1e3 * v['seconds_q1']:.2f}–{1e3 * v['seconds_q3']:.2f})")
        cells.append(f"{r['ours_over_fastest_peer']:.2f}" if "ours_over_fastest_peer" in r else "")
        lines.append("| " + " | ".join(cells) + " |")
    if data["geometric_mean_ours_over_fastest_peer"] is not None:
        lines.append(f"\ngeometric mean of ours / fastest peer: {data['geometric_mean_ours_over_fastest_peer']:.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
