"""`mlx-ar results`: the ledger as a table and a summary (best so far, counts, kept trajectory).

    summary = summarize(ledger.rows(), ledger.noise())
    print(format_results(summary, rows, last=20))
    json.dumps(summary)                       # what --json prints (rows included)
"""
from .format import STATUSES


def _num(text):
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def summarize(rows: list[dict], noise: dict | None = None) -> dict:
    """Counts per status, the best kept row, the kept trajectory and the noise floor."""
    counts = {s: 0 for s in STATUSES}
    trajectory, best = [], None
    for i, r in enumerate(rows, 1):
        counts[r.get("status")] = counts.get(r.get("status"), 0) + 1
        if r.get("status") != "keep":
            continue
        v = _num(r.get("val_bpb"))
        if v is None:
            continue
        prev = trajectory[-1]["val_bpb"] if trajectory else None
        trajectory.append({"attempt": i, "commit": r.get("commit"), "val_bpb": v,
                           "delta": None if prev is None else round(v - prev, 6),
                           "description": r.get("description"), "receipt": r.get("receipt"),
                           "worker": r.get("worker") or "", "heldout_bpb": _num(r.get("heldout_bpb"))})
        if best is None or v < best["val_bpb"]:
            best = trajectory[-1]
    out = {"attempts": len(rows), "counts": counts, "best": best, "trajectory": trajectory, "noise": None}
    if noise:
        out["noise"] = {"floor": noise.get("floor"), "n": noise.get("n_with_receipts", noise.get("n")),
                        "commit": noise.get("commit"), "mean": noise.get("mean")}
    return out


def format_results(summary: dict, rows: list[dict], last: int | None = None) -> str:
    """The human table: recent rows, then the summary and the kept trajectory.

    Rows may carry a "reason" (from their receipts); crash, refused and suspect rows show it.
    """
    lines = []
    shown = rows if not last else rows[-last:]
    if shown:
        lines.append(f"{'#':>4}  {'commit':7}  {'val_bpb':>9}  {'held-out':>9}  {'mem GB':>6}  {'status':8} {'runs':>4}  "
                     "description")
        start = len(rows) - len(shown)
        for i, r in enumerate(shown, start + 1):
            desc = r.get("description") or ""
            desc = desc if len(desc) <= 60 else desc[:57] + "..."
            if r.get("status") in ("crash", "refused", "suspect") and r.get("reason"):
                why = r["reason"] if len(r["reason"]) <= 70 else r["reason"][:67] + "..."
                desc = f"{desc}  [{why}]"
            who = f"[{r['worker']}] " if r.get("worker") not in ("", "main", None) else ""
            # Nothing ran for a refusal: no score to show (results.tsv has no row for it at all).
            val, mem = ("-", "-") if r.get("status") == "refused" else (r.get("val_bpb", ""), r.get("memory_gb", ""))
            lines.append(f"{i:>4}  {r.get('commit', ''):7}  {val:>9}  {r.get('heldout_bpb') or '-':>9}  "
                         f"{mem:>6}  "
                         f"{r.get('status', ''):8} {r.get('n_runs', '') or '':>4}  {who}{desc}")
        if len(shown) < len(rows):
            lines.append(f"      ({len(rows) - len(shown)} earlier rows not shown; --last 0 shows all)")
        lines.append("")
    c = summary["counts"]
    lines.append(f"attempts: {summary['attempts']}  keep {c.get('keep', 0)}  discard {c.get('discard', 0)}  "
                 f"crash {c.get('crash', 0)}  refused {c.get('refused', 0)}  suspect {c.get('suspect', 0)}")
    b = summary["best"]
    held = f", held-out {b['heldout_bpb']:.6f}" if b and b.get("heldout_bpb") is not None else ""
    lines.append(f"best:     {b['val_bpb']:.6f} at {b['commit']} ({b['description']}{held})" if b else "best:     none yet")
    n = summary.get("noise")
    if n and n.get("floor") is not None:
        lines.append(f"noise:    sd {n['floor']:.6f} over {n['n']} runs of {str(n['commit'])[:7]}")
    if summary["trajectory"]:
        lines.append("kept trajectory:")
        for t in summary["trajectory"]:
            d = "baseline" if t["delta"] is None else f"{t['delta']:+.6f}"
            lines.append(f"  {t['val_bpb']:.6f}  {d:>10}  {t['commit']}  {t['description']}")
    return "\n".join(lines)
