"""Shard downloads against a loopback HTTP server with injected faults."""
import io

import pytest

from conftest import prose_docs, write_parquet
from mlx_ar.data.download import DownloadSettings, download_shards, fetch_one, shard_is_valid
from mlx_ar.data.errors import DataError, DownloadError
from mlx_ar.data.sources import climbmix_shard_name

# A 2-core CI machine under load can take longer than a fraction of a second to answer a healthy
# request, so the timeout is generous and the "slow" fault waits well beyond it.
FAST = DownloadSettings(workers=4, retries=3, backoff=0.5, timeout=2.0, chunk_bytes=4096)
SLOW = 3 * FAST.timeout


@pytest.fixture(scope="module")
def shard_bytes(tmp_path_factory):
    """Three small valid parquet shards: {file name: bytes}, indices 0, 1 and 6542."""
    d = tmp_path_factory.mktemp("shards")
    docs = prose_docs(90)
    out = {}
    for k, i in enumerate((0, 1, 6542)):
        p = write_parquet(d / climbmix_shard_name(i), docs[k * 30:(k + 1) * 30])
        out[p.name] = p.read_bytes()
    return out


def leftovers(d):
    return sorted(p.name for p in d.iterdir() if ".tmp" in p.name)


def test_faults_are_retried_and_every_shard_arrives_intact(tmp_path, shard_server, shard_bytes):
    names = list(shard_bytes)
    server = shard_server(shard_bytes, faults={names[0]: ["500", "500"], names[1]: ["truncate"], names[2]: ["slow"]},
                           slow_seconds=SLOW)
    slept, retries = [], []
    paths = download_shards([0, 1, 6542], tmp_path, server.url, FAST, sleep=slept.append, log=retries.append,
                            stream=io.StringIO())
    assert [p.name for p in paths] == names
    for p in paths:
        assert p.read_bytes() == shard_bytes[p.name]
    # The retry messages name the cause, should a healthy request ever be retried.
    assert [server.count(n) for n in names] == [3, 2, 2], retries
    # Exponential backoff: the shard that failed twice waited backoff, then 2 * backoff.
    assert sorted(slept) == [0.5, 0.5, 0.5, 1.0]
    assert leftovers(tmp_path) == []


def test_persistent_truncation_fails_without_leaving_a_partial_file(tmp_path, shard_server, shard_bytes):
    name = climbmix_shard_name(1)
    server = shard_server(shard_bytes, faults={name: ["truncate"] * 10})
    slept = []
    with pytest.raises(DownloadError) as e:
        download_shards([1], tmp_path, server.url, FAST, sleep=slept.append, stream=io.StringIO())
    assert name in str(e.value) and "re-run" in str(e.value)
    assert server.count(name) == FAST.retries + 1
    assert slept == [0.5, 1.0, 2.0]
    assert not (tmp_path / name).exists()
    assert leftovers(tmp_path) == []


def test_missing_shard_is_not_retried(tmp_path, shard_server, shard_bytes):
    server = shard_server(shard_bytes)
    with pytest.raises(DownloadError, match="HTTP 404"):
        fetch_one(f"{server.url}/shard_00007.parquet", tmp_path / "shard_00007.parquet", FAST, sleep=lambda s: None)
    assert server.count("shard_00007.parquet") == 1


def test_a_body_that_is_not_parquet_is_rejected(tmp_path, shard_server):
    server = shard_server({"shard_00000.parquet": b"<html>rate limited</html>"})
    with pytest.raises(DownloadError, match="not a readable parquet"):
        download_shards([0], tmp_path, server.url, FAST, sleep=lambda s: None, stream=io.StringIO())
    assert list(tmp_path.iterdir()) == []


def test_resume_skips_valid_shards_and_refetches_truncated_ones(tmp_path, shard_server, shard_bytes):
    server = shard_server(shard_bytes)
    good, cut = climbmix_shard_name(0), climbmix_shard_name(1)
    (tmp_path / good).write_bytes(shard_bytes[good])
    (tmp_path / cut).write_bytes(shard_bytes[cut][:-100])  # an interrupted copy under the final name
    (tmp_path / f"{cut}.99999.tmp").write_bytes(b"partial")  # left by a killed run
    assert not shard_is_valid(tmp_path / cut)
    logs = []
    download_shards([0, 1], tmp_path, server.url, FAST, sleep=lambda s: None, log=logs.append, stream=io.StringIO())
    assert server.count(good) == 0 and server.count(cut) == 1
    assert (tmp_path / cut).read_bytes() == shard_bytes[cut]
    assert any("truncated or corrupt" in m for m in logs)
    assert leftovers(tmp_path) == []
    # Nothing left to do on a second run: no request at all.
    download_shards([0, 1], tmp_path, server.url, FAST, sleep=lambda s: None, stream=io.StringIO())
    assert len(server.requests) == 1


def test_download_error_is_a_data_error():
    assert issubclass(DownloadError, DataError)
