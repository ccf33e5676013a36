"""``--plot FILE.png``: one figure for every bench, ratios as horizontal bars.

Every bench turns its results into *bars*: a ratio (a speedup, or a time over a
baseline's) for one case (a shape and layout) and one series (what is compared), with
its spread over the interleaved repeats (the ratio of each repeat's pair of samples:
interquartile range as a thick whisker, min-max as a thin one).  The bars are faceted,
one panel per (row, column) (thread count x operation, say), every panel on the same
logarithmic ratio axis, with ticks at readable ratios (0.5, 1, 1.5, 2, 3, 5, ...) and
each bar's median printed at its end.  A case measured while the machine was visibly
busy is drawn hollow and labelled "busy" instead of a value.
"""

from __future__ import annotations

import math
import sys

import numpy as np

from .harness import paired_ratios, shape_label

INSTALL_HINT = ("--plot needs matplotlib, which is not installed "
                "(pip install matplotlib, or pip install 'cpubn[plot]')")

COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2")
# Tick candidates: dense enough to read 1.5x or 0.7x, thinned to PREFERRED_TICKS on a wide axis.
TICKS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1, 1.5, 2, 3, 5, 7, 10, 15, 20, 30, 50,
         70, 100, 200, 500, 1000)
TICK_SETS = ((0.5, 0.6, 0.7, 0.8, 0.9, 1, 1.1, 1.2, 1.3, 1.5, 1.7, 2),
             (0.3, 0.5, 0.7, 0.8, 1, 1.2, 1.5, 2, 2.5, 3, 4, 5),
             TICKS,
             (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
             (0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 100, 300, 1000),
             (0.01, 0.1, 1, 10, 100, 1000))


def matplotlib_missing():
    """True (after printing why on stderr) when --plot cannot work here."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(f"error: {INSTALL_HINT}", file=sys.stderr)
        return True
    return False


def bar(row, col, label, series, ratios, busy=False, median=None):
    """One bar: ``ratios`` are the per-repeat ratios (their median is drawn unless
    ``median`` is given, e.g. the ratio of the two medians the text report prints)."""
    values = np.asarray([v for v in ratios if v and math.isfinite(v) and v > 0], dtype=float)
    if values.size == 0 and median is None:
        return None
    if values.size == 0:
        values = np.asarray([median])
    lo, q1, mid, q3, hi = np.percentile(values, [0, 25, 50, 75, 100])
    return {"row": row, "col": col, "label": label, "series": series,
            "median": float(mid if median is None else median), "q1": float(q1),
            "q3": float(q3), "min": float(lo), "max": float(hi), "busy": bool(busy)}


def _ticks(lo, hi):
    for candidates in TICK_SETS:             # the densest set that stays readable
        ticks = [t for t in candidates if lo <= t <= hi]
        if len(ticks) <= 8:
            break
    return ticks


def _fmt_ratio(v):
    return f"{v:.2f}x" if v < 10 else f"{v:.0f}x"


def save_ratio_plot(path, bars, *, title, xlabel, rows=None, cols=None, series=None,
                    note=None, row_title="{}", col_title="{}"):
    """Write a PNG of ``bars`` (from :func:`bar`; None entries are skipped) to ``path``.

    ``rows``, ``cols`` and ``series`` fix the order of facet rows, facet columns and
    bars within a case (default: order of appearance).  A vertical line marks 1x.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    bars = [b for b in bars if b is not None]
    rows = list(rows or dict.fromkeys(b["row"] for b in bars)) or [None]
    cols = list(cols or dict.fromkeys(b["col"] for b in bars)) or [None]
    series = list(series or dict.fromkeys(b["series"] for b in bars))
    series = [s for s in series if any(b["series"] == s for b in bars)]
    color = {s: COLORS[i % len(COLORS)] for i, s in enumerate(series)}

    # Cases (the y labels) of each panel, in order of appearance.
    labels = {(r, c): list(dict.fromkeys(b["label"] for b in bars
                                         if b["row"] == r and b["col"] == c))
              for r in rows for c in cols}
    per_row = [max([len(labels[r, c]) for c in cols] + [1]) for r in rows]
    slot = 0.16 * max(2, len(series)) + 0.12            # inches per case
    label_width = max([len(b["label"]) for b in bars] + [8]) * 0.075
    height = sum(0.5 + slot * n for n in per_row) + 1.3
    width = max(8.0, label_width + 3.6 * len(cols) + 0.4)
    legend_cols = max(1, min(len(series), int(width // (0.075 * max(map(len, series or ["x"])) + 0.6))))
    legend_rows = math.ceil(len(series) / legend_cols) if series else 0
    height += 0.22 * legend_rows
    fig, axes = plt.subplots(len(rows), len(cols), squeeze=False, sharex=True,
                             figsize=(width, height),
                             gridspec_kw={"height_ratios": [0.5 + slot * n for n in per_row]})

    # The axis spans the medians and interquartile ranges: one stray repeat must not
    # squeeze every other bar (a min-max whisker beyond the axis runs to its edge).
    values = [v for b in bars for v in (b["q1"], b["q3"], b["median"])] or [1.0]
    lo, hi = min(min(values), 1.0) / 1.2, max(max(values), 1.0) * 1.1
    # Room right of the longest bar for its value label (about a sixth of the axis).
    hi *= 10 ** (0.2 * math.log10(hi / lo) + 0.05)
    band = 0.8 / max(1, len(series))
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            ax = axes[i, j]
            cases = labels[r, c]
            ax.set_xscale("log")
            ax.set_xlim(lo, hi)
            ax.axvline(1.0, color="0.3", linewidth=0.9, zorder=1)
            for k, s in enumerate(series):
                for y, case in enumerate(cases):
                    b = next((b for b in bars if (b["row"], b["col"], b["label"], b["series"])
                              == (r, c, case, s)), None)
                    if b is None:
                        continue
                    yy = y - 0.4 + band * (k + 0.5)
                    m = b["median"]
                    ax.barh(yy, m - 1.0, left=1.0, height=band * 0.9,
                            color="none" if b["busy"] else color[s], edgecolor=color[s],
                            hatch="//" if b["busy"] else None, linewidth=0.8, zorder=2)
                    ax.plot([b["min"], b["max"]], [yy, yy], color="0.15", linewidth=0.7,
                            zorder=3)
                    ax.plot([b["q1"], b["q3"]], [yy, yy], color="0.15", linewidth=2.6,
                            solid_capstyle="butt", zorder=3)
                    text = "busy" if b["busy"] else _fmt_ratio(m)
                    ax.text(max(m, b["q3"], 1.0) * 1.07, yy, text, va="center", ha="left",
                            fontsize=7, color="0.35" if b["busy"] else "0.1", zorder=4,
                            bbox={"boxstyle": "square,pad=0.05", "facecolor": "white",
                                  "edgecolor": "none", "alpha": 0.85})
            ax.set_yticks(range(len(cases)), cases, fontsize=8)
            ax.set_ylim(len(cases) - 0.5 if cases else 0.5, -0.5)
            ax.xaxis.set_major_locator(FixedLocator(_ticks(lo, hi)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.tick_params(axis="x", labelsize=8, labelbottom=True)
            ax.grid(axis="x", color="0.88", linewidth=0.6, zorder=0)
            ax.set_axisbelow(True)
            for side in ("top", "right"):
                ax.spines[side].set_visible(False)
            parts = ([row_title.format(r)] if r is not None and len(rows) > 1 else []) + \
                ([col_title.format(c)] if c is not None else [])
            heading = ", ".join(parts)
            ax.set_title(heading, fontsize=9, loc="left")
            if not cases:
                ax.text(0.5, 0.5, "no case", transform=ax.transAxes, ha="center",
                        color="0.5", fontsize=8)
        axes[i, 0].set_ylabel("")
    fig.supxlabel(xlabel, fontsize=8, y=(0.32 + 0.13 * bool(note)) / height)
    handles = [plt.Rectangle((0, 0), 1, 1, color=color[s]) for s in series]
    if series:
        fig.legend(handles, series, loc="upper left", ncol=legend_cols, fontsize=8,
                   frameon=False, bbox_to_anchor=(0.0, 1 - 0.3 / height), borderaxespad=0.2,
                   handlelength=1.2, columnspacing=1.5)
    fig.suptitle(title, fontsize=10, x=0.01, ha="left", y=0.995)
    caption = ("bar: median ratio; thick whisker: interquartile range, thin: min-max of the "
               "per-repeat ratios")
    if any(b["busy"] for b in bars):
        caption += "; hatched 'busy': the machine was busy during that case, not a result"
    if note:
        caption += "\n" + note
    fig.text(0.01, 0.005, caption, fontsize=7, color="0.3", ha="left", va="bottom")
    top = 1 - (0.75 + 0.22 * legend_rows) / height
    bottom = (0.8 + 0.13 * bool(note)) / height
    fig.subplots_adjust(left=label_width / width + 0.01, right=0.98, top=top, bottom=bottom,
                        # spaces between panels, as fractions of a panel's mean height/width
                        hspace=0.75 * len(rows) / sum(slot * n for n in per_row),
                        wspace=(label_width + 0.3) / 3.6)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def threads_label(n):
    return f"{n} thread{'s' if n > 1 else ''}"


def sweep_bars(results, pairs):
    """Bars of a sweep's records (fused, half): ``pairs`` maps a series (a ratio's name in
    ``record["ratios"]``) to its (numerator, denominator) peers, whose samples were taken
    in the same rounds.  Panels: a row per thread count, a column per operation."""
    bars = []
    for r in results:
        samples = r.get("samples_ms", {})
        for name, (a, b) in pairs.items():
            if a in samples and b in samples:
                bars.append(bar(threads_label(r["threads"]), r["op"],
                                f"{shape_label(r['shape'])} {r['layout']}", name,
                                paired_ratios(samples[a], samples[b]), busy=r.get("busy"),
                                median=r["ratios"].get(name)))
    return bars
