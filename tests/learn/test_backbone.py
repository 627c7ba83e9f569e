"""The backbone file (safetensors written and read by p2pfl): round trip, a hostile file is one
BackboneError naming the problem, and what a model and the data split do with a backbone."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfl.errors import ConfigError
from p2pfl.learn import backbone
from p2pfl.learn.backbone import BackboneError, decode, encode
from p2pfl.learn.models import ParamLayout, make_model
from p2pfl.settings import LearningSettings

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@st.composite
def tensor_sets(draw):
    n = draw(st.integers(0, 4))
    out = {}
    for i in range(n):
        shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
        dtype = draw(st.sampled_from(DTYPES))
        values = draw(st.lists(st.floats(-1e4, 1e4, width=16), min_size=int(np.prod(shape)),
                               max_size=int(np.prod(shape))))
        out[f"layer{i}.{draw(st.sampled_from(['weight', 'bias']))}"] = torch.tensor(values, dtype=dtype).reshape(shape)
    return out


@settings(max_examples=60, deadline=None)
@given(tensor_sets(), st.dictionaries(st.text(max_size=8), st.text(max_size=20), max_size=3))
def test_round_trip_keeps_names_shapes_dtypes_values_and_metadata(tensors, meta):
    meta = {k: v for k, v in meta.items() if k != backbone.HASH_KEY}
    data = encode(tensors, meta)
    got, got_meta, digest = decode(data)
    assert list(got) == list(tensors)
    for name, t in tensors.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape
        assert torch.equal(got[name], t)
    assert {k: v for k, v in got_meta.items() if k != backbone.HASH_KEY} == meta
    assert got_meta[backbone.HASH_KEY] == digest and len(digest) == 64
    assert (8 + int.from_bytes(data[:8], "little")) % 8 == 0     # data section 8-byte aligned


def _valid() -> bytes:
    return encode({"a.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3), "a.bias": torch.ones(2)},
                  {"format": backbone.FORMAT})


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_a_corrupted_file_is_one_backbone_error(data):
    raw = bytearray(_valid())
    how = data.draw(st.sampled_from(["flip", "truncate", "append", "random"]))
    if how == "flip":
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] ^= data.draw(st.integers(1, 255))
    elif how == "truncate":
        raw = raw[:data.draw(st.integers(0, len(raw) - 1))]
    elif how == "append":
        raw += data.draw(st.binary(min_size=1, max_size=16))
    else:
        raw = bytearray(data.draw(st.binary(max_size=200)))
    try:
        decode(bytes(raw))
    except BackboneError:
        return
    # a flip inside the JSON padding or a key's spelling can keep a valid file only if the hash still
    # matches, which it cannot: every byte but the padding is hashed
    header_len = int.from_bytes(raw[:8], "little")
    assert raw[8:8 + header_len].decode().rstrip() == _valid()[8:8 + header_len].decode().rstrip()


def _forge(header: dict, body: bytes, *, rehash: bool = True) -> bytes:
    """A file with this header, its hash recomputed so that only the structural problem remains."""
    meta = dict(header.get("__metadata__", {}))
    if rehash:
        meta[backbone.HASH_KEY] = backbone._hash(header, body)
    text = json.dumps({**header, "__metadata__": meta}).encode()
    return len(text).to_bytes(8, "little") + text + body


F32 = np.arange(4, dtype="<f4").tobytes()


@pytest.mark.parametrize("header, body, needle", [
    ({"w": {"dtype": "I64", "shape": [2], "data_offsets": [0, 16]}}, F32 * 2, "dtype 'I64' is not one of"),
    ({"w": {"dtype": "F32", "shape": [5], "data_offsets": [0, 16]}}, F32, "do not hold shape [5]"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, F32 + b"xx", "2 data bytes belong to no tensor"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
      "v": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, F32, "overlaps or leaves a gap"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, F32, "overlaps or leaves a gap at byte 0"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 1 << 40]}}, F32, "do not hold"),
    ({"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, F32, "shape must be"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16], "x": 1}}, F32, "exactly dtype, shape"),
    ({"w": {"dtype": "F32", "shape": [True, 4], "data_offsets": [0, 16]}}, F32, "shape must be"),
    ({"": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, F32, "tensor name"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, "__metadata__": {"k": 3}}, F32,
     "__metadata__ must map strings to strings"),
])
def test_a_forged_header_names_its_problem(header, body, needle):
    with pytest.raises(BackboneError) as e:
        decode(_forge(header, body))
    assert needle in str(e.value)


def test_hash_length_json_and_size_checks():
    ok = {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    with pytest.raises(BackboneError, match="no content hash"):
        decode(_forge(ok, F32, rehash=False))
    tampered = bytearray(_forge(ok, F32))
    tampered[-1] ^= 1
    with pytest.raises(BackboneError, match="content hash mismatch"):
        decode(bytes(tampered))
    with pytest.raises(BackboneError, match="header length"):
        decode((1 << 62).to_bytes(8, "little") + b"{}")
    dup = b'{"w": 1, "w": 2}'
    with pytest.raises(BackboneError, match="duplicate key"):
        decode(len(dup).to_bytes(8, "little") + dup)
    nan = b'{"w": NaN}'
    with pytest.raises(BackboneError, match="not valid JSON"):
        decode(len(nan).to_bytes(8, "little") + nan)
    nested = b"[" * 100_000 + b"]" * 100_000                     # deep JSON: refused, no RecursionError
    with pytest.raises(BackboneError, match="not valid JSON"):
        decode(len(nested).to_bytes(8, "little") + nested)
    big = b"{" + b" " * backbone.MAX_HEADER_BYTES + b"}"            # a header past the bound is never parsed
    with pytest.raises(BackboneError, match="header length"):
        decode(len(big).to_bytes(8, "little") + big)


@pytest.fixture(scope="module")
def digits_backbone(tmp_path_factory):
    path = tmp_path_factory.mktemp("bb") / "digits.safetensors"
    bb, accuracy = backbone.pretrain("digits", "mlp", path, hidden=(16,), epochs=5)
    return path, bb, accuracy


def test_pretrain_saves_every_layer_but_the_head_and_attach_freezes_them(digits_backbone):
    _, bb, accuracy = digits_backbone
    assert set(bb.tensors) == {"1.weight", "1.bias"}                 # Flatten, Linear(64, 16), ReLU, Linear(16, 10)
    assert bb.meta["public_count"] == str(round(0.2 * 1437)) and accuracy > 0.3
    model = make_model("mlp", (64,), 10, hidden=(16,), seed=7)
    bb.attach(model)
    assert torch.equal(model[1].weight, bb.tensors["1.weight"])
    assert ParamLayout.of(model).names == ("3.weight", "3.bias") and ParamLayout.of(model).size == 16 * 10 + 10
    with pytest.raises(BackboneError, match="shape"):
        bb.attach(make_model("mlp", (64,), 10, hidden=(32,)))
    with pytest.raises(BackboneError, match="does not fit"):
        bb.attach(make_model("cnn", (64,), 10))


def test_the_public_part_is_held_out_from_every_peer(digits_backbone):
    _, bb, _ = digits_backbone
    y = np.arange(1437) % 10
    shards = backbone.peer_shards(y, 8, "iid", np.random.default_rng(0), bb)
    used = np.concatenate(shards)
    public = bb.public(1437)
    assert len(public) == 287 and not set(used) & set(public.tolist())
    assert sorted(used.tolist()) == sorted(set(range(1437)) - set(public.tolist()))
    with pytest.raises(BackboneError, match="training split of 1437"):
        bb.public(1000)


def test_settings_check_the_backbone_against_the_run(digits_backbone, tmp_path):
    path, _, _ = digits_backbone
    assert LearningSettings(backbone=str(path), hidden=(16,)).backbone == str(path)
    with pytest.raises(ConfigError, match="pre-trained for hidden \\[16\\], this run uses hidden \\[64\\]"):
        LearningSettings(backbone=str(path))
    with pytest.raises(ConfigError, match="pre-trained for dataset digits"):
        LearningSettings(backbone=str(path), hidden=(16,), dataset="mnist1d")
    with pytest.raises(ConfigError, match="backbone: .*No such file"):
        LearningSettings(backbone=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="backbone: algorithm 'bristle' trains only the output layer"):
        LearningSettings(algorithm="bristle")


def test_cli_pretrain_then_info_and_a_bad_file_in_one_line(tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "p2pfl.cli", "backbone", *map(str, args)], capture_output=True,
                              text=True, timeout=240, env={**os.environ, "COLUMNS": "200"})

    out = tmp_path / "bb.safetensors"
    r = cli("pretrain", "--dataset", "digits", "--model", "mlp", "--out", out, "--public-fraction", "0.1",
            "--hidden", "16", "--epochs", "2")
    assert r.returncode == 0, r.stderr
    digest = backbone.load(out).hash
    assert f"blake3 {digest}" in r.stdout and "trained on 144 of 1437" in r.stdout
    r = cli("info", out)
    assert r.returncode == 0, r.stderr
    assert "1.weight" in r.stdout and "16x64" in r.stdout and f"blake3: {digest} (verified)" in r.stdout
    out.write_bytes(out.read_bytes()[:-1] + b"\0")
    r = cli("info", out)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and "content hash mismatch" in r.stderr
    r = cli("pretrain", "--dataset", "digits", "--model", "mlp", "--out", out, "--public-fraction", "1.5")
    assert r.returncode == 2 and "public_fraction: must be in (0, 1)" in r.stderr


def test_a_synthetic_backbone_fits_only_runs_drawing_the_same_data(tmp_path):
    path = tmp_path / "syn.safetensors"
    backbone.pretrain("synthetic", "mlp", path, hidden=(8,), epochs=1, seed=3)
    assert LearningSettings(dataset="synthetic", backbone=str(path), hidden=(8,), seed=3).seed == 3
    with pytest.raises(ConfigError, match="drawn with seed 3, this run draws it with seed 0"):
        LearningSettings(dataset="synthetic", backbone=str(path), hidden=(8,), seed=0)
