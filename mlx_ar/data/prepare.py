"""`prepare`: raw text -> tokenizer -> pre-tokenized shards -> manifest, and its command line.

    python prepare.py                              # climbmix: 10 training shards + validation shard
    python prepare.py --source demo                # offline, small, demo profile
    python prepare.py /data/prose                  # a local directory (= --source local --dir ...)
    mlx-ar prepare ...                             # the same command

In code (tests pass a small profile and any Source):
    manifest = prepare_dataset(source, out_dir, profile, name="x")

Steps: train the BPE on the training split (character caps from constants), check that it
round-trips, tokenize both splits with a thread pool, move the last validation documents into
the held-out split (scored at the end of every run, never for decisions), check that the
validation walk covers the profile's eval_tokens, then swap the new tokenizer/ and tokens/ into place and write
manifest.json last. Everything is built under `staging/` first, so an interrupted prepare never
leaves a dataset that looks complete; re-running resumes downloads and rebuilds the rest.
"""
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import click

from ..atomic import atomic_write
from ..constants import CLIMBMIX_BASE_URL, CLIMBMIX_DEFAULT_SHARDS, CLIMBMIX_VAL_SHARD, DEMO, REAL
from .download import DEFAULTS as DOWNLOAD_DEFAULTS
from .errors import DataError

SOURCES = ("climbmix", "local", "demo")


@dataclass(frozen=True)
class PrepareDefaults:
    source: str = "climbmix"
    num_shards: int = CLIMBMIX_DEFAULT_SHARDS
    base_url: str = CLIMBMIX_BASE_URL
    workers: int = DOWNLOAD_DEFAULTS.workers     # parallel downloads
    threads: int = max(1, os.cpu_count() or 1)   # tokenizer threads


DEFAULTS = PrepareDefaults()


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def profile_for(source: str):
    """The demo source is measured with the small DEMO profile; every other source with REAL."""
    return DEMO if source == "demo" else REAL


# --- the pipeline -----------------------------------------------------------------------------
def _train_tokenizer(source, profile, log, stream=None):
    from ..constants import SPECIAL_TOKENS, TOKENIZER_DOC_CHARS, TOKENIZER_TOTAL_CHARS
    from .progress import Progress
    from .tokenizer import ROUND_TRIP_DOCS, capped_texts, train_tokenizer

    stats: dict = {}
    bar = Progress("tokenizer training text", total=None, unit=" chars", stream=stream)

    def texts():
        for f in source.train:
            for doc in f.documents(log):
                yield doc

    def counted(it):
        for piece in it:
            bar.update(len(piece), note=f"{stats.get('docs', 0)} docs")
            yield piece
        # Runs once the text is used up; the merge phase that follows has no progress of its own.
        bar.close(note=f"{stats.get('docs', 0)} docs")
        log(f"learning {profile.vocab_size - 256 - len(SPECIAL_TOKENS)} BPE merges ...")

    t0 = time.perf_counter()
    tok = train_tokenizer(counted(capped_texts(texts(), TOKENIZER_DOC_CHARS, TOKENIZER_TOTAL_CHARS, stats)),
                          profile.vocab_size)
    seconds = time.perf_counter() - t0
    log(f"trained BPE vocab {tok.vocab_size} on {stats.get('chars', 0):,} chars of {stats.get('docs', 0):,} "
        f"training documents in {seconds:.1f}s")

    def sample(files):
        out = []
        for f in files:
            for doc in f.documents(log):
                out.append(doc)
                if len(out) >= ROUND_TRIP_DOCS:
                    return out
        return out

    checked = tok.round_trip_check(sample(source.train)) + tok.round_trip_check(sample(source.val))
    log(f"tokenizer round trip ok on {checked} documents")
    return tok, {"docs": stats.get("docs", 0), "chars": stats.get("chars", 0), "seconds": round(seconds, 3)}


