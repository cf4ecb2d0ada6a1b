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
float32) covers rounding, which moves a norm by about ``ε`` per term.  The
running maximum of ``‖v_j‖`` is a device tensor (one reduction per term, no
host synchronisation); the flag is :class:`~hyperopt_torch.ihvp.Solution`'s
``diverged``, and :func:`~hyperopt_torch.ihvp.run_solver` skips such a solve
like a non-finite one.

References:
    Lorraine et al., "Optimizing Millions of Hyperparameters by Implicit
    Differentiation", AISTATS 2020.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import positive_float, positive_int
from ._base import Matvec, Solution, working_precision


def neumann_solve(matvec: Matvec, b: Tensor, iters: int, alpha: float) -> Solution:
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
    v = b.clone()
    acc = b.clone()
    first = torch.linalg.vector_norm(b)
    peak = torch.zeros_like(first)
    for _ in range(iters):
        v = v - alpha * matvec(v)
        acc += v
        peak = torch.maximum(peak, torch.linalg.vector_norm(v))
    return Solution(acc.mul_(alpha).to(out_dtype), diverged=peak > slack * first)


class Neumann:
    """Neumann-series inverse-Hessian-vector product with ``iters`` HVPs and step ``alpha``.

    A series whose terms grow (``alpha`` above ``2/λ_max``, or negative
    curvature) is flagged ``diverged`` and the step is skipped.
    """

    name = "neumann"
    damping = 0.0

    def __init__(self, iters: int = 10, alpha: float = 0.01):
        self.iters = positive_int("iters", iters)
        self.alpha = positive_float("alpha", alpha)

    def solve(self, matvec: Matvec, b: Tensor, generator=None) -> Tensor:
        return self.solve_with_flags(matvec, b, generator).x

    def solve_with_flags(self, matvec: Matvec, b: Tensor, generator=None) -> Solution:
        return neumann_solve(matvec, b, self.iters, self.alpha)

    def __repr__(self) -> str:
        return f"Neumann(iters={self.iters}, alpha={self.alpha})"
