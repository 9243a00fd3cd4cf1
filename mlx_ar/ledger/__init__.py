"""The research ledger: results.tsv, receipts, the git ratchet and the keep gate.

    format.py    on-disk formats shared with branch comparison (columns, receipt fields)
    campaign.py  campaign settings (campaign.toml) and their defaults
    runner.py    one training run as a child process; its verdict from record and log
    gate.py      the single and significance keep gates (Student's t by hand)
    ledger.py    results.tsv + receipts + noise.json on disk, the fcntl lock, atomic writes
    git_ops.py   commits from explicit contents, compare-and-swap branch moves
    loop.py      `mlx-ar run` and `mlx-ar noise` as functions
    workers.py   worktrees that share one ledger
    results.py   the ledger as a table
    cli.py       the click commands
"""
