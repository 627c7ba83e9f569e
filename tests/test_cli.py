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


# -- p2pfl peer: files it refuses before any work, each in one line with exit 2 ---------------------
PEER_ARGS = ("--listen", "/ip4/127.0.0.1/tcp/0", "--bulk-port", "-1", "--start-timeout", "0.1", "--rounds", "3")


def _checkpoint_dir(tmp_path, mutate):
    """A folder with a peer key (0600) and a sealed checkpoint of the default peer's model and
    identity, changed by `mutate(state)`: what `p2pfl peer --resume` would otherwise accept."""
    import io

    import torch

    from p2pfl.files import save_identity
    from p2pfl.gossip.identity import Identity
    from p2pfl.learn.datasets import load_dataset
    from p2pfl.learn.models import ParamLayout, make_model
    from p2pfl.learn.train import LocalTrainer, TrainConfig
    from p2pfl.peers import checkpoint

    d = tmp_path / "run"
    ident = Identity.generate()
    save_identity(ident, d / "peer.key")
    data = load_dataset("digits", seed=0)
    model = make_model("mlp", data.input_shape, data.num_classes, hidden=(64,), seed=0)
    trainer = LocalTrainer(model, torch.zeros(1, *data.input_shape), torch.zeros(1, dtype=torch.long),
                           TrainConfig(), torch.Generator())
    raw = checkpoint.snapshot(trainer, round=1, peer_id=ident.peer_id, schema=ParamLayout.of(model).schema)
    state = torch.load(io.BytesIO(raw), weights_only=True)
    buf = io.BytesIO()
    torch.save(mutate(state), buf)
    checkpoint.write(d, checkpoint.seal(buf.getvalue()))
    return d


def _nan_model_far_ahead(state):
    import math

    state["model"] = {k: v.fill_(math.nan) for k, v in state["model"].items()}
    state["round"] = 10**12
    return state


def _one_line_error(r, *needles):
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert all(n in r.stderr for n in needles), r.stderr
    assert "listening on" not in r.stdout        # stopped before it joined anyone


def test_peer_refuses_a_non_finite_far_ahead_checkpoint_in_one_line(tmp_path):
    d = _checkpoint_dir(tmp_path, _nan_model_far_ahead)
    r = p2pfl("peer", "--resume", d, "--out", d, *PEER_ARGS)
    _one_line_error(r, f"error: resume: {d / 'checkpoint.pt'}: round 1000000000000 is beyond rounds = 3")


def test_peer_refuses_an_altered_checkpoint_in_one_line(tmp_path):
    import torch

    d = _checkpoint_dir(tmp_path, lambda state: state)
    path = d / "checkpoint.pt"
    data = bytearray(path.read_bytes())
    at = data.find(torch.load(path, weights_only=True)["model"]["1.weight"].numpy().tobytes())
    data[at:at + 4] = torch.tensor([float("inf")]).numpy().tobytes()   # torch still loads it
    path.write_bytes(bytes(data))
    r = p2pfl("peer", "--resume", d, "--out", d, *PEER_ARGS)
    _one_line_error(r, f"error: resume: {path}: integrity check failed")


def test_peer_refuses_a_key_file_others_can_read(tmp_path):
    from p2pfl.files import save_identity
    from p2pfl.gossip.identity import Identity

    key = tmp_path / "peer.key"
    save_identity(Identity.generate(), key)
    key.chmod(0o644)
    r = p2pfl("peer", "--key", key, "--out", tmp_path / "out", *PEER_ARGS)
    _one_line_error(r, f"identity key file '{key}' has mode 0644", f"run `chmod 600 {key}`")


def test_peer_refuses_to_overwrite_a_checkpoint_unless_resumed_or_fresh(tmp_path):
    d = _checkpoint_dir(tmp_path, lambda state: state)
    r = p2pfl("peer", "--out", d, *PEER_ARGS)
    _one_line_error(r, f"error: out: {d / 'checkpoint.pt'} exists; continue it with --resume {d}",
                    "start over with --fresh")
    r = p2pfl("peer", "--out", d, "--resume", d, "--fresh", *PEER_ARGS)
    _one_line_error(r, "fresh: given with resume")


@pytest.mark.parametrize("command", ["sim", "peer"])
def test_the_shared_flags_come_from_the_one_schema(command):
    """`p2pfl sim` and `p2pfl peer` get one flag per key of p2pfl.settings.LearningSettings, with its
    help, and the parsed values reach the settings (tables as JSON, widths as 64,32)."""
    import dataclasses

    from typer.testing import CliRunner

    from p2pfl import cli
    from p2pfl.settings import LearningSettings

    out = " ".join(CliRunner().invoke(cli.app, [command, "--help"]).output.split())   # unwrapped
    for f in dataclasses.fields(LearningSettings):
        flag = "--" + f.name.replace("_", "-")
        assert flag in out and " ".join(f.metadata["help"].split()) in out, flag
    parsed = cli._shared_overrides({"hidden": "64,32", "algorithm_params": None, "aggregator_params": '{"tau": 1}',
                                    "attack_params": None, "plugins": ["x.py"], "lr": 0.5})
    assert (parsed["hidden"], parsed["aggregator_params"], parsed["plugins"], parsed["lr"]) == \
        ((64, 32), {"tau": 1}, ("x.py",), 0.5)
    with pytest.raises(cli.ConfigError, match="--hidden"):
        cli._shared_overrides({"hidden": "64,x"})
