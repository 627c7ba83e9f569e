"""Checkpoints that load but are bad: altered bytes, non-finite values, out-of-range or mistyped
fields, and checkpoints that do not fit the trainer are refused with one-line ConfigErrors naming
the file; a non-finite model is never saved."""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from p2pfl.errors import ConfigError, LocalProtocolError
from p2pfl.learn.models import make_model
from p2pfl.learn.train import LocalTrainer, TrainConfig
from p2pfl.peers import checkpoint


def trainer(hidden: tuple[int, ...] = (3,), model_seed: int = 0) -> LocalTrainer:
    """A small trainer; the data is the same for every one of them."""
    model = make_model("mlp", (4,), 2, hidden=hidden, seed=model_seed)
    gen, samples = torch.Generator().manual_seed(0), 8
    x, y = torch.randn(samples, 4, generator=gen), torch.randint(0, 2, (samples,), generator=gen)
    return LocalTrainer(model, x, y, TrainConfig(momentum=0.9, batch_size=4), torch.Generator().manual_seed(1))


def trained() -> LocalTrainer:
    t = trainer()
    t.train_round(0)
    return t


def state_of(t: LocalTrainer, round: int = 1) -> dict[str, Any]:
    """The dict a checkpoint holds, as `torch.load` returns it."""
    return torch.load(io.BytesIO(checkpoint.snapshot(t, round=round, peer_id="p", schema="s")), weights_only=True)


