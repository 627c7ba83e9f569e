"""Ed25519 peer identity, byte-compatible with libp2p, without importing libp2p.

Theory of operation
-------------------
A peer is an Ed25519 key. Its libp2p peer ID is the base58btc text of an *identity* multihash
(code 0x00) over the protobuf-encoded public key::

    peer_id = base58btc(0x00 0x24 | 0x08 0x01 0x12 0x20 | pub32)        -> "12D3KooW..."
                        mh id,len  KeyType=Ed25519, Data=32 bytes

Because the key is embedded (not hashed), a receiver recovers the public key from the peer ID
alone and verifies a frame's signature without any key exchange (`public_key_from_peer_id`).

The key file is the libp2p protobuf-serialized ``PrivateKey`` message, exactly what py-libp2p
0.8.1's ``save_identity``/``load_identity`` write and read::

    0x08 0x01 (KeyType = Ed25519) | 0x12 0x20 (Data, 32 bytes) | seed32

py-libp2p stores the 32-byte RFC 8032 *seed* in Data (``bytes(nacl.signing.SigningKey)``), whereas
go-/rust-libp2p store 64 bytes (seed || public key). ``from_key_file_bytes`` accepts both (checking
that the embedded public key matches the seed); ``key_file_bytes`` gives the 32-byte form, which is
the only one py-libp2p can read back. Reading and writing key files (atomically, mode 0600, refusing
a key others can read) is `p2pfl.files.save_identity` / `load_identity`.

Invariants: the private key never appears in ``repr``. This module does no I/O and imports
neither trio nor libp2p (gossip/ is sans-IO).
"""

from __future__ import annotations

import functools
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from p2pfl.errors import ConfigError, Reject, RemoteProtocolError

__all__ = [
    "Identity",
    "b58decode",
    "b58encode",
    "peer_id_from_public_bytes",
    "public_key_from_peer_id",
    "verify",
]

SEED_LEN: Final = 32
PUBLIC_KEY_LEN: Final = 32
SIGNATURE_LEN: Final = 64

# libp2p crypto.proto: enum KeyType { RSA = 0; Ed25519 = 1; Secp256k1 = 2; ECDSA = 3; }
_KEYTYPE_ED25519: Final = 1
# protobuf PublicKey{Type: Ed25519, Data: <32 bytes>} = field 1 varint 1, field 2 length 32.
_PB_ED25519_PREFIX: Final = b"\x08\x01\x12\x20"
# identity multihash: code 0x00, digest length 36 (= the 36-byte protobuf above).
_PEER_ID_PREFIX: Final = b"\x00\x24" + _PB_ED25519_PREFIX
_PEER_ID_BYTES: Final = len(_PEER_ID_PREFIX) + PUBLIC_KEY_LEN  # 38
_MAX_PEER_ID_CHARS: Final = 64  # an Ed25519 peer ID is 52 characters; bound the base58 work

# --- base58btc --------------------------------------------------------------------------------

_B58_ALPHABET: Final = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX: Final = {c: i for i, c in enumerate(_B58_ALPHABET)}


def b58encode(data: bytes) -> str:
    """Bitcoin-alphabet base58: each leading zero byte becomes one leading '1'."""
    n = int.from_bytes(data, "big")
    out = []
    while n:
        n, r = divmod(n, 58)
        out.append(_B58_ALPHABET[r])
    zeros = len(data) - len(data.lstrip(b"\0"))
    return "1" * zeros + "".join(reversed(out))


