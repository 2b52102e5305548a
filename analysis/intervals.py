"""Bootstrap 95 % intervals for speed and hit-rate figures, paired between configurations.

Why a bootstrap over units. A simulated run is deterministic; its uncertainty is the workload's:
another set of prompts would route differently. The resampling unit is therefore a sequence (a
prompt and its decode), or, for a single-sequence trace, a block of consecutive tokens (a moving-
block bootstrap's blocks, non-overlapping here: Künsch, Ann. Statist. 17(3), 1989), long enough that
routing locality inside a block is kept. Each resample draws n units with replacement; statistics
are ratios of totals over the drawn units, never means of per-unit ratios:

    tok/s     = Σ tokens / Σ time_s
    Δ tok/s   = (Σ tokens_b / Σ time_b) / (Σ tokens_a / Σ time_a) − 1     (b against baseline a)
    hit rate  = Σ hits / Σ accesses;   Δ hit rate = hit_b − hit_a
    KLD       = Σ kld_sum / Σ tokens    (mean per-token KLD; same ratio machinery)

Paired: configurations a and b ran on the same units, so every resample uses the same unit draws
for both (and for every configuration of one comparison); the Δ interval then reflects how the
gain varies over the workload, not the spread of each configuration alone. Intervals are
percentile intervals (2.5 %, 97.5 %, numpy's linear interpolation) of the resampled statistic.

Determinism and speed. The draws are `numpy.random.default_rng(seed).integers(0, n, (R, n))`,
turned into a count matrix C [R, n] (C[r, i] = times unit i was drawn in resample r), so every
resampled total is one matrix product C @ x. The same (seed, n, R) gives the same C; results do
not depend on the order in which comparisons are made.

Known limits: with few units (the real phone trace has 1 sequence; 4-sequence synthetic traces
have 4) a percentile bootstrap is too narrow; `n_units` is returned with every interval so a
reader can judge, and intervals from fewer than `MIN_UNITS` units are flagged.

Frame API (`paired_frame`): input one row per (configuration, unit) with columns
    keys…  (e.g. model, gpu, vram_gb, pcie, budget)  — the comparison group
    config (str)   — configuration label; `baseline` names the reference configuration
    unit   (any)   — sequence id or block id, identical across configurations of a group
    time_s, tokens — simulated seconds and counted tokens of that unit
    hits, accesses — optional: cache hits and accesses of that unit
output one row per (group, config) with
    keys…, config, n_units, tok_s, tok_s_lo, tok_s_hi, delta, delta_lo, delta_hi,
    [hit_rate, hit_rate_lo, hit_rate_hi, hit_delta, hit_delta_lo, hit_delta_hi]
where delta is the relative tok/s change against the group's baseline (0 for the baseline row).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

N_RESAMPLES = 2000
LEVEL = 0.95
MIN_UNITS = 8  # below this many units an interval is reported but flagged (`few_units`)


@dataclass(frozen=True)
class Interval:
    """A point estimate and its bootstrap interval; `n_units` resampled units."""

    estimate: float
    lo: float
    hi: float
    n_units: int

    def as_dict(self, prefix: str) -> dict[str, float]:
        """{prefix: estimate, prefix_lo: lo, prefix_hi: hi}."""
        return {prefix: self.estimate, f"{prefix}_lo": self.lo, f"{prefix}_hi": self.hi}


def resample_indices(n_units: int, n_resamples: int = N_RESAMPLES, seed: int = 0) -> np.ndarray:
    """int [R, n]: the units drawn (with replacement) in each resample; fixed by (n, R, seed)."""
    if n_units < 1:
        raise ValueError("need at least one unit to resample")
    if n_resamples < 1:
        raise ValueError("need at least one resample")
    return np.random.default_rng(seed).integers(0, n_units, size=(n_resamples, n_units))


def resample_counts(n_units: int, n_resamples: int = N_RESAMPLES, seed: int = 0) -> np.ndarray:
    """float [R, n]: how often each unit is drawn in each resample (rows of `resample_indices`)."""
    idx = resample_indices(n_units, n_resamples, seed)
    flat = idx + (np.arange(n_resamples) * n_units)[:, None]
    counts = np.bincount(flat.ravel(), minlength=n_resamples * n_units)
    return counts.reshape(n_resamples, n_units).astype(np.float64)


def _percentiles(samples: np.ndarray, level: float) -> tuple[float, float]:
    a = (1.0 - level) / 2.0
    lo, hi = np.percentile(samples, [100 * a, 100 * (1 - a)])
    return float(lo), float(hi)


def _units(*arrays: np.ndarray) -> list[np.ndarray]:
    out = [np.asarray(a, dtype=np.float64) for a in arrays]
    n = out[0].shape
    if len(n) != 1 or any(a.shape != n for a in out):
        raise ValueError("per-unit arrays must be 1-D and of equal length")
    if not all(np.all(np.isfinite(a)) for a in out):
        raise ValueError("per-unit values must be finite")
    return out


def ratio_interval(num, den, *, n_resamples: int = N_RESAMPLES, seed: int = 0, level: float = LEVEL,
                   counts: np.ndarray | None = None) -> Interval:
    """Σnum / Σden over units with its bootstrap interval (tok/s: num=tokens, den=time_s)."""
    num, den = _units(num, den)
    c = resample_counts(num.size, n_resamples, seed) if counts is None else counts
    with np.errstate(divide="ignore", invalid="ignore"):
        samples = (c @ num) / (c @ den)
    lo, hi = _percentiles(samples, level)
    return Interval(float(num.sum() / den.sum()), lo, hi, num.size)


def paired_ratio_interval(num_a, den_a, num_b, den_b, *, relative: bool = True, n_resamples: int = N_RESAMPLES,
                          seed: int = 0, level: float = LEVEL, counts: np.ndarray | None = None) -> Interval:
    """Paired change of a ratio of totals from a to b: relative (r_b / r_a − 1) or absolute (r_b − r_a).

    Δ tok/s: num = tokens, den = time_s, relative. Δ hit rate: num = hits, den = accesses,
    relative=False. Units must be the same units, in the same order, for a and b.
    """
    num_a, den_a, num_b, den_b = _units(num_a, den_a, num_b, den_b)
    c = resample_counts(num_a.size, n_resamples, seed) if counts is None else counts
    with np.errstate(divide="ignore", invalid="ignore"):
        ra = (c @ num_a) / (c @ den_a)
        rb = (c @ num_b) / (c @ den_b)
        samples = rb / ra - 1.0 if relative else rb - ra
        pa, pb = num_a.sum() / den_a.sum(), num_b.sum() / den_b.sum()
    est = pb / pa - 1.0 if relative else pb - pa
    lo, hi = _percentiles(samples, level)
    return Interval(float(est), lo, hi, num_a.size)


def speedup_interval(time_a, tokens_a, time_b, tokens_b, **kw) -> Interval:
    """Relative tok/s change of configuration b against baseline a, paired over units."""
    return paired_ratio_interval(tokens_a, time_a, tokens_b, time_b, relative=True, **kw)


def block_units(values: np.ndarray, block: int) -> np.ndarray:
    """Sum consecutive per-token values into blocks of `block` tokens (a shorter last block is kept
    only if it is at least half a block, else merged into the previous one)."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError("values must be a non-empty 1-D array")
    if block < 1:
        raise ValueError("block must be >= 1")
    ids = np.arange(v.size) // block
    n_full, rest = divmod(v.size, block)
    if rest and rest < block / 2 and n_full >= 1:
        ids[ids == n_full] = n_full - 1
    return np.bincount(ids, weights=v)


