"""Fast hit-only replay of a key stream: numba kernels for LRU and SLRU, the Python classes otherwise.

`replay_hits` takes the stream as arrays: `keys[i]` (ints from `make_key`), `sizes[i]` (bytes),
`group_starts` (sorted indices where a (token step, layer) group begins; group g spans
`group_starts[g] : group_starts[g+1]`, the last one runs to the end; entries before the first
start belong to no group) and optionally `is_admit[i]` (True: a prefetch admit, not an access).
Semantics are those of `sim.cache.base.CachePolicy` driven by `replay_hits_python`: at each group
start the non-admit keys of the group become protected; an access is a hit or a miss (evict until
it fits, or bypass); an admit inserts if absent. The result is one bool per entry: for an access,
hit; for an admit, whether the key is resident afterwards.

Kernels: keys are first mapped to dense ids `(layer * n_experts + expert) * 16 + fmt` (numpy,
vectorised; np.unique when that space would be too large). LRU is a circular doubly linked list
over the ids (arrays prev/next, sentinel = n_ids), most recent at the tail; SLRU has two such
lists (probation, protected) and the same rules as sim/cache/slru.py. Group protection is a stamp
array: id is protected iff stamp[id] == current group index. The kernels are compiled on first
use (cached on disk by numba).
"""
from __future__ import annotations

import numba
import numpy as np

from sim.cache.base import CachePolicy, key_layer, make_policy

FAST_POLICIES = ("lru", "slru")
_DENSE_LIMIT = 1 << 24  # largest dense id space before falling back to np.unique


def _dense_ids(keys: np.ndarray) -> tuple[np.ndarray, int]:
    if keys.size == 0:
        return keys.astype(np.int64), 0
    layer = keys >> 20
    expert = (keys >> 4) & 0xFFFF
    fmt = keys & 0xF
    n_experts = int(expert.max()) + 1
    n_ids = (int(layer.max()) + 1) * n_experts * 16
    if n_ids <= _DENSE_LIMIT:
        return (layer * n_experts + expert) * 16 + fmt, n_ids
    uniq, inv = np.unique(keys, return_inverse=True)
    return inv.astype(np.int64), len(uniq)


@numba.njit(cache=True)
def _lru_kernel(ids, sizes, grp, grp_end, admit, n_ids, capacity):  # pragma: no cover - compiled
    n = ids.shape[0]
    hits = np.zeros(n, np.bool_)
    head = n_ids  # sentinel: nxt[head] = least recent, prv[head] = most recent
    prv = np.empty(n_ids + 1, np.int64)
    nxt = np.empty(n_ids + 1, np.int64)
    prv[head] = head
    nxt[head] = head
    res = np.zeros(n_ids, np.bool_)
    size_of = np.zeros(n_ids, np.int64)
    stamp = np.full(n_ids, -2, np.int64)
    used = 0
    gbytes = 0
    cur = -1
    for i in range(n):
        g = grp[i]
        if g != cur:
            cur = g
            gbytes = 0
            if g >= 0:
                for j in range(i, grp_end[g]):
                    if not admit[j]:
                        k = ids[j]
                        if stamp[k] != g:
                            stamp[k] = g
                            if res[k]:
                                gbytes += size_of[k]
        k = ids[i]
        if res[k]:
            hits[i] = True
            if not admit[i]:  # move to most recent
                p = prv[k]
                q = nxt[k]
                nxt[p] = q
                prv[q] = p
                t = prv[head]
                nxt[t] = k
                prv[k] = t
                nxt[k] = head
                prv[head] = k
            continue
        s = sizes[i]
        if s > capacity - gbytes:
            continue  # bypass
        while used + s > capacity:
            v = nxt[head]
            while stamp[v] == cur:
                v = nxt[v]
            p = prv[v]
            q = nxt[v]
            nxt[p] = q
            prv[q] = p
            res[v] = False
            used -= size_of[v]
        t = prv[head]
        nxt[t] = k
        prv[k] = t
        nxt[k] = head
        prv[head] = k
        res[k] = True
        size_of[k] = s
        used += s
        if stamp[k] == cur:
            gbytes += s
        if admit[i]:
            hits[i] = True
    return hits


