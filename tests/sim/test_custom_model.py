"""examples/custom_model: a user's CNN and loader in their own module, by import string, run by
`p2pfl sim` (in-process and `--engine procs`) and by two `p2pfl peer` processes on 127.0.0.1.

Processes are stopped by PID (procs.run in its own finally; the two peers here in ours) and every
wait has a deadline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from p2pfl.sim import engine, procs
from p2pfl.sim import scenario as scenarios

EXAMPLE = Path(__file__).parents[2] / "examples" / "custom_model"
ROOT = Path(__file__).parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
       "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}


@pytest.fixture
def in_example(monkeypatch):
    monkeypatch.chdir(EXAMPLE)   # the user runs from their own folder: the import strings are relative to it
    monkeypatch.syspath_prepend(str(EXAMPLE))


def test_the_custom_cnn_learns_in_process(in_example, tmp_path):
    s = scenarios.load(EXAMPLE / "scenario.toml", {"rounds": 3, "peers": 3})
    summary = engine.run(s, tmp_path)
    assert summary["honest_accuracy"]["min"] > 0.5          # 10 classes: chance is 0.1
    assert summary["centralized_accuracy"] > 0.5 and summary["metric"] == "accuracy"
    from digits_cnn import DigitsCNN
    assert isinstance(engine.Setup.build(s).init, DigitsCNN)


def test_the_regression_example_lowers_the_test_mse(in_example, tmp_path):
    s = scenarios.load(EXAMPLE / "regression.toml", {"rounds": 8, "centralized": False})
    engine.run(s, tmp_path)
    events = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    mse = {e["round"]: e["accuracy_mean"] for e in events if e["kind"] == "consensus"}
    assert all(e["metric"] == "mse" for e in events if e["kind"] == "round")
    assert mse[7] < 0.5 * mse[0]


@pytest.mark.filterwarnings("ignore:Using a target size")   # torch's, on the way to the error
def test_a_model_that_does_not_fit_the_loader_is_refused_before_the_run(in_example, tmp_path):
    from p2pfl.errors import ConfigError

    with pytest.raises(ConfigError, match="^dataset: the model and loss do not fit the data"):
        engine.run(scenarios.load(EXAMPLE / "scenario.toml", {"model": "mlp", "loss_fn": "mse"}), tmp_path)
    with pytest.raises(ConfigError, match=r"^model: digits_cnn:make_cnn\(input_shape=\(2,\), num_classes=1\) "
                                          "raised ValueError: DigitsCNN takes 1x8x8 images"):
        engine.run(scenarios.load(EXAMPLE / "regression.toml", {"model": "digits_cnn:make_cnn"}), tmp_path)
    assert not (tmp_path / "summary.json").exists()


@pytest.mark.slow
def test_the_custom_cnn_runs_as_peer_processes(in_example, tmp_path):
    s = scenarios.load(EXAMPLE / "scenario.toml", {"rounds": 3, "peers": 3, "engine": "procs", "local_steps": 20,
                                                   "step_timeout_s": 10.0})
    summary = procs.run(s, tmp_path / "procs", timeout_s=200)
    assert summary["rounds_done"] == [3, 3, 3] and summary["honest_accuracy"]["min"] > 0.3


@pytest.mark.slow
def test_two_p2pfl_peer_processes_train_the_custom_cnn(tmp_path):
    common = ["peer", "--model", "digits_cnn:make_cnn", "--dataset", "digits_cnn:load_shard", "--rounds", "3",
              "--local-steps", "20", "--lr", "0.1", "--threads", "1", "--step-timeout", "10",
              "--listen", "/ip4/127.0.0.1/tcp/0", "--min-neighbors", "1", "--bulk-port", "-1"]
    procs_: list[subprocess.Popen[str]] = []
    try:
        first = subprocess.Popen([sys.executable, "-m", "p2pfl.cli", *common, "--shard", "0/2",
                                  "--out", str(tmp_path / "p0")], cwd=EXAMPLE, env=ENV, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        procs_.append(first)
        assert first.stdout is not None
        line = first.stdout.readline()     # "listening on /ip4/127.0.0.1/tcp/PORT/p2p/ID" (or an error, then EOF)
        assert line.startswith("listening on "), line
        second = subprocess.Popen([sys.executable, "-m", "p2pfl.cli", *common, "--shard", "1/2",
                                   "--out", str(tmp_path / "p1"), "--bootstrap", line.split()[-1]],
                                  cwd=EXAMPLE, env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        procs_.append(second)
        outputs = [p.communicate(timeout=180)[0] for p in procs_]
        assert [p.returncode for p in procs_] == [0, 0], outputs
    finally:
        for p in procs_:
            if p.poll() is None:
                p.kill()           # by PID: only what this test started
                p.wait(timeout=10)
    for i in range(2):
        summary = json.loads((tmp_path / f"p{i}" / "summary.json").read_text())
        assert summary["rounds_done"] == 3 and summary["frames_received"] >= 3, summary
        assert summary["accuracy"] > 0.3
