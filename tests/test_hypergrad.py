"""implicit_hypergradient against exact hypergradients, and its guarantees about the model."""

import warnings

import pytest
import torch
from torch import nn

from hyperopt_torch import ConjugateGradient, Exact, Identity, Neumann, Nystrom, implicit_hypergradient
from hyperopt_torch._inner import modules_of

DT = torch.float64


def rel(x, y):
    return ((x - y).norm() / y.norm()).item()


def gen():
    return torch.Generator().manual_seed(0)


@pytest.mark.parametrize("problem", ["ridge", "logistic"])
@pytest.mark.parametrize(
    "solver, tol",
    [
        (Exact(), 1e-10),
        (Nystrom(rank=12, rho=1e-10), 1e-6),
        (Nystrom(rank=12, rho=1e-10, chunk=1), 1e-6),
        (Nystrom(rank=12, rho=1e-10, chunk=5, sketch="gaussian"), 1e-6),
        (ConjugateGradient(iters=12), 1e-8),
        (Neumann(iters=3000, alpha=0.3), 1e-6),
    ],
)
def test_hypergradient_matches_exact(problem, solver, tol, request):
    P = request.getfixturevalue(problem)
    (g,), info = implicit_hypergradient([P.phi], P.train_loss, P.val_loss, P.model, solver, generator=gen())
    assert not info.skipped
    assert rel(g, P.exact) < tol


def test_cheap_approximations_are_measurably_off(ridge):
    """The exactness checks above can fail: truncated solvers are not exact here."""
    for solver in (Identity(), ConjugateGradient(iters=2), Nystrom(rank=3, rho=0.01)):
        (g,), _ = implicit_hypergradient([ridge.phi], ridge.train_loss, ridge.val_loss, ridge.model, solver, generator=gen())
        assert rel(g, ridge.exact) > 1e-2, solver


def test_direct_term_is_included(ridge):
    """g(θ, φ) = val + ½‖φ‖²: dg/dφ gains exactly φ."""
    phi = ridge.phi
    val = lambda m: ridge.val_loss(m) + 0.5 * (phi**2).sum()
    (g,), _ = implicit_hypergradient([phi], ridge.train_loss, val, ridge.model, Exact())
    assert rel(g, ridge.exact + phi.detach()) < 1e-10


def test_several_hparams_and_their_shapes(ridge):
    """Split φ into two tensors of different shapes: same numbers, shapes preserved."""
    d = ridge.phi.numel()
    a = ridge.phi.detach()[:5].clone().requires_grad_()
    b = ridge.phi.detach()[5:].clone().reshape(1, d - 5).requires_grad_()
    full = lambda: torch.cat([a, b.reshape(-1)])

    def train(m):
        return ridge.train_loss(m) - 0.5 * (ridge.phi.exp() * m.weight[0] ** 2).sum() + 0.5 * (full().exp() * m.weight[0] ** 2).sum()

    (ga, gb), _ = implicit_hypergradient([a, b], train, ridge.val_loss, ridge.model, Exact())
    assert ga.shape == a.shape and gb.shape == b.shape
    assert rel(torch.cat([ga, gb.reshape(-1)]), ridge.exact) < 1e-10


def test_result_keeps_model_dtype_and_counts_hvps(ridge):
    grads, info = implicit_hypergradient([ridge.phi], ridge.train_loss, ridge.val_loss, ridge.model,
                                         ConjugateGradient(iters=4), residual=True)
    assert grads[0].dtype == DT
    assert info.hvps == 5  # 4 CG iterations + 1 for the residual
    assert info.residual is not None and info.residual > 0
    assert info.seconds > 0 and info.train_loss > 0 and info.val_loss > 0


def test_solver_name_uses_default_settings(ridge):
    _, info = implicit_hypergradient([ridge.phi], ridge.train_loss, ridge.val_loss, ridge.model, "nystrom", generator=gen())
    assert info.solver.startswith("Nystrom(rank=10")


@pytest.mark.parametrize("solver", [Nystrom(4, 0.1), Nystrom(4, 0.1, chunk=1), ConjugateGradient(8), Exact()],
                         ids=["nystrom", "nystrom-k1", "cg", "exact"])
def test_float32_model_gives_float32_hypergradient_close_to_float64(ridge, solver):
    results = {}
    for dtype in (torch.float32, torch.float64):
        model = ridge.model.to(dtype)
        phi = ridge.phi.detach().to(dtype).requires_grad_()
        X = torch.randn(30, phi.numel(), generator=gen(), dtype=torch.float64).to(dtype)
        train = lambda m: (m(X) ** 2).mean() + (phi.exp() * m.weight[0] ** 2).sum()
        (g,), info = implicit_hypergradient([phi], train, lambda m: m(X).mean(), model, solver, generator=gen())
        assert g.dtype == dtype and not info.skipped
        results[dtype] = g
    assert rel(results[torch.float32].double(), results[torch.float64]) < 1e-5


# --- networks -----------------------------------------------------------------------------------

def _net_with_bn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 2)).to(DT)


