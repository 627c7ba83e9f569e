"""Wire codec: round trips, zero copy, and strict rejection of every defect with a reason."""

from __future__ import annotations

import struct
import warnings
from typing import Any

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pfl.errors import LocalProtocolError, Reject, RemoteProtocolError
from p2pfl.gossip.codec import (
    DTYPES,
    MAX_HEADER_BYTES,
    Frame,
    decode,
    encode,
    frame_buffer,
    read_frame_length,
)
from p2pfl.gossip.identity import Identity
from p2pfl.testing import DROP, forged_frame_bytes

ALICE = Identity.generate(bytes(32))
BOB = Identity.generate(b"\x01" * 32)
SCHEMA = "ab" * 32
MAX = 1 << 30


def bits_to_payload(bits: np.ndarray, dtype: str) -> np.ndarray:
    """uint16/uint32 bit patterns -> the array type encode takes for `dtype`."""
    return {"f32": lambda: bits.astype(np.uint32).view(np.float32),
            "f16": lambda: bits.astype(np.uint16).view(np.float16),
            "bf16": lambda: bits.astype(np.uint16)}[dtype]()


def random_payload(n: int, dtype: str, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    if dtype == "f32":
        return x
    if dtype == "f16":
        return x.astype(np.float16)
    return (x.view(np.uint32) >> 16).astype(np.uint16)  # bf16 bits (truncation keeps finiteness)


def make(payload: Any, identity: Identity = ALICE, **kw: Any) -> bytes:
    args = {"kind": "model", "round": 1, "step": 0, "schema": SCHEMA} | kw
    return b"".join(encode(identity, payload=payload, **args))


def forge(payload: bytes = b"\0" * 8, signer: Identity = ALICE, **fields: Any) -> bytes:
    """The frame layout written independently of the codec (p2pfl.testing), with overridable fields."""
    return forged_frame_bytes(signer, payload, **({"round": 1, "schema": SCHEMA} | fields))


def reject(data: Any, reason: Reject | None = None, **kw: Any) -> RemoteProtocolError:
    """Assert decode refuses `data` with a RemoteProtocolError (and no other exception type)."""
    kw = {"schema": SCHEMA, "max_frame_bytes": MAX} | kw
    try:
        frame = decode(data, **kw)
    except RemoteProtocolError as e:
        if reason is not None:
            assert e.reason is reason, str(e)
        return e
    raise AssertionError(f"accepted a defective frame: {frame}")


def test_spec_encoding_is_byte_identical_to_independent_forge() -> None:
    payload = np.arange(2, dtype=np.float32)
    assert make(payload) == forge(payload.tobytes())


@settings(max_examples=60, deadline=None)
@given(
    n=st.sampled_from([0, 1, 2, 3, 7, 64, 1000]) | st.integers(0, 300),
    dtype=st.sampled_from(DTYPES),
    rnd=st.integers(0, 2**63 - 1),
    step=st.integers(0, 2**63 - 1),
    kind=st.text(min_size=1, max_size=64),
    as_tensor=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_round_trip(n: int, dtype: str, rnd: int, step: int, kind: str, as_tensor: bool, seed: int) -> None:
    arr = random_payload(n, dtype, seed)
    payload: Any = arr
    if as_tensor:
        t = torch.from_numpy(arr.view(np.int16) if dtype == "bf16" else arr)
        payload = t.view(torch.bfloat16) if dtype == "bf16" else t
    data = make(payload, kind=kind, round=rnd, step=step)
    f = decode(bytearray(data), schema=SCHEMA, max_frame_bytes=len(data), peer=ALICE.peer_id)
    assert (f.kind, f.sender, f.round, f.step) == (kind, ALICE.peer_id, rnd, step)
    assert (f.schema, f.dtype) == (SCHEMA, dtype)
    assert f.payload.shape == (n,) and f.payload.tobytes() == arr.tobytes()
    t = f.tensor()
    assert t.dtype == {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[dtype]
    if as_tensor:
        assert torch.equal(t, payload)


def test_encode_does_not_copy() -> None:
    arr = np.arange(1000, dtype=np.float32)
    parts = encode(ALICE, kind="model", round=0, step=0, schema=SCHEMA, payload=arr)
    assert len(parts) == 2 and isinstance(parts[1], memoryview)
    assert np.shares_memory(np.frombuffer(parts[1], dtype=np.uint8), arr)
    for t in (torch.randn(1000), torch.randn(1000, dtype=torch.bfloat16), torch.randn(1000).half()):
        body = encode(ALICE, kind="model", round=0, step=0, schema=SCHEMA, payload=t)[1]
        assert np.frombuffer(body, dtype=np.uint8).ctypes.data == t.data_ptr()
    grad = torch.randn(10, requires_grad=True)
    assert np.frombuffer(encode(ALICE, kind="m", round=0, step=0, schema=SCHEMA, payload=grad)[1],
                         dtype=np.uint8).ctypes.data == grad.data_ptr()


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_does_not_copy(dtype: str) -> None:
    buf = bytearray(make(random_payload(1000, dtype)))
    f = decode(buf, schema=SCHEMA, max_frame_bytes=MAX)
    assert np.shares_memory(f.payload, np.frombuffer(buf, dtype=np.uint8))
    assert f.tensor().data_ptr() == f.payload.ctypes.data
    ro = decode(bytes(buf), schema=None, max_frame_bytes=MAX)  # read-only buffer: no warning leaks
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ro.tensor().data_ptr() == ro.payload.ctypes.data


def test_frame_buffer_aligns_payload() -> None:
    data = make(random_payload(1001, "f32"), kind="k" * 3)
    view = frame_buffer(data[:8], max_frame_bytes=MAX)
    view[8:] = data[8:]
    f = decode(view, schema=SCHEMA, max_frame_bytes=MAX)
    assert f.payload.ctypes.data % 64 == 0
    assert np.shares_memory(f.payload, np.frombuffer(view, dtype=np.uint8))
    reject(data, Reject.OVERSIZE, max_frame_bytes=len(data) - 1)
    with pytest.raises(RemoteProtocolError) as e:
        frame_buffer(data[:8], max_frame_bytes=len(data) - 1)
    assert e.value.reason is Reject.OVERSIZE
    with pytest.raises(RemoteProtocolError):
        frame_buffer(struct.pack(">II", 100, 200), max_frame_bytes=MAX)


@pytest.mark.parametrize("offset", [1, 2, 3, 5])
def test_unaligned_buffers_decode_and_detect_nan(offset: int) -> None:
    arr = random_payload(100_003, "f32")
    arr[[0, 5000]] = 3e38  # finite, but overflows dot(a, a): exercises the exact fallback
    for payload, ok in ((arr, True), (np.concatenate([arr, [np.nan]]).astype(np.float32), False)):
        data = make(payload)
        raw = bytearray(offset) + data
        view = memoryview(raw)[offset:]
        if ok:
            assert decode(view, schema=SCHEMA, max_frame_bytes=MAX).payload.tobytes() == payload.tobytes()
        else:
            reject(view, Reject.NON_FINITE)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(0, 40), dtype=st.sampled_from(DTYPES), where=st.floats(0, 1, exclude_max=True),
       xor=st.integers(1, 255))
def test_any_single_byte_flip_is_rejected(n: int, dtype: str, where: float, xor: int) -> None:
    data = bytearray(make(random_payload(n, dtype)))
    data[int(where * len(data))] ^= xor
    reject(data)


def test_every_header_byte_bit_flip_is_rejected() -> None:
    payload = random_payload(20_000, "f32")  # 80 KB: nbytes takes the 5-byte uint32 form
    data = make(payload)
    hlen = struct.unpack(">I", data[4:8])[0]
    head_end = 8 + hlen
    positions = list(range(head_end)) + list(range(head_end, len(data), 997)) + [len(data) - 1]
    for pos in positions:
        for xor in (1, 2, 4, 8, 16, 32, 64, 128, 255):
            bad = bytearray(data)
            bad[pos] ^= xor
            e = reject(bad)
            if pos >= head_end:
                assert e.reason is Reject.BAD_DIGEST


def test_msgpack_type_byte_substitutions_are_rejected() -> None:
    # Same-layout type swaps (uint32 0xce -> int32 0xd2, str8 0xd9 -> bin8 0xc4, ...) decode to
    # the same or similar values: the canonical-encoding and type checks must catch them all.
    data = make(random_payload(20_000, "f32"))
    head_end = 8 + struct.unpack(">I", data[4:8])[0]
    markers = list(range(0xC0, 0xE0)) + [0x00, 0x01, 0x7F, 0x80, 0x8F, 0x90, 0xA0, 0xBF, 0xE0, 0xFF]
    for pos in range(8, head_end):
        for m in markers:
            if data[pos] != m:
                bad = bytearray(data)
                bad[pos] = m
                reject(bad)


def test_non_canonical_but_validly_signed_header_is_rejected() -> None:
    data = make(random_payload(20_000, "f32"))
    i = data.index(b"\xa6nbytes\xce")
    swapped = data[: i + 7] + b"\xd2" + data[i + 8 :]  # same value as int32
    assert msgpack.unpackb(swapped[8 : 8 + struct.unpack(">I", data[4:8])[0]])["nbytes"] == 80_000
    reject(swapped, Reject.BAD_HEADER)
    # long-form string for a short value: same decoded header, different bytes
    i = data.index(b"\xa5model")
    longer = data[:i] + b"\xd9\x05model" + data[i + 6 :]
    total, hlen = struct.unpack(">II", data[:8])
    reject(struct.pack(">II", total + 1, hlen + 1) + longer[8:], Reject.BAD_HEADER)


def test_every_truncation_and_extension_is_rejected() -> None:
    data = make(random_payload(50, "f16"))
    for cut in range(len(data)):
        reject(data[:cut])
    reject(data + b"\0", Reject.BAD_LENGTH)
    big = make(random_payload(100_000, "f32"))
    for cut in (0, 3, 4, 7, 8, 100, len(big) - 4, len(big) - 1):
        reject(big[:cut])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 7, 100_003])
