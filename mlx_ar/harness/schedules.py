"""Learning-rate, Muon-momentum and weight-decay schedules, read from train.py's recipe.

The LR and weight decay follow `progress` = training seconds / TIME_BUDGET (so the schedule
always completes inside the budget, whatever the machine's speed); Muon's momentum warmup
follows the step count (it tames the first updates, which are a fixed number of steps).

    sched = Schedule.from_recipe(read_recipe("train.py"))
    h = sched.hyper(step, clock.progress)   # {"lr_mult", "muon_momentum", "weight_decay"}
"""
import math
from dataclasses import dataclass, fields

# recipe name -> Schedule field
RECIPE_NAMES = {
    "WARMUP_RATIO": "warmup_ratio",
    "WARMDOWN_RATIO": "warmdown_ratio",
    "FINAL_LR_FRAC": "final_lr_frac",
    "WEIGHT_DECAY": "base_weight_decay",
    "MUON_MOMENTUM": "momentum_end",
    "MUON_MOMENTUM_START": "momentum_start",
    "MUON_MOMENTUM_WARMUP_STEPS": "momentum_warmup_steps",
}


class ScheduleError(ValueError):
    """The recipe's schedule constants are missing or out of range."""


def _clamp01(x: float) -> float:
    return min(1.0, max(0.0, float(x)))


@dataclass(frozen=True)
class Schedule:
    warmup_ratio: float                 # fraction of the budget spent ramping LR up from 0
    warmdown_ratio: float               # fraction at the end spent ramping LR down
    final_lr_frac: float                # LR multiplier reached at the very end
    base_weight_decay: float            # decay at progress 0, falls linearly to 0
    momentum_end: float                 # Muon momentum after its warmup
    momentum_start: float               # Muon momentum at step 0
    momentum_warmup_steps: int          # steps to go from start to end momentum

    def __post_init__(self):
        problems = []
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                problems.append(f"{_recipe_name(f.name)} must be a finite number, got {v!r}")
        if problems:
            raise ScheduleError("train.py recipe: " + "; ".join(problems))
        for name in ("warmup_ratio", "warmdown_ratio"):
            if not 0 <= getattr(self, name) <= 1:
                problems.append(f"{_recipe_name(name)} must be in [0, 1], got {getattr(self, name)!r}")
        if self.warmup_ratio + self.warmdown_ratio > 1:
            problems.append(
                f"WARMUP_RATIO + WARMDOWN_RATIO must be <= 1, got {self.warmup_ratio} + {self.warmdown_ratio}"
            )
        if self.final_lr_frac < 0:
            problems.append(f"FINAL_LR_FRAC must be >= 0, got {self.final_lr_frac!r}")
        if self.base_weight_decay < 0:
            problems.append(f"WEIGHT_DECAY must be >= 0, got {self.base_weight_decay!r}")
        for name in ("momentum_start", "momentum_end"):
            if not 0 <= getattr(self, name) < 1:
                problems.append(f"{_recipe_name(name)} must be in [0, 1), got {getattr(self, name)!r}")
        steps = self.momentum_warmup_steps
        if int(steps) != steps or steps < 0:
            problems.append(f"MUON_MOMENTUM_WARMUP_STEPS must be a non-negative integer, got {steps!r}")
        if problems:
            raise ScheduleError("train.py recipe: " + "; ".join(problems))

    @classmethod
    def from_recipe(cls, recipe: dict) -> "Schedule":
        missing = [name for name in RECIPE_NAMES if name not in recipe]
        if missing:
            raise ScheduleError(
                f"train.py recipe is missing {', '.join(missing)} (needed by the LR, momentum and "
                "weight-decay schedules); add them to the UPPER_CASE block at the top of train.py"
            )
        return cls(**{field: recipe[name] for name, field in RECIPE_NAMES.items()})

    def lr_multiplier(self, progress: float) -> float:
        """Linear warmup from 0, flat at 1, linear warmdown to FINAL_LR_FRAC at progress 1."""
        p = _clamp01(progress)
        if p < self.warmup_ratio:
            return p / self.warmup_ratio
        if self.warmdown_ratio > 0 and p > 1.0 - self.warmdown_ratio:
            left = (1.0 - p) / self.warmdown_ratio   # 1 at the start of warmdown, 0 at the end
            return self.final_lr_frac + (1.0 - self.final_lr_frac) * left
        return 1.0

    def muon_momentum(self, step: int) -> float:
        """Linear from MUON_MOMENTUM_START at step 0 to MUON_MOMENTUM at MUON_MOMENTUM_WARMUP_STEPS."""
        if self.momentum_warmup_steps == 0:
            return self.momentum_end
        frac = min(1.0, max(0.0, step / self.momentum_warmup_steps))
        return self.momentum_start + (self.momentum_end - self.momentum_start) * frac

    def weight_decay(self, progress: float) -> float:
        """WEIGHT_DECAY * (1 - progress): regularize early, let the weights settle at the end."""
        return self.base_weight_decay * (1.0 - _clamp01(progress))

    def hyper(self, step: int, progress: float) -> dict:
        """All step-dependent hyperparameters, set outside the compiled step."""
        return {
            "lr_mult": self.lr_multiplier(progress),
            "muon_momentum": self.muon_momentum(step),
            "weight_decay": self.weight_decay(progress),
        }


def _recipe_name(field_name: str) -> str:
    return next(k for k, v in RECIPE_NAMES.items() if v == field_name)
