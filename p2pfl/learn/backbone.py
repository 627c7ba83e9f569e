"""Pre-trained frozen backbones: the safetensors file, its content hash, and how a model uses one.

Theory of operation
-------------------
A backbone is every tensor of a model's `state_dict` except its output layer (the head: the last
`nn.Linear` in module order). `p2pfl backbone pretrain` trains the whole model on the *public*
part of a dataset's training split and saves the backbone; a peer whose settings name the file
builds the same model, copies the backbone in and freezes it (`requires_grad = False`). From then
on only the head is trainable, so the flat vector every algorithm gossips (`ParamLayout`) is the
head: Bristle and every other rule run on head-only models.

The public part is held out from every peer: it is `public_indices(n_train, fraction, seed)` of the
training split, a seeded permutation's first round(fraction * n_train) indices, with the fraction
and seed read from the file's metadata (not from the run's seed). `peer_shards` partitions only
the remaining (private) indices, so a run with a backbone trains its peers on data the backbone
never saw, in the simulator and on real peers alike.

The file is safetensors, written and read here (no third-party reader, no pickle): an 8-byte
little-endian header length N, N bytes of JSON header {name: {dtype, shape, data_offsets}, and
"__metadata__": {str: str}}, then the raw little-endian tensor bytes. The metadata holds what the
backbone was trained for (format, dataset, model, hidden, classes, the public split) and `blake3`:
the BLAKE3 hash of the canonical header without that key, followed by the data bytes, so names,
shapes, metadata and values are all covered. A reader treats the file as hostile: bounded file
and header size, strict JSON (no duplicate keys, no NaN), a dtype whitelist, every shape and
offset checked against the data (contiguous, in order, no gap, no overlap, nothing trailing),
and the hash verified before any tensor is built. Writes are atomic.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from blake3 import blake3
from torch import nn

from p2pfl.errors import ConfigError
from p2pfl.files import atomic_write
from p2pfl.learn.partition import partition

FORMAT = "p2pfl-backbone/1"
MAX_FILE_BYTES = 1 << 30        # 1 GiB: far above any backbone this project trains
MAX_HEADER_BYTES = 1 << 20      # 1 MiB of JSON header
MAX_TENSORS = 1024
MAX_DIMS = 8
MAX_NAME_CHARS = 256
HASH_KEY = "blake3"
# safetensors dtype -> (torch dtype, little-endian numpy dtype of the same width to read it)
DTYPES: Mapping[str, tuple[torch.dtype, str]] = {
    "F64": (torch.float64, "<f8"), "F32": (torch.float32, "<f4"),
    "F16": (torch.float16, "<f2"), "BF16": (torch.bfloat16, "<u2"),
}
_NAMES = {torch_dtype: name for name, (torch_dtype, _) in DTYPES.items()}


class BackboneError(ConfigError):
    """A backbone file that cannot be used; the message names the file and the problem."""


# ------------------------------------------------------------------------------------------ format


def _canonical(header: Mapping[str, Any]) -> bytes:
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode()


def _hash(header: Mapping[str, Any], body: bytes | memoryview) -> str:
    """BLAKE3 of the canonical header without the hash key, then the data bytes."""
    meta = {k: v for k, v in header.get("__metadata__", {}).items() if k != HASH_KEY}
    h = blake3(_canonical({**header, "__metadata__": meta}))
    h.update(body)
    return h.hexdigest()


def encode(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """A safetensors file of `tensors` (in the given order) with `metadata` and its content hash."""
    header: dict[str, Any] = {}
    chunks, offset = [], 0
    for name, t in tensors.items():
        if t.dtype not in _NAMES:
            raise ValueError(f"{name}: dtype {t.dtype} is not one of {sorted(DTYPES)}")
        raw = t.detach().cpu().contiguous()
        array = (raw.view(torch.uint16) if raw.dtype == torch.bfloat16 else raw).numpy()
        data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": _NAMES[t.dtype], "shape": list(raw.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    body = b"".join(chunks)
    header["__metadata__"] = {k: str(v) for k, v in metadata.items() if k != HASH_KEY}
    header["__metadata__"][HASH_KEY] = _hash(header, body)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)   # the format allows space padding; keeps the data 8-byte aligned
    return len(text).to_bytes(8, "little") + text + body


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name} in the header")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate key in the header")
    return dict(pairs)


def decode(data: bytes, what: str = "backbone") -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """(tensors, metadata, hash) of a safetensors file; BackboneError naming `what` if anything is off."""
    def bad(problem: str) -> BackboneError:
        return BackboneError(f"backbone: {what}: {problem}")

    if len(data) > MAX_FILE_BYTES:
        raise bad(f"{len(data)} bytes, more than the {MAX_FILE_BYTES} allowed")
    if len(data) < 8:
        raise bad("too short to be a safetensors file (no 8-byte header length)")
    n = int.from_bytes(data[:8], "little")
    if not 2 <= n <= min(MAX_HEADER_BYTES, len(data) - 8):
        raise bad(f"header length {n} is not in [2, {min(MAX_HEADER_BYTES, len(data) - 8)}]")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"), object_pairs_hook=_unique_keys,
                            parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise bad(f"header is not valid JSON: {str(e)[:100]}") from None
    if type(header) is not dict:
        raise bad("header is not a JSON object")
    meta = header.get("__metadata__", {})
    if type(meta) is not dict or not all(type(k) is str and type(v) is str for k, v in meta.items()):
        raise bad("__metadata__ must map strings to strings")
    entries = [(k, v) for k, v in header.items() if k != "__metadata__"]
    if len(entries) > MAX_TENSORS:
        raise bad(f"{len(entries)} tensors, more than the {MAX_TENSORS} allowed")
    body = memoryview(data)[8 + n:]
    spans = []
    for name, entry in entries:
        if not 0 < len(name) <= MAX_NAME_CHARS or not name.isprintable():
            raise bad(f"tensor name {name[:40]!r} is empty, too long or not printable")
        if type(entry) is not dict or entry.keys() != {"dtype", "shape", "data_offsets"}:
            raise bad(f"{name}: an entry must hold exactly dtype, shape and data_offsets")
        if entry["dtype"] not in DTYPES:
            raise bad(f"{name}: dtype {str(entry['dtype'])[:20]!r} is not one of {', '.join(sorted(DTYPES))}")
        shape, offsets = entry["shape"], entry["data_offsets"]
        if (type(shape) is not list or len(shape) > MAX_DIMS
                or not all(type(d) is int and 0 <= d <= MAX_FILE_BYTES for d in shape)):
            raise bad(f"{name}: shape must be a list of at most {MAX_DIMS} non-negative integers")
        if type(offsets) is not list or len(offsets) != 2 or not all(type(o) is int for o in offsets):
            raise bad(f"{name}: data_offsets must be two integers")
        width = np.dtype(DTYPES[entry["dtype"]][1]).itemsize
        if not 0 <= offsets[0] <= offsets[1] <= len(body) or offsets[1] - offsets[0] != math.prod(shape) * width:
            raise bad(f"{name}: data_offsets {offsets} do not hold shape {shape} of {entry['dtype']} "
                      f"within the {len(body)} data bytes")
        spans.append((offsets[0], offsets[1]))
    cursor = 0
    for start, end in sorted(spans):
        if start != cursor:
            raise bad(f"tensor data overlaps or leaves a gap at byte {cursor}")
        cursor = end
    if cursor != len(body):
        raise bad(f"{len(body) - cursor} data bytes belong to no tensor")
    expected = meta.get(HASH_KEY)
    if expected is None:
        raise bad(f"no content hash (__metadata__.{HASH_KEY}); not written by `p2pfl backbone pretrain`")
    actual = _hash(header, body)
    if expected != actual:
        raise bad(f"content hash mismatch: the file says {expected[:64]!r}, its content hashes to {actual} "
                  "(corrupted or altered)")
    tensors = {}
    for name, entry in entries:
        torch_dtype, np_dtype = DTYPES[entry["dtype"]]
        start, end = entry["data_offsets"]
        arr = np.frombuffer(body[start:end], dtype=np_dtype).astype(np.dtype(np_dtype).newbyteorder("="))
        t = torch.from_numpy(arr.copy())
        tensors[name] = (t.view(torch.bfloat16) if torch_dtype == torch.bfloat16 else t).reshape(entry["shape"])
    return tensors, dict(meta), actual


# ---------------------------------------------------------------------------------------- backbone


def head_of(model: nn.Module) -> tuple[str, nn.Linear]:
    """(module name, module) of the model's output layer: its last nn.Linear in module order."""
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError("backbone: the model has no nn.Linear output layer")
    return linears[-1]


