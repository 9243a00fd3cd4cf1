"""train.py's MLX GPT and Muon/AdamW optimizer: shapes, dtypes, masks, reference updates."""
import math

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

from _train_utils import TINY, load_train

V, T = 97, 16


@pytest.fixture(scope="module")
def t():
    return load_train(TINY)


def make(t, seed=0):
    mx.random.seed(seed)
    return t.build_model(V, T)


def batch(seed=1, B=3):
    rng = np.random.default_rng(seed)
    return mx.array(rng.integers(0, V, (B, T))), mx.array(rng.integers(0, V, (B, T)))


# --- model ----------------------------------------------------------------------------------
def test_shapes_and_backward(t):
    model = make(t)
    x, y = batch()
    assert model(x).shape == (3, T, V)
    losses = model.token_losses(x, y)
    assert losses.shape == (3, T) and losses.dtype == mx.float32
    loss, grads = nn.value_and_grad(model, lambda m: m.token_losses(x, y).mean())(model)
    params, flat_grads = dict(tree_flatten(model.parameters())), dict(tree_flatten(grads))
    assert params.keys() == flat_grads.keys()
    for k, g in flat_grads.items():
        assert g.shape == params[k].shape, k
    # Initial loss is near uniform: log(V) (lm_head starts tiny).
    assert abs(loss.item() - math.log(V)) < 0.1


def test_bf16_everywhere_but_logits(t):
    model = make(t)
    assert {v.dtype for _, v in tree_flatten(model.parameters())} == {mx.bfloat16}
    x, _ = batch()
    seen = []
    # Walk the residual stream by hand with the model's own pieces, recording each block's dtype.
    h = x0 = t.rms_norm(model.wte[x])
    for i, block in enumerate(model.blocks):
        h = model.resid_lambdas[i] * h + model.x0_lambdas[i] * x0
        ve = model.value_embeds[f"layer{i}"][x] if f"layer{i}" in model.value_embeds else None
        h = t.Block.__call__(block, h, ve, t.window_bias(T, model.cfg.windows[i]))
        seen.append(h.dtype)
    assert seen == [mx.bfloat16] * len(model.blocks)
    assert model.hidden(x).dtype == mx.bfloat16
    assert model.logits(x).dtype == mx.float32


