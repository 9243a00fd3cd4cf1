"""The cuda backend (train_torch.py + CudaBackend) checked against train.py's MLX model on the CPU.

Parity: the MLX model's weights go through numpy into the torch model; the same batch must give
the same per-token losses, gradients and optimizer steps (Muon and AdamW) within bf16 rounding.
Also: the backend protocol on the CPU, no recompilation after the first step (the warmup the
budget excludes), the flex_attention path of the compiled model, the CUDA-graph step (with a
CPU stand-in for the recorder) and a smoke run of `train.py --backend cuda`. The tests that need
an NVIDIA GPU are in test_cuda_gpu.py, which does not import MLX (the `cuda` extra excludes it).
"""
import hashlib
import json
import math
import shutil
import subprocess
import sys
import warnings

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mlx.utils import tree_flatten, tree_unflatten

from _train_utils import ROOT, TINY, TRAIN_PY, load_train, recipe_of
from mlx_ar.backends import get_backend
from mlx_ar.backends.cuda.backend import (INDUCTOR_OPTIONS, KERNEL_MODULES, CudaBackend, GraphedStep,
                                          compile_cache_tag, load_numpy_weights, load_torch_file, numpy_weights,
                                          with_inductor_options)
from mlx_ar.backends.cuda.kernels import fallback
from mlx_ar.recipe import apply_recipe, parse_recipe

V, T = 97, 32                      # T = 32 gives TINY's first layer a 16-key window, its last a full one
TORCH_PY = ROOT / "train_torch.py"


@pytest.fixture(scope="module")
def t():
    return load_train(TINY)


@pytest.fixture(scope="module")
def tt():
    return load_torch_file(TORCH_PY)


def mlx_model(t, seed=0):
    """train.py's model with its zero-initialised matrices filled in, so every gradient is non-zero,
    and a larger lm_head, so the losses depend on the weights (a fresh model predicts ~uniformly)."""
    mx.random.seed(seed)
    model = t.build_model(V, T)
    rng = np.random.default_rng(seed)
    std = {"c_proj": 0.05, "ve_gate": 0.05, "lm_head": 0.1}
    filled = {k: mx.array((s * rng.standard_normal(v.shape)).astype(np.float32)).astype(mx.bfloat16)
              for k, v in tree_flatten(model.parameters()) for part, s in std.items() if part in k}
    model.update(tree_unflatten(list(filled.items())))
    return model


def mlx_numpy(tree) -> dict:
    return {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(tree)}


def torch_twin(tt, recipe, weights):
    model = tt.build_model(recipe, V, T)
    load_numpy_weights(model, weights)
    return model


def tokens(seed=1, shape=(3, T)):
    rng = np.random.default_rng(seed)
    return rng.integers(0, V, shape), rng.integers(0, V, shape)


def rel(a, b):
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# --- model parity -----------------------------------------------------------------------------
def test_train_torch_defines_no_recipe():
    # One source of truth: every dial is read from train.py's recipe block.
    assert parse_recipe(TORCH_PY.read_text(), "train_torch.py") == {}


def test_parameters_names_shapes_dtypes_and_init_rules(t, tt):
    mx.random.seed(0)
    ref = {k: v.shape for k, v in tree_flatten(t.build_model(V, T).parameters())}
    torch.manual_seed(0)
    model = tt.build_model(recipe_of(TINY), V, T)
    params = dict(model.named_parameters())
    assert {k: tuple(p.shape) for k, p in params.items()} == {k: tuple(s) for k, s in ref.items()}
    assert {p.dtype for p in params.values()} == {torch.bfloat16}
    d = model.cfg.d_model
    f = lambda k: params[k].float()
    assert abs(f("wte").std().item() - 1.0) < 0.05                       # EMBED_INIT_STD
    assert abs(f("lm_head.weight").std().item() - 0.001) < 0.0001        # LM_HEAD_INIT_STD
    for k, bound in (("blocks.0.attn.c_q.weight", math.sqrt(3 / d)), ("blocks.0.mlp.c_fc.weight", math.sqrt(3 / d)),
                     ("value_embeds.layer1", math.sqrt(3 / d))):
        assert 0.9 * bound < f(k).abs().max().item() <= bound * 1.01, k
    for k in ("blocks.0.attn.c_proj.weight", "blocks.1.mlp.c_proj.weight", "blocks.1.attn.ve_gate.weight"):
        assert f(k).abs().max().item() == 0.0, k
    assert f("resid_lambdas").tolist() == [1.0, 1.0] and np.allclose(f("x0_lambdas").tolist(), 0.1, atol=1e-3)
    assert model.cfg.windows == t.layer_windows(t.DEPTH, T) == (16, 32)


