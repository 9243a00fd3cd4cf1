"""Comparing experiment branches from several machines, moving winners between them, plotting.

Each machine runs the loop on its own branch `autoresearch/<tag>-<machine>`; this package reads
those branches' ledgers straight from git objects (no checkout) and answers: what did each
machine find, which findings are universal and which hardware-specific, and how does a winner
from one branch become a candidate on another.

    branches.py    list/resolve branches (local and remote-tracking), read a branch's ledger
    analysis.py    per-branch summaries, contract groups, recipe diffs, universal vs specific
    report.py      the comparison as a JSON-ready dict and as text tables
    transplant.py  apply another branch's recipe deltas to the current train.py as a commit
    plot.py        progress.png / .svg: val_bpb per experiment and a size-vs-score scatter
    cli.py         `mlx-ar compare`, `mlx-ar transplant`, `mlx-ar plot`

Nothing here imports git or matplotlib at module level; they load when a command runs.
"""
