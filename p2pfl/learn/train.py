"""Local training: SGD and SAM (DFedSAM's local step), and evaluation.

Theory of operation: a `LocalTrainer` owns one peer's optimizer state (momentum buffers survive
across rounds) and runs the local part of a round: K steps, or E epochs of mini-batches drawn
from the peer's data with the peer's own torch.Generator, so a run replays exactly from its seed.
It only touches the model's trainable parameters; frozen ones are never perturbed nor updated.
The data is (x, y) tensors on the model's device, or a DataLoader (then its batches, moved to the
device as drawn, and its own order). The loss is `TrainConfig.loss` (cross-entropy by default) and
`evaluate` reports `TrainConfig.metric` (accuracy by default): see `p2pfl.learn.objectives`. The
round's loss is summed on the device and read once a round (one sync, not one per step).

SAM (Foret et al.; the local step of DFedSAM, Shi et al. 2023): for each mini-batch,
    g = grad L(w);  eps = rho * g / ||g||_2 (one norm over all trainable parameters)
    w <- w - lr * grad L(w + eps)       (same batch, gradient taken at the perturbed point)
rho = 0 is plain SGD.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import nn
from torch.utils.data import DataLoader

from p2pfl.errors import ConfigError
from p2pfl.learn.objectives import Loss, Metric, loss_function, metric_function

# A peer's data: (features, targets) tensors, or a DataLoader yielding (features, targets) batches.
Data = Union[tuple[torch.Tensor, torch.Tensor], DataLoader]


@dataclass(frozen=True)
class TrainConfig:
    lr: float = 0.05
    lr_decay: float = 1.0          # lr_t = lr * lr_decay**round (the DFedSAM paper uses 0.998)
    momentum: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 32
    local_epochs: float = 1.0      # used when local_steps is None
    local_steps: int | None = None
    rho: float = 0.0               # SAM radius; 0 = SGD
    max_grad_norm: float | None = None
    loss: Loss = "cross_entropy"   # a name of objectives.LOSSES, an import string, or loss(output, target)
    metric: Metric = "accuracy"    # a name of objectives.METRICS, an import string, or a callable

    def __post_init__(self) -> None:
        loss_function(self.loss)
        metric_function(self.metric)
        finite = math.isfinite
        checks = {   # key: (valid, what is allowed)
            "lr": (self.lr > 0 and finite(self.lr), "> 0 and finite"),
            "lr_decay": (0 < self.lr_decay <= 1, "in (0, 1]"),
            "momentum": (0 <= self.momentum < 1, "in [0, 1)"),
            "weight_decay": (0 <= self.weight_decay < math.inf, ">= 0 and finite"),
            "batch_size": (self.batch_size >= 1, ">= 1"),
            "local_epochs": (0 < self.local_epochs < math.inf, "> 0 and finite"),
            "rho": (0 <= self.rho < math.inf, ">= 0 and finite (0: plain SGD)"),
            "local_steps": (self.local_steps is None or self.local_steps >= 1, ">= 1 (or unset: local_epochs)"),
            "max_grad_norm": (self.max_grad_norm is None or 0 < self.max_grad_norm < math.inf, "> 0 and finite"),
        }
        for key, (ok, allowed) in checks.items():
            if not ok:
                raise ConfigError(f"{key}: must be {allowed}, got {getattr(self, key)!r}")

    def steps_per_round(self, n_samples: int, batches: int | None = None) -> int:
        """K: `local_steps`, else `local_epochs` passes over the data (`batches` a pass when a
        DataLoader sets the batch size, else n_samples / batch_size)."""
        if self.local_steps is not None:
            return self.local_steps
        per_epoch = batches if batches is not None else n_samples / self.batch_size
        return max(1, math.ceil(self.local_epochs * per_epoch))


# Algorithm presets: the defaults a named algorithm gives to the local-update keys. A key that is set
# explicitly (scenario file, CLI flag) always wins over its preset. Q (gossip_steps) is separate:
# DFedSAM with Q > 1 is DFedSAM-MGS.
ALGORITHMS: dict[str, dict[str, float]] = {
    # DFedAvg (Sun, Li & Wang, "Decentralized Federated Averaging", TPAMI 2022, arXiv 2104.11375):
    # plain local SGD, then gossip.
    "dfedavg": {"rho": 0.0, "momentum": 0.0},
    # DFedAvgM, the same paper's heavy-ball variant. 0.9 is the customary beta; it is also the SGD
    # momentum recalled, unverified, for the DFedSAM paper's runs.
    "dfedavgm": {"rho": 0.0, "momentum": 0.9},
    # DFedSAM (Shi et al., ICML 2023, arXiv 2302.04083), Alg. 1: a plain SGD step at the SAM point.
    # rho 0.05 is davda54/sam's default, used by the public reimplementations (the paper: ~0.01-0.05).
    "dfedsam": {"rho": 0.05, "momentum": 0.0},
}


def algorithm_preset(name: str) -> dict[str, float]:
    """The preset of `name`, a key of ALGORITHMS; ConfigError naming the allowed values otherwise."""
    if name not in ALGORITHMS:
        raise ConfigError(f"algorithm: unknown value {name!r}; allowed: {', '.join(ALGORITHMS)}")
    return dict(ALGORITHMS[name])


def algorithm_name(rho: float, momentum: float, gossip_steps: int = 1) -> str:
    """The name of what a configuration runs, e.g. 'dfedsam-mgs' for rho > 0 and Q > 1."""
    name = "dfedsam" if rho > 0 else "dfedavgm" if momentum > 0 else "dfedavg"
    return f"{name}-mgs" if gossip_steps > 1 else name


@dataclass(frozen=True)
class TrainStats:
    loss: float
    steps: int


def peer_seed(seed: int, peer: int) -> int:
    """Peer `peer`'s own seed in a run seeded `seed` (its batch order, its loader's shuffling): the
    same in every driver (simulator, peer processes, benchmarks), so they replay one another."""
    return seed * 100_003 + peer


class LocalTrainer:
    """SGD (rho=0) or SAM (rho>0) over a peer's local tensors, or over the batches of a DataLoader
    (`x` the loader, `y` None): the loader then decides batch size and order, so a resumed run does
    not replay its batches exactly as a tensor one does."""

    def __init__(self, model: nn.Module, x: torch.Tensor | DataLoader, y: torch.Tensor | None, config: TrainConfig,
                 generator: torch.Generator) -> None:
        self.loader: DataLoader | None = x if isinstance(x, DataLoader) else None
        self.x: torch.Tensor | None = None if isinstance(x, DataLoader) else x
        self.y = y
        if self.loader is not None:
            if config.local_steps is None and not _has_len(self.loader):
                raise ConfigError("local_steps: a DataLoader without a length (an IterableDataset) needs "
                                  "local_steps, not local_epochs")
        elif y is None or len(x) == 0:
            raise ConfigError("a peer needs at least one training sample (x and y)")
        self.model, self.config, self.generator = model, config, generator
        self.loss_fn = loss_function(config.loss)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.device = self.params[0].device if self.params else torch.device("cpu")
        self.optimizer = torch.optim.SGD(self.params, lr=config.lr, momentum=config.momentum,
                                         weight_decay=config.weight_decay)
        self._order = torch.empty(0, dtype=torch.long)
        self._cursor = 0
        self._batches: Any = None   # the loader's running iterator

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.loader is not None:
            return self._next_loader_batch()
        assert self.x is not None and self.y is not None
        n, b = len(self.x), min(self.config.batch_size, len(self.x))
        if self._cursor + b > len(self._order):     # new epoch: reshuffle with the peer's generator
            self._order = torch.randperm(n, generator=self.generator)
            self._cursor = 0
        idx = self._order[self._cursor:self._cursor + b]
        self._cursor += b
        return self.x[idx.to(self.x.device)], self.y[idx.to(self.y.device)]

    def _next_loader_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.loader is not None
        for fresh in (False, True):
            if self._batches is None or fresh:
                self._batches = iter(self.loader)
            try:
                xb, yb = next(self._batches)
            except StopIteration:
                continue
            # to the model's device; non_blocking: a pinned batch copies while the last step runs
            return xb.to(self.device, non_blocking=True), yb.to(self.device, non_blocking=True)
        raise ConfigError("the training DataLoader yields no batch")

    def _loss(self, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self.model(xb), yb)

    def train_round(self, round_: int) -> TrainStats:
        cfg = self.config
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr * cfg.lr_decay ** round_
        self.model.train()
        steps = cfg.steps_per_round(len(self.x), None) if self.x is not None else \
            cfg.steps_per_round(0, len(self.loader) if self.loader is not None and _has_len(self.loader) else None)
        total = torch.zeros((), device=self.device)   # summed on the device: one sync a round, not a step
        for _ in range(steps):
            xb, yb = self._next_batch()
            self.optimizer.zero_grad(set_to_none=True)
            loss = self._loss(xb, yb)
            loss.backward()
            if cfg.rho > 0:
                self._sam_second_pass(xb, yb)
            if cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
            self.optimizer.step()
            total += loss.detach()
        return TrainStats(loss=float(total) / steps, steps=steps)

    def _sam_second_pass(self, xb: torch.Tensor, yb: torch.Tensor) -> None:
        """Replace the gradients with the gradient at w + eps, eps = rho * g / ||g||."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        scale = self.config.rho / (norm + 1e-12)
        eps = [g * scale for g in grads]
        with torch.no_grad():
            for p, e in zip(self.params, eps):
                p.add_(e)
        self.optimizer.zero_grad(set_to_none=True)
        self._loss(xb, yb).backward()
        with torch.no_grad():
            for p, e in zip(self.params, eps):
                p.sub_(e)