def test_token_losses_match_mlx(t, tt):
    model = mlx_model(t)
    twin = torch_twin(tt, recipe_of(TINY), mlx_numpy(model.parameters()))
    x, y = tokens()
    ref = np.array(model.token_losses(mx.array(x), mx.array(y)))
    with torch.no_grad():
        got = twin.token_losses(torch.from_numpy(x), torch.from_numpy(y))
    assert got.dtype == torch.float32 and tuple(got.shape) == (3, T)
    # bf16 weights and activations: per-token agreement to about 1%, the mean much closer
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-2, atol=1e-2)
    assert abs(float(got.mean()) - float(ref.mean())) < 2e-3
    # the weights made a difference: the losses are far from a fresh model's uniform log(V)
    assert np.abs(ref - math.log(V)).max() > 0.5


def test_gradients_match_mlx(t, tt):
    model = mlx_model(t)
    twin = torch_twin(tt, recipe_of(TINY), mlx_numpy(model.parameters()))
    x, y = tokens()
    _, grads = nn.value_and_grad(model, lambda m: m.token_losses(mx.array(x), mx.array(y)).mean())(model)
    ref = mlx_numpy(grads)
    twin(torch.from_numpy(x), torch.from_numpy(y)).backward()
    for k, p in twin.named_parameters():
        g = p.grad.float().numpy()
        cos = float((g * ref[k]).sum() / (np.linalg.norm(g) * np.linalg.norm(ref[k])))
        assert np.linalg.norm(ref[k]) > 0 and rel(g, ref[k]) < 0.05 and cos > 0.998, (k, rel(g, ref[k]), cos)


@pytest.mark.parametrize("optimizer,ns_dtype", [("muon", "float32"), ("muon", "bfloat16"), ("adamw", "bfloat16")])
def test_optimizer_steps_match_mlx(tt, optimizer, ns_dtype):
    overrides = {**TINY, "OPTIMIZER": optimizer}
    t = load_train(overrides)
    tt = load_torch_file(TORCH_PY)
    t.NS_DTYPE, tt.NS_DTYPE = getattr(mx, ns_dtype), getattr(torch, ns_dtype)
    recipe = recipe_of(overrides)
    model = mlx_model(t)
    start = mlx_numpy(model.parameters())
    twin = torch_twin(tt, recipe, start)
    grad_fn = nn.value_and_grad(model, lambda m, x, y: m.token_losses(mx.array(x), mx.array(y)).mean())
    # Two steps on different gradients with different scheduled values, so that bias correction,
    # momentum (Nesterov included) and decay all show; both optimizers get the same gradients.
    grads = [grad_fn(model, *tokens(seed))[1] for seed in (1, 2)]
    opt, topt = t.build_optimizer(model), tt.build_optimizer(twin, recipe)
    for g, hyper in zip(grads, ((0.7, 0.9, 0.1), (0.4, 0.93, 0.05))):
        opt.set_hyper(*hyper)
        topt.set_hyper(*hyper)
        opt.update(model, g)
        mx.eval(model.parameters(), opt.state)
        g_np = mlx_numpy(g)
        for k, p in twin.named_parameters():
            p.grad = torch.from_numpy(g_np[k]).to(p.dtype)
        topt.step()
        topt.zero_grad()
    ref = mlx_numpy(model.parameters())
    kinds = {k: kind for k, (kind, _) in topt.groups.items()}
    for k, p in twin.named_parameters():
        got, moved = p.detach().float().numpy(), ref[k] - start[k]
        assert np.abs(moved).max() > 0, k
        if kinds[k] == "muon" and ns_dtype == "bfloat16":
            # bf16 Newton-Schulz: the frameworks round differently; after two steps the weights stay
            # within two bf16 steps of each other and the updates agree to ~10%
            assert np.abs(got - ref[k]).max() <= 2 * 2 ** -7 * np.abs(ref[k]).max(), k
            assert rel(got - start[k], moved) < 0.2, k
        else:
            # equal up to a bf16 rounding of the weights between the two steps
            assert rel(got - start[k], moved) < 1e-2, (k, kinds[k])
    if optimizer == "muon" and ns_dtype == "float32":
        for shape, names in topt.muon_stacks.items():
            for i, k in enumerate(names):
                ref_buf = np.array(opt.state["buf"][k])   # MLX keeps each matrix's own layout; torch stacks them wide
                ref_buf = ref_buf.T if ref_buf.shape[0] > ref_buf.shape[1] else ref_buf
                np.testing.assert_allclose(topt.state["buf"][shape][i].numpy(), ref_buf, rtol=1e-5, atol=1e-8)


