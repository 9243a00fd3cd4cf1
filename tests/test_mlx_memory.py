"""A training step's memory is one micro-batch's: the MLX step with accumulation equals one big batch,
its peak does not grow with the micro-batch count, and the micro-batch is fitted to the memory budget
(fake budgets), with a clear error before training when the step cannot fit."""
import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_ar.backends.mlx.backend import MLXBackend
from mlx_ar.backends.mlx.memory import GIB, training_budget, typical_recommended_working_set
from mlx_ar.harness.memory import MIB, STEP_SHARE, UNMEASURED_ROWS, DoesNotFit, fit_micro_batch, plan_device_batch

from _train_utils import TINY, load_train

V, T = 97, 32


def built(overrides=None, vocab=V, seq=T, seed=0):
    b = MLXBackend(vars(load_train({**TINY, **(overrides or {})})))
    b.configure_memory()
    b.build({}, vocab, seq, seed)
    b.set_hyper(1.0, 0.9, 0.1)
    return b


def tokens(shape, vocab=V, seed=1):
    return np.random.default_rng(seed).integers(0, vocab, shape, dtype=np.uint16)


def params(b):
    return {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(b.model.parameters())}


# --- the step --------------------------------------------------------------------------------
def test_micro_batches_accumulate_to_the_step_of_one_big_batch():
    x, y = tokens((4, T)), tokens((4, T), seed=2)
    one, four = built(), built()
    for _ in range(2):   # the second step runs on zeroed buffers and moved weights
        l1 = one.loss_value(one.step(x[None], y[None]))
        l4 = four.loss_value(four.step(x.reshape(4, 1, T), y.reshape(4, 1, T)))
        assert l4 == pytest.approx(l1, rel=2e-3)
    a, b, start = params(one), params(four), params(built())
    for k in a:
        # Same updates up to summation order in bf16 (Adam moves near-zero gradients by +-lr either way).
        da, db = (a[k] - start[k]).ravel(), (b[k] - start[k]).ravel()
        if np.any(da):
            assert da @ db / np.linalg.norm(da) / np.linalg.norm(db) > 0.95, k
    assert four.optimizer.state["step"].item() == 2


def _step_peak_mb(n_micro, rows=1, seq=512, vocab=4096):
    b = built({"DEPTH": 2, "ASPECT_RATIO": 64, "HEAD_DIM": 64}, vocab=vocab, seq=seq)
    x = tokens((n_micro, rows, seq), vocab)
    b.loss_value(b.step(x, x))            # compiles; the buffers of accumulation are allocated
    mx.synchronize()
    mx.reset_peak_memory()
    b.loss_value(b.step(x, x))
    b.sync()
    return b.peak_memory_mb()


def test_step_peak_does_not_grow_with_the_micro_batch_count():
    # The step that unrolled every micro-batch into one graph held all their activations: 4 micro-
    # batches peaked at about 3x one micro-batch's step.
    one, four = _step_peak_mb(2), _step_peak_mb(8)
    assert four <= 1.1 * one, (one, four)


def test_loss_head_never_holds_the_whole_float32_logits():
    # One 4096-token micro-batch at vocab 8192: the float32 logits alone are 128 MiB, and the plain
    # head held them with their float32 gradient and more (394 MiB). The chunked head keeps the bf16
    # gradient (64 MiB) and one slice's temporaries.
    t = load_train(TINY)
    h = (0.1 * mx.random.normal((2, 2048, 64), key=mx.random.key(0))).astype(mx.bfloat16)
    w = (0.1 * mx.random.normal((8192, 64), key=mx.random.key(1))).astype(mx.bfloat16)
    y = mx.random.randint(0, 8192, (2, 2048), key=mx.random.key(2))
    mx.eval(h, w, y)
    grad = mx.compile(mx.value_and_grad(lambda h, w: t.chunked_cross_entropy(h, w, y).mean(), argnums=(0, 1)))
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    mx.eval(grad(h, w))
    logits_mib = 2 * 2048 * 8192 * 4 / MIB
    assert (mx.get_peak_memory() - base) / MIB < 1.5 * logits_mib


def test_step_memory_is_measured_without_changing_the_model():
    b = built()
    before = params(b)
    fixed, per_row = b.step_memory(T)
    assert all(np.array_equal(before[k], v) for k, v in params(b).items())
    held = sum(v.nbytes for _, v in tree_flatten(b.model.parameters()))
    assert fixed > held                   # weights, optimizer state and the gradient buffer
    assert 0 < per_row < 64 * MIB
    assert b.optimizer.state["step"].item() == 0


