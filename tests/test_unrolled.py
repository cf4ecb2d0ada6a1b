"""Unrolled hypergradients against central finite differences of an independent inner loop (float64)."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from torch import nn

import hyperopt_torch
from hyperopt_torch.unrolled import InnerAdam, InnerSGD, sgd_step, unrolled_hypergradient

DT = torch.float64
STEPS = 6


def _data():
    g = torch.Generator().manual_seed(0)
    X, Xv = torch.randn(20, 3, generator=g, dtype=DT), torch.randn(15, 3, generator=g, dtype=DT)
    y = torch.sin(X.sum(1, keepdim=True))
    yv = torch.sin(Xv.sum(1, keepdim=True))
    return X, y, Xv, yv


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)


def _forward(theta, X):
    W1, b1, W2, b2 = theta
    return torch.tanh(X @ W1.T + b1) @ W2.T + b2


def _reference_val_loss(theta0, log_wd, lr, momentum, steps, frozen=None):
    """The inner loop written out by hand: ``steps`` SGD steps, then g(θ_T).

    With ``frozen=(K, (log_wd0, lr0, momentum0))`` the first ``steps − K`` steps use the
    frozen hyperparameters, which is what truncated back-propagation differentiates.
    """
    X, y, Xv, yv = _data()
    theta = [t.clone() for t in theta0]
    bufs = [torch.zeros_like(t) for t in theta]
    for t in range(steps):
        wd, eta, mu = log_wd, lr, momentum
        if frozen is not None and t < steps - frozen[0]:
            wd, eta, mu = frozen[1]
        theta = [x.detach().requires_grad_() for x in theta]
        f = 0.5 * ((_forward(theta, X) - y) ** 2).mean() + 0.5 * wd.exp() * (theta[0] ** 2).sum()
        grads = torch.autograd.grad(f, theta)
        bufs = [mu * b + g for b, g in zip(bufs, grads)]
        theta = [x.detach() - eta * b for x, b in zip(theta, bufs)]
    return 0.5 * ((_forward(theta, Xv) - yv) ** 2).mean()


def _finite_differences(fn, hparams, eps=1e-6):
    out = []
    for i, h in enumerate(hparams):
        grad = torch.zeros_like(h)
        for j in range(h.numel()):
            shifted = []
            for sign in (1, -1):
                hs = [x.detach().clone() for x in hparams]
                hs[i].view(-1)[j] += sign * eps
                shifted.append(fn(*hs))
            grad.view(-1)[j] = (shifted[0] - shifted[1]) / (2 * eps)
        out.append(grad)
    return out


def _setup():
    model = _model()
    X, y, Xv, yv = _data()
    log_wd = torch.tensor(-3.0, dtype=DT, requires_grad=True)
    lr = torch.tensor(0.3, dtype=DT, requires_grad=True)
    momentum = torch.tensor(0.5, dtype=DT, requires_grad=True)

    def train_loss(m):
        return 0.5 * ((m(X) - y) ** 2).mean() + 0.5 * log_wd.exp() * (m[0].weight ** 2).sum()

    def val_loss(m):
        return 0.5 * ((m(Xv) - yv) ** 2).mean()

    hparams = [log_wd, lr, momentum]
    return model, hparams, train_loss, val_loss, InnerSGD(lr=lr, momentum=momentum)


def test_full_unroll_matches_central_finite_differences_for_penalty_lr_and_momentum():
    model, hparams, train_loss, val_loss, opt = _setup()
    theta0 = [p.detach().clone() for p in model.parameters()]
    grads, info = unrolled_hypergradient(hparams, train_loss, val_loss, model, opt, steps=STEPS)
    fd = _finite_differences(lambda *h: _reference_val_loss(theta0, *h, STEPS), hparams)
    for got, want in zip(grads, fd):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    assert (info.steps, info.truncate, info.skipped) == (STEPS, STEPS, False)
    torch.testing.assert_close(info.val_loss, _reference_val_loss(theta0, *[h.detach() for h in hparams], STEPS).item())


def test_truncated_unroll_equals_finite_differences_of_the_last_k_steps_and_differs_from_full():
    model, hparams, train_loss, val_loss, opt = _setup()
    theta0 = [p.detach().clone() for p in model.parameters()]
    K = 2
    frozen = (K, tuple(h.detach().clone() for h in hparams))
    trunc, info = unrolled_hypergradient(hparams, train_loss, val_loss, model, opt, steps=STEPS, truncate=K)
    fd = _finite_differences(lambda *h: _reference_val_loss(theta0, *h, STEPS, frozen=frozen), hparams)
    for got, want in zip(trunc, fd):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    full, _ = unrolled_hypergradient(hparams, train_loss, val_loss, model, opt, steps=STEPS)
    assert info.truncate == K
    assert not torch.allclose(torch.stack(trunc), torch.stack(full), rtol=1e-3)


def test_truncate_equal_to_steps_is_the_full_unroll():
    model, hparams, train_loss, val_loss, opt = _setup()
    full, _ = unrolled_hypergradient(hparams, train_loss, val_loss, model, opt, steps=STEPS)
    same, _ = unrolled_hypergradient(hparams, train_loss, val_loss, model, opt, steps=STEPS, truncate=STEPS)
    for a, b in zip(full, same):
        assert torch.equal(a, b)


def test_sgd_step_matches_torch_optim_sgd_with_momentum_and_weight_decay():
    torch.manual_seed(1)
    p = torch.randn(5, dtype=DT, requires_grad=True)
    target = torch.randn(5, dtype=DT)
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=0.01)
    theta, bufs = [p.detach().clone()], None
    for _ in range(3):
        loss = ((p - target) ** 4).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        grad = 4 * (theta[0] - target) ** 3
        theta, bufs = sgd_step(theta, [grad], bufs, lr=0.1, momentum=0.9, weight_decay=0.01)
    torch.testing.assert_close(theta[0], p.detach(), rtol=1e-12, atol=1e-12)


def test_model_left_exactly_as_found_including_grads_buffers_and_modes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1)).to(DT)
    model.eval()
    X, y, Xv, yv = _data()
    phi = torch.tensor(0.1, dtype=DT, requires_grad=True)
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads_before = [p.grad for p in model.parameters()]

    def train_loss(m):
        m.train()  # a loss function may switch modes and update BatchNorm statistics
        return ((m(X) - y) ** 2).mean() + phi * (m[0].weight ** 2).sum()

    grads, _ = unrolled_hypergradient([phi], train_loss, lambda m: ((m(Xv) - yv) ** 2).mean(), model, InnerSGD(0.1), 3)
    assert grads[0].abs() > 0
    assert not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is g for p, g in zip(model.parameters(), grads_before))


def test_write_back_leaves_the_model_at_theta_T():
    model, hparams, train_loss, val_loss, opt = _setup()
    theta0 = [p.detach().clone() for p in model.parameters()]
    _, info = unrolled_hypergradient(hparams, train_loss, val_loss, model, opt, steps=STEPS, write_back=True)
    X, y, Xv, yv = _data()
    torch.testing.assert_close(0.5 * ((model(Xv) - yv) ** 2).mean().item(), info.val_loss)
    assert not all(torch.equal(p, t) for p, t in zip(model.parameters(), theta0))


def test_hparam_that_the_unroll_never_uses_gets_a_zero_hypergradient():
    model, hparams, train_loss, val_loss, opt = _setup()
    unused = torch.ones(3, dtype=DT, requires_grad=True)
    grads, _ = unrolled_hypergradient(hparams + [unused], train_loss, val_loss, model, opt, steps=2)
    assert torch.equal(grads[-1], torch.zeros(3, dtype=DT))


@pytest.mark.parametrize(
    "kwargs, message",
    [({"steps": 0}, "Invalid steps"), ({"steps": 3, "truncate": 4}, "Invalid truncate"), ({"steps": 3, "truncate": 0}, "Invalid truncate")],
)
def test_invalid_steps_or_truncate_raise_before_any_work(kwargs, message):
    model, hparams, train_loss, val_loss, opt = _setup()
    with pytest.raises(ValueError, match=message):
        unrolled_hypergradient(hparams, train_loss, val_loss, model, opt, **kwargs)


def test_inner_sgd_rejects_negative_float_settings():
    with pytest.raises(ValueError, match="Invalid lr"):
        InnerSGD(lr=-0.1)
    with pytest.raises(ValueError, match="Invalid momentum"):
        InnerSGD(lr=0.1, momentum=float("nan"))


def test_loss_reading_captured_parameters_is_rejected():
    """functional_call swaps module attributes, not a captured reference: θ_t would be ignored."""
    model = torch.nn.Linear(3, 1).double()
    weight = model.weight
    decay = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    X = torch.randn(8, 3, dtype=torch.float64)
    train = lambda m: (m(X) ** 2).mean() + (decay.exp() * weight[0] ** 2).sum()
    with pytest.raises(ValueError, match="captured"):
        unrolled_hypergradient([decay], train, lambda m: m(X).mean(), model, InnerSGD(lr=0.1), steps=2)
    assert model.weight is weight


def test_loss_reading_captured_parameters_on_a_later_step_only_is_rejected():
    """Every step's loss is searched: the same function may read the captured reference on some calls only."""
    model = torch.nn.Linear(3, 1).double()
    weight = model.weight
    decay = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    X = torch.randn(8, 3, dtype=torch.float64)
    calls = []

    def train(m):
        calls.append(None)
        w = weight if len(calls) == 3 else m.weight
        return (m(X) ** 2).mean() + (decay.exp() * w[0] ** 2).sum()

    with pytest.raises(ValueError, match="captured"):
        unrolled_hypergradient([decay], train, lambda m: m(X).mean(), model, InnerSGD(lr=0.1), steps=4)
    assert len(calls) == 3


