"""Run output: metrics.jsonl (one event a line), summary.json, PNG plots, and `p2pfl report`.

Theory of operation: everything a plot or table shows is recomputed from metrics.jsonl, so
`report(dir)` after a run gives the same figures the run printed. Files that matter are written
atomically (temp file in the same folder, fsync, rename), so a killed run never leaves a half
summary; metrics.jsonl is append-only and flushed at the end of every round.
"""

from __future__ import annotations

import io
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from p2pfl.errors import ConfigError
from p2pfl.files import atomic_write

if TYPE_CHECKING:
    import torch


def consensus_distance(vectors: torch.Tensor, *, in_place: bool = False) -> float:
    """(1/n) sum_i ||x_i - x_bar||^2 of the rows of `vectors` (n, d); NaN for none. `in_place` reuses
    the tensor's memory (at hundreds of peers each (n, d) temporary is megabytes of fresh pages)."""
    if len(vectors) == 0:
        return math.nan
    centred = vectors.sub_(vectors.mean(0)) if in_place else vectors - vectors.mean(0)
    return float(centred.pow_(2).sum(1).mean())


def read_events(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise ConfigError(f"{run_dir}: no metrics.jsonl here; is this a run folder?")
    lines = path.read_text(encoding="utf-8").splitlines()
    events = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            if n < len(lines):  # only a run killed mid-write may leave one torn last line
                raise ConfigError(f"{path}:{n}: not a JSON line") from None
    return events


def accuracy_table(events: list[dict[str, Any]], honest: set[int] | None = None) -> dict[str, Any]:
    """Per-round mean/min/max accuracy over (honest) peers, and the centralized reference curve."""
    per_round: dict[int, list[float]] = defaultdict(list)
    central: dict[int, float] = {}
    distance: dict[int, float] = {}
    for e in events:
        if e.get("kind") == "round" and "accuracy" in e and (honest is None or e["peer"] in honest):
            per_round[e["round"]].append(e["accuracy"])
        elif e.get("kind") == "centralized":
            central[e["round"]] = e["accuracy"]
        elif e.get("kind") == "consensus":
            distance[e["round"]] = e["distance"]
    rounds = sorted(per_round)
    return {
        "rounds": rounds,
        "mean": [float(np.mean(per_round[t])) for t in rounds],
        "min": [float(np.min(per_round[t])) for t in rounds],
        "max": [float(np.max(per_round[t])) for t in rounds],
        "centralized": [central.get(t, math.nan) for t in rounds],
        "consensus_distance": [distance.get(t, math.nan) for t in rounds],
    }


def plot_accuracy(table: dict[str, Any], path: str | Path, title: str = "",
                  baseline: dict[str, Any] | None = None, baseline_label: str = "baseline") -> None:
    """accuracy.png: the peers' mean and min-max band per evaluated round, the centralized reference
    when there is one, and `baseline` (another run's table, e.g. the same scenario without attackers)
    as a second curve, so an attack's damage shows as the gap between them."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = np.asarray(table["rounds"]) + 1
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    ax.fill_between(r, table["min"], table["max"], alpha=0.25, label="peers: min-max")
    ax.plot(r, table["mean"], label="peers: mean")
    if baseline is not None and baseline["rounds"]:
        b = np.asarray(baseline["rounds"]) + 1
        ax.fill_between(b, baseline["min"], baseline["max"], alpha=0.15, color="tab:green")
        ax.plot(b, baseline["mean"], color="tab:green", label=f"{baseline_label}: mean, min-max")
    if not all(math.isnan(c) for c in table["centralized"]):
        ax.plot(r, table["centralized"], "--", color="black", label="centralized reference")
    _integer_rounds(ax)
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(title)
    _save_png(fig, path)


def _integer_rounds(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))   # rounds are whole: no 1.5 tick


def _save_png(fig: Any, path: str | Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write(path, buf.getvalue())


def consensus_curve(events: list[dict[str, Any]]) -> tuple[list[int], list[float]]:
    """(rounds, exact consensus distance) from the `consensus` events, every round, evaluated or not."""
    pairs = sorted((e["round"], e["distance"]) for e in events if e.get("kind") == "consensus")
    return [t for t, _ in pairs], [d for _, d in pairs]


def plot_consensus(events: list[dict[str, Any]], path: str | Path, title: str = "") -> bool:
    """consensus.png: (1/n) sum_i ||x_i - x_bar||^2 per round, log scale. Written only when the run
    measured it in at least two rounds (the in-process engine, every round): one peer's folder has
    no such events, a multi-process run one (after the last round): False then, and no file."""
    rounds, distance = consensus_curve(events)
    if len(rounds) < 2:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    if any(d > 0 for d in distance):  # a log axis needs a positive value; a full graph can reach exactly 0
        ax.plot(np.asarray(rounds) + 1, distance, marker="." if len(rounds) < 40 else None)
        ax.set_yscale("log")
    ax.set_xlabel("round")
    ax.set_ylabel("consensus distance (1/n) Σ‖x_i − x̄‖²")
    ax.grid(alpha=0.3, which="both")
    _integer_rounds(ax)
    ax.set_title(title)
    _save_png(fig, path)
    return True


def _run_table(run_dir: Path) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """A run folder's events, its start event and its accuracy table (ConfigError if none evaluated)."""
    events = read_events(run_dir)
    start = next((e for e in events if e.get("kind") == "run"), {})
    honest = set(start.get("honest", [])) or None
    table = accuracy_table(events, honest)
    if not table["rounds"]:
        raise ConfigError(f"{run_dir}: metrics.jsonl has no evaluated rounds yet")
    return events, start, table


def report(run_dir: str | Path, baseline: str | Path | None = None) -> dict[str, Any]:
    """Recompute the final table and the plots of a finished run from its metrics.jsonl; `baseline`:
    another run folder (say, the same scenario without attackers) drawn beside it in accuracy.png."""
    run_dir = Path(run_dir)
    events, start, table = _run_table(run_dir)
    base = _run_table(Path(baseline)) if baseline is not None else None
    plot_accuracy(table, run_dir / "accuracy.png", start.get("name", ""),
                  baseline=base[2] if base else None,
                  baseline_label=f"{base[1].get('name') or Path(str(baseline)).name} ({baseline})" if base else "")
    plots = ["accuracy.png"]
    if plot_consensus(events, run_dir / "consensus.png", start.get("name", "")):
        plots.append("consensus.png")
    from p2pfl.sim.reputation_plots import write_figures  # it imports this module

    plots += write_figures(events, run_dir)
    return {"rounds": len(table["rounds"]), "final": {k: table[k][-1] for k in ("mean", "min", "max")},
            "centralized": table["centralized"][-1], "table": table, "plots": plots,
            "baseline_final": base[2]["mean"][-1] if base else None}
