"""Conjugate gradient for ``(H + ρI) x = b`` (Hestenes & Stiefel 1952).

Used for hypergradients by Pedregosa (2016, HOAG) and Rajeswaran et al. (2019,
iMAML).  One Hessian-vector product per iteration; on a symmetric positive
definite ``p × p`` system it is exact after ``p`` iterations (in exact
arithmetic).  Its convergence rate depends on the condition number: Grazzi et
al. (2020) analyse the iteration complexity.

Negative curvature (the truncated-Newton policy).  CG minimises the quadratic
``½xᵀ(H + ρI)x − bᵀx`` over growing Krylov spaces; once a search direction has
``dᵀ(H + ρI)d ≤ 0`` that quadratic is unbounded below along ``d`` and the
step ``rs / dᵀAd`` points the wrong way (a few iterations on an indefinite
Hessian give a hypergradient of the wrong sign).  As Newton-CG does (Nocedal &
Wright 2006, Algorithm 7.1), the iteration stops at the first such direction
and returns the last iterate, which only used directions of positive
curvature; if the very first direction has negative curvature it returns
``b`` (the identity approximation ``H⁻¹ ≈ I``).  A curvature of exactly zero
(a null-space direction of a semi-definite ``H + ρI``, or a product that
underflowed near convergence) takes no step and is not flagged: it is no
evidence that ``H`` is indefinite.  On a GPU the stop is a device-side
mask on the updates, not a Python ``break`` (in host memory it is a return,
see below), and the flag is reported in
:class:`~hyperopt_torch.ihvp.Solution`; :func:`~hyperopt_torch.implicit_hypergradient`
reads it with its one host synchronisation and warns.  Consequence: on an
indefinite ``H``, CG no longer converges to ``H⁻¹b`` with many iterations;
use ``rho`` above ``−λ_min`` to make the system positive definite instead.

On a GPU no host-device synchronisation happens inside the loop unless
``tol`` is set (stopping early needs the residual norm, and the stop flag, on
the host: one transfer per iteration).  In host memory (``HOST_SCALARS``) the
same iteration keeps its scalars as Python floats, since reading them there
costs nothing while every 0-dim tensor operation costs microseconds; it
returns at the first direction of negative curvature instead of masking the
remaining iterations, so it spends fewer products there (``info.hvps``).

References:
    Hestenes & Stiefel, "Methods of conjugate gradients for solving linear
    systems", 1952.  Rajeswaran et al., "Meta-Learning with Implicit
    Gradients", NeurIPS 2019.  Nocedal & Wright, "Numerical Optimization",
    2nd ed. 2006, Algorithm 7.1 (line search Newton-CG).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._checks import nonnegative_float, positive_float, positive_int
from ._base import Matvec, Operator, Solution, working_precision


HOST_SCALARS = ("cpu",)
"""Device types whose iterations read CG's scalars on the host (:func:`_cg_host`); elsewhere they stay on
the device and no iteration synchronises."""


def cg_solve(matvec: Matvec | Operator, b: Tensor, iters: int, rho: float = 0.0, tol: float | None = None) -> Solution:
    """Run at most ``iters`` CG iterations on ``(H + ρI) x = b`` from ``x₀ = 0``.

    ``b`` has shape ``(p,)``; ``x`` has its shape, dtype and device (a
    float16/bfloat16 ``b`` is iterated in float32, the products at ``b``'s
    precision: :func:`~hyperopt_torch.ihvp._base.working_precision`).  With
    ``tol`` set, stops once ``‖r‖ ≤ tol·‖b‖``.  Stops at the first direction
    with ``dᵀ(H + ρI)d < 0`` (module docstring) and flags
    ``negative_curvature``.  A zero residual (an exactly solved system) gives
    zero steps instead of ``0/0`` and is not flagged.

    Returns :class:`~hyperopt_torch.ihvp.Solution` ``(x, diverged=None, negative_curvature)``.
    """
    out_dtype = b.dtype
    op, b = working_precision(matvec, b)
    A = op.damped(rho)  # the system matrix H + ρI
    # A data-parallel operator (``collective``) keeps the masked loop: ranks must make the same number of
    # (all-reduced) products, and a value-dependent return would rely on bit-identical local dot products.
    if b.device.type in HOST_SCALARS and not op.collective:
        return _cg_host(A, b, iters, tol, out_dtype, rho)
    x = torch.zeros_like(b)
    r = b.clone()
    d = r.clone()
    rs = r.dot(r)
    active = torch.ones((), dtype=torch.bool, device=b.device)
    negative = torch.zeros((), dtype=torch.bool, device=b.device)
    at_start = negative
    stop = None if tol is None else (tol * b.norm()).item()
    for j in range(iters):
        Ad = A(d)
        curvature = d.dot(Ad)
        # Only a negative dᵀ(H+ρI)d is evidence of negative curvature.  A zero one is a direction in the
        # null space of a positive semi-definite H + ρI, a zero direction (convergence), or a product that
        # underflowed (a float32 residual of 1e-21 on a positive definite H): it takes no step (below)
        # and is not flagged.
        hit = active & (curvature < 0)
        if j == 0:
            at_start = hit
        negative = negative | hit
        active = active & ~hit
        step = torch.where(active & (curvature != 0), rs / curvature, torch.zeros_like(rs))
        x.add_(step * d)
        r.sub_(step * Ad)
        rs_new = r.dot(r)
        if stop is not None:
            residual, still = torch.stack([rs_new.sqrt(), active.to(rs_new.dtype)]).tolist()
            if residual <= stop or not still:
                break
        # After a stop, β = 0 keeps d = r finite (x and r no longer move).
        beta = torch.where(active & (rs != 0), rs_new / rs, torch.zeros_like(rs))
        d = r + beta * d
        rs = rs_new
    x = torch.where(at_start, b, x)
    return Solution(x.to(out_dtype), negative_curvature=negative, damping=rho)


def _cg_host(A: Operator, b: Tensor, iters: int, tol: float | None, out_dtype: torch.dtype, rho: float) -> Solution:
    """:func:`cg_solve` for vectors in host memory: the same iteration, with its scalars as Python floats.

    Reading a scalar costs nothing on the CPU, while each 0-dim tensor operation of
    the device loop costs a few microseconds; on small problems those add up to
    a large part of the solve (docs/benchmarks.md, "Small problems").  The scalars are float64 here (the
    device loop keeps them in ``b``'s dtype), so the two agree to ``b``'s
    rounding.  The loop stops outright at negative curvature (the device loop
    masks the remaining iterations instead), which saves their products.
    """
    fmax = torch.finfo(b.dtype).max

    def scalar(value: float) -> float:
        # A float64 step beyond b's range is ±inf, as the device loop's division in b's dtype gives
        # (then x is non-finite and the step is skipped), not an error when it is used as `alpha`.
        return math.copysign(math.inf, value) if abs(value) > fmax else value

    x = torch.zeros_like(b)
    r = b.clone()
    d = b.clone()
    rs = r.dot(r).item()
    stop = None if tol is None else tol * math.sqrt(rs)
    for j in range(iters):
        Ad = A(d)
        curvature = d.dot(Ad).item()
        if curvature < 0:  # negative curvature (module docstring): keep the last iterate, or b at the start
            x = b.clone() if j == 0 else x
            return Solution(x.to(out_dtype), negative_curvature=torch.ones((), dtype=torch.bool), damping=rho)
        if curvature != 0:  # a zero curvature takes no step and is not flagged (see cg_solve)
            step = scalar(rs / curvature)
            x.add_(d, alpha=step)
            r.add_(Ad, alpha=-step)
        rs_new = r.dot(r).item()
        if stop is not None and math.sqrt(rs_new) <= stop:
            break
        d = torch.add(r, d, alpha=scalar(rs_new / rs) if rs != 0 else 0.0)
        rs = rs_new
    return Solution(x.to(out_dtype), negative_curvature=torch.zeros((), dtype=torch.bool), damping=rho)


class ConjugateGradient:
    """Conjugate gradient with ``iters`` HVPs on ``(H + ρI) x = b``.

    Args:
        iters: maximum number of iterations ``l`` (= Hessian-vector products).
        rho: damping ``ρ ≥ 0`` added to the Hessian (0: plain CG).
        tol: optional relative residual ``‖r‖/‖b‖`` at which to stop early.

    Stops at the first direction of negative curvature (dᵀ(H + ρI)d < 0) and flags it
    (truncated Newton; see :func:`cg_solve`).
    """

    name = "cg"

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
        return cg_solve(matvec, b, self.iters, self.rho, self.tol)

    def __repr__(self) -> str:
        return f"ConjugateGradient(iters={self.iters}, rho={self.rho}, tol={self.tol})"
