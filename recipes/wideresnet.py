"""WideResNet-d-k for CIFAR-sized input (Zagoruyko & Komodakis 2016), shared by the recipes and benchmarks.

Pre-activation basic blocks (BN → ReLU → 3x3 conv, twice) in three groups of
``(d − 4) / 6`` blocks with ``16k``, ``32k`` and ``64k`` channels; the
second and third groups start with stride 2, and a 1x1 convolution of the
pre-activated input is the shortcut where the shape changes.  No dropout (the
setting of Shu et al. 2019 and the Nyström paper).  WRN-28-10, the classifier
of the paper's Table 4, has 36,479,194 parameters ("3.6×10^7"); WRN-28-2, the
model of Table 5, has 1,467,610; WRN-10-1 (for tests) 77,850.  Global average
pooling before the classifier makes any input of at least 8 x 8 pixels work
(MNIST's 28 x 28 included).

References:
    Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016.
"""

from __future__ import annotations

from torch import Tensor, nn


class _Block(nn.Module):
    def __init__(self, fan_in: int, fan_out: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(fan_in)
        self.conv1 = nn.Conv2d(fan_in, fan_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(fan_out)
        self.conv2 = nn.Conv2d(fan_out, fan_out, 3, 1, 1, bias=False)
        self.relu = nn.ReLU()
        # A 1x1 projection only where the shape changes; otherwise the identity.
        self.shortcut = None if fan_in == fan_out and stride == 1 else nn.Conv2d(fan_in, fan_out, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pre = self.relu(self.bn1(x))
        out = self.conv2(self.relu(self.bn2(self.conv1(pre))))
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Sequential):
    """WRN-``depth``-``width`` for ``(N, channels, H, W)`` images (CIFAR: 3 x 32 x 32), logits ``(N, num_classes)``.

    Args:
        depth: total depth, ``6n + 4`` (28 gives ``n = 4`` blocks per group).
        width: widening factor ``k``.
        num_classes, channels: output classes and input channels.

    Raises:
        ValueError: ``depth`` not of the form ``6n + 4`` with ``n ≥ 1``, or ``width < 1``.
    """

    def __init__(self, depth: int = 28, width: int = 2, num_classes: int = 10, channels: int = 3):
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"Invalid depth: {depth} (expected 6n + 4 with n >= 1, e.g. 28)")
        if width < 1:
            raise ValueError(f"Invalid width: {width} (expected an integer >= 1)")
        n = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        layers: list[nn.Module] = [nn.Conv2d(channels, widths[0], 3, 1, 1, bias=False)]
        for group in range(3):
            for i in range(n):
                fan_in = widths[group] if i == 0 else widths[group + 1]
                stride = 2 if group > 0 and i == 0 else 1
                layers.append(_Block(fan_in, widths[group + 1], stride))
        layers += [
            nn.BatchNorm2d(widths[3]), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[3], num_classes),
        ]
        super().__init__(*layers)


def wrn28(width: int = 2, num_classes: int = 10) -> WideResNet:
    """WRN-28-``width`` for CIFAR (3 × 32 × 32 input)."""
    return WideResNet(28, width, num_classes)
