"""The Nyström sketch's small quantities, its test matrix and chunk="auto" against dense linear algebra."""

import pytest
import torch

from hyperopt_torch import Nystrom, implicit_hypergradient
from hyperopt_torch.ihvp import nystrom, nystrom_sketch, sample_columns

DT = torch.float64


def spd(p, seed=0, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(p, p, generator=g, dtype=DT)
    return (B @ B.T / p + 0.1 * torch.eye(p, dtype=DT)).to(dtype)


def rel(x, y):
    return ((x - y).norm() / y.norm()).item()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_slabbed_gram_equals_one_float64_product(monkeypatch, dtype):
    g = torch.Generator().manual_seed(1)
    A, B = torch.randn(4, 50, generator=g).to(dtype), torch.randn(3, 50, generator=g).to(dtype)
    monkeypatch.setattr(nystrom, "_SLAB", 7)  # 8 slabs, the last one ragged
    for X, Y in ((A, B), (A, A)):
        exact = X.double() @ Y.double().T
        assert rel(nystrom._gram(X, Y), exact) < 1e-13
    v = torch.randn(50, generator=g).to(dtype)
    gram, more = nystrom._gram(A, A, extra=v)  # the same pass gives A v
    assert rel(gram, A.double() @ A.double().T) < 1e-13 and rel(more, A.double() @ v.double()) < 1e-13


@pytest.mark.parametrize("sketch", ["columns", "gaussian"])
@pytest.mark.parametrize("chunk", [None, 2, 3])
def test_sketch_quantities_match_dense_products_to_1e_13(monkeypatch, sketch, chunk):
    """W = ΩᵀHΩ, G = (HΩ)ᵀHΩ, c = (HΩ)ᵀb and combine(β) = HΩβ, with Ω rebuilt from the same generator state."""
    monkeypatch.setattr(nystrom, "_SLAB", 5)
    p, k = 23, 7
    A = spd(p)
    b = torch.randn(p, generator=torch.Generator().manual_seed(2), dtype=DT)
    W, G, c, combine = nystrom_sketch(lambda V: V @ A, b, k, chunk, sketch, torch.Generator().manual_seed(3))
    rows, _ = nystrom._test_matrix(sketch, p, k, b, torch.Generator().manual_seed(3))
    Omega = rows(0, k).T  # p x k
    HO = A @ Omega
    assert rel(W, Omega.T @ HO) < 1e-13 and rel(G, HO.T @ HO) < 1e-13 and rel(c, HO.T @ b) < 1e-13
    beta = torch.randn(k, generator=torch.Generator().manual_seed(4), dtype=DT)
    assert rel(combine(beta), HO @ beta) < 1e-13
    assert rel(combine(beta, 0.5), 0.5 * b + HO @ beta) < 1e-13  # a·b + HΩβ in the same pass (blocks recomputed)


def test_column_rows_are_the_unit_vectors_of_the_sampled_indices():
    p, k = 30, 6
    b = torch.zeros(p, dtype=torch.float32)
    rows, project = nystrom._test_matrix("columns", p, k, b, torch.Generator().manual_seed(5))
    index = sample_columns(p, k, torch.Generator().manual_seed(5))
    assert torch.equal(rows(1, 4), torch.eye(p)[index[1:4]])
    Y = torch.randn(2, p)
    assert project(0, k, Y).dtype == DT and torch.equal(project(0, k, Y), Y[:, index].T.double())


def test_chunk_auto_picks_the_largest_kappa_that_fits_and_reports_it(monkeypatch):
    p, k = 40, 8
    A = spd(p)
    b = torch.randn(p, generator=torch.Generator().manual_seed(6), dtype=DT)
    per_column = 4 * p * b.element_size()
    monkeypatch.setattr(nystrom, "free_memory", lambda device: int(3.5 * per_column / nystrom.AUTO_MARGIN))
    assert nystrom.auto_chunk(lambda V: V @ A, b, k) == 3
    solver = Nystrom(rank=k, chunk="auto")
    solution = solver.solve_with_flags(lambda V: V @ A, b, torch.Generator().manual_seed(0))
    x = solution.x
    assert solution.chunk == 3
    fixed = Nystrom(rank=k, chunk=3).solve(lambda V: V @ A, b, torch.Generator().manual_seed(0))
    assert rel(x, fixed) < 1e-13
    monkeypatch.setattr(nystrom, "free_memory", lambda device: 10**15)
    assert nystrom.auto_chunk(lambda V: V @ A, b, k) == k  # never above k
    monkeypatch.setattr(nystrom, "free_memory", lambda device: 0)
    assert nystrom.auto_chunk(lambda V: V @ A, b, k) == 1  # never below 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chunk_auto_sizes_half_precision_blocks_in_their_float32_working_precision(monkeypatch, dtype):
    """A half-precision b is solved in float32 (working_precision): its blocks cost 4 bytes per entry, not 2."""
    p, k = 40, 8
    monkeypatch.setattr(nystrom, "free_memory", lambda device: int(3.5 * 4 * p * 4 / nystrom.AUTO_MARGIN))
    assert nystrom.auto_chunk(lambda V: V, torch.ones(p, dtype=dtype), k) == 3
    assert nystrom.auto_chunk(lambda V: V, torch.ones(p, dtype=torch.float32), k) == 3


def test_chunk_auto_reads_this_machines_free_memory_and_lands_in_diagnostics():
    assert nystrom.free_memory(torch.device("cpu")) > 0
    model = torch.nn.Linear(3, 1).double()
    phi = torch.zeros(1, dtype=DT, requires_grad=True)
    X = torch.randn(10, 3, dtype=DT)
    train = lambda m: (m(X) ** 2).mean() + phi.exp() * (m.weight ** 2).sum()
    info = implicit_hypergradient([phi], train, lambda m: m(X).mean() ** 2, model, Nystrom(rank=3, chunk="auto")).info
    assert info.chunk == 3 and "chunk='auto'" in info.solver


@pytest.mark.parametrize("chunk", ["automatic", 0, 9, 2.0, True])
def test_invalid_chunk_names_the_argument_and_every_accepted_value(chunk):
    with pytest.raises(ValueError, match=r"Invalid chunk: .* \(expected an integer 1 <= chunk <= rank = 8, None or 'auto'\)"):
        Nystrom(rank=8, chunk=chunk)


def _mlp_hvp(dtype, d=40, width=50, strategy=None):
    """The HVP of a tanh MLP d-width-d on 8 examples (p = 4,090 at 40-50-40), strategy forced if given."""
    from torch import nn

    from hyperopt_torch.hvp import training_hvp

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d, width), nn.Tanh(), nn.Linear(width, d)).to(dtype)
    X, y = torch.randn(8, d, dtype=dtype), torch.randn(8, d, dtype=dtype)
    hvp, _ = training_hvp(lambda m: ((m(X) - y) ** 2).mean(), model, list(model.parameters()))
    hvp.forced = strategy
    return hvp


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sketch", ["columns", "gaussian"])
@pytest.mark.parametrize("chunk", [None, 4, 1])
def test_sketch_over_its_own_rows_equals_a_fresh_output_block_and_the_dense_solve(sketch, chunk, dtype):
    """Products written over the test rows (HessianVectorProduct.inplace) change no bit of the solution,
    and at k = p it is (H + ρI)⁻¹b of the dense Hessian."""
    hvp = _mlp_hvp(dtype, d=10, width=1)  # p = 10 + 1 + 10 + 10 = 31
    p = hvp.numel
    H = torch.stack([hvp(e) for e in torch.eye(p, dtype=dtype)]).double()
    b = torch.randn(p, generator=torch.Generator().manual_seed(1), dtype=DT).to(dtype)
    rho = 0.1
    solve = lambda mv, k: nystrom.nystrom_solve(mv, b, k, rho, chunk, sketch, torch.Generator().manual_seed(2))
    for k in (9,) if chunk == 1 else (9, p):  # κ = 1 at k = p would take p(p+1)/2 products
        assert torch.equal(solve(hvp, k), solve(lambda V: hvp(V), k))  # no inplace attribute: a fresh block
    if chunk == 1 or (sketch == "gaussian" and dtype == torch.bfloat16):
        # a square Gaussian Ω (k = p) amplifies the products' bfloat16 noise by its condition number:
        # 13–39 % here over 5 seeds, against 0.4 % for the columns (see the next test for the sketch itself)
        return
    exact = torch.linalg.solve(0.5 * (H + H.T) + rho * torch.eye(p, dtype=DT), b.double())
    assert rel(solve(hvp, p).double(), exact) < {DT: 1e-9, torch.float32: 1e-3, torch.bfloat16: 3e-2}[dtype]


@pytest.mark.parametrize("chunk", [None, 3])
def test_gaussian_rows_are_rounded_as_half_precision_products_see_them(chunk):
    """bfloat16 model: W = ΩᵀHΩ must use the Ω the products saw (rounded to bfloat16), not the float32 draw.
    Products exact but for the float32 output, so with a consistent Ω the full-rank solve is exact."""
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=DT))
    H = (Q * torch.linspace(1.0, 10.0, 12, dtype=DT)) @ Q.T
    matvec = lambda V: V.double() @ H  # receives the rows in bfloat16; returns them multiplied exactly
    b = torch.randn(12, generator=g, dtype=DT).to(torch.bfloat16)
    x = nystrom.nystrom_solve(matvec, b, 12, 0.1, chunk, "gaussian", torch.Generator().manual_seed(1))
    exact = torch.linalg.solve(H + 0.1 * torch.eye(12, dtype=DT), b.double())
    assert x.dtype == torch.bfloat16 and rel(x.double(), exact) < 8e-3  # bfloat16 rounding of x itself


# (κ = 8: m = 4 blocks, where the anchor schedule matters — the previous one held three, 3.34 blocks here;
# the slack covers the p-sized vectors and one row's products, a larger fraction of a smaller block)
@pytest.mark.parametrize("sketch,chunk,blocks,fresh,slack", [("columns", None, 1, 2, 0.2), ("columns", 16, 2, 3, 0.2),
                                                            ("columns", 8, 2, 3, 0.4), ("gaussian", None, 2, 2, 0.2)])
def test_sketch_holds_one_block_of_rows_at_its_peak_with_kappa_k(monkeypatch, live_bytes, sketch, chunk, blocks, fresh,
                                                                   slack):
    """κ = k holds one k × p block (the products over their own test rows) plus one row's products
    (loop strategy); κ < k two κ × p blocks; the Gaussian sketch two, Ω being regenerated for W.
    A matvec without an in-place variant needs its output block next to its input."""
    monkeypatch.setattr(nystrom, "_SLAB", 64)  # float64 slabs of 64 entries of p: small against a block
    hvp = _mlp_hvp(torch.float32, strategy="loop")
    k, p = 32, hvp.numel
    block = (chunk or k) * p * 4
    b = torch.randn(p)
    peak = {}
    for name, matvec in (("inplace", hvp), ("fresh", lambda V: hvp(V))):
        with live_bytes() as m:
            nystrom.nystrom_solve(matvec, b, k, 0.1, chunk, sketch, torch.Generator().manual_seed(0))
        peak[name] = m.peak / block
    assert blocks <= peak["inplace"] < blocks + slack
    assert fresh <= peak["fresh"] < fresh + slack
