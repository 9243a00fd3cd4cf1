"""Shared fixtures for the data-pipeline tests (tests/test_data_*.py, tests/test_evaluate.py).

Everything is tiny: a 384-token vocabulary, 64-token rows and text from `pydoc_data.topics`
(ships with Python), so the whole data suite runs in seconds on 2 cores.
"""
import http.server
import threading
import time
from pathlib import Path

import pytest

from mlx_ar.constants import Profile

# Small enough to train and pack in milliseconds; eval_tokens is a multiple of max_seq_len.
TINY_PROFILE = Profile("tiny-test", time_budget=5, max_seq_len=64, vocab_size=384, eval_tokens=64 * 16)


@pytest.fixture
def tiny_profile() -> Profile:
    return TINY_PROFILE


@pytest.fixture
def data_cache(tmp_path, monkeypatch) -> Path:
    """An empty cache root (MLX_AR_CACHE) for this test."""
    root = tmp_path / "cache"
    monkeypatch.setenv("MLX_AR_CACHE", str(root))
    return root


def prose_docs(n: int | None = None, max_chars: int = 600) -> list[str]:
    """Deterministic English-ish documents: pydoc topics cut at paragraphs into short pieces."""
    from pydoc_data.topics import topics

    from mlx_ar.data.sources import chunk_paragraphs

    docs = [d for name in sorted(topics) for d in chunk_paragraphs(topics[name], max_chars)]
    return docs if n is None else docs[:n]


def write_parquet(path: Path, texts, column: str = "text") -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({column: list(texts)}), path)
    return path


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """A local corpus: three parquet training files and a parquet validation file (last in order)."""
    d = tmp_path_factory.mktemp("corpus")
    docs = prose_docs()
    q = len(docs) // 4
    for i in range(4):
        write_parquet(d / f"part_{i}.parquet", docs[i * q:(i + 1) * q])
    return d


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory, corpus_dir):
    """`corpus_dir` prepared once with TINY_PROFILE and opened (read-only: copy it to modify)."""
    from mlx_ar.data.dataset import Dataset
    from mlx_ar.data.prepare import prepare_dataset
    from mlx_ar.data.sources import local_source

    out = tmp_path_factory.mktemp("datasets") / "tiny"
    prepare_dataset(local_source(corpus_dir), out, TINY_PROFILE, name="tiny", threads=2, log=lambda m: None)
    return Dataset(out, "tiny")


# --- a loopback HTTP server with injected faults ----------------------------------------------
class ShardServer:
    """Serves `files` {name: bytes}; `faults[name]` is a list of behaviours used one per request:
    "500" (server error), "truncate" (Content-Length says more than is sent), "slow" (waits
    `slow_seconds` before answering), "ok". Once the list is used up every request is "ok".
    """

    def __init__(self, files: dict, faults: dict | None = None, slow_seconds: float = 1.0):
        self.files = dict(files)
        self.faults = {k: list(v) for k, v in (faults or {}).items()}
        self.slow_seconds = slow_seconds
        self.requests: list[str] = []
        self.lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                with server.lock:
                    server.requests.append(name)
                    todo = server.faults.get(name, [])
                    fault = todo.pop(0) if todo else "ok"
                if name not in server.files:
                    self.send_error(404)
                    return
                body = server.files[name]
                if fault == "500":
                    self.send_error(500)
                    return
                if fault == "slow":
                    time.sleep(server.slow_seconds)
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body[: len(body) // 2] if fault == "truncate" else body)
                except OSError:
                    pass  # the client gave up (timeout); nothing to do
                if fault == "truncate":
                    self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda request, address: None
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/files"

    def count(self, name: str) -> int:
        with self.lock:
            return self.requests.count(name)


@pytest.fixture
def shard_server():
    """Factory: shard_server(files, faults) -> a started ShardServer (stopped after the test)."""
    started = []

    def make(files, faults=None, slow_seconds=1.0):
        s = ShardServer(files, faults, slow_seconds)
        s.thread.start()
        started.append(s)
        return s

    yield make
    for s in started:
        s.httpd.shutdown()
        s.httpd.server_close()
