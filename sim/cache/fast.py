"""Replaying a key stream: the one fast path (numba LRU/SLRU kernels) and the one reference path.

`replay_hits(policy, ...)` is the fast path for lru and slru; for any other policy it builds the
class and runs the reference path. `replay_hits_python(cache, ...)` is the reference path: it
drives a `CachePolicy` object access by access. Tests hold the two equal. These replay a bare key
stream (benchmarks/bench_cache.py, tests); the engine's own compiled path, with precision and
prefetch, is `sim.engine_compiled`.

`replay_hits` takes the stream as arrays: `keys[i]` (ints from `make_key`), `sizes[i]` (bytes),
`group_starts` (sorted indices where a (token step, layer) group begins; group g spans
`group_starts[g] : group_starts[g+1]`, the last one runs to the end; entries before the first
start belong to no group) and optionally `is_admit[i]` (True: a prefetch admit, not an access).
Semantics are those of `sim.cache.base.CachePolicy` driven by `replay_hits_python`: at each group
start the non-admit keys of the group become protected; an access is a hit or a miss (evict until
it fits, or bypass); an admit inserts if absent. The result is one bool per entry: for an access,
hit; for an admit, whether the key is resident afterwards.

Kernels: keys are first mapped to dense ids `(layer * n_experts + expert) * N_FMT_IDS + fmt` (one numba
pass; np.unique when that space would be too large); the replay then walks the groups in order. LRU is a circular doubly linked list
over the ids (arrays prev/next, sentinel = n_ids), most recent at the tail; SLRU has two such
lists (probation, protected) and the same rules as sim/cache/slru.py. Group protection is a stamp
array: id is protected iff stamp[id] == current group index. The kernels are compiled on first
use (cached on disk by numba).
"""
from __future__ import annotations

import numba
import numpy as np

from sim.cache.base import EXPERT_MASK, EXPERT_SHIFT, FMT_MASK, LAYER_SHIFT, N_FMT_IDS, CachePolicy, key_layer
from sim.cache.registry import make_policy
from sim.cache.slru import DEFAULT_PROTECTED_SHARE

FAST_POLICIES = ("lru", "slru")
_DENSE_LIMIT = 1 << 24  # largest dense id space before falling back to np.unique


@numba.njit(cache=True)
def _dense_ids_nb(keys):  # pragma: no cover - compiled
    """(layer * n_experts + expert) * N_FMT_IDS + fmt, with n_experts = max expert + 1; and the id count."""
    max_layer = 0
    max_expert = 0
    for k in keys:
        max_layer = max(max_layer, k >> LAYER_SHIFT)
        max_expert = max(max_expert, (k >> EXPERT_SHIFT) & EXPERT_MASK)
    n_experts = max_expert + 1
    n_ids = (max_layer + 1) * n_experts * N_FMT_IDS
    ids = np.empty(keys.shape[0], np.int32)
    if n_ids > _DENSE_LIMIT:
        return ids, -1
    for i in range(keys.shape[0]):
        k = keys[i]
        ids[i] = ((k >> LAYER_SHIFT) * n_experts + ((k >> EXPERT_SHIFT) & EXPERT_MASK)) * N_FMT_IDS + (k & FMT_MASK)
    return ids, n_ids


def _dense_ids(keys: np.ndarray) -> tuple[np.ndarray, int]:
    if keys.size == 0:
        return np.zeros(0, np.int32), 0
    ids, n_ids = _dense_ids_nb(keys)
    if n_ids >= 0:
        return ids, n_ids
    uniq, inv = np.unique(keys, return_inverse=True)
    return inv.astype(np.int32), len(uniq)


@numba.njit(cache=True, inline="always")
def _unlink(prv, nxt, k):  # pragma: no cover - compiled
    p = prv[k]
    q = nxt[k]
    nxt[p] = q
    prv[q] = p


@numba.njit(cache=True, inline="always")
def _append(prv, nxt, head, k):  # pragma: no cover - compiled
    """Put k at the most recent end (just before the sentinel `head`)."""
    t = prv[head]
    nxt[t] = k
    prv[k] = t
    nxt[k] = head
    prv[head] = k


