"""Meta-Weight-Net data reweighting by implicit differentiation (Hataya & Yamada 2023, section 5.4).

Long-tailed CIFAR-10 (Cui et al.'s exponential profile, imbalance 200 / 100 /
50) trains a WideResNet ν_θ; a weighting network μ_φ, an MLP 1 → 100 → 1 with
a sigmoid (Shu et al. 2019), maps each sample's cross-entropy ℓ_i to its
weight.  The inner problem, on the current mini-batch B, is

    f(θ, φ) = (1/|B|) Σ_{i∈B} μ_φ(sg[ℓ_i(θ)]) · ℓ_i(θ) + (λ/2) ‖θ‖²,

minimised by SGD (lr 0.1, momentum 0.9, weight decay λ = 5e-4, ×0.1 at 2/3
and 5/6 of the run as in Shu et al.'s code); θ is never reset.  sg[·] is
stop-gradient: μ_φ sees the loss *value*, as in Shu et al.'s code, so ∇_θ f is
exactly the direction the inner SGD follows and θ's fixed point is the one
implicit differentiation assumes.  The weights are normalised by the batch
size (Shu et al.'s current code; their first version divided by Σ μ instead).
Every ``--hyper-every`` (10) inner steps one Adam step (lr 1e-5, the paper's
value) moves φ along the implicit hypergradient (paper Eq. 3) of the
cross-entropy on a mini-batch of the balanced meta split, a 2 % slice of the
training data, with the classifier in eval mode.  ``--baseline`` trains the
same classifier on the plain mean cross-entropy (Table 4's baseline row).

What sg[·] leaves out: the inner SGD is exact gradient descent on
F(θ, φ) = (1/|B|) Σ W_φ(ℓ_i) with W_φ' = μ_φ, whose Hessian is
(1/|B|) Σ [μ_φ(ℓ_i) ∇²ℓ_i + μ_φ'(ℓ_i) ∇ℓ_i ∇ℓ_iᵀ].  The solvers see f's
Hessian, the first term only (the mixed term ∂²f/∂φ∂θ is the same for f and
F); Shu et al.'s one-step unrolled hypergradient detaches the loss the same
way and uses no Hessian at all.

Outputs in ``--out``: ``config.json``, ``metrics.json`` (test accuracy,
per-class accuracy, per-outer-step curves, the learned loss→weight curve at
every evaluation), ``weights.png``, ``curves.png`` and ``per_class.png``.

Example::

    python -m recipes.reweighting --data-root data --imbalance 100 --ihvp nystrom --out runs/reweighting
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hyperopt_torch import HyperOptimizer

from . import common
from .cifar import CLASSES, flip_labels, load_cifar10, long_tail_split, pair_flip_labels
from .data import DATASETS, load_split
from .models import MLP, LeNet
from .wideresnet import WideResNet

DATASET_CHOICES = ("cifar10", *DATASETS)
NOISE = {"uniform": flip_labels, "flip": pair_flip_labels}  # --noise-type
ARCHS = ("wrn", "mlp", "lenet")
LOSS_GRID = torch.linspace(0.0, 8.0, 81)  # losses at which the learned weight curve is recorded
CURVES = ("val_loss", "train_loss", "weight_mean", "lr", "hvps", "seconds")


# -- configuration -------------------------------------------------------------------------------
def fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text}")
    return value


def at_least_one(text: str) -> float:
    value = float(text)
    if not value >= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {text}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    parser = common.make_parser("recipes.reweighting", __doc__.split("\n\n")[0],
                                outer_steps=1500, rank=10, rho=0.01, iters=10, alpha=0.01)
    task = parser.add_argument_group("task (defaults: paper section 5.4 and Shu et al. 2019)")
    task.add_argument("--baseline", action="store_true", help="train on the plain mean cross-entropy, no reweighting")
    task.add_argument("--dataset", choices=DATASET_CHOICES, default="cifar10")
    task.add_argument("--data-root", default="data",
                      help="folder holding cifar-10-batches-py/ or <MNIST|FashionMNIST>/raw/")
    task.add_argument("--download", action="store_true", help="let torchvision download the dataset into --data-root")
    task.add_argument("--imbalance", type=at_least_one, default=100.0,
                      help="largest / smallest class size of the long-tailed training split (paper: 200, 100, 50)")
    task.add_argument("--meta-fraction", type=fraction, default=0.02,
                      help="share of the training data set aside as the balanced meta (validation) split")
    task.add_argument("--label-noise", type=fraction, default=0.0,
                      help="share of training labels corrupted as --noise-type says")
    task.add_argument("--noise-type", choices=tuple(NOISE), default="uniform",
                      help="uniform: redraw the label over all classes; flip: c -> (c + 1) mod C (Shu et al. 2019)")
    task.add_argument("--train-subset", type=common.positive_int, default=None,
                      help="keep N random images of the training split (after the meta split and the long tail)")
    task.add_argument("--resize", type=common.positive_int, default=None,
                      help="resize every image to N x N (bilinear, antialiased); default: native size (the WRN "
                           "takes MNIST's 28 x 28 as it is)")
    task.add_argument("--arch", choices=ARCHS, default="wrn",
                      help="classifier: WideResNet (--depth, --width), MLP (--mlp-hidden) or LeNet (28 x 28 input)")
    task.add_argument("--mlp-hidden", type=common.positive_int, nargs="+", default=[256],
                      help="--arch mlp: hidden layer widths")
    task.add_argument("--depth", type=common.positive_int, default=28, help="WideResNet depth (6n + 4)")
    task.add_argument("--width", type=common.positive_int, default=10, help="WideResNet widening factor k")
    task.add_argument("--hidden", type=common.positive_int, default=100, help="hidden units of the weighting MLP")
    task.add_argument("--batch-size", type=common.positive_int, default=100, help="training mini-batch")
    task.add_argument("--meta-batch", type=common.positive_int, default=100, help="meta mini-batch per hypergradient")
    task.add_argument("--weight-norm", choices=("batch", "sum"), default="batch",
                      help="divide the weighted loss by the batch size (Shu et al.'s current code) or by the sum of "
                           "the weights (their first version: only relative weights matter)")
    task.add_argument("--hyper-every", type=common.positive_int, default=10,
                      help="inner SGD steps per outer step (inner steps = outer steps x this)")
    task.add_argument("--inner-lr", type=common.positive_float, default=0.1, help="inner SGD learning rate")
    task.add_argument("--momentum", type=common.nonnegative_float, default=0.9, help="inner SGD momentum")
    task.add_argument("--weight-decay", type=common.nonnegative_float, default=5e-4, help="inner SGD weight decay λ")
    task.add_argument("--lr-milestones", type=common.positive_int, nargs="*", default=None,
                      help="outer steps after which the inner lr is multiplied by 0.1; default 2/3 and 5/6 of "
                           "--outer-steps (Shu et al.: epochs 80 and 100 of 120)")
    task.add_argument("--outer-lr", type=common.positive_float, default=1e-5,
                      help="Adam learning rate of the weighting net (paper; Shu et al.'s code uses 1e-3)")
    task.add_argument("--no-augment", dest="augment", action="store_false",
                      help="CIFAR-10 only: no random crop (padding 4) and horizontal flip")
    task.add_argument("--amp", action="store_true", help="classifier forward passes in bfloat16 autocast")
    task.add_argument("--fsdp", action="store_true",
                      help="under torchrun: shard the classifier with FSDP2 (fully_shard) instead of wrapping it in DDP")
    task.add_argument("--eval-every", type=common.positive_int, default=100,
                      help="outer steps between test evaluations (and weight-curve snapshots)")
    task.add_argument("--test-subset", type=common.positive_int, default=None,
                      help="evaluate on the first N test images")
    args = parser.parse_args(argv)
    if args.lr_milestones is None:  # recorded in config.json, so --resume with another --outer-steps keeps them
        args.lr_milestones = [args.outer_steps * 2 // 3, args.outer_steps * 5 // 6]
    return args


# -- data ----------------------------------------------------------------------------------------
def load_data(args: argparse.Namespace, device: torch.device) -> dict:
    """Long-tailed training split, balanced meta split (both from the training data) and the test split.

    Returns ``{"train": (x, y), "meta": (x, y), "test": (x, y), "counts": [...]}`` on ``device``, plus the
    training split's uncorrupted labels ``"train_true_labels"``.

    Raises:
        DatasetMissing: the files are not under ``--data-root``.
        DataError: a file is damaged or inconsistent (named in the message).
        RecipeError: the training data is too small for the requested meta split.
    """
    def load(train: bool) -> tuple[Tensor, Tensor]:
        if args.dataset == "cifar10":
            return load_cifar10(args.data_root, train=train, download=args.download)
        return load_split(args.dataset, args.data_root, train=train, download=args.download)

    x, y = load(True)
    x_test, y_test = load(False)
    if args.resize is not None:
        x, x_test = (F.interpolate(t, size=args.resize, mode="bilinear", antialias=True) for t in (x, x_test))
    num_classes = int(y.max()) + 1
    split = torch.Generator().manual_seed(args.seed)
    meta_per_class = max(1, round(args.meta_fraction * len(y) / num_classes))
    try:
        train_index, meta_index = long_tail_split(y, imbalance=args.imbalance, meta_per_class=meta_per_class,
                                                  generator=split)
    except ValueError as error:
        raise common.RecipeError(f"--meta-fraction {args.meta_fraction}: {error}") from None
    if args.train_subset is not None:
        train_index = train_index[torch.randperm(len(train_index), generator=split)[:args.train_subset]]
    y_train = y[train_index]
    if args.label_noise > 0:
        y_train = NOISE[args.noise_type](y_train, args.label_noise, num_classes, split)
    return {
        "train": (x[train_index].to(device), y_train.to(device)),
        "train_true_labels": y[train_index].to(device),  # which labels the noise changed: for train_stats
        "meta": (x[meta_index].to(device), y[meta_index].to(device)),
        "test": (x_test[:args.test_subset].to(device), y_test[:args.test_subset].to(device)),
        "counts": torch.bincount(y[train_index], minlength=num_classes).tolist(),
        "label_noise_actual": (y_train != y[train_index]).float().mean().item(),
    }


def augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """CIFAR augmentation of a batch ``(B, 3, H, W)``: reflect-pad 4, random H×W crop, random horizontal flip."""
    b, c, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4), mode="reflect")
    top, left = torch.randint(9, (2, b, 1), generator=generator).to(x.device)
    rows = (top + torch.arange(h, device=x.device)).view(b, 1, h, 1)
    cols = (left + torch.arange(w, device=x.device)).view(b, 1, 1, w)
    crops = padded[torch.arange(b, device=x.device).view(b, 1, 1, 1), torch.arange(c, device=x.device).view(1, c, 1, 1),
                   rows, cols]
    flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)[:, None, None, None]
    return torch.where(flip, crops.flip(3), crops)


# -- models --------------------------------------------------------------------------------------
def make_classifier(args: argparse.Namespace, num_classes: int, shape: tuple[int, int, int]) -> nn.Module:
    """ν_θ for images of ``shape`` (channels, height, width), as ``--arch`` says.

    Raises:
        ValueError: an invalid WideResNet depth, or LeNet on images other than 28 x 28.
    """
    channels, height, width = shape
    if args.arch == "mlp":
        return MLP(channels * height * width, args.mlp_hidden, num_classes)
    if args.arch == "lenet":
        if (height, width) != (28, 28):
            raise ValueError(f"--arch lenet takes 28 x 28 images, got {height} x {width}: drop --resize")
        return LeNet(channels, num_classes)
    return WideResNet(args.depth, args.width, num_classes, channels=channels)


class WeightNet(nn.Sequential):
    """μ_φ: a sample's loss ``(N,)`` ↦ its weight in (0, 1), ``(N,)``; MLP 1 → hidden → 1, ReLU, sigmoid."""

    def __init__(self, hidden: int = 100):
        super().__init__(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, 1), nn.Sigmoid())

    def forward(self, losses: Tensor) -> Tensor:
        return super().forward(losses.unsqueeze(-1)).squeeze(-1)


