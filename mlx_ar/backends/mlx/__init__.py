"""The MLX backend (Metal on Apple Silicon, MLX's CUDA build, or its CPU build).

    backend    MLXBackend: train.py's GPT, the compiled micro-batch and update steps, evaluation
    chips      Apple chips: peak bf16 FLOP/s by chip and GPU cores, chip detection
    memory     the machine's memory, Metal's wired and cache limits, a step's memory budget
    power      a Mac kept awake while a campaign runs, and whether it is on battery
"""
