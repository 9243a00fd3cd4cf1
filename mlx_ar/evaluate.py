"""The fixed metric: validation bits per byte, and the contract fingerprint it is measured under.

    from mlx_ar.evaluate import evaluate_bpb
    bpb = evaluate_bpb(loss_fn, ds)              # loss_fn(inputs, targets) -> nats, shape (B, T)
    fingerprint, parts = ds.contract             # = contract_fingerprint(ds)

evaluate_bpb is backend-agnostic: it walks the pinned validation split (the loader's validation
walk, rows of profile.max_seq_len) for exactly profile.eval_tokens target tokens and asks the
backend only for per-token losses. The rows per call are chosen from the logits memory bound
(rows * T * vocab * 4 bytes <= max_logits_bytes), never from the training batch size, and the
sum is exactly rounded per row then across rows (math.fsum), so the result is the same for any
rows-per-call and on every machine given the same losses:

    bpb = sum(nats of targets whose token has > 0 bytes) / (ln 2 * sum(bytes of those targets))

Special tokens (0 bytes) are left out of both sums. A non-finite loss makes the result nan/inf.

The contract fingerprint (16 hex chars) covers everything that gives a val_bpb its meaning:
the profile's measurement numbers (PROFILE_FIELDS), EVAL_VERSION, the tokenizer hash (ranks, special tokens, pattern), the
identity of the validation tokens actually scored (sha256 of the walked rows), and the source of
this module and of the loader's validation walk. Runs with different fingerprints are never
compared.
"""
import hashlib
import json
import math
from pathlib import Path

import numpy as np

from .constants import EVAL_VERSION
from .data.errors import DataError

DEFAULT_MAX_LOGITS_BYTES = 512 * 2**20
LOGIT_BYTES = 4                          # float32 logits
FINGERPRINT_CHARS = 16
# The profile fields that define the measurement (recipe_overrides shape the model, not the metric).
PROFILE_FIELDS = ("name", "time_budget", "max_seq_len", "vocab_size", "eval_tokens")
DIGEST_ROWS = 64                         # rows per read while hashing the walk (does not affect the hash)


def measured(profile) -> dict:
    """The profile's measurement numbers: two profiles with equal ones give comparable val_bpb."""
    return {k: getattr(profile, k) for k in PROFILE_FIELDS}


def eval_rows(profile) -> int:
    """Rows of the validation walk that evaluate_bpb scores: eval_tokens / max_seq_len."""
    if profile.eval_tokens % profile.max_seq_len:
        raise DataError(f"profile '{profile.name}': eval_tokens {profile.eval_tokens} is not a multiple of "
                        f"max_seq_len {profile.max_seq_len}")
    return profile.eval_tokens // profile.max_seq_len