def _package_lines_run(fn) -> int:
    """Python lines executed in hyperopt_torch while ``fn`` runs: a deterministic measure of work, no timing."""
    root = os.path.dirname(hyperopt_torch.__file__)
    count = 0

    def line(frame, event, arg):
        nonlocal count
        count += event == "line"
        return line

    previous = sys.gettrace()
    sys.settrace(lambda frame, event, arg: line if frame.f_code.co_filename.startswith(root) else None)
    try:
        fn()
    finally:
        sys.settrace(previous)
    return count


def test_work_per_inner_step_does_not_grow_with_the_number_of_steps():
    """Searching every loss's whole graph for captured parameters would revisit all earlier steps: O(T²)."""
    model, hparams, train_loss, val_loss, opt = _setup()
    lines = [
        _package_lines_run(lambda: unrolled_hypergradient(hparams, train_loss, val_loss, model, opt, steps=T))
        for T in (4, 8, 16)
    ]
    # Linear in T: the 8 steps from 8 to 16 cost twice the 4 from 4 to 8; quadratic would be four times.
    assert lines[2] - lines[1] <= 2.2 * (lines[1] - lines[0]), lines


def test_inner_adam_with_float_settings_takes_the_steps_of_torch_optim_adam():
    model = _model()
    X, y, _, _ = _data()
    settings = {"lr": 0.05, "betas": (0.8, 0.95), "eps": 1e-3, "weight_decay": 0.01}
    opt, inner = torch.optim.Adam(model.parameters(), **settings), InnerAdam(**settings)
    theta, state = [p.detach().clone() for p in model.parameters()], None
    for _ in range(10):
        opt.zero_grad()
        (0.5 * ((model(X) - y) ** 2).mean()).backward()
        opt.step()
        theta = [x.detach().requires_grad_() for x in theta]
        grads = torch.autograd.grad(0.5 * ((_forward(theta, X) - y) ** 2).mean(), theta)
        theta, state = inner.step([x.detach() for x in theta], grads, state)
    assert state.step == 10
    for got, want in zip(theta, model.parameters()):
        torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-12)


