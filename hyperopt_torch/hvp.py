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
  so BatchNorm's running statistics update copies, not the model.  Models
  with fewer than ``FUNC_MIN_PARAMS`` (10⁴) parameters get the autograd
  engine instead (reported as ``engine="autograd"``): there torch.func's
  fixed setup and its per-product overhead cost more than batching saves.
  So do models containing a ``torch.jit.ScriptModule`` (scripted or traced),
  whose second derivatives torch.func gets wrong without an error, and
  models with a hook on a parameter tensor (``p.register_hook``), which the
  tensors ``functional_call`` swaps in do not carry.
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

import logging
import time
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.overrides import has_torch_function

from ._checks import check_scalar, require_graph
from ._model import LossCall, modules_of, reaches
from ._warn import warn

ENGINES = ("func", "autograd")
_ENGINE_RUN_BACKWARD = getattr(torch.autograd.graph, "_engine_run_backward", None)
"""The autograd engine's entry point behind ``torch.autograd.grad`` (private; ``None`` if a torch lacks it)."""
_ENGINE = torch.autograd.Variable._execution_engine  # the C++ engine that entry point calls
_GRAPH_LOG = logging.getLogger("torch.autograd.graph")  # whose DEBUG level makes that entry point add hooks
FUNC_MIN_PARAMS = 10_000  # below this, engine="func" builds the graph with autograd
STRATEGY_CACHE: dict[tuple, dict] = {}
"""Per-process memory of the measured HVP batching strategy, keyed by
``(engine, parameter shapes, dtype, device, B)``; see :class:`HessianVectorProduct`."""


def autograd_grad(outputs: tuple[Tensor, ...], inputs: tuple[Tensor, ...], grad_outputs: tuple[Tensor, ...], *,
                  retain_graph: bool | None = None, create_graph: bool = False) -> tuple[Tensor | None, ...]:
    """``torch.autograd.grad(outputs, inputs, grad_outputs, retain_graph, create_graph, allow_unused=True)``, cheaper.

    ``torch.autograd.grad``'s Python layer (argument normalisation, the
    ``__torch_function__`` dispatch, :func:`torch.autograd._make_grads`'s shape
    checks) costs about 40 µs a call on a CPU: a fifth of a Hessian-vector
    product on a model of 10³ parameters, and the margin by which betty's
    Neumann beat ours on such models (docs/benchmarks.md, "Small problems").
    Where no tensor overrides ``__torch_function__`` and no
    ``TorchFunctionMode`` is active (``torch.overrides.has_torch_function``,
    ``torch.autograd.grad``'s own test for dispatching) this calls the engine
    entry point that ``torch.autograd.grad`` ends in
    (``torch.autograd.graph._engine_run_backward``, private), with the
    arguments ``torch.autograd.grad`` would pass it; in a process without
    CUDA tensors, with every output and input in host memory (and autograd's
    debug logging off), it calls the C++ engine that entry point wraps
    directly, since the context the entry point copies for the device threads
    has no use where the whole backward runs on the calling thread.
    Otherwise (a tensor subclass, a mode, or a torch without that entry
    point) it calls ``torch.autograd.grad``, which dispatches them.

    ``grad_outputs`` is required (``torch.ones_like`` for a scalar loss), not
    batched, and must have its output's shape: the engine refuses a shape it
    cannot sum to the output's, but unlike ``torch.autograd.grad`` it accepts
    and sums a broadcastable one (``(1, n)`` for ``(n,)``), which the callers
    here never pass.  Dtypes are cast as there.  ``retain_graph`` defaults to
    ``create_graph``, as there.  The results are identical either way
    (``tests/test_hvp.py``).
    """
    if retain_graph is None:
        retain_graph = create_graph
    if _ENGINE_RUN_BACKWARD is not None and not has_torch_function(outputs + inputs + grad_outputs):
        if not torch.cuda.is_initialized() and all(t.is_cpu for t in outputs + inputs) \
                and not _GRAPH_LOG.isEnabledFor(logging.DEBUG):
            # With no CUDA tensor in the process the engine runs the whole backward on this thread, so
            # the entry point's copy of the context for the device threads (and its debug-logging hooks,
            # off) has nothing to do: ~15 µs, a tenth of a product at p ≈ 10².  (CPU outputs and inputs
            # alone would not do: a CPU hparam can reach a graph computed on a GPU.)
            return _ENGINE.run_backward(outputs, grad_outputs, retain_graph, create_graph, inputs, True, False)
        return _ENGINE_RUN_BACKWARD(outputs, grad_outputs, retain_graph, create_graph, inputs, True,
                                    accumulate_grad=False)
    return torch.autograd.grad(outputs, inputs, grad_outputs=grad_outputs, retain_graph=retain_graph,
                               create_graph=create_graph, allow_unused=True)


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
    # torch.split_with_sizes, not torch.split: the latter's Python wrapper costs ~10 µs per call
    pieces = torch.split_with_sizes(vec, [t.numel() for t in like], dim=-1)
    return [piece.reshape(lead + tuple(t.shape)) for piece, t in zip(pieces, like)]


