"""What every solver shares: the operator type, the result type, working precision, the failure policy.

A solver sees the Hessian only through an :class:`Operator`, ``V (B, p) ↦ V H
(B, p)`` (rows are vectors; ``H`` is symmetric).  Nothing here knows about
models: :mod:`hyperopt_torch.hvp` builds operators from a model, a test builds
one from a dense matrix (``lambda V: V @ A``: every solver accepts a plain
callable and wraps it with :func:`as_operator`), a data-parallel run wraps one
in an all-reduce.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Protocol

import torch
from torch import Tensor

Matvec = Callable[[Tensor], Tensor]


class Operator:
    """A symmetric linear operator ``V (B, p) ↦ V H (B, p)`` (also ``(p,) ↦ (p,)``).

    Args:
        matvec: the batched product.
        inplace: optionally, a callable that writes ``V H`` over a contiguous
            ``V`` and returns ``V`` (no output block is allocated).
        collective: every call is a collective over ranks
            (:mod:`hyperopt_torch.distributed`): a solver must make the same
            calls on every rank, so it may not stop early on a value computed
            from local numbers alone.

    A subclass may override :meth:`__call__` and :meth:`inplace` directly
    (:class:`~hyperopt_torch.hvp.HessianVectorProduct` does).
    """

    collective: bool = False

    def __init__(self, matvec: Matvec, *, inplace: Matvec | None = None, collective: bool = False):
        self._matvec = matvec
        self._inplace = inplace
        self.collective = collective

    def __call__(self, V: Tensor) -> Tensor:
        return self._matvec(V)

    def inplace(self, V: Tensor) -> Tensor:
        """``V H`` for a block ``V`` the caller will not read again: written over ``V`` (and ``V`` returned)
        where the operator can, else a new block.  Use the returned tensor and treat ``V`` as overwritten."""
        if self._inplace is None or not V.is_contiguous():
            return self(V)
        return self._inplace(V)

    def damped(self, rho: float) -> "Operator":
        """``V ↦ V (H + ρI)`` (as jaxopt's ridge matvec): ``self`` itself for ``ρ = 0``."""
        if not rho:
            return self
        return Operator(lambda V: torch.add(self(V), V, alpha=rho), collective=self.collective)


def as_operator(matvec: Matvec | Operator) -> Operator:
    """``matvec`` as an :class:`Operator` (itself if it is one)."""
    return matvec if isinstance(matvec, Operator) else Operator(matvec)


def matvec_inplace(matvec: Matvec | Operator, V: Tensor) -> Tensor:
    """``as_operator(matvec).inplace(V)``: ``V H`` over ``V``'s storage where possible."""
    return as_operator(matvec).inplace(V)


class Solution(NamedTuple):
    """A solve's result and what the solver noticed while computing it.

    ``x`` has ``b``'s shape, dtype and device.  The flags are 0-dim bool
    tensors on ``x``'s device, so setting them costs no host synchronisation;
    ``None`` means the solver does not check.

    Attributes:
        x: the approximation of ``(H + ρI)⁻¹ b``.
        diverged: the iteration grew instead of converging (Neumann: a term of
            the series larger than the first).  :func:`run_solver` turns a
            diverged ``x`` into NaN, so it is skipped like a non-finite one.
        negative_curvature: conjugate gradient met ``dᵀ(H + ρI)d < 0`` and
            stopped there (see :func:`~hyperopt_torch.ihvp.cg_solve`).
        chunk: the κ a Nyström solve used (its choice with ``chunk="auto"``), else ``None``.
        damping: the ρ of the system ``(H + ρI)x = b`` the solve targeted (for the residual);
            :func:`run_solver` fills it from the solver when a solver leaves it ``None``.
    """

    x: Tensor
    diverged: Tensor | None = None
    negative_curvature: Tensor | None = None
    chunk: int | None = None
    damping: float | None = None


class Solver(Protocol):
    """What :func:`~hyperopt_torch.implicit_hypergradient` needs of a solver.

    ``solve`` returns ``x``, a tensor shaped like ``b``; it is called under
    ``torch.no_grad()`` and must not write into ``b`` (which may be a view of
    a gradient the caller still holds).  To signal a failure, return a non-finite ``x`` (or
    raise ``torch.linalg.LinAlgError``): the step is then skipped.  A solver
    may also define ``solve_with_flags(matvec, b, generator=None) -> Solution``,
    which :func:`run_solver` prefers; ``collective_safe`` (default true),
    false when it may make a different number of products on different ranks
    (Nyström's ``chunk="auto"``); and ``state_dict``/``load_state_dict`` for
    random state, which a data-parallel step sets to rank 0's.
    """

    name: str
    damping: float

    def solve(self, matvec: Matvec, b: Tensor, generator: torch.Generator | None = None) -> Tensor: ...


def working_precision(matvec: Matvec | Operator, b: Tensor) -> tuple[Operator, Tensor]:
    """Run a solve's ``p``-sized vectors in at least float32.

    For a float16/bfloat16 ``b`` returns ``(operator', b.float())`` where
    ``operator'`` casts its input to ``b``'s dtype (the model's: the products
    run at the model's precision) and its output to float32; otherwise
    returns ``(as_operator(matvec), b)``.  Iterates, residuals, dot products
    and the final combination of Hessian columns then round at float32's 6e-8
    instead of bfloat16's 4e-3, whose errors would add up over the iterations
    (CG's recurrences) or over the cancelling columns of the Nyström
    combination.  Casting the products up is exact; the memory cost is the
    float32 copies of the vectors a solver holds.  ``operator'.inplace`` casts
    the products into the float32 input.
    """
    op = as_operator(matvec)
    if b.dtype not in (torch.float16, torch.bfloat16):
        return op, b
    model_dtype = b.dtype

    def upcast(V: Tensor) -> Tensor:
        return op(V.to(model_dtype)).float()

    def upcast_inplace(V: Tensor) -> Tensor:
        return V.copy_(op.inplace(V.to(model_dtype)))

    return Operator(upcast, inplace=upcast_inplace, collective=op.collective), b.float()


def run_solver(solver: Solver, matvec: Matvec | Operator, b: Tensor,
               generator: torch.Generator | None = None) -> Solution:
    """Run ``solver`` on ``(matvec, b)`` under the library's one failure policy.

    * an eigensolver that did not converge (``torch.linalg.LinAlgError``) gives
      an all-NaN ``x``;
    * a solution flagged ``diverged`` becomes all NaN (on the device, no
      synchronisation): a series that grew is not an approximation of anything;
    * a solver without ``solve_with_flags`` (a custom one) gets its tensor
      wrapped in a :class:`Solution` without flags;
    * ``damping`` left ``None`` is the solver's ``damping`` (0 without one).

    A non-finite ``x`` is the caller's signal to skip the step (the one
    finiteness check at the end of
    :func:`~hyperopt_torch.implicit_hypergradient`); the flags say why.
    """
    flagged = getattr(solver, "solve_with_flags", None)
    try:
        solution = flagged(matvec, b, generator=generator) if flagged else Solution(solver.solve(matvec, b, generator=generator))
    except torch.linalg.LinAlgError:
        solution = Solution(torch.full_like(b, float("nan")))
    if solution.diverged is not None:
        solution = solution._replace(x=torch.where(solution.diverged, float("nan"), solution.x))
    if solution.damping is None:
        solution = solution._replace(damping=float(getattr(solver, "damping", 0.0)))
    return solution