ADAM = (0.05, 0.8, 0.95, 1e-3, 0.01)  # lr, beta1, beta2, eps, weight_decay


def _adam_problem(zero_entry: bool):
    """The MLP problem; with ``zero_entry`` one input feature and its first-layer weights are 0, so those
    weights' gradient (weight decay included) is exactly 0 at every step while it carries a graph."""
    model = _model()
    X, y, Xv, yv = _data()
    if zero_entry:
        X = X.clone()
        X[:, 2] = 0
        with torch.no_grad():
            model[0].weight[:, 2] = 0
    return model, X, y, Xv, yv


def _adam_reference_val_loss(settings, steps, zero_entry, frozen=None):
    """g(θ_T) after ``steps`` of torch.optim.Adam with float ``settings`` (lr, beta1, beta2, eps, weight_decay).

    With ``frozen=(K, base)`` the first ``steps − K`` steps use ``base``: what truncation differentiates.
    """

    def group(lr, beta1, beta2, eps, weight_decay):
        return {"lr": lr, "betas": (beta1, beta2), "eps": eps, "weight_decay": weight_decay}

    model, X, y, Xv, yv = _adam_problem(zero_entry)
    opt = torch.optim.Adam(model.parameters(), **group(*(settings if frozen is None else frozen[1])))
    for t in range(steps):
        if frozen is not None and t == steps - frozen[0]:
            opt.param_groups[0].update(group(*settings))
        opt.zero_grad()
        (0.5 * ((model(X) - y) ** 2).mean()).backward()
        opt.step()
    with torch.no_grad():
        return (0.5 * ((model(Xv) - yv) ** 2).mean()).item()


