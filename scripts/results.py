"""The numbers and plots of docs/results.md, from the run folders the commands there write.

    python -m scripts.results --runs runs

reads ``<runs>/<folder>/metrics.json`` (and ``config.json``) of every run in
:data:`TABLES`, and the ``/usr/bin/time -v`` log of each run in
``<runs>/logs/*_<folder>.log`` for its CPU time (user + system).  It writes one
summary per recipe to ``docs/results/results_<recipe>.json``, the plots to
``docs/img/results_*.png``, and the markdown tables into docs/results.md, between the lines
``<!-- results:<recipe> -->`` and ``<!-- /results:<recipe> -->`` (and prints them).
Seeds are found by globbing ``<folder>_s<seed>``; a table reports what it finds
and says how many seeds that was.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
T975 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306, 10: 2.262}
SOLVERS = ("nystrom", "cg", "neumann")
COLORS = {"baseline": "tab:gray", "nystrom": "tab:blue", "cg": "tab:orange", "neumann": "tab:green",
          "identity": "tab:red", "no meta-learning": "tab:gray", "clean": "black", "ceiling": "tab:purple"}

# iMAML: Table 3 of the paper is Omniglot 5-way 1-shot after 1.6e6 tasks.
IMAML = {"datasets": {"mnist": "MNIST", "fmnist": "Fashion-MNIST"},
         "paper_omniglot_1shot": {"nystrom": 0.95, "cg": 0.96, "neumann": 0.91}}
# Distillation: Table 2 of the paper (MNIST, 5,000 outer steps, mean ± std).
DISTILLATION = {"paper": {"cg": (0.17, 0.04), "neumann": (0.47, 0.03), "nystrom": (0.49, 0.04)}, "paper_steps": 5000}
# Reweighting: per setting, its rows as (label, method, run-folder prefix); seeds are <prefix>_s<seed>.
def _rows(key: str, clean: str, extra: str | None = None) -> list[tuple[str, str, str]]:
    rows = [("baseline (no reweighting)", "baseline", f"rw_{key}_baseline")]
    rows += [(m, m, f"rw_{key}_{m}") for m in SOLVERS]
    rows += [("identity (H⁻¹ ≈ I: first order)", "identity", f"rw_{key}_identity")]
    if extra:
        rows += [(f"{m}, weights / Σ weights", m, f"rw_{extra}_{m}") for m in SOLVERS]
    return rows + [("reference: 120 clean images only", "clean", f"rw_{clean}120"),
                   ("ceiling: the 20,000 images with clean labels", "ceiling", f"rw_{clean}20k")]


REWEIGHTING = {
    "mnist_u60": {"title": "MNIST, 60 % uniform label noise", "rows": _rows("mnist_u60", "mnist_clean")},
    "fmnist_u60": {"title": "Fashion-MNIST, 60 % uniform label noise",
                   "rows": _rows("fmnist_u60", "fmnist_clean")},
    "fmnist_f40": {"title": "Fashion-MNIST, 40 % flip noise (c → c+1)",
                   "rows": _rows("fmnist_f40", "fmnist_clean", extra="fmnist_f40sum")},
}


# -- reading runs --------------------------------------------------------------------------------
def seeds_of(runs: Path, prefix: str) -> dict[int, Path]:
    """``{seed: folder}`` for the finished runs ``<runs>/<prefix>_s<seed>`` (those with a metrics.json)."""
    found = {}
    for folder in runs.glob(f"{prefix}_s*"):
        match = re.fullmatch(rf"{re.escape(prefix)}_s(\d+)", folder.name)
        if match and (folder / "metrics.json").exists():
            found[int(match.group(1))] = folder
    return dict(sorted(found.items()))


def metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def cpu_seconds(runs: Path, folder: Path) -> float | None:
    """User + system CPU seconds from the ``/usr/bin/time -v`` log of the run that wrote ``folder``."""
    logs = sorted((runs / "logs").glob(f"*_{folder.name}.log"))
    if not logs:
        return None
    text = logs[-1].read_text()
    times = [float(x) for x in re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)", text)]
    return sum(times) if len(times) == 2 else None


def command(folder: Path, seed: int) -> str:
    """The recorded command line of a run, with its seed written as ``$SEED`` (in ``--seed`` and the folder)."""
    config = json.loads((folder / "config.json").read_text())
    program, *args = config["command"].split()
    args = [a for a in args if a != "--overwrite"]  # a re-run into a used folder; a fresh one needs none
    args = [re.sub(rf"^{seed}$|_s{seed}$", lambda m: m.group(0).replace(str(seed), "$SEED"), a)
            if i and args[i - 1] in ("--seed", "--out") else a for i, a in enumerate(args)]
    # shown with the recipe's own folder layout, runs/<name>, wherever the run wrote (the folder changes nothing)
    args = [f"runs/{Path(a).name}" if i and args[i - 1] == "--out" else a for i, a in enumerate(args)]
    return " ".join(["python -m", "recipes." + program.removesuffix(".py"), *args])


def summary(values: list[float]) -> dict:
    """Mean, sample std and the half width of the 95 % t-interval of the mean over seeds."""
    n = len(values)
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if n > 1 else float("nan")
    half = T975.get(n, 1.96) * std / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": mean, "std": std, "ci95_seeds": half, "n": n, "values": values}


def fmt(s: dict, digits: int = 3, spread: str = "std") -> str:
    if s["n"] == 0:
        return "—"
    if s["n"] == 1:
        return f"{s['mean']:.{digits}f} (1 seed)"
    return f"{s['mean']:.{digits}f} ± {s[spread]:.{digits}f}"


def cpu_text(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    return f"{min(values):.0f}–{max(values):.0f}" if len(values) > 1 else f"{values[0]:.0f}"


# -- iMAML ---------------------------------------------------------------------------------------
def imaml(runs: Path) -> dict:
    out = {}
    for tag, name in IMAML["datasets"].items():
        found = seeds_of(runs, f"imaml_{tag}")
        if not found:
            continue
        rows = {}
        for method in ("baseline", *SOLVERS):
            accs, cis = [], []
            for folder in found.values():
                m = metrics(folder)
                acc = m["baseline"] if method == "baseline" else m["methods"][method]["final"]["test_acc"]
                accs.append(acc["mean"])
                cis.append(acc["ci95"])
            rows[method] = {**summary(accs), "task_ci95_per_seed": cis}
        any_seed, folder = next(iter(found.items()))
        out[tag] = {"dataset": name, "seeds": list(found), "rows": rows,
                    "tasks_per_seed": metrics(folder)["baseline"]["tasks"],
                    "cpu_seconds_per_seed": [cpu_seconds(runs, f) for f in found.values()],
                    "command": command(folder, any_seed)}
    return out


def imaml_table(result: dict) -> str:
    lines = []
    for tag, r in result.items():
        lines += [f"**{r['dataset']}** ({len(r['seeds'])} seeds: {', '.join(map(str, r['seeds']))}; "
                  f"{r['tasks_per_seed']} test tasks per seed; CPU s per seed, all four rows: "
                  f"{cpu_text(r['cpu_seconds_per_seed'])})", "",
                  "| method | test accuracy, mean over seeds ± 95 % CI (t, seeds) | std over seeds | per seed | "
                  "paper, Omniglot 1-shot |", "|---|---|---|---|---|"]
        for method, row in r["rows"].items():
            label = "no meta-learning (reference)" if method == "baseline" else method
            paper = IMAML["paper_omniglot_1shot"].get(method)
            lines.append(f"| {label} | {fmt(row, spread='ci95_seeds')} | {row['std']:.3f} | "
                         + ", ".join(f"{v:.3f}" for v in row["values"])
                         + f" | {paper if paper is not None else '—'} |")
        lines += ["", f"`{r['command']}` (SEED = {', '.join(map(str, r['seeds']))})", ""]
    return "\n".join(lines)


def plot_imaml(path: Path, result: dict) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(result), 3.8), layout="constrained")
    axes = fig.subplots(1, len(result), squeeze=False)[0]
    for ax, r in zip(axes, result.values()):
        for i, (method, row) in enumerate(r["rows"].items()):
            color = COLORS[method]
            ax.scatter([i] * row["n"], row["values"], color=color, alpha=0.45, s=18, zorder=2)
            ax.errorbar(i, row["mean"], yerr=row["ci95_seeds"], fmt="o", color=color, capsize=6, markersize=8,
                        zorder=3)
            ax.annotate(f"{row['mean']:.3f}", (i + 0.12, row["mean"]), fontsize=8, va="center")
        ax.set_xticks(range(len(r["rows"])), ["no meta-\nlearning" if m == "baseline" else m for m in r["rows"]])
        ax.axhline(0.2, color="gray", linestyle=":", linewidth=1)
        ax.text(len(r["rows"]) - 0.5, 0.21, "chance (5-way)", fontsize=8, ha="right", color="gray")
        ax.set(ylim=(0, 1), xlim=(-0.5, len(r["rows"]) - 0.3), ylabel="meta-test accuracy",
               title=f"iMAML, {r['dataset']} 5-way 1-shot\n{len(r['seeds'])} seeds (dots); mean ± 95 % CI over seeds")
        ax.grid(alpha=0.3, axis="y")
    fig.savefig(path, dpi=110)


# -- distillation --------------------------------------------------------------------------------
def distillation(runs: Path) -> dict:
    out = {}
    for method in SOLVERS:
        found = seeds_of(runs, f"distill_{method}")
        if not found:
            continue
        ms = [metrics(f) for f in found.values()]
        steps = ms[0]["curves"]["eval_step"]
        curve = [summary([m["curves"]["test_acc"][i] for m in ms]) for i in range(len(steps))]
        cpu = [cpu_seconds(runs, f) for f in found.values()]
        out[method] = {"seeds": list(found), "outer_steps": ms[0]["outer_steps"],
                       "test_acc": summary([m["final"]["test_acc"] for m in ms]),
                       "test_acc_random_init": summary([m["final"]["test_acc_random_init"] for m in ms]),
                       "eval_step": steps, "test_acc_curve": curve,
                       "cpu_seconds": cpu,
                       "cpu_seconds_per_outer_step": [c / ms[0]["outer_steps"] for c in cpu if c is not None],
                       "hypergrad_seconds_mean": statistics.fmean(m["final"]["hypergrad_seconds_mean"] for m in ms),
                       "paper": DISTILLATION["paper"][method],
                       "command": command(next(iter(found.values())), next(iter(found)))}
    return out


def distillation_table(result: dict) -> str:
    if not result:
        return ""
    steps = next(iter(result.values()))["eval_step"]
    marks = [s for s in steps if s in (100, 300, 500)] + [steps[-1]]
    lines = ["| solver | seeds | test acc. (known init) at " + " / ".join(f"{s:,}" for s in marks)
             + " steps, mean ± std | random init | paper, 5,000 steps | CPU s per run (per outer step) |",
             "|---|---|---|---|---|---|"]
    for method, r in result.items():
        accs = " / ".join(fmt(r["test_acc_curve"][steps.index(s)]) for s in marks)
        per_step = r["cpu_seconds_per_outer_step"]
        spread = sorted({f"{min(per_step):.2f}", f"{max(per_step):.2f}"}) if per_step else []
        cpu = f"{cpu_text(r['cpu_seconds'])} ({'–'.join(spread)})" if per_step else "—"
        lines.append(f"| {method} | {len(r['seeds'])} | {accs} | {fmt(r['test_acc_random_init'])} | "
                     f"{r['paper'][0]:.2f} ± {r['paper'][1]:.2f} | {cpu} |")
    first = next(iter(result.values()))
    lines += ["", f"`{first['command']}` with `--ihvp {{nystrom,neumann,cg}}`, SEED = "
              + ", ".join(map(str, first["seeds"]))]
    return "\n".join(lines)


def plot_distillation(path: Path, result: dict) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10.5, 3.9), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=(1.6, 1))
    for method, r in result.items():
        mean = [c["mean"] for c in r["test_acc_curve"]]
        std = [0.0 if math.isnan(c["std"]) else c["std"] for c in r["test_acc_curve"]]
        left.plot(r["eval_step"], mean, marker="o", markersize=3, color=COLORS[method],
                  label=f"{method} ({len(r['seeds'])} seeds)")
        left.fill_between(r["eval_step"], [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                          color=COLORS[method], alpha=0.2)
    left.axhline(0.1, color="gray", linestyle=":", linewidth=1, label="chance")
    # One y range for both panels, from 0 to just above the paper's best: the curves' rise is visible
    # without a zoom that would make a few points look like a cliff.
    top = 0.1 * math.ceil(10 * max(0.5, *(r["paper"][0] + r["paper"][1] for r in result.values()),
                                   *(c["mean"] + c["std"] for r in result.values() for c in r["test_acc_curve"])))
    left.set(xlabel="outer step", ylabel="test accuracy (net trained on the 50 images)", ylim=(0, top),
             title="dataset distillation, MNIST: mean ± std over seeds")
    left.set_xticks(next(iter(result.values()))["eval_step"])
    left.legend(fontsize="small")
    names = list(result)
    ours = [result[m]["test_acc"] for m in names]
    budget = next(iter(result.values()))["outer_steps"]
    xs = range(len(names))
    right.bar([x - 0.2 for x in xs], [o["mean"] for o in ours], width=0.4, yerr=[o["std"] for o in ours], capsize=4,
              color=[COLORS[m] for m in names], label=f"ours, {budget:,} steps")
    right.bar([x + 0.2 for x in xs], [result[m]["paper"][0] for m in names], width=0.4,
              yerr=[result[m]["paper"][1] for m in names], capsize=4, color="white",
              edgecolor=[COLORS[m] for m in names], hatch="//", label="paper, 5,000 steps")
    right.set_xticks(list(xs), names)
    right.axhline(0.1, color="gray", linestyle=":", linewidth=1)
    right.set(ylim=(0, top), ylabel="final test accuracy (mean ± std)", title="ours vs paper Table 2")
    right.legend(fontsize="small")
    for ax in (left, right):
        ax.grid(alpha=0.3, axis="y")
    fig.savefig(path, dpi=110)


# -- reweighting ---------------------------------------------------------------------------------
def stat_curve(ms: list[dict], key: str) -> list[dict]:
    n = min(len(m["train_stats"]) for m in ms)
    return [summary([m["train_stats"][i][key] for m in ms]) for i in range(n)]


def reweighting(runs: Path) -> dict:
    out = {}
    for key, setting in REWEIGHTING.items():
        rows = {}
        for label, method, prefix in setting["rows"]:
            found = seeds_of(runs, prefix)
            if not found:
                continue
            ms = [metrics(f) for f in found.values()]
            steps = ms[0]["curves"]["eval_step"]
            inner = ms[0]["final"]["inner_steps"] // ms[0]["outer_steps"]
            row = {"method": method, "seeds": list(found), "test_acc": summary([m["final"]["test_acc"] for m in ms]),
                   "inner_step": [s * inner for s in steps],
                   "test_acc_curve": [summary([m["curves"]["test_acc"][i] for m in ms]) for i in range(len(steps))],
                   "label_noise_actual": statistics.fmean(m["final"]["label_noise_actual"] for m in ms),
                   "train_size": sum(ms[0]["final"]["train_counts"]), "meta_size": ms[0]["final"]["meta_size"],
                   "cpu_seconds": [cpu_seconds(runs, f) for f in found.values()],
                   "command": command(next(iter(found.values())), next(iter(found)))}
            if method not in ("clean", "ceiling"):
                for name in ("fit_noisy", "fit_clean", "loss_noisy", "loss_clean"):
                    row[name] = stat_curve(ms, name)
            if method in (*SOLVERS, "identity"):
                for name in ("weight_clean", "weight_noisy"):
                    row[name] = stat_curve(ms, name)
            rows[label] = row
        if rows:
            out[key] = {"title": setting["title"], "rows": rows}
    return out


def reweighting_table(result: dict) -> str:
    lines = []
    for key, r in result.items():
        rows = r["rows"]
        lines += [f"**{r['title']}**", "",
                  "| method | seeds | test acc., mean ± std | per seed | mean μ_φ, clean / corrupted labels, "
                  "at the end | corrupted labels fitted at the end | CPU s per run |", "|---|---|---|---|---|---|---|"]
        for label, row in rows.items():
            weights = (f"{row['weight_clean'][-1]['mean']:.2f} / {row['weight_noisy'][-1]['mean']:.2f}"
                       if "weight_clean" in row else "—")
            fitted = f"{row['fit_noisy'][-1]['mean']:.2f}" if "fit_noisy" in row else "—"
            lines.append(f"| {label} | {len(row['seeds'])} | {fmt(row['test_acc'])} | "
                         + ", ".join(f"{v:.3f}" for v in row["test_acc"]["values"])
                         + f" | {weights} | {fitted} | {cpu_text(row['cpu_seconds'])} |")
        lines += [""] + [f"- {label}: `{row['command']}`" for label, row in rows.items()] + [""]
    return "\n".join(lines)


def plot_reweighting(path: Path, r: dict) -> None:
    """Test accuracy, the weights μ_φ on clean vs corrupted training labels, and memorisation, per inner step."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    def band(ax, xs, curve, color, label, style="-"):
        mean = [c["mean"] for c in curve]
        std = [0.0 if math.isnan(c["std"]) else c["std"] for c in curve]
        xs = xs[:len(mean)]
        ax.plot(xs, mean, style, color=color, label=label, marker="o", markersize=2.5)
        ax.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], color=color,
                        alpha=0.15)

    rows = r["rows"]
    summed = [label for label in rows if "Σ" in label]
    fig = Figure(figsize=(12.0, 8.4) if summed else (15.0, 4.2), layout="constrained")
    axes = fig.subplots(2, 2).flatten() if summed else fig.subplots(1, 3)
    acc, weights, fitted = axes[0], axes[1], axes[-1]
    for label, row in rows.items():
        color = COLORS[row["method"]]
        style = "-." if label in summed else ("--" if row["method"] in ("clean", "ceiling") else "-")
        band(acc, row["inner_step"], row["test_acc_curve"], color, f"{label} ({len(row['seeds'])})", style)
        if "fit_noisy" in row:
            band(fitted, row["inner_step"], row["fit_noisy"], color, label, style)
        if "weight_clean" in row:
            ax = axes[2] if label in summed else weights
            band(ax, row["inner_step"], row["weight_clean"], color, f"{label}: clean")
            band(ax, row["inner_step"], row["weight_noisy"], color, f"{label}: corrupted", ":")
    acc.set(ylabel="test accuracy", ylim=(0, 1),
            title=f"{r['title']}\ntest accuracy, mean ± std over seeds (count)")
    weights.set(ylabel=r"mean $\mu_\phi(\ell_i)$ over the training samples", ylim=(0, 1),
                title="weights of clean (solid) and corrupted (dotted) labels")
    if summed:
        axes[2].set(ylabel=r"mean $\mu_\phi(\ell_i)$ over the training samples", ylim=(0, 1),
                    title="the same, weights / Σ weights")
    fitted.set(ylabel="share of corrupted labels predicted as labelled", ylim=(0, 1),
               title="memorisation of the corrupted labels")
    for ax in axes:
        ax.set_xlabel("inner SGD step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    fig.savefig(path, dpi=110)


# -- main ----------------------------------------------------------------------------------------
def fill(doc: Path, name: str, table: str) -> None:
    """Put ``table`` between the ``<!-- results:name -->`` and ``<!-- /results:name -->`` lines of ``doc``."""
    text = doc.read_text()
    start, end = f"<!-- results:{name} -->\n", f"<!-- /results:{name} -->"
    if start not in text or end not in text:
        raise SystemExit(f"{doc} has no {start.strip()} ... {end} block")
    head, rest = text.split(start, 1)
    doc.write_text(head + start + table.rstrip("\n") + "\n" + end + rest.split(end, 1)[1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, default=Path("runs"), help="folder holding the run folders and logs/")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs", help="where results/ and img/ are written")
    args = parser.parse_args(argv)
    (args.docs / "results").mkdir(parents=True, exist_ok=True)
    (args.docs / "img").mkdir(parents=True, exist_ok=True)
    for name, collect, table in (("imaml", imaml, imaml_table), ("distillation", distillation, distillation_table),
                                 ("reweighting", reweighting, reweighting_table)):
        result = collect(args.runs)
        if not result:
            print(f"## {name}: no finished runs under {args.runs}\n")
            continue
        (args.docs / "results" / f"results_{name}.json").write_text(json.dumps(result, indent=1) + "\n")
        print(f"## {name}\n\n{table(result)}\n")
        fill(args.docs / "results.md", name, table(result))
        if name == "imaml":
            plot_imaml(args.docs / "img" / "results_imaml.png", result)
        elif name == "distillation":
            plot_distillation(args.docs / "img" / "results_distillation.png", result)
        else:
            for key, r in result.items():
                plot_reweighting(args.docs / "img" / f"results_reweighting_{key}.png", r)


if __name__ == "__main__":
    main()
