"""The model-kind rule table (hyperopt_torch._kinds): one case per rule, for both paths.

Each case builds a model with the rule's gap and checks the action the table states, on the implicit and
the unrolled path.  The numerical checks of each fix are the tests each rule names (``Rule.tests``),
whose existence is checked here too; docs/api.md's "Model kinds" table is the table itself.
"""

import contextlib
import re
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.utils.checkpoint as checkpoint
from torch import nn
from torch.autograd.function import once_differentiable

from hyperopt_torch import Exact, InnerSGD, _compat, _kinds, implicit_hypergradient, unrolled_hypergradient
from hyperopt_torch._kinds import RULE, RULES, make_plan

DT = torch.float64
TESTS = Path(__file__).parent


def mlp(*middle):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), *middle, nn.Tanh(), nn.Linear(4, 2)).to(DT)


def losses(model, x=None):
    x = torch.randn(8, 3, dtype=DT, generator=torch.Generator().manual_seed(0)) if x is None else x
    phi = torch.tensor(-1.0, dtype=DT, requires_grad=True)
    train = lambda m: (m(x) ** 2).mean() + phi.exp() * sum((p ** 2).sum() for p in m.parameters() if p.requires_grad)
    val = lambda m: ((m(x) - 1) ** 2).mean()
    return [phi], train, val


def plans(model):
    params = [p for p in model.parameters() if p.requires_grad]
    modules = list(model.modules())
    return (make_plan(modules, params, "implicit", engine="func"), make_plan(modules, params, "unrolled"))


def both_refuse(model, match, x=None):
    hparams, train, val = losses(model, x)
    with pytest.raises(ValueError, match=match):
        implicit_hypergradient(hparams, train, val, model, Exact())
    with pytest.raises(ValueError, match=match):
        unrolled_hypergradient(hparams, train, val, model, InnerSGD(0.1), steps=1)


def case_compiled(rule):
    eager = mlp()
    hparams, train, val = losses(eager)
    seen = []
    compiled = torch.compile(eager)
    implicit_hypergradient(hparams, lambda m: seen.append(m) or train(m), val, compiled, Exact())
    unrolled_hypergradient(hparams, lambda m: seen.append(type(m)) or train(m), val, compiled, InnerSGD(0.1), steps=1)
    assert seen == [eager, nn.Sequential]


@contextlib.contextmanager
def one_rank():
    """A process group of this process alone (gloo) and a 1-D mesh over it, destroyed on exit: an FSDP model
    needs one.  The 2-rank FSDP tests are tests/test_fsdp.py."""
    from torch.distributed.device_mesh import init_device_mesh

    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=0, world_size=1)
        try:
            yield init_device_mesh("cpu", (1,))
        finally:
            dist.destroy_process_group()


