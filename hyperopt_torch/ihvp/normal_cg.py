"""Conjugate gradient on the normal equations ``AᵀA x = Aᵀb``, ``A = H + ρI`` (CGNR).

torchopt's default linear solver for implicit differentiation
(``torchopt.linear_solve.solve_normal_cg``, after jaxopt's
``solve_normal_cg``): CG applied to ``AᵀA x = Aᵀb``, whose matrix is
positive semi-definite for any ``A``, so CG never meets negative curvature and
converges on an indefinite (or non-symmetric) ``A``.  Here ``A = H + ρI`` is
symmetric, so ``AᵀA = A²`` and ``Aᵀb = Ab``:

    x_l = CG_l(A², Ab),   A = H + ρI.

Costs, against plain CG on ``A``:

* two Hessian-vector products per iteration (``A(Ad)``), plus one for the
  right-hand side ``Ab``: ``1 + 2·iters`` in all.  ``iters`` counts
  iterations, as torchopt's ``maxiter`` does, not products;
* the condition number is squared, ``κ(A²) = κ(A)²``, so on a positive
  definite ``H`` it needs many more iterations than CG for the same accuracy;
  its use is parity with torchopt scripts, and indefinite systems
  (:class:`~hyperopt_torch.ihvp.Minres` solves those with one product per
  iteration and the unsquared condition number).

The iteration is :func:`~hyperopt_torch.ihvp.cg_solve` on ``A²`` (one loop,
the same host-synchronisation policy, the same handling of data-parallel
matvecs).  ``tol`` is CG's relative residual on the normal equations,
``‖Ab − A²x‖ ≤ tol·‖Ab‖``, which is torchopt's ``rtol``.

Mapping to ``torchopt.linear_solve.solve_normal_cg(ridge, init, **cg_kwargs)``
with ``torchopt.linalg.cg(rtol=1e-5, atol=0.0, maxiter=None)``:

* ``maxiter`` ↔ ``iters`` (torchopt's default ``10·p``);
* ``rtol`` ↔ ``tol`` (torchopt's default ``1e-5``; ours ``None``: run all
  ``iters``); ``atol`` has no counterpart (leave it 0);
* ``ridge`` adds ``ridge·I`` to ``AᵀA``, not to ``A``: it has no counterpart
  here.  ``rho`` is the damping of the system ``H + ρI`` itself, as for every
  solver of this package; in torchopt it corresponds to adding ``ρθ`` to the
  optimality condition;
* ``init`` has no counterpart (``x₀ = 0``, torchopt's default).

With those settings matching, the result equals torchopt's to float64
rounding (tests/test_minres.py).  torchopt additionally evaluates
``b − A²x₀`` once (two products, which do not change a zero ``x₀``), forms
``Ab`` with a vector-Jacobian product of the matvec rather than the matvec
itself (equal for a symmetric ``H``), and divides by ``dᵀA²d`` even when it
is zero, where our CG takes no step.

References:
    Hestenes & Stiefel, "Methods of conjugate gradients for solving linear
    systems", 1952, Section 10 (CG on the normal equations).  Blondel et al.,
    "Efficient and Modular Implicit Differentiation", NeurIPS 2022 (jaxopt's
    ``solve_normal_cg``).  Ren et al., "TorchOpt: An Efficient Library for
    Differentiable Optimization", JMLR 2023.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import nonnegative_float, positive_float, positive_int
from ._base import Matvec, Operator, Solution, working_precision
from .cg import cg_solve


def normal_cg_solve(matvec: Matvec, b: Tensor, iters: int, rho: float = 0.0, tol: float | None = None) -> Solution:
    """Run at most ``iters`` CG iterations on ``(H + ρI)² x = (H + ρI) b`` from ``x₀ = 0``.

    ``b`` has shape ``(p,)``; ``x`` has its shape, dtype and device (a
    float16/bfloat16 ``b`` is iterated in float32, the products at ``b``'s
    precision).  ``1 + 2·iters`` calls of ``matvec``, each on one vector
    (fewer in host memory when ``tol`` stops it early).  With ``tol`` set,
    stops once ``‖Ab − A²x‖ ≤ tol·‖Ab‖`` (``A = H + ρI``).

    Returns :class:`~hyperopt_torch.ihvp.Solution` ``(x)`` without flags:
    ``A²`` is positive semi-definite, so a negative ``dᵀA²d`` can only be
    rounding near convergence, not curvature of ``H`` worth a warning (CG
    stops there and returns its last iterate).
    """
    out_dtype = b.dtype
    op, b = working_precision(matvec, b)
    A = op.damped(rho)  # H + ρI
    # AᵀA V = A(A V) (A is symmetric); a data-parallel operator stays collective, so cg_solve keeps its masked loop
    squared = Operator(lambda V: A(A(V)), collective=op.collective)
    x = cg_solve(squared, A(b), iters, 0.0, tol).x
    return Solution(x.to(out_dtype), damping=rho)


class NormalCG:
    """CG on the normal equations ``(H + ρI)² x = (H + ρI) b``: ``1 + 2·iters`` HVPs.

    Args:
        iters: maximum number of CG iterations ``l`` (torchopt's ``maxiter``);
            each costs two Hessian-vector products.
        rho: damping ``ρ ≥ 0`` added to the Hessian before squaring.
        tol: optional relative residual of the normal equations,
            ``‖Ab − A²x‖/‖Ab‖``, at which to stop early (torchopt's ``rtol``).

    torchopt's default solver (``solve_normal_cg``): it converges on
    indefinite Hessians, at the price of a squared condition number (see
    :mod:`~hyperopt_torch.ihvp.normal_cg` for the mapping of its settings).
    """

    name = "normal_cg"

    def __init__(self, iters: int | None = None, rho: float | None = None, tol: float | None = None):
        # None is each setting's default (iters 10, rho 0, no tol): make_solver passes its keywords on as they are
        self.iters = positive_int("iters", 10 if iters is None else iters)
        self.rho = nonnegative_float("rho", 0.0 if rho is None else rho)
        self.tol = None if tol is None else positive_float("tol", tol)

    @property
    def damping(self) -> float:
        return self.rho

    def solve(self, matvec: Matvec, b: Tensor, generator=None) -> Tensor:
        return self.solve_with_flags(matvec, b, generator).x

    def solve_with_flags(self, matvec: Matvec, b: Tensor, generator=None) -> Solution:
        return normal_cg_solve(matvec, b, self.iters, self.rho, self.tol)

    def __repr__(self) -> str:
        return f"NormalCG(iters={self.iters}, rho={self.rho}, tol={self.tol})"
