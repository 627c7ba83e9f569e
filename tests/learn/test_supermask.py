"""Supermask layers: frozen signed-constant weights from the shared seed, top-k mask, straight-through scores."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from p2pfl.errors import ConfigError
from p2pfl.learn.models import make_model
from p2pfl.learn.supermask import SupermaskConv, SupermaskLinear, score_layers, to_supermask, topk_mask
from p2pfl.learn.train import LocalTrainer, TrainConfig


@pytest.mark.parametrize("name, shape", [("mlp", (64,)), ("cnn", (64,)), ("cnn", (40,))])
def test_only_scores_train_and_the_network_comes_from_the_shared_seed(name, shape):
    a = to_supermask(make_model(name, shape, 10, seed=1), seed=7, sparsity=0.5)
    b = to_supermask(make_model(name, shape, 10, seed=2), seed=7, sparsity=0.5)   # another init seed
    c = to_supermask(make_model(name, shape, 10, seed=1), seed=8, sparsity=0.5)
    assert all(n.endswith("scores") for n, p in a.named_parameters())
    assert {type(m) for m in a.modules()} & {nn.Linear, nn.Conv1d, nn.Conv2d} == set()
    assert all(not m.affine for m in a.modules() if isinstance(m, nn.GroupNorm))
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(score_layers(a)[0][1], score_layers(c)[0][1])
    for m in a.modules():
        if isinstance(m, (SupermaskLinear, SupermaskConv)):
            std = math.sqrt(2) / math.sqrt(m.weight[0].numel())
            assert torch.allclose(m.weight.abs(), torch.full_like(m.weight, std))   # signed constant
            assert float(m.scores.detach().abs().max()) <= 1 / math.sqrt(m.weight[0].numel())
    assert a(torch.randn(3, *shape)).shape == (3, 10)


@pytest.mark.parametrize("k", [0.5, 0.3, 1.0])
def test_the_mask_keeps_the_top_fraction_by_magnitude(k):
    s = torch.randn(10, 7, generator=torch.Generator().manual_seed(0))
    mask = topk_mask(s, k)
    off = int((1 - k) * s.numel())
    assert int(mask.sum()) == s.numel() - off
    if off:
        assert float(s.abs()[mask == 1].min()) >= float(s.abs()[mask == 0].max())


def test_the_scores_gradient_is_straight_through():
    layer = SupermaskLinear(5, 3, 0.5, torch.Generator().manual_seed(0))
    x = torch.randn(4, 5)
    layer(x).sum().backward()
    # d sum / d W_eff[o, i] = sum_b x[b, i]; through W_eff = W * mask(|s|): as if the mask were 1
    expected = x.sum(0).expand(3, 5) * layer.weight * layer.scores.detach().sign()
    assert torch.allclose(layer.scores.grad, expected)


def test_training_moves_the_scores_only_and_lowers_the_loss():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = (x[:, 0] > 0).long()
    model = to_supermask(make_model("mlp", (8,), 2, hidden=(32,), seed=0), seed=3, sparsity=0.5)
    weights = [m.weight.clone() for m in model.modules() if isinstance(m, SupermaskLinear)]
    before = F.cross_entropy(model(x), y).item()
    LocalTrainer(model, x, y, TrainConfig(lr=0.4, momentum=0.9, batch_size=16, local_steps=80),
                 torch.Generator().manual_seed(1)).train_round(0)
    assert F.cross_entropy(model(x), y).item() < before - 0.1
    after = [m.weight for m in model.modules() if isinstance(m, SupermaskLinear)]
    assert all(torch.equal(w0, w1) for w0, w1 in zip(weights, after))


def test_unsupported_layers_and_sparsity_are_config_errors():
    with pytest.raises(ConfigError, match="'0.weight' has no supermask version"):
        to_supermask(nn.Sequential(nn.Embedding(4, 3)), seed=0, sparsity=0.5)
    with pytest.raises(ConfigError, match="sparsity must be in"):
        to_supermask(make_model("mlp", (4,), 2), seed=0, sparsity=0.0)
