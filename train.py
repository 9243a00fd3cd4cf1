"""train.py: the one file the research agent edits.

The UPPER_CASE block below is the backend-neutral recipe (the cuda backend reads the same names
from this file's source); under it are the MLX GPT and its Muon/AdamW optimizer. Everything else
(budget clock, schedules, data, evaluation, summary) is the fixed harness in `mlx_ar`.

    python train.py                      # 5-minute run on the prepared dataset, prints the summary
    python train.py --backend cuda       # same recipe through the PyTorch backend (NVIDIA GPUs)
    python train.py --help               # the other switches (--seed, --data, --record, --smoke)
"""

# --- model shape ----------------------------------------------------------------------------
DEPTH = 4                          # transformer blocks
ASPECT_RATIO = 64                  # d_model = DEPTH * ASPECT_RATIO
HEAD_DIM = 128                     # channels per attention head (n_head = d_model // HEAD_DIM)
MLP_RATIO = 4                      # MLP hidden width = MLP_RATIO * d_model
WINDOW_PATTERN = "SSSL"            # per layer, cycled: S = short window, L = full context; last layer is always L
SHORT_WINDOW_FRAC = 0.5            # short window = this fraction of the context
ROPE_BASE = 10000.0                # rotary embedding base
LOGIT_SOFTCAP = 15.0               # logits = cap * tanh(logits / cap)
VE_GATE_CHANNELS = 32              # input channels read by the value-embedding gate
QK_SCALE = None                    # attention scale on RMS-normed q, k; None = 1 / sqrt(HEAD_DIM)
EMBED_INIT_STD = 1.0               # token embedding init std
LM_HEAD_INIT_STD = 0.001           # output projection init std
MATRIX_INIT_SCALE = 1.0            # multiplies the uniform bound sqrt(3 / fan_in) of block matrices
RESID_LAMBDA_INIT = 1.0            # per-layer scale of the residual stream
X0_LAMBDA_INIT = 0.1               # per-layer mix of the first-layer input into the stream

# --- batch ----------------------------------------------------------------------------------
TOTAL_BATCH_SIZE = 2**16           # tokens per optimizer step
DEVICE_BATCH_SIZE = "auto"         # rows per micro-batch; "auto": the most that fit this machine (accumulation fills the rest)

# --- optimizer ------------------------------------------------------------------------------
OPTIMIZER = "muon"                 # "muon" (Muon for block matrices + AdamW) or "adamw" (AdamW for all)
EMBEDDING_LR = 0.6                 # AdamW lr of token and value embeddings
UNEMBEDDING_LR = 0.004             # AdamW lr of lm_head
MATRIX_LR = 0.04                   # lr of block matrices (Muon; AdamW uses ADAMW_MATRIX_LR)
ADAMW_MATRIX_LR = 0.003            # lr of block matrices when OPTIMIZER = "adamw"
SCALAR_LR = 0.5                    # AdamW lr of the per-layer lambdas
WEIGHT_DECAY = 0.2                 # decoupled weight decay of block matrices, decays to 0 with progress
ADAM_BETAS = (0.8, 0.95)           # AdamW betas
ADAM_EPS = 1e-10                   # AdamW epsilon
NS_STEPS = 5                       # Newton-Schulz iterations of Muon
NS_COEFFS = (3.4445, -4.7750, 2.0315)  # quintic Newton-Schulz coefficients (a, b, c)
MUON_MOMENTUM = 0.95               # Nesterov momentum after warmup
MUON_MOMENTUM_START = 0.85         # momentum at step 0
MUON_MOMENTUM_WARMUP_STEPS = 300   # steps to ramp momentum from START to MUON_MOMENTUM

# --- schedule -------------------------------------------------------------------------------
WARMUP_RATIO = 0.0                 # fraction of the budget spent warming the lr up
WARMDOWN_RATIO = 0.5               # fraction of the budget at the end spent decaying the lr
FINAL_LR_FRAC = 0.0                # lr multiplier reached at the end of the budget
SEED = 42                          # weights and data order

# --- entry point: the fixed harness trains this file's model (mlx) or train_torch.py (cuda) ---
if __name__ == "__main__":
    from mlx_ar.harness.main import main

    main(__file__)

# ---------------------------------------------------------------------------------------------
import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

