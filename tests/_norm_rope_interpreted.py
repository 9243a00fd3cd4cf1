"""Checks norm_rope_triton's kernels against norm_rope's reference; run with TRITON_INTERPRET=1 set.

test_cuda_norm_rope.py runs this in a fresh process (Triton must see the variable before its
first import). Prints one "ok ..." line per case and exits non-zero on the first mismatch.
Triton's interpreter rounds float32 to bf16 by truncation where a GPU rounds to nearest, so
values are compared within a few bf16 steps rather than exactly (the GPU test is tighter).
"""
import os
import sys

import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    sys.exit("set TRITON_INTERPRET=1: this checks the kernels in Triton's interpreter")

from mlx_ar.backends import norm_rope, norm_rope_triton  # noqa: E402

EPS = 1e-6


def tables(T, D, base=10000.0):
    inv = base ** (-torch.arange(0, D // 2, dtype=torch.float64) / (D // 2))
    angles = torch.arange(T, dtype=torch.float64)[:, None] * inv[None, :]
    return angles.cos().float()[:, None, :], angles.sin().float()[:, None, :]


def check(name, shape, rows, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * scale).to(torch.bfloat16)
    dy = torch.randn(shape, generator=g).to(torch.bfloat16)
    cos, sin = tables(shape[1], shape[3])
    y = norm_rope_triton.forward(x, cos, sin, EPS, rows=rows)
    dx = norm_rope_triton.backward(dy, x, cos, sin, EPS, rows=rows)
    want_y, want_dx = norm_rope.reference(x, cos, sin, EPS), norm_rope.reference_backward(dy, x, cos, sin, EPS)
    for got, want, what in ((y, want_y, "forward"), (dx, want_dx, "backward")):
        assert got.dtype == torch.bfloat16 and got.shape == want.shape, (name, what)
        torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -6, atol=0.02 * want.float().abs().max().item(),
                                   msg=f"{name}: {what}")
        assert (got.float() - want.float()).norm() < 0.01 * want.float().norm(), (name, what)
    print("ok", name, flush=True)


check("rows a multiple of the block (2x6x2x16, 8 rows)", (2, 6, 2, 16), rows=8)
check("last block partly masked (3x5x3x32, 8 rows: 45 rows)", (3, 5, 3, 32), rows=8)
check("one head, positions wrap per batch (2x7x1x8, 4 rows)", (2, 7, 1, 8), rows=4, seed=1)
check("large values (1x4x2x16)", (1, 4, 2, 16), rows=4, scale=1e4, seed=2)
x = torch.zeros(1, 4, 2, 16, dtype=torch.bfloat16)
cos, sin = tables(4, 16)
for args, message in (((x.transpose(1, 2), cos, sin), "contiguous (B, T, H, D)"),
                      ((torch.zeros(1, 4, 2, 12, dtype=torch.bfloat16), *tables(4, 12)), "power-of-two head dimension"),
                      ((x, cos.double(), sin), "cos must be a contiguous float32 tensor of shape (4, 1, 8)"),
                      ((x, cos, sin[:3]), "sin must be a contiguous float32 tensor of shape (4, 1, 8)")):
    try:
        norm_rope_triton.forward(*args, EPS)
    except ValueError as e:
        assert message in str(e), e
        print("ok refused:", message, flush=True)
    else:
        sys.exit(f"accepted what should fail with {message!r}")
y = norm_rope_triton.forward(x, cos, sin, EPS)
assert (y == 0).all()                                          # an all-zero row stays zero (eps, no NaN)
print("ok zero rows", flush=True)
