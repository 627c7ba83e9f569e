"""Identity: libp2p-compatible peer IDs and key files, atomic 0600 saves, strict loading."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfl.errors import ConfigError, Reject, RemoteProtocolError
from p2pfl.files import load_identity, save_identity
from p2pfl.gossip.identity import (
    Identity,
    b58decode,
    b58encode,
    peer_id_from_public_bytes,
    public_key_from_peer_id,
    verify,
)

libp2p = pytest.importorskip("libp2p")
from libp2p.peer.id import ID  # noqa: E402

SEED = bytes(range(32))


def libp2p_peer_id(path: Path) -> str:
    return str(ID.from_pubkey(libp2p.load_identity(path).public_key))


def test_peer_id_matches_libp2p_for_same_seed() -> None:
    ours = Identity.generate(SEED)
    theirs = libp2p.create_identity_from_seed(SEED)
    assert ours.peer_id == str(ID.from_pubkey(theirs.public_key))
    assert ours.peer_id.startswith("12D3KooW")
    assert ours.public_bytes == theirs.public_key.to_bytes()
    assert ours.private_bytes() == SEED


def test_saved_file_loads_in_libp2p_with_same_id(tmp_path: Path) -> None:
    ident = Identity.generate()
    path = tmp_path / "node.key"
    save_identity(ident, path)
    assert libp2p_peer_id(path) == ident.peer_id
    # byte-identical to what libp2p itself writes for this key
    assert path.read_bytes() == libp2p.create_identity_from_seed(ident.private_bytes()).private_key.serialize()


def test_libp2p_saved_file_loads_with_ours(tmp_path: Path) -> None:
    path = tmp_path / "theirs.key"
    libp2p.save_identity(libp2p.generate_new_ed25519_identity(), path)
    assert load_identity(path).peer_id == libp2p_peer_id(path)


def test_go_libp2p_64_byte_key_loads(tmp_path: Path) -> None:
    ident = Identity.generate(SEED)
    path = tmp_path / "go.key"
    path.write_bytes(b"\x08\x01\x12\x40" + SEED + ident.public_bytes)
    assert load_identity(path).peer_id == ident.peer_id


def test_save_is_0600_atomic_and_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "node.key"
    path.parent.mkdir()
    path.write_bytes(b"old")
    os.chmod(path, 0o644)
    ident = Identity.generate()
    save_identity(ident, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(path.parent) == ["node.key"]  # no temp file left behind
    assert load_identity(path).peer_id == ident.peer_id


def test_save_creates_parent_dirs(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "node.key"
    save_identity(Identity.generate(SEED), path)
    assert load_identity(path).peer_id == Identity.generate(SEED).peer_id


def test_seed_is_deterministic() -> None:
    assert Identity.generate(SEED).peer_id == Identity.generate(SEED).peer_id
    assert Identity.generate(SEED).peer_id != Identity.generate(bytes(32)).peer_id
    assert Identity.generate().peer_id != Identity.generate().peer_id


@pytest.mark.parametrize("seed", [b"", b"short", bytes(31), bytes(33), "x" * 32])
def test_bad_seed_is_config_error(seed: object) -> None:
    with pytest.raises(ConfigError):
        Identity.generate(seed)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"garbage",
        b"\x08\x01\x12\x20" + bytes(31),  # truncated data
        b"\x08\x01\x12\x10" + bytes(16),  # wrong key length
        b"\x08\x00\x12\x20" + bytes(32),  # RSA key type
        b"\x08\x02\x12\x20" + bytes(32),  # secp256k1
        b"\x12\x20" + bytes(32),  # missing type
        b"\x08\x01",  # missing data
        b"\x08\x01\x12\x20" + bytes(32) + b"\x1a\x00",  # unknown field
        b"\x08\x01\x08\x01\x12\x20" + bytes(32),  # duplicated field
        b"\x08\x01\x12\x40" + bytes(64),  # 64-byte form whose public half does not match
        b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",  # overlong varint
    ],
)
def test_corrupt_file_is_config_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.key"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match="bad.key"):
        load_identity(path)


def test_missing_file_and_directory_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.key"):
        load_identity(tmp_path / "nope.key")
    with pytest.raises(ConfigError, match=str(tmp_path.name)):
        load_identity(tmp_path)


def test_sign_and_verify_from_peer_id_alone() -> None:
    ident = Identity.generate(SEED)
    sig = ident.sign(b"hello")
    assert len(sig) == 64
    assert verify(ident.peer_id, b"hello", sig)
    assert not verify(ident.peer_id, b"hellO", sig)
    assert not verify(Identity.generate().peer_id, b"hello", sig)
    pub = public_key_from_peer_id(ident.peer_id)
    pub.verify(sig, b"hello")  # raises if wrong
    assert public_key_from_peer_id(ident.peer_id) is pub  # cached
    assert "private" not in repr(ident) and ident.peer_id in repr(ident)


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "not base58 0OIl",
        "12D3KooW",  # too short
        "Qm" + "1" * 44,  # sha256 multihash style (RSA keys)
        b58encode(b"\x00\x24\x08\x02\x12\x20" + bytes(32)),  # secp256k1 key type
        b58encode(b"\x00\x24\x08\x01\x12\x20" + bytes(33)),  # too long
        "1" * 200,
    ],
)
def test_malformed_peer_id_is_remote_error(bad: str) -> None:
    with pytest.raises(RemoteProtocolError) as e:
        public_key_from_peer_id(bad)
    assert e.value.reason is Reject.BAD_HEADER


def test_non_str_peer_id_is_remote_error() -> None:
    with pytest.raises(RemoteProtocolError):
        public_key_from_peer_id(["not", "hashable"])  # type: ignore[arg-type]


def test_peer_id_from_public_bytes() -> None:
    ident = Identity.generate(SEED)
    assert peer_id_from_public_bytes(ident.public_bytes) == ident.peer_id
    with pytest.raises(ConfigError):
        peer_id_from_public_bytes(b"short")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_base58_round_trip(data: bytes) -> None:
    text = b58encode(data)
    assert b58decode(text) == data
    assert b58encode(b58decode(text)) == text


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet="123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz", max_size=60))
def test_base58_text_round_trip(text: str) -> None:
    assert b58encode(b58decode(text)) == text


def test_base58_matches_reference() -> None:
    # the reference vectors of the base58 library libp2p uses
    base58 = pytest.importorskip("base58")
    for data in (b"", b"\0", b"\0\0\x01", b"hello world", bytes(range(256))):
        assert b58encode(data) == base58.b58encode(data).decode()
