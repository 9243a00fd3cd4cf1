"""The loop's rules as pure functions: each returns why a candidate or a run is not acceptable.

Nothing here touches git, the disk or a clock; every function takes the snapshots it judges
({path: bytes or None}), the receipts or a run's metrics, and returns a reason (str) or None.
The attempt (attempt.py) asks them in order and records the first reason it gets.

Before anything runs (`refusal` reasons: the candidate is refused, nothing is touched):
    unrelated_reason, missing_reason, already_scored_reason, config_tier_reason,
    inert_reason (edits the backend would not execute), overridden_reason (edits the data
    profile would replace), eval_data_reason (code that reaches for the validation or
    held-out data), description_reason.
After a run (`VETOES`: the candidate is discarded whatever its score):
    smoke_veto, memory_veto, tok_per_sec_veto. A veto is `fn(metrics, record, receipts,
    campaign) -> reason or None`; add one by appending it to VETOES.
After the gate says keep: heldout_veto (the held-out score worsens beyond the noise floor).
"""
import ast
import hashlib
import math
import re

from .git_ops import surface_sha
from .format import NOISE_FILE, RECEIPTS_DIR, RESULTS_FILE
from .gate import mean
from .ledger import find_scored

# What the agent may edit on each backend (campaign.toml's `mutable` may say otherwise).
MUTABLE_FILES = {"mlx": ["train.py"], "cuda": ["train.py", "train_torch.py"]}
# What each backend executes of each mutable file: "all", or "recipe" (only the recipe constants).
# A mutable file not listed for a backend is not executed by it at all.
EXECUTED = {
    "mlx": {"train.py": "all"},
    "cuda": {"train.py": "recipe", "train_torch.py": "all"},
}


# --- the working tree ------------------------------------------------------------------------
def owned(path: str, campaign) -> bool:
    """Paths the loop may find changed: the mutable surface, the ledger files, run outputs."""
    top = path.split("/", 1)[0]
    return (path in campaign.mutable or path in (RESULTS_FILE, NOISE_FILE) or top == RECEIPTS_DIR
            or top == campaign.runs_dir)


def unrelated_reason(changed_paths, campaign) -> str | None:
    """Changed (or untracked, not ignored) files outside what the loop owns."""
    unrelated = sorted({p for p in changed_paths if not owned(p, campaign)})
    if not unrelated:
        return None
    shown = ", ".join(unrelated[:8]) + (f" and {len(unrelated) - 8} more" if len(unrelated) > 8 else "")
    return (f"files outside the mutable surface ({', '.join(campaign.mutable)}) are changed: {shown}. "
            "mlx-ar commits only the mutable surface; commit, revert or .gitignore them, then re-run")


def missing_reason(worktree: dict) -> str | None:
    missing = [p for p, d in worktree.items() if d is None]
    if missing:
        return f"{', '.join(missing)} does not exist; restore it (git checkout HEAD -- {missing[0]})"
    return None


# Ways into the prepared data, the validation and held-out splits above all: the cache root (by
# its variable or default path), the data/evaluation modules, the loader's split walks, and the
# token shards by name. Training reads its batches from the harness, never by itself.
EVAL_DATA_PATTERNS = (
    (r"MLX_AR_CACHE", "the cache root variable MLX_AR_CACHE"),
    (r"mlx-autoresearch", "the cache directory (~/.cache/mlx-autoresearch)"),
    (r"\bmlx_ar\s*\.\s*(?:data|paths|evaluate)\b", "mlx_ar's data, paths or evaluate module"),
    (r"\bfrom\s+mlx_ar\s+import\s+[^\n]*\b(?:data|paths|evaluate)\b", "mlx_ar's data, paths or evaluate module"),
    (r"\b(?:val_batches|heldout_batches|split_table|open_dataset|dataset_dir|cache_root|val_doc_stream)\b",
     "the data loader's split API"),
    (r"\b(?:val|heldout)_\d{5}\b|\.(?:tokens|docs)\.npy\b", "the token shard files"),
    (r"[\"'](?:val|heldout|validation|held-out)[\"']", "a split by name"),
)


