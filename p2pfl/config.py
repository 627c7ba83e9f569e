"""Strict config loading shared by scenarios (`p2pfl sim`) and peer settings (`p2pfl peer`).

Theory of operation: a config is a frozen dataclass whose fields are the TOML keys. Values from a
TOML file or the command line are checked against each field's annotation before the dataclass
is built: an unknown key or a wrong type raises `ConfigError` naming the key (and, for unknown
keys, the allowed ones). Ints are accepted for floats; a single value for a list.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from p2pfl.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

C = TypeVar("C")


def parse_toml(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except (ValueError, RecursionError) as e:  # TOMLDecodeError; an int past Python's 4300 digits; deep nesting
        raise ConfigError(f"{source}: not valid TOML: {type(e).__name__}: {str(e)[:200]}") from None


def read_toml(path: str | Path, what: str) -> dict[str, Any]:
    """The TOML table in `path`; `what` names the file in errors ("scenario file", "config file")."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"{what} {path}: {e.strerror}") from None
    except UnicodeDecodeError:  # TOML is UTF-8; any other bytes are a wrong file, not a crash
        raise ConfigError(f"{what} {path}: not UTF-8 text") from None
    return parse_toml(text, str(path))


@functools.lru_cache(maxsize=None)
def _type_hints(cls: type) -> dict[str, Any]:
    # resolving the annotations costs ~0.75 ms a call, and every key of every config asks for them
    return typing.get_type_hints(cls)


def coerce(cls: type, key: str, value: Any) -> Any:
    """`value` checked against the annotation of field `key` of dataclass `cls`."""
    hint = _type_hints(cls)[key]
    args = typing.get_args(hint)
    if value is None and type(None) in args:
        return None
    base = next((a for a in args if a is not type(None)), hint) if isinstance(hint, types.UnionType) else hint
    origin = typing.get_origin(base) or base
    if origin is tuple:
        item = typing.get_args(base)[0]
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, item) and not isinstance(v, bool)
                                                           for v in value):
            raise ConfigError(f"{key}: expected a list of {item.__name__}, got {value!r}")
        return tuple(value)
    if origin is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, Path) and origin is str:
        return str(value)
    if isinstance(value, bool) != (origin is bool) or not isinstance(value, origin):
        raise ConfigError(f"{key}: expected {getattr(origin, '__name__', origin)}, got {value!r}")
    return value


def build(cls: Callable[..., C], values: dict[str, Any], source: str,
          special: Callable[[str, Any], Any] | None = None) -> C:
    """`cls(**values)` after refusing unknown keys and coercing each value; `special(key, value)`
    handles the keys a caller parses itself (it returns NotImplemented for the others)."""
    _check_toml(values, source)
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{source}: {unknown_keys(unknown, known)}; allowed keys: {', '.join(sorted(known))}")
    out = {}
    for k, v in values.items():
        parsed = special(k, v) if special else NotImplemented
        out[k] = coerce(cls, k, v) if parsed is NotImplemented else parsed  # type: ignore[arg-type]
    return cls(**out)


def unknown_keys(unknown: list[str], known: set[str]) -> str:
    """The text "unknown keys 'lr_rate' (did you mean 'lr'?), 'x'": every unknown key, each with the
    closest known one when there is a close one (a typo), for one message."""
    def one(k: str) -> str:
        close = difflib.get_close_matches(k, sorted(known), n=1, cutoff=0.6)
        return repr(k) + (f" (did you mean {close[0]!r}?)" if close else "")
    return f"unknown key{'s' if len(unknown) > 1 else ''} " + ", ".join(one(k) for k in unknown)


def _check_toml(values: dict[str, Any], source: str) -> None:
    """ConfigError unless every table key, nested ones included, is a str and every int fits 64 bits, as
    TOML 1.0 says. tomllib reads any number of digits, and a caller's dict may hold anything; the
    checks downstream sort keys, pass tables as **kwargs and turn ints into floats (10**400 has none)."""
    stack: list[tuple[str, Any]] = [(source, values)]
    seen: set[int] = set()
    while stack:  # not recursive: a caller's structure may nest deeper than the recursion limit
        where, value = stack.pop()
        if isinstance(value, (dict, list, tuple)):
            if id(value) in seen:  # shared or cyclic containers: each is checked once
                continue
            seen.add(id(value))
        if isinstance(value, dict):
            for k, v in value.items():
                if not isinstance(k, str):
                    raise ConfigError(f"{where}: keys must be strings, got {k!r}")
                stack.append((k if where == source else f"{where}.{k}", v))
        elif isinstance(value, (list, tuple)):
            stack.extend((where, v) for v in value)
        elif isinstance(value, int) and not -(2**63) <= value < 2**63:
            raise ConfigError(f"{where}: an integer of {value.bit_length()} bits; TOML integers are 64-bit")
