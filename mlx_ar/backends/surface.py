"""The mutable surface per backend, and the refusal of edits the chosen backend would not run.

An agent edits `train.py` on an mlx branch, and `train.py` plus `train_torch.py` on a cuda
branch. The two backends do not execute the same code:

    backend  train.py                                  train_torch.py
    mlx      all of it                                 nothing
    cuda     the recipe block only (the UPPER_CASE     all of it
             constants above the first import)

A candidate that edits a part its backend does not execute (MLX model code on cuda, the torch
model on mlx) is refused before any budget is spent: the run would report a change it never
ran. The rule is strict: such an edit is refused even when it comes with an edit that does
run, because the receipt's diff would still claim it. Comments and blank lines are not code
(the comparison is on syntax trees), so editing them never causes a refusal.

    reason = refuse_reason("cuda", {"train.py": old_src}, {"train.py": new_src})
    if reason: ...refuse with `reason`...

Sources are `str` or `bytes` (as read from git), or None for a file that does not exist.
"""
import ast

MUTABLE_FILES = {"mlx": ["train.py"], "cuda": ["train.py", "train_torch.py"]}

# What each backend executes of each mutable file: "all", "recipe" (only the recipe constants).
# A mutable file not listed for a backend is not executed by it at all.
EXECUTED = {
    "mlx": {"train.py": "all"},
    "cuda": {"train.py": "recipe", "train_torch.py": "all"},
}

_ALL_FILES = sorted({f for files in MUTABLE_FILES.values() for f in files})


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


def first_code_change(old: str, new: str, filename: str) -> int | None:
    """Line (in `new`) of the first changed statement outside the recipe block; None if none.

    Raises SyntaxError or RecipeError when a source cannot be read.
    """
    a, b = _code_outside_recipe(old, filename), _code_outside_recipe(new, filename)
    for (_, da), (line, db) in zip(a, b):
        if da != db:
            return line
    if len(a) == len(b):
        return None
    # Statements were appended or removed at the end: point at where the two lists part.
    return b[len(a)][0] if len(b) > len(a) else (b[-1][0] if b else 1)


def inert_changes(backend: str, old_sources: dict, new_sources: dict) -> list[str]:
    """Each edit of `new_sources` against `old_sources` that `backend` would not execute."""
    if backend not in EXECUTED:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(EXECUTED)}")
    from ..recipe import RecipeError

    found = []
    for path in _ALL_FILES:
        old, new = _text(old_sources.get(path)), _text(new_sources.get(path))
        if old == new:
            continue
        part = EXECUTED[backend].get(path)
        if part is None:
            found.append(f"{path} (the {backend} backend does not execute it)")
        elif part == "recipe" and old is not None and new is not None:
            try:
                line = first_code_change(old, new, path)
            except (SyntaxError, RecipeError):
                continue  # unreadable source: the syntax check and the run itself report it
            if line is not None:
                found.append(f"{path} at line {line}, outside its recipe block (the {backend} backend "
                             f"executes only the recipe constants of {path})")
    return found


def refuse_reason(backend: str, old_sources: dict, new_sources: dict) -> str | None:
    """Why the candidate `new_sources` must be refused on `backend`, or None when it may run.

    Refuses any edit of code the backend does not execute (see the module docstring).
    `old_sources` / `new_sources` map paths (relative to the repository root) to sources.
    """
    found = inert_changes(backend, old_sources, new_sources)
    if not found:
        return None
    allowed = " and ".join(
        f"the recipe constants of {p}" if EXECUTED[backend].get(p) == "recipe" else p
        for p in MUTABLE_FILES[backend])
    return (f"the change would not run on the {backend} backend: it edits " + "; ".join(found)
            + f". Revert that part; on {backend} edit only {allowed} (see program.md)")
