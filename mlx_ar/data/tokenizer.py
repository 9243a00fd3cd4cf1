"""The BPE tokenizer: trained with rustbpe, encoded with tiktoken, stored without pickle.

    tok = train_tokenizer(texts, vocab_size=8192)   # texts: iterable of training-split strings
    tok.save(dir)                                   # ranks.txt + tokenizer.json + token_bytes.npy
    tok = load_tokenizer(dir, vocab_size=8192)      # validates every file; DataError if off
    ids = tok.encode("hello")                       # ordinary text: "<|bos|>" in text is just text
    tok.decode(ids); tok.bos_id; tok.vocab_size; tok.token_bytes

On disk (loading only parses text, JSON and a numeric .npy, so it can never execute code):
    ranks.txt        one line per mergeable token: base64(token bytes) SPACE rank, ranks 0..n-1
    tokenizer.json   format, pattern, special tokens and their ids, vocab size, sha256 of ranks.txt
    token_bytes.npy  int32 (vocab_size,): UTF-8 byte length of each token, 0 for special tokens
The special tokens take the ids right after the mergeable ranks; BOS is the first of them.
"""
import base64
import hashlib
import json
from pathlib import Path

import numpy as np

from ..atomic import atomic_write
from ..constants import SPECIAL_TOKENS, SPLIT_PATTERN, TOKENIZER_DOC_CHARS, TOKENIZER_TOTAL_CHARS
from .errors import DataError, read_versioned_json
from .shards import save_npy

FORMAT = 1
RANKS_FILE = "ranks.txt"
META_FILE = "tokenizer.json"
TOKEN_BYTES_FILE = "token_bytes.npy"
# Documents encoded and decoded again after training; any difference is a broken tokenizer.
ROUND_TRIP_DOCS = 200



def ranks_text(ranks: list[bytes]) -> str:
    """The ranks.txt content: token i on line i (the rank is written out so the file is checkable)."""
    return "".join(f"{base64.b64encode(tok).decode('ascii')} {i}\n" for i, tok in enumerate(ranks))


class Tokenizer:
    """A trained BPE: `ranks[i]` is the byte string of token i; special tokens follow them."""

    def __init__(self, ranks: list[bytes], pattern: str = SPLIT_PATTERN,
                 special_tokens: tuple[str, ...] = SPECIAL_TOKENS, name: str = "mlx_ar"):
        import tiktoken

        self.ranks = list(ranks)
        self.pattern = pattern
        self.special_names = tuple(special_tokens)
        self.special_tokens = {s: len(self.ranks) + i for i, s in enumerate(self.special_names)}
        self.vocab_size = len(self.ranks) + len(self.special_names)
        self.bos_id = self.special_tokens[self.special_names[0]]
        self.name = name
        self._enc = tiktoken.Encoding(
            name, pat_str=pattern, mergeable_ranks={t: i for i, t in enumerate(self.ranks)},
            special_tokens=self.special_tokens,
        )
        self.token_bytes = np.array([len(t) for t in self.ranks] + [0] * len(self.special_names), dtype=np.int32)

    # --- encoding ---------------------------------------------------------------------------
    def encode(self, text: str, prepend_bos: bool = False) -> list[int]:
        # Special-token strings inside data are ordinary text, never control tokens.
        ids = self._enc.encode_ordinary(text)
        return [self.bos_id] + ids if prepend_bos else ids

    def encode_batch(self, texts: list[str], executor=None) -> list[list[int]]:
        """Encode many texts; with a ThreadPoolExecutor they run in parallel (tiktoken drops the GIL)."""
        if executor is None:
            return [self._enc.encode_ordinary(t) for t in texts]
        return list(executor.map(self._enc.encode_ordinary, texts))

    def decode(self, ids) -> str:
        return self._enc.decode([int(i) for i in ids])

    # --- identity and storage ---------------------------------------------------------------
    @property
    def ranks_sha256(self) -> str:
        return hashlib.sha256(ranks_text(self.ranks).encode("ascii")).hexdigest()

    @property
    def hash(self) -> str:
        """sha256 over ranks, special tokens (with ids) and the split pattern: the tokenizer's identity."""
        ident = {"ranks_sha256": self.ranks_sha256, "special_tokens": self.special_tokens, "pattern": self.pattern}
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()

    def metadata(self) -> dict:
        return {
            "format": FORMAT, "name": self.name, "pattern": self.pattern,
            "special_tokens": self.special_tokens, "bos_id": self.bos_id,
            "vocab_size": self.vocab_size, "n_ranks": len(self.ranks),
            "ranks_sha256": self.ranks_sha256, "hash": self.hash,
        }

    def save(self, directory) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write(d / RANKS_FILE, ranks_text(self.ranks).encode("ascii"))
        save_npy(d / TOKEN_BYTES_FILE, self.token_bytes)
        # Metadata last: a tokenizer directory without it is incomplete.
        atomic_write(d / META_FILE, json.dumps(self.metadata(), indent=1) + "\n")

    def round_trip_check(self, texts) -> int:
        """Encode+decode `texts`; raise DataError on the first mismatch. Returns the number checked."""
        n = 0
        for text in texts:
            ids = self.encode(text)
            if self.decode(ids) != text:
                raise DataError(f"tokenizer round trip failed on document {n}: {text[:80]!r}...")
            if int(self.token_bytes[ids].sum()) != len(text.encode("utf-8")):
                raise DataError(f"token_bytes disagree with the UTF-8 length of document {n}")
            n += 1
        return n


