"""The implicit hypergradient (Hataya & Yamada 2023, Eq. 3), independent of the solver.

    dg/dφ = ∂g/∂φ − (∂²f/∂φ∂θ)ᵀ (∇²_θ f)⁻¹ ∇_θ g

with ``f`` the training loss and ``g`` the validation loss, both evaluated at
the model's current parameters θ (assumed to approximately minimise ``f``).
The inverse-Hessian-vector product ``x ≈ (∇²_θ f)⁻¹ ∇_θ g`` comes from any
solver in :mod:`hyperopt_torch.ihvp`; the mixed term is one vector-Jacobian
product ``∂/∂φ ⟨∇_θ f, x⟩`` through the same gradient graph the HVPs use.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor, nn

from ._model import ModelSnapshot
from ._checks import check_hparams, scalar_with_grad
from .hvp import ENGINES, flatten, training_hvp
from .ihvp import Solver, make_solver, run_solver

LossFn = Callable[[nn.Module], Tensor]


@dataclass
class HypergradInfo:
    """Diagnostics of one hypergradient computation.

    Attributes:
        solver: ``repr`` of the solver used.
        hvps: Hessian-vector products computed (the residual's one included).
        seconds: wall time of the whole computation (losses, solve, VJP).
        residual: ``‖(H + ρI)x − b‖ / ‖b‖`` when requested, else ``None``
            (ρ is the solver's damping; 0 for Neumann and identity).
        skipped: the result was non-finite and was not applied.
        train_loss: the training loss ``f`` at θ.
        val_loss: the validation loss ``g`` at θ.
        engine: how the Hessian-vector products were computed, ``"func"`` or
            ``"autograd"`` (see :mod:`hyperopt_torch.hvp`).
        diverged: the solver's iteration grew (Neumann with ``alpha`` above
            ``2/λ_max`` or on negative curvature); the result was set to NaN
            and ``skipped`` is true.
        negative_curvature: conjugate gradient met ``dᵀ(H + ρI)d ≤ 0`` and
            stopped there (truncated Newton); the result was applied and a
            ``RuntimeWarning`` issued.
    """

    solver: str
    hvps: int
    seconds: float
    residual: float | None
    skipped: bool
    train_loss: float
    val_loss: float
    engine: str
    diverged: bool = False
    negative_curvature: bool = False


class Hypergradient(NamedTuple):
    """Result of :func:`implicit_hypergradient`: ``grads`` shaped like the hparams, and ``info``."""

    grads: tuple[Tensor, ...]
    info: HypergradInfo


def implicit_hypergradient(
    hparams: Sequence[Tensor],
    train_loss_fn: LossFn,
    val_loss_fn: LossFn,
    model: nn.Module,
    ihvp: Solver | str = "nystrom",
    *,
    generator: torch.Generator | None = None,
    residual: bool = False,
    engine: str = "func",
) -> Hypergradient:
    """The implicit hypergradient ``dg/dφ`` (Eq. 3), without touching any ``.grad``.

    Args:
        hparams: the tensors φ (leaf, ``requires_grad=True``), on the model's
            device.  They enter ``train_loss_fn`` in any differentiable way,
            typically by closure; they may also enter ``val_loss_fn`` (the
            direct term ``∂g/∂φ``).
        train_loss_fn: ``model ↦ f``, a scalar tensor.
        val_loss_fn: ``model ↦ g``, a scalar tensor.
        model: the inner model; θ are its parameters with ``requires_grad``,
            taken at their current values.
        ihvp: a solver object or one of the names accepted by
            :func:`~hyperopt_torch.make_solver` (with its default settings).
        generator: CPU ``torch.Generator`` for randomised solvers (Nyström).
        residual: also compute ``‖(H + ρI)x − b‖/‖b‖`` (one more HVP).
        engine: ``"func"`` (torch.func, the default; falls back to autograd
            when torch.func cannot transform ``train_loss_fn``) or
            ``"autograd"``; see :mod:`hyperopt_torch.hvp`.

    Returns:
        ``Hypergradient(grads, info)``: ``grads[i]`` has the shape, dtype and
        device of ``hparams[i]``; non-finite values are returned as they are,
        with ``info.skipped = True``.  A solve flagged as diverged gives NaN
        (``info.diverged``; policy in :func:`~hyperopt_torch.ihvp.run_solver`);
        CG stopped at negative curvature is applied, with
        ``info.negative_curvature`` and a ``RuntimeWarning``.

    Raises:
        TypeError / ValueError: bad hparams, a loss that is not a scalar
            tensor, hparams on another device than the model, a model without
            trainable parameters, or an hparam that the gradient of the
            training loss does not depend on.  The model is left unchanged.

    The model is left exactly as found: parameter values and ``.grad``,
    buffers and train/eval modes.  On a GPU the step synchronises with the host
    once at the end (the finiteness check and the loss values, fetched
    together), plus once inside the Nyström solver (its k × k system is solved
    on the host) and once per iteration for CG with ``tol``.
    """
    hparams = check_hparams(hparams)
    if engine not in ENGINES:
        raise ValueError(f"Invalid engine: {engine!r} (expected one of {ENGINES})")
    solver = make_solver(ihvp) if isinstance(ihvp, str) else ihvp
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no parameters with requires_grad=True: there is no inner problem to differentiate")
    device = params[0].device
    for i, h in enumerate(hparams):
        if h.device != device:
            raise ValueError(f"hparams[{i}] is on {h.device} but the model is on {device}: move them to the same device")
    ids = {id(p) for p in params}
    for i, h in enumerate(hparams):
        if id(h) in ids:
            raise ValueError(f"hparams[{i}] is also a parameter of the model: an inner parameter cannot be its own hyperparameter")

    start = time.perf_counter()
    snapshot = ModelSnapshot(model, params)
    try:
        with torch.enable_grad():
            val = scalar_with_grad(val_loss_fn(model), "val_loss_fn")
            direct = torch.autograd.grad(val, params + hparams, allow_unused=True)
            # The training loss sees the model as found, whatever val_loss_fn did to
            # it (model.eval() is common; BatchNorm in training mode updates buffers).
            snapshot.restore()
            b = flatten(direct[: len(params)], params).detach()
            hvp, train = training_hvp(train_loss_fn, model, params, engine)

            # Solvers run without recording: an iterate with an autograd history
            # keeps every product's graph alive (and CG's in-place updates then
            # leak it across steps).
            with torch.no_grad():
                x, diverged, negative = run_solver(solver, hvp, b, generator)
                res = None
                if residual:
                    r = hvp(x) + solver.damping * x - b
                    res = r.norm() / b.norm()
            mixed = hvp.mixed(x, hparams)
            for i, m in enumerate(mixed):
                if m is None:
                    raise ValueError(
                        f"hparams[{i}] does not enter the gradient of the training loss with respect to the model "
                        "parameters, so implicit differentiation gives it no hypergradient. Optimizer settings such as "
                        "the learning rate or momentum act only through the update rule: tune those with "
                        "hyperopt_torch.unrolled instead."
                    )
            grads = tuple(
                (d.detach() if d is not None else torch.zeros_like(h)) - m.detach()
                for d, m, h in zip(direct[len(params):], mixed, hparams)
            )
            flags = [f if f is not None else torch.zeros((), dtype=torch.bool, device=device) for f in (diverged, negative)]
            checks = [torch.stack([torch.isfinite(g).all() for g in grads]).all().to(val.dtype), *(f.to(val.dtype) for f in flags),
                      train.detach(), val.detach()]
            if res is not None:
                checks.append(res.detach().to(val.dtype))
            finite, diverged, negative, train_value, val_value, *rest = torch.stack(checks).tolist()  # the one sync
    finally:
        snapshot.restore()

    info = HypergradInfo(
        solver=repr(solver),
        hvps=hvp.calls,
        seconds=time.perf_counter() - start,
        residual=rest[0] if rest else None,
        skipped=not (finite and all(map(_isfinite, (train_value, val_value)))),
        train_loss=train_value,
        val_loss=val_value,
        engine=hvp.engine,
        diverged=bool(diverged),
        negative_curvature=bool(negative),
    )
    if info.negative_curvature:
        warnings.warn(
            f"{info.solver} met non-positive curvature dᵀ(H + ρI)d ≤ 0 and stopped there (truncated Newton): "
            "the training Hessian is not positive definite at these parameters. The result was applied; raise "
            "rho above the most negative eigenvalue, or train the inner model closer to a minimum.",
            RuntimeWarning, stacklevel=2,
        )
    return Hypergradient(grads, info)


def _isfinite(v: float) -> bool:
    return v == v and abs(v) != float("inf")


