"""bytecode.py: compiled Python is cached outside the sources when Python would not keep it.

A small source package in a temporary folder stands in for torch. The caching itself changes
interpreter state, so it runs in fresh interpreters (`python -B`, as under
PYTHONDONTWRITEBYTECODE=1); the import time it saves is measured on a GPU machine (the closing
note of #4), not asserted here.
"""
import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mlx_ar.backends import bytecode

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def pkg(tmp_path, monkeypatch):
    """An importable source package `fakefw` (and `fakefw_child`) with no bytecode anywhere."""
    src = tmp_path / "src"
    (src / "fakefw").mkdir(parents=True)
    (src / "fakefw" / "__init__.py").write_text("VALUE = 1\n")
    (src / "fakefw" / "unused.py").write_text("VALUE = 3\n")               # never imported
    (src / "fakefw" / "broken.py").write_text("def (:\n")                  # does not compile
    (src / "fakefw_child.py").write_text("VALUE = 2\n")
    monkeypatch.syspath_prepend(str(src))
    return src


def cached_under(prefix: Path, source: Path) -> Path:
    """Where Python keeps `source`'s bytecode under the cache prefix `prefix`."""
    saved = sys.pycache_prefix
    sys.pycache_prefix = str(prefix)
    try:
        return Path(importlib.util.cache_from_source(str(source)))
    finally:
        sys.pycache_prefix = saved


def test_reason_only_when_bytecode_is_missing_and_would_not_be_written(pkg, monkeypatch):
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    assert "PYTHONDONTWRITEBYTECODE" in bytecode.uncached_reason("fakefw")
    assert bytecode.uncached_reason("no_such_package_here") is None
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    assert bytecode.uncached_reason("fakefw") is None          # Python writes it beside the source

    # With the bytecode beside the source, there is nothing to do even under -B.
    import py_compile

    py_compile.compile(str(pkg / "fakefw" / "__init__.py"), doraise=True)
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    assert bytecode.uncached_reason("fakefw") is None


def test_reason_names_a_read_only_install(pkg, monkeypatch):
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    folders = []
    monkeypatch.setattr(bytecode.os, "access", lambda path, mode: folders.append(Path(path)) and False)
    assert "not writable" in bytecode.uncached_reason("fakefw")
    assert folders == [pkg / "fakefw"]          # no __pycache__ yet: Python would have to create one


def test_switched_off_or_prefix_already_chosen_changes_nothing(pkg, monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    said = []
    env = {bytecode.SWITCH: "0", "PYTHONDONTWRITEBYTECODE": "1"}
    assert bytecode.cache_bytecode("fakefw", env=env, root=tmp_path / "c", echo=said.append) is None
    monkeypatch.setattr(sys, "pycache_prefix", str(tmp_path / "theirs"))
    env = {"PYTHONDONTWRITEBYTECODE": "1"}
    assert bytecode.cache_bytecode("fakefw", env=env, root=tmp_path / "c", echo=said.append) is None
    assert env == {"PYTHONDONTWRITEBYTECODE": "1"} and said == [] and not (tmp_path / "c").exists()


RUN = textwrap.dedent("""
    import os, subprocess, sys
    from mlx_ar.backends import bytecode
    print("folder", bytecode.cache_bytecode("fakefw", precompile=("fakefw", "no_such_package_here")))
    import fakefw
    subprocess.run([sys.executable, "-c", "import fakefw_child"], check=True)
""")


def run_fresh(pkg, cache, **extra):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(pkg), str(ROOT)]), "MLX_AR_CACHE": str(cache),
           "PYTHONDONTWRITEBYTECODE": "1", **extra}
    env.pop("PYTHONPYCACHEPREFIX", None)
    done = subprocess.run([sys.executable, "-B", "-c", RUN], env=env, capture_output=True, text=True, check=True)
    assert "bytecode:" not in done.stdout            # stdout may be JSON (`mlx-ar bench --json`)
    return done.stdout + done.stderr


