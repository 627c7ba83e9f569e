"""A user's own data and model: what an application hands a Peer, and what import strings name.

Theory of operation
-------------------
Data (`as_data`): a peer trains on an `(x, y)` pair of tensors (or NumPy arrays, converted here:
floating arrays to float32, integer ones to int64), a map-style torch `Dataset` of `(x, y)` items
(wrapped in a `DataLoader` of `batch_size`, shuffled with the peer's own seeded generator), or a
`DataLoader` yielding `(x, y)` batches. Anything else is refused when the peer is built, with a
`ConfigError` that says what is accepted; `check_fit` then runs the model and the loss once on two
samples (no gradient, the model's mode restored), so a model that does not fit the data, a dtype
mismatch or a loss that does not fit the targets fails at construction, never mid-run.

Import strings (`load_user_data`, `build_model`): `dataset = "pkg.module:loader"` names a function

    loader(shard: int, num_shards: int, seed: int) -> (train, test)

that returns the training data of shard `shard` of `num_shards` (the peer's own part; the
simulator's peer i is shard i of `peers`) and the test data (the same for every shard; may be
None: no evaluation), each in one of the forms above. `model = "pkg.module:factory"` names a
callable returning an `nn.Module`; it is called with those of `input_shape` (one sample's shape),
`num_classes` and `seed` that its signature names, under `torch.manual_seed(seed)` so every peer
starts from the same weights. `num_classes` is the number of outputs the data asks for: max label
+ 1 for integer targets, the size of one target for float targets, None when the data is a
DataLoader of integer targets (the factory must then know it).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from p2pfl.errors import ConfigError
from p2pfl.learn.models import make_model
from p2pfl.learn.objectives import LossFn, is_import_string, resolve
from p2pfl.learn.train import Data, peer_seed

ACCEPTED = ("an (x, y) pair of torch tensors or NumPy arrays, a torch Dataset of (x, y) items, "
            "or a DataLoader yielding (x, y) batches")


def as_data(value: Any, what: str, *, batch_size: int = 32, generator: torch.Generator | None = None,
            shuffle: bool = True) -> Data:
    """`value` as tensors or a DataLoader (see the module docstring); ConfigError naming `what` otherwise."""
    if isinstance(value, DataLoader):
        return value
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ConfigError(f"{what}: a sequence of {len(value)} items; accepted: {ACCEPTED}")
        x, y = (_tensor(v, f"{what}: {name}") for v, name in zip(value, ("x", "y")))
        if x.ndim < 1 or y.ndim < 1 or len(x) != len(y):
            raise ConfigError(f"{what}: x{tuple(x.shape)} and y{tuple(y.shape)} must hold the same number "
                              "of samples (first dimension)")
        if len(x) == 0:
            raise ConfigError(f"{what}: no samples")
        return x, y
    if isinstance(value, TorchDataset) and hasattr(value, "__len__"):
        return DataLoader(value, batch_size=batch_size, shuffle=shuffle, generator=generator)
    raise ConfigError(f"{what}: got {type(value).__name__}; accepted: {ACCEPTED}")


def _tensor(value: Any, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        if np.issubdtype(value.dtype, np.floating):
            return torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
        if np.issubdtype(value.dtype, np.integer) or value.dtype == np.bool_:
            return torch.from_numpy(np.ascontiguousarray(value, dtype=np.int64))
        raise ConfigError(f"{what}: a NumPy array of dtype {value.dtype}; expected numbers")
    raise ConfigError(f"{what}: got {type(value).__name__}, expected a torch tensor or a NumPy array")


def first_batch(data: Data, n: int = 2, what: str = "train_data") -> tuple[torch.Tensor, torch.Tensor]:
    """Up to n samples of `data` (a DataLoader's first batch, cut)."""
    if isinstance(data, DataLoader):
        try:
            batch = next(iter(data))
        except StopIteration:
            raise ConfigError(f"{what}: the DataLoader yields no batch") from None
        if not isinstance(batch, (tuple, list)) or len(batch) != 2 or not all(isinstance(b, torch.Tensor) for b in batch):
            raise ConfigError(f"{what}: a DataLoader batch must be an (x, y) pair of tensors, got "
                              f"{type(batch).__name__}")
        return batch[0][:n], batch[1][:n]
    return data[0][:n], data[1][:n]


def check_fit(model: Any, data: Data, loss_fn: LossFn, what: str = "train_data") -> None:
    """Run `model` and the loss once on two samples of `data`; ConfigError saying what failed."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model: got {type(model).__name__}, expected a torch.nn.Module")
    xb, yb = first_batch(data, what=what)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.train(False)   # no batch-norm statistics move on this probe
    try:
        with torch.no_grad():
            out = model(xb.to(device))
            value = loss_fn(out, yb.to(device))
    except Exception as e:   # the user's model and loss: whatever they raise is a misfit
        raise ConfigError(f"{what}: the model and loss do not fit the data (x{tuple(xb.shape)} {xb.dtype}, "
                          f"y{tuple(yb.shape)} {yb.dtype}): {type(e).__name__}: {' '.join(str(e).split())[:300]}") \
            from None
    finally:
        model.train(was_training)
    if loss_fn is F.cross_entropy and yb.is_floating_point() and out.ndim == 2 and out.shape[1] == 1:
        raise ConfigError(f"{what}: float targets and one output under cross-entropy (always 0); for a regression "
                          "set the loss to 'mse' (loss_fn = \"mse\", or TrainConfig(loss=\"mse\"))")
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        raise ConfigError(f"loss: returned {type(value).__name__} "
                          f"{tuple(value.shape) if isinstance(value, torch.Tensor) else ''}, expected a scalar tensor")


@dataclass(frozen=True)
class UserData:
    """What a dataset loader returned for one shard, checked."""

    train: Data
    test: Data | None
    input_shape: tuple[int, ...]
    num_classes: int | None


def load_user_data(spec: str, shard: int, num_shards: int, seed: int, *, batch_size: int = 32) -> UserData:
    """Call the loader `spec` names for one shard; ConfigError naming `dataset` when it fails."""
    loader = resolve(spec, "dataset")
    try:
        result = loader(shard, num_shards, seed)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"dataset: {spec}({shard}, {num_shards}, {seed}) raised {type(e).__name__}: {e}") from None
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        raise ConfigError(f"dataset: {spec} returned {type(result).__name__}; expected (train, test), each {ACCEPTED} "
                          "(test may be None)")
    generator = torch.Generator().manual_seed(peer_seed(seed, shard))
    train = as_data(result[0], f"dataset: {spec}: train", batch_size=batch_size, generator=generator)
    test = None if result[1] is None else as_data(result[1], f"dataset: {spec}: test", batch_size=batch_size,
                                                  shuffle=False)
    xb, _ = first_batch(train, what=f"dataset: {spec}: train")
    for part, name in ((train, "train"), (test, "test")):
        if part is not None and not isinstance(part, DataLoader) and part[0].shape[1:] != xb.shape[1:]:
            raise ConfigError(f"dataset: {spec}: {name} samples are {tuple(part[0].shape[1:])}, "
                              f"train samples {tuple(xb.shape[1:])}")
    return UserData(train, test, tuple(xb.shape[1:]), _outputs(train, test))


def _outputs(train: Data, test: Data | None) -> int | None:
    _, yb = first_batch(train)
    if yb.is_floating_point():
        return math.prod(yb.shape[1:])
    if isinstance(train, DataLoader):
        return None
    ys = [train[1]] + ([test[1]] if test is not None and not isinstance(test, DataLoader) else [])
    return int(max(int(y.max()) for y in ys)) + 1


def build_model(spec: str, input_shape: tuple[int, ...], num_classes: int | None, *, hidden: tuple[int, ...] = (64,),
                seed: int = 0) -> nn.Module:
    """The model `spec` names: a built-in (`mlp`, `cnn`) or a factory's import string."""
    if not is_import_string(spec):
        if num_classes is None:
            raise ConfigError(f"model: {spec} needs the number of classes, unknown for a DataLoader of integer "
                              "targets; name a model factory of your own ('pkg.module:factory')")
        return make_model(spec, input_shape, num_classes, hidden=hidden, seed=seed)
    factory = resolve(spec, "model")
    offered = {"input_shape": input_shape, "num_classes": num_classes, "seed": seed}
    try:
        wanted = set(inspect.signature(factory).parameters)
    except (TypeError, ValueError):
        wanted = set()   # a builtin without a signature: called with nothing
    kwargs = {k: v for k, v in offered.items() if k in wanted}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = factory(**kwargs)
        except Exception as e:
            raise ConfigError(f"model: {spec}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}) raised "
                              f"{type(e).__name__}: {e}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model: {spec} returned {type(model).__name__}, expected a torch.nn.Module")
    return model
