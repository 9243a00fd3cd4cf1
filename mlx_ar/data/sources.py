"""Where raw text comes from: climbmix parquet shards, a local directory, or the offline demo corpus.

A `Source` is two lists of `SourceFile`s (train and the pinned validation split) plus a `config`
dict that identifies it (prepare compares it with an existing dataset's manifest). A
`SourceFile` yields its documents in batches of strings, skipping empty ones:

    src = local_source("/data/prose")            # last file in sorted order = validation
    src = local_source("/data/prose", val_files=["shard_00003.parquet"])
    src = demo_source()                          # stdlib docstrings + pydoc topics, no network
    src = climbmix_source(raw_dir, num_shards)   # after download.download_shards(...)
    for batch in src.train[0].batches(): ...

File formats of a local directory (top level only, sorted by name):
    .parquet  one document per row of the `text` column (nulls and blank rows skipped)
    .jsonl    one JSON object per line with a string field `text`
    .txt      split at blank lines into paragraphs, consecutive paragraphs regrouped into
              documents of at most TXT_DOC_CHARS characters, so a long file does not become
              one huge document that the packer would crop to a single row
Text files that are not valid UTF-8 are decoded with U+FFFD replacing each bad byte sequence
(deterministic, the same on every machine) and a warning naming the file is logged.
"""
import ast
import hashlib
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from ..constants import CLIMBMIX_VAL_SHARD
from .errors import DataError


def default_name(source: str, directory: Path | None = None) -> str:
    """The dataset name prepare uses when --name is not given: the source, or local-<directory name>."""
    if source == "local":
        return f"local-{Path(directory).expanduser().resolve().name}"
    return source

LOCAL_SUFFIXES = (".parquet", ".jsonl", ".txt")
TXT_DOC_CHARS = 4000          # a .txt document: consecutive paragraphs, at most this many chars
READ_BATCH_DOCS = 1024        # documents handed to the tokenizer at a time
DEMO_DOC_CHARS = 700          # demo documents fit the demo profile's 256-token rows
DEMO_VAL_PERCENT = 20         # share of demo units (modules / topics) pinned as validation


def climbmix_shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


# --- reading one file -------------------------------------------------------------------------
def decode_text(raw: bytes, name: str, log: Callable[[str], None]) -> str:
    """UTF-8 decode; invalid bytes become U+FFFD and a warning names the file and first bad offset."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        text = raw.decode("utf-8", errors="replace")
        log(f"warning: {name} is not valid UTF-8 (first bad byte at offset {e.start}); "
            f"invalid bytes were replaced with U+FFFD")
        return text


def chunk_paragraphs(text: str, max_chars: int) -> list[str]:
    """Split at blank lines and regroup consecutive paragraphs into pieces of at most max_chars.

    A single paragraph longer than max_chars stays whole (the loader crops it if it must).
    """
    out, cur, n = [], [], 0
    for para in re.split(r"\n[ \t\r\f\v]*\n", text):
        para = para.strip("\n")
        if not para.strip():
            continue
        if cur and n + 2 + len(para) > max_chars:
            out.append("\n\n".join(cur))
            cur, n = [], 0
        n += len(para) + (2 if cur else 0)
        cur.append(para)
    if cur:
        out.append("\n\n".join(cur))
    return out


def _batched(docs, size: int = READ_BATCH_DOCS) -> Iterator[list[str]]:
    batch = []
    for d in docs:
        batch.append(d)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def open_parquet(path: Path):
    """pyarrow ParquetFile with a `text` column, or DataError naming the file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: corrupt or truncated parquet file ({e}); replace it (a downloaded shard: "
                        "delete it and prepare fetches it again) and re-run prepare") from e
    names = pf.schema_arrow.names
    if "text" not in names:
        raise DataError(f"{path} has no `text` column (columns: {', '.join(names) or 'none'}); "
                        "every parquet shard needs one string column named `text`")
    typ = pf.schema_arrow.field("text").type
    if not (pa.types.is_string(typ) or pa.types.is_large_string(typ)):
        raise DataError(f"{path}: column `text` has type {typ}, expected string")
    return pf


def _parquet_docs(path: Path) -> Iterator[str]:
    import pyarrow as pa

    pf = open_parquet(path)
    try:
        for batch in pf.iter_batches(batch_size=READ_BATCH_DOCS, columns=["text"]):
            yield from batch.column(0).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: corrupt parquet data ({e}); replace it (a downloaded shard: delete it and "
                        "prepare fetches it again) and re-run prepare") from e


def _jsonl_docs(path: Path, log) -> Iterator[str]:
    text = decode_text(path.read_bytes(), str(path), log)
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from e
        if not isinstance(obj, dict) or not isinstance(obj.get("text", 0), (str, type(None))):
            raise DataError(f"{path}:{lineno}: expected an object with a string field `text`")
        yield obj["text"]


