"""A user's own model and data for p2pfl, in the user's own module (see docs/own-model.md).

    cd examples/custom_model
    python -m p2pfl.cli sim scenario.toml

`make_cnn` is the model factory and `load_shard` the dataset loader that scenario.toml names by
import string (`model = "digits_cnn:make_cnn"`, `dataset = "digits_cnn:load_shard"`). The data is
scikit-learn's 8x8 handwritten digits, which ship inside scikit-learn: nothing is downloaded.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn


class DigitsCNN(nn.Module):
    """Two 3x3 convolutions over the 8x8 image, then a linear classifier."""

    def __init__(self, num_classes: int = 10, channels: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 8x8 -> 4x4
        )
        self.head = nn.Linear(channels * 4 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def make_cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The model factory: p2pfl passes the shape of one sample and the number of classes (and seeds
    torch before calling it, so every peer starts from the same weights)."""
    if tuple(input_shape) != (1, 8, 8):
        raise ValueError(f"DigitsCNN takes 1x8x8 images, the data has samples of shape {input_shape}")
    return DigitsCNN(num_classes)


def load_shard(shard: int, num_shards: int, seed: int) -> tuple[tuple[torch.Tensor, torch.Tensor],
                                                                   tuple[torch.Tensor, torch.Tensor]]:
    """The dataset loader: this peer's part of the training images (an IID split drawn from `seed`, the
    same on every peer) and the common test set, as (images [N, 1, 8, 8] float32, labels [N] int64)."""
    bunch = load_digits()
    x = torch.tensor(bunch.data / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(bunch.target, dtype=torch.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    test, train = order[:360], order[360:]
    mine = np.array_split(train, num_shards)[shard]
    return (x[mine], y[mine]), (x[test], y[test])
