"""mlx-autoresearch: the autoresearch loop on Apple Silicon (MLX) and NVIDIA GPUs (PyTorch).

Fixed contract: `mlx_ar.constants`, `mlx_ar.data`, `mlx_ar.evaluate`.
Shared harness: `mlx_ar.harness`; backends: `mlx_ar.backends`; ledger and git: `mlx_ar.ledger`.
The one mutable file is `train.py` at the repository root.

Importing this package is cheap: nothing here loads mlx, torch or pyarrow.
"""

__version__ = "0.1.0"
