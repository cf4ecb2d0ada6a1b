"""HyperOptimizer: a torch.optim optimizer whose gradients are implicit hypergradients."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from .hvp import ENGINES
from ._checks import check_hparams
from .hypergrad import HypergradInfo, Hypergradient, LossFn, implicit_hypergradient
from .ihvp import Solver, make_solver

_NONFINITE = ("warn", "raise")


def _flat_hparams(groups: list) -> list[torch.Tensor]:
    """The tensors of ``groups``; like torch.optim, a group's ``params`` iterable (for
    example ``module.parameters()``, a generator) is stored back as a list first."""
    if groups and isinstance(groups[0], dict):
        out = []
        for i, group in enumerate(groups):
            if not isinstance(group, dict) or "params" not in group:
                raise TypeError(f"hparams[{i}] is not a param-group dict with a 'params' entry")
            params = group["params"]
            group["params"] = [params] if isinstance(params, torch.Tensor) else list(params)
            out.extend(group["params"])
        return out
    return groups


class HyperOptimizer(Optimizer):
    r"""Gradient descent on hyperparameters with implicit hypergradients.

    Wraps any ``torch.optim`` optimizer (``base``) over the hyperparameters φ
    and feeds it the implicit hypergradient (Hataya & Yamada 2023, Eq. 3)

    .. math::
        \frac{dg}{d\phi} = \frac{\partial g}{\partial\phi}
        - \Big(\frac{\partial^2 f}{\partial\phi\,\partial\theta}\Big)^{\!\top}
          (\nabla^2_\theta f)^{-1}\,\nabla_\theta g ,

    where ``f`` is the training loss, ``g`` the validation loss and θ the
    model's parameters at their current (approximately optimal) values.  The
    inverse-Hessian-vector product comes from ``ihvp``.

    Args:
        hparams: iterable of tensors or param-group dicts, as for any
            ``torch.optim`` optimizer.  Leaf tensors with ``requires_grad=True``.
        base: the ``torch.optim.Optimizer`` subclass that updates φ.
        ihvp: a solver object (:class:`Nystrom`, :class:`ConjugateGradient`,
            :class:`Neumann`, :class:`Identity`, :class:`Exact`) or its name
            ``"nystrom"``, ``"cg"``, ``"neumann"``, ``"identity"``, ``"exact"``.
        rank, rho, chunk, sketch: Nyström's ``k``, ``ρ``, ``κ`` and test
            matrix (only with ``ihvp="nystrom"``; defaults 10, 0.01, ``None``
            = κ = k, ``"columns"``).  ``rho`` also sets the damping of
            ``"cg"`` and ``"exact"``.
        iters: ``l`` for ``ihvp="cg"`` or ``"neumann"`` (default 10).  For
            Neumann's ``alpha`` pass a :class:`Neumann` object.
        seed: seed of the generator that draws Nyström's random sketch.
        on_nonfinite: ``"warn"`` (default) or ``"raise"`` when a
            hypergradient or loss is not finite; either way nothing changes.
        residual: record ``‖(H + ρI)x − b‖/‖b‖`` in :attr:`last` (one HVP more).
        engine: ``"func"`` (default) or ``"autograd"``: how Hessian-vector
            products are computed (:mod:`hyperopt_torch.hvp`).  After one
            fallback from ``"func"`` to ``"autograd"`` the optimizer keeps
            using autograd.
        **base_kwargs: passed to ``base`` (``lr``, ``momentum``, ...).

    Raises:
        TypeError / ValueError at construction for empty or non-tensor
        hparams, hparams that do not require grad, an invalid solver setting
        (``rank < 1``, ``rho <= 0``, ``chunk`` outside ``1..rank``), an unknown
        ``ihvp`` name, or a ``base`` that is not an optimizer class.

    Use ``step(train_loss_fn, val_loss_fn, model)`` to compute the
    hypergradient, store it in each hparam's ``.grad`` (replacing what was
    there) and update; or ``accumulate(...)`` per task then ``step()`` for a
    meta-batch; or :meth:`hypergradient` for the numbers alone.
    ``param_groups`` and ``state`` are the base optimizer's own, so
    ``torch.optim.lr_scheduler`` drives it; ``state_dict()`` also holds the
    sketch generator, so a resumed run continues identically.

    Example::

        hopt = HyperOptimizer([log_decay], base=torch.optim.Adam, ihvp="nystrom",
                              rank=10, rho=0.01, lr=1e-3)
        hopt.step(train_loss_fn, val_loss_fn, model)
    """

    def __init__(
        self,
        hparams,
        base: type[Optimizer] = torch.optim.Adam,
        ihvp: Solver | str = "nystrom",
        *,
        rank: int | None = None,
        rho: float | None = None,
        chunk: int | None = None,
        sketch: str | None = None,
        iters: int | None = None,
        seed: int = 0,
        on_nonfinite: str = "warn",
        residual: bool = False,
        engine: str = "func",
        **base_kwargs: Any,
    ):
        if isinstance(hparams, torch.Tensor):
            raise TypeError("hparams must be an iterable of tensors or param-group dicts, got a single tensor: wrap it in a list")
        groups = list(hparams)
        check_hparams(_flat_hparams(groups))
        if not (isinstance(base, type) and issubclass(base, Optimizer)):
            raise TypeError(f"base must be a torch.optim.Optimizer subclass such as torch.optim.Adam, got {base!r}")
        if issubclass(base, HyperOptimizer):
            raise TypeError("base cannot be a HyperOptimizer")
        settings = dict(rank=rank, rho=rho, chunk=chunk, sketch=sketch, iters=iters)
        if isinstance(ihvp, str):
            self.solver = make_solver(ihvp, **settings)
        elif callable(getattr(ihvp, "solve", None)):
            given = [k for k, v in settings.items() if v is not None]
            if given:
                raise ValueError(f"{', '.join(given)} given together with the solver object {ihvp!r}: set them on the object")
            self.solver = ihvp
        else:
            raise ValueError(f"Invalid ihvp: {ihvp!r} (expected a solver name or an object with a solve() method)")
        if on_nonfinite not in _NONFINITE:
            raise ValueError(f"Invalid on_nonfinite: {on_nonfinite!r} (expected 'warn' or 'raise')")
        self.on_nonfinite = on_nonfinite
        self.residual = bool(residual)
        if engine not in ENGINES:
            raise ValueError(f"Invalid engine: {engine!r} (expected one of {', '.join(map(repr, ENGINES))})")
        self.engine = engine
        self.generator = torch.Generator().manual_seed(seed)
        self.last: HypergradInfo | None = None

        # Optimizer.__init__ sets up hooks and validates the groups into
        # throwaway lists; from then on param_groups/state are the base's.
        super().__init__(groups, {})
        self.base = base(groups, **base_kwargs)
        del self.__dict__["_own_param_groups"], self.__dict__["_own_state"]
        self.defaults = self.base.defaults

    # -- the torch.optim surface, shared with the base optimizer ---------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        base = self.__dict__.get("base")
        return base.param_groups if base is not None else self.__dict__["_own_param_groups"]

    @param_groups.setter
    def param_groups(self, value) -> None:
        base = self.__dict__.get("base")
        if base is not None:
            base.param_groups = value
        else:
            self.__dict__["_own_param_groups"] = value

    @property
    def state(self):
        base = self.__dict__.get("base")
        return base.state if base is not None else self.__dict__["_own_state"]

    @state.setter
    def state(self, value) -> None:
        base = self.__dict__.get("base")
        if base is not None:
            base.state = value
        else:
            self.__dict__["_own_state"] = value

    @property
    def hparams(self) -> list[torch.Tensor]:
        """All hyperparameter tensors, in param-group order."""
        return [p for group in self.param_groups for p in group["params"]]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        base = self.__dict__.get("base")
        if base is None:
            super().add_param_group(param_group)
        else:
            check_hparams(_flat_hparams([param_group]), name="param_group['params']")
            base.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's ``state_dict()`` plus a ``"hyperopt"`` entry (generator state)."""
        out = self.base.state_dict()
        out["hyperopt"] = {"generator": self.generator.get_state()}
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("hyperopt", None)
        self.base.load_state_dict(state_dict)
        if extra is not None:
            self.generator.set_state(extra["generator"])

    # -- hypergradients -------------------------------------------------------
    def hypergradient(self, train_loss_fn: LossFn, val_loss_fn: LossFn, model: nn.Module) -> Hypergradient:
        """Compute ``Hypergradient(grads, info)`` with this optimizer's solver, touching no ``.grad``.

        See :func:`~hyperopt_torch.implicit_hypergradient`.  Draws from this
        optimizer's generator (restored if the result is not finite).
        """
        saved = self.generator.get_state()
        try:
            result = implicit_hypergradient(
                self.hparams, train_loss_fn, val_loss_fn, model, self.solver,
                generator=self.generator, residual=self.residual, engine=self.engine,
            )
        except BaseException:
            self.generator.set_state(saved)
            raise
        self.last = result.info
        self.engine = result.info.engine  # a loss torch.func cannot transform will not become transformable
        if result.info.skipped:
            self.generator.set_state(saved)
            cause = ("diverged solve (the Neumann terms grew: lower alpha below 2/λ_max of the Hessian)"
                     if result.info.diverged else "non-finite hypergradient or loss")
            message = (
                f"{cause} (train {result.info.train_loss}, val {result.info.val_loss}) "
                f"with {result.info.solver}: the step was skipped and nothing was changed"
            )
            if self.on_nonfinite == "raise":
                raise FloatingPointError(message)
            warnings.warn(message, RuntimeWarning, stacklevel=3)
        return result

    def accumulate(self, train_loss_fn: LossFn, val_loss_fn: LossFn, model: nn.Module) -> HypergradInfo:
        """Add the hypergradient to each hparam's ``.grad`` (like ``loss.backward()``); no update.

        For meta-batches: ``zero_grad()``, ``accumulate(...)`` once per task,
        then ``step()``.  A non-finite hypergradient is not added.
        """
        grads, info = self.hypergradient(train_loss_fn, val_loss_fn, model)
        if not info.skipped:
            for h, g in zip(self.hparams, grads):
                h.grad = g if h.grad is None else h.grad + g
        return info

    def step(self, train_loss_fn: LossFn | None = None, val_loss_fn: LossFn | None = None,
             model: nn.Module | None = None) -> HypergradInfo | None:
        """Update the hyperparameters.

        With ``train_loss_fn``, ``val_loss_fn`` and ``model``: compute the
        hypergradient at the model's current parameters, store it in each
        hparam's ``.grad`` and take one step of the base optimizer; returns
        the :class:`HypergradInfo` (also in :attr:`last`).  A non-finite
        result changes nothing (warning, or ``FloatingPointError`` with
        ``on_nonfinite="raise"``).  With no arguments: one base-optimizer step
        on the gradients already in ``.grad``; returns ``None``.
        """
        args = (train_loss_fn, val_loss_fn, model)
        if all(a is None for a in args):
            self.base.step()
            return None
        if any(a is None for a in args):
            raise TypeError("step() takes either no arguments or all of train_loss_fn, val_loss_fn and model")
        grads, info = self.hypergradient(train_loss_fn, val_loss_fn, model)
        if not info.skipped:
            for h, g in zip(self.hparams, grads):
                h.grad = g
            self.base.step()
        return info

    def __repr__(self) -> str:
        return f"HyperOptimizer(base={type(self.base).__name__}, ihvp={self.solver!r})"
