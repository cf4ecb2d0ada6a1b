"""Unrolled reverse-mode hypergradients through ``T`` inner optimisation steps.

Iterative differentiation (ITD; Maclaurin et al. 2015, Franceschi et al.
2017) writes the inner training as a differentiable map

    θ_{t+1} = Φ(θ_t, φ),   t = 0 … T−1,    Φ = one step of the inner optimizer,

and back-propagates the validation loss ``g(θ_T, φ)`` through all ``T`` steps.
Unlike implicit differentiation (Eq. 3) it does not assume that θ_T
minimises the training loss, and it differentiates hyperparameters that act
only through the update rule — the learning rate, the momentum — which the
implicit function theorem cannot see.  Its price is memory: every step keeps
its graph, so memory grows linearly in ``T`` (shown in
``benchmarks/speed_memory``), and each step back-propagates through a
gradient, i.e. costs one Hessian-vector product in the backward pass.

Truncated back-propagation (Shaban et al. 2019) keeps the graph of only the
last ``K`` steps: the first ``T − K`` steps run without a graph and θ_{T−K}
is treated as a constant.  Memory is then ``O(K)`` instead of ``O(T)``; the
result is biased, and the bias shrinks as ``K`` grows (``K = T`` is the full
unrolled hypergradient, exactly).

Why ``torch.func`` and not ``higher``: the inner parameters are plain tensors
θ_t swapped into the user's unchanged module with
:func:`torch.func.functional_call`, so any ``nn.Module`` works, the model is
never monkey-patched, nothing beyond PyTorch is needed, and the inner
optimizer is a few lines of tensor algebra (:func:`sgd_step`,
:func:`adam_step`) whose hyperparameters are ordinary tensors that may
themselves be tuned.

References:
    Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015.
    Maclaurin, Duvenaud & Adams, "Gradient-based Hyperparameter Optimization
    through Reversible Learning", ICML 2015.
    Franceschi et al., "Forward and Reverse Gradient-Based Hyperparameter
    Optimization", ICML 2017.
    Shaban et al., "Truncated Back-propagation for Bilevel Optimization",
    AISTATS 2019.
    Grazzi et al., "On the Iteration Complexity of Hypergradient Computation",
    ICML 2020.
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass
from typing import NamedTuple, Protocol, Sequence

import torch
from torch import Tensor

from ._checks import check_hparams, check_scalar, positive_int, require_graph
from ._inner import Inner, LossFn
from ._kinds import RULE, Refused, RerunWatch, make_plan, reaches, refuse_once_differentiable, uncompiled

__all__ = [
    "unrolled_hypergradient",
    "UnrolledHypergradient",
    "UnrolledInfo",
    "InnerSGD",
    "sgd_step",
    "InnerAdam",
    "adam_step",
    "AdamState",
]

Scalar = float | Tensor


class InnerOptimizer(Protocol):
    """What :func:`unrolled_hypergradient` needs of an inner optimizer (see :class:`InnerSGD`).

    ``state`` is whatever the optimizer carries from one step to the next
    (``None`` before the first step); it is passed back unchanged.
    """

    def step(self, params: list[Tensor], grads: list[Tensor], state): ...


def sgd_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor] | None,
    lr: Scalar,
    momentum: Scalar = 0.0,
    weight_decay: Scalar = 0.0,
) -> tuple[list[Tensor], list[Tensor] | None]:
    """One differentiable step of ``torch.optim.SGD`` (dampening 0, not Nesterov).

        d_t = ∇f(θ_t) + λ θ_t,   b_t = μ b_{t−1} + d_t (b_0 = d_0),   θ_{t+1} = θ_t − η b_t

    Args:
        params, grads: θ_t and ∇f(θ_t), one tensor per parameter.
        momentum_buffers: ``b_{t−1}``, or ``None`` on the first step or
            without momentum.
        lr, momentum, weight_decay: η, μ, λ as floats or tensors that
            broadcast against every parameter (0-dim in practice); tensors
            that require grad are differentiated through.

    Returns ``(θ_{t+1}, b_t)``; ``b_t`` is ``None`` when ``momentum`` is the
    float ``0``.  Nothing is modified in place.
    """
    d = _l2(params, grads, weight_decay)
    if _nonzero(momentum):
        bufs = d if momentum_buffers is None else [momentum * b + di for b, di in zip(momentum_buffers, d)]
    else:
        bufs = None
    direction = d if bufs is None else bufs
    return [p - lr * di for p, di in zip(params, direction)], bufs


class AdamState(NamedTuple):
    """The state of :func:`adam_step` after ``step`` updates: the moment estimates m and v, one tensor per parameter."""

    step: int
    exp_avg: list[Tensor]
    exp_avg_sq: list[Tensor]


def adam_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    state: AdamState | None,
    lr: Scalar,
    betas: tuple[Scalar, Scalar] = (0.9, 0.999),
    eps: Scalar = 1e-8,
    weight_decay: Scalar = 0.0,
) -> tuple[list[Tensor], AdamState]:
    """One differentiable step of ``torch.optim.Adam`` (L2 weight decay as in Adam, not AdamW; no AMSGrad).

    For the ``k``-th update (``k = 1, 2, …``; Kingma & Ba, Algorithm 1):

        d = ∇f(θ) + λ θ,   m_k = β₁ m_{k−1} + (1 − β₁) d,   v_k = β₂ v_{k−1} + (1 − β₂) d²   (m_0 = v_0 = 0),
        θ ← θ − η / (1 − β₁^k) · m_k / (√v_k / √(1 − β₂^k) + ε)

    Args:
        params, grads: θ and ∇f(θ), one tensor per parameter.
        state: the :class:`AdamState` returned by the previous step, or
            ``None`` before the first.
        lr, betas, eps, weight_decay: η, (β₁, β₂), ε, λ as floats or tensors
            that broadcast against every parameter (0-dim in practice);
            tensors that require grad are differentiated through.

    Returns ``(θ_new, AdamState(k, m_k, v_k))``.  Nothing is modified in place.
    """
    beta1, beta2 = betas
    d = _l2(params, grads, weight_decay)
    if state is None:
        state = AdamState(0, [torch.zeros_like(di) for di in d], [torch.zeros_like(di) for di in d])
    k = state.step + 1
    m = [beta1 * mi + (1 - beta1) * di for mi, di in zip(state.exp_avg, d)]
    v = [beta2 * vi + (1 - beta2) * di * di for vi, di in zip(state.exp_avg_sq, d)]
    step_size = lr / (1 - beta1**k)
    root_correction = (1 - beta2**k) ** 0.5
    new = [p - step_size * mi / (_sqrt(vi) / root_correction + eps) for p, mi, vi in zip(params, m, v)]
    return new, AdamState(k, m, v)


def _sqrt(v: Tensor) -> Tensor:
    """``√v`` whose derivative at ``v = 0`` is 0 instead of ∞.

    With β₂ < 1, ``v = 0`` only where every entry of d so far was 0, hence
    ``m = 0`` there too, and m / (√v + ε) does not vary with √v: its true
    derivative through √v is 0.  Autograd would instead multiply
    d√v/dv = ∞ by dv/dd = 2(1 − β₂) d = 0 and return NaN.
    """
    positive = v > 0
    return torch.where(positive, torch.where(positive, v, 1.0).sqrt(), 0.0)


def _l2(params: Sequence[Tensor], grads: Sequence[Tensor], weight_decay: Scalar) -> list[Tensor]:
    """``∇f(θ) + λ θ``, the gradient of the L2-penalised loss that torch.optim's ``weight_decay`` uses."""
    return [g + weight_decay * p for p, g in zip(params, grads)] if _nonzero(weight_decay) else list(grads)


