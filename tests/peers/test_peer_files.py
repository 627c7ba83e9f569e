"""The files a peer reads and writes: a planted metrics.jsonl link or FIFO, a key others can read,
a checkpoint that a start without --resume would overwrite, an empty network key: each is refused
with a ConfigError naming the file."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from p2pfl.errors import ConfigError
from p2pfl.files import MetricsLog, load_identity, save_identity
from p2pfl.gossip.identity import Identity
from p2pfl.peers import checkpoint
from p2pfl.peers.settings import PeerSettings, load

LOOPBACK = ("/ip4/127.0.0.1/tcp/0",)
PSK = "ab" * 32


# -- metrics.jsonl -----------------------------------------------------------------------------------
def test_metrics_log_appends_to_a_regular_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "old"}\n')
    log = MetricsLog(path)
    log.write({"kind": "new"})
    log.close()
    assert path.read_text() == '{"kind": "old"}\n{"kind": "new"}\n'
    fresh = MetricsLog(tmp_path / "other.jsonl")
    fresh.close()
    assert stat.S_IMODE((tmp_path / "other.jsonl").stat().st_mode) & 0o022 == 0


def test_metrics_log_refuses_a_planted_symlink_and_leaves_its_target_alone(tmp_path):
    target = tmp_path / "elsewhere.txt"
    target.write_text("precious\n")
    link = tmp_path / "metrics.jsonl"
    link.symlink_to(target)
    with pytest.raises(ConfigError, match=f"metrics log {link}: is a symbolic link; refusing to follow it"):
        MetricsLog(link)
    assert target.read_text() == "precious\n"
    dangling = tmp_path / "dangling.jsonl"
    dangling.symlink_to(tmp_path / "created-through-the-link")
    with pytest.raises(ConfigError, match="is a symbolic link"):
        MetricsLog(dangling)
    assert not (tmp_path / "created-through-the-link").exists()


def test_metrics_log_refuses_what_is_not_a_regular_file(tmp_path):
    folder = tmp_path / "metrics.jsonl"
    folder.mkdir()
    with pytest.raises(ConfigError, match=f"metrics log {folder}: is not a regular file"):
        MetricsLog(folder)
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="is not a regular file"):     # no reader: refused, not blocked
        MetricsLog(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        with pytest.raises(ConfigError, match="is not a regular file"):  # a reader: still not a log file
            MetricsLog(fifo)
    finally:
        os.close(reader)


# -- the identity key --------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_a_key_others_can_access_is_refused_like_ssh_does(tmp_path, mode):
    key = tmp_path / "peer.key"
    ident = Identity.generate()
    save_identity(ident, key)
    key.chmod(mode)
    with pytest.raises(ConfigError) as info:
        load_identity(key, owner_only=True)
    assert str(info.value) == (f"identity key file {str(key)!r} has mode {mode:04o}: group or others can access it; "
                               f"run `chmod 600 {key}`")
    assert load_identity(key).peer_id == ident.peer_id       # a plain load (a library's choice) still reads it
    key.chmod(0o600)
    assert load_identity(key, owner_only=True).peer_id == ident.peer_id


def test_the_node_loads_every_key_owner_only(tmp_path):
    from p2pfl.peers.node import identity_of

    key = tmp_path / "given.key"
    save_identity(Identity.generate(), key)
    key.chmod(0o644)
    with pytest.raises(ConfigError, match="has mode 0644"):
        identity_of(PeerSettings(out=str(tmp_path / "out"), key=str(key)))
    run = tmp_path / "run"
    made = identity_of(PeerSettings(out=str(run)))               # generated: 0600, and read back as such
    assert stat.S_IMODE((run / "peer.key").stat().st_mode) == 0o600
    assert identity_of(PeerSettings(out=str(run))).peer_id == made.peer_id
    (run / "peer.key").chmod(0o644)
    for s in (PeerSettings(out=str(run)), PeerSettings(out=str(tmp_path / "new"), resume=str(run))):
        with pytest.raises(ConfigError, match="has mode 0644"):
            identity_of(s)


# -- an existing checkpoint in --out -----------------------------------------------------------------
def _out_with_checkpoint(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    (out / checkpoint.FILENAME).write_bytes(b"the previous run")
    return out


def test_a_start_without_resume_does_not_overwrite_a_checkpoint(tmp_path):
    from p2pfl.peers.node import Node

    out = _out_with_checkpoint(tmp_path)
    with pytest.raises(ConfigError, match=rf"out: {out / checkpoint.FILENAME} exists; continue it with --resume "
                                          rf"{out} or start over with --fresh"):
        Node(PeerSettings(out=str(out), listen=LOOPBACK, device="cpu", rounds=2), report=lambda line: None)
    assert (out / checkpoint.FILENAME).read_bytes() == b"the previous run"
    assert not (out / "metrics.jsonl").exists()


@pytest.mark.parametrize("settings", [{"fresh": True}, {"attack": "sign_flip"}])
def test_fresh_or_an_attacker_may_start_where_a_checkpoint_lies(tmp_path, settings):
    from p2pfl.peers.node import Node

    out = _out_with_checkpoint(tmp_path)
    node = Node(PeerSettings(out=str(out), listen=LOOPBACK, device="cpu", rounds=2, **settings),
                report=lambda line: None)
    node.metrics.close()
    assert node.peer.round == 0 and node.resumed_from is None


def test_fresh_loads_from_toml_and_refuses_resume(tmp_path):
    f = tmp_path / "peer.toml"
    f.write_text("fresh = true\n")
    assert load(f, {}).fresh and not load(None, {}).fresh
    with pytest.raises(ConfigError, match="fresh: given with resume"):
        load(f, {"resume": "somewhere"})
    with pytest.raises(ConfigError, match="fresh: expected bool"):
        load(None, {"fresh": "yes"})


# -- the network key ---------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["", "\n\n", "# a comment only\n", "   \n# x\n"])
def test_an_empty_network_key_file_is_a_config_error_naming_it(tmp_path, text):
    f = tmp_path / "network.key"
    f.write_text(text)
    with pytest.raises(ConfigError, match=f"network_key: {f} holds no key; expected 64 hex characters"):
        PeerSettings(network_key=str(f)).network_psk()


def test_network_key_file_reading(tmp_path):
    f = tmp_path / "network.key"
    f.write_text(f"# our federation\n\n  {PSK}  \n")
    assert PeerSettings(network_key=str(f)).network_psk() == PSK
    assert PeerSettings().network_psk() is None
    with pytest.raises(ConfigError, match=f"network_key: {tmp_path / 'missing.key'}: No such file"):
        PeerSettings(network_key=str(tmp_path / "missing.key")).network_psk()
    f.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ConfigError, match=f"network_key: {f}: not text"):
        PeerSettings(network_key=str(f)).network_psk()
