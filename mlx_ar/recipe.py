"""The recipe: the UPPER_CASE constants at the top level of train.py.

The recipe is read from source with `ast`, never by importing train.py, so every backend,
the ledger (config-tier checks) and branch comparison see the same values without loading
mlx or torch. The recipe block is every top-level UPPER_CASE assignment above the first
import; UPPER_CASE names after it are implementation constants, not recipe. Values must be
Python literals (numbers, strings, tuples, lists, dicts, bools, None) or arithmetic on number
literals (`2**19`), so they can be compared, recorded as JSON and transplanted between branches.

    recipe = read_recipe("train.py")            # {"DEPTH": 8, ...}
    new_src = apply_recipe(src, {"DEPTH": 10})  # rewrites those assignments in place
    rows, n_micro, rows_per_micro = batch_geometry(recipe, seq_len)   # how a step splits its batch
    train = load_train("train.py", {"DEPTH": 2})  # train.py run as a fresh module with overrides
    parse_overrides(["DEPTH=4"])                # --set NAME=VALUE arguments -> {"DEPTH": 4}
"""
import ast
import itertools
import json
import operator
import sys
import types
from pathlib import Path

from .constants import MAX_SEQ_LEN

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Pow: operator.pow, ast.Mod: operator.mod}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}


class RecipeError(ValueError):
    """train.py's recipe block cannot be read (non-literal value, duplicate name, syntax)."""


def _is_recipe_name(name: str) -> bool:
    return name.isupper() and not name.startswith("_")


def _recipe_nodes(source: str, filename: str = "train.py"):
    try:
        tree = ast.parse(source, filename=filename)
    except SyntaxError as e:
        raise RecipeError(f"{filename}:{e.lineno}: syntax error: {e.msg}") from e
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            return  # the recipe block ends at the first import
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name, value = node.targets[0].id, node.value
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            name, value = node.target.id, node.value
        else:
            continue
        if _is_recipe_name(name):
            yield name, value, node


class _Uncomputable(ValueError):
    """Arithmetic on number literals that has no value (division by zero, overflow)."""


def _value(node):
    """literal_eval plus arithmetic on numbers (2**19, 3 * 524288); anything else is ValueError."""
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _value(node.left), _value(node.right)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (left, right)):
            raise ValueError("arithmetic on non-numbers")
        if isinstance(node.op, ast.Pow) and abs(right) > 64:
            raise ValueError("exponent too large")
        try:
            return _BINOPS[type(node.op)](left, right)
        except ArithmeticError as e:  # 1/0, 1e300**2
            raise _Uncomputable(f"cannot compute it: {e}") from None
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_value(node.operand))
    if isinstance(node, (ast.Tuple, ast.List)):
        items = [_value(e) for e in node.elts]
        return tuple(items) if isinstance(node, ast.Tuple) else items
    return ast.literal_eval(node)


def parse_value(text: str):
    """A recipe value from text, by the same rules as the recipe block ('2**19' -> 524288)."""
    return _value(ast.parse(text.strip(), mode="eval").body)


def parse_recipe(source: str, filename: str = "train.py") -> dict:
    """Top-level UPPER_CASE literal assignments of `source`, in order of appearance."""
    recipe = {}
    for name, value, node in _recipe_nodes(source, filename):
        if name in recipe:
            raise RecipeError(f"{filename}:{node.lineno}: {name} is assigned twice at top level")
        try:
            recipe[name] = _value(value)
        except _Uncomputable as e:
            raise RecipeError(f"{filename}:{node.lineno}: {name} = `{ast.unparse(value)}`: {e}") from e
        except (ValueError, TypeError, SyntaxError) as e:
            raise RecipeError(
                f"{filename}:{node.lineno}: {name} must be a literal (number, string, tuple, ...) "
                f"or arithmetic on numbers, got `{ast.unparse(value)}`"
            ) from e
    return recipe


def read_recipe(path) -> dict:
    path = Path(path)
    return parse_recipe(path.read_text(), filename=str(path))


