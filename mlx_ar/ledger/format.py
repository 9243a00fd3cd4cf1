"""On-disk formats shared by the ledger (writer) and branch comparison (reader).

An experiment branch `autoresearch/<tag>-<machine>` carries its own ledger, committed by
bookkeeping commits whose message starts with LEDGER_COMMIT_PREFIX:
    results.tsv                     one row per attempt, tab-separated, header first
    receipts/<seq:05d>-<commit7>.json   one JSON receipt per attempt
    noise.json                      the measured noise floor, once `mlx-ar noise` has run
Every commit on the branch that is not a ledger commit is a kept experiment.

results.tsv holds upstream's statuses only (keep, discard, crash), so upstream's notebook and
scripts read it as they read their own: the first row is the baseline. A row's val_bpb is the
mean over the attempt's seed runs (n_runs of them; the significance gate re-runs promising
candidates); a crash row holds 0.000000 and 0.0 as upstream's do. Refusals (nothing ran) and
suspect runs (throttled) have receipts but no row; `mlx-ar results` lists every receipt.
"""
import csv
import io
import json

LEDGER_COMMIT_PREFIX = "ledger:"
RESULTS_FILE = "results.tsv"
RECEIPTS_DIR = "receipts"
NOISE_FILE = "noise.json"
RECEIPT_SCHEMA = 1
NOISE_SCHEMA = 1

# Upstream's five columns first, so upstream tooling still reads the file.
RESULTS_COLUMNS = (
    "commit", "val_bpb", "memory_gb", "status", "description",
    "tok_per_sec", "num_steps", "backend", "device", "seed", "contract", "receipt",
    "n_runs", "worker", "heldout_bpb",
)
STATUSES = ("keep", "discard", "crash", "refused", "suspect")
# The statuses that get a results.tsv row (upstream's own).
TSV_STATUSES = ("keep", "discard", "crash")
# Statuses whose metric measures the recipe (crash/refused have none; suspect runs were throttled).
SCORED = ("keep", "discard")

# Fields every receipt carries (values may be null where they do not apply, e.g. metrics of a crash).
RECEIPT_FIELDS = (
    "schema", "seq", "status", "reason", "description",
    "commit", "parent", "branch", "diff",
    "recipe", "backend", "device", "machine", "seed", "contract", "smoke",
    "metrics", "executed_files", "started_at", "finished_at",
    # added by the research loop: which seed runs, what the gate saw, where it ran
    "attempt_commit", "surface_sha", "tier", "gate", "runs", "worker", "contract_parts", "versions",
    "campaign",
    # where it ran (machine: the name in the branch; host: the computer's) and the data profile
    "host", "profile",
)


def machine_name(branch: str | None) -> str | None:
    """The machine name an experiment branch was given: autoresearch/<tag>-<machine>[-w<i>].

    The tag is the first hyphen-separated part (a date, `dec4`); the rest names the machine.
    """
    if not branch:
        return None
    parts = branch.split("/")[-1].split("-")
    if len(parts) >= 3 and parts[-1][:1] == "w" and parts[-1][1:].isdigit():
        parts = parts[:-1]  # a worker's branch <branch>-w<i>
    return "-".join(parts[1:]) or None


def receipt_name(seq: int, commit: str) -> str:
    """receipts/<seq:05d>-<commit7>.json, relative to the branch root."""
    return f"{RECEIPTS_DIR}/{int(seq):05d}-{str(commit)[:7]}.json"


def sanitize(text: str) -> str:
    """One line, no tabs: descriptions must not break the TSV."""
    return " ".join(str(text).replace("\t", " ").split())


def format_row(row: dict) -> str:
    return "\t".join(sanitize("" if row.get(c) is None else row[c]) for c in RESULTS_COLUMNS) + "\n"


def header_line() -> str:
    return "\t".join(RESULTS_COLUMNS) + "\n"


def parse_results(text: str) -> list[dict]:
    """Rows of a results.tsv as dicts (numbers left as strings; '' for missing cells).

    Accepts upstream's five-column files too (extra columns then read as '').
    """
    if not text.strip():
        return []
    reader = csv.reader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE)
    header = next(reader)
    rows = []
    for cells in reader:
        if not cells or not any(cells):
            continue
        row = {c: "" for c in RESULTS_COLUMNS}
        row.update(zip(header, cells))
        rows.append(row)
    return rows


def parse_receipt(text: str) -> dict:
    data = json.loads(text)
    if data.get("schema") != RECEIPT_SCHEMA:
        raise ValueError(f"unknown receipt schema {data.get('schema')!r}")
    return data
