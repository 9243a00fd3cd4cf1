"""The one choice of kernels (mlx_ar/backends/cuda/kernels/__init__.py): fused where each runs,
plain torch elsewhere, and MLX_AR_FUSED_KERNELS=0 for plain torch everywhere.

The fused kernels cannot run here, so the probes that say whether they could are stand-ins;
what is tested is which function each name is bound to and what the record says.
"""
import functools

import pytest
import torch

from mlx_ar.backends.cuda import kernels
from mlx_ar.backends.cuda.kernels import fa4, fallback, quack_mlp, softcap_ce

NAMES = ("attention", "relu2_mlp", "residual_linear", "softcap_cross_entropy")


@pytest.fixture(autouse=True)
def restore_bindings():
    """Each test leaves the names bound to plain torch, as the CPU backend binds them."""
    yield
    kernels.use("cpu", 32, (64, 256))
    assert all(getattr(kernels, n) is getattr(fallback, n) for n in NAMES)


def probes(can: bool):
    why = None if can else "not on this machine"
    return {family: (lambda: why) for family in ("attention", "mlp", "loss")}


def test_on_the_cpu_every_name_is_plain_torch():
    chosen = kernels.use("cpu", 32, (64, 256), env={})
    assert chosen == {"attention": "torch sdpa", "mlp": "torch", "loss": "torch"}
    assert all(getattr(kernels, n) is getattr(fallback, n) for n in NAMES)


def test_where_the_fused_kernels_run_they_are_bound():
    chosen = kernels.use("cuda", 128, (512, 2048), env={}, probes=probes(True), capability=(9, 0))
    assert kernels.attention is fa4.attention and kernels.softcap_cross_entropy is softcap_ce.cross_entropy
    for name, fn in (("relu2_mlp", quack_mlp.mlp), ("residual_linear", quack_mlp.residual_linear)):
        bound = getattr(kernels, name)
        assert isinstance(bound, functools.partial) and bound.func is fn
        assert bound.keywords == {"tiles": quack_mlp.HOPPER_TILES}        # pinned on Hopper
    assert chosen["attention"].startswith("fa4 ")
    assert chosen["mlp"].startswith("quack ") and chosen["mlp"].endswith("192x128 pingpong tiles in 1x2 clusters)")
    assert chosen["loss"].startswith("triton ")
    kernels.use("cuda", 128, (512, 2048), env={}, probes=probes(True), capability=(10, 0))
    assert kernels.relu2_mlp.keywords == {"tiles": ()}                       # quack's default elsewhere


def test_where_they_cannot_run_the_record_says_why():
    chosen = kernels.use("cuda", 128, (512, 2048), env={}, probes=probes(False))
    assert all(getattr(kernels, n) is getattr(fallback, n) for n in NAMES)
    assert chosen == {"attention": "torch sdpa+flex (fused not used: not on this machine)",
                      "mlp": "torch (fused not used: not on this machine)",
                      "loss": "torch (fused not used: not on this machine)"}


def test_the_one_switch_keeps_plain_torch_and_rejects_other_values():
    chosen = kernels.use("cuda", 128, (512, 2048), env={kernels.ENV: "0"}, probes=probes(True))
    assert all(getattr(kernels, n) is getattr(fallback, n) for n in NAMES)
    assert chosen["mlp"] == f"torch (fused not used: {kernels.ENV}=0)"
    assert kernels.fused_wanted({}) and kernels.fused_wanted({kernels.ENV: " 1 "})
    with pytest.raises(ValueError, match=f"{kernels.ENV}='yes': use 1"):
        kernels.use("cpu", 32, (64, 256), env={kernels.ENV: "yes"})


def test_the_models_calls_go_through_the_names_bound_at_call_time():
    """train_torch.py looks each kernel up by name when it runs, so a binding made after the model
    was built still takes effect (the backend binds before building; tests rebind freely)."""
    from _train_utils import ROOT, TINY, bound, counting, recipe_of
    from mlx_ar.backends.cuda.backend import load_torch_file

    tt = load_torch_file(ROOT / "train_torch.py")
    torch.manual_seed(0)
    model = tt.build_model(recipe_of(TINY), 97, 32)
    fns = {n: counting(getattr(fallback, n)) for n in NAMES}
    x = torch.randint(0, 97, (2, 32))
    with bound(**fns):
        model(x, x).backward()
    layers = TINY["DEPTH"]
    assert {n: f.calls for n, f in fns.items()} == {"attention": layers, "relu2_mlp": layers,
                                                     "residual_linear": layers, "softcap_cross_entropy": 1}
