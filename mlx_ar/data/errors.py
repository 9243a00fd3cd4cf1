"""Errors raised by the data pipeline.

Every DataError message names what is wrong (the file, the split, the command to run), so the
CLI can print it as is: `mlx-ar prepare` turns it into a one-line `Error: ...` and exit code 1.
"""


class DataError(Exception):
    """Prepared data is missing, malformed, or does not match the contract."""


class DownloadError(DataError):
    """A shard could not be downloaded after all retries (no partial file is left behind)."""
