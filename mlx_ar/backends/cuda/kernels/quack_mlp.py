"""The relu² MLP with its activation inside the matmuls, and the residual add inside the output
projections' matmuls (the `quack-kernels` GEMMs): optional kernels.

train_torch.py's MLP computes residual + relu(x @ W_fc^T)² @ W_proj^T. Left to torch.compile, the
activation is a separate pass over the (tokens x hidden) tensor in the forward and another in
the backward, each reading and writing a gigabyte per layer and micro-batch at the karpathy
config. quack's CuTe DSL GEMMs apply it in their epilogue instead: the forward GEMM writes only
the activation (kept for the backward), and the backward GEMM dout @ W_proj multiplies by
relu²'s derivative as it stores, which it takes from that activation (quack_drelu2.py: the
derivative 2 relu(pre) is 2 sqrt(relu(pre)²)). Only the kernels differ; the math is the model's.

Both sublayers end in residual + y @ W^T (train_torch.py's Linear with a residual). cuBLAS would
write the product and torch.compile's next kernel read it back to add it; quack's GEMM reads the
residual in its epilogue and writes the sum once (`residual_linear`, and the MLP's second GEMM).
cuBLAS's own addmm (the residual as its input) took twice its plain matmul's time: no saving.

    reason = unavailable_reason(device, (d_model, hidden))   # None when the kernels can run
    y = mlp(x, w_fc, w_proj)                                   # x (..., d_model) bf16
    y = mlp(x, w_fc, w_proj, residual)                         # residual + the MLP, added in the last GEMM
    y = mlp(x, w_fc, w_proj, tiles=pinned_tiles(capability))   # HOPPER_TILES on Hopper, else quack's default
    y = residual_linear(x, w, residual, tiles)                 # residual + x @ w.T

On a Hopper or Blackwell GPU with `quack-kernels` installed (it comes with the `fa4` extra),
kernels/__init__.py binds `relu2_mlp` and `residual_linear` to these, with the pinned tiles on Hopper.
The GEMMs are wrapped as torch custom ops (`mlx_ar::relu2_mlp_fwd`, `mlx_ar::relu2_mlp_bwd`,
`mlx_ar::residual_linear`) so torch.compile keeps them whole; the other GEMMs (the MLP's second
forward matmul when it has no residual, the weight gradients, dx) stay with cuBLAS. Kernels
compile on first use and are cached on disk by quack.
"""
import importlib.util
from typing import Optional

import torch

from .packages import cuda_capability, missing_reason, package_version

CAPABILITIES = (9, 10)             # quack's sm90 and sm100 GEMMs; other GPUs keep torch's kernels
PACKAGE = "quack-kernels"
ACTIVATION = "relu_sq"             # quack's name for relu(x) * x
ALIGN = 8                          # bf16 elements per 16 bytes: the TMA loads need aligned rows
# Tiles for all of quack's GEMMs on compute capability 9 (Hopper), as (tile_m, tile_n, pingpong,
# cluster_m, cluster_n). On an H100 at the karpathy config (M 262144, d 512, hidden 2048) they ran
# the MLP's forward in 0.77 ms against 0.84-0.86 ms and its backward in 1.15 against 1.16-1.25 ms
# with quack's default (128x192 pingpong, 2x1 clusters), and the residual-adding GEMMs in 0.37 and
# 0.85 ms (K 512 and 2048) against 0.40 and 1.13 ms; 128-wide N tiles also divide any hidden size
# that is a multiple of 128, where 192 leaves a partial tile.
HOPPER_TILES = (192, 128, 1, 1, 2)


def unavailable_reason(device, dims, capability=None, find_spec=importlib.util.find_spec) -> str | None:
    """Why the fused MLP cannot run on `device` for matrices of sizes `dims`; None when it can.

    capability: the GPU's (major, minor), asked of torch when not given.
    """
    found, why = cuda_capability(device, capability)
    if why:
        return why
    major, minor = found
    if major not in CAPABILITIES:
        return f"quack's GEMMs do not run on compute capability {major}.{minor}"
    odd = [d for d in dims if d % ALIGN]
    if odd:
        return f"sizes {odd} are not multiples of {ALIGN}"
    return missing_reason(PACKAGE, ("quack",), "it comes with flash-attn-4: the fa4 extra", find_spec)


def version() -> str:
    return package_version(PACKAGE)


def pinned_tiles(capability) -> tuple:
    """The tiles to pin on a GPU of compute capability (major, minor), in HOPPER_TILES' form; ()
    leaves them to quack's default."""
    return () if capability[0] != 9 else HOPPER_TILES


def tiles_label(tiles) -> str:
    """How the fused GEMMs' tiles were chosen, for the run record's kernel line."""
    if not tiles:
        return "default tiles"
    m, n, pingpong, cm, cn = tiles
    return f"{m}x{n} {'pingpong ' if pingpong else ''}tiles in {cm}x{cn} clusters"


def _config(tiles, device):
    """quack's GemmConfig pinning `tiles` on `device`; None (quack chooses) for ()."""
    if not tiles:
        return None
    from quack.gemm_config import GemmConfig

    m, n, pingpong, cm, cn = tiles
    return GemmConfig(tile_m=m, tile_n=n, pingpong=bool(pingpong), cluster_m=cm, cluster_n=cn,
                      device_capacity=torch.cuda.get_device_capability(device)[0], is_dynamic_persistent=False)


# --- custom ops -------------------------------------------------------------------------------
@torch.library.custom_op("mlx_ar::relu2_mlp_fwd", mutates_args=())
def relu2_mlp_fwd(x: torch.Tensor, w_fc: torch.Tensor, w_proj: torch.Tensor, residual: Optional[torch.Tensor],
                  tiles: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, d), w_fc (h, d), w_proj (d, h) -> (out (M, d), activation relu(x @ w_fc.T)² (M, h)).

    out is [residual +] activation @ w_proj.T; the residual (M, d), when given, is added by the
    matmul's epilogue.

    tiles: pinned tiles in HOPPER_TILES' form, or [] for quack's default.
    """
    from quack.gemm_interface import gemm_act

    config = _config(tiles, x.device)
    act = gemm_act(x, w_fc.T, activation=ACTIVATION, store_preact=False, tuned=False, config=config)[1]
    out = act @ w_proj.T if residual is None else _gemm_add(act, w_proj, residual, config)
    return out, act


@relu2_mlp_fwd.register_fake
def _(x, w_fc, w_proj, residual, tiles):
    return x.new_empty((x.size(0), w_proj.size(0))), x.new_empty((x.size(0), w_fc.size(0)))


@torch.library.custom_op("mlx_ar::relu2_mlp_bwd", mutates_args=())
def relu2_mlp_bwd(dout: torch.Tensor, x: torch.Tensor, w_fc: torch.Tensor, w_proj: torch.Tensor,
                  act: torch.Tensor, tiles: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dx, dw_fc, dw_proj) from dout (M, d) and the forward's activation."""
    from .quack_drelu2 import drelu2

    dpre = drelu2(dout, w_proj, act, config=_config(tiles, act.device))
    return dpre @ w_fc, dpre.T @ x, dout.T @ act


@relu2_mlp_bwd.register_fake
def _(dout, x, w_fc, w_proj, act, tiles):
    return torch.empty_like(x), torch.empty_like(w_fc), torch.empty_like(w_proj)


def _setup_context(ctx, inputs, output):
    x, w_fc, w_proj, residual, ctx.tiles = inputs
    ctx.has_residual = residual is not None
    ctx.save_for_backward(x, w_fc, w_proj, output[1])


def _backward(ctx, dout, dact):
    x, w_fc, w_proj, act = ctx.saved_tensors
    dout = dout.contiguous()
    grads = torch.ops.mlx_ar.relu2_mlp_bwd(dout, x, w_fc, w_proj, act, ctx.tiles)
    return *grads, dout if ctx.has_residual else None, None


relu2_mlp_fwd.register_autograd(_backward, setup_context=_setup_context)


def _gemm_add(x, w, residual, config):
    """residual + x @ w.T by quack's GEMM on `config` (_config), the residual read in its epilogue
    (cuBLAS's addmm took 0.51 ms against 0.24 ms for its plain matmul at K 512 on an H100)."""
    from quack.gemm_interface import gemm_tuned

    out = torch.empty_like(residual)
    gemm_tuned.fn(x, w.T, out, residual, config=config)
    return out


@torch.library.custom_op("mlx_ar::residual_linear", mutates_args=())
def residual_linear_op(x: torch.Tensor, w: torch.Tensor, residual: torch.Tensor, tiles: list[int]) -> torch.Tensor:
    """x (M, k), w (n, k), residual (M, n) -> residual + x @ w.T (M, n)."""
    return _gemm_add(x, w, residual, _config(tiles, x.device))


@residual_linear_op.register_fake
def _(x, w, residual, tiles):
    return torch.empty_like(residual)


def _setup_residual(ctx, inputs, output):
    x, w, _residual, _tiles = inputs
    ctx.save_for_backward(x, w)


def _backward_residual(ctx, grad):
    x, w = ctx.saved_tensors
    return grad @ w, grad.T @ x, grad, None


residual_linear_op.register_autograd(_backward_residual, setup_context=_setup_residual)


def _rows(t):
    """t (..., n) as a contiguous (rows, n) matrix, the layout the ops take."""
    return t.reshape(-1, t.size(-1)).contiguous()


def residual_linear(x, w, residual, tiles=()):
    """residual + x @ w.T over the last axis of x (any leading shape); residual has x's leading
    shape and w's rows. tiles: as for mlp."""
    return torch.ops.mlx_ar.residual_linear(_rows(x), w, _rows(residual), list(tiles)).view(residual.shape)


def mlp(x, w_fc, w_proj, residual=None, tiles=()):
    """[residual +] relu(x @ w_fc.T)² @ w_proj.T over the last axis of x (any leading shape), in
    x's dtype; residual has x's leading shape and w_proj's rows.

    tiles: pinned GEMM tiles in HOPPER_TILES' form (see pinned_tiles), () for quack's default.
    """
    residual = None if residual is None else _rows(residual)
    out = torch.ops.mlx_ar.relu2_mlp_fwd(_rows(x), w_fc, w_proj, residual, list(tiles))[0]
    return out.view(*x.shape[:-1], out.size(-1))
