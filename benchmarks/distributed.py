"""Communication of one data-parallel hypergradient step, per solver (docs/distributed.md).

Runs ``--world`` gloo ranks on this machine (CPU), each with a DDP-wrapped MLP
and its shard of a synthetic batch, and records from ``HypergradInfo`` how many
collectives each rank made and how many bytes it handed to them.  Counts and
bytes are exact and machine-independent; the script prints them with the
closed-form prediction of docs/distributed.md.  (Timings on the shared 2-core
box these were run on would say nothing about a network, so the only time
taken is that of the ranks' agreement check, a fixed cost of the first step:
median wall time of ``--check-repeats`` calls, beside one Nyström step's.)

    python -m benchmarks.distributed --out docs/results/distributed_comm.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from hyperopt_torch import ConjugateGradient, Exact, HyperOptimizer, Identity, Neumann, Nystrom
from hyperopt_torch.distributed import Collectives

from . import common

METHODS = {
    "nystrom k=10": lambda: Nystrom(rank=10, rho=0.01),
    "nystrom k=10 chunk=5": lambda: Nystrom(rank=10, rho=0.01, chunk=5),
    "nystrom k=10 gaussian": lambda: Nystrom(rank=10, rho=0.01, sketch="gaussian"),
    "cg l=10": lambda: ConjugateGradient(iters=10, rho=0.01),
    "neumann l=10": lambda: Neumann(iters=10, alpha=0.01),
    "identity": Identity,
    "exact (784-2-10 MLP)": lambda: Exact(rho=0.01),
}


def build(args, exact: bool):
    torch.manual_seed(0)
    width = 2 if exact else args.hidden  # Exact factorises the dense p x p Hessian
    model = nn.Sequential(nn.Linear(args.dim, width), nn.Tanh(), nn.Linear(width, 10))
    decay = [torch.full_like(p, 1e-3, requires_grad=True) for p in model.parameters()]
    return model, decay


def _rank(rank, world, init, args, out):
    common.apply_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    g = torch.Generator().manual_seed(1)
    n = args.batch // world
    x, y = torch.randn(args.batch, args.dim, generator=g), torch.randint(0, 10, (args.batch,), generator=g)
    xs, ys = x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]
    rows = {}
    for name, make in METHODS.items():
        model, decay = build(args, exact=name.startswith("exact"))
        ddp = nn.parallel.DistributedDataParallel(model)
        hopt = HyperOptimizer(decay, base=torch.optim.SGD, ihvp=make(), lr=0.1)

        def train(m):
            loss = nn.functional.cross_entropy(m(xs), ys)
            return loss + 0.5 * sum((d * p.square()).sum() for d, p in zip(decay, m.parameters()))

        def val(m):
            return nn.functional.cross_entropy(m(xs.flip(1)), ys)

        info = hopt.step(train, val, ddp)
        p = sum(t.numel() for t in model.parameters())
        rows[name] = {"p": p, "hvps": info.hvps, "collectives": info.collectives, "comm_bytes": info.comm_bytes,
                      "sketch_or_vectors_bytes": 4 * info.hvps * p}
        if rank == 0:
            print(f"{name}: done", flush=True)
        if name == "nystrom k=10":
            step_seconds = _median_wall(lambda: hopt.step(train, val, ddp), 5)
            description = {"solver": repr(hopt.solver), "residual": False,
                           "hparams": [(tuple(h.shape), str(h.dtype)) for h in decay],
                           "parameters": [(tuple(q.shape), str(q.dtype)) for q in model.parameters()]}
    comm = Collectives(dist.group.WORLD)
    check = _median_wall(lambda: comm.check_agreement(description), args.check_repeats)
    rows["agreement check"] = {"seconds": check, "nystrom_step_seconds": step_seconds}
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()


def _median_wall(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.distributed", description=__doc__.split("\n\n")[0],
                                     formatter_class=common.HelpFormatter)
    parser.add_argument("--world", type=int, default=2, help="gloo ranks")
    parser.add_argument("--dim", type=int, default=784, help="MLP input width")
    parser.add_argument("--hidden", type=int, default=256, help="MLP hidden width")
    parser.add_argument("--batch", type=int, default=256, help="global batch, split over the ranks")
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the table")
    parser.add_argument("--check-repeats", type=int, default=50, help="timed calls of the ranks' agreement check")
    common.add_threads(parser, default=1)  # per rank
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_rank, args=(args.world, str(Path(tmp) / "init"), args, str(Path(tmp) / "rows.json")),
                           nprocs=args.world, start_method="spawn")
        rows = json.loads((Path(tmp) / "rows.json").read_text())
    check = rows.pop("agreement check")
    print(f"agreement check (first step, after a load): {1e3 * check['seconds']:.2f} ms median wall time, against "
          f"{1e3 * check['nystrom_step_seconds']:.0f} ms for a Nyström k=10 step")
    print(f"{'method':>22} {'p':>8} {'HVPs':>5} {'collectives':>11} {'MB/rank':>8}  (HVP share)")
    for name, r in rows.items():
        share = r["sketch_or_vectors_bytes"] / r["comm_bytes"]
        print(f"{name:>22} {r['p']:>8} {r['hvps']:>5} {r['collectives']:>11} {r['comm_bytes'] / 1e6:>8.3f}  ({share:.0%})")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"world": args.world, "backend": "gloo", "dtype": "float32",
                                        "machine": "shared 2-core CPU box", "methods": rows,
                                        "agreement_check": check}, indent=1) + "\n")


if __name__ == "__main__":
    main()