def _nonzero(value: Scalar) -> bool:
    return isinstance(value, Tensor) or value != 0


def _hyper(name: str, value: Scalar, below: float = math.inf) -> Scalar:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < below:
        expected = "a finite number >= 0" if below == math.inf else f"a number in [0, {below:g})"
        raise ValueError(f"Invalid {name}: {value!r} (expected {expected} or a tensor)")
    return float(value)


class InnerSGD:
    """The inner optimizer of :func:`unrolled_hypergradient`: differentiable SGD.

    Same update as ``torch.optim.SGD(lr, momentum, weight_decay)`` with
    dampening 0 (see :func:`sgd_step`), but ``lr``, ``momentum`` and
    ``weight_decay`` may be tensors — pass a hyperparameter tensor here and
    include it in ``hparams`` to get its hypergradient.  The momentum buffer
    starts at zero at every call of :func:`unrolled_hypergradient`.

    Raises:
        ValueError: a float setting that is negative or not finite.
    """

    def __init__(self, lr: Scalar, momentum: Scalar = 0.0, weight_decay: Scalar = 0.0):
        self.lr = _hyper("lr", lr)
        self.momentum = _hyper("momentum", momentum)
        self.weight_decay = _hyper("weight_decay", weight_decay)

    def step(self, params, grads, state):
        return sgd_step(params, grads, state, self.lr, self.momentum, self.weight_decay)

    def __repr__(self) -> str:
        return f"InnerSGD(lr={self.lr}, momentum={self.momentum}, weight_decay={self.weight_decay})"


