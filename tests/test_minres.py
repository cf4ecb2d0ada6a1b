"""MINRES against dense float64 linear algebra (symmetric positive definite, indefinite, singular), both loops."""

import pytest
import torch
from torch import nn

import hyperopt_torch.ihvp.minres as minres_module
from hyperopt_torch import ConjugateGradient, HyperOptimizer, Minres, implicit_hypergradient, make_solver
from hyperopt_torch.ihvp import Operator, cg_solve, minres_solve, neumann_solve, run_solver

from conftest import Counted, forbid_host_sync, gen, spectrum

DT = torch.float64


def spd(p=30, cond=10.0):
    return spectrum(torch.logspace(0, torch.log10(torch.tensor(cond)).item(), p, dtype=DT))


def indefinite(p=30):
    """Eigenvalues ±[1, 3]: well conditioned, half of them negative."""
    return spectrum(torch.cat([-torch.linspace(1, 3, p // 2, dtype=DT), torch.linspace(1, 3, p - p // 2, dtype=DT)]))


def rel(x, y):
    return ((x - y).norm() / y.norm()).item()


def rhs(p, seed=1, dtype=DT):
    return torch.randn(p, generator=gen(seed), dtype=DT).to(dtype)


@pytest.fixture(params=["host", "device"])
def loop(request, monkeypatch):
    """Run a test with both loops: scalars as Python floats (host memory) and as 0-dim tensors (a GPU's)."""
    if request.param == "device":
        monkeypatch.setattr(minres_module, "HOST_SCALARS", ())
    return request.param


def krylov_minimiser(A, b, l):
    """argmin over x ∈ span{b, Ab, …, A^{l−1}b} of ‖b − Ax‖, from an orthonormal Krylov basis
    (Gram–Schmidt twice, so the basis stays orthogonal where Lanczos would not)."""
    basis = [b / b.norm()]
    for _ in range(l - 1):
        v = A @ basis[-1]
        for _ in range(2):
            v = v - torch.stack(basis).T @ (torch.stack(basis) @ v)
        basis.append(v / v.norm())
    V = torch.stack(basis, dim=1)
    y = torch.linalg.lstsq(A @ V, b).solution
    return V @ y


# --- exactness and the Krylov property ------------------------------------------------------------

@pytest.mark.parametrize("A, rho", [(spd(), 0.0), (indefinite(), 0.0), (spd(), 0.5), (indefinite(), 0.5)],
                         ids=["spd", "indefinite", "spd-damped", "indefinite-damped"])
def test_minres_is_exact_after_p_steps_on_spd_and_indefinite_systems(loop, A, rho):
    p = A.shape[0]
    b = rhs(p)
    mv = Counted(A)
    x = minres_solve(mv, b, p, rho).x
    assert mv.calls == p
    assert rel(x, torch.linalg.solve(A + rho * torch.eye(p, dtype=DT), b)) < 1e-10


def test_minres_iterates_are_the_minimum_residual_points_of_the_krylov_spaces(loop):
    A, b = indefinite(), rhs(30)
    for l in (1, 2, 3, 5, 8, 12):
        assert rel(minres_solve(Counted(A), b, l).x, krylov_minimiser(A, b, l)) < 1e-10, l


def test_minres_residual_never_grows_on_an_indefinite_system(loop):
    A, b = indefinite(), rhs(30)
    residuals = [(b - A @ minres_solve(Counted(A), b, l).x).norm().item() for l in range(1, 31)]
    assert all(later <= earlier * (1 + 1e-12) for earlier, later in zip(residuals, residuals[1:]))
    assert residuals[4] < 0.5 * b.norm() and residuals[-1] < 1e-12 * b.norm()


def test_minres_solves_what_stops_cg_and_diverges_neumann(loop):
    """Eigenvalues from −1 to 4: CG stops at negative curvature, Neumann's terms grow, MINRES converges."""
    lam = torch.linspace(-1.0, 4.0, 20, dtype=DT)
    A = spectrum(lam[lam.abs() > 0.05])
    p = A.shape[0]
    b = rhs(p, seed=6)
    truth = torch.linalg.solve(A, b)
    assert bool(cg_solve(Counted(A), b, 2 * p).negative_curvature)
    assert bool(neumann_solve(Counted(A), b, 60, 0.1).diverged)
    x = minres_solve(Counted(A), b, 2 * p).x
    assert torch.isfinite(x).all() and rel(x, truth) < 1e-8
    # a truncated MINRES is inexact but bounded by b: its residual is at most ‖b‖
    short = minres_solve(Counted(A), b, 3).x
    assert (b - A @ short).norm() <= b.norm() and rel(short, truth) > 1e-2


# --- special right-hand sides and singular systems ------------------------------------------------

def test_minres_zero_rhs_gives_zero_not_nan(loop):
    x = minres_solve(Counted(indefinite(8)), torch.zeros(8, dtype=DT), 5).x
    assert torch.equal(x, torch.zeros(8, dtype=DT))


def test_minres_stops_at_an_exact_solution_without_nan(loop):
    """b = e₁ is an eigenvector: the first Lanczos step breaks down (β₂ = 0) with x = b/2, exactly."""
    A = torch.diag(torch.tensor([2.0, 1.0, -1.0, 3.0], dtype=DT))
    b = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=DT)
    mv = Counted(A)
    x = minres_solve(mv, b, 6).x
    assert torch.equal(x, b / 2)
    # the host loop returns there; the device loop masks the remaining iterations (no synchronisation)
    assert mv.calls == (1 if loop == "host" else 6)


def test_minres_on_a_singular_consistent_system_gives_the_minimum_norm_solution(loop):
    """Rank 20 of 30, indefinite, b in the range: the Krylov space stays in the range, so x = A⁺b."""
    lam = torch.linspace(-2.0, 3.0, 20, dtype=DT)
    lam[lam.abs() < 0.1] += 0.3
    A = spectrum(torch.cat([lam, torch.zeros(10, dtype=DT)]))
    b = A @ rhs(30, seed=2)
    x = minres_solve(Counted(A), b, 30).x
    assert rel(A @ x, b) < 1e-12
    assert rel(x, torch.linalg.pinv(A) @ b) < 1e-10


def test_minres_with_b_in_the_null_space_returns_zero_not_nan(loop):
    """H b = 0, ρ = 0: T₁ = [0] is singular (γ₁ = 0); x₀ = 0 is a least-squares solution."""
    A = torch.diag(torch.tensor([2.0, -1.0, 0.0], dtype=DT))
    x = minres_solve(Counted(A), torch.tensor([0.0, 0.0, 1.0], dtype=DT), 4).x
    assert torch.equal(x, torch.zeros(3, dtype=DT))
    x = minres_solve(Counted(A), torch.tensor([0.0, 0.0, 1.0], dtype=DT), 4, rho=0.5).x  # ρ makes it regular
    assert torch.equal(x, torch.tensor([0.0, 0.0, 2.0], dtype=DT))


def test_minres_non_finite_product_reaches_x_and_is_not_masked_away(loop):
    """A NaN in the products must give a non-finite x (the step is then skipped), not a stale finite iterate."""
    A = indefinite(10)
    calls = []

    def broken(V):
        calls.append(1)
        out = V @ A
        return out * float("nan") if len(calls) == 3 else out

    assert not torch.isfinite(minres_solve(broken, rhs(10), 8).x).all()


def test_minres_step_beyond_float32_range_is_non_finite_not_an_error(loop):
    """H = diag(1, 1e-39) in float32: 1/γ overflows float32; both loops give a non-finite x."""
    A = torch.diag(torch.tensor([1.0, 1e-39]))
    x = minres_solve(lambda V: V @ A, torch.tensor([0.0, 1e5]), 3).x
    assert not torch.isfinite(x).all()


# --- tolerance, precision, loops ------------------------------------------------------------------

def test_minres_tol_stops_early_at_the_requested_residual(loop):
    A, b = indefinite(), rhs(30)
    mv = Counted(A)
    x = minres_solve(mv, b, 30, tol=1e-6).x
    assert mv.calls < 30
    assert (A @ x - b).norm() <= 1e-6 * b.norm() * (1 + 1e-6)
    assert (A @ minres_solve(Counted(A), b, mv.calls - 1).x - b).norm() > 1e-6 * b.norm()  # not earlier


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_minres_half_and_single_precision_b_match_float64_to_their_precision(loop, dtype, tol):
    """The products run in b's dtype on the matrix rounded to it; the vectors in at least float32."""
    A, b = indefinite(), rhs(30, dtype=dtype)
    A_low = A.to(dtype)
    x = minres_solve(lambda V: V @ A_low, b, 30).x
    assert x.dtype == dtype
    assert rel(x.double(), torch.linalg.solve(A_low.double(), b.double())) < tol


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("A", [spd(25), indefinite(25), torch.diag(torch.tensor([2.0, -1.0, 0.0, 0.0], dtype=DT))],
                         ids=["spd", "indefinite", "singular"])
def test_minres_host_and_device_loops_agree(monkeypatch, A, dtype, tol):
    """Python-float scalars (float64) and 0-dim tensors (b's dtype) give the same iterates to rounding."""
    A = A.to(dtype)
    b = A @ torch.randn(A.shape[0], generator=gen(3), dtype=dtype)  # in A's range: the singular system has a solution
    for iters, rho in [(3, 0.0), (10, 0.0), (10, 0.5)]:
        host = minres_solve(lambda V: V @ A, b, iters, rho)
        monkeypatch.setattr(minres_module, "HOST_SCALARS", ())
        device = minres_solve(lambda V: V @ A, b, iters, rho)
        monkeypatch.undo()
        assert host.x.dtype == device.x.dtype == dtype
        assert rel(host.x, device.x) < tol, (iters, rho)


def test_minres_device_loop_never_synchronises(monkeypatch):
    """Without tol nothing inside the device loop reads a value on the host, breakdowns included."""
    calls = forbid_host_sync(monkeypatch, minres_module)
    indefinite_x = minres_solve(Counted(indefinite()), rhs(30), 40).x
    diagonal = torch.diag(torch.tensor([2.0, 1.0], dtype=DT))
    breakdown_x = minres_solve(Counted(diagonal), torch.tensor([1.0, 0.0], dtype=DT), 5).x
    zero_x = minres_solve(Counted(indefinite(4)), torch.zeros(4, dtype=DT), 3).x
    monkeypatch.undo()
    assert not calls
    assert rel(indefinite_x, torch.linalg.solve(indefinite(), rhs(30))) < 1e-10
    assert torch.equal(breakdown_x, torch.tensor([0.5, 0.0], dtype=DT))
    assert torch.equal(zero_x, torch.zeros(4, dtype=DT))


def test_data_parallel_matvec_keeps_the_masked_minres_loop():
    """A `collective` matvec (an all-reduce inside): every rank makes all products, even after a breakdown."""
    A = torch.diag(torch.tensor([2.0, 1.0, -1.0, 3.0], dtype=DT))
    b = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=DT)
    mv = Counted(A)
    collective = Operator(mv, collective=True)
    assert torch.equal(minres_solve(collective, b, 6).x, b / 2) and mv.calls == 6
    mv.calls = 0
    B, c = indefinite(), rhs(30)
    mv.A = B
    x = minres_solve(collective, c, 30, tol=1e-3).x  # the tol test, on values equal on every rank, may end it
    assert mv.calls < 30 and (B @ x - c).norm() <= 1e-3 * c.norm() * (1 + 1e-6)


# --- the solver object ------------------------------------------------------------------------------

def test_minres_class_validates_reports_its_damping_and_never_writes_into_b(loop):
    with pytest.raises(ValueError, match="Invalid iters"):
        Minres(iters=0)
    with pytest.raises(ValueError, match="Invalid rho"):
        Minres(rho=-1.0)
    with pytest.raises(ValueError, match="Invalid tol"):
        Minres(tol=0.0)
    solver = Minres(iters=7, rho=0.25, tol=1e-3)
    assert solver.name == "minres" and solver.damping == 0.25
    assert repr(solver) == "Minres(iters=7, rho=0.25, tol=0.001)"
    assert repr(make_solver("minres", iters=7, rho=0.25, tol=1e-3)) == repr(solver)
    A, b = indefinite(), rhs(30)
    before = b.clone()
    solution = run_solver(solver, Counted(A), b)
    assert torch.equal(b, before) and solution.x.data_ptr() != b.data_ptr()
    assert solution.diverged is None and solution.negative_curvature is None
    assert torch.equal(solver.solve(Counted(A), b), solution.x)


def test_hyperoptimizer_builds_minres_from_its_name():
    h = torch.zeros(3, requires_grad=True)
    solver = HyperOptimizer([h], base=torch.optim.SGD, ihvp="minres", iters=4, rho=0.1, tol=1e-6, lr=0.1).solver
    assert isinstance(solver, Minres) and (solver.iters, solver.rho, solver.tol) == (4, 0.1, 1e-6)
    with pytest.raises(ValueError, match="alpha does not apply to ihvp='minres'"):
        HyperOptimizer([h], base=torch.optim.Adam, ihvp="minres", alpha=0.3)


# --- end to end -------------------------------------------------------------------------------------

@pytest.mark.parametrize("problem", ["ridge", "logistic"])
def test_minres_hypergradient_matches_exact(problem, request):
    P = request.getfixturevalue(problem)
    p = P.hessian.shape[0]
    (g,), info = implicit_hypergradient([P.phi], P.train_loss, P.val_loss, P.model, "minres")  # default l = 10
    (g_full,), info_full = implicit_hypergradient([P.phi], P.train_loss, P.val_loss, P.model, Minres(iters=p))
    assert not info_full.skipped and info_full.hvps == p  # one product per iteration
    assert rel(g_full, P.exact) < 1e-8
    assert rel(g, P.exact) < 1e-2  # 10 < p iterations: close, not exact


def test_minres_hypergradient_on_an_indefinite_hessian_is_exact_where_cg_stops():
    """f(θ, φ) = ½θᵀAθ + φᵀθ with an indefinite A: dg/dφ = −A⁻¹∇_θ g; CG stops and warns, MINRES does not."""
    lam = torch.linspace(-1.0, 4.0, 20, dtype=DT)
    A = spectrum(lam[lam.abs() > 0.05])
    p = A.shape[0]
    model = nn.Linear(p, 1, bias=False).to(DT)
    phi = torch.randn(p, generator=gen(7), dtype=DT).requires_grad_()
    target = torch.randn(p, generator=gen(8), dtype=DT)
    train = lambda m: 0.5 * m.weight[0] @ A @ m.weight[0] + phi @ m.weight[0]
    val = lambda m: 0.5 * ((m.weight[0] - target) ** 2).sum()
    exact = -torch.linalg.solve(A, (model.weight[0] - target).detach())
    (g,), info = implicit_hypergradient([phi], train, val, model, Minres(iters=2 * p))
    assert not (info.negative_curvature or info.skipped) and rel(g, exact) < 1e-8
    with pytest.warns(RuntimeWarning, match="negative curvature"):
        (g_cg,), _ = implicit_hypergradient([phi], train, val, model, ConjugateGradient(iters=2 * p))
    assert rel(g_cg, exact) > 0.1
