"""hyperopt_torch.interop: our solvers as torchopt linear solves and betty hypergradient methods.

The pytree plumbing is checked against dense linear algebra with no peer installed.  Against the peers
(optional: ``pip install hyperopt_torch[peers]``; each test skips when its peer is missing): with the same
solver settings our solver through the adapter gives torchopt's and betty's result to 1e-12 in float64,
and where a peer's solver computes something else, the test pins what it computes instead (docs/porting.md).
"""

from __future__ import annotations

import warnings
from collections import namedtuple
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from hyperopt_torch import SOLVER_NAMES, ConjugateGradient, Exact, Neumann, Nystrom, make_solver
from hyperopt_torch.interop import betty_method, linear_solve, register_betty

DT = torch.float64


def rel(x, y):
    x = torch.cat([t.reshape(-1) for t in x]) if isinstance(x, (list, tuple)) else x
    y = torch.cat([t.reshape(-1) for t in y]) if isinstance(y, (list, tuple)) else y
    return ((x - y).norm() / y.norm()).item()


# ---------------------------------------------------------------- pytrees, no peer needed

def spd(p, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(p, p, generator=g, dtype=DT))
    return (Q * torch.logspace(0, 1, p, dtype=DT)) @ Q.T


Pair = namedtuple("Pair", "w b")
TREES = {
    "tensor": lambda t: t[0],
    "tuple": lambda t: (t[0], t[1]),
    "list": lambda t: [t[0], t[1]],
    "dict": lambda t: {"weight": t[0], "bias": t[1]},
    "namedtuple": lambda t: Pair(t[0], t[1]),
    "nested": lambda t: ({"weight": t[0]}, [t[1], None]),
}


def tree_problem(kind, seed=0, shapes=None):
    """A dense SPD A over a pytree shaped like ``kind`` (a (3, 2) and a (2,) tensor, or one (3, 2) tensor)."""
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or ([(3, 2)] if kind == "tensor" else [(3, 2), (2,)])
    p = sum(torch.Size(s).numel() for s in shapes)
    A = spd(p, seed)
    b_flat = torch.randn(p, generator=g, dtype=DT)

    def split(v):
        pieces, start = [], 0
        for s in shapes:
            n = torch.Size(s).numel()
            pieces.append(v[start:start + n].reshape(s))
            start += n
        return TREES[kind](pieces + [None])

    def leaves(tree):
        if kind == "nested":
            return [tree[0]["weight"], tree[1][0]]
        return [tree] if kind == "tensor" else list(tree.values()) if kind == "dict" else list(tree)

    def matvec(tree):
        assert type(tree) is type(split(b_flat))  # the adapter hands torchopt's matvec b's own structure
        return split(A @ torch.cat([t.reshape(-1) for t in leaves(tree)]))

    return A, b_flat, split(b_flat), matvec, lambda tree: torch.cat([t.reshape(-1) for t in leaves(tree)])


@pytest.mark.parametrize("kind", sorted(TREES))
def test_linear_solve_keeps_the_pytree_structure_and_solves_the_flat_system(kind):
    A, b_flat, b, matvec, flat = tree_problem(kind)
    x = linear_solve(Exact(rho=0.5))(matvec, b)
    assert type(x) is type(b)
    if kind == "nested":
        assert x[1][1] is None and x[0]["weight"].shape == (3, 2)
    expected = torch.linalg.solve(A + 0.5 * torch.eye(A.shape[0], dtype=DT), b_flat)
    assert rel(flat(x), expected) < 1e-13


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_every_solver_through_linear_solve_equals_its_own_flat_solve(name):
    """The adapter adds nothing but the pytree plumbing: the same solver on the flat system, to rounding.

    (The pytree matvec multiplies ``A @ v``, the flat one ``V @ A``: normal-CG, on A², is 5e-13 apart.)
    """
    A, b_flat, b, matvec, flat = tree_problem("dict", shapes=[(3, 4), (4,)])
    x = flat(linear_solve(make_solver(name))(matvec, b))
    expected = make_solver(name).solve(lambda V: V @ A, b_flat)
    assert rel(x, expected) < 1e-12


