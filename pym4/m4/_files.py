"""The report files of a balance: ``STEM.json`` (summary, group shares, strongest
associations) and ``STEM.png``, written atomically. matplotlib is imported only here."""
from __future__ import annotations

import json
import warnings


def write_report(stem: str, summary: dict, report) -> None:
    """stem.json (the summary, group shares and strongest associations of ``report``, a
    pym4.m4.Report) and stem.png. The plot is drawn on its own Agg canvas, so the caller's
    matplotlib backend and pyplot state stay as they are. Without matplotlib the JSON is
    written and the PNG skipped with a warning: a fit that read a whole dataset must not fail
    at its last step over a plot."""
    import numpy as np

    from .._io import atomic_output

    details = report.details()
    with atomic_output(stem + ".json") as tmp, open(tmp, "w") as f:
        json.dump({**summary, **details}, f, indent=2, default=float, allow_nan=False)
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        warnings.warn(f"{stem}.png not written: matplotlib is not installed (pip install 'pym4[plot]')",
                      RuntimeWarning, stacklevel=2)
        return

    groups, assoc = report.group_names, details["strongest_associations"]
    fig = Figure(figsize=(11, 4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    x = np.arange(len(groups))
    axes[0].bar(x - 0.2, list(details["group_shares_before"].values()), 0.4, label="before")
    # Undefined shares (nothing kept) are None in the details: no bar.
    after = [np.nan if v is None else v for v in details["group_shares_after"].values()]
    axes[0].bar(x + 0.2, after, 0.4, label="after (weighted by q)")
    for k, t in enumerate(report.target):
        axes[0].hlines(t, k - 0.45, k + 0.45, colors="k", linestyles="dashed", label="target" if k == 0 else None)
    axes[0].set_xticks(x, groups, rotation=30, ha="right")
    axes[0].set_ylabel("group share")
    axes[0].set_title("Representation")
    axes[0].legend()
    if assoc:
        yy = np.arange(len(assoc))
        axes[1].barh(yy - 0.2, [abs(a["before"]) for a in assoc], 0.4, label="before")
        axes[1].barh(yy + 0.2, [np.nan if a["after"] is None else abs(a["after"]) for a in assoc], 0.4, label="after")
        axes[1].set_yticks(yy, [f"{a['group']} / {a['label']}" for a in assoc])
        axes[1].invert_yaxis()
        axes[1].legend()
    axes[1].set_xlabel("|P(label | in group) - P(label | not in group)|")
    axes[1].set_title("Strongest associations")
    fig.tight_layout()
    with atomic_output(stem + ".png") as tmp:
        fig.savefig(tmp, dpi=100, format="png")
