"""The implicit hypergradient (Hataya & Yamada 2023, Eq. 3), independent of the solver.

    dg/dφ = ∂g/∂φ − (∂²f/∂φ∂θ)ᵀ (∇²_θ f)⁻¹ ∇_θ g

with ``f`` the training loss and ``g`` the validation loss at the current
(approximately optimal) inner parameters θ.  :func:`implicit_hypergradient` is
a short pipeline: :func:`_prepare` (validation, the module the losses
receive, the communicator, the model plan) → ``with plan, snapshot:`` the
validation gradient ``b = ∇_θ g``, the training operator, the solve
``x ≈ (∇²_θ f + ρI)⁻¹ b`` and the mixed term ``∂/∂φ ⟨∇_θ f, x⟩`` (one more
backward through the same gradient graph) → :func:`_combine`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Mapping, NamedTuple, Sequence

import torch
from torch import Tensor, nn

from . import _compat
from ._checks import check_hparams, check_scalar, require_graph
from ._inner import Inner, LossFn, check_loss_call
from ._kinds import Plan, make_plan, refuse_once_differentiable, uncompiled
from ._warn import warn
from .distributed import Collectives, data_parallel
from .hvp import Batching, autograd_grad, check_engine, flatten, training_hvp
from .ihvp import Solution, Solver, make_solver, run_solver



@dataclass
class HypergradInfo:
    """Diagnostics of one hypergradient computation.

    Attributes:
        solver: ``repr`` of the solver used.
        hvps: Hessian-vector products computed (the residual's one included).
        seconds: wall time of the whole computation (losses, solve, VJP).
        residual: ``‖(H + ρI)x − b‖ / ‖b‖`` when requested, else ``None``
            (ρ is the damping of the solve; 0 for Neumann and identity).
        skipped: the result was non-finite and was not applied.
        train_loss: the training loss ``f`` at θ.
        val_loss: the validation loss ``g`` at θ.
        engine: how the Hessian-vector products were computed, ``"func"`` or
            ``"autograd"`` (see :mod:`hyperopt_torch.hvp`).
        collectives: ``torch.distributed`` collectives this rank made (0 in a
            single process; see :mod:`hyperopt_torch.distributed`).
        comm_bytes: bytes this rank handed to those collectives.
        hvp_strategy: how the last block of HVPs was batched, ``"single"``,
            ``"vmap"``, ``"loop"`` or ``"vmap:c"`` (:class:`~hyperopt_torch.hvp.Batching`);
            ``None`` if no HVP ran.
        chunk: the κ a Nyström solver used (``chunk="auto"`` reports its
            choice here); ``None`` for other solvers.
        diverged: the solver's iteration grew (Neumann with ``alpha`` above
            ``2/λ_max`` or on negative curvature); the result was set to NaN
            and ``skipped`` is true.
        negative_curvature: conjugate gradient met ``dᵀ(H + ρI)d < 0`` and
            stopped there (truncated Newton); the truncated result was used and a
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


class _Problem(NamedTuple):
    """What :func:`_prepare` hands to the pipeline."""

    hparams: list[Tensor]
    inner: Inner
    comm: Collectives
    plan: Plan
    solver: Solver


class _Checks(NamedTuple):
    """The step's host-side numbers, read together (:func:`_read_checks`)."""

    finite: bool
    diverged: bool
    negative_curvature: bool
    train_loss: float
    val_loss: float
    residual: float | None


