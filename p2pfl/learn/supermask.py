"""Supermask (edge-popup) layers: frozen random weights, trainable per-edge scores, a top-k mask.

Theory of operation (Ramanujan et al., "What's Hidden in a Randomly Weighted Neural Network?",
arXiv 1911.13299; as used by FRL, Mozaffari, Shejwalkar, Houmansadr, arXiv 2110.04350):
every weighted layer holds a FROZEN weight W, drawn once from a seed shared by all peers as a
"signed constant" (each entry +/- gain / sqrt(fan_in), gain sqrt(2) for ReLU), and a real-valued
score s per edge (per entry of W), initialised Kaiming-uniform (bound 1 / sqrt(fan_in)) from the
same seed. The forward pass uses W * TopK(|s|, k): the fraction k of edges with the largest |s| are
on, the rest off. The mask has no gradient, so the backward pass is straight-through: the scores
get dL/d(W*mask) * W as if the mask were the identity. Layers have no bias, and normalisation is
non-affine (nothing to learn but the scores). Only the scores are trainable parameters, so the
`LocalTrainer` (p2pfl.learn.train) trains them as it would any model's parameters.

`to_supermask(model, seed=, sparsity=)` converts an MLP or SmallCNN of p2pfl.learn.models in
place: Linear / Conv1d / Conv2d become supermask layers of the same shape, GroupNorm / BatchNorm
become non-affine GroupNorm. The authors' LeNet has no normalisation and their Conv8 uses batch
norm without running statistics; GroupNorm is kept here for the reason SmallCNN uses it (batch
statistics are per-peer state). Any other layer with parameters is refused (ConfigError).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from p2pfl.errors import ConfigError


class _TopK(torch.autograd.Function):
    """1 for the top fraction k of `scores` (by value; the lowest int((1-k) n) are 0), else 0; the
    gradient passes straight through."""

    @staticmethod
    def forward(ctx: Any, scores: torch.Tensor, k: float) -> torch.Tensor:
        flat = scores.flatten()
        off = int((1 - k) * flat.numel())
        mask = torch.ones_like(flat)
        mask[flat.argsort()[:off]] = 0
        return mask.view_as(scores)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def topk_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The supermask of `scores`: top `sparsity` fraction by |score| -> 1; gradient straight through."""
    return _TopK.apply(scores.abs(), sparsity)


class SupermaskLayer(nn.Module):
    """A frozen signed-constant weight (buffer) and trainable scores of the same shape."""

    weight: torch.Tensor

    def __init__(self, shape: tuple[int, ...], sparsity: float, generator: torch.Generator) -> None:
        super().__init__()
        fan_in = math.prod(shape[1:])
        std = nn.init.calculate_gain("relu") / math.sqrt(fan_in)
        sign = torch.randn(shape, generator=generator).sign()
        self.register_buffer("weight", torch.where(sign == 0, 1.0, sign) * std)
        bound = 1.0 / math.sqrt(fan_in)   # kaiming_uniform_(a=sqrt(5)), as edge-popup / SupSup
        self.scores = nn.Parameter((torch.rand(shape, generator=generator) * 2 - 1) * bound)
        self.sparsity = sparsity

    def masked_weight(self) -> torch.Tensor:
        return self.weight * topk_mask(self.scores, self.sparsity)


class SupermaskLinear(SupermaskLayer):
    def __init__(self, in_features: int, out_features: int, sparsity: float, generator: torch.Generator) -> None:
        super().__init__((out_features, in_features), sparsity, generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.masked_weight())


class SupermaskConv(SupermaskLayer):
    """A Conv1d or Conv2d (no bias, groups 1) with a supermask."""

    def __init__(self, conv: nn.Conv1d | nn.Conv2d, sparsity: float, generator: torch.Generator) -> None:
        if conv.groups != 1:
            raise ConfigError(f"frl: grouped convolutions have no supermask version (groups={conv.groups})")
        super().__init__(tuple(conv.weight.shape), sparsity, generator)
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.conv = F.conv2d if isinstance(conv, nn.Conv2d) else F.conv1d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x, self.masked_weight(), None, self.stride, self.padding, self.dilation)


def _convert(module: nn.Module, sparsity: float, generator: torch.Generator) -> nn.Module | None:
    """The supermask replacement of one leaf module, or None to keep it."""
    device = next(iter(module.parameters()), torch.empty(0)).device
    new: nn.Module
    if isinstance(module, nn.Linear):
        new = SupermaskLinear(module.in_features, module.out_features, sparsity, generator)
    elif isinstance(module, (nn.Conv1d, nn.Conv2d)):
        new = SupermaskConv(module, sparsity, generator)
    elif isinstance(module, nn.GroupNorm):
        new = nn.GroupNorm(module.num_groups, module.num_channels, eps=module.eps, affine=False)
    elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        new = nn.GroupNorm(1, module.num_features, eps=module.eps, affine=False)
    else:
        return None
    return new.to(device)


def to_supermask(model: nn.Module, *, seed: int, sparsity: float) -> nn.Module:
    """Convert `model` in place (and return it): see the module docstring. Weights and scores come
    from `seed` in module order, so every peer with the same seed holds the same network. The new
    layers live on the device of the ones they replace."""
    if not 0 < sparsity <= 1:
        raise ConfigError(f"sparsity must be in (0, 1], got {sparsity!r}")
    generator = torch.Generator().manual_seed(seed)

    def walk(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            new = _convert(child, sparsity, generator)
            if new is not None:
                setattr(parent, name, new)
            else:
                walk(child)

    walk(model)
    others = [n for n, p in model.named_parameters() if not n.endswith("scores")]
    if others:
        raise ConfigError(f"frl: the model's parameter {others[0]!r} has no supermask version "
                          "(supported: Linear, Conv1d, Conv2d, GroupNorm, BatchNorm)")
    return model


def score_layers(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, scores) of every supermask layer, in the model's parameter order."""
    return [(n, p) for n, p in model.named_parameters() if n.endswith("scores")]
