"""Data-parallel hypergradients over ``torch.distributed`` (DDP, FSDP2 or hand-replicated models).

Each rank ``r`` of ``n`` holds a replica of θ and its own shard of the training
and validation batches, so the objectives are means over ranks,
``f = (1/n) Σ_r f_r`` and ``g = (1/n) Σ_r g_r`` (equal shard sizes make them
the losses of the concatenated batches).  Every term of Eq. 3 is linear in
``f`` or ``g``:

* ``∇_θ g`` and ``∂g/∂φ``: average the ranks' gradients (one all-reduce);
* ``V ∇²_θ f``: average the ranks' products — wrapping the batched matvec
  makes every solver see the global Hessian (one all-reduce per matvec call:
  the ``k × p`` sketch ``(HΩ)ᵀ`` for Nyström with κ = k, one ``p``-vector per
  iteration for CG and Neumann);
* ``(∂²f/∂φ∂θ) x``: average the ranks' mixed products (one all-reduce).

The solvers then run identically on every rank: their inputs are bitwise
equal (an all-reduce hands every rank the same bytes) and their random draws
come from a generator set to rank 0's state first.  Nyström's small matrices
``W``, ``G``, ``c`` are formed from the averaged sketch (``G = (HΩ)ᵀHΩ`` is not
the mean of the ranks' Gram matrices).  The last sync of the step, where the
finiteness flag and the losses reach the host, becomes an all-reduce too, so
a non-finite value on any rank skips the step on all of them.

:func:`data_parallel` detects the setting; :func:`implicit_hypergradient`
calls it, so a user passes the DDP-wrapped model (or the replica) unchanged.
An FSDP2 model is differentiated through an unsharded replica (:mod:`hyperopt_torch._fsdp`).
See docs/distributed.md for the measured communication and memory.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import _fsdp
from .ihvp import Operator


class Collectives:
    """Averages tensors over a process group and counts what it sends.

    ``collectives`` is the number of collective calls made; ``bytes`` the
    payload each rank handed to them (the tensor sizes, not wire traffic: a
    ring all-reduce moves about ``2(n-1)/n`` times that per rank).  With
    ``group=None`` (a single process) every method returns its input and
    nothing is counted.
    """

    def __init__(self, group=None, device: torch.device | None = None):
        self.group = group
        self.world = 1 if group is None else dist.get_world_size(group)
        self.device = device or torch.device("cpu")  # where host tensors go for a collective (NCCL: CUDA)
        self.collectives = 0
        self.bytes = 0

    def _count(self, t: Tensor) -> None:
        self.collectives += 1
        self.bytes += t.numel() * t.element_size()

    def average(self, tensors: Sequence[Tensor | None], like: Sequence[Tensor]) -> list[Tensor | None]:
        """The mean over ranks of each tensor (``None`` counts as zeros shaped like ``like[i]``).

        One all-reduce per distinct dtype, of the tensors flattened into one
        buffer.  Outputs are new tensors, or the inputs themselves for a single
        process.
        """
        if self.group is None:
            return list(tensors)
        filled = [t.detach() if t is not None else torch.zeros_like(ref) for t, ref in zip(tensors, like)]
        out: list[Tensor | None] = [None] * len(filled)
        for dtype in dict.fromkeys(t.dtype for t in filled):
            idx = [i for i, t in enumerate(filled) if t.dtype == dtype]
            flat = torch.cat([filled[i].reshape(-1) for i in idx])
            self._all_reduce_mean(flat)
            for i, piece in zip(idx, torch.split(flat, [filled[i].numel() for i in idx])):
                out[i] = piece.view_as(filled[i])
        return out

    def _all_reduce_mean(self, t: Tensor) -> None:
        # SUM then divide: ReduceOp.AVG exists for NCCL only, not gloo.
        self._count(t)
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        t.div_(self.world)

    def matvec(self, hvp: Operator) -> Operator:
        """Wrap a batched operator ``V (B, p) -> (B, p)`` so that it returns the mean over ranks.

        The result is a collective :class:`~hyperopt_torch.ihvp.Operator`
        (solvers must call it equally often on every rank); its in-place
        variant reduces the mean in the input block itself.
        """
        if self.group is None:
            return hvp

        def averaged(V: Tensor) -> Tensor:
            out = hvp(V).contiguous()
            self._all_reduce_mean(out)
            return out

        def averaged_inplace(V: Tensor) -> Tensor:
            out = hvp.inplace(V)
            out = out if out.is_contiguous() else out.contiguous()
            self._all_reduce_mean(out)
            return out

        return Operator(averaged, inplace=averaged_inplace, collective=True)

    def check_agreement(self, description: dict[str, Any]) -> None:
        """Raise on every rank if the ranks' ``description`` differ (one small ``all_gather_object``).

        Ranks that disagree on the solver, its settings or the shapes make
        different numbers or sizes of collectives, which gloo answers with a
        C++ ``terminate`` and NCCL with a hang; this names the setting instead.

        Raises:
            ValueError: naming each entry that differs and its value on every rank.
        """
        if self.group is None:
            return
        gathered: list[Any] = [None] * self.world
        self.collectives += 1
        dist.all_gather_object(gathered, description, group=self.group)
        differ = [key for key in description if any(other.get(key) != description[key] for other in gathered)]
        if differ:
            lines = "; ".join(f"{key}: " + ", ".join(f"rank {r} has {other.get(key)}" for r, other in
                                                     enumerate(gathered)) for key in differ)
            raise ValueError(f"the ranks disagree ({lines}): every rank must build the same solver with the same "
                             "settings, the same hparam shapes and the same model; nothing was changed")

    def synchronize(self, solver) -> None:
        """Set a randomized solver's state (``state_dict``/``load_state_dict``: Nyström's generator) to rank 0's
        on every rank (one broadcast per state tensor); a solver without state costs nothing."""
        save = getattr(solver, "state_dict", None)
        if self.group is None or not callable(save):
            return
        state = save()
        synced = {}
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                device = self.device if value.device.type == "cpu" else value.device
                tensor = value.to(device).contiguous()
                self._count(tensor)
                dist.broadcast(tensor, src=dist.get_global_rank(self.group, 0), group=self.group)
                value = tensor.to(state[key].device)
            synced[key] = value
        solver.load_state_dict(synced)

    def agree(self, checks: Tensor) -> Tensor:
        """Average the step's final check vector: ``[finite, f, g, (residual)]``.

        The finiteness flag (1.0 or 0.0) averages to 1.0 only when it is 1.0 on
        every rank; a NaN loss on one rank makes the mean NaN everywhere.
        """
        if self.group is None:
            return checks
        checks = checks.clone()
        self._all_reduce_mean(checks)
        return checks

    def gather(self, t: Tensor) -> Tensor:
        """The full tensor of a sharded DTensor ``t`` (``t.full_tensor()``: one all-gather of its shard).

        Counted as one collective of the local shard's bytes; a single process
        gathers over a mesh of one rank and counts nothing.
        """
        if self.group is not None:
            self._count(t.to_local())
        return t.full_tensor()

    def generator(self, generator: torch.Generator | None, device: torch.device) -> torch.Generator | None:
        """The solver's generator, set to rank 0's state on every rank (one broadcast).

        The Nyström index set or Gaussian test matrix must be the same on all
        ranks for the averaged products to be columns of one global sketch.
        ``generator`` (a CPU generator) is updated in place.  ``None`` (a
        solver without a generator of its own: CG, Neumann, identity, exact)
        costs nothing and is returned as is; a custom randomized solver used
        data-parallel must own a ``generator`` attribute or be passed one, since
        torch's global generator may be seeded differently on each rank.
        ``device`` carries the state for the backend (NCCL needs CUDA tensors).
        A single process gets ``generator`` back untouched.
        """
        if self.group is None or generator is None:
            return generator
        state = generator.get_state().to(device)
        self._count(state)
        dist.broadcast(state, src=dist.get_global_rank(self.group, 0), group=self.group)
        generator.set_state(state.cpu())
        return generator


def data_parallel(model, before: Callable[[Collectives], None] | None = None) -> tuple[Any, Collectives]:
    """``(params, collectives)`` for the hypergradient of ``model`` (a module, or θ as a dict or list of tensors).

    ``before(collectives)``, if given, runs as soon as the process group is known and before any collective
    of this function (the ranks' agreement check goes there, ahead of FSDP's all-gathers).

    * ``model`` wrapped in ``DistributedDataParallel``: the wrapped
      ``model.module`` and DDP's own process group.  The hypergradient calls
      the loss functions with ``model.module``, so DDP's forward (buffer
      broadcast, ``prepare_for_backward``) never runs and its reducer, which
      fires on ``.backward()`` only, is never armed by the hypergradient's
      ``torch.autograd.grad`` passes; the user's next inner ``backward()``
      finds it as the last inner step left it.
    * a plain module, or a dict or list of tensors, while the default process
      group is initialised with more than one rank: θ is taken to be
      replicated by hand, and everything is averaged over the default group.
    * an FSDP2 model (``fully_shard``; :mod:`hyperopt_torch._fsdp`): an
      unsharded, hook-free replica of it, each sharded parameter all-gathered
      once, and the fully_shard mesh's process group.  The loss functions
      receive the replica, whose parameters are full tensors; the FSDP model is
      not modified.  FSDP1 is refused by the rule table
      (:mod:`hyperopt_torch._kinds`).
    * otherwise: ``model`` itself and a :class:`Collectives` that does nothing.

    Every rank must call the hypergradient the same number of times, with
    replicas of θ and of the hyperparameters, and equal-sized shards (the
    global objective is the mean of the ranks' losses).
    """
    before = before or (lambda comm: None)
    if _fsdp.is_sharded(model):
        group = _fsdp.process_group(model)
        comm = Collectives(group if dist.get_world_size(group) > 1 else None)
        before(comm)
        return _fsdp.unsharded_replica(model, comm.gather), comm
    if isinstance(model, nn.parallel.DistributedDataParallel):
        group = model.process_group
        module, comm = model.module, Collectives(group if dist.get_world_size(group) > 1 else None)
    elif dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        module, comm = model, Collectives(dist.group.WORLD)
    else:
        module, comm = model, Collectives()
    before(comm)
    return module, comm
