"""DFedSAM / DFedSAM-MGS: algorithm presets, the SAM local step with frozen parameters, Q gossip
steps, and the consensus plot of `p2pfl report`."""

import dataclasses
import json

import pytest
import torch
from typer.testing import CliRunner

from p2pfl.cli import app
from p2pfl.errors import ConfigError
from p2pfl.learn.models import flatten, make_model
from p2pfl.learn.train import ALGORITHMS, LocalTrainer, TrainConfig, algorithm_name
from p2pfl.sim import engine
from p2pfl.sim import scenario as scenarios
from p2pfl.sim.results import read_events

PNG = b"\x89PNG\r\n\x1a\n"


def tiny(**kw):
    values = dict(name="t", peers=8, rounds=1, topology="ring", dataset="digits", partition="dirichlet:0.5",
                  hidden=[16], lr=0.1, batch_size=16, local_steps=3, seed=3, centralized=False)
    values.update(kw)
    return scenarios.build(values)


# -- presets ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm, rho, momentum", [
    (None, 0.0, 0.0), ("dfedavg", 0.0, 0.0), ("dfedavgm", 0.0, 0.9), ("dfedsam", 0.05, 0.0)])
def test_preset_sets_defaults(algorithm, rho, momentum):
    s = scenarios.build({} if algorithm is None else {"algorithm": algorithm})
    assert s.local_update() == {"rho": rho, "momentum": momentum}
    cfg = s.train_config()
    assert (cfg.rho, cfg.momentum) == (rho, momentum)
    assert s.algorithm_name == (algorithm or "dfedavg")
    assert s.to_dict()["rho"] == rho and s.to_dict()["momentum"] == momentum


def test_explicit_keys_win_over_the_preset(tmp_path):
    assert scenarios.build({"algorithm": "dfedsam", "rho": 0.01}).local_update()["rho"] == 0.01
    assert scenarios.build({"algorithm": "dfedsam", "rho": 0}).local_update()["rho"] == 0.0  # 0 is a value, not unset
    assert scenarios.build({"algorithm": "dfedavgm", "momentum": 0.5}).local_update()["momentum"] == 0.5
    # a key in the file wins over a preset chosen on the command line, and a flag over a file's preset
    f = tmp_path / "s.toml"
    f.write_text('algorithm = "dfedsam"\nmomentum = 0.3\n')
    assert scenarios.load(f).local_update() == {"rho": 0.05, "momentum": 0.3}
    assert scenarios.load(f, {"rho": 0.02}).local_update() == {"rho": 0.02, "momentum": 0.3}
    assert scenarios.load(f, {"algorithm": "dfedavgm"}).local_update() == {"rho": 0.0, "momentum": 0.3}
    # replace() re-applies the preset to keys that were never set
    s = scenarios.build({"algorithm": "dfedavg"})
    assert dataclasses.replace(s, algorithm="dfedsam").local_update()["rho"] == 0.05


def test_bad_algorithm_names_the_allowed_values():
    with pytest.raises(ConfigError, match="algorithm: unknown value 'fedsam'; allowed: bristle, dfedavg, dfedavgm, dfedsam, frl"):
        scenarios.build({"algorithm": "fedsam"})
    with pytest.raises(ConfigError, match="algorithm"):
        scenarios.build({"algorithm": 1})
    with pytest.raises(ConfigError, match="rho"):
        scenarios.build({"algorithm": "dfedsam", "rho": -0.1})
    assert set(ALGORITHMS) == {"dfedavg", "dfedavgm", "dfedsam"}
    assert algorithm_name(0.05, 0.0, 4) == "dfedsam-mgs" and algorithm_name(0.0, 0.9) == "dfedavgm"


# -- the SAM local step ---------------------------------------------------------------------------
def _train(rho, frozen_layer=True):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 6, generator=g)
    y = (x[:, 0] - x[:, 2] > 0).long()
    m = make_model("mlp", (6,), 2, hidden=(16, 8), seed=0)
    if frozen_layer:
        m[1].weight.requires_grad_(False)
        m[1].bias.requires_grad_(False)
    cfg = TrainConfig(lr=0.1, momentum=0.9, weight_decay=1e-3, batch_size=16, local_steps=6, rho=rho)
    tr = LocalTrainer(m, x, y, cfg, torch.Generator().manual_seed(1))
    for t in range(2):  # momentum buffers carry over between rounds
        tr.train_round(t)
    return m


