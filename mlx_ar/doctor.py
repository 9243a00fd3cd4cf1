"""`mlx-ar doctor`: what a run needs, checked in one place, with the next command to type.

    report = diagnose(root, probes=Probes())
    for c in report.checks: print(c.line())
    report.ok                                  # False when `mlx-ar run` would fail now

Sections: installed (MLX and its device, torch, the plot extra), memory (the machine's, and
what the current recipe needs), data (the cache, the current dataset, its profile and the
recipe constants that profile overrides), ledger (branch, champion, noise floor, in-flight
markers, files that would make a run refuse). Each check is `ok`, `warn` (a run works, but
something deserves attention) or `fail` (a run would fail); the last line is the next step.

Every probe of the machine is a field of `Probes`, so tests pass small fakes; the memory
estimate is one of them (`need_gb(recipe, profile)`), to be swapped for a better one.
"""
from dataclasses import dataclass, field
from pathlib import Path

from .backends.mlx.memory import default_max_memory_gb, total_memory_bytes
from .backends.mlx.power import battery_status


@dataclass
class Check:
    section: str
    status: str          # "ok" | "warn" | "fail"
    text: str

    def line(self) -> str:
        mark = {"ok": "ok  ", "warn": "warn", "fail": "FAIL"}[self.status]
        return f"  {mark}  {self.text}"


@dataclass
class Report:
    checks: list = field(default_factory=list)
    next_step: str = ""

    @property
    def ok(self) -> bool:
        return not any(c.status == "fail" for c in self.checks)

    def add(self, section, status, text):
        self.checks.append(Check(section, status, text))

    def lines(self) -> list[str]:
        out, last = [], None
        for c in self.checks:
            if c.section != last:
                out.append(f"{c.section}:")
                last = c.section
            out.append(c.line())
        out.append(f"next: {self.next_step}")
        return out


# --- probes of the machine (replaced by fakes in tests) -----------------------------------------
def probe_mlx() -> dict | None:
    """{"version", "device"} of the installed MLX, or None."""
    try:
        import mlx.core as mx
    except ImportError:
        return None
    try:
        metal = bool(mx.metal.is_available())
    except AttributeError:
        metal = False
    cuda = False
    try:
        cuda = bool(mx.cuda.is_available())
    except AttributeError:
        pass
    device = "Metal (GPU)" if metal else "CUDA (GPU)" if cuda else "CPU only"
    return {"version": getattr(mx, "__version__", "?"), "device": device}


def probe_torch() -> dict | None:
    """{"version", "cuda"} of the installed torch, or None."""
    try:
        import torch
    except ImportError:
        return None
    cuda = torch.cuda.is_available()
    name = torch.cuda.get_device_name(0) if cuda else None
    return {"version": torch.__version__, "cuda": name}


def probe_module(name: str) -> str | None:
    """The version of an importable module, or None."""
    try:
        mod = __import__(name)
    except ImportError:
        return None
    return getattr(mod, "__version__", "installed")