DTYPE = mx.bfloat16                # weights and residual stream; logits and loss in float32
NS_DTYPE = mx.bfloat16             # Newton-Schulz runs in bf16 (as in the reference Muon); tests use float32
LOSS_CHUNK_TOKENS = 128            # tokens per slice of the loss head (its float32 logits: 4 MiB at vocab 8192)
ATTENTION_BACKWARD_ROWS = 256      # query rows per block of attention's backward (its T x T temporaries)


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int
    seq_len: int
    n_layer: int
    d_model: int
    n_head: int
    head_dim: int
    mlp_hidden: int
    windows: tuple                 # attention window (keys per query) of each layer

    @classmethod
    def from_recipe(cls, vocab_size, seq_len):
        d_model = DEPTH * ASPECT_RATIO
        if d_model % HEAD_DIM:
            raise ValueError(f"d_model = DEPTH * ASPECT_RATIO = {d_model} is not a multiple of HEAD_DIM = {HEAD_DIM}")
        return cls(vocab_size, seq_len, DEPTH, d_model, d_model // HEAD_DIM, HEAD_DIM,
                   MLP_RATIO * d_model, layer_windows(DEPTH, seq_len))


def layer_windows(n_layer, seq_len):
    """Keys each query may see per layer: WINDOW_PATTERN cycled, the last layer always full."""
    if not WINDOW_PATTERN or set(WINDOW_PATTERN) - {"S", "L"}:
        raise ValueError(f"WINDOW_PATTERN must be a non-empty string of S and L, got {WINDOW_PATTERN!r}")
    short = max(1, int(seq_len * SHORT_WINDOW_FRAC))
    out = [short if WINDOW_PATTERN[i % len(WINDOW_PATTERN)] == "S" else seq_len for i in range(n_layer)]
    out[-1] = seq_len
    return tuple(out)


def has_value_embedding(layer, n_layer):
    """Value embeddings on alternating layers, always including the last."""
    return layer % 2 == (n_layer - 1) % 2


def window_mask(seq_len, window):
    """Boolean (T, T) mask: query i sees key j when 0 <= i - j < window."""
    i = mx.arange(seq_len)[:, None]
    j = mx.arange(seq_len)[None, :]
    return (j <= i) & (i - j < window)


def window_bias(seq_len, window, dtype=DTYPE):
    """The window as an additive (T, T) mask (0 where visible, -inf elsewhere) in `dtype`.

    SDPA converts a boolean mask to this form on every call; built once, the short-window
    layers ran 1.7x faster through MLX's CUDA attention (H100, B=16, T=2048).
    """
    return mx.where(window_mask(seq_len, window), mx.array(0.0, dtype), mx.array(-math.inf, dtype))


def rms_norm(x):
    return mx.fast.rms_norm(x, None, 1e-6)


@mx.custom_function
def embed(table, idx):
    """Rows of `table` (V, d) at token ids `idx`."""
    return table[idx]


@embed.vjp
def _embed_vjp(primals, cotangent, output):
    # The gradient is accumulated in float32: bf16 scatter-adds serialize on frequent tokens
    # (20x slower on real text than on random ids) and round away most of a frequent row's sum.
    table, idx = primals
    d = table.shape[-1]
    grad = mx.zeros(table.shape, mx.float32).at[idx.reshape(-1)].add(cotangent.reshape(-1, d).astype(mx.float32))
    return grad.astype(table.dtype), mx.zeros_like(idx)


def uniform(shape, bound):
    return mx.random.uniform(-bound, bound, shape).astype(DTYPE)


def attention(q, k, v, scale, bias):
    """softmax(q k^T * scale + bias) v for q, k, v (B, H, T, D) and an additive (T, T) bias.

    The probabilities (bf16) are all the backward keeps: MLX's own attention kept about 52 MiB per
    layer per 2048-token row (float32 scores among them), these 16.
    """
    qs, ks = mx.stop_gradient(q), mx.stop_gradient(k)
    s = (qs * mx.array(scale, q.dtype)) @ ks.swapaxes(-1, -2) + bias
    p = mx.softmax(s, axis=-1, precise=True)
    return _attention_from_probs(q, k, v, p, mx.array(scale, mx.float32))


@mx.custom_function
def _attention_from_probs(q, k, v, p, scale):
    """p @ v, differentiated as softmax(q k^T * scale + bias) v whose probabilities are p."""
    return p @ v


