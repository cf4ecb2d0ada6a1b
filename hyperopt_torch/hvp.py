"""Batched Hessian-vector products of a training loss over a model's parameters.

The solvers in :mod:`hyperopt_torch.ihvp` see the Hessian only through a
*matvec* (``hyperopt_torch.ihvp.Matvec``, defined there: the solvers know
nothing of models): a callable taking ``V`` of shape ``(B, p)`` and returning ``V H``
row by row, shape ``(B, p)``.  :func:`training_hvp` builds that callable for
``train_loss_fn(model)``; :func:`flatten`/:func:`unflatten` convert between
flat vectors and lists of tensors.

The gradient ``∇_θ f`` and its backward graph are built once; each call runs
one backward pass through that graph, ``B`` vectors at once under vmap, never
a Python loop.  Two engines build the graph:

* ``"func"`` (default): ``torch.func.vjp`` of ``torch.func.grad`` of the loss
  with the parameters swapped in by ``functional_call``; HVPs are
  ``vmap(vjp_fn)``.  Measured faster than autograd's ``is_grads_batched`` on
  both CPU and GPU (docs/benchmarks.md).  Buffers are passed as fresh copies,
  so BatchNorm's running statistics update copies, not the model.
* ``"autograd"``: ``torch.autograd.grad(..., create_graph=True)`` and
  ``is_grads_batched=True``.  Used when torch.func cannot transform the loss
  function (for example one that updates a captured tensor in place), and when the loss reads a parameter it captured
  instead of going through its ``model`` argument (``params =
  list(model.parameters())`` in a penalty): ``functional_call`` swaps the
  module's attributes, not captured references, so the func graph would miss
  those terms.  The loss's autograd graph is searched for such parameters.

Either way the returned gradient stays connected, through ordinary autograd,
to the hyperparameters the loss closes over, so the mixed partial
``∂/∂φ ⟨∇_θ f, x⟩`` is one more backward through the same graph.
"""

from __future__ import annotations

import warnings
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from ._checks import check_scalar
from ._model import LossCall, reaches
ENGINES = ("func", "autograd")


def flatten(tensors: Sequence[Tensor | None], like: Sequence[Tensor]) -> Tensor:
    """Concatenate ``tensors`` into one vector, zeros where an entry is ``None``.

    ``like`` gives the shapes, dtype and device used for the ``None`` entries.
    Returns a tensor of shape ``(p,)`` with ``p = sum(t.numel() for t in like)``.
    """
    return torch.cat(
        [(t if t is not None else torch.zeros_like(ref)).reshape(-1) for t, ref in zip(tensors, like)]
    )


