"""How much does a Nyström hypergradient step cost beyond the work it cannot avoid?

On LeNet with a batch of 128 MNIST-sized images and one weight decay per
weight (Lorraine et al.'s setting: as many hyperparameters as parameters),
three things are timed, interleaved, after a warm-up, median over repeats:

* ``step``: ``HyperOptimizer.step`` with ``Nystrom(rank=k, rho=0.01)`` — the
  whole library path: both losses, the gradient graph, k HVPs in one batched
  backward, the float64 small solve, the mixed-partial VJP, the finiteness
  check and the Adam update.  ``step_autograd`` is the same with
  ``engine="autograd"`` (``is_grads_batched`` instead of torch.func).
* ``floor``: only the unavoidable autograd work, done by hand — the
  validation gradient, the training gradient with its graph, one batched
  backward for k Hessian-vector products, and the mixed-partial VJP.
* ``reference``: the same hypergradient computed the way the paper's
  reference code does it: torch.func ``grad`` of the outer loss, k Hessian
  rows as ``jacrev`` of the inner gradient gathered at the k indices (vmap),
  the literal Eq. 6 solved by LU (``torch.linalg.solve``), and the mixed term
  as a forward-over-reverse ``jvp``.

The target (issue 2): ``step / floor ≤ 1.2`` and ``step < reference``.
Writes ``overhead.json`` and ``overhead.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
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
from hyperopt_torch.ihvp import sample_columns
from hyperopt_torch.hvp import flatten, training_hvp, unflatten
from recipes.models import LeNet

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


def floor_fn(model, log_decay, train_loss, val_loss, k):
    """The unavoidable autograd work of one Nyström hypergradient."""
    params = list(model.parameters())
    gv = torch.autograd.grad(val_loss(model), params)
    hvp, _ = training_hvp(train_loss, model, params)
    b = flatten(gv, params)
    V = torch.zeros(k, b.numel(), device=b.device, dtype=b.dtype)
    V[torch.arange(k), torch.arange(k)] = 1
    hvp(V)
    return hvp.mixed(b, log_decay)


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


def time_interleaved(fns: dict, repeats: int, warmup: int, device: str) -> dict:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


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
            color=["tab:blue", "tab:cyan", "tab:gray", "tab:orange"][: len(names)], capsize=3)
    ax.invert_yaxis()
    ax.set_xlabel("ms per hypergradient (median, IQR)")
    threads = f", {result['machine']['threads']} threads" if cfg["device"] == "cpu" else ""
    ax.set_title(f"LeNet, batch {cfg['batch']}, Nyström k={cfg['rank']}\n{result['machine']['device']}{threads}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.nystrom_overhead", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/nystrom_overhead", help="output directory (JSON + PNG)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=128, help="images per loss evaluation")
    parser.add_argument("--rank", type=int, default=10, help="Nyström rank k")
    parser.add_argument("--rho", type=float, default=0.01, help="Nyström damping ρ")
    parser.add_argument("--repeats", type=int, default=20, help="timed repetitions per method")
    parser.add_argument("--warmup", type=int, default=3, help="untimed repetitions per method first")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, log_decay, train_loss, val_loss, data = build(args.batch, args.device)
    hopt = HyperOptimizer(log_decay, base=torch.optim.Adam, ihvp=Nystrom(args.rank, args.rho), lr=0.0)
    hopt_autograd = HyperOptimizer(log_decay, base=torch.optim.Adam, ihvp=Nystrom(args.rank, args.rho), lr=0.0,
                                   engine="autograd")
    generator = torch.Generator().manual_seed(0)

    # Agreement check: same index set, so the two hypergradients must match.
    ours = hopt.hypergradient(train_loss, val_loss, model).grads
    hopt.solver.generator.manual_seed(0)
    ref = reference_fn(model, log_decay, data, args.rank, args.rho, torch.Generator().manual_seed(0))
    agreement = (flatten(ours, log_decay) - flatten(ref, log_decay)).norm() / flatten(ref, log_decay).norm()

    times = time_interleaved(
        {
            "step": lambda: hopt.step(train_loss, val_loss, model),
            "step_autograd": lambda: hopt_autograd.step(train_loss, val_loss, model),
            "floor": lambda: floor_fn(model, log_decay, train_loss, val_loss, args.rank),
            "reference": lambda: reference_fn(model, log_decay, data, args.rank, args.rho, generator),
        },
        args.repeats,
        args.warmup,
        args.device,
    )
    median = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "config": vars(args),
        "machine": {
            "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu_name(),
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
        },
        "params": sum(p.numel() for p in model.parameters()),
        "median_seconds": median,
        "step_over_floor": median["step"] / median["floor"],
        "step_over_reference": median["step"] / median["reference"],
        "relative_difference_to_reference": agreement.item(),
        "times": times,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "overhead.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("median_seconds", "step_over_floor", "step_over_reference",
                                              "relative_difference_to_reference")}, indent=2))
    plot(result, out / "overhead.png")
    return result


if __name__ == "__main__":
    main()
