"""The keep gate: does a candidate beat the champion, or is the difference noise?

Two gates, chosen by the campaign's `gate` setting ("auto", the default, picks `single` until
the branch has a noise floor and `significance` once it has one; see gate_kind):

* `single` is upstream's rule: one run, keep when its score beats the champion's by more
  than `min_delta`. Cheap, but with seed noise sigma an unchanged recipe is "kept" about half
  the time, so a long campaign ratchets on luck.
* `significance` is a sequential one-sided t-test. A candidate's first run that does not beat
  the champion's mean fails at once (a clear loser costs one run). A promising one is re-run
  with new seeds; after each run from `min_keep_runs` on, a pooled-variance t-test of
  "candidate mean < champion mean - min_delta" is compared with that look's share of
  alpha = 1 - confidence. The shares grow with the look (weights k^2, summing to alpha), so
  by Bonferroni's inequality the chance of keeping a candidate that is no better is at most
  alpha however many looks are taken. After `max_runs` runs an undecided candidate fails.

The variance is pooled over every group of repeated runs the ledger knows (the noise floor's
runs of the baseline, champions and re-run candidates): seed noise is a property of the
machine and the budget far more than of the recipe, and pooling gives the test degrees of
freedom that five runs alone never would.

    verdict = decide(settings, candidate=[1.231, 1.229], champion=[1.240, 1.238, 1.241],
                     groups=[noise_values])
    verdict.action   # "keep" | "discard" | "more"
    gate_note(campaign, noise)   # what every result says about the gate at this noise floor

All values are "lower is better"; callers negate a maximised objective first. The
statistics (Student's t tail via the regularized incomplete beta function) are implemented
here with `math` only, so the gate needs neither scipy nor numpy.
"""
import math
from dataclasses import dataclass, field
from typing import Sequence