class HessianVectorProduct:
    """``V ↦ V ∇²_θ f`` for a fixed gradient graph, batched over the rows of ``V``.

    Build it with :func:`training_hvp`, or from an autograd gradient with
    :meth:`from_autograd`.  Calling it with ``V`` of shape ``(B, p)`` (or
    ``(p,)``) returns ``V H`` of the same shape, in the parameters' dtype and on
    their device.  The graph is kept, so it can be called any number of times;
    ``calls`` counts the Hessian-vector products computed so far (``B`` per
    call).  :meth:`mixed` gives the mixed partial product and frees the graph.

    How a block of ``B > 1`` vectors is computed is the *strategy*:
    ``"vmap"`` (one batched backward), ``"loop"`` (``B`` single backwards) or,
    with the func engine, ``"vmap:c"`` (``vmap`` with ``chunk_size = c = ⌈B/2⌉``).
    Which is fastest depends on the model: ``vmap`` turns a dense layer's
    matmuls into batched matmuls over ``B`` copies of the activations (a loop
    is faster on wide MLPs on a CPU), while on conv nets one batched backward
    wins.  With ``strategy=None`` (the default) the first block of each size
    ``B`` seen for a given model layout (engine, parameter shapes, dtype,
    device) is computed by every candidate, each timed three times after a warm-up
    run, and the one with the smallest time wins (ties: the order above); the
    winner is remembered for the process (:data:`STRATEGY_CACHE`) with its
    timings, so the choice is deterministic given what was measured; the
    measuring runs drop their products and the winner then computes the
    block (results of all strategies agree to rounding).  A batched candidate
    that raises a ``RuntimeError`` (an op without a batching rule for its
    double backward, e.g. GroupNorm under autograd) is dropped, and a
    remembered one that raises on another model is replaced by ``"loop"``
    for that block.  ``strategy`` names the last one used (``"single"`` for
    one vector).

    :meth:`inplace` writes the products over the input block instead of
    allocating an output block (Nyström's sketch no longer needs its input).

    One vector at a time (CG, Neumann) with the autograd engine, the products
    go through the gradient concatenated once into a flat vector with its
    graph, so that splitting ``v`` into per-parameter pieces happens inside
    autograd's backward instead of in Python at every product (results
    identical to the bit; one ``p``-vector more memory with several
    parameters).
    """

    def __init__(self, grads: Sequence[Tensor | None], params: Sequence[Tensor], backward, engine: str,
                 strategy: str | None = None, flat_backward=None):
        self.params = list(params)
        self.grads = list(grads)
        self.engine = engine
        self.numel = sum(p.numel() for p in self.params)
        self.calls = 0
        self.forced = strategy
        self.strategy: str | None = None
        self._backward = backward  # (pieces, batched, chunk_size) -> per-parameter products or None
        self._flat_backward = flat_backward  # optional: one flat vector (p,) -> per-parameter products
        self._sizes = [p.numel() for p in self.params]
        self._shapes = [tuple(p.shape) for p in self.params]

    @classmethod
    def from_autograd(cls, grads: Sequence[Tensor | None], params: Sequence[Tensor],
                      strategy: str | None = None) -> "HessianVectorProduct":
        """Wrap ``grads = torch.autograd.grad(f, params, create_graph=True, allow_unused=True)``."""
        # Only gradient entries that carry a graph can be differentiated again; a
        # gradient without one (f linear in that parameter) contributes H = 0.
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
            return cls(grads, params, backward, "autograd", strategy)
        flat = []

        def flat_backward(v):
            # One product of a flat vector through the gradient concatenated, once, into a flat
            # vector with its graph: the split of v into per-parameter views then happens in the
            # backward of that concatenation (C++), not in Python at every product (~10 µs, 2-7 %
            # of a product on a model of 10² to 10³ parameters; docs/benchmarks.md).
            if not flat:
                # the solvers call products under no_grad; a caller may be in inference mode
                with torch.inference_mode(False), torch.enable_grad():
                    flat.append(torch.cat([g.reshape(-1) for g in outputs]) if len(outputs) > 1
                                else outputs[0].reshape(-1))
            return autograd_grad((flat[0],), inputs, (v,), retain_graph=True)

        return cls(grads, params, backward, "autograd", strategy, flat_backward)

    def candidates(self, B: int) -> tuple[str, ...]:
        """The strategies tried for a block of ``B > 1`` vectors, in tie-breaking order."""
        if self.engine == "func" and B >= 4:
            return ("vmap", "loop", f"vmap:{-(-B // 2)}")
        return ("vmap", "loop")

    def __call__(self, V: Tensor) -> Tensor:
        # The products must not carry a graph of their own (with the func engine
        # they would reach the hyperparameters): a solver's iterates would then keep
        # every earlier product's graph alive and memory would grow with each HVP.
        if V.dim() not in (1, 2) or V.shape[-1] != self.numel:  # autograd would sum a (q,) V into a 0-dim parameter
            raise ValueError(f"Invalid V: shape {tuple(V.shape)} (expected (B, {self.numel}) or ({self.numel},))")
        if V.dim() == 1:  # CG and Neumann: the per-call overhead matters on small models
            self.calls += 1
            self.strategy = "single"
            if not torch.is_grad_enabled():  # the solvers' case: skip entering no_grad (a few µs per product)
                return self._single(V)
            with torch.no_grad():
                return self._single(V)
        return self._products(V, None)

    def inplace(self, V: Tensor) -> Tensor:
        """``V H`` written over ``V`` (a contiguous ``(B, p)`` block the caller no longer needs); returns ``V``.

        The solvers' in-place matvec (:func:`~hyperopt_torch.ihvp.matvec_inplace`): no output
        block is allocated, so the peak is ``V`` plus the strategy's own products (one row's
        for ``"loop"``, the block's for ``"vmap"``) instead of two blocks plus those.

        Raises:
            ValueError: ``V`` is not a contiguous ``(B, p)`` block.
        """
        if V.dim() != 2 or V.shape[1] != self.numel or not V.is_contiguous():
            raise ValueError(f"Invalid V: shape {tuple(V.shape)}, contiguous={V.is_contiguous()} "
                             f"(expected a contiguous (B, {self.numel}) block)")
        return self._products(V, V)

    def _products(self, V: Tensor, out: Tensor | None) -> Tensor:
        """``V H`` for ``V`` of shape ``(B, p)`` written into ``out`` (which may be ``V`` itself), or into
        a new block when ``out`` is ``None``."""
        B = V.shape[0]
        self.calls += B
        with torch.no_grad():
            if B == 1:
                self.strategy = "single"
                hv = self._single(V[0]).unsqueeze(0)
                return hv if out is None else out.copy_(hv)
            out = V.new_empty(B, self.numel) if out is None else out
            key = (self.engine, tuple(self._shapes), V.dtype, V.device, B)
            choice = self.forced or STRATEGY_CACHE.get(key, {}).get("strategy")
            if choice is None:
                STRATEGY_CACHE[key] = self._measure(V)
                choice = STRATEGY_CACHE[key]["strategy"]
            self.strategy = choice
            try:
                return self._block(V, choice, out)
            except RuntimeError as error:
                # A layout's choice also serves other models; one of them may have an op whose double
                # backward has no batching rule (below).  A failed batched product wrote nothing.
                if choice == "loop" or self.forced or isinstance(error, torch.cuda.OutOfMemoryError):
                    raise
                self.strategy = "loop"
                return self._block(V, "loop", out)

    def _measure(self, V: Tensor) -> dict:
        """Run every candidate once (warm-up), then time each three times, interleaved; return
        ``{"strategy": winner, "seconds": {name: best time}}``.

        The products are dropped, not written (copying them is the same work for every
        candidate), so measuring needs no output block and leaves ``V`` intact for the run
        of the winner that follows.
        """
        names = self.candidates(V.shape[0])
        usable = []
        for name in names:
            try:
                self._block(V, name, None)
            except RuntimeError as error:
                # Some double backwards have no batching rule and fail batched with an unrelated
                # message (GroupNorm's under is_grads_batched on torch 2.13: a shape mismatch); a
                # loop of single products always works, so only its failure is the user's.
                if name == "loop" or isinstance(error, torch.cuda.OutOfMemoryError):
                    raise
                continue
            usable.append(name)
        best = {name: float("inf") for name in names}
        for _ in range(3):  # min of three: a wrong choice costs up to 20 % on every later step
            for name in usable:
                _sync(V.device)
                start = time.perf_counter()
                self._block(V, name, None)
                _sync(V.device)
                best[name] = min(best[name], time.perf_counter() - start)
        winner = min(usable, key=lambda n: (best[n], names.index(n)))
        return {"strategy": winner, "seconds": best}

    def _block(self, V: Tensor, strategy: str, out: Tensor | None) -> Tensor | None:
        """``V H`` for ``V`` of shape ``(B, p)`` by one strategy, written into ``out`` (which may be
        ``V`` itself: each product is computed before its input rows are overwritten), or
        computed and dropped when ``out`` is ``None`` (timing)."""
        B = V.shape[0]
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
        # torch.split_with_sizes, not Tensor.split: the latter's Python wrapper costs ~10 µs per call
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
        live = [i for i, g in enumerate(self.grads) if g is not None and g.requires_grad]
        if not live:
            return tuple(None for _ in hparams)
        pieces = self._pieces(x)
        return autograd_grad(tuple(self.grads[i] for i in live), tuple(hparams), tuple(pieces[i] for i in live))


