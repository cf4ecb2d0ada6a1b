"""Batched Hessian-vector products over a list of tensors.

The solvers in :mod:`hyperopt_torch.ihvp` see the Hessian only through a
*matvec*: a callable taking ``V`` of shape ``(B, p)`` and returning ``H V``
row by row, shape ``(B, p)``.  This module builds that callable for a
training loss, and converts between flat vectors and lists of tensors.

The gradient graph ``∇_θ f`` is built once (``create_graph=True``) and every
HVP is one backward pass through it; ``B`` vectors go through one backward
with ``is_grads_batched=True`` (autograd's vmap), never a Python loop.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

Matvec = Callable[[Tensor], Tensor]


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

    Args:
        grads: ``∇_θ f`` as returned by ``torch.autograd.grad(f, params,
            create_graph=True, allow_unused=True)``; ``None`` entries (parameters
            that ``f`` does not use) have zero Hessian rows.
        params: the parameters θ the gradient was taken with respect to.

    Calling the object with ``V`` of shape ``(B, p)`` (or ``(p,)``) returns ``H V``
    of the same shape, in the parameters' dtype and on their device.  The graph
    is retained, so the object can be called any number of times; ``calls``
    counts the Hessian-vector products computed so far (``B`` per call).
    """

    def __init__(self, grads: Sequence[Tensor | None], params: Sequence[Tensor]):
        self.params = list(params)
        # Only gradient entries that carry a graph can be differentiated again; a
        # gradient without one (f linear in that parameter) contributes H = 0.
        self._live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        self._grads = [grads[i] for i in self._live]
        self.numel = sum(p.numel() for p in self.params)
        self.calls = 0

    def __call__(self, V: Tensor) -> Tensor:
        single = V.dim() == 1
        if single:
            V = V.unsqueeze(0)
        B = V.shape[0]
        self.calls += B
        if not self._grads:
            out = torch.zeros_like(V)
        else:
            pieces = unflatten(V, self.params)
            batched = B > 1
            hv = torch.autograd.grad(
                self._grads,
                self.params,
                grad_outputs=[pieces[i] if batched else pieces[i][0] for i in self._live],
                retain_graph=True,
                allow_unused=True,
                is_grads_batched=batched,
            )
            out = torch.cat(
                [
                    (h if h is not None else V.new_zeros(B, p.numel())).reshape(B, -1)
                    for h, p in zip(hv, self.params)
                ],
                dim=1,
            )
        return out.squeeze(0) if single else out

    def vjp_mixed(self, x: Tensor, hparams: Sequence[Tensor]) -> tuple[Tensor | None, ...]:
        """The mixed-partial product ``(∂²f/∂φ∂θ) x = ∂/∂φ ⟨∇_θ f, x⟩`` for ``x`` of shape ``(p,)``.

        Returns one entry per hparam, ``None`` where ``∇_θ f`` does not depend on it.
        Frees the graph: call it last.
        """
        if not self._grads:
            return tuple(None for _ in hparams)
        pieces = unflatten(x, self.params)
        return torch.autograd.grad(
            self._grads,
            list(hparams),
            grad_outputs=[pieces[i] for i in self._live],
            allow_unused=True,
        )