# --- training ---------------------------------------------------------------------------------
def capped_texts(texts, doc_chars: int = TOKENIZER_DOC_CHARS, total_chars: int = TOKENIZER_TOTAL_CHARS,
                 stats: dict | None = None):
    """Yield texts cut to `doc_chars` each, stopping once `total_chars` have been yielded."""
    seen = 0
    for text in texts:
        if seen >= total_chars:
            break
        piece = text[: min(doc_chars, total_chars - seen)]
        seen += len(piece)
        if stats is not None:
            stats["docs"] = stats.get("docs", 0) + 1
            stats["chars"] = seen
        yield piece


def train_tokenizer(texts, vocab_size: int, pattern: str = SPLIT_PATTERN,
                    special_tokens: tuple[str, ...] = SPECIAL_TOKENS) -> Tokenizer:
    """Train a BPE with `vocab_size - len(special_tokens)` mergeable tokens on `texts` (already capped).

    Raises DataError when the text is too small to learn that many merges.
    """
    import rustbpe

    n_ranks = vocab_size - len(special_tokens)
    if not 256 < n_ranks <= 65536 - len(special_tokens):
        raise DataError(f"vocab_size {vocab_size} is out of range: need 256 + {len(special_tokens)} < V <= 65536 "
                        "(tokens are stored as uint16)")
    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(iter(texts), n_ranks, pattern=pattern)
    pairs = bpe.get_mergeable_ranks()
    if len(pairs) != n_ranks:
        raise DataError(f"the training split is too small to learn a vocabulary of {vocab_size}: BPE found only "
                        f"{len(pairs) - 256} of {n_ranks - 256} merges; add more training text")
    ranks = [bytes(tok) for tok, _ in sorted(pairs, key=lambda p: p[1])]
    if [r for _, r in sorted(pairs, key=lambda p: p[1])] != list(range(n_ranks)):
        raise DataError("rustbpe returned non-contiguous ranks")
    return Tokenizer(ranks, pattern=pattern, special_tokens=special_tokens)


# --- loading ----------------------------------------------------------------------------------
def load_tokenizer(directory, vocab_size: int | None = None, pattern: str = SPLIT_PATTERN,
                   special_tokens: tuple[str, ...] = SPECIAL_TOKENS,
                   fix: str = "re-run `python prepare.py --force` (same --source/--name) to rebuild it") -> Tokenizer:
    """Load and validate a saved tokenizer; every problem is a DataError naming the file and `fix`."""
    d = Path(directory)
    meta_path, ranks_path, tb_path = d / META_FILE, d / RANKS_FILE, d / TOKEN_BYTES_FILE
    for p in (meta_path, ranks_path, tb_path):
        if not p.is_file():
            raise DataError(f"tokenizer file missing: {p}; {fix}")
    meta = read_versioned_json(meta_path, "format", FORMAT, "tokenizer format", fix)
    raw = ranks_path.read_bytes()
    if hashlib.sha256(raw).hexdigest() != meta.get("ranks_sha256"):
        raise DataError(f"{ranks_path} does not match the sha256 recorded in {meta_path}; {fix}")
    ranks = []
    for lineno, line in enumerate(raw.decode("ascii", errors="replace").splitlines(), 1):
        try:
            b64, rank = line.split(" ")
            tok, rank = base64.b64decode(b64, validate=True), int(rank)
        except ValueError as e:  # binascii.Error is a ValueError
            raise DataError(f"{ranks_path}:{lineno}: malformed line; {fix}") from e
        if rank != lineno - 1:
            raise DataError(f"{ranks_path}:{lineno}: rank {rank} out of order; {fix}")
        ranks.append(tok)
    if len(set(ranks)) != len(ranks):
        raise DataError(f"{ranks_path}: duplicate tokens; {fix}")
    specials = meta.get("special_tokens") or {}
    names = tuple(sorted(specials, key=specials.get))
    if names != tuple(special_tokens) or meta.get("pattern") != pattern:
        raise DataError(f"{meta_path} was built with other special tokens or split pattern than "
                        f"mlx_ar.constants; {fix}")
    tok = Tokenizer(ranks, pattern=pattern, special_tokens=names, name=meta.get("name", "mlx_ar"))
    if tok.special_tokens != specials or tok.vocab_size != meta.get("vocab_size") or tok.hash != meta.get("hash"):
        raise DataError(f"{meta_path} is inconsistent with {ranks_path}; {fix}")
    if vocab_size is not None and tok.vocab_size != vocab_size:
        raise DataError(f"tokenizer in {d} has vocab_size {tok.vocab_size}, the profile needs {vocab_size}; {fix}")
    try:
        saved = np.load(tb_path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise DataError(f"{tb_path} is unreadable ({e}); {fix}") from e
    if saved.shape != tok.token_bytes.shape or not np.array_equal(saved, tok.token_bytes):
        raise DataError(f"{tb_path} does not match the ranks in {ranks_path}; {fix}")
    return tok