@_attention_from_probs.vjp
def _attention_from_probs_vjp(primals, cotangent, output):
    q, k, v, p, scale = primals
    # rowsum(dp * p) = rowsum(dO * O): a (B, H, T) reduction instead of one over T x T
    delta = (cotangent.astype(mx.float32) * output.astype(mx.float32)).sum(-1, keepdims=True)
    dq, dk, dv, prev = [], 0.0, 0.0, None
    # Query rows a block at a time: the backward's T x T temporaries exist for one block only.
    for i in range(0, q.shape[-2], ATTENTION_BACKWARD_ROWS):
        rows = slice(i, i + ATTENTION_BACKWARD_ROWS)
        pi, gi = p[..., rows, :], cotangent[..., rows, :]
        if prev is not None:  # blocks one after another, else the scheduler may run them all at once
            pi = mx.depends(pi, prev)
        ds = (pi * (gi @ v.swapaxes(-1, -2) - delta[..., rows, :])).astype(q.dtype) * scale.astype(q.dtype)
        dq.append(ds @ k)
        dk = dk + (ds.swapaxes(-1, -2) @ q[..., rows, :]).astype(mx.float32)
        dv = dv + (pi.swapaxes(-1, -2) @ gi).astype(mx.float32)
        prev = [dq[-1], dk, dv]
    return (mx.concatenate(dq, axis=-2), dk.astype(k.dtype), dv.astype(v.dtype), mx.zeros_like(p),
            mx.zeros_like(scale))


@mx.custom_function
def relu2_linear(h, w):
    """relu(h)^2 @ w.T, whose backward keeps only h (relu(h)^2 is recomputed, not stored)."""
    return mx.square(nn.relu(h)) @ w.T


@relu2_linear.vjp
def _relu2_linear_vjp(primals, cotangent, output):
    h, w = primals
    r = nn.relu(h)
    dh = 2 * r * (cotangent @ w)
    dw = cotangent.reshape(-1, cotangent.shape[-1]).T @ mx.square(r).reshape(-1, r.shape[-1])
    return dh, dw


class Linear(nn.Module):
    """Bias-free linear layer whose weight is created directly in DTYPE."""

    def __init__(self, d_in, d_out, init="uniform", std=0.0):
        super().__init__()
        if init == "uniform":
            self.weight = uniform((d_out, d_in), MATRIX_INIT_SCALE * math.sqrt(3.0 / d_in))
        elif init == "normal":
            self.weight = (std * mx.random.normal((d_out, d_in))).astype(DTYPE)
        else:
            self.weight = mx.zeros((d_out, d_in), dtype=DTYPE)

    def __call__(self, x):
        return x @ self.weight.T


