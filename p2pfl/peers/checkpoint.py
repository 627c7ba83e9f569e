"""Per-round checkpoints of a peer: model, optimizer state, round, mini-batch order, reputation.

Theory of operation: `snapshot(...)` serialises the state at the end of a round into bytes (the
`torch.save` zip format, holding only tensors and plain containers); `write` puts those bytes on
disk atomically (temp file in the same folder, fsync, rename, fsync the folder), so a peer killed
at any instant leaves either the previous checkpoint or the new one, never a part. `load` reads it
back with `torch.load(..., weights_only=True)`: no pickled code runs, and the file is only ever our
own (nothing from the network is stored here). The node keeps the last snapshot's bytes, so on
SIGTERM mid-round it rewrites the last *completed* round instead of a half-trained model.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from p2pfl.errors import ConfigError
from p2pfl.files import atomic_write
from p2pfl.learn.train import LocalTrainer

FILENAME = "checkpoint.pt"
VERSION = 1


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

    def apply(self, trainer: LocalTrainer) -> None:
        """Restore model, optimizer and mini-batch order into `trainer` (and its model)."""
        trainer.model.load_state_dict(self.model)
        trainer.optimizer.load_state_dict(self.optimizer)
        trainer.generator.set_state(self.generator)
        trainer._order, trainer._cursor = self.order.clone(), self.cursor


def snapshot(trainer: LocalTrainer, *, round: int, peer_id: str, schema: str,
             extra: dict[str, Any] | None = None) -> bytes:
    state = {
        "version": VERSION, "round": round, "peer_id": peer_id, "schema": schema,
        "model": {k: v.detach().cpu().clone() for k, v in trainer.model.state_dict().items()},
        "optimizer": _to_cpu(trainer.optimizer.state_dict()),
        "generator": trainer.generator.get_state(), "order": trainer._order.cpu().clone(),
        "cursor": trainer._cursor, "extra": extra or {},
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def write(directory: str | Path, data: bytes) -> Path:
    path = Path(directory) / FILENAME
    atomic_write(path, data, mode=0o600)
    return path


def load(directory: str | Path, *, map_location: str | torch.device = "cpu") -> Checkpoint:
    """The checkpoint in `directory`; ConfigError naming the problem if missing or unreadable."""
    path = Path(directory) / FILENAME
    if not path.exists():
        raise ConfigError(f"resume: no {FILENAME} in {directory}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ConfigError(f"resume: {path} is not a readable checkpoint: {e}") from None
    if not isinstance(state, dict) or state.get("version") != VERSION:
        raise ConfigError(f"resume: {path} has an unknown checkpoint version")
    return Checkpoint(round=int(state["round"]), peer_id=str(state["peer_id"]), schema=str(state["schema"]),
                      model=state["model"], optimizer=state["optimizer"], generator=state["generator"],
                      order=state["order"], cursor=int(state["cursor"]), extra=dict(state.get("extra") or {}))


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj
