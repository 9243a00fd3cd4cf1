"""Summary block format and parsing, the run record, file hashes, atomic writes, fast-fail."""
import hashlib
import json
import math

import pytest

from mlx_ar.harness.summary import (
    METRIC_KEYS, RECORD_FIELDS, SUMMARY_KEYS, FastFail, budget_label, build_record, check_loss,
    fail_line, file_hashes, format_summary, parse_summary, utc_timestamp, write_record,
)

VALUES = {
    "val_bpb": 1.2345671, "training_seconds": 300.14, "total_seconds": 325.94, "peak_vram_mb": 10500.23,
    "mfu_percent": 12.3449, "total_tokens_M": 168.61, "num_steps": 2573, "num_params_M": 11.5,
    "depth": 4, "heldout_bpb": 1.2501234, "tok_per_sec": 561234.4, "startup_seconds": 12.29, "backend": "mlx",
    "device": "Apple M4 Max (40-core GPU)", "profile": "real", "budget": "300 s", "seed": 42,
    "contract": "3f2a9c0d1e4b5a67", "record": "run.json",
}
# The block exactly as the shared format documents it.
EXPECTED = """---
val_bpb:          1.234567
training_seconds: 300.1
total_seconds:    325.9
peak_vram_mb:     10500.2
mfu_percent:      12.34
total_tokens_M:   168.6
num_steps:        2573
num_params_M:     11.5
depth:            4
heldout_bpb:      1.250123
tok_per_sec:      561234
startup_seconds:  12.3
backend:          mlx
device:           Apple M4 Max (40-core GPU)
profile:          real
budget:           300 s
seed:             42
contract:         3f2a9c0d1e4b5a67
record:           run.json
"""


def test_format_summary_matches_the_shared_format():
    assert format_summary(VALUES) == EXPECTED


def test_format_summary_unknown_mfu_and_errors():
    text = format_summary({**VALUES, "mfu_percent": None})
    assert "\nmfu_percent:      unknown\n" in text
    with pytest.raises(ValueError, match="missing val_bpb"):
        format_summary({k: v for k, v in VALUES.items() if k != "val_bpb"})
    with pytest.raises(ValueError, match="unknown keys valbpb"):
        format_summary({**VALUES, "valbpb": 1.0})


def test_budget_label():
    assert budget_label(300, smoke=False) == "300 s"
    assert budget_label(5.0, smoke=True) == "5 s (smoke run, not comparable)"
    assert budget_label(2.5, smoke=True).startswith("2.5 s ")


def test_summary_round_trip():
    parsed = parse_summary(format_summary(VALUES))
    assert list(parsed) == list(SUMMARY_KEYS)
    assert parsed["val_bpb"] == 1.234567 and parsed["mfu_percent"] == 12.34
    assert parsed["num_steps"] == 2573 and isinstance(parsed["num_steps"], int)
    assert parsed["tok_per_sec"] == 561234 and parsed["seed"] == 42
    assert parsed["device"] == "Apple M4 Max (40-core GPU)" and parsed["budget"] == "300 s"
    assert format_summary(parsed) == EXPECTED  # parse(format(x)) formats back identically


def test_parse_summary_from_a_log_last_block_wins():
    first = format_summary({**VALUES, "val_bpb": 2.0})
    second = format_summary({**VALUES, "mfu_percent": None, "contract": "1234567890123456"})
    log = (
        "loading data\n---\nsome yaml: not a summary\n\n"
        "\rstep 00001 (0.0%) | loss 9.0\rstep 00002 (0.1%) | loss 8.9\n"
        + first + "eval again\n" + second + "done\n"
    )
    parsed = parse_summary(log)
    assert parsed["val_bpb"] == 1.234567
    assert parsed["mfu_percent"] is None
    assert parsed["contract"] == "1234567890123456"  # an all-digit fingerprint stays a string
    # grep-compatibility: the line upstream tooling looks for is there
    assert [l for l in log.splitlines() if l.startswith("val_bpb:")][-1] == "val_bpb:          1.234567"


def test_parse_summary_without_block_and_with_garbage():
    assert parse_summary("") == {}
    assert parse_summary("Traceback (most recent call last):\nFAIL: non-finite loss at step 3\n") == {}
    assert parse_summary("---\nfoo: bar\n") == {}
    with pytest.raises(ValueError, match="val_bpb: abc"):
        parse_summary("---\nval_bpb:          abc\n")


# --- record ----------------------------------------------------------------------------------
def record_fields(**over):
    fields = dict(
        status="ok", backend="mlx", device="Apple M4 Max (40-core GPU)", profile="real", smoke=False,
        time_budget=300, seed=42, dataset="climbmix", recipe={"DEPTH": 4, "ADAM_BETAS": [0.8, 0.95]},
        contract="3f2a9c0d1e4b5a67", contract_parts={"eval_version": 1}, executed_files={"train.py": "ab" * 32},
        versions={"python": "3.12.0", "mlx": "0.32.4"}, started_at="2025-01-01T00:00:00Z",
        finished_at="2025-01-01T00:05:30Z",
        metrics={k: VALUES.get(k, 16) for k in METRIC_KEYS},     # 16: device_batch, not in the block
    )
    fields.update(over)
    return fields


