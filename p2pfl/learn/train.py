"""Local training: SGD and SAM (DFedSAM's local step), and evaluation.

Theory of operation: a `LocalTrainer` owns one peer's optimizer state (momentum buffers survive
across rounds) and runs the local part of a round: K steps, or E epochs of mini-batches drawn
from the peer's data with the peer's own torch.Generator, so a run replays exactly from its seed.
It only touches the model's trainable parameters; frozen ones are never perturbed nor updated.

SAM (Foret et al.; the local step of DFedSAM, Shi et al. 2023): for each mini-batch,
    g = grad L(w);  eps = rho * g / ||g||_2 (one norm over all trainable parameters)
    w <- w - lr * grad L(w + eps)       (same batch, gradient taken at the perturbed point)
rho = 0 is plain SGD.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from p2pfl.errors import ConfigError


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

    def __post_init__(self) -> None:
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

    def steps_per_round(self, n_samples: int) -> int:
        if self.local_steps is not None:
            return self.local_steps
        return max(1, math.ceil(self.local_epochs * n_samples / self.batch_size))


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


class LocalTrainer:
    """SGD (rho=0) or SAM (rho>0) over a peer's local tensors."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: TrainConfig,
                 generator: torch.Generator) -> None:
        if len(x) == 0:
            raise ConfigError("a peer needs at least one training sample")
        self.model, self.x, self.y, self.config, self.generator = model, x, y, config, generator
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(self.params, lr=config.lr, momentum=config.momentum,
                                         weight_decay=config.weight_decay)
        self._order = torch.empty(0, dtype=torch.long)
        self._cursor = 0

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        n, b = len(self.x), min(self.config.batch_size, len(self.x))
        if self._cursor + b > len(self._order):     # new epoch: reshuffle with the peer's generator
            self._order = torch.randperm(n, generator=self.generator)
            self._cursor = 0
        idx = self._order[self._cursor:self._cursor + b]
        self._cursor += b
        return self.x[idx.to(self.x.device)], self.y[idx.to(self.y.device)]

    def _loss(self, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.model(xb), yb)

    def train_round(self, round_: int) -> TrainStats:
        cfg = self.config
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr * cfg.lr_decay ** round_
        self.model.train()
        steps = cfg.steps_per_round(len(self.x))
        total = 0.0
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
            total += loss.item()
        return TrainStats(loss=total / steps, steps=steps)

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


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 4096) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of `model` on (x, y)."""
    model.train(False)  # evaluation mode (dropout off, norm layers use their statistics)
    correct, loss = 0, 0.0
    for i in range(0, len(x), batch_size):
        logits = model(x[i:i + batch_size])
        loss += F.cross_entropy(logits, y[i:i + batch_size], reduction="sum").item()
        correct += int((logits.argmax(1) == y[i:i + batch_size]).sum())
    return correct / max(1, len(x)), loss / max(1, len(x))
