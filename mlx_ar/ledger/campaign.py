"""Campaign settings: what the research loop optimises, how it decides, and how it runs train.py.

Every default lives in the `Campaign` dataclass below. A campaign file (TOML, read with the
standard library's tomllib) overrides any of them with top-level keys of the same names:

    # campaign.toml, at the repository root (committed on the experiment branch)
    gate = "significance"        # "auto" (default), "single" (upstream's rule) or "significance"
    confidence = 0.95
    max_memory_gb = 14           # veto: a 16 GB Mac swaps above this
    tier = "config"              # only the recipe constants of train.py may change
    train_args = ["--data", "demo"]  # the dataset, and with it the profile (budget, overrides)

    campaign = load_campaign(root)                 # root/campaign.toml if present, else defaults
    campaign = load_campaign(root, "other.toml")   # an explicit file must exist
    campaign = campaign.for_profile(profile)       # the data profile's budget, unless set
    campaign = campaign.for_machine(10.7)          # the machine's memory ceiling, unless set
    campaign.timeout_s                             # hard limit for one child run
"""
import dataclasses
import math
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

from ..backends import BACKENDS
from ..constants import TIME_BUDGET
from .policy import MUTABLE_FILES

CAMPAIGN_FILE = "campaign.toml"
GATES = ("auto", "single", "significance")
TIERS = ("config", "code")
DIRECTIONS = ("min", "max")
# What the agent may edit on each backend, unless campaign.toml says otherwise; the rule itself
# (and which parts each backend executes) lives in mlx_ar.ledger.policy.
DEFAULT_MUTABLE = {backend: tuple(files) for backend, files in MUTABLE_FILES.items()}


class CampaignError(ValueError):
    """The campaign file is missing, unreadable or holds a bad value (the message names the file)."""


