"""Time and peak memory of one hypergradient, per method and rank/iterations (the paper's Table 5).

Task: data reweighting as in the paper's Table 5.  The hyperparameters are a
Meta-Weight-Net (1 → 100 → 1, sigmoid output) that maps each training
example's loss to its weight; the training loss is the weighted mean of the
per-example cross-entropies, the validation loss the plain mean on another
batch.  Inputs are random (timing does not depend on the pixels).

Methods, each at l or k ∈ ``--ls``/``--ks`` (paper: 5, 10, 20):

* ``cg``: conjugate gradient, ``l`` iterations, no damping;
* ``minres``: MINRES, ``l`` iterations, no damping (one HVP each, as CG);
* ``normal_cg``: CG on the normal equations, ``l`` iterations, no damping (``1 + 2l`` HVPs);
* ``neumann``: Neumann series, ``l`` terms, α = 0.01 (paper);
* ``nystrom_time``: Nyström κ = k (Eq. 6), ρ = 0.01 (paper);
* ``nystrom_mid``: Nyström κ = ⌊k/2⌋ (Algorithm 1), where that differs from 1 and k;
* ``nystrom_space``: Nyström κ = 1 (Eq. 9);
* ``nystrom_gaussian``: Nyström κ = k with a Gaussian test matrix;
* ``nystrom_auto``: Nyström with ``chunk="auto"`` (the largest κ that fits the free memory; the κ
  chosen is recorded as ``chunk_used``).  Not in the default ``--methods``: on a CPU it picks κ = k;
* ``identity``: H⁻¹ ≈ I (one point);
* ``unrolled``: reverse-mode through T = l SGD steps (lr 0.1), full back-propagation;
* ``unrolled_truncated``: T = max(l) steps, back-propagating through the last min(l).

Usage::

    python -m benchmarks.speed_memory --out results/speed            # LeNet, CPU-sized
    python -m benchmarks.speed_memory --model wrn --full --device cuda --out results/wrn

Timing: warm-up, then interleaved repeats, median (:mod:`benchmarks.common`).
Memory: CUDA max-allocated, or on CPU the peak RSS of one call in a child
process per configuration.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hyperopt_torch import ConjugateGradient, Identity, Minres, Neumann, NormalCG, Nystrom, implicit_hypergradient
from hyperopt_torch.unrolled import InnerSGD, unrolled_hypergradient
from recipes.models import LeNet
from recipes.wideresnet import WideResNet, wrn28

from . import common

# Hataya & Yamada (2023), Table 5: WRN-28-2 on an A100, seconds and peak GB per l or k.
PAPER_WRN28_2 = {
    "cg": {"seconds": {5: 0.44, 10: 0.83, 20: 1.68}, "gb": {5: 2.46, 10: 2.46, 20: 2.46}},
    "neumann": {"seconds": {5: 0.40, 10: 0.75, 20: 1.48}, "gb": {5: 2.39, 10: 2.39, 20: 2.39}},
    "nystrom_time": {"seconds": {5: 0.24, 10: 0.33, 20: 0.54}, "gb": {5: 4.66, 10: 8.15, 20: 15.1}},
    "nystrom_space": {"seconds": {5: 3.11, 10: 10.7, 20: 41.0}, "gb": {5: 1.94, 10: 1.94, 20: 1.94}},
}
FAMILIES = ("cg", "minres", "normal_cg", "neumann", "nystrom_time", "nystrom_mid", "nystrom_space", "nystrom_gaussian",
            "identity", "unrolled", "unrolled_truncated", "nystrom_auto")
DEFAULT_FAMILIES = FAMILIES[:-1]
RHO, ALPHA, INNER_LR = 0.01, 0.01, 0.1


@dataclass
class Problem:
    model: nn.Module
    hparams: list[Tensor]
    train_loss: Callable[[nn.Module], Tensor]
    val_loss: Callable[[nn.Module], Tensor]


MODELS = ("lenet", "wrn", "wrn16", "mlp")


def build_problem(model_name: str, batch: int, width: int, device: torch.device, seed: int) -> Problem:
    """The data-reweighting problem on ``lenet`` (1×28×28), ``wrn`` (WRN-28-width, 3×32×32),
    ``wrn16`` (WRN-16-width, 3×32×32) or ``mlp`` (784-width-width-10 on flattened 1×28×28;
    width 1024 gives p = 1.86M)."""
    torch.manual_seed(seed)
    if model_name == "lenet":
        model, shape = LeNet(), (1, 28, 28)
    elif model_name == "wrn":
        model, shape = wrn28(width), (3, 32, 32)
    elif model_name == "wrn16":
        model, shape = WideResNet(16, width), (3, 32, 32)
    elif model_name == "mlp":
        model = nn.Sequential(nn.Flatten(), nn.Linear(784, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                              nn.Linear(width, 10))
        shape = (1, 28, 28)
    else:
        raise ValueError(f"Invalid model: {model_name!r} (expected one of {MODELS})")
    model = model.to(device).train()
    x, xv = torch.randn(batch, *shape, device=device), torch.randn(batch, *shape, device=device)
    y, yv = torch.randint(0, 10, (batch,), device=device), torch.randint(0, 10, (batch,), device=device)
    hidden = 100
    hparams = [
        (0.1 * torch.randn(hidden, 1, device=device)).requires_grad_(),
        torch.zeros(hidden, device=device, requires_grad=True),
        (0.1 * torch.randn(1, hidden, device=device)).requires_grad_(),
        torch.zeros(1, device=device, requires_grad=True),
    ]
    W1, b1, W2, b2 = hparams

    def train_loss(m: nn.Module) -> Tensor:
        losses = F.cross_entropy(m(x), y, reduction="none")
        weights = torch.sigmoid(F.linear(torch.relu(F.linear(losses.detach()[:, None], W1, b1)), W2, b2))[:, 0]
        return (weights * losses).mean()

    def val_loss(m: nn.Module) -> Tensor:
        return F.cross_entropy(m(xv), yv)

    return Problem(model, hparams, train_loss, val_loss)


def method_configs(ls: list[int], ks: list[int], families: tuple[str, ...]) -> list[dict]:
    """One dict per configuration: ``family``, ``param`` (l, k or T), ``kappa`` / ``truncate`` and ``label``."""
    cfgs = []
    for l in ls:
        cfgs.append({"family": "cg", "param": l, "label": f"CG l={l}"})
        cfgs.append({"family": "minres", "param": l, "label": f"MINRES l={l}"})
        cfgs.append({"family": "normal_cg", "param": l, "label": f"normal-CG l={l}"})
        cfgs.append({"family": "neumann", "param": l, "label": f"Neumann l={l}"})
        cfgs.append({"family": "unrolled", "param": l, "label": f"Unrolled T={l}"})
    for k in ks:
        cfgs.append({"family": "nystrom_time", "param": k, "kappa": k, "label": f"Nyström k={k} κ=k"})
        if 1 < k // 2 < k:
            cfgs.append({"family": "nystrom_mid", "param": k, "kappa": k // 2, "label": f"Nyström k={k} κ={k // 2}"})
        cfgs.append({"family": "nystrom_space", "param": k, "kappa": 1, "label": f"Nyström k={k} κ=1"})
        cfgs.append({"family": "nystrom_gaussian", "param": k, "kappa": k, "label": f"Nyström-Gauss k={k}"})
        cfgs.append({"family": "nystrom_auto", "param": k, "kappa": "auto", "label": f"Nyström k={k} κ=auto"})
    cfgs.append({"family": "identity", "param": 0, "label": "Identity"})
    if max(ls) > min(ls):
        cfgs.append({"family": "unrolled_truncated", "param": max(ls), "truncate": min(ls),
                     "label": f"Unrolled T={max(ls)} K={min(ls)}"})
    return [c for c in cfgs if c["family"] in families]


def make_call(cfg: dict, problem: Problem, seed: int) -> Callable[[], int]:
    """A closure computing one hypergradient for ``cfg``; it returns the HVPs used."""
    family, param = cfg["family"], cfg["param"]
    args = (problem.hparams, problem.train_loss, problem.val_loss, problem.model)
    if family.startswith("unrolled"):
        opt = InnerSGD(lr=INNER_LR)

        def call() -> int:
            unrolled_hypergradient(*args, opt, steps=param, truncate=cfg.get("truncate"))
            return cfg.get("truncate", param)  # one HVP per back-propagated step

        return call
    solver = {
        "cg": lambda: ConjugateGradient(iters=param),
        "minres": lambda: Minres(iters=param),
        "normal_cg": lambda: NormalCG(iters=param),
        "neumann": lambda: Neumann(iters=param, alpha=ALPHA),
        "identity": Identity,
        "nystrom_gaussian": lambda: Nystrom(rank=param, rho=RHO, chunk=None, sketch="gaussian"),
    }.get(family, lambda: Nystrom(rank=param, rho=RHO, chunk=cfg["kappa"]))()
    generator = torch.Generator().manual_seed(seed)

    def call() -> int:
        info = implicit_hypergradient(*args, ihvp=solver, generator=generator).info
        call.chunk = info.chunk  # the κ used: what chunk="auto" chose
        return info.hvps

    return call


def add_flags(p) -> None:
    p.add_argument("--model", choices=MODELS, default="lenet",
                   help="LeNet on 1x28x28, WRN-28-width or WRN-16-width on 3x32x32, or the MLP 784-1024-1024-10")
    p.add_argument("--width", type=int, default=2, help="WRN widening factor (paper: 2), or the MLP's hidden width")
    p.add_argument("--batch", type=int, default=None, help="examples per batch (default 128)")
    p.add_argument("--ls", type=int, nargs="+", default=[5, 10, 20],
                   help="CG/MINRES/normal-CG/Neumann iterations and unrolled steps")
    p.add_argument("--ks", type=int, nargs="+", default=[5, 10, 20], help="Nyström ranks")
    p.add_argument("--methods", default=",".join(DEFAULT_FAMILIES), help=f"comma-separated subset of {','.join(FAMILIES)}")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per method (default 2, --full 10)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per method (default 5, --full 10)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)


def _run_child(spec: dict) -> None:
    """Child process of the CPU memory measurement: one configuration, one call."""
    common.apply_threads(spec["threads"])
    problem = build_problem(spec["model"], spec["batch"], spec["width"], torch.device("cpu"), spec["seed"])
    call = make_call(spec["cfg"], problem, spec["seed"])
    params = [q for q in problem.model.parameters() if q.requires_grad]

    def forward_backward() -> None:
        torch.autograd.grad(problem.train_loss(problem.model), params)
        # torch.func's first use costs ~80 MB of resident memory once per process
        # (its transforms and their scripted helpers): a one-time cost like the
        # autograd engine's, so it belongs in the baseline, not in one method.
        x = torch.ones(2, 3)
        _, vjp_fn = torch.func.vjp(torch.func.grad_and_value(lambda v: (v.sin() ** 2).sum()), x[0])
        torch.func.vmap(vjp_fn)((x, torch.zeros(2)))
        # One call of the method itself, so the peak is that of a steady-state step: the first
        # step of a model layout also times the HVP batching strategies (hyperopt_torch.hvp).
        call()

    common.child_peak_rss(call, warmup=forward_backward)


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__.splitlines()[0], "benchmarks.speed_memory", full=True)
    add_flags(p)
    args = p.parse_args(argv)
    if args.child is not None:
        _run_child(json.loads(args.child))
        return {}
    common.apply_threads(args.threads)
    device = common.resolve_device(args.device)
    batch = args.batch or 128
    warmup = args.warmup if args.warmup is not None else (10 if args.full else 2)
    repeats = args.repeats if args.repeats is not None else (10 if args.full else 5)
    families = tuple(f for f in args.methods.split(",") if f)
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        p.error(f"unknown --methods {','.join(unknown)} (expected a subset of {','.join(FAMILIES)})")
    cfgs = method_configs(args.ls, args.ks, families)
    problem = build_problem(args.model, batch, args.width, device, args.seed)
    calls = {c["label"]: make_call(c, problem, args.seed) for c in cfgs}
    hvps = {label: call() for label, call in calls.items()}
    print(f"{args.model}: {sum(q.numel() for q in problem.model.parameters())} parameters, batch {batch}, "
          f"{len(cfgs)} configurations, {warmup} warm-up + {repeats} interleaved repeats on {device}")
    times = common.time_interleaved(calls, device, warmup, repeats)

    results = []
    for cfg in cfgs:
        row = {**cfg, "hvps": hvps[cfg["label"]], "chunk_used": getattr(calls[cfg["label"]], "chunk", None),
               **common.summarise(times[cfg["label"]])}
        if not args.no_memory:
            if device.type == "cuda":
                row.update(common.cuda_peak_memory(calls[cfg["label"]], device))
            else:
                spec = {"model": args.model, "batch": batch, "width": args.width, "seed": args.seed,
                        "threads": args.threads, "cfg": cfg}
                row.update(common.cpu_peak_memory("benchmarks.speed_memory", ["--child", json.dumps(spec)]))
            row["extra_bytes"] = row["peak_bytes"] - row["baseline_bytes"]
        results.append(row)
    _add_paper_ratios(results)
    data = {
        "benchmark": "speed_memory",
        "model": {"wrn": f"wrn-28-{args.width}", "wrn16": f"wrn-16-{args.width}",
                  "mlp": f"mlp-784-{args.width}-{args.width}-10"}.get(args.model, args.model),
        "parameters": sum(q.numel() for q in problem.model.parameters()),
        "batch": batch,
        "warmup": warmup,
        "repeats": repeats,
        "memory": None if args.no_memory else ("cuda max_memory_allocated" if device.type == "cuda" else "child-process peak RSS"),
        "machine": common.machine(device),
        "results": results,
        "paper_wrn28_2_a100": PAPER_WRN28_2,
    }
    name = f"speed_memory_{args.model}"
    common.write_results(args.out, name, data)
    print(markdown_table(data))
    common.save_figure(args.out / f"{name}.png", lambda fig: _plot(fig, data), figsize=(11.0, 4.2))
    return data


def _add_paper_ratios(results: list[dict]) -> None:
    """Time and memory relative to CG with the smallest l, ours and the paper's (where it has the entry)."""
    ref = next((r for r in results if r["family"] == "cg"), None)
    if ref is None:
        return
    for r in results:
        r["time_ratio"] = r["seconds_median"] / ref["seconds_median"]
        if "peak_bytes" in r:
            r["memory_ratio"] = r["extra_bytes"] / ref["extra_bytes"]
        paper = PAPER_WRN28_2.get(r["family"])
        if paper and r["param"] in paper["seconds"] and ref["param"] in PAPER_WRN28_2["cg"]["seconds"]:
            r["paper_time_ratio"] = paper["seconds"][r["param"]] / PAPER_WRN28_2["cg"]["seconds"][ref["param"]]
            r["paper_memory_ratio"] = paper["gb"][r["param"]] / PAPER_WRN28_2["cg"]["gb"][ref["param"]]