def test_optimizer_groups_match_mlx(tt):
    for optimizer in ("muon", "adamw"):
        overrides = {**TINY, "OPTIMIZER": optimizer}
        t = load_train(overrides)
        mx.random.seed(0)
        ref = t.build_optimizer(t.build_model(V, T))
        got = tt.build_optimizer(tt.build_model(recipe_of(overrides), V, T), recipe_of(overrides))
        assert got.groups.keys() == ref.groups.keys()
        for k, (kind, lr) in ref.groups.items():
            assert got.groups[k][0] == kind and math.isclose(got.groups[k][1], lr, rel_tol=1e-12), k
        assert {s: sorted(n) for s, n in got.muon_stacks.items()} == {s: sorted(n) for s, n in ref.muon_stacks.items()}
        assert all(v.dtype == torch.float32 for part in ("m", "v", "buf") for v in got.state[part].values())
    with pytest.raises(ValueError, match="OPTIMIZER"):
        tt.build_optimizer(tt.build_model(recipe_of(TINY), V, T), recipe_of({**TINY, "OPTIMIZER": "sgd"}))


def test_newton_schulz_matches_mlx(t, tt):
    rng = np.random.default_rng(3)
    for shape in ((3, 8, 16), (2, 24, 8), (5, 5)):
        G = rng.standard_normal(shape).astype(np.float32)
        ref = np.array(t.newton_schulz(mx.array(G), steps=5))
        got = tt.newton_schulz(torch.from_numpy(G), 5, t.NS_COEFFS).numpy()
        np.testing.assert_allclose(got, ref, atol=1e-4)


def test_rope_matches_mlx_fast_rope(t, tt):
    rng = np.random.default_rng(4)
    B, H, D = 2, 3, 16
    x = rng.standard_normal((B, H, T, D)).astype(np.float32)
    ref = np.array(mx.fast.rope(mx.array(x), D, traditional=False, base=t.ROPE_BASE, scale=1.0, offset=0))
    cos, sin = tt.rope_tables(T, D, t.ROPE_BASE)
    got = tt.apply_rope(torch.from_numpy(x).transpose(1, 2), cos, sin).transpose(1, 2).numpy()
    np.testing.assert_allclose(got, ref, atol=2e-5)


def test_head_loss_reductions(tt):
    model = tt.build_model(recipe_of(TINY), V, T)
    x, y = (torch.from_numpy(a) for a in tokens())
    with torch.no_grad():
        per_token = model(x, y, reduction="none")
        assert per_token.shape == y.shape
        torch.testing.assert_close(model(x, y), per_token.mean())
        with pytest.raises(ValueError, match='"mean" or "none"'):
            model(x, y, reduction="sum")


def test_flops_per_token_and_windows_match_train_py(tt):
    for overrides in (TINY, {**TINY, "DEPTH": 3, "WINDOW_PATTERN": "SL", "SHORT_WINDOW_FRAC": 0.25},
                      {"DEPTH": 8, "ASPECT_RATIO": 64}):
        t = load_train(overrides)
        cfg_ref = t.GPTConfig.from_recipe(8192, 2048)
        cfg = tt.GPTConfig.from_recipe(recipe_of(overrides), 8192, 2048)
        assert cfg.windows == cfg_ref.windows
        assert tt.flops_per_token(cfg) == t.flops_per_token(cfg_ref)


def test_missing_or_bad_recipe_values_are_named(tt):
    recipe = {k: v for k, v in recipe_of(TINY).items() if k != "VE_GATE_CHANNELS"}
    with pytest.raises(KeyError, match="VE_GATE_CHANNELS"):
        tt.build_model(recipe, V, T)
    with pytest.raises(ValueError, match="WINDOW_PATTERN"):
        tt.build_model({**recipe_of(TINY), "WINDOW_PATTERN": "SXL"}, V, T)
    with pytest.raises(ValueError, match="HEAD_DIM"):
        tt.build_model({**recipe_of(TINY), "HEAD_DIM": 48}, V, T)


