"""The inner parameters θ as the user holds them: a module, a dict of tensors or a list/tuple of tensors.

:class:`Inner` is what both hypergradient paths see of the user's ``params``
argument: the trainable tensors θ, the object the loss functions are called
with, a way to call a loss with other tensors swapped in for θ (torch.func's
products and the unrolled steps), and a snapshot that puts everything a loss
can change back as it was.
"""

from __future__ import annotations

import inspect
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from . import _compat

LossFn = Callable[[object], Tensor]
"""``params ↦`` scalar loss: called with the model (or the dict or list of tensors) passed as ``params``."""


def rebuild(container: list | tuple, items) -> list | tuple:
    """A list or tuple of ``container``'s type holding ``items``: ``type(c)(items)``, or ``type(c)(*items)`` for a
    namedtuple (whose constructor takes the fields one by one)."""
    kind = type(container)
    return kind(*items) if hasattr(kind, "_fields") else kind(items)


def modules_of(model: nn.Module) -> list[nn.Module]:
    """``list(model.modules())``: the same modules in the same order (each once), without building their names."""
    out: list[nn.Module] = []
    seen: set[int] = set()

    def visit(module: nn.Module) -> None:
        seen.add(id(module))
        out.append(module)
        for child in _compat.children(module):
            if id(child) not in seen:
                visit(child)

    visit(model)
    return out