def test_dead_relu_network_gives_finite_hypergradient():
    """All-zero Hessian columns (dead ReLU units) make H[K,K] singular (paper, Section 5)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1)).to(DT)
    with torch.no_grad():
        model[0].bias[:12] = -100.0  # 12 of 16 hidden units are dead on every input
    X, y = torch.randn(32, 4, dtype=DT), torch.randn(32, 1, dtype=DT)
    decay = torch.full((16,), 0.0, dtype=DT, requires_grad=True)
    train = lambda m: ((m(X) - y) ** 2).mean() + (decay.exp() * m[2].weight[0] ** 2).sum() * 1e-3
    val = lambda m: ((m(X[:8]) - y[:8]) ** 2).mean()

    def first_layer_loss(w):
        hidden = torch.relu(X @ w.reshape(16, 4).T + model[0].bias.detach())
        return ((hidden @ model[2].weight.detach().T + model[2].bias.detach() - y) ** 2).mean()

    H = torch.autograd.functional.hessian(first_layer_loss, model[0].weight.detach().reshape(-1))
    assert (H.abs().sum(0) == 0).sum() == 48  # the dead units' weights have all-zero Hessian columns
    for sketch in ("columns", "gaussian"):
        (g,), info = implicit_hypergradient([decay], train, val, model, Nystrom(40, 0.01, sketch=sketch), generator=gen())
        assert torch.isfinite(g).all() and not info.skipped


def test_model_is_left_exactly_as_found():
    model = _net_with_bn()
    model.train()
    X = torch.randn(8, 1, 6, 6, dtype=DT, requires_grad=True)
    y = torch.randint(0, 2, (8,))
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)

    def train(m):
        m.train()
        return nn.functional.cross_entropy(m(X), y)

    def val(m):
        m.eval()  # the user's function flips modes: we flip them back
        return nn.functional.cross_entropy(m(X.detach()), y)

    model[1].eval()  # a mixed state to restore
    params = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    modes = [m.training for m in model.modules()]
    implicit_hypergradient([X], train, val, model, Nystrom(5, 0.1), generator=gen())
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    assert all(g is p.grad for g, p in zip(grads, model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
    assert [m.training for m in model.modules()] == modes
    assert X.grad is None


def test_model_is_restored_when_an_error_is_raised():
    model = _net_with_bn()
    X = torch.randn(8, 1, 6, 6, dtype=DT, requires_grad=True)
    y = torch.randint(0, 2, (8,))
    buffers = [b.clone() for b in model.buffers()]

    def bad_val(m):
        m.eval()
        return m(X).sum(1)  # not a scalar

    with pytest.raises(ValueError, match="val_loss_fn must return a scalar"):
        implicit_hypergradient([X], lambda m: nn.functional.cross_entropy(m(X), y), bad_val, model, Identity())
    assert model.training and all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))


def test_non_finite_result_is_flagged(ridge):
    phi = ridge.phi
    train = lambda m: ridge.train_loss(m) * torch.tensor(float("nan"), dtype=DT) ** (phi.sum() * 0 + 1)
    (g,), info = implicit_hypergradient([phi], train, ridge.val_loss, ridge.model, Identity())
    assert info.skipped and not torch.isfinite(g).all()


@pytest.mark.parametrize("entry, skipped", [(float("inf"), True), (float("-inf"), True), (float("nan"), True),
                                            (3e38, False)])
def test_one_non_finite_entry_of_one_of_several_hparams_skips_and_huge_finite_ones_do_not(entry, skipped):
    """float32, four hparams (one empty): the check is a max |g| per tensor, which a sum of huge entries would overflow."""
    model = nn.Linear(3, 1)
    hparams = [torch.zeros(3, requires_grad=True), torch.zeros(1, requires_grad=True),
               torch.zeros(0, requires_grad=True), torch.zeros(2, requires_grad=True)]
    scale = torch.tensor([1.0, entry])

    def train(m):
        return ((m.weight - hparams[0]) ** 2).sum() + ((m.bias - hparams[1]) ** 2).sum() + hparams[2].sum() * m.bias.sum()

    def val(m):  # hparams[3] enters g alone, its hypergradient ∂g/∂φ carries `entry` (twice for 3e38: finite)
        return (m.weight ** 2).sum() + (scale * hparams[3]).sum()

    grads, info = implicit_hypergradient(hparams, train, val, model, Identity())
    assert info.skipped is skipped and grads[2].shape == (0,)
    torch.testing.assert_close(grads[3], scale, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("solver", [Identity(), ConjugateGradient(3), Neumann(3), Nystrom(rank=2)], ids=repr)
def test_hypergradients_are_dense_fresh_tensors_and_a_cpu_step_warns_nothing(ridge, solver):
    """φ entering g as a sum gets an expanded (stride-0) gradient from autograd: the result must still take
    in-place writes (clip_grad_norm_); and no warning (a loss read as a float with its graph) on any step."""
    psi = torch.zeros(4, dtype=DT, requires_grad=True)
    val = lambda m: ridge.val_loss(m) + psi.sum()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grads, info = implicit_hypergradient([ridge.phi, psi], ridge.train_loss, val, ridge.model, solver)
    for g in grads:
        assert g.is_contiguous() and 0 not in g.stride()
    grads[1].mul_(0.5)  # an in-place write into the returned hypergradient
    assert torch.equal(grads[1], torch.full((4,), 0.5, dtype=DT))
    holders = [torch.zeros_like(g).requires_grad_() for g in grads]
    for holder, g in zip(holders, grads):
        holder.grad = g  # as HyperOptimizer hands them over
    total = torch.nn.utils.clip_grad_norm_(holders, 1e-3)  # scales every .grad in place
    assert total > 1e-3 and torch.cat([g.reshape(-1) for g in grads]).norm() <= 1e-3 * (1 + 1e-6)


def test_hvp_products_are_dense_and_writable_even_when_autograd_expands_them():
    """H = 11ᵀ (f = ½(Σw)²): autograd's product is an expanded tensor; the matvec returns a dense copy."""
    from hyperopt_torch.hvp import training_hvp
    model = nn.Linear(5, 1, bias=False).to(DT)
    params = list(model.parameters())
    hvp, _ = training_hvp(lambda m: 0.5 * m.weight.sum() ** 2, model, params, engine="autograd")
    v = torch.arange(5, dtype=DT)
    out = hvp(v)
    assert out.is_contiguous() and out.stride() == (1,)
    out.add_(1.0)
    torch.testing.assert_close(out, torch.full((5,), 11.0, dtype=DT))
    assert torch.equal(v, torch.arange(5, dtype=DT))