# --- attention paths --------------------------------------------------------------------------
@pytest.fixture
def flex_masks():
    """flex_attention block masks built on the CPU for one test (the backend builds them on GPUs only)."""
    yield fallback.prepare_flex
    fallback._block_masks.clear()


def test_fallback_attention_and_flex_block_masks_match_naive_attention(flex_masks):
    from torch.nn.attention.flex_attention import flex_attention

    flex_masks(T, (5, 16, T), "cpu")
    q, k, v = torch.randn(3, 2, 2, T, 16).unbind(0)
    for w in (5, 16, T):
        naive = np.array([[0 <= i - j < w for j in range(T)] for i in range(T)])
        assert np.array_equal(fallback.window_mask(T, w).numpy(), naive)
        scores = (q @ k.mT) * 0.3
        ref = torch.softmax(scores.masked_fill(~torch.from_numpy(naive), float("-inf")), -1) @ v
        bthd = [t.transpose(1, 2) for t in (q, k, v)]    # the model's layout: (B, T, H, D)
        torch.testing.assert_close(fallback.attention(*bthd, w, 0.3).transpose(1, 2), ref, atol=1e-5, rtol=1e-5)
        if w == T:  # full context goes through SDPA's causal kernels: no block mask is built for it
            assert (T, w) not in fallback._block_masks
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # eager flex_attention warns that it is unfused; fine for a check
            flex = flex_attention(q, k, v, block_mask=fallback._block_masks[T, w], scale=0.3)
        torch.testing.assert_close(flex, ref, atol=1e-5, rtol=1e-5)


def test_compiled_model_takes_flex_for_short_windows_sdpa_for_full_and_matches_eager(tt, flex_masks):
    torch.manual_seed(0)
    model = tt.build_model(recipe_of(TINY), V, T)
    flex_masks(T, model.cfg.windows, "cpu")
    graphs = []

    def record(gm, example_inputs):   # a compiler backend that keeps the traced graph and runs it as is
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    x, y = (torch.from_numpy(a) for a in tokens())
    with torch.no_grad():               # flex_attention has no CPU backward; the forward path is what is traced
        eager = model.token_losses(x, y)
        compiled = torch.compile(model, fullgraph=True, dynamic=False, backend=record)(x, y, reduction="none")
    ops = [str(n.target) for gm in graphs for n in gm.graph.nodes]
    short = sum(w < T for w in model.cfg.windows)
    assert 0 < short < len(model.blocks)
    assert sum("flex_attention" in o for o in ops) == short
    assert sum("scaled_dot_product" in o for o in ops) == len(model.blocks) - short
    torch.testing.assert_close(compiled, eager, atol=2e-2, rtol=0)


# --- the backend --------------------------------------------------------------------------------
def make_backend(t, compile_mode="none", **kw):
    b = CudaBackend(t.__file__, compile_mode=compile_mode, **kw)
    b.configure_memory()
    b.build(recipe_of(TINY), V, T, seed=0)
    return b


def batch(n_micro, rows, seed=1):
    x, y = tokens(seed, (n_micro, rows, T))
    return x.astype(np.uint16), y.astype(np.uint16)


def test_backend_protocol_on_cpu(t):
    b = get_backend("cuda", t.__file__)
    assert isinstance(b, CudaBackend) and b.name == "cuda" and b.warmup_steps == 1
    if torch.cuda.is_available():
        pytest.skip("checks the CPU fallback")
    b.configure_memory()
    b.build(recipe_of(TINY), V, T, seed=0)
    assert b.device_name().endswith("(cpu)") and b.peak_flops() is None
    assert b.executed_files() == [TRAIN_PY.resolve(), TORCH_PY.resolve()]
    assert b.versions()["torch"] == torch.__version__
    # FA4 and quack's GEMMs are for Hopper or newer GPUs, the Triton loss for Ampere or newer
    assert b.versions()["kernels"] == {"attention": "torch sdpa", "mlp": "torch", "loss": "torch"}
    assert b.num_params == sum(p.numel() for p in b.model.parameters())
    assert b.flops_per_token == load_train(TINY).flops_per_token(load_train(TINY).GPTConfig.from_recipe(V, T))
    x, y = batch(2, 3)
    b.set_hyper(1.0, 0.9, 0.1)
    handle = b.step(x, y)
    assert isinstance(handle, torch.Tensor) and handle.dtype == torch.float32   # a device value, not a float
    assert abs(b.loss_value(handle) - math.log(V)) < 0.1
    losses = b.eval_nats(x[0], y[0])
    assert isinstance(losses, np.ndarray) and losses.dtype == np.float32 and losses.shape == (3, T)
    b.sync()
    assert b.peak_memory_mb() > 0 and b.time_optimizer(repeats=2) > 0
    assert all(p.grad is None for p in b.model.parameters())