@numba.njit(cache=True, inline="always")
def _protect(ids, admit, lo, hi, g, stamp, resident, size_of):  # pragma: no cover - compiled
    """Stamp group g's accessed ids; return the bytes of those already resident."""
    gbytes = 0
    for j in range(lo, hi):
        if not admit[j]:
            k = ids[j]
            if stamp[k] != g:
                stamp[k] = g
                if resident[k]:
                    gbytes += size_of[k]
    return gbytes


@numba.njit(cache=True)
def _lru_kernel(ids, sizes, starts, admit, n_ids, capacity):  # pragma: no cover - compiled
    n = ids.shape[0]
    n_groups = starts.shape[0]
    hits = np.zeros(n, np.bool_)
    head = n_ids  # sentinel: nxt[head] = least recent, prv[head] = most recent
    prv = np.empty(n_ids + 1, np.int32)
    nxt = np.empty(n_ids + 1, np.int32)
    prv[head] = head
    nxt[head] = head
    res = np.zeros(n_ids + 1, np.bool_)
    size_of = np.zeros(n_ids + 1, np.int64)
    stamp = np.full(n_ids + 1, -2, np.int64)
    used = 0
    for g in range(-1, n_groups):  # g = -1: the entries before the first group
        lo = 0 if g < 0 else starts[g]
        hi = starts[g + 1] if g + 1 < n_groups else n
        gbytes = 0 if g < 0 else _protect(ids, admit, lo, hi, g, stamp, res, size_of)
        for i in range(lo, hi):
            k = ids[i]
            if res[k]:
                hits[i] = True
                if not admit[i]:
                    _unlink(prv, nxt, k)
                    _append(prv, nxt, head, k)
                continue
            s = sizes[i]
            if s > capacity - gbytes:
                continue  # bypass
            while used + s > capacity:
                v = nxt[head]
                while stamp[v] == g:
                    v = nxt[v]
                _unlink(prv, nxt, v)
                res[v] = False
                used -= size_of[v]
            _append(prv, nxt, head, k)
            res[k] = True
            size_of[k] = s
            used += s
            if stamp[k] == g:
                gbytes += s
            if admit[i]:
                hits[i] = True
    return hits


@numba.njit(cache=True)
def _slru_kernel(ids, sizes, starts, admit, n_ids, capacity, prot_cap):  # pragma: no cover - compiled
    n = ids.shape[0]
    n_groups = starts.shape[0]
    hits = np.zeros(n, np.bool_)
    pb = n_ids  # probation sentinel
    pt = n_ids + 1  # protected sentinel
    prv = np.empty(n_ids + 2, np.int32)
    nxt = np.empty(n_ids + 2, np.int32)
    prv[pb] = pb
    nxt[pb] = pb
    prv[pt] = pt
    nxt[pt] = pt
    seg = np.zeros(n_ids + 2, np.int8)  # 0 absent, 1 probation, 2 protected
    res = np.zeros(n_ids + 2, np.bool_)
    size_of = np.zeros(n_ids + 2, np.int64)
    stamp = np.full(n_ids + 2, -2, np.int64)
    used = 0
    prot_bytes = 0
    for g in range(-1, n_groups):
        lo = 0 if g < 0 else starts[g]
        hi = starts[g + 1] if g + 1 < n_groups else n
        gbytes = 0 if g < 0 else _protect(ids, admit, lo, hi, g, stamp, res, size_of)
        for i in range(lo, hi):
            k = ids[i]
            if res[k]:
                hits[i] = True
                if admit[i]:
                    continue
                _unlink(prv, nxt, k)
                if seg[k] == 1:
                    prot_bytes += size_of[k]
                    seg[k] = 2
                _append(prv, nxt, pt, k)
                while prot_bytes > prot_cap:  # demote protected LRU to probation MRU
                    v = nxt[pt]
                    _unlink(prv, nxt, v)
                    prot_bytes -= size_of[v]
                    seg[v] = 1
                    _append(prv, nxt, pb, v)
                continue
            s = sizes[i]
            if s > capacity - gbytes:
                continue  # bypass
            while used + s > capacity:
                v = nxt[pb]
                while v != pb and stamp[v] == g:
                    v = nxt[v]
                if v == pb:
                    v = nxt[pt]
                    while stamp[v] == g:
                        v = nxt[v]
                _unlink(prv, nxt, v)
                if seg[v] == 2:
                    prot_bytes -= size_of[v]
                seg[v] = 0
                res[v] = False
                used -= size_of[v]
            _append(prv, nxt, pb, k)
            seg[k] = 1
            res[k] = True
            size_of[k] = s
            used += s
            if stamp[k] == g:
                gbytes += s
            if admit[i]:
                hits[i] = True
    return hits


