"""The CLI as a user runs it: real subprocesses, exit codes, one-line errors."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def p2pfl(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "p2pfl.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=240, env={**os.environ, "COLUMNS": "200"})


def test_keygen_writes_a_libp2p_key_and_prints_its_peer_id(tmp_path):
    from libp2p import load_identity
    from libp2p.peer.id import ID

    key = tmp_path / "peer.key"
    r = p2pfl("keygen", "--out", key)
    assert r.returncode == 0, r.stderr
    printed = r.stdout.strip()
    assert printed.startswith("12D3KooW")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert str(ID.from_pubkey(load_identity(str(key)).public_key)) == printed
    again = p2pfl("keygen", "--out", key)
    assert again.returncode == 2 and "exists" in again.stderr


@pytest.mark.parametrize("args, needle", [
    (["--topology", "star"], "topology: unknown value 'star'"),
    (["--dataset", "cifar"], "dataset: unknown value 'cifar'"),
    (["--partition", "dirichlet:zero"], "partition"),
    (["--peers", "1"], "peers"),
    (["--aggregator", "best"], "aggregator: unknown value 'best'"),
    (["no-such-file.toml"], "no-such-file.toml"),
])
def test_sim_bad_values_exit_2_with_one_line(args, needle):
    r = p2pfl("sim", *args)
    assert r.returncode == 2
    assert needle in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_sim_then_report(tmp_path):
    out = tmp_path / "run"
    r = p2pfl("sim", "--peers", 5, "--rounds", 3, "--topology", "ring", "--seed", 4, "--out", out)
    assert r.returncode == 0, r.stderr
    assert "centralized reference" in r.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["peers"], summary["rounds"], summary["seed"]) == (5, 3, 4)
    (out / "accuracy.png").unlink()
    r = p2pfl("report", out)
    assert r.returncode == 0, r.stderr
    assert (out / "accuracy.png").exists()
    assert f"{summary['honest_accuracy']['mean']:.3f}" in r.stdout


def test_report_on_a_folder_without_metrics(tmp_path):
    r = p2pfl("report", tmp_path)
    assert r.returncode == 2 and "metrics.jsonl" in r.stderr


def test_embed_example_runs_and_learns():
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import embed
        import trio

        accuracies = trio.run(embed.main, 15)
    finally:
        sys.path.remove(str(ROOT / "examples"))
    assert len(accuracies) == 4
    assert min(accuracies) > 0.8   # two moons: chance is 0.5


@pytest.mark.parametrize("command", ["sim", "peer", "report", "keygen"])
def test_every_command_has_help(command):
    r = p2pfl(command, "--help")
    assert r.returncode == 0, r.stderr
    assert "Usage:" in r.stdout and "Traceback" not in r.stderr
