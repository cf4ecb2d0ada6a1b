"""Dataset distillation by implicit differentiation (Hataya & Yamada 2023, section 5.2).

The hyperparameters are C = 50 learned images φ (5 per class, MNIST-sized)
with fixed labels.  Fixed-known initialisation (Wang et al. 2018): a LeNet-like
CNN (LeakyReLU, slope 0.01) is reset to the same initial weights, then trained
by plain SGD (lr 0.01) for 100 steps on the 50 images alone.  At that inner
solution one outer step moves the images with Adam (lr 1e-3) along the implicit
hypergradient of the cross-entropy on a batch of real training images.  The
paper's budget is 5,000 outer steps (Table 2: test accuracy CG 0.17,
Neumann 0.47, Nyström 0.49).

Evaluation trains the network from the same known initialisation on the
distilled images (the setting the images are optimised for) and reports its
test accuracy; ``test_acc_random_init`` does the same from a different random
initialisation, which fixed-init distillation is not expected to survive.

Outputs in ``--out``: ``config.json``, ``metrics.json``, ``distilled.png``
(the images, one column per class) and ``curves.png``.

Example::

    python -m recipes.distillation --data-root data --out runs/distillation
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hyperopt_torch import HyperOptimizer

from . import common
from .data import DATASETS, load_split
from .models import LeNet

CURVES = ("val_loss", "train_loss", "hvps", "seconds")
CLASS_NAMES = {
    "mnist": tuple(str(digit) for digit in range(10)),
    "fashion-mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                      "Ankle boot"),
}


# -- configuration -------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    parser = common.make_parser("recipes.distillation", __doc__.split("\n\n")[0],
                                outer_steps=5000, rank=10, rho=0.01, iters=10, alpha=0.01, threads=1)
    task = parser.add_argument_group("task (defaults: paper section 5.2)")
    task.add_argument("--dataset", choices=tuple(DATASETS), default="mnist")
    task.add_argument("--data-root", default="data", help="folder holding <MNIST|FashionMNIST>/raw/*-idx?-ubyte")
    task.add_argument("--download", action="store_true", help="let torchvision download the dataset into --data-root")
    task.add_argument("--per-class", type=common.positive_int, default=5, help="distilled images per class (C = 10x)")
    task.add_argument("--inner-steps", type=common.positive_int, default=100, help="inner SGD steps per outer step")
    task.add_argument("--inner-lr", type=common.positive_float, default=0.01, help="inner SGD learning rate")
    task.add_argument("--outer-lr", type=common.positive_float, default=1e-3, help="outer Adam learning rate")
    task.add_argument("--val-batch", type=common.positive_int, default=256,
                      help="real training images in each outer step's validation loss")
    task.add_argument("--train-subset", type=common.positive_int, default=None,
                      help="use only the first N real training images")
    task.add_argument("--test-subset", type=common.positive_int, default=None,
                      help="evaluate on only the first N test images")
    task.add_argument("--eval-every", type=common.positive_int, default=250, help="outer steps between test evaluations")
    return parser.parse_args(argv)


# -- data ----------------------------------------------------------------------------------------
def load_data(args: argparse.Namespace, device: torch.device) -> dict[str, tuple[Tensor, Tensor]]:
    splits = {}
    for name, train, limit in (("train", True, args.train_subset), ("test", False, args.test_subset)):
        images, labels = load_split(args.dataset, args.data_root, train=train, download=args.download)
        splits[name] = (images[:limit].to(device), labels[:limit].to(device))
    return splits


# -- inner problem -------------------------------------------------------------------------------
def train_on_distilled(model: nn.Module, theta_init: dict, images: Tensor, labels: Tensor,
                       args: argparse.Namespace) -> float:
    """Reset ``model`` to ``theta_init`` and run the inner SGD on the (detached) distilled images.

    Returns the final training loss.
    """
    model.load_state_dict(theta_init)
    inner_opt = torch.optim.SGD(model.parameters(), lr=args.inner_lr)
    for _ in range(args.inner_steps):
        inner_opt.zero_grad()
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        inner_opt.step()
    return loss.item()


@torch.no_grad()
def accuracy(model: nn.Module, split: tuple[Tensor, Tensor], batch: int = 1000) -> float:
    x, y = split
    correct = sum((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item() for i in range(0, len(x), batch))
    return correct / len(x)


def test_accuracy(model: nn.Module, theta_init: dict, images: Tensor, labels: Tensor, split, args) -> float:
    """Test accuracy of ``model`` trained from ``theta_init`` on the distilled images."""
    train_on_distilled(model, theta_init, images.detach(), labels, args)
    return accuracy(model, split)


# -- outputs -------------------------------------------------------------------------------------
def plot_images(path, images: Tensor, args: argparse.Namespace) -> None:
    _, mean, std = DATASETS[args.dataset]
    pixels = (images.detach().cpu() * std + mean).clamp(0, 1)[:, 0].numpy()  # back to [0, 1] pixel scale

    def draw(fig) -> None:
        axes = fig.subplots(args.per_class, 10, squeeze=False)
        for i, ax in enumerate(axes.T.flatten()):  # one column per class
            ax.imshow(pixels[i], cmap="gray", vmin=0, vmax=1)
            ax.set_axis_off()
        for ax, name in zip(axes[0], CLASS_NAMES[args.dataset]):
            ax.set_title(name, fontsize=9)
        fig.suptitle(f"{len(pixels)} distilled {args.dataset} images, {args.ihvp}, one column per class")

    common.save_figure(path, draw, figsize=(10.0, 1.0 * args.per_class + 0.6))


def plot_curves(path, curves: dict, args: argparse.Namespace) -> None:
    def draw(fig) -> None:
        left, right = fig.subplots(1, 2)
        val = torch.tensor(curves["val_loss"])
        window = len(val) // 50  # a running mean only where there are enough steps to smooth
        left.plot(range(1, len(val) + 1), val.tolist(), alpha=0.3 if window > 1 else 1.0, linewidth=0.6,
                  marker=common.marker_for(len(val)), label="per step")
        if window > 1:
            smooth = val.unfold(0, window, 1).mean(1)
            left.plot(range(window, window + len(smooth)), smooth.tolist(), label=f"running mean of {window} steps")
        left.set(xlabel="outer step", ylabel="validation loss (real images)", title=f"{args.dataset}, {args.ihvp}")
        left.legend()
        common.integer_steps(left, right)
        right.plot(curves["eval_step"], curves["test_acc"], marker="o", label="test accuracy")
        right.axhline(0.1, color="gray", linestyle=":", label="chance (10 classes)")
        right.legend()
        # The whole accuracy range, chance (0.1) included: autoscaling would blow a flat curve up to a 0.001 span.
        right.set(xlabel="outer step", ylabel="test accuracy", title="net trained on the distilled images", ylim=(0, 1))
        for ax in (left, right):
            ax.grid(alpha=0.3)

    common.save_figure(path, draw, figsize=(10.0, 3.8))


@common.command
def main(argv=None) -> dict:
    args = parse_args(argv)
    solver = common.solver_from_args(args)
    device = common.resolve_device(args.device, args.threads)
    data = load_data(args, device)
    out = common.prepare_out(args)

    # Models: the fixed known initialisation θ₀, the distilled images φ and their fixed labels.
    torch.manual_seed(args.seed)
    model = LeNet().to(device)
    theta_init = {k: v.clone() for k, v in model.state_dict().items()}
    labels = torch.arange(10, device=device).repeat_interleave(args.per_class)
    images = torch.randn(len(labels), 1, 28, 28, device=device, requires_grad=True)
    hopt = HyperOptimizer([images], base=torch.optim.Adam, ihvp=solver, lr=args.outer_lr)
    batches = torch.Generator().manual_seed(args.seed)

    checkpoint = common.Checkpoint(args, f"{args.ihvp}-seed{args.seed}")
    curves = {name: [] for name in (*CURVES, "eval_step", "test_acc")}
    state = checkpoint.load()
    if state is not None:
        with torch.no_grad():
            images.copy_(state["images"])
        hopt.load_state_dict(state["hopt"])
        batches.set_state(state["batches"])
        curves = state["curves"]

    def save() -> None:
        checkpoint.save({"images": images.detach(), "hopt": hopt.state_dict(), "batches": batches.get_state(),
                         "curves": curves})

    def train_loss_fn(m: nn.Module) -> Tensor:
        return F.cross_entropy(m(images), labels)

    x_train, y_train = data["train"]
    start = len(curves["val_loss"])
    bar = common.progress(args, total=args.outer_steps, initial=start, desc=f"distillation {args.ihvp}")
    for step in range(start, args.outer_steps):
        # Inner problem: train the reset network on the current images, φ held fixed.
        train_loss = train_on_distilled(model, theta_init, images.detach(), labels, args)
        common.check_finite(train_loss, f"outer step {step + 1}: the inner training loss", "lower --inner-lr")

        # Outer step: hypergradient of the loss on a batch of real training images.
        index = torch.randint(len(x_train), (args.val_batch,), generator=batches).to(device)
        info = hopt.step(train_loss_fn, lambda m: F.cross_entropy(m(x_train[index]), y_train[index]), model)
        common.check_hypergradient(info, f"outer step {step + 1}", "lower --inner-lr")

        curves["val_loss"].append(info.val_loss)
        curves["train_loss"].append(train_loss)
        curves["hvps"].append(info.hvps)
        curves["seconds"].append(info.seconds)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.outer_steps:
            curves["eval_step"].append(step + 1)
            curves["test_acc"].append(test_accuracy(model, theta_init, images, labels, data["test"], args))
            bar.write(f"step {step + 1}: test accuracy {curves['test_acc'][-1]:.4f}")
        bar.update()
        bar.set_postfix(val=f"{info.val_loss:.4f}")
        if (step + 1) % args.checkpoint_every == 0:
            save()
    bar.close()
    save()

    # Evaluation: from the known initialisation (as optimised) and from an unseen random one.
    torch.manual_seed(args.seed + 1)
    random_init = {k: v.clone() for k, v in LeNet().to(device).state_dict().items()}
    final = {
        "test_acc": test_accuracy(model, theta_init, images, labels, data["test"], args),
        "test_acc_random_init": test_accuracy(model, random_init, images, labels, data["test"], args),
        "val_loss_last_100": sum(curves["val_loss"][-100:]) / len(curves["val_loss"][-100:]),
        "hvps_per_step": curves["hvps"][-1],
        "hypergrad_seconds_mean": sum(curves["seconds"]) / len(curves["seconds"]),
    }
    metrics = {"recipe": "distillation", "dataset": args.dataset, "ihvp": args.ihvp,
               "outer_steps": args.outer_steps, "final": final, "curves": curves}
    common.write_json(out / "metrics.json", metrics)
    print(f"{args.ihvp}: test accuracy {final['test_acc']:.4f} (known init), "
          f"{final['test_acc_random_init']:.4f} (random init) after {args.outer_steps} outer steps")
    plot_images(out / "distilled.png", images, args)
    plot_curves(out / "curves.png", curves, args)
    return metrics


if __name__ == "__main__":
    main()
