"""Identity approximation of the inverse Hessian: ``H⁻¹ ≈ I``.

The cheapest hypergradient: zero Hessian-vector products.  It is the first
term of the Neumann series (with α = 1), the "T1–T2" method of Luketina et
al. (2016) discussed by Lorraine et al. (2020, section "Related algorithms").

References:
    Luketina et al., "Scalable Gradient-Based Tuning of Continuous
    Regularization Hyperparameters", ICML 2016.
"""

from __future__ import annotations

from torch import Tensor

from ._base import Matvec


def identity_solve(matvec: Matvec, b: Tensor) -> Tensor:
    """Return ``b`` (a copy), i.e. ``x = I b``.  ``matvec`` is never called."""
    return b.clone()


class Identity:
    """``H⁻¹ ≈ I``: no Hessian-vector products at all."""

    name = "identity"
    damping = 0.0

    def solve(self, matvec: Matvec, b: Tensor, generator=None) -> Tensor:
        return identity_solve(matvec, b)

    def __repr__(self) -> str:
        return "Identity()"
