import pytest

from p2pfl.errors import ConfigError
from p2pfl.sim import scenario as scenarios


def test_default_scenario_is_the_documented_one():
    s = scenarios.load(None)
    assert (s.peers, s.rounds, s.topology, s.dataset, s.partition, s.aggregator) == \
        (16, 30, "ring", "digits", "dirichlet:0.5", "mixing")


def test_overrides_beat_the_file(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text('peers = 8\nrounds = 4\ntopology = "torus"\nlr = 1\n')
    s = scenarios.load(f, {"rounds": 2, "seed": None})
    assert (s.peers, s.rounds, s.topology, s.lr) == (8, 2, "torus", 1.0)


@pytest.mark.parametrize("text, needle", [
    ('peerz = 3', "unknown key 'peerz'"),
    ('topology = "star"', "topology"),
    ('dataset = "cifar"', "dataset: unknown value 'cifar'; allowed: digits, mnist1d, synthetic, npz:PATH"),
    ('partition = "dirichlet:-1"', "partition"),
    ('peers = "many"', "peers: expected int"),
    ('hidden = [64, "x"]', "hidden"),
    ('lr = 0', "lr"),
    ('aggregator = "best"', "aggregator"),
    ('rounds = [', "not valid TOML"),
])
def test_bad_values_name_the_key(tmp_path, text, needle):
    f = tmp_path / "s.toml"
    f.write_text(text + "\n")
    with pytest.raises(ConfigError, match=None) as e:
        scenarios.load(f)
    assert needle in str(e.value)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="nope.toml"):
        scenarios.load(tmp_path / "nope.toml")


def test_example_scenarios_load():
    from pathlib import Path
    files = sorted(Path(__file__).parents[2].joinpath("examples").glob("*.toml"))
    files = [f for f in files if f.name != "peer.toml"]   # a `p2pfl peer --config` file, not a scenario
    assert files
    for f in files:
        scenarios.load(f)
