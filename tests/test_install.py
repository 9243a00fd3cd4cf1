"""The install a fresh Mac gets: `.python-version`, `requires-python` and `uv.lock` agree, and the
lock installs the mlx extra from wheels on Apple Silicon (a source build fails on a stock Mac)."""
import re
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the 3.10 fallback the project itself declares
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
# Packages a `uv sync --extra mlx` on a Mac installs (the project's dependencies, their own, MLX).
MAC_MLX_PACKAGES = {"numpy", "tiktoken", "pyarrow", "click", "gitpython", "rustbpe", "mlx", "mlx-metal",
                    "regex", "requests", "gitdb", "smmap", "certifi", "charset-normalizer", "idna", "urllib3"}


def pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def lock():
    return tomllib.loads((ROOT / "uv.lock").read_text())


def pinned_python():
    return tuple(int(x) for x in (ROOT / ".python-version").read_text().strip().split("."))


def test_requires_python_has_an_upper_bound_that_admits_the_pin():
    spec = pyproject()["project"]["requires-python"]
    low = re.search(r">=\s*(\d+)\.(\d+)", spec)
    high = re.search(r"<\s*(\d+)\.(\d+)", spec)
    assert low and high, f"requires-python {spec!r} needs a floor and an upper bound"
    pin = pinned_python()[:2]
    assert (int(low[1]), int(low[2])) <= pin < (int(high[1]), int(high[2]))


def test_the_lock_was_made_for_this_pyproject():
    assert lock()["requires-python"].replace(" ", "") == pyproject()["project"]["requires-python"].replace(" ", "")
    floor = re.search(r"mlx>=([\d.]+); sys_platform == 'darwin'", "\n".join(pyproject()["project"]
                                                                           ["optional-dependencies"]["mlx"]))
    assert floor, "the mlx extra states a floor for macOS"
    locked = [p["version"] for p in lock()["package"] if p["name"] == "mlx"]
    assert locked and all(tuple(map(int, v.split("."))) >= tuple(map(int, floor[1].split("."))) for v in locked)


@pytest.mark.parametrize("name", sorted(MAC_MLX_PACKAGES))
def test_each_package_of_the_mac_install_has_a_wheel_for_the_pinned_python(name):
    tag = "cp%d%d" % pinned_python()[:2]
    entries = [p for p in lock()["package"] if p["name"] == name]
    assert entries, f"{name} is not in uv.lock"
    # A package may be locked at several versions, one per Python range: one of them must fit.
    wheels = [w["url"].rsplit("/", 1)[-1] for entry in entries for w in entry.get("wheels", [])]
    fits = [w for w in wheels if w.endswith("-none-any.whl")
            or (re.search(rf"-({tag}|cp3\d*-abi3|py3-none)-", w) and "macosx" in w and ("arm64" in w or "universal2" in w))]
    assert fits, f"{name}: no macOS arm64 wheel for {tag} in uv.lock (uv would build it from source)"
