"""What every recipe shares: flags, solver, device, output folder, checkpoints, progress and plots.

A recipe builds its parser with :func:`make_parser` (the common flags) plus its
own flags, then inside ``with clean_errors():`` calls :func:`prepare_out`,
:func:`solver_from_args` and :func:`resolve_device`.  Outputs land in
``--out``: ``config.json`` (the flags), ``metrics.json`` (final numbers and
per-outer-step curves), PNG plots, and ``checkpoints/`` for ``--resume``.

Under ``torchrun`` a recipe also calls :func:`init_torchrun` on its device and
takes its batches through :func:`shard`; :func:`write_json`,
:class:`Checkpoint`, :func:`progress` and :func:`save_figure` then act on
rank 0 only (docs/distributed.md).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from hyperopt_torch import make_solver
from hyperopt_torch.ihvp import SOLVER_SETTINGS
from hyperopt_torch.ihvp.nystrom import SKETCHES

from .data import DatasetMissing

# Which flags each solver reads: the library's one settings table (every setting is a flag of
# make_parser, with "--seed" serving Nyström's seed; tests/test_recipes_common.py checks this).
SOLVER_FLAGS = SOLVER_SETTINGS
SOLVERS = tuple(SOLVER_FLAGS)

# Flags that may change between a run and its --resume: they do not change the result.
RESUMABLE_CHANGES = {"resume", "outer_steps", "device", "threads", "progress", "checkpoint_every", "out"}  # "out": a run folder may be moved
RUN_INFO = {"command", "torch"}  # written to config.json next to the flags


class RecipeError(RuntimeError):
    """A user-facing problem (bad flag combination, missing file): printed as one line, exit status 1."""


@contextlib.contextmanager
def clean_errors() -> Iterator[None]:
    """Turn :class:`RecipeError` and :class:`DatasetMissing` into ``SystemExit("error: ...")`` (no traceback).

    The message is folded onto one line.
    """
    try:
        yield
    except (RecipeError, DatasetMissing) as error:
        raise SystemExit("error: " + " ".join(str(error).split())) from None


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def chunk_value(text: str) -> int | str:
    """``--chunk``: an integer >= 1, or ``auto`` (the largest κ that fits the device's free memory)."""
    return "auto" if text == "auto" else positive_int(text)


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def nonnegative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def check_finite(loss: torch.Tensor | float, what: str, hint: str) -> None:
    """Stop the run with a :class:`RecipeError` if ``loss`` (a number or a tensor of them) is not finite.

    A diverged inner loop (too large a learning rate, for example) otherwise runs to the end with NaN
    curves and exit status 0.  ``what`` names the value, ``hint`` the flags to change.  A tensor costs
    one host synchronisation, so call this once per outer step, not once per inner step.
    """
    values = torch.as_tensor(loss)
    if not bool(torch.isfinite(values).all()):
        bad = values[~torch.isfinite(values)].flatten()[0].item()
        raise RecipeError(f"{what} became {bad}: the inner loop diverged; {hint}")


def outer_step(hopt, train_loss_fn: Callable, val_loss_fn: Callable, model: torch.nn.Module, solver: str):
    """``hopt.step(train_loss_fn, val_loss_fn, model)``, with the library's refusals as one-line errors.

    The library raises ``ValueError`` when a solver cannot serve this problem (for example ``Exact``'s
    dense Hessian for a model too large for it); in a recipe that is a flag choice, not a bug.

    Raises:
        RecipeError: the ``ValueError``'s message, prefixed with ``--ihvp <solver>``.
    """
    try:
        return hopt.step(train_loss_fn, val_loss_fn, model)
    except ValueError as error:
        raise RecipeError(f"--ihvp {solver}: {error}") from None


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except for on/off switches and ``None`` (whose help text says what happens)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.nargs == 0 or action.default is None:
            return action.help
        return super()._get_help_string(action)


def make_parser(prog: str, description: str, *, outer_steps: int, rank: int, rho: float, iters: int, alpha: float,
                threads: int | None = None, ihvp_choices: tuple[str, ...] = SOLVERS) -> argparse.ArgumentParser:
    """A parser with the flags every recipe takes; the defaults are the recipe's (the paper's) values."""
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=_DefaultsFormatter)
    solver = parser.add_argument_group("inverse-Hessian-vector product (paper symbols in brackets)")
    solver.add_argument("--ihvp", choices=ihvp_choices, default="nystrom", help="solver for (H + ρI)⁻¹ ∇_θ g")
    solver.add_argument("--rank", type=positive_int, default=rank, help="Nyström rank [k]")
    solver.add_argument("--rho", type=positive_float, default=rho,
                        help="Nyström regulariser [ρ]; also the damping of cg, minres, normal_cg and exact")
    solver.add_argument("--chunk", type=chunk_value, default=None,
                        help="Nyström columns held at once [κ], 1..rank or 'auto' (the largest that fits the "
                             "device's free memory); default rank (time-efficient)")
    solver.add_argument("--iters", type=positive_int, default=iters,
                        help="cg / minres / normal_cg / Neumann iterations [l]")
    solver.add_argument("--alpha", type=positive_float, default=alpha, help="Neumann step size [α]")
    solver.add_argument("--sketch", choices=SKETCHES, default="columns",
                        help="Nyström test matrix Ω: random Hessian columns (the paper) or Gaussian")
    solver.add_argument("--tol", type=positive_float, default=None,
                        help="cg, minres, normal_cg: stop once ‖r‖ ≤ tol·‖b‖ (normal_cg: of A²x = Ab); "
                             "default run all --iters iterations")
    run = parser.add_argument_group("run")
    run.add_argument("--outer-steps", type=positive_int, default=outer_steps, help="budget: hyperparameter updates")
    run.add_argument("--seed", type=int, default=0, help="seed of data, initialisation and sketches")
    run.add_argument("--device", default=None, help="torch device; default cuda when available, else cpu")
    run.add_argument("--threads", type=positive_int, default=threads,
                     help="CPU threads for torch (torch.set_num_threads)" + ("; default torch's own choice" if threads is None else ""))
    run.add_argument("--out", type=Path, default=Path("runs") / prog.rsplit(".", 1)[-1], help="output folder")
    run.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    run.add_argument("--checkpoint-every", type=positive_int, default=25, help="outer steps between checkpoints")
    run.add_argument("--no-progress", dest="progress", action="store_false", help="hide the tqdm progress bar")
    return parser


