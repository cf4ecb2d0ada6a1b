"""Our solvers inside the frameworks people already use: torchopt's linear solves, betty's hypergradient methods.

Neither peer is imported here until asked for; both are optional extras
(``pip install hyperopt_torch[peers]``).  See docs/porting.md for whole scripts.

torchopt
--------
``torchopt.diff.implicit.custom_root(optimality_fn, argnums, solve=...)`` and
``class Net(ImplicitMetaGradientModule, linear_solve=...)`` take a linear
solver ``solve(matvec, b) -> x``.  In the backward pass torchopt calls it with

* ``b = −∂L/∂θ*``, a pytree of tensors shaped like the inner solution (a tuple
  of tensors there; a dict, list or single tensor when called directly);
* ``matvec(u) = Aᵀu`` with ``A = ∂ optimality_fn / ∂θ`` at the solution, built
  as a vector-Jacobian product of the optimality function: ``u`` and the
  result have ``b``'s structure;

and expects ``x`` with ``b``'s structure solving ``Aᵀx = b``; the
hypergradient is then ``(∂ optimality_fn/∂φ)ᵀ x``.  When ``optimality_fn`` is
the gradient ``∇_θ f`` of an inner loss (what ``ImplicitMetaGradientModule``
derives from ``objective``), ``A = Aᵀ = ∇²_θ f``, the symmetric system every
solver here targets: :func:`linear_solve` flattens the pytrees into the flat
vectors and the batched ``matvec(V: (B, p)) -> (B, p)`` of
:mod:`hyperopt_torch.ihvp` and back.  A solver's ``rho`` is torchopt's
``ridge``: ``(A + ρI)x = b``.  For an optimality function whose Jacobian is not
symmetric (a fixed-point residual ``T(θ, φ) − θ``), keep torchopt's
``solve_normal_cg``: CG, MINRES and Nyström assume symmetry and do not check it.

betty
-----
betty picks the hypergradient method of a lower-level problem by its
``Config(type=...)``, a key of the dictionary
``betty.hypergradient.jvp_fn_mapping`` read at every outer step.
:func:`register_betty` adds a solver to that dictionary under a name of your
choice, so ``Config(type=name)`` runs it; :func:`betty_method` is the function
it registers, ``method(vector, curr, prev, sync=False)`` as betty calls its own
``cg`` and ``neumann``: it returns ``−(∂²f/∂φ∂θ) x`` with ``x`` the solver's
approximation of ``(∇²_θ f + ρI)⁻¹ vector``, for betty to add to the
upper-level parameters' ``.grad`` (or, with ``sync=True`` as in betty ≥ 0.2,
adds it there itself and returns ``None``).

Both adapters run the solver under ``torch.no_grad()`` (it is not
differentiated, as torchopt's own solve is not, running inside a backward),
under the library's failure policy (:func:`~hyperopt_torch.ihvp.run_solver`:
a diverged Neumann series or a failed eigensolver gives NaN) and warn, with a
``RuntimeWarning``, when the solver met negative curvature or diverged: unlike
``HyperOptimizer`` they cannot skip the step, so the NaN reaches the caller.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from ._inner import rebuild
from ._warn import warn
from .hvp import HessianVectorProduct, flatten, unflatten
from .ihvp import Solver, make_solver, run_solver

BATCHES = ("loop", "vmap")


def _solver(solver: Solver | str, settings: dict) -> Solver:
    if isinstance(solver, str):
        try:
            return make_solver(solver, **settings)
        except (ValueError, TypeError) as error:  # make_solver speaks of its argument as ihvp=
            raise type(error)(str(error).replace("Invalid ihvp", "Invalid solver").replace("ihvp=", "solver="))
    if settings:
        raise ValueError(f"settings {', '.join(sorted(settings))} were given with a solver object: put them on the object")
    if not callable(getattr(solver, "solve", None)):
        raise TypeError(f"solver must be a solver name or an object with a solve(matvec, b) method, got {type(solver).__name__}")
    return solver


def _tree_flatten(tree: Any) -> tuple[list[Tensor], Callable[[Sequence[Tensor]], Any]]:
    """The tensors of a pytree (tensor, list, tuple, namedtuple, dict; ``None`` as an empty node) and its rebuild."""
    if isinstance(tree, Tensor):
        return [tree], lambda leaves: leaves[0]
    if tree is None:
        return [], lambda leaves: None
    if isinstance(tree, dict):
        keys = list(tree)
        leaves, build = _tree_flatten([tree[k] for k in keys])
        kind = type(tree)
        return leaves, lambda new: kind(zip(keys, build(new)))
    if isinstance(tree, (list, tuple)):
        parts = [_tree_flatten(t) for t in tree]
        counts = [len(leaves) for leaves, _ in parts]

        def build(new: Sequence[Tensor]) -> Any:
            children, start = [], 0
            for (_, child), n in zip(parts, counts):
                children.append(child(new[start:start + n]))
                start += n
            return rebuild(tree, children)

        return [t for leaves, _ in parts for t in leaves], build
    raise TypeError(f"expected a pytree of tensors (tensor, list, tuple, dict), found a {type(tree).__name__}")


class LinearSolve:
    """A torchopt linear solver ``solve(matvec, b) -> x`` that runs one of our solvers.

    Made by :func:`linear_solve`; see the module docstring for torchopt's
    contract.  ``b``'s tensors are flattened, in their pytree order, into one
    vector of ``p`` entries (they must share a dtype and device); the solver's
    matvec ``V ↦ V A`` calls torchopt's ``matvec`` once per row of ``V``
    (``batch="loop"``) or once under ``torch.func.vmap`` (``batch="vmap"``).
    Only Nyström (its ``k`` sketch columns) and Exact ask for several rows at
    once; CG, Neumann and MINRES ask for one vector per iteration.

    Attributes:
        solver: the solver object.
        batch: ``"loop"`` or ``"vmap"``.
        last: the :class:`~hyperopt_torch.ihvp.Solution` of the latest call
            (``x`` flat, with the solver's flags).
        matvecs: how many times the latest call evaluated torchopt's ``matvec``
            on one vector (a vmapped block of ``B`` rows counts ``B``).
    """

    def __init__(self, solver: Solver, batch: str = "loop"):
        if batch not in BATCHES:
            raise ValueError(f"Invalid batch: {batch!r} (expected 'loop' or 'vmap')")
        self.solver = solver
        self.batch = batch
        self.last = None
        self.matvecs = 0

    def __call__(self, matvec: Callable[[Any], Any], b: Any) -> Any:
        leaves, build = _tree_flatten(b)
        if not leaves:
            raise ValueError("b has no tensors: nothing to solve")
        dtypes, devices = {t.dtype for t in leaves}, {t.device for t in leaves}
        if len(dtypes) > 1 or len(devices) > 1:
            raise ValueError(f"b's tensors must share one dtype and device to be solved as one vector, "
                             f"found {sorted(map(str, dtypes))} on {sorted(map(str, devices))}")
        self.matvecs = 0

        def one(v: Tensor) -> Tensor:
            out, _ = _tree_flatten(matvec(build(unflatten(v, leaves))))
            if len(out) != len(leaves):
                raise ValueError(f"matvec returned {len(out)} tensors for {len(leaves)} in b: "
                                 "the linear operator must map b's structure to itself")
            return flatten(out, leaves)

        def flat_matvec(V: Tensor) -> Tensor:
            if V.dim() == 1:
                self.matvecs += 1
                return one(V)
            self.matvecs += V.shape[0]
            if self.batch == "vmap":
                return torch.func.vmap(one)(V)
            return torch.stack([one(v) for v in V])

        with torch.no_grad():
            self.last = run_solver(self.solver, flat_matvec, flatten(leaves, leaves))  # Nyström: its own generator
        _warn_flags(self.solver, self.last)
        return build(unflatten(self.last.x, leaves))

    def __repr__(self) -> str:
        return f"linear_solve({self.solver!r}, batch={self.batch!r})"


def _warn_flags(solver: Solver, solution) -> None:
    """Warn when the solver diverged or met negative curvature (one read of its device flags)."""
    flags = {name: f for name, f in (("diverged", solution.diverged), ("negative", solution.negative_curvature))
             if f is not None}
    if not flags:
        return
    raised = {name for name, value in zip(flags, torch.stack(list(flags.values())).tolist()) if value}
    if "diverged" in raised:
        warn(f"{solver!r} diverged (a term of the series grew larger than the first): the solution is NaN. "
             "Lower alpha below 2/λ_max, or use a solver for indefinite systems.", RuntimeWarning)
    if "negative" in raised:
        warn(f"{solver!r} met negative curvature dᵀ(A + ρI)d < 0 and stopped there (truncated Newton): the "
             "Jacobian of the optimality function is not positive definite here. Raise rho above its most negative "
             "eigenvalue, or use a solver for indefinite systems.", RuntimeWarning)


def linear_solve(solver: Solver | str = "nystrom", *, batch: str = "loop", **settings) -> LinearSolve:
    """A linear solver for torchopt: ``custom_root(..., solve=linear_solve(...))`` or ``linear_solve=`` of a module.

    Args:
        solver: a solver object (``Nystrom(rank=10, rho=0.01)``,
            ``ConjugateGradient(iters=5)``, any object with ``solve(matvec, b)``)
            or a solver name, with its settings by keyword as for
            :func:`~hyperopt_torch.ihvp.make_solver`.
        batch: ``"loop"`` (default: works for any optimality function) or
            ``"vmap"`` (one vectorised call for a block of vectors; needs an
            optimality function that ``torch.func.vmap`` can transform).

    Returns:
        a :class:`LinearSolve`, called by torchopt as ``solve(matvec, b)``;
        ``x`` has ``b``'s structure, dtype and device.

    Raises:
        ValueError: an unknown name or setting (from ``make_solver``), settings
            given with a solver object, an unknown ``batch``; at call time, a
            ``b`` without tensors or with tensors of several dtypes or devices.
        TypeError: a solver without ``solve``; at call time, a ``b`` that is not
            a pytree of tensors, lists, tuples and dicts.
    """
    return LinearSolve(_solver(solver, settings), batch)


def betty_method(solver: Solver | str = "nystrom", **settings) -> Callable:
    """A betty hypergradient method ``method(vector, curr, prev, sync=False)`` running one of our solvers.

    betty calls it for a lower-level problem ``curr`` (inner parameters θ,
    ``curr.trainable_parameters()``, training loss
    ``curr.training_step_exec(curr.cur_batch)``) below ``prev`` (its
    ``trainable_parameters()`` are φ), with ``vector = ∂g/∂θ``.  It returns
    ``−(∂²f/∂φ∂θ) x`` per tensor of φ (``None`` where ``∇_θ f`` does not
    depend on it), ``x`` the solver's ``(∇²_θ f + ρI)⁻¹ vector``, as betty's
    ``neumann`` and ``cg`` do; with ``sync=True`` (betty ≥ 0.2, its last
    problem on a path) it adds that into φ's ``.grad`` and returns ``None``.
    Arguments as for :func:`linear_solve`.
    """
    solver = _solver(solver, settings)

    def method(vector: Sequence[Tensor], curr, prev, sync: bool = False):
        params = list(curr.trainable_parameters())
        hparams = list(prev.trainable_parameters())
        loss = curr.training_step_exec(curr.cur_batch)
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        hvp = HessianVectorProduct.from_autograd(grads, params)
        with torch.no_grad():
            solution = run_solver(solver, hvp, flatten(vector, params))
        _warn_flags(solver, solution)
        implicit = [None if m is None else -m for m in hvp.mixed(solution.x, hparams)]
        if not sync:
            return implicit
        for h, g in zip(hparams, implicit):
            if g is not None:
                h.grad = g if h.grad is None else h.grad + g
        return None

    method.solver = solver
    return method


def register_betty(name: str, solver: Solver | str = "nystrom", **settings) -> Callable:
    """Make ``betty.configs.Config(type=name)`` run our solver; returns the registered :func:`betty_method`.

    Adds the method to ``betty.hypergradient.jvp_fn_mapping``, the dictionary
    betty looks the type up in at every outer step (the one place betty
    dispatches on it, in betty 0.1.1 and 0.2).  Raises ``ValueError`` for a
    name betty already uses for its own methods (``"darts"``, ``"cg"``,
    ``"neumann"``, ...), ``ModuleNotFoundError`` when betty is not installed.
    """
    import betty.hypergradient as hypergradient

    mapping = hypergradient.jvp_fn_mapping
    current = mapping.get(name)
    if current is not None and getattr(current, "solver", None) is None:
        raise ValueError(f"{name!r} is betty's own {current.__name__} method: register ours under another name")
    mapping[name] = method = betty_method(solver, **settings)
    return method


__all__ = ["linear_solve", "LinearSolve", "betty_method", "register_betty", "BATCHES"]
