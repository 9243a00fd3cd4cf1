"""compile_ahead.py: helper processes that compile kernels and the optimizer while the model compiles.

On the CPU: a helper's success, failure and time limit; which helpers each gate waits for; the
stamps and keys that decide whether helpers start at all; the retry of a first step that runs
out of memory while a helper holds some; the jobs themselves (in this process, and one in a
fresh process through the module's entry point); the loss op's gate. The speed-up itself is
measured on a GPU (the closing note of #4), not asserted here.
"""
import io
import json
import math
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from _train_utils import TINY, TRAIN_PY, recipe_of
from mlx_ar.backends import compile_ahead
from mlx_ar.backends.cuda_backend import KERNEL_SWITCHES, CudaBackend, compile_ahead_wanted, load_torch_file

V, T = 97, 32


@pytest.fixture(autouse=True)
def no_helpers_left(monkeypatch):
    """Each test starts and ends with no registered helpers (a fresh registry per test)."""
    for name in ("_running", "_standby", "_released", "_spec_files"):
        monkeypatch.setattr(compile_ahead, name, [])


def spec(**extra):
    return {"train_file": str(TRAIN_PY), "recipe": recipe_of(TINY), "vocab_size": V, "seq_len": T, "seed": 0,
            **extra}


class FakeProc:
    """A finished helper process: writes `output` to its log and exits with `code`."""

    def __init__(self, argv, stdout, code=0, output="", **kw):
        self.argv, self.env, self.code = argv, kw.get("env"), code
        stdout.write(output.encode())
        stdout.flush()
        self.waited = False

    def wait(self, timeout=None):
        self.waited = True
        return self.code

    def poll(self):
        return self.code

    def kill(self):
        pass


# --- one helper -------------------------------------------------------------------------------
def test_a_helper_reports_its_result_or_why_it_failed_or_ran_out_of_time(tmp_path):
    ok = compile_ahead.Helper("optimizer", [sys.executable, "-c", 'print("compiling"); print(\'{"ready_seconds": 1.5}\')'],
                              log_dir=tmp_path)
    assert ok.wait(60) is None and ok.report == {"ready_seconds": 1.5}
    assert not list(tmp_path.glob("*.log"))                     # a clean helper leaves no log

    bad = compile_ahead.Helper("attention", [sys.executable, "-c", 'print("kernel compile failed"); raise SystemExit(3)'],
                               log_dir=tmp_path)
    why = bad.wait(60)
    assert "exited with code 3" in why and "kernel compile failed" in why
    assert list(tmp_path.glob("*attention*.log"))                # kept for the user, named in `why`

    slow = compile_ahead.Helper("mlp+loss+rope", [sys.executable, "-c", "import time; time.sleep(60)"], log_dir=tmp_path)
    why = slow.wait(0.5)
    assert why.startswith("no result after") and slow.proc.poll() is not None   # stopped, not left behind


def test_the_last_output_line_is_the_report():
    assert compile_ahead._last_json('noise\n{"job": "optimizer", "seconds": 2.0}\n') == {"job": "optimizer",
                                                                                           "seconds": 2.0}
    assert compile_ahead._last_json("no json here") == {}
    assert compile_ahead._last_json("") == {}
    assert compile_ahead._last_json("[1, 2]") == {}


