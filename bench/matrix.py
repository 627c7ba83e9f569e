"""The benchmark matrices' runner (bench/robustness.py, bench/bristle.py): each job runs once, in a pool
of spawned worker processes, and every finished run is appended to a cache file (one JSON line with
its "key"), so an interrupted matrix resumes where it stopped."""

from __future__ import annotations

import concurrent.futures as cf
import json
import multiprocessing as mp
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def run_cached(jobs: Sequence[tuple[Any, ...]], cache: Path, workers: int, run_one: Callable[..., dict[str, Any]],
               key_of: Callable[[tuple[Any, ...]], str], report_every: int = 10) -> dict[str, dict[str, Any]]:
    """Every job's result by key: `run_one(*job)` for the jobs whose `key_of(job)` is not in `cache`
    yet (its result must carry that "key"), the cached lines for the rest. Progress on stderr."""
    done: dict[str, dict[str, Any]] = {}
    if cache.exists():
        for line in cache.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done[r["key"]] = r
    todo = [j for j in jobs if key_of(j) not in done]
    print(f"# {len(jobs)} runs, {len(jobs) - len(todo)} cached, {len(todo)} to run on {workers} worker(s)",
          file=sys.stderr, flush=True)
    cache.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(cache, "a") as fh, cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(run_one, *j) for j in todo]
        for n, fut in enumerate(cf.as_completed(futures), 1):
            r = fut.result()
            done[r["key"]] = r
            fh.write(json.dumps(r) + "\n")
            fh.flush()
            if n % report_every == 0 or n == len(todo):
                print(f"# {n}/{len(todo)} runs, {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return done