def test_modules_of_walks_the_tree_like_modules():
    shared = nn.Linear(2, 2)
    model = nn.Sequential(shared, nn.ReLU(), nn.Sequential(shared, nn.Identity()), nn.ModuleList([nn.Tanh()]))
    model.add_module("empty", None)
    assert modules_of(model) == list(model.modules())


# --- bad input ------------------------------------------------------------------------------------

def test_hparam_outside_training_loss_is_rejected_with_advice(ridge):
    lr = torch.tensor(0.1, dtype=DT, requires_grad=True)
    with pytest.raises(ValueError, match=r"hparams\[1\].*learning rate.*unrolled"):
        implicit_hypergradient([ridge.phi, lr], ridge.train_loss, ridge.val_loss, ridge.model, Identity())


def test_non_scalar_training_loss_is_rejected(ridge):
    with pytest.raises(ValueError, match="train_loss_fn must return a scalar tensor, got shape"):
        implicit_hypergradient([ridge.phi], lambda m: ridge.train_loss(m).expand(3), ridge.val_loss, ridge.model)


def test_loss_without_graph_is_rejected(ridge):
    def val(m):
        with torch.no_grad():
            return ridge.val_loss(m)

    with pytest.raises(ValueError, match="val_loss_fn returned a tensor with no autograd graph.*no_grad"):
        implicit_hypergradient([ridge.phi], ridge.train_loss, val, ridge.model)
    with pytest.raises(TypeError, match="val_loss_fn must return a scalar tensor, got float"):
        implicit_hypergradient([ridge.phi], ridge.train_loss, lambda m: 1.0, ridge.model)


def test_hparams_on_another_device_are_rejected(ridge):
    phi = torch.zeros(12, dtype=DT, device="meta", requires_grad=True)
    with pytest.raises(ValueError, match=r"hparams\[0\] is on meta but the model is on cpu"):
        implicit_hypergradient([phi], ridge.train_loss, ridge.val_loss, ridge.model)


@pytest.mark.parametrize(
    "hparams, error, match",
    [
        ([], ValueError, "hparams is empty"),
        ([3.0], TypeError, r"hparams\[0\] is a float"),
        ([torch.zeros(3)], ValueError, r"hparams\[0\] does not require grad"),
        ([torch.zeros(3, requires_grad=True) * 2], ValueError, r"hparams\[0\] is not a leaf"),
    ],
)
def test_bad_hparams_are_rejected(ridge, hparams, error, match):
    with pytest.raises(error, match=match):
        implicit_hypergradient(hparams, ridge.train_loss, ridge.val_loss, ridge.model)


def test_model_parameter_as_hparam_is_rejected(ridge):
    with pytest.raises(ValueError, match="also a parameter of the model"):
        implicit_hypergradient([ridge.model.weight], ridge.train_loss, ridge.val_loss, ridge.model)


def test_model_without_trainable_parameters_is_rejected(ridge):
    ridge.model.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters with requires_grad"):
        implicit_hypergradient([ridge.phi], ridge.train_loss, ridge.val_loss, ridge.model)


# --- engines --------------------------------------------------------------------------------------

def test_func_and_autograd_engines_agree_on_a_batchnorm_network():
    model = _net_with_bn()
    X = torch.randn(8, 1, 6, 6, dtype=DT, requires_grad=True)
    y = torch.randint(0, 2, (8,))
    train = lambda m: nn.functional.cross_entropy(m(X), y)
    val = lambda m: nn.functional.cross_entropy(m(X.detach() + 0.1), y)
    results = {}
    for engine in ("func", "autograd"):
        (g,), info = implicit_hypergradient([X], train, val, model, Nystrom(6, 0.1), generator=gen(), engine=engine)
        assert info.engine == engine
        results[engine] = g
    assert rel(results["func"], results["autograd"]) < 1e-10


