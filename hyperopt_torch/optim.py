"""HyperOptimizer: a torch.optim optimizer whose gradients are implicit hypergradients."""

from __future__ import annotations

import copy
import inspect
from typing import Any, Callable

import torch
from torch import nn
from torch.optim import Optimizer

from ._checks import check_hparams
from ._warn import warn
from .hvp import ENGINES
from .hypergrad import HypergradInfo, Hypergradient, LossFn, implicit_hypergradient
from .ihvp import RESULT_NEUTRAL, SOLVER_SETTINGS, Solver, make_solver, solver_config

_NONFINITE = ("warn", "raise")
_ALL_SETTINGS = {s for settings in SOLVER_SETTINGS.values() for s in settings}


def _tensors(params: list) -> list:
    """The tensors of a params list, which may hold ``(name, tensor)`` pairs (``named_parameters()``)."""
    return [p[1] if isinstance(p, tuple) and len(p) == 2 else p for p in params]


def _flat_hparams(groups: list) -> list:
    """The tensors of ``groups``; like torch.optim, a group's ``params`` iterable (for
    example ``module.parameters()``, a generator) is stored back as a list first."""
    if groups and isinstance(groups[0], dict):
        out = []
        for i, group in enumerate(groups):
            if not isinstance(group, dict) or "params" not in group:
                raise TypeError(f"hparams[{i}] is not a param-group dict with a 'params' entry")
            params = group["params"]
            group["params"] = [params] if isinstance(params, torch.Tensor) else list(params)
            out.extend(_tensors(group["params"]))
        return out
    return _tensors(groups)


def _check_base(base) -> None:
    if isinstance(base, Optimizer):
        cls = type(base)
        name = f"torch.optim.{cls.__name__}" if cls.__module__.startswith("torch.optim") else cls.__qualname__
        raise TypeError(f"base must be an optimizer class such as torch.optim.Adam, not an instance: pass "
                        f"base={name} and its settings as keywords (lr=...)")
    if not (isinstance(base, type) and issubclass(base, Optimizer)):
        raise TypeError(f"base must be a torch.optim.Optimizer subclass such as torch.optim.Adam, got {base!r}")
    if issubclass(base, HyperOptimizer):
        raise TypeError("base cannot be a HyperOptimizer")
    closure = inspect.signature(base.step).parameters.get("closure")
    if closure is not None and closure.default is inspect.Parameter.empty:
        raise ValueError(
            f"base={base.__name__} needs a closure that re-evaluates the loss at every step, and a hypergradient "
            "step has none: use a first-order optimizer (torch.optim.Adam, SGD, RMSprop, ...)"
        )
    if issubclass(base, torch.optim.SparseAdam):
        raise ValueError("base=SparseAdam updates from sparse gradients only, and hypergradients are dense: "
                         "use torch.optim.Adam")


