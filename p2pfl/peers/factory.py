"""The one place a peer object is chosen, for the three drivers (real peers, the in-process engine,
and through real peers the multi-process engine): an honest `Peer`, an honest `ObservedPeer` whose
sent vectors an omniscient attacker reads (in-process only), or an `AttackerPeer` running `attack`
around the honest algorithm. Attackers are not evaluated: honest accuracy is what counts."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from p2pfl.errors import ConfigError
from p2pfl.learn.train import Data
from p2pfl.peers.attacker import AttackerPeer, Board, Knowledge, ObservedPeer
from p2pfl.peers.peer import Peer, PeerConfig
from p2pfl.peers.transport import Transport


def make_peer(model: nn.Module, train_data: Data, *, transport: Transport,
              neighbors: Mapping[str, float | None], config: PeerConfig,
              test_data: Data | None = None, num_classes: int | None = None,
              attack: str = "none", attack_params: Mapping[str, Any] | None = None,
              knowledge: Knowledge | None = None, colluders: Iterable[str] = (), board: Board | None = None,
              offload: bool = True, settle: Callable[[], Awaitable[None]] | None = None,
              reference_data: tuple[torch.Tensor, torch.Tensor] | None = None) -> Peer:
    """`attack` "none": honest (an `ObservedPeer` posting to `board` when one is given). Otherwise an
    attacker: omniscient with `knowledge` (the in-process engine), else in its local view, sparing
    `colluders`."""
    common: dict[str, Any] = {"transport": transport, "neighbors": neighbors, "config": config,
                              "num_classes": num_classes, "offload": offload, "settle": settle,
                              "reference_data": reference_data}
    if attack != "none":
        if not isinstance(train_data, tuple):
            raise ConfigError(f"attack: an attacker ({attack}) trains on (x, y) tensors, not a DataLoader")
        return AttackerPeer(model, train_data, attack=attack, attack_params=attack_params, knowledge=knowledge,
                            colluders=colluders, **common)
    if board is not None:
        return ObservedPeer(model, train_data, test_data=test_data, board=board, **common)
    return Peer(model, train_data, test_data=test_data, **common)
