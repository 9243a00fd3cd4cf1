"""FlashAttention-4 glue (mlx_ar/backends/cuda/kernels/fa4.py).

The FA4 kernels need a Hopper GPU, so on the CPU the custom ops get a reference kernel (plain
masked softmax attention, registered for the CPU device in a fixture): what is tested there is
the glue around FA4 — window conversion, layout, the autograd wiring of the two ops, their fake
(shape) functions under torch.compile, and the model running every layer through them. The
gpu-marked test compares the real kernels with SDPA where FA4 runs.
"""
import pytest
import torch

from _train_utils import ROOT, assert_kernel_matches_fallback
from mlx_ar.backends.cuda.backend import load_torch_file
from mlx_ar.backends.cuda.kernels import fa4

T = 32


def _probabilities(q, k, left, scale):
    """Masked softmax probabilities (B, H, T, T) in float32 and their log-partition (B, H, T)."""
    qh, kh = (t.transpose(1, 2).float() for t in (q, k))
    i, j = torch.arange(q.size(1))[:, None], torch.arange(q.size(1))[None]
    allowed = (j <= i) & ((i - j <= left) if left >= 0 else True)
    s = ((qh @ kh.mT) * scale).masked_fill(~allowed.to(q.device), float("-inf"))
    lse = torch.logsumexp(s, -1)
    return torch.exp(s - lse[..., None]), lse


def reference_fwd(q, k, v, left, scale):
    """(out (B, T, H, D), lse (B, H, T)) of causal attention over `left` keys back (-1: all)."""
    p, lse = _probabilities(q, k, left, scale)
    return (p @ v.transpose(1, 2).float()).transpose(1, 2).to(q.dtype), lse


def reference_bwd(q, k, v, out, dout, lse, left, scale):
    """Attention's gradients by the textbook formulas (a kernel runs below autograd)."""
    p, _ = _probabilities(q, k, left, scale)
    qh, kh, vh, oh, doh = (t.transpose(1, 2).float() for t in (q, k, v, out, dout))
    dp = doh @ vh.mT
    ds = p * (dp - (doh * oh).sum(-1, keepdim=True))
    grads = (ds @ kh * scale, ds.mT @ qh * scale, p.mT @ doh)
    return tuple(g.transpose(1, 2).to(q.dtype).contiguous() for g in grads)


@pytest.fixture(scope="module")
def cpu_kernels():
    """Reference kernels for the two ops on the CPU (the real ones are FA4's, CUDA only)."""
    torch.library.register_kernel("mlx_ar::fa4_fwd", "cpu", reference_fwd)
    torch.library.register_kernel("mlx_ar::fa4_bwd", "cpu", reference_bwd)


def sdpa_attention(q, k, v, window, scale):
    """The attention train_torch.py computes without a kernel, on (B, T, H, D) tensors."""
    ones = torch.ones(q.size(1), q.size(1), dtype=torch.bool, device=q.device)
    mask = ones.tril() & ~ones.tril(-window)
    out = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)),
                                                           attn_mask=mask, scale=scale)
    return out.transpose(1, 2)


# --- where it runs -------------------------------------------------------------------------------
def test_window_left_counts_keys_before_the_query():
    assert fa4.window_left(1, T) == 0              # only the query's own key
    assert fa4.window_left(16, T) == 15
    assert fa4.window_left(T, T) == -1             # the whole causal context
    assert fa4.window_left(10 * T, T) == -1
    with pytest.raises(ValueError, match="at least 1 key"):
        fa4.window_left(0, T)


def test_unavailable_reason_names_what_is_missing():
    found = lambda name: object()                          # noqa: E731
    assert "not a CUDA device" in fa4.unavailable_reason("cpu", 128)
    assert "head_dim 100 is not supported" in fa4.unavailable_reason("cuda", 100, capability=(9, 0), find_spec=found)
    assert "head_dim 512" in fa4.unavailable_reason("cuda", 512, capability=(9, 0), find_spec=found)
    assert fa4.unavailable_reason("cuda", 192, capability=(9, 0), find_spec=found) is None
    assert "on compute capability 10.0" in fa4.unavailable_reason("cuda", 192, capability=(10, 0), find_spec=found)
    assert fa4.unavailable_reason("cuda", 256, capability=(10, 0), find_spec=found) is None
    assert "8.0 is below 9.0" in fa4.unavailable_reason("cuda", 128, capability=(8, 0), find_spec=found)
    missing = fa4.unavailable_reason("cuda", 128, capability=(9, 0), find_spec=lambda name: None)
    assert "flash-attn-4 is not installed" in missing and "pip install" in missing
    assert fa4.unavailable_reason("cuda", 128, capability=(9, 0), find_spec=found) is None
    assert fa4.unavailable_reason("cuda", 64, capability=(10, 0), find_spec=found) is None


# --- the ops' glue, with reference kernels on the CPU ---------------------------------------------
@pytest.mark.parametrize("window", [1, 5, 16, T])
def test_ops_match_masked_attention_forward_and_gradients(cpu_kernels, window):
    torch.manual_seed(0)
    q, k, v, dy = torch.randn(4, 2, T, 3, 8).unbind(0)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    y = fa4.attention(*leaves, window, 0.3)
    y.backward(dy)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = sdpa_attention(*ref_leaves, window, 0.3)
    ref.backward(dy)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5)


def test_ops_compile_whole_and_match_eager(cpu_kernels):
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, T, 3, 8, requires_grad=True) for _ in range(3))
    fn = torch.compile(lambda a, b, c: fa4.attention(a, b, c, 16, 0.25).square().sum(),
                       fullgraph=True, dynamic=False, backend="aot_eager")
    torch._dynamo.reset()
    loss = fn(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    eager = fa4.attention(q, k, v, 16, 0.25).square().sum()
    torch.testing.assert_close(loss, eager, atol=1e-5, rtol=1e-5)
    for g, e in zip(grads, torch.autograd.grad(eager, (q, k, v))):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


def test_model_with_the_fa4_kernel_matches_the_fallback(cpu_kernels):
    tt = load_torch_file(ROOT / "train_torch.py")
    calls = assert_kernel_matches_fallback(tt, 97, T, attention=fa4.attention)
    assert calls == {"attention": 2}                   # every layer of TINY's two


# --- the real kernels ---------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or fa4.unavailable_reason("cuda", 128) is not None,
                    reason="needs a Hopper-or-newer GPU with flash-attn-4 installed")
@pytest.mark.parametrize("window", [1, 100, 1024, 2048])
def test_fa4_kernels_match_sdpa_on_the_gpu(window):
    torch.manual_seed(0)
    B, TT, H, D = 2, 2048, 4, 128
    q, k, v, dy = (torch.randn(B, TT, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    y = fa4.attention(*leaves, window, D ** -0.5)
    y.backward(dy)
    ref_leaves = [t.float().requires_grad_() for t in (q, k, v)]
    ref = sdpa_attention(*[t for t in ref_leaves], window, D ** -0.5)
    ref.backward(dy.float())
    torch.testing.assert_close(y.float(), ref, atol=2e-2, rtol=2e-2)
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad.float(), b.grad, atol=5e-2, rtol=5e-2)