def test_linear_solve_takes_any_object_with_a_solve_method():
    class Jacobi:  # a custom solver: no name table entry, no flags
        name, damping = "jacobi", 0.0

        def solve(self, matvec, b, generator=None):
            return b / torch.diagonal(matvec(torch.eye(b.numel(), dtype=b.dtype)))

    A, b_flat, b, matvec, flat = tree_problem("tuple")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = linear_solve(Jacobi(), batch="vmap")(matvec, b)
    assert rel(flat(x), b_flat / torch.diagonal(A)) < 1e-14


def test_linear_solve_cg_matches_a_dense_solve_and_counts_products():
    A, b_flat, b, matvec, flat = tree_problem("dict")
    solve = linear_solve("cg", iters=A.shape[0])
    x = solve(matvec, b)
    assert rel(flat(x), torch.linalg.solve(A, b_flat)) < 1e-12
    assert solve.matvecs == A.shape[0]  # one product per CG iteration
    assert solve.last.negative_curvature is not None and not solve.last.negative_curvature


def test_linear_solve_vmap_batches_nystrom_sketch_like_the_loop():
    A, b_flat, b, matvec, flat = tree_problem("tuple")
    p = A.shape[0]
    loop = linear_solve(Nystrom(rank=p, rho=0.1))
    vmap = linear_solve(Nystrom(rank=p, rho=0.1), batch="vmap")
    x_loop, x_vmap = loop(matvec, b), vmap(matvec, b)
    expected = torch.linalg.solve(A + 0.1 * torch.eye(p, dtype=DT), b_flat)
    assert rel(flat(x_loop), expected) < 1e-12 and rel(flat(x_vmap), expected) < 1e-12
    assert loop.matvecs == vmap.matvecs == p


def test_linear_solve_draws_a_new_sketch_at_every_call_from_the_solvers_generator():
    A, _, b, matvec, flat = tree_problem("tuple")
    solve = linear_solve(Nystrom(rank=3, rho=0.1, seed=5))
    first, second = flat(solve(matvec, b)), flat(solve(matvec, b))
    again = linear_solve(Nystrom(rank=3, rho=0.1, seed=5))
    assert not torch.equal(first, second)
    assert torch.equal(flat(again(matvec, b)), first)


def test_linear_solve_warns_on_negative_curvature_and_on_a_diverged_series():
    g = torch.Generator().manual_seed(0)
    A = torch.diag(torch.tensor([2.0, 1.0, -1.0], dtype=DT))
    b = (torch.randn(3, generator=g, dtype=DT),)
    matvec = lambda u: (A @ u[0],)  # noqa: E731
    with pytest.warns(RuntimeWarning, match="negative curvature"):
        linear_solve(ConjugateGradient(iters=3))(matvec, b)
    with pytest.warns(RuntimeWarning, match="diverged"):
        x = linear_solve(Neumann(iters=20, alpha=1.5))(matvec, b)
    assert torch.isnan(x[0]).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        linear_solve(Neumann(iters=5, alpha=0.1))(lambda u: (u[0],), b)  # nothing to say


def test_linear_solve_validates_its_arguments():
    with pytest.raises(ValueError, match="Invalid batch"):
        linear_solve("cg", batch="chunks")
    with pytest.raises(ValueError, match="put them on the object"):
        linear_solve(ConjugateGradient(), iters=3)
    with pytest.raises(ValueError, match="rank does not apply"):
        linear_solve("cg", rank=3)
    with pytest.raises(TypeError, match="solve"):
        linear_solve(object())
    solve = linear_solve("cg")
    with pytest.raises(TypeError, match="pytree of tensors"):
        solve(lambda u: u, {"w": 3.0})
    with pytest.raises(ValueError, match="one dtype"):
        solve(lambda u: u, (torch.ones(2, dtype=DT), torch.ones(2, dtype=torch.float32)))
    with pytest.raises(ValueError, match="returned 1 tensors for 2 in b"):
        solve(lambda u: u[:1], (torch.ones(2, dtype=DT), torch.ones(2, dtype=DT)))