def head_keys(model: nn.Module) -> set[str]:
    name, head = head_of(model)
    return {f"{name}.{k}" if name else k for k, _ in head.named_parameters()}


def public_indices(n_train: int, fraction: float, seed: int) -> np.ndarray:
    """The public part of a training split of n_train samples: sorted indices, round(fraction * n)."""
    order = np.random.default_rng([seed, 0xBAC0B0]).permutation(n_train)
    return np.sort(order[:round(fraction * n_train)])


@dataclass(frozen=True)
class Backbone:
    path: str
    tensors: Mapping[str, torch.Tensor]
    meta: Mapping[str, str]
    hash: str

    def field(self, key: str) -> str:
        if key not in self.meta:
            raise BackboneError(f"backbone: {self.path}: metadata has no {key!r}; not written by `p2pfl backbone "
                                "pretrain`")
        return self.meta[key]

    def public(self, n_train: int) -> np.ndarray:
        """The training indices this backbone was trained on (held out from every peer)."""
        if int(self.field("train_size")) != n_train:
            raise BackboneError(f"backbone: {self.path}: made for a training split of {self.field('train_size')} "
                                f"samples, this dataset has {n_train}")
        return public_indices(n_train, float(self.field("public_fraction")), int(self.field("public_seed")))

    def check(self, dataset: str, model: str, hidden: tuple[int, ...], seed: int) -> None:
        """ConfigError naming `backbone` unless it was pre-trained for this dataset and model."""
        if self.field("format") != FORMAT:
            raise BackboneError(f"backbone: {self.path}: format {self.field('format')[:40]!r}, expected {FORMAT!r}")
        ours = {"dataset": dataset, "model": model, "hidden": json.dumps(list(hidden)) if model == "mlp" else "[]"}
        for key, value in ours.items():
            if self.field(key) != value:
                raise BackboneError(f"backbone: {self.path} was pre-trained for {key} {self.field(key)[:60]}, "
                                    f"this run uses {key} {value}")
        if dataset.startswith("synthetic") and int(self.field("public_seed")) != seed:   # data drawn from the seed
            raise BackboneError(f"backbone: {self.path} was pre-trained on {dataset} drawn with seed "
                                f"{self.field('public_seed')}, this run draws it with seed {seed}")

    def attach(self, model: nn.Module) -> None:
        """Copy the backbone into `model` and freeze it: afterwards only the head is trainable."""
        head = head_keys(model)
        state = {k: v for k, v in model.state_dict().items() if k not in head}
        if set(state) != set(self.tensors):
            missing, extra = sorted(set(state) - set(self.tensors)), sorted(set(self.tensors) - set(state))
            raise BackboneError(f"backbone: {self.path} does not fit the model: missing {missing[:4]}, "
                                f"unexpected {extra[:4]}")
        for k, v in state.items():
            if tuple(v.shape) != tuple(self.tensors[k].shape):
                raise BackboneError(f"backbone: {self.path}: {k} has shape {list(self.tensors[k].shape)}, "
                                    f"the model's is {list(v.shape)}")
        with torch.no_grad():
            for k, v in state.items():
                v.copy_(self.tensors[k].to(v.device, v.dtype))
        for name, p in model.named_parameters():
            p.requires_grad_(name in head)


