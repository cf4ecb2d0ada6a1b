"""θ as a module, a dict of tensors or a list/tuple of tensors (hyperopt_torch._inner): the same hypergradient,
the same guarantees, and errors that say how to port."""

import copy

import pytest
import torch
from torch import nn

from hyperopt_torch import (ConjugateGradient, Exact, HyperOptimizer, InnerSGD, Neumann, Nystrom,
                            implicit_hypergradient, unrolled_hypergradient)

DT = torch.float64
SOLVERS = {"nystrom": lambda: Nystrom(rank=5, rho=0.1), "cg": lambda: ConjugateGradient(8, rho=1.0),
           "neumann": lambda: Neumann(6, 0.05), "exact": lambda: Exact(rho=0.1)}


def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(20, 3, generator=g, dtype=DT), torch.randn(20, 2, generator=g, dtype=DT)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)


def forward(theta, x):
    """The MLP written over a list of tensors (w1, b1, w2, b2): what hypertorch and higher users hold."""
    w1, b1, w2, b2 = theta
    return torch.tanh(x @ w1.T + b1) @ w2.T + b2


def problem(form):
    """The same bilevel problem with θ held as ``form``; returns (params, hparams, train, val)."""
    x, y = data()
    model = mlp()
    phi = torch.full((4,), -2.0, dtype=DT, requires_grad=True)
    if form == "module":
        params, values = model, lambda m: list(m.parameters())
        out = lambda m, t: m(t)
    elif form == "dict":
        params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
        names = list(params)
        values = lambda d: [d[n] for n in names]
        out = lambda d, t: forward(values(d), t)
    else:
        params = [p.detach().clone().requires_grad_() for p in model.parameters()]
        params = tuple(params) if form == "tuple" else params
        values, out = lambda ts: list(ts), forward

    def train(p):
        return ((out(p, x) - y) ** 2).mean() + sum(e.exp() * (w ** 2).sum() for e, w in zip(phi, values(p)))

    def val(p):
        return ((out(p, x[:8]) - 1) ** 2).mean()

    return params, [phi], train, val


def theta_of(params):
    tensors = params.parameters() if isinstance(params, nn.Module) else (
        params.values() if isinstance(params, dict) else params)
    return [t for t in tensors]


