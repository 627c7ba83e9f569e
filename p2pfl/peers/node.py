"""The process-level runner behind `p2pfl peer`: one Peer over libp2p, with membership.

Theory of operation
-------------------
`Node` owns a `Libp2pTransport`, a `Peer`, and three background jobs: bootstrap, membership (peer
exchange and refresh) and neighbour selection. Those are the `Membership` layer that `Node`
inherits (membership.py: how peers are found, linked, set aside and taken back); this module is
the process around them: settings, data and model, checkpoints, the round loop, signals, metrics
and the summary.
Before it joins anyone the node locks its output folder and checks its ports (preflight.py), and
records its settings in `<out>/settings.json` (what `--resume` restores). Round 0 waits for
`min_neighbors` until `start_timeout`; with no neighbour at all by then the run fails
(`StartTimeout`: one line, exit 1) unless `alone` allows training without neighbours, so a
bootstrap nobody answers never turns into a silent run on the whole dataset.
The round loop runs `peer.train(1)` per round. Before each round it applies neighbour changes
(who is set aside, and when it comes back: membership.py), jumps ahead when a majority of its
neighbours are further on (`agreed_round` over the neighbours' round claims: a late joiner or a
restarted peer catches up, a liar's claim alone moves nothing), then
trains, logs the round event and writes the checkpoint. With `attack` set the peer is an
`AttackerPeer` in its local view (it crafts from what its own neighbours send it, sparing the
`colluders`); it is not evaluated, writes no checkpoint (its trainer may be a stand-in) and its
summary says `attack` and `byzantine: true`. SIGTERM/SIGINT cancels the round in
progress; the node rewrites the checkpoint of the last completed round, closes its streams and
returns 0. With `metrics_port` set, a Prometheus endpoint (peers/metrics.py) reads the node's state
at scrape time, from its own thread, for as long as `main` runs.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import trio

from p2pfl.errors import ConfigError, LocalProtocolError, P2PFLError
from p2pfl.files import MetricsLog, load_identity, save_identity, write_json
from p2pfl.gossip.identity import Identity
from p2pfl.gossip.rounds import agreed_round
from p2pfl.learn import backbone
from p2pfl.learn.custom import Data, build_model, load_user_data
from p2pfl.learn.datasets import load_dataset
from p2pfl.learn.models import ParamLayout
from p2pfl.learn.objectives import is_import_string
from p2pfl.learn.train import peer_seed
from p2pfl.peers import checkpoint, preflight
from p2pfl.peers import settings as peer_settings
from p2pfl.peers.exchange import DialPolicy
from p2pfl.peers.factory import make_peer
from p2pfl.peers.libp2p import Hello, Libp2pTransport
from p2pfl.peers.membership import SUSPECT_AFTER as SUSPECT_AFTER  # (re-exported: tests import it from here)
from p2pfl.peers.membership import Membership, _peer_of
from p2pfl.peers.metrics import PeerMetrics, Snapshot
from p2pfl.peers.peer import Peer, PeerConfig
from p2pfl.peers.settings import PeerSettings
from p2pfl.peers.transport import PeerNetwork
from p2pfl.robust import check_rule


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda requested but torch.cuda.is_available() is False")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def identity_of(s: PeerSettings, report: Callable[[str], None] = lambda line: None) -> Identity:
    """The peer's key, refused if group or others may read it (as ssh does); generated when absent
    (and a `key` file that did not exist is reported: the user may have meant another path)."""
    if s.resume and s.key is None and (Path(s.resume) / "peer.key").exists():
        return load_identity(Path(s.resume) / "peer.key", owner_only=True)
    if s.key is not None and Path(s.key).exists():
        return load_identity(s.key, owner_only=True)
    ident = Identity.generate()
    path = Path(s.key) if s.key is not None else Path(s.out) / "peer.key"
    if path.exists():
        return load_identity(path, owner_only=True)
    try:
        save_identity(ident, path)
    except OSError as e:
        raise ConfigError(f"key: cannot write {path}: {e.strerror}") from None
    if s.key is not None:
        report(f"key: {path} did not exist; created a new identity there (peer ID {ident.peer_id})")
    return ident


def _read_lines(path: str, what: str) -> list[str]:
    try:
        return [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path}: not a text file") from None
    except OSError as e:
        raise ConfigError(f"{what} {path}: {e.strerror}") from None


def shard_data(s: PeerSettings, i: int, n: int, device: torch.device, frozen: backbone.Backbone | None
               ) -> tuple[Data, Data | None, tuple[int, ...], int | None, tuple[torch.Tensor, torch.Tensor] | None]:
    """Shard i of n, the test data, one sample's shape, the number of outputs and the backbone's
    public part (None without one): a built-in dataset split as the simulator splits it (without the
    public part), or what the user's loader (`dataset = "pkg.module:loader"`) returns for the shard,
    which has no public part (the Peer moves its tensors to the model's device)."""
    if is_import_string(s.dataset):
        user = load_user_data(s.dataset, i, n, s.seed, batch_size=s.batch_size)
        return user.train, user.test, user.input_shape, user.num_classes, None
    rng = np.random.default_rng(s.seed)            # the simulator's order: data, then partition
    data = load_dataset(s.dataset, seed=s.seed)
    shard = backbone.peer_shards(data.y_train, n, s.partition, rng, frozen)[i]
    to = lambda a: torch.from_numpy(np.array(a)).to(device)   # copy: cached arrays are read-only
    return ((to(data.x_train[shard]), to(data.y_train[shard])), (to(data.x_test), to(data.y_test)),
            data.input_shape, data.num_classes, backbone.public_data(data.x_train, data.y_train, frozen))


class Node(Membership):
    def __init__(self, s: PeerSettings, report: Callable[[str], None] = print) -> None:
        self.s, self.report = s, report
        self.out = Path(s.out)
        self.lock = preflight.claim_out(self.out)   # refuses a folder another live peer writes to
        try:
            self._build(s)
        except BaseException:
            self.lock.release()
            raise

    def _build(self, s: PeerSettings) -> None:
        self.device = resolve_device(s.device)
        if s.threads:
            torch.set_num_threads(s.threads)
        self.identity = identity_of(s, self.report)
        i, n = s.shard_index()
        frozen = backbone.load(s.backbone) if s.backbone else None
        train, test, input_shape, num_classes, reference = shard_data(s, i, n, self.device, frozen)
        model = build_model(s.model, input_shape, num_classes, hidden=s.hidden, seed=s.seed)
        if frozen is not None:
            frozen.attach(model)   # only the head stays trainable, so only the head is gossiped
        model = model.to(self.device)
        self.schema = ParamLayout.of(model).schema
        psk = s.network_psk()
        allow = set(_read_lines(s.allow, "allowlist")) if s.allow else None
        self.transport: PeerNetwork = Libp2pTransport(self.identity, Hello(schema=self.schema, settings=s.protocol_settings()),
                                         listen=s.listen, psk=psk, allow=allow, delay_s=s.delay_ms / 1000,
                                         bulk_port=None if s.bulk_port < 0 else s.bulk_port)
        self.explicit = {_peer_of(a) for a in s.neighbors}
        planned = len(self.explicit) or s.degree    # neighbours join one by one: check the rule once, here
        try:
            check_rule(s.aggregator, planned, s.f, **s.aggregator_params)
        except ConfigError as e:
            raise ConfigError(f"aggregator: with {planned} planned neighbour(s): {e}") from None
        config = PeerConfig(train=s.train_config(), algorithm=s.algorithm_or_default, algorithm_params=s.algorithm_params,
                            gossip_steps=s.gossip_steps, aggregator=s.aggregator,
                            aggregator_params=s.aggregator_params, f=s.f,
                            step_timeout_s=s.step_timeout, eval_every=s.eval_every, seed=peer_seed(s.seed, i),
                            check_degree=False, reputation=s.reputation_settings())
        self.byzantine = s.attack != "none"
        self.peer: Peer = make_peer(model, train, transport=self.transport, neighbors={}, config=config,
                                    test_data=test, num_classes=num_classes, attack=s.attack,
                                    attack_params=s.attack_params, colluders=s.colluders, reference_data=reference)
        self.peer.on_event = self._on_round
        self.resumed_from: int | None = None
        if s.resume:
            ck = checkpoint.load(s.resume, map_location=self.device, max_round=s.rounds)
            if ck.peer_id != self.identity.peer_id or ck.schema != self.schema:
                raise ConfigError(f"resume: {s.resume} holds a checkpoint of another peer or model")
            if self.peer.trainer is None:
                raise ConfigError(f"resume: algorithm {s.algorithm_or_default!r} keeps no checkpoint to resume from")
            ck.apply(self.peer.trainer)   # refuses (ConfigError) a checkpoint that does not fit, changing nothing
            self.peer.algorithm.model_loaded()   # x_i after the checkpointed round
            try:
                self.peer.algorithm.load_state_dict(ck.extra.get("algorithm", {}))
            except (KeyError, TypeError, ValueError) as e:
                raise ConfigError(f"resume: {s.resume}: the algorithm's state does not fit: {e}") from None
            self.peer.round = self.resumed_from = ck.round
        elif not s.fresh and not self.byzantine and (self.out / checkpoint.FILENAME).exists():
            # an attacker writes no checkpoint, so it has none to lose
            raise ConfigError(f"out: {self.out / checkpoint.FILENAME} exists; continue it with --resume {self.out} "
                              "or start over with --fresh (overwrites it)")
        self._last_snapshot: bytes | None = None
        self._init_membership()
        self.stopping = False
        self.metrics = MetricsLog(self.out / "metrics.jsonl")
        self.prometheus = PeerMetrics(self.identity.peer_id, self.snapshot) if s.metrics_port else None
        self._accuracy: float | None = None
        self._last_wait_s: float | None = None
        self._wait_s_total = 0.0
        self.events: list[dict[str, Any]] = []
        self._round_line = ""
        self.first_round = self.peer.round
        self._train_scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        self._start_failure: str | None = None
        write_json(self.out / peer_settings.SETTINGS_FILE, peer_settings.saved(s))   # what --resume restores

    # -- entry point ------------------------------------------------------------------------------
    async def main(self) -> dict[str, Any]:
        wall = time.perf_counter()
        url = None
        try:
            # before the transport: a port in use stops the peer before it joins anyone
            preflight.check_ports(self.s.listen, self.s.bulk_port)
            url = self.prometheus.serve(self.s.metrics_host, self.s.metrics_port) if self.prometheus else None
            summary = await self._main(wall, url)
        finally:
            if self.prometheus is not None:
                self.prometheus.close()
            self.lock.release()
        if self._start_failure is not None:
            raise StartTimeout(self._start_failure)
        return summary

    async def _main(self, wall: float, metrics_url: str | None) -> dict[str, Any]:
        async with self.transport:
            self.exchange = DialPolicy(self.identity.peer_id, self.transport.listen_addrs(),
                                       allow_dns=self.s.peer_exchange_dns)
            for addr in self.transport.listen_addrs():
                self.report(f"listening on {addr}")
            if metrics_url is not None:   # after the addresses: the first line is the first address
                self.report(f"metrics on {metrics_url}")
            self.metrics.write({"kind": "start", "round": self.peer.round, "peer": self.identity.peer_id,
                                "resumed_from": self.resumed_from, "addrs": self.transport.listen_addrs()})
            self.metrics.flush()
            async with self.peer, trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._signals)
                nursery.start_soon(self._maintain)
                for addr in (*self.s.bootstrap, *(a for a in self.s.neighbors if "/p2p/" in a)):
                    nursery.start_soon(self._bootstrap, addr)
                with trio.CancelScope() as self._train_scope:
                    if await self._wait_start():
                        await self._rounds()
                if not self.stopping:
                    with trio.move_on_after(10):
                        await self.transport.flush()
                nursery.cancel_scope.cancel()
        if self._start_failure is not None:
            self.metrics.close()
            return {}
        if self._last_snapshot is not None:
            checkpoint.write(self.out, self._last_snapshot)
        summary = self._summary(time.perf_counter() - wall)
        write_json(self.out / "summary.json", summary)
        self.metrics.close()
        return summary

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                self.report(f"{signal.Signals(signum).name}: stopping after writing the checkpoint")
                self.stopping = True
                if self._train_scope is not None:
                    self._train_scope.cancel()
                return

    # -- rounds -----------------------------------------------------------------------------------
    async def _wait_start(self) -> bool:
        """Wait for min_neighbors until start_timeout; False (the run fails) if nobody came by then,
        unless the peer may train alone (`alone`: then with nothing to dial it starts at once)."""
        s = self.s
        waits_for = (*s.bootstrap, *s.neighbors)
        if s.alone and not waits_for:
            return True   # nothing to wait for; peers that dial us later still join
        with trio.move_on_after(s.start_timeout):
            await self.transport.wait_until(lambda: len(self._linked()) >= s.min_neighbors)
        n = len(self._linked())
        if n == 0 and not s.alone and s.min_neighbors > 0:
            what = (f"none of {', '.join(waits_for)} answered" if waits_for
                    else "no peer joined (start the others with --bootstrap pointing here)")
            self._start_failure = (f"start timeout: no neighbour after {s.start_timeout:g} s: {what}; "
                                   "raise --start-timeout, or pass --alone to train without neighbours")
            return False
        if n < s.min_neighbors:
            self.report(f"start timeout: starting with {n} neighbour(s)")
        return True

    async def _rounds(self) -> None:
        while self.peer.round < self.s.rounds:
            self._apply_neighbors()
            claims = self._round_claims()
            target = min(agreed_round(claims.values()), self.s.rounds - 1)
            if target > self.peer.round:
                agree = sum(r >= target for r in claims.values())
                self.report(f"catching up: round {self.peer.round} -> {target} "
                            f"({agree} of {len(claims)} neighbours are there)")
                self.metrics.write({"kind": "catch_up", "round": target, "from": self.peer.round,
                                    "peer": self.identity.peer_id, "agree": agree, "neighbors": len(claims)})
                self.peer.round = target
                self._apply_neighbors()   # links that start by the round caught up to
            self.transport.round = self.peer.round
            await self.peer.train(1)
            self.transport.round = self.peer.round
            if not self.byzantine and self.peer.trainer is not None:   # an attacker keeps no checkpoint
                try:
                    self._last_snapshot = checkpoint.snapshot(self.peer.trainer, round=self.peer.round,
                                                              peer_id=self.identity.peer_id, schema=self.schema,
                                                              extra={"algorithm": self.peer.algorithm.state_dict()})
                except LocalProtocolError as e:   # (the peer discards a NaN update; this is the last guard)
                    self.report(f"round {self.peer.round}: not checkpointed: {e}; the previous checkpoint stays")
                else:
                    await trio.to_thread.run_sync(checkpoint.write, self.out, self._last_snapshot)
            self.report(self._round_line)   # progress, once the round is durable

    def _on_round(self, event: dict[str, Any]) -> None:
        event = {**event, "neighbors": len(self.peer.tracker.neighbors)}
        self.events.append(event)
        self._accuracy = event.get("accuracy", self._accuracy)
        self._last_wait_s = event["wait_s"]
        self._wait_s_total += event["wait_s"]
        self.metrics.write(event)
        self.metrics.flush()
        self._count_misses(event)
        acc = f", accuracy {event['accuracy']:.3f}" if "accuracy" in event else ""
        self._round_line = f"round {event['round'] + 1}/{self.s.rounds} done: {event['received']} received{acc}"

    # -- metrics ------------------------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        """What the Prometheus endpoint exports. Runs in the HTTP server's thread: it only reads
        attributes and copies counters with dict() (atomic under the GIL), never iterates live ones."""
        st = self.transport.stats
        return Snapshot(rounds_done=self.peer.round, accuracy=self._accuracy,
                        neighbors=len(self.peer.tracker.neighbors), last_round_wait_s=self._last_wait_s,
                        wait_s_total=self._wait_s_total, bytes_sent=st.bytes_sent, bytes_received=st.bytes_received,
                        frames_sent=st.frames_sent, frames_received=st.frames_received,
                        send_failures=st.send_failures, rejected=self.peer.rejections(),
                        reputation=dict(self.peer.algorithm.advice().scores))

    # -- summary ------------------------------------------------------------------------------------
    def _summary(self, wall_s: float) -> dict[str, Any]:
        s = self.s
        accs = [e["accuracy"] for e in self.events if "accuracy" in e]
        last = accs[-1] if accs else None
        i, n = s.shard_index()
        return {
            "name": f"peer-{i}", "peer_id": self.identity.peer_id, "shard": s.shard, "peers": n,
            "rounds": s.rounds, "rounds_done": self.peer.round, "rounds_run": len(self.events),
            "first_round": self.first_round, "resumed_from": self.resumed_from, "stopped": self.stopping,
            "seed": s.seed, "topology": "explicit" if self.explicit else f"degree:{s.degree}",
            "dataset": s.dataset, "partition": s.partition, "aggregator": s.aggregator, "metric": s.metric,
            "accuracy": last,
            "honest_accuracy": {"mean": last, "min": last, "max": last},
            "bytes_sent": self.transport.stats.bytes_sent, "bytes_received": self.transport.stats.bytes_received,
            "frames_sent": self.transport.stats.frames_sent, "frames_received": self.transport.stats.frames_received,
            "send_failures": self.transport.stats.send_failures,
            "wall_s": wall_s, "peer_rounds_per_s": len(self.events) / wall_s if wall_s > 0 else math.nan,
            "rejected": self.peer.rejections(), "neighbors": sorted(self.peer.tracker.neighbors), "device": str(self.device),
            "attack": s.attack, "byzantine": self.byzantine,
        }


class StartTimeout(P2PFLError):
    """Nobody to train with by the start timeout (and the peer may not train alone)."""


def run(s: PeerSettings, report: Callable[[str], None] = print) -> dict[str, Any]:
    """Build the node (ConfigError before any socket opens) and run it to the end or a signal."""
    node = Node(s, report)
    return trio.run(node.main)
