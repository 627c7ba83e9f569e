"""The keys a simulated scenario and a real peer share: data, model, training, gossip, algorithm, attack.

Theory of operation: `LearningSettings` is a frozen dataclass whose fields are TOML keys (and CLI
flags with dashes). `p2pfl.sim.scenario.Scenario` and `p2pfl.peers.settings.PeerSettings` both extend
it with their own keys (a scenario's peers, topology and faults; a peer's addresses, files and
ports), so a key means the same thing, has the same default and is checked the same way in both,
and the multi-process engine hands a scenario's shared keys to its peers unchanged (`shared()`).
Each field's `help` metadata is its flag's help: `p2pfl sim` and `p2pfl peer` derive these flags
from this class.
The algorithm's own parameters (`algorithm_params`) are checked by the algorithm registry, after
`plugins` have been imported; the robust rule's (`aggregator_params`) by `p2pfl.robust`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from p2pfl import algorithms
from p2pfl.algorithms import reputation
from p2pfl.errors import ConfigError
from p2pfl.learn import backbone
from p2pfl.learn.models import MODELS
from p2pfl.learn.objectives import LOSSES, METRICS, is_import_string, loss_function, metric_function, resolve
from p2pfl.learn.partition import parse_partition
from p2pfl.learn.train import TrainConfig, algorithm_name
from p2pfl.robust import RULES
from p2pfl.robust import attacks as craft

DATASETS = ("digits", "mnist1d", "synthetic", "npz:PATH")


@dataclass(frozen=True)
class LearningSettings:
    rounds: int = field(default=30, metadata={"help": "rounds to run"})
    # data and model
    dataset: str = field(default="digits", metadata={
        "help": "digits, mnist1d, synthetic, npz:PATH, or 'pkg.module:loader' (your own: loader(shard, num_shards, "
                "seed) returning (train, test))"})
    partition: str = field(default="dirichlet:0.5", metadata={"help": "iid, dirichlet:ALPHA, classes:K"})
    seed: int = field(default=0, metadata={"help": "seed of the data split, the initial model and the rest (the "
                                                   "same on every peer of a federation)"})
    model: str = field(default="mlp", metadata={"help": "mlp, cnn, or 'pkg.module:factory' (your own nn.Module)"})
    hidden: tuple[int, ...] = field(default=(64,), metadata={"help": "hidden layer widths, e.g. 64,32"})
    backbone: str | None = field(default=None, metadata={
        "help": "pre-trained backbone file (p2pfl backbone pretrain): frozen, only the output layer is trained and "
                "gossiped; its public data is held out from every peer"})
    # the algorithm (p2pfl.algorithms); None: dfedavg, named in results by what rho/momentum run
    algorithm: str | None = field(default=None, metadata={"help": "algorithm"})
    algorithm_params: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "the algorithm's own parameters as a JSON object (checked by its registry entry)"})
    plugins: tuple[str, ...] = field(default=(), metadata={
        "help": "module or .py file that registers more algorithms (repeatable)"})
    # reputation (p2pfl.algorithms.reputation): wraps the algorithm; the drivers rewire on its advice
    reputation: bool = field(default=False, metadata={"help": "RFFL reputation per neighbour, removal and rewiring"})
    reputation_params: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "alpha, beta, gamma, fair_rewards, removal_rounds, min_degree, grace_rounds as a JSON object"})
    # local training (p2pfl.learn.train.TrainConfig)
    lr: float = field(default=0.2, metadata={"help": "local learning rate"})
    lr_decay: float = field(default=1.0, metadata={"help": "lr at round t is lr * lr_decay**t"})
    momentum: float | None = field(default=None, metadata={"help": "local SGD momentum; wins over the preset"})
    weight_decay: float = field(default=0.0, metadata={"help": "local SGD weight decay"})
    batch_size: int = field(default=16, metadata={"help": "mini-batch size"})
    local_epochs: float = field(default=2.0, metadata={"help": "local epochs per round"})
    local_steps: int | None = field(default=None, metadata={"help": "local steps per round (overrides epochs)"})
    rho: float | None = field(default=None, metadata={"help": "SAM radius (0 = SGD); wins over the preset"})
    # not `loss`: a scenario's `loss` is the memory network's packet loss
    loss_fn: str = field(default="cross_entropy", metadata={
        "help": f"training loss: {', '.join(LOSSES)}, or 'pkg.module:fn' (fn(output, target) returning a scalar)"})
    metric: str = field(default="accuracy", metadata={
        "help": f"test metric: {', '.join(METRICS)}, or 'pkg.module:fn' (fn(output, target) returning (total, count))"})
    # gossip and aggregation
    gossip_steps: int = field(default=1, metadata={"help": "gossip steps Q per round (Q > 1: -MGS)"})
    aggregator: str = field(default="mixing", metadata={"help": "aggregation rule (mixing: Metropolis-Hastings)"})
    aggregator_params: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "the rule's parameters as a JSON object, e.g. '{\"tau\": 1.0}'"})
    f: int = field(default=0, metadata={"help": "Byzantine inputs the aggregation rule must tolerate"})
    eval_every: int = field(default=1, metadata={"help": "evaluate every k rounds (and at the last)"})
    # Byzantine peers (p2pfl.peers.attacker; the crafting math is p2pfl.robust.attacks)
    attack: str = field(default="none", metadata={"help": "attack (of the Byzantine peers)"})
    attack_params: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "the attack's parameters as a JSON object, e.g. '{\"sigma\": 10}'"})

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
        if is_import_string(self.dataset):
            resolve(self.dataset, "dataset")   # imported now: a typo fails before any work
        elif not (self.dataset in DATASETS[:3] or self.dataset.startswith("npz:")):
            raise ConfigError(f"dataset: unknown value {self.dataset!r}; allowed: {', '.join(DATASETS)}, "
                              "or 'pkg.module:loader'")
        if is_import_string(self.model):
            resolve(self.model, "model")
        elif self.model not in MODELS:
            raise ConfigError(f"model: unknown value {self.model!r}; allowed: {', '.join(MODELS)}, "
                              "or 'pkg.module:factory'")
        loss_function(self.loss_fn, "loss_fn")
        metric_function(self.metric)
        if self.aggregator not in RULES:
            raise ConfigError(f"aggregator: unknown value {self.aggregator!r}; allowed: {', '.join(sorted(RULES))}")
        if self.backbone is not None:   # read and verified once per process (cached)
            backbone.load(self.backbone).check(self.dataset, self.model, self.hidden, self.seed)
        elif self.algorithm == "bristle":
            raise ConfigError("backbone: algorithm 'bristle' trains only the output layer; name a pre-trained "
                              "backbone file (make one with `p2pfl backbone pretrain`)")
        algorithms.load_plugins(self.plugins)
        algorithms.params(self.algorithm_or_default, self.algorithm_params)
        self.reputation_settings()
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

    def reputation_settings(self) -> dict[str, Any] | None:
        """The reputation parameters as run (None: off); ConfigError naming the key."""
        if not self.reputation:
            if self.reputation_params:
                raise ConfigError("reputation_params: given, but reputation = false")
            return None
        return dataclasses.asdict(reputation.params(self.reputation_params))

    def train_config(self) -> TrainConfig:
        return TrainConfig(lr=self.lr, lr_decay=self.lr_decay, weight_decay=self.weight_decay,
                           batch_size=self.batch_size, local_epochs=self.local_epochs,
                           local_steps=self.local_steps, loss=self.loss_fn, metric=self.metric, **self.local_update())

    def attack_settings(self) -> dict[str, Any]:
        """The attack's parameters completed with their defaults ({} for none); ConfigError naming the key."""
        if self.attack == "none":
            if self.attack_params:
                raise ConfigError("attack_params: given, but attack = 'none'")
            return {}
        if self.attack not in craft.ATTACKS:
            raise ConfigError(f"attack: unknown value {self.attack!r}; allowed: none, {', '.join(sorted(craft.ATTACKS))}")
        params = craft.check_attack(self.attack, self.attack_params)
        algorithms.check_attack(self.algorithm_or_default, self.attack)
        return params

    def shared(self) -> dict[str, Any]:
        """The shared keys, as given (None: not set), e.g. for the peers of a multi-process run."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(LearningSettings)}
