"""Problems with exact hypergradients, shared by the core tests (float64)."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from torch import nn

DT = torch.float64
# The tests' models are tiny: one thread each avoids oversubscribing the cores the suite (and its 2-rank tests) share.
torch.set_num_threads(1)


# -- dense linear algebra for the solver tests (test_ihvp, test_minres, test_normal_cg) --------------------
class Counted:
    """matvec over a dense symmetric matrix that counts Hessian-vector products and calls."""

    def __init__(self, A):
        self.A, self.calls, self.batches = A, 0, 0

    def __call__(self, V):
        self.calls += V.shape[0] if V.dim() == 2 else 1
        self.batches += 1
        return V @ self.A


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def spectrum(lam, seed=0):
    """Q diag(lam) Qᵀ with a random orthogonal Q (float64)."""
    Q, _ = torch.linalg.qr(torch.randn(lam.numel(), lam.numel(), generator=gen(seed), dtype=DT))
    return (Q * lam) @ Q.T


def forbid_host_sync(monkeypatch, *modules) -> list[str]:
    """Run ``modules``' device loops (``HOST_SCALARS = ()``) with every Tensor method that reads a value on
    the host raising; returns the list the refused calls are appended to.  ``monkeypatch.undo()`` ends it."""
    calls: list[str] = []

    def refuse(name):
        def method(self, *args, **kwargs):
            calls.append(name)
            raise AssertionError(f"host synchronisation: Tensor.{name}")
        return method

    for module in modules:
        monkeypatch.setattr(module, "HOST_SCALARS", ())  # the loop a GPU runs, here on the CPU
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "numpy", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, refuse(name))
    return calls


@dataclass
class Problem:
    model: nn.Module
    phi: torch.Tensor
    train_loss: Callable
    val_loss: Callable
    exact: torch.Tensor  # the true hypergradient dg/dφ at the inner optimum
    hessian: torch.Tensor  # ∇²_θ f at the inner optimum


@pytest.fixture
def ridge() -> Problem:
    """Ridge regression with one penalty exp(φ_j) per feature; θ*(φ) in closed form."""
    g = torch.Generator().manual_seed(0)
    n, nv, d = 80, 50, 12
    X, Xv = torch.randn(n, d, generator=g, dtype=DT), torch.randn(nv, d, generator=g, dtype=DT)
    w = torch.randn(d, generator=g, dtype=DT)
    y = X @ w + 0.5 * torch.randn(n, generator=g, dtype=DT)
    yv = Xv @ w + 0.5 * torch.randn(nv, generator=g, dtype=DT)
    phi = (0.5 * torch.randn(d, generator=g, dtype=DT) - 1).requires_grad_()

    def theta_star(ph):
        return torch.linalg.solve(X.T @ X / n + torch.diag(ph.exp()), X.T @ y / n)

    exact = torch.autograd.grad(0.5 * ((Xv @ theta_star(phi) - yv) ** 2).mean(), phi)[0]
    model = nn.Linear(d, 1, bias=False).to(DT)
    with torch.no_grad():
        model.weight.copy_(theta_star(phi)[None])
    hessian = X.T @ X / n + torch.diag(phi.detach().exp())

    def train_loss(m, ph=phi):
        return 0.5 * ((m(X).squeeze(1) - y) ** 2).mean() + 0.5 * (ph.exp() * m.weight[0] ** 2).sum()

    return Problem(model, phi, lambda m: train_loss(m), lambda m: 0.5 * ((m(Xv).squeeze(1) - yv) ** 2).mean(), exact, hessian)


@pytest.fixture
def logistic() -> Problem:
    """L2-penalised logistic regression solved by Newton's method to machine precision;
    the reference hypergradient (Eq. 3) uses the dense Hessian and mixed Jacobian."""
    g = torch.Generator().manual_seed(1)
    n, nv, d = 120, 80, 10
    X, Xv = torch.randn(n, d, generator=g, dtype=DT), torch.randn(nv, d, generator=g, dtype=DT)
    w = torch.randn(d, generator=g, dtype=DT)
    y = (X @ w + 0.5 * torch.randn(n, generator=g, dtype=DT) > 0).to(DT)
    yv = (Xv @ w + 0.5 * torch.randn(nv, generator=g, dtype=DT) > 0).to(DT)
    phi = (0.3 * torch.randn(d, generator=g, dtype=DT) - 2).requires_grad_()
    bce = nn.functional.binary_cross_entropy_with_logits

    def f(theta, ph):
        return bce(X @ theta, y) + 0.5 * (ph.exp() * theta**2).sum()

    def val(theta):
        return bce(Xv @ theta, yv)

    theta = torch.zeros(d, dtype=DT)
    ph0 = phi.detach()
    for _ in range(30):  # Newton's method on a strongly convex problem
        grad = torch.func.grad(f)(theta, ph0)
        H = torch.func.hessian(f)(theta, ph0)
        theta = theta - torch.linalg.solve(H, grad)
    assert torch.func.grad(f)(theta, ph0).norm() < 1e-12
    H = torch.func.hessian(f)(theta, ph0)
    F = torch.func.jacrev(torch.func.grad(f), argnums=1)(theta, ph0)  # ∂²f/∂θ∂φ, (p, h)
    exact = -F.T @ torch.linalg.solve(H, torch.func.grad(val)(theta))

    model = nn.Linear(d, 1, bias=False).to(DT)
    with torch.no_grad():
        model.weight.copy_(theta[None])
    return Problem(model, phi, lambda m: f(m.weight[0], phi), lambda m: val(m.weight[0]), exact, H)


@pytest.fixture(autouse=True)
def _func_engine_on_small_models(monkeypatch):
    """The tests' models are tiny; keep engine="func" on torch.func there (rule small_model,
    hyperopt_torch._kinds.FUNC_MIN_PARAMS) so both engines stay covered.  tests/test_hvp.py checks the size
    rule itself."""
    from hyperopt_torch import _kinds

    monkeypatch.setattr(_kinds, "FUNC_MIN_PARAMS", 0)


@pytest.fixture
def figures(monkeypatch) -> dict:
    """The matplotlib figures the recipes draw, by file name, instead of PNG files (skips without matplotlib)."""
    figure_module = pytest.importorskip("matplotlib.figure")
    from recipes import common

    drawn = {}

    def capture(path, draw, *, figsize=(7.0, 6.0)):
        fig = figure_module.Figure(figsize=figsize)
        draw(fig)
        drawn[Path(path).name] = fig
        return True

    monkeypatch.setattr(common, "save_figure", capture)
    return drawn


class LiveBytes:
    """Counts the bytes of tensor storages allocated while it is active and still alive, and their peak.

    A ``TorchDispatchMode`` sees every storage an operator creates (views and in-place results
    share an input's storage and are not counted); a ``weakref.finalize`` on the storage, whose
    Python object PyTorch keeps for as long as the storage lives, subtracts it when it is freed.
    Memory claims are checked with it without timing anything or needing a GPU.
    """

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        counter = self
        self.live: dict[int, int] = {}
        self.now = self.peak = 0

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor):
                        counter._allocated(t.untyped_storage(), inputs)
                return out

        self._mode = Mode()

    def _allocated(self, storage, inputs) -> None:
        key, n = storage.data_ptr(), storage.nbytes()
        if n == 0 or key in inputs or key in self.live:
            return
        self.live[key] = n
        self.now += n
        self.peak = max(self.peak, self.now)
        weakref.finalize(storage, self._freed, key)

    def _freed(self, key: int) -> None:
        self.now -= self.live.pop(key)

    def __enter__(self) -> "LiveBytes":
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)


@pytest.fixture
def live_bytes():
    """``live_bytes()`` gives a fresh :class:`LiveBytes` counter (``with live_bytes() as m: ...; m.peak``)."""
    return LiveBytes


def spawn_ranks(worker, world: int, deadline_s: float, tmp: Path) -> list[dict]:
    """Run ``worker(rank, init_file, out_dir)`` on ``world`` spawned processes (killed after ``deadline_s`` so
    that nothing hangs) and return the records they saved as ``<tmp>/rank<r>.pt``.  The 2-rank tests spawn
    once per file and run many cases per process group (a spawn costs most of their time)."""
    import time

    import torch.multiprocessing as mp

    context = mp.start_processes(worker, args=(str(tmp / "init"), str(tmp)), nprocs=world, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + deadline_s
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {world} ranks did not finish within {deadline_s} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world)]
