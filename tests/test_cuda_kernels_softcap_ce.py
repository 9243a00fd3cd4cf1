"""The fused soft-capped cross-entropy (mlx_ar/backends/cuda/kernels/softcap_ce.py and its Triton kernel).

On the CPU the custom op runs its torch reference; what is tested there is that reference's
math against autograd, the backward's scaling, the fake (shape) function under
torch.compile, and the model using the kernel only for the mean training loss. The
Triton kernel itself runs on the CPU through Triton's interpreter where Triton is installed (CI
installs it), in a fresh process, on both of its paths (a row held at once, and a row walked in
chunks). The
gpu-marked test runs the compiled kernel.
"""
import pytest
import torch

from _train_utils import (ROOT, TINY, assert_kernel_matches_fallback, bound, counting, dynamo_graph, recipe_of,
                          run_interpreted)
from mlx_ar.backends.cuda.backend import load_torch_file
from mlx_ar.backends.cuda.kernels import fallback, softcap_ce

T = 32
CAP = 15.0


def plain_loss(h, w, targets, cap=CAP):
    """The soft-capped cross-entropy by autograd, per token, of logits rounded to bf16 as the model's are."""
    y = cap * torch.tanh((h @ w.T).to(torch.bfloat16).float() / cap)
    return torch.nn.functional.cross_entropy(y.view(-1, y.size(-1)), targets.reshape(-1),
                                             reduction="none").view(targets.shape)


def _logits(M, V, seed=0, scale=8.0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(M, V, generator=g) * scale).to(dtype)
    return z, torch.randint(0, V, (M,), generator=g)


# --- where it runs -------------------------------------------------------------------------------
def test_unavailable_reason_names_what_is_missing():
    found = lambda name: object()                          # noqa: E731
    assert "not a CUDA device" in softcap_ce.unavailable_reason("cpu")
    assert "compute capability 7.5 is below 8.0" in softcap_ce.unavailable_reason(
        "cuda", capability=(7, 5), find_spec=found)
    missing = softcap_ce.unavailable_reason("cuda", capability=(9, 0), find_spec=lambda name: None)
    assert "triton is not installed" in missing and "torch's CUDA wheels" in missing
    assert softcap_ce.unavailable_reason("cuda", capability=(8, 0), find_spec=found) is None
    assert softcap_ce.unavailable_reason("cuda", capability=(12, 0), find_spec=found) is None


# --- the op's math and glue (torch reference on the CPU) -----------------------------------------
def test_reference_is_the_loss_and_its_gradient():
    z, targets = _logits(6, 50, scale=30.0)                  # beyond the cap: tanh saturates
    zf = z.double().requires_grad_()
    y = CAP * torch.tanh(zf / CAP)
    want = torch.nn.functional.cross_entropy(y, targets, reduction="none")
    want.sum().backward()
    loss, dz = softcap_ce.reference(z, targets, CAP)
    assert loss.dtype == torch.float32 and dz.dtype == torch.bfloat16 and dz.shape == z.shape
    torch.testing.assert_close(loss.double(), want.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dz.double(), zf.grad, atol=4e-3, rtol=1e-2)   # one bf16 rounding


def _leaves(seed=0, lead=(3, 5), d=24, V=40):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*lead, d, generator=g).to(torch.bfloat16)
    w = (torch.randn(V, d, generator=g) / 2).to(torch.bfloat16)
    return h, w, torch.randint(0, V, lead, generator=g)


def test_cross_entropy_is_the_mean_loss_with_autograd_gradients():
    """The backward scales the two matmuls' results by the upstream gradient over the token count."""
    h, w, targets = _leaves()
    a = [h.clone().requires_grad_(), w.clone().requires_grad_()]
    loss = softcap_ce.cross_entropy(*a, targets, CAP)
    assert loss.shape == () and loss.dtype == torch.float32
    (3.5 * loss).backward()
    b = [h.float().requires_grad_(), w.float().requires_grad_()]
    ref = plain_loss(*b, targets).mean()
    (3.5 * ref).backward()
    torch.testing.assert_close(loss, ref, atol=2e-3, rtol=1e-3)
    for x, r in zip(a, b):
        assert x.grad.dtype == torch.bfloat16
        torch.testing.assert_close(x.grad.float(), r.grad, atol=2e-2 * r.grad.abs().max().item(), rtol=2e-2)


def test_cross_entropy_compiles_whole_and_matches_eager():
    h, w, targets = _leaves(1)
    h.requires_grad_(), w.requires_grad_()
    fn = torch.compile(lambda a, b, t: softcap_ce.cross_entropy(a, b, t, CAP),
                       fullgraph=True, dynamic=False, backend="aot_eager")
    torch._dynamo.reset()
    loss = fn(h, w, targets)
    grads = torch.autograd.grad(loss, (h, w))
    eager = softcap_ce.cross_entropy(h, w, targets, CAP)
    torch.testing.assert_close(loss, eager)
    for g, e in zip(grads, torch.autograd.grad(eager, (h, w))):
        torch.testing.assert_close(g, e)