def implicit_hypergradient(
    hparams: Sequence[Tensor],
    train_loss_fn: LossFn,
    val_loss_fn: LossFn,
    params,
    ihvp: Solver | str = "nystrom",
    *,
    generator: torch.Generator | None = None,
    residual: bool = False,
    engine: str = "auto",
    batching: Batching | None = None,
    verify_ranks: bool = True,
) -> Hypergradient:
    """The implicit hypergradient ``dg/dφ`` (Eq. 3), without touching any ``.grad``.

    Args:
        hparams: the tensors φ (leaf, ``requires_grad=True``), on θ's device;
            they enter the training loss (by closure, typically), the
            validation loss (the direct term ``∂g/∂φ``), or both.
        train_loss_fn, val_loss_fn: ``params ↦ f`` and ``params ↦ g``, scalar
            tensors with their graphs, called with ``params`` (the training
            loss under the model plan, :mod:`hyperopt_torch._kinds`).
        params: θ, an ``nn.Module`` (DDP, ``torch.compile`` and FSDP2 models
            included), a dict of tensors or a list/tuple of tensors (θ: the
            entries with ``requires_grad``).
        ihvp: a solver object or a name accepted by :func:`~hyperopt_torch.make_solver`.
        generator: CPU ``torch.Generator`` for a randomised solver; ``None``
            draws from the solver's own.
        residual: also compute ``‖(H + ρI)x − b‖/‖b‖`` (one more HVP).
        engine: ``"auto"``, ``"func"`` or ``"autograd"`` (:func:`~hyperopt_torch.hvp.training_hvp`).
        batching: a :class:`~hyperopt_torch.hvp.Batching` that measures and
            keeps the engine and batching; ``None``: nothing timed, deterministic.
        verify_ranks: under ``torch.distributed``, first check with one small
            collective that the ranks agree (solver, shapes of φ and θ).

    Returns:
        ``Hypergradient(grads, info)``: ``grads[i]`` shaped like ``hparams[i]``;
        non-finite values are returned as they are, with ``info.skipped``.

    Raises:
        TypeError / ValueError: bad hparams or params, a loss that is not a
            scalar tensor with a graph, calls ``.backward()`` or takes another
            signature, a model kind the rule table refuses, an hparam in
            neither loss, ranks that disagree (each message names the cause;
            docs/api.md lists them).  A loss's own exception propagates.

    θ is left exactly as found, whatever the losses do (values, ``.grad``,
    buffers, modes; :mod:`hyperopt_torch._inner`).  What the parameters mean
    and what each guarantee costs: docs/api.md; the numbers: docs/benchmarks.md.
    """
    problem = _prepare(hparams, params, ihvp, generator, engine, residual if verify_ranks else None)
    hparams, inner, comm, plan, solver = problem
    start = time.perf_counter()
    params = inner.params
    calls = 0

    def train_fn(value) -> Tensor:
        # Every call of the training loss sees θ as found: the first after val_loss_fn ran, a second
        # (a fallback or the other engine, measured) after the first.
        nonlocal calls
        if calls:
            snapshot.restore()
        calls += 1
        with plan.training():
            loss = _call(train_loss_fn, value, "train_loss_fn", inner)
        _refuse_backward(snapshot, inner, "train_loss_fn")
        return loss

    with inner.snapshot(hparams) as snapshot, torch.enable_grad():
        direct, b, val = _validation_gradient(val_loss_fn, inner, hparams, comm, snapshot)
        snapshot.restore()  # the training loss sees θ as found, whatever val_loss_fn did (model.eval() is common)
        with plan:  # from the training loss through the last backward through its graph
            hvp, train = training_hvp(train_fn, inner, params, engine, plan=plan, batching=batching)
            # Searched in f's graph where autograd built it; torch.func's is not visible, so in g's.
            refuse_once_differentiable(train if hvp.engine == "autograd" else val, params)
            operator = comm.matvec(hvp)
            with torch.no_grad():  # an iterate with a graph would keep every product's graph alive
                solution = _solve(solver, operator, b, comm, generator)
                res = _residual(operator, solution, b) if residual else None
            mixed = hvp.mixed(solution.x, hparams)
        _refuse_unreachable(mixed, direct[len(params):])
        grads = _combine(direct[len(params):], comm.average(mixed, hparams), hparams)
        checks = _read_checks(grads, solution, train, val, res, comm)

    info = HypergradInfo(
        solver=repr(solver), hvps=hvp.calls, seconds=time.perf_counter() - start, residual=checks.residual,
        skipped=not checks.finite, train_loss=checks.train_loss, val_loss=checks.val_loss, engine=hvp.engine,
        collectives=comm.collectives, comm_bytes=comm.bytes, hvp_strategy=hvp.strategy, chunk=solution.chunk,
        diverged=checks.diverged, negative_curvature=checks.negative_curvature,
    )
    if info.negative_curvature:
        warn(
            f"{info.solver} met negative curvature dᵀ(H + ρI)d < 0 and stopped there (truncated Newton): "
            "the training Hessian is not positive definite at these parameters. The truncated result was used; raise "
            "rho above the most negative eigenvalue, or train the inner model closer to a minimum.",
            RuntimeWarning,
        )
    return Hypergradient(grads, info)