def test_nan_and_inf_are_rejected_even_when_signed(dtype: str, n: int) -> None:
    bad_bits = {"f32": [0x7FC00000, 0xFFC00000, 0x7F800001, 0x7F800000, 0xFF800000],
                "f16": [0x7E00, 0xFE00, 0x7C01, 0x7C00, 0xFC00],
                "bf16": [0x7FC0, 0xFFC0, 0x7F81, 0x7F80, 0xFF80]}[dtype]
    rng = np.random.default_rng(n)
    for bits in bad_bits:
        for pos in sorted({0, n // 2, n - 1, int(rng.integers(n))}):
            arr = random_payload(n, dtype).copy()
            arr.view(np.uint32 if dtype == "f32" else np.uint16)[pos] = bits
            reject(make(arr), Reject.NON_FINITE)


@pytest.mark.parametrize("dtype,max_bits", [("f32", 0x7F7FFFFF), ("f16", 0x7BFF), ("bf16", 0x7F7F)])
def test_largest_finite_values_are_accepted(dtype: str, max_bits: int) -> None:
    arr = bits_to_payload(np.array([max_bits, max_bits | (1 << (31 if dtype == "f32" else 15))] * 50_000), dtype)
    f = decode(make(arr), schema=SCHEMA, max_frame_bytes=MAX)
    assert f.payload.tobytes() == arr.tobytes()


def test_wrong_schema_and_any_schema() -> None:
    data = make(random_payload(4, "f32"))
    e = reject(data, Reject.WRONG_SCHEMA, schema="cd" * 32)
    assert e.peer == ALICE.peer_id  # authenticated by then
    assert decode(data, schema=None, max_frame_bytes=MAX).schema == SCHEMA


def test_oversize_and_read_frame_length() -> None:
    data = make(random_payload(100, "f32"))
    assert read_frame_length(data[:4], len(data)) == len(data) - 4
    with pytest.raises(RemoteProtocolError) as e:
        read_frame_length(data[:4], len(data) - 1, peer="P")
    assert e.value.reason is Reject.OVERSIZE and e.value.peer == "P"
    with pytest.raises(RemoteProtocolError) as e:
        read_frame_length(b"\0\0\0\3", MAX)
    assert e.value.reason is Reject.BAD_LENGTH
    with pytest.raises(LocalProtocolError):
        read_frame_length(b"\0\0\0", MAX)
    reject(data, Reject.OVERSIZE, max_frame_bytes=len(data) - 1)
    reject(b"\xff\xff\xff\xff" + data[4:], Reject.OVERSIZE)


def test_signed_by_a_claiming_b_is_bad_signature() -> None:
    e = reject(forge(signer=ALICE, **{"from": BOB.peer_id}), Reject.BAD_SIGNATURE)
    assert e.peer is None  # not authenticated: do not blame BOB
    e = reject(forge(signer=ALICE, **{"from": BOB.peer_id}), Reject.FORGED_SENDER, peer=ALICE.peer_id)
    assert e.peer == ALICE.peer_id


def test_sender_must_be_the_stream_peer() -> None:
    reject(make(random_payload(4, "f32")), Reject.FORGED_SENDER, peer=BOB.peer_id)


P8 = b"\0" * 8


@pytest.mark.parametrize(
    "payload,fields,reason",
    [
        (P8, {"v": 2}, Reject.UNKNOWN_VERSION),
        (P8, {"v": 0}, Reject.UNKNOWN_VERSION),
        (P8, {"v": "1"}, Reject.BAD_HEADER),
        (P8, {"v": True}, Reject.BAD_HEADER),
        (P8, {"v": DROP}, Reject.BAD_HEADER),
        (P8, {"extra": 1}, Reject.BAD_HEADER),
        (P8, {"kind": DROP}, Reject.BAD_HEADER),
        (P8, {"digest": DROP}, Reject.BAD_HEADER),
        (P8, {"kind": ""}, Reject.BAD_HEADER),
        (P8, {"kind": "k" * 65}, Reject.BAD_HEADER),
        (P8, {"kind": b"model"}, Reject.BAD_HEADER),
        (P8, {"schema": ""}, Reject.BAD_HEADER),
        (P8, {"schema": 5}, Reject.BAD_HEADER),
        (P8, {"round": -1}, Reject.BAD_HEADER),
        (P8, {"round": 1.0}, Reject.BAD_HEADER),
        (P8, {"round": True}, Reject.BAD_HEADER),
        (P8, {"step": "0"}, Reject.BAD_HEADER),
        (P8, {"step": 2**64 - 1}, Reject.BAD_HEADER),
        (P8, {"round": None}, Reject.BAD_HEADER),
        (P8, {"dtype": "f64"}, Reject.BAD_HEADER),
        (P8, {"dtype": b"f32"}, Reject.BAD_HEADER),
        (P8, {"nbytes": -8}, Reject.BAD_HEADER),
        (P8, {"nbytes": "8"}, Reject.BAD_HEADER),
        (P8, {"digest": b"x" * 31}, Reject.BAD_HEADER),
        (P8, {"digest": "x" * 32}, Reject.BAD_HEADER),
        (P8, {"sig": b"x" * 63}, Reject.BAD_HEADER),
        (P8, {"from": "not-a-peer-id"}, Reject.BAD_HEADER),
        (P8, {"from": "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"}, Reject.BAD_HEADER),
        (P8, {"from": 7}, Reject.BAD_HEADER),
        (P8, {"sig": b"x" * 64}, Reject.BAD_SIGNATURE),
        (P8, {"nbytes": 12}, Reject.WRONG_SIZE),
        (P8, {"nbytes": 4}, Reject.WRONG_SIZE),
        (b"\0" * 6, {}, Reject.WRONG_SIZE),  # not a multiple of the f32 itemsize
        (b"\0" * 3, {"dtype": "bf16"}, Reject.WRONG_SIZE),
        (P8, {"digest": b"\0" * 32}, Reject.BAD_DIGEST),
        (P8, {"schema": "other"}, Reject.WRONG_SCHEMA),
    ],
)
def test_header_defects_have_the_right_reason(payload: bytes, fields: dict[str, Any], reason: Reject) -> None:
    reject(forge(payload, **fields), reason)


def test_valid_forged_frame_is_accepted() -> None:
    f = decode(forge(b"\0" * 6, dtype="f16"), schema=SCHEMA, max_frame_bytes=MAX)
    assert f.dtype == "f16" and f.payload.shape == (3,)


def test_header_must_be_a_msgpack_map() -> None:
    def raw(head: bytes, payload: bytes = b"") -> bytes:
        return struct.pack(">II", 4 + len(head) + len(payload), len(head)) + head + payload

    reject(raw(b"\xc1"), Reject.BAD_MSGPACK)  # never-used msgpack byte
    reject(raw(b"\x92\x01"), Reject.BAD_MSGPACK)  # truncated array
    reject(raw(b""), Reject.BAD_MSGPACK)
    reject(raw(msgpack.packb({1: 2})), Reject.BAD_MSGPACK)  # non-str map key
    reject(raw(msgpack.packb([1, 2])), Reject.BAD_HEADER)
    reject(raw(msgpack.packb({"v": 1}) + b"\x00"), Reject.BAD_MSGPACK)  # trailing data
    reject(raw(b"\x91" * 600 + b"\x90"), Reject.BAD_HEADER)  # deep nesting, but a list
    reject(raw(b"\x91" * 1023 + b"\x90"))  # at msgpack's stack limit: refused, never a crash
    reject(raw(b"\0" * (MAX_HEADER_BYTES + 1)), Reject.BAD_LENGTH)
    reject(struct.pack(">II", 4, 5) + b"\0", Reject.BAD_LENGTH)  # header longer than frame


@pytest.mark.parametrize(
    "payload",
    [
        np.zeros((2, 2), np.float32),
        np.zeros(10, np.float32)[::2],
        np.zeros(3, np.float64),
        np.zeros(3, np.int32),
        np.zeros(3, ">f4"),
        [1.0, 2.0],
        torch.zeros(3, dtype=torch.float64),
        torch.zeros(2, 2),
        torch.zeros(10)[::2],
    ],
)
def test_encode_rejects_bad_payloads(payload: Any) -> None:
    with pytest.raises(LocalProtocolError):
        make(payload)


@pytest.mark.parametrize(
    "fields",
    [{"kind": ""}, {"kind": 3}, {"round": -1}, {"round": True}, {"step": 2**63}, {"schema": ""}, {"schema": None}],
)
def test_encode_rejects_bad_fields(fields: dict[str, Any]) -> None:
    with pytest.raises(LocalProtocolError):
        make(np.zeros(2, np.float32), **fields)


def test_frame_validates_its_fields() -> None:
    with pytest.raises(LocalProtocolError):
        Frame("model", ALICE.peer_id, 0, 0, SCHEMA, "f64", np.zeros(2))
    with pytest.raises(LocalProtocolError):
        Frame("model", ALICE.peer_id, 0, 0, SCHEMA, "f32", np.zeros(2, np.float16))


def test_decode_rejects_non_contiguous_buffer_as_local_error() -> None:
    data = bytearray(make(np.zeros(2, np.float32)) * 2)
    with pytest.raises(LocalProtocolError):
        decode(memoryview(data)[::2], schema=None, max_frame_bytes=MAX)