class Attention(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        d, h, hd = cfg.d_model, cfg.n_head, cfg.head_dim
        self.n_head, self.head_dim = h, hd
        self.c_q = Linear(d, h * hd)
        self.c_k = Linear(d, h * hd)
        self.c_v = Linear(d, h * hd)
        self.c_proj = Linear(h * hd, d, init="zeros")
        self.ve_gate = Linear(VE_GATE_CHANNELS, h, init="zeros") if has_value_embedding(layer, cfg.n_layer) else None
        self.scale = QK_SCALE if QK_SCALE is not None else 1.0 / math.sqrt(hd)

    def __call__(self, x, ve, mask):
        B, T, _ = x.shape
        split = lambda t: t.reshape(B, T, self.n_head, self.head_dim).transpose(0, 2, 1, 3)
        q, k, v = split(self.c_q(x)), split(self.c_k(x)), split(self.c_v(x))
        if ve is not None:
            # Input-dependent gate in (0, 2) per head; starts at 1 because the gate weights start at 0.
            gate = 2 * mx.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))
            v = v + gate.transpose(0, 2, 1)[..., None] * split(ve)
        q = mx.fast.rope(rms_norm(q), self.head_dim, traditional=False, base=ROPE_BASE, scale=1.0, offset=0)
        k = mx.fast.rope(rms_norm(k), self.head_dim, traditional=False, base=ROPE_BASE, scale=1.0, offset=0)
        y = attention(q, k, v, self.scale, mask)
        return self.c_proj(y.transpose(0, 2, 1, 3).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.c_fc = Linear(cfg.d_model, cfg.mlp_hidden)
        self.c_proj = Linear(cfg.mlp_hidden, cfg.d_model, init="zeros")

    def __call__(self, x):
        return relu2_linear(self.c_fc(x), self.c_proj.weight)


class Block(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)

    def __call__(self, x, ve, mask):
        x = x + self.attn(rms_norm(x), ve, mask)
        return x + self.mlp(rms_norm(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        kv = cfg.n_head * cfg.head_dim
        self.wte = (EMBED_INIT_STD * mx.random.normal((cfg.vocab_size, cfg.d_model))).astype(DTYPE)
        # Keyed by layer index so the parameter tree names which layer each table feeds.
        self.value_embeds = {f"layer{i}": uniform((cfg.vocab_size, kv), math.sqrt(3.0 / cfg.d_model))
                             for i in range(cfg.n_layer) if has_value_embedding(i, cfg.n_layer)}
        self.blocks = [Block(cfg, i) for i in range(cfg.n_layer)]
        self.resid_lambdas = mx.full((cfg.n_layer,), RESID_LAMBDA_INIT, dtype=DTYPE)
        self.x0_lambdas = mx.full((cfg.n_layer,), X0_LAMBDA_INIT, dtype=DTYPE)
        self.lm_head = Linear(cfg.d_model, cfg.vocab_size, init="normal", std=LM_HEAD_INIT_STD)

    def hidden(self, idx):
        """Final normed hidden states (B, T, d_model) in DTYPE."""
        T = idx.shape[1]
        # Built per call, not kept on the model: freed after the forward, 8 MiB each at T = 2048.
        masks = {w: window_bias(T, w) for w in set(self.cfg.windows)}
        x = x0 = rms_norm(embed(self.wte, idx))
        for i, block in enumerate(self.blocks):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = embed(self.value_embeds[f"layer{i}"], idx) if f"layer{i}" in self.value_embeds else None
            x = block(x, ve, masks[self.cfg.windows[i]])
        return rms_norm(x)

    def logits(self, idx):
        """Soft-capped float32 logits (B, T, V): what evaluation scores; position t sees tokens <= t only."""
        z = self.lm_head(self.hidden(idx)).astype(mx.float32)
        return LOGIT_SOFTCAP * mx.tanh(z / LOGIT_SOFTCAP)

    def __call__(self, idx):
        return self.logits(idx)

    def token_losses(self, idx, targets):
        """Per-token cross-entropy in nats, float32 (B, T)."""
        return chunked_cross_entropy(self.hidden(idx), self.lm_head.weight, targets)


def softcap_cross_entropy(z, targets):
    """Cross-entropy (nats, float32) of soft-capped logits, from the raw logits z (..., V): the plain
    formula that chunked_cross_entropy computes in slices."""
    zc = LOGIT_SOFTCAP * mx.tanh(z.astype(mx.float32) / LOGIT_SOFTCAP)
    return mx.logsumexp(zc, axis=-1) - mx.take_along_axis(zc, targets[..., None], axis=-1)[..., 0]


def chunked_cross_entropy(h, w, targets):
    """softcap_cross_entropy(h @ w.T, targets), float32 (B, T), LOSS_CHUNK_TOKENS tokens at a time.

    h: (B, T, d) hidden states, w: (V, d) lm_head weight. Each slice's loss and its gradient
    w.r.t. the logits (for a unit cotangent, bf16) are computed together while the slice's float32
    logits exist, so only those bf16 gradients outlive the forward: the whole float32 logits and
    their gradient never exist at once (197 MiB of a 2048-token step's peak).
    """
    flat, t = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    hs, ws = mx.stop_gradient(flat), mx.stop_gradient(w)
    losses, dz = [], []
    for i in range(0, t.size, LOSS_CHUNK_TOKENS):
        rows = hs[i:i + LOSS_CHUNK_TOKENS]
        if dz:  # slices run one after another; else the scheduler may keep every slice's logits alive
            rows = mx.depends(rows, [losses[-1], dz[-1]])
        loss, g = _softcap_loss_and_grad(rows @ ws.T, t[i:i + LOSS_CHUNK_TOKENS])
        losses.append(mx.depends(loss, g))
        dz.append(g)
    return _head_with_grad(flat, w, mx.concatenate(losses), *dz).reshape(targets.shape)


def _softcap_loss_and_grad(z, targets):
    """Per-row loss of soft-capped logits z (N, V) and d loss / d z (bf16) in one pass over z."""
    th = mx.tanh(z.astype(mx.float32) / LOGIT_SOFTCAP)
    zc = LOGIT_SOFTCAP * th
    lse = mx.logsumexp(zc, axis=-1, keepdims=True)
    loss = lse[:, 0] - mx.take_along_axis(zc, targets[:, None], axis=-1)[:, 0]
    onehot = mx.arange(z.shape[-1]) == targets[:, None]
    return loss, ((mx.exp(zc - lse) - onehot) * (1 - th * th)).astype(z.dtype)


@mx.custom_function
def _head_with_grad(h, w, losses, *dz):
    """`losses` as the loss of h @ w.T whose gradient w.r.t. the logits is dz (unit cotangent, by slice)."""
    return losses


@_head_with_grad.vjp
def _head_with_grad_vjp(primals, cotangent, output):
    h, w, losses, *dz = primals
    # d/dz of sum(cot * loss) is cot * dz per row; scaling the thin side keeps it off the V axis.
    ch = cotangent[:, None].astype(h.dtype) * h
    dh, dw, i = [], mx.zeros(w.shape, mx.float32), 0
    for g in dz:
        n = g.shape[0]
        dh.append(cotangent[i:i + n, None].astype(h.dtype) * (g @ w))
        dw = dw + (g.T @ ch[i:i + n]).astype(mx.float32)
        i += n
    return (mx.concatenate(dh), dw.astype(w.dtype), mx.zeros_like(losses), *(mx.zeros_like(g) for g in dz))


def build_model(vocab_size, seq_len):
    return GPT(GPTConfig.from_recipe(vocab_size, seq_len))


def flops_per_token(cfg: GPTConfig):
    """Training FLOPs per token: 6 per matmul weight plus causal attention over the keys actually seen."""
    d, kv = cfg.d_model, cfg.n_head * cfg.head_dim
    per_layer = 3 * d * kv + kv * d + 2 * d * cfg.mlp_hidden
    gates = sum(VE_GATE_CHANNELS * cfg.n_head for i in range(cfg.n_layer) if has_value_embedding(i, cfg.n_layer))
    matmul = cfg.n_layer * per_layer + gates + d * cfg.vocab_size
    T = cfg.seq_len
    # mean over query positions of the keys attended, min(i + 1, window)
    attn = sum(12 * kv * (sum(min(i + 1, w) for i in range(T)) / T) for w in cfg.windows)
    return 6 * matmul + attn


# --- optimizer --------------------------------------------------------------------------------
def newton_schulz(G, steps=None, coeffs=None):
    """Approximately orthogonalize a stack of matrices (..., m, n) with the quintic Newton-Schulz map.

    Runs in the input dtype (bf16 in training). Wide orientation keeps X @ X^T the small Gram matrix.
    """
    steps = NS_STEPS if steps is None else steps
    a, b, c = NS_COEFFS if coeffs is None else coeffs
    tall = G.shape[-2] > G.shape[-1]
    X = G.swapaxes(-1, -2) if tall else G
    norm = mx.sqrt(mx.sum(mx.square(X.astype(mx.float32)), axis=(-2, -1), keepdims=True))
    X = X / (norm + 1e-7).astype(X.dtype)
    for _ in range(steps):
        A = X @ X.swapaxes(-1, -2)
        B = mx.addmm(A, A, A, alpha=c, beta=b)     # b * A + c * A @ A, in the matmul's epilogue
        X = mx.addmm(X, B, X, alpha=1.0, beta=a)   # a * X + B @ X
    return X.swapaxes(-1, -2) if tall else X


def _wide(a):
    """A matrix in wide orientation (rows <= cols): tall ones transposed."""
    return a.T if a.shape[0] > a.shape[1] else a


class MuonAdamW:
    """Muon for 2-D block matrices, AdamW for embeddings, lm_head and scalars.

    Parameters are grouped by role from their path in the model tree. Muon matrices of the same
    shape up to a transpose are orthogonalized together as one batched stack, tall ones
    transposed to wide (few, large kernels instead of many).
    Hyperparameters that follow the schedule (lr multiplier, Muon momentum, weight decay) live in
    `state` as arrays, so the harness sets them outside the compiled step without recompiling.
    """

    def __init__(self, model, use_muon=True):
        params = dict(tree_flatten(model.trainable_parameters()))
        self.use_muon = use_muon
        scale = (model.cfg.d_model / 768) ** -0.5
        self.groups = {}                                   # path -> (kind, base lr)
        for path, p in params.items():
            if path == "wte" or path.startswith("value_embeds."):
                self.groups[path] = ("adam", EMBEDDING_LR * scale)
            elif path.startswith("lm_head."):
                self.groups[path] = ("adam", UNEMBEDDING_LR * scale)
            elif p.ndim < 2:
                self.groups[path] = ("adam", SCALAR_LR * scale)
            elif use_muon:
                self.groups[path] = ("muon", MATRIX_LR)
            else:
                self.groups[path] = ("adam_wd", ADAMW_MATRIX_LR * scale)
        self.muon_stacks = {}                              # (rows, cols) wide -> [paths], one NS call each
        for path, (kind, _) in self.groups.items():
            if kind == "muon":
                rows, cols = params[path].shape
                self.muon_stacks.setdefault((min(rows, cols), max(rows, cols)), []).append(path)
        self.state = {
            "step": mx.array(0, dtype=mx.float32),
            "lr_mult": mx.array(1.0, dtype=mx.float32),
            "momentum": mx.array(MUON_MOMENTUM_START, dtype=mx.float32),
            "weight_decay": mx.array(WEIGHT_DECAY, dtype=mx.float32),
            # Optimizer state in float32: bf16 second moments underflow and a bf16 momentum of 0.95 rounds to 0.949.
            "m": {k: mx.zeros(params[k].shape, mx.float32) for k, g in self.groups.items() if g[0] != "muon"},
            "v": {k: mx.zeros(params[k].shape, mx.float32) for k, g in self.groups.items() if g[0] != "muon"},
            "buf": {k: mx.zeros(params[k].shape, mx.float32) for k, g in self.groups.items() if g[0] == "muon"},
        }

    def set_hyper(self, lr_mult, muon_momentum, weight_decay):
        """Called by the harness before each step, outside the compiled function."""
        self.state["lr_mult"] = mx.array(lr_mult, dtype=mx.float32)
        self.state["momentum"] = mx.array(muon_momentum, dtype=mx.float32)
        self.state["weight_decay"] = mx.array(weight_decay, dtype=mx.float32)

    def update(self, model, grads):
        params = dict(tree_flatten(model.trainable_parameters()))
        grads = dict(tree_flatten(grads))
        s = self.state
        s["step"] = s["step"] + 1
        lr_mult, wd = s["lr_mult"], s["weight_decay"]
        new = {}
        b1, b2 = ADAM_BETAS
        bc1 = 1 - b1 ** s["step"]
        bc2 = 1 - b2 ** s["step"]
        for path, (kind, lr) in self.groups.items():
            if kind == "muon":
                continue
            g = grads[path].astype(mx.float32)
            m = b1 * s["m"][path] + (1 - b1) * g
            v = b2 * s["v"][path] + (1 - b2) * mx.square(g)
            s["m"][path], s["v"][path] = m, v
            p = params[path].astype(mx.float32)
            step_lr = lr * lr_mult
            if kind == "adam_wd":
                p = p * (1 - step_lr * wd)
            p = p - step_lr * (m / bc1) / (mx.sqrt(v / bc2) + ADAM_EPS)
            new[path] = p.astype(params[path].dtype)
        mom = s["momentum"]
        for paths in self.muon_stacks.values():
            G = mx.stack([_wide(grads[k]) for k in paths]).astype(mx.float32)
            buf = mom * mx.stack([_wide(s["buf"][k]) for k in paths]) + (1 - mom) * G
            # Nesterov look-ahead, orthogonalized in NS_DTYPE (the momentum itself stays float32).
            update = newton_schulz((mom * buf + (1 - mom) * G).astype(NS_DTYPE)).astype(mx.float32)
            for i, k in enumerate(paths):
                rows, cols = params[k].shape
                lr = MATRIX_LR * lr_mult * max(1.0, rows / cols) ** 0.5
                tall = rows > cols
                s["buf"][k] = buf[i].T if tall else buf[i]
                p32 = params[k].astype(mx.float32) * (1 - lr * wd) - lr * (update[i].T if tall else update[i])
                new[k] = p32.astype(params[k].dtype)
        model.update(tree_unflatten(list(new.items())))


def build_optimizer(model):
    if OPTIMIZER not in ("muon", "adamw"):
        raise ValueError(f'OPTIMIZER must be "muon" or "adamw", got {OPTIMIZER!r}')
    return MuonAdamW(model, use_muon=OPTIMIZER == "muon")
