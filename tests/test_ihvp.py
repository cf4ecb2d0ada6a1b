"""Every solver against dense linear algebra, through a matvec over a materialised matrix."""

import pytest
import torch

from hyperopt_torch import ConjugateGradient, Exact, Identity, Neumann, Nystrom, make_solver
import hyperopt_torch.ihvp.cg as cg_module
from hyperopt_torch.ihvp import (
    Operator, Solution, cg_solve, exact_solve, identity_solve, neumann_solve, nystrom_solve, run_solver, sample_columns,
)

from conftest import Counted, forbid_host_sync, gen, spectrum

DT = torch.float64


def spd(p, cond=10.0, seed=0, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(p, p, generator=g, dtype=DT))
    lam = torch.logspace(0, torch.log10(torch.tensor(cond)).item(), p, dtype=DT)
    return ((Q * lam) @ Q.T).to(dtype)


def low_rank_plus_noise(p, r, noise, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(p, p, generator=g, dtype=DT))
    lam = torch.cat([torch.linspace(10, 1, r, dtype=DT), noise * torch.rand(p - r, generator=g, dtype=DT)])
    return (Q * lam) @ Q.T


def rel(x, y):
    return ((x - y).norm() / y.norm()).item()


def damped_solve(A, b, rho):
    return torch.linalg.solve(A + rho * torch.eye(A.shape[0], dtype=A.dtype), b)


@pytest.fixture(params=["host", "device"])
def loop(request, monkeypatch):
    """Run a CG test with both loops: scalars as Python floats (host memory) and as 0-dim tensors (a GPU's)."""
    if request.param == "device":
        monkeypatch.setattr(cg_module, "HOST_SCALARS", ())
    return request.param




# --- Nyström -------------------------------------------------------------------------------------

@pytest.mark.parametrize("sketch", ["columns", "gaussian"])
@pytest.mark.parametrize("chunk", [None, 1, 4])
@pytest.mark.parametrize("rho", [1e-2, 1e-9])
def test_nystrom_at_full_rank_is_the_exact_damped_solve(sketch, chunk, rho):
    p = 24
    A, b = spd(p, cond=100.0), torch.randn(p, generator=gen(1), dtype=DT)
    x = nystrom_solve(Counted(A), b, p, rho, chunk, sketch, gen())
    assert rel(x, damped_solve(A, b, rho)) < 1e-6


def test_literal_eq6_loses_digits_where_nystrom_solve_does_not():
    """The motivation for the eigen route: Eq. 6 as written, at k = p and ρ = 1e-9."""
    p, rho = 24, 1e-9
    A, b = spd(p, cond=100.0), torch.randn(p, generator=gen(1), dtype=DT)
    C, W = A, A  # all columns: H[:, K] = H, H[K, K] = H
    eq6 = b / rho - C @ torch.linalg.solve(W + C.T @ C / rho, C.T @ b) / rho**2
    truth = damped_solve(A, b, rho)
    assert rel(eq6, truth) > 1e-6
    assert rel(nystrom_solve(Counted(A), b, p, rho, generator=gen()), truth) < 1e-10


@pytest.mark.parametrize("sketch", ["columns", "gaussian"])
def test_nystrom_chunk_sizes_agree_to_float_precision(sketch):
    p, k = 50, 12
    A, b = low_rank_plus_noise(p, 8, 1e-2), torch.randn(p, generator=gen(2), dtype=DT)
    xs = [nystrom_solve(Counted(A), b, k, 0.05, chunk, sketch, gen(3)) for chunk in (None, 1, 5, 12)]
    for x in xs[1:]:
        assert rel(x, xs[0]) < 1e-10


