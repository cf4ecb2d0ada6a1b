"""Model plumbing shared by the implicit and unrolled hypergradients."""

from __future__ import annotations

import inspect
import sys
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.utils.parametrizations import _WeightNorm
from torch.nn.utils.weight_norm import WeightNorm
from torch.overrides import TorchFunctionMode


def uncompiled(model):
    """The module inside ``torch.compile``'s wrapper (``OptimizedModule``, possibly nested), else ``model``.

    Compiled graphs have no double backward (AOTAutograd refuses ``create_graph``,
    with a message about donated buffers or double backward), so the
    hypergradients run the original module eagerly: the loss functions receive it.
    """
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # loaded once anything was compiled
    while eval_frame is not None and isinstance(model, eval_frame.OptimizedModule):
        model = model._orig_mod
    return model


def modules_of(model: nn.Module) -> list[nn.Module]:
    """``list(model.modules())``, the same modules in the same order, without building their names.

    ``Module.modules()`` runs ``named_modules()``, which formats a dotted name per
    module; a hypergradient step walks the tree twice (checks, snapshot) and on a
    small model that walk costs more than the snapshot's copies.
    """
    out: list[nn.Module] = []
    seen: set[int] = set()

    def visit(module: nn.Module) -> None:
        seen.add(id(module))
        out.append(module)
        for child in module._modules.values():
            if child is not None and id(child) not in seen:
                visit(child)

    visit(model)
    return out


class ModelSnapshot:
    """Everything of a model that user loss functions can change, put back by :meth:`restore`.

    * the train/eval flag of every submodule;
    * every parameter and buffer, as module attribute and as value.  A loss may
      write in place (``w.add_()``, ``clamp_``, ``nn.Embedding(max_norm=...)``
      renormalising its rows, BatchNorm's running statistics) or re-assign a
      buffer (``self.mean = 0.9 * self.mean + ...``): the original tensor
      objects are put back and their values restored, also after writes
      that bypass autograd's version counter (``w.data.clamp_()``).  One copy
      of the parameters and buffers is held; restoring copies it back through
      ``.data``, which bumps no version counter, so a graph the user built
      before the step stays usable;
    * tensors held as plain attributes by modules with a forward pre-hook: the
      hook-based ``nn.utils.weight_norm`` / ``spectral_norm`` store the weight
      they compute as ``module.weight`` at every forward, and the loss calls'
      weight (under ``engine="func"`` a tensor of torch.func's, unusable with
      autograd afterwards) would stay there until the next forward.  Only
      those modules are searched (about 4 µs on ResNet-18, where every
      module's ``__dict__`` costs 0.2 ms);
    * the ``.grad`` of ``params`` and ``extra`` (the hyperparameters).  They are
      set to ``None`` while the snapshot is open, so a ``.backward()`` inside a
      loss creates new gradients instead of adding into the saved ones, and
      :meth:`touched` tells which it reached.  :meth:`close` puts the original
      ``.grad`` objects back.
    """

    def __init__(self, model: nn.Module, params: Sequence[Tensor], extra: Sequence[Tensor] = (),
                 modules: Sequence[nn.Module] | None = None):
        modules = modules_of(model) if modules is None else modules
        self.modes = [(m, m.training) for m in modules]
        # (module, attribute name, tensor object).  Version counters cannot tell what changed:
        # BatchNorm's kernel and writes through .data update values without bumping them.  The
        # registries are read directly: named_parameters(recurse=False) per module costs more
        # than the copies themselves on a small model.
        self.tensors = [(m, kind, name, t) for m in modules
                        for kind in ("_parameters", "_buffers") for name, t in getattr(m, kind).items() if t is not None]
        self.non_persistent = {(id(m), name) for m in modules for name in getattr(m, "_non_persistent_buffers_set", ())}
        self.attributes = [(m.__dict__, name, t) for m in modules if m._forward_pre_hooks
                           for name, t in m.__dict__.items() if isinstance(t, Tensor)]
        with torch.no_grad():
            self.saved = [t.clone() for *_, t in self.tensors]
        self.grads = [(t, t.grad) for t in [*params, *extra]]
        for t, _ in self.grads:
            t.grad = None

    def touched(self) -> list[int]:
        """Indices into ``[*params, *extra]`` of the tensors that got a ``.grad`` since the snapshot was taken."""
        return [i for i, (t, _) in enumerate(self.grads) if t.grad is not None]

    def restore(self, values: bool = True) -> None:
        """Put back the modes and, with ``values``, the parameters' and buffers' objects and values.

        Gradients created since the snapshot are dropped; the saved ``.grad``
        objects come back at :meth:`close`.
        """
        for m, mode in self.modes:
            if m.training != mode:  # nn.Module.__setattr__ is slow; most steps change no mode
                m.training = mode
        for t, _ in self.grads:
            t.grad = None
        for attributes, name, t in self.attributes:
            attributes[name] = t
        if not values:
            return
        for m, kind, name, t in self.tensors:
            # Read the registries (getattr on a parameter goes through nn.Module.__getattr__'s slow path) and
            # repair them directly: a deleted buffer is registered again (non-persistent if it was), not set
            # as a plain attribute; the name is taken back from the other registry, the submodules and an
            # instance attribute shadowing the tensor.
            registry = m.__dict__.get(kind)
            if type(registry) is not dict:
                # A ScriptModule: its registries live in C++ (a traced one reaches them through
                # getattr) and take no new names, so putting the original object back is all.
                registry = getattr(m, kind)
                if registry[name] is not t:
                    registry[name] = t
                continue
            if name not in registry or registry[name] is not t or name in m.__dict__:
                other = m.__dict__["_buffers" if kind == "_parameters" else "_parameters"]
                if name in other:
                    del other[name]
                m.__dict__["_modules"].pop(name, None)
                m.__dict__.pop(name, None)
                registry[name] = t
                if kind == "_buffers" and (id(m), name) in self.non_persistent:
                    m._non_persistent_buffers_set.add(name)
        # Through .data: a copy that bumps no version counter (module docstring).
        if self.tensors:
            torch._foreach_copy_([t.data for *_, t in self.tensors], self.saved)

    def close(self, values: bool = True) -> None:
        """:meth:`restore`, then hand the saved ``.grad`` objects back."""
        self.restore(values)
        for t, g in self.grads:
            t.grad = g


