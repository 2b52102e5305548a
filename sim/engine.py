"""Logical replay: trace → access groups → precision policy → cache policy → per-group costs.

The engine decides, in trace order, what each expert access does (hit, load at high or low
precision, or skip) and what the copy engine and compute stream must do for each access group;
`sim.timeline` then turns those per-group costs into time. Cache decisions do not depend on
time (a prefetched expert counts as resident from its admission; the timeline makes the compute
wait for its copy), so this split keeps the data flowing one way.

Access groups. A decode group is one (token step, layer): its top-k experts, each with one token.
A prefill group is one (micro-batch of up to `ubatch` prefill tokens of a sequence, layer): the
distinct experts the batch routes to (in the order of their last use within the batch, so recency matches a token-by-token pass), each with its token count, its summed gate weight and its
best (lowest) HOBBIT score; the engine loads each distinct expert once per batch, as llama.cpp
does. Prefetch runs in decode only: after serving layer l of a token, the experts predicted for
layer l+1 (the trace's own predictions, or an oracle with accuracy p) are admitted to the cache.

Drivers. `replay(groups, CacheSpec, precision, ...)` is the one entry point. It takes the compiled
path (`sim.engine_compiled`: this loop and the cache policies in one numba kernel; belady's in
`sim.engine_belady`) for every cache policy and any precision policy, split pools and prefetch
included (belady: native or static precision, one pool); otherwise (or with `fast=False`) it builds the cache objects, hands them the stream through their
`prepare_replay` hook (Belady's future, static's calibration window) and runs `replay_reference`,
the access-by-access reference loop. Tests hold the two paths equal, access for access.

Calibration. The first `calib_fraction` of the trace (whole sequences when there are several,
else steps) is the calibration window: static precision policies and static pinning learn from
it, and it is replayed to warm the cache, but only the evaluation window is counted.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from sim.cache.base import EXPERT_SHIFT, LAYER_SHIFT, make_key
from sim.precision import HIGH, LOW, SLOTS, PrecisionPolicy, dynamic_choice, hobbit_scores
from sim.trace import ABSENT, DECODE, PREFILL, Trace

HIT, LOADED, SKIPPED = 0, 1, 2
UNPRICED = -1  # bytes of a format slot the model cannot size (sim.cost.slot_tables); no policy may use it


@dataclass(frozen=True)
class AccessGroups:
    """The trace as the engine replays it: groups of accesses, in order."""

    layer: np.ndarray  # int32 [G]
    seq: np.ndarray  # int32 [G]
    step: np.ndarray  # int32 [G]  first token step of the group
    phase: np.ndarray  # uint8 [G]
    tokens: np.ndarray  # int32 [G]  tokens that pass through this layer in this group
    token_end: np.ndarray  # bool [G]  last layer of a decode token: the output head runs after it
    calib: np.ndarray  # bool [G]  in the calibration window (replayed, not counted)
    start: np.ndarray  # int64 [G+1] access range of each group
    expert: np.ndarray  # int32 [N]
    score: np.ndarray  # float64 [N] HOBBIT score (summed weight of higher-ranked experts; batch minimum)
    mass: np.ndarray  # float64 [N] gate weight (summed over the batch's tokens)
    acc_tokens: np.ndarray  # int32 [N] tokens routed to this expert in this group
    predicted: np.ndarray  # int16 [G, k] experts to prefetch after group g for the next layer; -1 none

    @property
    def n_groups(self) -> int:
        return int(self.layer.size)


def calibration_steps(trace: Trace, fraction: float) -> np.ndarray:
    """bool [steps]: the calibration window (first whole sequences, or first steps of one sequence)."""
    calib = np.zeros(trace.n_steps, dtype=bool)
    if fraction <= 0:
        return calib
    seqs = list(dict.fromkeys(trace.seq.tolist()))  # in order of appearance
    if len(seqs) >= 2:
        n = min(len(seqs) - 1, max(1, round(fraction * len(seqs))))
        calib[np.isin(trace.seq, seqs[:n])] = True
    else:
        calib[: min(trace.n_steps - 1, max(1, int(fraction * trace.n_steps)))] = True
    return calib


def oracle_predictions(trace: Trace, accuracy: float, seed: int) -> np.ndarray:
    """int16 like trace.experts: each true expert kept with prob `accuracy`, else a wrong random one."""
    rng = np.random.default_rng(seed)
    true = trace.experts.astype(np.int64)
    n_experts = trace.meta.n_experts
    keep = rng.random(true.shape) < accuracy
    out = np.where(keep | (true == ABSENT), true, ABSENT)
    # Each dropped prediction becomes a random expert outside the true top-k and distinct from the
    # other predictions of its group: draw for all at once, redraw the collisions, repeat.
    todo = np.argwhere((out == ABSENT) & (true != ABSENT))
    while todo.size:
        t, l, r = todo.T
        cand = rng.integers(n_experts, size=t.size)
        clash = (true[t, l] == cand[:, None]).any(1) | (out[t, l] == cand[:, None]).any(1)
        # two draws for the same group in one round may pick the same id: keep only the first
        order = np.lexsort((r, cand, l, t))
        dup = np.zeros(t.size, dtype=bool)
        same = (t[order][1:] == t[order][:-1]) & (l[order][1:] == l[order][:-1]) & (cand[order][1:] == cand[order][:-1])
        dup[order[1:][same]] = True
        ok = ~clash & ~dup
        out[t[ok], l[ok], r[ok]] = cand[ok]
        todo = todo[~ok]
    return out.astype(np.int16)


# the columns of AccessGroups: per group, then per access (`predicted` and `start` are built apart)
_GROUP_DTYPES = {"layer": np.int32, "seq": np.int32, "step": np.int32, "phase": np.uint8, "tokens": np.int32,
                 "token_end": np.bool_, "calib": np.bool_}
_ACCESS_DTYPES = {"expert": np.int32, "score": np.float64, "mass": np.float64, "acc_tokens": np.int32}
DECODE_BLOCK = 2048  # token steps per decode block: bounds the temporaries (the groups do not depend on it)


def build_groups(trace: Trace, calib_steps: np.ndarray, *, ubatch: int = 512, predicted: np.ndarray | None = None) -> AccessGroups:
    """Turn a trace into access groups (see the module docstring).

    Built in place: the groups and accesses are counted first, the columns allocated once at their
    final size, and each decode block of steps (or prefill micro-batch) written into its slice, so
    the peak is the groups plus one block's temporaries (no per-part pieces to concatenate)."""
    k = trace.experts.shape[2]
    pieces: list = []  # (lo, hi, groups) of a decode block, or a prefill micro-batch's columns
    n_groups = 0
    bounds = np.flatnonzero(np.diff(trace.seq.astype(np.int64)) | np.diff(trace.phase.astype(np.int64))) + 1
    for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, trace.n_steps]):
        if trace.phase[lo] == DECODE:
            for b in range(lo, hi, DECODE_BLOCK):
                e = min(hi, b + DECODE_BLOCK)
                n = int(np.count_nonzero(trace.experts[b:e, :, 0] != ABSENT))
                pieces.append((b, e, n))
                n_groups += n
        else:
            for b in range(lo, hi, ubatch):
                part = _prefill_group(trace, b, min(hi, b + ubatch), calib_steps)
                pieces.append(part)
                n_groups += part["layer"].size
    start = np.zeros(n_groups + 1, dtype=np.int64)
    counts = start[1:]
    g0 = 0
    for piece in pieces:
        if isinstance(piece, tuple):
            counts[g0:g0 + piece[2]] = k
            g0 += piece[2]
        else:
            counts[g0:g0 + piece["counts"].size] = piece["counts"]
            g0 += piece["counts"].size
    np.cumsum(counts, out=counts)
    n_acc = int(start[-1])
    cols = {key: np.empty(n_groups, dtype=dt) for key, dt in _GROUP_DTYPES.items()}
    cols.update({key: np.empty(n_acc, dtype=dt) for key, dt in _ACCESS_DTYPES.items()})
    cols["predicted"] = np.empty((n_groups, k), dtype=np.int16)
    g0 = 0
    for piece in pieces:
        if isinstance(piece, tuple):
            lo, hi, n = piece
            _decode_groups(trace, lo, hi, calib_steps, predicted, cols, g0, int(start[g0]), n)
        else:
            n = piece["counts"].size
            a0, a1 = int(start[g0]), int(start[g0 + n])
            for key in _GROUP_DTYPES:
                cols[key][g0:g0 + n] = piece[key]
            for key in _ACCESS_DTYPES:
                cols[key][a0:a1] = piece[key]
            cols["predicted"][g0:g0 + n] = piece["predicted"]
        g0 += n
    return AccessGroups(start=start, **cols)


