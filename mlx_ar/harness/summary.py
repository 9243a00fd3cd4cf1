"""The end-of-run report: the summary block, the JSON run record and the loss fast-fail.

The summary block is what people and upstream tooling grep (`grep "^val_bpb:" run.log`);
the record is what the ledger trusts. Both are built here so every backend writes them the
same way.

    print(format_summary(values))              # values: one entry per SUMMARY_KEYS name
    parse_summary(open("run.log").read())      # -> {"val_bpb": 1.234567, ...}, last block wins
    record = build_record(status="ok", ..., metrics={...})
    write_record("run.json", record)           # atomic: .tmp then os.replace

    check_loss(loss, step)                     # raises FastFail on NaN/inf or a loss > 100
"""
import hashlib
import json
import math
import re
from datetime import datetime, timezone
from pathlib import Path

def kernel_line(versions: dict) -> str:
    """'kernels: attention fa4 4.0.0b36 | mlp torch | loss torch' from a backend's versions()["kernels"]
    ({family: what runs it}), or "" when the backend names no kernels."""
    parts = [f"{family} {what}" for family, what in (versions.get("kernels") or {}).items()]
    return "kernels: " + " | ".join(parts) if parts else ""


# --- summary block ---------------------------------------------------------------------------
# Upstream's lines first (val_bpb .. depth), ours after them. heldout_bpb: the held-out split's
# score, never used for keep decisions (unknown for a dataset prepared without one).
SUMMARY_KEYS = (
    "val_bpb", "training_seconds", "total_seconds", "peak_vram_mb", "mfu_percent",
    "total_tokens_M", "num_steps", "num_params_M", "depth", "heldout_bpb", "tok_per_sec", "startup_seconds",
    "backend", "device", "profile", "budget", "seed", "contract", "record",
)
# The numeric keys, which are also the record's "metrics" (seed is recorded at top level).
# device_batch: the rows per micro-batch the run trained with (what DEVICE_BATCH_SIZE = "auto"
# chose); printed after SUMMARY_KEYS when given, recorded with the metrics.
METRIC_KEYS = SUMMARY_KEYS[:SUMMARY_KEYS.index("backend")] + ("device_batch",)
KEY_WIDTH = 18  # "key:" padded to this many characters, as upstream prints it
# Printed after SUMMARY_KEYS only when given: a reduced profile's recipe overrides (demo), so a
# run never silently replaces what train.py says; the real contract's block stays upstream's.
OPTIONAL_KEYS = ("device_batch", "overrides")
UNKNOWN = "unknown"

_DECIMALS = {
    "val_bpb": 6, "heldout_bpb": 6, "mfu_percent": 2,
    "training_seconds": 1, "total_seconds": 1, "peak_vram_mb": 1, "total_tokens_M": 1,
    "num_params_M": 1, "startup_seconds": 1,
}
_INTEGERS = ("num_steps", "depth", "tok_per_sec", "device_batch", "seed")


def _format_value(key: str, value) -> str:
    if value is None:
        return UNKNOWN
    if key in _DECIMALS:
        return f"{float(value):.{_DECIMALS[key]}f}"
    if key in _INTEGERS:
        return str(int(round(float(value))))
    return " ".join(str(value).split())  # one line, whatever the device string holds


def format_summary(values: dict) -> str:
    """The block starting with `---`, one `key: value` line per SUMMARY_KEYS entry, in order.

    None prints as `unknown` (mfu_percent on a chip with no known peak).
    """
    missing = [k for k in SUMMARY_KEYS if k not in values]
    extra = [k for k in values if k not in SUMMARY_KEYS and k not in OPTIONAL_KEYS]
    if missing or extra:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + (
            [f"unknown keys {', '.join(extra)}"] if extra else [])
        raise ValueError(f"format_summary: {'; '.join(parts)} (keys are mlx_ar.harness.summary.SUMMARY_KEYS)")
    keys = list(SUMMARY_KEYS) + [k for k in OPTIONAL_KEYS if values.get(k)]
    lines = ["---"] + [f"{k + ':':<{KEY_WIDTH}}{_format_value(k, values[k])}" for k in keys]
    return "\n".join(lines) + "\n"


def overrides_text(overrides: dict) -> str:
    """The `overrides:` value: 'DEPTH=2 HEAD_DIM=32', the recipe constants a profile replaced."""
    return " ".join(f"{k}={v!r}".replace(" ", "") for k, v in overrides.items())


def budget_label(time_budget: float, smoke: bool) -> str:
    """The `budget:` value: '300 s', or '5 s (smoke run, not comparable)' for --smoke runs."""
    text = f"{float(time_budget):g} s"
    return text + " (smoke run, not comparable)" if smoke else text


_LINE_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*):\s*(.*?)\s*$")


def _parse_value(key: str, raw: str):
    if key not in _DECIMALS and key not in _INTEGERS:
        return raw
    if raw == UNKNOWN:
        return None
    try:
        if key in _DECIMALS:
            return float(raw)
        try:
            return int(raw)
        except ValueError:
            return int(float(raw))
    except ValueError:
        raise ValueError(f"summary line `{key}: {raw}` is not a number") from None


def parse_summary(text: str) -> dict:
    """The last summary block of a log as a dict with numbers converted; {} when there is none.

    A block is a `---` line followed by `key: value` lines; it counts only if it holds at least
    one SUMMARY_KEYS name, so other `---` lines in a log are ignored. Unknown keys are kept as
    strings, and `unknown` reads back as None.
    """
    found = {}
    block = None
    for line in text.splitlines():  # also splits on the \r of progress lines
        if line.strip() == "---":
            block = {}
            continue
        if block is None:
            continue
        m = _LINE_RE.match(line)
        if m:
            block[m.group(1)] = m.group(2)
            continue
        if any(k in block for k in SUMMARY_KEYS):
            found = block
        block = None
    if block and any(k in block for k in SUMMARY_KEYS):
        found = block
    return {k: _parse_value(k, v) for k, v in found.items()}