def test_step_accumulates_micro_batches_like_one_batch(t):
    weights = mlx_numpy(mlx_model(t).parameters())
    x, y = batch(2, 3)
    losses, grads = [], []
    for xs, ys in ((x, y), (x.reshape(1, 6, T), y.reshape(1, 6, T))):
        b = make_backend(t)
        b.load_weights(weights)
        state = dict(b.optimizer.state)
        b.set_hyper(0.8, 0.9, 0.1)
        seen = {}
        step = b.optimizer.step
        b.optimizer.step = lambda: (seen.update({k: p.grad.float().numpy() for k, p in b.model.named_parameters()}),
                                    step())
        losses.append(b.loss_value(b.step(xs, ys)))
        grads.append(seen)
        # set_hyper fills the same 0-d tensors in place: a compiled update never sees a new constant
        assert all(b.optimizer.state[k] is state[k] for k in ("lr_mult", "momentum", "weight_decay", "step"))
        assert int(b.optimizer.state["step"]) == 1 and all(p.grad is None for p in b.model.parameters())
    assert abs(losses[0] - losses[1]) < 1e-4
    # two micro-batches of 3 rows give the gradient of the 6-row mean (up to bf16 sums)
    for k, g in grads[1].items():
        assert np.linalg.norm(g) > 0 and rel(grads[0][k], g) < 0.02, k


def test_compiled_steps_do_not_recompile_after_the_first(t):
    # warmup_steps = 1 is honest only if every graph is built in step 1. aot_eager traces and
    # guards exactly as inductor does, without spending a minute generating C++ kernels.
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    b = make_backend(t, compile_mode="model", compile_options={"backend": "aot_eager"})
    eager = make_backend(t)
    weights = numpy_weights(b.model)
    eager.load_weights(weights)
    x, y = batch(2, 3)
    hyper = [(1.0, 0.85, 0.2), (0.9, 0.86, 0.15), (0.5, 0.9, 0.1)]
    b.set_hyper(*hyper[0])
    first = b.loss_value(b.step(x, y))
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 2                              # the loss and the optimizer update at least
    with torch._dynamo.config.patch(error_on_recompile=True):
        for h in hyper[1:]:
            b.set_hyper(*h)
            b.loss_value(b.step(x, y))
        b.eval_nats(x[0], y[0])                     # evaluation runs eagerly: no new graph either
    assert counters["stats"]["unique_graphs"] == graphs
    eager.set_hyper(*hyper[0])
    assert abs(first - eager.loss_value(eager.step(x, y))) < 1e-3
    assert compile_cache_tag("") in torch.compiler.config.cache_key_tag.split("+")


def test_inductor_options_join_the_compile_arguments_for_inductor_only(t):
    assert with_inductor_options({}) == {"options": INDUCTOR_OPTIONS}
    assert with_inductor_options({"backend": "aot_eager"}) == {"backend": "aot_eager"}
    mine = with_inductor_options({"options": {"max_autotune": True, "triton.autotune_pointwise": True}})
    assert mine == {"options": {"triton.autotune_pointwise": True, "max_autotune": True}}   # the caller's word wins
    torch.compile(lambda x: x, **with_inductor_options({}))             # torch checks the option names
    assert CudaBackend(t.__file__).compile_options == {"options": INDUCTOR_OPTIONS}


