#!/usr/bin/env python
"""Draw every benchmark's PNG from its CSV (the CSV is the result; the PNG is a view of it).

    python benchmarks/plot.py bench_out/*.csv       # writes bench_out/<name>.png beside each

A benchmark calls :func:`plot_csv` after writing its CSV. Which figure a CSV gets is chosen by
its file name: ``<kind>[_<device>].csv`` with kind one of :data:`SPECS` (``contrastive``,
``m4``, ``sinkhorn``). A numeric x axis gives log-log lines, one per implementation (the
timing columns' quartiles as error bars); a text x axis (shape labels) gives grouped bars.
Drawn with matplotlib's object API (no pyplot), so the caller's matplotlib backend is never
changed.
"""
from __future__ import annotations

import csv
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple


@dataclass(frozen=True)
class Panel:
    """One axes: ``y`` is the first of these columns the CSV has; ``absolute`` plots |y|;
    series in ``skip`` are left out; ``hline`` is (value, label) of a reference line."""

    y: Tuple[str, ...]
    label: str
    absolute: bool = False
    skip: Tuple[str, ...] = ()
    hline: Optional[Tuple[float, str]] = None


@dataclass(frozen=True)
class Spec:
    """One benchmark's figure: x column, series column (one line or bar colour each), panels,
    rows kept (``where``: column -> value), a ``floor`` column drawn as its own series, and
    the ``status`` values of points that did not run (drawn as an x)."""

    title: str
    x: str
    xlabel: str
    series: str
    panels: Tuple[Panel, ...]
    where: Dict[str, str] = field(default_factory=dict)
    log_base_x: int = 10
    floor: Optional[str] = None
    failed: Tuple[str, ...] = ()


TIME = ("median_s", "seconds", "time_s")  # the harness's column first, then older CSVs'
SPECS = {
    "contrastive": Spec("contrastive loss forward+backward", "B", "batch size B", "method",
                        (Panel(TIME, "forward+backward time (s)"),
                         Panel(("peak_mb",), "peak memory above inputs (MB)")), log_base_x=2,
                        failed=("oom", "timeout", "failed")),
    "m4": Spec("M4 balancing, dense instances (m=2, c=32)", "n", "examples N", "method",
               (Panel(TIME, "wall time (s)"),
                Panel(("objective_rel_to_exact",), "|objective / exact - 1|", absolute=True, skip=("pym4-exact",),
                      hline=(0.02, "2 %"))), where={"kind": "dense"}),
    "m4_scale": Spec("M4 exact over sharded Parquet: engines, pattern table vs passes", "instance", "instance",
                     "method", (Panel(TIME, "time to the exact answer (s)"),
                                Panel(("rows_per_s_pass",), "rows/s per pass over the data (median)"),
                                Panel(("peak_rss_mb",), "peak RSS of the process tree (MB)"))),
    "m4_scale_profile": Spec("one M4 solver pass over Parquet, stage by stage", "method", "stage", "instance",
                             (Panel(("cpu_ns_per_row",), "CPU ns per row"),
                              Panel(("rows_per_s_pass",), "rows/s (wall)"))),
    "sinkhorn": Spec("Sinkhorn-Knopp: pym4 vs SwAV reference and POT", "shape", "shape", "impl",
                     (Panel(TIME, "time per call (s, log)"),), floor="floor_passes_s"),
    "sinkhorn_load": Spec("Sinkhorn-Knopp on the CPU beside busy processes", "shape", "shape", "busy",
                          (Panel(TIME, "median time per call (s, log)"), Panel(("p90_s",), "90th percentile (s, log)"))),
}


def _number(v: str) -> Any:
    try:
        return int(v)
    except ValueError:
        pass
    try:
        return float(v)
    except ValueError:
        return v


def read_csv(path: str) -> List[Dict[str, Any]]:
    """Rows of a benchmark CSV, numbers parsed (an empty cell stays '')."""
    with open(path, newline="") as f:
        return [{k: _number(v) if v != "" else "" for k, v in row.items()} for row in csv.DictReader(f)]


