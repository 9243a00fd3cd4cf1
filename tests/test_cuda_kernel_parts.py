"""surface.py's kernel parts: with a FAST_* flag on, the code its kernel replaces must be as shipped.

The cuda backend may run fused kernels in place of parts of train_torch.py (attention, the MLP,
the loss, q/k norm + RoPE). An edit to such a part while its flag is on would be reported but
never run, so the ledger refuses it before a commit and the backend refuses it before building.
"""
import shutil

import pytest

from _train_utils import TINY, TRAIN_PY, recipe_of
from mlx_ar.backends import surface
from mlx_ar.backends.surface import KERNEL_PARTS, BypassedEdit, bypass_reason, bypassed_edits, refuse_reason

TORCH_PY = TRAIN_PY.parent / "train_torch.py"
SRC = TORCH_PY.read_text()

# (flag, part, old text, new text): an edit of the math each kernel replaces.
EDITS = [
    ("FAST_NORM_ROPE", "apply_rope", "x1 * cos - x2 * sin", "x1 * cos + x2 * sin"),
    ("FAST_NORM_ROPE", "rms_norm", "eps=NORM_EPS)", "eps=1e-5)"),
    ("FAST_NORM_ROPE", "Attention.forward/if norm_rope",
     "q, k = apply_rope(rms_norm(q), cos, sin), apply_rope(rms_norm(k), cos, sin)",
     "q, k = apply_rope(q, cos, sin), apply_rope(rms_norm(k), cos, sin)"),
    ("FAST_MLP", "MLP.forward", "F.relu(self.c_fc(x)).square()", "F.gelu(self.c_fc(x))"),
    ("FAST_MLP", "Linear.forward", "return residual + F.linear(x, self.weight)",
     "return residual + 2 * F.linear(x, self.weight)"),
    ("FAST_LOSS", "SoftcapCrossEntropy", "zc = cap * torch.tanh(z.float() / cap)", "zc = z.float()"),
    ("FAST_LOSS", "GPT.head_loss", "return loss.mean() if", "return 0.5 * loss.mean() if"),
    ("FAST_ATTENTION", "window_mask", "(i - j < window)", "(i - j <= window)"),
    ("FAST_ATTENTION", "Masks", "is_causal=True, scale=scale)", "is_causal=True, scale=2 * scale)"),
]


def edited(*pairs, src=SRC):
    for old, new in pairs:
        assert src.count(old) == 1, old
        src = src.replace(old, new)
    return src


def flag_off(flag, src):
    return edited((f"\n{flag} = True ", f"\n{flag} = False "), src=src)


def test_the_shipped_file_matches_every_fingerprint():
    prints = surface.kernel_fingerprints(SRC)
    shipped = {flag: dict(parts) for flag, parts in KERNEL_PARTS.items()}
    assert prints == shipped, f"train_torch.py's kernel parts changed: if on purpose, set KERNEL_PARTS to {prints}"
    assert bypass_reason(SRC) is None
    assert surface.fast_flags(SRC) == dict.fromkeys(KERNEL_PARTS, True)


@pytest.mark.parametrize("flag, part, old, new", EDITS, ids=[e[1] for e in EDITS])
def test_an_edit_of_a_kernels_part_is_refused_until_its_flag_is_off(flag, part, old, new):
    src = edited((old, new))
    assert bypassed_edits(src) == {flag: [part]}
    reason = bypass_reason(src)
    assert part in reason and f"Set {flag} = False in train_torch.py" in reason and "program.md" in reason
    assert bypass_reason(flag_off(flag, src)) is None
    # Another flag off does not help.
    other = next(f for f in KERNEL_PARTS if f != flag)
    assert bypassed_edits(flag_off(other, src)) == {flag: [part]}


def test_edits_the_kernels_run_either_way_are_accepted():
    accepted = [
        ("NORM_EPS = 1e-6 ", "NORM_EPS = 1e-5 "),                                    # a value the kernel takes
        ("gate = 2 * torch.sigmoid(", "gate = 3 * torch.sigmoid("),                  # Attention outside the if
        ("x = resid_lambda * x + x0_lambda * x0", "x = resid_lambda * x + 2 * x0_lambda * x0"),
        ('"""Rotate halves', '"""Rotates halves'),                                  # a docstring
        ("    def forward(self, x, residual):\n        \"\"\"residual + relu",  # a comment and layout
         "    def forward(self, x, residual):  # the MLP\n        \"\"\"residual + relu"),
        ("        if self.kernel is not None:\n            return self.kernel(x, self.c_fc",
         "        if (self.kernel\n                is not None):\n            return self.kernel(x, self.c_fc"),
    ]
    for pair in accepted:
        assert bypass_reason(edited(pair)) is None, pair


def test_two_flags_are_named_together_and_a_removed_part_counts_as_edited():
    src = edited(EDITS[0][2:], EDITS[3][2:])
    assert bypassed_edits(src) == {"FAST_NORM_ROPE": ["apply_rope"], "FAST_MLP": ["MLP.forward"]}
    assert "Set FAST_MLP = False and FAST_NORM_ROPE = False" in bypass_reason(src)
    start = SRC.index("def window_mask(")
    gone = SRC[:start] + SRC[SRC.index("def rope_tables("):]
    assert bypassed_edits(gone) == {"FAST_ATTENTION": ["window_mask (removed)"]}


def test_only_a_literal_false_or_no_flag_at_all_turns_a_flag_off():
    src = edited(EDITS[3][2:], ("\nFAST_MLP = True ", "\nFAST_MLP = bool(0) "))
    assert surface.fast_flags(src)["FAST_MLP"] and bypassed_edits(src) == {"FAST_MLP": ["MLP.forward"]}
    assert not surface.fast_flags(flag_off("FAST_MLP", SRC))["FAST_MLP"]
    assert surface.fast_flags("def block(x):\n    return x\n") == dict.fromkeys(KERNEL_PARTS, False)


def test_the_ledger_refuses_on_cuda_only():
    old = {"train.py": TRAIN_PY.read_text(), "train_torch.py": SRC}
    new = {**old, "train_torch.py": edited(EDITS[3][2:])}
    assert "FAST_MLP" in refuse_reason("cuda", old, new)
    assert refuse_reason("cuda", old, {**old, "train_torch.py": flag_off("FAST_MLP", new["train_torch.py"])}) is None
    assert refuse_reason("cuda", old, {**old, "train_torch.py": SRC + "\ndef (:\n"}) is None   # left to the run
    assert "does not execute it" in refuse_reason("mlx", old, new)                           # the mlx rule, not this one


def test_the_backend_refuses_before_it_builds(tmp_path):
    from mlx_ar.backends.cuda_backend import CudaBackend

    shutil.copy(TRAIN_PY, tmp_path / "train.py")
    (tmp_path / "train_torch.py").write_text(edited(EDITS[3][2:]))
    backend = CudaBackend({"__file__": str(tmp_path / "train.py")}, compile_mode="none")
    with pytest.raises(BypassedEdit, match=r"MLP\.forward.*FAST_MLP = False"):
        backend.build(recipe_of(TINY), 97, 32, seed=0)
    assert not hasattr(backend, "model")

    (tmp_path / "train_torch.py").write_text(flag_off("FAST_MLP", edited(EDITS[3][2:])))
    backend.build(recipe_of(TINY), 97, 32, seed=0)
    assert all(block.mlp.kernel is None for block in backend.model.blocks)