# ---------------------------------------------------------------- torchopt

class Logistic:
    """Logistic regression with one log-L2 penalty per weight; θ = (w, b), two tensors; float64."""

    def __init__(self, seed=0, n=60, d=8):
        g = torch.Generator().manual_seed(seed)
        self.X, self.Xv = (torch.randn(n, d, generator=g, dtype=DT) for _ in range(2))
        self.y, self.yv = ((torch.rand(n, generator=g, dtype=DT) > 0.5).to(DT) for _ in range(2))
        self.phi = (0.3 * torch.randn(d, generator=g, dtype=DT)).requires_grad_()
        self.theta = (0.1 * torch.randn(d, generator=g, dtype=DT), torch.tensor(0.2, dtype=DT))

    def inner(self, params, phi):
        w, b = params
        return F.binary_cross_entropy_with_logits(self.X @ w + b, self.y) + 0.5 * (phi.exp() * w**2).sum()

    def outer(self, params):
        w, b = params
        return F.binary_cross_entropy_with_logits(self.Xv @ w + b, self.yv)

    def hessian(self):
        """The dense ∇²_θ f over the flat (w, b), and b = ∇_θ g."""
        flat = lambda v: (v[:-1], v[-1])  # noqa: E731
        theta = torch.cat([self.theta[0], self.theta[1].reshape(1)])
        H = torch.func.hessian(lambda v: self.inner(flat(v), self.phi.detach()))(theta)
        return H

    def hypergradient(self, solve):
        """torchopt: custom_root around a solver that returns θ as it is, then autograd of the outer loss."""
        torchopt = pytest.importorskip("torchopt")

        def optimality(params, phi):
            return torch.func.grad(self.inner)(params, phi)

        @torchopt.diff.implicit.custom_root(optimality, argnums=1, solve=solve)
        def solver(params, phi):
            return params

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchopt 0.7.3 calls the deprecated functorch.vjp
            return torch.autograd.grad(self.outer(solver(self.theta, self.phi)), self.phi)[0]


@pytest.fixture
def torchopt():
    return pytest.importorskip("torchopt")


@pytest.mark.parametrize("iters", [1, 3, 9])
@pytest.mark.parametrize("ridge", [None, 0.3])
def test_our_cg_through_custom_root_equals_torchopt_solve_cg(torchopt, iters, ridge):
    problem = Logistic()
    theirs = problem.hypergradient(torchopt.linear_solve.solve_cg(maxiter=iters, rtol=0, ridge=ridge))
    ours = problem.hypergradient(linear_solve(ConjugateGradient(iters=iters, rho=ridge or 0.0)))
    assert rel(ours, theirs) < 1e-12


def test_torchopt_default_solve_cg_is_our_cg_with_tol_1e_5_and_10p_iterations(torchopt):
    problem = Logistic()
    p = problem.X.shape[1] + 1
    theirs = problem.hypergradient(torchopt.linear_solve.solve_cg())
    ours = problem.hypergradient(linear_solve(ConjugateGradient(iters=10 * p, tol=1e-5)))
    assert rel(ours, theirs) < 1e-12


@pytest.mark.parametrize("iters", [1, 5])
@pytest.mark.parametrize("alpha", [None, 0.5])
def test_our_neumann_equals_torchopt_solve_inv_ns(torchopt, iters, alpha):
    problem = Logistic()
    theirs = problem.hypergradient(torchopt.linear_solve.solve_inv(ns=True, maxiter=iters, alpha=alpha))
    ours = problem.hypergradient(linear_solve(Neumann(iters=iters, alpha=alpha or 1.0)))
    assert rel(ours, theirs) < 1e-12