def test_loss_reading_captured_parameters_falls_back_to_autograd(ridge):
    """functional_call cannot swap a parameter the loss captured: the func graph would miss its terms."""
    weight = ridge.model.weight  # captured, not read through the model argument
    captured = lambda m: ridge.train_loss(m) + 0.25 * (ridge.phi.exp() * weight[0] ** 2).sum()
    through_model = lambda m: ridge.train_loss(m) + 0.25 * (ridge.phi.exp() * m.weight[0] ** 2).sum()
    (g_ref,), info_ref = implicit_hypergradient([ridge.phi], through_model, ridge.val_loss, ridge.model, Exact())
    with pytest.warns(UserWarning, match="captured reference.*falling back to engine='autograd'"):
        (g,), info = implicit_hypergradient([ridge.phi], captured, ridge.val_loss, ridge.model, Exact())
    assert info_ref.engine == "func" and info.engine == "autograd"
    assert rel(g, g_ref) < 1e-12


def test_loss_torch_func_cannot_transform_falls_back_to_autograd(ridge):
    calls = torch.zeros(())

    def train(m):
        calls.add_(1)  # mutating a captured tensor is refused inside torch.func transforms
        return ridge.train_loss(m)

    with pytest.warns(UserWarning, match="could not transform train_loss_fn.*falling back"):
        (g,), info = implicit_hypergradient([ridge.phi], train, ridge.val_loss, ridge.model, Exact())
    assert info.engine == "autograd" and rel(g, ridge.exact) < 1e-10


def test_invalid_engine_is_rejected(ridge):
    with pytest.raises(ValueError, match="Invalid engine"):
        implicit_hypergradient([ridge.phi], ridge.train_loss, ridge.val_loss, ridge.model, engine="jax")


@pytest.mark.parametrize("engine", ["func", "autograd"])
@pytest.mark.parametrize(
    "solver",
    [Exact(), Nystrom(rank=5, rho=0.1), Nystrom(rank=5, rho=0.1, chunk=1), ConjugateGradient(iters=5),
     Neumann(iters=5, alpha=0.1), Identity()],
    ids=["exact", "nystrom", "nystrom-k1", "cg", "neumann", "identity"],
)
def test_hypergradient_carries_no_graph(ridge, solver, engine):
    """A result with an autograd history keeps every HVP's graph alive; stored in
    ``.grad`` it chains outer steps together (the distillation recipe's CG run grew
    by ~30 MB per outer step before HVPs ran under no_grad)."""
    (g,), _ = implicit_hypergradient([ridge.phi], ridge.train_loss, ridge.val_loss, ridge.model, solver,
                                     generator=gen(), engine=engine)
    assert g.grad_fn is None and not g.requires_grad


def test_solver_runs_without_autograd_recording(ridge):
    """The solve is graph-free even for a custom solver whose products would record one."""
    seen = {}

    class Spy:
        name, damping = "spy", 0.0

        def solve(self, matvec, b, generator=None):
            seen["grad_enabled"] = torch.is_grad_enabled()
            x = matvec(b[None])[0]
            seen["requires_grad"] = x.requires_grad
            return x

    implicit_hypergradient([ridge.phi], ridge.train_loss, ridge.val_loss, ridge.model, Spy())
    assert seen == {"grad_enabled": False, "requires_grad": False}