def _tokenize_split(tok, split: str, files, tokens_dir: Path, pool, threads: int, bar, totals, log) -> dict:
    from .progress import human
    from .shards import tokenize_file

    # The line counts this split alone (its label names it); `totals` keeps both for the summary.
    mine = {"tokens": 0, "t0": time.perf_counter()}
    bar.done, bar.start = 0.0, bar.clock()

    def on_progress(ntok, nbytes):
        totals["tokens"] += ntok
        totals["bytes"] += nbytes
        mine["tokens"] += ntok
        rate = mine["tokens"] / max(time.perf_counter() - mine["t0"], 1e-9)
        bar.update(nbytes, note=f"{human(mine['tokens'])} {split} tokens, {human(rate)} tok/s")

    entries = []
    for i, f in enumerate(files):
        bar.label = f"tokenize {split} {i + 1}/{len(files)}"
        st = tokenize_file(tok, f, tokens_dir, split, i, pool, window=2 * threads, on_progress=on_progress, log=log)
        entries.append({"source": f.name, **st.as_dict()})
    bar.close()
    info = {
        "files": entries,
        "tokens": sum(e["tokens"] for e in entries), "docs": sum(e["docs"] for e in entries),
        "bytes": sum(e["bytes"] for e in entries), "empty_skipped": sum(e["empty_skipped"] for e in entries),
    }
    if info["empty_skipped"]:
        log(f"skipped {info['empty_skipped']:,} empty {split} document(s)")
    return info


def _check_validation_walk(tok, source, tokens_dir: Path, profile, val_info: dict) -> str:
    """sha256 of the walk evaluate_bpb will score; DataError if the split cannot fill it."""
    from .loader import DocTable
    from .shards import load_shard
    from .walk import eval_rows, walk_digest

    n_rows = eval_rows(profile)
    table = DocTable([load_shard(tokens_dir, "val", i, tok.bos_id) for i in range(len(val_info["files"]))])
    found, digest = walk_digest(table, profile.max_seq_len, n_rows)
    if found < n_rows:
        hint = ("pin more validation data with --val-file (repeatable)" if source.kind == "local"
                else "the validation source is too small for this profile")
        raise DataError(f"the validation split ({', '.join(f.name for f in source.val)}: "
                        f"{val_info['tokens']:,} tokens) packs into only {found} rows of "
                        f"{profile.max_seq_len + 1} tokens, but evaluation needs {n_rows} rows "
                        f"({profile.eval_tokens:,} target tokens); {hint}")
    return digest


