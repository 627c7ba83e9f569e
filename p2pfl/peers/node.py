"""The process-level runner behind `p2pfl peer`: one Peer over libp2p, with membership.

Theory of operation
-------------------
`Node` owns a `Libp2pTransport`, a `Peer`, and three background jobs:
- bootstrap: dial each `--bootstrap` address until it answers (exponential backoff; the first
  failure is reported in one line, the rest quietly); a hello that is refused is final.
- membership: every accepted hello (ours or theirs) brings the other side's known peers (peer
  exchange); we dial those we do not know yet, within the budgets and address checks of
  `exchange.DialPolicy` (no own, out-of-scope or DNS addresses, rate-limited), and every `refresh_s` we re-hello the neighbours
  (to learn their round and notice restarts) and redial wanted ones that are gone. While a wanted
  neighbour is missing (an explicit one we have no hello from, or fewer links than `degree`), the
  refresh re-hellos every accepted peer, bootstrap peers included: two peers that joined the same
  bootstrap at the same moment are missing from each other's hello replies, and only a later
  hello tells them about each other. With nothing missing only the neighbours are re-helloed.
- neighbour selection: with `--neighbors` the set is fixed, and each hello carries the sender's
  degree, so we mix with Metropolis-Hastings weights as the simulator does; otherwise we ask
  known peers for a link (`link` control request) until we have `degree`, in an order both sides
  agree on (a hash of the pair and the seed), accept up to degree + 2 incoming requests, and mix
  uniformly (degrees still change).
The round loop runs `peer.train(1)` per round. Before each round it applies neighbour changes
(a neighbour that missed SUSPECT_AFTER rounds in a row is set aside for 2, 4, 8 ... 64 rounds, then
gets one more chance; a hello does not clear its misses, only a delivered frame does, and while set
aside it cannot take a link slot back), jumps ahead when a majority of its neighbours are further on
(`agreed_round`: a late joiner or a restarted peer catches up, a liar's claim alone moves nothing), then
trains, logs the round event and writes the checkpoint. With `attack` set the peer is an
`AttackerPeer` in its local view (it crafts from what its own neighbours send it, sparing the
`colluders`); it is not evaluated, writes no checkpoint (its trainer may be a stand-in) and its
summary says `attack` and `byzantine: true`. SIGTERM/SIGINT cancels the round in
progress; the node rewrites the checkpoint of the last completed round, closes its streams and
returns 0. With `metrics_port` set, a Prometheus endpoint (peers/metrics.py) reads the node's state
at scrape time, from its own thread, for as long as `main` runs.
"""

from __future__ import annotations

import hashlib
import logging
import math
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import trio

from p2pfl.errors import ConfigError, LocalProtocolError, printable
from p2pfl.files import MetricsLog, load_identity, save_identity, write_json
from p2pfl.gossip.identity import Identity
from p2pfl.gossip.rounds import agreed_round
from p2pfl.gossip.topology import mh_weight
from p2pfl.learn.datasets import load_dataset
from p2pfl.learn.models import ParamLayout, make_model
from p2pfl.learn.partition import partition
from p2pfl.peers import checkpoint
from p2pfl.peers.exchange import DialPolicy
from p2pfl.peers.libp2p import Hello, HelloRefused, Libp2pTransport
from p2pfl.peers.metrics import PeerMetrics, Snapshot
from p2pfl.peers.peer import Peer, PeerConfig
from p2pfl.peers.settings import PeerSettings
from p2pfl.peers.transport import LogThrottle
from p2pfl.robust import check_rule

log = logging.getLogger(__name__)

SUSPECT_AFTER = 3        # rounds missed in a row before a neighbour is set aside
MAX_BENCH_ROUNDS = 64    # the longest a silent neighbour is set aside (it doubles per offence up to this)
REFRESH_S = 5.0          # re-hello period
BACKOFF_MAX_S = 30.0


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda requested but torch.cuda.is_available() is False")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def identity_of(s: PeerSettings) -> Identity:
    """The peer's key, refused if group or others may read it (as ssh does); generated when absent."""
    if s.resume and s.key is None and (Path(s.resume) / "peer.key").exists():
        return load_identity(Path(s.resume) / "peer.key", owner_only=True)
    if s.key is not None and Path(s.key).exists():
        return load_identity(s.key, owner_only=True)
    ident = Identity.generate()
    path = Path(s.key) if s.key is not None else Path(s.out) / "peer.key"
    if path.exists():
        return load_identity(path, owner_only=True)
    save_identity(ident, path)
    return ident


