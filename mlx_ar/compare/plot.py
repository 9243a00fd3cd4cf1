"""progress.png (and .svg): every branch's experiments, plus size vs score.

    paths = plot_progress(ledgers, "runs/plots/progress.png")   # -> [...progress.png, ...progress.svg]

Left panel: val_bpb per experiment, one colour per branch; kept runs are filled dots joined by
the kept frontier (the running best), discarded runs hollow dots (a hollow triangle on the top
edge when far off the scale), crashes an x in the band along the top edge.
Right panel: num_params_M against val_bpb for every scored run, each branch's best starred.
Branches under different contracts are never drawn on one axis: each contract gets its own
row of panels. Smoke runs and runs outside a branch's contract are not drawn.

matplotlib is an optional extra (`pip install 'mlx-autoresearch[plot]'`) and is imported here
only when a plot is drawn; the figure is rendered with the Agg canvas, never a GUI backend.
"""
import io
from pathlib import Path

from ..atomic import atomic_write
from .analysis import group_by_contract, summarize
from .branches import CompareError, _finite

# Under the repository's runs/ (gitignored, and a folder the ledger never judges).
DEFAULT_PLOT_PATH = "runs/plots/progress.png"
DPI = 150
# Axes-fraction heights of the marks along the top edge (kept clear of data by _y_limits).
CRASH_Y, OFF_SCALE_Y = 0.955, 0.985


def _series(ledger, contract):
    """x positions and values per mark kind, over the branch's non-smoke runs in order."""
    s = {"keep": [], "discard": [], "crash": [], "frontier": [], "size": []}
    best = None
    x = 0
    for a in ledger.attempts:
        if a.smoke:
            continue
        x += 1
        if a.status == "crash":
            s["crash"].append(x)
            continue
        if not (a.scored and a.under(contract)):   # the table's scoring rules: suspect runs are not points
            continue
        if a.status == "keep":
            s["keep"].append((x, a.val_bpb))
            best = a.val_bpb if best is None else min(best, a.val_bpb)
            s["frontier"].append((x, best))
        else:
            s["discard"].append((x, a.val_bpb))
        params = a.metric("num_params_M")
        if params is not None:
            s["size"].append((params, a.val_bpb, a.status == "keep"))
    if s["frontier"] and x > s["frontier"][-1][0]:
        s["frontier"].append((x, best))  # carry the best level to the last experiment
    return s


def _y_limits(values, kept):
    """Frame the kept trajectory, leaving a clear band on top for crash and off-scale marks.

    Wild discards (a diverged run at 3.5 bpb) are clipped to that band rather than allowed to
    squash the trajectory into a flat line.
    """
    lo, hi = min(values), max(values)
    if kept:
        hi = min(hi, max(kept) + max(0.25 * (max(kept) - lo), 0.02))
    span = max(hi - lo, 1e-3)
    return lo - 0.05 * span, hi + 0.18 * span


def _rows(summaries):
    """Contracts in display order (ranked groups first), then contracts seen only on unscored branches."""
    groups, unranked = group_by_contract(summaries)
    rows = [g.contract for g in groups]
    for s in unranked:
        if s.experiments and s.contract not in rows:
            rows.append(s.contract)
    return rows or [None]


