import pytest
import torch
from torch import nn

from hyperopt_torch import _kinds
from hyperopt_torch import hvp as hvp_module
from hyperopt_torch.hvp import Batching, HessianVectorProduct, flatten, training_hvp, unflatten

DT = torch.float64


def _mlp_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).to(DT)
    X, y = torch.randn(20, 4, dtype=DT), torch.randint(0, 2, (20,))
    return model, X, y


def test_flatten_unflatten_round_trip_and_none_is_zero():
    like = [torch.randn(2, 3), torch.randn(4)]
    v = flatten([like[0], None], like)
    assert v.shape == (10,)
    assert torch.equal(v[6:], torch.zeros(4))
    back = unflatten(torch.stack([v, 2 * v]), like)
    assert back[0].shape == (2, 2, 3) and torch.equal(back[0][1], 2 * like[0])


def test_batched_hvp_equals_dense_hessian_rows():
    model, X, y = _mlp_problem()
    params = list(model.parameters())
    grads = torch.autograd.grad(nn.functional.cross_entropy(model(X), y), params, create_graph=True)
    hvp = HessianVectorProduct.from_autograd(grads, params)
    p = hvp.numel
    H = hvp(torch.eye(p, dtype=DT))  # one batched backward, p HVPs
    assert hvp.calls == p
    # Reference: dense Hessian of the same loss via torch.func.
    names = [n for n, _ in model.named_parameters()]
    flat = flatten([q.detach() for q in params], params)

    def f(v):
        out = torch.func.functional_call(model, dict(zip(names, unflatten(v, params))), (X,))
        return nn.functional.cross_entropy(out, y)

    ref = torch.func.hessian(f)(flat)
    torch.testing.assert_close(H, ref, rtol=1e-10, atol=1e-12)
    # Unbatched (p,) input gives the same row.
    v = torch.randn(p, dtype=DT)
    torch.testing.assert_close(hvp(v), ref @ v, rtol=1e-10, atol=1e-12)


