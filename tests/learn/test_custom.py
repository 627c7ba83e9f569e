"""A user's own model, data, loss and metric: import strings, what a Peer accepts, and the errors."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from p2pfl import ConfigError, Identity, MemoryNetwork, Peer, PeerConfig, TrainConfig
from p2pfl.learn.custom import build_model, load_user_data
from p2pfl.learn.objectives import is_import_string
from p2pfl.learn.train import LocalTrainer, evaluate
from p2pfl.settings import LearningSettings


@pytest.fixture
def user_module(tmp_path):
    """A user's module file with loaders and factories, good and bad; named by its path."""
    path = tmp_path / "usercode.py"
    path.write_text(textwrap.dedent('''
        import numpy as np
        import torch
        from torch import nn

        def good(shard, num_shards, seed):
            g = torch.Generator().manual_seed(seed * 10 + shard)
            x = torch.randn(40, 3, generator=g)
            return (x, (x[:, 0] > 0).long()), (x[:8], (x[:8, 0] > 0).long())

        def numpy_data(shard, num_shards, seed):
            x = np.random.default_rng(shard).normal(size=(20, 3))     # float64: converted to float32
            return (x, (x[:, 0] > 0).astype(np.int32)), None

        def one_thing(shard, num_shards, seed):
            return torch.zeros(3)

        def strings(shard, num_shards, seed):
            return ("a", "b"), None

        def mismatched(shard, num_shards, seed):
            return (torch.zeros(5, 3), torch.zeros(4, dtype=torch.long)), None

        def broken(shard, num_shards, seed):
            raise RuntimeError("disk on fire")

        def linear(input_shape, num_classes, seed):
            return nn.Linear(input_shape[0], num_classes)

        def no_args():
            return nn.Linear(3, 2)

        def not_a_module(input_shape):
            return "a model"

        NOT_CALLABLE = 3
    '''))
    return lambda name: f"{path}:{name}"


@pytest.mark.parametrize("spec, expected", [
    ("pkg.module:factory", True), ("mod:fn", True), ("dir/file.py:make", True), ("mod:Class.method", True),
    ("mlp", False), ("npz:data.npz", False), ("synthetic:10:32", False), ("npz:/a/b.npz", False),
    ("mod:", False), (":fn", False), ("mod:1fn", False)])
def test_what_is_an_import_string(spec, expected):
    assert is_import_string(spec) is expected


@pytest.mark.parametrize("values, needle", [
    ({"model": "no_such_module_xyz:make"}, "model: cannot import 'no_such_module_xyz'"),
    ({"dataset": "no_such_module_xyz:load"}, "dataset: cannot import 'no_such_module_xyz'"),
    ({"model": "math:no_such_fn"}, "model: module 'math' has no attribute 'no_such_fn'"),
    ({"model": "math:pi"}, "model: 'math:pi' is a float, expected a callable"),
    ({"loss_fn": "hinge"}, "loss_fn: unknown value 'hinge'"),
    ({"loss_fn": "math:nope"}, "loss_fn: module 'math' has no attribute 'nope'"),
    ({"metric": "f1"}, "metric: unknown value 'f1'; allowed: accuracy, mse"),
    ({"model": "resnet"}, "model: unknown value 'resnet'; allowed: mlp, cnn, or 'pkg.module:factory'"),
])
def test_a_bad_import_string_is_a_config_error_naming_the_key(values, needle):
    with pytest.raises(ConfigError) as e:
        LearningSettings(**values)
    assert needle in str(e.value)


def test_a_loader_gets_its_shard_and_seed_and_numpy_is_converted(user_module):
    a, b = load_user_data(user_module("good"), 0, 2, 5), load_user_data(user_module("good"), 1, 2, 5)
    assert a.input_shape == (3,) and a.num_classes == 2
    assert not torch.equal(a.train[0], b.train[0])                      # its own shard
    assert torch.equal(a.train[0], load_user_data(user_module("good"), 0, 2, 5).train[0])   # seeded
    n = load_user_data(user_module("numpy_data"), 0, 1, 0)
    assert (n.train[0].dtype, n.train[1].dtype, n.test) == (torch.float32, torch.int64, None)


