"""FlashAttention-4 (the `flash-attn-4` package's CuTe DSL kernels) as an optional attention kernel.

On a Hopper or newer NVIDIA GPU with `flash-attn-4` installed, kernels/__init__.py binds
`attention` to this module's in place of SDPA and flex_attention (fallback.py). It computes the
same causal sliding-window attention; only the kernel differs. Nothing is downloaded: the
kernels are compiled on this machine at their first call (and cached on disk by flash-attn-4
when FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1, which kernels/__init__.py sets unless told otherwise).

    reason = unavailable_reason(device, head_dim)      # None when FA4 can run here
    y = attention(q, k, v, window, scale)              # q, k, v, y: (B, T, H, D) bf16

The kernels are wrapped as torch custom ops (`mlx_ar::fa4_fwd`, `mlx_ar::fa4_bwd`) so that
torch.compile keeps them whole inside the compiled model. The backward is flash-attn-4's
non-deterministic one (dQ is summed with atomics), as FA3's is by default.
"""
import importlib.util

import torch

from .packages import cuda_capability, missing_reason, package_version

MIN_CAPABILITY = 9                 # the sm90 (Hopper) and sm100 kernels; older GPUs use torch's kernels
PACKAGE = "flash-attn-4"


def unavailable_reason(device, head_dim: int, capability=None, find_spec=importlib.util.find_spec) -> str | None:
    """Why FA4 cannot run on `device` for heads of `head_dim` channels; None when it can.

    capability: the GPU's (major, minor), asked of torch when not given.
    """
    found, why = cuda_capability(device, capability, minimum=MIN_CAPABILITY)
    if why:
        return why
    major, minor = found
    # flash-attn-4's head sizes: Hopper 8-256; Blackwell 8-128 or 256; multiples of 8 (bf16)
    supported = 8 <= head_dim <= 256 if major == 9 else (8 <= head_dim <= 128 or head_dim == 256)
    if head_dim % 8 or not supported:
        return f"head_dim {head_dim} is not supported by FA4 on compute capability {major}.{minor}"
    return missing_reason(PACKAGE, ("flash_attn", "flash_attn.cute"),
                                   f'pip install "{PACKAGE}[cu13]", or without [cu13] for CUDA 12', find_spec)


def version() -> str:
    return package_version(PACKAGE)


def window_left(window: int, seq_len: int) -> int:
    """Keys left of the query that a window of `window` keys (itself included) reaches; -1: all."""
    if window < 1:
        raise ValueError(f"an attention window holds at least 1 key, got {window}")
    return -1 if window >= seq_len else window - 1


# --- custom ops -------------------------------------------------------------------------------
@torch.library.custom_op("mlx_ar::fa4_fwd", mutates_args=())
def fa4_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, left: int,
            scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention over the `left` keys before each query (-1: all); returns (out, lse (B, H, T))."""
    from flash_attn.cute.interface import _flash_attn_fwd

    out, lse = _flash_attn_fwd(q, k, v, softmax_scale=scale, causal=True,
                               window_size_left=None if left < 0 else left, window_size_right=0,
                               return_lse=True)[:2]
    return out, lse


@fa4_fwd.register_fake
def _(q, k, v, left, scale):
    B, T, H, _ = q.shape
    return torch.empty_like(q), q.new_empty((B, H, T), dtype=torch.float32)


@torch.library.custom_op("mlx_ar::fa4_bwd", mutates_args=())
def fa4_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, dout: torch.Tensor,
            lse: torch.Tensor, left: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from flash_attn.cute.interface import _flash_attn_bwd

    dq, dk, dv = _flash_attn_bwd(q, k, v, out, dout, lse, scale, True, 0.0,
                                 window_size_left=None if left < 0 else left, window_size_right=0)
    return dq, dk, dv


@fa4_bwd.register_fake
def _(q, k, v, out, dout, lse, left, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, left, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.left, ctx.scale = left, scale


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.mlx_ar.fa4_bwd(q, k, v, out, dout.contiguous(), lse, ctx.left, ctx.scale)
    return dq, dk, dv, None, None


fa4_fwd.register_autograd(_backward, setup_context=_setup_context)


def attention(q, k, v, window: int, scale: float):
    """Causal attention of each query over its last `window` keys; q, k, v and the result (B, T, H, D)."""
    left = window_left(window, q.size(1))
    return torch.ops.mlx_ar.fa4_fwd(q.contiguous(), k.contiguous(), v.contiguous(), left, float(scale))[0]
