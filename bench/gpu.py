"""Per-round time of a ~25M-parameter model on whatever device exists (`--device cuda` on a GPU).

    .venv/bin/python bench/gpu.py [--quick] [--device auto|cpu|cuda] [--rounds 3] [--local-steps 1] [--peers 2] [--hidden 4096]

Two peers (full mesh) in one trio loop over the memory transport with `wire=True`, so every model
frame is encoded, signed, checked and decoded as on the network: the one host round trip a GPU
peer makes per gossip step. Each peer trains `local_steps` SGD steps of batch `batch` on its own
random data (on the device), then gossips. The model is an MLP 1024-4096-4096-1024-10 (25.2M
parameters). One JSON line per round: `round_s`, wall seconds from the end of the previous round
(the last peer's) to the end of this one, and `train_s`, the peers' local training of that round,
summed (a peer may start its next round's training before the last peer ends this one, so the two
do not subtract per round). Then one summary line: the medians over the rounds after the first
(which pays for allocation and warm-up), and `train_fraction`, the share of the whole run spent in
local training; the rest is the gossip: encode, sign, check, decode, aggregate.

On the CPU keep it short (the defaults: 3 rounds, 1 local step); on a GPU, e.g. `--rounds 10
--local-steps 20`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

import torch
import trio
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from p2pfl import Identity, MemoryNetwork, Peer, PeerConfig, TrainConfig


def model(hidden: int = 4096, seed: int = 0) -> nn.Module:
    """hidden 4096: 25.2M parameters."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1024, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 1024), nn.ReLU(), nn.Linear(1024, 10))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--local-steps", type=int, default=1)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--peers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=4096, help="hidden width (4096: 25.2M parameters)")
    ap.add_argument("--quick", action="store_true", help="the short CPU run: 3 rounds of 1 local step")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.local_steps = 3, 1
    name = "cuda" if args.device == "auto" and torch.cuda.is_available() else \
        "cpu" if args.device == "auto" else args.device
    device = torch.device(name)
    network = MemoryNetwork(wire=True)
    ids = [Identity.generate(bytes([i + 1]) * 32) for i in range(args.peers)]
    config = PeerConfig(train=TrainConfig(lr=0.01, local_steps=args.local_steps, batch_size=args.batch),
                        step_timeout_s=600.0)
    peers = []
    for i, ident in enumerate(ids):
        g = torch.Generator().manual_seed(i)
        x = torch.randn(4 * args.batch, 1024, generator=g).to(device)
        y = torch.randint(0, 10, (4 * args.batch,), generator=g).to(device)
        peers.append(Peer(model(args.hidden).to(device), (x, y), transport=network.endpoint(ident),
                          neighbors={o.peer_id: None for o in ids if o is not ident}, config=config, offload=False))
    params = sum(p.numel() for p in peers[0].model.parameters())
    train_s: dict[int, float] = {}
    original = [p.algorithm.local_update for p in peers]

    def timed(update: Any) -> Any:
        def run(t: int) -> Any:
            synchronize(device)
            start = time.perf_counter()
            stats = update(t)
            synchronize(device)
            train_s[t] = train_s.get(t, 0.0) + time.perf_counter() - start
            return stats
        return run

    for p, update in zip(peers, original):
        p.algorithm.local_update = timed(update)   # type: ignore[method-assign]
    cells = []

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            for p in peers:
                await nursery.start(serve, p)

    async def serve(p: Peer, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with p:
            task_status.started()
            await p.train(args.rounds)

    round_end: dict[int, float] = {}

    def on_event(event: dict[str, Any]) -> None:
        synchronize(device)
        round_end[event["round"]] = time.perf_counter()

    for p in peers:
        p.on_event = on_event
    start = time.perf_counter()
    trio.run(run)
    previous = start
    for t in range(args.rounds):
        wall = round_end[t] - previous
        previous = round_end[t]
        cell = {"round": t, "device": name, "params": params, "peers": args.peers, "local_steps": args.local_steps,
                "batch": args.batch, "round_s": wall, "train_s": train_s[t]}
        cells.append(cell)
        print(json.dumps(cell), flush=True)
    steady = cells[1:] or cells
    summary = {"summary": True, "device": name, "params": params, "peers": args.peers, "rounds": args.rounds,
               "local_steps": args.local_steps, "batch": args.batch,
               "median_round_s": statistics.median(c["round_s"] for c in steady),
               "median_train_s": statistics.median(c["train_s"] for c in steady),
               # the peers share one loop and run inline, so the run is sequential: all that is not
               # training (encode, sign, check, decode, aggregate) is the rest of the wall time
               "train_fraction": sum(train_s.values()) / (previous - start),
               # by type: torch.device("cuda") != the tensors' torch.device("cuda:0")
               "on_device": all(q.device.type == device.type for p in peers for q in p.model.parameters())
               and all(p.vector.device.type == device.type for p in peers)}
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
