"""Per-round checkpoints of a peer: model, optimizer state, round, mini-batch order, reputation.

Theory of operation: `snapshot(...)` serialises the state at the end of a round into bytes (the
`torch.save` zip format, holding only tensors and plain containers) and seals them (below); it
refuses a model or optimizer state holding NaN/Inf (`LocalProtocolError`): a peer never saves a
state it could not resume from. `write` puts sealed bytes on disk atomically (temp file in the
same folder, fsync, rename, fsync the folder), so a peer killed at any instant leaves either the
previous checkpoint or the new one, never a part. The node keeps the last snapshot's bytes, so on
SIGTERM mid-round it rewrites the last *completed* round instead of a half-trained model.

Integrity: torch does not check the zip CRCs, so altered tensor bytes would load. The seal is a
BLAKE3 digest of the whole file stored in the zip's own comment field (the end record's last
field): `checksum = BLAKE3(file minus its last 32 bytes)`, the comment being a magic string and
that checksum. It is in the same file, hence in the same atomic write: no crash can leave a
checkpoint and a digest that disagree (a sidecar file could), every byte is covered (zip CRCs
miss headers and padding), and the file stays a plain zip that `torch.load` reads directly. It
detects damage (disk, truncation, copies, hand edits), not a forger who can write the folder:
that one could also read `peer.key`.

`load` reads the file once, checks the seal, then runs `torch.load(..., weights_only=True)` on
those same bytes (no pickled code runs), then checks what a sealed file may still get wrong (an
older version, a bug): every field present with its type, every floating value finite (model
and optimizer state), `0 <= round <= max_round` and the cursor within the batch order.
`Checkpoint.apply` first checks that the checkpoint fits the trainer (model keys, shapes and
dtypes, optimizer groups and buffers, generator state size, the order a permutation of the
trainer's samples), so a bad file changes nothing; it restores the optimizer's state (momentum
buffers) but keeps the trainer's hyperparameters, which come from the settings, not the file.
Every problem is a one-line `ConfigError` naming the file; `load` raises nothing else.
"""

from __future__ import annotations

import io
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from blake3 import blake3

from p2pfl.errors import ConfigError, LocalProtocolError
from p2pfl.files import atomic_write
from p2pfl.learn.train import LocalTrainer

FILENAME = "checkpoint.pt"
VERSION = 2                                     # 2: sealed (1 had no integrity check)

_MAGIC = b"p2pfl checkpoint blake3:"            # the zip comment: _MAGIC + the 32-byte digest
_SEAL = len(_MAGIC) + 32
_END = 22                                       # zip end-of-central-directory record, comment excluded
_END_SIGNATURE = b"PK\x05\x06"
_MAX_DEPTH = 16                                 # nesting of saved containers (optimizer state: 3)
_FIELDS: dict[str, type] = {"version": int, "round": int, "peer_id": str, "schema": str, "model": dict,
                            "optimizer": dict, "generator": torch.Tensor, "order": torch.Tensor, "cursor": int,
                            "extra": dict}


class _Bad(Exception):
    """What is wrong with a checkpoint; `load` and `check` turn it into a ConfigError naming the file."""