def test_training_loss_sees_the_model_as_found_whatever_val_loss_fn_does():
    """A val_loss_fn that switches to eval mode (common) must not change the Hessian:
    with dropout, the training loss must still run in training mode."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1)).to(DT)
    x, xv = torch.randn(16, 4, dtype=DT), torch.randn(16, 4, dtype=DT)
    phi = torch.full((1,), -1.0, dtype=DT, requires_grad=True)
    seen = []

    def train(m):
        seen.append(m.training)
        return m(x).pow(2).mean() + phi.exp() * sum((p**2).sum() for p in m.parameters())

    def val_eval(m):
        m.eval()
        return m(xv).mean()

    def val_train(m):  # the same loss, mode untouched: BatchNorm uses batch statistics
        m.eval()
        out = m(xv).mean()
        m.train()
        return out

    net.train()
    (g_eval,), _ = implicit_hypergradient([phi], train, val_eval, net, Exact())
    (g_ref,), _ = implicit_hypergradient([phi], train, val_train, net, Exact())
    assert seen == [True, True] and net.training
    assert torch.allclose(g_eval, g_ref, rtol=1e-12, atol=0)


def _weighting_problem():
    """Meta-Weight-Net-style: the hyperparameters are the parameters of another module
    that maps each example's loss to its weight (Shu et al. 2019)."""
    g = torch.Generator().manual_seed(4)
    n, d = 24, 5
    X, Xv = torch.randn(n, d, generator=g, dtype=DT), torch.randn(n, d, generator=g, dtype=DT)
    y, yv = torch.randn(n, generator=g, dtype=DT), torch.randn(n, generator=g, dtype=DT)
    torch.manual_seed(4)
    wnet = nn.Sequential(nn.Linear(1, 6), nn.Tanh(), nn.Linear(6, 1), nn.Sigmoid()).to(DT)
    model = nn.Linear(d, 1, bias=False).to(DT)
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, d, generator=g, dtype=DT))

    def f(theta, wparams):
        losses = (X @ theta - y) ** 2
        weights = torch.func.functional_call(wnet, wparams, (losses[:, None].detach(),))[:, 0]
        return (weights * losses).mean() + 0.5 * (theta**2).sum()

    def val(theta):
        return ((Xv @ theta - yv) ** 2).mean()

    wparams = dict(wnet.named_parameters())
    theta = model.weight[0].detach()
    detached = {k: v.detach() for k, v in wparams.items()}
    H = torch.func.hessian(f)(theta, detached)
    F = torch.func.jacrev(torch.func.grad(f), argnums=1)(theta, detached)  # {name: (d, *shape)}
    x = torch.linalg.solve(H, torch.func.grad(val)(theta))
    exact = {k: -torch.einsum("d,d...->...", x, F[k]) for k in F}
    train = lambda m: f(m.weight[0], wparams)
    return wnet, model, train, lambda m: val(m.weight[0]), exact


def test_hparams_that_are_another_modules_parameters_match_the_exact_hypergradient():
    wnet, model, train, val, exact = _weighting_problem()
    names = [k for k, _ in wnet.named_parameters()]
    grads, info = implicit_hypergradient(list(wnet.parameters()), train, val, model, Exact())
    assert not info.skipped
    for name, g in zip(names, grads):
        assert g.shape == exact[name].shape
        assert rel(g, exact[name]) < 1e-9, name
    assert max(e.norm() for e in exact.values()) > 1e-3  # not a vacuous comparison


def test_param_groups_of_a_module_step_by_their_own_learning_rates():
    from hyperopt_torch import HyperOptimizer

    wnet, model, train, val, exact = _weighting_problem()
    first, second = wnet[0], wnet[2]
    before = {k: v.detach().clone() for k, v in wnet.named_parameters()}
    hopt = HyperOptimizer([{"params": first.parameters()}, {"params": second.parameters(), "lr": 0.25}],
                          base=torch.optim.SGD, ihvp=ConjugateGradient(iters=5), lr=1.0)
    info = hopt.step(train, val, model)
    assert not info.skipped and info.hvps == 5
    for name, p in wnet.named_parameters():
        lr = 1.0 if name.startswith("0.") else 0.25
        assert rel(before[name] - p.detach(), lr * exact[name]) < 1e-9, name


# --- nothing changed: what user losses do to the model (issue 8, B) ------------------------------

def _state(model):
    return ([p.detach().clone() for p in model.parameters()], [b.clone() for b in model.buffers()],
            [p.grad for p in model.parameters()], [p.grad.clone() if p.grad is not None else None for p in model.parameters()])


def _assert_state(model, state):
    params, buffers, grad_objects, grad_values = state
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
    assert all(g is p.grad for g, p in zip(grad_objects, model.parameters()))
    assert all(v is None or torch.equal(v, p.grad) for v, p in zip(grad_values, model.parameters()))


@pytest.mark.parametrize("engine", ["func", "autograd"])
def test_parameter_writes_inside_the_losses_are_undone_and_unseen_by_the_training_loss(ridge, engine):
    """clamp_ in the validation loss and w.add_() in the training loss write the real parameters
    (with the func engine the primals share their storage); both are undone, and the training loss
    sees the model as found."""
    found = ridge.model.weight.detach().clone()
    seen = []

    def train(m):
        seen.append(torch.equal(m.weight, found))
        with torch.no_grad():
            m.weight.add_(1.0)
        return ridge.train_loss(m)

    def val(m):
        with torch.no_grad():
            m.weight.clamp_(-0.01, 0.01)  # a projection onto a box
        return ridge.val_loss(m)

    before = _state(ridge.model)
    _, info = implicit_hypergradient([ridge.phi], train, val, ridge.model, Exact(), engine=engine)
    _assert_state(ridge.model, before)
    assert info.engine == engine and seen == [True]


@pytest.mark.parametrize("engine", ["func", "autograd"])
def test_writes_through_data_that_bump_no_version_are_undone_too(ridge, engine):
    """``w.data.clamp_()`` (an old-style constraint) changes values without autograd's version counter."""
    found = ridge.model.weight.detach().clone()
    seen = []

    def train(m):
        seen.append(torch.equal(m.weight, found))
        m.weight.data.mul_(3.0)
        return ridge.train_loss(m)

    def val(m):
        m.weight.data.clamp_(-0.01, 0.01)
        return ridge.val_loss(m)

    before = _state(ridge.model)
    implicit_hypergradient([ridge.phi], train, val, ridge.model, Exact(), engine=engine)
    _assert_state(ridge.model, before)
    assert seen and all(seen)  # every call of the training loss saw the model as found, not val's clamp


def test_embedding_max_norm_renormalisation_is_undone():
    """nn.Embedding(max_norm=...) renormalises the rows it looks up, in place, during forward."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4, max_norm=0.5), nn.Flatten(), nn.Linear(12, 1)).to(DT)
    with torch.no_grad():
        model[0].weight.mul_(10)  # every row longer than max_norm
    idx = torch.randint(0, 10, (16, 3))
    decay = torch.zeros(1, dtype=DT, requires_grad=True)
    train = lambda m: m(idx).pow(2).mean() + decay.exp() * (m[2].weight ** 2).sum()
    val = lambda m: m(idx[:4]).mean()
    before = _state(model)
    implicit_hypergradient([decay], train, val, model, ConjugateGradient(iters=3))
    _assert_state(model, before)


class _RunningMean(nn.Module):
    """A buffer re-assigned in forward, not updated in place: the module attribute changes."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 1).to(DT)
        self.register_buffer("mean", torch.zeros(3, dtype=DT))

    def forward(self, x):
        self.mean = 0.9 * self.mean + 0.1 * x.mean(0).detach()
        return self.lin(x - self.mean)


@pytest.mark.parametrize("engine", ["func", "autograd"])
def test_reassigned_buffer_is_put_back_as_the_original_object(engine):
    torch.manual_seed(0)
    model = _RunningMean()
    x = torch.randn(20, 3, dtype=DT)
    decay = torch.zeros(1, dtype=DT, requires_grad=True)
    original = model.mean
    train = lambda m: m(x).pow(2).mean() + decay.exp() * (m.lin.weight ** 2).sum()
    implicit_hypergradient([decay], train, lambda m: m(x + 1).mean(), model, Exact(), engine=engine)
    assert model.mean is original and torch.equal(original, torch.zeros(3, dtype=DT))
    assert dict(model.named_buffers())["mean"] is original


class _Registries(nn.Module):
    """Tensors in every registry a loss may tamper with: a persistent and a non-persistent buffer, parameters."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 1).to(DT)
        self.gain = nn.Parameter(torch.ones(1, dtype=DT))
        self.register_buffer("scale", torch.ones(1, dtype=DT))
        self.register_buffer("shift", torch.zeros(1, dtype=DT), persistent=False)

    def forward(self, x):
        return self.lin(x) * self.scale * self.gain + self.shift


@pytest.mark.parametrize("engine", ["func", "autograd"])
@pytest.mark.parametrize("tamper", ["delete buffers", "shadow a parameter", "parameter to buffer"])
def test_registries_are_repaired_as_they_were(engine, tamper):
    """A deleted buffer is a buffer again (a plain setattr would make it an attribute), a non-persistent one
    stays out of the state_dict, an instance attribute shadowing a parameter is removed, and a parameter a loss
    re-registered as a buffer is a parameter again, in one registry only."""
    torch.manual_seed(0)
    model = _Registries()
    keys, tensors = set(model.state_dict()), {**dict(model.named_parameters()), **dict(model.named_buffers())}
    x = torch.randn(20, 3, dtype=DT)
    decay = torch.zeros(1, dtype=DT, requires_grad=True)

    def val(m):
        out = m(x + 1).mean()
        if tamper == "delete buffers":
            del m.scale, m.shift
        elif tamper == "shadow a parameter":
            object.__setattr__(m.lin, "weight", torch.zeros(1, 3, dtype=DT))
        else:
            del m.gain
            m.register_buffer("gain", torch.zeros(1, dtype=DT))
        return out

    train = lambda m: m(x).pow(2).mean() + decay.exp() * (m.lin.weight**2).sum()
    implicit_hypergradient([decay], train, val, model, Exact(), engine=engine)
    assert set(model.state_dict()) == keys and "weight" not in model.lin.__dict__
    now = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    assert now.keys() == tensors.keys() and all(now[n] is t for n, t in tensors.items())
    assert all(getattr(model, n) is t for n, t in tensors.items() if "." not in n)
    assert set(model._parameters) == {"gain"} and set(model._buffers) == {"scale", "shift"}


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit is deprecated, still in use
@pytest.mark.parametrize("engine", ["func", "autograd"])
@pytest.mark.parametrize("compile", ["script", "trace"])
def test_a_scripted_or_traced_model_gets_the_eager_hypergradient_and_is_put_back(engine, compile):
    """A ScriptModule keeps its registries in C++ (a traced one behind getattr): the hypergradient is the eager
    model's, and a parameter a loss replaces and writes into is the original object, with its value, again."""
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1)).to(DT)
    x, y = torch.randn(20, 4, dtype=DT), torch.randn(20, 1, dtype=DT)
    model = torch.jit.script(eager) if compile == "script" else torch.jit.trace(eager, x)
    first = lambda m: getattr(m, "0")  # a traced Sequential takes no m[0]
    before = [(n, t, t.detach().clone()) for n, t in model.named_parameters()]
    decay = torch.zeros(1, dtype=DT, requires_grad=True)
    train = lambda m: ((m(x) - y) ** 2).mean() + decay.exp() * sum((w**2).sum() for w in m.parameters())

    val = lambda m: ((m(x + 1) - y) ** 2).mean()

    def tampering_val(m):
        with torch.no_grad():
            first(m).weight.add_(1.0)
        first(m).bias = nn.Parameter(torch.zeros(3, dtype=DT))
        return val(m)

    # tiny, but the conftest sends it through torch.func (FUNC_MIN_PARAMS = 0), which gets a ScriptModule wrong
    result = implicit_hypergradient([decay], train, val, model, Exact(), engine=engine)
    want = implicit_hypergradient([decay], train, val, eager, Exact()).grads[0]
    assert rel(result.grads[0], want) < 1e-12 and result.info.engine == "autograd"
    implicit_hypergradient([decay], train, tampering_val, model, Exact(), engine=engine)
    after = list(model.named_parameters())
    assert [n for n, _ in after] == [n for n, *_ in before]
    assert all(t is t0 and torch.equal(t, v) for (_, t), (_, t0, v) in zip(after, before))