def eval_data_reason(files: dict) -> str | None:
    """Why the candidate's mutable files are refused for reaching for the prepared data, or None.

    `files` is {path: bytes or None}. Reading the validation or held-out tokens (or the cache
    they live in) lets a run train on what it is scored on; program.md forbids it.
    """
    for path, data in sorted(files.items()):
        text = _text(data)
        if text is None:
            continue
        for pattern, what in EVAL_DATA_PATTERNS:
            m = re.search(pattern, text)
            if m:
                line = text.count("\n", 0, m.start()) + 1
                return (f"{path}:{line} reaches for {what} ({m.group(0)!r}): the mutable files may not read the "
                        "prepared data, the validation or the held-out split (training gets its batches from "
                        "the harness); remove it")
    return None


def description_reason(description: str) -> str | None:
    return None if description else 'no description: say what changed with -m "..."'


def already_scored_reason(receipts, worktree: dict, campaign) -> str | None:
    prior = find_scored(receipts, surface_sha(worktree), campaign.allow_smoke)
    if not prior:
        return None
    v = (prior.get("metrics") or {}).get(campaign.objective)
    return (f"identical {', '.join(campaign.mutable)} already scored in {prior['_path']} ({prior['status']}"
            + (f", {campaign.objective} {v:.6f}" if v is not None else "") + "); edit it first")


# --- what an edit changes --------------------------------------------------------------------
def _text(source) -> str | None:
    if source is None or isinstance(source, str):
        return source
    return bytes(source).decode("utf-8")


def _code_outside_recipe(source: str, filename: str) -> list[tuple[int, str]]:
    """(line, syntax tree dump) of every top-level statement that is not a recipe constant."""
    from ..recipe import _recipe_nodes

    # _recipe_nodes parses its own tree, so its statements are matched to ours by position.
    spots = {(node.lineno, node.col_offset) for _name, _value, node in _recipe_nodes(source, filename)}
    tree = ast.parse(source, filename=filename)
    return [(node.lineno, ast.dump(node)) for node in tree.body if (node.lineno, node.col_offset) not in spots]


def first_code_change(old, new, filename: str) -> int | None:
    """Line (in `new`) of the first changed statement outside the recipe block; None if none.

    Comments and layout are not code (the comparison is on syntax trees). Raises SyntaxError
    or RecipeError when a source cannot be read.
    """
    a, b = _code_outside_recipe(_text(old), filename), _code_outside_recipe(_text(new), filename)
    for (_, da), (line, db) in zip(a, b):
        if da != db:
            return line
    if len(a) == len(b):
        return None
    # Statements were appended or removed at the end: point at where the two lists part.
    return b[len(a)][0] if len(b) > len(a) else (b[-1][0] if b else 1)


def changed_constants(old, new, filename: str = "train.py") -> set[str]:
    """Recipe constants whose value differs (added or removed ones included)."""
    from ..recipe import parse_recipe, recipe_diff

    return set(recipe_diff(parse_recipe(_text(old), filename), parse_recipe(_text(new), filename)))


def config_tier_problems(old: dict, new: dict, new_constants: bool = False) -> list[str]:
    """Why `new` is not a recipe-only edit of `old` ({path: bytes|None}); [] when it is.

    new_constants=True also accepts added or removed recipe constants (the cuda rule: a new
    dial in train.py's recipe that train_torch.py reads); code outside the recipe still counts.
    """
    from ..recipe import RecipeError, parse_recipe

    problems = []
    for path in sorted(set(old) | set(new)):
        a, b = old.get(path), new.get(path)
        if a == b:
            continue
        if a is None or b is None:
            problems.append(f"{path} was {'added' if a is None else 'deleted'}")
            continue
        if not path.endswith(".py"):
            problems.append(f"{path} changed (only recipe constants of Python files may change)")
            continue
        try:
            ta, tb = a.decode(), b.decode()
            na, nb = list(parse_recipe(ta, path)), list(parse_recipe(tb, path))
            line = first_code_change(ta, tb, path)
        except RecipeError as e:   # names the file and line (a syntax error is one too)
            problems.append(str(e))
            continue
        except UnicodeDecodeError as e:
            problems.append(f"{path}: {e}")
            continue
        if na != nb and not new_constants:
            gone, added = sorted(set(na) - set(nb)), sorted(set(nb) - set(na))
            what = "; ".join(x for x in (f"removed {', '.join(gone)}" if gone else "",
                                         f"added {', '.join(added)}" if added else "",
                                         "reordered" if not gone and not added else "") if x)
            problems.append(f"{path}: the set of recipe constants changed ({what})")
            continue
        if line is not None:
            problems.append(f"{path}:{line}: code outside the recipe constants changed")
    return problems


