"""Which training samples would each solver's hypergradient down-weight?  A diagnostic for recipes.reweighting.

    python -m scripts.reweighting_influence runs/rw_mnist_u60_baseline_s0 [--batches 10]

Loads the classifier θ saved by a reweighting run (``<run>/checkpoints/*.pt``, its data rebuilt from
``<run>/config.json``) and gives every sample of a training mini-batch its own weight w_i (all 1), so that

    f(θ, w) = (1/|B|) Σ w_i ℓ_i(θ) + (λ/2)‖θ‖²,   dg/dw_i = −(1/|B|) ∇_θ ℓ_iᵀ (H + ρI)⁻¹ ∇_θ g

by Eq. 3 (the influence of sample i on the meta loss g).  A descent step on w lowers the weight of every
sample with dg/dw_i > 0.  The Meta-Weight-Net's weights move the same way through μ_φ, so a solver whose
dg/dw does not single out the corrupted labels cannot teach μ_φ to down-weight them.  Printed per solver,
averaged over ``--batches`` training mini-batches (each with a meta mini-batch): the share of corrupted and
of clean samples that a step would down-weight; the correlation of dg/dw_i with the loss ℓ_i (μ_φ sees only
the loss: > 0 teaches it to down-weight high losses); mean(dg/dw) / RMS(dg/dw), the part of dg/dw that moves
every weight alike (< 0: all up, a larger step); and the cosine of dg/dw with the identity solver's
(H⁻¹ ≈ I, the first-order direction).  Writes nothing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from hyperopt_torch import implicit_hypergradient, make_solver
from recipes import reweighting

SOLVERS = {"identity": {}, "nystrom": {"rank": 10, "rho": 0.01}, "neumann": {"iters": 10, "alpha": 0.01},
           "cg": {"iters": 10, "rho": 0.01}, "cg, rho 1": {"iters": 10, "rho": 1.0}}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a recipes.reweighting output folder")
    parser.add_argument("--batches", type=int, default=10, help="training mini-batches to average over")
    parser.add_argument("--seed", type=int, default=0, help="seed of the batches drawn here")
    options = parser.parse_args(argv)

    torch.set_num_threads(1)
    command = json.loads((options.run / "config.json").read_text())["command"].split()[1:]
    args = reweighting.parse_args(command)
    data = reweighting.load_data(args, torch.device("cpu"))
    num_classes = len(data["counts"])
    model = reweighting.make_classifier(args, num_classes, tuple(data["train"][0].shape[1:]))
    checkpoint = next((options.run / "checkpoints").glob("*.pt"))
    model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True)["model"])
    model.eval()  # eval-mode BatchNorm in both losses: the two closures see one fixed function of θ

    (x, y), true, (xm, ym) = data["train"], data["train_true_labels"], data["meta"]
    draw = torch.Generator().manual_seed(options.seed)
    down = {name: {"noisy": [], "clean": []} for name in SOLVERS}
    cosine = {name: [] for name in SOLVERS}
    corr = {name: [] for name in SOLVERS}
    common = {name: [] for name in SOLVERS}
    for _ in range(options.batches):
        i = torch.randint(len(x), (args.batch_size,), generator=draw)
        j = torch.randint(len(xm), (args.meta_batch,), generator=draw)
        noisy = y[i] != true[i]
        with torch.no_grad():
            losses = F.cross_entropy(model(x[i]), y[i], reduction="none")
        w = torch.ones(len(i), requires_grad=True)

        def train_loss_fn(m):
            losses = F.cross_entropy(m(x[i]), y[i], reduction="none")
            return (w * losses).mean() + 0.5 * args.weight_decay * sum(p.square().sum() for p in m.parameters())

        def val_loss_fn(m):
            return F.cross_entropy(m(xm[j]), ym[j])

        grads = {}
        for name, settings in SOLVERS.items():
            solver = make_solver(name.split(",")[0], **settings)
            result = implicit_hypergradient([w], train_loss_fn, val_loss_fn, model, solver,
                                            generator=torch.Generator().manual_seed(options.seed))
            grads[name] = result.grads[0]
        for name, g in grads.items():
            if noisy.any():
                down[name]["noisy"].append((g[noisy] > 0).float().mean().item())
            down[name]["clean"].append((g[~noisy] > 0).float().mean().item())
            cosine[name].append(F.cosine_similarity(g, grads["identity"], dim=0).item())
            corr[name].append(torch.corrcoef(torch.stack([g, losses]))[0, 1].item())
            common[name].append((g.mean() / g.square().mean().sqrt()).item())

    def mean(values):
        return sum(values) / len(values) if values else float("nan")

    print(f"{options.run}: {options.batches} mini-batches of {args.batch_size}; share a descent step on w would "
          "down-weight")
    print(f"{'solver':>10} {'corrupted':>10} {'clean':>7} {'corr(loss)':>11} {'mean/RMS':>9} {'cos(identity)':>14}")
    table = {}
    for name in SOLVERS:
        table[name] = {"down_noisy": mean(down[name]["noisy"]), "down_clean": mean(down[name]["clean"]),
                       "corr_loss": mean(corr[name]), "common": mean(common[name]),
                       "cosine_identity": mean(cosine[name])}
        row = table[name]
        print(f"{name:>10} {row['down_noisy']:>10.2f} {row['down_clean']:>7.2f} {row['corr_loss']:>11.2f} "
              f"{row['common']:>9.2f} {row['cosine_identity']:>14.2f}")
    return table


if __name__ == "__main__":
    main()
