"""The loss head's soft-capped cross-entropy with its gradient taken in the same pass (a Triton kernel).

train_torch.py's head computes z = h @ W^T, y = cap * tanh(z / cap) and the cross-entropy of y
in float32. Left to torch.compile, the (tokens x vocab) logits are read by a forward kernel and
read again, and the gradient written, by a backward kernel; on an H100 at the karpathy config
that was 4.0 + 3.1 ms per micro-batch. Here one kernel reads the logits once, while the
forward runs, and writes both the per-token losses and the gradient of each token's loss with
respect to its logits. What it returns is the mean loss, whose upstream gradient is one scalar:
the backward applies it to the small results of its two matmuls, never to the gradient itself.

    reason = unavailable_reason(device)     # None when the kernel can run
    loss = cross_entropy(h, w, targets, cap)  # h (..., d) bf16, w (V, d), targets (...) int -> float32 mean

The kernel is the torch custom op `mlx_ar::softcap_ce` (Triton on a GPU, the same math in torch
elsewhere), called with its matmul by `mlx_ar::linear_softcap_ce`, whose backward is registered
with the op; torch.compile and CUDA graphs keep both whole. kernels/__init__.py binds
`softcap_cross_entropy` to `cross_entropy` where Triton runs; the model uses it for the mean
training loss only (evaluation needs per-token losses and no gradient, and keeps the plain head).
"""
import importlib.util

import torch

from .packages import cuda_capability, missing_reason, package_version

MIN_CAPABILITY = 8                 # bf16 loads and stores in Triton: Ampere and newer
PACKAGE = "triton"


def unavailable_reason(device, capability=None, find_spec=importlib.util.find_spec) -> str | None:
    """Why the Triton kernel cannot run on `device`; None when it can.

    capability: the GPU's (major, minor), asked of torch when not given.
    """
    why = cuda_capability(device, capability, minimum=MIN_CAPABILITY)[1]
    return why or missing_reason(PACKAGE, ("triton",), "it comes with torch's CUDA wheels", find_spec)


def version() -> str:
    return package_version(PACKAGE)


# --- custom op --------------------------------------------------------------------------------
def reference(z: torch.Tensor, targets: torch.Tensor, cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's math in torch: (loss (M,) float32, dz (M, V) in z's dtype) for a unit upstream gradient."""
    t = torch.tanh(z.float() / cap)
    y = cap * t
    lse = torch.logsumexp(y, dim=-1)
    loss = lse - y.gather(-1, targets[:, None].long()).squeeze(-1)
    onehot = torch.zeros_like(y).scatter_(-1, targets[:, None].long(), 1.0)
    dz = (torch.exp(y - lse[:, None]) - onehot) * (1 - t * t)
    return loss, dz.to(z.dtype)


@torch.library.custom_op("mlx_ar::softcap_ce", mutates_args=())
def softcap_ce(z: torch.Tensor, targets: torch.Tensor, cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits z (M, V), targets (M,) -> (loss (M,) float32, dloss/dz (M, V) in z's dtype)."""
    return reference(z, targets, cap)


@softcap_ce.register_kernel("cuda")
def _(z, targets, cap):
    from .softcap_ce_triton import softcap_ce as triton_softcap_ce

    return triton_softcap_ce(z.contiguous(), targets.contiguous(), cap)


@softcap_ce.register_fake
def _(z, targets, cap):
    return z.new_empty(z.size(0), dtype=torch.float32), torch.empty_like(z)


@torch.library.custom_op("mlx_ar::linear_softcap_ce", mutates_args=())
def linear_softcap_ce(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor,
                      cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """h (M, d), w (V, d), targets (M,) -> (mean loss (float32 scalar), dloss_token/dz (M, V)).

    The logits z = h @ w.T live only inside the op; the gradient (not scaled by 1/M) is kept
    for the backward.
    """
    loss, dz = torch.ops.mlx_ar.softcap_ce(h @ w.T, targets, cap)
    return loss.mean(), dz


@linear_softcap_ce.register_fake
def _(h, w, targets, cap):
    return h.new_empty((), dtype=torch.float32), h.new_empty((h.size(0), w.size(0)))


def _setup_context(ctx, inputs, output):
    h, w, _, _ = inputs
    ctx.save_for_backward(h, w, output[1])


def _backward(ctx, grad, grad_dz):
    h, w, dz = ctx.saved_tensors
    # The mean's gradient is the same for every token: scale the matmuls' results, not dz.
    scale = grad.float() / dz.size(0)
    dh = ((dz @ w).float() * scale).to(h.dtype)
    dw = ((dz.T @ h).float() * scale).to(w.dtype)
    return dh, dw, None, None


# A registered backward (not a torch.autograd.Function) lets torch.compile's AOTAutograd cache
# keep the compiled model: a Function in the graph makes every run trace it again (7-8 s at depth 8).
linear_softcap_ce.register_autograd(_backward, setup_context=_setup_context)


def cross_entropy(h, w, targets, cap: float):
    """Mean cross-entropy (float32 scalar) over all tokens of the soft-capped logits h @ w.T."""
    return torch.ops.mlx_ar.linear_softcap_ce(h.reshape(-1, h.size(-1)), w, targets.reshape(-1), float(cap))[0]