# --- Student's t distribution -----------------------------------------------------------------
def _beta_cf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz), x < (a+1)/(a+b+2)."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= c * d
        if abs(c * d - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta function I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if not (a > 0 and b > 0 and 0.0 <= x <= 1.0):
        raise ValueError(f"betainc needs a, b > 0 and 0 <= x <= 1, got a={a}, b={b}, x={x}")
    if x == 0.0 or x == 1.0:
        return x
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    # The continued fraction converges fast only below the mean; use the symmetry above it.
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_cf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_cf(b, a, 1.0 - x) / b


def t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with `df` degrees of freedom (one-sided p-value of t)."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return tail if t >= 0 else 1.0 - tail


def t_isf(p: float, df: float) -> float:
    """The t with P(T > t) = p (bisection on t_sf; used to report critical values)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    lo, hi = -1e3, 1e3
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_sf(mid, df) > p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


# --- sample statistics -------------------------------------------------------------------------
def mean(xs: Sequence[float]) -> float:
    return math.fsum(xs) / len(xs)


def std(xs: Sequence[float]) -> float:
    """Sample standard deviation (n - 1); 0.0 for fewer than two values."""
    if len(xs) < 2:
        return 0.0
    m = mean(xs)
    return math.sqrt(math.fsum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def pooled_variance(groups: Sequence[Sequence[float]]) -> tuple[float, int]:
    """(pooled variance, degrees of freedom) over groups; groups of one value add nothing."""
    ss, df = 0.0, 0
    for g in groups:
        if len(g) >= 2:
            m = mean(g)
            ss += math.fsum((x - m) ** 2 for x in g)
            df += len(g) - 1
    return (ss / df if df else float("nan")), df


# --- decisions ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class GateSettings:
    kind: str = "single"
    min_delta: float = 0.0
    confidence: float = 0.95
    min_keep_runs: int = 2
    max_runs: int = 5

    @classmethod
    def from_campaign(cls, c, kind: str | None = None) -> "GateSettings":
        """The campaign's settings; `kind` resolves gate = "auto" (see gate_kind)."""
        return cls(kind or c.gate, c.min_delta, c.confidence, c.min_keep_runs, c.max_runs)

    def alpha_at(self, k: int) -> float:
        """The share of alpha spent at look k (k runs); 0 before min_keep_runs."""
        if k < self.min_keep_runs or k > self.max_runs:
            return 0.0
        looks = range(self.min_keep_runs, self.max_runs + 1)
        return (1.0 - self.confidence) * k * k / sum(j * j for j in looks)


@dataclass(frozen=True)
class Verdict:
    action: str                      # "keep" | "discard" | "more" (run another seed)
    reason: str
    stats: dict = field(default_factory=dict)


def decide(settings: GateSettings, candidate: Sequence[float], champion: Sequence[float],
           groups: Sequence[Sequence[float]] = ()) -> Verdict:
    """The gate's verdict on a candidate's runs so far against the champion's runs.

    `candidate` and `champion` hold objective values (lower is better); `groups` holds other
    repeated-run groups that only inform the variance (e.g. the noise floor's runs when they
    are not the champion's own). An empty `champion` means there is nothing to beat yet.
    """
    if not candidate:
        raise ValueError("decide needs at least one candidate run")
    if not champion:
        return Verdict("keep", "baseline: nothing to beat yet", {"n": len(candidate), "mean": mean(candidate)})
    if settings.kind == "single":
        return _decide_single(settings, candidate, champion)
    if settings.kind == "significance":
        return _decide_significance(settings, candidate, champion, groups)
    raise ValueError(f"unknown gate {settings.kind!r} (expected single or significance)")


def _decide_single(s: GateSettings, candidate, champion) -> Verdict:
    value, ref = candidate[0], mean(champion)
    stats = {"gate": "single", "value": value, "champion_mean": ref, "champion_n": len(champion),
             "delta": value - ref, "min_delta": s.min_delta}
    if value < ref - s.min_delta:
        return Verdict("keep", f"{value:.6f} beats the champion's {ref:.6f} by {ref - value:.6f}"
                       + (f" (> min_delta {s.min_delta:g})" if s.min_delta else ""), stats)
    return Verdict("discard", f"{value:.6f} does not beat the champion's {ref:.6f}"
                   + (f" by more than min_delta {s.min_delta:g}" if s.min_delta else ""), stats)


def _decide_significance(s: GateSettings, candidate, champion, groups) -> Verdict:
    k, n_b = len(candidate), len(champion)
    m_c, m_b = mean(candidate), mean(champion)
    gain = m_b - m_c - s.min_delta  # > 0: candidate better by more than min_delta
    var, df = pooled_variance([list(candidate), list(champion), *map(list, groups)])
    stats = {"gate": "significance", "n": k, "mean": m_c, "champion_mean": m_b, "champion_n": n_b,
             "gain": m_b - m_c, "min_delta": s.min_delta, "pooled_sd": math.sqrt(var) if df else None,
             "df": df, "t": None, "p": None, "alpha": s.alpha_at(k), "confidence": s.confidence}
    runs = f"{k} run{'s' if k > 1 else ''}"
    if gain <= 0:
        what = "first run" if k == 1 else f"mean of {runs}"
        return Verdict("discard", f"no gain: {what} {m_c:.6f} vs the champion's {m_b:.6f}"
                       + (f" - min_delta {s.min_delta:g}" if s.min_delta else ""), stats)
    if df > 0 and var > 0:
        se = math.sqrt(var * (1.0 / k + 1.0 / n_b))
        t = gain / se
        p = t_sf(t, df)
    else:  # identical values everywhere: no spread to judge a gain against
        t, p = (math.inf, 0.0) if df > 0 else (None, None)
    stats.update(t=t, p=p)
    if k < s.min_keep_runs:
        return Verdict("more", f"promising ({m_c:.6f} vs {m_b:.6f}); needs {s.min_keep_runs} runs", stats)
    alpha_k = s.alpha_at(k)
    if p is not None and p <= alpha_k:
        return Verdict("keep", f"significant: mean of {runs} {m_c:.6f} vs the champion's {m_b:.6f}, "
                       f"p={p:.4f} <= {alpha_k:.4f}", stats)
    p_text = "no spread measured yet" if p is None else f"p={p:.4f} > {alpha_k:.4f}"
    if k >= s.max_runs:
        return Verdict("discard", f"not significant after {runs}: mean {m_c:.6f} vs the champion's "
                       f"{m_b:.6f}, {p_text}", stats)
    return Verdict("more", f"promising, not yet significant ({p_text})", stats)


# --- simulation (the rigor check) --------------------------------------------------------------
def simulate(settings: GateSettings, *, true_gain: float, sigma: float, champion_runs: int,
             trials: int = 2000, seed: int = 0) -> dict:
    """Keep rate of the gate when runs are normal with s.d. `sigma` and the candidate's true
    mean is `true_gain` below the champion's; the champion has `champion_runs` runs (a noise
    floor). Returns {"keep_rate", "mean_runs", "trials"}. true_gain = 0 is the A/A case.
    """
    import random

    rng = random.Random(seed)
    keeps = runs = 0
    for _ in range(trials):
        champion = [1.0 + rng.gauss(0.0, sigma) for _ in range(champion_runs)]
        candidate = []
        while True:
            candidate.append(1.0 - true_gain + rng.gauss(0.0, sigma))
            runs += 1
            v = decide(settings, candidate, champion)
            if v.action != "more":
                keeps += v.action == "keep"
                break
    return {"keep_rate": keeps / trials, "mean_runs": runs / trials, "trials": trials}


# --- which gate, and how reliable it is at the branch's noise floor ------------------------------
# Power at which a gain counts as "detected", and the trials of each simulation.
DETECT_POWER = 0.8
SIM_TRIALS = 400


def floor_of(noise: dict | None) -> float | None:
    sd = (noise or {}).get("floor")
    return sd if isinstance(sd, (int, float)) and math.isfinite(sd) and sd > 0 else None


def gate_kind(campaign, noise: dict | None) -> str:
    """The gate a decision uses: the campaign's, with "auto" resolved by whether a floor exists."""
    if campaign.gate != "auto":
        return campaign.gate
    return "significance" if floor_of(noise) is not None else "single"


def detectable_gain(settings: GateSettings, sd: float, champion_runs: int, power: float = DETECT_POWER,
                    trials: int = SIM_TRIALS) -> tuple[float | None, float]:
    """(smallest gain, in steps of sd/4 up to 4 sd, kept with `power`; or None, mean runs at it)."""
    for step in range(1, 17):
        gain = sd * step / 4
        sim = simulate(settings, true_gain=gain, sigma=sd, champion_runs=champion_runs, trials=trials)
        if sim["keep_rate"] >= power:
            return gain, sim["mean_runs"]
    return None, 0.0


def false_keep_rate(settings: GateSettings, sd: float, champion_runs: int, trials: int = 2000) -> float:
    """How often the gate keeps an unchanged recipe (the A/A case), simulated."""
    return simulate(settings, true_gain=0.0, sigma=sd, champion_runs=champion_runs, trials=trials)["keep_rate"]


def gate_note(campaign, noise: dict | None) -> str | None:
    """The line a result carries about the gate's reliability at this branch's noise floor."""
    sd = floor_of(noise)
    kind = gate_kind(campaign, noise)
    if sd is None:
        if kind == "single":
            return ("no noise floor yet: the single gate keeps an unchanged recipe about half the time. "
                    "Measure it once with `mlx-ar noise` (the default gate then holds such false keeps "
                    f"<= {100 * (1 - campaign.confidence):.0f}%)")
        return "no noise floor yet: the significance gate judges spread by few runs; measure it with `mlx-ar noise`"
    n = max(2, int(noise.get("n_with_receipts") or noise.get("n") or 2))
    if kind == "single":
        rate = false_keep_rate(GateSettings("single", campaign.min_delta), sd, n, trials=500)
        return (f"gate single at noise floor sd {sd:.6f}: keeps an unchanged recipe about {100 * rate:.0f}% of "
                'the time; gate = "auto" or "significance" in campaign.toml holds that '
                f"<= {100 * (1 - campaign.confidence):.0f}%")
    return (f"gate significance at noise floor sd {sd:.6f}: keeps an unchanged recipe <= "
            f"{100 * (1 - campaign.confidence):.0f}% of the time; {detection_text(campaign, noise, sd, n)}")


def detection_text(campaign, noise: dict, sd: float, champion_runs: int) -> str:
    """'detects a gain of ...': the significance gate's detectable gain at floor `sd` (the one stored
    with the noise measurement, else simulated)."""
    gain = noise.get("detectable_gain")
    if gain is None:
        gain, _runs = detectable_gain(GateSettings.from_campaign(campaign, "significance"), sd, champion_runs)
    return (f"detects a gain of {gain:.6f} ({gain / sd:.2g} sd) {100 * DETECT_POWER:.0f}% of the time"
            if gain else "detects only gains above 4 sd")


