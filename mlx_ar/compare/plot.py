"""progress.png (and .svg): every branch's experiments on one chart, plus size vs score.

    paths = plot_progress(ledgers, "progress.png")   # -> [progress.png, progress.svg]

Left panel: val_bpb per experiment, one colour per branch; kept runs are filled dots joined by
the kept frontier (the running best), discarded runs hollow dots, crashes an x on the top edge.
Right panel: num_params_M against val_bpb for every scored run, each branch's best starred.
Runs outside a branch's contract and smoke runs are not drawn (they are not comparable).

matplotlib is an optional extra (`pip install 'mlx-autoresearch[plot]'`) and is imported here
only when a plot is drawn; the figure is rendered with the Agg canvas, never a GUI backend.
"""
import os
from pathlib import Path

from .analysis import summarize
from .branches import CompareError, _finite

DEFAULT_PLOT_PATH = "progress.png"
DPI = 150


def _series(ledger, contract):
    """x positions and values per mark kind, over the branch's non-smoke runs in order."""
    s = {"keep": [], "discard": [], "crash": [], "frontier": [], "size": []}
    best = None
    x = 0
    real = [a for a in ledger.attempts if not a.smoke]
    for a in real:
        x += 1
        same = contract is None or a.contract is None or a.contract == contract
        if a.status == "crash":
            s["crash"].append(x)
        elif a.val_bpb is None or not same:
            continue
        elif a.status == "keep":
            s["keep"].append((x, a.val_bpb))
            best = a.val_bpb if best is None else min(best, a.val_bpb)
            s["frontier"].append((x, best))
        else:
            s["discard"].append((x, a.val_bpb))
        params = a.metric("num_params_M")
        if a.val_bpb is not None and same and a.status != "crash" and params is not None:
            s["size"].append((params, a.val_bpb, a.status == "keep"))
    if s["frontier"] and x > s["frontier"][-1][0]:
        s["frontier"].append((x, best))  # carry the best level to the last experiment
    return s


def _y_limits(values, kept):
    """Frame the kept trajectory; wild discards are clipped to the top edge, not allowed to squash it."""
    lo, hi = min(values), max(values)
    if kept:
        cap = max(kept) + max(0.5 * (max(kept) - lo), 0.02)
        hi = min(hi, cap)
    pad = max(0.05 * (hi - lo), 1e-3)
    return lo - pad, hi + pad


