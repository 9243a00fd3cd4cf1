"""Prepare the data: `python prepare.py [--source climbmix|local|demo] ...` (= `mlx-ar prepare`).

Downloads or reads the text, trains the tokenizer and pre-tokenizes the training and pinned
validation splits under the cache (~/.cache/mlx-autoresearch, or $MLX_AR_CACHE). See
`python prepare.py --help`; the implementation is mlx_ar/data/prepare.py.
"""
from mlx_ar.data.prepare import prepare_command

if __name__ == "__main__":
    prepare_command(prog_name="prepare.py")
