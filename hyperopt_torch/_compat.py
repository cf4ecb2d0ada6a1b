"""Every use of a private PyTorch name, behind one door.

Two kinds of use live here, each with a public-API fallback:

* **Fast paths** save time only.  The environment variable
  ``HYPEROPT_TORCH_FAST_PATHS=0`` (read at import) turns all of them off, and
  so does a torch outside the range they were checked on (:data:`CHECKED`);
  the public fallback then computes the same numbers.  The test suite runs
  the core tests both ways (``.ci/run``), so the fallbacks cannot rot.  What
  each one saves is measured in docs/benchmarks.md ("Fast paths").
* **Detections** find a model kind whose second derivatives PyTorch gets
  wrong or lacks (the rule table, :mod:`hyperopt_torch._kinds`).  No public
  API exposes what they read.  Each is version-gated too; where the private
  name is missing it fails safe: the conservative action (the formula, the
  autograd engine, a refusal) is taken rather than the fast one.

Nothing else in the package imports a private torch name.
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.overrides import has_torch_function

CHECKED = ((2, 1), (2, 13))
"""The torch releases (inclusive) on which the private names below were checked; outside them only the
public paths run."""


def _release(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


IN_RANGE = CHECKED[0] <= _release(torch.__version__) <= CHECKED[1]
FAST = IN_RANGE and os.environ.get("HYPEROPT_TORCH_FAST_PATHS", "1") != "0"
"""Whether the fast paths run: torch within :data:`CHECKED` and ``HYPEROPT_TORCH_FAST_PATHS`` not ``0``."""


# -- fast paths ----------------------------------------------------------------------------------------------
_ENGINE_RUN_BACKWARD = getattr(torch.autograd.graph, "_engine_run_backward", None) if FAST else None
_ENGINE = getattr(torch.autograd.Variable, "_execution_engine", None) if FAST else None
_GRAPH_LOG = logging.getLogger("torch.autograd.graph")  # at DEBUG the entry point above adds logging hooks


def autograd_grad(outputs: tuple[Tensor, ...], inputs: tuple[Tensor, ...], grad_outputs: tuple[Tensor, ...], *,
                  retain_graph: bool | None = None, create_graph: bool = False) -> tuple[Tensor | None, ...]:
    """``torch.autograd.grad(outputs, inputs, grad_outputs, retain_graph, create_graph, allow_unused=True)``.

    Fast path: the engine entry point ``torch.autograd.grad`` ends in, without
    its Python layer (argument normalisation, ``_make_grads``' checks), when no
    tensor overrides ``__torch_function__`` and no mode is active; with no
    CUDA tensor in the process, all tensors in host memory and autograd's
    debug logging off, the C++ engine that entry point wraps.  Otherwise, and
    with the fast paths off, ``torch.autograd.grad`` itself.  ``grad_outputs``
    must have the outputs' shapes (the engine would sum a broadcastable one).
    The results are identical either way (tests/test_compat.py).
    """
    if retain_graph is None:
        retain_graph = create_graph
    if _ENGINE_RUN_BACKWARD is not None and not has_torch_function(outputs + inputs + grad_outputs):
        if _ENGINE is not None and not torch.cuda.is_initialized() and all(t.is_cpu for t in outputs + inputs) \
                and not _GRAPH_LOG.isEnabledFor(logging.DEBUG):
            # The whole backward runs on this thread: the entry point's copy of the context for the device
            # threads has nothing to do.  (CPU tensors alone would not do: a CPU hparam can reach a CUDA graph.)
            return _ENGINE.run_backward(outputs, grad_outputs, retain_graph, create_graph, inputs, True, False)
        return _ENGINE_RUN_BACKWARD(outputs, grad_outputs, retain_graph, create_graph, inputs, True,
                                    accumulate_grad=False)
    return torch.autograd.grad(outputs, inputs, grad_outputs=grad_outputs, retain_graph=retain_graph,
                               create_graph=create_graph, allow_unused=True)


def max_abs(tensors: Sequence[Tensor]) -> list[Tensor]:
    """``max |t|`` of each non-empty tensor as 0-dim tensors (NaN if it holds one, inf if an entry is infinite).

    Fast path: one fused ``_foreach_norm(ord=inf)``; fallback: ``vector_norm`` per tensor.
    """
    live = [t for t in tensors if t.numel()]
    if not live:
        return []
    if FAST:
        return list(torch._foreach_norm(live, float("inf")))
    return [torch.linalg.vector_norm(t, float("inf")) for t in live]


def copy_data_(destinations: Sequence[Tensor], sources: Sequence[Tensor]) -> None:
    """``d.data.copy_(s)`` for each pair: a copy that bumps no version counter (fast path: one fused
    ``_foreach_copy_``)."""
    if not destinations:
        return
    targets = [d.data for d in destinations]
    if FAST:
        torch._foreach_copy_(targets, list(sources))
        return
    for d, s in zip(targets, sources):
        d.copy_(s)


def children(module: nn.Module):
    """The direct submodules (fast path: the ``_modules`` registry, without ``named_children``' name tuples)."""
    if FAST:
        return [m for m in module._modules.values() if m is not None]
    return list(module.children())


def local_tensors(module: nn.Module) -> list[tuple[str, str, Tensor]]:
    """``(kind, name, tensor)`` for the module's own parameters (kind ``"parameter"``) and buffers (``"buffer"``).

    Fast path: the registries read directly; fallback: ``named_parameters/named_buffers(recurse=False)``.
    """
    if FAST and type(module.__dict__.get("_parameters")) is dict:
        return [*(("parameter", n, t) for n, t in module._parameters.items() if t is not None),
                *(("buffer", n, t) for n, t in module._buffers.items() if t is not None)]
    return [*(("parameter", n, t) for n, t in module.named_parameters(recurse=False)),
            *(("buffer", n, t) for n, t in module.named_buffers(recurse=False))]


def non_persistent_buffers(module: nn.Module) -> set[str]:
    """Names of the module's own buffers that are left out of its ``state_dict``."""
    if FAST and isinstance(getattr(module, "_non_persistent_buffers_set", None), set):
        return set(module._non_persistent_buffers_set)
    persistent = {name for name in module.state_dict(keep_vars=True) if "." not in name}
    return {name for name, _ in module.named_buffers(recurse=False) if name not in persistent}


def put_back(module: nn.Module, kind: str, name: str, tensor: Tensor, persistent: bool) -> None:
    """Make ``tensor`` the module's parameter or buffer ``name`` again, whatever a loss did to the attribute.

    A loss may delete a buffer, re-assign it, shadow it with an instance
    attribute or a submodule, or move the name to the other registry.  A
    ``ScriptModule``'s registries live in C++ and take no new names: the
    original object is put back under its name.
    """
    if isinstance(module, torch.jit.ScriptModule):
        registry = module._parameters if kind == "parameter" else module._buffers
        if registry[name] is not tensor:
            registry[name] = tensor
        return
    if FAST and type(module.__dict__.get("_parameters")) is dict:
        registry = module.__dict__["_parameters" if kind == "parameter" else "_buffers"]
        if registry.get(name) is tensor and name not in module.__dict__:
            return
        other = module.__dict__["_buffers" if kind == "parameter" else "_parameters"]
        other.pop(name, None)
        module.__dict__["_modules"].pop(name, None)
        module.__dict__.pop(name, None)
        registry[name] = tensor
        if kind == "buffer" and not persistent:
            module._non_persistent_buffers_set.add(name)
        return
    current = dict(module.named_parameters(recurse=False) if kind == "parameter" else
                   module.named_buffers(recurse=False))
    if current.get(name) is tensor and name not in vars(module):
        return
    vars(module).pop(name, None)  # an instance attribute shadowing the registries
    taken = {**dict(module.named_parameters(recurse=False)), **dict(module.named_buffers(recurse=False)),
             **dict(module.named_children())}
    if name in taken:
        delattr(module, name)
    if kind == "parameter":
        module.register_parameter(name, tensor)
    else:
        module.register_buffer(name, tensor, persistent=persistent)


def sdp_flags() -> tuple[bool, ...]:
    """The (flash, memory-efficient, cuDNN, math) attention-kernel flags (public ``torch.backends.cuda`` calls)."""
    b = torch.backends.cuda
    return b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(), b.cudnn_sdp_enabled(), b.math_sdp_enabled()


def set_sdp_flags(flags: tuple[bool, ...]) -> None:
    b = torch.backends.cuda
    for enable, on in zip((b.enable_flash_sdp, b.enable_mem_efficient_sdp, b.enable_cudnn_sdp, b.enable_math_sdp),
                          flags):
        enable(on)


# -- detections ----------------------------------------------------------------------------------------------
def compiled_inner(model):
    """The module inside ``torch.compile``'s wrapper (``OptimizedModule``), or ``None`` if ``model`` is not one.

    Raises:
        TypeError: a compiled wrapper whose eager module cannot be reached on this torch (pass the eager one).
    """
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # loaded once anything was compiled
    if eval_frame is None or not isinstance(model, getattr(eval_frame, "OptimizedModule", ())):
        return None
    inner = getattr(model, "_orig_mod", None) if IN_RANGE else None
    if not isinstance(inner, nn.Module):
        raise TypeError("model is a torch.compile wrapper whose eager module cannot be reached on this torch "
                        f"({torch.__version__}): pass the module you compiled")
    return inner


def has_tensor_hooks(tensor: Tensor) -> bool:
    """Whether ``tensor.register_hook`` was used on it.  Unknown (no ``_backward_hooks`` on this torch): ``True``."""
    hooks = getattr(tensor, "_backward_hooks", None) if IN_RANGE else True
    return bool(hooks)


def forward_pre_hooks(module: nn.Module) -> list:
    """The module's forward pre-hooks (``None`` entries stand for hooks that cannot be listed on this torch)."""
    hooks = getattr(module, "_forward_pre_hooks", None) if IN_RANGE else None
    return list(hooks.values()) if hooks is not None else [None]


def weight_norm_classes() -> tuple[type, ...]:
    """The weight-norm parametrization and forward-hook classes; empty where this torch has other names."""
    if not IN_RANGE:
        return ()
    from torch.nn.utils.weight_norm import WeightNorm

    try:
        from torch.nn.utils.parametrizations import _WeightNorm
    except ImportError:
        return (WeightNorm,)
    return _WeightNorm, WeightNorm


def weight_norm_kernel():
    """The fused weight-norm function the parametrization and hook call (``torch._weight_norm``), or ``None``."""
    return getattr(torch, "_weight_norm", None)


def custom_function_class(node) -> type | None:
    """The ``torch.autograd.Function`` subclass behind an autograd node, ``None`` for a built-in node.

    Outside :data:`CHECKED` every node of a Python-defined Function
    (``BackwardCFunction``) is reported as ``object``: unknown, so the caller
    treats it conservatively.
    """
    if not isinstance(node, torch.autograd.function.BackwardCFunction):
        return None
    cls = getattr(node, "_forward_cls", None) if IN_RANGE else None
    return cls if isinstance(cls, type) else object


_ONCE_DIFFERENTIABLE = once_differentiable(lambda ctx: None).__code__
"""The code object of ``once_differentiable``'s wrapper, which every backward it decorates shares."""


def once_differentiable_backward(cls: type) -> bool:
    """Whether ``cls.backward`` is ``@once_differentiable`` (also under ``functools.wraps`` decorators above it,
    e.g. ``torch.amp.custom_bwd``).  A class this torch cannot inspect (``object``) counts as one."""
    if cls is object:
        return True
    backward = getattr(cls, "backward", None)
    inner = inspect.unwrap(backward, stop=lambda f: getattr(f, "__code__", None) is _ONCE_DIFFERENTIABLE)
    return getattr(inner, "__code__", None) is _ONCE_DIFFERENTIABLE


_FSDP_MARKERS = ("_is_fsdp_managed_module", "_fsdp_use_orig_params")  # attributes fully_shard sets for Dynamo


def _fsdp_hook(hook) -> bool:
    """A forward (pre-)hook ``fully_shard`` registered: a bound method of its state object (a class of
    ``torch.distributed.fsdp``), possibly wrapped (``functools.wraps``) for modules sharded as one group.

    Every layer of wrapping is looked at: ``inspect.unwrap`` of the bound method alone follows its
    function's own ``__wrapped__`` (FSDP decorates ``_pre_forward``) to a plain function without ``__self__``.
    """
    seen = set()
    while hook is not None and id(hook) not in seen:
        seen.add(id(hook))
        owner = getattr(hook, "__self__", None)
        if owner is not None and type(owner).__module__.startswith("torch.distributed.fsdp"):
            return True
        hook = getattr(hook, "__wrapped__", None)
    return False


def unsharded_copy(model: nn.Module, parameters: dict[int, Tensor]) -> nn.Module | None:
    """A copy of the FSDP2 ``model`` without FSDP: ``parameters[id(p)]`` in place of each parameter ``p`` found
    there, the others and every buffer shared; ``None`` outside :data:`CHECKED` (the caller refuses).

    Every module becomes an instance of its original class (``FSDP<Class>`` is a subclass made by
    ``fully_shard``; the original sits at ``_orig_cls_mro_index`` in its MRO) whose ``__dict__`` is a shallow
    copy of the module's, with its own parameter, buffer and submodule registries and its forward hook
    dictionaries without FSDP's hooks.  No public API builds such a copy: ``copy.deepcopy`` of an FSDP
    module is refused by FSDP, and would copy its state.  A submodule shared by two parents stays shared.
    """
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if not IN_RANGE or fsdp is None or not hasattr(fsdp, "FSDPModule"):
        return None
    copies: dict[int, nn.Module] = {}

    def copy(module: nn.Module) -> nn.Module:
        if id(module) in copies:
            return copies[id(module)]
        cls = type(module)
        if isinstance(module, fsdp.FSDPModule):
            cls = cls.__mro__[getattr(cls, "_orig_cls_mro_index", 2)]
            if issubclass(cls, fsdp.FSDPModule) or not issubclass(cls, nn.Module):
                raise TypeError(f"unexpected class layout of an FSDP module: {type(module).__mro__}")
        new = cls.__new__(cls)
        copies[id(module)] = new
        state = {k: v for k, v in module.__dict__.items() if k not in _FSDP_MARKERS}
        state["_parameters"] = {k: (None if p is None else parameters.get(id(p), p))
                                for k, p in module._parameters.items()}
        state["_buffers"] = dict(module._buffers)
        state["_modules"] = {k: (None if c is None else copy(c)) for k, c in module._modules.items()}
        dropped = set()
        for key in ("_forward_pre_hooks", "_forward_hooks"):
            dropped |= {i for i, h in module.__dict__[key].items() if _fsdp_hook(h)}
        for key in ("_forward_pre_hooks", "_forward_hooks", "_forward_pre_hooks_with_kwargs",
                    "_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
            if key in module.__dict__:
                state[key] = type(module.__dict__[key])((i, h) for i, h in module.__dict__[key].items()
                                                         if i not in dropped)
        new.__dict__.update(state)
        return new

    return copy(model)


__all__ = ["FAST", "IN_RANGE", "CHECKED", "autograd_grad", "max_abs", "copy_data_", "children", "local_tensors",
           "non_persistent_buffers", "put_back", "sdp_flags", "set_sdp_flags", "compiled_inner", "has_tensor_hooks",
           "forward_pre_hooks", "weight_norm_classes", "weight_norm_kernel", "custom_function_class",
           "once_differentiable_backward", "unsharded_copy"]
