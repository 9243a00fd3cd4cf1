"""Fixed contract constants. Do not modify.

Every run on every backend is measured against these numbers; changing one changes the
contract fingerprint, and runs from different contracts are never compared.
"""
from dataclasses import dataclass

# --- the real contract (comparable across Macs and H100s) ---------------------------------
TIME_BUDGET = 300                  # seconds of training steps (start-up and compile excluded)
MAX_SEQ_LEN = 2048                 # tokens per row, BOS included
VOCAB_SIZE = 8192                  # BPE vocabulary, the special tokens included
EVAL_TOKENS = 3 * 524_288          # validation tokens scored by evaluate_bpb
HELDOUT_SHARE = 6                  # the held-out walk scores 1/HELDOUT_SHARE of the validation rows

# --- tokenizer -------------------------------------------------------------------------------
SPECIAL_TOKENS = ("<|bos|>", "<|reserved_1|>", "<|reserved_2|>", "<|reserved_3|>")
BOS_TOKEN = SPECIAL_TOKENS[0]
# GPT-4 style split, but digits grouped 1-2 at a time so small vocabularies are not spent on numbers.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)
TOKENIZER_DOC_CHARS = 10_000       # characters of one document seen by BPE training
TOKENIZER_TOTAL_CHARS = 1_000_000_000  # characters in all seen by BPE training

# --- data ------------------------------------------------------------------------------------
CLIMBMIX_BASE_URL = "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main"
CLIMBMIX_VAL_SHARD = 6542          # pinned validation shard (the last one)
CLIMBMIX_DEFAULT_SHARDS = 10       # training shards fetched by default
CACHE_ENV = "MLX_AR_CACHE"         # overrides the cache root (tests use a temporary directory)
DEFAULT_CACHE = "~/.cache/mlx-autoresearch"

# Bumped whenever scoring changes meaning (evaluate_bpb, the leak probe, the validation or
# held-out walk); the contract fingerprint hashes this number, not the source of that code.
EVAL_VERSION = 2


@dataclass(frozen=True)
class Profile:
    """The numbers a run is measured with. `real` is the contract; `demo` is a small offline one."""

    name: str
    time_budget: float
    max_seq_len: int
    vocab_size: int
    eval_tokens: int
    # Recipe constants replaced for this profile: (name, value) pairs. Empty for the real contract.
    recipe_overrides: tuple = ()

    def __post_init__(self):
        # Profiles round-trip through JSON manifests, which turn tuples into lists.
        object.__setattr__(self, "recipe_overrides", tuple(tuple(kv) for kv in self.recipe_overrides))


REAL = Profile("real", TIME_BUDGET, MAX_SEQ_LEN, VOCAB_SIZE, EVAL_TOKENS)
# Small enough that prepare + train + eval finish in about two minutes on 2 CPU cores, where
# MLX's CPU backend runs at a few GFLOP/s: the model is shrunk too, so the loss visibly falls.
DEMO = Profile("demo", time_budget=60, max_seq_len=256, vocab_size=2048, eval_tokens=32 * 1024,
               recipe_overrides=(("DEPTH", 2), ("ASPECT_RATIO", 32), ("HEAD_DIM", 32),
                                 ("TOTAL_BATCH_SIZE", 4 * MAX_SEQ_LEN), ("DEVICE_BATCH_SIZE", 4)))
PROFILES = {p.name: p for p in (REAL, DEMO)}