# --- the gates ---------------------------------------------------------------------------------
def test_kernel_launches_wait_for_kernel_helpers_and_the_update_for_all(tmp_path):
    procs = {}

    def popen(argv, stdout, **kw):
        job = argv[-2]
        code = 5 if job == "mlp+loss+rope" else 0
        procs[job] = FakeProc(argv, stdout, code=code, output=json.dumps({"ready_seconds": 2.5}), **kw)
        return procs[job]

    env = {"MLX_AR_MLP": "quack", "PATH": "/bin"}
    helpers = compile_ahead.start(["attention", "mlp+loss+rope", "optimizer"], spec(), env=env, log_dir=tmp_path,
                                  popen=popen)
    assert [h.job for h in helpers] == ["attention", "mlp+loss+rope", "optimizer"]
    argv = procs["optimizer"].argv
    assert argv[:3] == [sys.executable, "-m", "mlx_ar.backends.compile_ahead"] and argv[3] == "optimizer"
    with open(argv[4], "rb") as f:               # every helper reads the same pickled spec
        given = pickle.load(f)
    assert given["recipe"] == recipe_of(TINY) and given["started"] > 0
    # each helper compiles its own kernels only, and starts no helpers of its own
    assert procs["attention"].env == {**env, "MLX_AR_MLP": "torch", "MLX_AR_LOSS": "torch", "MLX_AR_NORM_ROPE": "torch",
                                      compile_ahead.ENV: "0"}
    assert procs["mlp+loss+rope"].env == {**env, "MLX_AR_ATTENTION": "torch", compile_ahead.ENV: "0"}
    assert procs["optimizer"].env["MLX_AR_MLP"] == "torch" and procs["optimizer"].env["MLX_AR_ATTENTION"] == "torch"
    assert compile_ahead.job_env("backward", env) == {**env, compile_ahead.ENV: "0"}   # the model as chosen here

    out = io.StringIO()
    waited = compile_ahead.wait(compile_ahead.KERNEL_JOBS, out=out)
    assert [h.job for h in waited] == ["attention", "mlp+loss+rope"]
    assert compile_ahead.running() and not procs["optimizer"].waited
    text = out.getvalue()
    assert "compile-ahead mlp+loss+rope: exited with code 5" in text and "compiles it instead" in text
    assert "ready after attention 2.5 s" in text
    assert (tmp_path / argv[4]).exists()          # the optimizer helper has not been waited for yet

    compile_ahead.wait_kernels()                  # nothing left for the kernel gate: returns at once
    assert compile_ahead.wait(out=out)[0].job == "optimizer" and procs["optimizer"].waited
    assert not compile_ahead.running() and not (tmp_path / argv[4]).exists()
    assert compile_ahead.wait(out=out) == []


# --- standby helpers ---------------------------------------------------------------------------
class FakeStandby:
    """A standby helper process: records what start() writes to its input."""

    def __init__(self, argv, stdout, stdin=None, env=None, **kw):
        self.argv, self.env, self.stdin, self.code = argv, env, io.BytesIO(), None
        self.stdin.close = lambda: setattr(self, "closed", True)
        self.closed = False

    def poll(self):
        return self.code

    def wait(self, timeout=None):
        self.code = 0
        return 0

    def kill(self):
        self.code = -9


def test_standby_helpers_are_wanted_only_where_a_gpu_is_listed_and_helpers_are_on(tmp_path):
    gpus = tmp_path / "gpus"
    assert not compile_ahead.standby_wanted(None, env={}, gpus=gpus)            # no NVIDIA driver
    gpus.mkdir()
    assert not compile_ahead.standby_wanted(None, env={}, gpus=gpus)            # the driver lists no GPU
    (gpus / "0000:00:05.0").mkdir()
    assert compile_ahead.standby_wanted(None, env={}, gpus=gpus)
    assert not compile_ahead.standby_wanted(None, env={compile_ahead.ENV: "0"}, gpus=gpus)
    assert not compile_ahead.standby_wanted("none", env={}, gpus=gpus)
    assert not compile_ahead.standby_wanted(None, env={"MLX_AR_TORCH_COMPILE": "None"}, gpus=gpus)
    assert not compile_ahead.standby_wanted(None, env={"CUDA_VISIBLE_DEVICES": ""}, gpus=gpus)
    assert compile_ahead.standby_wanted("model", env={"CUDA_VISIBLE_DEVICES": "3"}, gpus=gpus)


