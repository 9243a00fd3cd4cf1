"""Cache compiled Python for a framework that every process would otherwise compile afresh.

Importing torch and torch.compile's modules reads about a thousand source files. Python caches
their bytecode in `__pycache__` folders beside them, but many container images set
PYTHONDONTWRITEBYTECODE=1, and uv installs packages without bytecode. Then every process (the
training process, each compile-ahead helper, each inductor compile worker) compiles all of it
again. On the H100 machines this project is measured on, `import torch, torch._inductor.compile_fx`
took 9.9-12.6 s that way and 4.0-4.3 s with the bytecode cached.

    cache_bytecode("torch")     # before the first `import torch`; returns the folder, or None

When the package's bytecode is missing and Python would not write it (PYTHONDONTWRITEBYTECODE,
`python -B`, or a read-only install), this points Python's bytecode cache at
`<cache root>/pycache` (`sys.pycache_prefix`, as PYTHONPYCACHEPREFIX does) and lets Python write
there. Processes started afterwards inherit both through the environment. Nothing is written
beside the sources. A PYTHONPYCACHEPREFIX the user set is left alone, and MLX_AR_PYCACHE=0 turns
this off. Python still checks each cached file against its source, so an edit is never missed.
"""
import importlib.util
import os
import sys
from pathlib import Path

SWITCH = "MLX_AR_PYCACHE"


def uncached_reason(package: str) -> str | None:
    """Why every process compiles `package`'s sources afresh, or None when its bytecode is kept
    (or it is not an installed source package)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    pyc = Path(importlib.util.cache_from_source(spec.origin))
    if pyc.exists():
        return None
    if sys.dont_write_bytecode:
        return "PYTHONDONTWRITEBYTECODE or python -B is in effect"
    folder = pyc.parent if pyc.parent.exists() else pyc.parent.parent
    if not os.access(folder, os.W_OK):
        return f"{folder} is not writable"
    return None


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)   # stdout may be machine-read (`mlx-ar bench --json`)


def cache_bytecode(package: str, env=None, root: Path | None = None, echo=_say) -> Path | None:
    """Keep compiled Python under `root` (default: `<cache root>/pycache`) where `package` would
    otherwise be compiled by every process; returns the folder, or None when nothing changed.

    `env` (default os.environ) is where child processes' settings go.
    """
    env = os.environ if env is None else env
    if env.get(SWITCH, "").strip().lower() in ("0", "off", "false", "no") or sys.pycache_prefix:
        return None
    reason = uncached_reason(package)
    if reason is None:
        return None
    if root is None:
        from ..paths import cache_root

        root = cache_root() / "pycache"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        echo(f"bytecode: {package} is compiled anew by every process ({reason}); "
             f"cannot cache it in {root}: {e}")
        return None
    sys.pycache_prefix = str(root)
    sys.dont_write_bytecode = False
    env["PYTHONPYCACHEPREFIX"] = str(root)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    echo(f"bytecode: cached in {root}, since {reason} and {package} has none ({SWITCH}=0 turns this off)")
    return root