@dataclass
class SourceFile:
    """One unit of raw text: a file on disk, or an in-memory list of documents (demo)."""

    name: str
    path: Path | None = None
    docs: list[str] | None = None
    stats: dict = field(default_factory=dict)   # filled by a full read: docs, empty
    _warned: set = field(default_factory=set, repr=False)

    @property
    def kind(self) -> str:
        return "memory" if self.path is None else self.path.suffix.lstrip(".")

    def size_bytes(self) -> int:
        """On-disk (or in-memory UTF-8) size, for progress only."""
        if self.path is None:
            return sum(len(d.encode("utf-8")) for d in self.docs)
        return self.path.stat().st_size

    def documents(self, log: Callable[[str], None] = lambda msg: None) -> Iterator[str]:
        """Every non-empty document in file order; blank ones are counted in stats['empty']."""
        log = self._once(log)
        if self.path is None:
            raw = iter(self.docs)
        elif self.kind == "parquet":
            raw = _parquet_docs(self.path)
        elif self.kind == "jsonl":
            raw = _jsonl_docs(self.path, log)
        elif self.kind == "txt":
            raw = iter(chunk_paragraphs(decode_text(self.path.read_bytes(), str(self.path), log), TXT_DOC_CHARS))
        else:
            raise DataError(f"{self.path}: unsupported file type (use {', '.join(LOCAL_SUFFIXES)})")
        docs = empty = 0
        for d in raw:
            if d is None or not d.strip():
                empty += 1
                continue
            docs += 1
            yield d
        self.stats.update(docs=docs, empty=empty)

    def _once(self, log):
        """`log`, but each distinct warning only once per file however often the file is read."""
        def once(msg):
            if msg not in self._warned:
                self._warned.add(msg)
                log(msg)
        return once

    def batches(self, log: Callable[[str], None] = lambda msg: None, size: int = READ_BATCH_DOCS):
        return _batched(self.documents(log), size)


@dataclass
class Source:
    kind: str
    train: list[SourceFile]
    val: list[SourceFile]
    config: dict

    def describe(self) -> str:
        return (f"{self.kind}: {len(self.train)} training file(s), validation = "
                f"{', '.join(f.name for f in self.val)}")


# --- local directory --------------------------------------------------------------------------
def local_source(directory, val_files=()) -> Source:
    """All .parquet/.jsonl/.txt files at the top of `directory`; validation = last file or `val_files`."""
    d = Path(directory).expanduser()
    if not d.is_dir():
        raise DataError(f"--source local: {d} is not a directory")
    files = sorted(p for p in d.iterdir() if p.is_file() and p.suffix in LOCAL_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise DataError(f"{d} has no {', '.join(LOCAL_SUFFIXES)} files")
    by_name = {p.name: p for p in files}
    if val_files:
        missing = [v for v in val_files if Path(v).name not in by_name]
        if missing:
            raise DataError(f"validation file {', '.join(missing)} not found in {d} "
                            f"(data files there: {', '.join(sorted(by_name))})")
        val = [by_name[Path(v).name] for v in val_files]
    else:
        val = [files[-1]]
    train = [p for p in files if p not in val]
    if not train:
        raise DataError(f"{d}: every data file is pinned as validation ({', '.join(p.name for p in val)}); "
                        "the training split would be empty -- add files or pick another --val-file")
    config = {
        "source": "local", "dir": str(d.resolve()),
        "train": [[p.name, p.stat().st_size] for p in train],
        "val": [[p.name, p.stat().st_size] for p in val],
    }
    return Source("local", [SourceFile(p.name, p) for p in train], [SourceFile(p.name, p) for p in val], config)


# --- climbmix ---------------------------------------------------------------------------------
def climbmix_source(raw_dir, num_shards: int, val_shard: int = CLIMBMIX_VAL_SHARD) -> Source:
    """Shards 0..num_shards-1 for training and the pinned validation shard, already downloaded."""
    raw = Path(raw_dir)
    train = [raw / climbmix_shard_name(i) for i in range(num_shards)]
    val = raw / climbmix_shard_name(val_shard)
    for p in train + [val]:
        if not p.is_file():
            split = "validation" if p == val else "training"
            raise DataError(f"missing {split} shard {p}; run `python prepare.py --source climbmix` to download it")
    config = {"source": "climbmix", "num_shards": num_shards, "val_shard": val_shard}
    return Source("climbmix", [SourceFile(p.name, p) for p in train], [SourceFile(val.name, val)], config)


# --- demo: text that ships with Python --------------------------------------------------------
def _docstrings(tree: ast.AST) -> list[str]:
    """Docstrings of a module and its classes/functions, in source order."""
    out = []

    def visit(node):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                out.append(doc)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return out


def _stdlib_dir() -> Path:
    import sysconfig

    return Path(sysconfig.get_paths()["stdlib"])


def demo_units(stdlib: Path | None = None, log: Callable[[str], None] = lambda msg: None) -> list[tuple[str, str]]:
    """(key, text) for every pydoc topic and every stdlib module with docstrings, in a fixed order.

    Modules are parsed with `ast`, never imported; tests, idlelib and site-packages are skipped.
    """
    from pydoc_data.topics import topics

    units = [(f"topic:{name}", topics[name]) for name in sorted(topics)]
    root = stdlib or _stdlib_dir()
    skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}
    files = sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))
    for p in files:
        try:
            tree = ast.parse(p.read_bytes(), filename=str(p))
        except (SyntaxError, ValueError):
            continue  # a few stdlib files are templates or target other versions
        docs = _docstrings(tree)
        if docs:
            units.append((f"module:{p.relative_to(root).as_posix()}", "\n\n".join(docs)))
    log(f"demo corpus: {len(topics)} pydoc topics + {len(units) - len(topics)} stdlib modules from {root}")
    return units


def demo_split(key: str) -> str:
    """'val' for a fixed DEMO_VAL_PERCENT of units, chosen by a hash of the unit's key."""
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big")
    return "val" if h % 100 < DEMO_VAL_PERCENT else "train"


def demo_source(stdlib: Path | None = None, log: Callable[[str], None] = lambda msg: None) -> Source:
    units = demo_units(stdlib, log)
    splits = {"train": [], "val": []}
    for key, text in units:
        splits[demo_split(key)].extend(chunk_paragraphs(text, DEMO_DOC_CHARS))
    config = {"source": "demo", "python": sys.version.split()[0], "units": len(units)}
    return Source("demo", [SourceFile("demo-train", docs=splits["train"])],
                  [SourceFile("demo-val", docs=splits["val"])], config)
