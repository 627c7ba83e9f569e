"""Models, and the flat view of their shared parameters.

Theory of operation: a model travels as ONE contiguous float vector, the trainable parameters
flattened in `named_parameters()` order. `ParamLayout` records that order (names, shapes, dtypes)
and hashes it into a `schema` string; two peers whose schemas differ cannot mix models, and the
codec rejects a frame whose schema is not ours. Frozen parameters (requires_grad=False, e.g. a
pre-trained backbone) are not part of the vector: they are never sent and never overwritten.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

import torch
from torch import nn

from p2pfl.errors import ConfigError

MODELS = ("mlp", "cnn")


def mlp(in_features: int, num_classes: int, hidden: tuple[int, ...] = (64,)) -> nn.Module:
    """A plain ReLU multilayer perceptron on flat inputs."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class SmallCNN(nn.Module):
    """Two conv blocks and a linear head; 2-D for square flat inputs (digits 8x8), 1-D otherwise.

    GroupNorm rather than BatchNorm: batch statistics are per-peer state that gossip does not
    average, which hurts on non-IID data.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, channels: int = 16) -> None:
        super().__init__()
        if len(input_shape) == 1:
            side = math.isqrt(input_shape[0])
            self.view: tuple[int, ...] = (1, side, side) if side * side == input_shape[0] else (1, input_shape[0])
        else:
            self.view = tuple(input_shape)
        conv = nn.Conv2d if len(self.view) == 3 else nn.Conv1d
        pool = nn.AdaptiveAvgPool2d(1) if len(self.view) == 3 else nn.AdaptiveAvgPool1d(1)
        c_in = self.view[0]
        self.features = nn.Sequential(
            conv(c_in, channels, 3, padding=1), nn.GroupNorm(4, channels), nn.ReLU(),
            conv(channels, 2 * channels, 3, padding=1), nn.GroupNorm(4, 2 * channels), nn.ReLU(),
            pool, nn.Flatten(),
        )
        self.head = nn.Linear(2 * channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], *self.view)  # (B, C, H, W) or (B, C, L)
        return self.head(self.features(x))


def make_model(name: str, input_shape: tuple[int, ...], num_classes: int, *, hidden: tuple[int, ...] = (64,),
               seed: int = 0) -> nn.Module:
    """Build a model by config name with a seeded initialisation (same seed => same weights)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name == "mlp":
            return mlp(math.prod(input_shape), num_classes, hidden)
        if name == "cnn":
            return SmallCNN(input_shape, num_classes)
    raise ConfigError(f"model: unknown value {name!r}; allowed: {', '.join(MODELS)}")


@dataclass(frozen=True)
class ParamLayout:
    """The fixed order of a model's shared (trainable) parameters."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtype: torch.dtype

    @classmethod
    def of(cls, model: nn.Module) -> ParamLayout:
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not params:
            raise ConfigError("model has no trainable parameters to share")
        dtypes = {p.dtype for _, p in params}
        if len(dtypes) != 1:
            raise ConfigError(f"shared parameters must have one dtype, found {sorted(map(str, dtypes))}")
        return cls(tuple(n for n, _ in params), tuple(tuple(p.shape) for _, p in params), dtypes.pop())

    @property
    def size(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    @property
    def schema(self) -> str:
        """Hash of names, shapes and dtype: equal schemas mean the vectors line up element by element."""
        text = json.dumps([list(self.names), [list(s) for s in self.shapes], str(self.dtype)])
        return hashlib.sha256(text.encode()).hexdigest()[:32]


def shared_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def flatten(model: nn.Module) -> torch.Tensor:
    """A fresh contiguous copy of the shared parameters, shape (d,)."""
    with torch.no_grad():
        return torch.cat([p.reshape(-1) for p in shared_parameters(model)])


def load_flat(model: nn.Module, vector: torch.Tensor) -> None:
    """Write a (d,) vector back into the shared parameters, in layout order."""
    params = shared_parameters(model)
    expected = sum(p.numel() for p in params)
    if vector.shape != (expected,):
        raise ValueError(f"vector has shape {tuple(vector.shape)}, the model shares {expected} values")
    with torch.no_grad():
        offset = 0
        for p in params:
            n = p.numel()
            p.copy_(vector[offset:offset + n].view_as(p))
            offset += n


class FlatParameters:
    """A model's shared parameters re-homed as views into ONE contiguous (d,) buffer.

    After this, reading x_i is one copy (`get`) and writing the aggregate back is one copy (`set`),
    instead of a slice-copy per tensor; optimizers keep working since they update the views in
    place. Build it before creating the optimizer, and do not re-assign the parameters afterwards.
    """

    def __init__(self, model: nn.Module) -> None:
        self.params = shared_parameters(model)
        with torch.no_grad():
            self.buffer = torch.cat([p.reshape(-1) for p in self.params])  # (d,)
            offset = 0
            for p in self.params:
                n = p.numel()
                p.data = self.buffer[offset:offset + n].view_as(p)
                offset += n

    def get(self) -> torch.Tensor:
        return self.buffer.clone()

    def set(self, vector: torch.Tensor) -> None:
        if vector.shape != self.buffer.shape:
            raise ValueError(f"vector has shape {tuple(vector.shape)}, the model shares {self.buffer.numel()} values")
        with torch.no_grad():
            self.buffer.copy_(vector)
