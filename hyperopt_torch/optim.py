"""HyperOptimizer: a torch.optim optimizer whose gradients are implicit hypergradients."""

from __future__ import annotations

import copy
import inspect
import math
import numbers
from typing import Any, Callable

import torch
from torch.optim import Optimizer

from ._checks import check_hparams
from ._warn import warn
from .hvp import ENGINES, Batching, check_engine
from ._inner import LossFn
from .hypergrad import HypergradInfo, Hypergradient, implicit_hypergradient
from .ihvp import RESULT_NEUTRAL, SOLVER_SETTINGS, Solver, check_solver_name, make_solver, solver_config

_NONFINITE = ("warn", "raise")


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


def _check_settings(ihvp, given: dict, base: type, base_kwargs: dict) -> None:
    """The collision rule: a solver keyword is the solver's; ``base``'s argument of the same name goes in
    ``base_kwargs``.  ``given`` holds the solver keywords that are not ``None``."""
    base_takes = set(inspect.signature(base.__init__).parameters) - {"self", "params"}
    if not isinstance(ihvp, str):
        if given:
            hint = "".join(f"; for {base.__name__}'s {k}, pass base_kwargs={{{k!r}: {v!r}}}"
                           for k, v in given.items() if k in base_takes)
            raise ValueError(f"{', '.join(given)} given together with the solver object {ihvp!r}: set the solver's "
                             f"settings on the object{hint}")
        return
    takes = SOLVER_SETTINGS.get(ihvp, ())
    for key, value in given.items():
        if key not in takes and key in base_takes:
            raise ValueError(f"{key}={value!r} does not apply to ihvp={ihvp!r} (it takes "
                             f"{', '.join(takes) or 'no settings'}); for {base.__name__}'s {key}, pass "
                             f"base_kwargs={{{key!r}: {value!r}}}")
        if key in takes and key in base_takes and key not in base_kwargs:
            raise ValueError(
                f"{key}={value!r} is a setting of ihvp={ihvp!r} and also an argument of {base.__name__}: "
                f"the keyword sets the solver's; pass {base.__name__}'s as base_kwargs={{{key!r}: ...}} "
                "(giving both says which is which)")


def _is_batching_state(state) -> bool:
    """Whether ``state`` has the form of :meth:`~hyperopt_torch.hvp.Batching.state_dict` (or is empty)."""
    return isinstance(state, dict) and all(
        isinstance(state.get(k, {}), dict) and all(isinstance(v, dict) for v in state.get(k, {}).values())
        for k in ("engines", "strategies"))


class _BaseState:
    """What the base optimizer's step can change, for a rollback: one copy of the hparams' values and of
    the tensors of their state (no ``state_dict()`` packing, no deep copy of the rest)."""

    def __init__(self, base: Optimizer, hparams: list[torch.Tensor]):
        self.base = base
        self.hparams = hparams
        self.grads = [h.grad for h in hparams]
        with torch.no_grad():
            self.values = [h.detach().clone() for h in hparams]
            self.state = {h: {k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
                              for k, v in base.state[h].items()} for h in hparams if h in base.state}
        self.groups = [{k: v for k, v in g.items() if k != "params"} for g in base.param_groups]

    def restore(self) -> None:
        with torch.no_grad():
            for h, v in zip(self.hparams, self.values):
                h.copy_(v)
        for h, g in zip(self.hparams, self.grads):
            h.grad = g
        for h in self.hparams:
            if h in self.state:
                self.base.state[h] = self.state[h]
            else:
                self.base.state.pop(h, None)
        for group, saved in zip(self.base.param_groups, self.groups):
            group.update(saved)