def _read_lines(path: str, what: str) -> list[str]:
    try:
        return [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path}: not a text file") from None
    except OSError as e:
        raise ConfigError(f"{what} {path}: {e.strerror}") from None


def _peer_of(addr: str) -> str:
    return addr.rsplit("/p2p/", 1)[1] if "/p2p/" in addr else addr


class Node:
    def __init__(self, s: PeerSettings, report: Callable[[str], None] = print) -> None:
        self.s, self.report = s, report
        self.out = Path(s.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = resolve_device(s.device)
        if s.threads:
            torch.set_num_threads(s.threads)
        self.identity = identity_of(s)
        i, n = s.shard_index()
        rng = np.random.default_rng(s.seed)            # the simulator's order: data, then partition
        data = load_dataset(s.dataset, seed=s.seed)
        shard = partition(data.y_train, n, s.partition, rng)[i]
        to = lambda a: torch.from_numpy(np.array(a)).to(self.device)   # copy: cached arrays are read-only
        train = (to(data.x_train[shard]), to(data.y_train[shard]))
        test = (to(data.x_test), to(data.y_test))
        model = make_model(s.model, data.input_shape, data.num_classes, hidden=s.hidden, seed=s.seed).to(self.device)
        self.schema = ParamLayout.of(model).schema
        psk = s.network_psk()
        allow = set(_read_lines(s.allow, "allowlist")) if s.allow else None
        self.transport = Libp2pTransport(self.identity, Hello(schema=self.schema, settings=s.protocol_settings()),
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
                            step_timeout_s=s.step_timeout, eval_every=s.eval_every, seed=s.seed * 100_003 + i,
                            check_degree=False)
        self.byzantine = s.attack != "none"
        if self.byzantine:   # not evaluated: honest accuracy is what counts
            from p2pfl.peers.attacker import AttackerPeer

            self.peer: Peer = AttackerPeer(model, train, attack=s.attack, attack_params=s.attack_params,
                                           transport=self.transport, neighbors={}, config=config,
                                           colluders=s.colluders, num_classes=data.num_classes, offload=True)
        else:
            self.peer = Peer(model, train, transport=self.transport, neighbors={}, config=config, test_data=test,
                             offload=True, num_classes=data.num_classes)
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
        self.transport.degree = len(self.explicit)   # a fixed overlay advertises its degree: MH weights
        self.links: set[str] = set(self.explicit)
        self.misses: Counter[str] = Counter()    # rounds missed in a row; only a delivered frame resets it
        self.benched: dict[str, int] = {}         # set-aside neighbour -> the round it may come back
        self.offences: Counter[str] = Counter()   # times each peer was set aside: the backoff doubles
        self.dialing: set[str] = set()
        self.stopping = False
        self.refresh_s = REFRESH_S
        # the scope (loopback or not) is known now; the ports once we listen, when it is replaced
        self.exchange = DialPolicy(self.identity.peer_id, s.listen, allow_dns=s.peer_exchange_dns)
        self._throttle = LogThrottle(log)
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
        self.transport.on_hello = self._on_hello
        self.transport.on_control = self._on_control

    # -- entry point ------------------------------------------------------------------------------
    async def main(self) -> dict[str, Any]:
        wall = time.perf_counter()
        # bound before the transport: a port in use stops the peer before it joins anyone
        url = self.prometheus.serve(self.s.metrics_host, self.s.metrics_port) if self.prometheus else None
        try:
            return await self._main(wall, url)
        finally:
            if self.prometheus is not None:
                self.prometheus.close()

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
                    await self._wait_start()
                    await self._rounds()
                if not self.stopping:
                    with trio.move_on_after(10):
                        await self.transport.flush()
                nursery.cancel_scope.cancel()
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
    async def _wait_start(self) -> None:
        with trio.move_on_after(self.s.start_timeout):
            await self.transport.wait_until(lambda: len(self._active()) >= self.s.min_neighbors)
        if len(self._active()) < self.s.min_neighbors:
            self.report(f"start timeout: starting with {len(self._active())} neighbour(s)")

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

    def _round_claims(self) -> dict[str, int]:
        """Each neighbour's round: the later of its last accepted frame's and its last hello's claim."""
        hellos = self.transport.peers
        return {p: max(self.peer.tracker.peer_round(p), hellos[p].round if p in hellos else -1)
                for p in self.peer.tracker.neighbors}

    def _on_round(self, event: dict[str, Any]) -> None:
        event = {**event, "neighbors": len(self.peer.tracker.neighbors)}
        self.events.append(event)
        self._accuracy = event.get("accuracy", self._accuracy)
        self._last_wait_s = event["wait_s"]
        self._wait_s_total += event["wait_s"]
        self.metrics.write(event)
        self.metrics.flush()
        for p in self.peer.tracker.neighbors:
            self.misses[p] = self.misses[p] + 1 if p in event["missing"] else 0
            if self.misses[p] >= SUSPECT_AFTER and p not in self.benched:
                self.offences[p] += 1
                rounds = min(2 ** self.offences[p], MAX_BENCH_ROUNDS)
                self.benched[p] = event["round"] + 1 + rounds
                log.info("neighbour %s missed %d rounds in a row: set aside for %d rounds", p, self.misses[p], rounds)
        acc = f", accuracy {event['accuracy']:.3f}" if "accuracy" in event else ""
        self._round_line = f"round {event['round'] + 1}/{self.s.rounds} done: {event['received']} received{acc}"

    def _active(self) -> set[str]:
        return {p for p in self.links if p in self.transport.peers and p not in self.benched}

    def _apply_neighbors(self) -> None:
        for p, until in list(self.benched.items()):
            if until <= self.peer.round:   # back on probation: one more missed round sets it aside again
                del self.benched[p]
                self.misses[p] = SUSPECT_AFTER - 1
        self._prune_links()
        active = self._active()
        if active != set(self.peer.tracker.neighbors):
            log.info("neighbours: %s", sorted(active))
            self.peer.set_neighbors({p: self._weight(p) for p in sorted(active)})
            self.transport.degree = len(self.explicit) or len(active)

    def _weight(self, p: str) -> float | None:
        """W_ij on a fixed overlay: Metropolis-Hastings 1 / (1 + max(d_i, d_j)), with d_j from p's
        hello; it sums to < 1 over any subset of neighbours, so W_ii = 1 - sum stays > 0. None
        (uniform 1 / (active + 1)) when neighbours are picked at run time and degrees still change."""
        d_j = self.transport.peers[p].degree if p in self.transport.peers else 0
        return float(mh_weight(len(self.explicit), d_j)) if self.explicit and d_j > 0 else None

    # -- membership ---------------------------------------------------------------------------------
    def _on_hello(self, peer: str, hello: Hello) -> None:
        # A hello proves nothing about a neighbour's frames (a silent liar can say hello every second,
        # and our own re-hellos get replies): only a delivered frame clears its missed rounds.
        if self._nursery is None:
            return
        known = self.dialing | set(self.transport.peers)
        addrs = [a for a in hello.peers if not self.explicit or _peer_of(a) in self.explicit]
        for addr, other in self.exchange.pick(peer, addrs, time.monotonic(), known):
            self.dialing.add(other)
            self._nursery.start_soon(self._dial_once, addr, other)
        if not self.explicit and peer not in self.links and peer not in self.benched and \
                len(self.links) < self.s.degree:
            self._nursery.start_soon(self._ask_link, peer)
        if self.peer.round == self.first_round and self._train_scope is not None and self.peer.tracker.current[0] < 0:
            self._apply_neighbors()    # before round 0, neighbours join at once

    async def _dial_once(self, addr: str, peer: str) -> None:
        try:
            await self.transport.connect(addr)
        except (ConnectionError, HelloRefused, ConfigError) as e:
            self._throttle.warning(("dial", peer), "peer exchange: cannot reach %s: %s", printable(addr),
                                   printable(str(e), 200))
        finally:
            self.dialing.discard(peer)

    async def _bootstrap(self, addr: str) -> None:
        delay, reported = 1.0, False
        while True:
            try:
                await self.transport.connect(addr)
                if reported:
                    self.report(f"bootstrap {addr}: connected")
                return
            except HelloRefused as e:
                self.report(f"bootstrap {addr}: refused: {e}")
                return
            except ConfigError as e:
                self.report(f"bootstrap {addr}: {e}")
                return
            except ConnectionError as e:
                if not reported:
                    self.report(f"bootstrap {addr}: unreachable ({e}); retrying with backoff up to "
                                f"{BACKOFF_MAX_S:.0f} s")
                    reported = True
            await trio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX_S)

    async def _maintain(self) -> None:
        while True:
            await trio.sleep(self.refresh_s)
            await self._refresh()

    def _prune_links(self) -> None:
        """Free the slots of picked links that cannot be neighbours: set aside (silent), or no longer
        accepted (a later hello was refused: such a peer never misses a round, so silence alone
        would never free its slot)."""
        for p in [p for p in self.links if p not in self.explicit and
                  (p in self.benched or p not in self.transport.peers)]:
            self.links.discard(p)

    def _missing(self) -> bool:
        """A wanted neighbour is missing: an explicit one we have no hello from, or too few links."""
        if self.explicit:
            return any(p not in self.transport.peers for p in self.explicit)
        self._prune_links()
        return len(self.links) < self.s.degree

    async def _refresh(self) -> None:
        """One maintenance pass: re-hello (peer exchange rides on the replies), then ask for links."""
        targets = set(self.links)
        if self._missing():   # someone may know the missing peer now: ask everyone, not just the links
            targets |= set(self.transport.peers)
        for p in sorted(targets):
            try:
                await self.transport.hello(p)
            except (ConnectionError, HelloRefused) as e:
                log.debug("refresh %s: %s", p, e)
        if not self.explicit and len(self.links) < self.s.degree:
            for p in self._candidates():
                if len(self.links) >= self.s.degree:
                    break
                await self._ask_link(p)

    def _candidates(self) -> list[str]:
        me = self.identity.peer_id

        def rank(p: str) -> bytes:
            pair = "|".join(sorted((me, p)))
            return hashlib.blake2b(f"{self.s.seed}|{pair}".encode(), digest_size=8).digest()
        return sorted((p for p in self.transport.peers if p not in self.links and p not in self.benched), key=rank)

    async def _ask_link(self, peer: str) -> None:
        self._prune_links()
        if peer in self.links or peer in self.benched or len(self.links) >= self.s.degree:
            return
        try:
            reply = await self.transport.request(peer, {"t": "link"})
        except Exception as e:
            log.debug("link %s: %s", peer, e)
            return
        if reply.get("ok") is True and peer in self.transport.peers and peer not in self.benched:
            self.links.add(peer)
            if self.peer.tracker.current[0] < 0:
                self._apply_neighbors()
            self.transport.notify()   # round 0 may be waiting for this link

    async def _on_control(self, peer: str, msg: dict[str, Any]) -> dict[str, Any]:
        if msg["t"] == "link":
            # a set-aside peer cannot take a slot back before its time is up: identities that send
            # nothing cannot hold all our slots against peers that do
            self._prune_links()
            ok = not self.explicit and peer not in self.benched and \
                (peer in self.links or len(self.links) < self.s.degree + 2)
            if ok:
                self.links.add(peer)
                if self.peer.tracker.current[0] < 0:
                    self._apply_neighbors()
                self.transport.notify()   # round 0 may be waiting for this link
            return {"t": "link", "ok": ok}
        return {"t": "error", "error": f"unknown request {msg['t']!r}"}

    # -- metrics ------------------------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        """What the Prometheus endpoint exports. Runs in the HTTP server's thread: it only reads
        attributes and copies counters with dict() (atomic under the GIL), never iterates live ones."""
        st = self.transport.stats
        return Snapshot(rounds_done=self.peer.round, accuracy=self._accuracy,
                        neighbors=len(self.peer.tracker.neighbors), last_round_wait_s=self._last_wait_s,
                        wait_s_total=self._wait_s_total, bytes_sent=st.bytes_sent, bytes_received=st.bytes_received,
                        frames_sent=st.frames_sent, frames_received=st.frames_received,
                        send_failures=st.send_failures, rejected=self.peer.rejections())

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
            "dataset": s.dataset, "partition": s.partition, "aggregator": s.aggregator,
            "accuracy": last,
            "honest_accuracy": {"mean": last, "min": last, "max": last},
            "bytes_sent": self.transport.stats.bytes_sent, "bytes_received": self.transport.stats.bytes_received,
            "frames_sent": self.transport.stats.frames_sent, "frames_received": self.transport.stats.frames_received,
            "send_failures": self.transport.stats.send_failures,
            "wall_s": wall_s, "peer_rounds_per_s": len(self.events) / wall_s if wall_s > 0 else math.nan,
            "rejected": self.peer.rejections(), "neighbors": sorted(self.peer.tracker.neighbors), "device": str(self.device),
            "attack": s.attack, "byzantine": self.byzantine,
        }


def run(s: PeerSettings, report: Callable[[str], None] = print) -> dict[str, Any]:
    """Build the node (ConfigError before any socket opens) and run it to the end or a signal."""
    node = Node(s, report)
    return trio.run(node.main)
