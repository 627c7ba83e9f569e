"""A peer on a CUDA device keeps model, training data, training and aggregation there: the sent
vector's copy to the host (the wire) is its only transfer of parameters. Skipped without CUDA;
bench/gpu.py runs everywhere (a tiny cell here)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from p2pfl import Identity, MemoryNetwork, Peer, PeerConfig, TrainConfig
from p2pfl.testing import run_peers

BENCH = Path(__file__).resolve().parents[2] / "bench" / "gpu.py"


def _peers(device: str, rounds: int, count_host_copies: list[int] | None = None) -> list[Peer]:
    network = MemoryNetwork(wire=True)
    ids = [Identity.generate(bytes([60 + i]) * 32) for i in range(3)]
    peers = []
    for i, ident in enumerate(ids):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3)).to(device)
        g = torch.Generator().manual_seed(i)
        x = torch.randn(64, 8, generator=g)
        peers.append(Peer(model, (x, (x[:, 0] > 0).long()), transport=network.endpoint(ident),   # CPU data: moved
                          neighbors={o.peer_id: None for o in ids if o is not ident}, test_data=(x, (x[:, 0] > 0).long()),
                          config=PeerConfig(train=TrainConfig(lr=0.1, local_steps=5), aggregator="trimmed_mean", f=0,
                                            seed=i), offload=False))
    run_peers(peers, rounds)   # under a MockClock that jumps whenever every task is blocked
    return peers


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_peer_keeps_everything_on_the_device_and_matches_the_cpu(monkeypatch):
    copies = []
    real_cpu = torch.Tensor.cpu

    def counting_cpu(self, *args, **kwargs):
        if self.is_cuda and self.numel() > 1:
            copies.append(self.numel())
        return real_cpu(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "cpu", counting_cpu)
    rounds = 3
    gpu = _peers("cuda", rounds)
    monkeypatch.setattr(torch.Tensor, "cpu", real_cpu)
    for p in gpu:
        assert all(q.is_cuda for q in p.model.parameters()) and p.vector.is_cuda
        assert p.trainer.x.is_cuda and p.trainer.y.is_cuda and p.test_data[0].is_cuda
    d = gpu[0].layout.size
    assert copies == [d] * (rounds * len(gpu))       # one host copy of x_i per peer per gossip step: the wire
    cpu = _peers("cpu", rounds)
    for a, b in zip(gpu, cpu):
        assert torch.allclose(a.vector.cpu(), b.vector, atol=1e-4)


def test_the_gpu_bench_prints_one_json_line_per_round_and_a_summary(capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    summary = bench.main(["--rounds", "2", "--hidden", "16", "--device", "cpu"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [c["round"] for c in lines[:-1]] == [0, 1] and lines[-1] == summary
    assert summary["params"] == 1024 * 16 + 16 + 16 * 16 + 16 + 16 * 1024 + 1024 + 1024 * 10 + 10
    assert summary["on_device"] and 0 < summary["train_fraction"] < 1
    assert all(c["round_s"] > 0 and c["train_s"] > 0 for c in lines[:-1])
