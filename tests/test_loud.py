"""Failing loudly, in process: what a user gets wrong is refused in one line that says what is allowed,
before any work (settings, output folder, ports, checkpoints, scenarios), and a resume restores
the settings its run was started with."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from p2pfl.cli import app
from p2pfl.errors import ConfigError
from p2pfl.peers import preflight
from p2pfl.peers import settings as peer_settings
from p2pfl.peers.settings import PeerSettings

ROOT = Path(__file__).parents[1]
PEER_ID = "12D3KooWGokUsAXVK7soswBew9haSvNsUP658Pv94Je5BzMvy6ro"


def one_line_error(r, code=2):
    assert r.exit_code == code, (r.stdout, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    return r.stderr


# -- addresses: checked when the settings load --------------------------------------------------------
@pytest.mark.parametrize("values, needle", [
    ({"bootstrap": ("garbage",)}, "bootstrap: 'garbage' names no peer"),
    ({"bootstrap": ("/ip4/127.0.0.1/tcp/4001",)}, "names no peer"),
    ({"bootstrap": (f"/ip4/1.2.3/tcp/1/p2p/{PEER_ID}",)}, "is not a multiaddr"),
    ({"listen": ("garbage",)}, "listen: 'garbage' is not a multiaddr"),
    ({"neighbors": ("/ip4/127.0.0.1/tcp/99999/p2p/x",)}, "neighbors:"),
])
def test_bad_addresses_are_refused_at_load(values, needle):
    with pytest.raises(ConfigError, match="expected") as e:
        PeerSettings(**values)
    assert needle in str(e.value)


@pytest.mark.parametrize("args, needle", [
    (["--bootstrap", "garbage"], "bootstrap: 'garbage' names no peer"),
    (["--listen", "garbage"], "listen: 'garbage' is not a multiaddr"),
])
def test_peer_cli_refuses_bad_addresses_in_one_line(tmp_path, args, needle):
    r = CliRunner().invoke(app, ["peer", "--out", str(tmp_path / "o"), *args])
    assert needle in one_line_error(r)
    assert not (tmp_path / "o").exists()      # refused before anything was written


# -- the output folder ------------------------------------------------------------------------------
def _unwritable(tmp_path):
    if os.geteuid() == 0:            # root writes anywhere but where the kernel forbids it
        return Path("/sys/p2pfl-loud-test")
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    return d / "out"


def _a_file(tmp_path, *below):
    (tmp_path / "afile").write_text("x")
    return tmp_path.joinpath("afile", *below)


@pytest.mark.parametrize("make, needle", [
    (_a_file, "is a file, not a folder"),
    (lambda tmp: _a_file(tmp, "sub"), "a part of this path is a file"),
    (_unwritable, "out: cannot create"),
])
def test_out_that_cannot_be_a_folder_is_one_line(tmp_path, make, needle):
    out = make(tmp_path)
    r = CliRunner().invoke(app, ["peer", "--out", str(out), "--listen", "/ip4/127.0.0.1/tcp/0", "--rounds", "1",
                                 "--start-timeout", "0.1"])   # (bounded, should it ever get that far)
    assert needle in one_line_error(r)
    r = CliRunner().invoke(app, ["sim", "--peers", "2", "--rounds", "1", "--out", str(out)])
    assert needle in one_line_error(r)


def test_the_output_folder_lock_refuses_a_second_holder_and_is_released(tmp_path):
    first = preflight.claim_out(tmp_path / "o")
    assert (tmp_path / "o" / "peer.lock").read_text().strip() == str(os.getpid())
    with pytest.raises(ConfigError, match=rf"out: .* is in use by another peer \(process {os.getpid()}\)"):
        preflight.claim_out(tmp_path / "o")
    first.release()
    preflight.claim_out(tmp_path / "o").release()


def test_a_lock_file_left_by_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "peer.lock").write_text(dead.stdout)     # what a SIGKILLed peer leaves behind
    lock = preflight.claim_out(tmp_path)
    assert (tmp_path / "peer.lock").read_text().strip() == str(os.getpid())
    lock.release()


# -- ports ---------------------------------------------------------------------------------------------
def test_ports_in_use_are_refused_and_a_reserved_one_passes():
    with socket.socket() as listening, socket.socket() as bound, socket.socket() as reserved:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        bound.bind(("127.0.0.1", 0))
        reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        reserved.bind(("127.0.0.1", 0))   # how `sim --engine procs` holds a peer's port for it
        port = {name: s.getsockname()[1] for name, s in
                (("listening", listening), ("bound", bound), ("reserved", reserved))}
        with pytest.raises(ConfigError, match=f"listen: port {port['listening']} on 127.0.0.1 is in use: another"):
            preflight.check_ports([f"/ip4/127.0.0.1/tcp/{port['listening']}"], -1)
        with pytest.raises(ConfigError, match=f"listen: port {port['bound']} on 127.0.0.1 is in use"):
            preflight.check_ports([f"/ip4/127.0.0.1/tcp/{port['bound']}"], -1)
        with pytest.raises(ConfigError, match=f"bulk_port: port {port['bound']} on 127.0.0.1 is in use"):
            preflight.check_ports(["/ip4/127.0.0.1/tcp/0"], port["bound"])
        preflight.check_ports([f"/ip4/127.0.0.1/tcp/{port['reserved']}"], 0)


# -- messages that say what is allowed ----------------------------------------------------------------
def test_every_unknown_key_is_reported_with_the_closest_known_one():
    from p2pfl.sim import scenario

    with pytest.raises(ConfigError) as e:
        scenario.build({"peerz": 4, "roundz": 2, "qqq": 1})
    msg = str(e.value)
    assert "unknown keys 'peerz' (did you mean 'peers'?), 'qqq', 'roundz' (did you mean 'rounds'?)" in msg


@pytest.mark.parametrize("key, value, allowed", [
    ("lr", -1.0, "lr: must be > 0 and finite, got -1.0"), ("lr_decay", 2.0, "lr_decay: must be in (0, 1]"),
    ("momentum", 1.0, "momentum: must be in [0, 1)"), ("batch_size", 0, "batch_size: must be >= 1"),
    ("local_epochs", 0.0, "local_epochs: must be > 0"),
])
def test_range_errors_say_what_is_allowed(key, value, allowed):
    with pytest.raises(ConfigError) as e:
        PeerSettings(**{key: value})
    assert allowed in str(e.value)


@pytest.mark.parametrize("content, needle", [
    (b"", "the file is empty (0 bytes)"),
    (os.urandom(4096), "no integrity seal"),
])
def test_an_empty_or_random_checkpoint_gives_a_reason(tmp_path, content, needle):
    from p2pfl.peers import checkpoint

    (tmp_path / "checkpoint.pt").write_bytes(content)
    with pytest.raises(ConfigError) as e:
        checkpoint.load(tmp_path)
    assert needle in str(e.value) and "weights_only" not in str(e.value)


@pytest.mark.parametrize("values, needle", [
    ({"attack": "sign_flip"}, "attackers: attack = 'sign_flip' but no attacker (none); give --attackers 0.2"),
    ({"attack": "sign_flip", "attackers": 0.01}, "0.01 of 8 peers, which rounds to none"),
    ({"attackers": 0.25}, "or run without them with --attackers 0"),
])
def test_an_attack_needs_attackers_and_attackers_an_attack(values, needle):
    from p2pfl.sim import scenario

    with pytest.raises(ConfigError) as e:
        scenario.build({"peers": 8, **values})
    assert needle in str(e.value)


@pytest.mark.parametrize("args, needle", [
    (["--topology", "regular:3", "--peers", "5"], "topology: 'regular:3' needs n*K even"),
    (["--partition", "classes:20"], "partition: 'classes:20' needs K <= 10"),
    (["--gossip-steps", "0"], "gossip_steps: must be >= 1"),
])
def test_sim_errors_come_before_the_progress_bar(tmp_path, args, needle):
    r = CliRunner().invoke(app, ["sim", *args, "--rounds", "1", "--out", str(tmp_path / "o")])
    assert needle in one_line_error(r)
    assert r.stdout == ""                         # no bar, no round line


# -- the key file ------------------------------------------------------------------------------------
def test_a_missing_key_file_is_created_and_said_so(tmp_path):
    from p2pfl.peers.node import identity_of

    lines: list[str] = []
    ident = identity_of(PeerSettings(key=str(tmp_path / "mine.key"), out=str(tmp_path / "o")), lines.append)
    assert lines == [f"key: {tmp_path / 'mine.key'} did not exist; created a new identity there "
                     f"(peer ID {ident.peer_id})"]
    lines.clear()
    assert identity_of(PeerSettings(key=str(tmp_path / "mine.key")), lines.append).peer_id == ident.peer_id
    assert lines == []


# -- resume restores the settings it was started with -------------------------------------------------
def _started(tmp_path, **values):
    s = PeerSettings(out=str(tmp_path / "run"), shard="1/4", seed=3, rounds=5, lr=0.1, **values)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / peer_settings.SETTINGS_FILE).write_text(json.dumps(peer_settings.saved(s)))
    return s


def test_resume_restores_the_settings_and_the_folder(tmp_path, monkeypatch):
    started = _started(tmp_path)
    monkeypatch.chdir(tmp_path)   # a resume from elsewhere still writes to the resumed folder
    s = peer_settings.load(None, {"resume": str(tmp_path / "run"), "rounds": 9, "listen": ("/ip4/127.0.0.1/tcp/0",)})
    assert (s.shard, s.seed, s.lr, s.out, s.rounds) == (started.shard, 3, 0.1, str(tmp_path / "run"), 9)
    assert s.listen == ("/ip4/127.0.0.1/tcp/0",)


@pytest.mark.parametrize("given, needle", [
    ({"shard": "0/4"}, "was started with shard = '1/4'; shard = '0/4' contradicts it"),
    ({"lr": 0.5, "seed": 4}, "lr = 0.1, seed = 3; lr = 0.5, seed = 4 contradicts it"),
    ({"out": "elsewhere"}, "names another (drop it)"),
])
def test_resume_refuses_what_contradicts_the_run(tmp_path, given, needle):
    _started(tmp_path)
    with pytest.raises(ConfigError) as e:
        peer_settings.load(None, {"resume": str(tmp_path / "run"), **given})
    assert needle in str(e.value)


def test_resume_accepts_the_same_values_again(tmp_path):
    """What `sim --engine procs` does when it restarts a killed peer: every flag again, plus --resume."""
    started = _started(tmp_path)
    given = {k: v for k, v in peer_settings.saved(started).items() if v is not None}
    s = peer_settings.load(None, {**given, "resume": str(tmp_path / "run"), "min_neighbors": 0})
    assert peer_settings.saved(s) == {**peer_settings.saved(started), "min_neighbors": 0}


# -- help, version ------------------------------------------------------------------------------------
def test_version_and_short_help():
    from p2pfl import __version__

    r = CliRunner().invoke(app, ["--version"])
    assert r.exit_code == 0 and r.stdout.strip().startswith(f"p2pfl {__version__}")
    for args in (["-h"], ["sim", "-h"], ["peer", "-h"]):
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 0 and "Usage:" in r.stdout, args


def test_help_shows_defaults_and_readable_metavars():
    sim = CliRunner(env={"COLUMNS": "300"}).invoke(app, ["sim", "--help"]).stdout
    peer = CliRunner(env={"COLUMNS": "300"}).invoke(app, ["peer", "--help"]).stdout
    for text in (sim, peer):
        assert "list[" not in text
        assert "--f <int>" in text and "--attack-params <str>" in text
        assert "trimmed_mean" in text.split("--aggregator ")[1].split("--")[0]   # the rules are listed
    assert "--peers <int>" in sim and "number of peers [16]" in sim and "rounds to run [30]" in sim
    assert "--listen <multiaddr>" in peer and "--bootstrap <multiaddr>" in peer and "--alone" in peer


# -- report ---------------------------------------------------------------------------------------------
def test_plots_have_integer_round_ticks(monkeypatch, tmp_path):
    from p2pfl.sim import results

    figures = []
    monkeypatch.setattr(results, "_save_png", lambda fig, path: figures.append(fig))
    table = {"rounds": [0, 1, 2], "mean": [0.5, 0.6, 0.7], "min": [0.4, 0.5, 0.6], "max": [0.6, 0.7, 0.8],
             "centralized": [float("nan")] * 3, "consensus_distance": [float("nan")] * 3}
    results.plot_accuracy(table, tmp_path / "a.png", baseline=table)
    results.plot_consensus([{"kind": "consensus", "round": t, "distance": 10.0 ** -t} for t in range(3)],
                           tmp_path / "c.png")
    assert len(figures) == 2
    for fig in figures:
        ticks = fig.axes[0].get_xticks()
        assert len(ticks) and all(float(t).is_integer() for t in ticks), ticks


def test_no_consensus_plot_without_a_consensus_curve(tmp_path):
    from p2pfl.sim import results

    assert not results.plot_consensus([{"kind": "round", "round": 0, "peer": 0, "accuracy": 0.5}], tmp_path / "c.png")
    assert not (tmp_path / "c.png").exists()


def test_the_docs_stand_alone():
    """No file of the project points at notes that are not in the repository."""
    files = [ROOT / "README.md", *ROOT.glob("docs/**/*.md"), *ROOT.glob("p2pfl/**/*.py"), *ROOT.glob("bench/*.py"),
             *ROOT.glob("examples/**/*")]
    outside = ("shared/", "DESIGN.md", "ALGORITHMS.md", "LIBP2P.md", "STYLE.md")
    bad = [str(f.relative_to(ROOT)) for f in files
           if f.is_file() and any(n in f.read_text(errors="replace") for n in outside)]
    assert bad == []
    assert (ROOT / "docs" / "architecture.md").exists()