class LossCall(nn.Module):
    """``LossCall(model)(fn) == fn(model)``, so that ``functional_call`` on this wrapper swaps the model's
    tensors (keys ``"model.<name>"``) for the duration of ``fn``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn: LossFn) -> Tensor:
        return fn(self.model)


class Inner:
    """θ and what the loss functions receive.

    ``params`` may be an ``nn.Module`` (θ: its parameters with
    ``requires_grad``, in ``parameters()`` order; the losses get the module),
    a ``Mapping[str, Tensor]`` (the form ``torch.func.functional_call``
    takes) or a list/tuple of tensors (θ: the entries with ``requires_grad``;
    the losses get the same object, or a copy of it with other tensors in θ's
    places).  An entry that does not require grad is passed through as it is.

    Raises:
        TypeError: ``params`` of another type, or a non-tensor entry.
        ValueError: no entry requires grad, or one that does is not a leaf
            (named, with how to make it one).
    """

    def __init__(self, params, *, argument: str | None = None):
        argument = argument or ("model" if isinstance(params, nn.Module) else "params")
        self.argument = argument
        self.module: nn.Module | None = None
        if isinstance(params, nn.Module):
            self.kind = "module"
            self.module = params
            self.modules = modules_of(params)
            self.params, self.names = self._module_params()
        elif isinstance(params, Mapping):
            self.kind = "mapping"
            self.modules = None  # out of sight: the losses may call any module (Plan, modules_known)
            entries = list(params.items())
            self._check_entries(entries, lambda k: f"{argument}[{k!r}]")
            self.params, self.names = self._unique([(f"{argument}[{k!r}]", t) for k, t in entries])
        elif isinstance(params, (list, tuple)):
            self.kind = "sequence"
            self.modules = None  # out of sight: the losses may call any module (Plan, modules_known)
            entries = list(enumerate(params))
            self._check_entries(entries, lambda i: f"{argument}[{i}]")
            self.params, self.names = self._unique([(f"{argument}[{i}]", t) for i, t in entries])
        else:
            hint = " (wrap it: [t])" if isinstance(params, torch.Tensor) else \
                " (pass list(...) of it)" if hasattr(params, "__next__") else ""
            raise TypeError(f"{argument} must be an nn.Module, a dict of tensors or a list/tuple of tensors, "
                            f"got {type(params).__name__}{hint}")
        self.value = params
        if not self.params:
            what = "parameters" if self.kind == "module" else "tensors"
            hint = ("unfreeze them (p.requires_grad_())" if self.kind == "module"
                    else "create θ with requires_grad=True, or call t.requires_grad_() on each")
            raise ValueError(f"{argument} has no {what} with requires_grad=True: there is no inner problem to "
                             f"differentiate; {hint}")
        for i, p in enumerate(self.params):
            if not p.is_leaf:
                how = ("p.detach().requires_grad_()" if self.kind != "module" else
                       "for p in model.parameters(): p.detach_().requires_grad_() (torchopt: torchopt.stop_gradient(model))")
                raise ValueError(
                    f"{self.name(i)} is not a leaf tensor: it is the result of an operation still attached to a graph "
                    f"(e.g. fast weights after an inner update). Pass it detached, as a new leaf: {how}")

    def _module_params(self) -> tuple[list[Tensor], list[str]]:
        seen: set[int] = set()
        params, names = [], []
        for module in self.modules:
            for kind, key, p in _compat.local_tensors(module):
                if kind == "parameter" and id(p) not in seen:
                    seen.add(id(p))
                    if p.requires_grad:
                        params.append(p)
                        names.append((id(module), key))
        return params, names

    @staticmethod
    def _check_entries(entries, name: Callable) -> None:
        for key, t in entries:
            if not isinstance(t, Tensor):
                raise TypeError(f"{name(key)} is a {type(t).__name__}, expected a torch.Tensor")

    @staticmethod
    def _unique(named) -> tuple[list[Tensor], list[str]]:
        seen: set[int] = set()
        params, names = [], []
        for name, t in named:
            if t.requires_grad and id(t) not in seen:
                seen.add(id(t))
                params.append(t)
                names.append(name)
        return params, names

    def name(self, i: int) -> str:
        """θ[i]'s name in messages: ``model.0.weight``, ``params['w']`` or ``params[2]``."""
        name = self.names[i]
        if self.kind != "module":
            return name
        module_id, key = name
        return f"{self.name_of_module(module_id)}.{key}"

    def name_of_module(self, module: nn.Module | int, key: str | None = None) -> str:
        """``model.<dotted name>`` of a submodule (``model`` for the root), with ``.key`` appended if given."""
        if self.module is None:
            return self.argument
        target = module if isinstance(module, int) else id(module)
        prefix = next((n for n, m in self.module.named_modules() if id(m) == target), "")
        path = f"{self.argument}.{prefix}" if prefix else self.argument
        return f"{path}.{key}" if key is not None else path

    def call(self, fn: LossFn) -> Tensor:
        """``fn`` called with the object the user passed."""
        return fn(self.value)

    def functional(self, fn: LossFn, theta: Sequence[Tensor], *, fresh_buffers: bool = False) -> Tensor:
        """``fn`` called with ``theta`` in θ's places (for a module through ``functional_call``; with
        ``fresh_buffers`` the module's buffers are passed as copies, so in-place updates such as BatchNorm's
        running statistics touch the copies)."""
        if self.kind == "module":
            state = dict(zip(self._state_names(), theta))
            if fresh_buffers:
                state.update({"model." + n: b.clone() for n, b in self.module.named_buffers()})
            return functional_call(LossCall(self.module), state, (fn,), strict=False)
        swap = {id(p): t for p, t in zip(self.params, theta)}
        if self.kind == "mapping":
            return fn({k: swap.get(id(v), v) for k, v in self.value.items()})
        return fn(rebuild(self.value, [swap.get(id(v), v) for v in self.value]))

    def _state_names(self) -> list[str]:
        cached = getattr(self, "_names", None)
        if cached is None:
            ids = {id(p): i for i, p in enumerate(self.params)}
            cached = [""] * len(self.params)
            for name, p in self.module.named_parameters():
                if id(p) in ids:
                    cached[ids[id(p)]] = "model." + name
            self._names = cached
        return cached

    def snapshot(self, extra: Sequence[Tensor] = ()):
        """A :class:`ModelSnapshot` (module) or :class:`TensorSnapshot` (dict, list, tuple) of θ and ``extra``."""
        if self.kind == "module":
            return ModelSnapshot(self.module, self.params, extra, self.modules)
        return TensorSnapshot(self.value, self.params, extra)


def check_loss_call(fn, value, name: str, error: TypeError, argument: str) -> None:
    """After ``fn(value)`` raised ``error``: if ``fn`` cannot take one positional argument at all, raise a
    ``TypeError`` saying how the loss is called; otherwise return (the caller re-raises ``error``)."""
    try:
        inspect.signature(fn).bind(value)
    except TypeError:
        pass
    except ValueError:  # no signature (a builtin): nothing to say
        return
    else:
        return
    if isinstance(value, nn.Module):
        what, like = "the module", "lambda m: loss(m(x), y)"
    else:
        what, like = f"the {type(value).__name__} of tensors", "lambda params: loss(params, hparams)"
    raise TypeError(
        f"{name} is called with one argument, {what} passed as {argument} (a loss like `{like}`); its signature "
        f"{inspect.signature(fn)} does not accept that. Close over the data and the hyperparameters instead of "
        "taking them as arguments.") from error


