"""Simulator throughput: peer-rounds per second of the in-process engine against a bare torch loop.

The bare loop does the same work with no protocol: the same per-peer SGD steps (the same
LocalTrainer on the same shards), then X <- W @ X over the stacked parameter vectors, and an
evaluation in the rounds where the engine's peers evaluate (the first and the last). The engine
adds the Peer round loop, the step state machine, the memory transport and the event log.
overhead = bare_rate / engine_rate - 1 (target <= 0.20).

    python bench/sim.py [--quick] [--peers 16 64 256] [--rounds R] [--reps 3] [--sam]

Prints one JSON line per peer count. With --sam, the same scenario also runs as DFedSAM (the
`dfedsam` preset, rho 0.05), interleaved with the DFedAvg runs, and a second line per peer count
gives its peer-rounds/s, the ratio dfedsam/dfedavg (SAM takes two forward/backward passes a step,
so about 0.5-0.6 where training dominates) and its own overhead against the bare loop with SAM.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import tempfile
import time

import torch

from p2pfl.learn.models import flatten, load_flat
from p2pfl.learn.train import LocalTrainer, evaluate, peer_seed
from p2pfl.sim import engine
from p2pfl.sim import scenario as scenarios


def bare_loop(s: scenarios.Scenario) -> float:
    torch.set_num_threads(1)  # as the engine does for small models
    setup = engine.Setup.build(s)
    models = [copy.deepcopy(setup.init) for _ in range(s.peers)]
    trainers = [LocalTrainer(m, *setup.tensors(setup.shards[i]), s.train_config(),
                             torch.Generator().manual_seed(peer_seed(s.seed, i))) for i, m in enumerate(models)]
    W = torch.from_numpy(setup.W).float()
    test = setup.tensors(test=True)
    start = time.perf_counter()
    for t in range(s.rounds):
        for tr in trainers:
            tr.train_round(t)
        X = W @ torch.stack([flatten(m) for m in models])  # (n, d)
        for m, x in zip(models, X):
            load_flat(m, x)
        if t % s.eval_every == 0 or t == s.rounds - 1:  # when the engine's peers evaluate (round 0 too)
            for m in models:
                evaluate(m, *test)
    return s.peers * s.rounds / (time.perf_counter() - start)


def engine_rate(s: scenarios.Scenario) -> float:
    with tempfile.TemporaryDirectory() as out:
        return engine.run(s, out)["peer_rounds_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds and repetitions")
    ap.add_argument("--peers", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--sam", action="store_true", help="also time DFedSAM against DFedAvg in the same run")
    args = ap.parse_args()
    reps = args.reps or (3 if args.quick else 5)
    base = scenarios.load(None)
    for n in args.peers:
        rounds = args.rounds or max(3, (60 if args.quick else 240) // max(1, n // 16) // 4)
        s = dataclasses.replace(base, peers=n, rounds=rounds, eval_every=rounds, centralized=False,
                                partition="iid" if n > 64 else base.partition)
        bare, eng, sam_bare, sam_eng = [], [], [], []
        sam = dataclasses.replace(s, algorithm="dfedsam")
        for _ in range(reps):  # interleaved, so drift in machine speed hits both sides alike
            bare.append(bare_loop(s))
            eng.append(engine_rate(s))
            if args.sam:
                sam_bare.append(bare_loop(sam))
                sam_eng.append(engine_rate(sam))
        b, e = statistics.median(bare), statistics.median(eng)
        print(json.dumps({"bench": "sim", "peers": n, "rounds": rounds, "reps": reps,
                          "engine_peer_rounds_per_s": round(e, 1), "bare_peer_rounds_per_s": round(b, 1),
                          "overhead": round(b / e - 1, 3), "target_overhead": 0.20}), flush=True)
        if args.sam:
            sb, se = statistics.median(sam_bare), statistics.median(sam_eng)
            print(json.dumps({"bench": "sim-dfedsam", "peers": n, "rounds": rounds, "reps": reps,
                              "rho": sam.local_update()["rho"], "dfedavg_peer_rounds_per_s": round(e, 1),
                              "dfedsam_peer_rounds_per_s": round(se, 1), "ratio": round(se / e, 3),
                              "expected_ratio": "0.5-0.6", "dfedsam_bare_peer_rounds_per_s": round(sb, 1),
                              "dfedsam_overhead": round(sb / se - 1, 3)}), flush=True)


if __name__ == "__main__":
    main()
