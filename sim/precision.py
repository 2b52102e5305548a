"""Precision policies: in which format each expert access is served, loaded, or skipped.

`native`: every expert at its GGUF format (Q4_K_M: Q4_K gate/up, Q4_K or Q6_K down).

`static:SIGNAL:X%:FMT`: in every layer, the bottom X % of experts by an importance SIGNAL learned
on a calibration window are held and moved in FMT (a low format, below) for the whole evaluation window.
Signals: `freq` (times selected), `weight` (mean gate weight when selected), `mass` (frequency ×
mean weight = summed gate weight), `random` (a seeded control). Unselected experts rank lowest;
ties break by expert id. Ranking is per layer, so every layer demotes the same number of experts
(early layers route almost uniformly, so one global ranking would demote whole layers).

`dynamic:T1:T2[:FMT][:LOWCOPY]`: HOBBIT's token-level rule (Tang et al., arXiv 2411.01433, §3.2):
rank the step's experts by gate weight; an expert's score is the summed weight of the experts ranked
above it (the top expert scores 0). On a miss, score ≤ T1 loads the expert at its high precision,
T1 < score ≤ T2 loads it in FMT (default q2_k), score > T2 skips it. A resident high copy is always
used. What a resident LOW copy may serve is the `LOWCOPY` setting (`LOW_COPY_RULES`):
- `reload` (default): only uses ranked below T1 (score > T1); a high-ranked use loads the expert
  again at high precision (which then supersedes the low copy), so it can cross PCIe twice.
  Quality first; not described in HOBBIT's paper as far as could be established.
- `serve`: a resident low copy serves any use, also one ranked ≤ T1 (a hit is a hit; precision is
  decided on misses only, which is how HOBBIT's abstract states the rule). Cheaper in bytes, but a
  high-ranked use may then compute from the low copy: a quality cost the `reload` rule does not have.
HOBBIT used T1 = 0.6, T2 = 0.9 on Mixtral (top-2).

Low formats (`LOW_FORMATS`; FMT above): `q2_k`, `q3_k` (all three expert tensors re-quantized to
Q2_K / Q3_K) and the tensor-aware `q2_k_gu`, `q3_k_gu` (`TENSOR_AWARE_FORMATS`): only ffn_gate and
ffn_up at Q2_K / Q3_K, ffn_down kept in the layer's native format (Q4_K, or Q6_K in the layers where
llama.cpp's Q4_K_M recipe gives ffn_down Q6_K). Bytes: sim.profiles.ModelProfile.expert_bytes;
compute: sim.cost.tensor_aware_split.

Combinations join with `+`: `static:mass:20%:q3_k+dynamic:0.6:0.9`. `+pools:split:S` keeps
low-precision copies in a pool of share S of the capacity (HOBBIT's separate caches) instead of
one shared byte pool.

This module is the one home of precision: the format slots a cache entry can hold (`SLOTS`,
`LOW_FORMATS`), the parser, the static demotion sets (`static_slots`) and the dynamic rule
(`dynamic_choice`: a score → HIGH, LOW or SKIP). The engine and `jaxmoe.quality` import them
(`jaxmoe.quality` re-quantizes whole experts, so it takes `UNIFORM_LOW_FORMATS` only).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sim.io import InputError
from sim.trace import ABSENT, Trace

SIGNALS = ("freq", "weight", "mass", "random")
NATIVE = "native"
UNIFORM_LOW_FORMATS = ("q2_k", "q3_k")  # every tensor of the expert in this format
GATE_UP_SUFFIX = "_gu"
# tensor-aware: ffn_gate and ffn_up in the uniform format, ffn_down at the layer's native format
TENSOR_AWARE_FORMATS = tuple(f + GATE_UP_SUFFIX for f in UNIFORM_LOW_FORMATS)
LOW_FORMATS = UNIFORM_LOW_FORMATS + TENSOR_AWARE_FORMATS  # the formats a precision policy may demote an expert to
# format slot of a cache entry: 0 = native, then the low formats. New formats are appended, so a slot's
# index never changes meaning (slot 1 is q2_k, 2 is q3_k, as jaxmoe's executors and plans assume).
SLOTS = (NATIVE,) + LOW_FORMATS
HIGH, LOW, SKIP = 0, 1, 2  # what the dynamic rule does with a missed expert (see dynamic_choice)
RELOAD, SERVE = "reload", "serve"
LOW_COPY_RULES = (RELOAD, SERVE)  # what a resident low copy may serve (module docstring)


def gate_up_format(fmt: str) -> str | None:
    """The gate/up format of a tensor-aware low format (`q2_k_gu` → `q2_k`); None for any other format."""
    return fmt[: -len(GATE_UP_SUFFIX)] if fmt in TENSOR_AWARE_FORMATS else None


@dataclass(frozen=True)
class PrecisionPolicy:
    """A parsed precision policy (see the module docstring for the grammar)."""

    static_signal: str | None = None
    static_fraction: float = 0.0
    static_format: str | None = None
    t1: float | None = None
    t2: float | None = None
    dynamic_format: str = "q2_k"
    low_pool_share: float | None = None  # None: one shared byte pool
    low_copy: str = RELOAD  # dynamic part: what a resident low copy may serve (LOW_COPY_RULES)

    @property
    def is_static(self) -> bool:
        return self.static_signal is not None and self.static_fraction > 0

    @property
    def is_dynamic(self) -> bool:
        return self.t1 is not None

    @property
    def name(self) -> str:
        parts = []
        if self.static_signal is not None:
            parts.append(f"static:{self.static_signal}:{self.static_fraction * 100:g}%:{self.static_format}")
        if self.is_dynamic:
            parts.append(f"dynamic:{self.t1:g}:{self.t2:g}:{self.dynamic_format}"
                         + (f":{self.low_copy}" if self.low_copy != RELOAD else ""))
        if self.low_pool_share is not None:
            parts.append(f"pools:split:{self.low_pool_share:g}")
        return "+".join(parts) or NATIVE

    def low_copy_serves(self, choice: int) -> bool:
        """Whether a resident low copy may serve a use for which the dynamic rule says `choice`."""
        return self.is_dynamic and (choice != HIGH or self.low_copy == SERVE)

    def low_formats(self) -> tuple[str, ...]:
        """Formats below native this policy may use, in a fixed order."""
        out = []
        for f in (self.static_format if self.is_static else None, self.dynamic_format if self.is_dynamic else None):
            if f is not None and f not in out:
                out.append(f)
        return tuple(out)


def _fraction(text: str, spec: str) -> float:
    s = text.strip()
    try:
        value = float(s[:-1]) / 100 if s.endswith("%") else float(s)
    except ValueError:
        raise InputError(None, f"precision {spec!r}: cannot parse fraction {text!r} (use 30% or 0.3)") from None
    if not 0 <= value <= 1:
        raise InputError(None, f"precision {spec!r}: fraction {text!r} outside 0..100%")
    return value


def _low_format(text: str, spec: str) -> str:
    fmt = text.strip().lower()
    if fmt not in LOW_FORMATS:
        raise InputError(None, f"precision {spec!r}: low format {text!r} must be one of {', '.join(LOW_FORMATS)} "
                               f"(*{GATE_UP_SUFFIX}: only ffn_gate/ffn_up demoted, ffn_down kept native)")
    return fmt


def parse_precision(spec: str) -> PrecisionPolicy:
    """Parse one precision policy such as `static:weight:30%:q2_k+dynamic:0.6:0.9`."""
    fields: dict = {}
    for part in spec.strip().lower().split("+"):
        bits = part.split(":")
        kind = bits[0]
        if kind == NATIVE and len(bits) == 1:
            continue
        if kind == "static" and len(bits) == 4:
            if bits[1] not in SIGNALS:
                raise InputError(None, f"precision {spec!r}: signal {bits[1]!r} must be one of {', '.join(SIGNALS)}")
            fields.update(static_signal=bits[1], static_fraction=_fraction(bits[2], spec),
                          static_format=_low_format(bits[3], spec))
        elif kind == "dynamic" and len(bits) in (3, 4, 5):
            try:
                t1, t2 = float(bits[1]), float(bits[2])
            except ValueError:
                raise InputError(None, f"precision {spec!r}: thresholds must be numbers") from None
            if not 0 <= t1 <= t2 <= 1:
                raise InputError(None, f"precision {spec!r}: need 0 ≤ T1 ≤ T2 ≤ 1")
            fields.update(t1=t1, t2=t2)
            rest = bits[3:]
            if rest and rest[-1] in LOW_COPY_RULES:
                fields["low_copy"] = rest.pop()
            if len(rest) > 1:
                raise InputError(None, f"precision {spec!r}: dynamic takes T1:T2[:FMT][:{'|'.join(LOW_COPY_RULES)}]")
            if rest:
                fields["dynamic_format"] = _low_format(rest[0], spec)
        elif kind == "pools" and len(bits) == 3 and bits[1] == "split":
            share = _fraction(bits[2], spec)
            if not 0 < share < 1:
                raise InputError(None, f"precision {spec!r}: split pool share must be strictly between 0 and 1")
            fields["low_pool_share"] = share
        else:
            raise InputError(
                None,
                f"cannot parse precision {spec!r}: use native, static:SIGNAL:X%:FMT, dynamic:T1:T2[:FMT][:reload|serve], "
                "pools:split:S, joined with +",
            )
    policy = PrecisionPolicy(**fields)
    if policy.low_pool_share is not None and not policy.low_formats():
        raise InputError(None, f"precision {spec!r}: a split pool needs a static or dynamic low format")
    return policy


def importance(trace: Trace, signal: str, seed: int = 0) -> np.ndarray:
    """float64 [layers, experts]: the importance of each expert on `trace` (higher = keep precise)."""
    n_layers, n_experts = trace.meta.n_layers, trace.meta.n_experts
    ids = trace.experts.astype(np.int64)
    present = ids != ABSENT
    layer = np.broadcast_to(np.arange(n_layers)[None, :, None], ids.shape)
    flat = (layer * n_experts + np.where(present, ids, 0))[present]
    freq = np.bincount(flat, minlength=n_layers * n_experts).astype(np.float64)
    mass = np.bincount(flat, weights=trace.weights[present].astype(np.float64), minlength=n_layers * n_experts)
    if signal == "freq":
        out = freq
    elif signal == "mass":
        out = mass
    elif signal == "weight":
        out = np.divide(mass, freq, out=np.zeros_like(mass), where=freq > 0)
    elif signal == "random":
        out = np.random.default_rng(seed).random(n_layers * n_experts)
    else:
        raise ValueError(f"unknown signal {signal!r}")
    return out.reshape(n_layers, n_experts)


def demoted_experts(scores: np.ndarray, fraction: float) -> np.ndarray:
    """bool [layers, experts]: the bottom `fraction` of each layer's experts by score (ties → lower id)."""
    _n_layers, n_experts = scores.shape
    n_low = round(fraction * n_experts)
    # stable sort on score ascending; equal scores keep expert-id order
    order = np.argsort(scores, axis=1, kind="stable")
    out = np.zeros_like(scores, dtype=bool)
    np.put_along_axis(out, order[:, :n_low], True, axis=1)
    return out


