"""FSDP2 models: the unsharded, hook-free replica that the implicit hypergradient differentiates.

Why a replica (measured on torch 2.13, CPU, gloo; docs/distributed.md, "FSDP"):

* FSDP2 (``fully_shard``) registers each parameter as a DTensor shard, but its
  forward computes with separate plain leaves, views of an all-gather buffer
  that its hooks swap in before and free after each module's forward and
  backward.  The sharded parameters are not in the autograd graph at all.
* A Hessian-vector product differentiates the gradient graph a second time.
  That graph saves the unsharded weights, which FSDP frees after the first
  backward (``reshard_after_backward``), and FSDP's pre-backward hooks, which
  would refill them, do not run in a second backward: the products fail.
* ``torch.func.functional_call`` on an FSDP module is silently wrong: FSDP's
  pre-forward puts its own unsharded parameters back over the swapped ones.

So the hypergradient never runs an FSDP module (rule ``fsdp2`` of
:mod:`hyperopt_torch._kinds`).  :func:`unsharded_replica` all-gathers each
sharded parameter once (``DTensor.full_tensor()``) into a plain parameter and
builds a *replica* (:func:`hyperopt_torch._compat.unsharded_copy`): every
module shallow-copied as an instance of its original class, sharing the
model's buffers and its other (user) hooks, with FSDP's forward hooks left
out.  Every rank then holds the same θ, and the data-parallel algorithm of
:mod:`hyperopt_torch.distributed` applies unchanged.  The FSDP model itself is
never touched: its parameters stay sharded, its hooks armed, its settings and
gradients as they were; the shared buffers are restored by the step's snapshot.

The full parameters are alive for the whole hypergradient: the double-backward
graph saves every layer's unsharded weight anyway, so holding them once costs
no more than FSDP with resharding turned off would.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import Tensor, nn

from . import _compat
from ._checks import is_dtensor
from ._kinds import Refused, fsdp2_module


def is_sharded(params) -> bool:
    """Whether ``params`` is an FSDP2 model: an ``FSDPModule`` in its tree, or a DTensor parameter.

    A single process without a process group pays one call, no walk of the
    modules (no mesh, hence no DTensor, can exist there).

    Raises:
        Refused: θ given as a dict or list holding DTensors (pass the module).
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    if not isinstance(params, nn.Module):
        entries = params.values() if isinstance(params, Mapping) else params
        if any(is_dtensor(t) for t in entries):
            raise Refused("fsdp2", "params holds DTensors (sharded parameters): pass the fully_shard module itself, "
                                   "whose parameters the hypergradient gathers, or full tensors")
        return False
    stack, seen = [params], set()
    while stack:
        module = stack.pop()
        if fsdp2_module(module, None) or any(is_dtensor(t) for kind, _, t in _compat.local_tensors(module)
                                             if kind == "parameter"):
            return True
        for child in _compat.children(module):
            if id(child) not in seen:
                seen.add(id(child))
                stack.append(child)
    return False


def process_group(model: nn.Module):
    """The process group of the one 1-D device mesh ``model``'s DTensor parameters are sharded on.

    Raises:
        Refused: no DTensor parameter (an FSDP model unsharded right now: its mesh
            is not visible), parameters on a mesh of more than one dimension (HSDP,
            tensor parallelism) or on several meshes.
    """
    meshes = {id(p.device_mesh): p.device_mesh for p in model.parameters() if is_dtensor(p)}
    if not meshes:
        raise Refused("fsdp2", "the FSDP model has no sharded parameter: every module is unsharded right now "
                               "(after model.unshard(), or a backward with reshard_after_backward=False). Call "
                               "model.reshard() on its FSDP modules first")
    if len(meshes) > 1:
        raise Refused("fsdp2", "the model's sharded parameters live on different device meshes: hypergradients "
                               "support one fully_shard mesh for the whole model")
    mesh = next(iter(meshes.values()))
    if mesh.ndim != 1:
        raise Refused("fsdp2", f"the model's parameters are DTensors on a {mesh.ndim}-D device mesh "
                               f"{tuple(mesh.shape)} (HSDP or tensor parallelism): hypergradients support fully_shard "
                               "on a 1-D mesh, where every rank holds its own shard of the data")
    return mesh.get_group()


def unsharded_replica(model: nn.Module, gather: Callable[[Tensor], Tensor]) -> nn.Module:
    """A hook-free copy of the FSDP2 ``model`` that holds full parameters.

    ``gather(p)`` returns the full tensor of a DTensor parameter (one
    all-gather); each sharded parameter is gathered once (tied parameters stay
    tied) into a plain ``nn.Parameter`` with the same ``requires_grad``, in the
    parameter's own dtype (a ``MixedPrecisionPolicy``'s ``param_dtype`` is
    FSDP's forward cast; the hypergradient runs on the parameters the
    optimizer updates).  A plain parameter (a module left unsharded, FSDP's
    ``ignored_params``, a module unsharded right now) is shared as it is: like
    a data-parallel replica, it is the same on every rank.  Nothing of
    ``model`` is modified.

    Raises:
        Refused: a plain parameter whose storage FSDP has freed; a torch on which
            the replica's construction was not checked.
    """
    full: dict[int, Tensor] = {}
    for name, p in model.named_parameters(remove_duplicate=True):
        if is_dtensor(p):
            with torch.no_grad():
                full[id(p)] = nn.Parameter(gather(p), requires_grad=p.requires_grad)
        elif p.untyped_storage().nbytes() < p.numel() * p.element_size():
            # Reading it would read freed memory (a crash, not an error).
            raise Refused("fsdp2", f"parameter {name!r} has no storage: FSDP freed it (an unsharded parameter read "
                                   "outside the forward). Call the hypergradient with the model resharded "
                                   "(model.reshard() on every FSDP module, or after a backward with the default "
                                   "reshard_after_backward=True)")
    replica = _compat.unsharded_copy(model, full)
    if replica is None:
        raise Refused("fsdp2", f"an FSDP2 (fully_shard) model on torch {torch.__version__}, outside the releases "
                               f"{_compat.CHECKED} on which its unsharded replica was checked: nothing was computed")
    return replica