# --- fitting the micro-batch to the budget ---------------------------------------------------
def test_auto_takes_the_largest_divisor_that_fits():
    budget = int(10 * GIB / STEP_SHARE)                   # 10 GiB for the step
    plan = plan_device_batch(32, "auto", 1 * GIB, GIB // 2, budget)
    assert plan.device_rows == 16 and plan.auto           # 1 + 16 * 0.5 = 9 GiB; 32 would need 17
    assert plan.peak_bytes == 9 * GIB
    assert plan_device_batch(32, "auto", 1 * GIB, 3 * GIB, budget).device_rows == 2   # 7 GiB; 4 rows: 13
    assert plan_device_batch(32, "auto", 0, 1, budget).device_rows == 32              # the whole step in one
    assert "16 rows per micro-batch (auto)" in plan.describe() and "GB budget" in plan.describe()


def test_an_explicit_batch_is_honoured_when_it_fits_and_refused_when_not():
    budget = int(10 * GIB / STEP_SHARE)
    assert plan_device_batch(32, 4, 1 * GIB, GIB // 2, budget).device_rows == 4       # smaller than auto's 16
    with pytest.raises(DoesNotFit) as e:
        plan_device_batch(32, 32, 1 * GIB, GIB // 2, budget)
    msg = str(e.value)
    assert "DEVICE_BATCH_SIZE = 32 needs about 17.00 GB" in msg and "set DEVICE_BATCH_SIZE to 16 or less" in msg
    assert "\n" not in msg                                 # one line: the run record's reason


def test_a_step_that_fits_at_no_batch_names_the_model_as_the_fix():
    with pytest.raises(DoesNotFit, match=r"even at one row per micro-batch.*shrink the model"):
        plan_device_batch(32, "auto", 9 * GIB, 2 * GIB, int(10 * GIB / STEP_SHARE))


def test_without_a_budget_nothing_is_checked():
    assert plan_device_batch(32, 64, None, None, None).device_rows == 64   # batch_geometry judges the geometry
    assert plan_device_batch(48, "auto", None, None, None).device_rows == UNMEASURED_ROWS
    assert plan_device_batch(24, "auto", 1, 1, None).device_rows == 12


class FakeBackend:
    def __init__(self, budget, measured):
        self.budget, self.measured, self.measured_at = budget, measured, []

    def memory_budget(self):
        return self.budget

    def step_memory(self, seq_len):
        self.measured_at.append(seq_len)
        return self.measured


def test_fit_micro_batch_measures_only_with_a_budget():
    recipe = {"TOTAL_BATCH_SIZE": 2**16, "DEVICE_BATCH_SIZE": "auto"}
    fake = FakeBackend(int(4 * GIB / STEP_SHARE), (GIB // 2, 300 * MIB))
    plan = fit_micro_batch(fake, recipe, 2048)
    assert fake.measured_at == [2048] and plan.device_rows == 8                      # 0.5 + 8 * 0.29 GiB
    blind = FakeBackend(None, (1, 1))
    assert fit_micro_batch(blind, recipe, 2048).device_rows == UNMEASURED_ROWS and blind.measured_at == []
    with pytest.raises(ValueError, match="multiple of DEVICE_BATCH_SIZE"):
        fit_micro_batch(fake, {**recipe, "DEVICE_BATCH_SIZE": 12}, 2048)


def test_budgets_by_machine_size():
    # A 16 GB Mac: Metal recommends about 10.7 GiB; macOS keeps 4 GiB, so the budget is Metal's.
    assert training_budget(16 * GIB, typical_recommended_working_set(16 * GIB)) / GIB == pytest.approx(10.67, abs=0.01)
    assert training_budget(8 * GIB, typical_recommended_working_set(8 * GIB)) / GIB == pytest.approx(5.0)
    assert training_budget(64 * GIB, None) == 48 * GIB      # off Metal: what the OS leaves
    assert training_budget(None, None) is None


# --- layers whose backward keeps less ------------------------------------------------------
def _check_grads(f, plain, args, rtol=0.03):
    np.testing.assert_allclose(np.array(f(*args).astype(mx.float32)), np.array(plain(*args).astype(mx.float32)),
                               atol=rtol * float(mx.abs(plain(*args)).max().astype(mx.float32)))
    argnums = tuple(range(len(args)))
    cot = mx.random.normal(plain(*args).shape, key=mx.random.key(9))
    grads = mx.grad(lambda *a: (f(*a).astype(mx.float32) * cot).sum(), argnums=argnums)(*args)
    refs = mx.grad(lambda *a: (plain(*a).astype(mx.float32) * cot).sum(), argnums=argnums)(*args)
    for g, ref in zip(grads, refs):
        g, ref = np.array(g.astype(mx.float32)), np.array(ref.astype(mx.float32))
        assert np.abs(ref).max() > 0
        np.testing.assert_allclose(g, ref, atol=rtol * np.abs(ref).max())


@pytest.mark.parametrize("window", [5, 16])          # a short window and full causal attention
@pytest.mark.parametrize("rows", [4, 5, 512])        # backward blocks that divide T, that do not, one block
def test_attention_equals_the_plain_softmax_formula(window, rows, monkeypatch):
    t = load_train(TINY)
    monkeypatch.setitem(vars(t), "ATTENTION_BACKWARD_ROWS", rows)
    q, k, v = (mx.random.normal((2, 2, 16, 8), key=mx.random.key(i)).astype(mx.bfloat16) for i in range(3))
    bias = t.window_bias(16, window)

    def plain(q, k, v):
        s = (q.astype(mx.float32) * 0.3) @ k.astype(mx.float32).swapaxes(-1, -2) + bias.astype(mx.float32)
        return mx.softmax(s, axis=-1) @ v.astype(mx.float32)

    _check_grads(lambda q, k, v: t.attention(q, k, v, 0.3, bias), plain, (q, k, v))


def test_relu2_linear_equals_the_plain_formula():
    t = load_train(TINY)
    h = mx.random.normal((2, 8, 32), key=mx.random.key(0)).astype(mx.bfloat16)
    w = (0.2 * mx.random.normal((16, 32), key=mx.random.key(1))).astype(mx.bfloat16)
    _check_grads(t.relu2_linear, lambda h, w: mx.square(mx.maximum(h, 0)) @ w.T, (h, w))


def test_default_max_memory_gb_follows_the_machine():
    from mlx_ar.backends.mlx.memory import default_max_memory_gb

    sixteen = 16 * GIB
    assert default_max_memory_gb(sixteen, typical_recommended_working_set(sixteen), platform="darwin") == 10.7
    assert default_max_memory_gb(8 * GIB, None, platform="linux") == 5.0
    assert default_max_memory_gb(0, None, platform="linux") is None
    assert default_max_memory_gb(platform="linux") > 0                    # this machine


# --- the guard, end to end -------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    import os
    import subprocess
    import sys

    from _train_utils import ROOT

    cache = tmp_path_factory.mktemp("demo-cache")
    proc = subprocess.run([sys.executable, str(ROOT / "prepare.py"), "--source", "demo"],
                          env={**os.environ, "MLX_AR_CACHE": str(cache)}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return cache


@pytest.mark.slow
def test_a_step_that_cannot_fit_stops_before_training_with_a_one_line_reason(demo_cache, tmp_path, monkeypatch, capsys):
    import json

    from mlx_ar.harness.main import run

    from _train_utils import TRAIN_PY

    monkeypatch.setenv("MLX_AR_CACHE", str(demo_cache))
    monkeypatch.setattr(MLXBackend, "memory_budget", lambda self: 16 * MIB)     # a machine far too small
    record = tmp_path / "run.json"
    assert run(TRAIN_PY, ["--smoke", "30", "--record", str(record)]) == 1
    rec = json.loads(record.read_text())
    assert rec["status"] == "fail" and rec["metrics"]["num_steps"] is None       # no step was trained
    reason = rec["reason"]
    assert reason.startswith("DoesNotFit: the training step needs about") and "shrink the model" in reason
    assert "\n" not in reason
    assert "FAIL: DoesNotFit" in capsys.readouterr().out


def test_the_summary_and_the_record_say_what_auto_chose():
    from mlx_ar.harness.summary import METRIC_KEYS, SUMMARY_KEYS, format_summary, parse_summary

    values = {k: 1 for k in SUMMARY_KEYS}
    block = format_summary({**values, "device_batch": 8})
    assert "\ndevice_batch:     8\n" in block
    assert parse_summary(block)["device_batch"] == 8
    assert "device_batch" in METRIC_KEYS            # the record's metrics, and so the ledger's receipt


def test_the_docs_table_of_mac_sizes_comes_from_the_same_plan():
    from mlx_ar.harness.memory import mac_plans

    rows = {gb: plan.device_rows for gb, _, plan, _ in mac_plans(32, "auto", 142 * MIB, 253 * MIB)}
    assert rows == {8: 16, 16: 32, 24: 32, 36: 32, 64: 32, 128: 32}    # the default recipe fits an 8 GB Mac
    (gb, budget, plan, error), = mac_plans(32, "auto", 142 * MIB, 8 * GIB, sizes_gb=(8,))
    assert plan is None and "shrink the model" in error
