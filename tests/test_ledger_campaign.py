"""Campaign settings: defaults, campaign.toml, validation messages, overrides, the child command."""
import json
import sys

import pytest

from mlx_ar.constants import TIME_BUDGET
from mlx_ar.ledger.campaign import Campaign, CampaignError, load_campaign


def test_defaults_without_a_file(tmp_path):
    c = load_campaign(tmp_path)
    assert c == Campaign() and c.source is None
    assert (c.objective, c.direction, c.gate, c.tier, c.mutable) == ("val_bpb", "min", "auto", "code", ("train.py",))
    assert c.timeout_s == 2 * TIME_BUDGET + 300
    assert c.command("runs/1/run.json", 43) == [sys.executable, "train.py", "--record", "runs/1/run.json",
                                                "--seed", "43", "--backend", "mlx"]
    json.dumps(c.to_dict())  # recorded in receipts
    assert Campaign(backend="cuda").mutable == ("train.py", "train_torch.py")


def test_timeout_follows_the_data_profile_budget():
    from mlx_ar.constants import DEMO, REAL

    # The demo profile's 60 s budget: 2 x 60 + an allowance of 2 x 60, not the real contract's 900 s.
    assert Campaign().for_profile(DEMO).timeout_s == 240
    assert Campaign().for_profile(REAL).timeout_s == 900
    # An explicit time_budget wins over the profile's; a smoke budget sets the run's length.
    assert Campaign(time_budget=30).for_profile(DEMO).timeout_s == 2 * 30 + 60
    assert Campaign(smoke=5).for_profile(DEMO).timeout_s == 2 * 5 + 120
    assert Campaign(train_args=("--data", "mine")).dataset_arg() == "mine"
    assert Campaign(train_args=("--data=x",)).dataset_arg() == "x" and Campaign().dataset_arg() is None


def test_campaign_file_and_overrides(tmp_path):
    (tmp_path / "campaign.toml").write_text(
        'gate = "significance"\nconfidence = 0.9\nmax_memory_gb = 14\ntier = "config"\n'
        'mutable = ["train.py", "mlx_ar/backends/torch_model.py"]\ntrain_args = ["--data", "demo"]\n'
        'time_budget = 60\neval_allowance = 120\nsmoke = 5\nbackend = "cuda"\n')
    c = load_campaign(tmp_path)
    assert c.gate == "significance" and c.max_memory_gb == 14.0 and isinstance(c.max_memory_gb, float)
    assert c.mutable == ("train.py", "mlx_ar/backends/torch_model.py") and c.source.endswith("campaign.toml")
    assert c.timeout_s == 2 * 5 + 120  # the smoke budget sets the timeout
    assert c.command("r.json", 1)[-6:] == ["--backend", "cuda", "--smoke", "5", "--data", "demo"]
    o = load_campaign(tmp_path, overrides={"gate": "single", "seed": None})
    assert o.gate == "single" and o.seed == 42 and o.confidence == 0.9


@pytest.mark.parametrize("text,message", [
    ('gate = "maybe"', "gate must be one of auto, single, significance"),
    ("confidence = 1.5", "confidence must be between 0.5 and 1"),
    ('max_memory_gb = "lots"', "max_memory_gb must be a number"),
    ("seed = 1.5", "seed must be an integer"),
    ('mutable = "train.py"', "mutable must be a list of strings"),
    ('mutable = ["../outside.py"]', "mutable entries are paths inside the repository"),
    ("min_keep_runs = 4\nmax_runs = 3", "need 1 <= min_keep_runs <= max_runs"),
    ("allow_smoke = 1", "allow_smoke must be true or false"),
    ("colour = 3", "unknown setting colour (known: allow_smoke"),
    ("gate = ", "not valid TOML"),
])
def test_bad_settings_name_the_file_and_the_key(tmp_path, text, message):
    (tmp_path / "campaign.toml").write_text(text + "\n")
    with pytest.raises(CampaignError) as e:
        load_campaign(tmp_path)
    assert str(e.value).startswith(str(tmp_path / "campaign.toml")) and message in str(e.value)


def test_explicit_file_must_exist_and_overrides_are_validated(tmp_path):
    with pytest.raises(CampaignError, match="campaign file not found"):
        load_campaign(tmp_path, "nope.toml")
    with pytest.raises(CampaignError, match="command-line options: gate must be one of"):
        load_campaign(tmp_path, overrides={"gate": "bogus"})


def test_the_memory_ceiling_follows_the_machine_unless_set():
    from mlx_ar.ledger.campaign import Campaign

    assert Campaign().for_machine(10.7).max_memory_gb == 10.7
    assert Campaign(max_memory_gb=14).for_machine(10.7).max_memory_gb == 14
    assert Campaign(backend="cuda").for_machine(10.7).max_memory_gb is None
    assert Campaign().for_machine(None).max_memory_gb is None


def test_commands_that_train_take_the_machine_ceiling_and_others_do_not(tmp_path):
    from mlx_ar.backends.mlx.memory import default_max_memory_gb
    from mlx_ar.ledger.cli import _campaign, _training_campaign

    assert _training_campaign(tmp_path, None).max_memory_gb == default_max_memory_gb()
    assert _campaign(tmp_path, None).max_memory_gb is None
    (tmp_path / "campaign.toml").write_text("max_memory_gb = 3\n")
    assert _training_campaign(tmp_path, None).max_memory_gb == 3