@dataclass
class Checkpoint:
    round: int                                  # the next round to run (= rounds completed)
    peer_id: str
    schema: str
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    generator: torch.Tensor                     # the trainer's torch.Generator state
    order: torch.Tensor                         # the current epoch's mini-batch order ...
    cursor: int                                 # ... and the position in it
    extra: dict[str, Any] = field(default_factory=dict)   # e.g. reputation state, when it exists
    source: str = FILENAME                      # the file it was read from, for error messages

    def check(self, trainer: LocalTrainer) -> None:
        """ConfigError naming the file unless this checkpoint fits `trainer` (model, optimizer, order)."""
        try:
            _check_fits(self, trainer)
        except _Bad as e:
            raise ConfigError(f"resume: {self.source}: {_one_line(e)}") from None

    def apply(self, trainer: LocalTrainer) -> None:
        """Restore model, optimizer state and mini-batch order into `trainer` (and its model), after
        `check`: a checkpoint that does not fit changes nothing. The optimizer's hyperparameters stay
        the trainer's (its settings): only its state (momentum buffers) comes from the file."""
        self.check(trainer)
        trainer.model.load_state_dict(self.model)
        groups = [{**mine, "params": saved["params"]}   # the saved ids map the saved state onto our parameters
                  for mine, saved in zip(trainer.optimizer.state_dict()["param_groups"], self.optimizer["param_groups"])]
        trainer.optimizer.load_state_dict({"state": self.optimizer["state"], "param_groups": groups})
        trainer.generator.set_state(self.generator.cpu())   # map_location may have moved it; set_state takes CPU
        trainer._order, trainer._cursor = self.order.clone(), self.cursor


def snapshot(trainer: LocalTrainer, *, round: int, peer_id: str, schema: str,
             extra: dict[str, Any] | None = None) -> bytes:
    """The sealed checkpoint bytes of `trainer` after `round` rounds; LocalProtocolError if its model
    or optimizer state holds a non-finite value (such a state must never become the one a peer resumes)."""
    state = {
        "version": VERSION, "round": round, "peer_id": peer_id, "schema": schema,
        "model": {k: v.detach().cpu().clone() for k, v in trainer.model.state_dict().items()},
        "optimizer": _to_cpu(trainer.optimizer.state_dict()),
        "generator": trainer.generator.get_state(), "order": trainer._order.cpu().clone(),
        "cursor": trainer._cursor, "extra": extra or {},
    }
    for key in ("model", "optimizer"):
        try:
            _check_values(state[key], key, finite=True)
        except _Bad as e:
            raise LocalProtocolError(f"checkpoint: refusing to save round {round}: {_one_line(e)}") from None
    buf = io.BytesIO()
    torch.save(state, buf)
    return seal(buf.getvalue())


def seal(data: bytes) -> bytes:
    """`data` (a `torch.save` zip without a comment) with its BLAKE3 seal in the zip comment."""
    if len(data) < _END or data[-_END:-_END + 4] != _END_SIGNATURE or data[-2:] != b"\0\0":
        raise LocalProtocolError("checkpoint: torch.save output does not end in a zip end record without comment")
    body = data[:-2] + struct.pack("<H", _SEAL) + _MAGIC
    return body + blake3(body).digest()


def write(directory: str | Path, data: bytes) -> Path:
    """Write sealed checkpoint bytes (from `snapshot`) atomically; LocalProtocolError for any other bytes."""
    try:
        _check_seal(data)
    except _Bad as e:
        raise LocalProtocolError(f"checkpoint: refusing to write bytes that snapshot() did not make: {e}") from None
    path = Path(directory) / FILENAME
    atomic_write(path, data, mode=0o600)
    return path


def load(directory: str | Path, *, map_location: str | torch.device = "cpu",
         max_round: int | None = None) -> Checkpoint:
    """The checkpoint in `directory`, whose round must not exceed `max_round` (when given). Any
    problem (missing, unreadable, altered, malformed, non-finite, out of range) is a one-line
    ConfigError naming the file, never another exception."""
    path = Path(directory) / FILENAME
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"resume: no {FILENAME} in {directory}") from None
    except OSError as e:
        raise ConfigError(f"resume: {path}: cannot read it: {e.strerror}") from None
    if not data:
        raise ConfigError(f"resume: {path}: the file is empty (0 bytes), so not a checkpoint (a peer never "
                          "writes an empty one: it was truncated or replaced); start over with --fresh")
    try:
        _check_seal(data)
        try:   # the very bytes the seal covers, not the file again (it could have changed since)
            state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
        except Exception as e:
            raise _Bad(f"not a readable checkpoint: {type(e).__name__}: {_one_line(e)}") from None
        _check_state(state, max_round)
    except _Bad as e:   # one line: the message may quote keys from the file
        raise ConfigError(f"resume: {path}: {_one_line(e)}") from None
    return Checkpoint(round=state["round"], peer_id=state["peer_id"], schema=state["schema"], model=state["model"],
                      optimizer=state["optimizer"], generator=state["generator"], order=state["order"],
                      cursor=state["cursor"], extra=state["extra"], source=str(path))


