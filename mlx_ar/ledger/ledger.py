"""The ledger on disk: results.tsv, one JSON receipt per attempt, the noise floor, and a lock.

    ledger = Ledger(root, state_dir=git_common_dir / "mlx-ar")
    with ledger.lock():                       # fcntl lock shared by every worker's process
        seq = ledger.reserve_seq()
        path = ledger.write_receipt(receipt)  # receipt first, then its row, both atomic

Every file is written to a temporary name and moved into place with os.replace, so a crash
leaves the old file or the new one, never half of either. The receipt is the source of truth
and is written before its results.tsv row; `repair()` re-appends rows for receipts that have
none (a crash between the two), so no scored attempt is ever lost from the table. Only keep,
discard and crash receipts get a row (see format.py); `all_rows()` lists every receipt.

The pure functions at the bottom read receipts: the champion, the samples of one train.py,
the variance groups, and the branch's usual tok/s (for the throttle sentinel).
"""
import fcntl
import json
import os
import threading
from contextlib import contextmanager
from pathlib import Path

from ..atomic import atomic_write

from .format import (NOISE_FILE, RECEIPT_SCHEMA, RECEIPTS_DIR, RESULTS_FILE, SCORED, TSV_STATUSES, format_row,
                     header_line, parse_receipt, parse_results, receipt_name)


class LedgerError(RuntimeError):
    """The ledger on disk cannot be read or written (the message names the file)."""


def dump_json(data) -> str:
    return json.dumps(data, indent=2, allow_nan=False, default=str) + "\n"