def test_start_gives_jobs_to_standby_helpers_first_and_releases_the_rest(tmp_path):
    standby = compile_ahead.stand_by(2, env={"PATH": "/bin"}, log_dir=tmp_path, popen=FakeStandby)
    assert all(h.proc.argv[-1] == "--standby" and h.proc.env[compile_ahead.ENV] == "0" for h in standby)
    spawned = []

    def popen(argv, stdout, **kw):
        spawned.append(argv[-2])
        return FakeProc(argv, stdout, **kw)

    helpers = compile_ahead.start(["attention", "mlp+loss+rope", "optimizer"], spec(), env={"PATH": "/bin"},
                                  log_dir=tmp_path, popen=popen)
    assert helpers[:2] == standby and spawned == ["optimizer"]
    for helper, job in zip(standby, ["attention", "mlp+loss+rope"]):
        order = json.loads(helper.proc.stdin.getvalue())
        assert helper.job == job and order["job"] == job and helper.proc.closed
        assert order["env"] == compile_ahead.job_env(job, {"PATH": "/bin"})
        assert order["spec"] == helpers[2].proc.argv[-1]                        # the same spec file
    compile_ahead._stop_all()

    extra = compile_ahead.stand_by(2, env={}, log_dir=tmp_path, popen=FakeStandby)
    helpers = compile_ahead.start(["optimizer"], spec(), env={}, log_dir=tmp_path, popen=None)
    assert helpers == extra[:1] and extra[1].proc.closed and extra[1].proc.stdin.getvalue() == b""
    assert compile_ahead._standby == [] and compile_ahead._released == [extra[1]]
    compile_ahead._stop_all()
    assert compile_ahead._released == [] and not list(tmp_path.glob("*.log"))

    idle = compile_ahead.stand_by(1, env={}, log_dir=tmp_path, popen=FakeStandby)
    assert compile_ahead.start([], spec(), log_dir=tmp_path) == []             # all stamped: no jobs
    assert idle[0].proc.closed and compile_ahead._standby == []
    idle = compile_ahead.stand_by(1, env={}, log_dir=tmp_path, popen=FakeStandby)
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):     # a spec that cannot be sent
        compile_ahead.start(["optimizer"], spec(compile_options={"backend": lambda gm, inputs: gm}), log_dir=tmp_path)
    assert idle[0].proc.closed and idle[0].proc.stdin.getvalue() == b"" and compile_ahead._standby == []
    compile_ahead._stop_all()


def test_a_real_standby_helper_runs_the_job_it_is_given_and_one_given_none_exits(tmp_path):
    out = io.StringIO()
    compile_ahead.stand_by(2, log_dir=tmp_path)
    helpers = compile_ahead.start(["optimizer"], spec(compile_options={"backend": "aot_eager"}), log_dir=tmp_path)
    released = list(compile_ahead._released)
    assert compile_ahead.wait(out=out) == helpers
    assert "ready after optimizer" in out.getvalue(), out.getvalue()
    assert helpers[0].report["job"] == "optimizer" and helpers[0].report["ready_seconds"] > 0
    assert released[0].proc.wait(60) == 0                                      # no job: a clean exit
    compile_ahead.wait(out=out)                                                # forgets it and its log
    assert compile_ahead._released == [] and not list(tmp_path.iterdir())


def test_a_backend_that_wants_no_helpers_releases_the_standby_ones(tmp_path, monkeypatch):
    def stand_by():
        compile_ahead._standby.append(compile_ahead.Helper(None, ["x"], log_dir=tmp_path, popen=FakeStandby))

    monkeypatch.setattr(compile_ahead, "standby_wanted", lambda mode=None: True)
    monkeypatch.setattr(compile_ahead, "stand_by", stand_by)
    CudaBackend({"__file__": str(TRAIN_PY)})                                   # on the CPU: no helpers wanted
    assert compile_ahead._standby == [] and compile_ahead._released[0].proc.closed
    compile_ahead._stop_all()


def test_no_jobs_start_nothing(tmp_path):
    assert compile_ahead.start([], spec(), log_dir=tmp_path, popen=None) == []
    assert not list(tmp_path.iterdir())


