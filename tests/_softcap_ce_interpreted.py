"""Checks softcap_ce_triton's kernel against softcap_ce.reference; run with TRITON_INTERPRET=1 set.

test_cuda_kernels_softcap_ce.py runs this in a fresh process (Triton must see the variable before its
first import). Prints one "ok ..." line per case and exits non-zero on the first mismatch.
"""
import os
import sys

import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    sys.exit("set TRITON_INTERPRET=1: this checks the kernel in Triton's interpreter")

from mlx_ar.backends.cuda.kernels import softcap_ce, softcap_ce_triton  # noqa: E402

CAP = 15.0


def logits(M, V, seed, scale):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(M, V, generator=g) * scale).to(torch.bfloat16)
    targets = torch.randint(0, V, (M,), generator=g)
    targets[0], targets[-1] = 0, V - 1                 # both ends of the row
    return z, targets


def check(name, z, targets, cap=CAP, **kw):
    loss, dz = softcap_ce_triton.softcap_ce(z, targets, cap, **kw)
    want_loss, want_dz = softcap_ce.reference(z.contiguous(), targets, cap)
    assert loss.dtype == torch.float32 and dz.dtype == z.dtype and dz.shape == z.shape, name
    torch.testing.assert_close(loss, want_loss, atol=1e-4, rtol=1e-5, msg=name)
    torch.testing.assert_close(dz.float(), want_dz.float(), atol=8e-3, rtol=1e-2, msg=name)   # bf16 ulps
    assert torch.isfinite(dz.float()).all(), name
    print("ok", name, flush=True)


for M, V, block_max, what in ((5, 100, 8192, "one block, V not a power of two"),
                              (4, 256, 256, "one block, exactly full"),
                              (6, 300, 128, "three chunks, the last partly masked"),
                              (3, 256, 64, "four full chunks")):
    z, targets = logits(M, V, seed=V, scale=40.0)      # beyond the cap: tanh saturates
    check(f"{what} ({M}x{V}, block {block_max})", z, targets, block_max=block_max)

# Above SHIFT_CAP_MAX the exponentials are shifted by the row's maximum instead of by the cap.
big = 4 * softcap_ce_triton.SHIFT_CAP_MAX
for M, V, block_max, what in ((5, 100, 8192, "one block"), (6, 300, 128, "three chunks")):
    z, targets = logits(M, V, seed=V + 1, scale=3 * big)
    check(f"{what}, cap {big:g}: shifted by the maximum", z, targets, cap=big, block_max=block_max)

z, targets = logits(4, 120, seed=5, scale=8.0)
wide = torch.zeros(4, 200, dtype=z.dtype)
wide[:, :120] = z
check("rows read by their stride", wide[:, :120], targets)
for args, message in (((z.T.contiguous().T, targets, CAP), "last axis is contiguous"),
                      ((z, targets, 0.0), "soft cap must be positive")):
    try:
        softcap_ce_triton.softcap_ce(*args)
    except ValueError as e:
        assert message in str(e), e
        print("ok refused:", message, flush=True)
    else:
        sys.exit(f"accepted what should fail with {message!r}")
