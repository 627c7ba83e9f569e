"""Offline datasets: shapes, dtypes, determinism, npz validation."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from p2pfl.errors import ConfigError
from p2pfl.learn.datasets import Dataset, load_dataset

ALLOWED = "allowed: digits, mnist1d, synthetic, npz:PATH"


def _check(ds: Dataset, n_train: int, n_test: int, shape: tuple[int, ...], classes: int) -> None:
    assert ds.input_shape == shape and ds.num_classes == classes
    assert ds.x_train.shape == (n_train, *shape) and ds.x_test.shape == (n_test, *shape)
    assert ds.y_train.shape == (n_train,) and ds.y_test.shape == (n_test,)
    assert ds.x_train.dtype == ds.x_test.dtype == np.float32
    assert ds.y_train.dtype == ds.y_test.dtype == np.int64
    assert np.isfinite(ds.x_train).all() and np.isfinite(ds.x_test).all()
    # Every class appears in both splits.
    assert set(np.unique(ds.y_train).tolist()) == set(range(classes))
    assert set(np.unique(ds.y_test).tolist()) == set(range(classes))


def test_digits() -> None:
    ds = load_dataset("digits")
    _check(ds, 1437, 360, (64,), 10)
    assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0
    # Stratified: every class is 9-11% of the test set.
    frac = np.bincount(ds.y_test) / ds.y_test.size
    assert frac.min() > 0.09 and frac.max() < 0.11
    # The split is fixed: other seeds give the very same arrays.
    assert load_dataset("digits", seed=5) is ds


def test_mnist1d_is_generated_not_downloaded(monkeypatch: pytest.MonkeyPatch) -> None:
    import mnist1d.data

    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("mnist1d get_dataset would download")

    monkeypatch.setattr(mnist1d.data, "get_dataset", no_download)
    py_state, np_state = random.getstate(), np.random.get_state()
    ds = load_dataset("mnist1d")
    _check(ds, 4000, 1000, (40,), 10)
    np.testing.assert_allclose(ds.x_train.mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(ds.x_train.std(axis=0), 1.0, atol=1e-3)
    # make_dataset reseeds the global RNGs; the loader restores them.
    assert random.getstate() == py_state
    after = np.random.get_state()
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1]) and after[2:] == np_state[2:]


def test_synthetic_shapes_and_seed() -> None:
    ds = load_dataset("synthetic", seed=3)
    _check(ds, 4000, 1000, (32,), 10)
    small = load_dataset("synthetic:4:7", seed=3)
    _check(small, 4000, 1000, (7,), 4)
    again = load_dataset("synthetic", seed=3)
    other = load_dataset("synthetic", seed=4)
    assert again is ds  # cached
    assert not np.array_equal(ds.x_train, other.x_train)
    tiny = load_dataset("synthetic:2:1")
    _check(tiny, 4000, 1000, (1,), 2)


def test_synthetic_generation_is_deterministic() -> None:
    from p2pfl.learn import datasets

    a = datasets._synthetic("synthetic", 11)  # bypass the cache
    b = datasets._synthetic("synthetic", 11)
    for x, y in ((a.x_train, b.x_train), (a.y_train, b.y_train), (a.x_test, b.x_test), (a.y_test, b.y_test)):
        np.testing.assert_array_equal(x, y)


def _fit(ds: Dataset, hidden: int | None, steps: int = 200) -> float:
    torch.manual_seed(0)
    d = ds.input_shape[0]
    model: torch.nn.Module = (
        torch.nn.Linear(d, ds.num_classes) if hidden is None
        else torch.nn.Sequential(torch.nn.Linear(d, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, ds.num_classes))
    )
    x, y = torch.tensor(ds.x_train), torch.tensor(ds.y_train)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(steps):  # full batch
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        pred = model(torch.tensor(ds.x_test)).argmax(dim=1).numpy()
    return float((pred == ds.y_test).mean())


def test_synthetic_needs_a_nonlinear_model() -> None:
    ds = load_dataset("synthetic", seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: extra threads only add contention
    try:
        linear, mlp = _fit(ds, None), _fit(ds, 64)
    finally:
        torch.set_num_threads(threads)
    assert linear < 0.7  # measured 0.43
    assert mlp > 0.85  # measured 0.90


def test_cached_arrays_are_read_only() -> None:
    ds = load_dataset("digits")
    with pytest.raises(ValueError):
        ds.x_train[0, 0] = 1.0
    part = ds.x_train[np.array([0, 1])]  # fancy indexing copies: writable
    part[0, 0] = 1.0


def _save(path: Path, **arrays: np.ndarray) -> str:
    np.savez(path, **arrays)
    return f"npz:{path}"


def _good(n_train: int = 30, n_test: int = 10) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "x_train": rng.normal(size=(n_train, 2, 3)),
        "y_train": np.arange(n_train) % 4,
        "x_test": rng.normal(size=(n_test, 2, 3)),
        "y_test": np.arange(n_test) % 5,
    }


def test_npz_round_trip(tmp_path: Path) -> None:
    arrays = _good()
    ds = load_dataset(_save(tmp_path / "data.npz", **arrays, extra=np.zeros(3)))
    assert ds.num_classes == 5  # max label over train and test, plus one
    assert ds.input_shape == (2, 3)
    np.testing.assert_array_equal(ds.x_train, arrays["x_train"].astype(np.float32))
    np.testing.assert_array_equal(ds.y_test, arrays["y_test"])
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    # uint8 images and int32 labels are accepted and converted.
    ints = {k: v.astype(np.uint8 if k.startswith("x") else np.int32) for k, v in _good().items()}
    ints["x_train"] = np.abs(ints["x_train"])
    ds2 = load_dataset(_save(tmp_path / "ints.npz", **ints))
    assert ds2.x_train.dtype == np.float32 and ds2.y_train.dtype == np.int64


def test_npz_cache_key_is_the_resolved_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _save(tmp_path / "d.npz", **_good())
    monkeypatch.chdir(tmp_path)
    assert load_dataset("npz:d.npz") is load_dataset(f"npz:{tmp_path / 'd.npz'}")


def _variant(**changes: np.ndarray | None) -> dict[str, np.ndarray]:
    arrays = _good()
    for k, v in changes.items():
        if v is None:
            del arrays[k]
        else:
            arrays[k] = v
    return arrays


@pytest.mark.parametrize(
    ("arrays", "needle"),
    [
        (_variant(y_test=None), "missing y_test"),
        (_variant(x_train=None, y_train=None), "missing x_train, y_train"),
        (_variant(y_train=np.arange(29) % 4), "x_train has 30 samples but y_train has 29"),
        (_variant(y_test=np.arange(10) - 1), "negative label -1"),
        (_variant(y_train=(np.arange(30) % 4).astype(np.float64)), "y_train must be 1-D integer"),
        (_variant(y_train=np.zeros((30, 2), dtype=np.int64)), "y_train must be 1-D integer"),
        (_variant(x_train=np.zeros(30)), "x_train must be \\[N, features...\\]"),
        (_variant(x_test=np.array(["a"] * 10)), "x_test must be numeric"),
        (_variant(x_test=np.zeros((10, 3, 2))), "x_test samples are \\(3, 2\\)"),
        (_variant(x_train=np.full((30, 2, 3), np.nan)), "x_train contains NaN or Inf"),
        (_variant(x_train=np.zeros((0, 2, 3)), y_train=np.zeros(0, dtype=np.int64)), "x_train is empty"),
        (_variant(y_train=np.zeros(30, dtype=np.int64), y_test=np.zeros(10, dtype=np.int64)), "single class"),
    ],
)
def test_npz_validation(tmp_path: Path, arrays: dict[str, np.ndarray], needle: str) -> None:
    path = tmp_path / "bad.npz"
    with pytest.raises(ConfigError, match=needle) as e:
        load_dataset(_save(path, **arrays))
    assert str(path) in str(e.value)
    assert ALLOWED.split(": ", 1)[1] in str(e.value)


def test_npz_unreadable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_dataset(f"npz:{tmp_path / 'absent.npz'}")
    text = tmp_path / "text.npz"
    text.write_text("not a zip")
    with pytest.raises(ConfigError, match="cannot be read without pickle"):
        load_dataset(f"npz:{text}")
    obj = tmp_path / "obj.npz"
    np.savez(obj, **{**_good(), "y_train": np.array([object()] * 30)})
    with pytest.raises(ConfigError, match="cannot be read without pickle"):
        load_dataset(f"npz:{obj}")
    single = tmp_path / "single.npy"
    np.save(single, np.zeros(3))
    with pytest.raises(ConfigError, match="not an .npz archive"):
        load_dataset(f"npz:{single}")


@pytest.mark.parametrize("spec", ["foo", "", "digits:2", "mnist", "npz", "npz:", "MNIST1D"])
def test_unknown_spec(spec: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_dataset(spec)
    assert str(e.value) == f"dataset: unknown value '{spec.strip()}'; {ALLOWED}"


@pytest.mark.parametrize("spec", ["synthetic:10", "synthetic:a:b", "synthetic:1:4", "synthetic:3:0", "synthetic:2:2:2"])
def test_bad_synthetic_args(spec: str) -> None:
    with pytest.raises(ConfigError, match="synthetic:C:D") as e:
        load_dataset(spec)
    assert spec in str(e.value) and ALLOWED in str(e.value)


@pytest.mark.parametrize("seed", [-1, 1.5, "0", True])
def test_bad_seed(seed: object) -> None:
    with pytest.raises(ConfigError, match="seed"):
        load_dataset("synthetic", seed=seed)  # type: ignore[arg-type]


def test_dataset_constructor_validates() -> None:
    x = np.zeros((4, 3), dtype=np.float32)
    y = np.zeros(4, dtype=np.int64)
    Dataset("ok", x, y, x, y, num_classes=2, input_shape=(3,))
    with pytest.raises(ConfigError, match="float32"):
        Dataset("bad", x.astype(np.float64), y, x, y, num_classes=2, input_shape=(3,))
    with pytest.raises(ConfigError, match="input_shape"):
        Dataset("bad", x, y, x, y, num_classes=2, input_shape=(4,))
    with pytest.raises(ConfigError, match="labels outside"):
        Dataset("bad", x, y + 2, x, y, num_classes=2, input_shape=(3,))