def _check_stream(keys, sizes, group_starts, is_admit):
    keys = np.ascontiguousarray(keys, dtype=np.int64)
    sizes = np.ascontiguousarray(sizes, dtype=np.int64)
    n = keys.shape[0]
    if keys.ndim != 1 or sizes.shape != keys.shape:
        raise ValueError(f"keys {keys.shape} and sizes {sizes.shape} must be 1-D of one length")
    if n and (keys.min() < 0 or sizes.min() < 0):
        raise ValueError("keys and sizes must be >= 0")
    starts = np.ascontiguousarray(group_starts, dtype=np.int64)
    if starts.ndim != 1 or (starts.size and (starts[0] < 0 or starts[-1] > n or np.any(np.diff(starts) < 0))):
        raise ValueError("group_starts must be sorted indices in [0, len(keys)]")
    admit = np.zeros(n, np.bool_) if is_admit is None else np.ascontiguousarray(is_admit, dtype=np.bool_)
    if admit.shape != keys.shape:
        raise ValueError(f"is_admit {admit.shape} must match keys {keys.shape}")
    return keys, sizes, starts, admit


def replay_hits(
    policy: str,
    keys,
    sizes,
    group_starts,
    capacity_bytes: int,
    *,
    is_admit=None,
    **params,
) -> np.ndarray:
    """Replay a key stream through a fresh `policy` cache; bool per entry (hit, or resident after admit).

    Policies other than lru/slru run the reference path, prepared through the policy's
    `prepare_replay` hook with the stream's accesses and group starts (belady's future) and
    `calibration=(calibration_keys, sizes)` when given (static's pinned set; static needs it).
    """
    keys, sizes, starts, admit = _check_stream(keys, sizes, group_starts, is_admit)
    capacity = int(capacity_bytes)
    if capacity < 0:
        raise ValueError(f"capacity_bytes must be >= 0, got {capacity}")
    if policy not in FAST_POLICIES:
        calibration = params.pop("calibration", None)
        cache = make_policy(policy, capacity, **params)
        access = ~admit
        n_before = np.cumsum(np.r_[0, access.astype(np.int64)])  # accesses before each index
        cache.prepare_replay(keys[access], sizes[access], n_before[starts], calibration=calibration)
        return replay_hits_python(cache, keys, sizes, starts, is_admit=admit)
    ids, n_ids = _dense_ids(keys)
    if policy == "lru":
        if params:
            raise TypeError(f"lru takes no parameters, got {sorted(params)}")
        return _lru_kernel(ids, sizes, starts, admit, n_ids, capacity)
    share = params.pop("protected_share", DEFAULT_PROTECTED_SHARE)
    if params:
        raise TypeError(f"slru takes only protected_share, got {sorted(params)}")
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"protected_share must be in [0, 1], got {share}")
    return _slru_kernel(ids, sizes, starts, admit, n_ids, capacity, int(share * capacity))


def replay_hits_python(
    cache: CachePolicy,
    keys,
    sizes,
    group_starts,
    *,
    is_admit=None,
    group_seqs=None,
) -> np.ndarray:
    """The reference replay: drive a CachePolicy object over the stream (same contract as replay_hits)."""
    keys, sizes, starts, admit = _check_stream(keys, sizes, group_starts, is_admit)
    n = keys.shape[0]
    hits = np.zeros(n, np.bool_)
    bounds = list(starts) + [n]
    kl, sl, al = keys.tolist(), sizes.tolist(), admit.tolist()

    def serve(lo, hi):
        for i in range(lo, hi):
            hits[i] = cache.admit(kl[i], sl[i]) if al[i] else cache.access(kl[i], sl[i])

    serve(0, bounds[0] if starts.size else n)
    for g in range(starts.size):
        lo, hi = bounds[g], bounds[g + 1]
        group = [kl[i] for i in range(lo, hi) if not al[i]]
        layer = key_layer(group[0]) if group else -1
        seq = 0 if group_seqs is None else int(group_seqs[g])
        cache.begin_group(layer, seq, g, group)
        serve(lo, hi)
    return hits
