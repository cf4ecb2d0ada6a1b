"""What hyperopt_torch._compat's fast paths save: one step with them on and off.

Each configuration runs in two child processes, one with
``HYPEROPT_TORCH_FAST_PATHS=0`` (every private-name fast path off, the public
fallbacks on) and one without; each times ``HyperOptimizer.step``, CPU time,
median of ``--repeats`` after a warm-up, and the ratio off / on is printed.
The problems: a logistic regression with 101 parameters and CG (l = 10) —
where per-call overheads dominate — and LeNet with a batch of 128 and
Nyström (k = 10).  The hypergradients with and without the fast paths are
checked to agree.  Writes ``fast_paths.json``.

    python -m benchmarks.fast_paths --threads 1 --repeats 41 --out docs/results
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

from . import common

PROBLEMS = ("logistic cg l=10", "lenet nystrom k=10")


def _problem(name: str):
    from hyperopt_torch import ConjugateGradient, HyperOptimizer, Nystrom
    from recipes.models import LeNet

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if name.startswith("logistic"):
        model = nn.Linear(100, 1)
        x, y = torch.randn(500, 100, generator=g), (torch.rand(500, generator=g) > 0.5).float()
        xv, yv = torch.randn(500, 100, generator=g), (torch.rand(500, generator=g) > 0.5).float()
        loss = lambda m, a, b: nn.functional.binary_cross_entropy_with_logits(m(a)[:, 0], b)
        solver = ConjugateGradient(iters=10, rho=0.01)
    else:
        model = LeNet()
        x, y = torch.randn(128, 1, 28, 28, generator=g), torch.randint(0, 10, (128,), generator=g)
        xv, yv = torch.randn(128, 1, 28, 28, generator=g), torch.randint(0, 10, (128,), generator=g)
        loss = lambda m, a, b: nn.functional.cross_entropy(m(a), b)
        solver = Nystrom(rank=10, rho=0.01)
    decay = [torch.full_like(p, -4.0, requires_grad=True) for p in model.parameters()]
    train = lambda m: loss(m, x, y) + sum((d.exp() * p ** 2).sum() for d, p in zip(decay, m.parameters()))
    val = lambda m: loss(m, xv, yv)
    hopt = HyperOptimizer(decay, base=torch.optim.SGD, ihvp=solver, lr=0.0, engine="func")
    return model, train, val, hopt


def _child(name: str, warmup: int, repeats: int) -> None:
    from hyperopt_torch import _compat

    model, train, val, hopt = _problem(name)
    grads = torch.cat([g.flatten() for g in hopt.hypergradient(train, val, model).grads])
    for _ in range(warmup):
        hopt.step(train, val, model)
    times = []
    for _ in range(repeats):
        start = time.process_time()
        hopt.step(train, val, model)
        times.append(time.process_time() - start)
    print(json.dumps({"fast": _compat.FAST, "median": statistics.median(times), "grads": grads.tolist()}))


def main(argv=None) -> dict:
    parser = common.parser(__doc__.split("\n\n")[0], "benchmarks.fast_paths", device=False)
    parser.add_argument("--repeats", type=int, default=41, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--child", default=None, help=argparse_hidden())
    args = parser.parse_args(argv)
    common.apply_threads(args.threads)
    if args.child is not None:
        _child(args.child, args.warmup, args.repeats)
        return {}
    rows = {}
    for name in PROBLEMS:
        runs = {}
        for fast in ("1", "0"):
            env = {**os.environ, "HYPEROPT_TORCH_FAST_PATHS": fast}
            command = [sys.executable, "-m", "benchmarks.fast_paths", "--child", name, "--repeats", str(args.repeats),
                       "--warmup", str(args.warmup), *(["--threads", str(args.threads)] if args.threads else [])]
            out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
            runs[fast] = json.loads(out.stdout.strip().splitlines()[-1])
        on, off = torch.tensor(runs["1"]["grads"]), torch.tensor(runs["0"]["grads"])
        rows[name] = {"fast_seconds": runs["1"]["median"], "public_seconds": runs["0"]["median"],
                      "public_over_fast": runs["0"]["median"] / runs["1"]["median"],
                      "relative_difference": ((on - off).norm() / on.norm()).item()}
        r = rows[name]
        print(f"{name:>20}: fast paths {1e3 * r['fast_seconds']:.2f} ms, public API {1e3 * r['public_seconds']:.2f} ms "
              f"({r['public_over_fast']:.2f} x), hypergradients equal to {r['relative_difference']:.1e}")
    result = {"config": {k: str(v) for k, v in vars(args).items()}, "machine": common.machine(torch.device("cpu")),
              "clock": "process_time", "problems": rows}
    common.write_results(args.out, "fast_paths", result)
    return result


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
