"""A prepared dataset, opened for training and evaluation.

    ds = open_dataset()            # the current dataset (the one prepare made last), or by name
    ds.profile, ds.vocab_size, ds.bos_id, ds.token_bytes, ds.tokenizer
    for inputs, targets, epoch in ds.train_batches(B, T, seed=0): ...
    for inputs, targets in ds.val_batches(B, T): ...   # the fixed validation walk
    for inputs, targets in ds.heldout_batches(B, T): ...   # the held-out walk, if ds.heldout_missing is None

A dataset directory is complete only once `manifest.json` exists (prepare writes it last), and
opening checks that the manifest, the tokenizer and the token shards agree; any mismatch is a
DataError that says which file and which command fixes it. The held-out split is optional:
datasets prepared before it existed open without it, and `heldout_missing` says why and how to
get one. (The contract fingerprint of a dataset is mlx_ar.evaluate.contract_fingerprint(ds).)
"""
from pathlib import Path

import numpy as np

from .. import paths
from ..constants import PROFILES, Profile
from .errors import DataError, read_versioned_json
from .sources import default_name

MANIFEST = "manifest.json"
MANIFEST_SCHEMA = 1
TOKENIZER_DIR = "tokenizer"
TOKENS_DIR = "tokens"
SPLITS = ("train", "val")                # required
HELDOUT = "heldout"                      # optional: scored at the end of a run, never for decisions

NO_DATA_HINT = ("run `python prepare.py` (downloads climbmix) or `python prepare.py --source demo` "
                "(offline, small)")


def read_manifest(directory) -> dict | None:
    p = Path(directory) / MANIFEST
    if not p.is_file():
        return None
    return read_versioned_json(p, "schema", MANIFEST_SCHEMA, "manifest schema", "re-run prepare with --force")


def rebuild_command(m: dict, name: str) -> str:
    """The prepare command that rebuilds this dataset from the same source."""
    src = m.get("source", {})
    kind = src.get("source")
    if kind == "climbmix":
        args = f"--source climbmix --num-shards {src.get('num_shards')}"
    elif kind == "local":
        args = f"--source local {src.get('dir')}" + "".join(f" --val-file {v[0]}" for v in src.get("val", []))
    elif kind == "demo":
        args = "--source demo"
    else:
        args = "--source ..."
    default = default_name(kind, src.get("dir")) if kind in ("climbmix", "demo", "local") else None
    return f"`python prepare.py {args}{'' if name == default else f' --name {name}'} --force`"


def profile_from_manifest(m: dict, where: Path, fix: str = "re-run prepare with --force") -> Profile:
    """The manifest's profile; for a named contract profile, today's constants (checked to match)."""
    from .walk import measured

    try:
        profile = Profile(**m["profile"])
    except (KeyError, TypeError) as e:
        raise DataError(f"{where}: manifest has no valid profile; {fix}") from e
    known = PROFILES.get(profile.name)
    if known is None:
        return profile
    if measured(known) != measured(profile):
        raise DataError(f"{where} was prepared under different '{profile.name}' contract numbers "
                        f"({measured(profile)}) than mlx_ar.constants now has ({measured(known)}); {fix}")
    # Recipe overrides are not part of the data; the current constants decide them.
    return known


def prepared_names(datasets_dir) -> list[str]:
    """Names of the complete datasets (with a manifest) under `datasets_dir`."""
    d = Path(datasets_dir)
    return sorted(p.name for p in d.iterdir() if (p / MANIFEST).is_file()) if d.is_dir() else []


