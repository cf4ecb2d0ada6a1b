"""MINRES for the symmetric, possibly indefinite ``(H + ρI) x = b`` (Paige & Saunders 1975).

Conjugate gradient needs ``H + ρI`` positive definite: on an indefinite
Hessian (a network far from a minimum, iMAML's support Hessian after a few
inner steps) it stops at the first direction of negative curvature
(:mod:`~hyperopt_torch.ihvp.cg`).  MINRES needs only symmetry.  It builds the
same Krylov space ``K_l = span{b, Ab, …, A^{l−1}b}`` (``A = H + ρI``) with the
Lanczos process and returns the iterate of least residual in it,

    x_l = argmin_{x ∈ K_l} ‖b − A x‖₂,

so the residual never grows, and after ``p`` iterations on a nonsingular
``p × p`` system (or once the Krylov space is invariant) ``x`` is the exact
solution, in exact arithmetic, whatever the signs of the eigenvalues.

The iteration (Paige & Saunders 1975, with the recurrences of their MINRES
code, which ``scipy.sparse.linalg.minres`` also follows), one Hessian-vector
product per iteration:

* Lanczos: ``β₁v₁ = b``, ``β_{k+1}v_{k+1} = Hv_k − α'_k v_k − β_k v_{k−1}``
  with ``α'_k = v_kᵀHv_k``.  ``H + ρI`` has the same Lanczos vectors as
  ``H``; the shift enters only ``α_k = α'_k + ρ``, the diagonal of the
  tridiagonal ``T_k`` (``vᵀ(H + ρI)v`` is never formed).
* QR of ``T_{k+1,k}`` by Givens rotations ``(c_k, s_k)``, one per
  iteration, giving the upper-triangular entries ``γ_k, δ_k, ε_k`` of ``R_k``.
* ``x_k = x_{k−1} + φ_k w_k`` with ``w_k = (v_k − ε_k w_{k−2} − δ_k w_{k−1})/γ_k``
  and ``φ_k = c_k φ̄_{k−1}``, ``φ̄_k = s_k φ̄_{k−1}``; ``φ̄_k = ‖b − A x_k‖`` is
  the residual norm at no extra cost (the ``tol`` test uses it).

Numerical hazards, and what is done:

* No square root of anything that can be negative: ``β_{k+1} = ‖·‖₂`` and
  ``γ_k = hypot(γ̄_k, β_{k+1})`` (CG's step divides by ``dᵀAd``, which an
  indefinite ``A`` can make zero or negative; MINRES never uses it).
* ``b = 0``: ``x = 0`` (``v₁`` would be ``0/0``).
* ``β_{k+1} = 0`` (Lanczos breakdown): the Krylov space is invariant and
  ``x_k`` is the exact solution if ``γ_k ≠ 0``; the iteration stops there
  (on a GPU: every later update is masked to zero).
* ``γ_k = 0`` (then ``β_{k+1} = 0`` too): ``T_k`` is singular and ``b`` has
  a component outside the range of ``A`` (a singular, inconsistent system).
  The update is skipped and ``x_{k−1}``, a least-squares solution (not the
  minimum-norm one), is returned.  A singular but consistent system (``b``
  in the range) never meets this: the Krylov space stays inside the range,
  and MINRES from ``x₀ = 0`` converges to the minimum-norm solution.
* A NaN or infinity in a product reaches ``x`` (the masks test ``!= 0``,
  which a NaN passes), so the caller skips the step; it never leaves a stale
  finite iterate.
* Finite precision loses the Lanczos vectors' orthogonality (as it loses CG's
  conjugacy): MINRES still converges, later than in exact arithmetic, and
  ``φ̄_k`` can then underestimate the true residual slightly.  The exact zeros
  above are then rarely met.  On a singular *inconsistent* system the
  residual stagnates at its least-squares value while further iterations can
  make ``‖x‖`` grow without bound (scipy's MINRES does the same; MINRES-QLP,
  Choi, Paige & Saunders 2011, is the method for such systems); on a
  consistent one, iterations long past convergence can add null-space
  components while the residual stays at rounding level.  A damping ``ρ`` that makes ``H + ρI`` nonsingular
  avoids both.

Host synchronisation as in :mod:`~hyperopt_torch.ihvp.cg`: in host memory
(``HOST_SCALARS``) the scalars are Python floats and the loop returns at a
breakdown; elsewhere they are 0-dim tensors, the stop is a device-side mask,
and no iteration synchronises unless ``tol`` is set (then one transfer per
iteration).  A data-parallel matvec (``collective``) always takes the masked
loop: every rank makes all ``iters`` products, and only the ``tol`` test,
computed from all-reduced values that are equal on every rank, can end it
early.

References:
    Paige & Saunders, "Solution of sparse indefinite systems of linear
    equations", SIAM J. Numer. Anal. 12(4), 1975.  Choi, Paige & Saunders,
    "MINRES-QLP: a Krylov subspace method for indefinite or singular
    symmetric systems", SIAM J. Sci. Comput. 33(4), 2011 (singular systems).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._checks import nonnegative_float, positive_float, positive_int
from ._base import Matvec, Solution, working_precision


HOST_SCALARS = ("cpu",)
"""Device types whose iterations read MINRES's scalars on the host (:func:`_minres_host`); elsewhere they stay
on the device and no iteration synchronises (the same policy as :data:`hyperopt_torch.ihvp.cg.HOST_SCALARS`)."""


def minres_solve(matvec: Matvec, b: Tensor, iters: int, rho: float = 0.0, tol: float | None = None) -> Solution:
    """Run at most ``iters`` MINRES iterations on ``(H + ρI) x = b`` from ``x₀ = 0``.

    ``H`` must be symmetric; it may be indefinite or singular.  ``b`` has
    shape ``(p,)``; ``x`` has its shape, dtype and device (a
    float16/bfloat16 ``b`` is iterated in float32, the products at ``b``'s
    precision: :func:`~hyperopt_torch.ihvp._base.working_precision`).  One
    call of ``matvec`` per iteration, on one vector.  With ``tol`` set, stops
    once ``‖b − (H + ρI)x‖ ≤ tol·‖b‖`` (the residual as the recurrence
    tracks it).  Stops early, in host memory, at an exact solution or a
    singular ``T_k`` (module docstring); ``b = 0`` gives ``x = 0``.

    Returns :class:`~hyperopt_torch.ihvp.Solution` ``(x)`` without flags: the
    residual cannot grow and there is no curvature condition to violate.
    """
    out_dtype = b.dtype
    # A data-parallel matvec keeps the masked loop (see cg_solve): ranks must make the same number of products.
    matvec, b = working_precision(matvec, b)
    if b.device.type in HOST_SCALARS and not matvec.collective:
        return _minres_host(matvec, b, iters, rho, tol, out_dtype)
    x = torch.zeros_like(b)
    beta1 = torch.linalg.vector_norm(b)
    zero, one = torch.zeros_like(beta1), torch.ones_like(beta1)
    # Masks test `!= 0`, never `> 0`: a NaN (a non-finite product) must reach x, where the caller sees it.
    live = beta1 != 0  # b = 0: x = 0, every update masked
    stop = None if tol is None else tol * beta1.item()
    v_prev, v = torch.zeros_like(b), b / torch.where(live, beta1, one)
    w1, w2 = torch.zeros_like(b), torch.zeros_like(b)  # w_{k−2}, w_{k−1}
    beta, eps, dbar, cs, sn, phibar = zero, zero, zero, -one, zero, beta1
    for _ in range(iters):
        z = matvec(v)
        a = v.dot(z)
        # β_{k+1} v_{k+1}; rebinding z frees the product (never written to: the matvec's output may be shared)
        z = torch.addcmul(z, v, -a).addcmul_(v_prev, -beta)
        beta_next = torch.linalg.vector_norm(z)
        alpha = a + rho
        # apply the previous rotation to T's new column, then the one that annihilates β_{k+1}
        delta = cs * dbar + sn * alpha
        gbar = sn * dbar - cs * alpha
        eps_next = sn * beta_next
        dbar = -cs * beta_next
        gamma = torch.hypot(gbar, beta_next)
        live = live & (gamma != 0)  # γ = 0: singular T_k, b outside the range; keep x_{k−1}
        gamma = torch.where(live, gamma, one)  # masked iterations stay finite
        cs, sn = gbar / gamma, beta_next / gamma
        phi = torch.where(live, cs * phibar, zero)
        phibar = torch.where(live, sn * phibar, phibar)
        w = v.addcmul(w1, -eps).addcmul_(w2, -delta).div_(gamma)
        x.addcmul_(w, phi)
        w1, w2, eps = w2, w, eps_next
        live = live & (beta_next != 0)  # Lanczos breakdown: x is exact; later iterations change nothing
        if stop is not None:
            residual, still = torch.stack([phibar, live.to(phibar.dtype)]).tolist()
            if residual <= stop or not still:
                break
        # After a breakdown z = 0, so v = 0: the masked iterations multiply zeros.
        v_prev, v = v, z.div_(torch.where(beta_next != 0, beta_next, one))
        beta = beta_next
    return Solution(x.to(out_dtype), damping=rho)


def _minres_host(matvec: Matvec, b: Tensor, iters: int, rho: float, tol: float | None,
                 out_dtype: torch.dtype) -> Solution:
    """:func:`minres_solve` for vectors in host memory: the same iteration, with its scalars as Python floats.

    As in :func:`~hyperopt_torch.ihvp.cg._cg_host`: reading a scalar costs
    nothing on the CPU while each 0-dim tensor operation costs microseconds.
    The scalars are float64 here, so this loop and the device loop agree to
    ``b``'s rounding.  It returns at a breakdown instead of masking.
    """
    x = torch.zeros_like(b)
    beta1 = torch.linalg.vector_norm(b).item()
    if beta1 == 0:
        return Solution(x.to(out_dtype), damping=rho)
    stop = None if tol is None else tol * beta1
    v_prev, v = None, b / beta1
    w1, w2 = None, None  # w_{k−2}, w_{k−1}; absent (zero) in the first iterations
    beta, eps, dbar, cs, sn, phibar = 0.0, 0.0, 0.0, -1.0, 0.0, beta1
    for _ in range(iters):
        z = matvec(v)
        a = v.dot(z).item()
        z = torch.add(z, v, alpha=-a)
        if v_prev is not None:
            z.add_(v_prev, alpha=-beta)
        beta_next = torch.linalg.vector_norm(z).item()
        alpha = a + rho
        delta = cs * dbar + sn * alpha
        gbar = sn * dbar - cs * alpha
        eps_next = sn * beta_next
        dbar = -cs * beta_next
        gamma = math.hypot(gbar, beta_next)
        if gamma == 0:  # singular T_k, b outside the range: x_{k−1} is a least-squares solution
            break
        cs, sn = gbar / gamma, beta_next / gamma
        phi, phibar = cs * phibar, sn * phibar
        w = v.clone()
        if w1 is not None:
            w.add_(w1, alpha=-eps)
        if w2 is not None:
            w.add_(w2, alpha=-delta)
        # div_, not alpha=1/γ: a γ below b's range gives inf (a skipped step), where alpha would raise
        x.add_(w.div_(gamma), alpha=phi)
        w1, w2, eps = w2, w, eps_next
        if beta_next == 0 or (stop is not None and phibar <= stop):
            break
        v_prev, v = v, z.div_(beta_next)
        beta = beta_next
    return Solution(x.to(out_dtype), damping=rho)


class Minres:
    """MINRES with ``iters`` HVPs on the symmetric, possibly indefinite ``(H + ρI) x = b``.

    Args:
        iters: maximum number of iterations ``l`` (= Hessian-vector products).
        rho: damping ``ρ ≥ 0`` added to the Hessian (0: plain MINRES).
        tol: optional relative residual ``‖r‖/‖b‖`` at which to stop early.

    ``x_l`` minimises ``‖b − (H + ρI)x‖`` over the Krylov space of dimension
    ``l``; unlike CG it does not stop at negative curvature and converges on
    indefinite systems (see :func:`minres_solve`).
    """

    name = "minres"

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
        return minres_solve(matvec, b, self.iters, self.rho, self.tol)

    def __repr__(self) -> str:
        return f"Minres(iters={self.iters}, rho={self.rho}, tol={self.tol})"