def test_an_uninitialized_lazy_module_is_refused_by_name():
    model = nn.Sequential(nn.Linear(4, 3), nn.LazyLinear(1))
    decay = torch.zeros(1, requires_grad=True)
    with pytest.raises(ValueError, match=r"model\.1 \(LazyLinear\) has uninitialized lazy parameters: run the model once"):
        implicit_hypergradient([decay], lambda m: m(torch.ones(2, 4)).sum() * decay.sum(), lambda m: m(torch.ones(2, 4)).sum(),
                               model, Exact())


@pytest.mark.parametrize("engine", ["func", "autograd"])
@pytest.mark.parametrize("ihvp", ["exact", "cg", "nystrom"])
def test_a_zero_dim_parameter_gets_the_dense_hypergradient(engine, ihvp):
    """A scalar bias (a 0-dim nn.Parameter) has a piece of shape () in every flat vector."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1).to(DT)
    model.bias = nn.Parameter(torch.tensor(0.3, dtype=DT))
    X, y, Xv, yv = torch.randn(30, 4, dtype=DT), torch.randn(30, dtype=DT), torch.randn(30, 4, dtype=DT), torch.randn(30, dtype=DT)
    phi = torch.tensor([-1.0, -2.0], dtype=DT, requires_grad=True)
    predict = lambda m, A: A @ m.weight[0] + m.bias
    train = lambda m: ((predict(m, X) - y) ** 2).mean() + phi[0].exp() * (m.weight**2).sum() + phi[1].exp() * m.bias**2
    val = lambda m: ((predict(m, Xv) - yv) ** 2).mean()
    solver = {"exact": Exact(), "cg": ConjugateGradient(iters=20), "nystrom": Nystrom(rank=5, rho=1e-12)}[ihvp]
    got = implicit_hypergradient([phi], train, val, model, solver, engine=engine).grads[0]
    # Dense: θ = (w, c), H = 2/n [A 1]ᵀ[A 1] + 2 diag(e^φ0, ..., e^φ1), ∂²f/∂φ∂θ = 2 diag(e^φ) θ per block
    A = torch.cat([X, torch.ones(30, 1, dtype=DT)], 1)
    Av = torch.cat([Xv, torch.ones(30, 1, dtype=DT)], 1)
    theta = torch.cat([model.weight.detach()[0], model.bias.detach()[None]])
    d = torch.cat([phi[0].exp().expand(4), phi[1].exp()[None]]).detach()
    H = 2 / 30 * A.T @ A + 2 * torch.diag(d)
    gv = 2 / 30 * Av.T @ (Av @ theta - yv)
    x = torch.linalg.solve(H, gv)
    mixed = 2 * d * theta * x
    exact = -torch.stack([mixed[:4].sum(), mixed[4]])
    assert rel(got, exact) < 1e-8


@pytest.mark.parametrize("engine", ["func", "autograd"])
@pytest.mark.parametrize("which", ["train", "val"])
def test_loss_calling_backward_is_refused_with_every_grad_untouched(ridge, engine, which):
    """A loss that calls .backward() would add into the parameters' and hparams' existing .grad."""
    def calls_backward(fn):
        def loss(m):
            out = fn(m)
            out.backward(retain_graph=True)
            return out
        return loss

    ridge.model.weight.grad = torch.full_like(ridge.model.weight, 3.0)
    ridge.phi.grad = torch.full_like(ridge.phi, 5.0)
    phi_grad = ridge.phi.grad
    before = _state(ridge.model)
    train = calls_backward(ridge.train_loss) if which == "train" else ridge.train_loss
    val = calls_backward(ridge.val_loss) if which == "val" else ridge.val_loss
    with pytest.raises(ValueError, match=f"{which}_loss_fn called .backward"):
        implicit_hypergradient([ridge.phi], train, val, ridge.model, Exact(), engine=engine)
    _assert_state(ridge.model, before)
    assert ridge.phi.grad is phi_grad and torch.equal(phi_grad, torch.full_like(ridge.phi, 5.0))


@pytest.mark.parametrize("error", [ConnectionError("data loader lost its worker"), RuntimeError("user's own bug")])
def test_users_own_exception_propagates_without_an_engine_fallback(ridge, error):
    """Only a failure of torch.func to transform the loss falls back to autograd: an exception of
    the user's code propagates (a non-RuntimeError at once, without a second call) and nothing changes."""
    calls = []

    def train(m):
        calls.append(1)
        raise error

    before = _state(ridge.model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "falling back" warning
        with pytest.raises(type(error), match=str(error)):
            implicit_hypergradient([ridge.phi], train, ridge.val_loss, ridge.model, Exact())
    assert len(calls) == (1 if isinstance(error, ConnectionError) else 2)
    _assert_state(ridge.model, before)


def test_sparse_embedding_is_refused_naming_the_cause_before_any_change():
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Flatten(), nn.Linear(8, 1)).to(DT)
    idx = torch.randint(0, 10, (6, 2))
    decay = torch.zeros(1, dtype=DT, requires_grad=True)
    train = lambda m: m(idx).pow(2).mean() + decay.exp() * (m[0].weight ** 2).sum()
    before = _state(model)
    with pytest.raises(ValueError, match=r"model\.0 is an Embedding\(sparse=True\).*differentiated a second time.*sparse=False"):
        implicit_hypergradient([decay], train, lambda m: m(idx).mean(), model, Identity())
    _assert_state(model, before)