def _decode_groups(trace: Trace, lo: int, hi: int, calib_steps, predicted, cols: dict, g0: int, a0: int,
                   n: int) -> None:
    """Write the decode groups of steps lo..hi (n of them, one per present (step, layer)) into `cols`
    from group g0 and access a0 on."""
    present = trace.experts[lo:hi, :, 0] != ABSENT  # [T, L]
    t_idx, l_idx = np.nonzero(present)  # row-major: token by token, layer by layer
    assert t_idx.size == n
    k = trace.experts.shape[2]
    n_layers = trace.experts.shape[1]
    g = slice(g0, g0 + n)
    # the last present layer of each token ends the token (the output head runs after it)
    last_layer = np.where(present.any(1), n_layers - 1 - np.argmax(present[:, ::-1], axis=1), -1)
    pred = cols["predicted"][g]
    pred[:] = ABSENT  # expert ids are int16 in a trace
    source = trace.predicted if predicted is None else predicted
    if source is not None:
        nxt = l_idx + 1 < n_layers
        nxt_present = np.zeros_like(nxt)
        nxt_present[nxt] = present[t_idx[nxt], l_idx[nxt] + 1]
        sel = np.flatnonzero(nxt_present)
        pred[sel] = source[lo + t_idx[sel], l_idx[sel] + 1]
    cols["layer"][g] = l_idx
    cols["seq"][g] = trace.seq[lo + t_idx]
    cols["step"][g] = lo + t_idx
    cols["phase"][g] = DECODE
    cols["tokens"][g] = 1
    cols["token_end"][g] = l_idx == last_layer[t_idx]
    cols["calib"][g] = calib_steps[lo + t_idx]
    a = slice(a0, a0 + n * k)
    cols["expert"][a] = trace.experts[lo:hi][t_idx, l_idx].reshape(-1)
    w = trace.weights[lo:hi][t_idx, l_idx].astype(np.float64)  # [n, k]
    hobbit_scores(w, out=cols["score"][a].reshape(n, k))
    cols["mass"][a] = w.reshape(-1)
    cols["acc_tokens"][a] = 1


