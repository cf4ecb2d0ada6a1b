"""Model kinds PyTorch cannot differentiate twice as they are: one table of rules, one plan per call.

A hypergradient differentiates the training loss twice.  Some PyTorch kernels,
modules and transforms have no second derivative, or a wrong one, and some
model kinds cannot be seen through by ``torch.func``.  Each such gap is a
:class:`Rule` in :data:`RULES`: its name, how it is detected, what the
implicit and the unrolled hypergradients do about it (refuse, use the autograd
engine, compute a formula, run the math kernel, unwrap), why, the torch
releases it applies to, and the test that pins it.  :func:`make_plan` matches
the static rules against a model once per call and returns a :class:`Plan`,
which both paths consume: its refusals are raised, its engine is used, and
``with plan:`` / ``with plan.training():`` route around the kernels.  The rules
detected while the losses run (a captured parameter, a ``@once_differentiable``
op, activation checkpointing, a failed transform or batched product) are
found by the functions below, at the points named in the table.

docs/api.md's "Model kinds" table is :func:`rules_markdown` (a test checks it;
``python -m hyperopt_torch._kinds`` prints it).  When a torch release closes a
gap, a maintainer edits its row here.
"""

from __future__ import annotations

import sys
import inspect
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy
from torch.overrides import TorchFunctionMode

from . import _compat

FUNC_MIN_PARAMS = 10_000
"""Below this many parameters ``engine="auto"`` or ``"func"`` builds the gradient graph with autograd (rule
``small_model``)."""


@dataclass(frozen=True)
class Rule:
    """One gap of PyTorch and what the hypergradients do about it.

    ``implicit`` and ``unrolled`` are the actions of :func:`~hyperopt_torch.implicit_hypergradient`
    and :func:`~hyperopt_torch.unrolled_hypergradient`: ``"refuse"``,
    ``"autograd engine"``, ``"formula"``, ``"math kernel"``, ``"unwrap"``,
    ``"loop"`` or ``"none"`` (the path is not affected).  ``tests`` name the
    tests that pin the rule; ``detect`` is ``None`` for a rule found while the
    losses run (see ``how``).
    """

    name: str
    how: str
    implicit: str
    unrolled: str
    why: str
    torch: str
    tests: tuple[str, ...]
    detect: Callable[[nn.Module, Tensor | None], bool] | None = None


def _modules_with(*types):
    return lambda module, _p: isinstance(module, types)


def _weight_norm(module: nn.Module, _p) -> bool:
    classes = _compat.weight_norm_classes()
    if not classes:  # unknown on this torch: the formula is right either way, only slower
        return True
    return isinstance(module, classes) or any(h is None or isinstance(h, classes)
                                              for h in _compat.forward_pre_hooks(module))


def _embedding(flag: str):
    def detect(module: nn.Module, _p) -> bool:
        return isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.weight.requires_grad \
            and bool(getattr(module, flag))
    return detect


def fsdp2_module(module: nn.Module, _p=None) -> bool:
    """Rule ``fsdp2``: a module ``fully_shard`` was applied to (public ``torch.distributed.fsdp.FSDPModule``).

    Looked up in ``sys.modules``: such a module exists only once ``torch.distributed.fsdp`` was imported,
    which ``import hyperopt_torch`` does not do (it costs a second).
    """
    cls = getattr(sys.modules.get("torch.distributed.fsdp"), "FSDPModule", None)
    return cls is not None and isinstance(module, cls)


def _fsdp1_module(module: nn.Module, _p=None) -> bool:
    cls = getattr(sys.modules.get("torch.distributed.fsdp"), "FullyShardedDataParallel", None)
    return cls is not None and isinstance(module, cls)


