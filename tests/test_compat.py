"""The compatibility module: every private torch name's fast path equals its public fallback, and the
detections fail safe where the private name is missing.

The suite also runs with ``HYPEROPT_TORCH_FAST_PATHS=0`` (``.ci/run``), where every fast path is off;
the tests below additionally switch ``_compat.FAST`` off in-process for the pieces that read it per call.
"""

import warnings

import pytest
import torch
from torch import nn

from hyperopt_torch import Exact, _compat, _kinds, implicit_hypergradient

DT = torch.float64


def _graph():
    """A scalar loss's gradient with its graph (create_graph), and the leaves, one unused."""
    torch.manual_seed(1)
    w, c = torch.randn(3, 2, dtype=DT, requires_grad=True), torch.randn(2, dtype=DT, requires_grad=True)
    unused = torch.randn(4, dtype=DT, requires_grad=True)
    loss = torch.tanh(torch.randn(5, 3, dtype=DT) @ w + c).pow(2).sum()
    return loss, (w, c, unused)


@pytest.mark.parametrize("debug_log", [False, True])
def test_autograd_grad_is_torch_autograd_grad_bit_for_bit(debug_log, monkeypatch, request):
    """The engine fast paths give the very numbers, the Nones and the graphs torch.autograd.grad gives: the
    direct engine call on a CPU, and torch's entry point when autograd's debug logging wants its hooks."""
    import logging

    if _compat.FAST:
        assert _compat._ENGINE_RUN_BACKWARD is not None, "this torch lacks the engine entry point: products are slower"
    if debug_log:
        monkeypatch.setattr(_compat, "_ENGINE", None)  # must not be reached: the entry point adds the log hooks
        log = _compat._GRAPH_LOG
        request.addfinalizer(lambda level=log.level: log.setLevel(level))  # setLevel also clears logging's cache
        log.setLevel(logging.DEBUG)
    loss, leaves = _graph()
    ones = torch.ones_like(loss)
    ours = _compat.autograd_grad((loss,), leaves, (ones,), create_graph=True)
    ref = torch.autograd.grad(loss, leaves, ones, create_graph=True, allow_unused=True)
    assert ours[2] is None and ref[2] is None
    for a, b in zip(ours[:2], ref[:2]):
        assert torch.equal(a, b) and a.requires_grad and b.requires_grad
    v = tuple(torch.randn_like(g) for g in ours[:2])
    second = _compat.autograd_grad(ours[:2], leaves, v, retain_graph=True)
    second_ref = torch.autograd.grad(ref[:2], leaves, v, retain_graph=True, allow_unused=True)
    assert second[2] is None and all(torch.equal(a, b) for a, b in zip(second[:2], second_ref[:2]))
    assert not any(t.requires_grad for t in second[:2])
    # retain_graph defaults to create_graph (False): the graph is freed as torch.autograd.grad frees it
    _compat.autograd_grad(ours[:2], leaves, v)
    with pytest.raises(RuntimeError, match="second time"):
        _compat.autograd_grad(ours[:2], leaves, v)
    # no .grad is written, as with torch.autograd.grad
    assert all(t.grad is None for t in leaves)


def test_autograd_grad_leaves_tensor_subclasses_to_torch_autograd_grad(monkeypatch):
    """A subclass may define __torch_function__: only torch.autograd.grad dispatches it."""
    class Tagged(torch.Tensor):
        pass

    loss, (w, c, unused) = _graph()
    called = []
    real = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: called.append(1) or real(*a, **k))
    plain = _compat.autograd_grad((loss,), (w, c), (torch.ones_like(loss),), retain_graph=True)
    assert len(called) == (0 if _compat.FAST else 1)  # the fast path skips torch.autograd.grad's Python layer
    tagged = _compat.autograd_grad((loss,), (w, c), (torch.ones_like(loss).as_subclass(Tagged),))
    assert called[-1:] == [1] and all(torch.equal(a, b) for a, b in zip(plain, tagged))