class _GradSnapshot:
    """The ``.grad`` part of a snapshot: set to ``None`` while it is open, handed back at :meth:`close`.

    A ``.backward()`` inside a loss then creates new gradients instead of adding
    into the saved ones, and :meth:`touched` tells which tensors it reached.
    Subclasses put back the rest in :meth:`restore`.
    """

    def __init__(self, tensors: Sequence[Tensor]):
        self.grads = [(t, t.grad) for t in tensors]
        for t, _ in self.grads:
            t.grad = None

    def touched(self) -> list[int]:
        """Indices into the tensors of the tensors that got a ``.grad`` since the snapshot was taken."""
        return [i for i, (t, _) in enumerate(self.grads) if t.grad is not None]

    def restore(self, values: bool = True) -> None:
        for t, _ in self.grads:
            t.grad = None

    def close(self, values: bool = True) -> None:
        """:meth:`restore`, then hand the saved ``.grad`` objects back."""
        self.restore(values)
        for t, g in self.grads:
            t.grad = g

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ModelSnapshot(_GradSnapshot):
    """Everything of a model that user loss functions can change, put back by :meth:`restore`.

    * the train/eval flag of every submodule;
    * every parameter and buffer, as module attribute and as value: a loss may
      write in place (``w.add_()``, ``clamp_``, ``nn.Embedding(max_norm=...)``,
      BatchNorm's running statistics), also through ``.data``, or re-assign,
      delete or shadow a buffer; the original tensor objects are put back and
      their values restored through ``.data``, which bumps no version counter,
      so a graph the user built before the step stays usable.  One copy of
      the parameters and buffers is held;
    * tensors held as plain attributes by modules with a forward pre-hook
      (the hook-based ``weight_norm``/``spectral_norm`` store the weight they
      compute as ``module.weight`` at every forward);
    * the ``.grad`` of ``params`` and ``extra`` (the hyperparameters), set to
      ``None`` while the snapshot is open so that a ``.backward()`` inside a
      loss creates new gradients, and :meth:`touched` tells which it reached.
      :meth:`close` puts the original ``.grad`` objects back.
    """

    def __init__(self, model: nn.Module, params: Sequence[Tensor], extra: Sequence[Tensor] = (),
                 modules: Sequence[nn.Module] | None = None):
        modules = modules_of(model) if modules is None else modules
        self.modes = [(m, m.training) for m in modules]
        self.tensors = [(m, kind, name, t, kind == "parameter" or name not in _compat.non_persistent_buffers(m))
                        for m in modules for kind, name, t in _compat.local_tensors(m)]
        self.attributes = [(m.__dict__, name, t) for m in modules if _compat.forward_pre_hooks(m)
                           for name, t in m.__dict__.items() if isinstance(t, Tensor)]
        with torch.no_grad():
            self.saved = [t.clone() for *_, t, _ in self.tensors]
        super().__init__([*params, *extra])

    def restore(self, values: bool = True) -> None:
        """Put back the modes and, with ``values``, the parameters' and buffers' objects and values.

        Gradients created since the snapshot are dropped; the saved ``.grad``
        objects come back at :meth:`close`.
        """
        for m, mode in self.modes:
            if m.training != mode:  # nn.Module.__setattr__ is slow; most steps change no mode
                m.training = mode
        super().restore(values)
        for attributes, name, t in self.attributes:
            attributes[name] = t
        if not values:
            return
        for m, kind, name, t, persistent in self.tensors:
            _compat.put_back(m, kind, name, t, persistent)
        _compat.copy_data_([t for *_, t, _ in self.tensors], self.saved)


class TensorSnapshot(_GradSnapshot):
    """:class:`ModelSnapshot` for θ held as a dict, list or tuple of tensors: the container's entries, every
    tensor's value, and the ``.grad`` of ``params`` and ``extra``."""

    def __init__(self, container, params: Sequence[Tensor], extra: Sequence[Tensor] = ()):
        self.container = container
        self.entries = list(container.items()) if isinstance(container, Mapping) else list(container)
        tensors = list({id(t): t for t in (container.values() if isinstance(container, Mapping) else container)
                        }.values())
        self.tensors = tensors
        with torch.no_grad():
            self.saved = [t.clone() for t in tensors]
        super().__init__([*params, *extra])

    def restore(self, values: bool = True) -> None:
        super().restore(values)
        if isinstance(self.container, dict):
            if not _same(list(self.container.items()), self.entries):
                self.container.clear()
                self.container.update(self.entries)
        elif isinstance(self.container, list) and not _same(self.container, self.entries):
            self.container[:] = self.entries
        if values:
            _compat.copy_data_(self.tensors, self.saved)


def _same(a: list, b: list) -> bool:
    """Whether two lists hold the same objects (dict items: the same keys and objects), by identity."""
    if len(a) != len(b):
        return False
    pairs = zip(a, b)
    return all(x[0] == y[0] and x[1] is y[1] if isinstance(x, tuple) else x is y for x, y in pairs)
