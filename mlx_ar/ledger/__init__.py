"""The research ledger: results.tsv, receipts, the git ratchet and the keep gate.

    format.py    on-disk formats shared with branch comparison (columns, receipt fields)
    campaign.py  campaign settings (campaign.toml) and their defaults
    runner.py    one training run as a child process; its verdict from record and log
    gate.py      the single and significance keep gates (Student's t by hand); which one at a noise floor
    ledger.py    results.tsv + receipts + noise.json on disk, the fcntl lock, atomic writes
    git_ops.py   commits from explicit contents, compare-and-swap branch moves (plain git processes)
    context.py   where a command works (checkout or worker), stop signals deferred while writing
    policy.py    pure checks that return reasons: refusals before a run, vetoes after it
    receipts.py  building and writing receipts, in-flight markers, attempts whose process died
    ratchet.py   which commit is the candidate; keep it or restore the champion
    attempt.py   `mlx-ar run` as a function: refuse, commit, run, judge, finish
    noise.py     `mlx-ar noise`: the champion re-run, the floor stored and explained
    workers.py   worktrees that share one ledger
    results.py   the ledger as a table
    cli.py       the click commands
"""