def rough_need_gb(recipe: dict, profile) -> float | None:
    """A rough peak-memory estimate of a recipe: weights, gradients and optimizer state in
    float32, plus activations of one micro-batch (None when the recipe does not say enough).

    About 60 bytes per parameter-free activation element per layer is what the block's
    saved tensors (norms, q/k/v, attention out, the MLP's 4x hidden) add up to in bf16/fp32.
    """
    try:
        depth, ratio, head = int(recipe["DEPTH"]), int(recipe["ASPECT_RATIO"]), int(recipe["HEAD_DIM"])
    except (KeyError, TypeError, ValueError):
        return None
    d = max(head, (depth * ratio + head - 1) // head * head)
    mlp = int(recipe.get("MLP_RATIO", 4) or 4)
    vocab, seq = profile.vocab_size, profile.max_seq_len
    params = depth * (4 + 2 * mlp) * d * d + 2 * vocab * d
    state = params * 4 * 4  # weights, grads, two optimizer moments
    rows = recipe.get("DEVICE_BATCH_SIZE")
    if not isinstance(rows, int):
        return state / 2**30  # "auto": the run fits the batch to the memory it finds
    acts = rows * seq * d * depth * 60 + rows * seq * vocab * 4 * 2
    return (state + acts) / 2**30


@dataclass
class Probes:
    mlx: object = probe_mlx
    torch: object = probe_torch
    module: object = probe_module
    memory_bytes: object = total_memory_bytes       # physical memory, or None
    need_gb: object = rough_need_gb
    ceiling_gb: object = default_max_memory_gb      # the veto when campaign.toml sets none (mlx)
    battery: object = battery_status                # None off macOS


# --- the diagnosis -----------------------------------------------------------------------------
def diagnose(root, *, probes: Probes | None = None, campaign_path=None) -> Report:
    """Everything `mlx-ar run` in `root` depends on, checked; see the module docstring."""
    p = probes or Probes()
    r = Report()
    root = Path(root)
    campaign = _campaign(r, root, campaign_path)
    backend = campaign.backend if campaign else "mlx"
    _installed(r, p, backend)
    profile, recipe = _data(r, root, campaign)
    _memory(r, p, recipe, profile, campaign)
    _ledger(r, root, campaign)
    r.next_step = _next_step(r)
    return r


def _campaign(r, root, path):
    from .ledger.campaign import CampaignError, load_campaign

    try:
        c = load_campaign(root, path)
    except CampaignError as e:
        r.add("campaign", "fail", str(e))
        return None
    where = c.source or "defaults (no campaign.toml)"
    r.add("campaign", "ok", f"{where}: backend {c.backend}, gate {c.gate}, tier {c.tier}, "
                            f"mutable {', '.join(c.mutable)}")
    return c


def _installed(r, p, backend):
    mlx = p.mlx()
    if mlx is None:
        r.add("installed", "fail" if backend == "mlx" else "ok",
              "MLX not installed" + (" (the mlx backend needs it: pip install mlx, or mlx[cpu] on Linux)"
                                     if backend == "mlx" else ""))
    else:
        slow = mlx["device"] == "CPU only"
        r.add("installed", "warn" if slow and backend == "mlx" else "ok",
              f"MLX {mlx['version']} on {mlx['device']}"
              + (": runs work but are slow; use the demo profile (prepare --source demo)" if slow else ""))
    torch = p.torch()
    if torch is None:
        r.add("installed", "fail" if backend == "cuda" else "ok",
              "torch not installed" + (" (the cuda backend needs it)" if backend == "cuda" else " (only cuda needs it)"))
    else:
        gpu = torch["cuda"]
        r.add("installed", "fail" if backend == "cuda" and not gpu else "ok",
              f"torch {torch['version']} " + (f"with CUDA on {gpu}" if gpu else "without CUDA"))
    plot = p.module("matplotlib")
    r.add("installed", "ok" if plot else "warn",
          f"plot extra: matplotlib {plot}" if plot else
          "plot extra missing (`mlx-ar plot` needs it): pip install 'mlx-autoresearch[plot]'")


def _data(r, root, campaign):
    """(profile, recipe with the profile's overrides) of the dataset the next run uses."""
    from . import paths
    from .ledger.campaign import data_profile

    r.add("data", "ok", f"cache {paths.cache_root()}")
    datasets_dir = paths.cache_root() / "datasets"
    have = sorted(x.name for x in datasets_dir.iterdir() if x.is_dir()) if datasets_dir.is_dir() else []
    name, profile, problem = data_profile(campaign) if campaign else (None, None, "no campaign")
    if profile is None:
        hint = f" (prepared: {', '.join(have)})" if have else ""
        r.add("data", "fail", f"{problem}{hint}; run `python prepare.py --source demo` (offline, small) or "
                              "`python prepare.py` (the real data, a download)")
        return None, None
    r.add("data", "ok", f"dataset {name}: profile {profile.name}, budget {profile.time_budget:g} s, "
                        f"sequence {profile.max_seq_len}, vocabulary {profile.vocab_size}"
                        + (f" (also prepared: {', '.join(x for x in have if x != name)})" if len(have) > 1 else ""))
    overrides = dict(profile.recipe_overrides)
    recipe = None
    train = root / "train.py"
    if train.is_file():
        from .recipe import RecipeError, parse_recipe

        try:
            recipe = {**parse_recipe(train.read_text()), **overrides}
        except (RecipeError, ValueError) as e:
            r.add("data", "fail", f"train.py's recipe cannot be read: {e}")
    if overrides:
        r.add("data", "warn", f"the {profile.name} profile overrides "
                              + " ".join(f"{k}={v!r}" for k, v in overrides.items())
                              + ": edits of only these are refused")
    return profile, recipe


def _memory(r, p, recipe, profile, campaign):
    total = p.memory_bytes()
    total_gb = total / 2**30 if total else None
    need = p.need_gb(recipe, profile) if recipe and profile else None
    text = f"machine {total_gb:.1f} GB" if total_gb else "machine memory unknown"
    if recipe and recipe.get("DEVICE_BATCH_SIZE") == "auto":
        text += "; DEVICE_BATCH_SIZE auto: the run measures its step and fits the micro-batch to the budget below"
    elif need is not None:
        size = f"{need:.1f} GB" if need >= 1 else f"{need * 1024:.0f} MB"
        text += f"; the current recipe needs about {size} (rough estimate)"
    status = "ok"
    if need is not None and total_gb and need > 0.75 * total_gb:
        status = "warn"
        text += ": close to or above the machine's; lower DEVICE_BATCH_SIZE or the model size"
    ceiling = campaign.max_memory_gb if campaign else None
    machine_ceiling = p.ceiling_gb() if ceiling is None and (campaign.backend if campaign else "mlx") == "mlx" else None
    if ceiling is not None:
        text += f"; veto above max_memory_gb {ceiling:g}"
    elif machine_ceiling is not None:
        text += f"; veto above {machine_ceiling:g} GB (this machine's budget; max_memory_gb overrides it)"
    r.add("memory", status, text)
    battery = p.battery()
    if battery is not None:
        on = battery["on_battery"]
        pct = f" ({battery['percent']}%)" if battery.get("percent") is not None else ""
        r.add("power", "warn" if on else "ok",
              f"on battery{pct}: plug in for an overnight campaign (a Mac on battery throttles and may sleep)"
              if on else f"on mains power{pct}")


def _ledger(r, root, campaign):
    from .ledger import git_ops, policy
    from .ledger.context import open_context
    from .ledger.gate import floor_of, gate_note
    from .ledger.ledger import champion
    from .ledger.receipts import in_flight_markers, pid_alive

    try:
        ctx = open_context(root)
    except Exception as e:  # not a repository, detached HEAD, a broken worker: all say what to do
        r.add("ledger", "fail", str(e))
        return
    branch_ok = ctx.branch.startswith("autoresearch/")
    r.add("ledger", "ok" if branch_ok else "warn",
          f"branch {ctx.branch}" + ("" if branch_ok else ": experiments belong on autoresearch/<tag>-<machine> "
                                    "(git checkout -b autoresearch/<tag>-<machine>)"))
    if campaign is None:
        return
    receipts = ctx.ledger.receipts()
    champ = champion(receipts, campaign.objective, campaign.sign, campaign.allow_smoke)
    if champ:
        v = (champ.get("metrics") or {}).get(campaign.objective)
        r.add("ledger", "ok", f"champion {str(champ['commit'])[:7]} {campaign.objective} {v:.6f} "
                              f"({len(receipts)} receipts)")
    else:
        r.add("ledger", "ok", "no champion yet: the next run is the baseline")
    noise = ctx.ledger.noise()
    note = gate_note(campaign, noise)
    r.add("ledger", "ok" if floor_of(noise) is not None or not champ else "warn", note or "noise floor measured")
    for path, m in in_flight_markers(ctx.ledger):
        alive = pid_alive(int(m.get("pid", 0)))
        r.add("ledger", "ok" if alive else "warn",
              f"in flight: attempt {m.get('seq')} ({m.get('description')}), pid {m.get('pid')} "
              + ("running" if alive else "gone: the next run records it as a crash"))
    worktree = git_ops.read_worktree(ctx.root, campaign.mutable)
    why = policy.unrelated_reason(git_ops.status_paths(ctx.repo), campaign) or policy.missing_reason(worktree)
    if why:
        r.add("ledger", "fail", f"a run would be refused: {why}")
    else:
        head = git_ops.read_commit(ctx.repo, git_ops.head_sha(ctx.repo), campaign.mutable)
        edited = worktree != head
        r.add("ledger", "ok", "working tree clean apart from the mutable surface"
                              + (f" ({', '.join(p for p in worktree if worktree[p] != head.get(p))} edited)"
                                 if edited else ""))


def _next_step(r: Report) -> str:
    for c in r.checks:
        if c.status == "fail":
            if c.section == "data":
                return "python prepare.py --source demo   (or `python prepare.py` for the real data)"
            if c.section == "installed":
                return "pip install -e '.[mlx]'   (see README: set-up)"
            return f"fix: {c.text}"
    texts = " ".join(c.text for c in r.checks if c.section == "ledger")
    if "no champion yet" in texts:
        return 'mlx-ar run -m "baseline" 2> run.log'
    if "no noise floor yet" in texts:
        return "mlx-ar noise 2> run.log"
    return 'edit train.py, then: mlx-ar run -m "what you changed" 2> run.log'



def _doctor_command():
    import click

    @click.command("doctor")
    @click.option("--campaign", "campaign_path", type=click.Path(dir_okay=False), default=None,
                  help="campaign TOML (default: ./campaign.toml if present)")
    def doctor_command(campaign_path):
        """Check what a run needs (install, memory, data, ledger) and print the next command.

        Exit code 1 when `mlx-ar run` would fail as things stand.
        """
        report = diagnose(Path.cwd(), campaign_path=campaign_path)
        click.echo("\n".join(report.lines()))
        raise SystemExit(0 if report.ok else 1)

    return doctor_command


doctor_command = _doctor_command()