_cache: dict[tuple[str, int, int], Backbone] = {}


def load(path: str | Path) -> Backbone:
    """Read and verify a backbone file (cached per path, size and modification time)."""
    path = Path(path)
    try:
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        if key in _cache:
            return _cache[key]
        if st.st_size > MAX_FILE_BYTES:
            raise BackboneError(f"backbone: {path}: {st.st_size} bytes, more than the {MAX_FILE_BYTES} allowed")
        with open(path, "rb") as fh:
            data = fh.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise BackboneError(f"backbone: {path}: {e.strerror}") from None
    tensors, meta, digest = decode(data, str(path))
    _cache.clear()   # one backbone per process in practice; never let the cache grow
    _cache[key] = Backbone(str(path), tensors, meta, digest)
    return _cache[key]


def save(path: str | Path, model: nn.Module, metadata: Mapping[str, str]) -> str:
    """Write `model`'s backbone (everything but the head) atomically; returns its content hash."""
    head = head_keys(model)
    tensors = {k: v for k, v in model.state_dict().items() if k not in head}
    data = encode(tensors, {"format": FORMAT, **metadata})
    atomic_write(path, data)
    return decode(data, os.fspath(path))[2]


def peer_shards(y_train: np.ndarray, n_peers: int, spec: str, rng: np.random.Generator,
                backbone: Backbone | None) -> list[np.ndarray]:
    """The peers' training indices: the partition of the whole split, or with a backbone, of the
    samples it was not trained on."""
    if backbone is None:
        return partition(y_train, n_peers, spec, rng)
    private = np.setdiff1d(np.arange(len(y_train)), backbone.public(len(y_train)))
    return [private[idx] for idx in partition(y_train[private], n_peers, spec, rng)]


