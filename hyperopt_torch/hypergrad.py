"""The implicit hypergradient (Hataya & Yamada 2023, Eq. 3), independent of the solver.

    dg/dφ = ∂g/∂φ − (∂²f/∂φ∂θ)ᵀ (∇²_θ f)⁻¹ ∇_θ g

with ``f`` the training loss and ``g`` the validation loss, both evaluated at
the model's current parameters θ (assumed to approximately minimise ``f``).
The inverse-Hessian-vector product ``x ≈ (∇²_θ f)⁻¹ ∇_θ g`` comes from any
solver in :mod:`hyperopt_torch.ihvp`; the mixed term is one vector-Jacobian
product ``∂/∂φ ⟨∇_θ f, x⟩`` through the same gradient graph the HVPs use.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor, nn

from ._checks import check_hparams, check_model, check_scalar, require_graph
from ._model import MathAttention, ModelSnapshot, SecondOrder, modules_of, refuse_once_differentiable, uncompiled
from ._warn import warn
from .distributed import data_parallel
from .hvp import ENGINES, autograd_grad, flatten, training_hvp
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
        collectives: ``torch.distributed`` collectives this rank made (0 in a
            single process; see :mod:`hyperopt_torch.distributed`).
        comm_bytes: bytes this rank handed to those collectives.
        hvp_strategy: how the last block of HVPs was batched, ``"single"``,
            ``"vmap"``, ``"loop"`` or ``"vmap:c"`` (chosen by measurement, see
            :class:`~hyperopt_torch.hvp.HessianVectorProduct`); ``None`` if no HVP ran.
        chunk: the κ a Nyström solver used (``chunk="auto"`` reports its
            choice here); ``None`` for other solvers.
        diverged: the solver's iteration grew (Neumann with ``alpha`` above
            ``2/λ_max`` or on negative curvature); the result was set to NaN
            and ``skipped`` is true.
        negative_curvature: conjugate gradient met ``dᵀ(H + ρI)d < 0`` and
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
    collectives: int = 0
    comm_bytes: int = 0
    hvp_strategy: str | None = None
    chunk: int | None = None
    diverged: bool = False
    negative_curvature: bool = False


class Hypergradient(NamedTuple):
    """Result of :func:`implicit_hypergradient`: ``grads`` shaped like the hparams, and ``info``."""

    grads: tuple[Tensor, ...]
    info: HypergradInfo


def _refuse_backward(snapshot: ModelSnapshot, n_params: int, name: str) -> None:
    touched = snapshot.touched()
    if touched:
        i = touched[0]
        what = f"model parameter {i}" if i < n_params else f"hparams[{i - n_params}]"
        raise ValueError(
            f"{name} called .backward() itself (it created a .grad on {what}): return the loss without calling "
            "backward; the hypergradient differentiates it and needs its graph. Nothing was changed."
        )


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
            direct term ``∂g/∂φ``), or only ``val_loss_fn`` (then the direct
            term is their whole hypergradient).
        train_loss_fn: ``model ↦ f``, a scalar tensor with its graph; it must
            not call ``.backward()`` itself.  It runs with attention on its
            math kernel (held through the backwards through its graph) and
            weight norm and ``nn.Hardsigmoid`` computed by their formulas,
            whose second derivatives PyTorch's fused kernels lack or get wrong
            (:class:`~hyperopt_torch._model.SecondOrder`, :class:`~hyperopt_torch._model.MathAttention`).
        val_loss_fn: ``model ↦ g``, likewise.
        model: the inner model; θ are its parameters with ``requires_grad``,
            taken at their current values.  Under ``torch.distributed`` (a
            ``DistributedDataParallel`` model, an FSDP2 ``fully_shard`` model,
            or a replica with the default process group initialised) the result
            is the hypergradient of the mean of the ranks' losses, identical on
            every rank, and the loss functions receive the unwrapped module (for
            FSDP2 an unsharded replica with full parameters); see
            :mod:`hyperopt_torch.distributed`.  A ``torch.compile`` wrapper
            is unwrapped too (compiled graphs have no double backward): the
            loss functions receive the eager module.
        ihvp: a solver object or one of the names accepted by
            :func:`~hyperopt_torch.make_solver` (with its default settings).
        generator: CPU ``torch.Generator`` for randomised solvers (Nyström);
            ``None`` uses the solver's own (``Nystrom(seed=...)``), which
            advances.  A solver name builds a fresh solver at every call.
        residual: also compute ``‖(H + ρI)x − b‖/‖b‖`` (one more HVP).
        engine: ``"func"`` (torch.func, the default; falls back to autograd
            when torch.func fails to transform ``train_loss_fn``, never for an
            exception of the loss's own code) or ``"autograd"``; see
            :func:`hyperopt_torch.hvp.training_hvp`.

    Returns:
        ``Hypergradient(grads, info)``: ``grads[i]`` has the shape, dtype and
        device of ``hparams[i]``; non-finite values are returned as they are,
        with ``info.skipped = True``.  A solve flagged as diverged gives NaN
        (``info.diverged``; policy in :func:`~hyperopt_torch.ihvp.run_solver`);
        CG stopped at negative curvature is applied, with
        ``info.negative_curvature`` and a ``RuntimeWarning``.

    Raises:
        TypeError / ValueError: bad hparams, a loss that is not a scalar
            tensor or has no graph (``no_grad``, ``inference_mode``, detached:
            each named), a loss that calls ``.backward()``, hparams on another
            device than the model, a model without trainable parameters, with
            a complex parameter or with an embedding PyTorch cannot give
            second derivatives of (``sparse=True``, ``scale_grad_by_freq=True``;
            :func:`~hyperopt_torch._checks.check_model`), a custom
            ``autograd.Function`` with a ``@once_differentiable`` backward
            that θ reaches (searched in the training loss's graph with the
            autograd engine, in the validation loss's with torch.func), or an hparam that enters neither
            the gradient of the training loss nor the validation loss.  Any
            exception of the loss functions' own propagates.  The model is
            left unchanged.

    The model is left exactly as found, whatever the loss functions do to
    it (:class:`~hyperopt_torch._model.ModelSnapshot`): parameter values,
    also when written in place, and their ``.grad`` (objects and values),
    buffers, also when re-assigned, and train/eval modes; the training loss
    sees it as found too.  One copy of the parameters and buffers is made.
    On a GPU the step synchronises with the host
    once at the end (the finiteness check and the loss values, fetched
    together), plus once inside the Nyström solver (its k × k system is solved
    on the host) and once per iteration for CG with ``tol``.
    """
    hparams = check_hparams(hparams)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a CPU torch.Generator or None, got {type(generator).__name__}")
    if engine not in ENGINES:
        raise ValueError(f"Invalid engine: {engine!r} (expected one of {ENGINES})")
    solver = make_solver(ihvp) if isinstance(ihvp, str) else ihvp
    # torch.compile around DDP or inside it: either way the eager module is differentiated
    model, comm = data_parallel(uncompiled(model))
    model = uncompiled(model)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    modules = modules_of(model)
    params = check_model(model, modules)
    if comm.group is not None and getattr(solver, "chunk", None) == "auto":
        # Each rank would size κ by its own free memory; a different κ means a different
        # number of (collective) HVP calls, and the ranks would deadlock.
        raise ValueError("chunk='auto' cannot be used data-parallel (the ranks could choose different κ): "
                         "pass an integer chunk, the same on every rank")
    device = params[0].device
    for i, h in enumerate(hparams):
        if h.device != device:
            raise ValueError(f"hparams[{i}] is on {h.device} but the model is on {device}: move them to the same device")
    ids = {id(p) for p in params}
    for i, h in enumerate(hparams):
        if id(h) in ids:
            raise ValueError(f"hparams[{i}] is also a parameter of the model: an inner parameter cannot be its own hyperparameter")

    start = time.perf_counter()
    snapshot = ModelSnapshot(model, params, hparams, modules)
    second_order = SecondOrder(modules)
    attention = MathAttention()
    calls = 0

    def train_fn(m: nn.Module) -> Tensor:
        # Every call of the training loss sees the model as found: the first after val_loss_fn
        # ran, a second (the autograd fallback) after the failed torch.func attempt.  The
        # first call may run inside functional_call, where restoring would undo its swap.
        nonlocal calls
        if calls:
            snapshot.restore()
        calls += 1
        with second_order:  # kernels whose second derivatives PyTorch lacks or gets wrong are routed around
            loss = train_loss_fn(m)
        _refuse_backward(snapshot, len(params), "train_loss_fn")
        return loss

    try:
        with torch.enable_grad():
            val = require_graph(check_scalar(val_loss_fn(model), "val_loss_fn"), "val_loss_fn")
            _refuse_backward(snapshot, len(params), "val_loss_fn")
            direct = comm.average(autograd_grad((val,), (*params, *hparams), (torch.ones_like(val),)), params + hparams)
            # The training loss sees the model as found, whatever val_loss_fn did to it
            # (model.eval() is common; BatchNorm in training mode updates buffers; a clamp_).
            snapshot.restore()
            # A view of a fresh gradient when there is one parameter (the solvers never write into b).
            # No detach: a gradient taken without create_graph carries no graph.
            b = (direct[0].reshape(-1) if len(params) == 1 and direct[0] is not None
                 else flatten(direct[: len(params)], params))
            # From the training loss through the last backward through its graph (MathAttention)
            attention.__enter__()
            hvp, train = training_hvp(train_fn, model, params, engine)
            # Searched in f's graph where autograd built it; torch.func's is not visible, so there in
            # g's, where the model's forward normally is too.  Only an op that θ reaches needs a second
            # derivative (one on the hparams alone is differentiated once).
            refuse_once_differentiable(train if hvp.engine == "autograd" else val, params)
            matvec = comm.matvec(hvp)

            # Solvers run without recording: an iterate with an autograd history
            # keeps every product's graph alive (and CG's in-place updates then
            # leak it across steps).
            with torch.no_grad():
                # A randomized solver draws from its own generator unless one is passed; either
                # way the ranks must draw the same sketch.
                generator = comm.generator(generator if generator is not None else getattr(solver, "generator", None),
                                           device)
                x, diverged, negative = run_solver(solver, matvec, b, generator)
                res = None
                if residual:
                    r = matvec(x) + solver.damping * x - b
                    res = r.norm() / b.norm()
            mixed = hvp.mixed(x, hparams)
            attention.__exit__(None, None, None)
            for i, (m, d) in enumerate(zip(mixed, direct[len(params):])):
                # An hparam of g alone (∂²f/∂φ∂θ = 0) has the direct term ∂g/∂φ as its whole
                # hypergradient; one in neither loss has none that implicit differentiation can give.
                if m is None and d is None:
                    raise ValueError(
                        f"hparams[{i}] enters neither the gradient of the training loss with respect to the model "
                        "parameters nor the validation loss, so implicit differentiation gives it no hypergradient. "
                        "Optimizer settings such as the learning rate or momentum act only through the update "
                        "rule: tune those with hyperopt_torch.unrolled instead."
                    )
            mixed = comm.average(mixed, hparams)
            grads = tuple(_combine(d, m, h) for d, m, h in zip(direct[len(params):], mixed, hparams))
            checks = _peaks(grads)
            n_flags = len(checks)
            checks += [f if f is not None else False for f in (diverged, negative)]
            checks += [train.detach(), val.detach(), *([] if res is None else [res])]
            # the one sync; under data parallelism averaged over the ranks, so every rank decides alike
            finite, diverged, negative, train_value, val_value, *rest = _fetch(checks, n_flags, comm, val.dtype)
    finally:
        attention.__exit__(None, None, None)
        snapshot.close()

    info = HypergradInfo(
        solver=repr(solver),
        hvps=hvp.calls,
        seconds=time.perf_counter() - start,
        residual=rest[0] if rest else None,
        skipped=not (finite == 1 and all(map(_isfinite, (train_value, val_value)))),
        train_loss=train_value,
        val_loss=val_value,
        engine=hvp.engine,
        collectives=comm.collectives,
        comm_bytes=comm.bytes,
        hvp_strategy=hvp.strategy,
        chunk=getattr(solver, "last_chunk", None),
        diverged=bool(diverged),
        negative_curvature=bool(negative),
    )
    if info.negative_curvature:
        warn(
            f"{info.solver} met negative curvature dᵀ(H + ρI)d < 0 and stopped there (truncated Newton): "
            "the training Hessian is not positive definite at these parameters. The result was applied; raise "
            "rho above the most negative eigenvalue, or train the inner model closer to a minimum.",
            RuntimeWarning,
        )
    return Hypergradient(grads, info)