def test_compile_cache_tag_hashes_the_kernel_modules_and_keeps_a_users_tag(tmp_path):
    for name in KERNEL_MODULES:
        (tmp_path / name).write_text(f"# {name}\n")
    ours = compile_cache_tag("", tmp_path)
    assert ours.startswith("mlx_ar-") and "+" not in ours
    assert compile_cache_tag(ours, tmp_path) == ours                  # building twice adds nothing
    assert compile_cache_tag("team-a", tmp_path) == f"team-a+{ours}"
    assert compile_cache_tag(f"team-a+{ours}", tmp_path) == f"team-a+{ours}"
    (tmp_path / KERNEL_MODULES[-1]).write_text("# a changed backward\n")
    assert compile_cache_tag("", tmp_path) != ours                   # a change retires cached graphs
    assert compile_cache_tag("") != ours                              # the package's own modules are hashed


def test_compile_mode_and_cuda_graph_follow_the_device(t):
    b = CudaBackend(t.__file__)
    assert b.on_gpu == torch.cuda.is_available()
    assert b.compile_mode == ("model" if b.on_gpu else "none") and b.cuda_graph == b.on_gpu
    assert not CudaBackend(t.__file__, compile_mode="none").cuda_graph     # an eager step is not recorded
    with pytest.raises(ValueError, match="compile_mode"):
        CudaBackend(t.__file__, compile_mode="blocks")


def test_weight_loading_names_what_does_not_fit(t, tt):
    model = tt.build_model(recipe_of(TINY), V, T)
    weights = numpy_weights(model)
    with pytest.raises(ValueError, match="missing \\['wte'\\]"):
        load_numpy_weights(model, {k: v for k, v in weights.items() if k != "wte"})
    with pytest.raises(ValueError, match="unexpected \\['extra'\\]"):
        load_numpy_weights(model, {**weights, "extra": np.zeros(1)})
    with pytest.raises(ValueError, match="lm_head.weight: shape"):
        load_numpy_weights(model, {**weights, "lm_head.weight": np.zeros((2, 2))})


def test_missing_torch_file_names_it(tmp_path, t):
    shutil.copy(TRAIN_PY, tmp_path / "train.py")
    b = CudaBackend(tmp_path / "train.py", compile_mode="none")
    with pytest.raises(FileNotFoundError, match="train_torch.py"):
        b.build(recipe_of(TINY), V, T, seed=0)


