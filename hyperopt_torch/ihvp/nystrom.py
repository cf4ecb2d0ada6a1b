"""Nyström low-rank inverse-Hessian-vector product (Hataya & Yamada 2023).

The Hessian is replaced by its rank-``k`` Nyström approximation (Eq. 4)
``H_k = (HΩ) (ΩᵀHΩ)† (HΩ)ᵀ``, where the ``p × k`` test matrix ``Ω`` selects
``k`` random columns of the identity (``sketch="columns"``, the paper's
choice: ``HΩ = H[:, K]``) or has Gaussian entries (``sketch="gaussian"``,
Frangella, Tropp & Udell 2021).  The damped inverse ``(H_k + ρI)⁻¹ b`` comes
from the Woodbury identity (Eq. 5–6).

Everything the solve needs is three small float64 quantities, ``W = ΩᵀHΩ``,
``G = (HΩ)ᵀ(HΩ)`` and ``c = (HΩ)ᵀb``, plus one combination
``x = a·b + (HΩ)β``.  ``chunk = κ`` sets how many of the ``k`` columns are held
at once: ``κ = k`` is the time-efficient Eq. 6 (``k`` HVPs, one ``k × p``
block), ``κ = 1`` the space-efficient Eq. 8–9 and ``1 < κ < k`` Algorithm 1
(``κ·m(m+1)/2`` HVPs with ``m = ⌈k/κ⌉``, two ``κ × p`` blocks).  Algorithm 1's
sequential Woodbury updates are functions of the same small quantities, so
every κ gives the same vector up to rounding.

Why not the literal Eq. 6: ``b/ρ − (1/ρ²) C (W + CᵀC/ρ)⁻¹ Cᵀ b`` subtracts
two vectors of size ``‖b‖/ρ`` (losing ``log10(1/ρ)`` digits) and inverts a
``W`` that a dead ReLU makes singular.  :func:`nystrom_from_sketch` instead
pseudo-inverts ``W`` above the noise of the products, orthonormalises the
range of ``H_k`` in the small space and applies ``(Σ + ρ)⁻¹`` there, so no
``1/ρ`` cancellation happens inside the range of the sketch; the part of ``b``
outside it is returned divided by ``ρ`` (only its direction is meaningful
when ``ρ`` is below the missed eigenvalues).  Half-precision models keep
their ``p``-vectors in float32 (the combination cancels columns).  The
derivation, accuracy and cost figures are in docs/methods.md ("Nyström") and
docs/benchmarks.md.

References:
    Hataya & Yamada, "Nyström Method for Accurate and Scalable Implicit
    Differentiation", AISTATS 2023 (Eq. 4–9, Algorithm 1, Theorem 1).
    Frangella, Tropp & Udell, "Randomized Nyström Preconditioning", 2021.
"""

from __future__ import annotations

import numbers
from typing import Callable

import torch
from torch import Tensor

from .._checks import positive_float, positive_int
from ._base import Matvec, Operator, Solution, matvec_inplace, working_precision
from ._linalg import EPS64, eigh_above_noise

SKETCHES = ("columns", "gaussian")


def sample_columns(p: int, k: int, generator: torch.Generator | None = None) -> Tensor:
    """``k`` distinct indices drawn uniformly from ``range(p)`` (a CPU int64 tensor).

    Floyd's algorithm (Bentley & Floyd 1987) costs ``O(k)`` instead of the
    ``O(p)`` of ``randperm(p)[:k]``, which is a noticeable part of a GPU step
    at millions of parameters (docs/benchmarks.md).  The draws come from
    ``generator`` alone (one call), so the set is reproducible from its state.
    """
    if 4 * k >= p:
        return torch.randperm(p, generator=generator)[:k]
    u = torch.rand(k, generator=generator, dtype=torch.float64).tolist()
    chosen: list[int] = []
    seen: set[int] = set()
    for i, j in enumerate(range(p - k, p)):
        t = min(int(u[i] * (j + 1)), j)  # uniform on 0..j
        if t in seen:
            t = j
        seen.add(t)
        chosen.append(t)
    return torch.tensor(chosen, dtype=torch.int64)