@dataclass(frozen=True)
class Campaign:
    # --- what is optimised ----------------------------------------------------------------
    objective: str = "val_bpb"          # a key of the run record's metrics
    direction: str = "min"              # "min": lower is better (val_bpb)
    min_delta: float = 0.0              # a keep must beat the champion by more than this

    # --- vetoes (a candidate that breaks one is discarded whatever its score) ---------------
    max_memory_gb: float | None = None  # peak memory ceiling; None on mlx: the machine's training budget
    min_tok_per_sec_ratio: float | None = None  # minimum tok/s as a fraction of the branch baseline's

    # --- what the agent may change ----------------------------------------------------------
    tier: str = "code"                  # "config": only recipe constants; "code": anything in `mutable`
    mutable: tuple[str, ...] = ()       # the mutable surface; empty: DEFAULT_MUTABLE[backend]

    # --- the keep gate ----------------------------------------------------------------------
    # "auto": "single" until a noise floor exists, then "significance" (A/A false keeps <= 1 - confidence)
    gate: str = "auto"                  # or "single" (upstream's rule) or "significance"
    confidence: float = 0.95            # significance: one-sided confidence of a keep
    min_keep_runs: int = 2              # significance: seed runs before a keep may be declared
    max_runs: int = 5                   # significance: seed runs after which an undecided candidate fails
    noise_runs: int = 5                 # `mlx-ar noise`: runs of the champion that measure the floor

    # --- throttle sentinel -------------------------------------------------------------------
    throttle_ratio: float = 0.5         # tok/s below this fraction of the branch's usual rate is suspect
    throttle_window: int = 10           # recent ok runs that define the usual rate
    throttle_min_history: int = 3       # no sentinel until this many ok runs exist
    suspect_retries: int = 1            # re-runs of a suspect run before its speed is believed
    suspect_cooldown: float = 60.0      # seconds to wait before a re-run (a fanless Mac cools down)

    # --- how train.py runs -------------------------------------------------------------------
    backend: str = "mlx"
    train_command: tuple[str, ...] = ()  # empty: [python, "train.py"]; tests point it at fakes
    train_args: tuple[str, ...] = ()    # extra arguments, e.g. ["--data", "demo"]
    seed: int = 42                      # first seed; re-runs use seed + 1, seed + 2, ...
    time_budget: float | None = None    # the training budget, for the timeout; None: the data profile's
    eval_allowance: float | None = None  # start-up + evaluation seconds beyond 2x the budget; None: 2x budget, <= 300
    smoke: float | None = None          # pass --smoke SECONDS (loop tests only; never comparable)
    allow_smoke: bool = False           # let smoke runs be kept (tests of the loop itself)
    runs_dir: str = "runs"              # per-run logs and records (gitignored)

    source: str | None = field(default=None, compare=False)  # the file these came from, if any

    def __post_init__(self):
        if not self.mutable and self.backend in DEFAULT_MUTABLE:
            object.__setattr__(self, "mutable", DEFAULT_MUTABLE[self.backend])

    # --- derived -------------------------------------------------------------------------------
    @property
    def budget_s(self) -> float:
        if self.smoke is not None:
            return float(self.smoke)
        return float(TIME_BUDGET if self.time_budget is None else self.time_budget)

    @property
    def timeout_s(self) -> float:
        """Hard limit for one child run: twice the budget plus the evaluation allowance."""
        budget = float(TIME_BUDGET if self.time_budget is None else self.time_budget)
        allowance = min(300.0, 2.0 * budget) if self.eval_allowance is None else float(self.eval_allowance)
        return 2.0 * self.budget_s + allowance

    def for_profile(self, profile) -> "Campaign":
        """These settings with the data profile's budget, unless time_budget was set."""
        if profile is None or self.time_budget is not None:
            return self
        return dataclasses.replace(self, time_budget=float(profile.time_budget))

    def for_machine(self, max_memory_gb: float | None) -> "Campaign":
        """These settings with the machine's memory ceiling (a run above it swaps on a Mac), unless
        max_memory_gb was set. Only mlx runs share the machine's memory; cuda keeps no default."""
        if self.max_memory_gb is not None or self.backend != "mlx" or max_memory_gb is None:
            return self
        return dataclasses.replace(self, max_memory_gb=float(max_memory_gb))

    def dataset_arg(self) -> str | None:
        """The dataset named by `--data` in train_args, if any."""
        args = list(self.train_args)
        for i, a in enumerate(args):
            if a == "--data" and i + 1 < len(args):
                return args[i + 1]
            if a.startswith("--data="):
                return a.split("=", 1)[1]
        return None

    @property
    def sign(self) -> float:
        """+1 when lower is better; objective values are multiplied by it so the gate always minimises."""
        return 1.0 if self.direction == "min" else -1.0

    def command(self, record: str, seed: int) -> list[str]:
        """The child's argv for one run."""
        base = list(self.train_command) or [sys.executable, "train.py"]
        cmd = base + ["--record", str(record), "--seed", str(int(seed)), "--backend", self.backend]
        if self.smoke is not None:
            cmd += ["--smoke", f"{float(self.smoke):g}"]
        return cmd + list(self.train_args)

    def to_dict(self) -> dict:
        """The settings as JSON-ready values (recorded in every receipt)."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out


# --- loading and validation ----------------------------------------------------------------
def _type_name(tp) -> str:
    return {float: "a number", int: "an integer", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _coerce(name: str, value, where: str):
    """Check one TOML value against the field's declared type; return it in that type."""
    tp = {f.name: f.type for f in dataclasses.fields(Campaign)}[name]
    if isinstance(tp, types.UnionType):  # `float | None`: TOML has no null, so a value is the float
        tp = next(a for a in tp.__args__ if a is not type(None))
    if getattr(tp, "__origin__", None) is tuple:
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            raise CampaignError(f"{where}: {name} must be a list of strings, got {value!r}")
        return tuple(value)
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, tp)
    if not ok:
        raise CampaignError(f"{where}: {name} must be {_type_name(tp)}, got {value!r}")
    return value