def test_nystrom_hvp_counts_follow_the_chunk_schedule():
    p, k = 40, 10
    A, b = spd(p), torch.randn(p, dtype=DT)
    # κ = k: one batched pass.  κ < k: block 0, the upper triangle of block pairs
    # (one block of each row is kept as the next row's own block), then every block
    # but the last again for the final combination: κ·m(m+1)/2 for equal blocks.
    # κ = 3, k = 10 has blocks 3,3,3,1: 3 + (7 + 4 + 1) + (3 + 3 + 3) = 24.
    # Products come in batches of κ vectors, never one at a time: κ = k is one
    # batched call; the blocked schedules make one call per block (pair).
    for chunk, expected, batches in [(None, 10, 1), (10, 10, 1), (1, 55, 55), (5, 15, 3), (3, 24, 10)]:
        for sketch in ("columns", "gaussian"):
            mv = Counted(A)
            nystrom_solve(mv, b, k, 0.1, chunk, sketch, gen())
            assert (mv.calls, mv.batches) == (expected, batches), (chunk, sketch)


def test_nystrom_matches_its_dense_low_rank_definition():
    """(H_k + ρI)⁻¹b with H_k = H[:,K] H[K,K]⁺ H[:,K]ᵀ materialised (Eq. 4), at k < p."""
    p, k, rho = 30, 7, 0.1
    A, b = spd(p, cond=50.0), torch.randn(p, dtype=DT)
    index = sample_columns(p, k, gen(5))
    C = A[:, index]
    Hk = C @ torch.linalg.pinv(A[index][:, index]) @ C.T
    x = nystrom_solve(Counted(A), b, k, rho, generator=gen(5))
    assert rel(x, damped_solve(Hk, b, rho)) < 1e-10


def test_nystrom_error_shrinks_with_rank():
    p, rho = 60, 0.1
    errors = {}
    for k in (5, 10, 20, 40):
        runs = []
        for seed in range(5):
            A = low_rank_plus_noise(p, 20, 1e-3, seed)
            b = torch.randn(p, generator=gen(100 + seed), dtype=DT)
            runs.append(rel(nystrom_solve(Counted(A), b, k, rho, generator=gen(seed)), damped_solve(A, b, rho)))
        errors[k] = sum(runs) / len(runs)
    assert errors[5] > errors[10] > errors[20] > errors[40]
    assert errors[40] < 0.05


def test_nystrom_obeys_theorem_1_bound():
    """‖h* − h‖ ≤ ‖g‖‖F‖ (1/ρ)·‖E‖/(ρ + ‖E‖), E = H − H_k, for a PSD H (Eq. 10)."""
    p, h, k, rho = 40, 6, 8, 0.1
    A = low_rank_plus_noise(p, 20, 0.0)
    g = torch.randn(p, generator=gen(7), dtype=DT)
    F = torch.randn(p, h, generator=gen(8), dtype=DT)
    index = sample_columns(p, k, gen(9))
    C = A[:, index]
    E = torch.linalg.matrix_norm(A - C @ torch.linalg.pinv(A[index][:, index]) @ C.T, ord=2).item()
    h_true = F.T @ damped_solve(A, g, rho)
    h_nys = F.T @ nystrom_solve(Counted(A), g, k, rho, generator=gen(9))
    bound = g.norm() * torch.linalg.matrix_norm(F, ord=2) / rho * E / (rho + E)
    assert E > 0  # the check is not vacuous
    assert (h_true - h_nys).norm() <= bound


def test_nystrom_zero_hessian_columns_stay_finite():
    """A dead ReLU unit gives an all-zero Hessian row/column; W = H[K,K] is then singular."""
    p = 20
    A = spd(p)
    dead = torch.tensor([0, 3, 4, 11])
    A[dead] = 0
    A[:, dead] = 0
    b = torch.randn(p, dtype=DT)
    index = sample_columns(p, 8, gen(0))
    assert torch.isin(index, dead).any()  # the sketch did pick a dead column
    x = nystrom_solve(Counted(A), b, 8, 0.01, generator=gen(0))
    assert torch.isfinite(x).all()
    # and at full rank it is the exact damped solve of the singular matrix
    assert rel(nystrom_solve(Counted(A), b, p, 0.01, generator=gen(0)), damped_solve(A, b, 0.01)) < 1e-10