@numba.njit(cache=True)
def _slru_kernel(ids, sizes, grp, grp_end, admit, n_ids, capacity, prot_cap):  # pragma: no cover
    n = ids.shape[0]
    hits = np.zeros(n, np.bool_)
    pb = n_ids  # probation sentinel
    pt = n_ids + 1  # protected sentinel
    prv = np.empty(n_ids + 2, np.int64)
    nxt = np.empty(n_ids + 2, np.int64)
    prv[pb] = pb
    nxt[pb] = pb
    prv[pt] = pt
    nxt[pt] = pt
    seg = np.zeros(n_ids, np.int8)  # 0 absent, 1 probation, 2 protected
    size_of = np.zeros(n_ids, np.int64)
    stamp = np.full(n_ids + 2, -2, np.int64)
    used = 0
    prot_bytes = 0
    gbytes = 0
    cur = -1
    for i in range(n):
        g = grp[i]
        if g != cur:
            cur = g
            gbytes = 0
            if g >= 0:
                for j in range(i, grp_end[g]):
                    if not admit[j]:
                        k = ids[j]
                        if stamp[k] != g:
                            stamp[k] = g
                            if seg[k] != 0:
                                gbytes += size_of[k]
        k = ids[i]
        if seg[k] != 0:
            hits[i] = True
            if admit[i]:
                continue
            # unlink, then append to the protected tail
            p = prv[k]
            q = nxt[k]
            nxt[p] = q
            prv[q] = p
            if seg[k] == 1:
                prot_bytes += size_of[k]
                seg[k] = 2
            t = prv[pt]
            nxt[t] = k
            prv[k] = t
            nxt[k] = pt
            prv[pt] = k
            while prot_bytes > prot_cap:
                v = nxt[pt]
                p = prv[v]
                q = nxt[v]
                nxt[p] = q
                prv[q] = p
                prot_bytes -= size_of[v]
                seg[v] = 1
                t = prv[pb]
                nxt[t] = v
                prv[v] = t
                nxt[v] = pb
                prv[pb] = v
            continue
        s = sizes[i]
        if s > capacity - gbytes:
            continue  # bypass
        while used + s > capacity:
            v = nxt[pb]
            while v != pb and stamp[v] == cur:
                v = nxt[v]
            if v == pb:
                v = nxt[pt]
                while stamp[v] == cur:
                    v = nxt[v]
            p = prv[v]
            q = nxt[v]
            nxt[p] = q
            prv[q] = p
            if seg[v] == 2:
                prot_bytes -= size_of[v]
            seg[v] = 0
            used -= size_of[v]
        t = prv[pb]
        nxt[t] = k
        prv[k] = t
        nxt[k] = pb
        prv[pb] = k
        seg[k] = 1
        size_of[k] = s
        used += s
        if stamp[k] == cur:
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


def _group_index(n: int, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Group of each entry (-1 before the first start) and each group's end; empty groups vanish."""
    grp = np.searchsorted(starts, np.arange(n), side="right") - 1
    ends = np.append(starts[1:], n).astype(np.int64)
    return grp.astype(np.int64), ends


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

    Policies other than lru/slru run the Python class; belady is prepared with the stream itself
    (its accesses and group starts); static needs `calibration=(calibration_keys, sizes)`.
    """
    keys, sizes, starts, admit = _check_stream(keys, sizes, group_starts, is_admit)
    capacity = int(capacity_bytes)
    if capacity < 0:
        raise ValueError(f"capacity_bytes must be >= 0, got {capacity}")
    if policy not in FAST_POLICIES:
        calibration = params.pop("calibration", None)
        cache = make_policy(policy, capacity, **params)
        if policy == "belady":
            access = ~admit
            n_before = np.cumsum(np.r_[0, access.astype(np.int64)])  # accesses before each index
            cache.prepare(keys[access], sizes[access], n_before[starts])
        elif policy == "static":
            if calibration is None:
                raise TypeError("static needs calibration=(calibration_keys, sizes)")
            cache.fit(*calibration)
        return replay_hits_python(cache, keys, sizes, starts, is_admit=admit)
    ids, n_ids = _dense_ids(keys)
    grp, ends = _group_index(keys.shape[0], starts)
    if policy == "lru":
        if params:
            raise TypeError(f"lru takes no parameters, got {sorted(params)}")
        return _lru_kernel(ids, sizes, grp, ends, admit, n_ids, capacity)
    share = params.pop("protected_share", 0.8)
    if params:
        raise TypeError(f"slru takes only protected_share, got {sorted(params)}")
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"protected_share must be in [0, 1], got {share}")
    return _slru_kernel(ids, sizes, grp, ends, admit, n_ids, capacity, int(share * capacity))


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
