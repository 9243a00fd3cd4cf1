"""The fused q/k RMS norm + RoPE (mlx_ar/backends/norm_rope.py and its Triton kernels).

On the CPU the custom ops run their torch references; what is tested there is that the
references are train_torch.py's math and its autograd gradient, that the op compiles whole and
keeps the graph cacheable, that the model trains through it, and the backend's choice. The
Triton kernels run on the CPU through Triton's interpreter where Triton is installed (CI
installs it), in a fresh process. The gpu-marked test runs the compiled kernels.
"""
import pytest
import torch

from _train_utils import (ROOT, TINY, assert_same_loss_and_grads, counting, dynamo_graph, model_pair, recipe_of,
                          kernel_label, run_interpreted)
from mlx_ar.backends import norm_rope
from mlx_ar.backends.cuda_backend import NORM_ROPE_ENV, choose_norm_rope, load_torch_file

T = 32


@pytest.fixture(scope="module")
def tt():
    return load_torch_file(ROOT / "train_torch.py")


def _inputs(tt, shape=(2, 12, 3, 16), seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * scale).to(torch.bfloat16)
    dy = torch.randn(shape, generator=g).to(torch.bfloat16)
    cos, sin = tt.rope_tables(shape[1], shape[3], 10000.0)
    return x, dy, cos, sin


# --- choosing the kernel ------------------------------------------------------------------------
def test_unavailable_reason_names_what_is_missing():
    found = lambda name: object()                          # noqa: E731
    assert "not a CUDA device" in norm_rope.unavailable_reason("cpu", 128)
    assert "head_dim 96 is not a power of two" in norm_rope.unavailable_reason("cuda", 96, (9, 0), found)
    assert "compute capability 7.5 is below 8.0" in norm_rope.unavailable_reason("cuda", 128, (7, 5), found)
    missing = norm_rope.unavailable_reason("cuda", 128, (9, 0), find_spec=lambda name: None)
    assert "triton is not installed" in missing
    assert norm_rope.unavailable_reason("cuda", 128, (9, 0), find_spec=found) is None


def test_choose_norm_rope_follows_the_probe_and_the_environment():
    can = lambda device, head_dim: None                                     # noqa: E731
    odd = lambda device, head_dim: f"head_dim {head_dim} is not a power of two"  # noqa: E731
    assert choose_norm_rope("cuda", 128, env={}, probe=can) == ("triton", "available")
    assert choose_norm_rope("cuda", 96, env={}, probe=odd) == ("torch", "head_dim 96 is not a power of two")
    assert choose_norm_rope("cuda", 128, env={NORM_ROPE_ENV: "torch"}, probe=can) == ("torch", f"{NORM_ROPE_ENV}=torch")
    with pytest.raises(ValueError, match="cannot run here: head_dim 96"):
        choose_norm_rope("cuda", 96, env={NORM_ROPE_ENV: "triton"}, probe=odd)
    with pytest.raises(ValueError, match="choose one of auto, triton, torch"):
        choose_norm_rope("cuda", 128, env={NORM_ROPE_ENV: "fused"}, probe=can)
    assert choose_norm_rope(torch.device("cpu"), 128, env={})[0] == "torch"


# --- the op's math and glue (torch reference on the CPU) -----------------------------------------
def test_reference_is_train_torch_math_and_its_gradient(tt):
    """The forward equals train_torch.py's apply_rope(rms_norm(x)) bit for bit; the backward is
    autograd's gradient of it (the same roundings, different float32 summation order)."""
    x, dy, cos, sin = _inputs(tt)
    xg = x.clone().requires_grad_()
    want = tt.apply_rope(tt.rms_norm(xg), cos, sin)
    want.backward(dy)
    got = norm_rope.reference(x, cos, sin, tt.NORM_EPS)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want.detach())
    dx = norm_rope.reference_backward(dy, x, cos, sin, tt.NORM_EPS)
    assert dx.dtype == torch.bfloat16
    torch.testing.assert_close(dx.float(), xg.grad.float(), atol=1e-2, rtol=1e-2)
    assert (dx == xg.grad).float().mean() > 0.9


def test_op_gradient_is_the_registered_backward(tt):
    x, dy, cos, sin = _inputs(tt, seed=1)
    xg = x.clone().requires_grad_()
    y = norm_rope.norm_rope(xg, cos, sin, tt.NORM_EPS)
    assert torch.equal(y, norm_rope.reference(x, cos, sin, tt.NORM_EPS))
    y.backward(dy)
    assert torch.equal(xg.grad, norm_rope.reference_backward(dy, x, cos, sin, tt.NORM_EPS))


def test_reference_backward_is_the_float64_gradient(tt):
    """Without the roundings (float64 through and through) the backward formula is the exact gradient."""
    x, dy, cos, sin = (t.double() for t in _inputs(tt, seed=2))
    xg = x.clone().requires_grad_()
    n = xg * torch.rsqrt(xg.square().mean(-1, keepdim=True) + 1e-6)
    half = x.size(-1) // 2
    y = torch.cat((n[..., :half] * cos - n[..., half:] * sin, n[..., half:] * cos + n[..., :half] * sin), -1)
    y.backward(dy)
    torch.testing.assert_close(norm_rope.reference_backward(dy, x, cos.double(), sin.double(), 1e-6), xg.grad)