def test_nystrom_zero_matrix_gives_b_over_rho():
    b = torch.randn(10, dtype=DT)
    x = nystrom_solve(Counted(torch.zeros(10, 10, dtype=DT)), b, 4, 0.5, generator=gen())
    torch.testing.assert_close(x, b / 0.5)


def test_nystrom_rank_above_p_is_capped():
    A, b = spd(6), torch.randn(6, dtype=DT)
    mv = Counted(A)
    x = nystrom_solve(mv, b, 50, 1e-9, generator=gen())
    assert mv.calls == 6 and rel(x, damped_solve(A, b, 1e-9)) < 1e-8


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nystrom_keeps_dtype(dtype):
    A, b = spd(16, dtype=dtype), torch.randn(16, dtype=dtype)
    x = nystrom_solve(Counted(A), b, 16, 0.01, generator=gen())
    assert x.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    assert rel(x.double(), damped_solve(A.double(), b.double(), 0.01)) < tol


def test_nystrom_same_generator_state_same_answer():
    A, b = low_rank_plus_noise(30, 10, 1e-2), torch.randn(30, dtype=DT)
    x1 = Nystrom(5, 0.1).solve(Counted(A), b, gen(4))
    x2 = Nystrom(5, 0.1).solve(Counted(A), b, gen(4))
    x3 = Nystrom(5, 0.1).solve(Counted(A), b, gen(5))
    assert torch.equal(x1, x2) and not torch.equal(x1, x3)


# --- CG, Neumann, identity, exact ---------------------------------------------------------------

def test_cg_is_exact_after_p_steps_on_spd(loop):
    p = 20
    # b from its own generator: drawn from the global one it depended on the tests run before (with 4 in 300
    # seeds, finite-precision CG is 1.1–1.7e-8 off after exactly p steps).
    A, b = spd(p, cond=20.0), torch.randn(p, generator=gen(7), dtype=DT)
    mv = Counted(A)
    x = cg_solve(mv, b, p).x
    assert mv.calls == p
    assert rel(x, torch.linalg.solve(A, b)) < 1e-8


def test_cg_with_damping_solves_the_damped_system(loop):
    A, b = spd(15), torch.randn(15, dtype=DT)
    assert rel(ConjugateGradient(15, rho=0.3).solve(Counted(A), b), damped_solve(A, b, 0.3)) < 1e-8


def test_cg_truncated_is_inexact_and_tol_stops_early(loop):
    A, b = spd(30, cond=1e3), torch.randn(30, dtype=DT)
    assert rel(cg_solve(Counted(A), b, 3).x, torch.linalg.solve(A, b)) > 1e-2
    mv = Counted(spd(30, cond=2.0))
    x = cg_solve(mv, b, 30, tol=1e-6).x
    assert mv.calls < 30 and ((mv.A @ x - b).norm() / b.norm()) <= 1e-6


def test_cg_zero_rhs_gives_zero_not_nan(loop):
    x, _, negative, *_ = cg_solve(Counted(spd(5)), torch.zeros(5, dtype=DT), 5)
    assert torch.equal(x, torch.zeros(5, dtype=DT)) and not negative


def test_neumann_is_the_truncated_series():
    A, b = spd(12, cond=5.0), torch.randn(12, dtype=DT)
    alpha, iters = 0.1, 7
    M = torch.eye(12, dtype=DT) - alpha * A
    series = alpha * sum(torch.linalg.matrix_power(M, j) @ b for j in range(iters + 1))
    mv = Counted(A)
    assert rel(neumann_solve(mv, b, iters, alpha).x, series) < 1e-12
    assert mv.calls == iters


def test_neumann_converges_to_inverse_when_contractive():
    A, b = spd(12, cond=5.0), torch.randn(12, dtype=DT)  # ‖A‖ = 5, α = 0.15 < 2/5
    assert rel(Neumann(400, 0.15).solve(Counted(A), b), torch.linalg.solve(A, b)) < 1e-10


def test_identity_returns_b_without_hvps():
    b = torch.randn(5, dtype=DT)
    mv = Counted(spd(5))
    x = identity_solve(mv, b)
    assert torch.equal(x, b) and x is not b and mv.calls == 0
    assert torch.equal(Identity().solve(mv, b), b)


