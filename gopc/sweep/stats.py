"""The verdict's statistics, each a thin wrapper over scipy: Welch's difference, interval and p-value, Hedges' g, TOST
equivalence, Fisher's exact test of survival counts, Holm's correction, and the seeds per arm a difference would need
(non-central t). Kept apart from verdict.py to be checked on numbers given by hand (tests/test_verdict_stats.py)."""
from __future__ import annotations

import math

import numpy as np
from scipy import stats

LEVEL = 0.95
ALPHA = 0.05
POWER = 0.8


def interval(values: list[float]) -> dict:
    """Mean and its 95% Student-t interval; with one value the interval is unknown (NaN)."""
    v = np.asarray(values, dtype=float)
    if len(v) == 0:
        return {"mean": math.nan, "low": math.nan, "high": math.nan, "n": 0}
    half = stats.t.ppf(0.5 + LEVEL / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)) if len(v) > 1 else math.nan
    return {"mean": float(v.mean()), "low": float(v.mean() - half), "high": float(v.mean() + half), "n": len(v)}


def holm(p: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given: the k-th smallest of m is multiplied by
    m - k + 1, then made non-decreasing along that order and capped at 1. NaN (not tested) stays NaN and
    does not count towards m. scipy has Benjamini-Hochberg (false_discovery_control) but not Holm."""
    idx = [i for i, x in enumerate(p) if not math.isnan(x)]
    out = [math.nan] * len(p)
    running = 0.0
    for k, i in enumerate(sorted(idx, key=lambda i: p[i])):
        running = max(running, min(1.0, (len(idx) - k) * p[i]))
        out[i] = running
    return out


def welch(a, b) -> dict:
    """mean(a) - mean(b), Welch's 95% interval, two-sided p; NaN if a side has under two values or neither varies."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    d = float(a.mean() - b.mean()) if len(a) and len(b) else math.nan
    if len(a) < 2 or len(b) < 2 or (a.std() == 0 and b.std() == 0):
        return {"mean": d, "low": math.nan, "high": math.nan, "p": math.nan}
    r = stats.ttest_ind(a, b, equal_var=False)
    ci = r.confidence_interval(LEVEL)
    return {"mean": d, "low": float(ci.low), "high": float(ci.high), "p": float(r.pvalue)}


def cohens_d(a, b) -> float:
    """The difference in pooled standard deviations (NaN when it cannot be estimated)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 2 or len(b) < 2:
        return math.nan
    pooled = math.sqrt(((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / (len(a) + len(b) - 2))
    return float((a.mean() - b.mean()) / pooled) if pooled > 0 else math.nan


def hedges_g(a, b) -> float:
    """Cohen's d with the small-sample correction J = 1 - 3 / (4 (n_a + n_b) - 9)."""
    n = len(a) + len(b)
    return cohens_d(a, b) * (1 - 3 / (4 * n - 9)) if n > 2 else math.nan


def tost(a, b, margin: float) -> float:
    """Two one-sided Welch tests of |mean(a) - mean(b)| < margin; the p-value is the larger of the two.
    Below 0.05 the 90% interval lies inside (-margin, margin): the arms are equivalent within it."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 2 or len(b) < 2 or (a.std() == 0 and b.std() == 0):
        return math.nan
    lower = stats.ttest_ind(a + margin, b, equal_var=False, alternative="greater").pvalue  # H0: d <= -margin
    upper = stats.ttest_ind(a - margin, b, equal_var=False, alternative="less").pvalue  # H0: d >= margin
    return float(max(lower, upper))


def survival(a_survived: int, a_n: int, b_survived: int, b_n: int) -> float:
    """Fisher's exact two-sided p for survived / died counts of two arms."""
    return float(stats.fisher_exact([[a_survived, a_n - a_survived], [b_survived, b_n - b_survived]]).pvalue)


def seeds_needed(d: float, alpha: float = ALPHA, power: float = POWER, most: int = 10_000) -> int | None:
    """Seeds per arm for a two-sided two-sample t-test at `alpha` to detect a standardized difference d
    with `power`: the smallest n whose non-central t (df 2n - 2, non-centrality d sqrt(n / 2)) puts
    `power` beyond the critical value. None when d is unknown or 0, `most` + 1 when beyond `most`."""
    if not d or math.isnan(d):
        return None
    d = abs(d)
    guess = 2 * ((stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)) / d) ** 2  # the normal approximation,
    for n in range(max(2, int(guess) - 2), most + 1):  # which the t's heavier tails only ever raise
        df, nc = 2 * n - 2, d * math.sqrt(n / 2)
        crit = stats.t.ppf(1 - alpha / 2, df)
        if stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc) >= power:
            return n
    return most + 1
