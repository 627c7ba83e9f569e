"""Fuzz the parsers of remote and untrusted input: each must return a value or raise its one
documented error type, for any input (the generators and checks: `bench/fuzz_targets.py`).

    python bench/fuzz.py --runs 1000000 [--target codec|control|checkpoint|config|all] [--seed 0]

Targets: codec (`codec.decode` -> RemoteProtocolError), control (`control.body_length`/`unpack`,
`Hello.from_wire`, `bulk.Ticket.from_wire` -> RemoteProtocolError), checkpoint (`checkpoint.load`
-> ConfigError; ~1-2 ms a case, the others are ~10-100x faster), config (scenario and peer
settings, dicts and TOML files -> ConfigError).

Prints one JSON line per target: target, runs, unexpected (cases that broke the contract),
examples (the first failing input of each kind, hex, truncated to 256 bytes), classes (count per
kind of failure: exception type and where it was raised, or the broken invariant), peak_rss_mb
(of the process so far), seconds. Exits 1 if any case broke its contract. The same --seed gives the
same cases. --max-memory-gb (default 4) caps the address space, so a parser that would allocate
without bound fails with a counted MemoryError instead of exhausting the machine.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import resource
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import fuzz_targets  # bench/ is sys.path[0] when this runs as a script; the tests register it by name

MAX_EXAMPLES = 5


def failure_class(e: BaseException) -> str:
    """A failure's kind: the exception type and the innermost p2pfl frame it came from (an
    AssertionError of the harness: the invariant it names, the part of its message before ": ")."""
    if isinstance(e, AssertionError):
        return "AssertionError: " + (str(e).splitlines() or ["?"])[0].split(": ", 1)[0][:120]
    frames = traceback.extract_tb(e.__traceback__)
    ours = [f for f in frames if "/p2pfl/" in f.filename.replace("\\", "/")] or frames
    where = f"{Path(ours[-1].filename).name}:{ours[-1].lineno}" if ours else "?"
    return f"{type(e).__name__} at {where}"


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux reports KiB


def fuzz(target: fuzz_targets.Target, runs: int, seed: int) -> dict[str, Any]:
    rng = random.Random(f"{seed}:{target.name}")  # str seeds are hashed deterministically
    classes: collections.Counter[str] = collections.Counter()
    examples: list[str] = []
    start = time.perf_counter()
    for _ in range(runs):
        case = target.case(rng)
        try:
            target.check(case)
        except Exception as e:
            kind = failure_class(e)
            if kind not in classes and len(examples) < MAX_EXAMPLES:
                examples.append(target.dump(case).hex())
            classes[kind] += 1
    return {"target": target.name, "runs": runs, "unexpected": sum(classes.values()), "examples": examples,
            "classes": dict(classes.most_common()), "peak_rss_mb": peak_rss_mb(),
            "seconds": round(time.perf_counter() - start, 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20_000, help="cases per target")
    ap.add_argument("--target", choices=[*fuzz_targets.TARGETS, "all"], default="all")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-memory-gb", type=float, default=4.0,
                    help="address-space cap: a parser that tries to allocate more fails with MemoryError "
                         "(counted) instead of pushing a shared machine out of memory; 0: no cap")
    args = ap.parse_args(argv)
    if args.max_memory_gb > 0:
        cap = int(args.max_memory_gb * 2**30)
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard == resource.RLIM_INFINITY or cap < hard:
            resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    if args.target in ("checkpoint", "all"):
        import torch

        torch.set_num_threads(1)  # tiny tensors: threads only add overhead, and the machine is shared
    names = list(fuzz_targets.TARGETS) if args.target == "all" else [args.target]
    bad = 0
    for name in names:
        target = fuzz_targets.make_target(name)
        try:
            line = fuzz(target, args.runs, args.seed)
        finally:
            target.close()
        bad += line["unexpected"]
        print(json.dumps(line), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