def _check_seal(data: bytes) -> None:
    """_Bad unless `data` ends in a zip end record whose comment is our seal, and the digest matches."""
    end = len(data) - _SEAL - _END
    if end < 0 or data[end:end + 4] != _END_SIGNATURE or data[-_SEAL:-32] != _MAGIC \
            or data[-_SEAL - 2:-_SEAL] != struct.pack("<H", _SEAL):
        raise _Bad("no integrity seal (truncated, or not written by this p2pfl version)")
    if blake3(memoryview(data)[:-32]).digest() != data[-32:]:
        raise _Bad("integrity check failed: the file was altered or damaged after it was written")


def _check_state(state: Any, max_round: int | None) -> None:
    """The fields, their types and ranges, and finite model and optimizer values."""
    if not isinstance(state, dict):
        raise _Bad(f"expected a dict of fields, got {type(state).__name__}")
    version = state.get("version")
    if type(version) is not int or version != VERSION:   # not shown: it could be anything
        raise _Bad(f"unknown checkpoint version (this p2pfl reads version {VERSION})")
    for key, kind in _FIELDS.items():
        if key not in state:
            raise _Bad(f"missing field {key!r}")
        if not isinstance(state[key], kind) or isinstance(state[key], bool):   # a bool is an int to Python
            raise _Bad(f"field {key!r}: expected {kind.__name__}, got {type(state[key]).__name__}")
    unknown = sorted(map(repr, set(state) - set(_FIELDS)))
    if unknown:
        raise _Bad(f"unknown field {unknown[0][:40]}")
    if state["round"] < 0:
        raise _Bad(f"round {state['round']} is negative")
    if max_round is not None and state["round"] > max_round:
        raise _Bad(f"round {state['round']} is beyond rounds = {max_round} (raise rounds to continue it)")
    for key in ("generator", "order"):
        t = state[key]
        if t.layout != torch.strided or t.dim() != 1:
            raise _Bad(f"field {key!r}: expected a 1-D dense tensor, got shape {tuple(t.shape)}")
    if state["generator"].dtype != torch.uint8 or state["order"].dtype != torch.int64:
        raise _Bad("field 'generator' must be uint8 and field 'order' int64")
    if not 0 <= state["cursor"] <= len(state["order"]):
        raise _Bad(f"cursor {state['cursor']} is outside 0..{len(state['order'])} (the batch order's length)")
    if any(not isinstance(k, str) or not isinstance(v, torch.Tensor) for k, v in state["model"].items()):
        raise _Bad("field 'model': expected tensors by parameter name")
    _check_values(state["model"], "model", finite=True)
    _check_values(state["optimizer"], "optimizer", finite=True)
    _check_values(state["extra"], "extra", finite=False)


def _check_values(obj: Any, where: str, *, finite: bool, depth: int = 0) -> None:
    """_Bad unless `obj` is plain containers of dense tensors and scalars, all finite when `finite`."""
    if depth > _MAX_DEPTH:   # a crafted file nests deeper than Python's recursion limit allows
        raise _Bad(f"{where}: nested deeper than {_MAX_DEPTH} levels")
    if isinstance(obj, torch.Tensor):
        if obj.layout != torch.strided:
            raise _Bad(f"{where}: a {obj.layout} tensor (only dense tensors are saved)")
        if finite and (obj.is_floating_point() or obj.is_complex()) and not bool(torch.isfinite(obj).all()):
            raise _Bad(f"{where}: non-finite values (NaN or Inf)")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise _Bad(f"{where}: a key of type {type(k).__name__}")
            _check_values(v, f"{where}.{k}", finite=finite, depth=depth + 1)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_values(v, f"{where}[{i}]", finite=finite, depth=depth + 1)
    elif isinstance(obj, float):
        if finite and not math.isfinite(obj):
            raise _Bad(f"{where}: non-finite value {obj}")
    elif obj is not None and not isinstance(obj, (bool, int, str)):
        raise _Bad(f"{where}: unexpected {type(obj).__name__}")


