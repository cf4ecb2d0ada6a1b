"""What every solver shares: the operator type, the result type, working precision, the failure policy.

A solver sees the Hessian only through a *matvec*, ``V (B, p) ↦ V H (B, p)``
(rows are vectors; ``H`` is symmetric).  Nothing here knows about models:
:mod:`hyperopt_torch.hvp` builds matvecs from a model, a test builds one from a
dense matrix (``lambda V: V @ A``), a data-parallel run wraps one in an
all-reduce.

A matvec may also carry an ``inplace`` attribute: a callable that writes
``V H`` over a contiguous ``V`` and returns ``V``.  A solver that no longer
needs its input block (Nyström's sketch) calls :func:`matvec_inplace`, which
uses it when present and falls back to ``matvec(V)``; the wrappers here and in
:mod:`hyperopt_torch.distributed` pass it on.  A matvec without it works
unchanged, with its input and output blocks alive together.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Protocol

import torch
from torch import Tensor

Matvec = Callable[[Tensor], Tensor]


def matvec_inplace(matvec: Matvec, V: Tensor) -> Tensor:
    """``V H`` for a block ``V`` of shape ``(B, p)`` that the caller will not read again.

    Computed over ``V``'s own storage (and returned as ``V``) when ``matvec``
    has an ``inplace`` attribute and ``V`` is contiguous; otherwise
    ``matvec(V)``, a new block.  Either way the caller must use the returned
    tensor and treat ``V`` as overwritten.
    """
    inplace = getattr(matvec, "inplace", None)
    if inplace is None or not V.is_contiguous():
        return matvec(V)
    return inplace(V)


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
    """

    x: Tensor
    diverged: Tensor | None = None
    negative_curvature: Tensor | None = None


class Solver(Protocol):
    """What :func:`~hyperopt_torch.implicit_hypergradient` needs of a solver.

    ``solve`` returns ``x``, a tensor shaped like ``b``; it is called under
    ``torch.no_grad()`` and must not write into ``b`` (which may be a view of
    a gradient the caller still holds).  To signal a failure, return a non-finite ``x`` (or
    raise ``torch.linalg.LinAlgError``): the step is then skipped.  A solver
    that checks its own convergence may also define
    ``solve_with_flags(matvec, b, generator=None) -> Solution``, which
    :func:`run_solver` prefers (CG and Neumann do).
    """

    name: str
    damping: float

    def solve(self, matvec: Matvec, b: Tensor, generator: torch.Generator | None = None) -> Tensor: ...


def working_precision(matvec: Matvec, b: Tensor) -> tuple[Matvec, Tensor]:
    """Run a solve's ``p``-sized vectors in at least float32.

    For a float16/bfloat16 ``b`` returns ``(matvec', b.float())`` where
    ``matvec'`` casts its input to ``b``'s dtype (the model's: the products run
    at the model's precision) and its output to float32; otherwise returns the
    arguments unchanged.  Iterates, residuals, dot products and the final
    combination of Hessian columns then round at float32's 6e-8 instead of
    bfloat16's 4e-3, whose errors would add up over the iterations (CG's
    recurrences) or over the cancelling columns of the Nyström combination.
    Casting the products up is exact; the memory cost is the float32 copies of
    the vectors a solver holds.  ``matvec'`` has an ``inplace`` variant
    (:func:`matvec_inplace`) that casts the products into the float32 input.
    """
    if b.dtype not in (torch.float16, torch.bfloat16):
        return matvec, b
    model_dtype = b.dtype

    def upcast(V: Tensor) -> Tensor:
        return matvec(V.to(model_dtype)).float()

    def upcast_inplace(V: Tensor) -> Tensor:
        return V.copy_(matvec_inplace(matvec, V.to(model_dtype)))

    upcast.inplace = upcast_inplace
    return upcast, b.float()


def run_solver(solver: Solver, matvec: Matvec, b: Tensor, generator: torch.Generator | None = None) -> Solution:
    """Run ``solver`` on ``(matvec, b)`` under the library's one failure policy.

    * an eigensolver that did not converge (``torch.linalg.LinAlgError``) gives
      an all-NaN ``x``;
    * a solution flagged ``diverged`` becomes all NaN (on the device, no
      synchronisation): a series that grew is not an approximation of anything;
    * a solver without ``solve_with_flags`` (a custom one) gets its tensor
      wrapped in a :class:`Solution` without flags.

    A non-finite ``x`` is the caller's signal to skip the step (the one
    finiteness check at the end of
    :func:`~hyperopt_torch.implicit_hypergradient`); the flags say why.
    """
    flagged = getattr(solver, "solve_with_flags", None)
    try:
        solution = flagged(matvec, b, generator=generator) if flagged else Solution(solver.solve(matvec, b, generator=generator))
    except torch.linalg.LinAlgError:
        return Solution(torch.full_like(b, float("nan")))
    if solution.diverged is not None:
        solution = solution._replace(x=torch.where(solution.diverged, float("nan"), solution.x))
    return solution
