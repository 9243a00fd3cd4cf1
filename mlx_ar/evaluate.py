"""The fixed metric: bits per byte of a model's predictions, the leak probe, and the contract fingerprint.

    from mlx_ar.evaluate import check_causal, contract_fingerprint, evaluate_bpb
    check_causal(backend.eval_logits, ds)                  # LeakDetected("leak: ...") if it looks ahead
    val_bpb = evaluate_bpb(backend.eval_nats, ds)          # the pinned validation walk
    heldout_bpb = evaluate_bpb(backend.eval_nats, ds, split="heldout")
    fingerprint, parts = contract_fingerprint(ds)

The files the agent edits expose predictions, never losses, to evaluation: float32 logits
(b, T, V) for rows of tokens. The cross-entropy that turns them into a score is fixed code:
`cross_entropy` here (numpy, float32, in bounded chunks of positions) and each backend's
`eval_nats`, which applies the same float32 formula on its device to the model's logits. So a
change to the training loss (label smoothing, a z-loss) cannot move the score of the same weights.

evaluate_bpb walks a pinned split (the loader's deterministic walk, rows of profile.max_seq_len)
for exactly its scored rows and asks only for per-token nats. Rows per call come from the logits
memory bound (rows * T * vocab * 4 bytes <= max_logits_bytes), never from the training batch size,
and the sum is exactly rounded per row then across rows (math.fsum), so the result is the same for
any rows-per-call and on every machine given the same nats:

    bpb = sum(nats of targets whose token has > 0 bytes) / (ln 2 * sum(bytes of those targets))

Special tokens (0 bytes) are left out of both sums. A non-finite loss makes the result nan/inf.

The leak probe runs before scoring: on a validation row it changes the tokens after a position
and checks that the logits up to that position do not move (several positions, and the last
positions of a short row). A model that sees its own targets would otherwise score near zero.

The contract fingerprint (16 hex chars) names what a val_bpb means, not the text of this code:
EVAL_VERSION (bumped when scoring semantics change), the profile's measurement numbers, the
held-out size, the tokenizer hash, and the sha256 of the validation and held-out rows scored.
Runs with different fingerprints are never compared.
"""
import hashlib
import json
import math

import numpy as np

from .constants import EVAL_VERSION, HELDOUT_SHARE
from .data.errors import DataError
from .data.walk import eval_rows, heldout_rows, measured, walk_digest

# Two rows of the real contract's logits per call: an evaluation never needs more memory than a
# small training micro-batch, so it cannot set a run's peak on an 8 GB Mac.
DEFAULT_MAX_LOGITS_BYTES = 128 * 2**20
LOGIT_BYTES = 4                          # float32 logits
CE_CHUNK_POSITIONS = 1024                # positions per numpy cross-entropy step: ~3 temporaries of 1024 * V * 4 bytes
FINGERPRINT_CHARS = 16
# The probe's tolerance: identical computations give identical logits; a look-ahead moves them by far more.
LEAK_RTOL = 1e-3
LEAK_NOISE_FACTOR = 10.0                 # a leak moves predictions this much more than a row's own noise
LEAK_SEED = 0
SPLIT_ROWS = {"val": eval_rows, "heldout": heldout_rows}


class LeakDetected(RuntimeError):
    """The model's predictions depend on later tokens; the message starts with 'leak: '."""


# --- cross-entropy from predictions -----------------------------------------------------------
def cross_entropy(logits, targets, chunk_positions: int = CE_CHUNK_POSITIONS) -> np.ndarray:
    """Per-token cross-entropy in nats, float32 (..., T), of float32 logits (..., T, V).

    log-sum-exp minus the target's logit, max-shifted, computed chunk_positions positions at a
    time so the temporaries stay bounded whatever the number of rows.
    """
    z = np.asarray(logits)
    t = np.asarray(targets)
    if z.shape[:-1] != t.shape:
        raise ValueError(f"logits of shape {z.shape} do not match targets of shape {t.shape}")
    flat_z, flat_t = z.reshape(-1, z.shape[-1]), t.reshape(-1).astype(np.intp)
    out = np.empty(len(flat_t), dtype=np.float32)
    for i in range(0, len(flat_t), chunk_positions):
        c = flat_z[i:i + chunk_positions].astype(np.float32)
        m = c.max(axis=-1, keepdims=True)
        lse = np.log(np.exp(c - m).sum(axis=-1, dtype=np.float32)) + m[:, 0]
        out[i:i + chunk_positions] = lse - np.take_along_axis(c, flat_t[i:i + chunk_positions, None], -1)[:, 0]
    return out.reshape(t.shape)