def _prefill_group(trace: Trace, lo: int, hi: int, calib_steps) -> dict:
    experts = trace.experts[lo:hi].astype(np.int64)
    weights = trace.weights[lo:hi].astype(np.float64)
    scores = hobbit_scores(weights)
    n_experts, k = trace.meta.n_experts, trace.meta.top_k
    out = {key: [] for key in ("layer", "tokens", "expert", "score", "mass", "acc_tokens", "counts")}
    for layer in range(experts.shape[1]):
        ids = experts[:, layer].reshape(-1)
        ok = ids != ABSENT
        if not ok.any():
            continue
        ids, w, s = ids[ok], weights[:, layer].reshape(-1)[ok], scores[:, layer].reshape(-1)[ok]
        _, last_rev = np.unique(ids[::-1], return_index=True)
        uniq = ids[np.sort(ids.size - 1 - last_rev)]  # distinct experts in order of their last touch
        best = np.full(n_experts, np.inf)
        np.minimum.at(best, ids, s)
        out["layer"].append(layer)
        out["tokens"].append(int(ok.sum()) // k)
        out["expert"].append(uniq.astype(np.int32))
        out["score"].append(best[uniq])
        out["mass"].append(np.bincount(ids, weights=w, minlength=n_experts)[uniq])
        out["acc_tokens"].append(np.bincount(ids, minlength=n_experts)[uniq].astype(np.int32))
        out["counts"].append(uniq.size)
    g = len(out["layer"])
    return {
        "layer": np.array(out["layer"], dtype=np.int32),
        "seq": np.full(g, trace.seq[lo], dtype=np.int32),
        "step": np.full(g, lo, dtype=np.int32),
        "phase": np.full(g, PREFILL, dtype=np.uint8),
        "tokens": np.array(out["tokens"], dtype=np.int32),
        "token_end": np.zeros(g, dtype=bool),
        "calib": np.full(g, bool(calib_steps[lo]), dtype=bool),
        "expert": np.concatenate(out["expert"]),
        "score": np.concatenate(out["score"]),
        "mass": np.concatenate(out["mass"]),
        "acc_tokens": np.concatenate(out["acc_tokens"]),
        "predicted": np.full((g, k), ABSENT, dtype=np.int16),
        "counts": np.array(out["counts"], dtype=np.int64),
    }


@dataclass(frozen=True)
class Outcome:
    """What the logical replay decided, per access and per group."""

    result: np.ndarray  # int8 [N]: HIT, LOADED or SKIPPED
    slot: np.ndarray  # int8 [N]: format slot served (or loaded); -1 when skipped
    prefetch_bytes: np.ndarray  # int64 [G]: bytes admitted by prefetch after group g
    prefetch_loads: np.ndarray  # int64 [G]: experts admitted by prefetch after group g
    prefetch_link_s: np.ndarray  # float64 [G]: copy-engine time of those admissions
    wait_group: np.ndarray  # int64 [G]: the group whose prefetch copy must land before g computes; -1 none


@dataclass(frozen=True)
class CacheSpec:
    """The cache the engine builds: a registered policy, its parameters, a partition, a byte capacity."""

    policy: str
    capacity_bytes: int
    partition: str = "global"
    n_layers: int | None = None
    params: Mapping = field(default_factory=dict)

    def build(self, capacity_bytes: int | None = None):
        """A fresh cache object (of `capacity_bytes` when given, else the spec's capacity)."""
        from sim.cache.registry import make_policy

        cap = self.capacity_bytes if capacity_bytes is None else capacity_bytes
        return make_policy(self.policy, cap, partition=self.partition, n_layers=self.n_layers, **dict(self.params))


def check_priced(sizes: np.ndarray, formats, model=None) -> None:
    """ValueError when a low format in `formats` has UNPRICED bytes in `sizes` ([layers, slots]).

    With `model` (a sim.profiles.ModelProfile) the message is the model's own reason."""
    for fmt in formats:
        col = sizes[:, SLOTS.index(fmt)]
        if (col == UNPRICED).any():
            layer = int(np.flatnonzero(col == UNPRICED)[0])
            if model is not None:
                model.expert_bytes(layer, fmt)  # raises, saying why
            raise ValueError(f"low format {fmt} has no byte size in layer {layer} of this model")


def replay(
    groups: AccessGroups,
    cache: CacheSpec,
    policy: PrecisionPolicy,
    hi_slots: np.ndarray,  # int8 [layers, experts] high-precision slot (sim.precision.static_slots)
    sizes: np.ndarray,  # int64 [layers, slots] bytes of one expert per format slot
    link_s: np.ndarray,  # float64 [layers, slots] copy-engine seconds of one expert per slot
    *,
    fast: bool = True,
) -> Outcome:
    """The engine's one entry point: the compiled path where it applies (and `fast`), else the reference."""
    from sim.engine_compiled import COMPILED_POLICIES, replay_compiled

    check_priced(sizes, policy.low_formats())
    if fast and (cache.policy in COMPILED_POLICIES or cache.policy == "belady"):
        out = replay_compiled(groups, cache, policy, hi_slots, sizes, link_s)
        if out is not None:
            return out
    share = policy.low_pool_share
    if share is None:
        hi = lo = cache.build()
    else:
        hi, lo = cache.build(int(cache.capacity_bytes * (1 - share))), cache.build(int(cache.capacity_bytes * share))
    acc_layer = np.repeat(groups.layer, np.diff(groups.start))
    acc_slot = hi_slots[acc_layer, groups.expert]
    keys = make_keys(acc_layer, groups.expert, acc_slot)
    acc_sizes = sizes[acc_layer, acc_slot]
    calib = np.repeat(groups.calib, np.diff(groups.start))
    for c in {id(c): c for c in (hi, lo)}.values():
        c.prepare_replay(keys, acc_sizes, groups.start[:-1], calibration=(keys[calib], acc_sizes[calib]))
    return replay_reference(groups, (hi, lo), policy, hi_slots, sizes, link_s)


def replay_reference(
    groups: AccessGroups,
    caches: tuple,  # (high-precision pool, low-precision pool) — the same object for one shared pool
    policy: PrecisionPolicy,
    hi_slots: np.ndarray,
    sizes: np.ndarray,  # int64 [layers, slots] bytes of one expert per format slot
    link_s: np.ndarray,  # float64 [layers, slots] copy-engine seconds of one expert per slot
) -> Outcome:
    """Reference replay on given cache objects: per access, the precision decision and the cache's answer."""
    hi_cache, lo_cache = caches
    shared = hi_cache is lo_cache
    pool_of = (hi_cache,) + (lo_cache,) * (len(SLOTS) - 1)  # slot 0 → high pool, low slots → low pool
    dyn = policy.is_dynamic
    dyn_slot = SLOTS.index(policy.dynamic_format) if dyn else 0
    n = groups.expert.size
    result = np.zeros(n, dtype=np.int8)
    slot_out = np.zeros(n, dtype=np.int8)
    g_count = groups.n_groups
    pf_bytes = np.zeros(g_count, dtype=np.int64)
    pf_loads = np.zeros(g_count, dtype=np.int64)
    pf_link = np.zeros(g_count, dtype=np.float64)
    wait = np.full(g_count, -1, dtype=np.int64)
    admitted_at: dict[int, int] = {}
    start = groups.start.tolist()
    experts = groups.expert.tolist()
    scores = groups.score.tolist()
    layers, seqs, steps = groups.layer.tolist(), groups.seq.tolist(), groups.step.tolist()
    for g in range(g_count):
        layer = layers[g]
        lo, hi = start[g], start[g + 1]
        ids = experts[lo:hi]
        hs = [int(hi_slots[layer, e]) for e in ids]
        keys_hi = [make_key(layer, e, s) for e, s in zip(ids, hs)]
        keys_lo = [make_key(layer, e, dyn_slot) for e in ids] if dyn else []
        if shared:
            hi_cache.begin_group(layer, seqs[g], steps[g], keys_hi + keys_lo)
        else:
            hi_cache.begin_group(layer, seqs[g], steps[g], [kk for kk, s in zip(keys_hi, hs) if s == 0])
            lo_cache.begin_group(layer, seqs[g], steps[g], [kk for kk, s in zip(keys_hi, hs) if s != 0] + keys_lo)
        dep = -1
        for i in range(hi - lo):
            a = lo + i
            s_hi, k_hi = hs[i], keys_hi[i]
            choice = dynamic_choice(policy, scores[a])
            c_hi = pool_of[s_hi]
            if c_hi.contains(k_hi):
                c_hi.access(k_hi, int(sizes[layer, s_hi]), high_precision=s_hi == 0)
                result[a], slot_out[a] = HIT, s_hi
                key_used = k_hi
            elif dyn and policy.low_copy_serves(choice) and lo_cache.contains(keys_lo[i]):
                lo_cache.access(keys_lo[i], int(sizes[layer, dyn_slot]), high_precision=False)
                result[a], slot_out[a] = HIT, dyn_slot
                key_used = keys_lo[i]
            elif choice == HIGH:
                c_hi.access(k_hi, int(sizes[layer, s_hi]), high_precision=s_hi == 0)
                result[a], slot_out[a] = LOADED, s_hi
                admitted_at.pop(k_hi, None)
                key_used = None
                if dyn and shared and keys_lo[i] != k_hi and hi_cache.contains(keys_lo[i]):
                    hi_cache.remove(keys_lo[i])  # the high copy supersedes the low one
            elif choice == LOW:
                lo_cache.access(keys_lo[i], int(sizes[layer, dyn_slot]), high_precision=False)
                result[a], slot_out[a] = LOADED, dyn_slot
                admitted_at.pop(keys_lo[i], None)
                key_used = None
            else:
                result[a], slot_out[a] = SKIPPED, -1
                key_used = None
            if key_used is not None and key_used in admitted_at:
                dep = max(dep, admitted_at[key_used])
        wait[g] = dep
        # Prefetch the experts predicted for the next layer, at their high precision.
        pred = groups.predicted[g]
        if pred[0] != ABSENT:
            nl = layer + 1
            for e in pred.tolist():
                if e == ABSENT:
                    continue
                s = int(hi_slots[nl, e])
                key = make_key(nl, e, s)
                c = pool_of[s]
                if not c.contains(key) and c.admit(key, int(sizes[nl, s])):
                    pf_bytes[g] += sizes[nl, s]
                    pf_loads[g] += 1
                    pf_link[g] += link_s[nl, s]
                    admitted_at[key] = g
    return Outcome(result, slot_out, pf_bytes, pf_loads, pf_link, wait)


def make_keys(layer: np.ndarray, expert: np.ndarray, slot: np.ndarray) -> np.ndarray:
    """Vectorised `sim.cache.base.make_key` (int64 keys)."""
    return (layer.astype(np.int64) << LAYER_SHIFT) | (expert.astype(np.int64) << EXPERT_SHIFT) | slot.astype(np.int64)