def b58decode(text: str) -> bytes:
    """Inverse of `b58encode`; raises ValueError on a character outside the alphabet."""
    n = 0
    for c in text:
        digit = _B58_INDEX.get(c)
        if digit is None:
            raise ValueError(f"invalid base58 character {c!r}")
        n = n * 58 + digit
    zeros = len(text) - len(text.lstrip("1"))
    return b"\0" * zeros + n.to_bytes((n.bit_length() + 7) // 8, "big")


# --- tiny protobuf (libp2p crypto.proto PrivateKey / PublicKey) ----------------------------------


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated or overlong varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, pos


def _parse_key_message(buf: bytes) -> tuple[int, bytes]:
    """Parse a libp2p ``PrivateKey``/``PublicKey`` message into (key_type, data). Strict: only
    fields 1 (varint Type) and 2 (bytes Data), each exactly once."""
    key_type: int | None = None
    data: bytes | None = None
    pos = 0
    while pos < len(buf):
        tag, pos = _read_varint(buf, pos)
        field, wire = tag >> 3, tag & 7
        if field == 1 and wire == 0 and key_type is None:
            key_type, pos = _read_varint(buf, pos)
        elif field == 2 and wire == 2 and data is None:
            length, pos = _read_varint(buf, pos)
            if pos + length > len(buf):
                raise ValueError("truncated Data field")
            data, pos = buf[pos : pos + length], pos + length
        else:
            raise ValueError(f"unexpected protobuf field {field} (wire type {wire})")
    if key_type is None or data is None:
        raise ValueError("missing Type or Data field")
    return key_type, data


def _encode_private_key_message(seed: bytes) -> bytes:
    return bytes([0x08, _KEYTYPE_ED25519, 0x12, len(seed)]) + seed


# --- peer IDs ---------------------------------------------------------------------------------


def peer_id_from_public_bytes(public_bytes: bytes) -> str:
    """The libp2p peer ID ("12D3KooW...") of a raw 32-byte Ed25519 public key."""
    if len(public_bytes) != PUBLIC_KEY_LEN:
        raise ConfigError(f"an Ed25519 public key is {PUBLIC_KEY_LEN} bytes, got {len(public_bytes)}")
    return b58encode(_PEER_ID_PREFIX + public_bytes)


def public_key_from_peer_id(peer_id: str) -> Ed25519PublicKey:
    """Recover the Ed25519 public key embedded in a libp2p peer ID.

    Raises `RemoteProtocolError(Reject.BAD_HEADER)` if the ID is not an Ed25519 identity-multihash
    peer ID (RSA/secp256k1 IDs, sha256 multihashes and garbage are all refused). Cached: the same
    handful of neighbour IDs recur in every frame.
    """
    if not isinstance(peer_id, str) or not 0 < len(peer_id) <= _MAX_PEER_ID_CHARS:
        raise RemoteProtocolError(Reject.BAD_HEADER, "peer ID is not a short string")
    return _public_key_from_peer_id(peer_id)


@functools.lru_cache(maxsize=4096)
def _public_key_from_peer_id(peer_id: str) -> Ed25519PublicKey:
    try:
        raw = b58decode(peer_id)
    except ValueError as e:
        raise RemoteProtocolError(Reject.BAD_HEADER, f"peer ID is not base58btc: {e}") from None
    if len(raw) != _PEER_ID_BYTES or not raw.startswith(_PEER_ID_PREFIX):
        raise RemoteProtocolError(Reject.BAD_HEADER, "peer ID is not an Ed25519 identity multihash")
    try:
        return Ed25519PublicKey.from_public_bytes(raw[len(_PEER_ID_PREFIX) :])
    except ValueError as e:  # pragma: no cover - cryptography accepts any 32 bytes today
        raise RemoteProtocolError(Reject.BAD_HEADER, f"bad Ed25519 public key: {e}") from None


def verify(peer_id: str, data: bytes, signature: bytes) -> bool:
    """True iff `signature` is `peer_id`'s Ed25519 signature of `data`. Raises
    `RemoteProtocolError(BAD_HEADER)` for a malformed peer ID."""
    try:
        public_key_from_peer_id(peer_id).verify(signature, data)
    except InvalidSignature:
        return False
    return True


# --- the identity -----------------------------------------------------------------------------


class Identity:
    """This peer's Ed25519 key pair and libp2p peer ID."""

    __slots__ = ("_key", "_peer_id", "_public_bytes")

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self._public_bytes = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self._peer_id = peer_id_from_public_bytes(self._public_bytes)

    @classmethod
    def generate(cls, seed: bytes | None = None) -> Identity:
        """A fresh random identity, or a deterministic one from a 32-byte seed (the RFC 8032
        private key; the same seed gives the same peer ID as libp2p's
        ``create_identity_from_seed``)."""
        if seed is None:
            return cls(Ed25519PrivateKey.generate())
        if not isinstance(seed, (bytes, bytearray)) or len(seed) != SEED_LEN:
            raise ConfigError(f"identity seed must be exactly {SEED_LEN} bytes")
        return cls(Ed25519PrivateKey.from_private_bytes(bytes(seed)))

    @property
    def peer_id(self) -> str:
        """The libp2p peer ID, e.g. ``"12D3KooW..."``."""
        return self._peer_id

    @property
    def public_bytes(self) -> bytes:
        """The raw 32-byte Ed25519 public key."""
        return self._public_bytes

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self._key.public_key()

    def private_bytes(self) -> bytes:
        """The 32-byte secret seed (what ``libp2p.create_identity_from_seed`` takes). Secret."""
        return self._key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )

    def sign(self, data: bytes | bytearray | memoryview) -> bytes:
        """64-byte Ed25519 signature of `data`."""
        return self._key.sign(bytes(data))

    def __repr__(self) -> str:
        return f"Identity(peer_id={self._peer_id!r})"

    # -- the key file's bytes (reading and writing the file is p2pfl.files: gossip/ does no I/O) ----

    def key_file_bytes(self) -> bytes:
        """The key in libp2p's protobuf format (what ``libp2p.load_identity`` reads). Secret."""
        return _encode_private_key_message(self.private_bytes())

    @classmethod
    def from_key_file_bytes(cls, raw: bytes) -> Identity:
        """Parse a libp2p protobuf private key (ours, py-libp2p's, or go-libp2p's 64-byte form);
        ValueError saying what is wrong."""
        return cls(_private_key_from_message(raw))


def _private_key_from_message(raw: bytes) -> Ed25519PrivateKey:
    key_type, data = _parse_key_message(raw)
    if key_type != _KEYTYPE_ED25519:
        raise ValueError(f"key type {key_type} is not Ed25519 ({_KEYTYPE_ED25519})")
    if len(data) not in (SEED_LEN, SEED_LEN + PUBLIC_KEY_LEN):
        raise ValueError(f"Ed25519 key data is {len(data)} bytes, expected 32 or 64")
    key = Ed25519PrivateKey.from_private_bytes(data[:SEED_LEN])
    if len(data) == SEED_LEN + PUBLIC_KEY_LEN:  # go-libp2p layout: seed || public key
        pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        if data[SEED_LEN:] != pub:
            raise ValueError("embedded public key does not match the private key")
    return key
