"""Plain-torch versions of the kernels train_torch.py calls: what each kernel computes.

They run wherever a fused kernel does not (the CPU, older GPUs, MLX_AR_FUSED_KERNELS=0), and
they are the reference the fused kernels are tested against. torch.compile fuses them on a GPU.

    y = attention(q, k, v, window, scale)         # q, k, v, y: (B, T, H, D)
    y = relu2_mlp(x, w_fc, w_proj, residual)      # residual + relu(x @ w_fc.T)² @ w_proj.T
    y = residual_linear(x, w, residual)           # residual + x @ w.T
    loss = softcap_cross_entropy(h, w, targets, cap)   # mean CE of cap * tanh(h @ w.T / cap), float32
"""
import torch
import torch.nn.functional as F

# flex_attention block masks by (seq_len, window), built by prepare_flex before a model is
# compiled on a GPU: flex_attention skips the blocks a short window never reaches, but is fast
# only inside torch.compile, so eager calls (the CPU, evaluation) take SDPA with a boolean mask.
_block_masks = {}


def prepare_flex(seq_len: int, windows, device) -> None:
    """Build the flex_attention block masks for the short `windows` of a model compiled on `device`."""
    from torch.nn.attention.flex_attention import create_block_mask

    def sliding(window):
        def mask_mod(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (q_idx - kv_idx < window)
        return mask_mod

    for w in sorted(set(windows)):
        if w < seq_len and (seq_len, w) not in _block_masks:
            _block_masks[seq_len, w] = create_block_mask(sliding(w), None, None, seq_len, seq_len, device=device)


def window_mask(seq_len: int, window: int, device=None):
    """Boolean (T, T) mask: query i sees key j when 0 <= i - j < window."""
    i = torch.arange(seq_len, device=device)[:, None]
    j = torch.arange(seq_len, device=device)[None, :]
    return (j <= i) & (i - j < window)


def attention(q, k, v, window: int, scale: float):
    """Causal attention of each query over its last `window` keys; q, k, v and the result (B, T, H, D)."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    T = q.size(-2)
    if window >= T:        # plain causal: SDPA's fused kernels (flash / cuDNN) beat flex_attention here
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    elif (T, window) in _block_masks and torch.compiler.is_compiling():
        from torch.nn.attention.flex_attention import flex_attention

        y = flex_attention(q, k, v, block_mask=_block_masks[T, window], scale=scale)
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=window_mask(T, window, q.device), scale=scale)
    return y.transpose(1, 2)


def residual_linear(x, w, residual):
    return residual + F.linear(x, w)


def relu2_mlp(x, w_fc, w_proj, residual):
    return residual + F.linear(F.relu(F.linear(x, w_fc)).square(), w_proj)


def softcap_cross_entropy(h, w, targets, cap: float):
    z = F.linear(h, w).float()
    y = cap * torch.tanh(z / cap)
    return F.cross_entropy(y.view(-1, y.size(-1)), targets.reshape(-1))
