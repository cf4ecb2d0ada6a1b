"""Inverse-Hessian-vector-product solvers, each over a batched operator.

Every solver exposes ``name``, ``damping`` (the ρ of the system
``(H + ρI)x = b`` it targets) and ``solve(matvec, b, generator=None) -> x``
with ``matvec`` an :class:`Operator` or any callable ``V (B, p) -> V H (B, p)``
and ``b: (p,)``; the built-in solvers also have ``solve_with_flags``,
returning a :class:`Solution` (``x`` with device-side flags and the κ and ρ
used).  The package is a leaf: it knows nothing about models, any operator
can drive it (as jaxopt's ``linear_solve``).  A plain function sits under
each class (:func:`nystrom_solve`, :func:`cg_solve`, ...), so every solver
can be run on a dense matrix: ``matvec = lambda V: V @ A``.
:func:`~hyperopt_torch.implicit_hypergradient` calls ``solve`` under
``torch.no_grad()``: a custom solver needs no autograd and gets none.
"""

from __future__ import annotations

import difflib

from ._base import Matvec, Operator, Solution, Solver, as_operator, matvec_inplace, run_solver
from .cg import ConjugateGradient, cg_solve
from .exact import Exact, exact_memory, exact_solve
from .identity import Identity, identity_solve
from .minres import Minres, minres_solve
from .neumann import Neumann, neumann_solve
from .normal_cg import NormalCG, normal_cg_solve
from .nystrom import Nystrom, nystrom_from_sketch, nystrom_sketch, nystrom_solve, sample_columns


# The one table of which solver takes which setting by keyword.  make_solver,
# HyperOptimizer's keywords, its checkpoint entry, the recipes' flags
# (recipes/common.py) and the table in docs/api.md are all derived from it
# (tests/test_optim.py checks the docs).  A solver object takes more (Exact's
# max_memory and batch).
SOLVER_SETTINGS: dict[str, tuple[str, ...]] = {
    "nystrom": ("rank", "rho", "chunk", "sketch", "seed"),
    "cg": ("iters", "rho", "tol"),
    "neumann": ("iters", "alpha"),
    "identity": (),
    "exact": ("rho",),
    "minres": ("iters", "rho", "tol"),
    "normal_cg": ("iters", "rho", "tol"),
}
SOLVER_NAMES = tuple(SOLVER_SETTINGS)
# Settings that do not change what a solver computes (κ trades memory for HVPs
# with the same result up to rounding, Section 2.4; a seed is superseded by the
# generator state a checkpoint restores): a checkpoint may move between solvers that differ only in these.
RESULT_NEUTRAL = ("chunk", "seed")


def check_solver_name(name) -> None:
    """Raise ``ValueError`` naming the valid choices unless ``name`` is a key of :data:`SOLVER_SETTINGS`."""
    if not isinstance(name, str) or name not in SOLVER_SETTINGS:
        close = difflib.get_close_matches(name.lower().replace("-", "_"), SOLVER_NAMES, n=1) if isinstance(name, str) else []
        hint = f": did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"Invalid ihvp: {name!r} (expected one of {', '.join(map(repr, SOLVER_NAMES))} or a solver "
                         f"object){hint}")


def make_solver(name: str, *, rank: int | None = None, rho: float | None = None, chunk: int | str | None = None,
                sketch: str | None = None, seed: int | None = None, iters: int | None = None,
                alpha: float | None = None, tol: float | None = None) -> Solver:
    """Build a solver from its name and the settings that apply to it (:data:`SOLVER_SETTINGS`).

    ``name`` is one of ``"nystrom"`` (settings ``rank``, ``rho``, ``chunk``,
    ``sketch``, ``seed``), ``"cg"``, ``"minres"`` and ``"normal_cg"`` (each
    ``iters``, ``rho`` as damping, ``tol``), ``"neumann"`` (``iters``,
    ``alpha``), ``"identity"`` (none) or ``"exact"`` (``rho`` as damping).
    A setting given as ``None`` is the solver's default.

    Raises:
        ValueError: an unknown name, a setting that does not apply to this
            solver, or an invalid value.
    """
    check_solver_name(name)
    given = {"rank": rank, "rho": rho, "chunk": chunk, "sketch": sketch, "seed": seed, "iters": iters, "alpha": alpha,
             "tol": tol}
    extra = sorted(k for k, v in given.items() if v is not None and k not in SOLVER_SETTINGS[name])
    if extra:
        applies = ", ".join(SOLVER_SETTINGS[name]) or "no settings"
        raise ValueError(f"{', '.join(extra)} does not apply to ihvp={name!r} (it takes {applies})")
    if name == "nystrom":
        return Nystrom(rank=rank, rho=rho, chunk=chunk, sketch=sketch, seed=seed)
    if name == "cg":
        return ConjugateGradient(iters=iters, rho=rho, tol=tol)
    if name == "minres":
        return Minres(iters=iters, rho=rho, tol=tol)
    if name == "normal_cg":
        return NormalCG(iters=iters, rho=rho, tol=tol)
    if name == "neumann":
        return Neumann(iters=iters, alpha=alpha)
    if name == "exact":
        return Exact(rho=rho)
    return Identity()


def solver_config(solver) -> dict:
    """``{"name": ..., "settings": {...}}`` of a solver, as recorded in a checkpoint.

    The settings are the solver's values of its :data:`SOLVER_SETTINGS` entries
    (a custom solver, whose ``name`` is not in the table, records none).
    """
    name = getattr(solver, "name", type(solver).__name__)
    return {"name": name, "settings": {k: getattr(solver, k) for k in SOLVER_SETTINGS.get(name, ())}}


__all__ = [
    "Matvec", "Operator", "as_operator", "Solution", "Solver", "matvec_inplace", "run_solver", "make_solver", "SOLVER_NAMES", "SOLVER_SETTINGS", "RESULT_NEUTRAL",
    "solver_config", "check_solver_name",
    "Nystrom", "ConjugateGradient", "Minres", "NormalCG", "Neumann", "Identity", "Exact",
    "nystrom_solve", "nystrom_sketch", "nystrom_from_sketch", "cg_solve", "minres_solve", "normal_cg_solve",
    "neumann_solve", "identity_solve", "exact_solve",
    "sample_columns", "exact_memory",
]