def config_tier_reason(campaign, ref_files: dict, worktree: dict) -> str | None:
    if campaign.tier != "config":
        return None
    problems = config_tier_problems(ref_files, worktree)
    if not problems:
        return None
    return ("config tier: only the recipe constants may change, but " + "; ".join(problems[:5])
            + '. Revert the code edit (or set tier = "code")')


def inert_changes(backend: str, old_sources: dict, new_sources: dict) -> list[str]:
    """Each edit of `new_sources` against `old_sources` that `backend` would not execute."""
    from ..recipe import RecipeError

    if backend not in EXECUTED:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(EXECUTED)}")
    found = []
    for path in sorted({f for files in MUTABLE_FILES.values() for f in files}):
        old, new = old_sources.get(path), new_sources.get(path)
        if old == new:
            continue
        part = EXECUTED[backend].get(path)
        if part is None:
            found.append(f"{path} (the {backend} backend does not execute it)")
        elif part == "recipe" and old is not None and new is not None:
            try:
                line = first_code_change(old, new, path)
            except (SyntaxError, RecipeError, UnicodeDecodeError):
                continue  # unreadable source: the syntax check and the run itself report it
            if line is not None:
                found.append(f"{path} at line {line}, outside its recipe block (the {backend} backend "
                             f"executes only the recipe constants of {path})")
    return found


def inert_reason(backend: str, old_sources: dict, new_sources: dict) -> str | None:
    """Why the candidate edits code `backend` would not run (it would report a change it never
    ran); None when it may run."""
    found = inert_changes(backend, old_sources, new_sources)
    if found:
        allowed = " and ".join(f"the recipe constants of {p}" if EXECUTED[backend].get(p) == "recipe" else p
                               for p in MUTABLE_FILES[backend])
        return (f"the change would not run on the {backend} backend: it edits " + "; ".join(found)
                + f". Revert that part; on {backend} edit only {allowed} (see program.md)")
    return None


def overridden_reason(profile, old_train, new_train) -> str | None:
    """Refuse an edit that only changes recipe constants the data profile replaces.

    A reduced profile (demo) sets some constants itself; an edit of only those would run the
    champion's model again and report noise as the edit's effect.
    """
    overrides = dict(getattr(profile, "recipe_overrides", ()) or ())
    if not overrides or old_train is None or new_train is None or old_train == new_train:
        return None
    from ..recipe import RecipeError

    try:
        if first_code_change(old_train, new_train, "train.py") is not None:
            return None
        changed = changed_constants(old_train, new_train)
    except (SyntaxError, RecipeError, UnicodeDecodeError):
        return None  # the syntax check and the run report it
    if not changed or not changed <= set(overrides):
        return None
    names = ", ".join(f"{k} (= {overrides[k]!r})" for k in sorted(changed))
    return (f"the {profile.name} profile overrides {names}: this edit would not change the run. "
            f"Edit another constant or the code; the {profile.name} profile sets "
            + ", ".join(sorted(overrides)) + " itself")


def overridden_note(profile, old_train, new_train) -> str | None:
    """A note when an edit changes overridden constants alongside other changes."""
    overrides = dict(getattr(profile, "recipe_overrides", ()) or ())
    if not overrides or old_train is None or new_train is None:
        return None
    from ..recipe import RecipeError

    try:
        hit = sorted(changed_constants(old_train, new_train) & set(overrides))
    except (SyntaxError, RecipeError, UnicodeDecodeError):
        return None
    if not hit:
        return None
    return f"the {profile.name} profile overrides {', '.join(hit)}: that part of the edit had no effect here"


# --- a finished run --------------------------------------------------------------------------
def syntax_problem(files: dict) -> str | None:
    for path, data in sorted(files.items()):
        if data is not None and path.endswith(".py"):
            try:
                compile(data, path, "exec", dont_inherit=True)
            except SyntaxError as e:
                return f"syntax error: {path}:{e.lineno}: {e.msg}"
            except ValueError as e:  # e.g. null bytes
                return f"{path}: {e}"
    return None


