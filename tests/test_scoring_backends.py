"""Fixed scoring on both backends (MLX, and cuda's PyTorch backend on the CPU): evaluation reads
the model's logits, never its training loss, and the leak probe catches a model that looks ahead."""
import math

import numpy as np
import pytest

from _train_utils import TINY, TRAIN_PY, bound, recipe_of
from mlx_ar.backends import get_backend
from mlx_ar.constants import Profile
from mlx_ar.data.loader import DocTable, val_batches
from mlx_ar.data.shards import TokenShard
from mlx_ar.evaluate import evaluate_bpb, leak_probe

V, T = 97, 32                      # TINY's first layer gets a 16-key window, its last a full one
BOS = 96


class TinyValidation:
    """Just what evaluate_bpb uses: a profile, byte lengths and a deterministic validation walk."""

    def __init__(self):
        rng = np.random.default_rng(3)
        docs = [[BOS] + rng.integers(0, BOS, size=int(rng.integers(5, 40))).tolist() for _ in range(60)]
        tokens = np.array([t for d in docs for t in d], dtype=np.uint16)
        offsets = np.concatenate(([0], np.cumsum([len(d) for d in docs]))).astype(np.int64)
        self.table = DocTable([TokenShard(tokens, offsets)])
        self.profile = Profile("tiny-scoring", time_budget=1, max_seq_len=T, vocab_size=V, eval_tokens=4 * T)
        self.vocab_size, self.name = V, "tiny-scoring"
        self.token_bytes = np.array([1 + t % 3 for t in range(BOS)] + [0], dtype=np.int32)

    def val_batches(self, batch_size, seq_len, max_rows=None):
        return val_batches(self.table, batch_size, seq_len, max_rows=max_rows)


def reference_nats(logits, targets):
    z = np.asarray(logits, dtype=np.float64)
    m = z.max(-1)
    return np.log(np.exp(z - m[..., None]).sum(-1)) + m - np.take_along_axis(z, targets[..., None].astype(np.int64), -1)[..., 0]


def first_row():
    return next(TinyValidation().val_batches(1, T))


# --- MLX ----------------------------------------------------------------------------------------
def mlx_backend(edit=None, seed=0):
    """The mlx backend on train.py (TINY), `edit`(its module globals) applied first; its
    zero-initialised matrices filled in and a larger lm_head, so predictions depend on every
    layer (a fresh model predicts ~uniformly)."""
    mx = pytest.importorskip("mlx.core")
    from mlx.utils import tree_flatten, tree_unflatten

    b = get_backend("mlx", TRAIN_PY, TINY)
    if edit:
        edit(b.g)
    b.build(recipe_of(TINY), V, T, seed)
    rng = np.random.default_rng(seed)
    std = {"c_proj": 0.05, "ve_gate": 0.05, "lm_head": 0.3}
    filled = [(k, mx.array((s * rng.standard_normal(v.shape)).astype(np.float32)).astype(v.dtype))
              for k, v in tree_flatten(b.model.parameters()) for part, s in std.items() if part in k]
    b.model.update(tree_unflatten(filled))
    mx.eval(b.model.parameters())
    return b


def label_smoothed(train_globals):
    """train.py's training loss label-smoothed (0.1), as an agent might edit it."""
    import mlx.core as mx

    gpt = train_globals["GPT"]
    plain = gpt.token_losses

    def token_losses(self, idx, targets):
        z = self.logits(idx)
        return 0.9 * plain(self, idx, targets) + 0.1 * (mx.logsumexp(z, axis=-1) - z.mean(axis=-1))

    gpt.token_losses = token_losses


def test_mlx_training_loss_change_leaves_the_score_of_the_same_weights_unchanged():
    mx = pytest.importorskip("mlx.core")
    plain = mlx_backend()
    smoothed = mlx_backend(label_smoothed)
    x, y = first_row()
    xs, ys = mx.array(x), mx.array(y)
    # The edit does change the training loss ...
    assert abs(plain.model.token_losses(xs, ys).mean().item() - smoothed.model.token_losses(xs, ys).mean().item()) > 1e-3
    # ... and not the score: evaluation never calls it.
    ds = TinyValidation()
    assert evaluate_bpb(plain.eval_nats, ds) == evaluate_bpb(smoothed.eval_nats, ds)
    nats = plain.eval_nats(x, y)
    assert nats.dtype == np.float32 and nats.shape == (1, T)
    np.testing.assert_allclose(nats, reference_nats(plain.eval_logits(x), y), rtol=1e-5, atol=1e-5)


def test_mlx_leak_probe_passes_the_model_and_catches_attention_without_a_mask():
    mx = pytest.importorskip("mlx.core")
    row = first_row()[0][0]
    causal = mlx_backend()
    assert leak_probe(causal.eval_logits, row, V) is None
    # An edit that drops the attention mask: every position attends to every token of the row.
    peeking = mlx_backend(edit=lambda g: g.update(window_bias=lambda t, w, dtype=mx.bfloat16: mx.zeros((t, t), dtype)))
    reason = leak_probe(peeking.eval_logits, row, V)
    assert reason is not None and reason.startswith("leak: ")


# --- cuda backend (PyTorch on the CPU) ----------------------------------------------------------
def torch_backend(seed=0):
    torch = pytest.importorskip("torch")
    b = get_backend("cuda", TRAIN_PY)          # on the CPU: eager PyTorch
    b.configure_memory()
    b.build(recipe_of(TINY), V, T, seed=seed)
    torch.manual_seed(seed)
    std = {"c_proj": 0.05, "ve_gate": 0.05, "lm_head": 0.3}
    with torch.no_grad():
        for name, p in b.model.named_parameters():
            for part, s in std.items():
                if part in name:
                    p.normal_(0, s)
    return b


def full_attention(q, k, v, window, scale):
    """The kernel an edit might write that forgets the mask: (B, T, H, D) in and out."""
    import torch.nn.functional as F

    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return y.transpose(1, 2)


def test_torch_leak_probe_passes_the_model_and_catches_attention_without_a_mask():
    b = torch_backend()
    row = first_row()[0][0]
    assert leak_probe(b.eval_logits, row, V) is None
    with bound(attention=full_attention):
        reason = leak_probe(b.eval_logits, row, V)
    assert reason is not None and reason.startswith("leak: ")


def test_torch_scores_logits_with_fixed_float32_cross_entropy():
    torch = pytest.importorskip("torch")
    b = torch_backend()
    x, y = first_row()
    nats = b.eval_nats(x, y)
    assert nats.dtype == np.float32 and nats.shape == (1, T)
    np.testing.assert_allclose(nats, reference_nats(b.eval_logits(x), y), rtol=1e-5, atol=1e-5)
    ds = TinyValidation()
    before = evaluate_bpb(b.eval_nats, ds)
    # A training-loss edit (label smoothing in the model's forward) does not reach the score.
    cls = type(b.model)
    plain = cls.forward

    def smoothed(self, idx, targets, reduction="mean"):
        z = self.logits(idx)
        return 0.9 * plain(self, idx, targets, reduction) + 0.1 * (torch.logsumexp(z, -1) - z.mean(-1)).mean()

    cls.forward = smoothed
    xt, yt = torch.from_numpy(x.astype(np.int64)), torch.from_numpy(y.astype(np.int64))
    with torch.no_grad():
        assert abs(b.model(xt, yt).item() - plain(b.model, xt, yt).item()) > 1e-3
    assert evaluate_bpb(b.eval_nats, ds) == before
    assert math.isfinite(before)
