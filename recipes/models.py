"""Networks used by the recipes: logistic regression, an MLP and a LeNet-like CNN.

Every nonlinearity is LeakyReLU with slope 0.01 rather than ReLU: a ReLU
zeroes whole rows and columns of the Hessian for inactive units, and the
Nyström solver then inverts a singular ``k x k`` block (paper, section 5).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

NEGATIVE_SLOPE = 0.01


class LogisticRegression(nn.Module):
    """``x ↦ θᵀx``: one logit per input, no bias (paper section 5.1).

    Input ``(N, D)``, output logits ``(N,)``.  θ starts at zero, where the
    binary cross-entropy is ``log 2`` whatever the data.
    """

    def __init__(self, in_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(in_features))

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight


class MLP(nn.Sequential):
    """Fully connected network ``in_features → hidden... → out_features`` with LeakyReLU(0.01).

    With ``out_features=1`` the output is squeezed to ``(N,)`` logits for binary
    cross-entropy; otherwise it is ``(N, out_features)``.
    """

    def __init__(self, in_features: int, hidden: Sequence[int] = (64,), out_features: int = 1):
        widths = [in_features, *hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for fan_in, fan_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(fan_in, fan_out), nn.LeakyReLU(NEGATIVE_SLOPE)]
        layers.append(nn.Linear(widths[-1], out_features))
        super().__init__(*layers)
        self.out_features = out_features

    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(x)
        return out.squeeze(-1) if self.out_features == 1 else out


class LeNet(nn.Sequential):
    """LeNet-5-like CNN for ``(N, channels, 28, 28)`` images, logits ``(N, num_classes)``.

    Two 5x5 convolutions (6 and 16 channels) with 2x2 max pooling, then
    fully connected layers 256 → 120 → 84 → ``num_classes``; about 44k parameters.
    """

    def __init__(self, channels: int = 1, num_classes: int = 10):
        super().__init__(
            nn.Conv2d(channels, 6, 5), nn.LeakyReLU(NEGATIVE_SLOPE), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.LeakyReLU(NEGATIVE_SLOPE), nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(16 * 4 * 4, 120), nn.LeakyReLU(NEGATIVE_SLOPE),
            nn.Linear(120, 84), nn.LeakyReLU(NEGATIVE_SLOPE),
            nn.Linear(84, num_classes),
        )