RULES: tuple[Rule, ...] = (
    Rule("compiled", "a `torch.compile` wrapper (`OptimizedModule`) around the model, or inside DDP",
         "unwrap", "unwrap",
         "compiled graphs have no double backward (AOTAutograd refuses `create_graph`); the losses receive the "
         "eager module", ">= 2.0", ("test_a_compiled_model_gets_the_eager_hypergradient",)),
    Rule("fsdp2", "a module sharded by `fully_shard` (FSDP2: an `FSDPModule`, or DTensor parameters)", "unwrap",
         "refuse",
         "FSDP's hooks swap its own unsharded parameters in and free them after each pass: the shards are not in "
         "the graph, a second backward finds the unsharded ones freed, and functional_call on the module is "
         "silently wrong. The implicit path gathers θ once into an unsharded, hook-free replica, which the losses "
         "receive (docs/distributed.md, FSDP); a 2-D mesh (HSDP) or an unsharded model is refused",
         "2.6 - 2.13 (checked 2.13)", ("test_fsdp_hypergradient_equals_single_process_full_batch",
                                       "test_fsdp1_and_what_cannot_be_differentiated_are_refused_by_name"),
         fsdp2_module),
    Rule("fsdp1", "a `FullyShardedDataParallel` (FSDP1) module", "refuse", "refuse",
         "its flat parameters: a shape error at the first Hessian-vector product (`use_orig_params=False`), the "
         "process aborted (`use_orig_params=True`); shard with `fully_shard` (FSDP2) instead", "2.13 (checked)",
         ("test_fsdp1_and_what_cannot_be_differentiated_are_refused_by_name",), _fsdp1_module),
    Rule("fused_attention", "always (attention may be called as a function, out of sight of the module tree)",
         "math kernel", "math kernel",
         "flash, memory-efficient and cuDNN attention have no double backward; the math kernel is held from the "
         "training loss through the last backward through its graph (checkpointing reruns the forward there)",
         ">= 2.0", ("test_checkpointed_attention_gets_the_dense_hypergradient",)),
    Rule("weight_norm", "an `nn.utils.parametrizations.weight_norm` parametrization or an `nn.utils.weight_norm` "
         "forward pre-hook", "formula", "formula",
         "the fused `_weight_norm` kernel's double backward takes its saved norms as constants: second "
         "derivatives silently wrong (77 % off on a test model)", "2.1 - 2.13 (checked)",
         ("test_weight_norm_gets_the_second_derivatives_of_its_formula",
          "test_unrolled_weight_norm_gets_the_second_derivatives_of_its_formula"), _weight_norm),
    Rule("hardsigmoid", "an `nn.Hardsigmoid` module", "formula", "formula",
         "its backward has no derivative (RuntimeError at the first Hessian-vector product)", "2.1 - 2.13 (checked)",
         ("test_hardsigmoid_gets_the_second_derivatives_of_its_formula",), _modules_with(nn.Hardsigmoid)),
    Rule("torchscript", "a `torch.jit.script` or `torch.jit.trace` module", "autograd engine", "none",
         "torch.func runs a scripted graph outside its transforms: second derivatives wrong, with no error "
         "(the unrolled steps use plain autograd)", "2.1 - 2.13 (checked)",
         ("test_a_scripted_or_traced_model_gets_the_eager_hypergradient_and_is_put_back",),
         _modules_with(torch.jit.ScriptModule)),
    Rule("parameter_hook", "`p.register_hook` on a parameter", "autograd engine", "none",
         "functional_call swaps in tensors without the hook, so torch.func's products miss it (11 % off); the "
         "unrolled steps differentiate fresh tensors θ_t, which the hook is not on", "2.1 - 2.13 (checked)",
         ("test_a_hook_on_a_parameter_is_seen_by_both_engines",),
         lambda _m, p: p is not None and _compat.has_tensor_hooks(p)),
    Rule("sparse_embedding", "`nn.Embedding`/`nn.EmbeddingBag` with `sparse=True`", "refuse", "refuse",
         "sparse gradients cannot be differentiated a second time", ">= 2.0",
         ("test_sparse_embedding_is_refused_naming_the_cause_before_any_change",), _embedding("sparse")),
    Rule("scale_grad_by_freq", "`nn.Embedding`/`nn.EmbeddingBag` with `scale_grad_by_freq=True`", "refuse",
         "refuse", "the double backward leaves the frequency scaling out: second derivatives silently wrong "
         "(36 % off)", "2.1 - 2.13 (checked)", ("test_an_embedding_scaling_gradients_by_frequency_is_refused",),
         _embedding("scale_grad_by_freq")),
    Rule("complex_parameter", "a complex parameter with `requires_grad`", "refuse", "refuse",
         "the solvers work over real vectors", ">= 2.0", ("test_a_complex_parameter_is_refused_by_name",),
         lambda _m, p: p is not None and p.requires_grad and p.is_complex()),
    Rule("lazy_parameter", "an uninitialized lazy parameter (`nn.LazyLinear` before its first forward)", "refuse",
         "refuse", "its shape is unknown until a forward pass", ">= 2.0",
         ("test_an_uninitialized_lazy_module_is_refused_by_name",), lambda _m, p: p is not None and is_lazy(p)),
    Rule("small_model", f"fewer than {FUNC_MIN_PARAMS:,} parameters, with `engine='auto'` or `'func'`",
         "autograd engine", "none",
         "performance, not correctness: torch.func's fixed setup and per-product wrapping cost more than its "
         "batching saves (docs/benchmarks.md)", "any", ("test_func_engine_uses_autograd_below_the_size_threshold",)),
    Rule("captured_parameter", "the training loss's graph reaches a parameter through a reference the loss "
         "captured, not through its argument (searched in the graph)", "autograd engine", "refuse",
         "functional_call swaps the module's attributes, not captured references; the unrolled θ_t cannot "
         "reach such a reference at all", "any", ("test_loss_reading_captured_parameters_falls_back_to_autograd",
          "test_loss_reading_captured_parameters_is_rejected")),
    Rule("once_differentiable", "a custom `autograd.Function` whose backward is `@once_differentiable` "
         "(also under other decorators) in a graph the parameters reach (searched in the graph)", "refuse",
         "refuse", "autograd prunes the node meant to raise, so the paths through it are dropped silently "
         "(16 % off)", "2.1 - 2.13 (checked)", ("test_a_once_differentiable_op_is_refused_not_differentiated_wrongly",
          "test_unrolled_refuses_a_once_differentiable_op")),
    Rule("checkpoint", "activation checkpointing: a module's forward running again inside a backward pass",
         "autograd engine", "refuse",
         "torch.func cannot transform it (the transform-failure rule applies); the unrolled backward's rerun "
         "reads the module's own θ_0, not θ_t (35-92 % off)", ">= 2.0",
         ("test_checkpointed_attention_gets_the_dense_hypergradient", "test_unrolled_refuses_a_checkpointed_model")),
    Rule("func_transform_failure", "a `RuntimeError` under torch.func's transform that a plain call of the "
         "training loss does not repeat", "autograd engine", "none",
         "some losses cannot be transformed (an in-place write to a captured tensor, `.backward()`, an "
         "`autograd.Function` without `setup_context`); the fallback warns", "any",
         ("test_loss_torch_func_cannot_transform_falls_back_to_autograd",)),
    Rule("batched_product_failure", "a batched Hessian-vector product that raises a `RuntimeError` while the "
         "batching is measured or run", "loop", "none",
         "some double backwards have no batching rule (GroupNorm's under `is_grads_batched`: a shape error)",
         "2.13 (checked)", ("test_a_remembered_batched_strategy_that_fails_on_another_model_falls_back_to_a_loop",)),
)
RULE = {rule.name: rule for rule in RULES}


