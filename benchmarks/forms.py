"""Does θ as plain tensors cost the same as θ as a module?

``HyperOptimizer.step`` on one problem — LeNet with a batch of 128
MNIST-sized images and one weight decay per weight — with the inner
parameters θ passed three ways: the ``nn.Module`` (module form), a
``dict[str, Tensor]`` whose losses call ``torch.func.functional_call`` (the
form hypertorch and torch.func users hold), and a list of tensors.  Each form
is timed with Nyström (k = 10) and Neumann (l = 10), interleaved, CPU time of the
process, median of ``--repeats``; the engine is fixed (``--engine``) so that
the forms differ in nothing else (one ``Batching`` serves the three, so the
products are batched alike).  The hypergradients of the three forms are
checked to agree.  Writes ``forms.json``.

    python -m benchmarks.forms --threads 1 --repeats 9 --out docs/results
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn
from torch.func import functional_call

from hyperopt_torch import Batching, HyperOptimizer, Neumann, Nystrom
from recipes.models import LeNet

from . import common

# Neumann rather than CG: a fixed number of products (CG stops at the random LeNet's negative curvature).
SOLVERS = {"nystrom k=10": lambda: Nystrom(rank=10, rho=0.01), "neumann l=10": lambda: Neumann(iters=10, alpha=0.01)}


def problems(batch: int, seed: int):
    """``{form: (params, hparams, train_loss, val_loss)}``: the same LeNet problem with θ held three ways."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(batch, 1, 28, 28, generator=g), torch.randint(0, 10, (batch,), generator=g)
    xv, yv = torch.randn(batch, 1, 28, 28, generator=g), torch.randint(0, 10, (batch,), generator=g)
    torch.manual_seed(seed)
    model = LeNet()
    names = [n for n, _ in model.named_parameters()]
    out = {}
    for form in ("module", "dict", "list"):
        decay = [torch.full_like(p, -9.0, requires_grad=True) for p in model.parameters()]
        if form == "module":
            params, forward, values = model, lambda m, t: m(t), lambda m: list(m.parameters())
        elif form == "dict":
            params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
            forward, values = (lambda d, t: functional_call(model, d, (t,))), lambda d: list(d.values())
        else:
            params = [p.detach().clone().requires_grad_() for p in model.parameters()]
            forward = lambda ts, t: functional_call(model, dict(zip(names, ts)), (t,))
            values = list

        def train(p, forward=forward, values=values, decay=decay):
            penalty = sum((d.exp() * w ** 2).sum() for d, w in zip(decay, values(p)))
            return nn.functional.cross_entropy(forward(p, x), y) + penalty

        def val(p, forward=forward):
            return nn.functional.cross_entropy(forward(p, xv), yv)

        out[form] = (params, decay, train, val)
    return out


def main(argv=None) -> dict:
    parser = common.parser(__doc__.split("\n\n")[0], "benchmarks.forms", device=False)
    parser.add_argument("--batch", type=int, default=128, help="images per loss evaluation")
    parser.add_argument("--repeats", type=int, default=9, help="timed repetitions per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="untimed repetitions per configuration first")
    parser.add_argument("--engine", choices=("func", "autograd"), default="func", help="HVP engine, the same for all forms")
    args = parser.parse_args(argv)
    common.apply_threads(args.threads)
    device = torch.device("cpu")
    forms = problems(args.batch, args.seed)
    fns, grads = {}, {}
    for solver, make in SOLVERS.items():
        batching = Batching()  # one for the three forms: the same batching of the products for each
        for form, (params, decay, train, val) in forms.items():
            hopt = HyperOptimizer(decay, base=torch.optim.SGD, ihvp=make(), lr=0.0, engine=args.engine)
            hopt.batching = batching
            grads[solver, form] = torch.cat([g.flatten() for g in hopt.hypergradient(train, val, params).grads])
            fns[f"{solver} {form}"] = lambda h=hopt, t=train, v=val, p=params: h.step(t, v, p)
    agreement = {solver: max(((grads[solver, f] - grads[solver, "module"]).norm()
                              / grads[solver, "module"].norm()).item() for f in ("dict", "list"))
                 for solver in SOLVERS}
    times = common.time_interleaved(fns, device, args.warmup, args.repeats, clock=time.process_time)
    median = {name: statistics.median(t) for name, t in times.items()}
    ratios = {f"{solver} {form}": median[f"{solver} {form}"] / median[f"{solver} module"]
              for solver in SOLVERS for form in ("dict", "list")}
    result = {"config": {k: str(v) for k, v in vars(args).items()}, "machine": common.machine(device),
              "clock": "process_time", "params": sum(p.numel() for p in forms["module"][0].parameters()),
              "median_seconds": median, "ratio_to_module_form": ratios,
              "relative_difference_to_module_form": agreement, "times": times}
    common.write_results(args.out, "forms", result)
    for name, ratio in ratios.items():
        print(f"{name:>22}: {1e3 * median[name]:8.1f} ms, {ratio:.3f} x the module form")
    print("largest relative difference to the module form's hypergradient:", agreement)
    return result


if __name__ == "__main__":
    main()
