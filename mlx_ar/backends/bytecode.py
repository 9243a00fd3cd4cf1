"""Cache compiled Python for a framework that every process would otherwise compile afresh.

Importing torch and torch.compile's modules reads about a thousand source files. Python caches
their bytecode in `__pycache__` folders beside them, but many container images set
PYTHONDONTWRITEBYTECODE=1, and uv installs packages without bytecode. Then every process (the
training process, each compile-ahead helper, each inductor compile worker) compiles all of it
again. On the H100 machines this project is measured on, `import torch, torch._inductor.compile_fx`
took 9.9-12.6 s that way and 4.0-4.3 s with the bytecode cached.

    cache_bytecode("torch", precompile=("torch", "triton", ...))   # before the first `import torch`

When the package's bytecode is missing and Python would not write it (PYTHONDONTWRITEBYTECODE,
`python -B`, or a read-only install), this points Python's bytecode cache at
`<cache root>/pycache` (`sys.pycache_prefix`, as PYTHONPYCACHEPREFIX does) and lets Python write
there. Processes started afterwards inherit both through the environment. Nothing is written
beside the sources. A PYTHONPYCACHEPREFIX the user set is left alone, and MLX_AR_PYCACHE=0 turns
this off. Python still checks each cached file against its source, so an edit is never missed.

The first time, the `precompile` packages that have no bytecode yet are compiled whole, by one
child process on every core, before anything imports them. Otherwise the first run on a machine
would compile them in each of its processes at once (the training process, the compile-ahead
helpers and inductor's workers). Through the harness on an H100 machine with 16 cores, that
first run's start-up was 28.5-32.3 s (four runs); compiling ahead took 3.4-4.4 s and the start-up
24.7-29.4 s (four runs), against 20.4 s once the cache was written.
"""
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

SWITCH = "MLX_AR_PYCACHE"


def _top_source(package: str) -> Path | None:
    """The source file of `package`'s top module, or None when it is not an installed source package."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    return Path(spec.origin)


def uncached_reason(package: str) -> str | None:
    """Why every process compiles `package`'s sources afresh, or None when its bytecode is kept
    (or it is not an installed source package)."""
    origin = _top_source(package)
    if origin is None:
        return None
    pyc = Path(importlib.util.cache_from_source(str(origin)))
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


def cache_bytecode(package: str, env=None, root: Path | None = None, echo=_say,
                   precompile=()) -> Path | None:
    """Keep compiled Python under `root` (default: `<cache root>/pycache`) where `package` would
    otherwise be compiled by every process; returns the folder, or None when nothing changed.

    `env` (default os.environ) is where child processes' settings go. `precompile`: packages a
    run imports, compiled whole into the folder when their bytecode is in neither place.
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
    compile_sources(precompile, env, echo)
    return root


# --- compiling whole packages ahead of their import ------------------------------------------
def _source_tree(package: str) -> Path | None:
    """`package`'s folder (or its one module file) when its top module has no bytecode beside it
    or under the current cache prefix; None when it has, or it is not an installed source package."""
    origin = _top_source(package)
    if origin is None:
        return None
    beside = origin.parent / "__pycache__" / f"{origin.stem}.{sys.implementation.cache_tag}.pyc"
    if beside.exists() or Path(importlib.util.cache_from_source(str(origin))).exists():
        return None
    return origin.parent if origin.name == "__init__.py" else origin


def compile_sources(packages, env, echo=_say) -> list[str]:
    """Compile the source trees of those `packages` that have no bytecode yet into the cache prefix
    set in `env`, on every core in one child process; returns the packages compiled.

    Files that do not compile (a few templates and test fixtures in large packages) are skipped:
    Python compiles them at import, should anything import them.
    """
    todo = {name: tree for name in packages if (tree := _source_tree(name)) is not None}
    if not todo:
        return []
    echo(f"bytecode: compiling {', '.join(todo)} once, on {os.cpu_count()} cores ...")
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "compileall", "-qq", "-j", "0", *map(str, todo.values())],
                          env=dict(env), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    missing = [name for name in todo if _source_tree(name) is not None]
    took = time.perf_counter() - t0
    if missing:
        echo(f"bytecode: {', '.join(missing)} could not be compiled ahead (exit {done.returncode}: "
             f"{done.stderr.strip()[-300:] or 'no message'}); each process compiles what it imports")
    else:
        echo(f"bytecode: compiled in {took:.1f} s")
    return [name for name in todo if name not in missing]
