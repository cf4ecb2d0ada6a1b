"""Tune one weight decay per weight of an MNIST classifier by gradient descent on the validation loss.

The template to copy: an ordinary training loop, plus a HyperOptimizer whose step follows the implicit
hypergradient of the validation loss with respect to the decays (Hataya & Yamada 2023, Eq. 3), with the
inverse Hessian from a rank-10 Nyström sketch.  torch, torchvision and hyperopt_torch only.

The network (784-100-10) trains on 1,000 MNIST images.  Every weight θ_i gets its own decay
exp(φ_i), started at 1, which leaves it underfitting; the hyperparameter steps lower the decays where
that helps the validation loss on 1,000 other training images, and the held-out test accuracy follows.

    python examples/mnist_weight_decay.py --data-root data --download

(torchvision must be the build that matches torch: a CUDA torchvision next to a CPU-only torch fails at
``import torchvision`` with "operator torchvision::nms does not exist"; install both from the same index.)
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from hyperopt_torch import HyperOptimizer


def load_mnist(root: str, train: bool, download: bool, n: int | None = None):
    """The first ``n`` images of a split: float32 ``(n, 784)``, standardised, and int64 labels ``(n,)``."""
    dataset = torchvision.datasets.MNIST(root, train=train, download=download)
    return dataset.data[:n].flatten(1).float().div(255).sub(0.1307).div(0.3081), dataset.targets[:n]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default="data", help="folder holding MNIST/raw/ (torchvision's layout)")
    parser.add_argument("--download", action="store_true", help="let torchvision download MNIST into --data-root")
    parser.add_argument("--n-train", type=int, default=1000, help="training images (the first of MNIST's training split)")
    parser.add_argument("--n-val", type=int, default=1000, help="validation images (the next ones)")
    parser.add_argument("--hidden", type=int, default=100, help="hidden units")
    parser.add_argument("--init-decay", type=float, default=1.0, help="initial decay of every weight")
    parser.add_argument("--inner-steps", type=int, default=20, help="SGD steps between two hyperparameter steps")
    parser.add_argument("--outer-steps", type=int, default=50, help="hyperparameter steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 suits a small model)")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)

    # Data: training and validation images from MNIST's training split, the test split held out.
    x, y = load_mnist(args.data_root, True, args.download, args.n_train + args.n_val)
    x_train, y_train, x_val, y_val = x[:args.n_train], y[:args.n_train], x[args.n_train:], y[args.n_train:]
    x_test, y_test = load_mnist(args.data_root, False, args.download)

    # Model θ and hyperparameters φ: one log-decay per weight (exp keeps every decay positive).
    model = nn.Sequential(nn.Linear(784, args.hidden), nn.LeakyReLU(0.01), nn.Linear(args.hidden, 10))
    log_decay = [torch.full_like(p, math.log(args.init_decay), requires_grad=True) for p in model.parameters()]

    def train_loss(m: nn.Module, log_decay=log_decay) -> torch.Tensor:
        """The inner objective f(θ, φ) = cross-entropy on the training images + ½ Σ_i exp(φ_i) θ_i²."""
        penalty = sum((d.exp() * p.square()).sum() for d, p in zip(log_decay, m.parameters()))
        return F.cross_entropy(m(x_train), y_train) + 0.5 * penalty

    def val_loss(m: nn.Module) -> torch.Tensor:
        """The outer objective g(θ): cross-entropy on the validation images."""
        return F.cross_entropy(m(x_val), y_val)

    @torch.no_grad()
    def test_accuracy(m: nn.Module) -> float:
        return (m(x_test).argmax(1) == y_test).float().mean().item()

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # θ's optimizer, as in any training script
    hopt = HyperOptimizer(log_decay, base=torch.optim.Adam, ihvp="nystrom", rank=10, rho=0.01, lr=0.1)

    for outer in range(args.outer_steps):
        # Inner problem: train θ with φ held fixed (detached), continuing from where θ is.
        fixed = [d.detach() for d in log_decay]
        for _ in range(args.inner_steps):
            optimizer.zero_grad()
            train_loss(model, fixed).backward()
            optimizer.step()
        # Outer step: implicit hypergradient of val_loss at the current θ, then one Adam step on φ.
        info = hopt.step(train_loss, val_loss, model)
        with torch.no_grad():  # decays above 2 / lr = 20 would make the inner SGD diverge: keep them ≤ 1
            for d in log_decay:
                d.clamp_(max=0.0)
        if outer == 0 or (outer + 1) % 10 == 0:
            decay = torch.cat([d.detach().exp().flatten() for d in log_decay])
            print(f"step {outer + 1:>3}: validation loss {info.val_loss:.4f}, training loss {info.train_loss:.4f}, "
                  f"median decay {decay.median():.3g}, test accuracy {test_accuracy(model):.4f}")

    result = {"val_loss": val_loss(model).item(), "test_acc": test_accuracy(model)}
    print(f"after {args.outer_steps} hyperparameter steps: validation loss {result['val_loss']:.4f}, "
          f"test accuracy {result['test_acc']:.4f}")
    return result


if __name__ == "__main__":
    main()
