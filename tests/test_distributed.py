"""Data-parallel hypergradients: 2 gloo ranks on CPU against the single-process, full-batch answer.

One spawn of 2 processes runs every scenario (hand-replicated and DDP models,
every solver, HyperOptimizer trajectories with inner DDP steps, checkpoint
resume, a NaN and an exception on one rank) and saves what each rank saw;
the tests below compare those records with references computed here, in one
process on the concatenated batches, in float64.
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from hyperopt_torch import (
    ConjugateGradient, Exact, HyperOptimizer, Identity, Minres, Neumann, NormalCG, Nystrom, implicit_hypergradient,
)
from recipes import common, reweighting, weight_decay
from recipes.cifar import write_cifar10
from conftest import spawn_ranks

DT = torch.float64
WORLD = 2
N_TRAIN, N_VAL = 16, 12  # split evenly over the ranks: the global loss is the mean of the shards' means
SOLVERS = {
    "nystrom": Nystrom(rank=8, rho=0.1),
    "nystrom-chunk3": Nystrom(rank=8, rho=0.1, chunk=3),
    "nystrom-gaussian": Nystrom(rank=8, rho=0.1, sketch="gaussian"),
    "cg": ConjugateGradient(iters=6, rho=0.1),
    "cg-tol": ConjugateGradient(iters=50, rho=0.1, tol=1e-6),
    "neumann": Neumann(iters=6, alpha=0.1),
    "minres": Minres(iters=6, rho=0.1),
    "normal_cg": NormalCG(iters=3, rho=0.1),
    "identity": Identity(),
    "exact": Exact(rho=0.1),
}
# One matvec call each, so one all-reduce (chunked Nyström and CG with tol are checked by bytes only).
ONE_CALL_PER_HVP_BATCH = {"nystrom": 1, "nystrom-gaussian": 1, "cg": 6, "neumann": 6, "minres": 6,
                          "normal_cg": 1 + 2 * 3, "identity": 0, "exact": 1}


def seeded(name, seed):
    """A fresh copy of ``SOLVERS[name]``; a Nyström copy's own generator seeded with ``seed``."""
    solver = copy.deepcopy(SOLVERS[name])
    if hasattr(solver, "generator"):
        solver.generator.manual_seed(seed)
    return solver


OUTER_STEPS, INNER_STEPS, CHECKPOINT_AT = 3, 5, 2
RECIPE_FLAGS = ["--outer-steps", "3", "--inner-steps", "20", "--dim", "10", "--n-train", "40", "--n-val", "40",
                "--n-test", "40", "--rank", "4", "--no-progress"]
REWEIGHTING_FLAGS = ["--outer-steps", "2", "--depth", "10", "--width", "1", "--resize", "16", "--imbalance", "10",
                     "--meta-fraction", "0.1", "--batch-size", "16", "--meta-batch", "16", "--hyper-every", "2",
                     "--rank", "3", "--eval-every", "2", "--test-subset", "40", "--no-progress"]
SPAWN_DEADLINE_S = 180


# -- the problem: a tanh MLP with one log-decay per parameter and an input scale in both losses ------------
def make_problem():
    g = torch.Generator().manual_seed(0)
    data = {
        "x": torch.randn(N_TRAIN, 4, generator=g, dtype=DT), "y": torch.randn(N_TRAIN, 1, generator=g, dtype=DT),
        "xv": torch.randn(N_VAL, 4, generator=g, dtype=DT), "yv": torch.randn(N_VAL, 1, generator=g, dtype=DT),
    }
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1)).to(DT)
    log_decay = [torch.full_like(p, -1.0).add_(0.1 * torch.randn(p.shape, generator=g, dtype=DT)).requires_grad_()
                 for p in model.parameters()]
    log_scale = torch.zeros((), dtype=DT, requires_grad=True)
    return data, model, [*log_decay, log_scale]


def shard(data, rank, world):
    out = {}
    for key, t in data.items():
        n = len(t) // world
        out[key] = t[rank * n:(rank + 1) * n]
    return out


def loss_fns(data, hparams):
    *log_decay, log_scale = hparams

    def train(m):
        fit = ((m(data["x"] * log_scale.exp()) - data["y"]) ** 2).mean()
        return fit + 0.5 * sum((d.exp() * p.square()).sum() for d, p in zip(log_decay, m.parameters()))

    def val(m):
        return ((m(data["xv"] * log_scale.exp()) - data["yv"]) ** 2).mean()

    return train, val