def public_data(x_train: np.ndarray, y_train: np.ndarray,
                backbone: Backbone | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The backbone's public part of a training split as (x, y) tensors (copies): labelled samples every
    peer holds alike and none trains on; Bristle's integrator scores heads on them. None without a backbone."""
    if backbone is None:
        return None
    idx = backbone.public(len(y_train))
    return torch.from_numpy(x_train[idx]), torch.from_numpy(y_train[idx])


def pretrain(dataset: str, model_name: str, out: str | Path, *, hidden: tuple[int, ...] = (64,),
             public_fraction: float = 0.2, seed: int = 0, epochs: float = 50.0, lr: float = 0.1,
             batch_size: int = 32) -> tuple[Backbone, float]:
    """Train `model_name` on the public part of `dataset`'s training split, save its backbone to
    `out`; returns (the backbone as read back, the full pre-trained model's test accuracy)."""
    from p2pfl.learn.datasets import load_dataset
    from p2pfl.learn.models import make_model
    from p2pfl.learn.train import LocalTrainer, TrainConfig, evaluate

    if not 0 < public_fraction < 1:
        raise ConfigError(f"public_fraction: must be in (0, 1), got {public_fraction}")
    data = load_dataset(dataset, seed=seed)
    public = public_indices(len(data.y_train), public_fraction, seed)
    if len(public) < 1:
        raise ConfigError(f"public_fraction: {public_fraction} of {len(data.y_train)} samples is no sample")
    model = make_model(model_name, data.input_shape, data.num_classes, hidden=hidden, seed=seed)
    x, y = torch.from_numpy(data.x_train[public]), torch.from_numpy(data.y_train[public])
    config = TrainConfig(lr=lr, batch_size=batch_size, local_epochs=epochs)
    LocalTrainer(model, x, y, config, torch.Generator().manual_seed(seed)).train_round(0)
    accuracy = evaluate(model, torch.from_numpy(np.array(data.x_test)), torch.from_numpy(np.array(data.y_test)))[0]
    meta = {"dataset": dataset, "model": model_name, "hidden": json.dumps(list(hidden)) if model_name == "mlp" else "[]",
            "num_classes": str(data.num_classes), "input_shape": json.dumps(list(data.input_shape)),
            "train_size": str(len(data.y_train)), "public_fraction": repr(public_fraction),
            "public_seed": str(seed), "public_count": str(len(public)), "epochs": repr(epochs), "lr": repr(lr),
            "pretrain_test_accuracy": f"{accuracy:.4f}"}
    save(out, model, meta)
    return load(out), accuracy