def test_exact_solves_and_refuses_large_problems():
    A, b = spd(40, cond=1e4), torch.randn(40, dtype=DT)
    mv = Counted(A)
    assert rel(exact_solve(mv, b, batch=16), torch.linalg.solve(A, b)) < 1e-10
    assert mv.calls == 40
    assert rel(Exact(rho=0.5).solve(Counted(A), b), damped_solve(A, b, 0.5)) < 1e-12
    with pytest.raises(ValueError, match="needs about .* GiB .*max_memory"):
        Exact(max_memory=40 * 40 * 56 - 1).solve(Counted(A), b)


def test_exact_with_tiny_damping_has_no_rounding_blown_up_by_one_over_rho():
    """Every eigenvalue is data: the noise-level complement is empty and must contribute nothing, not
    (b − UUᵀb)/ρ, whose ε‖b‖ rounding 1/ρ = 1e13 turned into a 1e-3 relative error."""
    A, b = spd(40, cond=1e2), torch.randn(40, dtype=DT)
    for rho in (1e-13, 1e-9):
        assert rel(Exact(rho=rho).solve(Counted(A), b), damped_solve(A, b, rho)) < 1e-12


# --- cut-offs: which eigenvalues are data (A1, A2) ----------------------------------------------

def test_float32_nystrom_at_full_rank_keeps_directions_far_below_the_largest():
    """d = λ² in the second decomposition: a relative cut-off there of k·ε dropped |λ| < √(kε)·λmax
    (3e-3 of the largest in float32) and sent those directions to b/ρ."""
    p = 64
    A = spectrum(64 * torch.logspace(0, -4, p, dtype=DT)).float()  # a loss summed over 64 examples
    b = torch.randn(p, generator=gen(1), dtype=torch.float32)
    for rho in (0.01, 1e-9):
        x = nystrom_solve(lambda V: V @ A, b, p, rho, generator=gen())
        assert rel(x.double(), damped_solve(A.double(), b.double(), rho)) < 1e-3, rho  # κ·ε₃₂ = 1.2e-3


def low_precision_matvec(A, dtype):
    """Products of a dense matrix rounded as a model in ``dtype`` would round them."""
    Ad = A.to(dtype)
    return lambda V: V @ Ad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("solve", [
    lambda mv, b, rho: nystrom_solve(mv, b, 200, rho, generator=gen()),
    lambda mv, b, rho: exact_solve(mv, b, rho),
], ids=["nystrom-200", "exact"])
def test_half_precision_cut_off_keeps_every_eigenvalue_above_the_rounding(dtype, solve):
    """k or p ≥ 128 in bfloat16 made k·ε·max|λ| ≥ max|λ|: every eigenvalue was dropped.  Products
    that agree exactly (rows of a stored matrix) are data down to the smallest eigenvalue, here
    ρ/3: a cut at ε·max|λ| would send those directions to b/ρ (35 % off)."""
    p, rho = 256, 0.01
    A = spectrum(torch.logspace(0, -2.5, p, dtype=DT))
    A16 = A.to(dtype).double()
    b = torch.randn(p, generator=gen(2), dtype=DT).to(dtype)
    x = solve(low_precision_matvec(A, dtype), b, rho)
    assert x.dtype == dtype
    truth = damped_solve(A16, b.double(), rho)
    if solve.__code__.co_names.count("nystrom_solve"):  # rank 200 < p: the same sketch in float64
        truth = nystrom_solve(lambda V: V @ A16, b.double(), 200, rho, generator=gen())
    assert rel(x.double(), truth) < 5e-3  # x is rounded to b's dtype: 2⁻⁹ per entry in bfloat16