class _Formulas(TorchFunctionMode):
    """Ops whose fused kernels lack a correct second derivative, computed by their formulas instead.

    * ``torch._weight_norm(v, g, dim)`` as ``v · g / ‖v‖`` (norms over every dim but
      ``dim``): for ``dim`` 0 or the last one PyTorch runs a fused kernel whose double
      backward takes the norms it saved as constants, so the second derivatives in
      ``v`` come out wrong without an error (torch 2.13, both weight-norm APIs);
    * ``F.hardsigmoid(x)`` as ``x/6 + 1/2`` on ``(−3, 3)``, else 0 or 1 (open at ±3 as
      PyTorch's gradient is, where a clamp's would be 1/6): its backward has no
      derivative (a ``RuntimeError`` at the first Hessian-vector product).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch._weight_norm:
            v, g, *rest = args
            dim = rest[0] if rest else kwargs.get("dim", 0)
            return v * (g / torch.norm_except_dim(v, 2, dim))
        if func is nn.functional.hardsigmoid:
            x = args[0]
            out = torch.where((x > -3) & (x < 3), x / 6 + 0.5, (x >= 3).to(x.dtype))
            return x.copy_(out) if (args[1] if len(args) > 1 else kwargs.get("inplace", False)) else out
        return func(*args, **kwargs)


class SecondOrder:
    """``with SecondOrder(modules): loss = train_loss_fn(model)``: a loss whose graph is differentiated twice.

    Works around PyTorch kernels without a correct second derivative, for the call only:

    * ``scaled_dot_product_attention`` (``nn.MultiheadAttention``, transformer
      layers, custom attention): its fused kernels (flash, on a CPU the default;
      memory-efficient; cuDNN) have no double backward, so the math kernel alone is
      enabled (the ``torch.backends.cuda`` flags are process-wide: attention in
      other threads meanwhile uses it too);
    * weight norm (``nn.utils.parametrizations.weight_norm``, ``nn.utils.weight_norm``)
      and ``nn.Hardsigmoid``, when one of ``modules`` has them: :class:`_Formulas`
      (a mode costs every op of the loss a Python call, so only then).
    """

    def __init__(self, modules: Sequence[nn.Module]):
        self.attention = MathAttention()
        self.mode = None
        for m in modules:  # a loop, not any() over a generator: half the cost on a ResNet-18 (20 µs)
            if isinstance(m, (_WeightNorm, nn.Hardsigmoid)) or (
                    m._forward_pre_hooks and any(isinstance(h, WeightNorm) for h in m._forward_pre_hooks.values())):
                self.mode = _Formulas()
                break

    def __enter__(self) -> "SecondOrder":
        self.attention.__enter__()
        if self.mode is not None:
            self.mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.mode is not None:
            self.mode.__exit__(*exc)
        self.attention.__exit__(*exc)


class MathAttention:
    """``scaled_dot_product_attention`` on its math kernel alone while open (the fused kernels have no
    double backward); a nested one finds the flags set and leaves them.

    The hypergradients hold one open from the training loss through the last
    backward through its graph: activation checkpointing runs the forward again
    inside those backwards, and a fused kernel there saves other tensors than
    the math kernel did (``CheckpointError``).  The validation loss, differentiated
    once, runs on the user's kernels.
    """

    def __init__(self):
        self.saved: tuple[bool, ...] | None = None

    def __enter__(self) -> "MathAttention":
        flags = _sdp_flags()
        if flags != _MATH_ONLY:
            self.saved = flags
            _set_sdp_flags(_MATH_ONLY)
        return self

    def __exit__(self, *exc) -> None:
        if self.saved is not None:
            _set_sdp_flags(self.saved)
            self.saved = None


_MATH_ONLY = (False, False, False, True)


def _sdp_flags() -> tuple[bool, ...]:
    """The (flash, memory-efficient, cuDNN, math) attention-kernel flags.

    Read and set directly: about 2 µs both ways, where ``torch.nn.attention.sdpa_kernel``
    costs about 27 µs (measured on a shared 2-core CPU box).
    """
    b = torch.backends.cuda
    return b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(), b.cudnn_sdp_enabled(), b.math_sdp_enabled()


def _set_sdp_flags(flags: tuple[bool, ...]) -> None:
    b = torch.backends.cuda
    for enable, on in zip((b.enable_flash_sdp, b.enable_mem_efficient_sdp, b.enable_cudnn_sdp, b.enable_math_sdp), flags):
        enable(on)


class LossCall(nn.Module):
    """``LossCall(model)(fn) == fn(model)``, so that ``torch.func.functional_call`` on this
    wrapper swaps the model's tensors (keys ``"model.<name>"``) for the duration of ``fn``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[[nn.Module], Tensor]) -> Tensor:
        return fn(self.model)


