"""Time every p2pfl.robust rule on [n, d] float32 inputs, next to byzfl's implementations and a plain X @ X.T.

    python bench/aggregators.py --quick            # n = 32, d = 1e6 only
    python bench/aggregators.py                    # n in {8, 32, 64} x d in {1e5, 1e6, 1e7}
    python bench/aggregators.py --n 64 --d 1e7 --rules krum,median --reps 3
    python bench/aggregators.py --quick --threads 1   # no OpenMP stalls when other processes hold the cores

Prints one JSON line per (rule, n, d):
    {"rule", "n", "d", "f", "seconds", "aggregate_seconds", "byzfl_seconds", "speedup_vs_byzfl", "matmul_ratio"}
seconds is the median over --reps of the rule function (vector only), aggregate_seconds the same for
`aggregate(...)`, which also computes the per-input weights; matmul_ratio = seconds / (X @ X.T on the same
[n, d], measured in the same run). The inputs are X[0] (own) and X[1:] (received); f = (n - 3) // 4, the
largest f Bulyan accepts, for every rule. Each repetition times every contender once, in turn, so that a
noisy machine slows them alike; a contender faster than 50 ms is called back to back within a timing
(seconds is per call), and one whose warm-up run exceeds 5 s is timed by that run alone. Cells whose memory estimate (4 copies of X: byzfl sorts with int64
indices) exceeds --max-gib are skipped with a "skipped" line.

byzfl (LPD-EPFL, https://pypi.org/project/byzfl/) is optional and not a p2pfl dependency: `pip install byzfl`
(or `pip install --no-deps byzfl numpy scipy`, since only its aggregators are used) into the environment
that runs this script; without it the byzfl fields are null. Only byzfl.aggregators is loaded, not the
package __init__, which imports torchvision. byzfl's time is the faster of its numpy and torch inputs
(an input kind that raises, e.g. torch.quantile on more than 2**24 elements, is left out). Mapping:
mean=Average, median=Median, trimmed_mean=TrMean(f), krum=Krum(f), multi_krum=MultiKrum(f),
geometric_median=GeometricMedian(nu, T) with our defaults nu=0.1, T=8, centered_clip=CenteredClipping(L=1,
tau=1) (byzfl starts at 0, we at own: the same work). byzfl 0.0.11 has no Bulyan: its bulyan baseline is
what one builds from its parts, byzfl Krum applied n - 2f times to the shrinking set and then its Meamed
computation keeping theta - 2f values. mixing and self_centered_clip have no byzfl counterpart (null).
speedup_vs_byzfl and matmul_ratio are medians of the per-repetition ratios (robust to a busy machine).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import json
import statistics
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from p2pfl.robust import RULES, aggregate

SLOW_S = 5.0  # a contender whose warm-up takes longer is timed by that one run
MIN_TIMING_S = 0.05  # a faster contender is called back to back until one timing lasts about this long
RULE_PARAMS: dict[str, Callable[[int], dict[str, Any]]] = {
    "mixing": lambda n: {"weights": torch.full((n,), 1.0 / n, dtype=torch.float64)},
    "centered_clip": lambda n: {"tau": 1.0, "iterations": 1},
    "self_centered_clip": lambda n: {"tau": "adaptive"},
    "geometric_median": lambda n: {"iterations": 8, "nu": 0.1},
}


def load_byzfl() -> Any | None:
    """byzfl.aggregators without running byzfl/__init__.py (which imports torchvision), or None."""
    try:
        spec = importlib.util.find_spec("byzfl")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    if "byzfl" not in sys.modules:
        package = types.ModuleType("byzfl")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["byzfl"] = package
    try:
        return importlib.import_module("byzfl.aggregators")
    except ImportError:
        return None


def byzfl_bulyan(agg: Any, f: int) -> Callable[[Any], Any]:
    """Bulyan from byzfl parts: its Krum n - 2f times on the remaining set, then the body of its Meamed
    (median, argpartition of |x - median|, mean of the nearest) keeping theta - 2f values. Meamed itself
    refuses 2 * 2f >= theta, which Bulyan's bound n >= 4f + 3 allows."""
    krum = agg.Krum(f)

    def run(vectors: Any) -> Any:
        remaining, chosen, keep = vectors, [], None
        for _ in range(vectors.shape[0] - 2 * f):
            winner = krum(remaining)  # a view of one row: find which
            if isinstance(remaining, torch.Tensor):
                row = (winner.data_ptr() - remaining.data_ptr()) // (remaining.stride(0) * remaining.element_size())
                keep = torch.ones(remaining.shape[0], dtype=torch.bool)
            else:
                row = (winner.ctypes.data - remaining.ctypes.data) // remaining.strides[0]
                keep = np.ones(remaining.shape[0], dtype=bool)
            assert 0 <= row < remaining.shape[0], "byzfl's Krum no longer returns a view of the winning row"
            chosen.append(winner)
            keep[int(row)] = False
            remaining = remaining[keep]
        beta = vectors.shape[0] - 4 * f
        if isinstance(vectors, torch.Tensor):
            s = torch.stack(chosen)
            med = torch.quantile(s, 0.5, dim=0)  # byzfl's torch median
            nearest = torch.topk((s - med).abs(), beta, dim=0, largest=False).indices
            return torch.gather(s, 0, nearest).mean(0)
        s = np.stack(chosen)
        nearest = np.argpartition(np.abs(s - np.median(s, axis=0)), beta - 1, axis=0)[:beta]
        return np.take_along_axis(s, nearest, 0).mean(0)

    return run


