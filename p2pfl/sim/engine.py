"""The in-process engine: every peer of a scenario in one trio loop, over the memory transport.

Theory of operation: the engine builds the data shards, the topology and its Metropolis-Hastings
matrix W, one `Peer` per node (all starting from the same initial model, as in DFedAvg), and runs
them concurrently under trio's MockClock: virtual time only moves when every peer is blocked, so
step deadlines and injected latencies cost no wall time, and a slow CPU never makes a deadline
fire. Everything random derives from the scenario seed (data split, graph, initial weights,
mini-batch order, losses), so the same seed gives the same accuracies.

The engine watches the peers through their events: when every peer has finished round t it
computes the exact consensus distance (1/n) sum_i ||x_i - x_bar||^2 and the accuracy spread, logs
them and moves the progress bar.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
import math
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import trio
import trio.testing
from torch.utils.data import DataLoader

from p2pfl.algorithms import reputation
from p2pfl.files import MetricsLog, write_json
from p2pfl.gossip.identity import Identity
from p2pfl.gossip.topology import build_topology, metropolis_hastings, neighbors, spectral_gap
from p2pfl.learn import backbone
from p2pfl.learn.custom import UserData, build_model, check_fit, load_user_data
from p2pfl.learn.datasets import Dataset, load_dataset
from p2pfl.learn.objectives import is_import_string, loss_function
from p2pfl.learn.train import Data, LocalTrainer, evaluate, peer_seed, unpack
from p2pfl.peers.memory import MemoryNetwork
from p2pfl.peers.peer import Peer, PeerConfig
from p2pfl.peers.preflight import make_out_dir
from p2pfl.sim import cast as attacks
from p2pfl.sim.reputation_plots import write_figures
from p2pfl.sim.results import accuracy_table, consensus_distance, plot_accuracy, plot_consensus, read_events
from p2pfl.sim.rewire import Rewirer
from p2pfl.sim.scenario import Scenario

Progress = Callable[[int, dict[str, Any]], None]


@dataclass
class Setup:
    """Everything a run needs, built deterministically from the scenario. A built-in dataset is
    `data`, split into `shards` by `partition`; a user's loader (`dataset = "pkg.module:loader"`) is
    called once per peer and its shards are `user_train` (every peer is evaluated on shard 0's test)."""

    scenario: Scenario
    data: Dataset | None
    shards: list[np.ndarray]
    adjacency: np.ndarray
    W: np.ndarray
    identities: list[Identity]
    init: torch.nn.Module
    num_classes: int | None = None
    user_train: list[Data] | None = None
    user_test: Data | None = None
    reference: tuple[torch.Tensor, torch.Tensor] | None = None   # the backbone's public part (Context.reference_data)

    @classmethod
    def build(cls, s: Scenario) -> Setup:
        rng = np.random.default_rng(s.seed)
        data: Dataset | None = None
        shards: list[np.ndarray] = []
        user: list[UserData] | None = None
        frozen = backbone.load(s.backbone) if s.backbone else None
        if is_import_string(s.dataset):
            user = [load_user_data(s.dataset, i, s.peers, s.seed, batch_size=s.batch_size) for i in range(s.peers)]
            input_shape, num_classes = user[0].input_shape, user[0].num_classes
        else:
            data = load_dataset(s.dataset, seed=s.seed)
            shards = backbone.peer_shards(data.y_train, s.peers, s.partition, rng, frozen)
            input_shape, num_classes = data.input_shape, data.num_classes
        adj = build_topology(s.topology, s.peers, rng)
        seeds = rng.integers(0, 2**63, size=s.peers)
        identities = [Identity.generate(int(x).to_bytes(32, "big")) for x in seeds]
        init = build_model(s.model, input_shape, num_classes, hidden=s.hidden, seed=s.seed)
        if frozen is not None:
            frozen.attach(init)   # only the head stays trainable, so only the head is gossiped
        setup = cls(s, data, shards, adj, metropolis_hastings(adj), identities, init, num_classes,
                    [u.train for u in user] if user else None, user[0].test if user else None,
                    backbone.public_data(data.x_train, data.y_train, frozen) if data is not None else None)
        check_fit(init, setup.train_data(0), loss_function(s.loss_fn), "dataset")
        return setup

    def tensors(self, idx: np.ndarray | None = None, test: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.data is not None, "a built-in dataset's tensors"
        x, y = (self.data.x_test, self.data.y_test) if test else (self.data.x_train, self.data.y_train)
        # indexing copies; the cached dataset arrays are read-only and shared
        x, y = (x[idx], y[idx]) if idx is not None else (x.copy(), y.copy())
        return torch.from_numpy(x), torch.from_numpy(y)

    def train_data(self, i: int) -> Data:
        return self.user_train[i] if self.user_train is not None else self.tensors(self.shards[i])

    def test_data(self) -> Data | None:
        return self.user_test if self.user_train is not None else self.tensors(test=True)

    def union(self) -> Data | None:
        """Every peer's training data in one, for the centralized reference (None: DataLoaders)."""
        if self.user_train is None:
            return self.tensors(np.concatenate(self.shards))
        if any(isinstance(d, DataLoader) for d in self.user_train):
            return None
        pairs = [d for d in self.user_train if isinstance(d, tuple)]
        return torch.cat([x for x, _ in pairs]), torch.cat([y for _, y in pairs])


def centralized_reference(setup: Setup) -> list[float]:
    """The same model and trainer on the union of the peers' data; the test metric after each round
    (none when the peers' data are DataLoaders, or there is no test data)."""
    union = setup.union()
    return [] if union is None else train_alone(setup, union, setup.scenario.seed)


def train_alone(setup: Setup, data: Data, seed: int) -> list[float]:
    """The run's initial model and trainer on `data` alone, for the scenario's rounds, its batches
    drawn with `seed` (peer i's: `peer_seed(s.seed, i)`); the test metric after each round (none
    without test data)."""
    s = setup.scenario
    test = setup.test_data()
    if test is None:
        return []
    model = copy.deepcopy(setup.init)
    trainer = LocalTrainer(model, *unpack(data), s.train_config(), torch.Generator().manual_seed(seed))
    curve = []
    for t in range(s.rounds):
        trainer.train_round(t)
        curve.append(evaluate(model, *unpack(test), loss=s.loss_fn, metric=s.metric)[0])
    return curve


class _RoundWatcher:
    """Collects per-peer round events; when a round is complete across peers, summarises it."""

    def __init__(self, peers: list[Peer], log: MetricsLog, progress: Progress | None,
                 honest: set[int] | None = None) -> None:
        self.peers, self.log, self.progress = peers, log, progress
        self.honest = set(range(len(peers))) if honest is None else honest  # what the summaries cover
        self.index = {p.id: i for i, p in enumerate(peers)}
        self.pending: dict[int, dict[int, tuple[torch.Tensor, dict[str, Any]]]] = {}
        self.rounds: list[dict[str, Any]] = []
        self.last_accuracy: dict[int, float] = {}
        self.on_close: Callable[[int], None] | None = None   # after a round is summarised (rewiring)

    def __call__(self, event: dict[str, Any]) -> None:
        i = self.index[event["peer"]]
        event = {**event, "peer": i}
        self.log.write(event)
        if "accuracy" in event:
            self.last_accuracy[i] = event["accuracy"]
        slot = self.pending.setdefault(event["round"], {})
        slot[i] = (self.peers[i].vector, event)
        if len(slot) == len(self.peers):
            self._close_round(event["round"], self.pending.pop(event["round"]))

    def _close_round(self, t: int, slot: dict[int, tuple[torch.Tensor, dict[str, Any]]]) -> None:
        order = [i for i in sorted(slot) if i in self.honest]
        distance = consensus_distance(torch.stack([slot[i][0] for i in order]), in_place=True)
        # in peer order, not arrival order, so the mean's last bit does not depend on scheduling
        accs = [slot[i][1]["accuracy"] for i in order if "accuracy" in slot[i][1]]
        summary: dict[str, Any] = {"kind": "consensus", "round": t, "distance": distance}
        if accs:
            summary.update(accuracy_mean=float(np.mean(accs)), accuracy_min=float(np.min(accs)),
                           accuracy_max=float(np.max(accs)))
        self.log.write(summary)
        self.log.flush()
        self.rounds.append(summary)
        if self.on_close is not None:
            self.on_close(t)
        if self.progress:
            self.progress(t, summary)


class Interrupted(Exception):
    """SIGINT (Ctrl-C) stopped the run; `summary` (also in summary.json) covers the rounds completed."""

    def __init__(self, summary: dict[str, Any]) -> None:
        super().__init__("interrupted")
        self.summary = summary


async def _stop_on_interrupt(scope: trio.CancelScope, stopped: list[bool]) -> None:
    with trio.open_signal_receiver(signal.SIGINT) as signals:
        async for _ in signals:
            stopped.append(True)
            scope.cancel()
            return


def _rewire(rewirer: Rewirer, log: MetricsLog, t: int) -> None:
    for change in rewirer.round_closed(t):
        log.write({"kind": "rewire", **change})


def run(scenario: Scenario, out_dir: str | Path, progress: Progress | None = None,
        setup: Setup | None = None) -> dict[str, Any]:
    """Run `scenario` in-process; write metrics.jsonl, summary.json, accuracy.png, consensus.png to `out_dir`.
    `setup`: `Setup.build(scenario)` when the caller built it already. SIGINT (on the main thread)
    stops the rounds, writes what the completed ones give and raises `Interrupted`."""
    out = make_out_dir(out_dir)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    wall = time.perf_counter()
    setup = setup or Setup.build(scenario)
    s = scenario
    log = MetricsLog(out / "metrics.jsonl")
    gap = spectral_gap(setup.W)
    nbrs = neighbors(setup.adjacency)
    cast = attacks.Cast.of(s.attack, s.attack_params, attacks.choose_attackers(s.attackers, s.peers, s.seed),
                           [ident.peer_id for ident in setup.identities], nbrs, setup.W, s.aggregator,
                           s.gossip_steps, setup.num_classes)
    honest = set(cast.honest)
    log.write({"kind": "run", "round": -1, "name": s.name, "scenario": s.to_dict(), "honest": cast.honest,
               "byzantine": sorted(cast.byzantine), "attack": s.attack,
               "spectral_gap": gap, "peer_ids": [ident.peer_id for ident in setup.identities],
               **({"overlay": nbrs} if s.reputation else {})})

    network = MemoryNetwork(wire=s.wire, latency_s=s.latency_ms / 1000, loss=s.loss, seed=s.seed)
    test = setup.test_data()
    peers: list[Peer] = []
    config = PeerConfig(train=s.train_config(), algorithm=s.algorithm_or_default,
                        algorithm_params=s.algorithm_params, gossip_steps=s.gossip_steps, aggregator=s.aggregator,
                        aggregator_params=s.aggregator_params, f=s.f, step_timeout_s=s.step_timeout_s,
                        eval_every=s.eval_every, reputation=s.reputation_settings(),
                        # rewiring changes degrees: a rule with too few inputs keeps the own vector
                        check_degree=not s.reputation)
    for i, ident in enumerate(setup.identities):
        weights = {setup.identities[j].peer_id: float(setup.W[i, j]) for j in nbrs[i]}
        peers.append(cast.peer(i, copy.deepcopy(setup.init), setup.train_data(i),
                               transport=network.endpoint(ident), neighbors=weights,
                               config=config.replace(seed=peer_seed(s.seed, i)),
                               test_data=test if i in honest else None, offload=False,
                               settle=trio.testing.wait_all_tasks_blocked, reference_data=setup.reference))
    watcher = _RoundWatcher(peers, log, progress, honest)
    for p in peers:
        p.on_event = watcher
    rewirer = None
    if s.reputation:
        rewirer = Rewirer(peers, setup.adjacency, s.seed, reputation.params(s.reputation_params).min_degree,
                          cast.knowledge, s.aggregator)
        if cast.knowledge is not None:
            cast.knowledge.board.wanted = None   # new neighbourhoods: every honest vector may be needed
        watcher.on_close = functools.partial(_rewire, rewirer, log)
        for p in peers:
            p.before_round = rewirer.before_round

    stopped: list[bool] = []

    async def main() -> None:
        async with contextlib.AsyncExitStack() as stack:
            for p in peers:
                await stack.enter_async_context(p)
            async with trio.open_nursery() as outer:
                if threading.current_thread() is threading.main_thread():   # signals reach only that one
                    outer.start_soon(_stop_on_interrupt, outer.cancel_scope, stopped)
                async with trio.open_nursery() as nursery:
                    for p in peers:
                        nursery.start_soon(p.train, s.rounds)
                outer.cancel_scope.cancel()

    # Each peer's model is small and they run one after another on this loop: torch's intra-op
    # threads only add synchronisation (and spin badly when the cores are busy), so use one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # The setup's hundreds of thousands of objects (models, data) live for the whole run: without
    # this, each full collection during the run re-scans them all (~0.2 s each at 256 peers).
    gc.freeze()
    try:
        train_wall = time.perf_counter()
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
        train_wall = time.perf_counter() - train_wall
        central = centralized_reference(setup) if s.centralized and not stopped else []
    finally:
        gc.unfreeze()
        torch.set_num_threads(threads)
    for t, acc in enumerate(central):
        log.write({"kind": "centralized", "round": t, "accuracy": acc})
    log.close()

    events = read_events(out)
    table = accuracy_table(events, honest)
    if table["rounds"]:
        plot_accuracy(table, out / "accuracy.png", s.name if not cast.byzantine else
                      f"{s.name}: honest peers ({len(cast.byzantine)} {s.attack} attackers)")
    (out / "consensus.png").unlink(missing_ok=True)   # not left from an earlier run when this one has no curve
    plot_consensus(events, out / "consensus.png", s.name)
    write_figures(events, out)
    rejected = dict(sum((Counter(peers[i].rejections()) for i in sorted(honest)), Counter[str]()))
    final = watcher.rounds[-1] if watcher.rounds else {"distance": math.nan}
    summary = {
        "name": s.name, "peers": s.peers, "rounds": s.rounds, "seed": s.seed, "topology": s.topology,
        "dataset": s.dataset, "partition": s.partition, "aggregator": s.aggregator, "metric": s.metric,
        "algorithm": s.algorithm_name, "gossip_steps": s.gossip_steps, **s.local_update(),
        "spectral_gap": gap,
        "honest_accuracy": {"mean": final.get("accuracy_mean"), "min": final.get("accuracy_min"),
                            "max": final.get("accuracy_max")},
        "centralized_accuracy": central[-1] if central else None,
        "consensus_distance": final["distance"],
        "bytes_sent": sum(p.transport.stats.bytes_sent for p in peers),
        "bytes_per_peer_round": sum(p.transport.stats.bytes_sent for p in peers) / (s.peers * s.rounds),
        "wall_s": time.perf_counter() - wall,
        "train_s": train_wall,   # the rounds only: the rate is over this
        "peer_rounds_per_s": s.peers * len(watcher.rounds) / train_wall,
        "rounds_done": len(watcher.rounds), "interrupted": bool(stopped),
        "rejected": rejected,
        "per_peer_accuracy": [watcher.last_accuracy.get(i) for i in range(s.peers)],
        "attack": s.attack, "attack_params": dict(s.attack_params), "attackers": len(cast.byzantine),
        "byzantine": sorted(cast.byzantine),
        "byzantine_neighbors": attacks.byzantine_neighbors(nbrs, cast.byzantine),
    }
    if rewirer is not None:
        summary.update(reputation=s.reputation_settings(), overlay_initial=nbrs, overlay_final=rewirer.neighbors(),
                       byzantine_neighbors_final=attacks.byzantine_neighbors(rewirer.neighbors(), cast.byzantine),
                       rewire_changes=len(rewirer.history))
    write_json(out / "summary.json", summary)
    if stopped:
        raise Interrupted(summary)
    return summary
