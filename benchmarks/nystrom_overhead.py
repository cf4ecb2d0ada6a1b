"""How much does a Nyström hypergradient step cost beyond the work it cannot avoid?

On LeNet with a batch of 128 MNIST-sized images and one weight decay per
weight (Lorraine et al.'s setting: as many hyperparameters as parameters),
these are timed, interleaved, after a warm-up, median over repeats (CPU
time of the process by default on a CPU, wall time on CUDA):

* ``step``: ``HyperOptimizer.step`` with ``Nystrom(rank=k, rho=0.01)`` — the
  whole library path: both losses, the gradient graph, k HVPs in one batched
  backward, the float64 small solve, the mixed-partial VJP, the finiteness
  check and the Adam update.  ``step_autograd`` is the same with
  ``engine="autograd"`` (``is_grads_batched`` instead of torch.func).
* ``floor_<engine>:<strategy>``: only the unavoidable autograd work, done
  by hand — the validation gradient, the training gradient with its graph
  built by one engine (``func`` or ``autograd``), k Hessian-vector products
  batched by one strategy (``vmap``, ``loop``, ``vmap:c``; see
  :class:`hyperopt_torch.hvp.HessianVectorProduct`), and the mixed-partial
  VJP.  The floor is the fastest of these, whichever engine it uses.
* ``rollback_copies``: what a step copies so that a failed base update can
  be undone (the hparams, their optimizer state, the solver's state), as the
  step makes them; ``rollback_copies_before``: as the code before issue 18
  made them (a deep copy of the base's ``state_dict()`` and two of the
  solver's).
* ``reference``: the same hypergradient computed the way the paper's
  reference code does it: torch.func ``grad`` of the outer loss, k Hessian
  rows as ``jacrev`` of the inner gradient gathered at the k indices (vmap),
  the literal Eq. 6 solved by LU (``torch.linalg.solve``), and the mixed term
  as a forward-over-reverse ``jvp``.

``--model wrn16`` / ``mlp`` / ``wrn`` time the data-reweighting task of
:mod:`benchmarks.speed_memory` instead (no reference there).  The targets
(issues 2 and 11): ``step / floor ≤ 1.1`` on every model and ``step < reference``.
Writes ``overhead.json`` and ``overhead.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, jvp, vmap

from hyperopt_torch import HyperOptimizer, Nystrom
from hyperopt_torch.optim import _BaseState
from hyperopt_torch.ihvp import sample_columns
from hyperopt_torch.hvp import flatten, training_hvp, unflatten
from recipes.models import LeNet

from . import common, speed_memory

DECAY_SCALE = 1e-4


def build(batch: int, device: str, seed: int = 0):
    torch.manual_seed(seed)
    model = LeNet().to(device)
    x, y = torch.randn(batch, 1, 28, 28, device=device), torch.randint(0, 10, (batch,), device=device)
    xv, yv = torch.randn(batch, 1, 28, 28, device=device), torch.randint(0, 10, (batch,), device=device)
    log_decay = [torch.zeros_like(p, requires_grad=True) for p in model.parameters()]

    def penalty(params):
        return DECAY_SCALE * sum((d.exp() * p**2).sum() for d, p in zip(log_decay, params))

    def train_loss(m):
        return nn.functional.cross_entropy(m(x), y) + penalty(list(m.parameters()))

    def val_loss(m):
        return nn.functional.cross_entropy(m(xv), yv)

    return model, log_decay, train_loss, val_loss, (x, y, xv, yv, penalty)


def floor_fn(model, hparams, train_loss, val_loss, k, engine, strategy):
    """The unavoidable autograd work of one Nyström hypergradient, its graph built by ``engine`` and its k HVPs
    batched by ``strategy``."""
    params = list(model.parameters())
    gv = torch.autograd.grad(val_loss(model), params)
    hvp, _ = training_hvp(train_loss, model, params, engine)
    hvp.forced = strategy
    b = flatten(gv, params)
    V = torch.zeros(k, b.numel(), device=b.device, dtype=b.dtype)
    V[torch.arange(k), torch.arange(k)] = 1
    with torch.no_grad():
        hvp.inplace(V)  # over the input rows, as the step's sketch does: no output block
    return hvp.mixed(b, hparams)


def reference_fn(model, log_decay, data, k, rho, generator):
    """Eq. 6 as the paper's reference implementation computes it, written with torch.func."""
    x, y, xv, yv, penalty = data
    names = [n for n, _ in model.named_parameters()]
    theta = {n: p.detach() for n, p in model.named_parameters()}
    phi = [d.detach() for d in log_decay]

    def inner(params, phi_):
        out = functional_call(model, params, (x,))
        decay = DECAY_SCALE * sum((d.exp() * params[n] ** 2).sum() for d, n in zip(phi_, names))
        return nn.functional.cross_entropy(out, y) + decay

    def outer(params):
        return nn.functional.cross_entropy(functional_call(model, params, (xv,)), yv)

    g_theta = grad(outer)(theta)
    v = torch.cat([g_theta[n].reshape(-1) for n in names])
    index = sample_columns(v.numel(), k, generator).to(v.device)  # the index set the library draws

    def selected_gradient(params):
        g = grad(inner)(params, phi)
        flat = torch.cat([g[n].reshape(-1) for n in names])
        return vmap(lambda i: flat.gather(0, i))(index[:, None]).squeeze(1)

    rows = jacrev(selected_gradient)(theta)
    C = torch.cat([rows[n].reshape(k, -1) for n in names], dim=1)
    M = C[:, index]
    ihvp = v / rho - C.T @ torch.linalg.solve(M + C @ C.T / rho, C @ v) / rho**2
    tangent = dict(zip(names, unflatten(ihvp, [theta[n] for n in names])))
    _, mixed = jvp(lambda p: grad(inner, argnums=1)(p, phi), (theta,), (tangent,))
    return [-m for m in mixed]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def plot(result: dict, path: Path) -> None:
    """Median time per method with interquartile bars; says so and returns if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: plot skipped")
        return
    times, cfg = result["times"], result["config"]
    names = list(times)
    med = [1e3 * statistics.median(times[n]) for n in names]
    quart = [statistics.quantiles([1e3 * t for t in times[n]], n=4) if len(times[n]) > 1 else [m, m, m]
             for n, m in zip(names, med)]  # one repeat: no interquartile range to draw
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.barh(names, med, xerr=[[m - q[0] for m, q in zip(med, quart)], [q[2] - m for m, q in zip(med, quart)]],
            color=[{"step": "tab:blue", "step_autograd": "tab:cyan", "reference": "tab:orange"}.get(n, "tab:gray")
                   for n in names], capsize=3)
    ax.invert_yaxis()
    ax.set_xlabel(f"ms per hypergradient (median, IQR; {result['clock']})")
    threads = f", {result['machine']['threads']} threads" if cfg["device"] == "cpu" else ""
    ax.set_title(f"{cfg['model']} ({result['params']:,} params), batch {cfg['batch']}, Nyström k={cfg['rank']}\n{result['machine']['device']}{threads}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.nystrom_overhead", description=__doc__.split("\n\n")[0],
                                     formatter_class=common.HelpFormatter)
    parser.add_argument("--out", default="runs/nystrom_overhead", help="output directory (JSON + PNG)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--model", choices=("lenet", *speed_memory.MODELS[1:]), default="lenet",
                        help="lenet: per-weight decay (Lorraine et al.); wrn, wrn16, mlp: data reweighting "
                             "with a Meta-Weight-Net (benchmarks.speed_memory)")
    parser.add_argument("--width", type=int, default=1, help="WRN widening factor, or the MLP's hidden width")
    parser.add_argument("--batch", type=int, default=128, help="examples per loss evaluation")
    parser.add_argument("--rank", type=int, default=10, help="Nyström rank k")
    parser.add_argument("--rho", type=float, default=0.01, help="Nyström damping ρ")
    parser.add_argument("--repeats", type=int, default=20, help="timed repetitions per method")
    parser.add_argument("--warmup", type=int, default=3, help="untimed repetitions per method first")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--clock", choices=("process", "wall"), default=None,
                        help="CPU time of this process (default on CPU: steady on a shared machine) or wall time "
                             "(default on CUDA)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    clock = {"process": time.process_time, "wall": time.perf_counter}[
        args.clock or ("wall" if device.type == "cuda" else "process")]

    if args.model == "lenet":
        model, hparams, train_loss, val_loss, data = build(args.batch, args.device)
    else:
        problem = speed_memory.build_problem(args.model, args.batch, args.width, device, 0)
        model, hparams, train_loss, val_loss = problem.model, problem.hparams, problem.train_loss, problem.val_loss
    hopt = HyperOptimizer(hparams, base=torch.optim.Adam, ihvp=Nystrom(args.rank, args.rho), lr=0.0)
    hopt_autograd = HyperOptimizer(hparams, base=torch.optim.Adam, ihvp=Nystrom(args.rank, args.rho), lr=0.0,
                                   engine="autograd")
    generator = torch.Generator().manual_seed(0)

    fns = {
        "step": lambda: hopt.step(train_loss, val_loss, model),
        "step_autograd": lambda: hopt_autograd.step(train_loss, val_loss, model),
    }
    for engine in ("func", "autograd"):
        probe, _ = training_hvp(train_loss, model, [q for q in model.parameters() if q.requires_grad], engine)
        strategies = probe.candidates(args.rank)
        del probe
        for strategy in strategies:
            fns[f"floor_{engine}:{strategy}"] = lambda e=engine, s=strategy: floor_fn(
                model, hparams, train_loss, val_loss, args.rank, e, s)
    fns["rollback_copies"] = lambda: (_BaseState(hopt.base, hopt.hparams), hopt._solver_state())
    fns["rollback_copies_before"] = lambda: (copy.deepcopy(hopt.base.state_dict()), hopt._solver_state(),
                                             hopt._solver_state(), [h.detach().clone() for h in hopt.hparams])
    agreement = None
    if args.model == "lenet":
        # Agreement check: same index set, so the two hypergradients must match.
        ours = hopt.hypergradient(train_loss, val_loss, model).grads
        hopt.solver.generator.manual_seed(0)
        ref = reference_fn(model, hparams, data, args.rank, args.rho, torch.Generator().manual_seed(0))
        agreement = ((flatten(ours, hparams) - flatten(ref, hparams)).norm() / flatten(ref, hparams).norm()).item()
        fns["reference"] = lambda: reference_fn(model, hparams, data, args.rank, args.rho, generator)

    times = common.time_interleaved(fns, device, args.warmup, args.repeats, clock=clock)
    median = {name: statistics.median(t) for name, t in times.items()}
    floors = {name: median[name] for name in median if name.startswith("floor_")}
    floor = min(floors, key=floors.get)
    info = hopt.hypergradient(train_loss, val_loss, model).info
    result = {
        "config": vars(args),
        "clock": "process_time" if clock is time.process_time else "perf_counter",
        "machine": {
            "device": torch.cuda.get_device_name() if device.type == "cuda" else cpu_name(),
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
        },
        "params": sum(p.numel() for p in model.parameters()),
        "median_seconds": median,
        "quartiles_seconds": {n: statistics.quantiles(t, n=4) for n, t in times.items() if len(t) > 1},
        "floor": floor,
        "step_engine": info.engine,
        "step_hvp_strategy": info.hvp_strategy,
        "step_over_floor": median["step"] / floors[floor],
        "step_over_reference": median["step"] / median["reference"] if "reference" in median else None,
        "relative_difference_to_reference": agreement,
        "times": times,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "overhead.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("params", "median_seconds", "floor", "step_engine", "step_hvp_strategy",
                                              "step_over_floor",
                                              "step_over_reference", "relative_difference_to_reference")}, indent=2))
    plot(result, out / "overhead.png")
    return result


if __name__ == "__main__":
    main()
