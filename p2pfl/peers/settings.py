"""`PeerSettings`: everything `p2pfl peer` needs, from a TOML file and command-line flags.

Theory of operation: one flat frozen dataclass; each field is a TOML key of the same name (and a
flag with dashes: `min_neighbors` <-> `--min-neighbors`). Precedence: defaults < `--config` file <
flags. Loading is strict (unknown key, wrong type, bad value -> ConfigError naming the key), and
happens before any socket is opened. Training defaults are the simulator's (`Scenario`), so a peer
started with `--shard i/N --seed S` trains on exactly the shard the simulator gives peer i.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pfl import algorithms
from p2pfl import config as strict
from p2pfl.errors import ConfigError
from p2pfl.learn.partition import parse_partition
from p2pfl.learn.train import TrainConfig
from p2pfl.robust import RULES
from p2pfl.robust.attacks import ATTACKS, check_attack

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class PeerSettings:
    out: str = "peer-out"               # metrics.jsonl, summary.json, checkpoint.pt, peer.key
    key: str | None = None              # identity file; missing -> generated and saved as <out>/peer.key
    listen: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/0",)
    bootstrap: tuple[str, ...] = ()
    neighbors: tuple[str, ...] = ()     # explicit neighbours (peer IDs or multiaddrs); else pick `degree`
    degree: int = 4
    min_neighbors: int = 1
    start_timeout: float = 60.0         # start round 0 after this long even without min_neighbors
    rounds: int = 30
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
    # data and model (same meaning as in a scenario)
    dataset: str = "digits"
    shard: str = "0/1"                  # i/N: the i-th of N shards
    partition: str = "dirichlet:0.5"
    seed: int = 0
    model: str = "mlp"
    hidden: tuple[int, ...] = (64,)
    # training and gossip
    algorithm: str = "dfedavg"          # a registered algorithm (p2pfl.algorithms); its presets for rho and momentum
    algorithm_params: dict[str, Any] = field(default_factory=dict)   # its own parameters, checked by the registry
    plugins: tuple[str, ...] = ()       # modules (or .py files) to import first: they register more algorithms
    lr: float = 0.2
    lr_decay: float = 1.0
    momentum: float | None = None       # None: the algorithm's preset
    weight_decay: float = 0.0
    batch_size: int = 16
    local_epochs: float = 2.0
    local_steps: int | None = None
    rho: float | None = None            # None: the algorithm's preset
    gossip_steps: int = 1
    aggregator: str = "mixing"
    aggregator_params: dict[str, Any] = field(default_factory=dict)   # the rule's parameters, e.g. {tau = 1.0}
    f: int = 0
    step_timeout: float = 30.0
    eval_every: int = 1
    # Byzantine fault injection: this peer lies (p2pfl.peers.attacker.AttackerPeer, local view)
    attack: str = "none"                # "none" or a name in p2pfl.robust.attacks.ATTACKS
    attack_params: dict[str, Any] = field(default_factory=dict)   # e.g. {sigma = 10} (gaussian)
    colluders: tuple[str, ...] = ()     # peer IDs of the other attackers (it spares them)

    def __post_init__(self) -> None:
        self.shard_index()
        parse_partition(self.partition)
        if self.device not in DEVICES:
            raise ConfigError(f"device: unknown value {self.device!r}; allowed: {', '.join(DEVICES)}")
        if self.aggregator not in RULES:
            raise ConfigError(f"aggregator: unknown value {self.aggregator!r}; allowed: {', '.join(sorted(RULES))}")
        for key in ("degree", "rounds", "gossip_steps", "eval_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        for key in ("min_neighbors", "threads", "f"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}: must be >= 0, got {getattr(self, key)}")
        for key in ("start_timeout", "step_timeout"):
            if not 0 < getattr(self, key) < math.inf:
                raise ConfigError(f"{key}: must be > 0 and finite, got {getattr(self, key)}")
        if not 0 <= self.delay_ms < math.inf:
            raise ConfigError(f"delay_ms: must be >= 0 and finite, got {self.delay_ms}")
        if self.seed < 0:
            raise ConfigError(f"seed: must be >= 0, got {self.seed}")
        for key, most in (("threads", 1024), ("degree", 1024), ("min_neighbors", 1024)):
            if getattr(self, key) > most:
                raise ConfigError(f"{key}: must be <= {most}, got {getattr(self, key)}")
        if not self.hidden or any(h < 1 for h in self.hidden):
            raise ConfigError(f"hidden: layer widths must be >= 1, got {list(self.hidden)}")
        if not -1 <= self.bulk_port <= 65535:
            raise ConfigError(f"bulk_port: must be 0..65535 (0: any free port) or -1 (off), got {self.bulk_port}")
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics_port: must be 0..65535 (0: off), got {self.metrics_port}")
        if not self.metrics_host.strip():
            raise ConfigError("metrics_host: empty; give an address to bind, e.g. 127.0.0.1")
        if self.fresh and self.resume:
            raise ConfigError("fresh: given with resume; either continue a checkpoint or start over, not both")
        algorithms.load_plugins(self.plugins)
        algorithms.params(self.algorithm, self.algorithm_params)
        self.train_config()
        self.check_attack()

    def check_attack(self) -> None:
        """The attack keys: a known attack, its params (ConfigError naming the key), nothing given for none."""
        if self.attack == "none":
            for key in ("attack_params", "colluders"):
                if getattr(self, key):
                    raise ConfigError(f"{key}: given, but attack = 'none'")
            return
        if self.attack not in ATTACKS:
            raise ConfigError(f"attack: unknown value {self.attack!r}; allowed: none, {', '.join(sorted(ATTACKS))}")
        peer = check_attack(self.attack, self.attack_params).get("peer")
        if isinstance(peer, int):
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

    def train_config(self) -> TrainConfig:
        """The local trainer's settings: explicit rho/momentum win over the algorithm's preset."""
        preset = algorithms.get(self.algorithm).train_preset
        return TrainConfig(lr=self.lr, lr_decay=self.lr_decay,
                           momentum=preset.get("momentum", 0.0) if self.momentum is None else self.momentum,
                           weight_decay=self.weight_decay, batch_size=self.batch_size,
                           local_epochs=self.local_epochs, local_steps=self.local_steps,
                           rho=preset.get("rho", 0.0) if self.rho is None else self.rho)

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
                "aggregator": self.aggregator, "f": self.f, "algorithm": self.algorithm,
                "aggregator_params": json.dumps(self.aggregator_params, sort_keys=True, default=str),
                "algorithm_params": json.dumps(self.algorithm_params, sort_keys=True, default=str)}


def load(config: str | Path | None, overrides: dict[str, Any]) -> PeerSettings:
    """Defaults < the TOML file `config` < `overrides` (None values are 'not given')."""
    values = {} if config is None else strict.read_toml(config, "config file")
    values.update({k: v for k, v in overrides.items() if v is not None and v != ()})
    return strict.build(PeerSettings, values, str(config or "peer settings"))