def _test_matrix(sketch: str, p: int, k: int, b: Tensor, generator: torch.Generator | None,
                 product_dtype: torch.dtype | None = None):
    """Return ``(rows, project)``: ``rows(j0, j1)`` gives ``Ω[:, j0:j1]ᵀ`` and
    ``project(j0, j1, Y)`` gives ``Ω[:, j0:j1]ᵀ Yᵀ`` in float64 for ``Y`` of shape ``(n, p)``.

    Random draws come from ``generator`` (a CPU generator) only, so the
    sketch is the same for every chunk size and reproducible from its state.
    The rows are the HVPs' input, which the products overwrite
    (:func:`~hyperopt_torch.ihvp.matvec_inplace`), so ``project`` does not read
    them: the column sketch's projection is a gather of ``κ`` columns of ``Y``;
    the Gaussian one regenerates ``Ω``'s rows from their seeds (the same
    numbers), one ``κ × p`` block alive while it runs.  With ``product_dtype``
    lower than ``b``'s (a half-precision model solved in float32) the Gaussian
    entries are rounded to it, so that ``W = ΩᵀHΩ`` uses the ``Ω`` the products
    actually saw (with float32 entries against bfloat16 products ``W`` was off
    by 27 % at ``k = p``); one-hot rows are exact in any dtype.
    """
    if sketch == "columns":
        index = sample_columns(p, k, generator).to(b.device, non_blocking=True)

        def rows(j0: int, j1: int) -> Tensor:
            E = torch.zeros(j1 - j0, p, dtype=b.dtype, device=b.device)
            return E.scatter_(1, index[j0:j1, None], 1.0)

        def project(j0: int, j1: int, Y: Tensor) -> Tensor:
            return Y.index_select(1, index[j0:j1]).double().T

        return rows, project

    # One seed per column: the Gaussian columns are drawn on the input's
    # device and do not depend on how they are chunked.
    seeds = torch.randint(0, 2**62, (k,), generator=generator).tolist()
    rounded = product_dtype is not None and torch.finfo(product_dtype).eps > torch.finfo(b.dtype).eps

    def rows(j0: int, j1: int) -> Tensor:
        out = torch.empty(j1 - j0, p, dtype=b.dtype, device=b.device)
        for i, seed in enumerate(seeds[j0:j1]):  # normal_ in place draws what randn(p) would
            out[i].normal_(generator=torch.Generator(device=b.device).manual_seed(seed))
            if rounded:
                out[i].copy_(out[i].to(product_dtype))
        return out

    def project(j0: int, j1: int, Y: Tensor) -> Tensor:
        return _gram(rows(j0, j1), Y)

    return rows, project


_SLAB = 1 << 14  # elements of p per float64 slab: the Gram temporaries stay O(κ · 2¹⁴)