# --- run record ------------------------------------------------------------------------------
RECORD_SCHEMA = 1
RECORD_FIELDS = (
    "schema", "status", "reason", "backend", "device", "profile", "smoke", "time_budget", "seed",
    "dataset", "recipe", "contract", "contract_parts", "metrics", "executed_files", "versions",
    "started_at", "finished_at", "recipe_overrides",
)
# recipe_overrides: {name: value} the data profile replaced in train.py's recipe ({} for the real one).
_RECORD_DEFAULTS = {"schema": RECORD_SCHEMA, "reason": None, "metrics": None, "recipe_overrides": {}}
STATUSES = ("ok", "fail")


def _metric(key: str, value):
    if value is None:
        return None
    if key in _INTEGERS:
        return int(round(float(value)))
    value = float(value)
    # JSON has no NaN/inf; a non-finite metric is recorded as not reached (the reason says why).
    return value if math.isfinite(value) else None


def build_record(**fields) -> dict:
    """The run record, with exactly RECORD_FIELDS in that order.

    Every field must be given except schema, reason (None) and metrics (all None). `metrics`
    may hold any subset of METRIC_KEYS; the rest are recorded as null. A failed run
    (status "fail") must give a reason; an ok run must not, and must have val_bpb.
    """
    unknown = [k for k in fields if k not in RECORD_FIELDS]
    missing = [k for k in RECORD_FIELDS if k not in fields and k not in _RECORD_DEFAULTS]
    if unknown or missing:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + (
            [f"unknown fields {', '.join(unknown)}"] if unknown else [])
        raise TypeError(f"build_record: {'; '.join(parts)}")
    rec = {k: fields.get(k, _RECORD_DEFAULTS.get(k)) for k in RECORD_FIELDS}
    if rec["schema"] != RECORD_SCHEMA:
        raise ValueError(f"build_record: schema must be {RECORD_SCHEMA}, got {rec['schema']!r}")
    if rec["status"] not in STATUSES:
        raise ValueError(f"build_record: status must be one of {STATUSES}, got {rec['status']!r}")
    if rec["status"] == "fail" and not rec["reason"]:
        raise ValueError("build_record: a failed run needs a reason")
    if rec["status"] == "ok" and rec["reason"] is not None:
        raise ValueError(f"build_record: an ok run has no reason, got {rec['reason']!r}")
    metrics = dict(rec["metrics"] or {})
    bad = [k for k in metrics if k not in METRIC_KEYS]
    if bad:
        raise ValueError(f"build_record: unknown metrics {', '.join(bad)} (known: {', '.join(METRIC_KEYS)})")
    rec["metrics"] = {k: _metric(k, metrics.get(k)) for k in METRIC_KEYS}
    if rec["status"] == "ok" and rec["metrics"]["val_bpb"] is None:
        raise ValueError("build_record: an ok run must have a finite metrics.val_bpb")
    if not isinstance(rec["smoke"], bool):
        raise ValueError(f"build_record: smoke must be True or False, got {rec['smoke']!r}")
    for k in ("recipe", "contract_parts", "executed_files", "versions"):
        if rec[k] is not None and not isinstance(rec[k], dict):
            raise ValueError(f"build_record: {k} must be a dict, got {type(rec[k]).__name__}")
    if rec["time_budget"] is not None:
        rec["time_budget"] = float(rec["time_budget"])
    if rec["seed"] is not None:
        rec["seed"] = int(rec["seed"])
    return rec


def utc_timestamp(when: datetime | None = None) -> str:
    """ISO-8601 UTC with a Z suffix, to the second: '2025-01-31T12:00:00Z'."""
    when = when or datetime.now(timezone.utc)
    return when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def file_hashes(paths, root=None) -> dict:
    """{name: sha256 hex} of files; names are relative to `root` when given, else as passed."""
    out = {}
    for p in paths:
        p = Path(p)
        full = Path(root) / p if root is not None and not p.is_absolute() else p
        name = p.as_posix()
        if root is not None:
            try:
                name = full.resolve().relative_to(Path(root).resolve()).as_posix()
            except ValueError:
                raise ValueError(f"executed file {full} is outside the repository root {root}") from None
        h = hashlib.sha256()
        try:
            with open(full, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        except FileNotFoundError:
            raise FileNotFoundError(f"cannot hash executed file {full}: it does not exist") from None
        out[name] = h.hexdigest()
    return out


def write_record(path, record: dict) -> None:
    """Write `record` as JSON atomically: a crash leaves the old file or the new one, never half."""
    from ..atomic import atomic_write

    atomic_write(path, json.dumps(record, indent=2, allow_nan=False) + "\n")


# --- fast-fail -------------------------------------------------------------------------------
MAX_LOSS = 100.0


class FastFail(RuntimeError):
    """Training diverged; the run prints `FAIL: <reason>`, writes its record and exits 1."""


def check_loss(value: float, step: int) -> None:
    """Raise FastFail on a NaN/inf loss or a loss above MAX_LOSS."""
    value = float(value)
    if not math.isfinite(value):
        raise FastFail(f"non-finite loss at step {step}")
    if value > MAX_LOSS:
        raise FastFail(f"loss {value:.4g} > {MAX_LOSS:g} at step {step}")


def fail_line(reason: str) -> str:
    return f"FAIL: {' '.join(str(reason).split())}"