def validate(c: Campaign, where: str = "campaign") -> Campaign:
    """Raise CampaignError naming `where` and the setting when a value is out of range."""
    def bad(msg):
        raise CampaignError(f"{where}: {msg}")

    if c.direction not in DIRECTIONS:
        bad(f"direction must be one of {', '.join(DIRECTIONS)}, got {c.direction!r}")
    if c.gate not in GATES:
        bad(f"gate must be one of {', '.join(GATES)}, got {c.gate!r}")
    if c.tier not in TIERS:
        bad(f"tier must be one of {', '.join(TIERS)}, got {c.tier!r}")
    if c.backend not in BACKENDS:
        bad(f"backend must be one of {', '.join(BACKENDS)}, got {c.backend!r}")
    if not c.mutable:
        bad("mutable must name at least one file (the default is the backend's: train.py, plus train_torch.py on cuda)")
    for p in c.mutable:
        if Path(p).is_absolute() or ".." in Path(p).parts or p.strip() != p or not p:
            bad(f"mutable entries are paths inside the repository, got {p!r}")
    if not 0.5 < c.confidence < 1.0:
        bad(f"confidence must be between 0.5 and 1 (e.g. 0.95), got {c.confidence}")
    if c.min_delta < 0:
        bad(f"min_delta must be >= 0, got {c.min_delta}")
    if c.min_keep_runs < 1 or c.max_runs < c.min_keep_runs:
        bad(f"need 1 <= min_keep_runs <= max_runs, got {c.min_keep_runs} and {c.max_runs}")
    if c.noise_runs < 2:
        bad(f"noise_runs must be at least 2 (a spread needs two runs), got {c.noise_runs}")
    if not 0.0 <= c.throttle_ratio < 1.0:
        bad(f"throttle_ratio must be in [0, 1) (0 turns the sentinel off), got {c.throttle_ratio}")
    if c.throttle_window < 1 or c.throttle_min_history < 1:
        bad("throttle_window and throttle_min_history must be at least 1")
    if c.suspect_retries < 0 or c.suspect_cooldown < 0:
        bad("suspect_retries and suspect_cooldown must be >= 0")
    if (c.time_budget is not None and c.time_budget <= 0) or (c.eval_allowance is not None and c.eval_allowance < 0):
        bad(f"time_budget must be > 0 and eval_allowance >= 0, got {c.time_budget} and {c.eval_allowance}")
    if c.smoke is not None and c.smoke <= 0:
        bad(f"smoke must be a positive number of seconds, got {c.smoke}")
    if c.max_memory_gb is not None and c.max_memory_gb <= 0:
        bad(f"max_memory_gb must be > 0 (leave it out for no ceiling), got {c.max_memory_gb}")
    if c.min_tok_per_sec_ratio is not None and not 0 < c.min_tok_per_sec_ratio <= 1:
        bad(f"min_tok_per_sec_ratio must be in (0, 1], got {c.min_tok_per_sec_ratio}")
    if not c.runs_dir or Path(c.runs_dir).is_absolute():
        bad(f"runs_dir must be a relative directory, got {c.runs_dir!r}")
    return c


def _read_toml(path: Path) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise CampaignError(f"{path}: reading campaign files needs Python 3.11+ (tomllib) "
                                "or the tomli package (pip install tomli)") from None
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise CampaignError(f"{path}: cannot read the campaign file: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise CampaignError(f"{path}: not valid TOML: {e}") from None


def campaign_from_dict(data: dict, where: str = "campaign") -> Campaign:
    known = {f.name for f in dataclasses.fields(Campaign)} - {"source"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise CampaignError(f"{where}: unknown setting{'s' if len(unknown) > 1 else ''} "
                            f"{', '.join(unknown)} (known: {', '.join(sorted(known))})")
    values = {k: _coerce(k, v, where) for k, v in data.items()}
    return validate(Campaign(**values, source=where if where != "campaign" else None), where)


def load_campaign(root, path=None, overrides: dict | None = None) -> Campaign:
    """Settings for the repository at `root`: defaults, then the campaign file, then `overrides`.

    `path` None means root/campaign.toml when it exists (defaults otherwise); an explicit path
    (relative to `root` unless absolute) must exist. Overrides with value None are ignored, so
    command-line options can default to None and fall through to the file and the dataclass.
    """
    root = Path(root)
    if path is None:
        p = root / CAMPAIGN_FILE
        data, where = (_read_toml(p), str(p)) if p.exists() else ({}, "campaign")
    else:
        p = Path(path)
        p = p if p.is_absolute() else root / p
        if not p.exists():
            raise CampaignError(f"{p}: campaign file not found")
        data, where = _read_toml(p), str(p)
    campaign = campaign_from_dict(data, where)
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if overrides:
        campaign = validate(dataclasses.replace(campaign, **overrides), f"{where} + command-line options")
    return campaign


def data_profile(campaign) -> tuple[str | None, object, str | None]:
    """(dataset name, its Profile, problem) for the runs of `campaign`: `--data` or the cache's current.

    The profile is read from the dataset's manifest without opening the data; when it cannot
    be read, Profile is None and `problem` says why (the run itself then fails with details).
    """
    from .. import paths

    name = campaign.dataset_arg() or paths.current_dataset()
    if name is None:
        return None, None, f"no dataset prepared under {paths.cache_root()}"
    try:
        from ..data import DataError
        from ..data.dataset import MANIFEST, profile_from_manifest, read_manifest

        where = paths.dataset_dir(name)
        m = read_manifest(where)
        if m is None:
            return name, None, f"dataset {name!r} is not prepared ({where / MANIFEST} missing)"
        return name, profile_from_manifest(m, where / MANIFEST), None
    except (DataError, OSError, ValueError) as e:
        return name, None, str(e)