class Dataset:
    def __init__(self, directory, name: str | None = None):
        from .tokenizer import load_tokenizer

        self.dir = Path(directory)
        self.name = name or self.dir.name
        m = read_manifest(self.dir)
        if m is None:
            state = ": its prepare was interrupted" if self.dir.exists() else ""
            ready = prepared_names(self.dir.parent)
            have = (f"prepared here: {', '.join(ready)} (pass --data {ready[0]}); or " if ready else "")
            raise DataError(f"dataset '{self.name}' is not prepared ({self.dir / MANIFEST} missing{state}); "
                            f"{have}{NO_DATA_HINT}")
        self.manifest = m
        fix = f"rebuild it with {rebuild_command(m, self.name)}"
        self.rebuild_hint = fix
        self.profile = profile_from_manifest(m, self.dir / MANIFEST, fix)
        for split in SPLITS:
            if not m.get("splits", {}).get(split, {}).get("files"):
                raise DataError(f"{self.dir / MANIFEST} lists no {split} split; {fix}")
        self.tokenizer = load_tokenizer(self.dir / TOKENIZER_DIR, vocab_size=self.profile.vocab_size, fix=fix)
        if self.tokenizer.hash != m.get("tokenizer", {}).get("hash"):
            raise DataError(f"the tokenizer in {self.dir / TOKENIZER_DIR} is not the one the token shards were "
                            f"made with; {fix}")
        self.vocab_size: int = self.tokenizer.vocab_size
        self.bos_id: int = self.tokenizer.bos_id
        self._tables: dict = {}

    @property
    def heldout_missing(self) -> str | None:
        """None if the dataset has a held-out split; else why not, and the command that makes one."""
        info = self.manifest.get("heldout_walk")
        if info is None:
            return (f"dataset '{self.name}' was prepared without a held-out split; "
                    f"rebuild it with {rebuild_command(self.manifest, self.name)} to score one")
        if info.get("missing"):
            return f"dataset '{self.name}' has no held-out split: {info['missing']}"
        return None

    @property
    def token_bytes(self) -> np.ndarray:
        """int32 (vocab_size,): UTF-8 bytes of each token, 0 for special tokens."""
        return self.tokenizer.token_bytes

    def split_table(self, split: str):
        """The DocTable of `split` ('train', 'val' or 'heldout'), memory-mapped and checked against the manifest."""
        if split not in SPLITS + (HELDOUT,):
            raise ValueError(f"split must be one of {SPLITS + (HELDOUT,)}, got {split!r}")
        if split == HELDOUT and self.heldout_missing:
            raise DataError(self.heldout_missing)
        if split not in self._tables:
            from .loader import DocTable
            from .shards import load_shard

            files = self.manifest["splits"][split]["files"]
            shards = [load_shard(self.dir / TOKENS_DIR, split, i, self.bos_id, f["tokens"], f["docs"],
                                 fix=self.rebuild_hint) for i, f in enumerate(files)]
            self._tables[split] = DocTable(shards)
        return self._tables[split]

    def num_tokens(self, split: str) -> int:
        return int(self.manifest["splits"][split]["tokens"])

    def train_batches(self, batch_size: int, seq_len: int, seed: int = 0, prefetch: int = 2):
        """Infinite (inputs, targets, epoch); int32 (B, T); reshuffled by (seed, epoch) every epoch."""
        from .loader import train_batches

        return train_batches(self.split_table("train"), batch_size, seq_len, seed=seed, prefetch=prefetch)

    def val_batches(self, batch_size: int, seq_len: int, max_rows: int | None = None):
        """The deterministic validation walk: (inputs, targets) int32 (b, T), b <= batch_size."""
        from .loader import val_batches

        return val_batches(self.split_table("val"), batch_size, seq_len, max_rows=max_rows)

    def heldout_batches(self, batch_size: int, seq_len: int, max_rows: int | None = None):
        """The held-out walk (the same deterministic packing as validation); DataError if there is none."""
        from .loader import val_batches

        return val_batches(self.split_table(HELDOUT), batch_size, seq_len, max_rows=max_rows)

    def __repr__(self) -> str:
        return f"Dataset({self.name!r}, profile={self.profile.name}, vocab={self.vocab_size}, dir={str(self.dir)!r})"


def open_dataset(name: str | None = None) -> Dataset:
    """Open the prepared dataset `name` (default: the current one) under the cache root."""
    if name is None:
        name = paths.current_dataset()
        if name is None:
            raise DataError(f"no dataset has been prepared yet under {paths.cache_root()}; {NO_DATA_HINT}")
    return Dataset(paths.dataset_dir(name), name)