def sample_losses(model: nn.Module, x: Tensor, y: Tensor, amp: bool) -> Tensor:
    """Per-sample cross-entropy ``(N,)`` in the model's dtype; with ``amp`` the forward pass runs in
    bfloat16 autocast and the cross-entropy in float32."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        logits = model(x)
    return F.cross_entropy(logits.float() if amp else logits, y, reduction="none")


def weighted_loss(weights: Tensor, losses: Tensor, norm: str = "batch") -> Tensor:
    """Σ w_i ℓ_i / |B| (``norm="batch"``) or Σ w_i ℓ_i / Σ w_i (``"sum"``), a scalar tensor.

    With ``"batch"`` a larger weight everywhere is a larger step: μ_φ can lower the meta loss just by
    growing, the short-horizon pull towards a larger learning rate.  ``"sum"`` leaves only relative weights.
    """
    return (weights * losses).sum() / weights.sum() if norm == "sum" else (weights * losses).mean()


def inner_objective(model: nn.Module, weight_net: nn.Module, x: Tensor, y: Tensor, weight_decay: float,
                    amp: bool = False, norm: str = "batch") -> Tensor:
    """f(θ, φ) = (1/|B|) Σ μ_φ(sg[ℓ_i]) ℓ_i + (λ/2)‖θ‖² on the batch ``(x, y)``, a scalar tensor
    (with ``norm="sum"`` the first term divides by Σ μ_φ(sg[ℓ_i]) instead of |B|).

    φ enters only through the weights; μ_φ sees the detached loss values (module docstring)."""
    losses = sample_losses(model, x, y, amp)
    # SGD's weight_decay is the gradient of (λ/2)‖θ‖²: with it, ∇_θ f is the inner step's direction.
    decay = 0.5 * weight_decay * sum(p.square().sum() for p in model.parameters())
    return weighted_loss(weight_net(losses.detach()), losses, norm) + decay


@torch.no_grad()
def evaluate(model: nn.Module, split: tuple[Tensor, Tensor], num_classes: int, amp: bool) -> tuple[float, list[float]]:
    """``(accuracy, per-class accuracy)`` of ``model`` in eval mode; the mode is restored afterwards."""
    was_training = model.training
    model.eval()
    x, y = split
    correct = torch.zeros(num_classes, device=y.device)
    for i in range(0, len(x), 500):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            hits = (model(x[i:i + 500]).argmax(1) == y[i:i + 500]).float()
        correct.index_add_(0, y[i:i + 500], hits)
    model.train(was_training)
    totals = torch.bincount(y, minlength=num_classes).clamp(min=1)
    return (correct.sum() / len(y)).item(), (correct / totals).tolist()


@torch.no_grad()
def train_stats(model: nn.Module, weight_net: nn.Module | None, split: tuple[Tensor, Tensor], true_labels: Tensor,
                num_classes: int, amp: bool) -> dict:
    """What the classifier has fitted, and what μ_φ weighs, on the training split, by clean / corrupted label.

    One pass over ``split`` in eval mode (the mode is restored).  ``loss_*``: mean cross-entropy on the
    label trained on; ``fit_*``: share of samples predicted as that label (``fit_noisy`` near 1 means the
    corrupted labels are memorised); ``weight_*``: mean μ_φ(ℓ_i) (``None`` without a weighting net);
    ``weight_per_class``: mean μ_φ(ℓ_i) per true class.  ``*_noisy`` is ``None`` when no label was corrupted.
    """
    was_training = model.training
    model.eval()
    x, y = split
    losses, hits = [], []
    for i in range(0, len(x), 500):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x[i:i + 500]).float()
        losses.append(F.cross_entropy(logits, y[i:i + 500], reduction="none"))
        hits.append((logits.argmax(1) == y[i:i + 500]).float())
    model.train(was_training)
    losses, hits = torch.cat(losses), torch.cat(hits)
    weights = weight_net(losses) if weight_net is not None else None
    noisy = y != true_labels
    stats = {}
    for name, mask in (("clean", ~noisy), ("noisy", noisy)):
        some = bool(mask.any())
        stats[f"loss_{name}"] = losses[mask].mean().item() if some else None
        stats[f"fit_{name}"] = hits[mask].mean().item() if some else None
        stats[f"weight_{name}"] = weights[mask].mean().item() if some and weights is not None else None
    stats["weight_per_class"] = None if weights is None else (
        torch.zeros(num_classes, device=y.device).index_add_(0, true_labels, weights)
        / torch.bincount(true_labels, minlength=num_classes).clamp(min=1)).tolist()
    return stats


# -- one run -------------------------------------------------------------------------------------
@common.command
def main(argv=None) -> dict:
    args = parse_args(argv)
    method = "baseline" if args.baseline else args.ihvp
    solver = common.solver_from_args(args)
    device = common.init_torchrun(common.resolve_device(args.device, args.threads))
    if args.amp and device.type == "cpu" and common.is_main():
        print("note: --amp on the CPU runs bfloat16 autocast too; it is slower than float32 on most CPUs")
    data = load_data(args, device)
    num_classes = len(data["counts"])
    # Models: the classifier θ (initialised from --seed) and the weighting net φ.
    torch.manual_seed(args.seed)
    try:
        model = make_classifier(args, num_classes, tuple(data["train"][0].shape[1:])).to(device)
        # Under torchrun: DDP, each rank training on its share of every batch (BatchNorm's batch
        # statistics are then per share, as in any DDP run without SyncBatchNorm).
        model = common.fully_sharded(model) if args.fsdp else common.data_parallel(model)
    except ValueError as error:
        raise common.RecipeError(str(error)) from None
    out = common.prepare_out(args)

    network = getattr(model, "module", model)  # the classifier itself: checkpoints move between 1 and n ranks
    weight_net = WeightNet(args.hidden).to(device)
    inner_opt = torch.optim.SGD(model.parameters(), lr=args.inner_lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    hopt = HyperOptimizer(weight_net.parameters(), base=torch.optim.Adam, ihvp=solver, lr=args.outer_lr)
    batches = torch.Generator().manual_seed(args.seed)  # training / meta batches and augmentation

    checkpoint = common.Checkpoint(args, f"{method}-seed{args.seed}")
    curves = {name: [] for name in (*CURVES, "eval_step", "test_acc")}
    weight_curves = []  # μ_φ on LOSS_GRID at every evaluation
    stats = []  # train_stats at every evaluation
    state = checkpoint.load()
    if state is not None:
        common.load_state_dicts(network, inner_opt, state["model"], state["inner_opt"])
        weight_net.load_state_dict(state["weight_net"])
        hopt.load_state_dict(state["hopt"])
        batches.set_state(state["batches"])
        curves, weight_curves, stats = state["curves"], state["weight_curves"], state.get("train_stats", [])

    def save() -> None:
        model_state, inner_state = common.state_dicts(network, inner_opt)  # full ones under --fsdp
        checkpoint.save({"model": model_state, "inner_opt": inner_state,
                         "weight_net": weight_net.state_dict(), "hopt": hopt.state_dict(),
                         "batches": batches.get_state(), "curves": curves, "weight_curves": weight_curves,
                         "train_stats": stats})

    def train_batch() -> tuple[Tensor, Tensor]:
        x, y = data["train"]
        index = torch.randint(len(x), (args.batch_size,), generator=batches).to(device)
        x = x[index]
        if args.augment and args.dataset == "cifar10":
            x = augment(x, batches)
        return common.shard(x), common.shard(y[index])

    x_meta, y_meta = data["meta"]
    start = len(curves["val_loss"])
    bar = common.progress(args, total=args.outer_steps, initial=start, desc=f"reweighting {method}")
    model.train()
    for step in range(start, args.outer_steps):
        # Inner problem: --hyper-every SGD steps on the reweighted loss, φ held fixed.
        lr = args.inner_lr * 0.1 ** sum(step >= m for m in args.lr_milestones)
        for group in inner_opt.param_groups:
            group["lr"] = lr
        plain, weight_sum = 0.0, 0.0  # summed as tensors: no host sync per inner step on a GPU
        for _ in range(args.hyper_every):
            x, y = train_batch()
            losses = sample_losses(model, x, y, args.amp)
            weights = torch.ones_like(losses) if args.baseline else weight_net(losses.detach()).detach()
            inner_opt.zero_grad()
            weighted_loss(weights, losses, args.weight_norm).backward()
            inner_opt.step()
            plain = plain + losses.detach().mean()
            weight_sum = weight_sum + weights.mean()

        # Outer step on the current mini-batch (x, y) and a balanced meta batch.
        meta_index = torch.randint(len(x_meta), (args.meta_batch,), generator=batches).to(device)

        def val_loss_fn(m: nn.Module) -> Tensor:
            m.eval()  # g is the loss of the classifier as it is tested (running BN statistics)
            return sample_losses(m, common.shard(x_meta[meta_index]), common.shard(y_meta[meta_index]), args.amp).mean()

        def train_loss_fn(m: nn.Module) -> Tensor:
            return inner_objective(m, weight_net, x, y, args.weight_decay, args.amp, args.weight_norm)

        if args.baseline:
            with torch.no_grad():
                val_loss, hvps, seconds = common.mean_over_ranks(val_loss_fn(model)).item(), 0, 0.0
            model.train()
        else:
            info = hopt.step(train_loss_fn, val_loss_fn, model)
            common.check_hypergradient(info, f"{method}, outer step {step + 1}", "lower --inner-lr")
            val_loss, hvps, seconds = info.val_loss, info.hvps, info.seconds

        plain, weight_sum = common.mean_over_ranks(torch.stack([plain, weight_sum])).tolist()
        common.check_finite(torch.tensor([plain, val_loss]), f"{method}, outer step {step + 1}: the training or "
                            "meta loss", "lower --inner-lr")
        for name, value in zip(CURVES, (val_loss, plain / args.hyper_every,
                                        weight_sum / args.hyper_every, lr, hvps, seconds)):
            curves[name].append(value)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.outer_steps:
            curves["eval_step"].append(step + 1)
            curves["test_acc"].append(evaluate(model, data["test"], num_classes, args.amp)[0])
            stats.append({"step": step + 1, **train_stats(model, None if args.baseline else weight_net, data["train"],
                                                          data["train_true_labels"], num_classes, args.amp)})
            if not args.baseline:
                with torch.no_grad():
                    weight_curves.append({"step": step + 1, "weights": weight_net(LOSS_GRID.to(device)).tolist()})
            if common.is_main():
                bar.write(f"step {step + 1}: test accuracy {curves['test_acc'][-1]:.4f}")
        bar.update()
        bar.set_postfix(val=f"{val_loss:.4f}")
        if (step + 1) % args.checkpoint_every == 0:
            save()
    bar.close()
    save()

    # Evaluation and outputs.
    test_acc, per_class = evaluate(model, data["test"], num_classes, args.amp)
    reweighted = [s for s in curves["seconds"] if s > 0]
    final = {
        "test_acc": test_acc,
        "per_class_acc": per_class,
        "train_counts": data["counts"],
        "meta_size": len(x_meta),
        "label_noise_actual": data["label_noise_actual"],
        "val_loss_last_10": sum(curves["val_loss"][-10:]) / len(curves["val_loss"][-10:]),
        "inner_steps": args.outer_steps * args.hyper_every,
        "hvps_per_step": curves["hvps"][-1],
        "hypergrad_seconds_mean": sum(reweighted) / len(reweighted) if reweighted else 0.0,
    }
    metrics = {"recipe": "reweighting", "method": method, "dataset": args.dataset, "imbalance": args.imbalance,
               "outer_steps": args.outer_steps, "final": final, "curves": curves,
               "loss_grid": LOSS_GRID.tolist(), "weight_curves": weight_curves, "train_stats": stats}
    common.write_json(out / "metrics.json", metrics)
    if common.is_main():
        print(f"{method}: test accuracy {test_acc:.4f} after {final['inner_steps']} inner steps; per class "
              + " ".join(f"{a:.2f}" for a in per_class))
    plot_curves(out / "curves.png", metrics, args)
    plot_per_class(out / "per_class.png", metrics, args)
    if weight_curves:
        plot_weights(out / "weights.png", metrics, args)
    return metrics


# -- outputs -------------------------------------------------------------------------------------
def class_names(args: argparse.Namespace, num_classes: int) -> list[str]:
    return list(CLASSES) if args.dataset == "cifar10" else [str(c) for c in range(num_classes)]


def plot_weights(path, metrics: dict, args: argparse.Namespace) -> None:
    def draw(fig) -> None:
        ax = fig.subplots()
        snapshots = metrics["weight_curves"]
        for i, snapshot in enumerate(snapshots):
            shade = 0.2 + 0.8 * (i + 1) / len(snapshots)
            ax.plot(metrics["loss_grid"], snapshot["weights"], color=(0.1, 0.3, 0.8, shade),
                    label=f"outer step {snapshot['step']}")
        ax.set(xlabel="training loss ℓ (cross-entropy)", ylabel="weight μ_φ(ℓ)",
               title=f"learned loss → weight, {args.dataset} imbalance {args.imbalance:g}, {metrics['method']}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")

    common.save_figure(path, draw, figsize=(6.5, 4.5))


def plot_curves(path, metrics: dict, args: argparse.Namespace) -> None:
    curves = metrics["curves"]

    def draw(fig) -> None:
        left, middle, right = fig.subplots(1, 3)
        steps = range(1, len(curves["val_loss"]) + 1)
        left.plot(steps, curves["train_loss"], linewidth=0.8, marker=common.marker_for(len(steps)))
        left.set(xlabel="outer step", ylabel="training cross-entropy (unweighted)")
        middle.plot(steps, curves["val_loss"], linewidth=0.8, marker=common.marker_for(len(steps)))
        middle.set(xlabel="outer step", ylabel="meta (validation) loss")
        right.plot(curves["eval_step"], curves["test_acc"], marker="o")
        # The whole accuracy range: autoscaling blows 1.7 points up into a cliff.
        right.set(xlabel="outer step", ylabel="test accuracy", ylim=(0, 1))
        for ax, name in ((left, "train_loss"), (middle, "val_loss")):
            common.loss_scale(ax, curves[name])
        for ax in (left, middle, right):
            ax.grid(alpha=0.3)
        common.integer_steps(left, middle, right)
        fig.suptitle(f"{args.dataset}, imbalance {args.imbalance:g}, {metrics['method']}")

    common.save_figure(path, draw, figsize=(11.0, 3.6))


def plot_per_class(path, metrics: dict, args: argparse.Namespace) -> None:
    final = metrics["final"]

    def draw(fig) -> None:
        ax = fig.subplots()
        names = class_names(args, len(final["per_class_acc"]))
        labels = [f"{name}\n{count}" for name, count in zip(names, final["train_counts"])]
        ax.bar(range(len(labels)), final["per_class_acc"])
        ax.set_xticks(range(len(labels)), labels, fontsize="small")
        ax.set(xlabel="class (training images)", ylabel="test accuracy", ylim=(0, 1),
               title=f"per-class accuracy, {metrics['method']}: {final['test_acc']:.3f} overall")
        ax.grid(alpha=0.3, axis="y")

    common.save_figure(path, draw, figsize=(8.0, 4.0))


if __name__ == "__main__":
    main()
