"""The scored walks: how many rows of the validation and held-out splits are scored, and their digests.

    n = eval_rows(profile)                          # rows of the validation walk evaluate_bpb scores
    h = heldout_rows(profile)                       # rows of the (smaller) held-out walk
    found, sha = walk_digest(table, profile.max_seq_len, n)

Both splits are walked by the loader's deterministic `val_batches`; the digest is the sha256 of
the rows actually scored, so it names the scored tokens whatever code produced them.
"""
import hashlib

import numpy as np

from ..constants import HELDOUT_SHARE
from .errors import DataError
from .loader import val_batches

# The profile fields that define the measurement (recipe_overrides shape the model, not the metric).
PROFILE_FIELDS = ("name", "time_budget", "max_seq_len", "vocab_size", "eval_tokens")
DIGEST_ROWS = 64                         # rows per read while hashing a walk (does not affect the hash)


def measured(profile) -> dict:
    """The profile's measurement numbers: two profiles with equal ones give comparable val_bpb."""
    return {k: getattr(profile, k) for k in PROFILE_FIELDS}


def eval_rows(profile) -> int:
    """Rows of the validation walk that evaluate_bpb scores: eval_tokens / max_seq_len."""
    if profile.eval_tokens % profile.max_seq_len:
        raise DataError(f"profile '{profile.name}': eval_tokens {profile.eval_tokens} is not a multiple of "
                        f"max_seq_len {profile.max_seq_len}")
    return profile.eval_tokens // profile.max_seq_len


def heldout_rows(profile) -> int:
    """Rows of the held-out walk: eval_rows / HELDOUT_SHARE, at least 1."""
    return max(1, eval_rows(profile) // HELDOUT_SHARE)


def walk_digest(table, seq_len: int, n_rows: int) -> tuple[int, str]:
    """(rows found, sha256 of the first n_rows walked rows, each inputs + last target, as little-endian int32)."""
    h = hashlib.sha256()
    found = 0
    for inputs, targets in val_batches(table, DIGEST_ROWS, seq_len, max_rows=n_rows):
        h.update(np.ascontiguousarray(np.concatenate([inputs, targets[:, -1:]], axis=1), dtype="<i4").tobytes())
        found += len(inputs)
    return found, h.hexdigest()