def _func_hvp(loss_fn, model: nn.Module, params: Sequence[Tensor]):
    if sum(p.numel() for p in params) < FUNC_MIN_PARAMS:
        # torch.func's setup (~2 ms) and per-product wrapping cost more than its
        # batching saves on a graph this small (benchmarks/peers.py, docs/benchmarks.md).
        return _autograd_hvp(loss_fn, model, params)
    if any(isinstance(m, torch.jit.ScriptModule) for m in modules_of(model)) or any(p._backward_hooks for p in params):
        # TorchScript runs its graph outside torch.func's transforms, which then return
        # wrong second derivatives without an error (tests/test_hypergrad.py).  A hook on a
        # parameter (p.register_hook) changes the gradients autograd takes of that tensor, ∇_θ g
        # among them; functional_call swaps other tensors in, so torch.func's products would
        # miss it (tests/test_model_kinds.py).
        return _autograd_hvp(loss_fn, model, params)
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
        # Inside the transform requires_grad means "depends on θ": a loss computed under
        # no_grad or detached is named as such here, not later as a missing mixed term.
        return require_graph(check_scalar(loss, "train_loss_fn"), "train_loss_fn")

    primals = tuple(p.detach() for p in params)
    grads, vjp_fn, loss = vjp(grad_and_value(loss_of, argnums=tuple(range(len(params)))), *primals, has_aux=True)
    if reaches(loss, params):
        raise _CapturedParameter

    def backward(pieces, batched, chunk):
        return vmap(vjp_fn, chunk_size=chunk)(tuple(pieces)) if batched else vjp_fn(tuple(pieces))

    return HessianVectorProduct(grads, params, backward, "func"), loss


