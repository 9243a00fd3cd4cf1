"""The shared, backend-agnostic training harness that `train.py` runs inside.

Every backend (MLX, and the PyTorch one for NVIDIA GPUs) trains through the same pieces, so
runs on a Mac and on an H100 are timed, scheduled, checked and reported identically:

    clock      BudgetClock: counts training-step seconds only, compile steps excluded
    schedules  Schedule: LR multiplier, Muon momentum and weight decay from the recipe
    hardware   MFU from a backend's peak FLOP/s (the tables live with the backends)
    memory     GcControl (freeze/disable Python's gc after step 1); the micro-batch that fits the budget
    progress   ProgressLine: the live one-line status with a debiased EMA of the loss
    summary    the summary block (format/parse), the JSON run record, fast-fail on a bad loss

Nothing in this package imports mlx or torch at module level; backends pass their modules in.
"""