def test_forward_launches_wait_for_forward_kernels_and_backward_launches_for_the_rest(tmp_path):
    """A kernel helper that has compiled its forward kernels keeps compiling its backward ones while
    this process goes on; one that has exited is reported; one that says nothing in time is stopped."""
    ready = json.dumps({"ready_seconds": 1.0})
    go = tmp_path / "go"   # the attention helper finishes its backward kernels only once this exists
    scripts = {
        "attention": f"import os, time; print({compile_ahead.FORWARD_DONE!r}, flush=True)\n"
                     f"while not os.path.exists({str(go)!r}): time.sleep(0.02)\nprint({ready!r})",
        "mlp+loss+rope": f"print({ready!r})",
        "optimizer": "import time; time.sleep(60)",
    }

    def popen(argv, **kw):
        return subprocess.Popen([sys.executable, "-c", scripts[argv[-2]]], **kw)

    helpers = {h.job: h for h in compile_ahead.start(scripts, spec(), log_dir=tmp_path, popen=popen)}
    helpers["mlp+loss+rope"].proc.wait()
    out = io.StringIO()
    compile_ahead.wait_kernels(forward_only=True, out=out)
    assert helpers["attention"].forward_done and helpers["attention"].proc.poll() is None   # still compiling
    assert [h.job for h in compile_ahead._running] == ["attention", "optimizer"]
    assert "ready after mlp+loss+rope 1.0 s" in out.getvalue()
    assert "forward kernels of attention ready" in out.getvalue()
    compile_ahead.wait_kernels(forward_only=True, out=out)          # said once: no second look
    go.touch()
    compile_ahead.wait_kernels(out=out)                             # a backward launch: the rest
    assert helpers["attention"].proc.poll() == 0 and [h.job for h in compile_ahead._running] == ["optimizer"]
    assert "ready after attention 1.0 s" in out.getvalue()

    silent = compile_ahead.Helper("attention", [sys.executable, "-c", "import time; time.sleep(60)"], log_dir=tmp_path)
    compile_ahead._running.append(silent)
    compile_ahead.wait_kernels(forward_only=True, timeout=0.3, out=out)
    assert silent.proc.poll() is not None and silent not in compile_ahead._running
    assert "no forward kernels after 0.3 s (stopped it)" in out.getvalue()
    compile_ahead._stop_all()


@pytest.mark.parametrize("forward_only", [True, False])
def test_the_forward_gate_does_nothing_when_no_kernel_helper_runs(forward_only, monkeypatch):
    monkeypatch.setattr(compile_ahead, "wait", lambda *a, **kw: pytest.fail("waited"))
    compile_ahead.wait_kernels(forward_only=forward_only)


def test_the_loss_op_takes_the_forward_gate_before_its_launch(monkeypatch):
    from mlx_ar.backends import softcap_ce

    gates = []
    monkeypatch.setattr(compile_ahead, "wait_kernels", lambda forward_only=False, **kw: gates.append(forward_only))
    h, w = torch.randn(6, 8), torch.randn(11, 8)
    targets = torch.randint(0, 11, (6,))
    softcap_ce.cross_entropy(h, w, targets, 15.0)
    assert gates == [True]


def test_the_first_backward_waits_for_the_backward_helper_unless_the_model_was_cached(tmp_path, monkeypatch):
    out = io.StringIO()
    assert compile_ahead.gate_backward(lambda: "loss", out=out) == "loss"     # no helper: just the forward
    hits = iter([0, 0])
    monkeypatch.setattr(compile_ahead, "cache_hits", lambda: next(hits))
    popen = lambda argv, stdout, **kw: FakeProc(argv, stdout, output=json.dumps({"ready_seconds": 3.0}), **kw)
    backward, optimizer = compile_ahead.start(["backward", "optimizer"], spec(), log_dir=tmp_path, popen=popen)
    calls = []
    assert compile_ahead.gate_backward(lambda: calls.append("forward") or "loss", out=out) == "loss"
    assert calls == ["forward"] and backward.proc.waited and not optimizer.proc.waited
    assert "ready after backward 3.0 s" in out.getvalue()
    assert [h.job for h in compile_ahead._running] == ["optimizer"]

    # The forward came from the caches: so does the backward; the helper is stopped, not waited for.
    slow = compile_ahead.Helper("backward", [sys.executable, "-c", "import time; time.sleep(60)"], log_dir=tmp_path)
    compile_ahead._running.append(slow)
    hits = iter([4, 5])
    assert compile_ahead.gate_backward(lambda: "loss", out=out) == "loss"
    assert slow.proc.poll() is not None and slow not in compile_ahead._running
    assert "backward helper stopped" in out.getvalue()
    compile_ahead._stop_all()


