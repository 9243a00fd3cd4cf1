"""The cuda backend: train_torch.py on an NVIDIA GPU (or on the CPU, for tests and smoke runs).

    backend.py   CudaBackend: build, the compiled step, the CUDA-graph replay, evaluation, memory
    hardware.py  NVIDIA peak FLOP/s and device names
    kernels/     the fused kernels train_torch.py calls by name, with their plain-torch fallbacks

Importing this package imports nothing heavy: torch is loaded by backend.py and kernels/.
"""