def markdown_table(data: dict) -> str:
    """The results as a Markdown table: seconds, peak GB, the peak above what was allocated before
    the call (model, data: "extra"), and ratios of time and extra memory to CG with the smallest l."""
    mem = data["memory"] is not None
    head = "| method | HVPs | median s | ratio to CG | paper ratio |" + (" peak GB | extra GB | ratio to CG | paper ratio |" if mem else "")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in data["results"]:
        label = r["label"] + (f" (chose κ={r['chunk_used']})" if r["family"] == "nystrom_auto" else "")
        cells = [label, str(r["hvps"]), f"{r['seconds_median']:.3g}", _fmt(r.get("time_ratio")), _fmt(r.get("paper_time_ratio"))]
        if mem:
            cells += [f"{r['peak_bytes'] / 1e9:.3g}", f"{r['extra_bytes'] / 1e9:.3g}", _fmt(r.get("memory_ratio")), _fmt(r.get("paper_memory_ratio"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}"


def _plot(fig, data: dict) -> None:
    mem = data["memory"] is not None
    axes = fig.subplots(1, 2 if mem else 1, squeeze=False)[0]
    styles = {"cg": "o-", "minres": "o--", "normal_cg": "o:", "neumann": "s-", "nystrom_time": "^-", "nystrom_mid": "v-",
              "nystrom_space": "D-", "nystrom_gaussian": "x--", "nystrom_auto": "*:", "unrolled": "P-"}
    names = {"cg": "CG (l)", "minres": "MINRES (l)", "normal_cg": "normal-CG (l; 1 + 2l HVPs)", "neumann": "Neumann (l)",
             "nystrom_time": "Nyström κ=k", "nystrom_mid": "Nyström κ=⌊k/2⌋", "nystrom_space": "Nyström κ=1",
             "nystrom_gaussian": "Nyström Gaussian κ=k", "nystrom_auto": "Nyström κ=auto", "unrolled": "unrolled (T=l)"}
    panels = [("seconds_median", "seconds per hypergradient (median)", 1.0)]
    if mem:
        panels.append(("extra_bytes", "peak memory above model + data (GB)", 1e-9))
    for ax, (key, ylabel, scale) in zip(axes, panels):
        for family, style in styles.items():
            rows = [r for r in data["results"] if r["family"] == family]
            if rows:
                ax.plot([r["param"] for r in rows], [r[key] * scale for r in rows], style, label=names[family])
        for r in data["results"]:
            if r["family"] in ("identity", "unrolled_truncated"):
                ax.axhline(r[key] * scale, ls=":", color="gray" if r["family"] == "identity" else "purple", lw=1)
                ax.annotate(r["label"], (ax.get_xlim()[0], r[key] * scale), fontsize=7, va="bottom")
        ax.set_yscale("log")
        ax.set_xlabel("l (CG, MINRES, normal-CG, Neumann), k (Nyström), T (unrolled)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    machine = data["machine"]
    fig.suptitle(f"{data['model']} ({data['parameters']:,} params, batch {data['batch']}) on "
                 f"{machine.get('device_name', machine['device'])}, memory: {data['memory']}", fontsize=9)


if __name__ == "__main__":
    main()