# -- the pipeline's stages -----------------------------------------------------------------------------------
def _prepare(hparams, params, ihvp, generator, engine: str, residual: bool | None) -> _Problem:
    """Validate the arguments; unwrap the model; build the communicator and the model plan; under
    ``torch.distributed`` check first that the ranks agree (unless ``residual`` is ``None``).

    Raises before anything is changed.
    """
    hparams = check_hparams(hparams)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a CPU torch.Generator or None, got {type(generator).__name__}")
    check_engine(engine)
    solver = make_solver(ihvp) if isinstance(ihvp, str) else ihvp

    def agree(comm: Collectives) -> None:  # the first collective of the step
        if residual is not None and comm.group is not None:
            comm.check_agreement(_description(solver, hparams, params, residual))

    unwrapped, comm = data_parallel(uncompiled(params), before=agree)  # torch.compile around DDP or inside it
    inner = Inner(uncompiled(unwrapped))
    plan = make_plan(inner.modules, inner.params, "implicit", engine=engine, name_of=inner.name_of_module)
    device = inner.params[0].device
    comm.device = device
    if comm.group is not None and not getattr(solver, "collective_safe", True):
        raise ValueError(f"{solver!r} cannot be used data-parallel: the ranks could make different numbers of "
                         "products (for Nyström's chunk='auto', different κ); pass an integer chunk, the same "
                         "on every rank")
    for i, h in enumerate(hparams):
        if h.device != device:
            raise ValueError(f"hparams[{i}] is on {h.device} but the model is on {device}: move them to the "
                             "same device")
    _refuse_shared(hparams, inner)
    return _Problem(hparams, inner, comm, plan, solver)


def _refuse_shared(hparams: Sequence[Tensor], inner: Inner) -> None:
    """An hparam that is θ, or shares θ's memory (``p.detach()``, a view), would be moved by the base step."""
    spans: dict[tuple, list[tuple[int, int, int]]] = {}
    for j, p in enumerate(inner.params):
        if p.numel():
            spans.setdefault(_storage(p), []).append((*_span(p), j))
    ids = {id(p): j for j, p in enumerate(inner.params)}
    for i, h in enumerate(hparams):
        if id(h) in ids:
            raise ValueError(
                f"hparams[{i}] is also a parameter of the model ({inner.name(ids[id(h)])}): an inner parameter "
                "cannot be its own hyperparameter. Keep a meta-model (an initialisation θ₀) outside the model you "
                "pass: a separate module or list of tensors, e.g. meta = copy.deepcopy(model) and "
                "hparams = list(meta.parameters()).")
        if not h.numel():
            continue
        start, stop = _span(h)
        for a, z, j in spans.get(_storage(h), ()):
            if start < z and a < stop:
                raise ValueError(
                    f"hparams[{i}] shares its memory with {inner.name(j)} (it is a detach() or a view of it), so "
                    "the hyperparameter update would also move the model's parameter. Pass a copy: "
                    "p.detach().clone().requires_grad_().")


def _storage(t: Tensor) -> tuple:
    return t.device, t.untyped_storage().data_ptr()


def _span(t: Tensor) -> tuple[int, int]:
    """The bytes of its storage that ``t`` can reach, ``[start, stop)``."""
    size = t.element_size()
    last = t.storage_offset() + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    return t.storage_offset() * size, (last + 1) * size


def _description(solver: Solver, hparams: Sequence[Tensor], params, residual: bool) -> dict:
    """What the ranks must agree on (:meth:`~hyperopt_torch.distributed.Collectives.check_agreement`): the
    solver (its ``repr``, or for a class without one its name and plain attributes: a default ``repr`` holds
    an address, which differs between processes), the residual request, and the shapes of φ and θ (as the
    user passed θ: an FSDP2 model's DTensor parameters have their full shapes)."""
    if type(solver).__repr__ is object.__repr__:
        plain = {k: v for k, v in sorted(vars(solver).items()) if isinstance(v, (bool, int, float, str, type(None)))}
        what = f"{type(solver).__qualname__}({plain})"
    else:
        what = repr(solver)
    if isinstance(params, nn.Module):
        theta = [p for p in params.parameters() if p.requires_grad]
    else:
        theta = [t for t in (params.values() if isinstance(params, Mapping) else params)
                 if isinstance(t, Tensor) and t.requires_grad]
    return {
        "solver": what,
        "residual": bool(residual),
        "hparams": [(tuple(h.shape), str(h.dtype)) for h in hparams],
        "parameters": [(tuple(p.shape), str(p.dtype)) for p in theta],
    }


def _call(fn: LossFn, value, name: str, inner: Inner) -> Tensor:
    """``fn(value)``; a loss that cannot take one argument is told how it is called."""
    try:
        return fn(value)
    except TypeError as error:
        check_loss_call(fn, value, name, error, inner.argument)
        raise


def _refuse_backward(snapshot, inner: Inner, name: str) -> None:
    touched = snapshot.touched()
    if touched:
        i, n = touched[0], len(inner.params)
        what = inner.name(i) if i < n else f"hparams[{i - n}]"
        raise ValueError(
            f"{name} called .backward() itself (it created a .grad on {what}): return the loss without calling "
            "backward; the hypergradient differentiates it and needs its graph. Nothing was changed."
        )


