"""FSDP2 (``fully_shard``) hypergradients: 2 gloo ranks on CPU against the single-process, full-batch answer.

One spawn of 2 processes shards the same float64 MLP with ``fully_shard`` on a 1-D CPU mesh and runs
every scenario (every solver and both engines for two kinds of hyperparameter, HyperOptimizer
trajectories with inner FSDP steps, a checkpoint resumed, a mixed-precision policy, a NaN and an
exception on one rank, the refusals, the reweighting recipe with ``--fsdp``) and saves what each rank
saw; the tests below compare those records with references computed here, in one process on the
concatenated batches.

The MLP's dim-0 sizes 5, 3 and 1 do not divide by 2: the ranks hold shards of 3/2, 2/1 and 1/0 rows
(rank 1's shard of the last layer is empty).
"""

from __future__ import annotations

import math
import tempfile
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from recipes import common, reweighting
from recipes.cifar import write_cifar10
from conftest import spawn_ranks
from hyperopt_torch import (ConjugateGradient, Exact, HyperOptimizer, Identity, InnerSGD, Minres, Neumann, NormalCG,
                            Nystrom, implicit_hypergradient, unrolled_hypergradient)

DT = torch.float64
WORLD = 2
N_TRAIN, N_VAL = 8, 8  # split evenly over the ranks: the global loss is the mean of the shards' means
SOLVERS = {
    "nystrom": lambda: Nystrom(rank=8, rho=0.1),
    "nystrom-chunk3": lambda: Nystrom(rank=8, rho=0.1, chunk=3),
    "nystrom-gaussian": lambda: Nystrom(rank=8, rho=0.1, sketch="gaussian"),
    "cg": lambda: ConjugateGradient(iters=6, rho=0.1),
    "cg-tol": lambda: ConjugateGradient(iters=50, rho=0.1, tol=1e-6),
    "neumann": lambda: Neumann(iters=6, alpha=0.1),
    "minres": lambda: Minres(iters=6, rho=0.1),
    "normal_cg": lambda: NormalCG(iters=3, rho=0.1),
    "identity": Identity,
    "exact": lambda: Exact(rho=0.1),
}
KINDS = ("decay", "weights")  # per-parameter log weight decays (+ an input scale); a weighting net (Meta-Weight-Net)
CASES = [(kind, name, engine) for kind in KINDS for name in SOLVERS
         for engine in (("func", "autograd") if name in ("nystrom", "cg") else ("func",))]
TRAJECTORIES = [("decay", "nystrom"), ("decay", "cg"), ("weights", "nystrom")]
OUTER_STEPS, INNER_STEPS, CHECKPOINT_AT = 3, 4, 2
REWEIGHTING_FLAGS = ["--outer-steps", "2", "--depth", "10", "--width", "1", "--resize", "16", "--imbalance", "10",
                     "--meta-fraction", "0.1", "--batch-size", "16", "--meta-batch", "16", "--hyper-every", "2",
                     "--rank", "3", "--eval-every", "2", "--test-subset", "40", "--checkpoint-every", "1",
                     "--lr-milestones", "9", "--no-progress"]
SPAWN_DEADLINE_S = 150


# -- the problem -----------------------------------------------------------------------------------------
def scaled(module, inputs, output):
    """A user's forward hook, which the replica the losses see must keep (while FSDP's are left out)."""
    return 1.5 * output


def make_model():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 1)).to(DT)
    model[1].register_forward_hook(scaled)
    return model