def test_one_vector_products_through_the_flat_gradient_are_the_per_parameter_ones_to_the_bit():
    """CG and Neumann's products go through the gradient concatenated into one vector (the split of v
    happens in autograd's backward, not in Python); the numbers are those of the per-parameter pieces."""
    model, X, y = _mlp_problem()
    params = list(model.parameters())
    grads = torch.autograd.grad(nn.functional.cross_entropy(model(X), y), params, create_graph=True)
    flat = HessianVectorProduct.from_autograd(grads, params)
    per_piece = HessianVectorProduct.from_autograd(grads, params, strategy="loop")
    assert flat._flat_backward is not None
    for seed in range(3):
        v = torch.randn(flat.numel, dtype=DT, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            assert torch.equal(flat(v), per_piece(v[None])[0])
    # One parameter and H = I: the product is a view of v itself, which is copied (a solver may write into it)
    a = torch.randn(2, 3, dtype=DT, requires_grad=True)
    identity = HessianVectorProduct.from_autograd([a.view(2, 3)], [a])
    v = torch.randn(6, dtype=DT)
    out = identity(v)
    assert torch.equal(out, v) and out.untyped_storage().data_ptr() != v.untyped_storage().data_ptr()


def test_first_product_in_inference_mode_leaves_later_products_intact():
    """The flat gradient is built on first use: inside inference_mode it must still get its graph."""
    model, X, y = _mlp_problem()
    params = list(model.parameters())
    grads = torch.autograd.grad(nn.functional.cross_entropy(model(X), y), params, create_graph=True)
    hvp = HessianVectorProduct.from_autograd(grads, params)
    v = torch.randn(hvp.numel, dtype=DT)
    reference = HessianVectorProduct.from_autograd(grads, params, strategy="loop")(v[None])[0]
    with torch.inference_mode():
        assert torch.equal(hvp(v), reference)
    assert torch.equal(hvp(v), reference)


def test_torch_function_modes_still_see_the_products_autograd_call():
    from torch.overrides import TorchFunctionMode

    class Record(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.autograd.grad:
                self.calls.append(func)
            return func(*args, **(kwargs or {}))

    model, X, y = _mlp_problem()
    params = list(model.parameters())
    grads = torch.autograd.grad(nn.functional.cross_entropy(model(X), y), params, create_graph=True)
    hvp = HessianVectorProduct.from_autograd(grads, params)
    with Record() as mode:
        hvp(torch.randn(hvp.numel, dtype=DT))
    assert mode.calls == [torch.autograd.grad]


def test_a_vector_of_another_length_is_refused_also_for_one_scalar_parameter():
    """Autograd would sum a (5,) vector into a 0-dim parameter's product without complaint."""
    a = torch.tensor(1.5, dtype=DT, requires_grad=True)
    hvp = HessianVectorProduct.from_autograd(torch.autograd.grad(a**3, [a], create_graph=True), [a])
    torch.testing.assert_close(hvp(torch.ones(1, dtype=DT)), torch.tensor([9.0], dtype=DT))
    for V in (torch.ones(5, dtype=DT), torch.ones(2, 5, dtype=DT), torch.ones((), dtype=DT), torch.ones(2, 3, 1, dtype=DT)):
        with pytest.raises(ValueError, match=r"Invalid V: shape .* \(expected \(B, 1\) or \(1,\)\)"):
            hvp(V)


def test_unflatten_gives_zero_dim_pieces_for_scalar_parameters():
    like = [torch.randn(2, 3), torch.tensor(0.5)]
    v = torch.arange(7.0)
    pieces = unflatten(v, like)
    assert pieces[1].shape == () and pieces[1].item() == 6.0
    assert unflatten(torch.stack([v, v]), like)[1].shape == (2,)
    assert unflatten(torch.tensor([4.0]), [torch.tensor(1.0)])[0].shape == ()


def test_unused_parameter_has_zero_hessian_rows():
    a = torch.randn(3, dtype=DT, requires_grad=True)
    unused = torch.randn(2, dtype=DT, requires_grad=True)
    grads = torch.autograd.grad((a**3).sum(), [a, unused], create_graph=True, allow_unused=True)
    hvp = HessianVectorProduct.from_autograd(grads, [a, unused])
    out = hvp(torch.ones(2, 5, dtype=DT))
    torch.testing.assert_close(out[:, :3], (6 * a.detach()).expand(2, 3))
    assert torch.equal(out[:, 3:], torch.zeros(2, 2, dtype=DT))
    assert torch.equal(hvp(torch.ones(5, dtype=DT)), out[0])  # one vector: zeros for the unused one too


def test_linear_loss_gives_zero_hessian():
    a = torch.randn(3, dtype=DT, requires_grad=True)
    grads = torch.autograd.grad((2 * a).sum(), [a], create_graph=True)
    hvp = HessianVectorProduct.from_autograd(grads, [a])
    assert torch.equal(hvp(torch.ones(4, 3, dtype=DT)), torch.zeros(4, 3, dtype=DT))


@pytest.mark.parametrize("engine", ["func", "autograd"])
def test_products_carry_no_graph_so_solver_memory_stays_flat(engine):
    """An HVP output that required grad would keep its graph (reaching φ) alive in every iterate."""
    model, X, y = _mlp_problem()
    phi = torch.zeros(5, 4, dtype=DT, requires_grad=True)
    loss = lambda m: nn.functional.cross_entropy(m(X), y) + (phi.exp() * m[0].weight**2).sum()
    hvp, _ = training_hvp(loss, model, list(model.parameters()), engine)
    V = torch.randn(3, hvp.numel, dtype=DT)
    assert hvp.engine == engine
    assert not hvp(V).requires_grad and not hvp(V[0]).requires_grad
    assert all(m is not None for m in hvp.mixed(V[0], [phi]))


def test_func_engine_matches_autograd_engine():
    model, X, y = _mlp_problem()
    loss = lambda m: nn.functional.cross_entropy(m(X), y)
    V = torch.randn(4, sum(p.numel() for p in model.parameters()), dtype=DT)
    out = {e: training_hvp(loss, model, list(model.parameters()), e)[0](V) for e in ("func", "autograd")}
    torch.testing.assert_close(out["func"], out["autograd"], rtol=1e-12, atol=1e-14)


def _dense_hessian(model, X, y):
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]

    def f(v):
        out = torch.func.functional_call(model, dict(zip(names, unflatten(v, params))), (X,))
        return nn.functional.cross_entropy(out, y)

    return torch.func.hessian(f)(flatten([q.detach() for q in params], params))


@pytest.mark.parametrize("engine,strategy", [("func", "vmap"), ("func", "loop"), ("func", "vmap:3"),
                                             ("autograd", "vmap"), ("autograd", "loop")])
def test_every_batching_strategy_gives_the_dense_hessian_rows(engine, strategy):
    model, X, y = _mlp_problem()
    hvp, _ = training_hvp(lambda m: nn.functional.cross_entropy(m(X), y), model, list(model.parameters()), engine)
    hvp.forced = strategy
    V = torch.randn(5, hvp.numel, dtype=DT)
    torch.testing.assert_close(hvp(V), V @ _dense_hessian(model, X, y), rtol=1e-10, atol=1e-12)
    assert hvp.strategy == strategy and hvp.calls == 5


def test_strategy_is_the_fastest_measured_remembered_per_layout_and_ties_go_to_the_first(monkeypatch):
    """The choice is a pure function of the measured times: a fake clock charges each strategy a fixed cost."""
    cost = {"vmap": 3.0, "loop": 1.0, "vmap:3": 1.0}
    now = [0.0]
    monkeypatch.setattr(hvp_module.time, "perf_counter", lambda: now[0])
    real_block = HessianVectorProduct._block
    ran = []

    def charged(self, V, strategy, out=None):
        ran.append(strategy)
        now[0] += cost.get(strategy, 0.0)
        return real_block(self, V, strategy, out)

    monkeypatch.setattr(HessianVectorProduct, "_block", charged)
    batching = Batching()
    model, X, y = _mlp_problem()
    loss = lambda m: nn.functional.cross_entropy(m(X), y)
    hvp, _ = training_hvp(loss, model, list(model.parameters()), "func", batching=batching)
    V = torch.randn(5, hvp.numel, dtype=DT)
    out = hvp(V)
    assert ran == ["vmap", "loop", "vmap:3"] * 4 + ["loop"]  # warm-up run, three timed rounds, then the winner
    assert hvp.strategy == "loop"  # loop and vmap:3 tie at 1.0: the earlier candidate wins
    (entry,) = batching.strategies.values()
    assert entry == {"strategy": "loop", "seconds": {"vmap": 3.0, "loop": 1.0, "vmap:3": 1.0}}
    torch.testing.assert_close(out, V @ _dense_hessian(model, X, y), rtol=1e-10, atol=1e-12)
    # A new graph over the same layout reuses the choice without measuring; another block size measures again.
    ran.clear()
    hvp2, _ = training_hvp(loss, model, list(model.parameters()), "func", batching=batching)
    hvp2(V)
    assert ran == ["loop"] and hvp2.strategy == "loop"
    hvp2(V[:2])
    assert ran[1:] == ["vmap", "loop"] * 4 + ["loop"] and len(batching.strategies) == 2
    # Without a Batching nothing is timed: vmap, deterministically.
    ran.clear()
    hvp3, _ = training_hvp(loss, model, list(model.parameters()), "func")
    hvp3(V)
    assert ran == ["vmap"] and hvp3.strategy == "vmap"


def test_hypergradient_info_records_the_strategy():
    from hyperopt_torch import ConjugateGradient, Nystrom, implicit_hypergradient

    model, X, y = _mlp_problem()
    phi = torch.zeros(5, 4, dtype=DT, requires_grad=True)
    loss = lambda m: nn.functional.cross_entropy(m(X), y) + (phi.exp() * m[0].weight ** 2).sum()
    val = lambda m: nn.functional.cross_entropy(m(X[:7]), y[:7])
    cg = implicit_hypergradient([phi], loss, val, model, ConjugateGradient(3)).info
    assert cg.hvp_strategy == "single" and cg.chunk is None
    ny = implicit_hypergradient([phi], loss, val, model, Nystrom(rank=4), generator=torch.Generator().manual_seed(0))
    assert ny.info.hvp_strategy in ("vmap", "loop", "vmap:2")
    assert ny.info.chunk == 4


def test_func_engine_uses_autograd_below_the_size_threshold(monkeypatch):
    model, X, y = _mlp_problem()
    loss = lambda m: nn.functional.cross_entropy(m(X), y)
    params = list(model.parameters())
    p = sum(q.numel() for q in params)
    monkeypatch.setattr(_kinds, "FUNC_MIN_PARAMS", p + 1)
    small, _ = training_hvp(loss, model, params, "func")
    monkeypatch.setattr(_kinds, "FUNC_MIN_PARAMS", p)
    large, _ = training_hvp(loss, model, params, "func")
    assert small.engine == "autograd" and large.engine == "func"
    V = torch.randn(3, p, dtype=DT)
    torch.testing.assert_close(small(V), large(V), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("engine,strategy", [("func", "vmap"), ("func", "loop"), ("func", "vmap:3"),
                                             ("autograd", "vmap"), ("autograd", "loop")])
def test_inplace_writes_the_dense_hessian_rows_over_the_input(engine, strategy, dtype):
    model, X, y = _mlp_problem()
    H = _dense_hessian(model, X, y)
    model, X = model.to(dtype), X.to(dtype)
    hvp, _ = training_hvp(lambda m: nn.functional.cross_entropy(m(X), y), model, list(model.parameters()), engine)
    hvp.forced = strategy
    V0 = torch.randn(5, hvp.numel, dtype=dtype)
    V = V0.clone()
    out = hvp.inplace(V)
    assert out is V and hvp.calls == 5 and hvp.strategy == strategy
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(V.double(), V0.double() @ H, **tol)
    assert torch.equal(V, hvp(V0))  # the same products as a fresh output block, to the bit


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_inplace_copies_products_that_alias_the_input_before_overwriting_it(strategy):
    """Gradients (c, a) of ⟨a, c⟩ give H = [[0, I], [I, 0]]: autograd hands back views of the input pieces,
    swapped, so copying a's product over a's piece first would destroy c's product."""
    a = torch.randn(3, 2, dtype=DT, requires_grad=True)
    c = torch.randn(3, 2, dtype=DT, requires_grad=True)
    hvp = HessianVectorProduct.from_autograd([c.view(3, 2), a.view(3, 2)], [a, c], strategy=strategy)
    V0 = torch.randn(4, 12, dtype=DT)
    swapped = torch.cat([V0[:, 6:], V0[:, :6]], dim=1)
    assert torch.equal(hvp.inplace(V0.clone()), swapped) and torch.equal(hvp(V0), swapped)


def test_inplace_refuses_a_block_it_cannot_write_over():
    model, X, y = _mlp_problem()
    hvp, _ = training_hvp(lambda m: nn.functional.cross_entropy(m(X), y), model, list(model.parameters()))
    for V in (torch.randn(hvp.numel, dtype=DT), torch.randn(hvp.numel, 3, dtype=DT).T, torch.randn(2, 5, dtype=DT)):
        with pytest.raises(ValueError, match="Invalid V"):
            hvp.inplace(V)


def _wide_problem(dtype=torch.float32):
    """p = 4,090 parameters and a batch of 8: the HVPs' own temporaries are small against a block of rows."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 50), nn.Tanh(), nn.Linear(50, 40)).to(dtype)
    X, y = torch.randn(8, 40, dtype=dtype), torch.randn(8, 40, dtype=dtype)
    return training_hvp(lambda m: ((m(X) - y) ** 2).mean(), model, list(model.parameters()))[0]


def test_inplace_allocates_no_output_block_and_measuring_the_strategies_allocates_none(live_bytes):
    hvp = _wide_problem()
    hvp.batching = Batching()
    block = 16 * hvp.numel * 4
    V = torch.randn(16, hvp.numel)
    peak = {}
    for name, strategy, call in [("fresh loop", "loop", hvp), ("inplace loop", "loop", hvp.inplace),
                                 ("fresh vmap", "vmap", hvp), ("inplace vmap", "vmap", hvp.inplace),
                                 ("measuring", None, hvp.inplace)]:
        hvp.forced = strategy
        with live_bytes() as m:
            call(V.clone() if call is hvp.inplace else V)
        peak[name] = m.peak - (block if call is hvp.inplace else 0)  # the clone is the caller's block
    assert peak["fresh loop"] >= block and peak["inplace loop"] < 0.25 * block  # one row's products
    assert peak["fresh vmap"] - peak["inplace vmap"] >= block  # vmap's own products remain
    assert peak["measuring"] <= peak["inplace vmap"] + 0.1 * block  # the widest candidate, no block on top