def rules_markdown() -> str:
    """The table of :data:`RULES` as docs/api.md shows it."""
    lines = ["| rule | detected by | implicit | unrolled | why | torch | pinned by |", "|---|---|---|---|---|---|---|"]
    for r in RULES:
        tests = ", ".join(f"`{t}`" for t in r.tests)
        lines.append(f"| `{r.name}` | {r.how} | {r.implicit} | {r.unrolled} | {r.why} | {r.torch} | {tests} |")
    return "\n".join(lines)


class Refused(ValueError):
    """A model kind the hypergradient cannot compute right: raised before anything changes."""

    def __init__(self, rule: str, message: str):
        super().__init__(message)
        self.rule = rule


def _message(rule: str, where: str, module, p: Tensor | None) -> str:
    kind = module.name if isinstance(module, _FakeModule) else type(module).__name__
    if rule == "sparse_embedding":
        return (f"{where} is an {kind}(sparse=True): its sparse gradients cannot be differentiated a second time, "
                "which Hessian-vector products need; construct it with sparse=False")
    if rule == "scale_grad_by_freq":
        return (f"{where} is an {kind}(scale_grad_by_freq=True): PyTorch's second derivative of its "
                "frequency-scaled gradient is wrong (the scaling is left out), so the Hessian-vector products would "
                "be; construct it with scale_grad_by_freq=False")
    if rule == "complex_parameter":
        return (f"{where} is a complex parameter ({p.dtype}): the Hessian-vector products and solvers work over real "
                "parameters; hold it as a real one (torch.view_as_real) and form the complex value in forward "
                "(torch.view_as_complex)")
    if rule == "fsdp1":
        return (f"{where} is a FullyShardedDataParallel (FSDP1) module, which hypergradients do not support: "
                "shard the model with FSDP2, torch.distributed.fsdp.fully_shard, which PyTorch recommends in "
                "FSDP1's place (docs/distributed.md, 'FSDP')")
    if rule == "fsdp2":
        return (f"{where} is sharded by fully_shard (FSDP2), which the unrolled hypergradient cannot differentiate: "
                "torch.func.functional_call on it is silently wrong (FSDP's pre-forward puts its own unsharded "
                "parameters back over the swapped ones). Use implicit_hypergradient / HyperOptimizer, which gather "
                "the parameters into an unsharded replica")
    what = f" ({kind})" if module is not None else ""
    return (f"{where}{what} has uninitialized lazy parameters: run the model once on a batch before the first "
            "step, so that their shapes are known")


class MathAttention:
    """``scaled_dot_product_attention`` on its math kernel alone while open (rule ``fused_attention``); a
    nested one finds the flags set and leaves them.  The flags are process-wide."""

    _MATH_ONLY = (False, False, False, True)

    def __init__(self):
        self.saved: tuple[bool, ...] | None = None

    def __enter__(self) -> "MathAttention":
        flags = _compat.sdp_flags()
        if flags != self._MATH_ONLY:
            self.saved = flags
            _compat.set_sdp_flags(self._MATH_ONLY)
        return self

    def __exit__(self, *exc) -> None:
        if self.saved is not None:
            _compat.set_sdp_flags(self.saved)
            self.saved = None


class Formulas(TorchFunctionMode):
    """Rules ``weight_norm`` and ``hardsigmoid``: the ops computed by their formulas.

    * weight norm as ``v · g / ‖v‖`` (norms over every dim but ``dim``);
    * ``F.hardsigmoid(x)`` as ``x/6 + 1/2`` on ``(−3, 3)``, else 0 or 1 (open at ±3 as PyTorch's gradient is).

    With ``watch_embeddings`` (θ given as tensors, so that no module could be
    inspected beforehand) an embedding call with ``sparse=True`` or
    ``scale_grad_by_freq=True`` raises :class:`Refused` (rules
    ``sparse_embedding``, ``scale_grad_by_freq``) when the loss runs.
    """

    def __init__(self, watch_embeddings: bool = False):
        super().__init__()
        self.watch_embeddings = watch_embeddings

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _compat.weight_norm_kernel():
            v, g, *rest = args
            dim = rest[0] if rest else kwargs.get("dim", 0)
            return v * (g / torch.norm_except_dim(v, 2, dim))
        if func is nn.functional.hardsigmoid:
            x = args[0]
            out = torch.where((x > -3) & (x < 3), x / 6 + 0.5, (x >= 3).to(x.dtype))
            return x.copy_(out) if (args[1] if len(args) > 1 else kwargs.get("inplace", False)) else out
        if self.watch_embeddings and func in (nn.functional.embedding, nn.functional.embedding_bag):
            bound = inspect.signature(func).bind(*args, **kwargs).arguments
            for flag, rule in (("sparse", "sparse_embedding"), ("scale_grad_by_freq", "scale_grad_by_freq")):
                if bound.get(flag):
                    raise Refused(rule, _message(rule, f"train_loss_fn's {func.__name__}",
                                                 _FakeModule(func.__name__), None))
        return func(*args, **kwargs)