def _adam_hypergradient(zero_entry, truncate=None):
    model, X, y, Xv, yv = _adam_problem(zero_entry)
    hparams = [torch.tensor(v, dtype=DT, requires_grad=True) for v in ADAM]
    lr, beta1, beta2, eps, weight_decay = hparams
    grads, info = unrolled_hypergradient(
        hparams,
        lambda m: 0.5 * ((m(X) - y) ** 2).mean(),
        lambda m: 0.5 * ((m(Xv) - yv) ** 2).mean(),
        model,
        InnerAdam(lr, (beta1, beta2), eps, weight_decay),
        steps=STEPS,
        truncate=truncate,
    )
    return hparams, grads, info


@pytest.mark.parametrize("zero_entry", [False, True], ids=["dense", "gradient-entry-always-zero"])
def test_inner_adam_hypergradient_matches_finite_differences_for_lr_betas_eps_and_weight_decay(zero_entry):
    hparams, grads, info = _adam_hypergradient(zero_entry)
    fd = _finite_differences(lambda *h: _adam_reference_val_loss([x.item() for x in h], STEPS, zero_entry), hparams)
    assert not info.skipped
    for got, want in zip(grads, fd):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(info.val_loss, _adam_reference_val_loss(ADAM, STEPS, zero_entry))


def test_inner_adam_truncated_hypergradient_matches_finite_differences_of_the_last_k_steps():
    K = 2
    hparams, trunc, info = _adam_hypergradient(False, truncate=K)
    fd = _finite_differences(
        lambda *h: _adam_reference_val_loss([x.item() for x in h], STEPS, False, frozen=(K, ADAM)), hparams
    )
    for got, want in zip(trunc, fd):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    _, full, _ = _adam_hypergradient(False)
    assert info.truncate == K
    assert not torch.allclose(torch.stack(trunc), torch.stack(full), rtol=1e-3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lr": -0.1}, "Invalid lr"),
        ({"betas": (0.9, 1.0)}, r"Invalid betas\[1\]"),
        ({"betas": (-0.1, 0.999)}, r"Invalid betas\[0\]"),
        ({"betas": (0.9,)}, "Invalid betas"),
        ({"eps": float("nan")}, "Invalid eps"),
        ({"weight_decay": float("inf")}, "Invalid weight_decay"),
    ],
)
def test_inner_adam_rejects_invalid_float_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        InnerAdam(**{"lr": 0.1, **kwargs})