def _carve_heldout(tok, tokens_dir: Path, profile, val: dict, log):
    """Move the last validation documents into the held-out split: the fewest that fill its walk.

    Returns (val info, held-out info or None, the manifest's heldout_walk). When the validation
    documents cannot fill both walks nothing moves, and heldout_walk says what is missing.
    """
    import numpy as np

    from .loader import DocTable
    from .shards import TokenShard, load_shard, save_npy, shard_files
    from .walk import eval_rows, heldout_rows, walk_digest

    n_rows, seq_len = heldout_rows(profile), profile.max_seq_len
    shards = [load_shard(tokens_dir, "val", i, tok.bos_id) for i in range(len(val["files"]))]
    lengths = np.concatenate([np.diff(sh.offsets) for sh in shards])
    from_end = np.cumsum(lengths[::-1])
    firsts = np.cumsum([0] + [sh.num_docs for sh in shards])

    def split_at(cut):
        """(kept validation shards, the held-out shard) when documents cut.. are held out."""
        kept, tails = [], []
        for sh, first in zip(shards, firsts):
            k = min(max(cut - first, 0), sh.num_docs)
            if k:
                kept.append(TokenShard(sh.tokens[:sh.offsets[k]], sh.offsets[:k + 1]))
            tails.append((sh.tokens[sh.offsets[k]:], sh.offsets[k:] - sh.offsets[k]))
        tokens = np.concatenate([np.asarray(t) for t, _ in tails]).astype(np.uint16)
        offsets = np.concatenate(([0], np.cumsum(np.concatenate([np.diff(o) for _, o in tails])))).astype(np.int64)
        return kept, TokenShard(tokens, offsets)

    want = 1.1 * n_rows * (seq_len + 1)       # a little over the walk's tokens: cropping wastes some
    cut, found = len(lengths), 0
    while found < n_rows and want <= from_end[-1]:
        cut = len(lengths) - int(np.searchsorted(from_end, want)) - 1
        kept, heldout_shard = split_at(cut)
        found, heldout_digest = walk_digest(DocTable([heldout_shard]), seq_len, n_rows)
        want *= 1.25
    val_found = walk_digest(DocTable(kept), seq_len, eval_rows(profile))[0] if found >= n_rows and kept else 0
    if found < n_rows or val_found < eval_rows(profile):
        missing = (f"the validation split ({len(lengths):,} documents, {int(from_end[-1]):,} tokens) cannot fill "
                   f"both the validation walk ({eval_rows(profile)} rows) and the held-out walk ({n_rows} rows of "
                   f"{seq_len + 1} tokens); pin more validation data and re-run prepare with --force")
        log(f"no held-out split: {missing}")
        return val, None, {"missing": missing}
    nbytes = lambda t: int(tok.token_bytes[np.asarray(t)].sum())
    kept = [TokenShard(np.array(sh.tokens), np.array(sh.offsets)) for sh in kept]   # off the files rewritten below
    files = []
    for i in range(len(shards)):
        tok_path, docs_path = shard_files(tokens_dir, "val", i)
        if i >= len(kept):                    # wholly held out (only ever the last files)
            tok_path.unlink()
            docs_path.unlink()
            continue
        save_npy(tok_path, kept[i].tokens)
        save_npy(docs_path, kept[i].offsets)
        files.append({**val["files"][i], "tokens": int(kept[i].tokens.size), "docs": kept[i].num_docs,
                      "bytes": nbytes(kept[i].tokens)})
    del shards
    tok_path, docs_path = shard_files(tokens_dir, "heldout", 0)
    save_npy(tok_path, heldout_shard.tokens)
    save_npy(docs_path, heldout_shard.offsets)
    val = {**val, "files": files, "tokens": sum(f["tokens"] for f in files), "docs": sum(f["docs"] for f in files),
           "bytes": sum(f["bytes"] for f in files)}
    ho_tokens = heldout_shard.tokens
    heldout = {"files": [{"source": "the last validation documents", "tokens": int(ho_tokens.size),
                          "docs": heldout_shard.num_docs, "bytes": nbytes(ho_tokens)}],
               "tokens": int(ho_tokens.size), "docs": heldout_shard.num_docs, "bytes": nbytes(ho_tokens)}
    log(f"held-out split: {heldout['tokens']:,} tokens in {heldout['docs']:,} documents cut from the end of "
        f"validation ({n_rows} rows scored after every run, never for decisions)")
    return val, heldout, {"rows": n_rows, "seq_len": seq_len, "sha256": heldout_digest}