def test_the_backward_helper_compiles_the_backward_graph_the_training_process_then_loads(tmp_path, monkeypatch):
    """On the CPU with inductor: the job traces the model and compiles only its backward (the
    forward stand-in never runs); a fresh compile of the same model in this process then takes the
    backward from inductor's cache and computes the same gradients as eager."""
    import torch._inductor.config as inductor_config

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    with inductor_config.patch(compile_threads=1):                    # no worker pool for two small graphs
        _backward_job_then_training_compile()


def _backward_job_then_training_compile():
    from torch._dynamo.utils import counters

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.up, self.out = torch.nn.Embedding(V, 16), torch.nn.Linear(16, 32), torch.nn.Linear(32, V)

        def forward(self, idx, targets):
            z = self.out(torch.relu(self.up(self.emb(idx))).square())
            return torch.nn.functional.cross_entropy(z.view(-1, V), targets.view(-1))

    torch.manual_seed(0)
    model = Tiny()
    torch._dynamo.reset()
    counters.clear()
    assert compile_ahead.compile_backward_only(torch.compile(model, fullgraph=True, dynamic=False), 2, 8, "cpu")
    assert counters["inductor"]["fxgraph_cache_miss"] == 1                  # the backward alone
    assert all(p.grad is None for p in model.parameters())                   # nothing ran

    torch._dynamo.reset()
    counters.clear()
    x, y = torch.randint(0, V, (2, 8)), torch.randint(0, V, (2, 8))
    torch.compile(model, fullgraph=True, dynamic=False)(x, y).backward()
    assert (counters["inductor"]["fxgraph_cache_miss"], counters["inductor"]["fxgraph_cache_hit"]) == (1, 1)
    compiled = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x, y).backward()
    for got, want in zip(compiled, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


# --- whether helpers start ---------------------------------------------------------------------
def test_stamps_say_which_jobs_still_need_a_helper(tmp_path):
    keys = {"attention": "k1", "optimizer": "k2"}
    assert compile_ahead.plan(keys, tmp_path / "stamps") == keys
    compile_ahead.mark_done(keys, tmp_path / "stamps")
    assert compile_ahead.plan(keys, tmp_path / "stamps") == {}
    assert compile_ahead.plan({"attention": "k1", "optimizer": "k3"}, tmp_path / "stamps") == {"optimizer": "k3"}
    blocker = tmp_path / "file"
    blocker.write_text("")
    compile_ahead.mark_done(keys, blocker / "stamps")   # cannot be written: skipped, not an error


def test_compile_ahead_wanted_on_a_gpu_with_a_compiled_model_unless_switched_off():
    assert compile_ahead_wanted(True, "model", env={})
    assert compile_ahead_wanted(True, "blocks", env={compile_ahead.ENV: "1"})
    assert not compile_ahead_wanted(True, "model", env={compile_ahead.ENV: "0"})
    assert not compile_ahead_wanted(True, "none", env={})
    assert not compile_ahead_wanted(False, "model", env={})
    with pytest.raises(ValueError, match="MLX_AR_COMPILE_AHEAD='yes'"):
        compile_ahead_wanted(True, "model", env={compile_ahead.ENV: "yes"})


OPT_SRC = '''
import functools
SCALE = 2.0

def helper(x):
    return x * SCALE

@functools.lru_cache
def unrelated():
    return 1

def deco(f):
    @functools.wraps(f)
    def inner(*a):
        return f(*a)
    return inner

@deco
def update(x):
    return helper(x) + 1

class Opt:
    def step(self, x):
        return update(x)
'''


def test_code_fingerprint_follows_what_the_optimizer_uses_and_nothing_else(tmp_path):
    def fingerprint(src, name):
        path = tmp_path / f"{name}.py"
        path.write_text(src)
        m = load_torch_file(path)                 # as the backend loads train_torch.py
        return compile_ahead.code_fingerprint(m, [m.Opt])

    base = fingerprint(OPT_SRC, "m0")
    assert fingerprint(OPT_SRC, "m1") == base                                       # stable across loads
    assert fingerprint(OPT_SRC.replace("return 1", "return 2"), "m2") == base       # not used by Opt
    assert fingerprint(OPT_SRC + "\n# a comment\n", "m3") == base
    assert fingerprint(OPT_SRC.replace("SCALE = 2.0", "SCALE = 3.0"), "m4") != base  # a constant it reads
    assert fingerprint(OPT_SRC.replace("x * SCALE", "x * SCALE * 1"), "m5") != base  # two calls deep
    assert fingerprint(OPT_SRC.replace("helper(x) + 1", "helper(x) + 2"), "m6") != base  # behind a decorator


def test_optimizer_key_ignores_learning_rates_but_not_what_the_update_bakes_in(monkeypatch):
    for switch in KERNEL_SWITCHES.values():
        monkeypatch.setenv(switch, "torch")      # no custom kernels, so no kernel jobs, on any machine

    def keys(**overrides):
        b = CudaBackend({"__file__": str(TRAIN_PY)}, compile_mode="none")
        b.build(recipe_of({**TINY, **overrides}), V, T, seed=0)
        return b.compile_ahead_keys()

    base = keys()
    assert set(base) == {"optimizer"}
    assert keys(EMBEDDING_LR=0.3, WEIGHT_DECAY=0.1) == base   # 0-d tensors in the update, not constants
    assert keys(NS_STEPS=3) != base               # the compiled update loops NS_STEPS times
    assert keys(MATRIX_LR=0.01) != base
    assert keys(DEPTH=3) != base                  # new parameter shapes


def test_kernel_jobs_are_keyed_by_the_kernels_and_the_model_config():
    b = CudaBackend({"__file__": str(TRAIN_PY)}, compile_mode="none")
    b.build(recipe_of(TINY), V, T, seed=0)
    b.kernels = {"attention": "fa4 4.0.0b36", "mlp": "torch", "loss": "triton 3.6.0 (...)"}
    keys = b.compile_ahead_keys()
    assert set(keys) == {"attention", "mlp+loss+rope", "optimizer"}
    b.kernels["attention"] = "fa4 4.0.0b37"
    assert b.compile_ahead_keys()["attention"] != keys["attention"]
    assert b.compile_ahead_keys()["mlp+loss+rope"] == keys["mlp+loss+rope"]
    b.kernels["loss"] = "torch (triton not used: MLX_AR_LOSS=torch)"
    assert "mlp+loss+rope" not in b.compile_ahead_keys()
    b.kernels["norm_rope"] = "triton 3.6.0 (...)"            # that job also compiles the norm + RoPE kernels
    assert "mlp+loss+rope" in b.compile_ahead_keys()


def test_the_backward_job_is_keyed_by_the_model_file_its_config_kernels_and_batch_shape(tmp_path, monkeypatch):
    for switch in KERNEL_SWITCHES.values():
        monkeypatch.setenv(switch, "torch")
    train = tmp_path / "train.py"
    train.write_text(TRAIN_PY.read_text())
    model_file = tmp_path / "train_torch.py"
    model_file.write_text((TRAIN_PY.parent / "train_torch.py").read_text())

    def keys(mode="model", **overrides):
        b = CudaBackend({"__file__": str(train)}, compile_mode=mode)    # on the CPU torch.compile is lazy
        b.build(recipe_of({**TINY, **overrides}), V, T, seed=0)
        return b.compile_ahead_keys()

    base = keys()["backward"]
    assert "backward" not in keys(mode="none") and "backward" not in keys(mode="blocks")
    assert keys(EMBEDDING_LR=0.3)["backward"] == base          # the update's business, not the graph's
    assert keys(DEPTH=3)["backward"] != base
    assert keys(DEVICE_BATCH_SIZE=32)["backward"] != base      # rows per forward (train.py: 16)
    model_file.write_text(model_file.read_text().replace("NORM_EPS = 1e-6", "NORM_EPS = 2e-6"))
    assert keys()["backward"] != base


def test_helpers_that_cannot_be_given_the_spec_are_skipped_with_a_message(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(compile_ahead, "stamp_dir", lambda: tmp_path)
    monkeypatch.setattr(compile_ahead.tempfile, "tempdir", str(tmp_path))
    b = CudaBackend({"__file__": str(TRAIN_PY)}, compile_mode="none", compile_options={"backend": lambda gm, x: gm})
    b.build(recipe_of(TINY), V, T, seed=0)
    b._start_helpers(recipe_of(TINY), V, T, 0)    # what a GPU build does
    assert "compile-ahead: no helpers (" in capsys.readouterr().err
    assert not compile_ahead.running() and not list(tmp_path.iterdir())


def test_a_first_step_stamps_its_keys(tmp_path, monkeypatch):
    monkeypatch.setattr(compile_ahead, "stamp_dir", lambda: tmp_path)
    b = CudaBackend({"__file__": str(TRAIN_PY)}, compile_mode="none")
    b.build(recipe_of(TINY), V, T, seed=0)
    b._ahead_keys = b.compile_ahead_keys()        # as a GPU build would set them
    x = np.random.default_rng(0).integers(0, V, (2, 1, 2, T)).astype(np.uint16)
    b.loss_value(b.step(x[0], x[1]))
    assert compile_ahead.plan(b._ahead_keys, tmp_path) == {}


# --- a first step that runs out of memory while a helper holds some -----------------------------
def test_out_of_memory_with_a_helper_running_waits_and_runs_again(monkeypatch):
    calls, resets, waits = [], [], []

    def run():
        calls.append(1)
        if len(calls) == 1:
            raise MemoryError("out of memory")
        return "loss"

    monkeypatch.setattr(compile_ahead, "_running", ["the optimizer helper"])
    monkeypatch.setattr(compile_ahead, "wait", lambda *a, **k: (waits.append(1), compile_ahead._running.clear()))
    assert compile_ahead.retry_out_of_memory(run, lambda: resets.append(1)) == "loss"
    assert (len(calls), resets, waits) == (2, [1], [1])

    calls.clear()
    with pytest.raises(MemoryError):              # no helper running: the step really does not fit
        compile_ahead.retry_out_of_memory(run, lambda: resets.append(1))
    assert len(calls) == 1 and resets == [1]


# --- the jobs ----------------------------------------------------------------------------------
def test_jobs_run_the_kernels_and_compile_the_optimizer():
    graphs = []

    def recording(gm, example_inputs):            # a compiler that records what it was given
        graphs.append(gm)
        return gm.forward

    done = compile_ahead.run_job("optimizer", spec(compile_options={"backend": recording}))
    assert done["job"] == "optimizer" and graphs, "the optimizer update was not compiled"
    for job in compile_ahead.KERNEL_JOBS:
        done = compile_ahead.run_job(job, spec())
        assert done["job"] == job and math.isfinite(done["loss"]) and done["loss"] > 0
    assert "ready_seconds" in compile_ahead.run_job("mlp+loss+rope", spec(started=0.0))
    with pytest.raises(ValueError, match="unknown compile-ahead job 'bogus'"):
        compile_ahead.run_job("bogus", spec())


def test_a_helper_process_runs_a_job_through_the_entry_point(tmp_path):
    out = io.StringIO()
    helpers = compile_ahead.start(["optimizer"], spec(compile_options={"backend": "aot_eager"}), log_dir=tmp_path)
    assert compile_ahead.wait(out=out) == helpers
    assert "ready after optimizer" in out.getvalue(), out.getvalue()
    assert helpers[0].report["job"] == "optimizer" and helpers[0].report["ready_seconds"] > 0
    assert not list(tmp_path.iterdir())           # spec and log removed


def test_a_helper_compiles_with_few_inductor_workers(tmp_path):
    import torch._inductor.config as inductor_config

    path = tmp_path / "spec.pkl"
    path.write_bytes(pickle.dumps(spec(compile_options={"backend": "aot_eager"})))
    with inductor_config.patch(compile_threads=16):
        assert compile_ahead.run("optimizer", str(path)) == 0
        assert inductor_config.compile_threads == compile_ahead.HELPER_COMPILE_THREADS < 16


def test_the_entry_point_needs_a_job_and_a_spec():
    r = subprocess.run([sys.executable, "-m", "mlx_ar.backends.compile_ahead"], capture_output=True, text=True)
    assert r.returncode == 2 and "usage" in r.stderr