def test_torchopt_solve_inv_inverts_each_tensors_hessian_block_alone(torchopt):
    """solve_inv(ns=False) materialises only the diagonal blocks of the Jacobian, one per tensor of θ.

    With θ = (w, b) that drops ∂²f/∂w∂b: torchopt's answer is ours on the block-diagonal Hessian, not
    on the Hessian (1.7 % off here); with θ one tensor it is our Exact.
    """
    problem = Logistic()
    theirs = problem.hypergradient(torchopt.linear_solve.solve_inv(ridge=0.1))
    exact = problem.hypergradient(linear_solve(Exact(rho=0.1)))
    assert rel(theirs, exact) > 1e-3

    H = problem.hessian()
    d = H.shape[0] - 1
    blocks = torch.block_diag(H[:d, :d], H[d:, d:])

    def block_diagonal(matvec, b):  # our Exact on the block-diagonal matrix, as a torchopt solve
        x = torch.linalg.solve(blocks + 0.1 * torch.eye(d + 1, dtype=DT), torch.cat([b[0], b[1].reshape(1)]))
        return (x[:d], x[d])

    assert rel(theirs, problem.hypergradient(block_diagonal)) < 1e-12

    single = Logistic()
    single.theta = (torch.cat([single.theta[0], single.theta[1].reshape(1)]),)
    single.inner = lambda params, phi: Logistic.inner(single, (params[0][:-1], params[0][-1]), phi)
    single.outer = lambda params: Logistic.outer(single, (params[0][:-1], params[0][-1]))
    assert rel(single.hypergradient(torchopt.linear_solve.solve_inv(ridge=0.1)),
               single.hypergradient(linear_solve(Exact(rho=0.1)))) < 1e-12


def test_our_nystrom_at_full_rank_equals_torchopts_dense_ridge_solve(torchopt):
    problem = Logistic()
    p = problem.X.shape[1] + 1
    theirs = problem.hypergradient(torchopt.linear_solve.solve_cg(maxiter=p, rtol=0, ridge=0.1))
    for batch in ("loop", "vmap"):
        ours = problem.hypergradient(linear_solve(Nystrom(rank=p, rho=0.1), batch=batch))
        assert rel(ours, theirs) < 1e-12


def test_our_solver_as_the_linear_solve_of_an_implicit_meta_gradient_module(torchopt):
    """``class Net(ImplicitMetaGradientModule, linear_solve=linear_solve(...))``: the meta-gradient of torchopt's solve_cg."""
    problem = Logistic()

    def meta_gradient(solve):
        class Inner(torchopt.nn.ImplicitMetaGradientModule, linear_solve=solve):
            def __init__(self, phi):
                super().__init__()
                self.phi = phi  # a meta-parameter: a tensor that requires grad
                self.w = torch.nn.Parameter(problem.theta[0].clone())
                self.b = torch.nn.Parameter(problem.theta[1].clone())

            def objective(self):
                return problem.inner((self.w, self.b), self.phi)

            def solve(self):
                return self  # θ is already the inner solution

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = Inner(problem.phi)
            net.solve()
            return torch.autograd.grad(problem.outer((net.w, net.b)), problem.phi)[0]

    theirs = meta_gradient(torchopt.linear_solve.solve_cg(maxiter=4, rtol=0))
    ours = meta_gradient(linear_solve(ConjugateGradient(iters=4)))
    assert rel(ours, theirs) < 1e-12


def test_torchopt_cg_spends_one_product_more_than_ours(torchopt):
    """torchopt's CG starts from r₀ = b − A x₀ (one product, with x₀ = 0); ours from r₀ = b."""
    A, _, b, matvec, _ = tree_problem("tuple")
    calls = []

    def counted(tree):
        calls.append(1)
        return matvec(tree)

    torchopt.linear_solve.solve_cg(maxiter=4, rtol=0)(counted, b)
    theirs, calls[:] = len(calls), []
    linear_solve(ConjugateGradient(iters=4))(counted, b)
    assert (theirs, len(calls)) == (5, 4)


