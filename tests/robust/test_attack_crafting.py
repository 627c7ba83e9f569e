"""The attack crafting functions against their definitions, on small hand-made tensors."""

from __future__ import annotations

from statistics import NormalDist

import pytest
import torch

from p2pfl.errors import ConfigError
from p2pfl.robust import attacks
from p2pfl.robust.attacks import (
    ATTACKS,
    alie,
    alie_z,
    check_attack,
    dissensus,
    flip_labels,
    gaussian,
    ipm,
    received_mean,
    sign_flip,
    uniform_noise,
)


def t(rows: list) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def test_sign_flip_negates_the_own_vector() -> None:
    assert torch.equal(sign_flip(t([1.0, -2.0, 0.5])), t([-1.0, 2.0, -0.5]))
    assert torch.equal(sign_flip(t([1.0, -2.0]), scale=3.0), t([-3.0, 6.0]))


def test_gaussian_is_sigma_times_a_seeded_standard_normal() -> None:
    like = torch.zeros(1000)
    got = gaussian(like, sigma=2.5, generator=torch.Generator().manual_seed(7))
    want = torch.randn(1000, generator=torch.Generator().manual_seed(7)) * 2.5
    assert torch.equal(got, want) and got.dtype == like.dtype
    assert abs(float(got.std()) - 2.5) < 0.25


def test_uniform_noise_stays_in_the_box() -> None:
    u = uniform_noise(torch.zeros(5000), scale=0.3, generator=torch.Generator().manual_seed(1))
    assert float(u.abs().max()) <= 0.3 and float(u.min()) < -0.25 and float(u.max()) > 0.25


def test_label_flip_maps_y_to_c_minus_1_minus_y() -> None:
    assert flip_labels(torch.tensor([0, 3, 9]), 10).tolist() == [9, 6, 0]
    assert flip_labels(torch.tensor([0, 1, 2]), 3).tolist() == [2, 1, 0]
    with pytest.raises(ConfigError, match="labels must lie in"):
        flip_labels(torch.tensor([0, 10]), 10)


def test_alie_z_follows_baruch_et_al() -> None:
    # s = floor(n/2 + 1) - f supporters; z = Phi^-1((n - s) / n)
    assert alie_z(50, 24) == pytest.approx(NormalDist().inv_cdf(48 / 50)) == pytest.approx(1.7507, abs=1e-4)
    assert alie_z(9, 3) == pytest.approx(NormalDist().inv_cdf(7 / 9))  # s = 5 - 3 = 2
    assert alie_z(9, 1) == pytest.approx(NormalDist().inv_cdf(5 / 9))  # s = 4
    assert alie_z(9, 6) == pytest.approx(NormalDist().inv_cdf(8 / 9))  # s floored at 1
    assert alie_z(2, 0) == 0.0                                          # degenerate: n <= s


def test_alie_is_mean_minus_z_unbiased_std() -> None:
    honest = t([[1.0, 2.0], [3.0, 2.0], [5.0, 2.0]])   # mu = (3, 2), std (ddof 1) = (2, 0)
    assert torch.allclose(alie(honest, z=1.0), t([1.0, 2.0]))
    assert torch.allclose(alie(honest, z=-0.5), t([4.0, 2.0]))
    assert torch.equal(alie(t([[1.0, -1.0]]), z=3.0), t([1.0, -1.0]))  # one vector: no spread


def test_ipm_is_minus_eps_times_the_mean() -> None:
    assert torch.allclose(ipm(t([[1.0, 2.0], [3.0, 4.0]]), eps=0.5), t([-1.0, -1.5]))


def test_dissensus_by_hand() -> None:
    # pull = 0.25 (2, 0) + 0.25 (0, 4) = (0.5, 1); x = 0 - (1.5 / 0.5) * pull
    got = dissensus(t([0.0, 0.0]), t([[2.0, 0.0], [0.0, 4.0]]), t([0.25, 0.25]), 0.5, eps=1.5)
    assert torch.allclose(got, t([-1.5, -3.0]))
    assert torch.equal(dissensus(t([1.0, 2.0]), torch.zeros(0, 2), torch.zeros(0), 0.3, eps=1.0), t([1.0, 2.0]))
    with pytest.raises(ValueError):
        dissensus(t([0.0]), t([[1.0]]), t([0.5]), 0.0, eps=1.0)


def test_dissensus_with_eps_1_cancels_the_gossip_step() -> None:
    # target t with 3 good neighbours and 2 Byzantine ones that both send x_byz:
    # x_t + sum_j W_tj (x_j - x_t) + sum_b W_tb (x_byz - x_t) == x_t
    g = torch.Generator().manual_seed(0)
    x_t, good = torch.randn(6, generator=g), torch.randn(3, 6, generator=g)
    w_good, w_byz = t([0.1, 0.2, 0.15]), [0.2, 0.1]
    x_byz = dissensus(x_t, good, w_good, sum(w_byz), eps=1.0)
    step = x_t + w_good @ (good - x_t) + sum(w_byz) * (x_byz - x_t)
    assert torch.allclose(step, x_t, atol=1e-6)
    x_far = dissensus(x_t, good, w_good, sum(w_byz), eps=2.0)  # eps > 1: pushed away from the good ones
    step2 = x_t + w_good @ (good - x_t) + sum(w_byz) * (x_far - x_t)
    assert torch.allclose(step2 - x_t, -(w_good @ (good - x_t)), atol=1e-6)


def test_received_mean() -> None:
    assert torch.equal(received_mean(t([[1.0, 3.0], [3.0, 5.0]])), t([2.0, 4.0]))


def test_check_attack_completes_defaults_and_names_what_is_wrong() -> None:
    assert check_attack("alie") == {"z": None}
    assert check_attack("gaussian", {"sigma": 3}) == {"sigma": 3.0}
    assert check_attack("free_rider", {"mode": "noise"}) == {"mode": "noise", "scale": 1.0}
    assert set(ATTACKS) == {"sign_flip", "gaussian", "label_flip", "alie", "ipm", "dissensus", "free_rider",
                            "silent", "mimic", "rank_reversal"}
    with pytest.raises(ConfigError, match="attack: unknown value 'alei'; allowed: alie, dissensus, free_rider"):
        check_attack("alei")
    with pytest.raises(ConfigError, match="gaussian has no parameter 'std'; allowed: sigma"):
        check_attack("gaussian", {"std": 1.0})
    with pytest.raises(ConfigError, match="sigma"):
        check_attack("gaussian", {"sigma": -1})
    with pytest.raises(ConfigError, match="allowed: mean, noise"):
        check_attack("free_rider", {"mode": "lazy"})
    with pytest.raises(ConfigError, match="peer"):
        check_attack("mimic", {"peer": -1})
    with pytest.raises(ConfigError, match="allowed: none"):
        check_attack("silent", {"x": 1})
    assert attacks.check_attack("alie", {"z": -1.5}) == {"z": -1.5}
