"""Fault specs of a scenario (`kill`, `delay`): parsed and checked at config time, run by the procs engine.

`kill = [{peer = 3, at_round = 5, restart_after_s = 10}]` SIGKILLs peer 3 once it reports round 5
done and restarts it with --resume 10 s later; `delay = {peer = 2, ms = 200}` makes peer 2 send every
frame 200 ms late. Faults need real processes: with engine = "inproc" they are a ConfigError.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from p2pfl.errors import ConfigError

if TYPE_CHECKING:
    from p2pfl.sim.scenario import Scenario

FAULT_KEYS = {"kill": ("peer", "at_round", "restart_after_s"), "delay": ("peer", "ms")}


@dataclass(frozen=True)
class Kill:
    peer: int
    at_round: int                       # SIGKILL once the peer reports this round (0-based) done
    restart_after_s: float | None       # None: it stays down


def fault_entries(key: str, value: Any) -> tuple[dict[str, Any], ...]:
    """A TOML value of `kill`/`delay` as a tuple of tables (one table is a list of one)."""
    items = [value] if isinstance(value, dict) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(e, dict) for e in items):
        raise ConfigError(f"{key}: expected a table or a list of tables, e.g. "
                          + ("kill = [{peer = 3, at_round = 5, restart_after_s = 10}]" if key == "kill"
                             else "delay = {peer = 2, ms = 200}") + f"; got {value!r}")
    return tuple(dict(e) for e in items)


def _number(where: str, entry: dict[str, Any], key: str, integer: bool) -> Any:
    v = entry[key]
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok:
        raise ConfigError(f"{where}.{key}: expected {'an integer' if integer else 'a number'}, got {v!r}")
    return v


def _entry(key: str, n: int, entry: dict[str, Any], peers: int, required: tuple[str, ...]) -> None:
    where = f"{key}[{n}]"
    allowed = FAULT_KEYS[key]
    unknown = sorted(set(entry) - set(allowed))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; allowed keys: {', '.join(allowed)}")
    for k in required:
        if k not in entry:
            raise ConfigError(f"{where}: missing key {k!r}")
    peer = _number(where, entry, "peer", integer=True)
    if not 0 <= peer < peers:
        raise ConfigError(f"{where}.peer: must be a peer index in [0, {peers}), got {peer}")


def kills(s: Scenario) -> list[Kill]:
    out = []
    for n, e in enumerate(s.kill):
        _entry("kill", n, e, s.peers, ("peer", "at_round"))
        at = _number(f"kill[{n}]", e, "at_round", integer=True)
        if not 0 <= at < s.rounds:
            raise ConfigError(f"kill[{n}].at_round: must be in [0, rounds) = [0, {s.rounds}), got {at}")
        after = e.get("restart_after_s")
        if after is not None and not 0 <= _number(f"kill[{n}]", e, "restart_after_s", integer=False) < math.inf:
            raise ConfigError(f"kill[{n}].restart_after_s: must be >= 0 and finite, got {after}")
        out.append(Kill(e["peer"], at, None if after is None else float(after)))
    for n, k in enumerate(out):
        earlier = [j for j in out[:n] if j.peer == k.peer]
        if earlier and (earlier[-1].restart_after_s is None or earlier[-1].at_round >= k.at_round):
            raise ConfigError(f"kill[{n}]: peer {k.peer} is killed again; an earlier kill of it must restart it "
                              f"(restart_after_s) at a smaller at_round")
    return out


def delays(s: Scenario) -> dict[int, float]:
    out: dict[int, float] = {}
    for n, e in enumerate(s.delay):
        _entry("delay", n, e, s.peers, ("peer", "ms"))
        ms = _number(f"delay[{n}]", e, "ms", integer=False)
        if not 0 <= ms < math.inf:
            raise ConfigError(f"delay[{n}].ms: must be >= 0 and finite, got {ms}")
        if e["peer"] in out:
            raise ConfigError(f"delay[{n}].peer: peer {e['peer']} already has a delay")
        out[e["peer"]] = float(ms)
    return out


def check_faults(s: Scenario) -> None:
    """Fault keys, and what the procs engine cannot run, as ConfigErrors naming the key."""
    kills(s)
    delays(s)
    if s.engine != "procs":
        for key in FAULT_KEYS:
            if getattr(s, key):
                raise ConfigError(f"{key}: faults run on real processes only; set engine = \"procs\" "
                                  f"(or --engine procs)")
        return
    if s.loss:
        raise ConfigError("loss: the procs engine runs over real TCP, which drops nothing; use engine = \"inproc\"")
