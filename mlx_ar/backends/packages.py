"""Optional kernel packages of the cuda backend: whether one can be imported, and its version.

    why = missing_reason("flash-attn-4", ["flash_attn", "flash_attn.cute"], "pip install ...")
    version("flash-attn-4")            # "4.0.0b36", or "unknown" when not installed
"""
import importlib.metadata
import importlib.util


def missing_reason(package: str, modules, hint: str, find_spec=importlib.util.find_spec) -> str | None:
    """Why `package` (importable as `modules`) cannot be used here, with `hint` on installing it; None if it can."""
    try:
        if any(find_spec(name) is None for name in modules):
            return f"{package} is not installed ({hint})"
    except (ImportError, ValueError) as e:
        return f"{package} cannot be found: {e}"
    return None


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
