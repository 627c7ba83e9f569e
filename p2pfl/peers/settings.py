"""`PeerSettings`: everything `p2pfl peer` needs, from a TOML file and command-line flags.

Theory of operation: one flat frozen dataclass; each field is a TOML key of the same name (and a
flag with dashes: `min_neighbors` <-> `--min-neighbors`). The keys shared with a simulated scenario
(data, model, training, gossip, algorithm, attack) are `p2pfl.settings.LearningSettings`: same
names, defaults and checks, so a peer started with `--shard i/N --seed S` trains on exactly the
shard the simulator gives peer i. Precedence: defaults < `--config` file < flags. Loading is strict
(unknown key, wrong type, bad value -> ConfigError naming the key), and happens before any socket
is opened.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p2pfl import config as strict
from p2pfl.errors import ConfigError
from p2pfl.learn import backbone
from p2pfl.settings import LearningSettings

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class PeerSettings(LearningSettings):
    """A real peer: the keys it shares with a scenario (`LearningSettings`: data, model, training,
    gossip, algorithm, attack) plus its own."""

    out: str = "peer-out"               # metrics.jsonl, summary.json, checkpoint.pt, peer.key
    key: str | None = None              # identity file; missing -> generated and saved as <out>/peer.key
    listen: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/0",)
    bootstrap: tuple[str, ...] = ()
    neighbors: tuple[str, ...] = ()     # explicit neighbours (peer IDs or multiaddrs); else pick `degree`
    degree: int = 4
    min_neighbors: int = 1
    start_timeout: float = 60.0         # start round 0 after this long even without min_neighbors
    resume: str | None = None           # a folder holding checkpoint.pt
    fresh: bool = False                 # start over even if `out` holds a checkpoint (else refused)
    network_key: str | None = None      # file with a 64-hex-char pre-shared key (libp2p pnet)
    allow: str | None = None            # file: one allowed peer ID a line
    peer_exchange_dns: bool = False     # dial /dns*/ addresses other peers pass on (bootstrap may always be DNS)
    device: str = "auto"
    threads: int = 0                    # torch intra-op threads; 0 = torch's default
    delay_ms: float = 0.0               # injected delay before each outbound frame (fault injection)
    bulk_port: int = 0                  # TCP port of the fast bulk channel for model frames; 0: any, -1: off
    metrics_port: int = 0               # Prometheus endpoint; 0: off
    metrics_host: str = "127.0.0.1"     # its bind address: local only by default (0.0.0.0 exposes it)
    shard: str = "0/1"                  # i/N: train on the i-th of N shards (the simulator's peer i)
    step_timeout: float = 30.0
    # with `attack` set this peer lies (p2pfl.peers.attacker.AttackerPeer, local view)
    colluders: tuple[str, ...] = ()     # peer IDs of the other attackers (it spares them)

    def __post_init__(self) -> None:
        self.shard_index()
        super().__post_init__()
        if self.device not in DEVICES:
            raise ConfigError(f"device: unknown value {self.device!r}; allowed: {', '.join(DEVICES)}")
        if self.degree < 1:
            raise ConfigError(f"degree: must be >= 1, got {self.degree}")
        for key in ("min_neighbors", "threads"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}: must be >= 0, got {getattr(self, key)}")
        for key in ("start_timeout", "step_timeout"):
            if not 0 < getattr(self, key) < math.inf:
                raise ConfigError(f"{key}: must be > 0 and finite, got {getattr(self, key)}")
        if not 0 <= self.delay_ms < math.inf:
            raise ConfigError(f"delay_ms: must be >= 0 and finite, got {self.delay_ms}")
        for key, most in (("threads", 1024), ("degree", 1024), ("min_neighbors", 1024)):
            if getattr(self, key) > most:
                raise ConfigError(f"{key}: must be <= {most}, got {getattr(self, key)}")
        if not -1 <= self.bulk_port <= 65535:
            raise ConfigError(f"bulk_port: must be 0..65535 (0: any free port) or -1 (off), got {self.bulk_port}")
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics_port: must be 0..65535 (0: off), got {self.metrics_port}")
        if not self.metrics_host.strip():
            raise ConfigError("metrics_host: empty; give an address to bind, e.g. 127.0.0.1")
        if self.fresh and self.resume:
            raise ConfigError("fresh: given with resume; either continue a checkpoint or start over, not both")
        self.check_attack()

    def check_attack(self) -> None:
        """What a real attacker cannot be given (beyond the shared checks of the attack keys)."""
        if self.attack == "none":
            if self.colluders:
                raise ConfigError("colluders: given, but attack = 'none'")
            return
        if isinstance(self.attack_settings().get("peer"), int):
            raise ConfigError("attack_params.peer (mimic): a real peer knows no peer order; give a peer ID")
        if self.resume:
            raise ConfigError("resume: an attacker (attack) keeps no checkpoint; start it without resume")

    def shard_index(self) -> tuple[int, int]:
        try:
            i, n = (int(v) for v in self.shard.split("/"))
        except ValueError:
            raise ConfigError(f"shard: expected i/N (e.g. 0/4), got {self.shard!r}") from None
        if not 0 <= i < n:
            raise ConfigError(f"shard: need 0 <= i < N, got {self.shard!r}")
        return i, n

    def network_psk(self) -> str | None:
        """The pre-shared key in the `network_key` file (None: no private network): its first line that
        is neither blank nor a `#` comment. ConfigError naming the file if it is unreadable or holds none."""
        if self.network_key is None:
            return None
        try:
            text = Path(self.network_key).read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"network_key: {self.network_key}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"network_key: {self.network_key}: not text; expected 64 hex characters") from None
        lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
        if not lines:
            raise ConfigError(f"network_key: {self.network_key} holds no key; expected 64 hex characters "
                              "(a 32-byte pre-shared key)")
        return lines[0]

    def protocol_settings(self) -> dict[str, Any]:
        """What every peer of one federation must agree on (hashed into the hello's config digest)."""
        return {"dataset": self.dataset, "model": self.model, "gossip_steps": self.gossip_steps,
                "aggregator": self.aggregator, "f": self.f, "algorithm": self.algorithm_or_default,
                "aggregator_params": json.dumps(self.aggregator_params, sort_keys=True, default=str),
                "algorithm_params": json.dumps(self.algorithm_params, sort_keys=True, default=str),
                # the content hash, not the path: peers must load the same tensors, wherever the file lies
                "backbone": backbone.load(self.backbone).hash if self.backbone else None}


def load(config: str | Path | None, overrides: dict[str, Any]) -> PeerSettings:
    """Defaults < the TOML file `config` < `overrides` (None values are 'not given')."""
    values = {} if config is None else strict.read_toml(config, "config file")
    values.update({k: v for k, v in overrides.items() if v is not None and v != ()})
    return strict.build(PeerSettings, values, str(config or "peer settings"))