def case_fsdp2(rule):
    from torch.distributed.fsdp import fully_shard

    with one_rank() as mesh:
        model, reference = mlp(), mlp()
        for layer in (model[0], model[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        hparams, train, val = losses(model)
        seen = []
        grads, _ = implicit_hypergradient(hparams, lambda m: seen.append(m) or train(m), val, model, Exact())
        expected, _ = implicit_hypergradient(hparams, train, val, reference, Exact())
        assert torch.allclose(grads[0], expected[0], rtol=1e-12, atol=0)
        assert seen and all(type(m) is nn.Sequential and m is not model for m in seen)  # the unsharded replica
        with pytest.raises(ValueError, match="sharded by fully_shard"):
            unrolled_hypergradient(hparams, train, val, model, InnerSGD(0.1), steps=1)


def case_fsdp1(rule):
    from torch.distributed.fsdp import FullyShardedDataParallel

    with one_rank(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # FSDP1 on one rank switches to NO_SHARD and says so
        both_refuse(FullyShardedDataParallel(mlp(), device_id=torch.device("cpu")), "FSDP1")


def case_fused_attention(rule):
    model = mlp()
    hparams, train, val = losses(model)
    flags = {}
    record = lambda name, loss: lambda m: flags.setdefault(name, _compat.sdp_flags()) and loss(m)
    before = _compat.sdp_flags()
    implicit_hypergradient(hparams, record("train", train), record("val", val), model, Exact())
    unrolled_hypergradient(hparams, record("unrolled", train), val, model, InnerSGD(0.1), steps=1)
    math_only = (False, False, False, True)
    assert flags == {"train": math_only, "val": before, "unrolled": math_only} and _compat.sdp_flags() == before


def case_weight_norm(rule):
    model = mlp()
    nn.utils.parametrizations.weight_norm(model[0])
    assert all(rule.name in plan.rules for plan in plans(model))
    calls = []
    kernel = _compat.weight_norm_kernel()

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            calls.append(func is kernel)
            return func(*args, **(kwargs or {}))

    with Spy(), _kinds.Formulas():  # the formula handles the call first: the spy below it never sees the kernel
        model(torch.ones(1, 3, dtype=DT))
    assert not any(calls)


def case_hardsigmoid(rule):
    model = mlp(nn.Hardsigmoid())
    assert all(rule.name in plan.rules for plan in plans(model))
    hparams, train, val = losses(model)
    implicit_hypergradient(hparams, train, val, model, Exact())  # PyTorch's own kernel raised at the first product


def case_torchscript(rule):
    model = torch.jit.script(mlp())
    implicit, unrolled = plans(model)
    assert implicit.engine == "autograd" and rule.name in unrolled.rules and unrolled.engine is None


def case_parameter_hook(rule):
    model = mlp()
    model[0].weight.register_hook(lambda g: 2 * g)
    implicit, unrolled = plans(model)
    assert implicit.engine == "autograd" and rule.name in unrolled.rules and unrolled.engine is None


def case_sparse_embedding(rule):
    model = nn.Sequential(nn.Embedding(7, 3, sparse=True), nn.Flatten(), nn.Linear(6, 1)).to(DT)
    both_refuse(model, r"model\.0 is an Embedding\(sparse=True\)", torch.randint(0, 7, (4, 2)))


def case_scale_grad_by_freq(rule):
    model = nn.Sequential(nn.Embedding(7, 3, scale_grad_by_freq=True), nn.Flatten(), nn.Linear(6, 1)).to(DT)
    both_refuse(model, r"model\.0 is an Embedding\(scale_grad_by_freq=True\)", torch.randint(0, 7, (4, 2)))


def case_complex_parameter(rule):
    model = mlp()
    model[0].register_parameter("phase", nn.Parameter(torch.ones(2, dtype=torch.complex128)))
    both_refuse(model, r"model\.0\.phase is a complex parameter")


def case_lazy_parameter(rule):
    model = nn.Sequential(nn.LazyLinear(2)).to(DT)
    both_refuse(model, r"model\.0 \(LazyLinear\) has uninitialized lazy parameters")


def case_small_model(rule, monkeypatch):
    monkeypatch.setattr(_kinds, "FUNC_MIN_PARAMS", 10_000)
    implicit, unrolled = plans(mlp())
    assert implicit.engine == "autograd" and unrolled.engine is None
    assert make_plan([], list(mlp().parameters()), "implicit", engine="autograd").rules == ()


def case_captured_parameter(rule):
    model = mlp()
    hparams, train, val = losses(model)
    captured = list(model.parameters())
    reads = lambda m: train(m) + (captured[0] ** 2).sum()
    with pytest.warns(UserWarning, match="captured reference"):
        assert implicit_hypergradient(hparams, reads, val, model, Exact(), engine="func").info.engine == "autograd"
    with pytest.raises(ValueError, match="reads model parameters through a reference it captured"):
        unrolled_hypergradient(hparams, reads, val, model, InnerSGD(0.1), steps=1)


class _Once(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.tanh(x)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (1 - torch.tanh(x) ** 2)


class _OnceModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.b(_Once.apply(self.a(x)))


def case_once_differentiable(rule):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # an old-style Function: torch.func falls back
        both_refuse(_OnceModel().to(DT), "_Once, a custom autograd.Function whose backward is @once_differentiable")


class _Checkpointed(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = mlp()

    def forward(self, x):
        return checkpoint.checkpoint(self.inner, x, use_reentrant=False)


def case_checkpoint(rule):
    model = _Checkpointed()
    hparams, train, val = losses(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch.func cannot transform it: autograd takes over
        assert implicit_hypergradient(hparams, train, val, model, Exact()).info.engine == "autograd"
    with pytest.raises(ValueError, match="activation checkpointing"):
        unrolled_hypergradient(hparams, train, val, model, InnerSGD(0.1), steps=1)


def case_func_transform_failure(rule):
    model = mlp()
    hparams, train, val = losses(model)
    counter = torch.zeros(())

    def counting(m):
        counter.add_(1)  # an in-place write to a captured tensor: torch.func refuses, a plain call does not
        return train(m)

    with pytest.warns(UserWarning, match="torch.func could not transform"):
        assert implicit_hypergradient(hparams, counting, val, model, Exact(), engine="func").info.engine == "autograd"
    unrolled_hypergradient(hparams, counting, val, model, InnerSGD(0.1), steps=1)  # no transform there


def case_batched_product_failure(rule):
    model = mlp(nn.GroupNorm(2, 4))
    hparams, train, val = losses(model)
    from hyperopt_torch.hvp import training_hvp

    hvp, _ = training_hvp(train, model, list(model.parameters()), "autograd")
    hvp.forced = None  # no Batching: "vmap", which GroupNorm's double backward cannot batch
    out = hvp(torch.eye(hvp.numel, dtype=DT)[:3])
    assert hvp.strategy == "loop" and torch.isfinite(out).all()


CASES = {name[len("case_"):]: f for name, f in globals().items() if name.startswith("case_")}


def test_every_rule_has_a_case_and_the_tests_it_names_exist():
    assert set(CASES) == set(RULE)
    defined = set(re.findall(r"^def (test_\w+)", "\n".join(p.read_text() for p in TESTS.glob("test_*.py")), re.M))
    missing = {t for rule in RULES for t in rule.tests} - defined
    assert not missing, f"rules name tests that do not exist: {sorted(missing)}"


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.name)
def test_each_rule_acts_as_the_table_says_on_both_paths(rule, monkeypatch):
    case = CASES[rule.name]
    if "monkeypatch" in case.__code__.co_varnames[:case.__code__.co_argcount]:
        case(rule, monkeypatch)
    else:
        case(rule)


def test_docs_model_kinds_table_is_the_rule_table():
    """docs/api.md shows the table as hyperopt_torch._kinds.rules_markdown() renders it
    (regenerate with `python -m hyperopt_torch._kinds`)."""
    api = (TESTS.parent / "docs" / "api.md").read_text()
    start, end = "<!-- rules:start -->", "<!-- rules:end -->"
    assert start in api and end in api
    assert api.split(start)[1].split(end)[0].strip() == _kinds.rules_markdown()


def test_static_refusals_name_the_module_before_anything_changes():
    model = nn.Sequential(nn.Linear(3, 3), nn.Embedding(7, 3, sparse=True)).to(DT)
    with pytest.raises(_kinds.Refused, match=r"model\.1 is an Embedding") as caught:
        make_plan(list(model.modules()), list(model.parameters()), "unrolled",
                  name_of=lambda m, key=None: "model.1" if isinstance(m, nn.Embedding) else "model")
    assert caught.value.rule == "sparse_embedding"


def test_formulas_compute_the_weight_norm_by_its_definition():
    v, g = torch.randn(4, 3, dtype=DT), torch.rand(4, 1, dtype=DT)
    with _kinds.Formulas():
        got = torch._weight_norm(v, g, 0)
    torch.testing.assert_close(got, v * g / v.norm(dim=1, keepdim=True), rtol=1e-14, atol=0)
    assert F.hardsigmoid is nn.functional.hardsigmoid