def executed_mismatch(executed: dict | None, files: dict) -> str | None:
    """Why the run did not execute the candidate's files (by the record's sha256s), or None."""
    for path, digest in (executed or {}).items():
        data = files.get(path)
        if data is not None and digest and hashlib.sha256(data).hexdigest() != digest:
            return (f"the run executed a different {path} than the candidate (sha256 {digest[:12]}...): "
                    "was it edited during the run?")
    return None


def throttle_reason(rate, usual, n: int, campaign) -> str | None:
    """Why a run looks throttled: tok/s far below the branch's usual (median of n runs)."""
    c = campaign
    if c.throttle_ratio <= 0 or not isinstance(rate, (int, float)) or usual is None or n < c.throttle_min_history:
        return None
    if rate < c.throttle_ratio * usual:
        return (f"{rate:.0f} tok/s is {100 * rate / usual:.0f}% of the branch's usual {usual:.0f} "
                f"(median of {n} runs): throttled or busy machine; re-running")
    return None


def smoke_veto(metrics, record, receipts, campaign) -> str | None:
    if (record or {}).get("smoke") and not campaign.allow_smoke:
        return "smoke run: never kept (not comparable; only tests of the loop allow it)"
    return None


def memory_veto(metrics, record, receipts, campaign) -> str | None:
    mem = (metrics or {}).get("peak_vram_mb")
    if campaign.max_memory_gb is not None and isinstance(mem, (int, float)) and mem / 1024 > campaign.max_memory_gb:
        return f"veto: peak memory {mem / 1024:.1f} GB > max_memory_gb {campaign.max_memory_gb:g}"
    return None


def tok_per_sec_veto(metrics, record, receipts, campaign) -> str | None:
    c = campaign
    if c.min_tok_per_sec_ratio is None:
        return None
    base = next((r for r in receipts if r.get("status") == "keep" and not r.get("smoke")
                 and r.get("device") == (record or {}).get("device")), None)
    base_rate = ((base or {}).get("metrics") or {}).get("tok_per_sec")
    rate = (metrics or {}).get("tok_per_sec")
    if base_rate and isinstance(rate, (int, float)) and rate < c.min_tok_per_sec_ratio * base_rate:
        return f"veto: {rate:.0f} tok/s < {c.min_tok_per_sec_ratio:g} x the branch baseline's {base_rate:.0f}"
    return None


# Checked in order after every ok run; the first reason discards the candidate.
VETOES = [smoke_veto, memory_veto, tok_per_sec_veto]


def veto_reason(metrics, record, receipts, campaign, vetoes=None) -> str | None:
    for veto in VETOES if vetoes is None else vetoes:
        why = veto(metrics, record, receipts, campaign)
        if why:
            return why
    return None


HELDOUT_VETO_SIGMAS = 3.0      # standard errors of a held-out difference that count as a real loss


def heldout_veto(candidate, champion, floor: float | None, sigmas: float = HELDOUT_VETO_SIGMAS) -> str | None:
    """Veto a keep (val_bpb improved) whose held-out bpb worsens beyond the noise floor, or None.

    candidate, champion: the held-out bpb of each ok run (None entries are skipped); floor: the
    seed-to-seed sd of the branch's noise floor. The difference of the means is a real loss when
    it exceeds `sigmas` standard errors, sd * sqrt(1/n + 1/m). Without a floor, or without
    held-out scores on both sides (datasets prepared before the split), there is no veto.
    """
    cand = [float(v) for v in candidate if isinstance(v, (int, float)) and math.isfinite(v)]
    champ = [float(v) for v in champion if isinstance(v, (int, float)) and math.isfinite(v)]
    if not cand or not champ or not floor or floor <= 0:
        return None
    before, after = mean(champ), mean(cand)
    worse = after - before
    limit = sigmas * floor * math.sqrt(1 / len(cand) + 1 / len(champ))
    if worse <= limit:
        return None
    return (f"veto: held-out bpb worsens by {worse:.6f} ({before:.6f} -> {after:.6f}), beyond {sigmas:g} "
            f"standard errors at noise floor sd {floor:.6f} ({limit:.6f}), while val_bpb improves: the gain does not carry to unseen data")