@pytest.mark.parametrize("name, needle", [
    ("one_thing", "returned Tensor; expected (train, test)"),
    ("strings", "train: x: got str, expected a torch tensor or a NumPy array"),
    ("mismatched", "must hold the same number of samples"),
    ("broken", "raised RuntimeError: disk on fire"),
])
def test_a_bad_loader_is_refused_naming_the_dataset_key(user_module, name, needle):
    with pytest.raises(ConfigError) as e:
        load_user_data(user_module(name), 0, 1, 0)
    assert str(e.value).startswith("dataset: ") and needle in str(e.value)


def test_a_factory_gets_what_its_signature_names_and_is_seeded(user_module):
    m1 = build_model(user_module("linear"), (3,), 2, seed=4)
    m2 = build_model(user_module("linear"), (3,), 2, seed=4)
    assert isinstance(m1, nn.Linear) and torch.equal(m1.weight, m2.weight)
    assert not torch.equal(m1.weight, build_model(user_module("linear"), (3,), 2, seed=5).weight)
    assert isinstance(build_model(user_module("no_args"), (3,), 2), nn.Linear)
    with pytest.raises(ConfigError, match="model: .* returned str, expected a torch.nn.Module"):
        build_model(user_module("not_a_module"), (3,), 2)
    with pytest.raises(ConfigError, match="is a int, expected a callable"):
        build_model(user_module("NOT_CALLABLE"), (3,), 2)


def _peer(train, model=None, test=None, **train_config):
    net = MemoryNetwork()
    ident = Identity.generate(b"\x01" * 32)
    return Peer(model or nn.Linear(3, 2), train, transport=net.endpoint(ident), neighbors={}, test_data=test,
                config=PeerConfig(train=TrainConfig(**{"local_steps": 2, **train_config})), offload=False,
                num_classes=2)


def _xy(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    return x, (x[:, 0] > 0).long()


@pytest.mark.parametrize("value, needle", [
    ("data.csv", "train_data: got str; accepted: an (x, y) pair of torch tensors or NumPy arrays, a torch "
                 "Dataset of (x, y) items, or a DataLoader yielding (x, y) batches"),
    ((torch.zeros(4, 3),), "train_data: a sequence of 1 items; accepted:"),
    ((np.array(["a", "b"]), np.zeros(2)), "a NumPy array of dtype <U1; expected numbers"),
    ((torch.zeros(4, 3, dtype=torch.float64), torch.zeros(4, dtype=torch.long)),
     "train_data: the model and loss do not fit the data (x(2, 3) torch.float64"),
    ((torch.zeros(4, 5), torch.zeros(4, dtype=torch.long)), "the model and loss do not fit the data (x(2, 5)"),
    (DataLoader(TensorDataset(torch.zeros(4, 3)), batch_size=2), "train_data: a DataLoader batch must be an (x, y) "
                                                                  "pair of tensors, got list"),
    (DataLoader(TensorDataset(torch.zeros(0, 3), torch.zeros(0)), batch_size=2), "train_data: the DataLoader yields "
                                                                                  "no batch"),
])
def test_the_peer_refuses_what_it_cannot_train_on_at_construction(value, needle):
    with pytest.raises(ConfigError) as e:
        _peer(value)
    assert needle in str(e.value)


def test_the_peer_refuses_a_model_that_is_not_a_module():
    with pytest.raises(ConfigError, match="model: got function, expected a torch.nn.Module"):
        _peer(_xy(), model=lambda x: x)


def _train(peer, rounds):
    events = []
    peer.on_event = events.append

    async def main():
        async with peer:
            await peer.train(rounds)

    trio.run(main)
    return events


@pytest.mark.parametrize("kind", ["numpy", "dataset", "dataloader"])
def test_numpy_a_dataset_and_a_dataloader_train_as_tensors_do(kind):
    x, y = _xy(64)
    data = {"numpy": (x.numpy().astype(np.float64), y.numpy()), "dataset": TensorDataset(x, y),
            "dataloader": DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True,
                                     generator=torch.Generator().manual_seed(0))}[kind]
    torch.manual_seed(0)
    peer = _peer(data, test=DataLoader(TensorDataset(x, y), batch_size=16), lr=0.5, local_steps=20)
    before = evaluate(peer.model, x, y)[1]
    events = _train(peer, 3)
    assert [e["local_steps"] for e in events] == [20, 20, 20]
    assert events[-1]["test_loss"] < before and events[-1]["accuracy"] > 0.8


