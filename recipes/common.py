"""What every recipe shares: flags, solver, device, output folder, checkpoints, errors, progress and plots.

Plumbing only: a recipe's algorithm (its inner loop and its ``hopt.step``)
stays in the recipe.  A recipe decorates its ``main(argv=None)`` with
:func:`command`, builds its parser with :func:`make_parser` (the common flags)
plus its own flags, then calls :func:`solver_from_args`,
:func:`resolve_device` and :func:`prepare_out`.  Outputs land in ``--out``:
``config.json`` (the flags), ``metrics.json`` (final numbers and
per-outer-step curves), PNG plots, and ``checkpoints/`` for ``--resume``.

Errors: a user-facing problem (a bad flag combination, a missing or corrupt
file, a diverged inner loop, a solver that refuses the model) ends the run
with one line ``error: ...`` on stderr and exit status 1, on its own line
even while a progress bar shows; a bad flag value is an argparse usage error
(exit status 2).  :func:`command` does this once for every recipe.

Under ``torchrun`` a recipe also calls :func:`init_torchrun` on its device and
takes its batches through :func:`shard`; :func:`write_json`,
:class:`Checkpoint`, :func:`progress` and :func:`save_figure` then act on
rank 0 only (docs/distributed.md).
"""

from __future__ import annotations

import argparse
import atexit
import functools
import json
import math
import os
import sys
import warnings
import weakref
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

import hyperopt_torch
from hyperopt_torch import Exact, make_solver
from hyperopt_torch.ihvp import SOLVER_SETTINGS
from hyperopt_torch.ihvp.nystrom import SKETCHES

from .data import DataError

# Which flags each solver reads: the library's one settings table (every setting is a flag of
# make_parser, with "--seed" serving Nyström's seed; tests/test_recipes_common.py checks this).
SOLVER_FLAGS = SOLVER_SETTINGS
SOLVERS = tuple(SOLVER_FLAGS)

# Flags that may change between a run and its --resume: they do not change the result.
RESUMABLE_CHANGES = {"resume", "overwrite", "outer_steps", "device", "threads", "progress", "checkpoint_every",
                     "max_memory", "out"}  # "out": a run folder may be moved
RUN_INFO = {"command", "torch"}  # written to config.json next to the flags
# What a run writes into --out, and so what --overwrite removes (nothing else in the folder is touched).
RUN_FILES = ("config.json", "metrics.json", "solver_check.json")
RUN_GLOBS = ("*.png", "checkpoints/*.pt", "checkpoints/*.tmp")
GIB = 2**30
LIBRARY = Path(hyperopt_torch.__file__).parent
# The library names its own keywords where a recipe user sets a flag instead.
LIBRARY_KEYWORDS_AS_FLAGS = {"Exact(max_memory=...)": "--max-memory (GiB)"}


class RecipeError(RuntimeError):
    """A user-facing problem (bad flag combination, diverged training, unusable --out): one line, exit status 1."""


# -- errors: one line, exit status 1 ------------------------------------------------------------------------
def command(main: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a recipe's ``main(argv=None)``: user-facing failures become ``SystemExit("error: ...")``.

    :class:`RecipeError`, :class:`~recipes.data.DataError` (missing or corrupt
    data) and a ``ValueError`` raised inside ``hyperopt_torch`` (the library
    refusing a setting or a model, which in a recipe is a flag choice, not a
    bug) are folded onto one line; Python prints it to stderr and exits with
    status 1.  Any other exception keeps its traceback.  Either way the open
    progress bars are closed first, so the message starts on a line of its own.
    """

    @functools.wraps(main)
    def run(argv=None):
        try:
            with warnings.catch_warnings():
                # A step skipped for a non-finite hypergradient or loss is turned into the one-line error of
                # check_hypergradient right after it: the library's own warning would only repeat it.
                warnings.filterwarnings("ignore", message="non-finite hypergradient or loss", category=RuntimeWarning)
                return main(argv)
        except BaseException as error:
            for bar in list(_BARS):
                bar.close()
            message = _user_message(error)
            if message is None:
                raise
            raise SystemExit("error: " + " ".join(message.split())) from None

    return run


def _user_message(error: BaseException) -> str | None:
    if isinstance(error, (RecipeError, DataError)):
        return str(error)
    if isinstance(error, ValueError) and _raised_in(error, LIBRARY):
        message = str(error)
        for keyword, flag in LIBRARY_KEYWORDS_AS_FLAGS.items():
            message = message.replace(keyword, flag)
        return message
    return None


def _raised_in(error: BaseException, package: Path) -> bool:
    """Whether the innermost frame of ``error``'s traceback is a file of ``package``."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and Path(tb.tb_frame.f_code.co_filename).is_relative_to(package)


# -- flag values: argparse usage errors (exit status 2) -----------------------------------------------------
# Each flag type says what it expected (argparse would otherwise print "invalid positive_int value").
def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def chunk_value(text: str) -> int | str:
    """``--chunk``: an integer >= 1, or ``auto`` (the largest κ that fits the device's free memory)."""
    try:
        return "auto" if text == "auto" else positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1 or 'auto', got {text}") from None


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text}") from None


