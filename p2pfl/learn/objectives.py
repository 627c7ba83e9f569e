"""Losses and test metrics by name or import string, and the import strings themselves.

Theory of operation: a loss is a callable `loss(output, target) -> scalar tensor` (mean over the
batch); a metric is a callable `metric(output, target) -> (total, count)`, summed over test batches
and divided at the end, so a metric is exact however the test set is batched. Both are named in
settings (`loss = "cross_entropy"`, `metric = "accuracy"`) or given as an import string
`"pkg.module:name"` (the convention of uvicorn and Flower apps; `path/to/file.py:name` also works),
and the embedding API also takes the callables themselves. `resolve` is the one importer of user
code named by a key: every failure (no module, no attribute, not callable) is a `ConfigError` that
names the key. Before importing, the current directory is put on `sys.path` (as uvicorn does), so
`python -m p2pfl.cli sim` and the `p2pfl` script find a module next to the user's files alike.

A metric's value goes into the round events under the key `accuracy` (the key the simulator's
tables and plots read) and its name under `metric`; `mse` is lower-is-better, the rest higher.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Callable
from typing import Any, Union

import torch
import torch.nn.functional as F

from p2pfl.errors import ConfigError
from p2pfl.files import import_file

Tensor = torch.Tensor
LossFn = Callable[[Tensor, Tensor], Tensor]
MetricFn = Callable[[Tensor, Tensor], tuple[float, int]]
Loss = Union[str, LossFn]
Metric = Union[str, MetricFn]

_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_ATTR = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
# built-in specs that have a colon of their own: never import strings
_BUILTIN_PREFIXES = ("npz", "synthetic")


def is_import_string(spec: object) -> bool:
    """Whether `spec` names user code: `pkg.module:attr` or `path/file.py:attr`."""
    if not isinstance(spec, str) or ":" not in spec:
        return False
    module, _, attr = spec.rpartition(":")
    if module in _BUILTIN_PREFIXES or not _ATTR.fullmatch(attr):
        return False
    return module.endswith(".py") or bool(_MODULE.fullmatch(module))


def resolve(spec: str, key: str) -> Any:
    """The object an import string names; ConfigError naming `key` if it cannot be had."""
    if not is_import_string(spec):
        raise ConfigError(f"{key}: {spec!r} is not an import string; expected 'pkg.module:name' "
                          "or 'path/to/file.py:name'")
    module_name, _, attr = spec.rpartition(":")
    if os.getcwd() not in sys.path:   # as uvicorn: the user's modules next to where they run
        sys.path.insert(0, os.getcwd())
    try:
        module = _import_file(module_name) if module_name.endswith(".py") else importlib.import_module(module_name)
    except Exception as e:   # the user's module: whatever it raises is its import failing
        raise ConfigError(f"{key}: cannot import {module_name!r} (from {spec!r}): {type(e).__name__}: {e}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{key}: module {module_name!r} has no attribute {attr!r} (from {spec!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{key}: {spec!r} is a {type(obj).__name__}, expected a callable")
    return obj


def _import_file(path_text: str) -> Any:
    return import_file(path_text, "p2pfl_user_")


def _mse(output: Tensor, target: Tensor) -> Tensor:
    return F.mse_loss(_like(output, target), target)


def _like(output: Tensor, target: Tensor) -> Tensor:
    """A (B, 1) output against a (B,) target (or the reverse) is the same regression."""
    return output.reshape(target.shape) if output.shape != target.shape and output.numel() == target.numel() \
        else output


def _accuracy(output: Tensor, target: Tensor) -> tuple[float, int]:
    return float((output.argmax(1) == target).sum()), len(target)


def _mse_metric(output: Tensor, target: Tensor) -> tuple[float, int]:
    return float(F.mse_loss(_like(output, target), target, reduction="sum")) / max(1, target[0].numel()), len(target)


LOSSES: dict[str, LossFn] = {"cross_entropy": F.cross_entropy, "mse": _mse}
METRICS: dict[str, MetricFn] = {"accuracy": _accuracy, "mse": _mse_metric}


def loss_function(loss: Loss, key: str = "loss") -> LossFn:
    """A loss by name, import string or callable; ConfigError naming `key` otherwise."""
    return _pick(loss, LOSSES, key, "loss(output, target) -> scalar tensor")


def metric_function(metric: Metric, key: str = "metric") -> MetricFn:
    """A metric by name, import string or callable; ConfigError naming `key` otherwise."""
    return _pick(metric, METRICS, key, "metric(output, target) -> (total, count)")


def _pick(value: Any, named: dict[str, Any], key: str, shape: str) -> Any:
    if isinstance(value, str):
        if value in named:
            return named[value]
        if is_import_string(value):
            return resolve(value, key)
        raise ConfigError(f"{key}: unknown value {value!r}; allowed: {', '.join(named)}, or 'pkg.module:name' "
                          f"naming {shape}")
    if callable(value):
        return value
    raise ConfigError(f"{key}: expected a name ({', '.join(named)}), an import string or a callable {shape}, "
                      f"got {type(value).__name__}")


def name_of(value: Loss | Metric) -> str:
    """What a loss or metric is called in events and summaries."""
    return value if isinstance(value, str) else getattr(value, "__name__", type(value).__name__)