def unit_of_steps(seq: np.ndarray, block_tokens: int = 64) -> np.ndarray:
    """int [steps]: the resampling unit of each trace step: its sequence when the trace has at least
    two sequences, else its block of `block_tokens` consecutive steps (last short block merged as in
    `block_units`). Sum per-step time, tokens, hits and accesses by this id to get `paired_frame` rows."""
    seq = np.asarray(seq)
    if seq.ndim != 1 or seq.size == 0:
        raise ValueError("seq must be a non-empty 1-D array")
    uniq, ids = np.unique(seq, return_inverse=True)
    if uniq.size >= 2:
        return ids.astype(np.int64)
    if block_tokens < 1:
        raise ValueError("block_tokens must be >= 1")
    ids = np.arange(seq.size) // block_tokens
    n_full, rest = divmod(seq.size, block_tokens)
    if rest and rest < block_tokens / 2 and n_full >= 1:
        ids[ids == n_full] = n_full - 1
    return ids.astype(np.int64)


def paired_frame(df: pd.DataFrame, keys: Sequence[str], baseline: str, *, config: str = "config",
                 unit: str = "unit", time_s: str = "time_s", tokens: str = "tokens", hits: str | None = "hits",
                 accesses: str | None = "accesses", n_resamples: int = N_RESAMPLES, seed: int = 0,
                 level: float = LEVEL) -> pd.DataFrame:
    """Per (group, config): tok/s, Δ tok/s vs `baseline` and hit rate, each with a paired interval.

    Column contract in the module docstring. Every configuration of a group must cover exactly the
    baseline's units (ValueError otherwise); hit columns are used when both are present.
    """
    keys = list(keys)
    need = keys + [config, unit, time_s, tokens]
    use_hits = hits is not None and accesses is not None and hits in df and accesses in df
    if use_hits:
        need += [hits, accesses]
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise ValueError(f"paired_frame: missing columns {missing}")
    rows = []
    groups = df.groupby(keys, sort=True, dropna=False) if keys else [((), df)]
    for gkey, g in groups:
        gkey = gkey if isinstance(gkey, tuple) else (gkey,)
        base = g[g[config] == baseline]
        if base.empty:
            raise ValueError(f"paired_frame: group {dict(zip(keys, gkey))} has no baseline {baseline!r} rows")
        if base[unit].duplicated().any():
            raise ValueError(f"paired_frame: group {dict(zip(keys, gkey))} repeats a unit for {baseline!r}")
        units = base[unit].sort_values(kind="stable").to_numpy()
        b = base.set_index(unit).loc[units]
        c = resample_counts(units.size, n_resamples, seed)
        for cfg_name, part in g.groupby(config, sort=True):
            if part[unit].duplicated().any() or set(part[unit]) != set(units):
                raise ValueError(f"paired_frame: config {cfg_name!r} of group {dict(zip(keys, gkey))} "
                                 "does not cover exactly the baseline's units")
            p = part.set_index(unit).loc[units]
            row = dict(zip(keys, gkey))
            row[config] = cfg_name
            row["n_units"] = int(units.size)
            row.update(ratio_interval(p[tokens], p[time_s], counts=c, level=level).as_dict("tok_s"))
            row.update(paired_ratio_interval(b[tokens], b[time_s], p[tokens], p[time_s], counts=c,
                                             level=level).as_dict("delta"))
            if use_hits:
                row.update(ratio_interval(p[hits], p[accesses], counts=c, level=level).as_dict("hit_rate"))
                row.update(paired_ratio_interval(b[hits], b[accesses], p[hits], p[accesses], relative=False,
                                                 counts=c, level=level).as_dict("hit_delta"))
            row["few_units"] = bool(units.size < MIN_UNITS)
            rows.append(row)
    return pd.DataFrame(rows)


__all__ = [
    "Interval", "LEVEL", "MIN_UNITS", "N_RESAMPLES", "block_units", "paired_frame", "paired_ratio_interval",
    "ratio_interval", "resample_counts", "resample_indices", "speedup_interval", "unit_of_steps",
]


def t_interval(values: list[float]) -> tuple[float, float, float]:
    """(mean, low, high) of a 95 % Student-t interval of the mean (few timed repeats: the executor's rounds)."""
    v = np.asarray(values, dtype=np.float64)
    m = float(v.mean())
    if v.size < 2:
        return m, m, m
    t95 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306, 10: 2.262}.get(v.size, 2.0)
    half = t95 * float(v.std(ddof=1)) / math.sqrt(v.size)
    return m, m - half, m + half
