"""Load train.py as a module, optionally with recipe constants overridden.

Benchmarks and tests use this to run the current recipe, or a variant of it (`DEPTH=2`),
without editing the file: the overrides are applied to the source with `apply_recipe`, so
the module sees them exactly as if they had been written there.

    train = load_train("train.py", {"DEPTH": 2})
    model = train.build_model(vocab_size, seq_len)
"""
import itertools
import sys
import types
from pathlib import Path

from ..recipe import apply_recipe

_counter = itertools.count()


def load_train(path="train.py", overrides: dict | None = None) -> types.ModuleType:
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
    from ..recipe import parse_value

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