def make_problem(kind):
    """``(data, model, hparams)``: plain tensors, the per-parameter decays full-size, or a weighting net's parameters."""
    g = torch.Generator().manual_seed(0)
    data = {"x": torch.randn(N_TRAIN, 4, generator=g, dtype=DT), "y": torch.randn(N_TRAIN, 1, generator=g, dtype=DT),
            "xv": torch.randn(N_VAL, 4, generator=g, dtype=DT), "yv": torch.randn(N_VAL, 1, generator=g, dtype=DT)}
    model = make_model()
    if kind == "decay":
        # torch.full(p.shape, ...) works alike on a plain and on a sharded (DTensor) parameter: its shape is the full one
        log_decay = [torch.full(p.shape, -1.0, dtype=DT).add_(0.1 * torch.randn(p.shape, generator=g, dtype=DT))
                     .requires_grad_() for p in model.parameters()]
        return data, model, [*log_decay, torch.zeros((), dtype=DT, requires_grad=True)]
    torch.manual_seed(2)
    return data, model, list(nn.Sequential(nn.Linear(1, 4), nn.Linear(4, 1)).to(DT).parameters())


def weight_net(losses, hparams):
    """Meta-Weight-Net's weighting MLP, 1-4-1, tanh then sigmoid: a weight in (0, 1) per loss value."""
    w1, b1, w2, b2 = hparams
    return torch.sigmoid(nn.functional.linear(torch.tanh(nn.functional.linear(losses[:, None], w1, b1)), w2, b2)).squeeze(1)