def positive_float(text: str) -> float:
    value = _number(text)
    if not (value > 0 and math.isfinite(value)):  # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def nonnegative_float(text: str) -> float:
    value = _number(text)
    if not (value >= 0 and math.isfinite(value)):  # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


# -- diverged training: one line, exit status 1 -------------------------------------------------------------
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


def check_hypergradient(info, where: str, hint: str) -> None:
    """Stop the run with a :class:`RecipeError` if the step ``info`` (a ``HypergradInfo``) met a diverged model.

    The library skips a step whose losses or hypergradient are not finite and
    only warns; in a recipe that means the inner loop left the region where
    float32 holds its numbers (a loss of 1e31 has no finite Hessian products),
    and every later step would be skipped too.  A Neumann series that diverged
    (``info.diverged``) is the solver's property, not the inner loop's: it
    stays a warning.
    """
    if info.skipped and not info.diverged:
        raise RecipeError(f"{where}: the step was skipped, its hypergradient or loss is not finite (training loss "
                          f"{info.train_loss:.3g}, validation loss {info.val_loss:.3g}): the inner loop diverged; {hint}")


# -- the common flags ---------------------------------------------------------------------------------------
class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except for on/off switches and ``None`` (whose help text says what happens)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.nargs == 0 or action.default is None:
            return action.help
        return super()._get_help_string(action)


