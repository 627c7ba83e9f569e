import pytest
import torch
from torch import nn

from p2pfl.errors import ConfigError
from p2pfl.learn.models import ParamLayout, flatten, load_flat, make_model
from p2pfl.learn.train import LocalTrainer, TrainConfig, evaluate


def data(n=64, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return x, (x[:, 0] + x[:, 1] > 0).long()


def test_flatten_round_trip_in_layout_order():
    m = make_model("mlp", (6,), 3, hidden=(5, 4), seed=1)
    layout = ParamLayout.of(m)
    v = flatten(m)
    assert v.shape == (layout.size,) == (6 * 5 + 5 + 5 * 4 + 4 + 4 * 3 + 3,)
    assert torch.equal(v[:30], m[1].weight.reshape(-1))   # first Linear's weight comes first
    load_flat(m, torch.arange(layout.size, dtype=torch.float32))
    assert torch.equal(flatten(m), torch.arange(layout.size, dtype=torch.float32))
    with pytest.raises(ValueError):
        load_flat(m, torch.zeros(3))


def test_schema_depends_on_shapes_not_values():
    a, b = make_model("mlp", (6,), 3, seed=1), make_model("mlp", (6,), 3, seed=2)
    assert ParamLayout.of(a).schema == ParamLayout.of(b).schema
    assert ParamLayout.of(a).schema != ParamLayout.of(make_model("mlp", (6,), 4)).schema


def test_same_seed_same_init_and_same_training():
    runs = []
    for _ in range(2):
        m = make_model("mlp", (6,), 2, seed=3)
        LocalTrainer(m, *data(), TrainConfig(lr=0.1, local_steps=5), torch.Generator().manual_seed(7)).train_round(0)
        runs.append(flatten(m))
    assert torch.equal(*runs)


@pytest.mark.parametrize("rho", [0.0, 0.05])
def test_training_lowers_the_loss_and_never_touches_frozen_parameters(rho):
    m = make_model("mlp", (6,), 2, hidden=(16,), seed=0)
    m[1].weight.requires_grad_(False)          # a frozen "backbone" layer
    frozen = m[1].weight.detach().clone()
    x, y = data(256)
    before = evaluate(m, x, y)[1]
    tr = LocalTrainer(m, x, y, TrainConfig(lr=0.2, local_epochs=5, batch_size=32, rho=rho),
                      torch.Generator().manual_seed(0))
    stats = tr.train_round(0)
    assert stats.steps == 40
    assert evaluate(m, x, y)[1] < before
    assert torch.equal(m[1].weight, frozen)
    assert ParamLayout.of(m).size == flatten(m).numel() == 16 + 16 * 2 + 2


def test_sam_step_matches_its_definition():
    """One SAM step by hand: g at w, eps = rho g/||g||, w <- w - lr * grad at (w + eps)."""
    torch.manual_seed(0)
    m = nn.Linear(3, 2)
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    w0 = [p.detach().clone().requires_grad_() for p in m.parameters()]
    loss = lambda ps: nn.functional.cross_entropy(nn.functional.linear(x, ps[0], ps[1]), y)
    g = torch.autograd.grad(loss(w0), w0)
    norm = torch.sqrt(sum((gi ** 2).sum() for gi in g))
    perturbed = [(p + 0.1 * gi / norm).detach().requires_grad_() for p, gi in zip(w0, g)]
    g_sam = torch.autograd.grad(loss(perturbed), perturbed)
    expected = [p.detach() - 0.5 * gi for p, gi in zip(w0, g_sam)]
    tr = LocalTrainer(m, x, y, TrainConfig(lr=0.5, local_steps=1, batch_size=8, rho=0.1),
                      torch.Generator().manual_seed(0))
    tr.train_round(0)
    for p, e in zip(m.parameters(), expected):
        assert torch.allclose(p, e, atol=1e-6)


def test_lr_decay_and_bad_config():
    assert TrainConfig(local_epochs=2, batch_size=10).steps_per_round(25) == 5
    assert TrainConfig(local_steps=3).steps_per_round(1000) == 3
    for bad in (dict(lr=0), dict(batch_size=0), dict(rho=-1), dict(momentum=1.0), dict(lr_decay=1.5)):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            TrainConfig(**bad)
    with pytest.raises(ConfigError, match="model"):
        make_model("transformer", (6,), 2)


@pytest.mark.parametrize("shape", [(64,), (40,), (1, 8, 8)])
def test_cnn_handles_flat_square_and_image_inputs(shape):
    m = make_model("cnn", shape, 10)
    assert m(torch.zeros(5, *shape)).shape == (5, 10)
