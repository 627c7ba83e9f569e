"""`p2pfl peer` settings: TOML < flags, strict keys, the example file."""

from pathlib import Path

import pytest

from p2pfl.errors import ConfigError
from p2pfl.peers import checkpoint
from p2pfl.peers.settings import load


def test_example_peer_toml_loads_and_flags_override_it():
    path = Path(__file__).parents[2] / "examples" / "peer.toml"
    s = load(path, {"shard": "3/4", "rounds": 5, "bootstrap": ("/ip4/127.0.0.1/tcp/1/p2p/12D3KooWGokUsAXVK7soswBew9haSvNsUP658Pv94Je5BzMvy6ro",)})
    assert s.shard_index() == (3, 4) and s.rounds == 5 and s.degree == 4
    assert s.listen == ("/ip4/0.0.0.0/tcp/4001",) and s.bootstrap == ("/ip4/127.0.0.1/tcp/1/p2p/12D3KooWGokUsAXVK7soswBew9haSvNsUP658Pv94Je5BzMvy6ro",)


@pytest.mark.parametrize("values, message", [
    ({"degre": 4}, "unknown key 'degre'"),
    ({"shard": "4/4"}, "shard"),
    ({"device": "tpu"}, "device: unknown value"),
    ({"rounds": "3"}, "rounds: expected int"),
])
def test_bad_settings_name_the_key(tmp_path, values, message):
    with pytest.raises(ConfigError, match=message):
        load(None, values)


def test_checkpoint_roundtrip_is_atomic_and_weights_only(tmp_path):
    import torch

    from p2pfl.learn.models import make_model
    from p2pfl.learn.train import LocalTrainer, TrainConfig

    model = make_model("mlp", (4,), 2, hidden=(3,), seed=0)
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    trainer = LocalTrainer(model, x, y, TrainConfig(momentum=0.9, batch_size=4), torch.Generator().manual_seed(1))
    trainer.train_round(0)
    data = checkpoint.snapshot(trainer, round=1, peer_id="p", schema="s")
    checkpoint.write(tmp_path, data)
    assert [p.name for p in tmp_path.iterdir()] == [checkpoint.FILENAME]   # no temp file left behind
    other = make_model("mlp", (4,), 2, hidden=(3,), seed=5)
    t2 = LocalTrainer(other, x, y, TrainConfig(momentum=0.9, batch_size=4), torch.Generator().manual_seed(9))
    ck = checkpoint.load(tmp_path)
    ck.apply(t2)
    assert ck.round == 1 and all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                                      other.state_dict().values()))
    trainer.train_round(1)
    t2.train_round(1)                  # same optimizer state and batch order: same next round
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters()))
    with pytest.raises(ConfigError, match="no checkpoint.pt"):
        checkpoint.load(tmp_path / "missing")


# -- Byzantine keys: attack, attack_params, colluders ------------------------------------------------
def test_attack_keys_load_from_toml_and_flags(tmp_path):
    f = tmp_path / "peer.toml"
    f.write_text('attack = "gaussian"\nattack_params = {sigma = 10}\ncolluders = ["12D3KooWa"]\n')
    s = load(f, {})
    assert (s.attack, s.attack_params, s.colluders) == ("gaussian", {"sigma": 10}, ("12D3KooWa",))
    s = load(f, {"attack": "sign_flip", "attack_params": {"scale": 2.0}})
    assert (s.attack, s.attack_params) == ("sign_flip", {"scale": 2.0})
    assert load(None, {}).attack == "none"


@pytest.mark.parametrize("values, message", [
    ({"attack": "nope"}, r"attack: unknown value 'nope'; allowed: none, alie, dissensus, .*sign_flip"),
    ({"attack": "gaussian", "attack_params": {"sigma": -1}}, r"attack_params.sigma \(gaussian\) must be a positive"),
    ({"attack": "gaussian", "attack_params": {"eps": 1}}, "gaussian has no parameter 'eps'"),
    ({"attack_params": {"sigma": 1}}, "attack_params: given, but attack = 'none'"),
    ({"colluders": ("x",)}, "colluders: given, but attack = 'none'"),
    ({"attack": "mimic", "attack_params": {"peer": 2}}, "mimic.*give a peer ID"),
    ({"attack": "sign_flip", "resume": "somewhere"}, "resume: an attacker"),
    ({"attack": "sign_flip", "attack_params": "scale=2"}, "attack_params: expected dict"),
])
def test_bad_attack_settings_name_the_key(values, message):
    with pytest.raises(ConfigError, match=message):
        load(None, values)


@pytest.mark.parametrize("flag", ["--attack-params", "--algorithm-params"])
def test_params_flags_are_json_objects(flag):
    from p2pfl.cli import _json_object_flag

    assert _json_object_flag(flag, None) is None
    assert _json_object_flag(flag, '{"sigma": 10, "mode": "noise"}') == {"sigma": 10, "mode": "noise"}
    for bad in ("sigma=10", "[1, 2]", "{"):
        with pytest.raises(ConfigError, match=rf"{flag}: expected a JSON object"):
            _json_object_flag(flag, bad)


@pytest.mark.parametrize("args, needle", [
    (["--attack", "nope"], "attack: unknown value 'nope'; allowed: none, alie,"),
    (["--attack", "gaussian", "--attack-params", "sigma=3"], "--attack-params: expected a JSON object"),
])
def test_peer_cli_rejects_a_bad_attack_in_one_line(tmp_path, args, needle):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "p2pfl.cli", "peer", "--out", str(tmp_path), *args],
                       capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[2])
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr
    assert not list(tmp_path.iterdir())       # refused before a key, socket or file was made


def test_peer_algorithm_presets_and_explicit_keys_win():
    from p2pfl.peers import settings as peer_settings

    assert peer_settings.load(None, {}).train_config().rho == 0.0
    sam = peer_settings.load(None, {"algorithm": "dfedsam"}).train_config()
    assert (sam.rho, sam.momentum) == (0.05, 0.0)
    mine = peer_settings.load(None, {"algorithm": "dfedsam", "rho": 0.2, "momentum": 0.5}).train_config()
    assert (mine.rho, mine.momentum) == (0.2, 0.5)
    assert peer_settings.load(None, {"algorithm": "dfedavgm"}).train_config().momentum == 0.9
    with pytest.raises(ConfigError, match="algorithm: unknown value 'adam'; allowed: bristle, dfedavg, dfedavgm, dfedsam, frl"):
        peer_settings.load(None, {"algorithm": "adam"})