@pytest.mark.parametrize("engine", ["func", "autograd"])
@pytest.mark.parametrize("solver", list(SOLVERS))
@pytest.mark.parametrize("form", ["dict", "list", "tuple"])
def test_theta_as_plain_tensors_gives_the_modules_hypergradient(form, solver, engine):
    model, hparams, train, val = problem("module")
    want = implicit_hypergradient(hparams, train, val, model, SOLVERS[solver](), engine=engine,
                                  generator=torch.Generator().manual_seed(0))
    params, hparams, train, val = problem(form)
    got = implicit_hypergradient(hparams, train, val, params, SOLVERS[solver](), engine=engine,
                                 generator=torch.Generator().manual_seed(0))
    assert got.info.engine == engine
    torch.testing.assert_close(got.grads[0], want.grads[0], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("engine", ["func", "autograd"])
@pytest.mark.parametrize("form", ["dict", "list"])
def test_theta_as_plain_tensors_is_left_exactly_as_found(form, engine):
    params, hparams, train, val = problem(form)
    theta = theta_of(params)
    for t in theta:
        t.grad = torch.full_like(t, 3.0)
    grads = [t.grad for t in theta]
    values = [t.detach().clone() for t in theta]
    entries = list(params.items()) if isinstance(params, dict) else list(params)

    def meddling(p):
        loss = train(p)
        theta[0].data.add_(1.0)  # written in place, bumping no version counter
        if isinstance(p, dict):
            p["extra"] = torch.zeros(1)  # (the dict the user passed, under the autograd engine)
        return loss

    implicit_hypergradient(hparams, meddling, val, params, Exact(), engine=engine)
    assert all(torch.equal(t.detach(), v) and t.grad is g and torch.equal(g, torch.full_like(t, 3.0))
               for t, v, g in zip(theta, values, grads))
    now = list(params.items()) if isinstance(params, dict) else list(params)
    assert len(now) == len(entries) and all((a[1] if isinstance(a, tuple) else a) is (b[1] if isinstance(b, tuple)
                                                                                   else b)
                                            for a, b in zip(now, entries))


def test_the_losses_receive_the_object_that_was_passed():
    params, hparams, train, val = problem("dict")
    seen = []
    implicit_hypergradient(hparams, lambda p: seen.append(p) or train(p), lambda p: seen.append(p) or val(p), params,
                           Exact(), engine="autograd")
    assert seen == [params, params]


def test_entries_that_do_not_require_grad_pass_through_untouched():
    params, hparams, train, val = problem("dict")
    params["scale"] = torch.tensor(2.0, dtype=DT)  # a constant beside θ
    scaled = lambda p: p["scale"] * train(p)
    for engine in ("func", "autograd"):
        grads, _ = implicit_hypergradient(hparams, scaled, val, params, Exact(), engine=engine)
        assert torch.isfinite(grads[0]).all()


@pytest.mark.parametrize("form", ["dict", "list"])
def test_unrolled_takes_theta_as_plain_tensors_too(form):
    module, hparams, train, val = problem("module")
    want = unrolled_hypergradient(hparams, train, val, module, InnerSGD(0.2), steps=3, write_back=True).grads[0]
    params, hparams, train, val = problem(form)
    got = unrolled_hypergradient(hparams, train, val, params, InnerSGD(0.2), steps=3, write_back=True).grads[0]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(torch.cat([t.flatten() for t in theta_of(params)]),
                               torch.cat([t.detach().flatten() for t in module.parameters()]), rtol=1e-12, atol=1e-14)


def test_a_hyperoptimizer_steps_and_resumes_with_theta_as_a_dict():
    params, hparams, train, val = problem("dict")
    hopt = HyperOptimizer(hparams, base=torch.optim.Adam, ihvp="nystrom", rank=4, lr=0.1)
    hopt.step(train, val, params)
    saved = copy.deepcopy(hopt.state_dict()), hparams[0].detach().clone()
    hopt.step(train, val, params)
    after = hparams[0].detach().clone()
    other = HyperOptimizer(hparams, base=torch.optim.Adam, ihvp="nystrom", rank=4, lr=0.1)
    other.load_state_dict(saved[0])
    with torch.no_grad():
        hparams[0].copy_(saved[1])
    other.step(train, val, params)
    assert torch.equal(hparams[0].detach(), after)


@pytest.mark.parametrize("form", ["dict", "list"])
def test_a_non_leaf_theta_is_named_with_how_to_detach_it(form):
    x = torch.randn(4, 3, dtype=DT)
    w = torch.randn(2, 3, dtype=DT, requires_grad=True)
    fast = w - 0.1 * torch.autograd.grad((x @ w.T).pow(2).sum(), w, create_graph=True)[0]  # higher's fast weights
    params = {"w": fast} if form == "dict" else [fast]
    phi = torch.zeros((), dtype=DT, requires_grad=True)
    name = r"params\['w'\]" if form == "dict" else r"params\[0\]"
    with pytest.raises(ValueError, match=name + r" is not a leaf tensor.*p\.detach\(\)\.requires_grad_\(\)"):
        implicit_hypergradient([phi], lambda p: phi.exp() * (x @ p[next(iter(p))].T if form == "dict" else x @ p[0].T)
                               .pow(2).sum(), lambda p: p[0].sum(), params, Exact())


def test_theta_of_the_wrong_kind_or_without_gradients_says_what_to_pass():
    w = torch.randn(3, dtype=DT, requires_grad=True)
    phi = torch.zeros((), dtype=DT, requires_grad=True)
    loss = lambda p: phi.exp() * p[0].pow(2).sum()
    with pytest.raises(TypeError, match=r"got Tensor \(wrap it: \[t\]\)"):
        implicit_hypergradient([phi], loss, loss, w, Exact())
    with pytest.raises(TypeError, match=r"got generator \(pass list\(\.\.\.\) of it\)"):
        implicit_hypergradient([phi], loss, loss, (t for t in [w]), Exact())
    with pytest.raises(ValueError, match=r"no tensors with requires_grad=True.*call t\.requires_grad_\(\)"):
        implicit_hypergradient([phi], loss, loss, [w.detach()], Exact())
    with pytest.raises(ValueError, match=r"no parameters with requires_grad=True.*unfreeze them"):
        implicit_hypergradient([phi], loss, loss, nn.Linear(2, 1).requires_grad_(False), Exact())


def test_a_loss_with_the_wrong_signature_is_told_how_it_is_called():
    params, hparams, train, val = problem("dict")
    with pytest.raises(TypeError, match=r"train_loss_fn is called with one argument, the dict of tensors passed as "
                                        r"params.*\(p, h\)"):
        implicit_hypergradient(hparams, lambda p, h: train(p), val, params, Exact())
    model, hparams, train, val = problem("module")
    with pytest.raises(TypeError, match=r"val_loss_fn is called with one argument, the module"):
        implicit_hypergradient(hparams, train, lambda m, x, y: val(m), model, Exact())
    with pytest.raises(TypeError, match="my own"):  # a TypeError of the loss's own code is the loss's
        implicit_hypergradient(hparams, lambda m: (_ for _ in ()).throw(TypeError("my own")), val, model, Exact())


def test_an_hparam_inside_the_model_is_refused_saying_how_to_keep_a_meta_model_outside():
    model, _, train, val = problem("module")
    theta0 = list(model.parameters())
    with pytest.raises(ValueError, match=r"hparams\[0\] is also a parameter of the model \(model\.0\.weight\).*"
                                         r"copy\.deepcopy\(model\)"):
        implicit_hypergradient(theta0, train, val, model, Exact())


@pytest.mark.parametrize("alias", ["detach", "view", "slice"])
def test_an_hparam_sharing_a_parameters_memory_is_refused_saying_to_clone(alias):
    """p.detach().requires_grad_() passed the identity check, and the base step then moved the model's bias."""
    model, _, train, val = problem("module")
    bias = model[0].bias
    hparam = {"detach": lambda: bias.detach(), "view": lambda: bias.detach().view(2, 2),
              "slice": lambda: bias.detach()[1:3]}[alias]().requires_grad_()
    reads = lambda m: train(m) + (hparam.reshape(-1) * m[0].bias[:hparam.numel()]).sum()
    with pytest.raises(ValueError, match=r"hparams\[0\] shares its memory with model\.0\.bias.*"
                                         r"p\.detach\(\)\.clone\(\)\.requires_grad_\(\)"):
        implicit_hypergradient([hparam], reads, val, model, Exact())
    disjoint = torch.zeros(8, dtype=DT)
    first, second = disjoint[:4].requires_grad_(), disjoint[4:]
    flat = nn.Linear(1, 1).to(DT)
    with torch.no_grad():
        flat.weight = nn.Parameter(second[:1].view(1, 1))  # same storage, other bytes: allowed
    grads, _ = implicit_hypergradient([first], lambda m: (m.weight ** 2).sum() * first.exp().sum(),
                                      lambda m: m.weight.sum() + first.sum(), flat, Exact(rho=1.0))
    assert torch.isfinite(grads[0]).all()


def test_a_non_leaf_parameter_of_a_module_is_named_by_its_path():
    """torchopt's InnerNet after solve() holds parameters that are still attached to a graph."""
    model, hparams, train, val = problem("module")
    w = model[2].weight
    del model[2].weight
    model[2].weight = w * 1.0  # a non-leaf tensor where the parameter was
    model[2]._parameters["weight"] = model[2].__dict__.pop("weight")
    with pytest.raises(ValueError, match=r"model\.2\.weight is not a leaf tensor.*p\.detach_\(\)\.requires_grad_\(\)"):
        implicit_hypergradient(hparams, train, val, model, Exact())


def _normed_problem(form):
    """A weight-normed MLP with a Hardsigmoid, θ as ``form``; the losses call the module functionally for tensors."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Hardsigmoid(), nn.Linear(4, 2)).to(DT)
    with torch.no_grad():
        net[0].weight.mul_(4)
    nn.utils.parametrizations.weight_norm(net[2])
    x, y = data()
    names = [n for n, _ in net.named_parameters()]
    phi = torch.tensor(-2.0, dtype=DT, requires_grad=True)
    if form == "module":
        params, call = net, lambda p, t: p(t)
    elif form == "dict":
        params = {n: p.detach().clone().requires_grad_() for n, p in net.named_parameters()}
        call = lambda p, t: torch.func.functional_call(net, p, (t,))
    else:
        params = [p.detach().clone().requires_grad_() for p in net.parameters()]
        call = lambda p, t: torch.func.functional_call(net, dict(zip(names, p)), (t,))
    train = lambda p: ((call(p, x) - y) ** 2).mean() + phi.exp() * (call(p, x) ** 2).mean()
    val = lambda p: ((call(p, x[:8]) - 1) ** 2).mean()
    return params, [phi], train, val


@pytest.mark.parametrize("engine", ["func", "autograd"])
@pytest.mark.parametrize("form", ["dict", "list"])
def test_theta_as_tensors_gets_the_model_kind_formulas_its_modules_cannot_announce(form, engine):
    """With θ as tensors the modules the losses call are out of sight: weight norm was 7 % off and Hardsigmoid
    raised at the first product; the formulas now always apply to such losses."""
    module, hparams, train, val = _normed_problem("module")
    want = implicit_hypergradient(hparams, train, val, module, Exact(), engine=engine).grads[0]
    params, hparams, train, val = _normed_problem(form)
    got = implicit_hypergradient(hparams, train, val, params, Exact(), engine=engine).grads[0]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    got = unrolled_hypergradient(hparams, train, val, params, InnerSGD(0.1), steps=2).grads[0]
    module, hparams, train, val = _normed_problem("module")
    torch.testing.assert_close(got, unrolled_hypergradient(hparams, train, val, module, InnerSGD(0.1), steps=2).grads[0],
                               rtol=1e-10, atol=0)


@pytest.mark.parametrize("flag", ["scale_grad_by_freq", "sparse"])
def test_an_embedding_called_functionally_with_theta_as_tensors_is_refused_when_the_loss_runs(flag):
    table = nn.Embedding(7, 3, **{flag: True}).to(DT)
    params = {"weight": table.weight.detach().clone().requires_grad_()}
    tokens = torch.randint(0, 7, (5, 2), generator=torch.Generator().manual_seed(0))
    phi = torch.zeros((), dtype=DT, requires_grad=True)
    train = lambda p: (torch.func.functional_call(table, p, (tokens,)) ** 2).sum() * phi.exp()
    val = lambda p: torch.func.functional_call(table, p, (tokens,)).sum()
    before = params["weight"].detach().clone()
    with pytest.raises(ValueError, match=rf"train_loss_fn's embedding is an embedding\({flag}=True\)"):
        implicit_hypergradient([phi], train, val, params, Exact(), engine="autograd")
    assert torch.equal(params["weight"].detach(), before) and params["weight"].grad is None


def test_theta_as_a_namedtuple_is_rebuilt_field_by_field():
    from collections import namedtuple

    Theta = namedtuple("Theta", "w b")
    torch.manual_seed(0)
    x = torch.randn(6, 3, dtype=DT)
    theta = Theta(torch.randn(2, 3, dtype=DT, requires_grad=True), torch.zeros(2, dtype=DT, requires_grad=True))
    phi = torch.tensor(-1.0, dtype=DT, requires_grad=True)
    train = lambda p: ((x @ p.w.T + p.b) ** 2).mean() + phi.exp() * (p.w ** 2).sum()
    val = lambda p: (x @ p.w.T + p.b - 1).pow(2).mean()
    grads = {e: implicit_hypergradient([phi], train, val, theta, Exact(), engine=e).grads[0] for e in ("func", "autograd")}
    torch.testing.assert_close(grads["func"], grads["autograd"], rtol=1e-12, atol=0)
    assert torch.isfinite(unrolled_hypergradient([phi], train, val, theta, InnerSGD(0.1), steps=2).grads[0])


def test_the_quickstarts_functional_form_runs_as_written_and_equals_the_module_form(capsys):
    from pathlib import Path

    text = (Path(__file__).parent.parent / "docs" / "quickstart.md").read_text()
    block = text.split("## θ as plain tensors")[1].split("```python")[1].split("```")[0]
    exec(compile(block, "docs/quickstart.md", "exec"), {})
    a, b = map(float, capsys.readouterr().out.split())
    assert a == b and f"{a:.4f}".startswith("-0.2544")