def eval_batch_rows(profile, vocab_size: int, max_logits_bytes: int = DEFAULT_MAX_LOGITS_BYTES) -> int:
    """Rows per loss_fn call: as many as fit the logits bound, at least 1, at most all of them."""
    per_row = profile.max_seq_len * vocab_size * LOGIT_BYTES
    return max(1, min(eval_rows(profile), max_logits_bytes // per_row))


def evaluate_bpb(loss_fn, ds, *, max_logits_bytes: int = DEFAULT_MAX_LOGITS_BYTES, progress=None) -> float:
    """Bits per byte of `loss_fn` on the pinned validation walk of dataset `ds`.

    loss_fn(inputs, targets): int32 arrays (b, T) -> per-token losses in nats, array-like (b, T).
    progress(done_tokens, total_tokens), if given, is called after every batch.
    """
    profile = ds.profile
    seq_len, n_rows = profile.max_seq_len, eval_rows(profile)
    rows_per_call = eval_batch_rows(profile, ds.vocab_size, max_logits_bytes)
    token_bytes = np.asarray(ds.token_bytes, dtype=np.int64)
    row_nats: list[float] = []
    total_bytes = 0
    done = 0
    for inputs, targets in ds.val_batches(rows_per_call, seq_len, max_rows=n_rows):
        nats = np.asarray(loss_fn(inputs, targets), dtype=np.float64)
        if nats.shape != targets.shape:
            raise ValueError(f"loss_fn returned shape {nats.shape}; evaluate_bpb needs per-token losses of "
                             f"shape {targets.shape} (no reduction)")
        nbytes = token_bytes[targets]
        counted = np.where(nbytes > 0, nats, 0.0)
        row_nats.extend(math.fsum(row) for row in counted.tolist())
        total_bytes += int(nbytes.sum())
        done += len(targets)
        if progress is not None:
            progress(done * seq_len, n_rows * seq_len)
    if done < n_rows:
        raise DataError(f"the validation split of '{ds.name}' yields only {done} of the {n_rows} rows needed "
                        f"for {profile.eval_tokens} eval tokens; re-run prepare with more validation data")
    if total_bytes == 0:
        raise DataError(f"the validation walk of '{ds.name}' has no bytes to score")
    return math.fsum(row_nats) / (math.log(2) * total_bytes)


# --- contract fingerprint ---------------------------------------------------------------------
def validation_walk_digest(val_table, seq_len: int, n_rows: int) -> tuple[int, str]:
    """(rows found, sha256 of the first n_rows walked rows as little-endian int32, row after row)."""
    from .data.loader import val_batches

    h = hashlib.sha256()
    found = 0
    for inputs, targets in val_batches(val_table, DIGEST_ROWS, seq_len, max_rows=n_rows):
        rows = np.concatenate([inputs, targets[:, -1:]], axis=1)
        h.update(np.ascontiguousarray(rows, dtype="<i4").tobytes())
        found += len(rows)
    return found, h.hexdigest()


def eval_code_hash(evaluate_source: bytes | None = None, walk_source: str | None = None) -> str:
    """sha256 of this module's source and of the loader's validation-walk source (defaults: the live code)."""
    from .data.loader import validation_walk_source

    h = hashlib.sha256(Path(__file__).read_bytes() if evaluate_source is None else evaluate_source)
    h.update(b"\0" + (validation_walk_source() if walk_source is None else walk_source).encode())
    return h.hexdigest()


def fingerprint(parts: dict) -> str:
    """First FINGERPRINT_CHARS hex chars of sha256 over the canonical JSON of `parts`."""
    canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:FINGERPRINT_CHARS]


def contract_parts(profile, tokenizer_hash: str, validation_sha256: str, eval_code: str | None = None,
                   eval_version: int = EVAL_VERSION) -> dict:
    """The ingredients of the fingerprint, as recorded in run records and receipts."""
    return {
        "profile": measured(profile),
        "eval_version": eval_version,
        "tokenizer": tokenizer_hash,
        "validation": validation_sha256,
        "eval_code": eval_code if eval_code is not None else eval_code_hash(),
    }


def contract_fingerprint(ds) -> tuple[str, dict]:
    """(fingerprint, parts) of dataset `ds`; DataError if its validation tokens changed since prepare."""
    profile = ds.profile
    n_rows = eval_rows(profile)
    found, digest = validation_walk_digest(ds.split_table("val"), profile.max_seq_len, n_rows)
    if found < n_rows:
        raise DataError(f"the validation split of '{ds.name}' yields only {found} of the {n_rows} rows "
                        "evaluate_bpb needs; re-run prepare with more validation data")
    recorded = ds.manifest.get("validation_walk", {}).get("sha256")
    if recorded != digest:
        raise DataError(f"the validation tokens of '{ds.name}' differ from those recorded when it was prepared "
                        f"(in {ds.dir}); {getattr(ds, 'rebuild_hint', 're-run prepare with --force')}")
    parts = contract_parts(profile, ds.tokenizer.hash, digest)
    return fingerprint(parts), parts