@pytest.mark.parametrize("solve", [
    lambda mv, b, rho: nystrom_solve(mv, b, 60, rho, generator=gen()),
    lambda mv, b, rho: exact_solve(mv, b, rho),
], ids=["nystrom", "exact"])
def test_noise_eigenvalues_of_products_stored_in_float32_are_cut(solve):
    """bfloat16-sized errors in float32 storage (autocast): the float32 ε cannot see them, the
    skew-symmetric part of W does.  The null space of A must go to b/ρ, not to 1/noise."""
    p, rho = 60, 1e-4
    A = spectrum(torch.cat([torch.linspace(10, 1, 20, dtype=DT), torch.zeros(40, dtype=DT)])).float()
    noise = torch.Generator().manual_seed(3)

    def matvec(V):
        out = V @ A
        return out + 4e-3 * out.abs().max() * torch.randn(out.shape, generator=noise)

    b = torch.randn(p, generator=gen(4), dtype=torch.float32)
    x = solve(matvec, b, rho)
    assert rel(x.double(), damped_solve(A.double(), b.double(), rho)) < 0.05


# --- divergence and negative curvature (A4) ------------------------------------------------------

def test_neumann_flags_a_step_above_two_over_lambda_max():
    A, b = spd(12, cond=10.0), torch.randn(12, generator=gen(1), dtype=DT)  # λmax = 10
    x, diverged, _, *_ = neumann_solve(Counted(A), b, 20, alpha=0.25)
    assert bool(diverged) and torch.isfinite(x).all()  # finite, and wrong by orders of magnitude
    assert rel(x, torch.linalg.solve(A, b)) > 10


@pytest.mark.parametrize("seed", range(6))
def test_neumann_flag_from_the_last_term_equals_the_flag_from_every_term(seed):
    """‖v_j‖² = Σ c_i² μ_i^{2j} is convex in j, so no middle term exceeds both ends: checking v_l is enough."""
    g = gen(seed)
    lam = torch.cat([torch.rand(8, generator=g, dtype=DT) * 10 - 2, torch.tensor([0.0], dtype=DT)])
    A, b = spectrum(lam, seed), torch.randn(9, generator=g, dtype=DT)
    for alpha in (0.05, 0.19, 0.21, 0.4):
        for iters in (1, 2, 5, 20):
            M, v, norms = torch.eye(9, dtype=DT) - alpha * A, b, [b.norm()]
            for _ in range(iters):
                v = M @ v
                norms.append(v.norm())
            every_term = bool(max(norms[1:]) > (1 + torch.finfo(DT).eps ** 0.5) * norms[0])
            assert bool(neumann_solve(Counted(A), b, iters, alpha).diverged) == every_term, (alpha, iters)


def test_neumann_flags_negative_curvature():
    A = spd(10)
    A[0, 0] = -5.0
    assert bool(Neumann(20, 0.1).solve_with_flags(Counted(A), torch.ones(10, dtype=DT)).diverged)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_neumann_is_not_flagged_when_contractive_even_on_a_null_space(dtype):
    """α just below 2/λmax, and directions with λ = 0 whose terms never shrink."""
    A = spectrum(torch.cat([torch.linspace(10, 1, 20, dtype=DT), torch.zeros(10, dtype=DT)]))
    b = torch.randn(30, generator=gen(5), dtype=DT)
    solution = neumann_solve(low_precision_matvec(A, dtype), b.to(dtype), 200, alpha=0.199)
    assert not bool(solution.diverged) and solution.x.dtype == dtype


def test_run_solver_turns_a_diverged_solve_into_nan_and_keeps_custom_tensors():
    A, b = spd(12, cond=10.0), torch.randn(12, dtype=DT)
    out = run_solver(Neumann(20, 0.25), Counted(A), b)
    assert bool(out.diverged) and torch.isnan(out.x).all()

    class Custom:  # a user's solver returning a plain tensor
        name, damping = "custom", 0.0

        def solve(self, matvec, b, generator=None):
            return 2 * b

    out = run_solver(Custom(), Counted(A), b)
    assert isinstance(out, Solution) and torch.equal(out.x, 2 * b) and out.diverged is None
    # the built-in classes' solve() still returns a tensor (the flags come from solve_with_flags)
    assert isinstance(Neumann(20, 0.25).solve(Counted(A), b), torch.Tensor)


