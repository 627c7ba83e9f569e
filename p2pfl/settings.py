"""The keys a simulated scenario and a real peer share: data, model, training, gossip, algorithm, attack.

Theory of operation: `LearningSettings` is a frozen dataclass whose fields are TOML keys (and CLI
flags with dashes). `p2pfl.sim.scenario.Scenario` and `p2pfl.peers.settings.PeerSettings` both extend
it with their own keys (a scenario's peers, topology and faults; a peer's addresses, files and
ports), so a key means the same thing, has the same default and is checked the same way in both,
and the multi-process engine hands a scenario's shared keys to its peers unchanged (`shared()`).
The algorithm's own parameters (`algorithm_params`) are checked by the algorithm registry, after
`plugins` have been imported; the robust rule's (`aggregator_params`) by `p2pfl.robust`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from p2pfl import algorithms
from p2pfl.errors import ConfigError
from p2pfl.learn.models import MODELS
from p2pfl.learn.partition import parse_partition
from p2pfl.learn.train import TrainConfig, algorithm_name
from p2pfl.robust import RULES
from p2pfl.robust import attacks as craft

DATASETS = ("digits", "mnist1d", "synthetic", "npz:PATH")


@dataclass(frozen=True)
class LearningSettings:
    rounds: int = 30
    # data and model
    dataset: str = "digits"
    partition: str = "dirichlet:0.5"
    seed: int = 0                  # everything random; the same on every peer of a federation
    model: str = "mlp"
    hidden: tuple[int, ...] = (64,)
    # the algorithm (p2pfl.algorithms); None: dfedavg, named in results by what rho/momentum run
    algorithm: str | None = None
    algorithm_params: dict[str, Any] = field(default_factory=dict)   # its own parameters, checked by the registry
    plugins: tuple[str, ...] = ()  # modules (or .py files) to import first: they register more algorithms
    # local training (p2pfl.learn.train.TrainConfig)
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
    eval_every: int = 1
    # Byzantine peers (p2pfl.peers.attacker; the crafting math is p2pfl.robust.attacks)
    attack: str = "none"
    attack_params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.seed < 0:   # numpy's generators take no negative seed
            raise ConfigError(f"seed: must be >= 0, got {self.seed}")
        for key in ("rounds", "gossip_steps", "eval_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.f < 0:
            raise ConfigError(f"f: must be >= 0, got {self.f}")
        if not self.hidden or any(h < 1 for h in self.hidden):
            raise ConfigError(f"hidden: layer widths must be >= 1, got {list(self.hidden)}")
        parse_partition(self.partition)
        if not (self.dataset in DATASETS[:3] or self.dataset.startswith("npz:")):
            raise ConfigError(f"dataset: unknown value {self.dataset!r}; allowed: {', '.join(DATASETS)}")
        if self.model not in MODELS:
            raise ConfigError(f"model: unknown value {self.model!r}; allowed: {', '.join(MODELS)}")
        if self.aggregator not in RULES:
            raise ConfigError(f"aggregator: unknown value {self.aggregator!r}; allowed: {', '.join(sorted(RULES))}")
        algorithms.load_plugins(self.plugins)
        algorithms.params(self.algorithm_or_default, self.algorithm_params)
        self.train_config()   # the training keys (and the algorithm's presets)
        self.attack_settings()

    @property
    def algorithm_or_default(self) -> str:
        """The registered algorithm that runs."""
        return self.algorithm or "dfedavg"

    @property
    def algorithm_name(self) -> str:
        """The declared algorithm, or the name of what the keys run (dfedavg, dfedavgm, dfedsam)."""
        u = self.local_update()
        return self.algorithm or algorithm_name(u["rho"], u["momentum"])

    def local_update(self) -> dict[str, float]:
        """rho and momentum as run: an explicit key wins over the algorithm's preset, which wins over 0."""
        preset = algorithms.get(self.algorithm).train_preset if self.algorithm is not None else {}
        given = {"rho": self.rho, "momentum": self.momentum}
        return {k: v if v is not None else preset.get(k, 0.0) for k, v in given.items()}

    def train_config(self) -> TrainConfig:
        return TrainConfig(lr=self.lr, lr_decay=self.lr_decay, weight_decay=self.weight_decay,
                           batch_size=self.batch_size, local_epochs=self.local_epochs,
                           local_steps=self.local_steps, **self.local_update())

    def attack_settings(self) -> dict[str, Any]:
        """The attack's parameters completed with their defaults ({} for none); ConfigError naming the key."""
        if self.attack == "none":
            if self.attack_params:
                raise ConfigError("attack_params: given, but attack = 'none'")
            return {}
        if self.attack not in craft.ATTACKS:
            raise ConfigError(f"attack: unknown value {self.attack!r}; allowed: none, {', '.join(sorted(craft.ATTACKS))}")
        return craft.check_attack(self.attack, self.attack_params)

    def shared(self) -> dict[str, Any]:
        """The shared keys, as given (None: not set), e.g. for the peers of a multi-process run."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(LearningSettings)}