def reaches(tensor: Tensor, leaves: Sequence[Tensor], stop: Sequence[Tensor] = ()) -> bool:
    """Whether ``tensor``'s autograd graph has one of ``leaves`` as a leaf.

    Used to detect a loss that reads a parameter through a captured reference:
    ``functional_call`` swaps module attributes, not references held elsewhere.
    The search does not go behind the tensors in ``stop`` (graph already
    searched, e.g. the earlier steps of an unrolled loop).
    """
    if tensor.grad_fn is None:
        return False
    seen = {x.grad_fn for x in stop if x.grad_fn is not None}
    return tensor.grad_fn not in seen and _leads_to(tensor.grad_fn, {id(t) for t in leaves}, seen)


def _nodes(root, seen: set):
    """The autograd nodes behind ``root``, ``root`` first, each once; not those in ``seen``, which grows as it goes."""
    stack = [root]
    while stack:
        node = stack.pop()
        yield node
        for child, _ in node.next_functions:
            if child is not None and child not in seen:
                seen.add(child)
                stack.append(child)


def _leads_to(root, ids: set[int], seen: set) -> bool:
    """Whether the graph behind the node ``root`` (not behind the nodes in ``seen``) has a leaf whose id is in ``ids``."""
    for node in _nodes(root, seen):
        variable = getattr(node, "variable", None)  # AccumulateGrad nodes hold their leaf
        if variable is not None and id(variable) in ids:
            return True
    return False


_ONCE_DIFFERENTIABLE = once_differentiable(lambda ctx: None).__code__
"""The code of ``once_differentiable``'s wrapper, which every backward it decorates shares."""


def _once_differentiable(backward) -> bool:
    """Whether ``backward`` is ``once_differentiable``'s wrapper, or wraps it (``functools.wraps``
    decorators above it, e.g. ``torch.amp.custom_bwd``, common in extension ops)."""
    inner = inspect.unwrap(backward, stop=lambda f: getattr(f, "__code__", None) is _ONCE_DIFFERENTIABLE)
    return getattr(inner, "__code__", None) is _ONCE_DIFFERENTIABLE


def once_differentiable_function(tensor: Tensor, leaves: Sequence[Tensor]) -> type | None:
    """A custom ``autograd.Function`` in ``tensor``'s graph whose backward is ``@once_differentiable`` and whose
    inputs depend on one of ``leaves``, else ``None``.

    Differentiated twice, such a backward is meant to raise, from a node hung on
    detached copies of its outputs; ``autograd.grad(..., inputs=θ)`` never reaches
    that node and silently drops every path through the backward instead, under
    both engines (tests/test_model_kinds.py).  One walk of the graph: 20–75 µs
    a step for a 101-parameter logistic regression, 74 µs for ResNet-18 (shared
    2-core CPU box).
    """
    if tensor.grad_fn is None:
        return None
    for node in _nodes(tensor.grad_fn, {tensor.grad_fn}):
        cls = getattr(node, "_forward_cls", None)  # the nodes of custom Functions
        if cls is not None and _once_differentiable(cls.backward) and _leads_to(node, {id(t) for t in leaves}, set()):
            return cls
    return None


def refuse_once_differentiable(loss: Tensor, params: Sequence[Tensor]) -> None:
    """``ValueError`` naming the first :func:`once_differentiable_function` of ``loss``'s graph that ``params`` reach."""
    once = once_differentiable_function(loss, params)
    if once is not None:
        raise ValueError(
            f"the model runs {once.__qualname__}, a custom autograd.Function whose backward is "
            "@once_differentiable: PyTorch cannot differentiate it a second time and, in the Hessian-vector "
            "products, silently drops it instead of raising. Give it a differentiable backward (written with "
            "torch operations, without @once_differentiable). Nothing was changed."
        )