class _FakeModule:
    """Stands in for a module in a refusal message about a functional call."""

    def __init__(self, name: str):
        self.name = name


class Plan:
    """What the static rules decided for one (model, parameters) pair; consumed by both hypergradient paths.

    ``rules`` are the matched rules' names; ``engine`` is ``"autograd"`` when a
    rule requires it, else ``None``.  ``with plan:`` holds attention on its math
    kernel; ``with plan.training():`` wraps one call of the training loss
    (the formulas, when a rule asks for them).
    """

    def __init__(self, rules: Sequence[str], path: str, modules_known: bool = True):
        self.rules = tuple(rules)
        self.path = path
        self.engine = "autograd" if any(getattr(RULE[r], path) == "autograd engine" for r in self.rules) else None
        # θ as plain tensors: the modules the losses call are out of sight, so the formulas always apply and
        # the embedding refusals are checked when the training loss runs
        self._formulas = not modules_known or any(getattr(RULE[r], path) == "formula" for r in self.rules)
        self._watch_embeddings = not modules_known
        self._attention = MathAttention()

    def __enter__(self) -> "Plan":
        self._attention.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._attention.__exit__(*exc)

    def training(self):
        """A context for one call of the training loss (whose graph is differentiated twice)."""
        return _TrainingCall(self)


class _TrainingCall:
    def __init__(self, plan: Plan):
        self.attention = MathAttention()
        self.mode = Formulas(plan._watch_embeddings) if plan._formulas else None

    def __enter__(self):
        self.attention.__enter__()
        if self.mode is not None:
            self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        if self.mode is not None:
            self.mode.__exit__(*exc)
        self.attention.__exit__(*exc)


def make_plan(modules: Sequence[nn.Module] | None, params: Sequence[Tensor], path: str, *, engine: str = "auto",
              name_of: Callable[[nn.Module, str | None], str] | None = None) -> Plan:
    """Match the static rules against ``modules`` and their trainable ``params``; raise the refusals.

    ``path`` is ``"implicit"`` or ``"unrolled"``; ``engine`` the one asked for
    (rule ``small_model`` applies to ``"auto"`` and ``"func"`` only).
    ``modules=None`` says they cannot be seen (θ given as tensors): then
    the formulas always apply and the embedding refusals are checked while
    the training loss runs (:class:`Formulas`).
    ``name_of(module, attribute)`` names a module or one of its parameters in messages.

    Raises:
        Refused: a refused rule, naming the module or parameter.
    """
    matched: list[str] = []

    def hit(rule: str, module: nn.Module | None = None, p: Tensor | None = None, key: str | None = None) -> None:
        if getattr(RULE[rule], path) == "refuse":
            where = name_of(module, key) if name_of is not None else "the model"
            raise Refused(rule, _message(rule, where, module, p))
        if rule not in matched:
            matched.append(rule)

    module_rules = [r for r in RULES if r.detect is not None and r.name not in
                    ("parameter_hook", "complex_parameter", "lazy_parameter")]
    owned = {id(p) for p in params}
    for module in modules or ():
        for rule in module_rules:
            if rule.detect(module, None):
                hit(rule.name, module)
        for kind, key, p in _compat.local_tensors(module):
            if kind == "parameter" and id(p) in owned:
                if is_lazy(p):
                    hit("lazy_parameter", module, p)
                elif p.is_complex():
                    hit("complex_parameter", module, p, key)
    for p in params:
        if not modules and is_lazy(p):
            hit("lazy_parameter", None, p)
        if not modules and p.is_complex():
            hit("complex_parameter", None, p)
        if RULE["parameter_hook"].detect(None, p):
            hit("parameter_hook")
    if engine in ("auto", "func") and sum(p.numel() for p in params) < FUNC_MIN_PARAMS:
        hit("small_model")
    return Plan(matched, path, modules_known=modules is not None)