def nats_from_logits(logits_fn, chunk_rows: int = 1):
    """A nats_fn for evaluate_bpb from a logits_fn, chunk_rows rows of logits at a time."""
    def nats(inputs, targets):
        return np.concatenate([cross_entropy(np.asarray(logits_fn(inputs[i:i + chunk_rows]), dtype=np.float32),
                                             targets[i:i + chunk_rows])
                               for i in range(0, len(inputs), chunk_rows)])
    return nats


# --- scoring ----------------------------------------------------------------------------------
def eval_batch_rows(profile, vocab_size: int, max_logits_bytes: int = DEFAULT_MAX_LOGITS_BYTES,
                    split: str = "val") -> int:
    """Rows per nats_fn call: as many as fit the logits bound, at least 1, at most all of them."""
    per_row = profile.max_seq_len * vocab_size * LOGIT_BYTES
    return max(1, min(SPLIT_ROWS[split](profile), max_logits_bytes // per_row))


def evaluate_bpb(nats_fn, ds, *, split: str = "val", max_logits_bytes: int = DEFAULT_MAX_LOGITS_BYTES,
                 progress=None) -> float:
    """Bits per byte of `nats_fn` on the pinned `split` walk ('val' or 'heldout') of dataset `ds`.

    nats_fn(inputs, targets): int32 arrays (b, T) -> per-token nats, array-like (b, T), computed by
    fixed code from the model's logits (a backend's eval_nats, or nats_from_logits).
    progress(done_tokens, total_tokens), if given, is called after every batch.
    """
    if split not in SPLIT_ROWS:
        raise ValueError(f"split must be one of {tuple(SPLIT_ROWS)}, got {split!r}")
    profile = ds.profile
    seq_len, n_rows = profile.max_seq_len, SPLIT_ROWS[split](profile)
    rows_per_call = eval_batch_rows(profile, ds.vocab_size, max_logits_bytes, split)
    batches = ds.val_batches if split == "val" else ds.heldout_batches
    token_bytes = np.asarray(ds.token_bytes, dtype=np.int64)
    row_nats: list[float] = []
    total_bytes = 0
    done = 0
    for inputs, targets in batches(rows_per_call, seq_len, max_rows=n_rows):
        nats = np.asarray(nats_fn(inputs, targets), dtype=np.float64)
        if nats.shape != targets.shape:
            raise ValueError(f"nats_fn returned shape {nats.shape}; evaluate_bpb needs per-token nats of "
                             f"shape {targets.shape} (no reduction)")
        nbytes = token_bytes[targets]
        counted = np.where(nbytes > 0, nats, 0.0)
        row_nats.extend(math.fsum(row) for row in counted.tolist())
        total_bytes += int(nbytes.sum())
        done += len(targets)
        if progress is not None:
            progress(done * seq_len, n_rows * seq_len)
    name = "validation" if split == "val" else "held-out"
    if done < n_rows:
        raise DataError(f"the {name} split of '{ds.name}' yields only {done} of the {n_rows} rows needed; "
                        "re-run prepare with more validation data")
    if total_bytes == 0:
        raise DataError(f"the {name} walk of '{ds.name}' has no bytes to score")
    return math.fsum(row_nats) / (math.log(2) * total_bytes)


# --- leak probe -------------------------------------------------------------------------------
def probe_points(seq_len: int) -> list[tuple[int, int]]:
    """(row length, position) pairs probed: tokens after `position` change, logits up to it must not.

    Full rows at the start, a quarter, both sides of the middle (where a half-context sliding
    window ends) and the next-to-last position; a short row at its next-to-last position.
    """
    T = seq_len
    full = sorted({p for p in (0, T // 4, T // 2 - 1, T // 2, T - 2) if 0 <= p <= T - 2})
    short = max(2, T // 8)
    return [(T, p) for p in full] + ([(short, short - 2)] if short < T else [])


def leak_probe(logits_fn, row, vocab_size: int, *, seed: int = LEAK_SEED) -> str | None:
    """None if `logits_fn`'s predictions are causal on `row` (int32 (T,)); else a 'leak: ...' reason.

    logits_fn(inputs int32 (b, t)) -> float32 logits (b, t, V). Each probe is one call on two rows
    (the original and the changed one), so both go through the same computation. A move beyond
    the tolerance is checked against the move between two copies of the original row in one call:
    a backend whose rows differ by themselves (nondeterministic kernels) is not taken for a leak
    unless the change moved the predictions LEAK_NOISE_FACTOR times more.
    """
    row = np.asarray(row, dtype=np.int32)
    rng = np.random.default_rng(seed)
    for length, p in probe_points(len(row)):
        x = row[:length]
        y = x.copy()
        # Every token after p changes (a shift by 1..V-1 modulo V).
        y[p + 1:] = (x[p + 1:].astype(np.int64) + rng.integers(1, vocab_size, size=length - p - 1)) % vocab_size
        out = np.asarray(logits_fn(np.stack([x, y])), dtype=np.float32)
        a, b = out[0, :p + 1], out[1, :p + 1]
        moved = float(np.abs(a - b).max())
        tol = LEAK_RTOL * (1.0 + float(np.abs(a).max()))
        if moved > tol:
            same = np.asarray(logits_fn(np.stack([x, x])), dtype=np.float32)
            tol = max(tol, LEAK_NOISE_FACTOR * float(np.abs(same[0, :p + 1] - same[1, :p + 1]).max()))
        if moved > tol:
            return (f"leak: the predictions at positions 0..{p} of a {length}-token row moved by up to "
                    f"{moved:.3g} (tolerance {tol:.3g}) when only the tokens after position {p} changed; "
                    "the model sees later tokens (its targets), so its val_bpb would mean nothing")
    return None


def check_causal(logits_fn, ds) -> None:
    """Run leak_probe on the first validation row of `ds`; raise LeakDetected on a look-ahead."""
    inputs, _ = next(iter(ds.val_batches(1, ds.profile.max_seq_len, max_rows=1)))
    reason = leak_probe(logits_fn, inputs[0], ds.vocab_size)
    if reason:
        raise LeakDetected(reason)


# --- contract fingerprint ---------------------------------------------------------------------
def fingerprint(parts: dict) -> str:
    """First FINGERPRINT_CHARS hex chars of sha256 over the canonical JSON of `parts`."""
    canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:FINGERPRINT_CHARS]


def contract_parts(profile, tokenizer_hash: str, validation_sha256: str, heldout_sha256: str | None = None,
                   eval_version: int = EVAL_VERSION, heldout_share: int = HELDOUT_SHARE) -> dict:
    """The ingredients of the fingerprint, as recorded in run records and receipts.

    heldout_sha256 is None for a dataset prepared without a held-out split.
    """
    return {
        "eval_version": eval_version,
        "profile": measured(profile),
        "heldout_share": heldout_share,
        "tokenizer": tokenizer_hash,
        "validation": validation_sha256,
        "heldout": heldout_sha256,
    }


def _checked_digest(ds, split: str, n_rows: int, manifest_key: str) -> str:
    found, digest = walk_digest(ds.split_table(split), ds.profile.max_seq_len, n_rows)
    name = "validation" if split == "val" else "held-out"
    if found < n_rows:
        raise DataError(f"the {name} split of '{ds.name}' yields only {found} of the {n_rows} rows "
                        "evaluate_bpb needs; re-run prepare with more validation data")
    if ds.manifest.get(manifest_key, {}).get("sha256") != digest:
        raise DataError(f"the {name} tokens of '{ds.name}' differ from those recorded when it was prepared "
                        f"(in {ds.dir}); {getattr(ds, 'rebuild_hint', 're-run prepare with --force')}")
    return digest


def contract_fingerprint(ds) -> tuple[str, dict]:
    """(fingerprint, parts) of dataset `ds`; DataError if its scored tokens changed since prepare."""
    profile = ds.profile
    val = _checked_digest(ds, "val", eval_rows(profile), "validation_walk")
    heldout = None if ds.heldout_missing else _checked_digest(ds, "heldout", heldout_rows(profile), "heldout_walk")
    parts = contract_parts(profile, ds.tokenizer.hash, val, heldout)
    return fingerprint(parts), parts
