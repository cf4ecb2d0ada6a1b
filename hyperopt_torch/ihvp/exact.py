"""Exact ``(H + ρI)⁻¹ b`` from the dense Hessian, for small problems and tests.

The Hessian is assembled from ``p`` Hessian-vector products with the unit
vectors, ``batch`` of them per batched backward, symmetrised, and solved in
float64 through its eigendecomposition (a pseudo-inverse: eigenvalues of
``H + ρI`` below ``p·ε·max|λ|`` are treated as zero rather than inverted).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..hvp import Matvec
from ._validate import nonnegative_float, positive_int


def dense_hessian(matvec: Matvec, p: int, *, dtype: torch.dtype, device, batch: int = 256) -> Tensor:
    """Materialise the ``p × p`` matrix of ``matvec`` with ``ceil(p / batch)`` batched calls."""
    rows = []
    for start in range(0, p, batch):
        stop = min(start + batch, p)
        E = torch.zeros(stop - start, p, dtype=dtype, device=device)
        E[torch.arange(stop - start), torch.arange(start, stop)] = 1
        rows.append(matvec(E))
    return torch.cat(rows)


def symmetric_pinv_solve(A: Tensor, b: Tensor, eps: float) -> Tensor:
    """Solve ``A x = b`` for symmetric ``A`` (float64) by eigendecomposition, pseudo-inverting small eigenvalues."""
    lam, U = torch.linalg.eigh(0.5 * (A + A.T))
    tol = lam.abs().max() * A.shape[0] * eps
    inv = torch.where(lam.abs() > tol, 1.0 / lam, torch.zeros_like(lam))
    return U @ (inv * (U.T @ b))


def exact_solve(matvec: Matvec, b: Tensor, rho: float = 0.0, max_params: int = 20_000, batch: int = 256) -> Tensor:
    """``(H + ρI)⁻¹ b`` with the dense Hessian (``p`` HVPs); raises ``ValueError`` if ``p > max_params``.

    A non-finite Hessian or ``b`` gives an all-NaN result (the caller's signal to skip the step).
    """
    p = b.numel()
    if p > max_params:
        raise ValueError(
            f"Exact() builds the dense {p}x{p} Hessian, larger than max_params={max_params}; "
            "use Nystrom or ConjugateGradient for a model this size, or raise max_params"
        )
    H = dense_hessian(matvec, p, dtype=b.dtype, device=b.device, batch=batch).double()
    if not bool(torch.isfinite(H).all() & torch.isfinite(b).all()):  # e.g. a diverged model: report NaN
        return torch.full_like(b, float("nan"))
    H.diagonal().add_(rho)
    x = symmetric_pinv_solve(H, b.double(), torch.finfo(b.dtype).eps)
    return x.to(b.dtype)


class Exact:
    """Dense-Hessian solve of ``(H + ρI) x = b``; ``p`` HVPs and ``O(p²)`` memory.

    Args:
        rho: damping ``ρ ≥ 0``.
        max_params: refuse models with more parameters than this.
        batch: unit vectors per batched Hessian-vector product.
    """

    name = "exact"

    def __init__(self, rho: float = 0.0, max_params: int = 20_000, batch: int = 256):
        self.rho = nonnegative_float("rho", rho)
        self.max_params = positive_int("max_params", max_params)
        self.batch = positive_int("batch", batch)

    @property
    def damping(self) -> float:
        return self.rho

    def solve(self, matvec: Matvec, b: Tensor, generator=None) -> Tensor:
        return exact_solve(matvec, b, self.rho, self.max_params, self.batch)

    def __repr__(self) -> str:
        return f"Exact(rho={self.rho})"
