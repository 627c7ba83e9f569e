"""Fuzz: the parsers of remote and untrusted input are total. For any input they return a value or
raise their ONE documented error type (codec and control messages: RemoteProtocolError; checkpoint
and config files: ConfigError), and what they accept is sane.

The generators and checks live in bench/fuzz_targets.py, shared with `bench/fuzz.py` (long runs).
Here hypothesis drives them through its own `Random`, derandomized so CI replays the same cases and
a failure shrinks to a short draw. Each test is bounded to a few seconds on 2 cores.
"""

from __future__ import annotations

import importlib.util
import io
import json
import math
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfl.errors import ConfigError, RemoteProtocolError
from p2pfl.gossip import codec

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _bench_module(name: str, file: str) -> Any:
    """Import bench/<file> as `name` without putting bench/ (codec.py, sim.py, ...) on sys.path."""
    spec = importlib.util.spec_from_file_location(name, BENCH / file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module   # dataclasses look their module up there; bench/fuzz.py imports it by name
    spec.loader.exec_module(module)
    return module


ft = _bench_module("fuzz_targets", "fuzz_targets.py")
fuzz = _bench_module("bench_fuzz", "fuzz.py")

# derandomize: a fixed sequence of cases per test, so CI is reproducible; no example database either.
FUZZ = settings(deadline=None, derandomize=True, database=None)
RANDOMS = st.randoms(use_true_random=False)


@pytest.fixture(scope="module")
def codec_target() -> ft.CodecTarget:
    return ft.CodecTarget()


@pytest.fixture(scope="module")
def checkpoint_target() -> Iterator[ft.CheckpointTarget]:
    target = ft.CheckpointTarget(apply=True)
    yield target
    target.close()


@pytest.fixture(scope="module")
def config_target() -> Iterator[ft.ConfigTarget]:
    target = ft.ConfigTarget(weights=True)
    yield target
    target.close()


# --- 1. codec -----------------------------------------------------------------------------------


@settings(FUZZ, max_examples=1500)
@given(RANDOMS)
def test_codec_decode_is_total(codec_target: ft.CodecTarget, rng: random.Random) -> None:
    codec_target.check(codec_target.case(rng))


def test_codec_seed_frames_decode_to_their_payload(codec_target: ft.CodecTarget) -> None:
    for seed in codec_target.seeds:
        for how in ("bytes", "bytearray", "memoryview", "unaligned"):
            case = ft.CodecCase(seed.wire, seed.header["schema"], ft.MAX_FRAME, seed.header["from"], how, seed.payload)
            codec_target.check(case)   # decodes, re-encodes to the same bytes, same payload
        frame = codec.decode(seed.wire, schema=None, max_frame_bytes=ft.MAX_FRAME)
        assert (frame.kind, frame.round, frame.step, frame.dtype) == (
            seed.header["kind"], seed.header["round"], seed.header["step"], seed.header["dtype"])
        assert frame.payload.tobytes() == seed.payload.tobytes()


def test_codec_refuses_mutants_with_a_reason(codec_target: ft.CodecTarget) -> None:
    """The mutators reach the deep checks: signed frames with NaN payloads, wrong sizes, bad digests."""
    rng = random.Random(1)
    reasons = set()
    for _ in range(3000):
        case = codec_target.case(rng)
        try:
            codec.decode(case.data, schema=case.schema, max_frame_bytes=case.max_frame_bytes, peer=case.peer)
        except RemoteProtocolError as e:
            reasons.add(e.reason.value)
    assert {"bad_length", "bad_msgpack", "bad_header", "unknown_version", "oversize", "forged_sender",
            "bad_signature", "wrong_schema", "bad_digest", "wrong_size", "non_finite"} <= reasons


# --- 2. control messages ------------------------------------------------------------------------


@settings(FUZZ, max_examples=1500)
@given(RANDOMS)
def test_control_messages_are_total(rng: random.Random) -> None:
    target = _control(("hello", "ticket", "other"), ("hello", "ticket"))
    target.check(target.case(rng))


@settings(FUZZ, max_examples=600)
@given(RANDOMS)
def test_hello_from_wire_is_total(rng: random.Random) -> None:
    target = _control(("hello",), ("hello",))
    target.check(target.case(rng))


@settings(FUZZ, max_examples=600)
@given(RANDOMS)
def test_ticket_from_wire_is_total(rng: random.Random) -> None:
    target = _control(("ticket",), ("ticket",))
    target.check(target.case(rng))


_CONTROL: dict[tuple[tuple[str, ...], tuple[str, ...]], ft.ControlTarget] = {}


def _control(seeds: tuple[str, ...], parsers: tuple[str, ...] = ft.CONTROL_PARSERS) -> ft.ControlTarget:
    """One target per (seed messages, parsers run), built once: hypothesis refuses function-scoped fixtures."""
    if (seeds, parsers) not in _CONTROL:
        _CONTROL[seeds, parsers] = ft.ControlTarget(parsers=parsers, seeds=seeds)
    return _CONTROL[seeds, parsers]


@pytest.mark.parametrize("key", [b"schema", b"x", 0, -1])
def test_maps_with_non_str_keys_are_refused(key: object) -> None:
    """The bug the fuzz found first: a hello or bulk reply whose map mixes str and bytes (or int) keys
    made `Hello.from_wire` / `Ticket.from_wire` sort the keys and raise TypeError."""
    from p2pfl.peers.libp2p import bulk, control

    target = _control(("hello", "ticket", "other"))
    for seed in target.seeds:
        msg = {**seed, key: 1}
        try:
            body = msgpack.packb(msg, use_bin_type=True)
        except TypeError:
            continue
        target.check(ft.ControlCase(len(body).to_bytes(4, "big"), body))   # the wire path: unpack first
        for parse in (control.Hello.from_wire, bulk.Ticket.from_wire):      # and the parsers on their own
            with pytest.raises(RemoteProtocolError):
                parse(msg, "peer")


def test_valid_control_messages_parse_back() -> None:
    from p2pfl.peers.libp2p import bulk, control

    target = _control(("hello",))
    ours = target.ours
    body = control.pack(ours.to_wire())
    msg = control.unpack(body[4:], "peer")
    assert control.body_length(body[:4]) == len(body) - 4
    assert control.Hello.from_wire(msg, "peer") == ours and control.incompatibility(ours, ours) is None
    ticket = bulk.Ticket.issue(4001)
    assert bulk.Ticket.from_wire(control.unpack(control.pack(ticket.to_wire())[4:]), "peer") == ticket
    assert bulk.Ticket.from_wire(bulk.Ticket(0).to_wire(), "peer") is None


# --- 3. checkpoint ------------------------------------------------------------------------------


@settings(FUZZ, max_examples=250)
@given(RANDOMS)
def test_checkpoint_load_and_apply_are_total(checkpoint_target: ft.CheckpointTarget, rng: random.Random) -> None:
    checkpoint_target.check(checkpoint_target.case(rng))


def test_checkpoint_snapshots_load_back(checkpoint_target: ft.CheckpointTarget) -> None:
    for data in checkpoint_target.snapshots:
        checkpoint_target.check(ft.CheckpointCase(data, "file", valid=True))


def test_checkpoint_with_a_bad_generator_state_is_refused_unchanged(
        checkpoint_target: ft.CheckpointTarget) -> None:
    """Found by the fuzz: Checkpoint.apply checked only the generator state's size, and torch's set_state
    raised RuntimeError('Invalid mt19937 state') after the model and optimizer were already loaded."""
    import torch

    ck = checkpoint_target.checkpoint
    state = dict(checkpoint_target.states[0])
    state["generator"] = torch.full_like(state["generator"], 255)   # right size, impossible contents
    buf = io.BytesIO()
    torch.save(state, buf)
    checkpoint_target.check(ft.CheckpointCase(ck.seal(buf.getvalue()), "file"))


# --- 4. config ----------------------------------------------------------------------------------


@settings(FUZZ, max_examples=400)
@given(RANDOMS)
def test_config_loading_is_total(config_target: ft.ConfigTarget, rng: random.Random) -> None:
    config_target.check(config_target.case(rng))


def test_rendered_configs_load_the_same_from_file_and_dict(config_target: ft.ConfigTarget) -> None:
    """The differential check is live: the bases render to TOML that loads to the same settings."""
    for kind, bases in config_target.bases.items():
        for values in bases:
            text = ft.render_toml(values).encode()
            config_target.check(ft.ConfigCase(kind, values, text, rendered=True))


@pytest.mark.parametrize("kind, text", [
    ("scenario", b"seed = " + b"9" * 5000),                 # past Python's int-to-str digit limit: ValueError
    ("peer", b"x = " + b"[" * 5000),                          # deeper than tomllib's recursion: RecursionError
    ("scenario", b"name = \"\xff\xfe\""),                     # not UTF-8: UnicodeDecodeError
    ("scenario", b"lr = 1" + b"0" * 400),                     # an int no float holds: OverflowError in coerce
    ("peer", b"attack = \"free_rider\"\nattack_params = {scale = 1" + b"0" * 400 + b"}"),  # OverflowError (attacks)
    # peers: no upper bound made config checks allocate an n x n overlay and a permutation of n
    # (2**31: 16 GiB of RAM); 2**62 fails at once in numpy (ValueError), 10_001 is just past the new bound
    ("scenario", b"peers = 4611686018427387904"),
    ("scenario", b"peers = 10001"),
    ("scenario", b"seed = -1"),                               # numpy refuses negative seeds: ValueError
])
def test_config_files_that_crashed_the_loader(config_target: ft.ConfigTarget, kind: str, text: bytes) -> None:
    path = config_target.dir / "crashed.toml"
    path.write_bytes(text)
    with pytest.raises(ConfigError):
        config_target.scenario.load(path) if kind == "scenario" else config_target.settings.load(path, {})


@pytest.mark.parametrize("values", [
    {1: 2, "x": 3},                                           # sorted() of mixed key types: TypeError
    {"attack": "gaussian", "attack_params": {1: 2, "a": 1}},
    {"aggregator": "trimmed_mean", "aggregator_params": {1: 1}},   # **params with an int key: TypeError
    {"lr": 10**400},
])
def test_config_dicts_that_crashed_the_loader(values: dict[Any, Any]) -> None:
    from p2pfl.peers import settings
    from p2pfl.sim import scenario

    with pytest.raises(ConfigError):
        scenario.build(dict(values))
    if "aggregator_params" not in values:
        with pytest.raises(ConfigError):
            settings.load(None, dict(values))


@pytest.mark.parametrize("weights", [["a"], [None], [[1.0], [1.0, 2.0]], "x", {}])
def test_scenario_rule_weights_are_checked(weights: object) -> None:
    from p2pfl.sim import scenario

    with pytest.raises(ConfigError):
        scenario.build({"peers": 4, "topology": "full", "aggregator": "self_centered_clip",
                        "aggregator_params": {"tau": 1.0, "weights": weights}})


# --- the bench stays runnable -------------------------------------------------------------------


def test_bench_prints_one_json_line_per_target(capsys: pytest.CaptureFixture[str]) -> None:
    assert fuzz.main(["--runs", "200", "--target", "codec", "--max-memory-gb", "0"]) == 0
    (line,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert set(line) >= {"target", "runs", "unexpected", "examples", "peak_rss_mb", "seconds"}
    assert (line["target"], line["runs"], line["unexpected"], line["examples"]) == ("codec", 200, 0, [])
    assert line["peak_rss_mb"] > 0


def test_bench_counts_and_reports_contract_breaks() -> None:
    class Broken(ft.Target):
        name = "broken"

        def case(self, rng: random.Random) -> bytes:
            return rng.randbytes(300)

        def check(self, case: bytes) -> None:
            if case[0] % 2:
                raise KeyError("a parser's own exception")
            assert case[0] % 4 == 0, "accepted something insane"

        def dump(self, case: bytes) -> bytes:
            return case[:ft.HEX_BYTES]

    line = fuzz.fuzz(Broken(), 400, seed=3)
    assert line["unexpected"] == sum(line["classes"].values()) > 0
    assert len(line["examples"]) == 2 and all(len(bytes.fromhex(x)) == ft.HEX_BYTES for x in line["examples"])
    assert set(line["classes"]) == {"KeyError at test_fuzz.py:" + str(_line_of(Broken.check, "KeyError")),
                                     "AssertionError: accepted something insane"}
    again = fuzz.fuzz(Broken(), 400, seed=3)   # the same seed, the same cases
    assert (again["classes"], again["examples"]) == (line["classes"], line["examples"])


def _line_of(fn: Any, text: str) -> int:
    import inspect

    lines, start = inspect.getsourcelines(fn)
    return start + next(i for i, line in enumerate(lines) if text in line)


def test_toml_renderer_escapes_what_toml_refuses_raw() -> None:
    import tomllib

    values = {"a b": "\0\x7f\"\\é😀\u2028", "x": [1, 2.5, math.inf, {"k": True}], "n": math.nan, "e": []}
    back = tomllib.loads(ft.render_toml(values))
    assert back["a b"] == values["a b"] and back["x"] == values["x"] and math.isnan(back["n"]) and back["e"] == []
