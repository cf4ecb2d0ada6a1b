"""The pseudo-inverse cut-off shared by the solvers that factorise a small float64 matrix (Nyström, Exact).

Which eigenvalues of a matrix built from Hessian-vector products are data?
---------------------------------------------------------------------------
The matrix ``A'`` (``W = ΩᵀHΩ`` for Nyström, the dense ``H`` for Exact) is
assembled in float64, but its entries come from products ``HΩ`` computed at the
model's precision: ``A' = A + N`` with ``A`` symmetric (the model's Hessian in
exact arithmetic) and ``N`` the rounding error of the products, their storage
in the model's dtype included.  By Weyl's inequality every eigenvalue of
``½(A' + A'ᵀ)`` is within ``‖½(N + Nᵀ)‖₂`` of ``A``'s; an eigenvalue below
that is indistinguishable from zero (its sign included), and inverting it
would put an arbitrary, possibly huge, term into the pseudo-inverse.

Column ``j`` of ``A'`` is its own product, rounded on its own, so the errors
of ``A'ᵢⱼ`` and ``A'ⱼᵢ`` are independent and the skew-symmetric part
``½(A' − A'ᵀ) = ½(N − Nᵀ)`` is pure noise, observed exactly.  For errors with
no preferred symmetry the symmetric part of ``N`` has the same spectral norm.
The cut-off is the larger of

1. ``2‖½(A' − A'ᵀ)‖₂``: eigenvalues at least twice the measured noise, so
   their sign and size are data.  It follows the error the products actually
   made: a bfloat16 model (ε = 2⁻⁷), a float16 one (2⁻¹⁰), and a float32 model
   under bfloat16 autocast, whose bfloat16-sized errors sit in float32
   storage where no dtype-based ε can see them.
2. ``n·ε₆₄·max|λ|`` (``ε₆₄ = 2⁻⁵²``): the backward error of the float64
   ``eigh``, the cut-off of ``numpy.linalg.pinv``-style routines.

What the cut-off is not: ``n·ε·max|λ|`` with the data's ε.  That worst case
over aligned errors exceeds ``max|λ|`` once ``n ≥ 1/ε`` (128 in bfloat16)
and discarded every eigenvalue.  Nor ``ε·max|λ|``: products that agree
exactly (``A'`` symmetric as computed, e.g. a matvec that copies rows of a
stored matrix) are consistent data, and on a 256 × 256 bfloat16 matrix with
eigenvalues from 1 to 10^-2.5 that cut sent the small directions to ``1/ρ``
and gave 35 % error against float64 where the noise-based cut gives 1.8 %.
"""

from __future__ import annotations

import torch
from torch import Tensor

EPS64 = torch.finfo(torch.float64).eps
SKEW_FACTOR = 2.0


def noise_floor(A: Tensor, lam: Tensor) -> Tensor:
    """The eigenvalue cut-off (a 0-dim float64 tensor) for the square float64 ``A``.

    ``lam`` are the eigenvalues of ``½(A + Aᵀ)``; see the module docstring.
    """
    n = A.shape[0]
    scale = lam.abs().max() if lam.numel() else lam.new_zeros(())
    skew = torch.linalg.matrix_norm(0.5 * (A - A.T), ord=2)
    return torch.maximum(scale * n * EPS64, SKEW_FACTOR * skew)


def eigh_above_noise(A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Eigenpairs of ``½(A + Aᵀ)`` whose eigenvalues stand above the noise of ``A``.

    ``A`` is ``(n, n)`` float64, symmetric up to the rounding of the products
    it was built from, *as computed* (not symmetrised: its skew-symmetric part
    is the noise estimate).

    Returns ``(lam, U, floor)``: the kept eigenvalues ``(r,)`` (ascending),
    their orthonormal eigenvectors ``(n, r)``, and the cut-off ``floor``: every
    kept ``|lam| > floor``.  ``r`` may be 0 (``A = 0``).
    """
    lam, U = torch.linalg.eigh(0.5 * (A + A.T))
    floor = noise_floor(A, lam)
    keep = lam.abs() > floor
    return lam[keep], U[:, keep], floor