# ---------------------------------------------------------------- betty

class BettyProblem:
    """The two problem objects betty's cg/neumann read (as in benchmarks/peers.py), over Logistic."""

    def __init__(self, problem: Logistic, iters=3, alpha=1.0):
        self.problem = problem
        self.theta = [t.clone().requires_grad_() for t in problem.theta]
        config = SimpleNamespace(cg_iterations=iters, cg_alpha=1.0, neumann_iterations=iters, neumann_alpha=alpha)
        self.lower = SimpleNamespace(paths=[], config=config, cur_batch=None,
                                     training_step_exec=lambda batch: problem.inner(self.theta, problem.phi),
                                     trainable_parameters=lambda: self.theta, parameters=lambda: self.theta)
        self.upper = SimpleNamespace(trainable_parameters=lambda: [problem.phi])

    def run(self, method, **kw):
        vector = torch.autograd.grad(self.problem.outer(self.theta), self.theta)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return method(vector, self.lower, self.upper, **kw)


@pytest.fixture
def betty_hypergradient():
    return pytest.importorskip("betty.hypergradient")


@pytest.mark.parametrize("iters", [1, 3, 6])
def test_our_neumann_as_a_betty_method_equals_bettys_neumann(betty_hypergradient, iters):
    problem = Logistic()
    theirs = BettyProblem(problem, iters, alpha=0.5).run(betty_hypergradient.neumann)
    ours = BettyProblem(problem).run(betty_method(Neumann(iters=iters, alpha=0.5)))
    assert rel(ours, theirs) < 1e-12


def _betty_version():
    from importlib.metadata import version

    return tuple(int(part) for part in version("betty-ml").split(".")[:2])


@pytest.mark.parametrize("iters", [1, 3, 6])
def test_our_cg_as_a_betty_method_and_bettys_cg(betty_hypergradient, iters):
    """betty's cg equals ours with cg_alpha = 1 after one iteration; after more, only from betty 0.2 on.

    betty-ml 0.1.1 (the release on PyPI) builds the next search direction from the previous residual
    (p ← r_{k−1} + β p), which betty fixed on GitHub in 25bcb02 (2023-11, after 0.2.1); its
    directions are then not conjugate and the answer is not CG's (19 % off at 2 iterations, 23 % at 3 and 6 here).
    """
    problem = Logistic()
    theirs = BettyProblem(problem, iters).run(betty_hypergradient.cg)
    ours = BettyProblem(problem).run(betty_method(ConjugateGradient(iters=iters)))
    if iters == 1 or _betty_version() >= (0, 2):
        assert rel(ours, theirs) < 1e-12
    else:
        assert rel(ours, theirs) > 1e-3


def test_betty_method_with_sync_adds_into_the_upper_gradients(betty_hypergradient):
    problem = Logistic()
    method = betty_method(Neumann(iters=3, alpha=0.5))
    returned = BettyProblem(problem).run(method)
    problem.phi.grad = torch.ones_like(problem.phi)
    assert BettyProblem(problem).run(method, sync=True) is None
    assert rel(problem.phi.grad - 1, returned) < 1e-12
    problem.phi.grad = None


def test_register_betty_adds_a_type_and_refuses_bettys_own_names(betty_hypergradient):
    method = register_betty("hyperopt_torch_test", ConjugateGradient(iters=2))
    try:
        assert betty_hypergradient.jvp_fn_mapping["hyperopt_torch_test"] is method
        again = register_betty("hyperopt_torch_test", Neumann(iters=2))  # ours may be replaced
        assert betty_hypergradient.jvp_fn_mapping["hyperopt_torch_test"] is again
        for name in ("cg", "neumann", "darts"):
            with pytest.raises(ValueError, match="betty's own"):
                register_betty(name, "cg")
    finally:
        betty_hypergradient.jvp_fn_mapping.pop("hyperopt_torch_test", None)