def byzfl_rules(agg: Any, f: int) -> dict[str, Callable[[], Callable[[Any], Any]]]:
    """Factories: a fresh instance per call (CenteredClipping keeps its last output as the next start)."""
    return {
        "mean": lambda: agg.Average(),
        "median": lambda: agg.Median(),
        "trimmed_mean": lambda: agg.TrMean(f),
        "krum": lambda: agg.Krum(f),
        "multi_krum": lambda: agg.MultiKrum(f),
        "bulyan": lambda: byzfl_bulyan(agg, f),
        "centered_clip": lambda: agg.CenteredClipping(None, 1, 1.0),
        "geometric_median": lambda: agg.GeometricMedian(0.1, 8),
    }


def timed(fn: Callable[[], Any], calls: int = 1) -> float:
    """Seconds per call, over `calls` back-to-back calls."""
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def bench_cell(n: int, d: int, rules: list[str], reps: int, byzfl: Any | None) -> list[dict[str, Any]]:
    f = max((n - 3) // 4, 0)
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(n * 7 + d))
    own, received = x[0], x[1:]
    x_np = x.numpy()
    theirs = byzfl_rules(byzfl, f) if byzfl is not None else {}
    lines = []
    for name in rules:
        params = RULE_PARAMS.get(name, lambda n: {})(n)
        rule = RULES[name]
        contenders: dict[str, Callable[[], Any]] = {
            "matmul": lambda: x @ x.T,
            "ours": lambda rule=rule, params=params: rule(own, received, f=f, **params),
            "aggregate": lambda name=name, params=params: aggregate(name, own, received, f=f, **params),
        }
        if name in theirs:
            make = theirs[name]
            contenders["byzfl_torch"] = lambda make=make: make()(x)
            contenders["byzfl_numpy"] = lambda make=make: make()(x_np)
        times: dict[str, list[float]] = {k: [] for k in contenders}
        fastest: dict[str, float] = {}
        for rep in range(reps + 1):  # the first round is a warm-up, and tells which contenders fail
            for key, fn in list(contenders.items()):
                # fast contenders repeat back to back so that one scheduler stall does not decide a timing
                calls = max(1, min(1000, int(MIN_TIMING_S / fastest[key]))) if key in fastest else 1
                try:
                    elapsed = timed(fn, calls)
                    if rep == 0 and elapsed < SLOW_S:  # a second warm-up call: the first pays one-time costs
                        elapsed = min(elapsed, timed(fn))
                except (RuntimeError, ValueError, TypeError, MemoryError):
                    del contenders[key]
                    times.pop(key)
                    continue
                fastest[key] = min(elapsed, fastest.get(key, elapsed))
                if rep > 0 or elapsed > SLOW_S:
                    times[key].append(elapsed)
                if elapsed > SLOW_S:  # timed once: repeating it would not change the verdict
                    del contenders[key]
        med = {k: statistics.median(v) for k, v in times.items() if v}
        byz_keys = [k for k in ("byzfl_torch", "byzfl_numpy") if k in med]
        byz = min([med[k] for k in byz_keys], default=None)
        reps_done = min(len(times[k]) for k in ("ours", "matmul"))
        mm_ratio = statistics.median(times["ours"][i] / times["matmul"][i] for i in range(reps_done))
        speedup = None
        if byz is not None:
            per_rep = [min(times[k][i] if i < len(times[k]) else med[k] for k in byz_keys) / times["ours"][i]
                       for i in range(len(times["ours"]))]
            speedup = statistics.median(per_rep)
        lines.append({
            "rule": name, "n": n, "d": d, "f": f,
            "seconds": round(med["ours"], 5),
            "aggregate_seconds": round(med["aggregate"], 5),
            "byzfl_seconds": None if byz is None else round(byz, 5),
            "speedup_vs_byzfl": None if speedup is None else round(speedup, 2),
            "matmul_ratio": round(mm_ratio, 2),
        })
        print(json.dumps(lines[-1]), flush=True)
        gc.collect()
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="only n = 32, d = 1e6")
    parser.add_argument("--n", default="8,32,64", help="comma-separated input counts")
    parser.add_argument("--d", default="1e5,1e6,1e7", help="comma-separated dimensions")
    parser.add_argument("--rules", default=",".join(RULES), help="comma-separated rule names")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per contender (median)")
    parser.add_argument("--max-gib", type=float, default=6.0, help="skip cells estimated above this")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads (0: torch's default); 1 gives stable numbers on a busy machine")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    ns = [32] if args.quick else [int(v) for v in args.n.split(",")]
    ds = [10**6] if args.quick else [int(float(v)) for v in args.d.split(",")]
    rules = [r for r in args.rules.split(",") if r]
    unknown = set(rules) - set(RULES)
    if unknown:
        parser.error(f"unknown rules {sorted(unknown)}; known: {', '.join(RULES)}")
    torch.manual_seed(0)
    byzfl = load_byzfl()
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                      "byzfl": getattr(sys.modules.get("byzfl.aggregators"), "__file__", None)}), flush=True)
    for n in ns:
        for d in ds:
            gib = 4 * n * d * 4 / 2**30
            if gib > args.max_gib:
                print(json.dumps({"n": n, "d": d, "skipped": f"estimated {gib:.1f} GiB > {args.max_gib}"}))
                continue
            bench_cell(n, d, rules, args.reps, byzfl)
            gc.collect()


if __name__ == "__main__":
    main()
