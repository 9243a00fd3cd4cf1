"""The kernels train_torch.py calls by name, and the one place that picks fused or plain torch.

    from mlx_ar.backends.cuda import kernels
    y = kernels.attention(q, k, v, window, scale)            # FlashAttention-4, else SDPA / flex_attention
    y = kernels.relu2_mlp(x, w_fc, w_proj, residual)         # quack GEMMs with relu² in the epilogue
    y = kernels.residual_linear(x, w, residual)              # quack GEMM adding the residual as it stores
    loss = kernels.softcap_cross_entropy(h, w, targets, cap) # Triton: loss and logit gradient in one pass

Each name is bound to its plain-torch version (fallback.py) until the backend calls
`use(device, head_dim, mlp_dims)` before building the model; that binds each name to its fused
kernel where the kernel runs on that device and shape, and returns what was chosen, for the run
record. MLX_AR_FUSED_KERNELS=0 keeps every name on plain torch: the one switch.

A fused kernel computes exactly what its fallback computes (each has a CPU reference test). To
change the math, an agent replaces the call in train_torch.py with its own code.
"""
import os

from . import fallback

ENV = "MLX_AR_FUSED_KERNELS"

attention = fallback.attention
relu2_mlp = fallback.relu2_mlp
residual_linear = fallback.residual_linear
softcap_cross_entropy = fallback.softcap_cross_entropy
prepare_flex = fallback.prepare_flex


def fused_wanted(env=os.environ) -> bool:
    """MLX_AR_FUSED_KERNELS: 1 (default) or 0; anything else is a ValueError that says so."""
    value = env.get(ENV, "").strip() or "1"
    if value not in ("0", "1"):
        raise ValueError(f"{ENV}={value!r}: use 1 (fused kernels where they run) or 0 (plain torch only)")
    return value == "1"


def use(device, head_dim: int, mlp_dims, env=os.environ, probes=None, capability=None) -> dict:
    """Bind each kernel name for a model on `device`; returns {family: what runs it (and why)}.

    mlp_dims: (d_model, hidden). probes: {family: reason()} saying why a fused kernel cannot run
    (None: it can); by default each kernel module is asked. capability: the GPU's (major, minor),
    asked of torch when not given. Tests pass both to choose on a machine without the GPU.
    """
    import torch

    device = torch.device(device)
    fused = fused_wanted(env)
    probes = probes or _probes(device, head_dim, mlp_dims)
    on_gpu = device.type == "cuda"
    g = globals()
    g.update(attention=fallback.attention, relu2_mlp=fallback.relu2_mlp,
             residual_linear=fallback.residual_linear, softcap_cross_entropy=fallback.softcap_cross_entropy)
    chosen = {}

    def why_not(family):
        if not fused:
            return f"{ENV}=0"
        return probes[family]()

    why = why_not("attention")
    if why is None:
        os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "1")   # ~5 s a kernel, once per machine
        from . import fa4

        g["attention"] = fa4.attention
        chosen["attention"] = f"fa4 {fa4.version()}"
    else:
        chosen["attention"] = _fallback_label("torch sdpa+flex" if on_gpu else "torch sdpa", why, on_gpu)
    why = why_not("mlp")
    if why is None:
        import functools

        from . import quack_mlp

        tiles = quack_mlp.pinned_tiles(capability or torch.cuda.get_device_capability(device))
        g["relu2_mlp"] = functools.partial(quack_mlp.mlp, tiles=tiles)
        g["residual_linear"] = functools.partial(quack_mlp.residual_linear, tiles=tiles)
        chosen["mlp"] = (f"quack {quack_mlp.version()} (relu² and the residual adds in the GEMM epilogues, "
                         f"{quack_mlp.tiles_label(tiles)})")
    else:
        chosen["mlp"] = _fallback_label("torch", why, on_gpu)
    why = why_not("loss")
    if why is None:
        from . import softcap_ce

        g["softcap_cross_entropy"] = softcap_ce.cross_entropy
        chosen["loss"] = f"triton {softcap_ce.version()} (soft-capped cross-entropy and its gradient in one pass)"
    else:
        chosen["loss"] = _fallback_label("torch", why, on_gpu)
    return chosen


def _fallback_label(name: str, why: str, on_gpu: bool) -> str:
    # On the CPU no fused kernel is expected, so the record says only what ran.
    return f"{name} (fused not used: {why})" if on_gpu else name


def _probes(device, head_dim: int, mlp_dims) -> dict:
    def attention():
        from .fa4 import unavailable_reason

        return unavailable_reason(device, head_dim)

    def mlp():
        from .quack_mlp import unavailable_reason

        return unavailable_reason(device, mlp_dims)

    def loss():
        from .softcap_ce import unavailable_reason

        return unavailable_reason(device)

    return {"attention": attention, "mlp": mlp, "loss": loss}
