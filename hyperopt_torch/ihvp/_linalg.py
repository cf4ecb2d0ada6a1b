"""The pseudo-inverse cut-off shared by the solvers that factorise a small float64 matrix (Nyström, Exact).

Which eigenvalues of a matrix built from Hessian-vector products are data?
---------------------------------------------------------------------------
The matrix ``A'`` (``W = ΩᵀHΩ`` for Nyström, the dense ``H`` for Exact) is
assembled in float64, but its entries come from products ``HΩ`` computed at the
model's precision: ``A' = A + N`` with ``A`` symmetric (the model's Hessian in
exact arithmetic) and ``N`` the rounding error of the products.  By Weyl's
inequality every eigenvalue of ``½(A' + A'ᵀ)`` is within ``‖½(N + Nᵀ)‖₂`` of
``A``'s; an eigenvalue below that is indistinguishable from zero (its sign
included), and inverting it would put an arbitrary, possibly huge, term into
the pseudo-inverse.  The cut-off is the largest of three estimates of that
perturbation:

1. **Storage**, ``ε·max|λ|``: every entry of a product was rounded to the
   data's dtype (machine epsilon ``ε``: 2⁻⁷ for bfloat16, 2⁻¹⁰ for float16,
   2⁻²³ for float32), a relative perturbation of order ``ε`` of the matrix.
   It is not multiplied by the size ``n``: ``n·ε`` is a worst case over
   aligned errors that rounding does not produce, and at ``n ≥ 128`` in
   bfloat16 it exceeds 1, which discarded every eigenvalue.
2. **Computation**, ``2‖½(A' − A'ᵀ)‖₂``: each column comes from its own
   product, so the errors of ``A'ᵢⱼ`` and ``A'ⱼᵢ`` are independent and the
   skew-symmetric part of ``A'`` is pure noise, observed exactly.  For errors
   with no preferred symmetry the symmetric part of ``N`` has the same
   spectral norm; the factor 2 keeps only eigenvalues at least twice that
   large, so their sign and size are data.  This estimate follows the error
   the products actually made — a float32 model under bfloat16 autocast has
   bfloat16-sized errors in float32 storage, which estimate 1 cannot see.
3. **The float64 factorisation**, ``n·ε₆₄·max|λ|`` (``ε₆₄ = 2⁻⁵²``): the
   backward error of ``eigh``, the cut-off of ``numpy.linalg.pinv``-style
   routines; it matters only for float64 data.
"""

from __future__ import annotations

import torch
from torch import Tensor

EPS64 = torch.finfo(torch.float64).eps
SKEW_FACTOR = 2.0


def noise_floor(A: Tensor, lam: Tensor, eps: float) -> Tensor:
    """The eigenvalue cut-off (a 0-dim float64 tensor) for the square float64 ``A``.

    ``lam`` are the eigenvalues of ``½(A + Aᵀ)`` and ``eps`` the machine
    epsilon of the products ``A`` was built from; see the module docstring.
    """
    n = A.shape[0]
    scale = lam.abs().max() if lam.numel() else lam.new_zeros(())
    skew = torch.linalg.matrix_norm(0.5 * (A - A.T), ord=2)
    return torch.maximum(scale * max(eps, n * EPS64), SKEW_FACTOR * skew)


def eigh_above_noise(A: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Eigenpairs of ``½(A + Aᵀ)`` whose eigenvalues stand above the noise of ``A``.

    Args:
        A: ``(n, n)`` float64, symmetric up to the rounding of the products
            it was built from.
        eps: machine epsilon of those products' dtype.

    Returns ``(lam, U, floor)``: the kept eigenvalues ``(r,)`` (ascending),
    their orthonormal eigenvectors ``(n, r)``, and the cut-off ``floor``: every
    kept ``|lam| > floor``.  ``r`` may be 0 (``A = 0``).
    """
    lam, U = torch.linalg.eigh(0.5 * (A + A.T))
    floor = noise_floor(A, lam, eps)
    keep = lam.abs() > floor
    return lam[keep], U[:, keep], floor
