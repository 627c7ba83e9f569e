"""DFedAvg vs DFedSAM vs DFedSAM-MGS (Q = 4): accuracy and consensus distance on mnist1d.

Every algorithm runs with the same data split, seeds, rounds, model, learning rate, batch and
local steps; only the SAM radius rho and the number of gossip steps Q differ:

    dfedavg       rho = 0,    Q = 1    (preset "dfedavg")
    dfedsam       rho = RHO,  Q = 1    (preset "dfedsam")
    dfedsam-mgs   rho = RHO,  Q = 4

Each run is `p2pfl.sim.engine.run` in a temporary folder; per-round figures come from its
metrics.jsonl. One JSON line per (algorithm, topology):
  accuracy_mean       mean over seeds of the peers' mean test accuracy after the last round
  accuracy_std        standard deviation of that over seeds (ddof = 1)
  consensus_distance  mean over seeds of (1/n) sum_i ||x_i - x_bar||^2 after the last round
  rounds_to_target    first round (1-based) where the seed-averaged peers' mean accuracy >= target;
                      null if never. The target is one number for every line (printed in it):
                      --target, or by default 90% of the lowest final accuracy_mean of all lines,
                      floored to 0.01, so that every line reaches it.

    python bench/dfedsam.py [--quick] [--rounds R] [--seeds 0 1 2] [--jobs 2]
                            [--curves FILE.json] [--plot FILE.png]

Investigation knobs (docs/results/dfedsam.md): --rho, --lr, --local-steps, --model cnn with
--norm batch (GroupNorm swapped for BatchNorm), --algorithms (dfedavg-mgs: rho 0 with Q 4, a
control), and --drift RHO... (no runs: the spread of one round's local updates across peers).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import multiprocessing
import sys
import tempfile
import time
from typing import Any

import numpy as np

from p2pfl.sim import engine
from p2pfl.sim import scenario as scenarios
from p2pfl.sim.results import accuracy_table, consensus_curve, read_events

# (label, preset, Q); the first three run by default, dfedavg-mgs (rho 0, Q 4) is a control on request
ALGORITHMS = (("dfedavg", "dfedavg", 1), ("dfedsam", "dfedsam", 1), ("dfedsam-mgs", "dfedsam", 4),
              ("dfedavg-mgs", "dfedavg", 4))


def _batchnorm(make: Any) -> Any:
    """Wrap make_model so that the cnn's GroupNorm layers become BatchNorm (investigation only).
    BatchNorm's running statistics are buffers, not parameters: gossip never averages them, so
    every peer normalises with its own (non-IID) statistics at test time."""
    from torch import nn

    def build(*args: Any, **kw: Any) -> nn.Module:
        model = make(*args, **kw)
        bn = nn.BatchNorm2d if len(getattr(model, "view", ())) == 3 else nn.BatchNorm1d
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.GroupNorm):
                    setattr(parent, name, bn(child.num_channels))
        return model
    return build


def one_run(values: dict[str, Any], norm: str = "group") -> dict[str, Any]:
    """Run one scenario; return its per-round mean accuracy and consensus distance."""
    s = scenarios.build(values)
    if norm == "batch":
        engine.make_model = _batchnorm(engine.make_model)  # type: ignore[attr-defined]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        summary = engine.run(s, out)
        events = read_events(out)
    table = accuracy_table(events)
    rounds, distance = consensus_curve(events)
    return {"rounds": [t + 1 for t in table["rounds"]], "accuracy": table["mean"],
            "distance_rounds": [t + 1 for t in rounds], "distance": distance,
            "final_accuracy": summary["honest_accuracy"]["mean"], "final_distance": summary["consensus_distance"],
            "wall_s": time.perf_counter() - start}


def scenario_values(args: argparse.Namespace, preset: str, q: int, topology: str, seed: int) -> dict[str, Any]:
    values = dict(name=f"{preset}-q{q}-{topology}-s{seed}", peers=args.peers, rounds=args.rounds, topology=topology,
                  dataset="mnist1d", partition=f"dirichlet:{args.alpha}", model=args.model, hidden=args.hidden,
                  seed=seed, algorithm=preset, gossip_steps=q, lr=args.lr, lr_decay=args.lr_decay,
                  momentum=args.momentum, batch_size=args.batch_size, local_steps=args.local_steps,
                  eval_every=args.eval_every, centralized=False)
    if preset == "dfedsam":
        values["rho"] = args.rho
    return values


def lines(args: argparse.Namespace, runs: dict[tuple[str, str, int], dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for topology in args.topologies:
        for label, _, q in args.algos:
            rs = [runs[label, topology, seed] for seed in args.seeds]
            finals = [r["final_accuracy"] for r in rs]
            rows.append({"algorithm": label, "q": q, "topology": topology, "rho": args.rho if "sam" in label else 0.0,
                         "accuracy_mean": float(np.mean(finals)),
                         "accuracy_std": float(np.std(finals, ddof=1)) if len(finals) > 1 else 0.0,
                         "consensus_distance": float(np.mean([r["final_distance"] for r in rs])),
                         "curve": np.mean([r["accuracy"] for r in rs], axis=0), "rounds": rs[0]["rounds"]})
    target = args.target if args.target is not None else math.floor(90 * min(r["accuracy_mean"] for r in rows)) / 100
    out = []
    for r in rows:
        reached = [t for t, a in zip(r.pop("rounds"), r.pop("curve")) if a >= target]
        out.append({**r, "rounds_to_target": reached[0] if reached else None, "target": target,
                    "seeds": len(args.seeds), "rounds": args.rounds, "peers": args.peers})
    return out


def plot(args: argparse.Namespace, runs: dict[tuple[str, str, int], dict[str, Any]], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(args.topologies), figsize=(5.2 * len(args.topologies), 7.2), dpi=100,
                             squeeze=False, sharex=True)
    for col, topology in enumerate(args.topologies):
        for label, _, q in args.algos:
            rs = [runs[label, topology, seed] for seed in args.seeds]
            for row, (xs, ys) in enumerate((("rounds", "accuracy"), ("distance_rounds", "distance"))):
                ax = axes[row][col]
                y = np.asarray([r[ys] for r in rs])   # (seeds, rounds)
                x = rs[0][xs]
                line, = ax.plot(x, y.mean(0), label=f"{label} (Q={q})")
                if len(rs) > 1 and row == 0:
                    ax.fill_between(x, y.min(0), y.max(0), alpha=0.2, color=line.get_color())
        axes[0][col].set_title(f"{topology}: {args.peers} peers, mnist1d, Dirichlet {args.alpha}")
        axes[0][col].set_ylabel("peers' mean test accuracy")
        axes[1][col].set_ylabel("consensus distance")
        axes[1][col].set_yscale("log")
        axes[1][col].set_xlabel("round")
        for ax in axes[:, col]:
            ax.grid(alpha=0.3, which="both")
        axes[0][col].legend(loc="lower right")
    fig.suptitle(f"mean over seeds {args.seeds} (band: min-max over seeds)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def drift(args: argparse.Namespace) -> None:
    """How far, and how differently, the peers move in one round of local training (no gossip).

    From one common x, every peer runs K local steps on its own shard; D_i = y_i - x. Prints the
    spread (1/n) sum_i ||D_i - mean D||^2 (what gossip has to remove) and the mean ||D_i||^2, for
    rho 0 and the SAM radii asked, at x = the initial model and after W steps of centralized SGD on
    the union of the shards (same lr and batch)."""
    import copy

    import torch

    from p2pfl.learn.models import flatten
    from p2pfl.learn.train import LocalTrainer, TrainConfig

    torch.set_num_threads(1)
    s = scenarios.build(scenario_values(args, "dfedavg", 1, args.topologies[0], args.seeds[0]))
    setup = engine.Setup.build(s)
    union = setup.tensors(np.concatenate(setup.shards))
    for warm in (0, 500, 2000):
        base = copy.deepcopy(setup.init)
        if warm:
            cfg = TrainConfig(lr=args.lr, batch_size=args.batch_size, local_steps=warm)
            LocalTrainer(base, *union, cfg, torch.Generator().manual_seed(0)).train_round(0)
        x0 = flatten(base)
        for rho in (0.0, *args.drift):
            cfg = TrainConfig(lr=args.lr, batch_size=args.batch_size, local_steps=args.local_steps, rho=rho)
            moves = []
            for i, shard in enumerate(setup.shards):
                m = copy.deepcopy(base)
                LocalTrainer(m, *setup.tensors(shard), cfg, torch.Generator().manual_seed(i)).train_round(0)
                moves.append(flatten(m) - x0)
            D = torch.stack(moves)  # (n, d)
            print(json.dumps({"bench": "dfedsam-drift", "warm_steps": warm, "rho": rho,
                              "spread": round(float(((D - D.mean(0)) ** 2).sum(1).mean()), 4),
                              "mean_sq_move": round(float((D ** 2).sum(1).mean()), 4)}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds and one seed (a few minutes on 2 cores)")
    ap.add_argument("--peers", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=None, help="default 100, --quick 40")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2, --quick 0")
    ap.add_argument("--topologies", nargs="+", default=["ring", "regular:4"])
    ap.add_argument("--alpha", type=float, default=0.3, help="Dirichlet concentration of the label split")
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--norm", choices=["group", "batch"], default="group",
                    help="cnn normalisation; batch swaps GroupNorm for BatchNorm (investigation)")
    ap.add_argument("--algorithms", nargs="+", choices=[a[0] for a in ALGORITHMS],
                    default=[a[0] for a in ALGORITHMS[:3]])
    ap.add_argument("--hidden", type=int, nargs="+", default=[128, 128])
    ap.add_argument("--lr", type=float, default=0.3)
    ap.add_argument("--lr-decay", type=float, default=1.0)
    ap.add_argument("--momentum", type=float, default=0.0, help="the same for every algorithm")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--local-steps", type=int, default=10)
    ap.add_argument("--rho", type=float, default=0.05, help="SAM radius of dfedsam and dfedsam-mgs")
    ap.add_argument("--eval-every", type=int, default=1)
    ap.add_argument("--target", type=float, default=None, help="accuracy target for rounds_to_target")
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes)")
    ap.add_argument("--curves", help="write every run's per-round curves to this JSON file")
    ap.add_argument("--plot", help="write the accuracy and consensus plot to this PNG")
    ap.add_argument("--drift", type=float, nargs="+", metavar="RHO",
                    help="instead: measure one round's local-update spread across peers at these SAM radii")
    args = ap.parse_args()
    args.rounds = args.rounds or (40 if args.quick else 100)
    args.seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    args.algos = tuple(a for a in ALGORITHMS if a[0] in args.algorithms)
    if args.drift:
        return drift(args)

    jobs = {(label, topology, seed): scenario_values(args, preset, q, topology, seed)
            for topology in args.topologies for seed in args.seeds for label, preset, q in args.algos}
    runs: dict[tuple[str, str, int], dict[str, Any]] = {}
    start = time.perf_counter()

    def done(key: tuple[str, str, int], result: dict[str, Any]) -> None:
        runs[key] = result
        print(f"[{time.perf_counter() - start:6.0f} s] {len(runs)}/{len(jobs)} {key}: "
              f"acc {result['final_accuracy']:.3f}, consensus {result['final_distance']:.3g}, "
              f"{result['wall_s']:.0f} s", file=sys.stderr, flush=True)

    if args.jobs > 1:
        with cf.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(one_run, v, args.norm): k for k, v in jobs.items()}
            for fut in cf.as_completed(futures):
                done(futures[fut], fut.result())
    else:
        for key, values in jobs.items():
            done(key, one_run(values, args.norm))
    for line in lines(args, runs):
        print(json.dumps(line), flush=True)
    if args.curves:
        with open(args.curves, "w") as fh:
            json.dump({"args": vars(args), "runs": [{"algorithm": k[0], "topology": k[1], "seed": k[2], **v}
                                                    for k, v in sorted(runs.items())]}, fh)
    if args.plot:
        plot(args, runs, args.plot)


if __name__ == "__main__":
    main()