def indefinite(p=20, seed=0):
    lam = torch.linspace(-1.0, 4.0, p, dtype=DT)
    lam = lam[lam.abs() > 0.05]
    return spectrum(lam, seed)


def test_cg_stops_at_the_first_non_positive_curvature_and_flags_it(loop):
    A = indefinite()
    b = torch.randn(A.shape[0], generator=gen(6), dtype=DT)
    mv = Counted(A)
    x, _, negative, *_ = cg_solve(mv, b, 30)
    assert bool(negative)
    # The last iterate before the stop: more iterations change nothing, and it is the
    # minimiser over the positive-curvature Krylov directions, so bᵀx > 0 (a descent direction).
    assert torch.equal(x, cg_solve(Counted(A), b, 60).x)
    j = next(j for j in range(1, 30) if bool(cg_solve(Counted(A), b, j).negative_curvature))
    assert torch.equal(x, cg_solve(Counted(A), b, j - 1).x) and b @ x > 0
    # the host loop returns there; the device loop masks the remaining iterations (no synchronisation)
    assert mv.calls == (j if loop == "host" else 30)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
# well conditioned: after many iterations on cond 1e3 both loops sit ~1e-4 from x*, at different points
@pytest.mark.parametrize("A", [spd(25, cond=10.0), spd(25, cond=10.0) - 2.0 * torch.eye(25, dtype=DT),
                               torch.diag(torch.tensor([2.0, 1.0, 0.0, 0.0], dtype=DT))],
                         ids=["spd", "indefinite", "semidefinite"])
def test_cg_host_and_device_loops_agree(monkeypatch, A, dtype, tol):
    """Python-float scalars (float64) and 0-dim tensors (the model's dtype) give the same iterates to rounding."""
    A = A.to(dtype)
    b = A @ torch.randn(A.shape[0], generator=gen(3), dtype=dtype)  # in A's range: the semi-definite system has a solution
    for iters, rho in [(3, 0.0), (10, 0.0), (10, 0.5)]:  # (past convergence, both add up rounding noise)
        host = cg_solve(lambda V: V @ A, b, iters, rho)
        monkeypatch.setattr(cg_module, "HOST_SCALARS", ())
        device = cg_solve(lambda V: V @ A, b, iters, rho)
        monkeypatch.undo()
        assert bool(host.negative_curvature) == bool(device.negative_curvature)
        assert host.x.dtype == device.x.dtype == dtype
        assert rel(host.x, device.x) < tol, (iters, rho)


def test_cg_with_negative_curvature_at_the_first_step_returns_b(loop):
    b = torch.randn(8, dtype=DT)
    x, _, negative, *_ = cg_solve(Counted(-spd(8)), b, 5)
    assert bool(negative) and torch.equal(x, b)


def test_cg_on_spd_is_never_flagged_and_damping_can_make_it_spd(loop):
    b = torch.randn(20, dtype=DT)
    assert not bool(cg_solve(Counted(spd(20, cond=1e3)), b, 40).negative_curvature)
    A = indefinite()
    b = torch.randn(A.shape[0], generator=gen(6), dtype=DT)
    x, _, negative, *_ = cg_solve(Counted(A), b, A.shape[0] + 5, rho=1.5)
    assert not bool(negative) and rel(x, damped_solve(A, b, 1.5)) < 1e-8


def test_cg_and_neumann_loops_never_synchronise(monkeypatch):
    """The flags are device tensors: nothing inside the loops reads a value on the host."""
    A = indefinite()
    b = torch.randn(A.shape[0], generator=gen(6), dtype=DT)
    calls = forbid_host_sync(monkeypatch, cg_module)
    cg = cg_solve(Counted(A), b, 30)
    neumann = neumann_solve(Counted(A), b, 60, 0.1)  # λ = −1 grows 1.1× per term
    monkeypatch.undo()
    assert not calls and bool(cg.negative_curvature) and bool(neumann.diverged)


