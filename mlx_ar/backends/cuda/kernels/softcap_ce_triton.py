"""The Triton kernel behind softcap_ce.py: soft-capped cross-entropy and its logit gradient in one pass.

One program per row of logits z (V bf16 values): y = cap * tanh(z / cap), the row's
log-partition, the loss lse - y[target], and the gradient (softmax(y) - onehot) * (1 - tanh²),
written in z's dtype. Rows of up to BLOCK_MAX values are held in registers (one read, one
write); longer rows are walked twice in chunks, the second walk mostly from L2.

Arithmetic kept short, because at one read and one write per value the kernel is close to
being bound by instructions rather than memory: with r = 1 - tanh(z / cap) = 2 / (exp(2z / cap) + 1),
y - cap = -cap * r and 1 - tanh² = r (2 - r). Soft-capped logits never exceed cap, so for caps
up to SHIFT_CAP_MAX the exponentials are shifted by cap instead of by the row's maximum (no
overflow, and exp(-2 cap) stays far above float32's smallest normal), which saves a reduction.

    loss, dz = softcap_ce(z, targets, cap)      # z (M, V) unit-stride rows, targets (M,) int

Importing this module needs Triton. With TRITON_INTERPRET=1 set before Triton's first import,
the kernel runs on CPU tensors through Triton's interpreter (exact division instead of the
GPU's approximate one), which is how the CPU tests check it.
"""
import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

BLOCK_MAX = 8192                   # values a row program holds at once (16 a thread at 16 warps)
SHIFT_CAP_MAX = 40.0               # exp(-2 * 40) = 1.8e-35 > float32's smallest normal (1.2e-38)


@triton.jit
def _one_minus_tanh(z, two_over_cap, FAST: tl.constexpr):
    """1 - tanh(z / cap) = 2 / (exp(2z / cap) + 1): exact at both tails (exp -> inf gives 0, exp -> 0 gives 2)."""
    if FAST:
        return libdevice.fast_dividef(2.0, tl.exp(z * two_over_cap) + 1.0)   # div.approx: 2 ulp
    else:
        return 2.0 / (tl.exp(z * two_over_cap) + 1.0)


@triton.jit
def _softcap_ce_kernel(z_ptr, targets_ptr, loss_ptr, dz_ptr, V, z_stride, dz_stride, cap,
                       BLOCK: tl.constexpr, CHUNKS: tl.constexpr, SHIFT_BY_CAP: tl.constexpr,
                       FAST: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_stride
    dz_row = dz_ptr + row * dz_stride
    two_over_cap = 2.0 / cap
    target = tl.load(targets_ptr + row).to(tl.int32)
    r_target = _one_minus_tanh(tl.load(z_row + target).to(tl.float32), two_over_cap, FAST)
    y_target = cap - cap * r_target
    cols = tl.arange(0, BLOCK)
    if CHUNKS == 1:
        mask = cols < V
        r = _one_minus_tanh(tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32), two_over_cap, FAST)
        if SHIFT_BY_CAP:
            shift = cap
            e = tl.where(mask, tl.exp(-cap * r), 0.0)
        else:
            y = cap - cap * r
            shift = tl.max(tl.where(mask, y, float("-inf")), 0)
            e = tl.where(mask, tl.exp(y - shift), 0.0)
        s = tl.sum(e, 0)
        dz = (e * (1.0 / s) - (cols == target).to(tl.float32)) * (r * (2.0 - r))
        tl.store(dz_row + cols, dz.to(dz_ptr.dtype.element_ty), mask=mask)
        lse = shift + tl.log(s)
    else:
        if SHIFT_BY_CAP:
            s_lane = tl.zeros((BLOCK,), tl.float32)
            for c in range(CHUNKS):
                idx = c * BLOCK + cols
                mask = idx < V
                r = _one_minus_tanh(tl.load(z_row + idx, mask=mask, other=0.0).to(tl.float32), two_over_cap, FAST)
                s_lane += tl.where(mask, tl.exp(-cap * r), 0.0)
            lse = cap + tl.log(tl.sum(s_lane, 0))
        else:
            # Per-lane running max and sum; every lane holds a real value after the first chunk (V > BLOCK).
            m_lane = tl.full((BLOCK,), float("-inf"), tl.float32)
            s_lane = tl.zeros((BLOCK,), tl.float32)
            for c in range(CHUNKS):
                idx = c * BLOCK + cols
                mask = idx < V
                r = _one_minus_tanh(tl.load(z_row + idx, mask=mask, other=0.0).to(tl.float32), two_over_cap, FAST)
                y = tl.where(mask, cap - cap * r, float("-inf"))
                m_new = tl.maximum(m_lane, y)
                s_lane = s_lane * tl.exp(m_lane - m_new) + tl.exp(y - m_new)
                m_lane = m_new
            m = tl.max(m_lane, 0)
            lse = m + tl.log(tl.sum(s_lane * tl.exp(m_lane - m), 0))
        for c in range(CHUNKS):
            idx = c * BLOCK + cols
            mask = idx < V
            r = _one_minus_tanh(tl.load(z_row + idx, mask=mask, other=0.0).to(tl.float32), two_over_cap, FAST)
            dz = (tl.exp(cap - cap * r - lse) - (idx == target).to(tl.float32)) * (r * (2.0 - r))
            tl.store(dz_row + idx, dz.to(dz_ptr.dtype.element_ty), mask=mask)
    tl.store(loss_ptr + row, lse - y_target)


def softcap_ce(z: torch.Tensor, targets: torch.Tensor, cap: float, block_max: int = BLOCK_MAX,
               num_warps: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss (M,) float32, dz (M, V) in z's dtype) for logits z (M, V) with unit-stride rows."""
    M, V = z.shape
    if z.stride(1) != 1:
        raise ValueError("softcap_ce needs logits whose last axis is contiguous")
    if not cap > 0:
        raise ValueError(f"the soft cap must be positive, got {cap}")
    loss = torch.empty(M, dtype=torch.float32, device=z.device)
    dz = torch.empty((M, V), dtype=z.dtype, device=z.device)
    block = min(triton.next_power_of_2(V), block_max)
    if M:
        _softcap_ce_kernel[(M,)](z, targets, loss, dz, V, z.stride(0), dz.stride(0), float(cap),
                                 BLOCK=block, CHUNKS=triton.cdiv(V, block), SHIFT_BY_CAP=cap <= SHIFT_CAP_MAX,
                                 FAST=z.is_cuda, num_warps=num_warps)
    return loss, dz
