"""Datasets for the simulator and the examples, all available offline.

Theory of operation
-------------------
`load_dataset(spec, seed=...)` returns a frozen `Dataset`: float32 features `[N, *input_shape]`,
int64 labels in [0, num_classes), a train and a test split. Specs:

- `digits`: scikit-learn's 8x8 handwritten digits (1797 images shipped inside scikit-learn),
  pixels scaled to [0, 1], input_shape (64,); a CNN may view a row as a (1, 8, 8) image. The
  stratified 80/20 split (1437 train / 360 test) is fixed: the same for every seed.
- `mnist1d`: MNIST-1D (Greydanus, 2020), generated procedurally by `mnist1d.data.make_dataset` with
  its default arguments (4000 train / 1000 test, 40 features, 10 classes, generator seed 42), so it
  is the canonical dataset and the same for every seed. Features are standardized with the
  training set's per-feature mean and std. Never downloads.
- `synthetic` or `synthetic:C:D` (default 10 classes, 32 dims): a Gaussian mixture, 3 clusters per
  class, in a random 6-dimensional subspace of R^D (the other directions are unit noise).
  4000 train / 1000 test, drawn from `seed`. A linear model reaches about 50-60% test accuracy, a
  one-hidden-layer MLP over 90%.
- `npz:PATH`: a local file with arrays x_train, y_train, x_test, y_test (loaded without pickle);
  num_classes = max label + 1 over both splits. Other arrays in the file are ignored.

`seed` changes only generated data (`synthetic`): real datasets keep one test set across seeds so
runs stay comparable. Loaded datasets are cached in-process on (spec, seed); the cached arrays are
read-only, so index them (`x[idx]` copies) or copy (`torch.tensor(x)`) before writing.
The npz cache is keyed on the path: a file rewritten during a run is not re-read.
"""

from __future__ import annotations

import functools
import random
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from p2pfl.errors import ConfigError

__all__ = ["DATASETS", "Dataset", "load_dataset"]

DATASETS = ("digits", "mnist1d", "synthetic", "npz:PATH")
_ALLOWED = ", ".join(DATASETS)


