"""Optional kernel packages of the cuda backend: the GPU they would run on, whether one can be imported, its version.

    (major, minor), why = cuda_capability(device, minimum=9)  # or (None, "cpu is not a CUDA device")
    why = missing_reason("flash-attn-4", ["flash_attn", "flash_attn.cute"], "pip install ...")
    package_version("flash-attn-4")           # "4.0.0b36", or "unknown" when not installed
"""
import importlib.metadata
import importlib.util


def cuda_capability(device, capability=None, minimum: int = 0) -> tuple[tuple[int, int] | None, str | None]:
    """(compute capability, None) of a CUDA `device` of major version `minimum` or newer; else (None, why not).

    capability: the GPU's (major, minor) when the caller knows it (tests); else torch is asked.
    """
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return None, f"{device.type} is not a CUDA device"
    major, minor = capability or torch.cuda.get_device_capability(device)
    if major < minimum:
        return None, f"compute capability {major}.{minor} is below {minimum}.0"
    return (major, minor), None


def missing_reason(package: str, modules, hint: str, find_spec=importlib.util.find_spec) -> str | None:
    """Why `package` (importable as `modules`) cannot be used here, with `hint` on installing it; None if it can."""
    try:
        if any(find_spec(name) is None for name in modules):
            return f"{package} is not installed ({hint})"
    except (ImportError, ValueError) as e:
        return f"{package} cannot be found: {e}"
    return None


def package_version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
