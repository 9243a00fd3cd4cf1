"""The Triton kernels behind norm_rope.py: RMS norm then rotary embedding of q or k, and the gradient.

Each program takes ROWS rows of one (B, T, H, D) tensor (one row = one head of one token, D
values) and holds both halves of every row in registers: one read and one write per value
forward, two reads and one write backward, where the norm's statistics are recomputed from x
rather than stored. The arithmetic follows train_torch.py's `apply_rope(rms_norm(x), cos, sin)`
as torch runs it: norm in float32, rounded to x's dtype, rotated in float32, rounded again; the
backward rounds the gradient between the rotation and the norm as autograd does.

    y = forward(x, cos, sin, eps)           # x (B, T, H, D) contiguous; cos, sin (T, 1, D / 2) float32
    dx = backward(dy, x, cos, sin, eps)

Importing this module needs Triton. With TRITON_INTERPRET=1 set before Triton's first import,
the kernels run on CPU tensors through Triton's interpreter, which is how the CPU tests check them.
"""
import torch
import triton
import triton.language as tl

ROWS = 32                          # rows (heads of tokens) a program takes; 8 to 32 ran equally fast at D = 128 (H100)
NUM_WARPS = 4


@triton.jit
def _block(n_rows, HALF: tl.constexpr, ROWS: tl.constexpr):
    """This program's rows (clamped to row 0 past the end, where `mask` is off), columns of a half,
    the mask and the offsets of the first halves."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, HALF)
    in_range = rows < n_rows
    rows = tl.where(in_range, rows, 0)
    return rows, cols, in_range[:, None], rows[:, None] * (2 * HALF) + cols[None, :]


@triton.jit
def _halves(ptr, offs, mask, HALF: tl.constexpr):
    return (tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32),
            tl.load(ptr + offs + HALF, mask=mask, other=0.0).to(tl.float32))


@triton.jit
def _tables(cos_ptr, sin_ptr, rows, H, T, cols, HALF: tl.constexpr):
    # x is (B, T, H, D) contiguous: row = (b * T + t) * H + h
    pos = ((rows // H) % T)[:, None] * HALF + cols[None, :]
    return tl.load(cos_ptr + pos), tl.load(sin_ptr + pos)


@triton.jit
def _norm_rope_fwd(x_ptr, cos_ptr, sin_ptr, y_ptr, n_rows, H, T, eps,
                   HALF: tl.constexpr, ROWS: tl.constexpr):
    rows, cols, mask, offs = _block(n_rows, HALF, ROWS)
    x1, x2 = _halves(x_ptr, offs, mask, HALF)
    r = tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF) + eps)[:, None]
    dtype = y_ptr.dtype.element_ty
    n1 = (x1 * r).to(dtype).to(tl.float32)
    n2 = (x2 * r).to(dtype).to(tl.float32)
    c, s = _tables(cos_ptr, sin_ptr, rows, H, T, cols, HALF)
    tl.store(y_ptr + offs, (n1 * c - n2 * s).to(dtype), mask=mask)
    tl.store(y_ptr + offs + HALF, (n2 * c + n1 * s).to(dtype), mask=mask)


@triton.jit
def _norm_rope_bwd(dy_ptr, x_ptr, cos_ptr, sin_ptr, dx_ptr, n_rows, H, T, eps,
                   HALF: tl.constexpr, ROWS: tl.constexpr):
    rows, cols, mask, offs = _block(n_rows, HALF, ROWS)
    dy1, dy2 = _halves(dy_ptr, offs, mask, HALF)
    x1, x2 = _halves(x_ptr, offs, mask, HALF)
    c, s = _tables(cos_ptr, sin_ptr, rows, H, T, cols, HALF)
    dtype = dx_ptr.dtype.element_ty
    # the rotation's transpose, then the rounding autograd applies at the norm's output
    dn1 = (dy1 * c + dy2 * s).to(dtype).to(tl.float32)
    dn2 = (dy2 * c - dy1 * s).to(dtype).to(tl.float32)
    r = tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF) + eps)[:, None]
    xh1, xh2 = x1 * r, x2 * r
    proj = ((tl.sum(dn1 * xh1, 1) + tl.sum(dn2 * xh2, 1)) / (2 * HALF))[:, None]
    tl.store(dx_ptr + offs, (r * (dn1 - xh1 * proj)).to(dtype), mask=mask)
    tl.store(dx_ptr + offs + HALF, (r * (dn2 - xh2 * proj)).to(dtype), mask=mask)


def _launch(kernel, tensors, out, x, eps, rows, num_warps):
    B, T, H, D = x.shape
    n_rows = B * T * H
    if n_rows:
        kernel[(triton.cdiv(n_rows, rows),)](*tensors, out, n_rows, H, T, float(eps),
                                             HALF=D // 2, ROWS=rows, num_warps=num_warps)
    return out


def _check(x, cos, sin):
    if x.dim() != 4 or not x.is_contiguous():
        raise ValueError(f"norm_rope needs a contiguous (B, T, H, D) tensor, got shape {tuple(x.shape)}"
                         f"{'' if x.is_contiguous() else ' (not contiguous)'}")
    D = x.size(-1)
    if D < 2 or D & (D - 1):
        raise ValueError(f"norm_rope's kernel needs a power-of-two head dimension, got {D}")
    want = (x.size(1), 1, D // 2)
    for name, t in (("cos", cos), ("sin", sin)):
        if tuple(t.shape) != want or t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous float32 tensor of shape {want}, "
                             f"got {tuple(t.shape)} {t.dtype}")


def forward(x, cos, sin, eps: float, rows: int = ROWS, num_warps: int = NUM_WARPS):
    """apply_rope(rms_norm(x), cos, sin) for x (B, T, H, D) contiguous, in x's dtype."""
    _check(x, cos, sin)
    return _launch(_norm_rope_fwd, (x, cos, sin), torch.empty_like(x), x, eps, rows, num_warps)


def backward(dy, x, cos, sin, eps: float, rows: int = ROWS, num_warps: int = NUM_WARPS):
    """The gradient of forward's output dy -> the gradient of x, in x's dtype."""
    _check(x, cos, sin)
    if dy.shape != x.shape or not dy.is_contiguous():
        raise ValueError(f"the gradient must be contiguous and shaped like x {tuple(x.shape)}, got {tuple(dy.shape)}")
    return _launch(_norm_rope_bwd, (dy, x, cos, sin), torch.empty_like(x), x, eps, rows, num_warps)