def flat(tensors):
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def trajectory(model, hparams, data, hopt, steps, after=None):
    """``steps`` outer steps: INNER_STEPS of SGD on f (``model`` may be DDP), then hopt.step; returns infos."""
    train, val = loss_fns(data, hparams)
    fixed_train, _ = loss_fns(data, [h.detach() for h in hparams])
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    infos = []
    for step in range(steps):
        for _ in range(INNER_STEPS):
            inner.zero_grad()
            fixed_train(model).backward()
            inner.step()
        infos.append(hopt.step(train, val, model))
        if after is not None:
            after(step)
    return infos


# -- what each rank does ---------------------------------------------------------------------------------
def _gathered_equal(t: torch.Tensor) -> bool:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return all(torch.equal(parts[0], q) for q in parts[1:])


def _no_plot(path, draw, **kwargs):
    """Stands in for common.save_figure: matplotlib would double the CPU time of this file."""
    return False


class _PlainSolver:
    """A custom solver as a user writes one: no __repr__, no state."""

    name = "plain"
    damping = 0.0

    def solve(self, matvec, b, generator=None):
        return b.clone()


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    # For section 5; created now, while the ranks are in step (creating a group waits for all under its timeout).
    short = dist.new_group(backend="gloo", timeout=timedelta(seconds=5))
    record = {}
    full, model, hparams = make_problem()
    data = shard(full, rank, WORLD)
    train, val = loss_fns(data, hparams)

    # 1. One hypergradient per solver, hand-replicated and DDP-wrapped; generators seeded differently per rank.
    ddp = nn.parallel.DistributedDataParallel(model)
    for kind, m in (("replica", model), ("ddp", ddp)):
        for name, solver in SOLVERS.items():
            generator = torch.Generator().manual_seed(100 + rank)
            grads, info = implicit_hypergradient(hparams, train, val, m, solver, generator=generator, residual=True)
            record[kind, name] = {"grad": flat(grads), "info": info, "same": _gathered_equal(flat(grads)),
                                  "generator": generator.get_state()}
    torch.manual_seed(rank)  # no generator: the ranks' global generators differ, the sketch must not
    grads, _ = implicit_hypergradient(hparams, train, val, model, SOLVERS["nystrom"])
    record["no generator"] = _gathered_equal(flat(grads))
    try:  # refused before any collective: the ranks could size κ differently and deadlock
        implicit_hypergradient(hparams, train, val, model, Nystrom(rank=8, rho=0.1, chunk="auto"))
        record["auto chunk"] = "accepted"
    except ValueError as error:
        record["auto chunk"] = str(error)
    hopt = HyperOptimizer(hparams, base=torch.optim.SGD, ihvp=seeded("nystrom", rank), lr=0.0)
    hopt.zero_grad()
    hopt.accumulate(train, val, ddp)
    record["accumulate"] = flat(h.grad for h in hparams)

    # 2. HyperOptimizer trajectory with inner DDP steps, checkpointed on rank 0 after CHECKPOINT_AT steps.
    path = Path(out_dir) / "checkpoint.pt"

    def save(step):
        if step + 1 == CHECKPOINT_AT and rank == 0:
            torch.save({"hparams": [h.detach() for h in hparams], "hopt": hopt.state_dict(),
                        "model": model.state_dict()}, path)

    for name in ("nystrom", "nystrom-gaussian", "cg", "neumann"):
        _, model, hparams = make_problem()
        ddp = nn.parallel.DistributedDataParallel(model)
        hopt = HyperOptimizer(hparams, base=torch.optim.SGD, ihvp=seeded(name, rank), lr=0.5, momentum=0.5)
        infos = trajectory(ddp, hparams, data, hopt, OUTER_STEPS, after=save)
        record["trajectory", name] = {"hparams": flat(hparams), "model": flat(model.parameters()),
                                      "same": _gathered_equal(torch.cat([flat(hparams), flat(model.parameters())])),
                                      "skipped": [i.skipped for i in infos]}
        dist.barrier()  # the checkpoint is on disk
        state = torch.load(path, weights_only=True)
        _, model, hparams = make_problem()
        model.load_state_dict(state["model"])
        with torch.no_grad():
            for h, saved in zip(hparams, state["hparams"]):
                h.copy_(saved)
        ddp = nn.parallel.DistributedDataParallel(model)
        hopt = HyperOptimizer(hparams, base=torch.optim.SGD, ihvp=seeded(name, 12345), lr=0.5, momentum=0.5)
        hopt.load_state_dict(state["hopt"])
        trajectory(ddp, hparams, data, hopt, OUTER_STEPS - CHECKPOINT_AT)
        record["resumed", name] = {"hparams": flat(hparams), "model": flat(model.parameters())}
        dist.barrier()  # nobody overwrites the checkpoint while another rank reads it

    # 3. A NaN training loss on rank 1 only: skipped on both ranks, nothing changed; the next step still works.
    _, model, hparams = make_problem()
    ddp = nn.parallel.DistributedDataParallel(model)
    hopt = HyperOptimizer(hparams, base=torch.optim.SGD, ihvp=seeded("nystrom", 0), lr=0.5)
    train, val = loss_fns(data, hparams)
    before, generator_before = flat(hparams), hopt.solver.generator.get_state()
    poisoned = (lambda m: train(m) * math.nan) if rank == 1 else train
    with pytest.warns(RuntimeWarning, match="skipped"):
        info = hopt.step(poisoned, val, ddp)
    record["nan"] = {"skipped": info.skipped, "unchanged": torch.equal(flat(hparams), before),
                     "generator_unchanged": torch.equal(hopt.solver.generator.get_state(), generator_before)}
    info = hopt.step(train, val, ddp)
    record["nan"]["then"] = {"skipped": info.skipped, "same": _gathered_equal(flat(hparams))}

    # 4. The weight-decay recipe as under torchrun (the group is already initialised): rank 0 writes its outputs.
    common.save_figure = _no_plot
    weight_decay.main([*RECIPE_FLAGS, "--out", str(Path(out_dir) / "recipe")])
    # The reweighting recipe (DDP WideResNet, batches sharded): every rank takes the same hyperparameter steps.
    metrics = reweighting.main(["--data-root", str(Path(out_dir) / "cifar"), "--out", str(Path(out_dir) / "reweighting"),
                                *REWEIGHTING_FLAGS])
    record["reweighting"] = {"val_loss": metrics["curves"]["val_loss"], "test_acc": metrics["final"]["test_acc"],
                             "same": _gathered_equal(torch.tensor(metrics["curves"]["val_loss"]))}
    try:
        common.shard(torch.zeros(3))
    except common.RecipeError as error:
        record["uneven shard"] = str(error)

    # 4b. Ranks that disagree (issue 17 C): one small collective on the first step tells every rank, by name, instead
    #     of gloo's C++ terminate; the group stays usable.  A HyperOptimizer checks on its first step and after a load.
    _, model, hparams = make_problem()
    train, val = loss_fns(data, hparams)
    odd = torch.zeros(2 if rank == 0 else 3, dtype=DT, requires_grad=True)
    record["disagree"] = {}
    for label, solver, phis in (("nystrom rank", Nystrom(rank=3 if rank == 0 else 5, rho=0.1), hparams),
                                ("cg iters", ConjugateGradient(10 if rank == 0 else 20, rho=0.1), hparams),
                                ("hparam shapes", ConjugateGradient(4, rho=0.1), [*hparams, odd])):
        try:
            implicit_hypergradient(phis, train, val, model, solver)
            record["disagree"][label] = "accepted"
        except ValueError as error:
            record["disagree"][label] = str(error)
    # A custom solver without a __repr__ (its default repr holds an address, different on every rank) agrees.
    record["custom solver"] = flat(implicit_hypergradient(hparams, train, val, model, _PlainSolver()).grads)
    checked = HyperOptimizer(hparams, base=torch.optim.SGD, ihvp=seeded("cg", 0), lr=0.1)
    counts = [checked.step(train, val, model).collectives, checked.step(train, val, model).collectives]
    checked.load_state_dict(checked.state_dict())
    counts.append(checked.step(train, val, model).collectives)
    record["agreement"] = {"collectives": counts, "same": _gathered_equal(flat(hparams))}

    # 5. An exception on rank 1 while rank 0 waits in a collective: a short-timeout group makes rank 0 raise too.
    dist.barrier()  # rank 0 wrote the recipe's outputs: start in step, the short timeout is for the failure only
    ddp = nn.parallel.DistributedDataParallel(make_problem()[1], process_group=short)
    before, generator_before = flat(hparams), hopt.solver.generator.get_state()

    def failing(m):
        if rank == 1:
            raise ValueError("rank 1 failed in train_loss_fn")
        return train(m)

    try:
        hopt.step(failing, val, ddp)
        record["failure"] = {"raised": None}
    except Exception as error:  # rank 0: gloo's timeout (or the peer's closed connection); rank 1: its own error
        record["failure"] = {"raised": f"{type(error).__name__}: {error}"[:300]}
    record["failure"].update(unchanged=torch.equal(flat(hparams), before),
                             generator_unchanged=torch.equal(hopt.solver.generator.get_state(), generator_before))
    torch.save(record, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()  # the default group (long timeout) is still healthy: keep rank 1 alive until rank 0 has raised
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks():
    """Run the two ranks (killed after SPAWN_DEADLINE_S so that nothing hangs); their records."""
    with tempfile.TemporaryDirectory() as tmp:
        write_cifar10(Path(tmp) / "cifar", n_train=500, n_test=50)
        records = spawn_ranks(_worker, WORLD, SPAWN_DEADLINE_S, Path(tmp))
        records[0]["recipe files"] = sorted(p.name for p in (Path(tmp) / "recipe").iterdir())
        records[0]["recipe metrics"] = json.loads((Path(tmp) / "recipe" / "metrics.json").read_text())
        yield records


# -- single-process references on the concatenated batches ----------------------------------------------
def rel(x, y):
    return ((x - y).norm() / y.norm()).item()


def reference_hypergradient(name, generator_seed=100):
    data, model, hparams = make_problem()
    train, val = loss_fns(data, hparams)
    generator = torch.Generator().manual_seed(generator_seed)
    grads, info = implicit_hypergradient(hparams, train, val, model, SOLVERS[name], generator=generator, residual=True)
    return flat(grads), info, generator.get_state()


def reference_trajectory(name):
    data, model, hparams = make_problem()
    hopt = HyperOptimizer(hparams, base=torch.optim.SGD, ihvp=seeded(name, 0), lr=0.5, momentum=0.5)
    trajectory(model, hparams, data, hopt, OUTER_STEPS)
    return flat(hparams), flat(model.parameters())


# -- the checks ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["replica", "ddp"])
@pytest.mark.parametrize("name", list(SOLVERS))
def test_hypergradient_equals_single_process_full_batch(ranks, kind, name):
    expected, ref_info, ref_generator = reference_hypergradient(name)
    for r, record in enumerate(ranks):
        got = record[kind, name]
        assert got["same"], f"rank hypergradients differ ({kind}, {name})"
        assert rel(got["grad"], expected) < 1e-8, (kind, name, r)
        info = got["info"]
        assert not info.skipped
        assert abs(info.train_loss - ref_info.train_loss) <= 1e-12 * ref_info.train_loss
        assert abs(info.val_loss - ref_info.val_loss) <= 1e-12 * ref_info.val_loss
        assert abs(info.residual - ref_info.residual) <= 1e-9  # ‖r‖/‖b‖: rounding of the products, relative to ‖b‖
        if name == "cg":  # negative curvature: one process returns there, data-parallel masks the rest
            assert info.negative_curvature and ref_info.hvps < info.hvps == SOLVERS[name].iters + 1
        else:
            assert info.hvps == ref_info.hvps
        # Every rank continues from rank 0's generator (seeded 100) whatever its own seed was.
        assert torch.equal(got["generator"], ref_generator)


@pytest.mark.parametrize("name", list(SOLVERS))
def test_communication_is_counted_per_method(ranks, name):
    """Broadcast of the generator, direct term (p + |φ|), the HVPs (hvps·p), residual HVP, mixed term (|φ|), six checks;
    and the ranks' agreement check (one all_gather_object of a short description: a collective, its bytes pickled
    by torch.distributed and not counted)."""
    _, model, hparams = make_problem()
    p, n_phi = sum(t.numel() for t in model.parameters()), sum(h.numel() for h in hparams)
    generator_bytes = torch.Generator().get_state().numel()
    info = ranks[0]["replica", name]["info"]
    assert info.comm_bytes == generator_bytes + 8 * ((p + n_phi) + info.hvps * p + n_phi + 6)
    if name in ONE_CALL_PER_HVP_BATCH:
        # + 1 for the residual's HVP.  CG meets negative curvature here but, data-parallel, keeps the masked
        # loop (no value-dependent return between all-reduces): all its products are still made.
        assert info.collectives == 5 + ONE_CALL_PER_HVP_BATCH[name] + 1
    assert ranks[1]["ddp", name]["info"].comm_bytes == info.comm_bytes


def test_nystrom_without_generator_draws_one_sketch_for_all_ranks(ranks):
    assert ranks[0]["no generator"]


def test_auto_chunk_is_refused_data_parallel_on_every_rank(ranks):
    for record in ranks:
        assert "cannot be used data-parallel" in record["auto chunk"] and "chunk='auto'" in record["auto chunk"]


def test_accumulate_with_per_rank_seeds_matches_single_process(ranks):
    _, model, hparams = make_problem()
    expected, _, _ = reference_hypergradient("nystrom", generator_seed=0)
    for record in ranks:
        assert rel(record["accumulate"], expected) < 1e-8


@pytest.mark.parametrize("name", ["nystrom", "nystrom-gaussian", "cg", "neumann"])
def test_hyperoptimizer_with_inner_ddp_steps_matches_single_process(ranks, name):
    """Identical hparams and θ on both ranks after several outer steps with DDP inner steps between them."""
    hparams, params = reference_trajectory(name)
    for record in ranks:
        got = record["trajectory", name]
        assert got["same"] and not any(got["skipped"])
        assert rel(got["hparams"], hparams) < 1e-8
        assert rel(got["model"], params) < 1e-8


@pytest.mark.parametrize("name", ["nystrom", "nystrom-gaussian", "cg", "neumann"])
def test_checkpoint_saved_on_rank0_resumes_identically_on_all_ranks(ranks, name):
    for record in ranks:
        assert rel(record["resumed", name]["hparams"], record["trajectory", name]["hparams"]) < 1e-13
        assert rel(record["resumed", name]["model"], record["trajectory", name]["model"]) < 1e-13


def test_nan_on_one_rank_skips_the_step_on_every_rank(ranks):
    for record in ranks:
        assert record["nan"]["skipped"] and record["nan"]["unchanged"] and record["nan"]["generator_unchanged"]
        assert not record["nan"]["then"]["skipped"] and record["nan"]["then"]["same"]


@pytest.mark.parametrize("label, setting", [("nystrom rank", "solver"), ("cg iters", "solver"),
                                            ("hparam shapes", "hparams")])
def test_ranks_that_disagree_each_raise_a_python_error_naming_the_setting(ranks, label, setting):
    """Rank 0 with Nystrom(rank=3), rank 1 with rank=5 (or CG with 10 against 20 iterations, or hparams of other
    shapes) made different collectives: gloo killed rank 0 in C++ ("Received data size doesn't match")."""
    for record in ranks:
        message = record["disagree"][label]
        assert message.startswith("the ranks disagree") and f"{setting}: rank 0 has" in message


def test_a_custom_solver_without_a_repr_is_agreed_on_by_its_class_and_attributes(ranks):
    assert rel(ranks[0]["custom solver"], ranks[1]["custom solver"]) == 0


def test_a_hyperoptimizer_checks_agreement_on_its_first_step_and_after_a_load_only(ranks):
    for record in ranks:
        first, second, after_load = record["agreement"]["collectives"]
        assert first == second + 1 and after_load == first and record["agreement"]["same"]


def test_exception_on_one_rank_raises_on_every_rank_and_changes_nothing(ranks):
    assert "rank 1 failed" in ranks[1]["failure"]["raised"]
    assert ranks[0]["failure"]["raised"] is not None  # the collective rank 0 waited in timed out
    for record in ranks:
        assert record["failure"]["unchanged"] and record["failure"]["generator_unchanged"]


def test_weight_decay_recipe_on_two_ranks_matches_one_process(ranks, tmp_path, monkeypatch):
    """The recipe's own curves (float32) from 2 ranks, written by rank 0 alone, against a 1-process run."""
    monkeypatch.setattr(common, "save_figure", _no_plot)
    single = weight_decay.main([*RECIPE_FLAGS, "--out", str(tmp_path)])
    assert ranks[0]["recipe files"] == sorted(p.name for p in tmp_path.iterdir())
    two = ranks[0]["recipe metrics"]["methods"]["nystrom"]["curves"]
    for name, curves in single["methods"]["nystrom"]["curves"].items():
        if name != "seconds":
            assert torch.tensor(two[name]).double() == pytest.approx(torch.tensor(curves).double(), rel=1e-4), name


def test_reweighting_recipe_runs_on_two_ranks_that_agree(ranks):
    """Both ranks log the same (rank-averaged) validation losses and test accuracy.  Not equal to one process:
    BatchNorm normalises each rank's share of a batch, as in any DDP run without SyncBatchNorm."""
    first, second = (record["reweighting"] for record in ranks)
    assert first["same"] and second["same"]
    assert first["val_loss"] == second["val_loss"] and first["test_acc"] == second["test_acc"]
    assert len(first["val_loss"]) == 2 and all(math.isfinite(v) for v in first["val_loss"])


def test_uneven_shards_are_refused_with_the_sizes(ranks):
    assert "a batch of 3 cannot be split evenly over 2 ranks" in ranks[0]["uneven shard"]