def plot_progress(ledgers, out=DEFAULT_PLOT_PATH, svg: bool = True) -> list:
    """Draw the ledgers to `out` (PNG) and, with svg, the same stem .svg. Returns the paths written."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
        from matplotlib.transforms import blended_transform_factory
    except ImportError:
        raise CompareError("matplotlib is not installed; install the plot extra: "
                           "pip install 'mlx-autoresearch[plot]'") from None

    out = Path(out)
    summaries = [summarize(ledger) for ledger in ledgers]
    series = [_series(ledger, s.contract) for ledger, s in zip(ledgers, summaries)]
    contracts = {s.contract for s in summaries if s.best_bpb is not None}

    fig = Figure(figsize=(15, 7), layout="constrained")
    FigureCanvasAgg(fig)
    ax, ax_size = fig.subplots(1, 2, width_ratios=[3, 2])
    colors = [f"C{i}" for i in range(10)]
    top_edge = blended_transform_factory(ax.transData, ax.transAxes)

    all_vals = [v for sr in series for k in ("keep", "discard") for _, v in sr[k]]
    kept_vals = [v for sr in series for _, v in sr["keep"]]
    ylim = _y_limits(all_vals, kept_vals) if all_vals else None

    handles = []
    for i, (ledger, s, sr) in enumerate(zip(ledgers, summaries, series)):
        color = colors[i % len(colors)]
        label = f"{s.short}"
        if s.machine:
            label += f" ({s.machine})"
        label += f": best {s.best_bpb:.4f}" if s.best_bpb is not None else (
            ": no runs" if not ledger.attempts else ": no kept run")
        if len(contracts) > 1 and s.contract:
            label += f" [contract {s.contract[:8]}]"
        handles.append(Line2D([], [], color=color, lw=2, marker="o", label=label))

        if sr["frontier"]:
            fx, fy = zip(*sr["frontier"])
            ax.step(fx, fy, where="post", color=color, lw=2, alpha=0.9, zorder=2)
        if sr["keep"]:
            kx, ky = zip(*sr["keep"])
            ax.scatter(kx, ky, color=color, s=45, edgecolors="black", linewidths=0.6, zorder=4)
        if sr["discard"]:
            inside = [(x, v) for x, v in sr["discard"] if ylim is None or v <= ylim[1]]
            above = [x for x, v in sr["discard"] if ylim is not None and v > ylim[1]]
            if inside:
                dx, dy = zip(*inside)
                ax.scatter(dx, dy, facecolors="none", edgecolors=color, s=30, alpha=0.7, zorder=3)
            if above:
                ax.scatter(above, [0.985] * len(above), transform=top_edge, marker="^", facecolors="none",
                           edgecolors=color, s=30, alpha=0.7, clip_on=False, zorder=3)
        if sr["crash"]:
            ax.scatter(sr["crash"], [0.955] * len(sr["crash"]), transform=top_edge, marker="x",
                       color=color, s=45, linewidths=1.5, clip_on=False, zorder=3)

        if sr["size"]:
            for kept, face, size in ((True, color, 45), (False, "none", 30)):
                pts = [(p, v) for p, v, k in sr["size"] if k == kept]
                if pts:
                    px, py = zip(*pts)
                    ax_size.scatter(px, py, facecolors=face, edgecolors=color if not kept else "black",
                                    linewidths=0.6, s=size, alpha=1.0 if kept else 0.7, zorder=3)
        if s.best_bpb is not None:
            params = _finite(s.best_metrics.get("num_params_M"))
            if params is not None:
                ax_size.scatter([params], [s.best_bpb], marker="*", s=260, color=color,
                                edgecolors="black", linewidths=0.8, zorder=5)
                ax_size.annotate(s.short, (params, s.best_bpb), textcoords="offset points", xytext=(8, -12),
                                 fontsize=9, color=color)

    if ylim:
        ax.set_ylim(*ylim)
    else:
        ax.text(0.5, 0.5, "no scored experiments yet", transform=ax.transAxes, ha="center", va="center")
    ax.set_xlabel("experiment # on its branch")
    ax.set_ylabel("val_bpb (lower is better)")
    ax.set_title("val_bpb per experiment: kept frontier, discards, crashes")
    ax.grid(alpha=0.3)
    ax.legend(handles=[
        Line2D([], [], color="gray", lw=2, label="kept frontier (running best)"),
        Line2D([], [], color="gray", marker="o", ls="", markeredgecolor="black", label="kept"),
        Line2D([], [], color="gray", marker="o", ls="", markerfacecolor="none", label="discarded"),
        Line2D([], [], color="gray", marker="^", ls="", markerfacecolor="none", label="discarded, off scale"),
        Line2D([], [], color="gray", marker="x", ls="", label="crash (top edge)"),
    ], loc="upper right", fontsize=8, framealpha=0.9)

    ax_size.set_xlabel("parameters (M)")
    ax_size.set_ylabel("val_bpb")
    ax_size.set_title("size vs score (filled: kept, star: branch best)")
    ax_size.grid(alpha=0.3)
    if not any(sr["size"] for sr in series):
        ax_size.text(0.5, 0.5, "no runs with num_params_M", transform=ax_size.transAxes,
                     ha="center", va="center")
    elif ylim:
        ax_size.set_ylim(*ylim)

    title = "autoresearch progress"
    if len(contracts) > 1:
        title += " -- branches under different contracts are not comparable"
    fig.suptitle(title)
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 3), fontsize=9)

    written = []
    targets = [(out, "png")] + ([(out.with_suffix(".svg"), "svg")] if svg else [])
    for path, fmt in targets:
        if path.parent and not path.parent.exists():
            raise CompareError(f"cannot write {path}: directory {path.parent} does not exist")
        tmp = path.with_name(path.name + ".tmp")
        fig.savefig(tmp, format=fmt, dpi=DPI)
        os.replace(tmp, path)
        written.append(path)
    return written
