"""Peak memory per rank of one hypergradient of an FSDP2 model against one process (docs/distributed.md, "FSDP").

Runs one process with the plain model on the whole batch, then ``--world`` gloo
ranks with the model sharded by ``fully_shard`` (each layer and the root) and
each rank's share of the batch, and records per rank, for each solver, the
resident bytes just before a ``HyperOptimizer.step`` and the peak resident size
during it (``VmHWM`` after resetting it through ``/proc/self/clear_refs``, the
method of ``benchmarks/common.py``; glibc returns freed blocks at once under
``MALLOC_MMAP_THRESHOLD_``, set here for the ranks).  A warm-up step first pays
the one-time costs (the HVP strategy's measurement, FSDP's lazy init).  The
model is a wide MLP, so that ``p``-sized objects dominate, in float32 with one
scalar hyperparameter (a log weight decay), so that ``|φ|`` adds nothing.  Each
rank's HyperOptimizer measures its own HVP engine and batching on its first step;
the one used is recorded, since it moves the peak (a ``vmap`` block against a loop).

    python -m benchmarks.fsdp_memory --out docs/results/fsdp_memory_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from hyperopt_torch import ConjugateGradient, HyperOptimizer, Nystrom

from . import common
from .common import _status_bytes

METHODS = {"nystrom": lambda k: Nystrom(rank=k, rho=0.01), "cg": lambda k: ConjugateGradient(iters=k, rho=0.01)}


def _rank(rank, world, init, args, out):
    torch.set_num_threads(1)
    sharded = world > 1
    if sharded:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=600))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(args.batch, args.dim, generator=g), torch.randint(0, 10, (args.batch,), generator=g)
    n = args.batch // world
    x, y = x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(args.dim, args.hidden), nn.Tanh(), nn.Linear(args.hidden, args.hidden), nn.Tanh(),
                          nn.Linear(args.hidden, 10))
    p = sum(t.numel() for t in model.parameters())
    if sharded:
        mesh = init_device_mesh("cpu", (world,))
        for layer in (model[0], model[2], model[4]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    log_decay = torch.tensor(-6.0, requires_grad=True)

    def train(m):
        return nn.functional.cross_entropy(m(x), y) + log_decay.exp() * sum(t.square().sum() for t in m.parameters())

    def val(m):
        return nn.functional.cross_entropy(m(x.flip(1)), y)

    local = sum((t.to_local() if sharded else t).numel() * 4 for t in model.parameters())
    rows = {}
    for name, make in METHODS.items():
        hopt = HyperOptimizer([log_decay], base=torch.optim.SGD, ihvp=make(args.k), lr=0.0)
        hopt.step(train, val, model)  # warm-up
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_bytes("VmRSS")
        info = hopt.step(train, val, model)
        peak = _status_bytes("VmHWM")
        rows[name] = {"baseline_bytes": before, "peak_bytes": peak, "step_bytes": peak - before,
                      "engine": info.engine, "hvp_strategy": info.hvp_strategy}
    Path(out, f"rank{rank}.json").write_text(json.dumps({"p": p, "local_param_bytes": local, "methods": rows}))
    if sharded:
        dist.destroy_process_group()


def run(world: int, args) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_rank, args=(world, str(Path(tmp) / "init"), args, tmp), nprocs=world, start_method="spawn")
        return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fsdp_memory", description=__doc__.split("\n\n")[0],
                                     formatter_class=common.HelpFormatter)
    parser.add_argument("--world", type=int, default=2, help="gloo ranks of the sharded run")
    parser.add_argument("--dim", type=int, default=1024, help="MLP input width")
    parser.add_argument("--hidden", type=int, default=2048, help="MLP hidden width (two hidden layers)")
    parser.add_argument("--batch", type=int, default=64, help="global batch, split over the ranks")
    parser.add_argument("--k", type=int, default=8, help="Nyström rank k and CG iterations l")
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the table")
    args = parser.parse_args(argv)
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(1 << 17)  # inherited by the spawned ranks (benchmarks/common.py)
    results = {1: run(1, args), args.world: run(args.world, args)}
    p = results[1][0]["p"]
    print(f"p = {p:,} float32 parameters ({4 * p / 2**20:.1f} MiB), k = l = {args.k}, batch {args.batch}")
    print(f"{'ranks':>5} {'rank':>4} {'method':>8} {'params held':>12} {'before step':>12} {'step peak':>10} "
          f"{'in p·4 B':>8}  HVPs")
    for world, ranks in results.items():
        for r, row in enumerate(ranks):
            for name, m in row["methods"].items():
                print(f"{world:>5} {r:>4} {name:>8} {row['local_param_bytes'] / 2**20:>10.1f}Mi "
                      f"{m['baseline_bytes'] / 2**20:>10.1f}Mi {m['step_bytes'] / 2**20:>8.1f}Mi "
                      f"{m['step_bytes'] / (4 * p):>8.2f}  {m['engine']}, {m['hvp_strategy']}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"backend": "gloo", "dtype": "float32", "machine": "shared 2-core CPU box",
                                        "torch": torch.__version__, "args": {k: v for k, v in vars(args).items()
                                                                              if k != "out"},
                                        "ranks": {str(w): r for w, r in results.items()}}, indent=1) + "\n")


if __name__ == "__main__":
    main()
