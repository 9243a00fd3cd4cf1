"""Outputs that must say what is true: the train command's usage, the datasets that exist."""
import pytest
from click.testing import CliRunner

from mlx_ar.data import DataError, open_dataset
from mlx_ar.harness.cli import train_command


def test_train_help_names_the_command():
    res = CliRunner().invoke(train_command, ["--help"])
    assert res.exit_code == 0 and res.output.startswith("usage: mlx-ar train "), res.output


def test_unknown_dataset_lists_the_prepared_ones(data_cache):
    (data_cache / "datasets" / "demo").mkdir(parents=True)
    (data_cache / "datasets" / "demo" / "manifest.json").write_text("{}")
    (data_cache / "datasets" / "half").mkdir()   # an interrupted prepare: no manifest
    with pytest.raises(DataError) as e:
        open_dataset("nosuch")
    msg = str(e.value)
    assert "prepared here: demo (pass --data demo)" in msg and "half" not in msg.split("prepared here")[1]
    assert "has not been run" not in msg
    with pytest.raises(DataError, match="its prepare was interrupted"):
        open_dataset("half")