def unpack(data: Data) -> tuple[Any, Any]:
    """(x, y) tensors, or (loader, None): the positional form `LocalTrainer` and `evaluate` take."""
    return (data, None) if isinstance(data, DataLoader) else (data[0], data[1])


def _has_len(loader: Any) -> bool:
    try:
        len(loader)
    except TypeError:
        return False
    return True


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor | DataLoader, y: torch.Tensor | None = None, batch_size: int = 4096,
             *, loss: Loss = "cross_entropy", metric: Metric = "accuracy") -> tuple[float, float]:
    """(metric, mean loss) of `model` on (x, y) tensors, or on the batches of a DataLoader `x`.
    The defaults are classification accuracy and cross-entropy."""
    loss_fn, metric_fn = loss_function(loss), metric_function(metric)
    model.train(False)  # evaluation mode (dropout off, norm layers use their statistics)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if isinstance(x, DataLoader):
        batches: Any = ((xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)) for xb, yb in x)
    else:
        assert y is not None
        batches = ((x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size))
    score, count, total = 0.0, 0, torch.zeros((), device=device)
    for xb, yb in batches:
        out = model(xb)
        total += loss_fn(out, yb) * len(yb)
        part, n = metric_fn(out, yb)
        score, count = score + float(part), count + int(n)
    return score / max(1, count), float(total) / max(1, count)