def solver_from_args(args: argparse.Namespace, name: str | None = None, **overrides):
    """``make_solver(name, ...)`` with only the flags that apply to ``name`` (default ``args.ihvp``).

    ``overrides`` replace flag values where the solver takes that setting (a
    recipe running several seeds passes ``seed=`` for Nyström's sketches) and
    are ignored where it does not.

    Raises:
        RecipeError: an invalid combination, e.g. ``--chunk`` larger than ``--rank``.
    """
    name = name or args.ihvp
    values = {**vars(args), **overrides}
    try:
        return make_solver(name, **{flag: values[flag] for flag in SOLVER_FLAGS[name]})
    except ValueError as error:
        raise RecipeError(str(error)) from None


def resolve_device(name: str | None, threads: int | None = None) -> torch.device:
    """``torch.device(name)``, or cuda when available for ``None``; sets torch's CPU threads when given.

    Raises:
        RecipeError: an unknown device string, or cuda requested where there is none.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RecipeError(f"invalid --device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RecipeError(f"--device {name} requested but CUDA is not available")
    return device


def prepare_out(args: argparse.Namespace) -> Path:
    """Create ``args.out`` and write ``config.json``; with ``--resume`` first check it matches the saved one.

    Raises:
        RecipeError: ``--resume`` with no earlier run in ``--out``, or with
            flags that would change the result.
    """
    out = Path(args.out)
    config = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}
    path = out / "config.json"
    if args.resume:
        if not path.exists():
            raise RecipeError(f"--resume: no earlier run in {out} (missing config.json)")
        saved = json.loads(path.read_text())
        changed = sorted(k for k in (set(saved) - RUN_INFO) | set(config)
                         if k not in RESUMABLE_CHANGES and saved.get(k) != config.get(k))
        if changed:
            details = ", ".join(f"{k}: {saved.get(k)!r} -> {config.get(k)!r}" for k in changed)
            raise RecipeError(f"--resume with different settings than the run in {out} ({details})")
    out.mkdir(parents=True, exist_ok=True)
    config.update(command=" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), torch=torch.__version__)
    write_json(path, config)
    return out


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically (a reader never sees half a file); rank 0 only."""
    if not is_main():
        return
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


