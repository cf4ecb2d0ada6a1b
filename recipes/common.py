"""What every recipe shares: flags, solver, device, output folder, checkpoints, progress and plots.

A recipe builds its parser with :func:`make_parser` (the common flags) plus its
own flags, then inside ``with clean_errors():`` calls :func:`prepare_out`,
:func:`solver_from_args` and :func:`resolve_device`.  Outputs land in
``--out``: ``config.json`` (the flags), ``metrics.json`` (final numbers and
per-outer-step curves), PNG plots, and ``checkpoints/`` for ``--resume``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from tqdm import tqdm

from hyperopt_torch import make_solver

from .data import DatasetMissing

# Which common flags each solver reads; make_solver rejects any other keyword.
SOLVER_FLAGS = {
    "nystrom": ("rank", "rho", "chunk"),
    "cg": ("iters", "rho"),
    "neumann": ("iters", "alpha"),
    "identity": (),
    "exact": ("rho",),
}
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
                        help="Nyström regulariser [ρ]; also the damping of cg and exact")
    solver.add_argument("--chunk", type=positive_int, default=None,
                        help="Nyström columns held at once [κ], 1..rank; default rank (time-efficient)")
    solver.add_argument("--iters", type=positive_int, default=iters, help="cg / Neumann iterations [l]")
    solver.add_argument("--alpha", type=positive_float, default=alpha, help="Neumann step size [α]")
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


def solver_from_args(args: argparse.Namespace, name: str | None = None):
    """``make_solver(name, ...)`` with only the flags that apply to ``name`` (default ``args.ihvp``).

    Raises:
        RecipeError: an invalid combination, e.g. ``--chunk`` larger than ``--rank``.
    """
    name = name or args.ihvp
    try:
        return make_solver(name, **{flag: getattr(args, flag) for flag in SOLVER_FLAGS[name]})
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
    """Write ``obj`` as indented JSON, atomically (a reader never sees half a file)."""
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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path)


def progress(args: argparse.Namespace, *, total: int, initial: int, desc: str) -> tqdm:
    """tqdm bar over outer steps; the recipe sets ``val=...`` as postfix after every step."""
    return tqdm(total=total, initial=initial, desc=desc, unit="step", disable=not args.progress,
                dynamic_ncols=True, mininterval=0.5)


def save_figure(path: str | os.PathLike, draw: Callable[[Any], None], *, figsize=(7.0, 6.0)) -> bool:
    """Draw with ``draw(fig)`` on a new matplotlib Figure and save it as PNG at ``path``.

    matplotlib is optional: without it, print that the plot was skipped and return False.
    """
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
