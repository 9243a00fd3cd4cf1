"""Offline, `prepare` says what to do at once instead of retrying name resolution for a minute."""
import socket
import time
import urllib.error

import pytest

from mlx_ar.data.download import DownloadSettings, download_shards, fetch_one
from mlx_ar.data.errors import DownloadError


def test_name_resolution_failure_is_not_retried(tmp_path):
    slept, calls = [], []

    def urlopen(url, timeout):
        calls.append(url)
        raise urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution"))
    with pytest.raises(DownloadError) as e:
        fetch_one("https://huggingface.co/x.parquet", tmp_path / "x.parquet", sleep=slept.append, urlopen=urlopen)
    assert len(calls) == 1 and slept == []
    msg = str(e.value)
    assert "cannot reach huggingface.co" in msg and "--source demo" in msg and "--source local" in msg


def test_other_network_errors_are_still_retried(tmp_path):
    slept = []

    def urlopen(url, timeout):
        raise urllib.error.URLError(ConnectionRefusedError(111, "Connection refused"))
    with pytest.raises(DownloadError, match="after 3 attempt"):
        fetch_one("https://h/x.parquet", tmp_path / "x.parquet", DownloadSettings(retries=2), sleep=slept.append,
                  urlopen=urlopen)
    assert slept == [2.0, 4.0]


def test_download_from_an_unresolvable_host_fails_fast_with_one_message(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(DownloadError) as e:
        download_shards([0, 1, 2], tmp_path, "https://mlx-ar-test.invalid/data", sleep=lambda s: None)
    assert time.monotonic() - t0 < 10
    assert str(e.value).startswith("cannot reach mlx-ar-test.invalid") and "--source demo" in str(e.value)