def test_autograd_grad_refuses_a_grad_output_of_another_size():
    loss, (w, c, _) = _graph()
    g = _compat.autograd_grad((loss,), (w,), (torch.ones_like(loss),), create_graph=True)
    with pytest.raises(RuntimeError, match="shape"):
        _compat.autograd_grad(g, (w,), (torch.ones(7, dtype=DT),))




@pytest.fixture(params=[True, False], ids=["fast", "public"])
def fast(request, monkeypatch):
    monkeypatch.setattr(_compat, "FAST", request.param)
    return request.param


def test_max_abs_is_the_peak_and_keeps_nan_and_inf_either_way(fast):
    ts = [torch.tensor([1.0, -3.0]), torch.tensor([]), torch.tensor([float("nan"), 1.0]),
          torch.tensor([float("-inf")])]
    peaks = _compat.max_abs(ts)
    assert len(peaks) == 3 and peaks[0] == 3 and torch.isnan(peaks[1]) and peaks[2] == float("inf")


def test_copy_data_bumps_no_version_counter_either_way(fast):
    a = torch.zeros(3, requires_grad=True)
    version = a._version
    _compat.copy_data_([a], [torch.ones(3)])
    assert torch.equal(a.detach(), torch.ones(3)) and a._version == version


def test_module_registries_read_the_same_either_way(monkeypatch):
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    model[1].register_buffer("scratch", torch.zeros(1), persistent=False)
    seen = {}
    for fast in (True, False):
        monkeypatch.setattr(_compat, "FAST", fast)
        seen[fast] = ([m for m in _compat.children(model)], [(k, n, id(t)) for k, n, t in _compat.local_tensors(model[1])],
                      _compat.non_persistent_buffers(model[1]))
    assert seen[True] == seen[False] and seen[True][2] == {"scratch"}


@pytest.mark.parametrize("damage", ["reassign", "delete", "shadow", "move"])
def test_put_back_repairs_a_buffer_either_way(fast, damage):
    bn = nn.BatchNorm1d(3)
    original = bn.running_mean
    if damage == "reassign":
        bn.running_mean = torch.ones(3)
    elif damage == "delete":
        del bn.running_mean
    elif damage == "shadow":
        bn.__dict__["running_mean"] = torch.ones(3)
    else:
        del bn.running_mean
        bn.running_mean = nn.Parameter(torch.ones(3))
    _compat.put_back(bn, "buffer", "running_mean", original, persistent=True)
    assert bn.running_mean is original and "running_mean" in dict(bn.named_buffers())
    assert "running_mean" not in dict(bn.named_parameters()) and "running_mean" in bn.state_dict()


def _weight_normed_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    nn.utils.parametrizations.weight_norm(model[0])
    x = torch.randn(12, 5, dtype=DT)
    phi = torch.tensor(-1.0, dtype=DT, requires_grad=True)
    train = lambda m: ((m(x) - 1) ** 2).mean() + phi.exp() * (m[0].weight ** 2).sum()
    val = lambda m: (m(x[:6]) ** 2).mean()
    return model, phi, train, val


def test_detections_fail_safe_where_the_private_names_are_unknown(monkeypatch):
    """Outside the checked torch range: weight norm is assumed everywhere (the formula is right either way), every
    parameter is taken to carry a hook (the autograd engine), and a custom Function counts as once-differentiable."""
    model, phi, train, val = _weight_normed_problem()
    want = implicit_hypergradient([phi], train, val, model, Exact(), engine="func").grads[0]
    monkeypatch.setattr(_compat, "IN_RANGE", False)
    plan = _kinds.make_plan(list(model.modules()), list(model.parameters()), "implicit", engine="func")
    assert {"weight_norm", "parameter_hook"} <= set(plan.rules) and plan.engine == "autograd"
    got, info = implicit_hypergradient([phi], train, val, model, Exact(), engine="func")
    assert info.engine == "autograd" and (got[0] - want).abs() <= 1e-10 * want.abs()

    class Double(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return 2 * x

        @staticmethod
        def backward(ctx, g):
            return 2 * g

    leaf = torch.ones(2, requires_grad=True)
    with pytest.raises(ValueError, match="custom autograd.Function"):
        _kinds.refuse_once_differentiable(Double.apply(leaf).sum(), [leaf])