def test_sam_with_momentum_changes_the_trajectory_but_never_frozen_parameters():
    init = make_model("mlp", (6,), 2, hidden=(16, 8), seed=0)
    sgd, sam = _train(0.0), _train(0.05)
    for m in (sgd, sam):
        assert torch.equal(m[1].weight, init[1].weight) and torch.equal(m[1].bias, init[1].bias)
        assert not torch.equal(flatten(m), flatten(init))
    assert not torch.allclose(flatten(sgd), flatten(sam))
    assert torch.isfinite(flatten(sam)).all()


# -- Q gossip steps ---------------------------------------------------------------------------------
def _consensus(events):
    return {e["round"]: e["distance"] for e in events if e["kind"] == "consensus"}


def test_four_gossip_steps_contract_more_than_one(tmp_path):
    """Same seed, so the same locally trained vectors X; then W X vs W^4 X. On a ring the mixing
    matrix's second eigenvalue is < 1 in modulus, so W^4 contracts the disagreement more than W."""
    one = engine.run(tiny(gossip_steps=1), tmp_path / "q1")
    four = engine.run(tiny(gossip_steps=4), tmp_path / "q4")
    assert four["consensus_distance"] < 0.5 * one["consensus_distance"]
    assert _consensus(read_events(tmp_path / "q4"))[0] == four["consensus_distance"]
    assert (four["gossip_steps"], one["gossip_steps"]) == (4, 1)
    # each gossip step sends one vector per neighbour: 4x the frames, so (here) 4x the bytes
    assert four["bytes_sent"] == 4 * one["bytes_sent"]


def test_sam_run_differs_from_sgd_run_and_says_what_it_ran(tmp_path):
    sgd = engine.run(tiny(), tmp_path / "sgd")
    sam = engine.run(tiny(algorithm="dfedsam"), tmp_path / "sam")
    assert (sam["algorithm"], sam["rho"], sam["momentum"]) == ("dfedsam", 0.05, 0.0)
    assert (sgd["algorithm"], sgd["rho"]) == ("dfedavg", 0.0)
    assert sam["consensus_distance"] != sgd["consensus_distance"]
    run = next(e for e in read_events(tmp_path / "sam") if e["kind"] == "run")
    assert run["scenario"]["rho"] == 0.05 and run["scenario"]["algorithm"] == "dfedsam"


# -- CLI: flags, summary, consensus.png -------------------------------------------------------------
def test_sim_flags_reach_the_run_and_report_writes_consensus_png(tmp_path):
    out = tmp_path / "run"
    runner = CliRunner()
    r = runner.invoke(app, ["sim", "--peers", "4", "--rounds", "2", "--topology", "ring", "--algorithm", "dfedsam",
                            "--rho", "0.01", "--gossip-steps", "2", "--momentum", "0.5", "--lr-decay", "0.99",
                            "--weight-decay", "0.0001", "--local-steps", "2", "--out", str(out)])
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    assert {k: summary[k] for k in ("algorithm", "rho", "momentum", "gossip_steps")} == \
        {"algorithm": "dfedsam", "rho": 0.01, "momentum": 0.5, "gossip_steps": 2}
    scenario = next(e for e in read_events(out) if e["kind"] == "run")["scenario"]
    assert (scenario["lr_decay"], scenario["weight_decay"], scenario["local_steps"]) == (0.99, 0.0001, 2)
    assert (out / "consensus.png").read_bytes()[:8] == PNG
    (out / "consensus.png").unlink()
    r = runner.invoke(app, ["report", str(out)])
    assert r.exit_code == 0, r.output
    assert (out / "consensus.png").read_bytes()[:8] == PNG
    assert "consensus.png" in r.output


def test_sim_bad_algorithm_exits_2_naming_the_allowed_values():
    r = CliRunner().invoke(app, ["sim", "--algorithm", "sam"])
    assert r.exit_code == 2
    assert "allowed: bristle, dfedavg, dfedavgm, dfedsam, frl" in r.output