def hobbit_scores(weights: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Summed gate weight of the higher-ranked experts, for weights in rank order along the last axis.

    `out`: a float64 array of the weights' shape to write into (sim.engine.build_groups fills its column in place)."""
    w = np.asarray(weights, dtype=np.float64)
    if out is None:
        return np.cumsum(w, axis=-1) - w
    np.cumsum(w, axis=-1, out=out)
    out -= w
    return out


def dynamic_choice(policy: PrecisionPolicy, score: float) -> int:
    """HOBBIT's rule for a missed expert of HOBBIT score `score`: HIGH, LOW (in policy.dynamic_format) or SKIP.

    Without a dynamic part every expert is served at its high precision. A resident high copy is
    served whatever this says; a resident low copy when `policy.low_copy_serves(choice)`.
    """
    if not policy.is_dynamic or score <= policy.t1:
        return HIGH
    return LOW if score <= policy.t2 else SKIP


def static_slots(calib: Trace | None, policy: PrecisionPolicy, n_layers: int, n_experts: int, seed: int) -> np.ndarray:
    """int8 [layers, experts]: the high-precision slot of each expert (index into SLOTS) under `policy`'s static part."""
    slots = np.zeros((n_layers, n_experts), dtype=np.int8)
    if policy.is_static:
        if calib is None or calib.n_steps == 0:
            raise ValueError("a static precision policy needs a calibration window (calib_fraction > 0)")
        demoted = demoted_experts(importance(calib, policy.static_signal, seed), policy.static_fraction)
        slots[demoted] = SLOTS.index(policy.static_format)
    return slots
