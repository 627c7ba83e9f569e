"""Algorithms and their registry: `algorithm = "name"` plus an `[algorithm_params]` table.

Theory of operation: an algorithm is a subclass of `Algorithm` (base.py: sans-IO; what a peer trains,
sends and combines) registered under a name with the frozen dataclass of its own parameters. The
registry, not the CLI or the scenario loader, knows the names and checks the parameters: `params`
builds the dataclass from a table, refusing an unknown key, a wrong type or a bad value with one line
that names `algorithm_params.KEY`. `build` makes the algorithm for one peer. The simulator, the
multi-process engine and `p2pfl peer` all go through `build`, so a registered algorithm runs in all
three with no other change. An algorithm defined outside p2pfl is registered when its module is
imported: name the module in the `plugins` key (scenario or peer settings) so that every process
imports it, as `p2pfl peer` processes of the procs engine must.

Registered here: dfedavg, dfedavgm, dfedsam (gossip.py; they differ only in the local update's
presets for rho and momentum, which an explicit `rho`/`momentum` key overrides), bristle
(bristle.py: head-only learning on a frozen pre-trained backbone) and frl (frl.py:
supermask scores trained locally, rankings gossiped and voted). `check_attack` says which Byzantine
attacks an algorithm's attacker can run (an algorithm class lists them in `attacks`; the gossip
family runs the float-vector ones).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from p2pfl import config
from p2pfl.algorithms.base import Advice, Algorithm, Context, GossipConfig, Received, Wrapper
from p2pfl.algorithms.frl import FRL, FRLParams
from p2pfl.algorithms.gossip import Gossip, GossipParams
from p2pfl.errors import ConfigError
from p2pfl.files import import_file
from p2pfl.learn.train import ALGORITHMS as TRAIN_PRESETS
from p2pfl.robust.attacks import ATTACKS


@dataclass(frozen=True)
class _NoParams:
    """An algorithm without parameters of its own."""


@dataclass(frozen=True)
class Entry:
    name: str
    factory: Callable[[Context, Any], Algorithm]
    params: type
    summary: str = ""
    train_preset: Mapping[str, float] = field(default_factory=dict)   # defaults for rho and momentum


REGISTRY: dict[str, Entry] = {}


def register(name: str, *, params: type | None = None, summary: str = "",
             train_preset: Mapping[str, float] | None = None) -> Callable[[type[Algorithm]], type[Algorithm]]:
    """Class decorator: make `cls(ctx, params)` the algorithm `name`; `params` is a frozen dataclass
    whose fields all have defaults. Registering a taken name is an error unless it is the same class
    (a module imported twice)."""
    if params is not None and (not dataclasses.is_dataclass(params) or
                               any(f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                                   for f in dataclasses.fields(params))):
        raise TypeError(f"algorithm {name!r}: params must be a dataclass whose fields all have defaults")

    def decorate(cls: type[Algorithm]) -> type[Algorithm]:
        old = REGISTRY.get(name)
        if old is not None and getattr(old.factory, "__qualname__", None) != cls.__qualname__:
            raise ValueError(f"algorithm {name!r} is already registered ({old.factory})")
        REGISTRY[name] = Entry(name, cls, params or _NoParams, summary or (cls.__doc__ or "").split("\n")[0],
                               dict(train_preset or {}))
        return cls

    return decorate


def names() -> list[str]:
    return sorted(REGISTRY)


def get(name: str) -> Entry:
    entry = REGISTRY.get(name)
    if entry is None:
        raise ConfigError(f"algorithm: unknown value {name!r}; allowed: {', '.join(names())} "
                          "(or a plugin's, named in `plugins`)")
    return entry


def params(name: str, values: Mapping[str, Any] | None) -> Any:
    """The algorithm's parameters from a table; ConfigError naming `algorithm_params.KEY` if bad."""
    entry = get(name)
    values = dict(values or {})
    known = {f.name for f in dataclasses.fields(entry.params)}
    unknown = sorted(map(str, set(values) - known))
    if unknown:
        allowed = ", ".join(sorted(known)) or "none"
        raise ConfigError(f"algorithm_params.{unknown[0]}: unknown key for algorithm {name!r}; allowed: {allowed}")
    try:
        return config.build(entry.params, values, f"algorithm_params ({name})")
    except ConfigError as e:
        text = str(e)
        raise ConfigError(text if text.startswith("algorithm_params") else f"algorithm_params.{text}") from None
    except (TypeError, ValueError) as e:   # the dataclass's own __post_init__ checks
        raise ConfigError(f"algorithm_params ({name}): {e}") from None


def build(name: str, ctx: Context, values: Mapping[str, Any] | None = None) -> Algorithm:
    entry = get(name)
    return entry.factory(ctx, params(name, values))


def check_attack(name: str, attack: str) -> None:
    """ConfigError when attack `attack` means nothing to algorithm `name` (rank_reversal with dfedavg,
    alie with frl, any attack with a plugin that has no attacker)."""
    if attack == "none":
        return
    cls = get(name).factory
    allowed: tuple[str, ...] = getattr(cls, "attacks", ())
    if isinstance(cls, type) and issubclass(cls, Gossip):
        allowed = tuple(a for a in ATTACKS if a not in FRL.attacks)
    if attack not in allowed:
        raise ConfigError(f"attack: {attack!r} does not apply to algorithm {name!r}; allowed: "
                          f"{', '.join(sorted(allowed)) if allowed else 'none (it has no attacker)'}")


def load_plugins(plugins: Iterable[str]) -> None:
    """Import each plugin, a module name (`pkg.algos`) or a Python file (`path/to/algos.py`): importing it
    registers its algorithms. ConfigError naming one that cannot be imported. A file is imported once
    per process, under a name derived from its resolved path."""
    for plugin in plugins:
        try:
            if plugin.endswith(".py"):
                import_file(plugin, "p2pfl_plugin_")
            else:
                importlib.import_module(plugin)
        except Exception as e:   # a user's module: whatever it raises is its import failing
            raise ConfigError(f"plugins: cannot import {plugin!r}: {type(e).__name__}: {e}") from None


for _name, _preset in TRAIN_PRESETS.items():
    register(_name, summary={"dfedavg": "local SGD, then gossip (DFedAvg)",
                             "dfedavgm": "local SGD with momentum 0.9, then gossip (DFedAvgM)",
                             "dfedsam": "local SAM (rho 0.05), then gossip (DFedSAM)"}[_name],
             params=GossipParams, train_preset=_preset)(Gossip)
register("frl", params=FRLParams,
         summary="supermask scores trained locally, rankings gossiped, a rank vote per neighbourhood (FRL)")(FRL)

from p2pfl.algorithms import bristle as _bristle  # noqa: E402,F401 -- registers "bristle" (it imports this registry)

__all__ = ["FRL", "REGISTRY", "Advice", "Algorithm", "Context", "Entry", "Gossip", "GossipConfig", "Received",
           "Wrapper", "build", "check_attack", "get", "load_plugins", "names", "params", "register"]
