"""Belady's compiled path: `replay_reference` driving `sim.cache.belady.Belady`, in one numba kernel.

`replay_belady(groups, CacheSpec, precision, ...)` returns the same `Outcome` as the reference engine
with a Belady cache (property tests in tests/test_engine_compiled.py hold them equal), for native or
static precision, global or per-layer, with prefetch. Dynamic precision is refused upstream
(`sim.simulate.incompatible`); split pools return None (the reference then runs: it prepares both
pools with the whole stream, and fails at the first access of the pool that sees only part of it).

The rules are those of the class (its module docstring): an entry's rank is the groups of all its
future uses, compared lexicographically along the next-use chains, then size, then key; a miss or
admit is stored only if it is used again and the bytes that would have to go are ranked worse than
it (counting the group's members still to come, not resident and ranked better); room is made
worst-first among the entries the current group does not protect. Here the future is one array of
next uses over the global access positions (`nxt`) and one of their groups (`grp`); a per-layer
sub-cache sees only its layer's positions, whose order and groups are those of its own stream, so
global positions rank the same. The residents of each sub-cache sit in a max-heap on rank (worst
on top), re-placed when an access moves an entry's next use. Dense ids as in `sim.engine_compiled`.
"""
from __future__ import annotations

import numba
import numpy as np

from sim.precision import SLOTS

NS = len(SLOTS)
HIT, LOADED = 0, 1  # as sim.engine
NEVER = 1 << 62  # the group of "not used again"
# rows of B (int64 per id): resident, bytes, next use (position), heap position, group stamp
RES, SIZE, NU, HPOS, STAMP = range(5)
# columns of C (int64 per sub-cache): capacity, used bytes, protected bytes, their group, heap base, heap size
CAP, USED, GB, GST, BASE, HN = range(6)


@numba.njit(cache=True, _nrt=False)
def _future(start, glayer, expert, n_experts, nxt, grp, first):  # pragma: no cover - compiled
    """Next use of each position's (layer, expert) (n: never), each position's group, each eid's first use."""
    n = nxt.shape[0]
    for g in range(glayer.shape[0]):
        for a in range(start[g], start[g + 1]):
            grp[a] = g
    for a in range(n - 1, -1, -1):
        g = grp[a]
        eid = glayer[g] * n_experts + expert[a]
        nxt[a] = first[eid]
        first[eid] = a


@numba.njit(cache=True, _nrt=False)
def _cmp_future(nxt, grp, a, b):  # pragma: no cover - compiled
    """Belady._cmp_future: -1 if the chain from position a is needed sooner than the one from b."""
    n = nxt.shape[0]
    while True:
        ga = grp[a] if a < n else NEVER
        gb = grp[b] if b < n else NEVER
        if ga != gb:
            return -1 if ga < gb else 1
        if a >= n or a == b:
            return 0
        a = nxt[a]
        b = nxt[b]


@numba.njit(cache=True, _nrt=False)
def _better(nxt, grp, nu_a, size_a, key_a, nu_b, size_b, key_b):  # pragma: no cover - compiled
    """_Rank.__lt__: entry a is better to keep than b."""
    c = _cmp_future(nxt, grp, nu_a, nu_b)
    if c != 0:
        return c < 0
    if size_a != size_b:
        return size_a < size_b
    return key_a < key_b


# ---- a max-heap on rank per sub-cache (worst on top), indexed by B[HPOS] -------------------
@numba.njit(cache=True, _nrt=False, inline="always")
def _above(B, nxt, grp, a, b):  # pragma: no cover - compiled
    return _better(nxt, grp, B[NU, b], B[SIZE, b], b, B[NU, a], B[SIZE, a], a)


@numba.njit(cache=True, _nrt=False)
def _sift_up(B, hp, nxt, grp, base, i):  # pragma: no cover - compiled
    x = hp[base + i]
    while i > 0:
        p = (i - 1) >> 1
        y = hp[base + p]
        if not _above(B, nxt, grp, x, y):
            break
        hp[base + i] = y
        B[HPOS, y] = i
        i = p
    hp[base + i] = x
    B[HPOS, x] = i


@numba.njit(cache=True, _nrt=False)
def _sift_down(B, hp, nxt, grp, base, n, i):  # pragma: no cover - compiled
    x = hp[base + i]
    while True:
        c = 2 * i + 1
        if c >= n:
            break
        if c + 1 < n and _above(B, nxt, grp, hp[base + c + 1], hp[base + c]):
            c += 1
        y = hp[base + c]
        if not _above(B, nxt, grp, y, x):
            break
        hp[base + i] = y
        B[HPOS, y] = i
        i = c
    hp[base + i] = x
    B[HPOS, x] = i


