"""The research ledger: results.tsv, receipts, the git ratchet and the keep gate."""