class _Given(argparse._StoreAction):
    """Stores like ``store`` and records that the flag was on the command line (see :class:`_RecipeParser`)."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.given.add(self.dest)
        super().__call__(parser, namespace, values, option_string)


class _RecipeParser(argparse.ArgumentParser):
    """Says so, on one line of stderr, when a solver flag on the command line is read by no solver of the run.

    ``--ihvp neumann --rank 3`` would otherwise run Neumann and leave the rank unused without a word.  A
    notice, not an error: a sweep passes one set of flags to every ``--ihvp``.  With ``--ihvp all`` (or
    iMAML's ``--check-solvers``) a flag counts as read when one of the choices reads it.
    """

    def __init__(self, *args, ihvp_choices: tuple[str, ...], **kwargs):
        super().__init__(*args, **kwargs)
        self.ihvp_choices = tuple(ihvp_choices)
        self.given: set[str] = set()  # filled by _Given while parsing

    def parse_known_args(self, args=None, namespace=None):
        self.given = set()
        namespace, extras = super().parse_known_args(args, namespace)
        if getattr(namespace, "baseline", False) or os.environ.get("RANK", "0") != "0":
            return namespace, extras  # no solver runs; under torchrun rank 0 alone says it
        ihvp = getattr(namespace, "ihvp", None)
        # --ihvp all, and iMAML's --check-solvers (which compares every solver), read every solver's flags
        every = ihvp == "all" or getattr(namespace, "check_solvers", False)
        names = [c for c in self.ihvp_choices if c != "all"] if every else [ihvp]
        for dest in sorted(self.given & set(_FLAG_SOLVERS)):
            if not any(name in _FLAG_SOLVERS[dest] for name in names):
                takes = [f"--{flag.replace('_', '-')}" for flag, users in _FLAG_SOLVERS.items() if ihvp in users]
                print(f"{self.prog}: note: --{dest.replace('_', '-')} is ignored: --ihvp {ihvp} does not read it "
                      f"(it reads {', '.join(takes) or 'none of the solver flags'})", file=sys.stderr)
        return namespace, extras


# Solver flag -> the solvers that read it (--seed also seeds the data, so it is never named).
_FLAG_SOLVERS = {flag: tuple(name for name, settings in SOLVER_FLAGS.items() if flag in settings)
                 for flag in ("rank", "rho", "chunk", "sketch", "iters", "alpha", "tol")}
_FLAG_SOLVERS["max_memory"] = ("exact",)


def make_parser(prog: str, description: str, *, outer_steps: int, rank: int, rho: float, iters: int, alpha: float,
                threads: int | None = None, ihvp_choices: tuple[str, ...] = SOLVERS) -> argparse.ArgumentParser:
    """A parser with the flags every recipe takes; the defaults are the recipe's (the paper's) values.

    A solver flag given on the command line that the chosen ``--ihvp`` does not read is named on stderr.
    """
    parser = _RecipeParser(prog=prog, description=description, formatter_class=_DefaultsFormatter,
                           ihvp_choices=ihvp_choices)
    solver = parser.add_argument_group("inverse-Hessian-vector product (paper symbols in brackets)")
    solver.add_argument("--ihvp", choices=ihvp_choices, default="nystrom", help="solver for (H + ρI)⁻¹ ∇_θ g")
    solver.add_argument("--rank", action=_Given, type=positive_int, default=rank, help="Nyström rank [k]")
    solver.add_argument("--rho", action=_Given, type=nonnegative_float, default=rho,
                        help="Nyström regulariser [ρ]; also the damping of cg, minres, normal_cg and exact")
    solver.add_argument("--chunk", action=_Given, type=chunk_value, default=None,
                        help="Nyström columns held at once [κ], 1..rank or 'auto' (the largest that fits the "
                             "device's free memory); default rank (time-efficient)")
    solver.add_argument("--iters", action=_Given, type=positive_int, default=iters,
                        help="cg / minres / normal_cg / Neumann iterations [l]")
    solver.add_argument("--alpha", action=_Given, type=positive_float, default=alpha, help="Neumann step size [α]")
    solver.add_argument("--sketch", action=_Given, choices=SKETCHES, default="columns",
                        help="Nyström test matrix Ω: random Hessian columns (the paper) or Gaussian")
    solver.add_argument("--tol", action=_Given, type=positive_float, default=None,
                        help="cg, minres, normal_cg: stop once ‖r‖ ≤ tol·‖b‖ (normal_cg: of A²x = Ab); "
                             "default run all --iters iterations")
    solver.add_argument("--max-memory", action=_Given, type=positive_float, default=Exact().max_memory / GIB,
                        help="exact: GiB its dense Hessian may take (Exact(max_memory=...)); larger models are refused")
    run = parser.add_argument_group("run")
    run.add_argument("--outer-steps", type=positive_int, default=outer_steps, help="budget: hyperparameter updates")
    run.add_argument("--seed", type=int, default=0, help="seed of data, initialisation and sketches")
    run.add_argument("--device", default=None, help="torch device; default cuda when available, else cpu")
    run.add_argument("--threads", type=positive_int, default=threads,
                     help="CPU threads for torch (torch.set_num_threads)" + ("; default torch's own choice" if threads is None else ""))
    run.add_argument("--out", type=Path, default=Path("runs") / prog.rsplit(".", 1)[-1], help="output folder")
    again = run.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    again.add_argument("--overwrite", action="store_true",
                       help="replace an earlier run in --out: first delete its config.json, metrics.json, "
                            "solver_check.json, *.png and checkpoints/*.pt (nothing else)")
    run.add_argument("--checkpoint-every", type=positive_int, default=25, help="outer steps between checkpoints")
    run.add_argument("--no-progress", dest="progress", action="store_false", help="hide the tqdm progress bar")
    return parser


def solver_from_args(args: argparse.Namespace, name: str | None = None, **overrides):
    """``make_solver(name, ...)`` with only the flags that apply to ``name`` (default ``args.ihvp``).

    ``overrides`` replace flag values where the solver takes that setting (a
    recipe running several seeds passes ``seed=`` for Nyström's sketches) and
    are ignored where it does not.  ``exact`` also gets ``--max-memory``, a
    constructor argument outside the settings table.

    Raises:
        RecipeError: an invalid combination, e.g. ``--chunk`` larger than ``--rank``.
    """
    name = name or args.ihvp
    values = {**vars(args), **overrides}
    settings = {flag: values[flag] for flag in SOLVER_FLAGS[name]}
    try:
        if name == "exact":
            return Exact(**settings, max_memory=int(values["max_memory"] * GIB))
        return make_solver(name, **settings)
    except ValueError as error:
        raise RecipeError(str(error)) from None


def resolve_device(name: str | None, threads: int | None = None) -> torch.device:
    """``torch.device(name)``, or cuda when available for ``None``; sets torch's CPU threads when given.

    Raises:
        RecipeError: an unknown device string, cuda requested where there is
            none, or a device that cannot hold and read back a number (``meta``).
    """
    if threads is not None:
        torch.set_num_threads(threads)
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RecipeError(f"invalid --device {name!r}: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RecipeError(f"--device {name} requested but CUDA is not available")
    if device.type == "meta":
        raise RecipeError(f"--device {name} cannot run a recipe: meta tensors hold shapes, no numbers; use cpu or cuda")
    try:  # the recipes read losses back to the host; a device without kernels (mps on Linux) cannot
        torch.ones(1, device=device).add(1).item()
    except (RuntimeError, NotImplementedError, AssertionError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RecipeError(f"--device {name} cannot run a recipe: {reason[:200]}") from None
    return device


# -- the output folder --------------------------------------------------------------------------------------
def _config(args: argparse.Namespace) -> dict[str, Any]:
    return {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}


def run_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The flags that decide a run's result: ``config.json``'s flags without :data:`RESUMABLE_CHANGES`."""
    return {key: value for key, value in _config(args).items() if key not in RESUMABLE_CHANGES}


def _differences(saved: dict, current: dict) -> str:
    keys = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    return ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys)