# --- the ledger --------------------------------------------------------------------------------
class Ledger:
    def __init__(self, root, state_dir=None):
        self.root = Path(root)
        # The lock and the sequence counter; shared by all worktrees when it is in the git dir.
        self.state_dir = Path(state_dir) if state_dir is not None else self.root / ".mlx-ar"
        self.results_path = self.root / RESULTS_FILE
        self.receipts_dir = self.root / RECEIPTS_DIR
        self.noise_path = self.root / NOISE_FILE
        self._depth = 0
        self._fd = None
        self._mutex = threading.RLock()

    # --- locking -------------------------------------------------------------------------------
    @contextmanager
    def lock(self):
        """Exclusive lock across processes (fcntl); re-entrant within this object."""
        with self._mutex:
            if self._depth == 0:
                self.state_dir.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.state_dir / "ledger.lock", os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                except BaseException:
                    os.close(fd)
                    raise
                self._fd = fd
            self._depth += 1
            try:
                yield self
            finally:
                self._depth -= 1
                if self._depth == 0:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)
                    os.close(self._fd)
                    self._fd = None

    # --- reading -------------------------------------------------------------------------------
    def rows(self) -> list[dict]:
        if not self.results_path.exists():
            return []
        try:
            return parse_results(self.results_path.read_text())
        except (OSError, UnicodeDecodeError) as e:
            raise LedgerError(f"cannot read {self.results_path}: {e}") from None

    def all_rows(self) -> list[dict]:
        """A row for every receipt (refusals and suspect runs too), in seq order."""
        return [row_for(r, r["_path"]) for r in self.receipts()]

    def receipts(self) -> list[dict]:
        """All receipts in seq order; each gets a `_path` key (relative to the root)."""
        out = []
        if not self.receipts_dir.is_dir():
            return out
        for p in sorted(self.receipts_dir.glob("*.json")):
            try:
                r = parse_receipt(p.read_text())
            except (OSError, ValueError) as e:
                raise LedgerError(f"receipt {p} is unreadable ({e}); move it aside to continue") from None
            r["_path"] = f"{RECEIPTS_DIR}/{p.name}"
            out.append(r)
        out.sort(key=lambda r: (r.get("seq") or 0, r["_path"]))
        return out

    def noise(self) -> dict | None:
        if not self.noise_path.exists():
            return None
        try:
            return json.loads(self.noise_path.read_text())
        except (OSError, ValueError) as e:
            raise LedgerError(f"{self.noise_path} is unreadable ({e}); re-measure with `mlx-ar noise`") from None

    # --- writing (callers hold the lock) ------------------------------------------------------
    def reserve_seq(self) -> int:
        """The next free sequence number, unique across every process sharing state_dir."""
        with self.lock():
            counter = self.state_dir / "seq"
            try:
                last = int(counter.read_text().strip() or 0)
            except (FileNotFoundError, ValueError):
                last = 0
            on_disk = [r.get("seq") or 0 for r in self.receipts()]
            seq = max([last, *on_disk]) + 1
            atomic_write(counter, f"{seq}\n")
            return seq

    def write_receipt(self, receipt: dict) -> str:
        """Write the receipt, then append its row; returns the receipt's relative path."""
        if receipt.get("schema") != RECEIPT_SCHEMA or not isinstance(receipt.get("seq"), int):
            raise LedgerError("a receipt needs schema 1 and an integer seq")
        rel = receipt_name(receipt["seq"], receipt.get("commit") or "0000000")
        with self.lock():
            if (self.root / rel).exists():
                raise LedgerError(f"{self.root / rel} already exists; sequence numbers must be unique")
            atomic_write(self.root / rel, dump_json({k: v for k, v in receipt.items() if not k.startswith("_")}))
            if receipt.get("status") in TSV_STATUSES:
                self._append_rows([row_for(receipt, rel)])
        return rel

    def _append_rows(self, rows: list[dict]) -> None:
        old = self.results_path.read_text() if self.results_path.exists() else ""
        head = header_line()
        if old and not old.startswith(head.rstrip("\n")):
            # An older (e.g. upstream five-column) table: keep its rows under our header.
            old = head + "".join(format_row(r) for r in parse_results(old))
        text = (old or head)
        if not text.endswith("\n"):
            text += "\n"
        atomic_write(self.results_path, text + "".join(format_row(r) for r in rows))

    def repair(self) -> list[str]:
        """Append rows for scored receipts missing from results.tsv (a crash between the two writes)."""
        with self.lock():
            have = {r.get("receipt") for r in self.rows()}
            missing = [r for r in self.receipts() if r["_path"] not in have and r.get("status") in TSV_STATUSES]
            if missing:
                self._append_rows([row_for(r, r["_path"]) for r in missing])
            return [r["_path"] for r in missing]

    def write_noise(self, data: dict) -> None:
        with self.lock():
            atomic_write(self.noise_path, dump_json(data))


def row_for(receipt: dict, rel_path: str) -> dict:
    """The results.tsv row of a receipt (upstream's conventions: 0.000000 / 0.0 for no result)."""
    m = receipt.get("metrics") or {}
    vb, mem = m.get("val_bpb"), m.get("peak_vram_mb")
    ok = receipt.get("status") in ("keep", "discard", "suspect") and vb is not None
    runs = receipt.get("runs") or []
    return {
        "commit": (receipt.get("commit") or "")[:7],
        "val_bpb": f"{vb:.6f}" if ok else "0.000000",
        "memory_gb": f"{mem / 1024:.1f}" if ok and mem is not None else "0.0",
        "status": receipt.get("status"),
        "description": receipt.get("description") or "",
        "tok_per_sec": f"{m['tok_per_sec']:.0f}" if ok and m.get("tok_per_sec") is not None else "",
        "num_steps": f"{m['num_steps']:.0f}" if ok and m.get("num_steps") is not None else "",
        "backend": receipt.get("backend") or "",
        "device": receipt.get("device") or "",
        "seed": "" if receipt.get("seed") is None else str(receipt["seed"]),
        "contract": receipt.get("contract") or "",
        "receipt": rel_path,
        "n_runs": str(sum(1 for r in runs if r.get("status") == "ok")),
        "worker": receipt.get("worker") or "",
        # The held-out split's score: shown beside val_bpb, never used by the gate.
        "heldout_bpb": f"{m['heldout_bpb']:.6f}" if ok and m.get("heldout_bpb") is not None else "",
    }


