"""Normal-equation CG: CG on (H + ρI)², against dense float64 solves and against torchopt's solve_normal_cg."""

import warnings

import pytest
import torch

import hyperopt_torch.ihvp.cg as cg_module
from hyperopt_torch import NormalCG, implicit_hypergradient, make_solver
from hyperopt_torch.ihvp import Operator, cg_solve, normal_cg_solve, run_solver

from conftest import Counted, gen, spectrum

DT = torch.float64


def indefinite(p=30):
    """Eigenvalues ±[1, 2]: A² has condition number 4, so CG on it converges well within p iterations."""
    return spectrum(torch.cat([-torch.linspace(1, 2, p // 2, dtype=DT), torch.linspace(1, 2, p - p // 2, dtype=DT)]))


def rel(x, y):
    return ((x - y).norm() / y.norm()).item()


def rhs(p, seed=1):
    return torch.randn(p, generator=gen(seed), dtype=DT)


@pytest.fixture(params=["host", "device"])
def loop(request, monkeypatch):
    """The CG loop underneath, with its scalars as Python floats (host memory) and as 0-dim tensors (a GPU's)."""
    if request.param == "device":
        monkeypatch.setattr(cg_module, "HOST_SCALARS", ())
    return request.param


def test_normal_cg_is_cg_on_the_squared_damped_system(loop):
    """Same iterations, same result: CG on A² with right-hand side Ab, A = H + ρI, to rounding."""
    A, b, rho = indefinite(), rhs(30), 0.3
    damped = A + rho * torch.eye(30, dtype=DT)
    for iters in (1, 4, 12):
        ours = normal_cg_solve(Counted(A), b, iters, rho).x
        cg = cg_solve(lambda V: (V @ damped) @ damped, b @ damped, iters).x
        assert rel(ours, cg) < 1e-13, iters


def test_normal_cg_spends_one_plus_two_products_per_iteration(loop):
    mv = Counted(indefinite())
    normal_cg_solve(mv, rhs(30), 7)
    assert mv.calls == 1 + 2 * 7


@pytest.mark.parametrize("rho", [0.0, 0.5])
def test_normal_cg_converges_on_an_indefinite_system(loop, rho):
    A, b = indefinite(), rhs(30)
    x = normal_cg_solve(Counted(A), b, 30, rho).x
    truth = torch.linalg.solve(A + rho * torch.eye(30, dtype=DT), b)
    assert rel(x, truth) < 1e-10
    assert rel(normal_cg_solve(Counted(A), b, 3, rho).x, truth) > 1e-3  # not trivially exact


def test_normal_cg_tol_is_the_relative_residual_of_the_normal_equations(loop):
    A, b = indefinite(), rhs(30)
    mv = Counted(A)
    x = normal_cg_solve(mv, b, 30, tol=1e-6).x
    assert mv.calls < 1 + 2 * 30
    assert (A @ (A @ x) - A @ b).norm() <= 1e-6 * (A @ b).norm() * (1 + 1e-6)


def test_normal_cg_zero_rhs_gives_zero_not_nan(loop):
    assert torch.equal(normal_cg_solve(Counted(indefinite(6)), torch.zeros(6, dtype=DT), 4).x, torch.zeros(6, dtype=DT))


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_normal_cg_half_and_single_precision_b_match_float64_to_their_precision(loop, dtype, tol):
    A, b = indefinite().to(dtype), rhs(30).to(dtype)
    x = normal_cg_solve(lambda V: V @ A, b, 30).x
    assert x.dtype == dtype
    assert rel(x.double(), torch.linalg.solve(A.double(), b.double())) < tol


def test_data_parallel_matvec_keeps_the_masked_cg_loop_under_normal_cg(monkeypatch):
    """The squared operator carries the matvec's `collective`: CG keeps its masked loop (every rank, every product)."""
    monkeypatch.setattr(cg_module, "_cg_host", lambda *args: pytest.fail("a collective matvec took the host loop"))
    mv = Counted(indefinite())
    collective = Operator(mv, collective=True)
    x = normal_cg_solve(collective, rhs(30), 5).x
    assert mv.calls == 1 + 2 * 5 and torch.isfinite(x).all()


def test_normal_cg_class_validates_reports_its_damping_and_never_writes_into_b(loop):
    with pytest.raises(ValueError, match="Invalid iters"):
        NormalCG(iters=0)
    with pytest.raises(ValueError, match="Invalid rho"):
        NormalCG(rho=float("nan"))
    with pytest.raises(ValueError, match="Invalid tol"):
        NormalCG(tol=-1.0)
    solver = NormalCG(iters=5, rho=0.1, tol=1e-5)
    assert solver.name == "normal_cg" and solver.damping == 0.1
    assert repr(solver) == "NormalCG(iters=5, rho=0.1, tol=1e-05)"
    assert repr(make_solver("normal_cg", iters=5, rho=0.1, tol=1e-5)) == repr(solver)
    A, b = indefinite(), rhs(30)
    before = b.clone()
    solution = run_solver(solver, Counted(A), b)
    assert torch.equal(b, before) and solution.x.data_ptr() != b.data_ptr()
    assert solution.diverged is None and solution.negative_curvature is None


@pytest.mark.parametrize("problem", ["ridge", "logistic"])
def test_normal_cg_hypergradient_matches_exact(problem, request):
    P = request.getfixturevalue(problem)
    p = P.hessian.shape[0]
    (g,), info = implicit_hypergradient([P.phi], P.train_loss, P.val_loss, P.model, NormalCG(iters=3 * p))
    assert not info.skipped and info.hvps == 1 + 2 * 3 * p
    assert rel(g, P.exact) < 1e-8


# --- parity with torchopt ---------------------------------------------------------------------------

def torchopt_normal_cg(A, b, **kwargs):
    """torchopt.linear_solve.solve_normal_cg on the dense A (its matvec takes and returns a vector)."""
    linear_solve = pytest.importorskip("torchopt.linear_solve")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torchopt 0.7.3 calls the deprecated functorch.vjp
        return linear_solve.solve_normal_cg(**kwargs)(lambda v: A @ v, b)


@pytest.mark.parametrize("rho", [0.0, 0.4])
def test_normal_cg_equals_torchopt_solve_normal_cg_at_the_same_iterations(loop, rho):
    """maxiter ↔ iters, rtol = 0 ↔ tol = None; torchopt's A is our H + ρI (its ridge would be added to A²)."""
    A, b = indefinite(), rhs(30)
    damped = A + rho * torch.eye(30, dtype=DT)
    for iters in (1, 2, 5, 10, 30):
        theirs = torchopt_normal_cg(damped, b, maxiter=iters, rtol=0.0)
        ours = normal_cg_solve(Counted(A), b, iters, rho).x
        assert rel(ours, theirs) < 1e-12, iters


def test_normal_cg_equals_torchopt_with_its_default_tolerance(loop):
    """torchopt's defaults (rtol = 1e-5, maxiter = 10p) and its iMAML example (maxiter = 5) as NormalCG settings."""
    A, b = indefinite(), rhs(30)
    assert rel(normal_cg_solve(Counted(A), b, 10 * 30, tol=1e-5).x, torchopt_normal_cg(A, b)) < 1e-12
    assert rel(NormalCG(iters=5, tol=1e-5).solve(Counted(A), b), torchopt_normal_cg(A, b, maxiter=5, atol=0)) < 1e-12
