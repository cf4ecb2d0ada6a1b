"""Batched Hessian-vector products of a training loss over the inner parameters θ.

:func:`training_hvp` builds the gradient ``∇_θ f`` and its backward graph once
and returns a :class:`HessianVectorProduct`, the :class:`~hyperopt_torch.ihvp.Operator`
the solvers see: each call runs one backward pass through that graph, ``B``
vectors at once.  :func:`flatten`/:func:`unflatten` convert between flat
vectors and lists of tensors.  Two engines build the graph:

* ``"func"``: ``torch.func.vjp`` of ``torch.func.grad`` of the loss with θ
  swapped in (``functional_call`` for a module; buffers are passed as
  copies, so BatchNorm's running statistics update copies);
* ``"autograd"``: ``torch.autograd.grad(..., create_graph=True)``, batched
  with ``is_grads_batched``.

``engine="auto"`` (the default) takes ``"func"``, unless a rule of the model
table requires autograd (:mod:`hyperopt_torch._kinds`), and lets a
:class:`Batching` measure both engines on the first product when one is
given.  Either way the gradient stays connected, through ordinary autograd,
to the hyperparameters the loss closes over, so the mixed partial
``∂/∂φ ⟨∇_θ f, x⟩`` is one more backward through the same graph.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from ._checks import check_scalar, require_graph
from ._compat import autograd_grad
from ._inner import Inner
from ._kinds import Plan, make_plan, reaches
from ._warn import warn
from .ihvp import Operator

ENGINES = ("auto", "func", "autograd")


def check_engine(engine) -> str:
    """``engine`` if it is one of :data:`ENGINES`; ``ValueError`` naming them otherwise."""
    if engine not in ENGINES:
        raise ValueError(f"Invalid engine: {engine!r} (expected one of {', '.join(map(repr, ENGINES))})")
    return engine

__all__ = ["ENGINES", "check_engine", "Batching", "HessianVectorProduct", "training_hvp", "flatten", "unflatten", "autograd_grad"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    lead = tuple(vec.shape[:-1])  # shapes as tuples: reshape(*()) of a 0-dim parameter's piece would fail
    if len(like) == 1:
        return [vec.reshape(lead + tuple(like[0].shape))]
    pieces = torch.split_with_sizes(vec, [t.numel() for t in like], dim=-1)
    return [piece.reshape(lead + tuple(t.shape)) for piece, t in zip(pieces, like)]


class Batching:
    """Which engine and which batching strategy compute the products, per model layout: measured once, then kept.

    With ``measure=True`` the first product of a layout (parameter shapes,
    dtype, device, the engine asked for) under ``engine="auto"`` times both
    engines, and the first block of each size ``B`` times every strategy of
    the chosen engine (:meth:`HessianVectorProduct.candidates`), each three
    times after a warm-up run; the fastest wins (ties: the order listed) and
    is kept.  With ``measure=False`` nothing is timed: ``"func"`` (rules
    permitting) and ``"vmap"`` blocks.  Results of all choices agree to
    rounding, not to the bit, so a run is reproducible only with the same
    choices: :class:`~hyperopt_torch.HyperOptimizer` owns one and saves it
    in its ``state_dict``; a resumed run reuses the recorded choices.
    """

    def __init__(self, measure: bool = True):
        self.measure = bool(measure)
        self.engines: dict[str, dict] = {}
        self.strategies: dict[str, dict] = {}

    @staticmethod
    def layout(params: Sequence[Tensor], asked: str) -> str:
        p = params[0]
        shapes = ",".join("x".join(map(str, q.shape)) for q in params)
        return f"{asked}|{p.dtype}|{p.device.type}|{shapes}"

    def state_dict(self) -> dict:
        return {"engines": {k: dict(v) for k, v in self.engines.items()},
                "strategies": {k: dict(v) for k, v in self.strategies.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.engines = {k: dict(v) for k, v in state.get("engines", {}).items()}
        self.strategies = {k: dict(v) for k, v in state.get("strategies", {}).items()}

    def __repr__(self) -> str:
        return f"Batching(measure={self.measure}, engines={len(self.engines)}, strategies={len(self.strategies)})"


class HessianVectorProduct(Operator):
    """``V ↦ V ∇²_θ f`` for a fixed gradient graph, batched over the rows of ``V``.

    Build it with :func:`training_hvp`, or from an autograd gradient with
    :meth:`from_autograd`.  Calling it with ``V`` of shape ``(B, p)`` (or
    ``(p,)``) returns ``V H`` of the same shape, in the parameters' dtype and on
    their device; :meth:`inplace` writes the products over ``V``.  The graph
    is kept, so it can be called any number of times; ``calls`` counts the
    products (``B`` per call).  :meth:`mixed` gives the mixed partial product
    and frees the graph.

    A block of ``B > 1`` vectors is computed by a *strategy*: ``"vmap"`` (one
    batched backward), ``"loop"`` (``B`` single backwards) or, with the func
    engine and ``B ≥ 4``, ``"vmap:c"`` (``vmap`` with ``chunk_size = ⌈B/2⌉``).
    ``forced`` fixes it; otherwise the :class:`Batching` given decides, or
    ``"vmap"`` without one.  A batched strategy that raises a ``RuntimeError``
    (rule ``batched_product_failure``) is replaced by ``"loop"``.
    ``strategy`` names the last one used (``"single"`` for one vector).
    """

    def __init__(self, grads: Sequence[Tensor | None], params: Sequence[Tensor], backward, engine: str,
                 strategy: str | None = None, flat_backward=None):
        super().__init__(self._call)
        self.params = list(params)
        self.numel = sum(p.numel() for p in self.params)
        self.calls = 0
        self.forced = strategy
        self.strategy: str | None = None
        self.batching: Batching | None = None
        self.layout: str | None = None
        self.alternative: Callable[[], "HessianVectorProduct"] | None = None  # the other engine, to measure
        self._sizes = [p.numel() for p in self.params]
        self._shapes = [tuple(p.shape) for p in self.params]
        self._adopt(grads, backward, engine, flat_backward)

    def _adopt(self, grads, backward, engine: str, flat_backward) -> None:
        self.grads = list(grads)
        self.engine = engine
        self._backward = backward  # (pieces, batched, chunk_size) -> per-parameter products or None
        self._flat_backward = flat_backward  # optional: one flat vector (p,) -> per-parameter products

    @classmethod
    def from_autograd(cls, grads: Sequence[Tensor | None], params: Sequence[Tensor],
                      strategy: str | None = None) -> "HessianVectorProduct":
        """Wrap ``grads = torch.autograd.grad(f, params, create_graph=True, allow_unused=True)``."""
        grads, backward, flat_backward = _autograd_backward(grads, params)
        return cls(grads, params, backward, "autograd", strategy, flat_backward)

    def candidates(self, B: int) -> tuple[str, ...]:
        """The strategies tried for a block of ``B > 1`` vectors, in tie-breaking order."""
        if self.engine == "func" and B >= 4:
            return ("vmap", "loop", f"vmap:{-(-B // 2)}")
        return ("vmap", "loop")

    def _call(self, V: Tensor) -> Tensor:
        # The products must not carry a graph of their own (with the func engine they would reach the
        # hyperparameters): a solver's iterates would then keep every earlier product's graph alive.
        if V.dim() not in (1, 2) or V.shape[-1] != self.numel:  # autograd would sum a (q,) V into a 0-dim parameter
            raise ValueError(f"Invalid V: shape {tuple(V.shape)} (expected (B, {self.numel}) or ({self.numel},))")
        if V.dim() == 1:  # CG and Neumann: the per-call overhead matters on small models
            if self.alternative is not None:
                self._choose_engine(V[None])
            self.calls += 1
            self.strategy = "single"
            if not torch.is_grad_enabled():  # the solvers' case: skip entering no_grad (a few µs per product)
                return self._single(V)
            with torch.no_grad():
                return self._single(V)
        return self._products(V, None)

    def inplace(self, V: Tensor) -> Tensor:
        """``V H`` written over ``V`` (a contiguous ``(B, p)`` block the caller no longer needs); returns ``V``.

        No output block is allocated, so the peak is ``V`` plus the strategy's
        own products (one row's for ``"loop"``, the block's for ``"vmap"``).

        Raises:
            ValueError: ``V`` is not a contiguous ``(B, p)`` block.
        """
        if V.dim() != 2 or V.shape[1] != self.numel or not V.is_contiguous():
            raise ValueError(f"Invalid V: shape {tuple(V.shape)}, contiguous={V.is_contiguous()} "
                             f"(expected a contiguous (B, {self.numel}) block)")
        return self._products(V, V)

    # -- the choices -------------------------------------------------------------------------------------
    def _timed(self, candidates: list[tuple["HessianVectorProduct", str]], V: Tensor) -> tuple[int, dict]:
        """Run each ``(hvp, strategy)`` once (warm-up; a batched one that raises is dropped), then time each
        three times, interleaved, dropping the products; the index of the fastest (ties: the first)."""
        usable = []
        for i, (hvp, strategy) in enumerate(candidates):
            try:
                hvp._block(V, strategy, None)
            except RuntimeError as error:
                # rule batched_product_failure: only a loop's (or a single product's) failure is the user's
                if strategy in ("loop", "single") or isinstance(error, torch.cuda.OutOfMemoryError):
                    raise
                continue
            usable.append(i)
        best = [float("inf")] * len(candidates)
        for _ in range(3):  # min of three: a wrong choice costs up to 20 % on every later step
            for i in usable:
                hvp, strategy = candidates[i]
                _sync(V.device)
                start = time.perf_counter()
                hvp._block(V, strategy, None)
                _sync(V.device)
                best[i] = min(best[i], time.perf_counter() - start)
        winner = min(usable, key=lambda i: (best[i], i))
        return winner, {f"{h.engine}:{s}": t for (h, s), t in zip(candidates, best)}

    def _choose_engine(self, V: Tensor) -> None:
        """``engine="auto"`` with a measuring :class:`Batching`: time this graph against the other engine's on
        the first block (or vector), keep the faster and record it for the layout."""
        build, self.alternative = self.alternative, None
        other = build()
        B = V.shape[0]
        candidates = [(h, s) for h in (self, other) for s in (h.candidates(B) if B > 1 else ("single",))]
        winner, seconds = self._timed(candidates, V)
        chosen, strategy = candidates[winner]
        self.batching.engines[self.layout] = {"engine": chosen.engine, "seconds": seconds}
        if B > 1:
            self.batching.strategies[f"{self.layout}|{chosen.engine}|{B}"] = {
                "strategy": strategy, "seconds": {k.split(":", 1)[1]: t for k, t in seconds.items()
                                                  if k.startswith(chosen.engine + ":")}}
        if chosen is other:
            self._adopt(other.grads, other._backward, other.engine, other._flat_backward)

    def _strategy(self, V: Tensor) -> str:
        if self.forced:
            return self.forced
        if self.batching is None:
            return "vmap"
        key = f"{self.layout}|{self.engine}|{V.shape[0]}"
        entry = self.batching.strategies.get(key)
        if entry is None:
            if not self.batching.measure:
                return "vmap"
            names = self.candidates(V.shape[0])
            winner, seconds = self._timed([(self, s) for s in names], V)
            entry = {"strategy": names[winner], "seconds": {k.split(":", 1)[1]: t for k, t in seconds.items()}}
            self.batching.strategies[key] = entry
        return entry["strategy"]

    def _products(self, V: Tensor, out: Tensor | None) -> Tensor:
        """``V H`` for ``V`` of shape ``(B, p)`` written into ``out`` (which may be ``V`` itself), or into a new
        block when ``out`` is ``None``."""
        B = V.shape[0]
        with torch.no_grad():
            if self.alternative is not None:
                self._choose_engine(V)
            self.calls += B
            if B == 1:
                self.strategy = "single"
                hv = self._single(V[0]).unsqueeze(0)
                return hv if out is None else out.copy_(hv)
            out = V.new_empty(B, self.numel) if out is None else out
            choice = self._strategy(V)
            self.strategy = choice
            try:
                return self._block(V, choice, out)
            except RuntimeError as error:
                # A layout's choice also serves other models; one of them may have an op whose double
                # backward has no batching rule.  A failed batched product wrote nothing.
                if choice == "loop" or self.forced or isinstance(error, torch.cuda.OutOfMemoryError):
                    raise
                self.strategy = "loop"
                return self._block(V, "loop", out)

    def _block(self, V: Tensor, strategy: str, out: Tensor | None) -> Tensor | None:
        """``V H`` by one strategy, written into ``out`` (which may be ``V`` itself: each product is computed
        before its input rows are overwritten), or computed and dropped when ``out`` is ``None`` (timing)."""
        B = V.shape[0]
        if strategy == "single":
            for i in range(B):
                hv = self._single(V[i])
                if out is not None:
                    out[i].copy_(hv)
            return out
        over_input = out is not None and out.untyped_storage().data_ptr() == V.untyped_storage().data_ptr()
        if strategy == "loop":
            for i in range(B):
                hv = self._backward(self._pieces(V[i]), False, None)
                if out is not None:
                    self._write(out[i : i + 1], hv, over_input)
                del hv
            return out
        chunk = int(strategy.split(":")[1]) if ":" in strategy else None
        hv = self._backward(self._pieces(V), True, chunk)
        return None if out is None else self._write(out, hv, over_input)

    def _single(self, v: Tensor) -> Tensor:
        """``v H`` for one vector ``v`` of shape ``(p,)``: one torch.cat, cheaper than a loop of copies."""
        if len(self._sizes) == 1:
            hv = (self._flat_backward(v) if self._flat_backward is not None else
                  self._backward(self._pieces(v), False, None))[0]
            if hv is None:
                return v.new_zeros(self.numel)
            # Copy only a product that aliases its input (H = I passes v through) or is not dense
            # (autograd may return an expanded tensor, e.g. for H = 11ᵀ): the caller may write into it.
            if hv.is_contiguous() and hv.untyped_storage().data_ptr() != v.untyped_storage().data_ptr():
                return hv.view(-1)
            return torch.cat([hv.reshape(-1)])
        hv = self._flat_backward(v) if self._flat_backward is not None else self._backward(self._pieces(v), False, None)
        return torch.cat([(h if h is not None else v.new_zeros(n)).reshape(-1) for h, n in zip(hv, self._sizes)])

    def _pieces(self, v: Tensor) -> list[Tensor]:
        lead = tuple(v.shape[:-1])
        if len(self._sizes) == 1:
            return [v.reshape(lead + self._shapes[0])]
        return [piece.reshape(lead + shape)
                for piece, shape in zip(torch.split_with_sizes(v, self._sizes, dim=-1), self._shapes)]

    def _write(self, out: Tensor, hv, over_input: bool = False) -> Tensor:
        # Copy each parameter's product into place and drop it at once, so the
        # block's memory peaks at about one copy of the products, not two (torch.cat).
        hv = list(hv)
        if over_input:
            # Written over its own input, a product that aliases the input (H = I can pass a
            # vector through) would be overwritten by an earlier parameter's copy: detach it first.
            base = out.untyped_storage().data_ptr()
            hv = [h.clone() if h is not None and h.untyped_storage().data_ptr() == base else h for h in hv]
        offset = 0
        for i, n in enumerate(self._sizes):
            if hv[i] is None:
                out[:, offset : offset + n].zero_()
            else:
                out[:, offset : offset + n].copy_(hv[i].reshape(out.shape[0], n))
            hv[i] = None
            offset += n
        return out

    def mixed(self, x: Tensor, hparams: Sequence[Tensor]) -> tuple[Tensor | None, ...]:
        """The mixed-partial product ``(∂²f/∂φ∂θ) x = ∂/∂φ ⟨∇_θ f, x⟩`` for ``x`` of shape ``(p,)``.

        Returns one entry per hparam, ``None`` where ``∇_θ f`` does not depend on
        it.  Frees the graph: call it last.
        """
        self.alternative = None
        live = [i for i, g in enumerate(self.grads) if g is not None and g.requires_grad]
        if not live:
            return tuple(None for _ in hparams)
        pieces = self._pieces(x)
        return autograd_grad(tuple(self.grads[i] for i in live), tuple(hparams), tuple(pieces[i] for i in live))


def _autograd_backward(grads: Sequence[Tensor | None], params: Sequence[Tensor]):
    """The backward callables of an autograd gradient graph: ``(grads, backward, flat_backward or None)``."""
    # Only gradient entries that carry a graph can be differentiated again; a gradient without one
    # (f linear in that parameter) contributes H = 0.
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    outputs = tuple(grads[i] for i in live)
    inputs = tuple(params)
    every = len(live) == len(grads)

    def backward(pieces, batched, chunk):  # is_grads_batched has no chunk size
        if not live:
            return [None] * len(pieces)
        pieces = tuple(pieces) if every else tuple(pieces[i] for i in live)
        if not batched:
            return autograd_grad(outputs, inputs, pieces, retain_graph=True)
        return torch.autograd.grad(outputs, inputs, grad_outputs=pieces, retain_graph=True, allow_unused=True,
                                   is_grads_batched=True)

    if not every or not live:
        return grads, backward, None
    flat = []

    def flat_backward(v):
        # One product of a flat vector through the gradient concatenated, once, into a flat vector with
        # its graph: the split of v into per-parameter views happens in that concatenation's backward.
        if not flat:
            with torch.inference_mode(False), torch.enable_grad():  # the solvers call products under no_grad
                flat.append(torch.cat([g.reshape(-1) for g in outputs]) if len(outputs) > 1
                            else outputs[0].reshape(-1))
        return autograd_grad((flat[0],), inputs, (v,), retain_graph=True)

    return grads, backward, flat_backward


class _CapturedParameter(Exception):
    """The loss reads a model parameter through a captured reference (rule ``captured_parameter``)."""


def _func_hvp(loss_fn, inner: Inner, params: Sequence[Tensor]) -> tuple[HessianVectorProduct, Tensor]:
    from torch.func import grad_and_value, vjp, vmap

    def loss_of(*theta):
        # Inside the transform requires_grad means "depends on θ": a loss computed under no_grad or
        # detached is named as such here, not later as a missing mixed term.
        loss = inner.functional(loss_fn, theta, fresh_buffers=True)
        return require_graph(check_scalar(loss, "train_loss_fn"), "train_loss_fn")

    primals = tuple(p.detach() for p in params)
    grads, vjp_fn, loss = vjp(grad_and_value(loss_of, argnums=tuple(range(len(params)))), *primals, has_aux=True)
    if reaches(loss, params):
        raise _CapturedParameter

    def backward(pieces, batched, chunk):
        return vmap(vjp_fn, chunk_size=chunk)(tuple(pieces)) if batched else vjp_fn(tuple(pieces))

    return HessianVectorProduct(grads, params, backward, "func"), loss


def _autograd_hvp(loss_fn, inner: Inner, params: Sequence[Tensor]) -> tuple[HessianVectorProduct, Tensor]:
    loss = require_graph(check_scalar(inner.call(loss_fn), "train_loss_fn"), "train_loss_fn")
    grads = autograd_grad((loss,), tuple(params), (torch.ones_like(loss),), create_graph=True)
    return HessianVectorProduct.from_autograd(grads, params), loss


def training_hvp(loss_fn: Callable, model: nn.Module | Inner, params: Sequence[Tensor], engine: str = "auto", *,
                 plan: Plan | None = None, batching: Batching | None = None) -> tuple[HessianVectorProduct, Tensor]:
    """Build the Hessian-vector product of ``loss_fn(model)`` over ``params``.

    Args:
        loss_fn: ``model ↦`` scalar training loss.
        model: the module (or an :class:`~hyperopt_torch._inner.Inner`: a dict or list of tensors);
            ``params`` must be among its trainable tensors.
        params: θ, in the order of the flat vectors.
        engine: ``"auto"``, ``"func"`` or ``"autograd"``.  ``"auto"`` and
            ``"func"`` use autograd where ``plan`` (default: the rules matched
            on ``model``) requires it, or ``batching`` recorded it, and fall
            back to autograd, with a warning, when ``loss_fn`` reads captured
            parameters or torch.func fails to transform it (a ``RuntimeError``
            under the transform that a plain call does not repeat; any other
            exception propagates at once, as does one from the plain call).
            Under ``"auto"`` a measuring ``batching`` times both engines on
            the first product (calling ``loss_fn`` a second time) and keeps
            the faster for this layout.
        plan: the :class:`~hyperopt_torch._kinds.Plan` of the call.
        batching: the :class:`Batching` that decides and remembers; ``None``: ``"vmap"`` blocks, nothing timed.

    Returns:
        ``(hvp, loss)``: the product operator and the loss (a scalar tensor
        still connected to the hyperparameters); ``hvp.engine`` says which
        engine built it.

    Raises:
        TypeError / ValueError: ``loss_fn`` does not return a scalar tensor, or
            returns one without a graph to the parameters (computed under
            ``no_grad``/``inference_mode``, or detached).
    """
    check_engine(engine)
    inner = model if isinstance(model, Inner) else Inner(model)
    plan = plan if plan is not None else make_plan(inner.modules, params, "implicit", engine=engine)
    layout = Batching.layout(params, engine)
    recorded = batching.engines.get(layout, {}).get("engine") if batching is not None else None
    if engine == "autograd" or plan.engine == "autograd" or recorded == "autograd":
        hvp, loss = _autograd_hvp(loss_fn, inner, params)
    else:
        try:
            hvp, loss = _func_hvp(loss_fn, inner, params)
        except _CapturedParameter:
            reason = ("train_loss_fn reads model parameters through a captured reference instead of its model "
                      "argument, which torch.func cannot swap")
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError as error:  # possibly a limitation of the transform: confirmed below by a plain call
            reason = f"torch.func could not transform train_loss_fn ({type(error).__name__}: {error})"
        else:
            reason = None
        if reason is not None:
            hvp, loss = _autograd_hvp(loss_fn, inner, params)
            if batching is not None:
                batching.engines[layout] = {"engine": "autograd", "fallback": reason}
            warn(f"{reason}; falling back to engine='autograd' (slower on most models; train_loss_fn was "
                 "called a second time for this step). Pass engine='autograd' to silence this.", UserWarning)
        elif engine == "auto" and recorded is None and batching is not None and batching.measure:
            hvp.alternative = lambda: _autograd_graph(loss_fn, inner, params)
    hvp.batching, hvp.layout = batching, layout
    return hvp, loss


def _autograd_graph(loss_fn, inner: Inner, params: Sequence[Tensor]) -> HessianVectorProduct:
    """The autograd engine's operator, built while a solver runs (under ``no_grad``): for measuring."""
    with torch.inference_mode(False), torch.enable_grad():
        return _autograd_hvp(loss_fn, inner, params)[0]