@dataclass(frozen=True, eq=False)
class Dataset:
    """A classification dataset: x arrays are float32 [N, *input_shape], y arrays int64 [N]."""

    name: str
    x_train: np.ndarray = field(repr=False)
    y_train: np.ndarray = field(repr=False)
    x_test: np.ndarray = field(repr=False)
    y_test: np.ndarray = field(repr=False)
    num_classes: int
    input_shape: tuple[int, ...]

    def __post_init__(self) -> None:
        for split, x, y in (("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)):
            if x.dtype != np.float32 or y.dtype != np.int64:
                raise ConfigError(f"dataset: {self.name}: {split} must be float32 x / int64 y, "
                                  f"got {x.dtype} / {y.dtype}")
            if x.shape[1:] != self.input_shape or y.shape != x.shape[:1]:
                raise ConfigError(f"dataset: {self.name}: {split} shapes x{x.shape} y{y.shape} "
                                  f"do not match input_shape {self.input_shape}")
            if y.size and (y.min() < 0 or y.max() >= self.num_classes):
                raise ConfigError(f"dataset: {self.name}: {split} labels outside [0, {self.num_classes})")

    def __str__(self) -> str:
        return (f"{self.name}: {len(self.y_train)} train / {len(self.y_test)} test, "
                f"{self.num_classes} classes, input {self.input_shape}")


def load_dataset(spec: str, *, seed: int = 0) -> Dataset:
    """Load (or generate) a dataset by spec; see the module docstring. Cached per (spec, seed)."""
    if not isinstance(spec, str):
        raise ConfigError(f"dataset: expected a string, got {type(spec).__name__}; allowed: {_ALLOWED}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"dataset: seed must be an integer >= 0, got {seed!r}")
    spec = spec.strip()
    name, sep, arg = spec.partition(":")
    if name == "digits" and not sep:
        return _cached(spec, 0)
    if name == "mnist1d" and not sep:
        return _cached(spec, 0)
    if name == "synthetic":
        _synthetic_args(spec)  # validate before caching
        return _cached(spec, int(seed))
    if name == "npz" and sep and arg:
        return _cached(f"npz:{Path(arg).expanduser().resolve()}", 0)  # cwd-independent cache key
    raise ConfigError(f"dataset: unknown value '{spec}'; allowed: {_ALLOWED}")


@functools.lru_cache(maxsize=16)
def _cached(spec: str, seed: int) -> Dataset:
    name, _, arg = spec.partition(":")
    if name == "digits":
        ds = _digits()
    elif name == "mnist1d":
        ds = _mnist1d()
    elif name == "synthetic":
        ds = _synthetic(spec, seed)
    else:
        ds = _npz(arg)
    for a in (ds.x_train, ds.y_train, ds.x_test, ds.y_test):
        a.setflags(write=False)  # shared by every caller through the cache
    return ds


def _digits() -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)  # (1797, 64), pixel values 0..16
    y = bunch.target.astype(np.int64)
    # A fixed split (random_state=0) so every run evaluates on the same 360 images.
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    return Dataset("digits", x_tr, y_tr, x_te, y_te, num_classes=10, input_shape=(64,))


def _mnist1d() -> Dataset:
    # Imported here: mnist1d pulls in matplotlib and requests at import time.
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()  # 5000 samples, 80% train, 40 features, seed 42
    # make_dataset reseeds the global `random` and `np.random`; put them back afterwards.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    x_tr, x_te = data["x"], data["x_test"]  # (4000, 40), (1000, 40) float64
    mean, std = x_tr.mean(axis=0), x_tr.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return Dataset(
        "mnist1d",
        ((x_tr - mean) / std).astype(np.float32),
        np.asarray(data["y"], dtype=np.int64),
        ((x_te - mean) / std).astype(np.float32),
        np.asarray(data["y_test"], dtype=np.int64),
        num_classes=10,
        input_shape=(x_tr.shape[1],),
    )


def _synthetic_args(spec: str) -> tuple[int, int]:
    parts = spec.split(":")
    if parts == ["synthetic"]:
        return 10, 32
    try:
        if len(parts) != 3:
            raise ValueError
        classes, dims = int(parts[1]), int(parts[2])
        if classes < 2 or dims < 1:
            raise ValueError
    except ValueError:
        raise ConfigError(
            f"dataset: '{spec}' needs integers synthetic:C:D with C >= 2 classes and D >= 1 dims "
            f"(e.g. synthetic:10:32); allowed: {_ALLOWED}"
        ) from None
    return classes, dims


def _synthetic(spec: str, seed: int) -> Dataset:
    classes, dims = _synthetic_args(spec)
    rng = np.random.default_rng([seed, 0x5E7])  # not the raw seed: decorrelate from other users of it
    clusters, informative = 3, min(dims, 6)
    # Cluster centres spread 1.5 apart per axis, cluster noise 0.5: clusters of one class lie far
    # apart among other classes' clusters, so no hyperplane separates a class, but an MLP can.
    centers = rng.normal(scale=1.5, size=(classes * clusters, informative))  # (C*M, r)
    owner = np.repeat(np.arange(classes), clusters)  # class of each cluster
    rotation, _ = np.linalg.qr(rng.normal(size=(dims, dims)))  # (D, D) orthogonal

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        comp = rng.integers(0, classes * clusters, size=n)  # (n,) cluster of each sample
        signal = centers[comp] + rng.normal(scale=0.5, size=(n, informative))  # (n, r)
        noise = rng.normal(size=(n, dims - informative))  # (n, D-r)
        x = np.concatenate([signal, noise], axis=1) @ rotation  # (n, D)
        return x.astype(np.float32), owner[comp].astype(np.int64)

    x_tr, y_tr = draw(4000)
    x_te, y_te = draw(1000)
    return Dataset(spec, x_tr, y_tr, x_te, y_te, num_classes=classes, input_shape=(dims,))


def _npz(path_str: str) -> Dataset:
    path = Path(path_str)

    def bad(problem: str) -> ConfigError:
        return ConfigError(
            f"dataset: npz file '{path}': {problem} "
            "(expected arrays x_train, y_train, x_test, y_test; allowed specs: " + _ALLOWED + ")"
        )

    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise bad("is a single .npy array, not an .npz archive (save with np.savez)")
        with loaded as f:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in f.files]
            if missing:
                raise bad(f"missing {', '.join(missing)}")
            arrays = {k: f[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    except ConfigError:
        raise
    except FileNotFoundError:
        raise bad("no such file") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # not an npz, truncated, pickled
        raise bad(f"cannot be read without pickle ({e})") from None

    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
            raise bad(f"x_{split} must be numeric, got dtype {x.dtype}")
        if x.ndim < 2:
            raise bad(f"x_{split} must be [N, features...] (2+ dims), got shape {x.shape}")
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise bad(f"y_{split} must be 1-D integer labels, got dtype {y.dtype} shape {y.shape}")
        if x.shape[0] != y.shape[0]:
            raise bad(f"x_{split} has {x.shape[0]} samples but y_{split} has {y.shape[0]}")
        if x.shape[0] == 0:
            raise bad(f"x_{split} is empty")
        if y.min() < 0:
            raise bad(f"y_{split} has negative label {int(y.min())}; labels must be in [0, C)")
        if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
            raise bad(f"x_{split} contains NaN or Inf")
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        raise bad(f"x_train samples are {arrays['x_train'].shape[1:]} but x_test samples are "
                  f"{arrays['x_test'].shape[1:]}")
    num_classes = int(max(arrays["y_train"].max(), arrays["y_test"].max())) + 1
    if num_classes < 2:
        raise bad("labels hold a single class; a classification task needs at least 2")
    return Dataset(
        f"npz:{path}",
        arrays["x_train"].astype(np.float32),
        arrays["y_train"].astype(np.int64),
        arrays["x_test"].astype(np.float32),
        arrays["y_test"].astype(np.int64),
        num_classes=num_classes,
        input_shape=tuple(int(s) for s in arrays["x_train"].shape[1:]),
    )