def write_state(directory: Path, state: Any) -> Path:
    """`state` as a correctly sealed checkpoint: what a bug, or an older writer, could leave behind."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return checkpoint.write(directory, checkpoint.seal(buf.getvalue()))


def refused(directory: Path, match: str, **kwargs: Any) -> str:
    with pytest.raises(ConfigError) as info:
        checkpoint.load(directory, **kwargs)
    message = str(info.value)
    assert message.startswith(f"resume: {directory / checkpoint.FILENAME}: "), message
    assert "\n" not in message and match in message, message
    return message


def test_a_sealed_checkpoint_round_trips_and_stays_a_plain_torch_file(tmp_path):
    t = trained()
    path = checkpoint.write(tmp_path, checkpoint.snapshot(t, round=1, peer_id="p", schema="s"))
    assert torch.load(path, weights_only=True)["round"] == 1     # other tools read it as before
    ck = checkpoint.load(tmp_path, max_round=1)
    other = trainer(model_seed=5)
    ck.apply(other)
    assert all(torch.equal(a, b) for a, b in zip(t.model.state_dict().values(), other.model.state_dict().values()))
    t.train_round(1)
    other.train_round(1)
    assert all(torch.equal(a, b) for a, b in zip(t.model.parameters(), other.model.parameters()))


def test_the_optimizer_hyperparameters_stay_the_trainers(tmp_path):
    state = state_of(trained())
    state["optimizer"]["param_groups"][0].update(momentum=0.1, dampening=2**70, nesterov=True)
    write_state(tmp_path, state)
    t = trainer()
    checkpoint.load(tmp_path).apply(t)
    group = t.optimizer.param_groups[0]
    assert (group["momentum"], group["dampening"], group["nesterov"]) == (0.9, 0, False)
    assert all(torch.equal(t.optimizer.state[p]["momentum_buffer"], state["optimizer"]["state"][i]["momentum_buffer"])
               for i, p in enumerate(t.params))
    t.train_round(1)
    assert all(bool(torch.isfinite(p).all()) for p in t.model.parameters())


def test_altered_tensor_bytes_load_in_torch_but_are_refused(tmp_path):
    t = trained()
    path = checkpoint.write(tmp_path, checkpoint.snapshot(t, round=1, peer_id="p", schema="s"))
    data = bytearray(path.read_bytes())
    weight = next(iter(t.model.state_dict().values())).numpy().tobytes()
    at = data.find(weight)
    assert at > 0
    data[at:at + 4] = torch.tensor([math.inf]).numpy().tobytes()   # the first weight becomes +Inf
    path.write_bytes(bytes(data))
    assert math.isinf(next(iter(torch.load(path, weights_only=True)["model"].values())).flatten()[0])
    refused(tmp_path, "integrity check failed")


def test_any_altered_or_missing_byte_is_refused(tmp_path):
    good = checkpoint.snapshot(trained(), round=1, peer_id="p", schema="s")
    path = tmp_path / checkpoint.FILENAME
    for at in [*range(0, len(good), max(1, len(good) // 97)), len(good) - 1]:
        bad = bytearray(good)
        bad[at] ^= 0x01
        path.write_bytes(bytes(bad))
        refused(tmp_path, "")
    for cut in (1, 32, len(good) // 2, len(good) - 1):
        path.write_bytes(good[:-cut])
        refused(tmp_path, "")
    path.write_bytes(b"")
    refused(tmp_path, "the file is empty (0 bytes)")


def test_an_unsealed_checkpoint_is_refused(tmp_path):
    buf = io.BytesIO()
    torch.save(state_of(trained()), buf)
    (tmp_path / checkpoint.FILENAME).write_bytes(buf.getvalue())
    refused(tmp_path, "no integrity seal")


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], Any]:
    def mutate(state: dict[str, Any]) -> Any:
        *parents, last = path.split(".")
        obj: Any = state
        for p in parents:
            obj = obj[int(p)] if isinstance(obj, (list, dict)) and p.isdigit() else obj[p]
        obj[int(last) if last.isdigit() else last] = value(obj[int(last) if last.isdigit() else last]) \
            if callable(value) else value
        return state
    return mutate


def _drop(key: str) -> Callable[[dict[str, Any]], Any]:
    def mutate(state: dict[str, Any]) -> Any:
        del state[key]
        return state
    return mutate


def _nested(depth: int) -> list[Any]:
    deep: list[Any] = [1]
    for _ in range(depth):
        deep = [deep]
    return deep


def _nan_model(state: dict[str, Any]) -> Any:
    state["model"] = {k: torch.full_like(v, math.nan) for k, v in state["model"].items()}
    return state


@pytest.mark.parametrize("mutate, match", [
    (_nan_model, "model.1.weight: non-finite values"),
    (_set("optimizer.state.0.momentum_buffer", lambda t: t.fill_(-math.inf)), "optimizer.state.0.momentum_buffer"),
    (_set("optimizer.param_groups.0.lr", math.nan), "non-finite value nan"),
    (_set("round", 10**12), "round 1000000000000 is beyond rounds = 30"),
    (_set("round", -1), "round -1 is negative"),
    (_set("round", "1"), "field 'round': expected int, got str"),
    (_set("round", True), "field 'round': expected int, got bool"),
    (_set("cursor", 9), "cursor 9 is outside 0..8"),
    (_set("cursor", -1), "cursor -1 is outside"),
    (_set("model", [1, 2]), "field 'model': expected dict, got list"),
    (_set("model", {"w": 1.0}), "field 'model': expected tensors by parameter name"),
    (_set("order", torch.zeros(2, 2, dtype=torch.long)), "field 'order': expected a 1-D dense tensor"),
    (_set("order", torch.zeros(8)), "field 'generator' must be uint8 and field 'order' int64"),
    (_set("generator", [1, 2]), "field 'generator': expected Tensor, got list"),
    (_set("extra", {"deep": _nested(40)}), "nested deeper than 16 levels"),
    (_set("version", 1), "unknown checkpoint version (this p2pfl reads version 2)"),
    (_set("version", torch.ones(3)), "unknown checkpoint version"),
    (_set("model", lambda m: {**m, "line\nbreak": torch.tensor([math.nan])}), "model.line break: non-finite"),
    (_set("optimizer.state", lambda s: {**s, (1, 2): {}}), "optimizer.state: a key of type tuple"),
    (_drop("order"), "missing field 'order'"),
    (_drop("model"), "missing field 'model'"),
    (_set("surprise", 1), "unknown field 'surprise'"),
    (lambda state: [state], "expected a dict of fields, got list"),
])
def test_a_sealed_but_bad_checkpoint_is_a_config_error_naming_the_problem(tmp_path, mutate, match):
    write_state(tmp_path, mutate(state_of(trained())))
    refused(tmp_path, match, max_round=30)


def test_the_round_bound_is_the_callers(tmp_path):
    write_state(tmp_path, state_of(trained(), round=30))
    assert checkpoint.load(tmp_path, max_round=30).round == 30
    refused(tmp_path, "round 30 is beyond rounds = 29 (raise rounds to continue it)", max_round=29)


def test_unreadable_and_missing_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="no checkpoint.pt in"):
        checkpoint.load(tmp_path / "missing")
    (tmp_path / checkpoint.FILENAME).mkdir()
    refused(tmp_path, "cannot read it")


def _fits_error(t: LocalTrainer, state: dict[str, Any], tmp_path: Path) -> str:
    write_state(tmp_path, state)
    ck = checkpoint.load(tmp_path)
    def now() -> list[torch.Tensor]:
        return [*(p.detach().clone() for p in t.model.parameters()),
                *(s["momentum_buffer"].clone() for s in t.optimizer.state.values()), t.generator.get_state(),
                t._order.clone(), torch.tensor(t._cursor)]

    before = now()
    with pytest.raises(ConfigError) as info:
        ck.apply(t)
    assert all(torch.equal(a, b) for a, b in zip(before, now(), strict=True))   # nothing was applied
    assert str(info.value).startswith(f"resume: {tmp_path / checkpoint.FILENAME}: ")
    return str(info.value)


def test_a_checkpoint_of_another_shape_changes_nothing(tmp_path):
    assert "model: '1.weight' is torch.float32 (3, 4), this model has torch.float32 (5, 4)" in \
        _fits_error(trainer(hidden=(5,)), state_of(trained()), tmp_path)


@pytest.mark.parametrize("mutate, match", [
    (_set("model", lambda m: {k: v for k, v in m.items() if k != "1.bias"}), "parameter '1.bias' is missing"),
    (_set("model", lambda m: {**m, "extra.weight": torch.zeros(1)}), "'extra.weight' is not in this model"),
    (_set("model", lambda m: {k: v.double() for k, v in m.items()}), "is torch.float64 (3, 4)"),
    (_set("optimizer.state.0.momentum_buffer", torch.zeros(2)), "momentum_buffer of parameter 0 is torch.float32 (2,)"),
    (_set("optimizer.state", lambda s: {**s, 99: {}}), "state for unknown parameter 99"),
    (_set("optimizer.param_groups", lambda g: g + g), "parameter groups do not match"),
    (_set("optimizer.param_groups.0.params", [0, 1, 1, 3]), "parameter ids must be distinct integers"),
    (_set("optimizer.state.0.momentum_buffer", "fast"), "momentum_buffer of parameter 0 is str"),
    (_set("generator", torch.zeros(3, dtype=torch.uint8)), "generator: state of 3 bytes"),
    (_set("generator", lambda g: torch.full_like(g, 255)), "generator: Invalid mt19937 state"),
    (_set("order", torch.zeros(8, dtype=torch.long)), "order: not a permutation of this peer's 8 training samples"),
    (_set("order", torch.arange(10)), "order: not a permutation"),
])
def test_a_checkpoint_that_does_not_fit_the_trainer_changes_nothing(tmp_path, mutate, match):
    t = trained()
    t.train_round(1)
    message = _fits_error(t, mutate(state_of(trained())), tmp_path)
    assert match in message and "\n" not in message


def test_snapshot_refuses_a_non_finite_model_or_optimizer_state(tmp_path):
    t = trained()
    with torch.no_grad():
        next(t.model.parameters())[0, 0] = math.nan
    with pytest.raises(LocalProtocolError, match=r"refusing to save round 3: model.1.weight: non-finite values"):
        checkpoint.snapshot(t, round=3, peer_id="p", schema="s")
    t = trained()
    next(iter(t.optimizer.state.values()))["momentum_buffer"].fill_(math.inf)
    with pytest.raises(LocalProtocolError, match="momentum_buffer: non-finite values"):
        checkpoint.snapshot(t, round=3, peer_id="p", schema="s")
    assert not list(tmp_path.iterdir())


def test_write_takes_only_sealed_snapshot_bytes(tmp_path):
    buf = io.BytesIO()
    torch.save({"version": checkpoint.VERSION}, buf)
    for data in (b"", b"garbage", buf.getvalue()):
        with pytest.raises(LocalProtocolError, match="refusing to write bytes that snapshot"):
            checkpoint.write(tmp_path, data)
    assert not list(tmp_path.iterdir())