def test_op_compiles_whole_matches_eager_and_leaves_the_graph_cacheable(tt):
    from torch._functorch._aot_autograd.autograd_cache import check_node_safe

    x, dy, cos, sin = _inputs(tt, seed=3)
    fn = lambda a, c, s: norm_rope.norm_rope(a, c, s, tt.NORM_EPS)     # noqa: E731
    graph = dynamo_graph(fn, x.clone().requires_grad_(), cos, sin)
    assert [str(n.target) for n in graph.graph.nodes if n.op == "call_function"] == ["mlx_ar.norm_rope"]
    for node in graph.graph.nodes:
        check_node_safe(node)
    torch._dynamo.reset()
    xg = x.clone().requires_grad_()
    y = torch.compile(fn, fullgraph=True, dynamic=False, backend="aot_eager")(xg, cos, sin)
    y.backward(dy)
    assert torch.equal(y, norm_rope.reference(x, cos, sin, tt.NORM_EPS))
    assert torch.equal(xg.grad, norm_rope.reference_backward(dy, x, cos, sin, tt.NORM_EPS))


def test_model_trains_through_the_kernel(tt):
    counted = counting(norm_rope.norm_rope)
    models = model_pair(tt, 97, T, norm_rope=counted)
    assert all(b.attn.norm_rope is counted for b in models[1].blocks)
    assert_same_loss_and_grads(models, 97, T)
    assert counted.calls == 2 * len(models[1].blocks)      # q and k of every layer
    x = torch.randint(0, 97, (2, T))
    with torch.no_grad():
        torch.testing.assert_close(models[1].token_losses(x, x), models[0].token_losses(x, x))


def test_fast_norm_rope_false_in_train_torch_declines_the_kernel():
    """An agent changing q/k's norm or rotation sets FAST_NORM_ROPE = False, so the kernel cannot bypass it."""
    tt = load_torch_file(ROOT / "train_torch.py")
    assert tt.FAST_NORM_ROPE is True
    tt.FAST_NORM_ROPE = False
    model = tt.build_model(recipe_of(TINY), 97, T, norm_rope=norm_rope.norm_rope)
    assert all(b.attn.norm_rope is None for b in model.blocks)
    label = kernel_label(model, "norm_rope")                                           # offered, declined
    assert label == "torch (triton not used: FAST_NORM_ROPE = False in train_torch.py)"
    label = kernel_label(model, "norm_rope", "head_dim 96 is not a power of two")
    assert label == "torch (triton not used: head_dim 96 is not a power of two)"
    tt.FAST_NORM_ROPE = True
    model = tt.build_model(recipe_of(TINY), 97, T, norm_rope=norm_rope.norm_rope)
    label = kernel_label(model, "norm_rope")
    assert label.startswith("triton ") and label.endswith("(q/k RMS norm and RoPE in one pass each way)")


# --- the Triton kernels, interpreted on the CPU --------------------------------------------------
def test_triton_kernels_match_the_reference_in_the_interpreter():
    """Triton reads TRITON_INTERPRET when it is first imported, so the interpreted kernels run in a
    fresh process: tests/_norm_rope_interpreted.py (partial blocks, positions per batch row, large
    values, zero rows, bad input)."""
    pytest.importorskip("triton")
    out = run_interpreted("_norm_rope_interpreted.py")
    assert out.count("ok ") == 9, out


# --- the compiled kernels -----------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or norm_rope.unavailable_reason("cuda", 128) is not None,
                    reason="needs an Ampere or newer NVIDIA GPU with Triton")
def test_triton_kernels_on_the_gpu(tt):
    """On a GPU the kernels round as torch does: nearly every value equals the reference's."""
    from mlx_ar.backends import norm_rope_triton

    for shape, rows in (((4, 256, 4, 128), 32), ((3, 100, 5, 64), 32), ((2, 64, 1, 32), 8)):
        x, dy, cos, sin = (t.cuda() for t in _inputs(tt, shape, seed=shape[1]))
        y = norm_rope_triton.forward(x, cos, sin, tt.NORM_EPS, rows=rows)
        dx = norm_rope_triton.backward(dy, x, cos, sin, tt.NORM_EPS, rows=rows)
        for got, want in ((y, norm_rope.reference(x, cos, sin, tt.NORM_EPS)),
                          (dx, norm_rope.reference_backward(dy, x, cos, sin, tt.NORM_EPS))):
            assert (got == want).float().mean() > 0.999, shape
            torch.testing.assert_close(got.float(), want.float(), atol=2e-2 * want.float().abs().max().item(),
                                       rtol=2 ** -7)
    xg = x.clone().requires_grad_()
    y = torch.compile(lambda a: norm_rope.norm_rope(a, cos, sin, tt.NORM_EPS), fullgraph=True)(xg)
    y.backward(dy)
    assert torch.equal(y, norm_rope_triton.forward(x, cos, sin, tt.NORM_EPS))
    assert torch.equal(xg.grad, norm_rope_triton.backward(dy, x, cos, sin, tt.NORM_EPS))