def test_build_record_follows_the_schema():
    rec = build_record(**record_fields())
    assert list(rec) == list(RECORD_FIELDS)
    assert rec["schema"] == 1 and rec["reason"] is None and rec["time_budget"] == 300.0
    assert list(rec["metrics"]) == list(METRIC_KEYS)
    assert rec["metrics"]["num_steps"] == 2573 and isinstance(rec["metrics"]["tok_per_sec"], int)
    json.dumps(rec, allow_nan=False)


def test_build_record_failed_run():
    rec = build_record(**record_fields(status="fail", reason="non-finite loss at step 3",
                                       metrics={"num_steps": 3, "val_bpb": float("nan")}))
    assert rec["metrics"]["val_bpb"] is None and rec["metrics"]["num_steps"] == 3
    assert rec["metrics"]["peak_vram_mb"] is None
    rec = build_record(**{k: v for k, v in record_fields(status="fail", reason="x").items() if k != "metrics"})
    assert all(v is None for v in rec["metrics"].values())


@pytest.mark.parametrize("over, match", [
    ({"status": "fail"}, "needs a reason"),
    ({"reason": "why"}, "ok run has no reason"),
    ({"status": "crashed", "reason": "x"}, "status must be one of"),
    ({"metrics": {"val_bpb": None}}, "finite metrics.val_bpb"),
    ({"metrics": {"bpb": 1.0}}, "unknown metrics bpb"),
    ({"smoke": "no"}, "smoke must be"),
    ({"recipe": [1, 2]}, "recipe must be a dict"),
    ({"schema": 2}, "schema must be 1"),
])
def test_build_record_rejects_bad_records(over, match):
    with pytest.raises(ValueError, match=match):
        build_record(**record_fields(**over))


def test_build_record_names_missing_and_unknown_fields():
    fields = record_fields(colour="blue")
    del fields["dataset"], fields["seed"]
    with pytest.raises(TypeError, match="missing seed, dataset; unknown fields colour"):
        build_record(**fields)


def test_write_record_is_atomic_and_round_trips(tmp_path):
    path = tmp_path / "runs" / "run.json"
    rec = build_record(**record_fields())
    write_record(path, rec)
    assert json.loads(path.read_text()) == rec
    assert [p.name for p in path.parent.iterdir()] == ["run.json"]  # no .tmp left behind
    # A record that cannot be written leaves the previous file whole and no temporary file.
    with pytest.raises(ValueError):
        write_record(path, {**rec, "metrics": {"val_bpb": float("nan")}})
    with pytest.raises(TypeError):
        write_record(path, {**rec, "recipe": {"X": object()}})
    assert json.loads(path.read_text()) == rec
    assert [p.name for p in path.parent.iterdir()] == ["run.json"]
    # A failure after the temporary file exists (the target is a directory) cleans it up too.
    (tmp_path / "adir").mkdir()
    with pytest.raises(OSError):
        write_record(tmp_path / "adir", rec)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "runs"]


def test_file_hashes(tmp_path):
    (tmp_path / "train.py").write_text("print('hi')\n")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "model.py").write_bytes(b"x = 1\n")
    want = hashlib.sha256(b"print('hi')\n").hexdigest()
    assert file_hashes([tmp_path / "train.py"])[str(tmp_path / "train.py")] == want
    hashes = file_hashes(["train.py", "pkg/model.py", tmp_path / "pkg" / "model.py"], root=tmp_path)
    assert hashes == {"train.py": want, "pkg/model.py": hashlib.sha256(b"x = 1\n").hexdigest()}
    with pytest.raises(FileNotFoundError, match="missing.py"):
        file_hashes(["missing.py"], root=tmp_path)
    with pytest.raises(ValueError, match="outside the repository root"):
        file_hashes([tmp_path / "train.py"], root=tmp_path / "pkg")


def test_timestamps():
    ts = utc_timestamp()
    assert len(ts) == 20 and ts.endswith("Z") and ts[10] == "T"


# --- fast-fail -------------------------------------------------------------------------------
@pytest.mark.parametrize("loss, message", [
    (float("nan"), "non-finite loss at step 7"),
    (float("inf"), "non-finite loss at step 7"),
    (-math.inf, "non-finite loss at step 7"),
    (123.456, "loss 123.5 > 100 at step 7"),
])
def test_check_loss_fails_fast(loss, message):
    with pytest.raises(FastFail) as e:
        check_loss(loss, step=7)
    assert str(e.value) == message
    assert fail_line(str(e.value)) == f"FAIL: {message}"


def test_check_loss_accepts_normal_losses():
    for loss in (100.0, 9.01, 0.0):
        check_loss(loss, step=1)
    assert issubclass(FastFail, RuntimeError)