def _versions() -> dict:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("numpy", "tiktoken", "rustbpe", "pyarrow"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _atomic_json(path: Path, data: dict) -> None:
    import json

    atomic_write(path, json.dumps(data, indent=1) + "\n")


def _same_profile(manifest: dict, profile) -> bool:
    from ..constants import Profile
    from .walk import measured

    try:
        return measured(Profile(**manifest.get("profile", {}))) == measured(profile)
    except TypeError:
        return False


def prepare_dataset(source, out_dir, profile, *, name: str | None = None, force: bool = False,
                    threads: int = DEFAULTS.threads, log=_log, stream=None) -> dict:
    """Build the dataset for `source` in `out_dir` under `profile`; return its manifest.

    An existing complete dataset from the same source and profile is kept as is unless `force`.
    """
    import shutil
    from concurrent.futures import ThreadPoolExecutor
    from datetime import datetime, timezone

    from .dataset import MANIFEST, MANIFEST_SCHEMA, TOKENIZER_DIR, TOKENS_DIR, read_manifest
    from .walk import eval_rows
    from .progress import Progress, human

    out = Path(out_dir)
    name = name or out.name
    existing = read_manifest(out)
    if existing is not None and not force:
        if existing.get("source") == source.config and _same_profile(existing, profile):
            log(f"dataset '{name}' is already prepared in {out} (pass --force to rebuild it)")
            return existing
        raise DataError(f"{out} already holds dataset '{name}' prepared from other settings "
                        f"({existing.get('source')}, profile {existing.get('profile', {}).get('name')}); "
                        "pass --force to rebuild it, or --name to prepare a separate dataset")
    n_rows = eval_rows(profile)
    t_start = time.perf_counter()
    log(f"preparing '{name}' in {out} from {source.describe()} (profile {profile.name})")
    staging = out / "staging"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        tok, tok_stats = _train_tokenizer(source, profile, log, stream)
        tok.save(staging / TOKENIZER_DIR)
        tokens_dir = staging / TOKENS_DIR
        totals = {"tokens": 0, "bytes": 0, "t0": time.perf_counter()}
        bar = Progress("tokenize", unit="B", stream=stream)
        with ThreadPoolExecutor(threads) as pool:
            # Validation first: a split too small for the eval walk fails before the long part.
            val = _tokenize_split(tok, "val", source.val, tokens_dir, pool, threads, bar, totals, log)
            val, heldout, heldout_walk = _carve_heldout(tok, tokens_dir, profile, val, log)
            digest = _check_validation_walk(tok, source, tokens_dir, profile, val)
            train = _tokenize_split(tok, "train", source.train, tokens_dir, pool, threads, bar, totals, log)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    seconds = time.perf_counter() - totals["t0"]
    throughput = {
        "seconds": round(seconds, 3), "threads": threads,
        "tokens_per_sec": round(totals["tokens"] / max(seconds, 1e-9)),
        "mb_per_sec": round(totals["bytes"] / 1e6 / max(seconds, 1e-9), 2),
    }
    log(f"tokenized {totals['bytes'] / 1e6:,.1f} MB into {totals['tokens']:,} tokens in {seconds:.1f}s: "
        f"{human(throughput['tokens_per_sec'])} tokens/s, {throughput['mb_per_sec']:.1f} MB/s ({threads} threads)")
    splits = {"train": train, "val": val, **({"heldout": heldout} if heldout else {})}

    manifest = {
        "schema": MANIFEST_SCHEMA, "name": name, "source": source.config, "profile": asdict(profile),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tokenizer": {"hash": tok.hash, "vocab_size": tok.vocab_size, "bos_id": tok.bos_id, "trained_on": tok_stats},
        "splits": splits,
        "validation_walk": {"rows": n_rows, "seq_len": profile.max_seq_len, "sha256": digest},
        "heldout_walk": heldout_walk,
        "throughput": throughput, "versions": _versions(),
    }
    # Swap in: with the manifest gone, a crash in between reads as "not prepared", never as stale data.
    (out / MANIFEST).unlink(missing_ok=True)
    for sub in (TOKENIZER_DIR, TOKENS_DIR):
        if (out / sub).exists():
            shutil.rmtree(out / sub)
        os.replace(staging / sub, out / sub)
    shutil.rmtree(staging)
    _atomic_json(out / MANIFEST, manifest)
    log(f"prepared '{name}' in {time.perf_counter() - t_start:.1f}s")
    return manifest


# --- command line -----------------------------------------------------------------------------
def _explicit(ctx, param: str) -> bool:
    return ctx.get_parameter_source(param) not in (None, click.core.ParameterSource.DEFAULT)


@click.command("prepare", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("directory", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option("--source", type=click.Choice(SOURCES), default=DEFAULTS.source, show_default=True,
              help="climbmix: download shards; local: a directory of .parquet/.jsonl/.txt; demo: offline stdlib text.")
@click.option("--dir", "dir_opt", type=click.Path(file_okay=False, path_type=Path),
              help="Directory for --source local (or give it as the argument).")
@click.option("--val-file", "val_files", multiple=True,
              help="local: file(s) pinned as validation (repeatable; default: the last file in sorted order).")
@click.option("--num-shards", type=click.IntRange(1, CLIMBMIX_VAL_SHARD), default=DEFAULTS.num_shards,
              show_default=True, help="climbmix: training shards to download.")
@click.option("--base-url", default=DEFAULTS.base_url, show_default=True, help="climbmix: where shards are served.")
@click.option("--workers", type=click.IntRange(1), default=DEFAULTS.workers, show_default=True,
              help="climbmix: parallel downloads.")
@click.option("--name", help="Dataset name (default: climbmix, demo, or local-<dirname>).")
@click.option("--force", is_flag=True, help="Rebuild the tokenizer and token shards even if already prepared.")
@click.pass_context
def prepare_command(ctx, directory, source, dir_opt, val_files, num_shards, base_url, workers, name, force):
    """Download or read text, train the tokenizer, and pre-tokenize the train and validation splits."""
    from .. import paths
    from .sources import climbmix_source, default_name, demo_source, local_source

    if directory and dir_opt and Path(directory) != Path(dir_opt):
        raise click.UsageError(f"two directories given: {directory} and --dir {dir_opt}")
    directory = directory or dir_opt
    if directory and not _explicit(ctx, "source"):
        source = "local"
    if source == "local" and not directory:
        raise click.UsageError("--source local needs a directory: `python prepare.py --source local DIR`")
    if directory and source != "local":
        raise click.UsageError(f"a directory only applies to --source local, not --source {source}")
    if val_files and source != "local":
        raise click.UsageError("--val-file only applies to --source local")
    for opt in ("num_shards", "base_url", "workers"):
        if source != "climbmix" and _explicit(ctx, opt):
            raise click.UsageError(f"--{opt.replace('_', '-')} only applies to --source climbmix")
    name = name or default_name(source, directory)
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise click.UsageError(f"invalid dataset name {name!r}")

    out = paths.dataset_dir(name)
    profile = profile_for(source)
    try:
        if source == "climbmix":
            from dataclasses import replace

            from .download import download_shards

            settings = replace(DOWNLOAD_DEFAULTS, workers=workers)
            download_shards(list(range(num_shards)) + [CLIMBMIX_VAL_SHARD], out / "raw", base_url, settings, log=_log)
            src = climbmix_source(out / "raw", num_shards)
        elif source == "local":
            src = local_source(directory, val_files)
        else:
            src = demo_source(log=_log)
        manifest = prepare_dataset(src, out, profile, name=name, force=force, log=_log)
    except DataError as e:
        raise click.ClickException(str(e)) from e
    paths.set_current_dataset(name)
    tr, va = manifest["splits"]["train"], manifest["splits"]["val"]
    click.echo(f"dataset '{name}' ready in {out} (profile {profile.name}, vocab {manifest['tokenizer']['vocab_size']})")
    click.echo(f"  train: {tr['tokens']:,} tokens in {tr['docs']:,} documents")
    click.echo(f"  val:   {va['tokens']:,} tokens in {va['docs']:,} documents")
    ho = manifest["splits"].get("heldout")
    if ho:
        click.echo(f"  held-out: {ho['tokens']:,} tokens in {ho['docs']:,} documents (scored after every run, never for decisions)")
    else:
        click.echo(f"  held-out: none ({(manifest.get('heldout_walk') or {}).get('missing', 'prepared before held-out splits')})")
    click.echo(f"current dataset is now '{name}'. Next: python train.py")
