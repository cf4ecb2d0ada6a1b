"""Argument checks shared by the whole package, with torch.optim-style messages.

One place for them: the solvers (:mod:`hyperopt_torch.ihvp`), the Hessian-vector
products, the implicit and the unrolled hypergradients import from here, never
from each other.  The module imports nothing from the package.
"""

from __future__ import annotations

import math
import numbers
import sys
from typing import Sequence

from torch import Tensor


def is_dtensor(t) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor`` ``DTensor`` (an FSDP2 parameter shard, for one).

    Looked up in ``sys.modules``: a DTensor exists only once its module was imported, and importing
    it here would add a second to ``import hyperopt_torch``.
    """
    for name in ("torch.distributed.tensor", "torch.distributed._tensor"):  # torch >= 2.5; 2.1 - 2.4
        cls = getattr(sys.modules.get(name), "DTensor", None)
        if cls is not None and isinstance(t, cls):
            return True
    return False


def positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"Invalid {name}: {value!r} (expected an integer >= 1)")
    return int(value)


def positive_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (value > 0 and math.isfinite(value)):
        raise ValueError(f"Invalid {name}: {value!r} (expected a finite number > 0)")
    return float(value)


def nonnegative_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"Invalid {name}: {value!r} (expected a finite number >= 0)")
    return float(value)


def check_scalar(loss, name: str) -> Tensor:
    """``loss`` as a 0-dim tensor; ``TypeError``/``ValueError`` if it is not a one-element tensor."""
    if not isinstance(loss, Tensor):
        raise TypeError(f"{name} must return a scalar tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(f"{name} must return a scalar tensor, got shape {tuple(loss.shape)}")
    # a 0-dim loss as it is: a reshape would add a view node that every backward then traverses
    return loss if loss.dim() == 0 else loss.reshape(())



def check_hparams(hparams: Sequence[Tensor], name: str = "hparams") -> list[Tensor]:
    """Validate a flat list of hyperparameter tensors; return it as a list."""
    if isinstance(hparams, Tensor):
        raise TypeError(f"{name} must be a list of tensors, got a single tensor: wrap it in a list, [{name}]")
    hparams = list(hparams)
    if not hparams:
        raise ValueError(f"{name} is empty: expected at least one tensor to tune")
    for i, h in enumerate(hparams):
        if not isinstance(h, Tensor):
            raise TypeError(f"{name}[{i}] is a {type(h).__name__}, expected a torch.Tensor")
        if not h.requires_grad:
            raise ValueError(f"{name}[{i}] does not require grad: create it with requires_grad=True")
        if not h.is_leaf:
            raise ValueError(f"{name}[{i}] is not a leaf tensor: pass the tensor you created, not an expression of it")
        if is_dtensor(h):
            # The loss functions get an FSDP model's parameters as full tensors (hyperopt_torch._fsdp); a
            # sharded hparam would meet them in the loss, where DTensor refuses plain tensors.
            raise TypeError(
                f"{name}[{i}] is a DTensor: hyperparameters are plain tensors, equal on every rank. For an FSDP "
                "model create per-parameter ones full-size, e.g. torch.full(p.shape, value, dtype=p.dtype, "
                "requires_grad=True) for p in model.parameters() (a DTensor's shape is the full one): the loss "
                "functions receive the model's parameters as full tensors (docs/distributed.md, 'FSDP')"
            )
    return hparams


def require_graph(loss: Tensor, name: str) -> Tensor:
    """``ValueError`` if ``loss`` has no autograd graph to the model parameters, naming the likely cause.

    Under the ``"func"`` engine this is checked inside the transform, where
    ``requires_grad`` means "depends on θ"; a loss whose value has no graph was
    computed under ``torch.no_grad()`` / ``torch.inference_mode()``, or detached.
    """
    if loss.requires_grad:
        return loss
    if loss.is_inference():
        cause = "it was computed under torch.inference_mode(): compute it outside inference_mode"
    else:
        cause = ("it was computed under torch.no_grad() or detached (.detach(), .item(), a NumPy round trip): "
                 "compute it from the model with autograd enabled")
    raise ValueError(f"{name} returned a tensor with no autograd graph to the model parameters; {cause}")


__all__ = ["is_dtensor", "positive_int", "positive_float", "nonnegative_float", "check_scalar", "check_hparams", "require_graph"]