# --- messages (issue 8, C16) ------------------------------------------------------------------------

@pytest.mark.parametrize("engine", ["func", "autograd"])
@pytest.mark.parametrize("how, cause", [("no_grad", "no_grad"), ("detach", "detached"), ("inference_mode", "inference_mode")])
def test_training_loss_without_graph_is_named_as_such_not_sent_to_unrolled(ridge, engine, how, cause):
    def train(m):
        if how == "detach":
            return ridge.train_loss(m).detach()
        with getattr(torch, how)():
            return ridge.train_loss(m)

    with pytest.raises(ValueError, match=f"train_loss_fn returned a tensor with no autograd graph.*{cause}") as caught:
        implicit_hypergradient([ridge.phi], train, ridge.val_loss, ridge.model, Identity(), engine=engine)
    assert "unrolled" not in str(caught.value)


def test_validation_loss_under_inference_mode_is_named_as_such(ridge):
    def val(m):
        with torch.inference_mode():
            return ridge.val_loss(m)

    with pytest.raises(ValueError, match="val_loss_fn .*computed under torch.inference_mode"):
        implicit_hypergradient([ridge.phi], ridge.train_loss, val, ridge.model, Identity())


def test_hparam_of_the_validation_loss_alone_gets_its_direct_term(ridge):
    """∂²f/∂φ∂θ = 0 for an hparam that only g reads: dg/dψ = ∂g/∂ψ exactly, no error."""
    psi = torch.tensor([0.3, -1.2], dtype=DT, requires_grad=True)
    val = lambda m: ridge.val_loss(m) + 0.5 * (psi**2).sum()
    (g_phi, g_psi), _ = implicit_hypergradient([ridge.phi, psi], ridge.train_loss, val, ridge.model, Exact())
    assert rel(g_phi, ridge.exact) < 1e-10
    assert torch.equal(g_psi, psi.detach())


# --- the solver owns its random state (issue 8, D) ----------------------------------------------------

def test_nystrom_draws_from_its_own_generator_unless_one_is_passed(ridge):
    args = ([ridge.phi], ridge.train_loss, ridge.val_loss, ridge.model)
    solver = Nystrom(rank=3, rho=0.1, seed=5)
    start = solver.state_dict()
    (first,), _ = implicit_hypergradient(*args, solver)
    (second,), _ = implicit_hypergradient(*args, solver)
    assert not torch.equal(first, second)  # the generator advanced: a new sketch
    solver.load_state_dict(start)
    (again,), _ = implicit_hypergradient(*args, solver)
    assert torch.equal(again, first)
    (fresh,), _ = implicit_hypergradient(*args, Nystrom(rank=3, rho=0.1, seed=5))
    assert torch.equal(fresh, first)
    state = solver.state_dict()["generator"]
    (given,), _ = implicit_hypergradient(*args, solver, generator=torch.Generator().manual_seed(5))
    assert torch.equal(given, first) and torch.equal(solver.state_dict()["generator"], state)


def test_functional_api_names_a_bare_tensor_and_a_bad_generator(ridge):
    with pytest.raises(TypeError, match=r"got a single tensor: wrap it in a list"):
        implicit_hypergradient(ridge.phi, ridge.train_loss, ridge.val_loss, ridge.model, "cg")
    with pytest.raises(TypeError, match="generator must be a CPU torch.Generator or None, got int"):
        implicit_hypergradient([ridge.phi], ridge.train_loss, ridge.val_loss, ridge.model, "nystrom", generator=0)
