"""bench/aggregators.py stays runnable: one tiny cell, every rule, one JSON line each."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from p2pfl.robust import RULES

BENCH = Path(__file__).resolve().parents[2] / "bench" / "aggregators.py"


def test_bench_prints_one_json_line_per_rule(capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("bench_aggregators", BENCH)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.MIN_TIMING_S = 0.0  # one call per timing: this checks the output, not the speed
    bench.main(["--n", "8", "--d", "3000", "--reps", "1"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    cells = [line for line in lines if "rule" in line]
    assert [c["rule"] for c in cells] == list(RULES)
    for cell in cells:
        assert {"rule", "n", "d", "seconds", "byzfl_seconds", "speedup_vs_byzfl", "matmul_ratio"} <= set(cell)
        assert cell["n"] == 8 and cell["d"] == 3000 and cell["seconds"] > 0