def _split_keywords(ihvp, base: type, kwargs: dict) -> tuple[dict, dict]:
    """Split ``HyperOptimizer``'s keywords into the solver's settings and ``base``'s arguments.

    A keyword goes to the solver when it is in :data:`SOLVER_SETTINGS` for the
    named solver, else to ``base``.  A keyword both take (Adadelta's ``rho``,
    RMSprop's ``alpha`` with Neumann) is refused, as is a solver setting that
    neither the chosen solver nor ``base`` takes.
    """
    takes = SOLVER_SETTINGS[ihvp] if isinstance(ihvp, str) else ()
    signature = inspect.signature(base.__init__).parameters
    base_takes = set(signature) - {"self", "params"}
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.values())
    solver, to_base, misplaced = {}, {}, []
    for key, value in kwargs.items():
        if value is None and key in _ALL_SETTINGS and key not in base_takes:
            continue  # None means "the solver's default", as in make_solver
        if key in takes and key in base_takes:
            raise ValueError(
                f"{key}={value!r} is ambiguous: it is a setting of ihvp={ihvp!r} and an argument of {base.__name__}. "
                f"Pass the solver's as ihvp={make_solver(ihvp).__class__.__name__}({key}=...); {key}= then goes to "
                f"{base.__name__}"
            )
        if key in takes:
            solver[key] = value
        elif key in _ALL_SETTINGS and key not in base_takes and not open_ended:
            misplaced.append(key)
        else:
            to_base[key] = value
    if misplaced and isinstance(ihvp, str):
        applies = ", ".join(takes) if takes else "no settings"
        raise ValueError(f"{', '.join(misplaced)} does not apply to ihvp={ihvp!r} (it takes {applies}) "
                         f"and is not an argument of {base.__name__}")
    if misplaced:
        raise ValueError(f"{', '.join(misplaced)} given together with the solver object {ihvp!r}: set them on the object")
    return solver, to_base


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
        hparams: iterable of tensors, of ``(name, tensor)`` pairs
            (``module.named_parameters()``) or of param-group dicts, as for any
            ``torch.optim`` optimizer.  Leaf tensors with ``requires_grad=True``.
        base: the ``torch.optim.Optimizer`` subclass that updates φ.  One whose
            ``step`` needs a closure (``LBFGS``) or sparse gradients
            (``SparseAdam``) is refused.
        ihvp: a solver object (:class:`Nystrom`, :class:`ConjugateGradient`,
            :class:`Neumann`, :class:`Identity`, :class:`Exact`,
            :class:`Minres`, :class:`NormalCG`) or its name ``"nystrom"``,
            ``"cg"``, ``"neumann"``, ``"identity"``, ``"exact"``,
            ``"minres"``, ``"normal_cg"``.
        on_nonfinite: ``"warn"`` (default) or ``"raise"`` when a
            hypergradient or loss is not finite; either way nothing changes.
        residual: record ``‖(H + ρI)x − b‖/‖b‖`` in :attr:`last` (one HVP more).
        engine: ``"func"`` (default) or ``"autograd"``: how Hessian-vector
            products are computed (:mod:`hyperopt_torch.hvp`).  After one
            fallback from ``"func"`` to ``"autograd"`` the optimizer keeps
            using autograd.
        **settings_and_base_kwargs: with a solver name, the settings
            :data:`~hyperopt_torch.ihvp.SOLVER_SETTINGS` lists for it go to the
            solver (Nyström: ``rank``, ``rho``, ``chunk``, ``sketch``, ``seed``;
            CG, MINRES, normal-CG: ``iters``, ``rho``, ``tol``; Neumann:
            ``iters``, ``alpha``;
            Exact: ``rho``); everything else goes to ``base`` (``lr``,
            ``momentum``, ...).

    Raises:
        TypeError / ValueError at construction for empty or non-tensor
        hparams, hparams that do not require grad, an invalid solver setting,
        a solver setting that does not apply to the chosen solver, a keyword
        that is both a setting of the chosen solver and an argument of
        ``base`` (Adadelta's ``rho``: pass ``ihvp=Nystrom(rho=...)``, then
        ``rho=`` goes to Adadelta), an unknown ``ihvp`` name, or a ``base``
        that is not a usable optimizer class.

    Use ``step(train_loss_fn, val_loss_fn, model)`` to compute the
    hypergradient, store it in each hparam's ``.grad`` (replacing what was
    there) and update; or ``accumulate(...)`` per task then ``step()`` for a
    meta-batch; or :meth:`hypergradient` for the numbers alone.

    The shell holds the base optimizer as :attr:`base` and delegates
    ``param_groups``, ``state``, ``defaults``, ``zero_grad``, ``add_param_group``
    and the hook registrations to it, as torch.distributed.optim's wrappers
    do; it relies on no private attribute of ``torch.optim.Optimizer``, so
    ``copy.deepcopy``, ``pickle`` and ``torch.optim.lr_scheduler`` work.
    ``state_dict()`` is the base's plus a ``"hyperopt"`` entry (solver name,
    settings and state).

    Example::

        hopt = HyperOptimizer([log_decay], base=torch.optim.Adam, ihvp="nystrom",
                              rank=10, rho=0.01, lr=1e-3)
        hopt.step(train_loss_fn, val_loss_fn, model)
    """

    # torch.amp.GradScaler calls step() directly instead of unscaling .grad first:
    # hypergradients come from unscaled losses, so there is nothing to unscale.
    _step_supports_amp_scaling = True

    def __init__(
        self,
        hparams,
        base: type[Optimizer] = torch.optim.Adam,
        ihvp: Solver | str = "nystrom",
        *,
        on_nonfinite: str = "warn",
        residual: bool = False,
        engine: str = "func",
        **settings_and_base_kwargs: Any,
    ):
        if isinstance(hparams, torch.Tensor):
            raise TypeError("hparams must be an iterable of tensors or param-group dicts, got a single tensor: wrap it in a list")
        groups = list(hparams)
        check_hparams(_flat_hparams(groups))
        _check_base(base)
        if isinstance(ihvp, str):
            make_solver(ihvp)  # an unknown name is named before the keywords are sorted
        elif isinstance(ihvp, type):
            raise TypeError(f"ihvp={ihvp.__name__} is a class: pass a solver object, e.g. ihvp={ihvp.__name__}(...), "
                            "or its name")
        elif not callable(getattr(ihvp, "solve", None)):
            raise ValueError(f"Invalid ihvp: {ihvp!r} (expected a solver name or an object with a solve() method)")
        settings, base_kwargs = _split_keywords(ihvp, base, settings_and_base_kwargs)
        self.solver = make_solver(ihvp, **settings) if isinstance(ihvp, str) else ihvp
        if on_nonfinite not in _NONFINITE:
            raise ValueError(f"Invalid on_nonfinite: {on_nonfinite!r} (expected 'warn' or 'raise')")
        self.on_nonfinite = on_nonfinite
        self.residual = bool(residual)
        if engine not in ENGINES:
            raise ValueError(f"Invalid engine: {engine!r} (expected one of {', '.join(map(repr, ENGINES))})")
        self.engine = engine
        self.base = base(groups, **base_kwargs)
        self.last: HypergradInfo | None = None

    # -- the torch.optim surface, delegated to the base optimizer ---------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.base.param_groups

    @property
    def state(self):
        return self.base.state

    @property
    def defaults(self) -> dict[str, Any]:
        return self.base.defaults

    @property
    def hparams(self) -> list[torch.Tensor]:
        """All hyperparameter tensors, in param-group order."""
        return [p for group in self.param_groups for p in group["params"]]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        check_hparams(_flat_hparams([param_group]), name="param_group['params']")
        self.base.add_param_group(param_group)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        # An lr scheduler replaces ``step`` on the instance by a wrapper bound to this
        # object (and not picklable); a copy keeps the class's own step.
        state.pop("step", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's ``state_dict()`` plus ``"hyperopt"``: ``{"name", "settings", "solver_state"}``.

        ``name`` and ``settings`` describe the solver (:func:`~hyperopt_torch.ihvp.solver_config`);
        ``solver_state`` is the solver's own ``state_dict()`` (Nyström's
        generator state), ``None`` for a solver without state.
        """
        out = self.base.state_dict()
        out["hyperopt"] = {**solver_config(self.solver), "solver_state": self._solver_state(),
                           "base": type(self.base).__name__}
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`; refuses one written with another solver or other settings.

        Settings that do not change the result (Nyström's ``chunk`` and
        ``seed``) may differ.  To carry only the base optimizer's state over to
        another solver: ``hopt.base.load_state_dict(sd)`` after
        ``sd.pop("hyperopt")``.

        Raises:
            ValueError: no ``"hyperopt"`` entry, a different base optimizer,
                solver or setting (each difference is named); nothing is
                loaded.  Any other error while loading (a corrupt solver
                state) leaves the base optimizer's and the solver's state as
                they were.
        """
        state_dict = dict(state_dict)
        entry = state_dict.pop("hyperopt", None)
        if not isinstance(entry, dict) or "name" not in entry:
            raise ValueError("state_dict has no 'hyperopt' entry with the solver's name: it was not written by "
                             "HyperOptimizer.state_dict() (load a base optimizer's state with hopt.base.load_state_dict)")
        mine = solver_config(self.solver)
        if entry["name"] != mine["name"]:
            raise ValueError(f"the checkpoint was written with ihvp={entry['name']!r} {entry['settings']}, this optimizer "
                             f"uses ihvp={mine['name']!r} {mine['settings']}: build it with the checkpoint's solver")
        differ = [f"{k}: {entry['settings'].get(k)!r} in the checkpoint, {v!r} here"
                  for k, v in mine["settings"].items() if k not in RESULT_NEUTRAL and entry["settings"].get(k) != v]
        if differ:
            raise ValueError(f"the checkpoint's {mine['name']} solver has other settings ({'; '.join(differ)}): "
                             "build the optimizer with the checkpoint's settings")
        base = entry.get("base", type(self.base).__name__)
        if base != type(self.base).__name__:
            raise ValueError(f"the checkpoint was written with base={base}, this optimizer's base is "
                             f"{type(self.base).__name__}: build it with the checkpoint's base optimizer")
        # All or nothing: a solver state that fails to load (a corrupt generator state) must not leave
        # the base optimizer's state replaced.
        saved_base, saved_solver = copy.deepcopy(self.base.state_dict()), self._solver_state()
        try:
            self.base.load_state_dict(state_dict)
            if entry.get("solver_state") is not None:
                self.solver.load_state_dict(entry["solver_state"])
        except BaseException:
            self.base.load_state_dict(saved_base)
            self._restore_solver(saved_solver)
            raise

    def _solver_state(self):
        save = getattr(self.solver, "state_dict", None)
        return copy.deepcopy(save()) if callable(save) else None

    def _restore_solver(self, state) -> None:
        if state is not None:
            self.solver.load_state_dict(state)

    # -- hypergradients -------------------------------------------------------
    def hypergradient(self, train_loss_fn: LossFn, val_loss_fn: LossFn, model: nn.Module) -> Hypergradient:
        """Compute ``Hypergradient(grads, info)`` with this optimizer's solver, touching no ``.grad``.

        See :func:`~hyperopt_torch.implicit_hypergradient`.  Advances the
        solver's state (Nyström's generator); rolled back if the result is not
        finite or an error is raised.
        """
        saved = self._solver_state()
        try:
            result = implicit_hypergradient(
                self.hparams, train_loss_fn, val_loss_fn, model, self.solver,
                residual=self.residual, engine=self.engine,
            )
        except BaseException:
            self._restore_solver(saved)
            raise
        self.last = result.info
        self.engine = result.info.engine  # a loss torch.func cannot transform will not become transformable
        if result.info.skipped:
            self._restore_solver(saved)
            cause = ("diverged solve (the Neumann terms grew: either alpha is above 2/λ_max of the Hessian, "
                     "or the Hessian has negative curvature, along which the series grows for every alpha; lower "
                     "alpha, or use CG or Nyström with rho above -λ_min)"
                     if result.info.diverged else "non-finite hypergradient or loss")
            message = (
                f"{cause} (train {result.info.train_loss}, val {result.info.val_loss}) "
                f"with {result.info.solver}: the step was skipped and nothing was changed"
            )
            if self.on_nonfinite == "raise":
                raise FloatingPointError(message)
            warn(message, RuntimeWarning)
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

    def _update(self, apply: Callable[[], None], solver_state) -> None:
        """Run ``apply`` (which sets ``.grad`` and steps the base) as one transaction.

        If it raises, the hparams' values and ``.grad``, the base optimizer's
        state and ``solver_state`` are put back: one copy of the hparams and of
        the base's state is made per step.
        """
        hparams = self.hparams
        grads = [h.grad for h in hparams]
        values = [h.detach().clone() for h in hparams]
        base_state = copy.deepcopy(self.base.state_dict())
        try:
            apply()
        except BaseException:
            with torch.no_grad():
                for h, v in zip(hparams, values):
                    h.copy_(v)
            for h, g in zip(hparams, grads):
                h.grad = g
            self.base.load_state_dict(base_state)
            self._restore_solver(solver_state)
            raise

    def step(self, train_loss_fn: LossFn | None = None, val_loss_fn: LossFn | None = None,
             model: nn.Module | None = None) -> HypergradInfo | None:
        """Update the hyperparameters.

        With ``train_loss_fn``, ``val_loss_fn`` and ``model``: compute the
        hypergradient at the model's current parameters, store it in each
        hparam's ``.grad`` and take one step of the base optimizer; returns
        the :class:`HypergradInfo` (also in :attr:`last`).  A non-finite
        result changes nothing (warning, or ``FloatingPointError`` with
        ``on_nonfinite="raise"``).  With no arguments: one base-optimizer step
        on the gradients already in ``.grad``; returns ``None``.  Either way
        an exception from the base optimizer's step leaves the hparams, their
        ``.grad``, the base's state and the solver's state as they were.

        Through ``torch.amp.GradScaler`` (``scaler.step(hopt, ...)``) the step
        is the same: hypergradients are never scaled, so nothing is unscaled.
        """
        args = (train_loss_fn, val_loss_fn, model)
        if all(a is None for a in args):
            self._update(self.base.step, None)
            return None
        if any(a is None for a in args):
            raise TypeError("step() takes either no arguments or all of train_loss_fn, val_loss_fn and model")
        solver_state = self._solver_state()
        grads, info = self.hypergradient(train_loss_fn, val_loss_fn, model)
        if not info.skipped:
            def apply() -> None:
                for h, g in zip(self.hparams, grads):
                    h.grad = g
                self.base.step()

            self._update(apply, solver_state)
        return info

    def __repr__(self) -> str:
        return f"HyperOptimizer(base={type(self.base).__name__}, ihvp={self.solver!r})"


def _delegate(name: str):
    def method(self, hook, *args, **kwargs):
        return getattr(self.base, name)(hook, *args, **kwargs)

    method.__name__ = name
    method.__doc__ = (f"``base.{name}(hook)``: the hook runs with the base optimizer as its first argument, "
                      "around the base optimizer's own update or checkpoint.")
    return method


for _name in ("register_step_pre_hook", "register_step_post_hook", "register_state_dict_pre_hook",
              "register_state_dict_post_hook", "register_load_state_dict_pre_hook",
              "register_load_state_dict_post_hook"):
    setattr(HyperOptimizer, _name, _delegate(_name))