def spec_for(path: str) -> Tuple[str, Spec]:
    stem = os.path.splitext(os.path.basename(path))[0]
    for kind in sorted(SPECS, key=len, reverse=True):
        if stem == kind or stem.startswith(kind + "_"):
            return kind, SPECS[kind]
    raise ValueError(f"{path}: no figure for this CSV (its name must start with one of {sorted(SPECS)})")


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def plot_csv(path: str, out: Optional[str] = None, title: Optional[str] = None) -> Optional[str]:
    """Draw the PNG of one benchmark CSV at ``out`` (default: beside it, .png); returns its
    path, or None when matplotlib is not installed (the CSV stands alone)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return None
    from pym4._io import atomic_output

    kind, spec = spec_for(path)
    rows = [r for r in read_csv(path) if all(str(r.get(k)) == v for k, v in spec.where.items())]
    if not rows:
        raise ValueError(f"{path}: no rows to plot")
    fig = Figure(figsize=(5.5 * len(spec.panels) + (2.2 if spec.floor else 0), 4.4))
    axes = fig.subplots(1, len(spec.panels), squeeze=False)[0]
    categorical = not all(isinstance(r[spec.x], (int, float)) for r in rows)
    for ax, panel in zip(axes, spec.panels):
        y = next((c for c in panel.y if c in rows[0]), None)
        if y is None:
            raise ValueError(f"{path}: none of the columns {list(panel.y)}")
        if categorical:
            _bars(ax, rows, spec, panel, y)
        else:
            _lines(ax, rows, spec, panel, y)
        ax.set_ylabel(panel.label)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        if panel.hline:
            ax.axhline(panel.hline[0], color="k", ls="--", lw=0.8, label=panel.hline[1])
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title or f"{spec.title} ({os.path.splitext(os.path.basename(path))[0]})")
    fig.tight_layout()
    out = out or os.path.splitext(path)[0] + ".png"
    with atomic_output(out) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    return out


def _series(rows: Sequence[Dict[str, Any]], spec: Spec) -> List[str]:
    return list(dict.fromkeys(str(r[spec.series]) for r in rows))


def _color(rows, spec: Spec, name: str) -> str:
    """The same colour for a series in every panel (matplotlib's default cycle)."""
    return f"C{_series(rows, spec).index(name) % 10}"


def _lines(ax, rows, spec: Spec, panel: Panel, y: str) -> None:
    """One log-log line per series; a point whose status is one of ``spec.failed`` (out of
    memory, not run) is an x at the series' last measured value."""
    any_failed = False
    for name in _series(rows, spec):
        if name in panel.skip:
            continue
        mine = [r for r in rows if str(r[spec.series]) == name]
        ok = sorted((r for r in mine if r.get("status") not in spec.failed and _finite(r.get(y))
                     and (abs(r[y]) if panel.absolute else r[y]) > 0), key=lambda r: r[spec.x])
        if not ok:
            continue
        xs = [r[spec.x] for r in ok]
        vs = [abs(r[y]) if panel.absolute else r[y] for r in ok]
        color = _color(rows, spec, name)
        ax.plot(xs, vs, "-o" if name.startswith("pym4") else "--s", label=name, ms=4, color=color)
        if y == "median_s" and all(_finite(r.get("q25_s")) and _finite(r.get("q75_s")) for r in ok):
            lo = [max(v - r["q25_s"], 0) for r, v in zip(ok, vs)]
            hi = [max(r["q75_s"] - v, 0) for r, v in zip(ok, vs)]
            ax.errorbar(xs, vs, yerr=[lo, hi], fmt="none", ecolor=color, alpha=0.6)
        failed = [r[spec.x] for r in mine if r.get("status") in spec.failed]
        if failed:
            any_failed = True
            ax.plot(failed, [vs[-1]] * len(failed), "x", color=color)
    ax.set_xscale("log", base=spec.log_base_x)
    ax.set_xlabel(spec.xlabel + (" (x: out of memory / not run)" if any_failed else ""))


def _bars(ax, rows, spec: Spec, panel: Panel, y: str) -> None:
    """Grouped bars: one group per x label, one bar per series, and the floor's bar last."""
    labels = list(dict.fromkeys(str(r[spec.x]) for r in rows))
    names = [n for n in _series(rows, spec) if n not in panel.skip]
    groups = [(n, {str(r[spec.x]): r[y] for r in rows if str(r[spec.series]) == n}) for n in names]
    if spec.floor and spec.floor in rows[0]:
        groups.append(("bandwidth floor", {str(r[spec.x]): r[spec.floor] for r in rows}))
    width = 0.8 / len(groups)
    for i, (name, values) in enumerate(groups):
        vs = [values.get(lab, math.nan) for lab in labels]
        vs = [v if _finite(v) else math.nan for v in vs]  # a method without this figure (an empty cell)
        ax.bar([j + i * width for j in range(len(labels))], [abs(v) if panel.absolute else v for v in vs], width,
               label=name, color="0.7" if name == "bandwidth floor" else _color(rows, spec, name))
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))], labels, fontsize=8)
    ax.set_xlabel(spec.xlabel)


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Draw each benchmark CSV's PNG beside it.")
    parser.add_argument("csv", nargs="+", help="benchmark CSV files (bench_out/*.csv)")
    args = parser.parse_args(argv)
    status = 0
    for path in args.csv:
        try:
            png = plot_csv(path)
        except (OSError, ValueError, KeyError) as e:
            print(f"{path}: {e}", file=sys.stderr)
            status = 1
            continue
        if png is None:
            return 1
        print(f"wrote {png}")
    return status


if __name__ == "__main__":
    sys.exit(main())
