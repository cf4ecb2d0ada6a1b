"""Truncated Neumann series for ``H⁻¹ b`` (Lorraine, Vicol & Duvenaud 2020).

Algorithm 3 (``approxInverseHVP``) of the paper; Algorithm 1 of their slides.

    H⁻¹ = α Σ_{j≥0} (I − αH)^j,   valid when ‖I − αH‖ < 1,

truncated after ``iters`` terms beyond the first:
``x = α Σ_{j=0}^{l} (I − αH)^j b`` with ``l = iters`` Hessian-vector
products.  ``alpha`` must satisfy ``α‖H‖ < 2`` for the series to converge
on a positive definite ``H``; on an indefinite ``H`` it diverges along the
negative eigendirections.  The Nyström paper uses ``α = 0.01``, ``l ∈ {5, 10, 20}``.

Divergence check.  The terms are ``v_j = (I − αH)^j b``.  For symmetric ``H``
with ``‖I − αH‖₂ ≤ 1`` (the series converges or, along null directions, stays
put) ``‖v_{j+1}‖ ≤ ‖v_j‖``, so no term is larger than the first.  A term with
``‖v_j‖ > (1 + √ε)‖v_0‖`` therefore proves an eigenvalue of ``I − αH`` outside
``[−1, 1]`` (``α > 2/λ_max`` or ``λ < 0``) whose growing component already
outweighs all of ``b``: the sum is dominated by it, however finite it still is.
The slack ``√ε`` (``ε`` of the model's dtype: 0.09 in bfloat16, 3e-4 in
float32) covers rounding, which moves a norm by about ``ε`` per term.  Only
the last term needs checking: with ``H = Σ λ_i u_i u_iᵀ`` and ``c_i = u_iᵀb``,
``‖v_j‖² = Σ_i c_i² (1 − αλ_i)^{2j}`` is a sum of sequences that are convex
in ``j`` (each is geometric with a non-negative ratio), hence convex, so its
maximum over ``0 ≤ j ≤ l`` is at ``j = 0`` or ``j = l``.  The flag costs two
norms per solve, on the device (no host synchronisation); it is
:class:`~hyperopt_torch.ihvp.Solution`'s ``diverged``, and
:func:`~hyperopt_torch.ihvp.run_solver` skips such a solve like a
non-finite one.

References:
    Lorraine et al., "Optimizing Millions of Hyperparameters by Implicit
    Differentiation", AISTATS 2020.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import positive_float, positive_int
from ._base import Matvec, Operator, Solution, working_precision


def neumann_solve(matvec: Matvec | Operator, b: Tensor, iters: int, alpha: float) -> Solution:
    """``α Σ_{j=0}^{iters} (I − αH)^j b`` using ``iters`` calls of ``matvec``.

    ``b`` has shape ``(p,)``; ``x`` has the shape, dtype and device of ``b`` (a
    float16/bfloat16 ``b`` is summed in float32, the products at ``b``'s
    precision).  Returns :class:`~hyperopt_torch.ihvp.Solution`
    ``(x, diverged)``: ``diverged`` is set when a term grew larger than the
    first (module docstring); ``x`` is then returned as computed.
    """
    slack = 1.0 + torch.finfo(b.dtype).eps ** 0.5
    out_dtype = b.dtype
    matvec, b = working_precision(matvec, b)
    v = b
    acc = b.clone()
    for _ in range(iters):
        v = torch.add(v, matvec(v), alpha=-alpha)  # one kernel for v − α·Hv
        acc += v
    # max_j ‖v_j‖ is ‖v_0‖ or ‖v_l‖ (module docstring): two norms, one comparison, on the device
    diverged = torch.linalg.vector_norm(v) > slack * torch.linalg.vector_norm(b)
    return Solution(acc.mul_(alpha).to(out_dtype), diverged=diverged, damping=0.0)


class Neumann:
    """Neumann-series inverse-Hessian-vector product with ``iters`` HVPs and step ``alpha``.

    A series whose terms grow (``alpha`` above ``2/λ_max``, or negative
    curvature) is flagged ``diverged`` and the step is skipped.
    """

    name = "neumann"
    damping = 0.0

    def __init__(self, iters: int | None = None, alpha: float | None = None):
        # None is each setting's default (iters 10, alpha 0.01): make_solver passes its keywords on as they are
        self.iters = positive_int("iters", 10 if iters is None else iters)
        self.alpha = positive_float("alpha", 0.01 if alpha is None else alpha)

    def solve(self, matvec: Matvec, b: Tensor, generator=None) -> Tensor:
        return self.solve_with_flags(matvec, b, generator).x

    def solve_with_flags(self, matvec: Matvec, b: Tensor, generator=None) -> Solution:
        return neumann_solve(matvec, b, self.iters, self.alpha)

    def __repr__(self) -> str:
        return f"Neumann(iters={self.iters}, alpha={self.alpha})"