@numba.njit(cache=True, _nrt=False)
def _push(B, C, hp, nxt, grp, sc, k):  # pragma: no cover - compiled
    n = C[sc, HN]
    hp[C[sc, BASE] + n] = k
    B[HPOS, k] = n
    C[sc, HN] = n + 1
    _sift_up(B, hp, nxt, grp, C[sc, BASE], n)


@numba.njit(cache=True, _nrt=False)
def _pop(B, C, hp, nxt, grp, sc):  # pragma: no cover - compiled
    """Take the worst resident off the heap (it stays resident until the caller evicts it)."""
    base = C[sc, BASE]
    top = hp[base]
    n = C[sc, HN] - 1
    C[sc, HN] = n
    B[HPOS, top] = -1
    if n > 0:
        hp[base] = hp[base + n]
        B[HPOS, hp[base]] = 0
        _sift_down(B, hp, nxt, grp, base, n, 0)
    return top


@numba.njit(cache=True, _nrt=False)
def _make_room(B, C, hp, held, nxt, grp, sc, k, size, nu, extra, g):  # pragma: no cover - compiled
    """CachePolicy._make_room with Belady._should_admit; `extra`: bytes of the group's members still to
    come, not resident and ranked better than k. True: k fits now (victims evicted)."""
    gbytes = C[sc, GB] if C[sc, GST] == g else 0
    if size > C[sc, CAP] - gbytes:
        return False
    if nu >= nxt.shape[0]:
        return False  # never used again
    need = C[sc, USED] + size - C[sc, CAP] + extra
    if need > 0:  # the unprotected residents worst-first (taken off the heap, then put back)
        got = 0
        ok = False
        nheld = 0
        while C[sc, HN] > 0:
            v = _pop(B, C, hp, nxt, grp, sc)
            held[nheld] = v
            nheld += 1
            if B[STAMP, v] == g:
                continue
            if _better(nxt, grp, B[NU, v], B[SIZE, v], v, nu, size, k):
                break  # what would have to go is needed sooner than k
            got += B[SIZE, v]
            if got >= need:
                ok = True
                break
        for j in range(nheld):
            _push(B, C, hp, nxt, grp, sc, held[j])
        if not ok:
            return False
    nheld = 0
    while C[sc, USED] + size > C[sc, CAP]:  # evict worst-first
        v = _pop(B, C, hp, nxt, grp, sc)
        if B[STAMP, v] == g:
            held[nheld] = v
            nheld += 1
            continue
        B[RES, v] = 0
        C[sc, USED] -= B[SIZE, v]
    for j in range(nheld):
        _push(B, C, hp, nxt, grp, sc, held[j])
    return True


@numba.njit(cache=True, _nrt=False)
def _place(B, C, hp, nxt, grp, sc, k, size, nu, g):  # pragma: no cover - compiled
    B[RES, k] = 1
    B[SIZE, k] = size
    C[sc, USED] += size
    if B[STAMP, k] == g and C[sc, GST] == g:
        C[sc, GB] += size
    B[NU, k] = nu
    _push(B, C, hp, nxt, grp, sc, k)


