"""relu²'s backward as a quack GEMM epilogue, computed from the activation the forward kept.

The backward GEMM dout @ W_proj multiplies each element by relu²'s derivative as it stores:
d/dpre relu(pre)² = 2 relu(pre) = 2 sqrt(relu(pre)²), so the forward's activation is all the
backward needs and the pre-activation is never written. Importing this module imports quack
(CUDA machines with quack-kernels only); quack_mlp.py loads it inside its backward op.

    dpre = drelu2(dout, w_proj, act, tuned=False, config=None)   # (M, d) @ (d, h), act (M, h) -> (M, h)
"""
import cutlass.cute as cute
import torch
from quack.epilogue.frontend import gemm_epilogue
from quack.epilogue.math import F2


def _sqrt(v):
    """sqrt of an accumulator element, or of a packed pair (the form Blackwell epilogues take)."""
    if isinstance(v, tuple):
        return F2(_sqrt(v[0]), _sqrt(v[1]))
    return cute.math.sqrt(v, fastmath=True)


@gemm_epilogue()
def drelu2_epilogue(acc, c):
    """acc: an element of dout @ W_proj; c: the same element of relu(pre)², kept by the forward."""
    return {"D": acc * _sqrt(c) * 2.0}


def drelu2(dout: torch.Tensor, w_proj: torch.Tensor, act: torch.Tensor, tuned: bool = False,
           config=None) -> torch.Tensor:
    """(dout @ w_proj) * 2 sqrt(act), in act's dtype: the gradient at relu²'s input.

    config: a quack GemmConfig pinning the tiles (None: quack's default, or its autotuner when tuned).
    """
    dpre = torch.empty_like(act)
    drelu2_epilogue(dout, w_proj, act, out={"D": dpre}, config=config, tuned=tuned, dynamic_scheduler=True)
    return dpre