class InnerAdam:
    """Differentiable Adam as the inner optimizer of :func:`unrolled_hypergradient`.

    Same update as ``torch.optim.Adam(lr, betas, eps, weight_decay)`` with
    bias correction and ``weight_decay`` added to the gradient (L2, not
    AdamW's decoupled decay); see :func:`adam_step`.  ``lr``, either beta,
    ``eps`` and ``weight_decay`` may be tensors — pass a hyperparameter tensor
    here and include it in ``hparams`` to get its hypergradient.  The moment
    estimates and the step count start at zero at every call of
    :func:`unrolled_hypergradient`.

    Raises:
        ValueError: ``betas`` not a pair; a float setting that is negative or
            not finite, or a float beta not below 1.
    """

    def __init__(
        self,
        lr: Scalar,
        betas: tuple[Scalar, Scalar] = (0.9, 0.999),
        eps: Scalar = 1e-8,
        weight_decay: Scalar = 0.0,
    ):
        try:
            beta1, beta2 = betas
        except (TypeError, ValueError):
            raise ValueError(f"Invalid betas: {betas!r} (expected a pair (beta1, beta2))") from None
        self.lr = _hyper("lr", lr)
        self.betas = (_hyper("betas[0]", beta1, below=1.0), _hyper("betas[1]", beta2, below=1.0))
        self.eps = _hyper("eps", eps)
        self.weight_decay = _hyper("weight_decay", weight_decay)

    def step(self, params, grads, state):
        return adam_step(params, grads, state, self.lr, self.betas, self.eps, self.weight_decay)

    def __repr__(self) -> str:
        return f"InnerAdam(lr={self.lr}, betas={self.betas}, eps={self.eps}, weight_decay={self.weight_decay})"


@dataclass
class UnrolledInfo:
    """Diagnostics of one :func:`unrolled_hypergradient` call.

    Attributes:
        steps: ``T``, inner steps taken.
        truncate: ``K``, steps back-propagated through (``K = T``: full).
        seconds: wall time of the whole computation.
        skipped: a hypergradient or a loss was not finite.
        train_loss: the training loss at θ_{T−1} (the last step's).
        val_loss: the validation loss at θ_T.
    """

    steps: int
    truncate: int
    seconds: float
    skipped: bool
    train_loss: float
    val_loss: float


class UnrolledHypergradient(NamedTuple):
    """Result of :func:`unrolled_hypergradient`: ``grads`` shaped like the hparams, and ``info``."""

    grads: tuple[Tensor, ...]
    info: UnrolledInfo


