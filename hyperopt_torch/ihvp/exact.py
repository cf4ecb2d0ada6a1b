"""Exact ``(H + ρI)⁻¹ b`` from the dense Hessian, for small problems and tests.

The Hessian is assembled from ``p`` Hessian-vector products with the unit
vectors, ``batch`` of them per batched backward, symmetrised, and solved in
float64 through its eigendecomposition.  Eigenvalues of ``H`` at or below the
noise of the Hessian-vector products (the larger of twice the norm of the
computed Hessian's skew-symmetric part and ``p·ε₆₄·max|λ|``; derived in
:mod:`hyperopt_torch.ihvp._linalg`) are treated as zero, so their directions
get ``1/ρ`` (a pseudo-inverse when ``ρ = 0``) rather than the inverse of
rounding noise.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import nonnegative_float, positive_int
from ._base import Matvec
from ._linalg import noise_floor


def dense_hessian(matvec: Matvec, p: int, *, dtype: torch.dtype, device, batch: int = 256) -> Tensor:
    """Materialise the ``p × p`` matrix of ``matvec`` with ``ceil(p / batch)`` batched calls."""
    rows = []
    for start in range(0, p, batch):
        stop = min(start + batch, p)
        E = torch.zeros(stop - start, p, dtype=dtype, device=device)
        E[torch.arange(stop - start), torch.arange(start, stop)] = 1
        rows.append(matvec(E))
    return torch.cat(rows)


def damped_pinv_solve(H: Tensor, b: Tensor, rho: float) -> Tensor:
    """``(H + ρI)⁻¹ b`` for a float64 ``H`` that is symmetric up to the rounding of the products it came from.

    Eigenvalues of ``H`` at or below the noise are zero: their directions get
    ``b/ρ`` (nothing when ``ρ = 0``, the pseudo-inverse), as in Nyström's
    complement.  An eigenvalue ``λ + ρ`` within the noise of zero (an
    indefinite ``H`` with ``λ ≈ −ρ``) is pseudo-inverted too.
    """
    lam, U = torch.linalg.eigh(0.5 * (H + H.T))
    floor = noise_floor(H, lam)
    shifted = lam + rho
    inv = torch.where(shifted.abs() > floor, 1.0 / shifted, torch.zeros_like(shifted))
    # Noise-level directions get 1/ρ through their own eigenvectors, not as b − UUᵀb over the kept
    # ones: that difference carries ε‖b‖ of rounding, which 1/ρ = 1e13 would turn into 1e-3‖b‖.
    inv = torch.where(lam.abs() > floor, inv, torch.full_like(lam, 1.0 / rho if rho else 0.0))
    return U @ (inv * (U.T @ b))


MAX_MEMORY = 4 * 2**30  # bytes: the default guard, about p = 8,700 in float64 and 9,400 in float32


def exact_memory(p: int, dtype: torch.dtype, batch: int = 256) -> int:
    """Bytes :func:`exact_solve` needs at its peak for ``p`` parameters of ``dtype``, an upper estimate.

    The Hessian's rows and their concatenation (``2p²`` elements of ``dtype``),
    then in float64 the matrix, its symmetrised copy, the eigenvectors and the
    eigensolver's workspace (``5p²`` doubles, about ``2p²`` of them workspace),
    plus one block of ``batch`` unit vectors and its product.  Measured peak
    on a CPU at p = 3000: 42 bytes per p² in float64 and in float32; this
    estimate gives 56 and 48.
    """
    size = torch.empty((), dtype=dtype).element_size()
    return p * p * (2 * size + 5 * 8) + 2 * batch * p * size


def exact_solve(matvec: Matvec, b: Tensor, rho: float = 0.0, max_memory: int = MAX_MEMORY, batch: int = 256) -> Tensor:
    """``(H + ρI)⁻¹ b`` with the dense Hessian (``p`` HVPs).

    Raises ``ValueError``, before any product, if :func:`exact_memory` exceeds
    ``max_memory`` bytes.  A non-finite Hessian or ``b`` gives an all-NaN
    result (the caller's signal to skip the step).
    """
    p = b.numel()
    need = exact_memory(p, b.dtype, batch)
    if need > max_memory:
        raise ValueError(
            f"Exact() needs about {need / 2**30:.2f} GiB for the dense {p}x{p} Hessian and its eigendecomposition "
            f"({b.dtype}), more than max_memory={max_memory / 2**30:.2f} GiB; use Nystrom or ConjugateGradient for "
            "a model this size, or raise Exact(max_memory=...) if the device has the memory"
        )
    H = dense_hessian(matvec, p, dtype=b.dtype, device=b.device, batch=batch).double()
    if not bool(torch.isfinite(H).all() & torch.isfinite(b).all()):  # e.g. a diverged model: report NaN
        return torch.full_like(b, float("nan"))
    x = damped_pinv_solve(H, b.double(), rho)
    return x.to(b.dtype)


class Exact:
    """Dense-Hessian solve of ``(H + ρI) x = b``; ``p`` HVPs and ``O(p²)`` memory.

    Args:
        rho: damping ``ρ ≥ 0``.
        max_memory: bytes the solve may use (default 4 GiB); a model whose
            :func:`exact_memory` estimate is larger is refused with a
            ``ValueError`` stating the estimate, before any work.
        batch: unit vectors per batched Hessian-vector product.
    """

    name = "exact"

    def __init__(self, rho: float | None = None, max_memory: int = MAX_MEMORY, batch: int = 256):
        self.rho = nonnegative_float("rho", 0.0 if rho is None else rho)  # None: the default, 0
        self.max_memory = positive_int("max_memory", max_memory)
        self.batch = positive_int("batch", batch)

    @property
    def damping(self) -> float:
        return self.rho

    def solve(self, matvec: Matvec, b: Tensor, generator=None) -> Tensor:
        return exact_solve(matvec, b, self.rho, self.max_memory, self.batch)

    def __repr__(self) -> str:
        return f"Exact(rho={self.rho})"