def _combine(direct: Tensor | None, mixed: Tensor | None, hparam: Tensor) -> Tensor:
    """``∂g/∂φ − (∂²f/∂φ∂θ) x`` for one hparam, either term possibly absent."""
    # Neither carries a graph (both come from autograd.grad without create_graph): no detach needed.
    # Always a fresh dense tensor: autograd may return an expanded gradient (stride 0, for φ that
    # enters g as φ.sum()), which an in-place write (clip_grad_norm_) refuses.
    if direct is None:
        return torch.neg(mixed) if mixed is not None else torch.zeros_like(hparam)
    if mixed is None:
        return direct.clone(memory_format=torch.contiguous_format)
    return direct - mixed


def _peaks(grads: Sequence[Tensor]) -> list[Tensor]:
    """``max |g|`` of every non-empty tensor of ``grads``, as 0-dim tensors: all finite iff every entry is.

    A NaN entry makes the maximum NaN and an infinite one makes it infinite,
    while no finite entries can overflow it (unlike a sum).  One fused kernel
    (``_foreach_norm`` with ``ord=inf``), where ``isfinite(g).all()`` costs
    several per tensor.
    """
    live = [g for g in grads if g.numel()]
    return list(torch._foreach_norm(live, float("inf"))) if live else []


def _fetch(checks: list, n_flags: int, comm, dtype: torch.dtype) -> list[float]:
    """Read the step's checks on the host: ``[all grads finite, diverged, negative, f, g, (residual)]`` as floats.

    ``checks`` holds ``n_flags`` peaks of the hypergradient (:func:`_peaks`), then the two solver flags
    (tensors, or ``False`` for a solver without them), the losses and the
    residual.  On a device they go to the host together (one synchronisation),
    averaged over the ranks under data parallelism; in host memory a single
    process reads them one by one, which costs less than stacking them.
    """
    if comm.group is None and all(not isinstance(c, Tensor) or c.is_cpu for c in checks):
        return [float(all(math.isfinite(float(c)) for c in checks[:n_flags])), *map(float, checks[n_flags:])]
    device = checks[-1].device
    finite = torch.stack([torch.isfinite(c) for c in checks[:n_flags]]
                         or [torch.ones((), dtype=torch.bool, device=device)]).all()
    # A solver without a flag gives False: filled on the device (as_tensor would copy from the host,
    # which synchronises).
    values = [c.to(dtype) if isinstance(c, Tensor) else torch.full((), float(c), dtype=dtype, device=device)
              for c in [finite, *checks[n_flags:]]]
    return comm.agree(torch.stack(values)).tolist()


def _isfinite(v: float) -> bool:
    return v == v and abs(v) != float("inf")