# --- questions asked of the receipts --------------------------------------------------------
def ok_values(receipt: dict, objective: str) -> list[float]:
    """The objective of each ok seed run in a receipt."""
    out = []
    for run in receipt.get("runs") or []:
        v = (run.get("metrics") or {}).get(objective)
        if run.get("status") == "ok" and isinstance(v, (int, float)):
            out.append(float(v))
    return out


def counts_as_scored(receipt: dict, allow_smoke: bool) -> bool:
    return receipt.get("status") in SCORED and (allow_smoke or not receipt.get("smoke"))


def find_scored(receipts, surface_sha: str, allow_smoke: bool) -> dict | None:
    """The receipt that already scored this exact mutable surface, if any."""
    for r in receipts:
        if r.get("surface_sha") == surface_sha and counts_as_scored(r, allow_smoke):
            return r
    return None


def champion(receipts, objective: str, sign: float, allow_smoke: bool, contract: str | None = None):
    """The best kept receipt (by its mean objective), optionally within one contract; or None."""
    best, best_key = None, None
    for r in receipts:
        if r.get("status") != "keep" or (r.get("smoke") and not allow_smoke):
            continue
        if contract is not None and r.get("contract") not in (None, contract):
            continue
        v = (r.get("metrics") or {}).get(objective)
        if not isinstance(v, (int, float)):
            continue
        key = (sign * float(v), -(r.get("seq") or 0))  # ties: the later keep
        if best_key is None or key < best_key:
            best, best_key = r, key
    return best


def noise_measurements(noise: dict | None) -> list[dict]:
    """The current and previous noise measurements in a noise.json."""
    if not noise:
        return []
    return [noise, *[m for m in noise.get("previous") or [] if isinstance(m, dict)]]


def samples_of(receipts, noise, surface_sha: str, objective: str) -> list[float]:
    """Every ok measurement of one mutable surface: its scored receipts' runs and noise runs."""
    out = []
    for r in receipts:
        if r.get("surface_sha") == surface_sha and r.get("status") in SCORED:
            out += ok_values(r, objective)
    for m in noise_measurements(noise):
        if m.get("surface_sha") == surface_sha and m.get("objective", "val_bpb") == objective:
            out += [float(x) for x in m.get("samples") or []]
    return out


def variance_groups(receipts, noise, objective: str, exclude=()) -> list[list[float]]:
    """Repeated-run groups that inform the pooled variance, one per mutable surface."""
    by_sha = {}
    for r in receipts:
        sha = r.get("surface_sha")
        if sha and sha not in exclude and r.get("status") in SCORED:
            by_sha.setdefault(sha, []).extend(ok_values(r, objective))
    for m in noise_measurements(noise):
        sha = m.get("surface_sha")
        if sha and sha not in exclude and m.get("objective", "val_bpb") == objective:
            by_sha.setdefault(sha, []).extend(float(x) for x in m.get("samples") or [])
    return [g for g in by_sha.values() if len(g) >= 2]


def usual_rate(receipts, backend: str | None, device: str | None, window: int) -> tuple[float | None, int]:
    """(median tok/s of the last `window` ok runs on this backend and device, how many runs)."""
    rates = []
    for r in receipts:
        if r.get("status") not in SCORED or r.get("smoke"):
            continue
        if (backend and r.get("backend") not in (None, backend)) or (device and r.get("device") not in (None, device)):
            continue
        for run in r.get("runs") or []:
            v = (run.get("metrics") or {}).get("tok_per_sec")
            if run.get("status") == "ok" and isinstance(v, (int, float)) and v > 0:
                rates.append(float(v))
    rates = rates[-window:]
    if not rates:
        return None, 0
    s = sorted(rates)
    mid = len(s) // 2
    return (s[mid] if len(s) % 2 else 0.5 * (s[mid - 1] + s[mid])), len(rates)