def test_data_parallel_matvec_keeps_the_masked_cg_loop():
    """A `collective` matvec (an all-reduce inside): no return that depends on locally computed values."""
    A = indefinite()
    b = torch.randn(A.shape[0], generator=gen(6), dtype=DT)
    mv = Counted(A)
    solution = cg_solve(Operator(mv, collective=True), b, 30)
    assert bool(solution.negative_curvature) and mv.calls == 30
    torch.testing.assert_close(solution.x, cg_solve(Counted(A), b, 30).x, rtol=1e-12, atol=0)


@pytest.mark.parametrize("loop_kind", ["host", "device"])
def test_cg_step_beyond_float32_range_is_skipped_not_an_error(monkeypatch, loop_kind):
    """H = diag(1, 1e-39) in float32: rs/curvature overflows float32; both loops give a non-finite x."""
    if loop_kind == "device":
        monkeypatch.setattr(cg_module, "HOST_SCALARS", ())
    A = torch.diag(torch.tensor([1.0, 1e-39]))
    x = cg_solve(lambda V: V @ A, torch.tensor([0.0, 1e5]), 3).x
    assert not torch.isfinite(x).all()


@pytest.mark.parametrize("solver", [Nystrom(rank=4, rho=0.1), Nystrom(rank=4, chunk=2, sketch="gaussian"),
                                    ConjugateGradient(6), ConjugateGradient(6, rho=0.1, tol=1e-3), Neumann(6, 0.1),
                                    Identity(), Exact(rho=0.1)], ids=repr)
def test_no_solver_writes_into_b(loop, solver):
    A, b = indefinite(), torch.randn(indefinite().shape[0], generator=gen(2), dtype=DT)
    before = b.clone()
    x = run_solver(solver, Counted(A), b, gen(0)).x
    assert torch.equal(b, before) and x.data_ptr() != b.data_ptr()