def test_a_dataloader_round_is_local_epochs_of_its_batches():
    x, y = _xy(40)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)      # 5 batches an epoch
    trainer = LocalTrainer(nn.Linear(3, 2), loader, None, TrainConfig(local_epochs=2.0), torch.Generator())
    assert trainer.train_round(0).steps == 10


def test_a_loss_callable_is_what_trains_and_an_mse_metric_is_reported():
    calls = []

    def half_mse(out, target):
        calls.append(out.shape)
        return 0.5 * ((out - target) ** 2).mean()

    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(1))
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]])
    torch.manual_seed(0)
    peer = _peer((x, y), model=nn.Linear(3, 1), test=(x, y), loss=half_mse, metric="mse", lr=0.1, local_steps=30)
    events = _train(peer, 3)
    assert calls.count((32, 1)) == 90      # 30 steps a round of batch_size 32 (and the probe, the evaluations)
    assert events[0]["metric"] == "mse" and events[-1]["accuracy"] < events[0]["accuracy"] < 10
    assert events[-1]["accuracy"] == pytest.approx(2 * events[-1]["test_loss"], rel=1e-5)


def test_a_regression_target_trains_with_loss_fn_mse(tmp_path):
    """The issue's symptom: a float target failed inside cross-entropy ('0D or 1D target tensor expected')."""
    x = torch.randn(50, 3)
    with pytest.raises(ConfigError, match="float targets and one output under cross-entropy"):
        _peer((x, x[:, :1]), model=nn.Linear(3, 1))           # the default loss on a float [N, 1] target
    _peer((x, x[:, :1]), model=nn.Linear(3, 1), loss="mse")  # accepted


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), batch=st.integers(1, 50), metric=st.sampled_from(["accuracy", "mse"]),
       seed=st.integers(0, 2**16))
def test_a_metric_does_not_depend_on_how_the_test_set_is_batched(n, batch, metric, seed):
    g = torch.Generator().manual_seed(seed)
    model = nn.Linear(3, 1 if metric == "mse" else 4)
    x = torch.randn(n, 3, generator=g)
    y = torch.randn(n, 1, generator=g) if metric == "mse" else torch.randint(0, 4, (n,), generator=g)
    loss = "mse" if metric == "mse" else "cross_entropy"
    whole = evaluate(model, x, y, batch_size=n, loss=loss, metric=metric)
    tensors = evaluate(model, x, y, batch_size=batch, loss=loss, metric=metric)
    loader = evaluate(model, DataLoader(TensorDataset(x, y), batch_size=batch), loss=loss, metric=metric)
    assert tensors == pytest.approx(whole, rel=1e-5, abs=1e-6) and loader == pytest.approx(whole, rel=1e-5, abs=1e-6)
    with torch.no_grad():
        out = model(x)
    expected = float(((out - y) ** 2).mean()) if metric == "mse" else float((out.argmax(1) == y).float().mean())
    assert whole[0] == pytest.approx(expected, rel=1e-5, abs=1e-6)
