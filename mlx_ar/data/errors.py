"""Errors raised by the data pipeline, and the versioned-JSON reader whose failures they name.

Every DataError message names what is wrong (the file, the split, the command to run), so the
CLI can print it as is: `mlx-ar prepare` turns it into a one-line `Error: ...` and exit code 1.
"""
import json


class DataError(Exception):
    """Prepared data is missing, malformed, or does not match the contract."""


class DownloadError(DataError):
    """A shard could not be downloaded after all retries (no partial file is left behind)."""


class OfflineError(DownloadError):
    """A host's name does not resolve: the machine is offline, so nothing was retried."""


def read_versioned_json(path, key: str, version, what: str, fix: str) -> dict:
    """The JSON object in `path` whose `key` equals `version`; DataError naming the file and `fix` otherwise."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e}); {fix}") from e
    if not isinstance(data, dict) or data.get(key) != version:
        found = data.get(key) if isinstance(data, dict) else data
        raise DataError(f"{path}: unknown {what} {found!r}; {fix}")
    return data