@numba.njit(cache=True, _nrt=False)
def _kernel(B, C, hp, held, nextpos, nxt, grp, start, glayer, expert, predicted, hi_slots, sizes, link_s,
            per_layer, result, slot_out, pf_bytes, pf_loads, pf_link, wait, adm_at):  # pragma: no cover - compiled
    """sim.engine.replay_reference with a Belady cache (no dynamic precision, one pool)."""
    n_experts = hi_slots.shape[1]
    for g in range(glayer.shape[0]):
        layer = glayer[g]
        lo = start[g]
        hi = start[g + 1]
        row = layer * n_experts
        sc = layer if per_layer else 0
        C[sc, GST] = g  # begin_group: protect the group's keys
        C[sc, GB] = 0
        for a in range(lo, hi):
            e = expert[a]
            k = (row + e) * NS + hi_slots[layer, e]
            if B[STAMP, k] != g:
                B[STAMP, k] = g
                if B[RES, k]:
                    C[sc, GB] += B[SIZE, k]
        dep = -1
        for a in range(lo, hi):
            e = expert[a]
            s = hi_slots[layer, e]
            k = (row + e) * NS + s
            size = sizes[layer, s]
            nu = nxt[a]  # _before_access: the expert's resident entries are next used at nu
            nextpos[row + e] = nu
            for s2 in range(NS):
                k2 = (row + e) * NS + s2
                if B[RES, k2]:
                    B[NU, k2] = nu
                    i = B[HPOS, k2]
                    _sift_up(B, hp, nxt, grp, C[sc, BASE], i)
                    _sift_down(B, hp, nxt, grp, C[sc, BASE], C[sc, HN], B[HPOS, k2])
            slot_out[a] = s
            if B[RES, k]:
                result[a] = HIT
                if adm_at[k] >= 0:
                    dep = max(dep, adm_at[k])
                continue
            result[a] = LOADED
            adm_at[k] = -1
            extra = 0  # the group's members still to come (first time each), not resident, ranked better
            if nu < nxt.shape[0]:
                for a2 in range(a + 1, hi):
                    e2 = expert[a2]
                    k2 = (row + e2) * NS + hi_slots[layer, e2]
                    if k2 == k or B[RES, k2]:
                        continue
                    seen = False
                    for a3 in range(lo, a2):
                        if (row + expert[a3]) * NS + hi_slots[layer, expert[a3]] == k2:
                            seen = True
                            break
                    if seen:
                        continue
                    m_size = sizes[layer, hi_slots[layer, e2]]
                    if _better(nxt, grp, nxt[a2], m_size, k2, nu, size, k):
                        extra += m_size
            if _make_room(B, C, hp, held, nxt, grp, sc, k, size, nu, extra, g):
                _place(B, C, hp, nxt, grp, sc, k, size, nu, g)
        wait[g] = dep
        if predicted[g, 0] != -1:  # prefetch the next layer's predicted experts (admits)
            nl = layer + 1
            psc = nl if per_layer else 0
            for j in range(predicted.shape[1]):
                e = predicted[g, j]
                if e == -1:
                    continue
                s = hi_slots[nl, e]
                k = (nl * n_experts + e) * NS + s
                if B[RES, k]:
                    continue
                nu = nextpos[nl * n_experts + e]  # its first use after the last access served
                if _make_room(B, C, hp, held, nxt, grp, psc, k, sizes[nl, s], nu, 0, g):
                    _place(B, C, hp, nxt, grp, psc, k, sizes[nl, s], nu, g)
                    pf_bytes[g] += sizes[nl, s]
                    pf_loads[g] += 1
                    pf_link[g] += link_s[nl, s]
                    adm_at[k] = g


def replay_belady(groups, cache, policy, hi_slots, sizes, link_s):
    """The Belady replay's Outcome, or None where the reference must run (dynamic precision, split pools)."""
    from sim.engine import Outcome

    if cache.params:
        raise TypeError(f"belady got unexpected parameters {sorted(cache.params)}")
    if policy.is_dynamic:
        return None  # refused by sim.simulate.incompatible; the reference fails on it as before
    if policy.low_pool_share is not None:
        return None
    capacity = int(cache.capacity_bytes)
    if capacity < 0:
        raise ValueError("capacity_bytes must be >= 0")
    n_layers_tr, n_experts = hi_slots.shape
    per_layer = cache.partition == "per-layer"
    n_parts = int(cache.n_layers) if per_layer else 1
    n_ids = n_layers_tr * n_experts * NS
    C = np.zeros((n_parts, 6), np.int64)
    C[:, CAP] = capacity // n_parts if per_layer else capacity
    C[:, GST] = -2
    C[:, BASE] = np.arange(n_parts) * (n_experts * NS if per_layer else 0)
    B = np.zeros((5, n_ids), np.int64)
    B[HPOS] = -1
    B[STAMP] = -2
    n = groups.expert.size
    nxt = np.empty(n, np.int64)
    grp = np.empty(n, np.int64)
    nextpos = np.full(n_layers_tr * n_experts, n, np.int64)
    _future(groups.start, groups.layer, groups.expert, n_experts, nxt, grp, nextpos)
    n_groups = groups.n_groups
    out = Outcome(np.zeros(n, np.int8), np.zeros(n, np.int8), np.zeros(n_groups, np.int64), np.zeros(n_groups, np.int64),
                  np.zeros(n_groups, np.float64), np.full(n_groups, -1, np.int64))
    _kernel(B, C, np.zeros(max(n_ids, n_parts * n_experts * NS), np.int64), np.zeros(n_ids, np.int64), nextpos, nxt,
            grp, groups.start, groups.layer, groups.expert, groups.predicted, hi_slots,
            np.ascontiguousarray(sizes, dtype=np.int64), np.ascontiguousarray(link_s, dtype=np.float64), per_layer,
            out.result, out.slot, out.prefetch_bytes, out.prefetch_loads, out.prefetch_link_s, out.wait_group,
            np.full(n_ids, -1, np.int64))
    return out