class HyperOptimizer(Optimizer):
    r"""Gradient descent on hyperparameters with implicit hypergradients.

    Wraps any ``torch.optim`` optimizer (``base``) over the hyperparameters φ
    and feeds it the implicit hypergradient (Hataya & Yamada 2023, Eq. 3)

    .. math::
        \frac{dg}{d\phi} = \frac{\partial g}{\partial\phi}
        - \Big(\frac{\partial^2 f}{\partial\phi\,\partial\theta}\Big)^{\!\top}
          (\nabla^2_\theta f)^{-1}\,\nabla_\theta g ,

    where ``f`` is the training loss, ``g`` the validation loss and θ the
    inner parameters at their current (approximately optimal) values.  The
    inverse-Hessian-vector product comes from ``ihvp``.

    Args:
        hparams: iterable of tensors, of ``(name, tensor)`` pairs
            (``module.named_parameters()``) or of param-group dicts, as for any
            ``torch.optim`` optimizer.  Leaf tensors with ``requires_grad=True``.
        base: the ``torch.optim.Optimizer`` subclass that updates φ.  One whose
            ``step`` needs a closure (``LBFGS``) or sparse gradients
            (``SparseAdam``) is refused.
        ihvp: a solver object or its name (:data:`~hyperopt_torch.ihvp.SOLVER_NAMES`:
            ``"nystrom"``, ``"cg"``, ``"minres"``, ``"normal_cg"``, ``"neumann"``, ``"identity"``,
            ``"exact"``).
        rank, rho, chunk, sketch, seed: Nyström's ``k``, ``ρ``, ``κ``, test
            matrix and generator seed (:class:`~hyperopt_torch.Nystrom`);
            ``rho`` is also the damping of CG, MINRES, normal-CG and Exact.
        iters, alpha, tol: the iterative solvers' ``l``, Neumann's step ``α``
            and the relative residual at which CG, MINRES and normal-CG stop.
            Every solver setting is ``None`` by default, meaning the solver's
            own default; a setting given for a solver that does not take it is
            refused, as is one given with a solver object.
        on_nonfinite: ``"warn"`` (default) or ``"raise"`` when a
            hypergradient or loss is not finite; either way nothing changes.
        residual: record ``‖(H + ρI)x − b‖/‖b‖`` in :attr:`last` (one HVP more).
        engine: ``"auto"`` (default: the faster engine, measured on the first
            step of each model layout and kept in :attr:`batching`),
            ``"func"`` or ``"autograd"`` (:mod:`hyperopt_torch.hvp`).  After a
            fallback from torch.func to autograd the optimizer keeps autograd.
        base_kwargs: arguments of ``base`` whose names are also solver
            settings (Adadelta's ``rho``, RMSprop's ``alpha``): the keyword
            always sets the solver's, and ``base_kwargs={"rho": 0.9}`` the
            base's.  Giving only the keyword when both take it is refused.
        **kwargs: every other argument of ``base`` (``lr``, ``momentum``, ...).

    Raises:
        TypeError / ValueError at construction, naming the argument: empty or
        non-tensor hparams, hparams that do not require grad, an invalid or
        misplaced solver setting, an unknown ``ihvp`` name, a ``base`` that
        is not a usable optimizer class, or what ``base`` itself rejects.

    Use ``step(train_loss_fn, val_loss_fn, params)`` to compute the
    hypergradient, store it in each hparam's ``.grad`` (replacing what was
    there) and update; or ``accumulate(..., weight=w)`` per task then
    ``step()`` for a meta-batch; or :meth:`hypergradient` for the numbers alone.
    ``params`` is the inner model, or θ as a dict or list of tensors
    (:func:`~hyperopt_torch.implicit_hypergradient`).

    The shell holds the base optimizer as :attr:`base` and delegates
    ``param_groups``, ``state``, ``defaults``, ``zero_grad``, ``add_param_group``
    and the hook registrations to it, as torch.distributed.optim's
    ``PostLocalSGDOptimizer`` does; it never calls ``Optimizer.__init__`` nor
    touches its private attributes, so ``copy.deepcopy``, ``pickle``,
    ``torch.optim.lr_scheduler`` and ``GradScaler`` work (tests/test_optim.py
    checks each public feature against the base).  ``state_dict()`` is the
    base's plus a ``"hyperopt"`` entry (solver, settings and state, and the
    measured :attr:`batching`).

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
        rank: int | None = None,
        rho: float | None = None,
        chunk: int | str | None = None,
        sketch: str | None = None,
        seed: int | None = None,
        iters: int | None = None,
        alpha: float | None = None,
        tol: float | None = None,
        on_nonfinite: str = "warn",
        residual: bool = False,
        engine: str = "auto",
        base_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ):
        if isinstance(hparams, torch.Tensor):
            raise TypeError("hparams must be an iterable of tensors or param-group dicts, got a single tensor: wrap it in a list")
        groups = list(hparams)
        check_hparams(_flat_hparams(groups))
        _check_base(base)
        if isinstance(ihvp, str):
            check_solver_name(ihvp)  # named before the settings are checked
        elif isinstance(ihvp, type):
            raise TypeError(f"ihvp={ihvp.__name__} is a class: pass a solver object, e.g. ihvp={ihvp.__name__}(...), "
                            "or its name")
        elif not callable(getattr(ihvp, "solve", None)):
            raise ValueError(f"Invalid ihvp: {ihvp!r} (expected a solver name or an object with a solve() method)")
        base_kwargs = dict(base_kwargs or {})
        both = sorted(set(base_kwargs) & set(kwargs))
        if both:
            raise ValueError(f"{', '.join(both)} given both as a keyword and in base_kwargs: give it once")
        given = {k: v for k, v in (("rank", rank), ("rho", rho), ("chunk", chunk), ("sketch", sketch), ("seed", seed),
                                   ("iters", iters), ("alpha", alpha), ("tol", tol)) if v is not None}
        _check_settings(ihvp, given, base, base_kwargs)
        if isinstance(ihvp, str):
            self.solver = make_solver(ihvp, rank=rank, rho=rho, chunk=chunk, sketch=sketch, seed=seed, iters=iters,
                                      alpha=alpha, tol=tol)
        else:
            self.solver = ihvp
        if on_nonfinite not in _NONFINITE:
            raise ValueError(f"Invalid on_nonfinite: {on_nonfinite!r} (expected 'warn' or 'raise')")
        self.on_nonfinite = on_nonfinite
        self.residual = bool(residual)
        self.engine = check_engine(engine)
        self.batching = Batching()
        self.base = base(groups, **kwargs, **base_kwargs)
        self.last: HypergradInfo | None = None
        self._ranks_agreed = False  # under torch.distributed: checked on the first step and after a load

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
        self._ranks_agreed = False

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        # An lr scheduler replaces ``step`` on the instance by a wrapper bound to this
        # object (and not picklable); a copy keeps the class's own step.
        state.pop("step", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's ``state_dict()`` plus ``"hyperopt"``: ``{"name", "settings", "solver_state",
        "base", "batching"}``.

        ``name`` and ``settings`` describe the solver (:func:`~hyperopt_torch.ihvp.solver_config`);
        ``solver_state`` is the solver's own ``state_dict()`` (Nyström's
        generator state), ``None`` for a solver without state; ``batching`` the
        measured engine and batching choices (:class:`~hyperopt_torch.hvp.Batching`),
        so that a run resumed in a new process computes the same products.
        """
        out = self.base.state_dict()
        out["hyperopt"] = {**solver_config(self.solver), "solver_state": self._solver_state(),
                           "base": type(self.base).__name__, "engine": self.engine,
                           "batching": self.batching.state_dict()}
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
        settings, engine, batching = entry.get("settings", {}), entry.get("engine", self.engine), entry.get("batching", {})
        if not isinstance(settings, dict) or engine not in ENGINES or not _is_batching_state(batching):
            raise ValueError("the checkpoint's 'hyperopt' entry is damaged (settings, engine or batching of the wrong "
                             "type): nothing was loaded")
        mine = solver_config(self.solver)
        if entry["name"] != mine["name"]:
            raise ValueError(f"the checkpoint was written with ihvp={entry['name']!r} {settings}, this optimizer "
                             f"uses ihvp={mine['name']!r} {mine['settings']}: build it with the checkpoint's solver")
        differ = [f"{k}: {settings.get(k)!r} in the checkpoint, {v!r} here"
                  for k, v in mine["settings"].items() if k not in RESULT_NEUTRAL and settings.get(k) != v]
        if differ:
            raise ValueError(f"the checkpoint's {mine['name']} solver has other settings ({'; '.join(differ)}): "
                             "build the optimizer with the checkpoint's settings")
        base = entry.get("base", type(self.base).__name__)
        if base != type(self.base).__name__:
            raise ValueError(f"the checkpoint was written with base={base}, this optimizer's base is "
                             f"{type(self.base).__name__}: build it with the checkpoint's base optimizer")
        # All or nothing: a solver state that fails to load (a corrupt generator state) must not leave
        # the base optimizer's state replaced.
        # (Copied without state_dict(), whose hooks would fire for a checkpoint nobody asked for.)
        saved_base, saved_solver = _BaseState(self.base, self.hparams), self._solver_state()
        saved_batching = self.batching.state_dict()
        try:
            self.base.load_state_dict(state_dict)
            if entry.get("solver_state") is not None:
                self.solver.load_state_dict(entry["solver_state"])
            self.batching.load_state_dict(batching)
        except BaseException:
            saved_base.restore()
            self._restore_solver(saved_solver)
            self.batching.load_state_dict(saved_batching)
            raise
        if self.engine == "func" and engine == "autograd":
            # the only engine a checkpoint carries over: the saved run had fallen back from torch.func for good
            self.engine = engine
        self._ranks_agreed = False

    def _solver_state(self):
        save = getattr(self.solver, "state_dict", None)
        return copy.deepcopy(save()) if callable(save) else None

    def _restore_solver(self, state) -> None:
        if state is not None:
            self.solver.load_state_dict(state)

    # -- hypergradients -------------------------------------------------------
    def hypergradient(self, train_loss_fn: LossFn, val_loss_fn: LossFn, params) -> Hypergradient:
        """Compute ``Hypergradient(grads, info)`` with this optimizer's solver, touching no ``.grad``.

        See :func:`~hyperopt_torch.implicit_hypergradient`.  Advances the
        solver's state (Nyström's generator); rolled back if the result is not
        finite or an error is raised.
        """
        return self._hypergradient(train_loss_fn, val_loss_fn, params, self._solver_state())

    def _hypergradient(self, train_loss_fn, val_loss_fn, params, solver_state) -> Hypergradient:
        # What a failed (or interrupted) step must not leave behind: the solver's state and the batching it
        # measured (which would steer the later steps).
        batching = self.batching.state_dict()
        try:
            result = implicit_hypergradient(
                self.hparams, train_loss_fn, val_loss_fn, params, self.solver, residual=self.residual,
                engine=self.engine, batching=self.batching, verify_ranks=not self._ranks_agreed,
            )
        except BaseException:
            self._restore_solver(solver_state)
            self.batching.load_state_dict(batching)
            raise
        self._ranks_agreed = True
        self.last = result.info
        if self.engine == "func":  # a loss torch.func cannot transform will not become transformable
            self.engine = result.info.engine
        if result.info.skipped:
            self._restore_solver(solver_state)
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

    def accumulate(self, train_loss_fn: LossFn, val_loss_fn: LossFn, params, *, weight: float = 1.0) -> HypergradInfo:
        """Add ``weight`` × the hypergradient into each hparam's ``.grad``, in place as ``loss.backward()``
        does (a ``.grad`` that cannot be written in place, such as an expanded one, is replaced); no update.

        For meta-batches: ``zero_grad()``, ``accumulate(..., weight=1/B)`` once
        per task, then ``step()``: the mean of the tasks' hypergradients.  A
        non-finite hypergradient is not added.

        Raises:
            ValueError: ``weight`` is not a finite number.
        """
        if isinstance(weight, torch.Tensor) and weight.numel() == 1:
            if weight.requires_grad:
                raise ValueError(f"Invalid weight: {weight!r} (a weight that requires grad would not be "
                                 "differentiated through: pass weight.detach() or weight.item())")
            weight = weight.item()
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight):
            raise ValueError(f"Invalid weight: {weight!r} (expected a finite number)")
        weight = float(weight)
        grads, info = self.hypergradient(train_loss_fn, val_loss_fn, params)
        if not info.skipped:
            with torch.no_grad():
                for h, g in zip(self.hparams, grads):
                    if h.grad is None:
                        h.grad = g if weight == 1 else g.mul_(weight)
                        continue
                    try:
                        h.grad.add_(g, alpha=weight)
                    except RuntimeError:  # an expanded or otherwise unwritable .grad: replaced, as autograd does
                        h.grad = h.grad + weight * g
        return info

    def _update(self, apply: Callable[[], None], solver_state=None, last: HypergradInfo | None = None,
                batching: dict | None = None) -> None:
        """Run ``apply`` (which sets ``.grad`` and steps the base) as one transaction.

        If it raises (or is interrupted), the hparams' values and ``.grad``,
        the base optimizer's state, and ``solver_state``, :attr:`last` and the
        ``batching`` state from before the hypergradient are put back: one copy
        of the hparams and of their state's tensors is made per step
        (:class:`_BaseState`).
        """
        saved = _BaseState(self.base, self.hparams)
        try:
            apply()
        except BaseException:
            saved.restore()
            self._restore_solver(solver_state)
            if batching is not None:
                self.last = last
                self.batching.load_state_dict(batching)
            raise

    def step(self, train_loss_fn: LossFn | None = None, val_loss_fn: LossFn | None = None, params=None, *,
             closure: Callable | None = None) -> HypergradInfo | None:
        """Update the hyperparameters.

        With ``train_loss_fn``, ``val_loss_fn`` and ``params``: compute the
        hypergradient at θ's current values, store it in each hparam's
        ``.grad`` and take one step of the base optimizer; returns the
        :class:`HypergradInfo` (also in :attr:`last`).  A non-finite result
        changes nothing (warning, or ``FloatingPointError`` with
        ``on_nonfinite="raise"``).  With no arguments: one base-optimizer step
        on the gradients already in ``.grad`` (a warning if there are none);
        returns ``None``.  Either way an exception from the base optimizer's
        step leaves the hparams, their ``.grad``, the base's state and the
        solver's state as they were.

        Through ``torch.amp.GradScaler`` (``scaler.step(hopt, ...)``) the step
        is the same: hypergradients are never scaled, so nothing is unscaled.

        Raises:
            TypeError: a ``closure`` (torch.optim's re-evaluation callback has
                no meaning here), or only some of the three arguments.
        """
        args = (train_loss_fn, val_loss_fn, params)
        if closure is not None or (callable(train_loss_fn) and val_loss_fn is None and params is None):
            raise TypeError("HyperOptimizer.step() takes no closure: call step(train_loss_fn, val_loss_fn, params) "
                            "to compute and apply a hypergradient, or step() to apply the accumulated .grad")
        if all(a is None for a in args):
            if all(h.grad is None for h in self.hparams):
                warn("step() without arguments found no .grad on any hparam, so nothing was updated: call "
                     "accumulate(...) first, or step(train_loss_fn, val_loss_fn, params)", UserWarning)
                return None
            self._update(self.base.step)
            return None
        if any(a is None for a in args):
            raise TypeError("step() takes either no arguments or all of train_loss_fn, val_loss_fn and params")
        solver_state, last, batching = self._solver_state(), self.last, self.batching.state_dict()
        grads, info = self._hypergradient(train_loss_fn, val_loss_fn, params, solver_state)
        if not info.skipped:
            def apply() -> None:
                for h, g in zip(self.hparams, grads):
                    h.grad = g
                self.base.step()

            self._update(apply, solver_state, last, batching)
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
