"""Figures of a run with reputation: reputation per neighbour over rounds, and the overlay before/after.

Theory of operation: everything comes from metrics.jsonl. Round events carry each peer's
`reputation` (neighbour peer ID -> r, summing to 1 over its current neighbours) and `rewire` events
the overlay's changes (the in-process engine's; a real peer's removals are in its `removed`). The
heatmap shows r times the peer's degree (1 = the mean reputation, so a removal threshold beta reads
as beta) for each (peer, neighbour) pair, one row each, attackers' rows labelled in red, a cross where
the peer removed that neighbour. The overlay figure draws the initial and the final graph on the same
circle, attackers in red.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from p2pfl.sim.results import _save_png

MAX_ROWS = 96   # pairs shown: the peers with a Byzantine neighbour first, then the others


def has_reputation(events: list[dict[str, Any]]) -> bool:
    return any("reputation" in e for e in events if e.get("kind") == "round")


def reputation_matrix(events: list[dict[str, Any]]) -> tuple[list[tuple[int, int]], np.ndarray, list[tuple[int, int]]]:
    """(rows: (peer, neighbour) index pairs; values [rows, rounds] of r * degree, NaN where not a
    neighbour; removals as (row, round))."""
    start = next(e for e in events if e.get("kind") == "run")
    index = {p: i for i, p in enumerate(start["peer_ids"])}
    byz = set(start.get("byzantine", []))
    rounds = 1 + max(e["round"] for e in events if e.get("kind") == "round")
    cells: dict[tuple[int, int], dict[int, float]] = {}
    removals: set[tuple[int, int, int]] = set()
    for e in events:
        if e.get("kind") != "round" or "reputation" not in e:
            continue
        i, deg = e["peer"], max(1, len(e["reputation"]))
        for p, r in e["reputation"].items():
            if p in index:
                cells.setdefault((i, index[p]), {})[e["round"]] = r * deg
        for p in e.get("removed", []):
            if p in index:
                removals.add((i, index[p], e["round"]))
                cells.setdefault((i, index[p]), {})
    pairs = sorted(cells, key=lambda ij: (not any(j in byz for (k, j) in cells if k == ij[0]), ij))[:MAX_ROWS]
    values = np.full((len(pairs), rounds), np.nan)
    for row, ij in enumerate(pairs):
        for t, v in cells[ij].items():
            values[row, t] = v
    first: dict[tuple[int, int], int] = {}
    for i, j, t in sorted(removals):
        first.setdefault((i, j), t)
    marks = [(row, first[ij]) for row, ij in enumerate(pairs) if ij in first]
    return pairs, values, marks


def plot_reputation(events: list[dict[str, Any]], path: str | Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    start = next(e for e in events if e.get("kind") == "run")
    byz = set(start.get("byzantine", []))
    pairs, values, marks = reputation_matrix(events)
    fig, ax = plt.subplots(figsize=(7.0, max(3.0, 0.12 * len(pairs) + 1.5)), dpi=100)
    im = ax.imshow(np.ma.masked_invalid(values), aspect="auto", cmap="viridis", vmin=0, vmax=2,
                   interpolation="nearest")
    for row, t in marks:
        ax.plot(t, row, marker="x", color="red", markersize=5)
    ax.set_yticks(range(len(pairs)))
    ax.set_yticklabels([f"{i}→{j}" for i, j in pairs], fontsize=5)
    for label, (_, j) in zip(ax.get_yticklabels(), pairs):
        if j in byz:
            label.set_color("red")
    ax.set_xlabel("round (x: removed)")
    ax.set_ylabel("peer → neighbour (red: attacker)")
    fig.colorbar(im, ax=ax, label="reputation × degree (1 = mean)")
    ax.set_title("reputation per neighbour")
    _save_png(fig, path)


def plot_overlay(initial: list[list[int]], final: list[list[int]], byzantine: set[int], path: str | Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(initial)
    angle = 2 * np.pi * np.arange(n) / n
    xy = np.stack([np.cos(angle), np.sin(angle)], 1)
    fig, axes = plt.subplots(1, 2, figsize=(10, 5), dpi=100)
    for ax, nbrs, title in ((axes[0], initial, "before rewiring"), (axes[1], final, "after rewiring")):
        for i, nb in enumerate(nbrs):
            for j in nb:
                if i < j:
                    bad = i in byzantine or j in byzantine
                    ax.plot(*xy[[i, j]].T, color="red" if bad else "0.6", lw=0.8 if bad else 0.5,
                            alpha=0.8 if bad else 0.5)
        colors = ["red" if i in byzantine else "tab:blue" for i in range(n)]
        ax.scatter(xy[:, 0], xy[:, 1], c=colors, s=40, zorder=3)
        for i in range(n):
            ax.annotate(str(i), xy[i] * 1.08, ha="center", va="center", fontsize=6)
        ax.set_title(f"{title} (attackers in red)")
        ax.set_aspect("equal")
        ax.axis("off")
    _save_png(fig, path)


def overlays(events: list[dict[str, Any]]) -> tuple[list[list[int]], list[list[int]]] | None:
    """(initial, final) neighbour lists from the run event's overlay and the rewire events, or None."""
    start = next((e for e in events if e.get("kind") == "run"), {})
    initial = start.get("overlay")
    if initial is None:
        return None
    adj = [set(nb) for nb in initial]
    for e in sorted((e for e in events if e.get("kind") == "rewire"), key=lambda e: e["round"]):
        i, j = e["peer"], e["other"]
        if e["change"] == "link":
            adj[i].add(j)
            adj[j].add(i)
        else:
            adj[i].discard(j)
            adj[j].discard(i)
    return initial, [sorted(a) for a in adj]


def write_figures(events: list[dict[str, Any]], run_dir: str | Path) -> list[str]:
    """reputation.png and overlay.png into run_dir; the names written."""
    if not has_reputation(events):
        return []
    run_dir = Path(run_dir)
    plot_reputation(events, run_dir / "reputation.png")
    written = ["reputation.png"]
    graphs = overlays(events)
    if graphs is not None:
        start = next(e for e in events if e.get("kind") == "run")
        plot_overlay(*graphs, set(start.get("byzantine", [])), run_dir / "overlay.png")
        written.append("overlay.png")
    return written