def plot_progress(ledgers, out=DEFAULT_PLOT_PATH, svg: bool = True) -> list:
    """Draw the ledgers to `out` (PNG) and, with svg, the same stem .svg. Returns the paths written."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
        from matplotlib.ticker import MaxNLocator
        from matplotlib.transforms import blended_transform_factory
    except ImportError:
        raise CompareError("matplotlib is not installed; install the plot extra: "
                           "pip install 'mlx-autoresearch[plot]'") from None

    out = Path(out)
    if not out.parent.exists():
        raise CompareError(f"cannot write {out}: directory {out.parent} does not exist")
    summaries = [summarize(ledger) for ledger in ledgers]
    series = [_series(ledger, s.contract) for ledger, s in zip(ledgers, summaries)]
    rows = _rows(summaries)
    several = len(rows) > 1

    fig = Figure(figsize=(15, 1.6 + 4.6 * len(rows)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), 2, width_ratios=[3, 2], squeeze=False)
    colors = [f"C{i}" for i in range(10)]

    handles = []
    for i, (ledger, s) in enumerate(zip(ledgers, summaries)):
        label = s.short + (f" ({s.machine})" if s.machine else "")
        label += (f": best {s.best_bpb:.4f}" if s.best_bpb is not None
                  else ": no runs" if not ledger.attempts else ": no kept run")
        handles.append(Line2D([], [], color=colors[i % len(colors)], lw=2, marker="o", label=label))

    for row, contract in enumerate(rows):
        ax, ax_size = axes[row]
        members = [i for i, s in enumerate(summaries) if s.experiments and s.contract == contract]
        vals = [v for i in members for k in ("keep", "discard") for _, v in series[i][k]]
        kept = [v for i in members for _, v in series[i]["keep"]]
        ylim = _y_limits(vals, kept) if vals else None
        top_edge = blended_transform_factory(ax.transData, ax.transAxes)

        for i in members:
            s, sr, color = summaries[i], series[i], colors[i % len(colors)]
            if sr["frontier"]:
                fx, fy = zip(*sr["frontier"])
                ax.step(fx, fy, where="post", color=color, lw=2, alpha=0.9, zorder=2)
            if sr["keep"]:
                kx, ky = zip(*sr["keep"])
                ax.scatter(kx, ky, color=color, s=45, edgecolors="black", linewidths=0.6, zorder=4)
            inside = [(x, v) for x, v in sr["discard"] if ylim is None or v <= ylim[1]]
            above = [x for x, v in sr["discard"] if ylim is not None and v > ylim[1]]
            if inside:
                dx, dy = zip(*inside)
                ax.scatter(dx, dy, facecolors="none", edgecolors=color, s=30, alpha=0.75, zorder=3)
            if above:
                ax.scatter(above, [OFF_SCALE_Y] * len(above), transform=top_edge, marker="^",
                           facecolors="none", edgecolors=color, s=30, alpha=0.75, zorder=3)
            if sr["crash"]:
                ax.scatter(sr["crash"], [CRASH_Y] * len(sr["crash"]), transform=top_edge, marker="x",
                           color=color, s=45, linewidths=1.5, zorder=3)

            for is_kept in (True, False):
                pts = [(p, v) for p, v, k in sr["size"] if k == is_kept and (ylim is None or v <= ylim[1])]
                if pts:
                    px, py = zip(*pts)
                    ax_size.scatter(px, py, facecolors=color if is_kept else "none",
                                    edgecolors="black" if is_kept else color, linewidths=0.6,
                                    s=45 if is_kept else 30, alpha=1.0 if is_kept else 0.75, zorder=3)
            params = _finite(s.best_metrics.get("num_params_M"))
            if s.best_bpb is not None and params is not None:
                ax_size.scatter([params], [s.best_bpb], marker="*", s=260, color=color,
                                edgecolors="black", linewidths=0.8, zorder=5)
                ax_size.annotate(s.short, (params, s.best_bpb), textcoords="offset points",
                                 xytext=(9, -4), fontsize=9, color=color)

        where = f" -- contract {contract[:16] if contract else 'unknown'}" if several else ""
        ax.set_title("val_bpb per experiment" + where)
        ax.set_xlabel("experiment # on its branch")
        ax.set_ylabel("val_bpb (lower is better)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax_size.set_title("size vs score" + where)
        ax_size.set_xlabel("parameters (M)")
        ax_size.set_ylabel("val_bpb")
        ax_size.grid(alpha=0.3)
        ax_size.margins(x=0.2)  # room for the best-point labels
        if ylim:
            ax.set_ylim(*ylim)
            ax_size.set_ylim(*ylim)
        else:
            ax.text(0.5, 0.5, "no scored experiments yet", transform=ax.transAxes, ha="center", va="center")
        if not any(series[i]["size"] for i in members):
            ax_size.text(0.5, 0.5, "no runs with num_params_M", transform=ax_size.transAxes,
                         ha="center", va="center")
    title = "autoresearch progress"
    if several:
        title += " (one row per contract: runs under different contracts are not comparable)"
    fig.suptitle(title)
    key = [
        Line2D([], [], color="gray", lw=2, label="kept frontier (running best)"),
        Line2D([], [], color="gray", marker="o", ls="", markeredgecolor="black", label="kept"),
        Line2D([], [], color="gray", marker="o", ls="", markerfacecolor="none", label="discarded"),
        Line2D([], [], color="gray", marker="^", ls="", markerfacecolor="none", label="discarded, off scale (top edge)"),
        Line2D([], [], color="gray", marker="x", ls="", label="crash (top edge)"),
        Line2D([], [], color="gray", marker="*", ls="", markersize=12, label="branch best (size vs score)"),
    ]
    # Outside the axes: inside, any corner can hide a branch's points.
    fig.legend(handles=handles + key, loc="outside lower center", ncols=3, fontsize=9)

    written = []
    targets = [(out, "png")] + ([(out.with_suffix(".svg"), "svg")] if svg else [])
    for path, fmt in targets:
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, dpi=DPI)
        atomic_write(path, buf.getvalue())
        written.append(path)
    return written
