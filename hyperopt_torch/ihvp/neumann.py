"""Truncated Neumann series for ``H⁻¹ b`` (Lorraine, Vicol & Duvenaud 2020).

Algorithm 3 (``approxInverseHVP``) of the paper; Algorithm 1 of their slides.

    H⁻¹ = α Σ_{j≥0} (I − αH)^j,   valid when ‖I − αH‖ < 1,

truncated after ``iters`` terms beyond the first:
``x = α Σ_{j=0}^{l} (I − αH)^j b`` with ``l = iters`` Hessian-vector
products.  ``alpha`` must satisfy ``α‖H‖ < 2`` for the series to converge
on a positive definite ``H``; on an indefinite ``H`` it diverges along the
negative eigendirections.  The Nyström paper uses ``α = 0.01``, ``l ∈ {5, 10, 20}``.

References:
    Lorraine et al., "Optimizing Millions of Hyperparameters by Implicit
    Differentiation", AISTATS 2020.
"""

from __future__ import annotations

from torch import Tensor

from ..hvp import Matvec
from ._validate import positive_float, positive_int


def neumann_solve(matvec: Matvec, b: Tensor, iters: int, alpha: float) -> Tensor:
    """``α Σ_{j=0}^{iters} (I − αH)^j b`` using ``iters`` calls of ``matvec``.

    ``b`` has shape ``(p,)``; the result has the shape, dtype and device of ``b``.
    """
    v = b.clone()
    acc = b.clone()
    for _ in range(iters):
        v = v - alpha * matvec(v)
        acc += v
    return acc.mul_(alpha)


class Neumann:
    """Neumann-series inverse-Hessian-vector product with ``iters`` HVPs and step ``alpha``."""

    name = "neumann"
    damping = 0.0

    def __init__(self, iters: int = 10, alpha: float = 0.01):
        self.iters = positive_int("iters", iters)
        self.alpha = positive_float("alpha", alpha)

    def solve(self, matvec: Matvec, b: Tensor, generator=None) -> Tensor:
        return neumann_solve(matvec, b, self.iters, self.alpha)

    def __repr__(self) -> str:
        return f"Neumann(iters={self.iters}, alpha={self.alpha})"