def test_window_layout(t):
    assert t.layer_windows(4, 2048) == (1024, 1024, 1024, 2048)
    assert t.layer_windows(6, 2048) == (1024, 1024, 1024, 2048, 1024, 2048)
    assert make(t).cfg.windows == (T // 2, T)


def test_window_mask_matches_naive_reference(t):
    for window in (1, 3, 8, 16):
        mask = np.array(t.window_mask(T, window))
        naive = np.zeros((T, T), bool)
        for i in range(T):
            for j in range(T):
                naive[i, j] = j <= i and i - j < window
        assert (mask == naive).all(), window
        bias = t.window_bias(T, window)
        assert bias.dtype == t.DTYPE
        assert (np.array(bias.astype(mx.float32)) == np.where(naive, 0.0, -np.inf)).all(), window


@pytest.mark.parametrize("mask", ["bool", "bias"])
def test_short_window_attention_equals_naive_softmax(t, mask):
    """The fused SDPA with our window mask (boolean, or the additive bias the model uses) equals attention by hand."""
    rng = np.random.default_rng(0)
    q, k, v = (mx.array(rng.standard_normal((1, 2, T, 8)).astype(np.float32)) for _ in range(3))
    window = 5
    m = t.window_mask(T, window) if mask == "bool" else t.window_bias(T, window, mx.float32)
    out = np.array(mx.fast.scaled_dot_product_attention(q, k, v, scale=0.5, mask=m))
    qn, kn, vn = np.array(q), np.array(k), np.array(v)
    s = qn @ kn.transpose(0, 1, 3, 2) * 0.5
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    s = np.where((j <= i) & (i - j < window), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    ref = (p / p.sum(-1, keepdims=True)) @ vn
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_same_seed_same_weights_and_loss(t):
    a, b = make(t, 3), make(t, 3)
    for (ka, va), (kb, vb) in zip(tree_flatten(a.parameters()), tree_flatten(b.parameters())):
        assert ka == kb and mx.array_equal(va, vb)
    x, y = batch()
    assert mx.array_equal(a.token_losses(x, y), b.token_losses(x, y))
    c = make(t, 4)
    assert not mx.array_equal(a.wte, c.wte)


def test_flops_per_token_counts_matmuls(t):
    cfg = make(t).cfg
    d = cfg.d_model
    matmul = cfg.n_layer * (4 * d * d + 2 * d * cfg.mlp_hidden) + d * V + 8 * cfg.n_head  # one ve gate
    attn = 12 * d * (sum(min(i + 1, T // 2) for i in range(T)) + sum(i + 1 for i in range(T))) / T
    assert t.flops_per_token(cfg) == pytest.approx(6 * matmul + attn)


# --- optimizer --------------------------------------------------------------------------------
def test_newton_schulz_matches_mlx_and_orthogonalizes(t):
    rng = np.random.default_rng(0)
    for shape in ((32, 32), (64, 16), (16, 48)):
        G = mx.array(rng.standard_normal(shape).astype(np.float32))
        ours = t.newton_schulz(G, steps=5)
        ref = optim.Muon(learning_rate=0.1)._zeropower_via_newtonschulz5(G, steps=5)
        np.testing.assert_allclose(np.array(ours), np.array(ref), atol=2e-5)
        # Singular values are pushed into roughly [0.7, 1.2] (the quintic's fixed band).
        s = np.linalg.svd(np.array(ours), compute_uv=False)
        assert s.min() > 0.5 and s.max() < 1.3, (shape, s.min(), s.max())
    # A stack is the same as one matrix at a time.
    stack = mx.array(rng.standard_normal((3, 24, 40)).astype(np.float32))
    batched = t.newton_schulz(stack, steps=3)
    for i in range(3):
        np.testing.assert_allclose(np.array(batched[i]), np.array(t.newton_schulz(stack[i], steps=3)), atol=1e-5)


def _one_step(t, model, opt, x, y):
    loss, grads = nn.value_and_grad(model, lambda m: m.token_losses(x, y).mean())(model)
    return loss, grads


def test_muon_matches_mlx_reference():
    t = load_train({**TINY, "WEIGHT_DECAY": 0.0})
    # bf16 Newton-Schulz amplifies rounding noise along a low-rank gradient's null space, so the
    # update rule is compared in float32; test_newton_schulz_* covers the iteration itself.
    t.NS_DTYPE = mx.float32
    model, ref_model = make(t), make(t)
    opt = t.build_optimizer(model)
    # A large lr so the moves dwarf bf16 rounding of the weights (~1e-3 at this init scale).
    lr, mom = 0.5, 0.9
    opt.set_hyper(lr_mult=lr / t.MATRIX_LR, muon_momentum=mom, weight_decay=0.0)
    ref = optim.Muon(learning_rate=lr, momentum=mom, weight_decay=0.0, nesterov=True, ns_steps=t.NS_STEPS)
    path = "blocks.0.mlp.c_fc.weight"  # tall (4d x d): exercises the transpose and the shape lr scale
    ref_param = dict(tree_flatten(ref_model.parameters()))[path].astype(mx.float32)
    ref_state = {}
    ref.init_single(ref_param, ref_state)
    x, y = batch()
    for _ in range(2):  # two steps: the momentum buffer matters on the second
        _, grads = _one_step(t, model, opt, x, y)
        g = dict(tree_flatten(grads))[path]
        ref_param = ref.apply_single(g.astype(mx.float32), ref_param, ref_state)
        ref_param = ref_param.astype(mx.bfloat16).astype(mx.float32)  # weights live in bf16
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state, ref_param)
    ours = np.array(dict(tree_flatten(model.parameters()))[path].astype(mx.float32))
    start = np.array(dict(tree_flatten(make(t).parameters()))[path].astype(mx.float32))
    ref_np = np.array(ref_param)
    # bf16 weights: compare the moves, relative to their size.
    moved_ours, moved_ref = ours - start, ref_np - start
    assert np.linalg.norm(moved_ref) > 0
    assert np.linalg.norm(moved_ours - moved_ref) / np.linalg.norm(moved_ref) < 0.03


def test_adamw_matches_reference_formula(t):
    model = make(t)
    opt = t.build_optimizer(model)
    opt.set_hyper(lr_mult=0.5, muon_momentum=0.9, weight_decay=0.0)
    x, y = batch()
    p0 = np.array(model.lm_head.weight.astype(mx.float32))
    m = np.zeros_like(p0)
    v = np.zeros_like(p0)
    b1, b2 = t.ADAM_BETAS
    lr = t.UNEMBEDDING_LR * (model.cfg.d_model / 768) ** -0.5 * 0.5
    p = p0.copy()
    for step in (1, 2):
        _, grads = _one_step(t, model, opt, x, y)
        g = np.array(grads["lm_head"]["weight"].astype(mx.float32))
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr * (m / (1 - b1**step)) / (np.sqrt(v / (1 - b2**step)) + t.ADAM_EPS)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
        # the reference rounds to bf16 each step like the model's weights do
        p = np.array(mx.array(p).astype(mx.bfloat16).astype(mx.float32))
    ours = np.array(model.lm_head.weight.astype(mx.float32))
    np.testing.assert_allclose(ours, p, atol=1e-6, rtol=1e-2)


def test_optimizer_groups(t):
    model = make(t)
    groups = t.build_optimizer(model).groups
    assert groups["wte"][0] == "adam" and groups["lm_head.weight"][0] == "adam"
    assert groups["resid_lambdas"][0] == "adam"
    assert groups["blocks.0.attn.c_q.weight"][0] == "muon"
    assert all(k.startswith("blocks.") for k, g in groups.items() if g[0] == "muon")
    # tall c_fc (4d x d) and wide c_proj (d x 4d) share one Newton-Schulz stack
    stacks = t.build_optimizer(model).muon_stacks
    d = model.cfg.d_model
    assert {"blocks.0.mlp.c_fc.weight", "blocks.0.mlp.c_proj.weight"} <= set(stacks[(d, 4 * d)])


def test_adamw_only_recipe():
    t = load_train({**TINY, "OPTIMIZER": "adamw"})
    model = make(t)
    opt = t.build_optimizer(model)
    assert not opt.muon_stacks and opt.groups["blocks.0.attn.c_q.weight"][0] == "adam_wd"
    t2 = load_train({**TINY, "OPTIMIZER": "sgd"})
    with pytest.raises(ValueError, match="OPTIMIZER"):
        t2.build_optimizer(make(t2))


def test_training_steps_reduce_loss(t):
    model = make(t)
    opt = t.build_optimizer(model)
    x, y = batch(B=4)
    first = None
    for _ in range(30):
        loss, grads = _one_step(t, model, opt, x, y)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
        first = loss.item() if first is None else first
    assert loss.item() < first - 1.0


@pytest.mark.parametrize("chunk", [7, 16, 1000])   # slices that do not divide the rows, that do, one slice
def test_chunked_cross_entropy_matches_the_plain_formula(t, chunk, monkeypatch):
    monkeypatch.setitem(vars(t), "LOSS_CHUNK_TOKENS", chunk)
    rng = np.random.default_rng(0)
    h = mx.array(rng.standard_normal((2, 25, 24)).astype(np.float32)).astype(mx.bfloat16)
    w = mx.array((0.5 * rng.standard_normal((50, 24))).astype(np.float32)).astype(mx.bfloat16)
    y = mx.array(rng.integers(0, 50, (2, 25)))
    cot = mx.array(rng.standard_normal((2, 25)).astype(np.float32))   # not a mean: per-token weights

    def plain(h, w):  # the textbook formula on whole logits, differentiated by MLX
        zc = t.LOGIT_SOFTCAP * mx.tanh((h @ w.T).astype(mx.float32) / t.LOGIT_SOFTCAP)
        return mx.logsumexp(zc, axis=-1) - mx.take_along_axis(zc, y[..., None], axis=-1)[..., 0]

    np.testing.assert_allclose(np.array(t.chunked_cross_entropy(h, w, y)), np.array(plain(h, w)), atol=1e-5)
    np.testing.assert_allclose(np.array(t.softcap_cross_entropy(h @ w.T, y)), np.array(plain(h, w)), atol=1e-5)
    grads = mx.grad(lambda h, w: (t.chunked_cross_entropy(h, w, y) * cot).sum(), argnums=(0, 1))(h, w)
    refs = mx.grad(lambda h, w: (plain(h, w) * cot).sum(), argnums=(0, 1))(h, w)
    for g, ref in zip(grads, refs):
        g, ref = np.array(g.astype(mx.float32)), np.array(ref.astype(mx.float32))
        np.testing.assert_allclose(g, ref, atol=0.02 * np.abs(ref).max())
        assert np.abs(ref).max() > 0.1


def test_embedding_gradient_accumulates_repeated_tokens_in_float32(t):
    rng = np.random.default_rng(0)
    V, d = 16, 8
    table = mx.array(rng.standard_normal((V, d)).astype(np.float32)).astype(mx.bfloat16)
    # a Zipf-like batch: token 3 appears 600 times, as frequent words do in real text
    idx = np.concatenate([np.full(600, 3), rng.integers(0, V, 200)]).reshape(4, 200)
    ct = (1e-2 * rng.standard_normal((4, 200, d)) + 0.05).astype(np.float32)
    ref = np.zeros((V, d))
    np.add.at(ref, idx.ravel(), ct.reshape(-1, d).astype(np.float64))

    idx_mx, ct_mx = mx.array(idx), mx.array(ct).astype(mx.bfloat16)
    out, vjp = mx.vjp(lambda w: t.embed(w, idx_mx), [table], [ct_mx])
    assert out[0].dtype == mx.bfloat16 and out[0].shape == (4, 200, d)
    assert mx.array_equal(out[0], table[idx_mx]).item()
    grad = np.array(vjp[0].astype(mx.float32))
    assert vjp[0].dtype == mx.bfloat16
    # float32 accumulation leaves only the final bf16 rounding (~0.4%); a bf16 running sum of
    # 600 terms drifts by far more
    np.testing.assert_allclose(grad, ref, rtol=1e-2, atol=1e-3)
    bf16_sum = np.array(mx.zeros((V, d), mx.bfloat16).at[idx_mx.reshape(-1)].add(ct_mx.reshape(-1, d)).astype(mx.float32))
    assert np.abs(bf16_sum[3] - ref[3]).max() > np.abs(grad[3] - ref[3]).max()
