"""Scenarios: what a simulation runs, from a TOML file, the embedded default, and CLI overrides.

Theory of operation: a `Scenario` is a flat, frozen dataclass; every field is a TOML key with the
same name. Loading is strict: an unknown key, a wrong type or a bad value raises `ConfigError`
naming the key and the allowed values, before any work starts. Precedence: dataclass defaults <
the embedded default file (when no file is given) or the user's file < command-line overrides.
`algorithm` is a preset, not a value: `rho` and `momentum` stay None unless given, and resolve to
the preset's value (then 0) only when read through `local_update()`/`train_config()`, so a key set
anywhere (file or flag) wins over any preset, and `dataclasses.replace(s, algorithm=...)` re-applies.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from p2pfl import algorithms, config
from p2pfl.errors import ConfigError
from p2pfl.gossip.topology import parse_topology
from p2pfl.learn.models import MODELS
from p2pfl.learn.partition import parse_partition
from p2pfl.learn.train import TrainConfig, algorithm_name
from p2pfl.robust import RULES
from p2pfl.sim.cast import check_scenario
from p2pfl.sim.faults import FAULT_KEYS, check_faults, fault_entries

DATASETS = ("digits", "mnist1d", "synthetic", "npz:PATH")
ENGINES = ("inproc", "procs")   # one process (memory transport, virtual time); real peer processes
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")
MAX_PEERS = 10_000              # config checks build the n x n overlay (100 MB here); far more would exhaust memory


@dataclass(frozen=True)
class Scenario:
    name: str = "scenario"
    peers: int = 16
    rounds: int = 30
    topology: str = "ring"
    dataset: str = "digits"
    partition: str = "dirichlet:0.5"
    model: str = "mlp"
    hidden: tuple[int, ...] = (64,)
    seed: int = 0
    engine: str = "inproc"
    # local training (see p2pfl.learn.train.TrainConfig)
    algorithm: str | None = None  # a registered algorithm (p2pfl.algorithms); None: dfedavg, named by rho/momentum
    algorithm_params: dict[str, Any] = field(default_factory=dict)   # its own parameters, checked by the registry
    plugins: tuple[str, ...] = ()  # modules (or .py files) to import first: they register more algorithms
    lr: float = 0.2
    lr_decay: float = 1.0
    momentum: float | None = None  # None: the algorithm's preset (0 without one)
    weight_decay: float = 0.0
    batch_size: int = 16
    local_epochs: float = 2.0
    local_steps: int | None = None
    rho: float | None = None       # SAM radius; None: the algorithm's preset (0 without one)
    # gossip and aggregation
    gossip_steps: int = 1
    aggregator: str = "mixing"
    aggregator_params: dict[str, Any] = field(default_factory=dict)
    f: int = 0
    step_timeout_s: float = 30.0
    # memory network impairments (virtual time)
    latency_ms: float = 0.0
    loss: float = 0.0
    wire: bool = False          # run every frame through the real codec (signing included)
    eval_every: int = 1
    centralized: bool = True    # also train the centralized reference
    # Byzantine peers (p2pfl.peers.attacker; the crafting math is p2pfl.robust.attacks)
    attack: str = "none"
    attackers: float | tuple[int, ...] = 0.0   # a fraction in [0, 1) drawn with `seed`, or peer indices
    attack_params: dict[str, Any] = field(default_factory=dict)
    # faults, procs engine only (p2pfl.sim.procs): kill = [{peer = 3, at_round = 5, restart_after_s = 10}]
    kill: tuple[dict[str, Any], ...] = ()
    delay: tuple[dict[str, Any], ...] = ()     # delay = {peer = 2, ms = 200} (or a list of such tables)

    def __post_init__(self) -> None:
        if not 2 <= self.peers <= MAX_PEERS:
            raise ConfigError(f"peers: must be in [2, {MAX_PEERS}], got {self.peers}")
        if self.seed < 0:   # numpy's generators take no negative seed
            raise ConfigError(f"seed: must be >= 0, got {self.seed}")
        if self.rounds < 1:
            raise ConfigError(f"rounds: must be >= 1, got {self.rounds}")
        if not _NAME.fullmatch(self.name):
            raise ConfigError(f"name: {self.name!r} must be 1-64 letters, digits, '.', '_' or '-', not starting "
                              "with '.' (it names the output folder)")
        for key in ("gossip_steps", "eval_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.f < 0:
            raise ConfigError(f"f: must be >= 0, got {self.f}")
        if not 0 < self.step_timeout_s < math.inf:
            raise ConfigError(f"step_timeout_s: must be > 0 and finite, got {self.step_timeout_s}")
        if not self.hidden or any(h < 1 for h in self.hidden):
            raise ConfigError(f"hidden: layer widths must be >= 1, got {list(self.hidden)}")
        parse_topology(self.topology)
        parse_partition(self.partition)
        if not (self.dataset in DATASETS[:3] or self.dataset.startswith("npz:")):
            raise ConfigError(f"dataset: unknown value {self.dataset!r}; allowed: {', '.join(DATASETS)}")
        if self.model not in MODELS:
            raise ConfigError(f"model: unknown value {self.model!r}; allowed: {', '.join(MODELS)}")
        if self.engine not in ENGINES:
            raise ConfigError(f"engine: unknown value {self.engine!r}; allowed: {', '.join(ENGINES)}")
        if self.aggregator not in RULES:
            raise ConfigError(f"aggregator: unknown value {self.aggregator!r}; allowed: {', '.join(sorted(RULES))}")
        algorithms.load_plugins(self.plugins)
        algorithms.params(self.algorithm or "dfedavg", self.algorithm_params)
        check_scenario(self)  # attack, attackers, attack_params; the rule against the overlay's degree
        if not 0 <= self.latency_ms < math.inf or not 0 <= self.loss < 1:
            raise ConfigError(f"latency_ms must be >= 0 and finite, loss in [0, 1); got {self.latency_ms}, {self.loss}")
        self.train_config()  # validates the training keys (and the algorithm name)
        check_faults(self)   # kill, delay, and what the procs engine cannot run

    def local_update(self) -> dict[str, float]:
        """rho and momentum as run: an explicit key wins over the algorithm's preset, which wins over 0."""
        preset = algorithms.get(self.algorithm).train_preset if self.algorithm is not None else {}
        given = {"rho": self.rho, "momentum": self.momentum}
        return {k: v if v is not None else preset.get(k, 0.0) for k, v in given.items()}

    @property
    def algorithm_name(self) -> str:
        """The declared algorithm, or the name of what the keys run (dfedavg, dfedavgm, dfedsam)."""
        u = self.local_update()
        return self.algorithm or algorithm_name(u["rho"], u["momentum"])

    def train_config(self) -> TrainConfig:
        return TrainConfig(lr=self.lr, lr_decay=self.lr_decay, weight_decay=self.weight_decay,
                           batch_size=self.batch_size, local_epochs=self.local_epochs,
                           local_steps=self.local_steps, **self.local_update())

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