def _validation_gradient(val_loss_fn: LossFn, inner: Inner, hparams: list[Tensor], comm: Collectives, snapshot):
    """``(direct, b, g)``: ``∂g/∂(θ, φ)`` averaged over the ranks, ``b = ∇_θ g`` flat, and the loss ``g``."""
    params = inner.params
    val = require_graph(check_scalar(_call(val_loss_fn, inner.value, "val_loss_fn", inner), "val_loss_fn"),
                        "val_loss_fn")
    _refuse_backward(snapshot, inner, "val_loss_fn")
    direct = autograd_grad((val,), (*params, *hparams), (torch.ones_like(val),))
    # A sparse gradient (a sparse embedding, which the rule table refuses in the training loss) as a dense one
    direct = comm.average([d.to_dense() if d is not None and d.is_sparse else d for d in direct], params + hparams)
    # A view of a fresh gradient when there is one parameter (the solvers never write into b).  No detach:
    # a gradient taken without create_graph carries no graph.
    b = (direct[0].reshape(-1) if len(params) == 1 and direct[0] is not None
         else flatten(direct[: len(params)], params))
    return direct, b, val


def _solve(solver: Solver, operator, b: Tensor, comm: Collectives, generator) -> Solution:
    """Run the solver under the failure policy; its random draws are rank 0's on every rank."""
    if generator is not None:
        generator = comm.generator(generator, b.device)
    else:
        comm.synchronize(solver)
    return run_solver(solver, operator, b, generator)


def _residual(operator, solution: Solution, b: Tensor) -> Tensor:
    r = torch.add(operator(solution.x), solution.x, alpha=solution.damping) - b
    return r.norm() / b.norm()


def _refuse_unreachable(mixed: Sequence[Tensor | None], direct: Sequence[Tensor | None]) -> None:
    for i, (m, d) in enumerate(zip(mixed, direct)):
        # An hparam of g alone (∂²f/∂φ∂θ = 0) has the direct term ∂g/∂φ as its whole hypergradient; one in
        # neither loss has none that implicit differentiation can give.
        if m is None and d is None:
            raise ValueError(
                f"hparams[{i}] enters neither the gradient of the training loss with respect to the model "
                "parameters nor the validation loss, so implicit differentiation gives it no hypergradient. "
                "Optimizer settings such as the learning rate or momentum act only through the update "
                "rule: tune those with hyperopt_torch.unrolled instead."
            )


def _combine(direct: Sequence[Tensor | None], mixed: Sequence[Tensor | None],
             hparams: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """``∂g/∂φ − (∂²f/∂φ∂θ) x`` per hparam, either term possibly absent; always fresh dense tensors
    (autograd may return an expanded gradient, which an in-place write such as ``clip_grad_norm_`` refuses)."""
    out = []
    for d, m, h in zip(direct, mixed, hparams):
        if d is None:
            out.append(torch.neg(m) if m is not None else torch.zeros_like(h))
        elif m is None:
            out.append(d.clone(memory_format=torch.contiguous_format))
        else:
            out.append(d - m)
    return tuple(out)


def _read_checks(grads: Sequence[Tensor], solution: Solution, train: Tensor, val: Tensor, residual: Tensor | None,
                 comm: Collectives) -> _Checks:
    """The step's one host read: finiteness of the hypergradient, the solver's flags, the losses, the residual.

    On a device they go to the host together (one synchronisation), averaged
    over the ranks under data parallelism (a flag is 1 only where it is 1 on
    every rank; a NaN loss on one rank is NaN everywhere); in host memory a
    single process reads them one by one, which costs less than stacking them.
    """
    peaks = _compat.max_abs(grads)  # a NaN entry makes its peak NaN, an infinite one infinite
    flags = [f if f is not None else False for f in (solution.diverged, solution.negative_curvature)]
    values = [train.detach(), val.detach(), *([] if residual is None else [residual])]
    if comm.group is None and all(not isinstance(c, Tensor) or c.is_cpu for c in [*peaks, *flags, *values]):
        finite = all(math.isfinite(float(c)) for c in peaks)
        diverged, negative, *numbers = map(float, [*flags, *values])
    else:
        device, dtype = val.device, val.dtype
        finite_t = torch.stack([torch.isfinite(c) for c in peaks]
                               or [torch.ones((), dtype=torch.bool, device=device)]).all()
        # A solver without a flag gives False: filled on the device (as_tensor would copy from the host).
        stacked = [c.to(dtype) if isinstance(c, Tensor) else torch.full((), float(c), dtype=dtype, device=device)
                   for c in [finite_t, *flags, *values]]
        finite, diverged, negative, *numbers = comm.agree(torch.stack(stacked)).tolist()
        finite = finite == 1
    train_value, val_value, *rest = numbers
    return _Checks(finite=finite and math.isfinite(train_value) and math.isfinite(val_value),
                   diverged=bool(diverged), negative_curvature=bool(negative), train_loss=train_value,
                   val_loss=val_value, residual=rest[0] if rest else None)
