"""A regression federation: own data, the built-in MLP, loss_fn = "mse" and metric = "mse".

    cd examples/custom_model
    python -m p2pfl.cli sim regression.toml

Each peer holds noisy samples of y = sin(3 x1) + x2^2 from its own region of x1 (a non-IID split:
shard i covers the i-th slice of [-1, 1]); the test set covers all of it, so a peer alone cannot
fit it and gossip must carry what its neighbours learned.
"""

from __future__ import annotations

import torch


def target(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(3 * x[:, 0]) + x[:, 1] ** 2


def load_shard(shard: int, num_shards: int, seed: int) -> tuple[tuple[torch.Tensor, torch.Tensor],
                                                                   tuple[torch.Tensor, torch.Tensor]]:
    """(x [N, 2], y [N, 1]) float32 pairs: this shard's training samples and the common test set."""
    g = torch.Generator().manual_seed(seed * 1000 + shard)
    low = -1 + 2 * shard / num_shards
    x = torch.rand(200, 2, generator=g) * 2 - 1
    x[:, 0] = low + x[:, 0].add(1).div(num_shards)   # x1 in this shard's slice of [-1, 1]
    y = target(x) + 0.05 * torch.randn(200, generator=g)
    test_g = torch.Generator().manual_seed(seed * 1000 + 999_999)   # the same for every shard
    xt = torch.rand(500, 2, generator=test_g) * 2 - 1
    return (x, y.unsqueeze(1)), (xt, target(xt).unsqueeze(1))