def _gram(A: Tensor, B: Tensor, extra: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """``A Bᵀ`` in float64 for ``A`` ``(m, p)`` and ``B`` ``(n, p)`` of any float dtype; returns ``(m, n)``.

    Accumulated over slabs of ``p`` so that no float64 copy of a whole block is
    made; the sums differ from one float64 product only in their order,
    ~1e-16 relative.  The slabs are converted into one reused float64 buffer
    per operand, of 2¹⁴ columns: a fresh conversion per slab allocates (and
    page-faults) a large tensor each time, which cost more than the products
    (docs/benchmarks.md, "Speed II").  With ``extra`` ``(p,)`` also returns
    ``A extra`` (shape ``(m,)``) from the same pass, each slab of ``A``
    converted once.
    """
    m, p = A.shape
    same = A is B
    out = torch.zeros(m, B.shape[0], dtype=torch.float64, device=A.device)
    more = None if extra is None else torch.zeros(m, dtype=torch.float64, device=A.device)
    slab = max(1, min(_SLAB, p))
    a_buf = A.new_empty(m, slab, dtype=torch.float64)
    b_buf = None if same else B.new_empty(B.shape[0], slab, dtype=torch.float64)
    e_buf = None if extra is None else extra.new_empty(slab, dtype=torch.float64)
    for s in range(0, p, slab):
        w = min(slab, p - s)
        a = a_buf[:, :w].copy_(A[:, s : s + w])
        b = a if same else b_buf[:, :w].copy_(B[:, s : s + w])
        out.addmm_(a, b.T)
        if more is not None:
            more.addmv_(a, e_buf[:w].copy_(extra[s : s + w]))
    return out if more is None else (out, more)


def nystrom_sketch(
    matvec: Matvec,
    b: Tensor,
    rank: int,
    chunk: int | None = None,
    sketch: str = "columns",
    generator: torch.Generator | None = None,
    product_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor, Callable[[Tensor], Tensor]]:
    """Compute the small quantities of the Nyström approximation.

    Returns ``(W, G, c, combine)`` where, with ``Y = (HΩ)ᵀ`` of shape ``(k, p)``,
    ``W = ΩᵀY ᵀ`` (``k × k``), ``G = YYᵀ`` (``k × k``) and ``c = Yb`` (``k``), all
    float64, and ``combine(β, a=0)`` returns ``a·b + Yᵀβ`` (shape ``(p,)``, dtype of ``b``),
    recomputing column blocks as needed.  ``k = min(rank, p)``.  ``product_dtype``:
    the dtype ``matvec`` casts its input to, when lower than ``b``'s (see
    :func:`~hyperopt_torch.ihvp._base.working_precision`).

    Memory: each block of ``Y`` is computed over its own test rows
    (:func:`~hyperopt_torch.ihvp.matvec_inplace`), so at most two ``κ × p``
    blocks are alive at once (one with ``κ = k``), plus the matvec's own
    products while it runs (one row's with :class:`~hyperopt_torch.hvp.
    HessianVectorProduct`'s loop strategy, a block's with vmap) and, for the
    Gaussian sketch, one regenerated block of ``Ω`` while ``W`` is formed.  A
    matvec without an in-place variant (``lambda V: V @ A``) adds its output
    block while it runs.  The float64 products are accumulated over slabs of
    ``p`` (:func:`_gram`).

    Data parallelism: the Hessian of a loss averaged over shards is the average
    of the shards' Hessians, so wrapping ``matvec`` to all-reduce (average) its
    output makes ``HΩ`` the global sketch on every rank; ``W``, ``G`` and ``c`` are
    then identical everywhere.  (``G`` and ``c`` are not sums of per-shard
    values, so they must not be all-reduced themselves.)
    """
    p = b.numel()
    k = min(rank, p)
    kappa = k if chunk is None else min(chunk, k)
    blocks = [(j, min(j + kappa, k)) for j in range(0, k, kappa)]
    rows, project = _test_matrix(sketch, p, k, b, generator, product_dtype)

    def column_block(i: int) -> Tensor:
        j0, j1 = blocks[i]
        return matvec_inplace(matvec, rows(j0, j1))  # the rows are not needed once multiplied

    W = torch.empty(k, k, dtype=torch.float64, device=b.device)
    G = torch.empty_like(W)
    c = torch.empty(k, dtype=torch.float64, device=b.device)
    # Every pair of blocks meets once, with one block held (the anchor) and its partners
    # computed one at a time.  Each row's partners are the anchors still to come, computed in
    # reverse order, so the last one computed is the next anchor: two blocks alive at once,
    # m(m-1)/2 + 1 block computations.  The anchors are 0, m-2, m-3, ..., 1, m-1: the last
    # block, the ragged (smallest) one, is a partner in every row and is held for combine().
    m = len(blocks)
    anchors = [0, *range(m - 2, 0, -1), m - 1] if m > 1 else [0]
    Ya = column_block(0)
    for t, a in enumerate(anchors):
        a0, a1 = blocks[a]
        G[a0:a1, a0:a1], c[a0:a1] = _gram(Ya, Ya, extra=b)
        W[a0:a1, a0:a1] = project(a0, a1, Ya)
        for bi in reversed(anchors[t + 1 :]):
            b0, b1 = blocks[bi]
            Yb = column_block(bi)
            G[a0:a1, b0:b1] = _gram(Ya, Yb)
            G[b0:b1, a0:a1] = G[a0:a1, b0:b1].T
            W[a0:a1, b0:b1] = project(a0, a1, Yb)
            W[b0:b1, a0:a1] = project(b0, b1, Ya)
            if bi != anchors[t + 1]:
                del Yb  # before the next partner is computed
        if t + 1 < len(anchors):
            Ya = Yb  # the next anchor; the old one is freed here
    held = {anchors[-1]: Ya}  # the last anchor is reused by combine()
    del Ya

    def combine(beta: Tensor, a: float = 0.0) -> Tensor:
        beta = beta.to(b.dtype)
        out = None
        # The held block first, so that it is freed before any block is recomputed.
        for i in [*held, *(i for i in range(len(blocks)) if i not in held)]:
            j0, j1 = blocks[i]
            Y = held.pop(i) if i in held else column_block(i)
            # The first block starts the sum as a·b + Yᵀβ in one pass (no zero fill, no separate add
            # of b; with a = 0, b is ignored, NaN included)
            out = torch.addmv(b, Y.T, beta[j0:j1], beta=a) if out is None else out.addmv_(Y.T, beta[j0:j1])
            del Y
        return out

    return W, G, c, combine


def nystrom_from_sketch(W: Tensor, G: Tensor, c: Tensor, p: int, rho: float) -> tuple[float, Tensor]:
    """Solve the damped Nyström system in the small space (float64).

    Given ``W = ΩᵀHΩ``, ``G = (HΩ)ᵀHΩ`` and ``c = (HΩ)ᵀb`` (float64, ``k × k``,
    ``k × k`` and ``k``; ``W`` as computed, not symmetrised: its skew-symmetric
    part measures the noise of the products) returns ``(a, β)`` with
    ``(H_k + ρI)⁻¹ b = a·b + HΩ β``.  See the module docstring for the
    derivation.

    Cut-offs.  Eigenvalues of ``W`` at or below the noise of the products
    (:func:`~hyperopt_torch.ihvp._linalg.eigh_above_noise`: the larger of
    twice the norm of ``W``'s skew-symmetric part and ``k·ε₆₄·max|λ|``) are
    dropped — the pseudo-inverse of Eq. 4.  The second
    decomposition, ``LᵀL = EDEᵀ``, has the *squared* singular values of
    ``L = (HΩ)U`` (at ``k = p`` with the columns sketch, ``d = λ²``), so its
    relative cut-off is the square of the first's, ``(floor / max|λ|)²``, or
    the rounding of the float64 Gram ``G`` of length-``p`` vectors,
    ``p·ε₆₄``, if larger.  Cutting ``d`` at the first's relative level instead
    dropped every direction with ``|λ| < √(kε)·max|λ|`` (3e-3 of the largest
    in float32 at ``k = 64``) and sent it to ``b/ρ``.

    What the result is.  Inside the range of ``HΩ`` it is ``(H_k + ρI)⁻¹b``
    computed without cancellation.  The part of ``b`` outside that range
    (everything the ``k`` sketch vectors miss when ``k < p``) is returned as
    ``b/ρ``: scaled by ``1/ρ``, not by the inverse curvature, so with ``ρ`` far
    below the Hessian's eigenvalues its size is not ``H⁻¹b``'s and only its
    direction is meaningful (``a = 1/ρ`` says so; ``a = 0`` when ``HΩ`` spans
    ``ℝᵖ``).
    """
    k = W.shape[0]
    lam, U, floor = eigh_above_noise(W)
    if lam.numel() == 0:  # H_k = 0 (e.g. a zero Hessian)
        return 1.0 / rho, torch.zeros_like(c)
    GL = U.T @ G @ U
    d, E = torch.linalg.eigh(0.5 * (GL + GL.T))
    relative = (floor / lam.abs().max()).item()
    keep = d > d.max() * max(relative**2, p * EPS64)
    d, E = d[keep], E[:, keep]
    T = U @ E * d.rsqrt()  # Q = (HΩ) T has orthonormal columns
    root = d.sqrt()
    S = (root[:, None] * (E.T @ (E / lam[:, None]))) * root[None, :]
    sigma, V = torch.linalg.eigh(0.5 * (S + S.T))
    qb = T.T @ c  # Qᵀ b
    z = V @ ((V.T @ qb) / (sigma + rho))
    if T.shape[1] == p:  # Q spans ℝᵖ: b − QQᵀb = 0 exactly
        return 0.0, T @ z
    return 1.0 / rho, T @ (z - qb / rho)


def nystrom_solve(
    matvec: Matvec,
    b: Tensor,
    rank: int,
    rho: float,
    chunk: int | None = None,
    sketch: str = "columns",
    generator: torch.Generator | None = None,
) -> Tensor:
    """``(H_k + ρI)⁻¹ b`` with the rank-``k`` Nyström approximation ``H_k`` of ``matvec``.

    Args:
        matvec: batched symmetric product ``V (B, p) ↦ V H (B, p)``.
        b: right-hand side, shape ``(p,)``; sets dtype and device.
        rank: ``k``, the number of sketch columns (capped at ``p``).
        rho: damping ``ρ > 0``.
        chunk: ``κ``; ``None`` means ``κ = k``.
        sketch: ``"columns"`` (paper) or ``"gaussian"``.
        generator: CPU generator for the random index set / Gaussian seeds.

    Returns ``x`` of shape ``(p,)`` in ``b``'s dtype and device, all NaN if the
    sketch or ``b`` is not finite (e.g. a diverged model).  Inside the range of
    the sketch ``x`` is ``(H_k + ρI)⁻¹b``; the part of ``b`` outside it is
    returned divided by ``ρ`` (module docstring, "What the result is outside
    the sketch").  A float16/bfloat16 ``b`` is handled in float32 (products at
    ``b``'s precision) and the cut-offs follow the products' noise, so a
    half-precision model gets the float64 answer to about its own precision
    at any rank with the columns sketch.  A Gaussian sketch multiplies that
    noise by about the condition number of ``Ω`` (large for ``k`` near ``p``:
    13–39 % at ``k = p`` in bfloat16 on a 31-parameter MLP, where the columns
    give 0.4 %), so prefer the columns in half precision.  HVPs used:
    ``k`` when ``κ ≥ k``, else ``κ·m(m+1)/2`` with ``m = ⌈k/κ⌉`` (fewer for a
    ragged last block).
    """
    out_dtype = b.dtype
    matvec, b = working_precision(matvec, b)
    W, G, c, combine = nystrom_sketch(matvec, b, rank, chunk, sketch, generator, product_dtype=out_dtype)
    # The k x k eigendecompositions are microseconds on the host and several
    # kernel launches and synchronisations each on a GPU: move them, once.
    k = c.numel()
    packed = torch.cat([W.reshape(-1), G.reshape(-1), c]).cpu()  # one transfer, one sync
    if not bool(torch.isfinite(packed).all()):  # a non-finite Hessian or b: nothing to solve, report NaN
        return torch.full_like(b, float("nan"), dtype=out_dtype)
    W, G, c = packed[: k * k].view(k, k), packed[k * k : 2 * k * k].view(k, k), packed[2 * k * k :]
    a, beta = nystrom_from_sketch(W, G, c, b.numel(), rho)
    return combine(beta.to(b.device, non_blocking=True), a).to(out_dtype)


AUTO_MARGIN = 0.5  # chunk="auto" plans to use at most this fraction of the free memory


def free_memory(device: torch.device) -> int:
    """Bytes free for new tensors on ``device``: CUDA's free memory plus what PyTorch's
    caching allocator holds unused, or on a CPU ``MemAvailable`` from ``/proc/meminfo``.

    Raises:
        OSError: a CPU without ``/proc/meminfo`` (not Linux); pass an integer chunk there.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise OSError("MemAvailable not found in /proc/meminfo: pass an integer chunk instead of 'auto'")


def auto_chunk(matvec: Matvec, b: Tensor, rank: int) -> int:
    """The largest ``κ ≤ min(rank, p)`` whose column blocks fit in ``AUTO_MARGIN`` of the free memory.

    The sketch holds at most two ``κ × p`` blocks of ``Y`` (one held, one
    computed over its own test rows, :func:`nystrom_sketch`), and the batched
    backward adds its products and temporaries while it runs (about 1.7 more
    ``p``-vectors per column with vmap on a small MLP, one row's with the
    loop); the model is ``4·p`` elements per column, of at least 4 bytes (a
    half-precision ``b`` is solved in float32).  On CUDA the backward's
    own memory per column (activation gradients, dominant on conv nets) is
    measured with one product through ``matvec`` (counted in its HVPs; this
    resets ``torch.cuda``'s peak-memory statistics) and added; on a CPU it is
    not measured, which the margin has to cover.  A matvec without an
    in-place variant also holds its output block while it runs, within the
    same ``4·p``.

    Under data parallelism the free memory, hence κ, can differ between ranks,
    and so would the number of all-reduced block products: pass an integer
    ``chunk`` there.
    """
    p = b.numel()
    k = min(rank, p)
    # The blocks are held in the working precision: float32 for a half-precision b (working_precision).
    per_column = 4 * p * max(b.element_size(), 4)
    if b.device.type == "cuda":
        torch.cuda.synchronize(b.device)
        torch.cuda.reset_peak_memory_stats(b.device)
        before = torch.cuda.memory_allocated(b.device)
        matvec(b.reshape(1, p))
        per_column += torch.cuda.max_memory_allocated(b.device) - before
    return max(1, min(k, int(AUTO_MARGIN * free_memory(b.device)) // per_column))


class Nystrom:
    """Nyström + Woodbury inverse-Hessian-vector product (Hataya & Yamada 2023).

    Args:
        rank: ``k``, number of Hessian columns (or Gaussian sketch vectors).
        rho: damping ``ρ > 0`` of ``(H_k + ρI)⁻¹``.
        chunk: ``κ`` in ``1..rank``; ``None`` (default) is ``κ = k``, the
            time-efficient Eq. 6; ``1`` is the space-efficient Eq. 9; between is
            Algorithm 1.  All give the same result up to rounding.  ``"auto"``
            picks, at every solve, the largest κ that fits the device's free
            memory (:func:`auto_chunk`); the κ used is the solution's
            ``chunk`` (``HypergradInfo.chunk``).  Not under data parallelism
            (:attr:`collective_safe`): ranks could choose different κ.
        sketch: ``"columns"`` (random Hessian columns, the paper) or
            ``"gaussian"`` (randomized Nyström with a Gaussian test matrix).
        seed: seed of the solver's own CPU ``torch.Generator``
            (:attr:`generator`), from which each :meth:`solve` draws its sketch
            unless a generator is passed to it.  :meth:`state_dict` /
            :meth:`load_state_dict` save and restore it, so a resumed run
            draws the same sketches.

    The part of ``b`` outside the range of the sketch is returned as ``b/ρ``
    (scaled by ``1/ρ``, not by the inverse curvature): with ``k < p`` and ``ρ``
    below the missed eigenvalues only the direction of the result is reliable.

    Raises:
        ValueError: ``rank < 1``, ``rho <= 0``, ``chunk`` outside ``1..rank``,
            an unknown ``sketch`` or a ``seed`` that is not an integer.
    """

    name = "nystrom"

    def __init__(self, rank: int | None = None, rho: float | None = None, chunk: int | str | None = None,
                 sketch: str | None = None, seed: int | None = None):
        # None is the default of each setting (rank 10, rho 0.01, chunk = rank, sketch "columns", seed 0), so that
        # make_solver and HyperOptimizer pass their keywords on as they are.
        rank, rho = 10 if rank is None else rank, 0.01 if rho is None else rho
        sketch, seed = "columns" if sketch is None else sketch, 0 if seed is None else seed
        self.rank = positive_int("rank", rank)
        self.rho = positive_float("rho", rho)
        if chunk is not None and chunk != "auto":
            if isinstance(chunk, bool) or not isinstance(chunk, numbers.Integral) or not 1 <= chunk <= self.rank:
                raise ValueError(f"Invalid chunk: {chunk!r} (expected an integer 1 <= chunk <= rank = {self.rank}, "
                                 "None or 'auto')")
            chunk = int(chunk)
        self.chunk = chunk
        if sketch not in SKETCHES:
            raise ValueError(f"Invalid sketch: {sketch!r} (expected one of {', '.join(map(repr, SKETCHES))})")
        self.sketch = sketch
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise ValueError(f"Invalid seed: {seed!r} (expected an integer)")
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)

    @property
    def damping(self) -> float:
        return self.rho

    @property
    def collective_safe(self) -> bool:
        """Whether every rank makes the same products: not with ``chunk="auto"`` (κ from local free memory)."""
        return self.chunk != "auto"

    def solve(self, matvec: Matvec | Operator, b: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``(H_k + ρI)⁻¹ b``, the sketch drawn from ``generator``, or from :attr:`generator` when ``None``."""
        return self.solve_with_flags(matvec, b, generator).x

    def solve_with_flags(self, matvec: Matvec | Operator, b: Tensor,
                         generator: torch.Generator | None = None) -> Solution:
        """:meth:`solve`, as a :class:`~hyperopt_torch.ihvp.Solution` that reports the κ used."""
        chunk = auto_chunk(matvec, b, self.rank) if self.chunk == "auto" else self.chunk
        x = nystrom_solve(matvec, b, self.rank, self.rho, chunk, self.sketch,
                          self.generator if generator is None else generator)
        return Solution(x, chunk=min(chunk or self.rank, self.rank, b.numel()), damping=self.rho)

    def state_dict(self) -> dict:
        """``{"generator": state}``: the state of :attr:`generator` (a CPU uint8 tensor)."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.generator.set_state(state_dict["generator"])

    def __repr__(self) -> str:
        return f"Nystrom(rank={self.rank}, rho={self.rho}, chunk={self.chunk!r}, sketch={self.sketch!r})"