class _CapturedParameter(Exception):
    """The loss reads a model parameter through a captured reference."""


def _autograd_hvp(loss_fn, model: nn.Module, params: Sequence[Tensor]):
    loss = require_graph(check_scalar(loss_fn(model), "train_loss_fn"), "train_loss_fn")
    grads = autograd_grad((loss,), tuple(params), (torch.ones_like(loss),), create_graph=True)
    return HessianVectorProduct.from_autograd(grads, params), loss


def training_hvp(
    loss_fn: Callable[[nn.Module], Tensor], model: nn.Module, params: Sequence[Tensor], engine: str = "func"
) -> tuple[HessianVectorProduct, Tensor]:
    """Build the Hessian-vector product of ``loss_fn(model)`` over ``params``.

    Args:
        loss_fn: ``model ↦`` scalar training loss.
        model: the module; ``params`` must be among its parameters.
        params: the parameters θ, in the order of the flat vectors.
        engine: ``"func"`` or ``"autograd"``.  ``"func"`` falls back to
            ``"autograd"``, with a warning, when ``loss_fn`` reads captured
            parameters or torch.func fails to transform it.  A failure to
            transform is a ``RuntimeError`` under the transform (an in-place
            write to a captured tensor, ``.backward()``, an ``autograd.Function``
            without ``setup_context``) that does not recur when ``loss_fn`` is
            called plainly; the plain call is the fallback itself.  Any other
            exception (out of memory, or the user's own: a ``ConnectionError``
            from a data loader, a ``KeyError``) propagates at once, and an
            exception from the plain call propagates without a fallback.

    Returns:
        ``(hvp, loss)``: the product object and the loss value (a scalar
        tensor still connected to the hyperparameters); ``hvp.engine`` says
        which engine built it.

    Raises:
        TypeError / ValueError: ``loss_fn`` does not return a scalar tensor, or
            returns one without a graph to the parameters (computed under
            ``no_grad``/``inference_mode``, or detached).
    """
    if engine not in ENGINES:
        raise ValueError(f"Invalid engine: {engine!r} (expected one of {ENGINES})")
    if engine == "autograd":
        return _autograd_hvp(loss_fn, model, params)
    try:
        return _func_hvp(loss_fn, model, params)
    except _CapturedParameter:
        reason = ("train_loss_fn reads model parameters through a captured reference instead of its model "
                  "argument, which torch.func cannot swap")
    except torch.cuda.OutOfMemoryError:
        raise
    except RuntimeError as error:  # possibly a limitation of the transform: confirmed below by a plain call
        reason = f"torch.func could not transform train_loss_fn ({type(error).__name__}: {error})"
    result = _autograd_hvp(loss_fn, model, params)
    warn(f"{reason}; falling back to engine='autograd' (slower on most models; train_loss_fn was "
         "called a second time for this step). Pass engine='autograd' to silence this.", UserWarning)
    return result
