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

On cuda, fused kernels may run in place of parts of train_torch.py while its FAST_* flags are on
(KERNEL_PARTS). Those parts must then be the code the kernels compute, as shipped: an edit of
one with its flag on is refused too (bypass_reason), by the ledger and again by the backend.

Sources are `str` or `bytes` (as read from git), or None for a file that does not exist.
"""
import ast
import hashlib

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

    Refuses any edit of code the backend does not execute (see the module docstring), and on
    cuda an edit of code that a fast kernel replaces while its FAST_* flag is on (bypass_reason).
    `old_sources` / `new_sources` map paths (relative to the repository root) to sources.
    """
    found = inert_changes(backend, old_sources, new_sources)
    if not found:
        kernel_file = new_sources.get(KERNEL_FILE)
        if EXECUTED[backend].get(KERNEL_FILE) != "all" or kernel_file is None:
            return None
        try:
            return bypass_reason(kernel_file)
        except SyntaxError:
            return None  # the syntax check and the run itself report it
    allowed = " and ".join(
        f"the recipe constants of {p}" if EXECUTED[backend].get(p) == "recipe" else p
        for p in MUTABLE_FILES[backend])
    return (f"the change would not run on the {backend} backend: it edits " + "; ".join(found)
            + f". Revert that part; on {backend} edit only {allowed} (see program.md)")


# --- code a fast kernel replaces ----------------------------------------------------------------
# With FAST_<X> = True in train_torch.py, the cuda backend may run a fused kernel in place of these
# parts of it, and the kernels compute them as shipped. So while a flag is on, its parts must be
# as shipped (comments, docstrings and layout aside), or a run would report an edit it bypassed.
# Values: fingerprints of the shipped parts' syntax (`kernel_fingerprints`). A part is a top-level
# function or class, "Class.method", or "Class.method/if attr": the `if` on `self.attr` in it.
KERNEL_PARTS = {
    "FAST_ATTENTION": {"window_mask": "28e5660a79f8986a", "Masks": "800590c10228a112"},
    "FAST_MLP": {"MLP.forward": "f598fa219afbf27e", "Linear.forward": "f1ee2a2985a6e441"},
    "FAST_LOSS": {"SoftcapCrossEntropy": "512456a114ffd789", "GPT.head_loss": "dd4a38acd66e765d"},
    "FAST_NORM_ROPE": {"rms_norm": "daa322be8e9bdbc6", "apply_rope": "39f9d4959fa433be",
                       "Attention.forward/if norm_rope": "693604c065a3be9a"},
}
KERNEL_FILE = "train_torch.py"


def _canonical(node) -> str:
    """A syntax tree as text, docstrings left out. Empty and None fields are left out too, since
    newer Pythons add some (type_params); the shipped fingerprints agree on 3.11 and 3.12."""
    if isinstance(node, list):
        return "[" + ",".join(_canonical(v) for v in node) + "]"
    if not isinstance(node, ast.AST):
        return repr(node)
    fields = []
    for name, value in ast.iter_fields(node):
        if name == "body" and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            value = value[1:] if value and ast.get_docstring(node, clean=False) is not None else value
        if value is None or value == []:
            continue
        fields.append(f"{name}={_canonical(value)}")
    return f"{type(node).__name__}({' '.join(fields)})"


def _find_part(tree: ast.Module, part: str):
    """The syntax node of `part` (see KERNEL_PARTS) in `tree`, or None."""
    path, _, cond = part.partition("/if ")
    node, scope = None, tree.body
    for name in path.split("."):
        node = next((n for n in scope if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == name), None)
        if node is None:
            return None
        scope = node.body
    if cond:
        node = next((n for n in ast.walk(node) if isinstance(n, ast.If) and any(
            isinstance(a, ast.Attribute) and a.attr == cond for a in ast.walk(n.test))), None)
    return node


def kernel_fingerprints(source: str) -> dict:
    """{flag: {part: fingerprint or None when missing}} of `source` (a train_torch.py)."""
    return _fingerprints(ast.parse(source, filename=KERNEL_FILE))


def fast_flags(source: str) -> dict:
    """{flag: on} for KERNEL_PARTS' flags in `source`: on when assigned anything but a literal
    False. A file without a flag has no switch for that kernel (a test's stand-in): off."""
    return _flags(ast.parse(source, filename=KERNEL_FILE))


def _fingerprints(tree: ast.Module) -> dict:
    found = {}
    for flag, parts in KERNEL_PARTS.items():
        found[flag] = {}
        for part in parts:
            node = _find_part(tree, part)
            found[flag][part] = None if node is None else \
                hashlib.sha256(_canonical(node).encode()).hexdigest()[:16]
    return found


def _flags(tree: ast.Module) -> dict:
    flags = dict.fromkeys(KERNEL_PARTS, False)
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name in flags:
                flags[name] = not (isinstance(node.value, ast.Constant) and node.value.value is False)
    return flags


def bypassed_edits(source) -> dict:
    """{flag: [part, ...]} of the edits in a train_torch.py `source` that a fast kernel would
    bypass: the parts of KERNEL_PARTS that differ from the shipped code while their flag is on."""
    tree = ast.parse(_text(source), filename=KERNEL_FILE)
    flags, prints = _flags(tree), _fingerprints(tree)
    found = {}
    for flag, parts in KERNEL_PARTS.items():
        changed = [p + (" (removed)" if prints[flag][p] is None else "")
                   for p, shipped in parts.items() if prints[flag][p] != shipped]
        if flags[flag] and changed:
            found[flag] = changed
    return found


class BypassedEdit(ValueError):
    """A run was asked to report an edit that a fast kernel would bypass (bypass_reason)."""


def bypass_reason(source) -> str | None:
    """Why a run of this train_torch.py `source` must be refused, or None: see bypassed_edits."""
    found = bypassed_edits(source)
    if not found:
        return None
    what = "; ".join(f"{', '.join(parts)} (the {flag} kernel computes it as shipped)" for flag, parts in found.items())
    return (f"{KERNEL_FILE} edits code that a fast kernel replaces: {what}. "
            f"Set {' and '.join(f'{flag} = False' for flag in found)} in {KERNEL_FILE} to run the edit, "
            f"or revert it (see program.md)")