def _check_fits(ck: Checkpoint, trainer: LocalTrainer) -> None:
    """_Bad unless `ck` has the trainer's model keys, shapes and dtypes, optimizer layout and buffer
    shapes, generator state size, and a batch order over the trainer's samples."""
    mine = trainer.model.state_dict()
    for name in (*mine, *ck.model):
        if name not in ck.model or name not in mine:
            raise _Bad(f"model: parameter {name!r} is {'missing' if name in mine else 'not in this model'}")
        got, want = ck.model[name], mine[name]
        if got.shape != want.shape or got.dtype != want.dtype:
            raise _Bad(f"model: {name!r} is {got.dtype} {tuple(got.shape)}, this model has {want.dtype} "
                       f"{tuple(want.shape)}")
    state, groups = ck.optimizer.get("state"), ck.optimizer.get("param_groups")
    if set(ck.optimizer) != {"state", "param_groups"} or not isinstance(state, dict) or not isinstance(groups, list):
        raise _Bad("optimizer: expected {'state': dict, 'param_groups': list}")
    ours = trainer.optimizer.param_groups
    if len(groups) != len(ours) or any(not isinstance(g, dict) or not isinstance(g.get("params"), list)
                                       or len(g["params"]) != len(o["params"]) for g, o in zip(groups, ours)):
        raise _Bad("optimizer: its parameter groups do not match this model's")
    ids = [i for g in groups for i in g["params"]]
    if any(type(i) is not int for i in ids) or len(set(ids)) != len(ids):
        raise _Bad("optimizer: parameter ids must be distinct integers")
    params = {i: p for g, o in zip(groups, ours) for i, p in zip(g["params"], o["params"])}
    for i, entry in state.items():
        if i not in params:
            raise _Bad(f"optimizer: state for unknown parameter {i!r}")
        if not isinstance(entry, dict):
            raise _Bad(f"optimizer: the state of parameter {i} is {type(entry).__name__}, expected dict")
        for name, t in entry.items():   # SGD keeps one momentum buffer (or None) per parameter
            if t is None:
                continue
            if not isinstance(t, torch.Tensor) or (t.shape, t.dtype) != (params[i].shape, params[i].dtype):
                found = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise _Bad(f"optimizer: {name} of parameter {i} is {found}, the parameter "
                           f"{params[i].dtype} {tuple(params[i].shape)}")
    size = trainer.generator.get_state().numel()
    if ck.generator.numel() != size:
        raise _Bad(f"generator: state of {ck.generator.numel()} bytes, this generator's has {size}")
    try:   # torch checks the state's inside (mt19937) only when it is set: try it on a scratch generator
        torch.Generator(device=trainer.generator.device).set_state(ck.generator.cpu())
    except RuntimeError as e:
        raise _Bad(f"generator: {_one_line(e)}") from None
    n = len(trainer.x) if trainer.x is not None else 0   # a DataLoader's order is its own
    if len(ck.order) not in (0, n) or (len(ck.order) and not torch.equal(ck.order.sort().values.cpu(),
                                                                         torch.arange(n))):
        raise _Bad(f"order: not a permutation of this peer's {n} training samples")


def _one_line(e: object) -> str:
    """`e` as one short line: torch's messages span lines, and ours may quote keys from the file."""
    return " ".join(str(e).split())[:300]


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj
