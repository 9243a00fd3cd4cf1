"""The fused relu² MLP and residual-add glue (mlx_ar/backends/cuda/kernels/quack_mlp.py).

quack's GEMMs need a Hopper or Blackwell GPU, so on the CPU the three custom ops get reference
kernels (the same math in float32, registered for the CPU device in a fixture): what is tested
there is the glue — the autograd wiring, the fake (shape) functions under torch.compile,
leading batch axes, and the model running every MLP and output projection through the ops. The
gpu-marked tests compare the real kernels with a float32 reference where they run.
"""
import pytest
import torch

from _train_utils import ROOT, TINY, assert_kernel_matches_fallback
from mlx_ar.backends.cuda.backend import load_torch_file
from mlx_ar.backends.cuda.kernels import fallback, quack_mlp

T = 32


SEEN_TILES = []                    # the tiles the reference kernels were called with


def reference_fwd(x, w_fc, w_proj, residual, tiles):
    """(out, activation relu(pre)²) in x's dtype, computed in float32."""
    SEEN_TILES.append(tuple(tiles))
    act = torch.relu(x.float() @ w_fc.float().T).square()
    out = act @ w_proj.float().T
    if residual is not None:
        out = out + residual.float()
    return out.to(x.dtype), act.to(x.dtype)


def reference_bwd(dout, x, w_fc, w_proj, act, tiles):
    """(dx, dw_fc, dw_proj) by the chain rule in float32, relu²'s derivative taken from its output
    (2 sqrt(act)) as the fused backward GEMM takes it."""
    SEEN_TILES.append(tuple(tiles))
    dtype = x.dtype
    dout, x, w_fc, w_proj, act = (t.float() for t in (dout, x, w_fc, w_proj, act))
    dpre = (dout @ w_proj) * 2 * act.sqrt()
    return tuple(g.to(dtype) for g in (dpre @ w_fc, dpre.T @ x, dout.T @ act))


def reference_residual(x, w, residual, tiles):
    """residual + x @ w.T in x's dtype, computed in float32."""
    SEEN_TILES.append(tuple(tiles))
    return (residual.float() + x.float() @ w.float().T).to(x.dtype)


@pytest.fixture(scope="module")
def cpu_kernels():
    """Reference kernels for the three ops on the CPU (the real ones are quack's, CUDA only)."""
    torch.library.register_kernel("mlx_ar::relu2_mlp_fwd", "cpu", reference_fwd)
    torch.library.register_kernel("mlx_ar::relu2_mlp_bwd", "cpu", reference_bwd)
    torch.library.register_kernel("mlx_ar::residual_linear", "cpu", reference_residual)


def plain_mlp(x, w_fc, w_proj, residual=None):
    """train_torch.py's MLP forward without a kernel."""
    out = torch.relu(x @ w_fc.T).square() @ w_proj.T
    return out if residual is None else residual + out


def _operands(seed=0, lead=(2, 5), d=16, h=64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, d, generator=g)
    w_fc, w_proj = torch.randn(h, d, generator=g) / d ** 0.5, torch.randn(d, h, generator=g) / h ** 0.5
    dy = torch.randn(*lead, d, generator=g)
    return x, w_fc, w_proj, dy


# --- where it runs -------------------------------------------------------------------------------
def test_unavailable_reason_names_what_is_missing():
    found = lambda name: object()                          # noqa: E731
    assert "not a CUDA device" in quack_mlp.unavailable_reason("cpu", (512, 2048))
    assert "compute capability 8.0" in quack_mlp.unavailable_reason("cuda", (512, 2048), capability=(8, 0),
                                                                    find_spec=found)
    assert "compute capability 12.0" in quack_mlp.unavailable_reason("cuda", (512, 2048), capability=(12, 0),
                                                                     find_spec=found)
    assert "sizes [100] are not multiples of 8" in quack_mlp.unavailable_reason(
        "cuda", (512, 100), capability=(9, 0), find_spec=found)
    missing = quack_mlp.unavailable_reason("cuda", (512, 2048), capability=(9, 0), find_spec=lambda name: None)
    assert "quack-kernels is not installed" in missing and "fa4 extra" in missing
    assert quack_mlp.unavailable_reason("cuda", (512, 2048), capability=(9, 0), find_spec=found) is None
    assert quack_mlp.unavailable_reason("cuda", (768, 3072), capability=(10, 0), find_spec=found) is None


def test_a_package_lookup_that_fails_is_named():
    def broken(name):
        raise ImportError("a parent package fails to import")
    why = quack_mlp.unavailable_reason("cuda", (512, 2048), capability=(9, 0), find_spec=broken)
    assert why == "quack-kernels cannot be found: a parent package fails to import"


# --- the ops' glue, with reference kernels on the CPU ---------------------------------------------
@pytest.mark.parametrize("with_residual", [False, True])
def test_ops_match_the_plain_mlp_forward_and_gradients(cpu_kernels, with_residual):
    x, w_fc, w_proj, dy = _operands()
    operands = (x, w_fc, w_proj) + ((torch.randn_like(dy),) if with_residual else ())
    leaves = [t.clone().requires_grad_() for t in operands]
    y = quack_mlp.mlp(*leaves)
    assert y.shape == x.shape
    y.backward(dy)
    ref_leaves = [t.clone().requires_grad_() for t in operands]
    ref = plain_mlp(*ref_leaves)
    ref.backward(dy)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tiles", [(), quack_mlp.HOPPER_TILES])
def test_the_tiles_reach_both_ops(cpu_kernels, tiles):
    x, w_fc, w_proj, dy = _operands(2)
    SEEN_TILES.clear()
    quack_mlp.mlp(x.requires_grad_(), w_fc, w_proj, tiles=tiles).backward(dy)
    assert SEEN_TILES == [tiles, tiles]    # forward, then backward


def test_tiles_are_pinned_on_hopper_only_and_named_in_the_label():
    assert quack_mlp.pinned_tiles((9, 0)) == quack_mlp.HOPPER_TILES == (192, 128, 1, 1, 2)
    assert quack_mlp.pinned_tiles((10, 0)) == quack_mlp.pinned_tiles((8, 9)) == ()
    assert quack_mlp.tiles_label(quack_mlp.HOPPER_TILES) == "192x128 pingpong tiles in 1x2 clusters"
    assert quack_mlp.tiles_label((256, 128, 0, 2, 1)) == "256x128 tiles in 2x1 clusters"
    assert quack_mlp.tiles_label(()) == "default tiles"


def test_the_residual_op_matches_the_plain_projection_and_its_gradients(cpu_kernels):
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(2, 5, 16, generator=g), torch.randn(24, 16, generator=g) / 4   # w not square
    residual, dy = torch.randn(2, 5, 24, generator=g), torch.randn(2, 5, 24, generator=g)
    leaves = [t.clone().requires_grad_() for t in (x, w, residual)]
    SEEN_TILES.clear()
    y = quack_mlp.residual_linear(*leaves, tiles=quack_mlp.HOPPER_TILES)
    assert y.shape == residual.shape and SEEN_TILES == [quack_mlp.HOPPER_TILES]
    y.backward(dy)
    ref_leaves = [t.clone().requires_grad_() for t in (x, w, residual)]
    (ref_leaves[2] + ref_leaves[0] @ ref_leaves[1].T).backward(dy)
    torch.testing.assert_close(y, ref_leaves[2] + ref_leaves[0] @ ref_leaves[1].T, atol=1e-5, rtol=1e-5)
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5)


def test_ops_compile_whole_and_match_eager(cpu_kernels):
    x, w_fc, w_proj, _ = _operands(1)
    residual = torch.randn_like(x)
    leaves = tuple(t.requires_grad_() for t in (x, w_fc, w_proj, residual))

    def loss(x, w_fc, w_proj, residual):   # both sublayers' shapes: the MLP, then a projection
        h = quack_mlp.mlp(x, w_fc, w_proj, residual)
        return quack_mlp.residual_linear(h, w_fc[:16], h).square().sum()

    fn = torch.compile(loss, fullgraph=True, dynamic=False, backend="aot_eager")
    torch._dynamo.reset()
    compiled = fn(*leaves)
    grads = torch.autograd.grad(compiled, leaves)
    eager = loss(*leaves)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    for g, e in zip(grads, torch.autograd.grad(eager, leaves)):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


def test_the_fallbacks_are_the_plain_mlp_and_projection():
    x, w_fc, w_proj, _ = _operands(4)
    residual = torch.randn_like(x)
    torch.testing.assert_close(fallback.relu2_mlp(x, w_fc, w_proj, residual), plain_mlp(x, w_fc, w_proj, residual))
    torch.testing.assert_close(fallback.residual_linear(x, w_fc[:16], residual), residual + x @ w_fc[:16].T)


def test_model_with_the_fused_mlp_matches_the_fallback(cpu_kernels):
    tt = load_torch_file(ROOT / "train_torch.py")
    calls = assert_kernel_matches_fallback(tt, 97, T, relu2_mlp=quack_mlp.mlp, residual_linear=quack_mlp.residual_linear)
    # every layer's MLP ran through the ops, and every attention output projection
    assert calls == {"relu2_mlp": TINY["DEPTH"], "residual_linear": TINY["DEPTH"]}


# --- the real kernels ---------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or quack_mlp.unavailable_reason("cuda", (512, 2048)) is not None,
                    reason="needs a Hopper or Blackwell GPU with quack-kernels installed")
def test_quack_kernels_match_a_float32_reference_on_the_gpu():
    torch.manual_seed(0)
    M, d, h = 4096, 512, 2048
    x, dy = (torch.randn(M, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    w_fc = (torch.randn(h, d, device="cuda") / d ** 0.5).to(torch.bfloat16)
    w_proj = (torch.randn(d, h, device="cuda") / h ** 0.5).to(torch.bfloat16)
    residual = torch.randn(M, d, device="cuda", dtype=torch.bfloat16)
    leaves = [t.clone().requires_grad_() for t in (x, w_fc, w_proj, residual)]
    y = quack_mlp.mlp(leaves[0].view(2, M // 2, d), *leaves[1:3], leaves[3].view(2, M // 2, d))
    y.backward(dy.view(2, M // 2, d))
    ref_leaves = [t.float().requires_grad_() for t in (x, w_fc, w_proj, residual)]
    ref = plain_mlp(*ref_leaves)
    ref.backward(dy.float())
    assert y.dtype == torch.bfloat16 and y.shape == (2, M // 2, d)
    scale = lambda t: t.abs().max().item()                 # noqa: E731
    torch.testing.assert_close(y.view(M, d).float(), ref, atol=2e-2 * scale(ref), rtol=2e-2)
    for a, b in zip(leaves, ref_leaves):
        assert a.grad.dtype == torch.bfloat16
        torch.testing.assert_close(a.grad.float(), b.grad, atol=2e-2 * scale(b.grad), rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or quack_mlp.unavailable_reason("cuda", (512, 2048)) is not None,
                    reason="needs a Hopper or Blackwell GPU with quack-kernels installed")
@pytest.mark.parametrize("k", [512, 2048])
def test_the_residual_gemm_matches_a_float32_reference_on_the_gpu(k):
    torch.manual_seed(0)
    M, n = 4096, 512
    x = torch.randn(M, k, device="cuda", dtype=torch.bfloat16)
    residual, dy = (torch.randn(M, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    w = (torch.randn(n, k, device="cuda") / k ** 0.5).to(torch.bfloat16)
    leaves = [t.clone().requires_grad_() for t in (x, w, residual)]
    y = quack_mlp.residual_linear(leaves[0].view(2, M // 2, k), leaves[1], leaves[2].view(2, M // 2, n),
                                  tiles=quack_mlp.pinned_tiles(torch.cuda.get_device_capability()))
    y.backward(dy.view(2, M // 2, n))
    ref_leaves = [t.float().requires_grad_() for t in (x, w, residual)]
    ref = ref_leaves[2] + ref_leaves[0] @ ref_leaves[1].T
    ref.backward(dy.float())
    assert y.dtype == torch.bfloat16 and y.shape == (2, M // 2, n)
    scale = lambda t: t.abs().max().item()                 # noqa: E731
    torch.testing.assert_close(y.view(M, n).float(), ref, atol=1e-2 * scale(ref), rtol=1e-2)
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad.float(), b.grad, atol=1e-2 * scale(b.grad), rtol=1e-2)
