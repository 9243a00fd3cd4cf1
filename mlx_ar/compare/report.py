"""The branch comparison as one JSON-ready dict, and that dict rendered as text tables.

    report = build_report(ledgers, recipe_at)   # what `mlx-ar compare --json` prints
    print(format_text(report))                  # what `mlx-ar compare` prints

The text is rendered from the dict, so both outputs always say the same thing.
"""
import json

from .analysis import (
    classify_changes, contract_differences, group_by_contract, recipe_table, summarize, unranked_reason,
)

REPORT_SCHEMA = 1


def build_report(ledgers, recipe_at=lambda commit: None) -> dict:
    summaries = [summarize(ledger, recipe_at) for ledger in ledgers]
    groups, unranked = group_by_contract(summaries)
    return {
        "schema": REPORT_SCHEMA,
        "branches": [s.to_json() for s in summaries],
        "groups": [
            {"contract": g.contract, "parts": g.parts, "ranking": [s.name for s in g.branches]}
            for g in groups
        ],
        "unranked": [{"branch": s.name, "reason": unranked_reason(s)} for s in unranked],
        "contract_differences": contract_differences(groups),
        "recipe_diff": recipe_table(summaries),
        "changes": classify_changes(summaries),
    }


def to_json(report: dict) -> str:
    return json.dumps(report, indent=2, default=repr)


# --- text ----------------------------------------------------------------------------------------


def _table(headers, rows, right=()) -> list:
    """Lines of a space-aligned table; columns whose index is in `right` are right-aligned."""
    cells = [list(map(str, headers))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for r in cells:
        parts = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  " + "  ".join(parts).rstrip())
    return lines


def _bpb(v):
    return "-" if v is None else f"{v:.6f}"


def _int(v):
    return "-" if v is None else f"{int(round(v))}"


def _val(v):
    return repr(v)


def _contract_label(c):
    return c if c else "unknown (no fingerprint recorded)"


def _short(name):
    from .branches import BRANCH_PREFIX
    return name.replace(BRANCH_PREFIX, "", 1)


def format_text(report: dict) -> str:
    by_name = {b["name"]: b for b in report["branches"]}
    out = []
    if not by_name:
        return "no branches to compare\n"

    headers = ["#", "branch", "machine", "device", "backend", "exps", "keep", "disc", "crash", "other",
               "baseline", "best", "gain", "steps", "tok/s", "noise"]
    for g in report["groups"]:
        n = len(g["ranking"])
        out.append(f"contract {_contract_label(g['contract'])} -- {n} branch{'es' if n != 1 else ''}, "
                   "ranked by best val_bpb (lower is better)")
        rows = []
        for i, name in enumerate(g["ranking"], 1):
            b = by_name[name]
            m = b["best_metrics"]
            rows.append([i, _short(name), b["machine"] or "-", b["device"] or "-", b["backend"] or "-",
                         b["experiments"], b["keeps"], b["discards"], b["crashes"], b["other"],
                         _bpb(b["baseline_bpb"]), _bpb(b["best_bpb"]), _bpb(b["gain"]),
                         _int(m.get("num_steps")), _int(m.get("tok_per_sec")), _bpb(b["noise_floor"])])
        out += _table(headers, rows, right=set(range(5, 16)) | {0})
        out.append("")

    if report["unranked"]:
        out.append("not ranked (no kept run with a score):")
        rows = []
        for u in report["unranked"]:
            b = by_name[u["branch"]]
            rows.append([_short(b["name"]), b["machine"] or "-", b["backend"] or "-", b["experiments"],
                         b["crashes"], u["reason"]])
        out += _table(["branch", "machine", "backend", "exps", "crash", "why"], rows, right={3, 4})
        out.append("")

    if report["contract_differences"]:
        out.append("contracts differ, so these groups are never ranked together:")
        for d in report["contract_differences"]:
            head = f"  {_contract_label(d['a'])} vs {_contract_label(d['b'])}: "
            if d["differs"] is None:
                out.append(head + "the receipts carry no contract parts, so the differing ingredient "
                           "cannot be named (compare the runs' run.json contract_parts)")
            elif not d["differs"]:
                out.append(head + "fingerprints differ but the recorded contract parts agree")
            else:
                out.append(head + "; ".join(f"{k} {va!r} vs {vb!r}" for k, (va, vb) in d["differs"].items()))
        out.append("")

    if report["recipe_diff"]:
        names = [b["name"] for b in report["branches"] if b["best_recipe"] is not None]
        out.append("recipe at each branch's best commit (* = changed from that branch's baseline, "
                   "- = not defined there):")
        rows = []
        for r in report["recipe_diff"]:
            rows.append([r["key"]] + [
                (_val(r["values"][n]) + ("*" if n in r["changed"] else "")) if n in r["values"] else "-"
                for n in names
            ])
        out += _table(["constant"] + [_short(n) for n in names], rows)
        out.append("")

    if report["changes"]:
        out.append("kept changes, baseline -> best:")
        rows = []
        for c in report["changes"]:
            where = ", ".join(
                f"{_short(e['branch'])} "
                f"{'(absent)' if e['direction'].startswith('added') else _val(e['from'])}->"
                f"{'(absent)' if e['direction'] == 'removed' else _val(e['to'])}"
                for e in c["branches"]
            )
            rows.append([c["kind"], c["key"], c["direction"] or "mixed", where])
        out += _table(["kind", "constant", "change", "where (branch old->new)"], rows)
        if any(c["kind"] == "unconfirmed" for c in report["changes"]):
            out.append("  (only one machine compared: universal and hardware-specific cannot be told apart)")
        out.append("")

    notes = [(b["name"], n) for b in report["branches"] for n in b["notes"]]
    if notes:
        out.append("notes:")
        out += [f"  {_short(name)}: {n}" for name, n in notes]
        out.append("")
    return "\n".join(out)