# --- validation -----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: Nystrom(rank=0), "rank"),
        (lambda: Nystrom(rank=2.5), "rank"),
        (lambda: Nystrom(rank=True), "rank"),
        (lambda: Nystrom(rho=0.0), "rho"),
        (lambda: Nystrom(rho=-1), "rho"),
        (lambda: Nystrom(rho=float("nan")), "rho"),
        (lambda: Nystrom(rank=5, chunk=6), "chunk"),
        (lambda: Nystrom(rank=5, chunk=0), "chunk"),
        (lambda: Nystrom(sketch="svd"), "sketch"),
        (lambda: ConjugateGradient(iters=0), "iters"),
        (lambda: ConjugateGradient(rho=-0.1), "rho"),
        (lambda: ConjugateGradient(tol=0), "tol"),
        (lambda: Neumann(alpha=0), "alpha"),
        (lambda: Neumann(iters=-1), "iters"),
        (lambda: Exact(rho=-1), "rho"),
        (lambda: make_solver("lbfgs"), "ihvp"),
        (lambda: make_solver("cg", rank=3), "rank does not apply"),
        (lambda: make_solver("identity", rho=0.1), "rho does not apply"),
    ],
)
def test_invalid_solver_settings_raise_value_error_naming_the_argument(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_make_solver_builds_each_solver_with_its_settings():
    assert make_solver("nystrom", rank=4, rho=0.1, chunk=2, sketch="gaussian", iters=None).chunk == 2
    assert make_solver("cg", iters=3, rho=0.2).damping == 0.2
    assert make_solver("neumann", iters=3, alpha=0.5).alpha == 0.5
    assert isinstance(make_solver("identity"), Identity)
    assert make_solver("exact", rho=0.1).damping == 0.1


def test_data_parallel_seam_averaging_matvec_gives_the_global_solve():
    """Two shards' Hessians; a matvec that averages their products (an all-reduce) is the global solve."""
    A1, A2 = spd(20, seed=1), low_rank_plus_noise(20, 5, 0.1, seed=2)
    b = torch.randn(20, generator=gen(3), dtype=DT)
    averaged = lambda V: 0.5 * (V @ A1 + V @ A2)
    x = nystrom_solve(averaged, b, 20, 1e-6, chunk=4, generator=gen())
    assert rel(x, damped_solve(0.5 * (A1 + A2), b, 1e-6)) < 1e-8


@pytest.mark.parametrize("p, k", [(50, 5), (12, 10)])  # Floyd's O(k) draw; randperm when k is close to p
def test_column_sample_is_distinct_and_uniform(p, k):
    g = gen(3)
    n = 8000
    counts = torch.zeros(p)
    for _ in range(n):
        idx = sample_columns(p, k, g)
        assert idx.dtype == torch.int64 and idx.unique().numel() == k and 0 <= idx.min() and idx.max() < p
        counts[idx] += 1
    expected = n * k / p
    sd = (n * (k / p) * (1 - k / p)) ** 0.5
    assert (counts - expected).abs().max() < 5 * sd  # a biased draw (e.g. always the tail) fails by far


# --- the flags as reported by a hypergradient step (A4) --------------------------------------------

def test_a_diverged_neumann_step_is_reported_and_skipped(ridge):
    """α = 1 > 2/λmax ≈ 0.9 on the ridge problem: the series stays finite and is wrong by orders
    of magnitude; the step reports it and changes nothing."""
    from hyperopt_torch import HyperOptimizer, implicit_hypergradient

    (g,), info = implicit_hypergradient([ridge.phi], ridge.train_loss, ridge.val_loss, ridge.model, Neumann(40, 1.0))
    assert info.diverged and info.skipped and not info.negative_curvature and torch.isnan(g).all()
    before = ridge.phi.detach().clone()
    hopt = HyperOptimizer([ridge.phi], torch.optim.SGD, ihvp=Neumann(40, 1.0), lr=0.1)
    with pytest.warns(RuntimeWarning, match="diverged"):
        info = hopt.step(ridge.train_loss, ridge.val_loss, ridge.model)
    assert info.skipped and torch.equal(ridge.phi.detach(), before) and ridge.phi.grad is None
    # a contractive α on the same problem is neither flagged nor skipped
    (g,), info = implicit_hypergradient([ridge.phi], ridge.train_loss, ridge.val_loss, ridge.model, Neumann(40, 0.3))
    assert not (info.diverged or info.skipped) and torch.isfinite(g).all()


def test_cg_negative_curvature_is_reported_warned_and_applied():
    """f(θ, φ) = ½θᵀAθ + φᵀθ with an indefinite A: CG stops at the first negative curvature."""
    from torch import nn

    from hyperopt_torch import implicit_hypergradient

    A = indefinite()
    p = A.shape[0]
    model = nn.Linear(p, 1, bias=False).to(DT)
    phi = torch.randn(p, generator=gen(7), dtype=DT).requires_grad_()
    target = torch.randn(p, generator=gen(8), dtype=DT)
    train = lambda m: 0.5 * m.weight[0] @ A @ m.weight[0] + phi @ m.weight[0]
    val = lambda m: 0.5 * ((m.weight[0] - target) ** 2).sum()
    with pytest.warns(RuntimeWarning, match="negative curvature"):
        (g,), info = implicit_hypergradient([phi], train, val, model, ConjugateGradient(30))
    b = (model.weight[0] - target).detach()
    assert info.negative_curvature and not info.skipped
    torch.testing.assert_close(g, -cg_solve(Counted(A), b, 30).x)  # mixed term: ∂²f/∂φ∂θ = I
    _, info = implicit_hypergradient([phi], train, val, model, ConjugateGradient(30, rho=1.5))
    assert not info.negative_curvature


def test_cg_is_not_flagged_when_a_converged_residual_underflows(loop):
    """float32: a residual of 3e-21 on H = 1e-3·I gives dᵀHd = 0 by underflow, not negative curvature."""
    A = 1e-3 * torch.eye(4)
    solution = cg_solve(lambda V: V @ A, torch.full((4,), 3e-21), iters=3)
    assert not bool(solution.negative_curvature)
    assert torch.isfinite(solution.x).all()
