"""Conjugate gradient for ``(H + ρI) x = b`` (Hestenes & Stiefel 1952).

Used for hypergradients by Pedregosa (2016, HOAG) and Rajeswaran et al. (2019,
iMAML).  One Hessian-vector product per iteration; on a symmetric positive
definite ``p × p`` system it is exact after ``p`` iterations (in exact
arithmetic).  Its convergence rate depends on the condition number, and on an
indefinite ``H`` the step ``rs / pᵀAp`` can blow up: Grazzi et al. (2020)
analyse the iteration complexity.

No host-device synchronisation happens inside the loop unless ``tol`` is set
(stopping early needs the residual norm on the host).

References:
    Hestenes & Stiefel, "Methods of conjugate gradients for solving linear
    systems", 1952.  Rajeswaran et al., "Meta-Learning with Implicit
    Gradients", NeurIPS 2019.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..hvp import Matvec
from ._validate import nonnegative_float, positive_float, positive_int


def cg_solve(matvec: Matvec, b: Tensor, iters: int, rho: float = 0.0, tol: float | None = None) -> Tensor:
    """Run at most ``iters`` CG iterations on ``(H + ρI) x = b`` from ``x₀ = 0``.

    ``b`` has shape ``(p,)``; the result has its shape, dtype and device.  With
    ``tol`` set, stops once ``‖r‖ ≤ tol·‖b‖``.  A zero curvature ``pᵀAp`` (an
    exactly solved system) gives a zero step instead of ``0/0``.
    """
    x = torch.zeros_like(b)
    r = b.clone()
    d = r.clone()
    rs = r.dot(r)
    stop = None if tol is None else (tol * b.norm()).item()
    for _ in range(iters):
        Ad = matvec(d)
        if rho:
            Ad = Ad + rho * d
        curvature = d.dot(Ad)
        step = torch.where(curvature != 0, rs / curvature, torch.zeros_like(rs))
        x.add_(step * d)
        r.sub_(step * Ad)
        rs_new = r.dot(r)
        if stop is not None and rs_new.sqrt().item() <= stop:
            break
        beta = torch.where(rs != 0, rs_new / rs, torch.zeros_like(rs))
        d = r + beta * d
        rs = rs_new
    return x


class ConjugateGradient:
    """Conjugate gradient with ``iters`` HVPs on ``(H + ρI) x = b``.

    Args:
        iters: maximum number of iterations ``l`` (= Hessian-vector products).
        rho: damping ``ρ ≥ 0`` added to the Hessian (0: plain CG).
        tol: optional relative residual ``‖r‖/‖b‖`` at which to stop early.
    """

    name = "cg"

    def __init__(self, iters: int = 10, rho: float = 0.0, tol: float | None = None):
        self.iters = positive_int("iters", iters)
        self.rho = nonnegative_float("rho", rho)
        self.tol = None if tol is None else positive_float("tol", tol)

    @property
    def damping(self) -> float:
        return self.rho

    def solve(self, matvec: Matvec, b: Tensor, generator=None) -> Tensor:
        return cg_solve(matvec, b, self.iters, self.rho, self.tol)

    def __repr__(self) -> str:
        return f"ConjugateGradient(iters={self.iters}, rho={self.rho}, tol={self.tol})"
