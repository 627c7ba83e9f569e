"""Scenarios: what a simulation runs, from a TOML file, the embedded default, and CLI overrides.

Theory of operation: a `Scenario` is a flat, frozen dataclass; every field is a TOML key with the
same name. The keys a real peer shares with it (data, model, training, gossip, algorithm, attack)
come from `p2pfl.settings.LearningSettings`, which `p2pfl peer`'s settings extend too. Loading is
strict: an unknown key, a wrong type or a bad value raises `ConfigError` naming the key and the
allowed values, before any work starts. Precedence: dataclass defaults < the embedded default file
(when no file is given) or the user's file < command-line overrides. For dfedavg/dfedavgm/dfedsam,
`algorithm` presets `rho` and `momentum`: they stay None unless given, and resolve to the preset's
value (then 0) only when read through `local_update()`/`train_config()`, so a key set anywhere (file
or flag) wins over any preset, and `dataclasses.replace(s, algorithm=...)` re-applies.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from p2pfl import config
from p2pfl.errors import ConfigError
from p2pfl.gossip.topology import parse_topology
from p2pfl.settings import LearningSettings
from p2pfl.sim.cast import check_scenario
from p2pfl.sim.faults import FAULT_KEYS, check_faults, fault_entries

ENGINES = ("inproc", "procs")   # one process (memory transport, virtual time); real peer processes
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")
MAX_PEERS = 10_000              # config checks build the n x n overlay (100 MB here); far more would exhaust memory


@dataclass(frozen=True)
class Scenario(LearningSettings):
    """A simulation: the keys every peer shares (`LearningSettings`: data, model, training, gossip,
    algorithm, attack) plus the run's own."""

    name: str = "scenario"
    peers: int = 16
    topology: str = "ring"
    engine: str = "inproc"
    step_timeout_s: float = 30.0
    # memory network impairments (virtual time)
    latency_ms: float = 0.0
    loss: float = 0.0
    wire: bool = False          # run every frame through the real codec (signing included)
    centralized: bool = True    # also train the centralized reference
    # Byzantine peers: how many, and where (p2pfl.sim.cast)
    attackers: float | tuple[int, ...] = 0.0   # a fraction in [0, 1) drawn with `seed`, or peer indices
    # faults, procs engine only (p2pfl.sim.faults): kill = [{peer = 3, at_round = 5, restart_after_s = 10}]
    kill: tuple[dict[str, Any], ...] = ()
    delay: tuple[dict[str, Any], ...] = ()     # delay = {peer = 2, ms = 200} (or a list of such tables)

    def __post_init__(self) -> None:
        if not 2 <= self.peers <= MAX_PEERS:
            raise ConfigError(f"peers: must be in [2, {MAX_PEERS}], got {self.peers}")
        if not _NAME.fullmatch(self.name):
            raise ConfigError(f"name: {self.name!r} must be 1-64 letters, digits, '.', '_' or '-', not starting "
                              "with '.' (it names the output folder)")
        super().__post_init__()
        if not 0 < self.step_timeout_s < math.inf:
            raise ConfigError(f"step_timeout_s: must be > 0 and finite, got {self.step_timeout_s}")
        parse_topology(self.topology)
        if self.engine not in ENGINES:
            raise ConfigError(f"engine: unknown value {self.engine!r}; allowed: {', '.join(ENGINES)}")
        check_scenario(self)  # attackers and their params; the rule against the overlay's degree
        if not 0 <= self.latency_ms < math.inf or not 0 <= self.loss < 1:
            raise ConfigError(f"latency_ms must be >= 0 and finite, loss in [0, 1); got {self.latency_ms}, {self.loss}")
        check_faults(self)   # kill, delay, and what the procs engine cannot run

    def to_dict(self) -> dict[str, Any]:
        """The scenario as run (presets resolved), one JSON-able value per key."""
        values = {**dataclasses.asdict(self), **self.local_update()}
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in values.items()}


def _special(key: str, value: Any) -> Any:
    if key == "attackers" and isinstance(value, (list, tuple)):  # peer indices (else a fraction)
        return config.coerce(_AttackerList, "attackers", value)
    if key in FAULT_KEYS:
        return fault_entries(key, value)
    return NotImplemented


@dataclass(frozen=True)
class _AttackerList:
    attackers: tuple[int, ...]


def build(values: dict[str, Any], source: str = "scenario") -> Scenario:
    return config.build(Scenario, values, source, _special)


def load(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Scenario:
    """The scenario in `path` (the embedded default if None), with `overrides` applied on top."""
    if path is None:
        source = "default scenario"
        values = config.parse_toml(resources.files("p2pfl.sim").joinpath("default.toml").read_text(), source)
    else:
        source = str(path)
        values = config.read_toml(path, "scenario file")
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return build(values, source)