def uncompiled(model):
    """Rule ``compiled``: the eager module inside ``torch.compile``'s wrappers (nested too), else ``model``."""
    inner = _compat.compiled_inner(model)
    while inner is not None:
        model, inner = inner, _compat.compiled_inner(inner)
    return model


# -- rules found while the losses run ------------------------------------------------------------------------
def reaches(tensor: Tensor, leaves: Sequence[Tensor], stop: Sequence[Tensor] = ()) -> bool:
    """Whether ``tensor``'s autograd graph has one of ``leaves`` as a leaf (rule ``captured_parameter``).

    The search does not go behind the tensors in ``stop`` (a graph already
    searched, e.g. the earlier steps of an unrolled loop).
    """
    if tensor.grad_fn is None:
        return False
    seen = {x.grad_fn for x in stop if x.grad_fn is not None}
    return tensor.grad_fn not in seen and _leads_to(tensor.grad_fn, {id(t) for t in leaves}, seen)


def _nodes(root, seen: set):
    """The autograd nodes behind ``root``, ``root`` first, each once; not those in ``seen``, which grows as it goes."""
    stack = [root]
    while stack:
        node = stack.pop()
        yield node
        for child, _ in node.next_functions:
            if child is not None and child not in seen:
                seen.add(child)
                stack.append(child)


def _leads_to(root, ids: set[int], seen: set) -> bool:
    for node in _nodes(root, seen):
        variable = getattr(node, "variable", None)  # AccumulateGrad nodes hold their leaf
        if variable is not None and id(variable) in ids:
            return True
    return False


def refuse_once_differentiable(loss: Tensor, params: Sequence[Tensor]) -> None:
    """Rule ``once_differentiable``: refuse a ``@once_differentiable`` custom op in ``loss``'s graph that
    ``params`` reach.  One walk of the graph (its cost: docs/benchmarks.md, "Fast paths and checks").

    Raises:
        Refused: naming the op's class.
    """
    if loss.grad_fn is None:
        return
    ids = {id(t) for t in params}
    for node in _nodes(loss.grad_fn, {loss.grad_fn}):
        cls = _compat.custom_function_class(node)
        if cls is not None and _compat.once_differentiable_backward(cls) and _leads_to(node, ids, set()):
            what = cls.__qualname__ if cls is not object else f"{type(node).__name__} (a custom autograd.Function)"
            raise Refused("once_differentiable",
                          f"the model runs {what}, a custom autograd.Function whose backward is @once_differentiable: "
                          "PyTorch cannot differentiate it a second time and, in the Hessian-vector products, "
                          "silently drops it instead of raising. Give it a differentiable backward (written with "
                          "torch operations, without @once_differentiable). Nothing was changed.")


class RerunWatch:
    """Rule ``checkpoint``: ``with RerunWatch() as watch: autograd.grad(...)``; ``watch.module`` is a module
    whose forward ran during the backward (activation checkpointing's recomputation), else ``None``.

    A global forward pre-hook (public ``register_module_forward_pre_hook``),
    installed for the duration of one backward pass.
    """

    def __init__(self):
        self.module: nn.Module | None = None
        self._handle = None

    def __enter__(self) -> "RerunWatch":
        def seen(module, _args):
            if self.module is None:
                self.module = module

        self._handle = nn.modules.module.register_module_forward_pre_hook(seen)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


if __name__ == "__main__":
    print(rules_markdown())