@pytest.mark.slow
def test_train_py_backend_cuda_smoke_run(tmp_path, data_cache, tiny_dataset):
    # The real entry point in a scratch checkout: train.py (tiny recipe) + train_torch.py.
    (data_cache / "datasets").mkdir(parents=True)
    (data_cache / "datasets" / "tiny").symlink_to(tiny_dataset.dir, target_is_directory=True)
    (tmp_path / "train.py").write_text(apply_recipe(TRAIN_PY.read_text(), {**TINY, "TOTAL_BATCH_SIZE": 2 * 2048,
                                                                            "DEVICE_BATCH_SIZE": 1}))
    shutil.copy(TORCH_PY, tmp_path / "train_torch.py")
    record = tmp_path / "run.json"
    proc = subprocess.run([sys.executable, "train.py", "--backend", "cuda", "--data", "tiny", "--smoke", "2",
                           "--record", str(record)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "\nbackend:          cuda\n" in proc.stdout and "smoke run, not comparable" in proc.stdout
    rec = json.loads(record.read_text())
    assert rec["status"] == "ok" and rec["backend"] == "cuda" and rec["smoke"] is True
    assert math.isfinite(rec["metrics"]["val_bpb"]) and rec["metrics"]["num_steps"] >= 2
    assert rec["recipe"]["DEPTH"] == TINY["DEPTH"]
    assert rec["executed_files"] == {name: hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
                                     for name in ("train.py", "train_torch.py")}
    assert rec["versions"]["torch"] == torch.__version__
    assert rec["versions"]["kernels"] == {"attention": "torch sdpa", "mlp": "torch", "loss": "torch"}
    assert "kernels: attention torch sdpa | mlp torch | loss torch\n" in proc.stdout



# --- the step as a CUDA graph -------------------------------------------------------------------
def test_graphed_step_records_once_and_replays_the_same_training(t):
    """On the CPU a fake recorder replays by running the step again; the logic around it is the GPU's."""
    plain, graphed = make_backend(t), make_backend(t)
    recorded = []

    def record(fn):                    # what torch.cuda.graph does, minus the GPU: replay = run again
        recorded.append(graphed._steps)
        return fn
    graphed.graphed = GraphedStep(torch, graphed._run_step, record)
    handles, losses = [], {"plain": [], "graphed": []}
    for i in range(4):
        x, y = batch(2, 3, seed=i)
        for name, b in (("plain", plain), ("graphed", graphed)):
            b.set_hyper(1.0, 0.9, 0.1)
            handle = b.step(x, y)
            losses[name].append(b.loss_value(handle))
            if name == "graphed":
                handles.append(handle)
    assert recorded == [2]                       # step 1 ran as usual (it compiles), step 2 recorded
    assert losses["graphed"] == losses["plain"]
    for a, b in zip(plain.model.parameters(), graphed.model.parameters()):
        assert torch.equal(a, b)
    # each handle is the step's own value, not the static buffer a later replay overwrites
    assert [h.item() for h in handles] == losses["graphed"] and len(set(losses["graphed"])) == 4
    assert handles[1].data_ptr() != graphed.graphed.loss.data_ptr()
    x, y = batch(2, 2)
    with pytest.raises(ValueError, match=r"batches of shape \(2, 3, 32\), got \(2, 2, 32\)"):
        graphed.step(x, y)


def test_loss_value_of_a_gpu_handle_waits_for_its_own_event_only(t):
    """A GPU step hands back (pinned host copy, event); reading waits on that event, not the stream."""
    b = make_backend(t)

    class Event:
        waited = 0

        def synchronize(self):
            self.waited += 1
    done = Event()
    assert b.loss_value((torch.tensor(2.5), done)) == 2.5 and done.waited == 1
    assert b.loss_value(torch.tensor(1.5)) == 1.5          # the CPU handle: the loss tensor itself


def test_pinned_staging_reuses_its_buffers_once_their_copies_are_done():
    """The ring of host buffers behind the GPU batch copies, run on the CPU with fake events."""
    from mlx_ar.backends.cuda.backend import PinnedStaging

    events = []

    class Event:
        def __init__(self):
            self.recorded = self.waited = 0
            events.append(self)

        def record(self):
            self.recorded += 1

        def synchronize(self):
            self.waited += 1

    staging = PinnedStaging(torch, torch.device("cpu"), slots=2, new_event=Event, pin=False)
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 65535, (2, 3, 5)).astype(np.uint16) for _ in range(3)]
    for a in batches:
        out = staging.to_device(a)          # on the CPU `.to` returns the buffer itself: check it now
        assert out.dtype == torch.int32 and np.array_equal(out.numpy(), a.astype(np.int32))
    assert [e.recorded for e in events] == [1, 1, 1]
    assert [e.waited for e in events] == [1, 0, 0]          # slot 0 refilled after its first copy ended
    first = staging.buffers[1]
    staging.to_device(batches[0])                          # same shape: the buffer is reused
    assert staging.buffers[1] is first and events[1].waited == 1
    staging.to_device(np.zeros((1, 4), np.int64))          # another shape gets its own buffer
    assert staging.buffers[0].shape == (1, 4)

def test_bench_train_json_is_one_json_object_naming_the_kernels(monkeypatch):
    from click.testing import CliRunner

    from mlx_ar.bench import bench_command

    monkeypatch.chdir(ROOT)
    sets = [a for k, v in TINY.items() for a in ("--set", f"{k}={v!r}")]
    result = CliRunner().invoke(bench_command, ["train", "--backend", "cuda", "--profile", "demo", "--steps", "2",
                                                "--warmup", "1", "--json", *sets])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout)       # nothing else on stdout: scripts parse it
    assert figures["backend"] == "cuda" and figures["tok_per_sec"] > 0
    assert figures["versions"]["kernels"] == {"attention": "torch sdpa", "mlp": "torch", "loss": "torch"}
    assert figures["ms_per_step"] > 0 and figures["optimizer_ms"] > 0

def test_a_step_that_cannot_be_recorded_says_why():
    from contextlib import contextmanager
    from types import SimpleNamespace

    from mlx_ar.backends.cuda.backend import record_cuda_graph

    @contextmanager
    def graph(g):                     # torch.cuda.graph raises like this when the step syncs with the host
        yield
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
    cuda = SimpleNamespace(synchronize=lambda: None, empty_cache=lambda: None, CUDAGraph=object, graph=graph)
    with pytest.raises(RuntimeError, match=r"not permitted when stream is capturing.*\.item\(\).*remove it"):
        record_cuda_graph(SimpleNamespace(cuda=cuda), lambda: None)