def unrolled_hypergradient(
    hparams: Sequence[Tensor],
    train_loss_fn: LossFn,
    val_loss_fn: LossFn,
    params,
    optimizer: InnerOptimizer,
    steps: int,
    truncate: int | None = None,
    *,
    write_back: bool = False,
) -> UnrolledHypergradient:
    """``dg(θ_T)/dφ`` by reverse-mode differentiation through ``steps`` inner updates.

    Starting from the current θ_0, takes ``T = steps`` differentiable steps
    ``θ_{t+1} = optimizer.step(θ_t, ∇_θ f(θ_t))`` and back-propagates
    ``g = val_loss_fn`` at θ_T to the hparams.

    Args:
        hparams: leaf tensors φ with ``requires_grad=True``.  They may enter
            ``train_loss_fn`` (by closure, e.g. a penalty), the optimizer
            (``InnerSGD(lr=φ_lr)``) and ``val_loss_fn``; every path counts.
        train_loss_fn: ``params ↦ f``, called once per step, in order (a
            closure over a data iterator gives a new batch each step), under
            the model plan (:mod:`hyperopt_torch._kinds`).
        val_loss_fn: ``params ↦ g``, called once, at θ_T.
        params: θ as in :func:`~hyperopt_torch.implicit_hypergradient`: a
            module (its parameters hold θ_t inside the loss functions, through
            ``functional_call``; a ``torch.compile`` wrapper is unwrapped), a
            dict or a list/tuple of tensors (the losses receive a copy holding
            θ_t).  The rule table refuses what this path cannot compute right:
            a loss reading parameters it captured, activation checkpointing
            (its rerun in the backward reads θ_0), ``@once_differentiable``
            ops, and the static refusals.
        optimizer: the differentiable inner optimizer, e.g. :class:`InnerSGD`
            or :class:`InnerAdam`; any object with
            ``step(params, grads, state) -> (params, state)``
            (``state`` is ``None`` before the first step) built from
            differentiable tensor operations works.
        steps: ``T ≥ 1``.
        truncate: ``K`` in ``1..T``, the number of final steps back-propagated
            through (Shaban et al.); ``None`` means ``K = T``.
        write_back: copy θ_T into θ at the end (and keep the buffers, e.g.
            BatchNorm statistics, as the ``T`` steps left them), so that
            consecutive calls continue training.

    Returns:
        ``UnrolledHypergradient(grads, info)``: ``grads[i]`` has the shape,
        dtype and device of ``hparams[i]`` (zeros where ``g`` does not depend
        on it).  Non-finite values are returned as they are, with
        ``info.skipped = True``.

    Raises:
        TypeError / ValueError: bad hparams or params, ``steps``/``truncate``
            out of range, a loss that is not a scalar tensor, a refused model
            kind (the ones above: searched at the first tracked step).

    Example (tuning the learning rate and a penalty through 20 steps)::

        lr = torch.tensor(0.1, requires_grad=True)
        log_wd = torch.tensor(-4.0, requires_grad=True)
        train = lambda m: F.cross_entropy(m(x), y) + log_wd.exp() * sum((p**2).sum() for p in m.parameters())
        val = lambda m: F.cross_entropy(m(xv), yv)
        (g_lr, g_wd), info = unrolled_hypergradient([lr, log_wd], train, val, model, InnerSGD(lr), steps=20, truncate=5)

    Memory holds the graphs of ``K`` steps (``K`` forward-and-backward graphs
    of ``f`` with ``create_graph=True``).  Unless ``write_back`` is set, θ is
    left exactly as found: values and their ``.grad``, buffers and modes.
    """
    hparams = check_hparams(hparams)
    steps = positive_int("steps", steps)
    keep = steps if truncate is None else positive_int("truncate", truncate)
    if keep > steps:
        raise ValueError(f"Invalid truncate: {truncate} (expected 1 <= truncate <= steps = {steps}, or None)")
    inner = Inner(uncompiled(params))
    params = inner.params
    plan = make_plan(inner.modules, params, "unrolled", name_of=inner.name_of_module)

    def loss_at(fn: LossFn, theta: list[Tensor], what: str) -> Tensor:
        loss = require_graph(check_scalar(inner.functional(fn, theta), what), what)
        # Searched only up to θ_t: the graph behind it (the earlier steps) was searched when it was
        # built, and searching it again would make the unroll O(T²).  Every call is searched, since
        # a loss function may read a captured reference on some calls only.
        if reaches(loss, params, stop=theta):
            raise Refused("captured_parameter",
                          f"{what} reads model parameters through a reference it captured, which the unrolled "
                          "θ_t cannot replace: read them through its argument (m.parameters(), m.weight, m(x)); "
                          f"{RULE['captured_parameter'].why}")
        return loss

    start = time.perf_counter()
    snapshot = inner.snapshot()
    done = False
    try:
        theta = [p.detach() for p in params]
        state = None
        with plan:
            for t in range(steps):
                tracked = t >= steps - keep
                if t == steps - keep or not tracked:
                    # θ_{T−K} is a constant of the truncated problem: cut the graph here.  The optimizer
                    # state needs no cut: the untracked steps built it without a graph.
                    theta = [x.detach().requires_grad_() for x in theta]
                with torch.enable_grad():
                    with plan.training():  # the tracked steps' gradients are differentiated again
                        train = loss_at(train_loss_fn, theta, "train_loss_fn")
                    if t == steps - keep:
                        # The first tracked step's graph alone (θ_t its leaves): its gradient is
                        # differentiated again, and autograd drops a @once_differentiable backward's paths.
                        refuse_once_differentiable(train, theta)
                    with RerunWatch() as watch:
                        g = torch.autograd.grad(train, theta, create_graph=tracked, allow_unused=True)
                    if watch.module is not None:
                        raise Refused("checkpoint",
                                      f"train_loss_fn reran {type(watch.module).__name__}'s forward inside the "
                                      "backward pass (activation checkpointing): the rerun reads the module's own "
                                      "parameters θ_0, not the unrolled θ_t, so the hypergradient would be silently "
                                      "wrong. Unroll the model without checkpointing, or use implicit_hypergradient.")
                g = [torch.zeros_like(x) if gi is None else gi for gi, x in zip(g, theta)]
                with torch.set_grad_enabled(tracked):
                    theta, state = optimizer.step(theta, g, state)
            val = loss_at(val_loss_fn, theta, "val_loss_fn")
            hyper = torch.autograd.grad(val, hparams, allow_unused=True)
        grads = tuple(torch.zeros_like(h) if d is None else d.detach() for d, h in zip(hyper, hparams))
        checks = torch.stack(
            [torch.stack([torch.isfinite(d).all() for d in grads]).all().to(val.dtype), train.detach(), val.detach()]
        )
        finite, train_value, val_value = checks.tolist()  # the one host-device sync
        if write_back:
            with torch.no_grad():
                for p, x in zip(params, theta):
                    p.copy_(x)
        done = True
    finally:
        snapshot.close(values=not (done and write_back))

    info = UnrolledInfo(
        steps=steps,
        truncate=keep,
        seconds=time.perf_counter() - start,
        skipped=not (finite and math.isfinite(train_value) and math.isfinite(val_value)),
        train_loss=train_value,
        val_loss=val_value,
    )
    return UnrolledHypergradient(grads, info)