def test_cross_entropy_leaves_the_compiled_graph_cacheable():
    """AOTAutograd's on-disk cache skips a graph holding a torch.autograd.Function, so every run
    would trace the model again; the op's registered backward keeps it cacheable."""
    from torch._functorch._aot_autograd.autograd_cache import BypassAOTAutogradCache, check_node_safe

    h, w, targets = _leaves(2)
    h.requires_grad_(), w.requires_grad_()
    graph = dynamo_graph(lambda a, b, t: softcap_ce.cross_entropy(a, b, t, CAP), h, w, targets)
    for node in graph.graph.nodes:
        check_node_safe(node)

    class Function(torch.autograd.Function):           # the control: what the cache refuses
        @staticmethod
        def forward(ctx, a, b):
            return (a @ b.T).float().mean()

        @staticmethod
        def backward(ctx, grad):
            return None, None

    graph = dynamo_graph(lambda a, b: Function.apply(a, b), h, w)
    with pytest.raises(BypassAOTAutogradCache, match="autograd_function_apply"):
        for node in graph.graph.nodes:
            check_node_safe(node)


def test_the_fallback_is_the_mean_of_the_plain_loss():
    h, w, targets = _leaves(3)
    torch.testing.assert_close(fallback.softcap_cross_entropy(h, w, targets, CAP),
                               plain_loss(h.float(), w.float(), targets).mean(), atol=2e-3, rtol=1e-3)


def test_model_trains_through_the_kernel_and_evaluates_without_it():
    tt = load_torch_file(ROOT / "train_torch.py")
    calls = assert_kernel_matches_fallback(tt, 97, T, softcap_cross_entropy=softcap_ce.cross_entropy)
    assert calls == {"softcap_cross_entropy": 1}           # the training loss ran through the kernel
    torch.manual_seed(0)
    model = tt.build_model(recipe_of(TINY), 97, T)
    x = torch.randint(0, 97, (2, T))
    counted = counting(softcap_ce.cross_entropy)
    with bound(softcap_cross_entropy=counted):
        with torch.no_grad():
            per_token = model.token_losses(x, x)
        model(x, x, reduction="none").sum().backward()
        mean = model(x, x)
    assert counted.calls == 1                              # per-token losses never go through it
    torch.testing.assert_close(mean, per_token.mean(), atol=1e-4, rtol=1e-4)


# --- the Triton kernel, interpreted on the CPU ---------------------------------------------------
def test_triton_kernel_matches_the_reference_in_the_interpreter():
    """Triton reads TRITON_INTERPRET when it is first imported (torch.compile imports it), so the
    interpreted kernel runs in a fresh process: tests/_softcap_ce_interpreted.py, which checks
    both of the kernel's paths, both shifts, odd sizes, saturated logits, strided rows and bad input."""
    pytest.importorskip("triton")
    out = run_interpreted("_softcap_ce_interpreted.py")
    assert out.count("ok ") == 9, out


# --- the compiled kernel ------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or softcap_ce.unavailable_reason("cuda") is not None,
                    reason="needs an Ampere or newer NVIDIA GPU with Triton")
def test_triton_kernel_on_the_gpu():
    from mlx_ar.backends.cuda.kernels import softcap_ce_triton

    for M, V, block_max, cap in ((4096, 8192, 8192, CAP), (1000, 50304, 8192, CAP), (512, 3000, 1024, CAP),
                                 (512, 8192, 8192, 100.0), (256, 3000, 1024, 100.0)):
        z, targets = (t.cuda() for t in _logits(M, V, seed=M, scale=1.5 * cap))
        loss, dz = softcap_ce_triton.softcap_ce(z, targets, cap, block_max=block_max)
        want_loss, want_dz = softcap_ce.reference(z, targets, cap)
        torch.testing.assert_close(loss, want_loss, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(dz.float(), want_dz.float(), atol=8e-3, rtol=1e-2)
    h, w, targets = (t.cuda() for t in _leaves(2, lead=(4, 256), d=512, V=8192))
    a = [h.clone().requires_grad_(), w.clone().requires_grad_()]
    fn = torch.compile(lambda x, y, t: softcap_ce.cross_entropy(x, y, t, CAP), fullgraph=True)
    loss = fn(*a, targets)
    loss.backward()
    b = [h.float().requires_grad_(), w.float().requires_grad_()]
    ref = plain_loss(*b, targets).mean()
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=2e-3, rtol=1e-3)
    for x, r in zip(a, b):
        torch.testing.assert_close(x.grad.float(), r.grad, atol=2e-2 * r.grad.abs().max().item(), rtol=2e-2)
