"""FSDP models: detection, and the unsharded hook-free replica that the hypergradient differentiates.

Why a replica (measured on torch 2.13, CPU, gloo; docs/distributed.md, "FSDP"):

* FSDP2 (``fully_shard``) registers each parameter as a DTensor shard, but its
  forward computes with separate plain leaves, views of an all-gather buffer
  that its hooks swap in before and free after each module's forward and
  backward.  The sharded parameters are not in the autograd graph at all.
* A Hessian-vector product differentiates the gradient graph a second time.
  That graph saves the unsharded weights, which FSDP frees after the first
  backward (``reshard_after_backward``), and FSDP's pre-backward hooks, which
  would refill them, do not run in a second backward: the products fail
  (``setStorage: ... storage of size 0``), and reading a freed unsharded
  parameter outside the forward crashes the process.
* ``torch.func.functional_call`` on an FSDP module is silently wrong: FSDP's
  pre-forward puts its own unsharded parameters back over the swapped ones.

So the hypergradient never runs an FSDP module.  :func:`unsharded_replica`
all-gathers each sharded parameter once (``DTensor.full_tensor()``) into a
plain parameter and builds a *replica*: every module shallow-copied as an
instance of its original class (the ``FSDP<Class>`` wrapper class dropped),
sharing the model's buffers and its other (user) hooks, with FSDP's forward
hooks left out.  Every rank then holds the same θ, and the data-parallel
algorithm of :mod:`hyperopt_torch.distributed` applies unchanged.  The FSDP
model itself is never touched: its parameters stay sharded, its hooks armed,
its ``reshard_after_*`` settings and gradients as they were.  Buffers are
shared, so the snapshot that restores them restores the model's.

The full parameters are alive for the whole hypergradient: the double-backward
graph saves every layer's unsharded weight anyway (above), so holding them
once costs no more than FSDP with resharding turned off would.

Refused by name: FSDP1 (``FullyShardedDataParallel``), DTensor parameters on
a mesh of more than one dimension (HSDP, tensor parallelism) or on different
meshes, an unsharded FSDP parameter whose storage FSDP has freed.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch
from torch import Tensor, nn

from ._checks import is_dtensor
from ._model import modules_of

try:  # torch >= 2.6 (earlier: torch.distributed._composable.fsdp)
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # pragma: no cover - a torch without FSDP2 has no FSDP2 models to detect
    try:
        from torch.distributed._composable.fsdp import FSDPModule
    except ImportError:
        FSDPModule = None
try:
    from torch.distributed.fsdp import FullyShardedDataParallel
except ImportError:  # pragma: no cover - torch built without distributed
    FullyShardedDataParallel = None

_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks")
_HOOK_FLAGS = ("_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs", "_forward_hooks_always_called")
_FSDP_ATTRIBUTES = ("_is_fsdp_managed_module", "_fsdp_use_orig_params")  # markers fully_shard sets for Dynamo


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` is an FSDP2 model: an ``FSDPModule`` in its tree or a DTensor parameter.

    Raises:
        TypeError: ``model`` is or contains an FSDP1 ``FullyShardedDataParallel`` module.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False  # no mesh, no FSDP: the single-process path pays one call, not a walk of the modules
    found = False
    for module in modules_of(model):
        if FullyShardedDataParallel is not None and isinstance(module, FullyShardedDataParallel):
            raise TypeError(
                "model contains a FullyShardedDataParallel (FSDP1) module, which hypergradients do not support: "
                "shard the model with FSDP2, torch.distributed.fsdp.fully_shard, which PyTorch recommends in "
                "FSDP1's place (docs/distributed.md, 'FSDP')"
            )
        if (FSDPModule is not None and isinstance(module, FSDPModule)) or \
                any(is_dtensor(p) for p in module._parameters.values()):
            found = True
    return found


def refuse_sharded(model: nn.Module, what: str) -> None:
    """``TypeError`` for an FSDP model given to ``what``, which runs ``functional_call`` on the model itself."""
    if is_sharded(model):
        raise TypeError(
            f"{what} cannot differentiate an FSDP (fully_shard) model: torch.func.functional_call on it is "
            "silently wrong (FSDP's pre-forward puts its own unsharded parameters back over the swapped ones). "
            "Use implicit_hypergradient / HyperOptimizer, which gather the parameters into an unsharded replica"
        )


def _is_fsdp_hook(hook) -> bool:
    """A forward (pre-)hook that ``fully_shard`` registered: a bound method of its state object,
    possibly wrapped (``functools.wraps``) for a group of modules sharded together.

    Each layer of wrapping is looked at: ``inspect.unwrap`` of the bound method alone would
    follow its function's own ``__wrapped__`` (FSDP decorates ``_pre_forward``) to a plain
    function without ``__self__``.
    """
    seen = set()
    while hook is not None and id(hook) not in seen:
        seen.add(id(hook))
        owner = getattr(hook, "__self__", None)
        if owner is not None and type(owner).__module__.startswith("torch.distributed.fsdp"):
            return True
        hook = getattr(hook, "__wrapped__", None)
    return False


def _mesh(params: list[Tensor]):
    """The one 1-D device mesh all DTensor ``params`` are sharded on; ``ValueError`` otherwise."""
    meshes = {id(p.device_mesh): p.device_mesh for p in params}
    if len(meshes) > 1:
        raise ValueError("the model's sharded parameters live on different device meshes: hypergradients support "
                         "one fully_shard mesh for the whole model")
    mesh = next(iter(meshes.values()))
    if mesh.ndim != 1:
        raise ValueError(
            f"the model's parameters are DTensors on a {mesh.ndim}-D device mesh {tuple(mesh.shape)} (HSDP or "
            "tensor parallelism): hypergradients support fully_shard on a 1-D mesh, where every rank holds its "
            "own shard of the data"
        )
    return mesh


def process_group(model: nn.Module):
    """The process group of the one 1-D mesh ``model``'s DTensor parameters are sharded on.

    Raises:
        ValueError: no DTensor parameter (an FSDP model unsharded right now: its mesh
            is not visible), DTensor parameters on a mesh of more than one dimension
            or on several meshes.
    """
    sharded = [p for m in modules_of(model) for p in m._parameters.values() if is_dtensor(p)]
    if sharded:
        return _mesh(sharded).get_group()
    raise ValueError(
        "the FSDP model has no sharded parameter: every module is unsharded right now (after model.unshard(), "
        "or a backward with reshard_after_backward=False). Call model.reshard() on its FSDP modules first"
    )


def unsharded_replica(model: nn.Module, gather: Callable[[Tensor], Tensor]) -> nn.Module:
    """A hook-free copy of the FSDP2 ``model`` that holds full parameters.

    ``gather(p)`` returns the full tensor of a DTensor parameter (one
    all-gather, ``p.full_tensor()``); each sharded parameter is gathered once
    (tied parameters stay tied) into a plain ``nn.Parameter`` with the same
    ``requires_grad``, in the parameter's own dtype (a ``MixedPrecisionPolicy``'s
    ``param_dtype`` is FSDP's forward cast; the hypergradient runs on the
    full-precision parameters the optimizer updates).  A plain parameter
    (a module left unsharded, FSDP's ``ignored_params``, or a module that is
    unsharded right now, ``reshard_after_backward=False``) is shared as it is:
    like a data-parallel replica, it is the same on every rank.

    Every module of the replica is an instance of the module's original class
    (not ``FSDP<Class>``) whose ``__dict__`` is a shallow copy of the module's,
    with its own parameter and submodule registries and FSDP's forward hooks
    left out.  Nothing of ``model`` is modified.

    Raises:
        ValueError: a plain parameter whose storage FSDP has freed.
    """
    modules = modules_of(model)
    full: dict[int, nn.Parameter] = {}
    for m in modules:
        for name, p in m._parameters.items():
            if p is None or id(p) in full:
                continue
            if is_dtensor(p):
                with torch.no_grad():
                    full[id(p)] = nn.Parameter(gather(p), requires_grad=p.requires_grad)
            else:
                if p.untyped_storage().nbytes() < p.numel() * p.element_size():
                    # Reading it would read freed memory (a crash, not an error).
                    raise ValueError(
                        f"parameter {name!r} of {type(m).__name__} has no storage: FSDP freed it (an unsharded "
                        "parameter read outside the forward). Call the hypergradient with the model resharded "
                        "(model.reshard() on every FSDP module, or after the backward with the default "
                        "reshard_after_backward=True)"
                    )
                full[id(p)] = p
    copies: dict[int, nn.Module] = {}

    def copy(m: nn.Module) -> nn.Module:
        if id(m) in copies:  # a submodule shared by two parents stays shared
            return copies[id(m)]
        cls = type(m)
        if FSDPModule is not None and isinstance(m, FSDPModule):
            cls = cls.__mro__[getattr(cls, "_orig_cls_mro_index", 2)]  # FSDP<Class> -> Class
        new = cls.__new__(cls)
        copies[id(m)] = new
        state = {k: v for k, v in m.__dict__.items() if k not in _FSDP_ATTRIBUTES}
        state["_parameters"] = {k: (None if p is None else full[id(p)]) for k, p in m._parameters.items()}
        state["_buffers"] = dict(m._buffers)
        state["_modules"] = {k: (None if c is None else copy(c)) for k, c in m._modules.items()}
        dropped = set()
        for key in _HOOK_DICTS:
            hooks = m.__dict__.get(key)
            if hooks is not None:
                dropped |= {i for i, h in hooks.items() if _is_fsdp_hook(h)}
                state[key] = OrderedDict((i, h) for i, h in hooks.items() if i not in dropped)
        for key in _HOOK_FLAGS:
            flags = m.__dict__.get(key)
            if flags is not None:
                state[key] = OrderedDict((i, v) for i, v in flags.items() if i not in dropped)
        new.__dict__.update(state)
        return new

    return copy(model)