def shard(data, rank, world):
    return {key: t[rank * (len(t) // world):(rank + 1) * (len(t) // world)] for key, t in data.items()}


def loss_fns(kind, data, hparams):
    """``(train, val, fit)``: the losses of the hypergradient and the inner loop's data loss (hparams fixed)."""
    if kind == "decay":
        *log_decay, log_scale = hparams

        def fit(m, scale=None):
            return ((m(data["x"] * (log_scale if scale is None else scale).exp()) - data["y"]) ** 2).mean()

        def train(m):
            return fit(m) + 0.5 * sum((d.exp() * p.square()).sum() for d, p in zip(log_decay, m.parameters()))

        def val(m):
            return ((m(data["xv"] * log_scale.exp()) - data["yv"]) ** 2).mean()

        return train, val, lambda m: fit(m, log_scale.detach())

    def weighted(m, phi):
        losses = ((m(data["x"]) - data["y"]) ** 2).squeeze(1)
        return (weight_net(losses.detach(), phi) * losses).mean()  # the net sees the loss values, as in MWN

    return ((lambda m: weighted(m, hparams)), (lambda m: ((m(data["xv"]) - data["yv"]) ** 2).mean()),
            lambda m: weighted(m, [h.detach() for h in hparams]))


def add_decay_gradient(model, hparams, kind):
    """The inner loop's penalty ½Σ exp(d)·p², differentiated by hand: ``p.grad += exp(d)·p``.

    On an FSDP model ``p`` and ``p.grad`` are shards (DTensors) and ``d`` is full: ``distribute_tensor``
    with ``src_data_rank=None`` cuts this rank's rows of ``d`` locally, like the parameter's.
    """
    if kind != "decay":
        return
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        for d, p in zip(hparams[:-1], model.parameters()):
            if isinstance(p, DTensor):
                d = distribute_tensor(d.detach(), p.device_mesh, p.placements, src_data_rank=None)
            p.grad.add_(d.exp() * p)


def trajectory(kind, model, hparams, data, hopt, steps, after=None):
    """``steps`` outer steps: INNER_STEPS of SGD on f (``model`` may be FSDP), then hopt.step; returns infos."""
    train, val, fit = loss_fns(kind, data, hparams)
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    infos = []
    for step in range(steps):
        for _ in range(INNER_STEPS):
            inner.zero_grad()
            fit(model).backward()
            add_decay_gradient(model, hparams, kind)
            inner.step()
        infos.append(hopt.step(train, val, model))
        if after is not None:
            after(step)
    return infos


def flat(tensors):
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


# -- what each rank does ---------------------------------------------------------------------------------
def fully_sharded(model, mesh, **kwargs):
    for layer in (model[0], model[2], model[4]):
        fully_shard(layer, mesh=mesh, **kwargs)
    return fully_shard(model, mesh=mesh, **kwargs)


def fully_shard(*args, **kwargs):
    from torch.distributed.fsdp import fully_shard as shard_

    return shard_(*args, **kwargs)


def fsdp_state(model):
    """Everything a hypergradient must leave as found: the parameter objects, their shards' values and
    ``.grad``, every module's class and forward hooks, and each FSDP group's sharded / reshard_after_backward
    flags (FSDP's private state, read by this test only)."""
    from torch.distributed.fsdp import FSDPModule

    return {
        "params": [(name, type(p).__name__, id(p), p.to_local().clone()) for name, p in model.named_parameters()],
        "grads": [None if p.grad is None else (id(p.grad), p.grad.to_local().clone()) for p in model.parameters()],
        "modules": [(type(m), list(m._forward_pre_hooks.items()), list(m._forward_hooks.items())) for m in model.modules()],
        "fsdp": [(group.is_sharded, group.reshard_after_backward) for m in model.modules() if isinstance(m, FSDPModule)
                 for group in [m._get_fsdp_state()._fsdp_param_group] if group is not None],
    }


def same_state(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    return a == b


def _no_plot(path, draw, **kwargs):
    """Stands in for common.save_figure: matplotlib would double the CPU time of this file."""
    return False


def _gathered_equal(t: torch.Tensor) -> bool:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return all(torch.equal(parts[0], q) for q in parts[1:])


def _error(fn) -> str | None:
    try:
        fn()
    except Exception as error:  # the refusals' messages are checked below
        return f"{type(error).__name__}: {error}"
    return None


def _worker(rank, init_file, out_dir):
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecisionPolicy
    import torch.distributed.checkpoint as dcp

    from hyperopt_torch import _kinds
    from hyperopt_torch.distributed import data_parallel

    torch.set_num_threads(1)
    _kinds.FUNC_MIN_PARAMS = 0  # as tests/conftest.py does in the test process: engine="func" stays on torch.func
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    short = dist.new_group(backend="gloo", timeout=timedelta(seconds=3))  # for section 7, created while in step
    mesh = init_device_mesh("cpu", (WORLD,))
    record = {}

    # 1. Every solver, both hparam kinds, generators seeded differently per rank; a .grad from an earlier
    #    backward must survive, then a normal training step must give the reference's sharded gradients.
    for kind in KINDS:
        full_data, model, hparams = make_problem(kind)
        fully_sharded(model, mesh)
        data = shard(full_data, rank, WORLD)
        train, val, fit = loss_fns(kind, data, hparams)
        fit(model).backward()
        before = fsdp_state(model)
        for case in CASES:
            if case[0] != kind:
                continue
            _, name, engine = case
            generator = torch.Generator().manual_seed(100 + rank)
            grads, info = implicit_hypergradient(hparams, train, val, model, SOLVERS[name](),
                                                 generator=generator, residual=True, engine=engine)
            record[case] = {"grad": flat(grads), "info": info, "same": _gathered_equal(flat(grads)),
                            "generator": generator.get_state()}
        record[kind, "as found"] = same_state(fsdp_state(model), before)
        replica, _ = data_parallel(model)
        record[kind, "replica"] = [(type(m).__name__, [h is scaled for h in [*m._forward_pre_hooks.values(),
                                                                             *m._forward_hooks.values()]])
                                   for m in replica.modules()]
        model.zero_grad()
        ((model(data["x"]) - data["y"]) ** 2).mean().backward()
        record[kind, "training grads"] = flat(full(p.grad) for p in model.parameters())
        record[kind, "sharded after training"] = all(state[0] for state in fsdp_state(model)["fsdp"])

    # 2. HyperOptimizer trajectories with inner FSDP steps, checkpointed after CHECKPOINT_AT outer steps:
    #    the model with torch.distributed.checkpoint (every rank its shard), hparams and optimizer on rank 0.
    for kind, name in TRAJECTORIES:
        path = Path(out_dir) / f"{kind}-{name}"
        full_data, model, hparams = make_problem(kind)
        fully_sharded(model, mesh)
        data = shard(full_data, rank, WORLD)
        hopt = HyperOptimizer(hparams, base=torch.optim.SGD, ihvp=SOLVERS[name](), lr=0.5, momentum=0.5)
        hopt.solver.generator.manual_seed(rank) if hasattr(hopt.solver, "generator") else None

        def save(step):
            if step + 1 == CHECKPOINT_AT:
                dcp.save({"model": model.state_dict()}, checkpoint_id=str(path))
                if rank == 0:
                    torch.save({"hparams": [h.detach() for h in hparams], "hopt": hopt.state_dict()},
                               str(path) + ".pt")

        infos = trajectory(kind, model, hparams, data, hopt, OUTER_STEPS, after=save)
        params = flat(full(p) for p in model.parameters())
        record["trajectory", kind, name] = {"hparams": flat(hparams), "model": params,
                                            "same": _gathered_equal(torch.cat([flat(hparams), params])),
                                            "skipped": [i.skipped for i in infos]}
        dist.barrier()  # rank 0's file is on disk
        _, model, hparams = make_problem(kind)
        fully_sharded(model, mesh)
        state = {"model": model.state_dict()}
        dcp.load(state, checkpoint_id=str(path))
        model.load_state_dict(state["model"])
        saved = torch.load(str(path) + ".pt", weights_only=True)
        with torch.no_grad():
            for h, value in zip(hparams, saved["hparams"]):
                h.copy_(value)
        hopt = HyperOptimizer(hparams, base=torch.optim.SGD, ihvp=SOLVERS[name](), lr=0.5, momentum=0.5)
        hopt.load_state_dict(saved["hopt"])
        trajectory(kind, model, hparams, data, hopt, OUTER_STEPS - CHECKPOINT_AT)
        record["resumed", kind, name] = {"hparams": flat(hparams),
                                         "model": flat(full(p) for p in model.parameters())}

    # 3. A mixed-precision policy (float32 compute over float64 parameters): the hypergradient is the float64 one.
    full_data, model, hparams = make_problem("decay")
    fully_sharded(model, mesh, mp_policy=MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=DT))
    data = shard(full_data, rank, WORLD)
    train, val, fit = loss_fns("decay", data, hparams)
    fit(model).backward()  # FSDP ran its float32 forward once
    before = fsdp_state(model)
    grads, info = implicit_hypergradient(hparams, train, val, model, SOLVERS["nystrom"](),
                                         generator=torch.Generator().manual_seed(100))
    record["mixed precision"] = {"grad": flat(grads), "as found": same_state(fsdp_state(model), before)}

    # 4. Refused by name: FSDP1, an FSDP model in unrolled differentiation, DTensor hparams, an unsharded model.
    _, model, hparams = make_problem("decay")
    fsdp1 = FullyShardedDataParallel(model, device_id=torch.device("cpu"))
    train, val, _ = loss_fns("decay", data, hparams)
    record["fsdp1"] = _error(lambda: implicit_hypergradient(hparams, train, val, fsdp1, "cg"))
    _, model, hparams = make_problem("decay")
    fully_sharded(model, mesh)
    record["unrolled"] = _error(lambda: unrolled_hypergradient(hparams, train, val, model,
                                                               InnerSGD(0.1), steps=1))
    sharded_decay = [torch.full_like(p, -1.0, requires_grad=True) for p in model.parameters()]
    record["dtensor hparams"] = _error(lambda: HyperOptimizer(sharded_decay, ihvp="cg"))
    for m in model.modules():
        if hasattr(m, "unshard"):
            m.unshard()
    record["unsharded"] = _error(lambda: implicit_hypergradient(hparams, train, val, model, "cg"))
    for m in model.modules():
        if hasattr(m, "reshard"):
            m.reshard()

    # 5. A NaN training loss on rank 1 only: skipped on both ranks, nothing changed; the next step works.
    full_data, model, hparams = make_problem("decay")
    fully_sharded(model, mesh)
    data = shard(full_data, rank, WORLD)
    train, val, _ = loss_fns("decay", data, hparams)
    hopt = HyperOptimizer(hparams, base=torch.optim.SGD, ihvp=SOLVERS["nystrom"](), lr=0.5)
    before, state = flat(hparams), fsdp_state(model)
    poisoned = (lambda m: train(m) * math.nan) if rank == 1 else train
    with pytest.warns(RuntimeWarning, match="skipped"):
        info = hopt.step(poisoned, val, model)
    record["nan"] = {"skipped": info.skipped, "unchanged": torch.equal(flat(hparams), before),
                     "as found": same_state(fsdp_state(model), state)}
    info = hopt.step(train, val, model)
    record["nan"]["then"] = {"skipped": info.skipped, "same": _gathered_equal(flat(hparams))}

    # 6. The reweighting recipe with --fsdp (its WideResNet sharded child by child), checkpointed every outer step
    #    (full state dicts gathered to rank 0), then resumed for one more step.
    common.save_figure = _no_plot
    flags = ["--data-root", str(Path(out_dir) / "cifar"), "--out", str(Path(out_dir) / "reweighting"), "--fsdp",
             *REWEIGHTING_FLAGS]
    first = reweighting.main(flags)["curves"]["val_loss"]
    resumed = reweighting.main([*flags, "--resume", "--outer-steps", "3"])["curves"]["val_loss"]
    flags[3] = str(Path(out_dir) / "reweighting-3")
    straight = reweighting.main([*flags, "--outer-steps", "3"])["curves"]["val_loss"]
    record["recipe"] = {"val_loss": first, "resumed": resumed, "straight": straight,
                        "same": _gathered_equal(torch.tensor(resumed))}

    # 7. An exception on rank 1 while rank 0 waits in a collective of the short-timeout group (the model's mesh):
    #    both raise, and both models, hparams and generators are as found.
    _, model, hparams = make_problem("decay")
    # A dim name of its own: meshes over the same ranks otherwise compare equal, and DTensor's caches may then
    # hand the parameters the first mesh (with the default group's timeout).
    fully_sharded(model, DeviceMesh.from_group(short, "cpu", mesh_dim_names=("short",)))
    train, val, fit = loss_fns("decay", data, hparams)
    fit(model).backward()
    hopt = HyperOptimizer(hparams, base=torch.optim.SGD, ihvp=SOLVERS["nystrom"](), lr=0.5)
    before, state = flat(hparams), fsdp_state(model)
    generator_before = hopt.solver.generator.get_state()
    dist.barrier()  # start in step: the short timeout is for the failure only

    def failing(m):
        if rank == 1:
            raise ValueError("rank 1 failed in train_loss_fn")
        return train(m)

    record["failure"] = {"raised": _error(lambda: hopt.step(failing, val, model))}
    record["failure"].update(unchanged=torch.equal(flat(hparams), before),
                             generator_unchanged=torch.equal(hopt.solver.generator.get_state(), generator_before),
                             as_found=same_state(fsdp_state(model), state))
    torch.save(record, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()  # the default group is still healthy: keep rank 1 alive until rank 0 has raised
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks():
    """Run the two ranks (killed after SPAWN_DEADLINE_S so that nothing hangs); their records."""
    with tempfile.TemporaryDirectory() as tmp:
        write_cifar10(Path(tmp) / "cifar", n_train=500, n_test=50)
        yield spawn_ranks(_worker, WORLD, SPAWN_DEADLINE_S, Path(tmp))


# -- single-process references on the concatenated batches ----------------------------------------------
def rel(x, y):
    return ((x - y).norm() / y.norm()).item()


def reference_hypergradient(kind, name, engine="func"):
    data, model, hparams = make_problem(kind)
    train, val, _ = loss_fns(kind, data, hparams)
    generator = torch.Generator().manual_seed(100)
    grads, info = implicit_hypergradient(hparams, train, val, model, SOLVERS[name](), generator=generator,
                                         residual=True, engine=engine)
    return flat(grads), info, generator.get_state()


def reference_trajectory(kind, name):
    data, model, hparams = make_problem(kind)
    hopt = HyperOptimizer(hparams, base=torch.optim.SGD, ihvp=SOLVERS[name](), lr=0.5, momentum=0.5)
    trajectory(kind, model, hparams, data, hopt, OUTER_STEPS)
    return flat(hparams), flat(model.parameters())


# -- the checks ----------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:ConjugateGradient.*negative curvature:RuntimeWarning")
@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_fsdp_hypergradient_equals_single_process_full_batch(ranks, case):
    kind, name, engine = case
    expected, ref_info, ref_generator = reference_hypergradient(kind, name, engine)
    for r, record in enumerate(ranks):
        got = record[case]
        assert got["same"], f"rank hypergradients differ ({case})"
        assert rel(got["grad"], expected) < 1e-8, (case, r)
        info = got["info"]
        assert not info.skipped and info.engine == ref_info.engine
        assert abs(info.train_loss - ref_info.train_loss) <= 1e-12 * ref_info.train_loss
        assert abs(info.val_loss - ref_info.val_loss) <= 1e-12 * ref_info.val_loss
        assert abs(info.residual - ref_info.residual) <= 1e-9
        if not (name == "cg" and ref_info.negative_curvature):  # one process returns at negative curvature (DDP alike)
            assert info.hvps == ref_info.hvps
        assert torch.equal(got["generator"], ref_generator)  # every rank continues from rank 0's generator


@pytest.mark.parametrize("kind", KINDS)
def test_fsdp_model_is_left_as_found_and_trains_on(ranks, kind):
    """Sharded parameter objects and values, .grad, module classes and forward hooks, FSDP's sharded and
    reshard_after_backward flags: unchanged by all the hypergradients; then a normal training step's
    sharded gradients equal one process's on the full batch."""
    data, model, _ = make_problem(kind)
    ((model(data["x"]) - data["y"]) ** 2).mean().backward()
    expected = flat(p.grad for p in model.parameters())
    for record in ranks:
        assert record[kind, "as found"]
        # the losses saw plain modules (no FSDP<Class>) carrying the user's hook and none of FSDP's
        assert record[kind, "replica"] == [("Sequential", []), ("Linear", []), ("Tanh", [True]), ("Linear", []),
                                           ("Tanh", []), ("Linear", [])]
        assert rel(record[kind, "training grads"], expected) < 1e-12
        assert record[kind, "sharded after training"]


def shard_numel(t, rank):
    """Elements of rank ``rank``'s dim-0 shard of ``t`` (torch.chunk's split: ⌈n/WORLD⌉ rows, the last ranks fewer)."""
    rows = -(-len(t) // WORLD)
    return max(0, min(len(t), (rank + 1) * rows) - rank * rows) * (t.numel() // len(t))


@pytest.mark.parametrize("case", [c for c in CASES if c[0] == "decay" and c[2] == "func"], ids=lambda c: c[1])
def test_fsdp_communication_is_counted(ranks, case):
    """As under DDP, plus one all-gather of each sharded parameter (this rank's shard, so the ranks differ)."""
    _, model, hparams = make_problem("decay")
    params = list(model.parameters())
    p, n_phi = sum(t.numel() for t in params), sum(h.numel() for h in hparams)
    for r, record in enumerate(ranks):
        info = record[case]["info"]
        shards = sum(shard_numel(t, r) for t in params)
        generator_bytes = torch.Generator().get_state().numel()  # a generator is passed: broadcast for every solver
        assert info.comm_bytes == generator_bytes + 8 * (shards + (p + n_phi) + info.hvps * p + n_phi + 6)
    # the gathers; the ranks' agreement check, the generator, b, the mixed term, the final checks; one HVP block and
    # the residual's
    assert ranks[0]["decay", "nystrom", "func"]["info"].collectives == len(params) + 5 + 1 + 1


@pytest.mark.filterwarnings("ignore:ConjugateGradient.*negative curvature:RuntimeWarning")
@pytest.mark.parametrize("kind,name", TRAJECTORIES)
def test_fsdp_hyperoptimizer_with_inner_fsdp_steps_matches_single_process(ranks, kind, name):
    hparams, params = reference_trajectory(kind, name)
    for record in ranks:
        got = record["trajectory", kind, name]
        assert got["same"] and not any(got["skipped"])
        assert rel(got["hparams"], hparams) < 1e-8
        assert rel(got["model"], params) < 1e-8


@pytest.mark.parametrize("kind,name", TRAJECTORIES)
def test_fsdp_checkpoint_resumes_identically(ranks, kind, name):
    """torch.distributed.checkpoint for the sharded model, rank 0's HyperOptimizer.state_dict for the rest."""
    for record in ranks:
        assert rel(record["resumed", kind, name]["hparams"], record["trajectory", kind, name]["hparams"]) < 1e-13
        assert rel(record["resumed", kind, name]["model"], record["trajectory", kind, name]["model"]) < 1e-13


def test_fsdp_mixed_precision_policy_gives_the_full_precision_hypergradient(ranks):
    """param_dtype is FSDP's forward cast; the hypergradient runs on the float64 parameters themselves."""
    expected, _, _ = reference_hypergradient("decay", "nystrom")
    for record in ranks:
        assert rel(record["mixed precision"]["grad"], expected) < 1e-8
        assert record["mixed precision"]["as found"]


def test_fsdp1_and_what_cannot_be_differentiated_are_refused_by_name(ranks):
    for record in ranks:
        assert record["fsdp1"].startswith("Refused: ") and "is a FullyShardedDataParallel (FSDP1) module" in record["fsdp1"]
        assert "sharded by fully_shard (FSDP2), which the unrolled hypergradient cannot" in record["unrolled"]
        assert record["dtensor hparams"].startswith("TypeError: hparams[0] is a DTensor")
        assert "the FSDP model has no sharded parameter" in record["unsharded"]


def test_fsdp_nan_on_one_rank_skips_the_step_on_every_rank(ranks):
    for record in ranks:
        assert record["nan"]["skipped"] and record["nan"]["unchanged"] and record["nan"]["as found"]
        assert not record["nan"]["then"]["skipped"] and record["nan"]["then"]["same"]


def test_fsdp_exception_on_one_rank_raises_on_every_rank_and_leaves_the_models_as_found(ranks):
    assert "rank 1 failed" in ranks[1]["failure"]["raised"]
    assert ranks[0]["failure"]["raised"] is not None  # the collective rank 0 waited in timed out
    for record in ranks:
        assert record["failure"]["unchanged"] and record["failure"]["generator_unchanged"]
        assert record["failure"]["as_found"]


def test_reweighting_recipe_with_fsdp_runs_on_two_ranks_that_agree_and_resumes(ranks):
    """``--fsdp``: the ranks log the same (rank-averaged) validation losses; 2 steps then a resumed third agree
    with 3 steps straight (the WideResNet's and its SGD's full state dicts, gathered to rank 0, loaded by all)."""
    first, second = (record["recipe"] for record in ranks)
    assert first["same"] and second["same"] and first["resumed"] == second["resumed"]
    assert len(first["val_loss"]) == 2 and all(math.isfinite(v) for v in first["resumed"])
    assert first["resumed"][:2] == first["val_loss"] == first["straight"][:2]
    # Not to the bit: FSDP does not broadcast buffers, so each rank's BatchNorm running statistics follow its own
    # shares of the batches (0.021 apart after 2 steps, measured), and the checkpoint holds rank 0's, which rank 1
    # then resumes from (4.6e-5 relative on the third validation loss).
    assert first["resumed"][2] == pytest.approx(first["straight"][2], rel=1e-3)
