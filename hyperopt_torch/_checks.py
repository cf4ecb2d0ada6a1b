"""Argument checks shared by the whole package, with torch.optim-style messages.

One place for them: the solvers (:mod:`hyperopt_torch.ihvp`), the Hessian-vector
products, the implicit and the unrolled hypergradients import from here, never
from each other.  The module imports nothing from the package.
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

from torch import Tensor, nn
from torch.nn.parameter import is_lazy

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch < 2.5, or built without distributed
    try:
        from torch.distributed._tensor import DTensor
    except ImportError:
        DTensor = None


def is_dtensor(t) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (an FSDP2 parameter shard, for one)."""
    return DTensor is not None and isinstance(t, DTensor)


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


def check_model(model: nn.Module, modules: Sequence[nn.Module] | None = None) -> list[Tensor]:
    """The model's parameters with ``requires_grad``; ``ValueError`` for none, for a sparse-gradient or
    ``scale_grad_by_freq`` embedding, for a complex parameter, or for an uninitialized lazy parameter
    (``nn.LazyLinear`` before its first forward).

    ``nn.Embedding(sparse=True)`` / ``nn.EmbeddingBag(sparse=True)`` produce
    sparse gradients, which autograd cannot differentiate a second time, so no
    Hessian-vector product exists for them; with ``scale_grad_by_freq=True``
    PyTorch's second derivatives are wrong without an error (torch 2.13).  ``modules``, if given, is
    ``list(model.modules())`` already walked by the caller.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    # One pass over the modules, in model.parameters() order (each tensor once), reading the registries
    # directly: on a small model the generator behind parameters() and named_modules() costs more than
    # the hypergradient's own bookkeeping.  Names are built only for the error message.
    seen: set[int] = set()
    params = []

    def name_of(module: nn.Module) -> str:
        return "model." + (next(n for n, m in model.named_modules() if m is module) or "<root>")

    for module in model.modules() if modules is None else modules:
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.weight.requires_grad:
            if module.sparse:
                raise ValueError(
                    f"{name_of(module)} is an {type(module).__name__}(sparse=True): its sparse gradients cannot be "
                    "differentiated a second time, which Hessian-vector products need; construct it with sparse=False"
                )
            if module.scale_grad_by_freq:
                # The double backward of its scaled gradient leaves the scaling out, while the products
                # that reach its weight through the other parameters' gradients keep it: H is neither
                # the Hessian of f nor the Jacobian of the scaled gradient, and no error says so.
                raise ValueError(
                    f"{name_of(module)} is an {type(module).__name__}(scale_grad_by_freq=True): PyTorch's second "
                    "derivative of its frequency-scaled gradient is wrong (the scaling is left out), so the "
                    "Hessian-vector products would be; construct it with scale_grad_by_freq=False"
                )
        for key, p in module._parameters.items():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                if is_lazy(p):
                    raise ValueError(
                        f"{name_of(module)} ({type(module).__name__}) has uninitialized lazy parameters: run "
                        "the model once on a batch before the first step, so that their shapes are known"
                    )
                if p.requires_grad and p.is_complex():
                    raise ValueError(
                        f"{name_of(module)}.{key} is a complex parameter ({p.dtype}): the Hessian-vector products and "
                        "solvers work over real parameters; hold it as a real one (torch.view_as_real) and form the "
                        "complex value in forward (torch.view_as_complex)"
                    )
                if p.requires_grad:
                    params.append(p)
    if not params:
        raise ValueError("model has no parameters with requires_grad=True: there is no inner problem to differentiate")
    return params


__all__ = ["is_dtensor", "positive_int", "positive_float", "nonnegative_float", "check_scalar", "check_hparams", "require_graph",
           "check_model"]