def apply_recipe(source: str, updates: dict, filename: str = "train.py") -> str:
    """Return `source` with the named recipe constants set to new literal values.

    Only the value expression is replaced, so comments and alignment on the line survive.
    Unknown names raise RecipeError (a transplant must not invent constants).
    """
    spans = {}
    for name, value, _node in _recipe_nodes(source, filename):
        spans[name] = (value.lineno, value.col_offset, value.end_lineno, value.end_col_offset)
    unknown = sorted(set(updates) - set(spans))
    if unknown:
        raise RecipeError(f"{filename} has no recipe constant named {', '.join(unknown)}")
    lines = source.splitlines(keepends=True)
    # Replace from the bottom up so earlier spans keep their coordinates.
    for name in sorted(updates, key=lambda n: spans[n], reverse=True):
        l0, c0, l1, c1 = spans[name]
        head = lines[l0 - 1].encode()[:c0].decode()
        tail = lines[l1 - 1].encode()[c1:].decode()
        lines[l0 - 1 : l1] = [head + repr(updates[name]) + tail]
    out = "".join(lines)
    parse_recipe(out, filename)  # the rewrite must still be a valid recipe
    return out


# Stands for "not defined on this side" in recipe_diff.
ABSENT = object()


def same_value(a, b) -> bool:
    """Equal as recipe values: tuples and lists alike (receipts store JSON), 1 and 1.0 not."""
    def canon(v):
        return json.dumps(v, sort_keys=True, default=repr)
    return canon(a) == canon(b)


def recipe_diff(a: dict, b: dict, missing=ABSENT) -> dict:
    """{name: (a_value, b_value)} for every name that differs or exists on one side only.

    A side that does not define the name shows `missing`; names keep a's order, then b's new ones.
    """
    out = {}
    for k in list(a) + [k for k in b if k not in a]:
        va, vb = a.get(k, missing), b.get(k, missing)
        if k not in a or k not in b or not same_value(va, vb):
            out[k] = (va, vb)
    return out


# --- batch geometry and running train.py with overrides ---------------------------------------
def batch_geometry(recipe: dict, seq_len: int):
    """(rows per step, micro-batches per step, rows per micro-batch).

    TOTAL_BATCH_SIZE is stated in tokens at the contract's MAX_SEQ_LEN; a profile with shorter
    rows (demo) keeps the same number of rows per step.
    """
    total, device_rows = recipe.get("TOTAL_BATCH_SIZE"), recipe.get("DEVICE_BATCH_SIZE")
    if not isinstance(total, int) or not isinstance(device_rows, int) or total <= 0 or device_rows <= 0:
        raise ValueError('TOTAL_BATCH_SIZE must be a positive integer in train.py, DEVICE_BATCH_SIZE a positive '
                         'integer or "auto"')
    rows = total // MAX_SEQ_LEN
    if rows * MAX_SEQ_LEN != total or rows % device_rows:
        raise ValueError(
            f"TOTAL_BATCH_SIZE ({total}) must be a multiple of DEVICE_BATCH_SIZE * MAX_SEQ_LEN "
            f"({device_rows} * {MAX_SEQ_LEN} = {device_rows * MAX_SEQ_LEN})")
    return rows, rows // device_rows, device_rows


_counter = itertools.count()


def load_train(path="train.py", overrides: dict | None = None) -> types.ModuleType:
    """train.py executed as a fresh module, with recipe `overrides` applied to its source first
    (the module sees them exactly as if they had been written there)."""
    path = Path(path).resolve()
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (run from the repository root)")
    source = path.read_text()
    if overrides:
        source = apply_recipe(source, overrides, filename=str(path))
    name = f"_mlx_ar_train_{next(_counter)}"
    module = types.ModuleType(name)
    module.__file__ = str(path)
    sys.modules[name] = module  # dataclasses look their module up while the class is created
    exec(compile(source, str(path), "exec"), module.__dict__)
    return module


def parse_overrides(items) -> dict:
    """['DEPTH=4', 'OPTIMIZER="adamw"'] -> {'DEPTH': 4, 'OPTIMIZER': 'adamw'} (values as in the recipe)."""
    out = {}
    for item in items or ():
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects NAME=VALUE, got {item!r}")
        try:
            out[key.strip()] = parse_value(raw)
        except (ValueError, TypeError, SyntaxError):
            out[key.strip()] = raw.strip()  # a bare word is a string: OPTIMIZER=adamw
    return out