class Checkpoint:
    """One resumable run's state in ``<out>/checkpoints/<name>.pt``.

    ``load()`` returns the saved dict, or ``None`` when ``resume`` is false or
    nothing was saved, so a fresh run overwrites an old one.  The dict holds
    tensors, numbers, strings, lists and dicts only (read with ``weights_only``).
    """

    def __init__(self, out: Path, name: str, *, resume: bool):
        self.path = Path(out) / "checkpoints" / f"{name}.pt"
        self.resume = resume

    def load(self) -> dict[str, Any] | None:
        if not (self.resume and self.path.exists()):
            return None
        return torch.load(self.path, map_location="cpu", weights_only=True)

    def save(self, state: dict[str, Any]) -> None:
        if not is_main():  # the ranks hold the same state; every rank loads rank 0's file
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path)


def progress(args: argparse.Namespace, *, total: int, initial: int, desc: str) -> tqdm:
    """tqdm bar over outer steps; the recipe sets ``val=...`` as postfix after every step."""
    return tqdm(total=total, initial=initial, desc=desc, unit="step", disable=not (args.progress and is_main()),
                dynamic_ncols=True, mininterval=0.5)


def save_figure(path: str | os.PathLike, draw: Callable[[Any], None], *, figsize=(7.0, 6.0)) -> bool:
    """Draw with ``draw(fig)`` on a new matplotlib Figure and save it as PNG at ``path``.

    matplotlib is optional: without it, print that the plot was skipped and return False.
    Other ranks than 0 draw nothing and return False.
    """
    if not is_main():
        return False
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print(f"plot skipped: matplotlib is not installed (pip install matplotlib); {path} not written")
        return False
    fig = Figure(figsize=figsize, layout="constrained")
    draw(fig)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")
    return True


# -- torchrun: data parallelism over ranks (docs/distributed.md) ---------------------------------------------
def init_torchrun(device: torch.device) -> torch.device:
    """Join the process group when launched by ``torchrun`` with more than one process; the rank's device.

    Initialises the default group from torchrun's environment (``nccl`` for a
    CUDA ``device``, ``gloo`` otherwise; destroyed at exit) and returns
    ``cuda:LOCAL_RANK`` for CUDA, ``device`` otherwise.  In a single process it
    returns ``device`` and does nothing.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    atexit.register(dist.destroy_process_group)
    return device


def ranks() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Whether this process writes outputs and shows progress (rank 0, or the only process)."""
    return ranks()[0] == 0


def shard(batch: Tensor) -> Tensor:
    """This rank's contiguous, equal share of ``batch`` along dim 0 (all of it in a single process).

    Equal shares make the mean of the ranks' mean losses the loss of the whole
    batch, which is what the data-parallel hypergradient averages.

    Raises:
        RecipeError: ``len(batch)`` is not a multiple of the number of ranks.
    """
    rank, world = ranks()
    if len(batch) % world:
        raise RecipeError(f"a batch of {len(batch)} cannot be split evenly over {world} ranks: "
                          f"choose sizes divisible by {world}")
    n = len(batch) // world
    return batch[rank * n:(rank + 1) * n]


def mean_over_ranks(t: Tensor) -> Tensor:
    """The mean of ``t`` over ranks (one all-reduce; ``t`` itself in a single process), e.g. shard losses."""
    if ranks()[1] == 1:
        return t
    t = t.detach().clone()
    dist.all_reduce(t)
    return t.div_(dist.get_world_size())


def data_parallel(model: nn.Module) -> nn.Module:
    """``model`` wrapped in ``DistributedDataParallel`` under torchrun, else ``model``.

    HyperOptimizer takes the wrapped model as it is: it averages every term of
    the hypergradient over the ranks itself.
    """
    if ranks()[1] == 1:
        return model
    device = next(model.parameters()).device
    return nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
