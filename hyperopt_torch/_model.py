"""Model plumbing shared by the implicit and unrolled hypergradients."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn


class ModelSnapshot:
    """Restores a model's train/eval flags, parameter ``.grad`` references and (optionally) buffers.

    Parameter values are never written by the hypergradient code; buffers
    (BatchNorm running statistics) and modes can be changed by the user's
    loss functions.
    """

    def __init__(self, model: nn.Module, params: Sequence[Tensor]):
        self.modes = [(m, m.training) for m in model.modules()]
        self.buffers = [(b, b.detach().clone()) for b in model.buffers()]
        self.grads = [(p, p.grad) for p in params]

    def restore(self, buffers: bool = True) -> None:
        for m, mode in self.modes:
            m.training = mode
        for p, g in self.grads:
            p.grad = g
        if buffers:
            with torch.no_grad():
                for b, saved in self.buffers:
                    b.copy_(saved)


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
    ids = {id(t) for t in leaves}
    seen = {x.grad_fn for x in stop if x.grad_fn is not None}
    if tensor.grad_fn in seen:
        return False
    stack = [tensor.grad_fn]
    while stack:
        node = stack.pop()
        variable = getattr(node, "variable", None)  # AccumulateGrad nodes hold their leaf
        if variable is not None and id(variable) in ids:
            return True
        for child, _ in node.next_functions:
            if child is not None and child not in seen:
                seen.add(child)
                stack.append(child)
    return False