def unflatten(vec: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Split ``vec`` of shape ``(..., p)`` into views shaped ``(..., *t.shape)`` for each ``t`` in ``like``."""
    lead = vec.shape[:-1]
    pieces = torch.split(vec, [t.numel() for t in like], dim=-1)
    return [piece.reshape(*lead, *t.shape) for piece, t in zip(pieces, like)]


class HessianVectorProduct:
    """``V ↦ V ∇²_θ f`` for a fixed gradient graph, batched over the rows of ``V``.

    Build it with :func:`training_hvp`, or from an autograd gradient with
    :meth:`from_autograd`.  Calling it with ``V`` of shape ``(B, p)`` (or
    ``(p,)``) returns ``V H`` of the same shape, in the parameters' dtype and on
    their device.  The graph is kept, so it can be called any number of times;
    ``calls`` counts the Hessian-vector products computed so far (``B`` per
    call).  :meth:`mixed` gives the mixed partial product and frees the graph.
    """

    def __init__(self, grads: Sequence[Tensor | None], params: Sequence[Tensor], backward, engine: str):
        self.params = list(params)
        self.grads = list(grads)
        self.engine = engine
        self.numel = sum(p.numel() for p in self.params)
        self.calls = 0
        self._backward = backward  # (pieces, batched) -> per-parameter products or None

    @classmethod
    def from_autograd(cls, grads: Sequence[Tensor | None], params: Sequence[Tensor]) -> "HessianVectorProduct":
        """Wrap ``grads = torch.autograd.grad(f, params, create_graph=True, allow_unused=True)``."""
        # Only gradient entries that carry a graph can be differentiated again; a
        # gradient without one (f linear in that parameter) contributes H = 0.
        live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]

        def backward(pieces, batched):
            if not live:
                return [None] * len(pieces)
            return torch.autograd.grad(
                [grads[i] for i in live], params, grad_outputs=[pieces[i] for i in live],
                retain_graph=True, allow_unused=True, is_grads_batched=batched,
            )

        return cls(grads, params, backward, "autograd")

    def __call__(self, V: Tensor) -> Tensor:
        single = V.dim() == 1
        V2 = V.unsqueeze(0) if single else V
        B = V2.shape[0]
        self.calls += B
        batched = B > 1
        pieces = unflatten(V2 if batched else V2[0], self.params)
        # The products must not carry a graph of their own (with the func engine
        # they would reach the hyperparameters): a solver's iterates would then keep
        # every earlier product's graph alive and memory would grow with each HVP.
        with torch.no_grad():
            hv = self._backward(pieces, batched)
        out = torch.cat(
            [
                (h if h is not None else V2.new_zeros(B, p.numel())).reshape(B, -1)
                for h, p in zip(hv, self.params)
            ],
            dim=1,
        )
        return out[0] if single else out

    def mixed(self, x: Tensor, hparams: Sequence[Tensor]) -> tuple[Tensor | None, ...]:
        """The mixed-partial product ``(∂²f/∂φ∂θ) x = ∂/∂φ ⟨∇_θ f, x⟩`` for ``x`` of shape ``(p,)``.

        Returns one entry per hparam, ``None`` where ``∇_θ f`` does not depend on
        it.  Frees the graph: call it last.
        """
        live = [i for i, g in enumerate(self.grads) if g is not None and g.requires_grad]
        if not live:
            return tuple(None for _ in hparams)
        pieces = unflatten(x, self.params)
        return torch.autograd.grad(
            [self.grads[i] for i in live], list(hparams), grad_outputs=[pieces[i] for i in live], allow_unused=True
        )


def _func_hvp(loss_fn, model: nn.Module, params: Sequence[Tensor]):
    from torch.func import functional_call, grad_and_value, vjp, vmap

    ids = {id(p): i for i, p in enumerate(params)}
    names = [None] * len(params)
    for name, p in model.named_parameters():
        if id(p) in ids:
            names[ids[id(p)]] = "model." + name
    wrapper = LossCall(model)
    buffers = ["model." + n for n, _ in model.named_buffers()]
    buffer_values = [b for _, b in model.named_buffers()]

    def loss_of(*theta):
        # Fresh buffer copies made inside the transform may be updated in place
        # (BatchNorm running statistics); the model's own buffers are not touched.
        state = dict(zip(names, theta))
        state.update({n: b.clone() for n, b in zip(buffers, buffer_values)})
        loss = functional_call(wrapper, state, (loss_fn,), strict=False)
        return check_scalar(loss, "train_loss_fn")

    primals = tuple(p.detach() for p in params)
    grads, vjp_fn, loss = vjp(grad_and_value(loss_of, argnums=tuple(range(len(params)))), *primals, has_aux=True)
    if reaches(loss, params):
        raise _CapturedParameter

    def backward(pieces, batched):
        return vmap(vjp_fn)(tuple(pieces)) if batched else vjp_fn(tuple(pieces))

    return HessianVectorProduct(grads, params, backward, "func"), loss


class _CapturedParameter(Exception):
    """The loss reads a model parameter through a captured reference."""


def training_hvp(
    loss_fn: Callable[[nn.Module], Tensor], model: nn.Module, params: Sequence[Tensor], engine: str = "func"
) -> tuple[HessianVectorProduct, Tensor]:
    """Build the Hessian-vector product of ``loss_fn(model)`` over ``params``.

    Args:
        loss_fn: ``model ↦`` scalar training loss.
        model: the module; ``params`` must be among its parameters.
        params: the parameters θ, in the order of the flat vectors.
        engine: ``"func"`` (falls back to ``"autograd"``, with a warning, if
            torch.func cannot transform ``loss_fn`` or ``loss_fn`` reads captured
            parameters; out-of-memory errors are raised, not retried) or ``"autograd"``.

    Returns:
        ``(hvp, loss)``: the product object and the loss value (a scalar
        tensor still connected to the hyperparameters).

    Raises:
        TypeError / ValueError: ``loss_fn`` does not return a scalar tensor.
    """
    if engine not in ENGINES:
        raise ValueError(f"Invalid engine: {engine!r} (expected one of {ENGINES})")
    if engine == "func":
        try:
            return _func_hvp(loss_fn, model, params)
        except (TypeError, ValueError, torch.cuda.OutOfMemoryError):
            raise
        except _CapturedParameter:
            reason = ("train_loss_fn reads model parameters through a captured reference instead of its model "
                      "argument, which torch.func cannot swap")
        except Exception as error:  # torch.func cannot transform the loss
            reason = f"torch.func could not transform train_loss_fn ({type(error).__name__}: {error})"
        warnings.warn(f"{reason}; falling back to engine='autograd' (slower on most models; train_loss_fn is "
                      "called a second time for this step). Pass engine='autograd' to silence this.",
                      UserWarning, stacklevel=3)
    loss = check_scalar(loss_fn(model), "train_loss_fn")
    if not loss.requires_grad:
        raise ValueError("train_loss_fn returned a tensor that does not require grad: compute it outside torch.no_grad()")
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    return HessianVectorProduct.from_autograd(grads, params), loss
