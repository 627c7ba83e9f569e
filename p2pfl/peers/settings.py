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

import dataclasses
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
    start_timeout: float = 60.0         # wait this long for min_neighbors; with none by then, fail (or alone)
    alone: bool = False                 # may train without any neighbour (else nobody by start_timeout fails)
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
        self.check_addresses()
        self.check_attack()

    def check_addresses(self) -> None:
        """Every multiaddr parses, and those we dial name the peer (/p2p/<id>): refused now, not by a
        dial that fails quietly in the background while the peer trains alone."""
        for a in self.listen:
            _multiaddr("listen", a, "/ip4/0.0.0.0/tcp/4001")
        dialled = [("bootstrap", a) for a in self.bootstrap] + [("neighbors", a) for a in self.neighbors if "/" in a]
        for key, a in dialled:
            if "/p2p/" not in a:
                raise ConfigError(f"{key}: {a!r} names no peer; expected /ip4/A/tcp/P/p2p/12D3KooW... "
                                  "(the line the other peer printed after 'listening on')")
            _multiaddr(key, a, "/ip4/A/tcp/P/p2p/12D3KooW...")

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


def _multiaddr(key: str, addr: str, example: str) -> None:
    import multiaddr  # type: ignore[import-untyped]

    try:
        multiaddr.Multiaddr(addr)
    except Exception as e:   # the library's parse errors have no common base class
        reason = str(e).split(" (string:")[0]
        raise ConfigError(f"{key}: {addr!r} is not a multiaddr ({reason}); expected e.g. {example}") from None


SETTINGS_FILE = "settings.json"       # in the output folder: the settings the run was started with
# what a resumed run may change: where and how it connects and runs, not what it learns
MAY_CHANGE_ON_RESUME = frozenset({
    "rounds", "key", "listen", "bootstrap", "neighbors", "degree", "min_neighbors", "start_timeout", "alone",
    "network_key", "allow", "peer_exchange_dns", "device", "threads", "delay_ms", "bulk_port", "metrics_port",
    "metrics_host", "step_timeout", "eval_every", "colluders"})


def saved(s: PeerSettings) -> dict[str, Any]:
    """What `<out>/settings.json` holds: every key as the run uses it (resume and fresh excluded)."""
    return {f.name: getattr(s, f.name) for f in dataclasses.fields(s) if f.name not in ("resume", "fresh")}


def load(config: str | Path | None, overrides: dict[str, Any]) -> PeerSettings:
    """Defaults < the TOML file `config` < `overrides` (None values are 'not given'). With `resume`,
    the settings the run was started with (its settings.json) replace the defaults, the output folder
    is the resumed one, and a given key that contradicts them is refused unless a resumed run may
    change it (MAY_CHANGE_ON_RESUME: rounds, addresses, ports, device...)."""
    values = {} if config is None else strict.read_toml(config, "config file")
    values.update({k: v for k, v in overrides.items() if v is not None and v != ()})
    source = str(config or "peer settings")
    if values.get("resume"):
        return _resumed(values, source)
    return strict.build(PeerSettings, values, source)


def _resumed(values: dict[str, Any], source: str) -> PeerSettings:
    for key in ("resume", "out"):   # checked before they are used as paths
        if values.get(key) is not None and not isinstance(values[key], str):
            raise ConfigError(f"{key}: expected a folder path (a string), got {type(values[key]).__name__}")
    folder = Path(values["resume"])
    given_out = values.get("out")
    if given_out is not None and Path(given_out).resolve() != folder.resolve():
        raise ConfigError(f"out: a resumed run continues in its own folder {folder}; out = {given_out!r} names "
                          "another (drop it)")
    path = folder / SETTINGS_FILE
    if not path.exists():   # a folder written before settings.json existed: the given keys, as then
        return strict.build(PeerSettings, {**values, "out": str(folder)}, source)
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"resume: {path}: not readable settings ({type(e).__name__}); it records how "
                          "the run was started") from None
    if not isinstance(recorded, dict):
        raise ConfigError(f"resume: {path}: expected a JSON object of settings")
    started = strict.build(PeerSettings, {k: v for k, v in recorded.items() if k != "resume"}, str(path))
    s = strict.build(PeerSettings, {**recorded, **values, "out": str(folder)}, source)
    conflicts = [k for k in values if k not in MAY_CHANGE_ON_RESUME | {"out", "resume", "fresh"}
                 and getattr(s, k) != getattr(started, k)]
    if conflicts:
        was = ", ".join(f"{k} = {getattr(started, k)!r}" for k in conflicts)
        now = ", ".join(f"{k} = {getattr(s, k)!r}" for k in conflicts)
        raise ConfigError(f"resume: {folder} was started with {was}; {now} contradicts it (drop it to continue "
                          "that run, or start a new run in another folder)")
    return s
