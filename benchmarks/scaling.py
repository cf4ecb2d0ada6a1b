"""How a hypergradient's time grows with the rank k and with the parameter count p.

Two curves on the data-reweighting task of :mod:`benchmarks.speed_memory`,
Nyström κ = k (ρ = 0.01) against CG with l = k iterations (the same number of
HVPs):

* in k: LeNet (p = 44k), k = l ∈ ``--ks``;
* in p: the MLP 784-w-w-10 for w ∈ ``--widths`` (p = 0.2M … 1.86M at
  w = 1024), k = l = ``--rank``.

Each configuration is timed interleaved with the others of its curve, after
a warm-up (which also runs the first step's HVP-strategy measurement), median
and interquartile range of ``--repeats``; CPU time of the process by default
on a CPU.  On a GPU the k HVPs of a batched backward run in parallel, which
makes the paper's time nearly flat in k; on a CPU thread they cost about k
single products, so the time grows about linearly in k there.

    python -m benchmarks.scaling --threads 1 --repeats 7 --out results/scaling
"""

from __future__ import annotations

import statistics
import time

import torch

from hyperopt_torch import ConjugateGradient, Nystrom, implicit_hypergradient

from . import common, speed_memory


def _calls(problem, k: int, seed: int) -> dict:
    args = (problem.hparams, problem.train_loss, problem.val_loss, problem.model)
    nystrom, cg = Nystrom(rank=k, rho=speed_memory.RHO), ConjugateGradient(iters=k)
    generator = torch.Generator().manual_seed(seed)
    return {
        "nystrom": lambda: implicit_hypergradient(*args, ihvp=nystrom, generator=generator),
        "cg": lambda: implicit_hypergradient(*args, ihvp=cg),
    }


def _curve(configs: list[tuple[str, int, object, int]], device, warmup: int, repeats: int, clock, seed: int) -> list[dict]:
    """``configs``: (axis label, axis value, problem, k); returns one row per configuration and method."""
    fns, meta = {}, {}
    for label, value, problem, k in configs:
        for method, fn in _calls(problem, k, seed).items():
            name = f"{method} {label}={value}"
            fns[name] = fn
            meta[name] = {"method": method, label: value, "k": k,
                          "p": sum(q.numel() for q in problem.model.parameters())}
    times = common.time_interleaved(fns, device, warmup, repeats, clock=clock)
    rows = []
    for name, seconds in times.items():
        q = statistics.quantiles(seconds, n=4) if len(seconds) > 1 else [seconds[0]] * 3
        rows.append({**meta[name], "seconds_median": statistics.median(seconds), "seconds_q1": q[0],
                     "seconds_q3": q[2], "seconds_all": seconds})
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__.splitlines()[0], "benchmarks.scaling")
    p.add_argument("--ks", type=int, nargs="+", default=[5, 10, 20, 40], help="ranks k (= CG iterations) on LeNet")
    p.add_argument("--widths", type=int, nargs="+", default=[128, 256, 512, 1024], help="MLP hidden widths")
    p.add_argument("--rank", type=int, default=10, help="k (= CG iterations) on the MLP curve")
    p.add_argument("--batch", type=int, default=128, help="examples per loss evaluation")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per configuration first")
    p.add_argument("--repeats", type=int, default=7, help="interleaved timed calls per configuration (median reported)")
    p.add_argument("--clock", choices=("process", "wall"), default=None,
                   help="CPU time of the process (default on CPU) or wall time (default on CUDA)")
    args = p.parse_args(argv)
    common.apply_threads(args.threads)
    device = common.resolve_device(args.device)
    clock = {"process": time.process_time, "wall": time.perf_counter}[
        args.clock or ("wall" if device.type == "cuda" else "process")]
    lenet = speed_memory.build_problem("lenet", args.batch, 1, device, args.seed)
    in_k = _curve([("k", k, lenet, k) for k in args.ks], device, args.warmup, args.repeats, clock, args.seed)
    mlps = [("width", w, speed_memory.build_problem("mlp", args.batch, w, device, args.seed), args.rank)
            for w in args.widths]
    in_p = _curve(mlps, device, args.warmup, args.repeats, clock, args.seed)
    data = {
        "benchmark": "scaling",
        "clock": "process_time" if clock is time.process_time else "perf_counter",
        "batch": args.batch,
        "repeats": args.repeats,
        "machine": common.machine(device),
        "in_k": in_k,
        "in_p": in_p,
    }
    common.write_results(args.out, "scaling", data)
    print(markdown_tables(data))
    common.save_figure(args.out / "scaling.png", lambda fig: _plot(fig, data), figsize=(9.0, 3.6))
    return data


def markdown_tables(data: dict) -> str:
    """Median ms (IQR) per method, with each time relative to the curve's first point of the same method."""
    out = []
    for curve, axis in (("in_k", "k"), ("in_p", "p")):
        rows = data[curve]
        first = {}
        lines = [f"| {axis} | method | median ms (IQR) | × first point |", "|---|---|---|---|"]
        for r in sorted(rows, key=lambda r: (r["method"], r[axis])):
            first.setdefault(r["method"], r["seconds_median"])
            lines.append(f"| {r[axis]:,} | {r['method']} | {1e3 * r['seconds_median']:.1f} "
                         f"({1e3 * r['seconds_q1']:.1f}–{1e3 * r['seconds_q3']:.1f}) | "
                         f"{r['seconds_median'] / first[r['method']]:.2f} |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def _plot(fig, data: dict) -> None:
    axes = fig.subplots(1, 2)
    for ax, (curve, axis, title) in zip(axes, (("in_k", "k", "LeNet: time in k (= l)"),
                                               ("in_p", "p", "MLP 784-w-w-10: time in p"))):
        for method, style in (("nystrom", "^-"), ("cg", "o-")):
            rows = sorted((r for r in data[curve] if r["method"] == method), key=lambda r: r[axis])
            ax.errorbar([r[axis] for r in rows], [r["seconds_median"] for r in rows],
                        yerr=[[r["seconds_median"] - r["seconds_q1"] for r in rows],
                              [r["seconds_q3"] - r["seconds_median"] for r in rows]],
                        fmt=style, capsize=3, label="Nyström κ=k" if method == "nystrom" else "CG (l = k)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(axis)
        ax.set_ylabel(f"seconds per hypergradient ({data['clock']})")
        ax.set_title(title, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    m = data["machine"]
    fig.suptitle(f"{m['processor']}, {m['torch_threads']} thread(s), batch {data['batch']}", fontsize=8)


if __name__ == "__main__":
    main()
