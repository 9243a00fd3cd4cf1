"""Attention's q/k RMS norm and rotary embedding in one pass each way (Triton kernels), an optional kernel.

train_torch.py normalizes the query and key heads (an RMS norm without weight) and rotates them
(RoPE, halves rotated, as MLX's `fast.rope(traditional=False)`). Here each direction is one
Triton kernel that reads each value once (the backward reads x and the gradient) and writes
once, recomputing the norm's statistics instead of saving them. On an H100, for one
(128, 2048, 4, 128) bf16 tensor: 0.18 ms forward and 0.27 ms backward, at 2.95-3.0 TB/s (a
plain copy ran at 2.95 TB/s). In the karpathy-config step, torch.compile's own fusion (q and k
in one kernel per layer) took 16.0 ms of GPU time per step and these kernels 14.6 ms: a small
gain, measured in a kernel profile, within the step time's spread from run to run.

    reason = unavailable_reason(device, head_dim)   # None when the kernels can run
    y = norm_rope(x, cos, sin, eps)     # x (B, T, H, D) bf16; cos, sin (T, 1, D / 2) float32

The kernels are the torch custom ops `mlx_ar::norm_rope` and `mlx_ar::norm_rope_backward` (Triton
on a GPU, the same math in torch elsewhere); the backward is registered with the first, so
torch.compile, its caches and CUDA graphs keep both whole. The cuda backend hands `norm_rope` to
the model where Triton runs.
"""
import importlib.util

import torch

from . import compile_ahead, packages

MIN_CAPABILITY = 8                 # bf16 loads and stores in Triton: Ampere and newer
PACKAGE = "triton"


def unavailable_reason(device, head_dim: int, capability=None, find_spec=importlib.util.find_spec) -> str | None:
    """Why the Triton kernels cannot run on `device` for heads of `head_dim`; None when they can.

    capability: the GPU's (major, minor), asked of torch when not given.
    """
    if head_dim < 2 or head_dim & (head_dim - 1):
        return f"head_dim {head_dim} is not a power of two"
    why = packages.cuda_capability(device, capability, minimum=MIN_CAPABILITY)[1]
    return why or packages.missing_reason(PACKAGE, ("triton",), "it comes with torch's CUDA wheels", find_spec)


def version() -> str:
    return packages.version(PACKAGE)


# --- reference math -----------------------------------------------------------------------------
def reference(x, cos, sin, eps: float):
    """The kernels' forward in torch: x normalized in float32 and rounded, rotated in float32, rounded."""
    xf = x.float()
    n = (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)).to(x.dtype).float()
    half = x.size(-1) // 2
    n1, n2 = n[..., :half], n[..., half:]
    return torch.cat((n1 * cos - n2 * sin, n2 * cos + n1 * sin), dim=-1).to(x.dtype)


def reference_backward(dy, x, cos, sin, eps: float):
    """The kernels' backward in torch: the rotation's transpose, rounded as autograd rounds, then the norm's."""
    half = x.size(-1) // 2
    dy1, dy2 = dy[..., :half].float(), dy[..., half:].float()
    dn = torch.cat((dy1 * cos + dy2 * sin, dy2 * cos - dy1 * sin), dim=-1).to(x.dtype).float()
    xf = x.float()
    r = torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    xh = xf * r
    return (r * (dn - xh * (dn * xh).mean(-1, keepdim=True))).to(x.dtype)


# --- custom ops ---------------------------------------------------------------------------------
@torch.library.custom_op("mlx_ar::norm_rope", mutates_args=())
def norm_rope_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS norm over the last axis of x (B, T, H, D), then the rotary embedding of position t."""
    return reference(x, cos, sin, eps)


@norm_rope_op.register_kernel("cuda")
def _(x, cos, sin, eps):
    compile_ahead.wait_kernels(forward_only=True)   # a helper may be compiling it (compile_ahead.py)
    from . import norm_rope_triton

    return norm_rope_triton.forward(x.contiguous(), cos.contiguous(), sin.contiguous(), eps)


@norm_rope_op.register_fake
def _(x, cos, sin, eps):
    return torch.empty_like(x)


@torch.library.custom_op("mlx_ar::norm_rope_backward", mutates_args=())
def norm_rope_backward(dy: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       eps: float) -> torch.Tensor:
    """The gradient of norm_rope's input x from the gradient dy of its output."""
    return reference_backward(dy, x, cos, sin, eps)


@norm_rope_backward.register_kernel("cuda")
def _(dy, x, cos, sin, eps):
    compile_ahead.wait_kernels()   # a helper may be compiling it (compile_ahead.py)
    from . import norm_rope_triton

    return norm_rope_triton.backward(dy.contiguous(), x.contiguous(), cos.contiguous(), sin.contiguous(), eps)


@norm_rope_backward.register_fake
def _(dy, x, cos, sin, eps):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    x, cos, sin, eps = inputs
    ctx.save_for_backward(x, cos, sin)
    ctx.eps = eps


def _backward(ctx, grad):
    x, cos, sin = ctx.saved_tensors
    return torch.ops.mlx_ar.norm_rope_backward(grad, x, cos, sin, ctx.eps), None, None, None


norm_rope_op.register_autograd(_backward, setup_context=_setup_context)


def norm_rope(x, cos, sin, eps: float):
    """apply_rope(rms_norm(x), cos, sin) as train_torch.py computes it, for x (B, T, H, D)."""
    return torch.ops.mlx_ar.norm_rope(x, cos, sin, float(eps))