def test_a_fresh_interpreter_caches_its_and_its_childrens_bytecode_outside_the_sources(pkg, tmp_path):
    out = run_fresh(pkg, tmp_path / "cache")
    folder = tmp_path / "cache" / "pycache"
    assert f"folder {folder}" in out and "bytecode: cached in" in out
    assert "bytecode: compiling fakefw once" in out and "bytecode: compiled in" in out
    assert cached_under(folder, pkg / "fakefw" / "__init__.py").is_file()
    assert cached_under(folder, pkg / "fakefw" / "unused.py").is_file()    # compiled ahead, whole
    assert not cached_under(folder, pkg / "fakefw" / "broken.py").exists()  # skipped, not fatal
    assert cached_under(folder, pkg / "fakefw_child.py").is_file()      # written by the child process
    assert not list(pkg.rglob("*.pyc"))                                 # nothing beside the sources

    # The next run finds the package compiled: it only points Python at the cache.
    out = run_fresh(pkg, tmp_path / "cache")
    assert "bytecode: cached in" in out and "compiling" not in out

    # Switched off: nothing is cached and the interpreter keeps -B.
    out = run_fresh(pkg, tmp_path / "off", MLX_AR_PYCACHE="0")
    assert "folder None" in out and not (tmp_path / "off").exists()


def test_an_edited_source_is_recompiled_from_the_cache(pkg, tmp_path):
    run_fresh(pkg, tmp_path / "cache")
    (pkg / "fakefw" / "__init__.py").write_text("VALUE = 12345\n")
    probe = RUN + "print('value', fakefw.VALUE)\n"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(pkg), str(ROOT)]),
           "MLX_AR_CACHE": str(tmp_path / "cache"), "PYTHONDONTWRITEBYTECODE": "1"}
    out = subprocess.run([sys.executable, "-B", "-c", probe], env=env, capture_output=True, text=True,
                         check=True).stdout
    assert "value 12345" in out


def test_only_packages_without_bytecode_are_compiled_and_a_failure_is_said(pkg, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "pycache_prefix", str(tmp_path / "prefix"))
    env = {**os.environ, "PYTHONPYCACHEPREFIX": str(tmp_path / "prefix")}
    import py_compile

    (pkg / "done.py").write_text("VALUE = 5\n")
    py_compile.compile(str(pkg / "done.py"), cfile=str(pkg / "__pycache__" / f"done.{sys.implementation.cache_tag}.pyc"))
    said = []
    assert bytecode.compile_sources(["fakefw", "fakefw_child", "done", "sys"], env, said.append) == \
        ["fakefw", "fakefw_child"]                       # done has its bytecode beside it; sys has no source
    assert said[0].startswith("bytecode: compiling fakefw, fakefw_child once")
    assert bytecode.compile_sources(["fakefw", "fakefw_child"], env, said.append) == [] and len(said) == 2

    (pkg / "other.py").write_text("VALUE = 4\n")
    env["PYTHONPYCACHEPREFIX"] = str(tmp_path / "elsewhere")   # the child writes where we do not look
    assert bytecode.compile_sources(["other"], env, said.append) == []
    assert "other could not be compiled ahead" in said[-1] and "each process compiles what it imports" in said[-1]


def test_the_backend_caches_bytecode_before_the_standby_helpers_start(monkeypatch):
    from mlx_ar.backends import cuda_backend

    calls = []
    monkeypatch.setattr(cuda_backend.bytecode, "cache_bytecode",
                        lambda package, precompile: calls.append(("bytecode", package, precompile)))
    monkeypatch.setattr(cuda_backend.compile_ahead, "stand_by_if_wanted", lambda mode=None: calls.append(("standby", mode)))
    cuda_backend.before_torch_import("model")
    assert calls == [("bytecode", "torch", cuda_backend.IMPORTED_PACKAGES), ("standby", "model")]
    assert {"torch", "triton", "flash_attn", "quack"} <= set(cuda_backend.IMPORTED_PACKAGES)
