"""Hypergradients of low-precision models against the float64 one: same problem, same sketch.

The problem (benchmarks/precision.py): penalised logistic regression, p = 256, at
its float64 optimum, cast to each dtype.  Before the noise-floor cut-offs, k or
p ≥ 128 in bfloat16 dropped every eigenvalue (Exact returned 0 for the implicit
term, Nyström b/ρ), and float32 Nyström at k = p cut |λ| < 3e-3·λmax.
"""

import pytest
import torch

from benchmarks.precision import DT, compare, logistic_problem
from hyperopt_torch import Exact, Nystrom

SOLVERS = [Nystrom(rank=16), Nystrom(rank=64), Nystrom(rank=200), Exact(rho=0.01)]
IDS = ["nystrom-16", "nystrom-64", "nystrom-200", "exact"]


@pytest.fixture(scope="module")
def problem():
    hypergradient = logistic_problem()
    return hypergradient, [hypergradient(DT, s) for s in SOLVERS]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("index", range(len(SOLVERS)), ids=IDS)
def test_half_precision_model_matches_float64_at_any_rank(problem, dtype, index):
    hypergradient, refs = problem
    error, cosine = compare(hypergradient(dtype, SOLVERS[index]), refs[index])
    assert error < 0.03 and cosine > 0.999


@pytest.mark.parametrize("index", range(len(SOLVERS)), ids=IDS)
def test_float32_model_under_bfloat16_autocast_matches_float64(problem, index):
    hypergradient, refs = problem
    error, cosine = compare(hypergradient(torch.float32, SOLVERS[index], autocast=torch.bfloat16), refs[index])
    assert error < 0.03 and cosine > 0.999


@pytest.mark.parametrize("rho", [0.01, 1e-9])
def test_float32_nystrom_at_full_rank_equals_the_dense_solve_on_a_summed_loss(rho):
    """A loss summed over 64 examples (λ from 1.5e-3 to 3.5): k = p is the exact damped solve.

    Before: relative error 0.45 at ρ = 0.01 and 4.5e6 at ρ = 1e-9."""
    hypergradient = logistic_problem(d=32, n=64, reduction="sum", decay=-6.0, spread=2.0)
    reference = hypergradient(DT, Exact(rho=rho))
    error, _ = compare(hypergradient(torch.float32, Nystrom(rank=32, rho=rho)), reference)
    assert error < 1e-4