def _earlier_run(out: Path) -> list[str]:
    """The files of an earlier run in ``out``, relative to it; none when it left only its ``config.json`` (it
    stopped before its first checkpoint, with nothing a new run could be mixed with)."""
    found = [name for name in RUN_FILES if (out / name).exists()]
    found += sorted(str(p.relative_to(out)) for pattern in RUN_GLOBS for p in out.glob(pattern))
    return [] if found == ["config.json"] else found


def prepare_out(args: argparse.Namespace) -> Path:
    """Make ``args.out`` this run's folder and write ``config.json``; returns it.

    A fresh run refuses a folder that holds an earlier run unless ``--overwrite``,
    which deletes that run's files (:data:`RUN_FILES`, :data:`RUN_GLOBS`) before
    anything is written.  ``--resume`` first checks that the flags match the
    saved ``config.json`` (each checkpoint is checked again when it is loaded,
    see :class:`Checkpoint`).

    Raises:
        RecipeError: ``--out`` is a file or cannot be written; an earlier run
            there without ``--resume`` or ``--overwrite``; ``--resume`` with no
            earlier run, an unreadable ``config.json``, or flags that would
            change the result.
    """
    out = Path(args.out)
    config = _config(args)
    path = out / "config.json"
    if out.exists() and not out.is_dir():
        raise RecipeError(f"--out {out} is a file, not a folder: choose another --out")
    if args.resume:
        if not path.exists():
            raise RecipeError(f"--resume: no earlier run in {out} (missing config.json); start a new run there with "
                              "--overwrite, or choose another --out")
        try:
            saved = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise RecipeError(f"--resume: {path} is unreadable ({error}); rerun without --resume, with --overwrite")
        if not isinstance(saved, dict):
            raise RecipeError(f"--resume: {path} is not a run's config (a JSON object); rerun with --overwrite")
        changed = _differences({k: v for k, v in saved.items() if k not in RESUMABLE_CHANGES | RUN_INFO},
                               run_settings(args))
        if changed:
            raise RecipeError(f"--resume with different settings than the run in {out} ({changed})")
    else:
        earlier = _earlier_run(out) if out.is_dir() else []
        if earlier and not args.overwrite:
            shown = ", ".join(earlier[:4]) + (", ..." if len(earlier) > 4 else "")
            raise RecipeError(f"--out {out} holds an earlier run ({shown}): pass --resume to continue it, "
                              "--overwrite to replace it, or choose another --out")
        barrier()  # every rank has looked before rank 0 deletes or writes
        if is_main():
            for name in earlier:
                (out / name).unlink()
    try:
        out.mkdir(parents=True, exist_ok=True)
        config.update(command=" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), torch=torch.__version__)
        write_json(path, config)
    except OSError as error:
        raise RecipeError(f"cannot write to --out {out}: {error.strerror or error}") from None
    return out


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented, strict JSON, atomically (a reader never sees half a file); rank 0 only.

    JSON has no NaN or infinity: a non-finite number is written as ``null``.
    """
    if not is_main():
        return
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_finite_or_none(obj), indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)


def _finite_or_none(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: _finite_or_none(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(value) for value in obj]
    return obj


class Checkpoint:
    """One resumable run's state in ``<out>/checkpoints/<name>.pt``, tied to the settings that made it.

    ``load()`` returns the saved dict, or ``None`` without ``--resume`` or when
    nothing was saved.  Every checkpoint carries :func:`run_settings` of its
    run, and ``load()`` refuses one whose settings differ from this run's, so a
    state from another run is never continued.  The dict holds tensors,
    numbers, strings, lists and dicts only (read with ``weights_only``).
    """

    def __init__(self, args: argparse.Namespace, name: str):
        self.path = Path(args.out) / "checkpoints" / f"{name}.pt"
        self.resume = args.resume
        self.settings = run_settings(args)

    def load(self) -> dict[str, Any] | None:
        """The saved state without its settings record.

        Raises:
            RecipeError: the file is unreadable, records no settings, or records other settings.
        """
        if not (self.resume and self.path.exists()):
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as error:  # a truncated zip, a foreign pickle: torch raises several kinds
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise RecipeError(f"--resume: checkpoint {self.path} is unreadable ({reason}); delete it to restart that "
                              "run, or rerun with --overwrite") from None
        saved = state.pop("settings", None) if isinstance(state, dict) else None
        if saved is None:
            raise RecipeError(f"--resume: checkpoint {self.path} records no settings, so it cannot be tied to this "
                              "run; rerun with --overwrite")
        if saved != self.settings:
            raise RecipeError(f"--resume: checkpoint {self.path} was written by a run with other settings "
                              f"({_differences(saved, self.settings)}); rerun with --overwrite, or choose another --out")
        return state

    def save(self, state: dict[str, Any]) -> None:
        if not is_main():  # the ranks hold the same state; every rank loads rank 0's file
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save({**state, "settings": self.settings}, tmp)
        os.replace(tmp, self.path)


# -- progress and plots -------------------------------------------------------------------------------------
_BARS: weakref.WeakSet = weakref.WeakSet()  # open bars, closed by command() before an error is printed


def progress(args: argparse.Namespace, *, total: int, initial: int, desc: str) -> tqdm:
    """tqdm bar over outer steps; the recipe sets ``val=...`` as postfix after every step."""
    bar = tqdm(total=total, initial=initial, desc=desc, unit="step", disable=not (args.progress and is_main()),
               dynamic_ncols=True, mininterval=0.5)
    _BARS.add(bar)
    return bar


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


def integer_steps(*axes) -> None:
    """Integer ticks on the x axes (outer steps), after plotting: a curve of one or two points gets no 0.25-step ticks.

    A range shorter than two steps (one or two points) is widened to two
    steps around its middle: matplotlib would pad it by a fraction of a step
    and tick that.
    """
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        low, high = ax.get_xlim()
        if high - low < 2:
            middle = (low + high) / 2
            ax.set_xlim(middle - 1, middle + 1)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def marker_for(points: int) -> str | None:
    """A marker for a curve of few points (one point draws no line at all), none for a long one."""
    return "o" if points <= 20 else None


def loss_scale(ax, values) -> None:
    """A log y axis where ``values`` span more than a decade, labelled at 1, 2 and 5 × 10ⁿ; else linear.

    matplotlib labels only powers of ten on a log axis, which leaves one or two
    labels on a curve that spans less than a few decades.
    """
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    positive = [v for v in values if v is not None and math.isfinite(v) and v > 0]
    if not positive or max(positive) <= 10 * min(positive):
        return
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


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


def barrier() -> None:
    """Wait for every rank (nothing in a single process)."""
    if ranks()[1] > 1:
        dist.barrier()


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


def fully_sharded(model: nn.Module) -> nn.Module:
    """``model`` sharded in place by FSDP2's ``fully_shard`` under torchrun (each direct child that holds
    parameters, then the root, on a 1-D mesh over all ranks), else ``model``.

    HyperOptimizer takes the sharded model as it is: it differentiates an unsharded replica and averages
    over the ranks itself (docs/distributed.md, "FSDP").  Checkpoint it through :func:`state_dicts`.
    """
    if ranks()[1] == 1:
        print("note: --fsdp shards the model only under torchrun with more than one process; this one process "
              "trains it unsharded")
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(next(model.parameters()).device.type, (ranks()[1],))
    for child in model.children():
        if any(True for _ in child.parameters()):
            fully_shard(child, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _sharded(model: nn.Module) -> bool:
    fsdp = sys.modules.get("torch.distributed.fsdp")  # a sharded model exists only once it was imported
    return fsdp is not None and isinstance(model, fsdp.FSDPModule)


def state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """``(model.state_dict(), optimizer.state_dict())``; for a :func:`fully_sharded` model the full ones, gathered
    to rank 0 (every rank must call; the others get empty dicts, and :class:`Checkpoint` writes rank 0's)."""
    if not _sharded(model):
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                     optimizer_state: dict) -> None:
    """Load what :func:`state_dicts` returned (every rank holds the full dicts: it read rank 0's checkpoint)."""
    if not _sharded(model):
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state,
                   options=StateDictOptions(full_state_dict=True))
