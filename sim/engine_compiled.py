"""The engine's compiled path: `replay_reference`'s decisions in one numba kernel, for every online policy.

`replay_compiled(groups, CacheSpec, precision, ...)` returns the same `Outcome` as
`sim.engine.replay_reference` driving the `sim.cache` classes, access for access (property tests in
tests/test_engine_compiled.py hold them equal), for the cache policies lru, slru, lfu, s3fifo,
static and hobbit, global or per-layer, with native, static, dynamic and combined precision, one
shared pool or split pools, and prefetch. Belady (it ranks whole future-use chains) has its own
kernel, `sim.engine_belady`; where that declines (split pools), this returns None and the engine
runs the reference.

Layout. Every cache entry (layer, expert, format slot) is a dense id `(layer * n_experts + expert) *
ns + local slot`, ordered like its `make_key` key (so "smaller key" tie-breaks carry over): the kernel
numbers only the `ns` format slots the precision policy can use (native, its static and its dynamic
format: at most 3 of sim.precision.SLOTS), in SLOTS order, so adding slots to SLOTS does not grow
the id space (`_local_slots`; the outcome is mapped back to SLOTS indices). A
sub-cache is one pool (high, or the split low pool) of one partition (the whole cache, or one
layer); each id belongs to exactly one, and per-sub-cache counters live in the rows of `S`/`F`.
Lists (LRU order, SLRU segments, S3-FIFO small/main/ghost queues) are doubly linked over ids with
three sentinels per sub-cache; LFU-DA keeps an indexed min-heap on (priority, last touch) per
sub-cache; hobbit keeps its residents in one list in last-touch order and histograms of their uses,
and scans the list from its oldest end only as far as an entry could still win (see _hobbit_victim:
its priority normalises over the candidates, so no fixed index orders it). Group protection is a stamp: an id is protected while
M[STAMP, id] equals the current group. M's rows are int32 where every value they hold is bounded below 2^31 (`_m_dtype`;
LFU's priorities are checked as they are set and a replay that outgrows them reruns with int64 rows). The rules of each policy are those of its class in sim/cache
(module docstrings there); comments here only name which hook a block mirrors.
"""
from __future__ import annotations

import numba
import numpy as np

from sim.cache.slru import DEFAULT_PROTECTED_SHARE
from sim.engine_belady import replay_belady
from sim.precision import SERVE, SLOTS

LRU, SLRU, LFU, S3FIFO, STATIC, HOBBIT = range(6)
COMPILED_POLICIES = {"lru": LRU, "slru": SLRU, "lfu": LFU, "s3fifo": S3FIFO, "static": STATIC, "hobbit": HOBBIT}
NS = len(SLOTS)
HIT, LOADED, SKIPPED = 0, 1, 2  # as sim.engine
HIGH_C, LOW_C, SKIP_C = 0, 1, 2  # as sim.precision.dynamic_choice

# columns of S (int64 per sub-cache)
CAP, USED, GB, GST, TICK, PCAP, PBYTES, AGE, SBYTES, MBYTES, GHBYTES, CSEQ, CLAYER, MAXL, HN, RN, BASE = range(17)
# hobbit: upper bounds of the residents' largest uses / high-precision uses (exact after the lazy walk
# down in _hobbit_max), the offsets of the sub-cache's two histograms in H, and how many of its ids
# the current group stamped (listed in M[GL])
FMX, HMX, FOFF, HOFF, GN = range(17, 22)
N_COLS = 22
# rows of M (int64 per id; lists also use the 3 sentinels per sub-cache after the ids): resident,
# bytes, group stamp, list links, segment/queue, count or frequency, LFU priority, last touch, heap
# slots and positions, the ids the current group stamped (by sub-cache), pinned, sub-cache,
# scratch, and (by pool * n_eids + expert id) hobbit's resident entries of the expert, its uses and
# high-precision uses in the current sequence; each id's layer and (layer, expert) id, precomputed
# (integer division is slow in hobbit's scan).
# The last row of S holds the kernel's integer parameters, the last row of F hobbit's weights;
# H holds hobbit's histograms (per sub-cache: how many residents have each uses / high-precision
# uses value). Few arrays, because numba reference-counts every array a helper receives.
RES, SIZE, STAMP, PRV, NXT, SEG, CNT, KK, TK, HP, HPOS, GL, RC, PIN, SCOF, SCR, USES, HPUSES, LAYR, EID, HKK, HTK = range(22)
N_ROWS = 22
# columns of F (float64 per sub-cache)
STGT, GCAP = range(2)
NO_SEQ = -(1 << 62)
# columns of the parameter row S[-1]
MOVE_THR, HOB_LAYERS, PER_LAYER, N_PARTS, N_EXPERTS, N_EIDS, N_IDS, HOB_PRUNE, ONE_SC, K_MAX, K_WIDE = 3, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17
# M's width: int32 halves the rows the hot loop walks (replay + tally, 1x benchmark trace: lru native
# 13.3 -> 12.0 ns per access, lfu 26.4 -> 23.4; docs/performance.md) and holds every row's values when
# they are bounded as _m_dtype checks. LFU's priorities K = count + L have no such bound: each one is
# checked against K_MAX as it is set, and a replay that exceeded it sets K_WIDE and is run again with
# int64 rows.
INT32_MAX = np.iinfo(np.int32).max


# ---- linked lists ------------------------------------------------------------------------
@numba.njit(cache=True, _nrt=False, inline="always")
def _unlink(M, k):  # pragma: no cover - compiled
    p = M[PRV, k]
    q = M[NXT, k]
    M[NXT, p] = q
    M[PRV, q] = p


@numba.njit(cache=True, _nrt=False, inline="always")
def _append(M, head, k):  # pragma: no cover - compiled
    t = M[PRV, head]
    M[NXT, t] = k
    M[PRV, k] = t
    M[NXT, k] = head
    M[PRV, head] = k


# ---- LFU-DA indexed heap on (K, last touch, id) ---------------------------------------------
# Lazy: an entry sits in the heap under the (K, last touch) it had when it was last placed there
# (rows HKK, HTK). A hit that raises its pair only updates KK, TK (the placed pair stays a lower
# bound); the victim search re-places a top whose pair is stale until the top is current: it is
# then the least current (K, touch, id) of all. A hit costs O(1) instead of a sift-down. K can also
# fall: L (AGE) falls when a protected entry kept an old low K that is evicted later, and a hit
# then gets K = count + L below its placed K; such a hit is re-placed at once (sifted up).
@numba.njit(cache=True, _nrt=False, inline="always")
def _less(M, a, b):  # pragma: no cover - compiled
    if M[HKK, a] != M[HKK, b]:
        return M[HKK, a] < M[HKK, b]
    if M[HTK, a] != M[HTK, b]:
        return M[HTK, a] < M[HTK, b]
    return a < b


@numba.njit(cache=True, _nrt=False)
def _sift_up(M, base, i):  # pragma: no cover - compiled
    x = M[HP, base + i]
    while i > 0:
        p = (i - 1) >> 1
        y = M[HP, base + p]
        if not _less(M, x, y):
            break
        M[HP, base + i] = y
        M[HPOS, y] = i
        i = p
    M[HP, base + i] = x
    M[HPOS, x] = i


@numba.njit(cache=True, _nrt=False)
def _sift_down(M, base, n, i):  # pragma: no cover - compiled
    x = M[HP, base + i]
    while True:
        c = 2 * i + 1
        if c >= n:
            break
        if c + 1 < n and _less(M, M[HP, base + c + 1], M[HP, base + c]):
            c += 1
        y = M[HP, base + c]
        if not _less(M, y, x):
            break
        M[HP, base + i] = y
        M[HPOS, y] = i
        i = c
    M[HP, base + i] = x
    M[HPOS, x] = i


@numba.njit(cache=True, _nrt=False)
def _heap_remove(M, S, sc, k):  # pragma: no cover - compiled
    base = S[sc, BASE]
    n = S[sc, HN] - 1
    S[sc, HN] = n
    i = M[HPOS, k]
    M[HPOS, k] = -1
    if i == n:
        return
    last = M[HP, base + n]
    M[HP, base + i] = last
    M[HPOS, last] = i
    _sift_up(M, base, i)
    _sift_down(M, base, n, M[HPOS, last])


@numba.njit(cache=True, _nrt=False)
def _heap_touch(M, S, sc, k):  # pragma: no cover - compiled
    """Insert k, or restore its place after its (K, touch) changed (they only grow), under its current pair."""
    base = S[sc, BASE]
    M[HKK, k] = M[KK, k]
    M[HTK, k] = M[TK, k]
    if M[HPOS, k] < 0:
        n = S[sc, HN]
        M[HP, base + n] = k
        M[HPOS, k] = n
        S[sc, HN] = n + 1
        _sift_up(M, base, n)
    else:  # its pair may have risen or fallen
        _sift_up(M, base, M[HPOS, k])
        _sift_down(M, base, S[sc, HN], M[HPOS, k])


@numba.njit(cache=True, _nrt=False, inline="always")
def _set_priority(M, S, sc, k):  # pragma: no cover - compiled
    """LFU-DA's K = count + L, flagging a value M's rows cannot hold (see K_MAX)."""
    kk = M[CNT, k] + S[sc, AGE]
    if kk > S[-1, K_MAX]:
        S[-1, K_WIDE] = 1
    M[KK, k] = kk


# ---- the cache operations, one branch per policy -------------------------------------------
@numba.njit(cache=True, _nrt=False, inline="always")
def _on_hit(M, S, F, H, pol, sc, k, hp_):  # pragma: no cover - compiled
    head = S[-1, N_IDS] + 3 * sc
    if pol == LRU:
        _unlink(M, k)
        _append(M, head, k)
    elif pol == SLRU:
        _unlink(M, k)
        if M[SEG, k] == 1:
            S[sc, PBYTES] += M[SIZE, k]
            M[SEG, k] = 2
        _append(M, head + 1, k)
        while S[sc, PBYTES] > S[sc, PCAP]:  # demote protected LRU to probation MRU
            v = M[NXT, head + 1]
            _unlink(M, v)
            S[sc, PBYTES] -= M[SIZE, v]
            M[SEG, v] = 1
            _append(M, head, v)
    elif pol == LFU:
        M[CNT, k] += 1
        _set_priority(M, S, sc, k)
        M[TK, k] = S[sc, TICK]
        if M[KK, k] < M[HKK, k]:  # below its placed pair: re-place now; else lazily (_victim)
            _heap_touch(M, S, sc, k)
    elif pol == S3FIFO:
        M[CNT, k] = min(M[CNT, k] + 1, 3)
    elif pol == HOBBIT:  # last touch: to the list's newest end
        M[TK, k] = S[sc, TICK]
        _unlink(M, k)
        _append(M, head, k)


@numba.njit(cache=True, _nrt=False, inline="always")
def _insert(M, S, F, H, pol, sc, k, prefetch):  # pragma: no cover - compiled
    head = S[-1, N_IDS] + 3 * sc
    if pol == LRU or pol == SLRU:
        _append(M, head, k)
        M[SEG, k] = 1
    elif pol == LFU:
        M[CNT, k] = 0 if prefetch else 1
        _set_priority(M, S, sc, k)
        M[TK, k] = S[sc, TICK]
        _heap_touch(M, S, sc, k)
    elif pol == S3FIFO:
        M[CNT, k] = 0
        if M[SEG, k] == 3:  # in the ghost queue: into main
            _unlink(M, k)
            S[sc, GHBYTES] -= M[SIZE, k]
            _append(M, head + 1, k)
            M[SEG, k] = 2
            S[sc, MBYTES] += M[SIZE, k]
        else:
            _append(M, head, k)
            M[SEG, k] = 1
            S[sc, SBYTES] += M[SIZE, k]
    elif pol == HOBBIT:
        M[TK, k] = S[sc, TICK]
        layer = M[LAYR, k]
        S[sc, MAXL] = max(S[sc, MAXL], layer)
        S[sc, RN] += 1
        _append(M, head, k)
        eid = (sc // S[-1, N_PARTS]) * S[-1, N_EIDS] + M[EID, k]
        M[RC, eid] += 1
        H[S[sc, FOFF] + M[USES, eid]] += 1
        H[S[sc, HOFF] + M[HPUSES, eid]] += 1
        S[sc, FMX] = max(S[sc, FMX], M[USES, eid])
        S[sc, HMX] = max(S[sc, HMX], M[HPUSES, eid])


@numba.njit(cache=True, _nrt=False, inline="always")
def _forget(M, S, F, H, pol, sc, k, evicted):  # pragma: no cover - compiled
    """The policy's _evict (evicted) or _remove (a driver removal) hook."""
    head = S[-1, N_IDS] + 3 * sc
    if pol == LRU:
        _unlink(M, k)
    elif pol == SLRU:
        _unlink(M, k)
        if M[SEG, k] == 2:
            S[sc, PBYTES] -= M[SIZE, k]
        M[SEG, k] = 0
    elif pol == LFU:
        if evicted:
            S[sc, AGE] = M[KK, k]
        _heap_remove(M, S, sc, k)
    elif pol == S3FIFO:
        _unlink(M, k)
        if M[SEG, k] == 1:
            S[sc, SBYTES] -= M[SIZE, k]
            M[SEG, k] = 0
            if evicted:  # evicted from S: remember it in the ghost queue
                _append(M, head + 2, k)
                M[SEG, k] = 3
                S[sc, GHBYTES] += M[SIZE, k]
                while S[sc, GHBYTES] > F[sc, GCAP] and M[NXT, head + 2] != head + 2:
                    v = M[NXT, head + 2]
                    _unlink(M, v)
                    M[SEG, v] = 0
                    S[sc, GHBYTES] -= M[SIZE, v]
        else:
            S[sc, MBYTES] -= M[SIZE, k]
            M[SEG, k] = 0
    elif pol == HOBBIT:  # the maxima only fall lazily (_hobbit_max)
        _unlink(M, k)
        S[sc, RN] -= 1
        eid = (sc // S[-1, N_PARTS]) * S[-1, N_EIDS] + M[EID, k]
        M[RC, eid] -= 1
        H[S[sc, FOFF] + M[USES, eid]] -= 1
        H[S[sc, HOFF] + M[HPUSES, eid]] -= 1


@numba.njit(cache=True, _nrt=False)
def _first_free(M, head, g):  # pragma: no cover - compiled
    v = M[NXT, head]
    while v != head and M[STAMP, v] == g:
        v = M[NXT, v]
    return -1 if v == head else v


@numba.njit(cache=True, _nrt=False)
def _victim(M, S, F, H, pol, sc, g):  # pragma: no cover - compiled
    head = S[-1, N_IDS] + 3 * sc
    if pol == LRU:
        return _first_free(M, head, g)
    if pol == SLRU:
        v = _first_free(M, head, g)
        return v if v >= 0 else _first_free(M, head + 1, g)
    if pol == LFU:
        base = S[sc, BASE]
        nheld = 0
        v = -1
        while S[sc, HN] > 0:
            top = M[HP, base]
            if M[HKK, top] != M[KK, top] or M[HTK, top] != M[TK, top]:  # stale place: re-place it
                _heap_touch(M, S, sc, top)
                continue
            if M[STAMP, top] != g:
                v = top
                break
            _heap_remove(M, S, sc, top)
            M[SCR, nheld] = top
            nheld += 1
        for j in range(nheld):
            _heap_touch(M, S, sc, M[SCR, j])
        return v
    if pol == S3FIFO:
        thr = S[-1, MOVE_THR]
        while True:
            s_key = _first_free(M, head, g)
            m_key = _first_free(M, head + 1, g)
            if s_key < 0 and m_key < 0:
                return -1
            if s_key >= 0 and (S[sc, SBYTES] >= F[sc, STGT] or m_key < 0):
                if M[CNT, s_key] >= thr:  # hit while in S: move to main
                    _unlink(M, s_key)
                    S[sc, SBYTES] -= M[SIZE, s_key]
                    _append(M, head + 1, s_key)
                    M[SEG, s_key] = 2
                    S[sc, MBYTES] += M[SIZE, s_key]
                    M[CNT, s_key] = 0
                    continue
                return s_key
            if M[CNT, m_key] > 0:
                M[CNT, m_key] -= 1
                _unlink(M, m_key)
                _append(M, head + 1, m_key)
                continue
            return m_key
    if pol == HOBBIT:
        return _hobbit_victim(M, S, F, H, sc, g)
    return -1  # static never evicts


@numba.njit(cache=True, _nrt=False, inline="always")
def _hist_top(H, off, v):  # pragma: no cover - compiled
    """The largest value <= v with a non-zero count in the histogram at H[off:] (0 if none)."""
    while v > 0 and H[off + v] == 0:
        v -= 1
    return v


@numba.njit(cache=True, _nrt=False)
def _hobbit_victim(M, S, F, H, sc, g):  # pragma: no cover - compiled
    """sim.cache.hobbit._lowest_priority over the sub-cache's unprotected residents.

    The victim is the least (P, last touch, key) among the candidates, P computed with the same
    floating-point operations as there. The normalisers come without a scan: lo and hi are the
    last touches of the first and last candidates of the resident list (kept in last-touch order),
    fmax and hmax the top non-empty values of the uses histograms once the group's own residents
    are taken out of them. The list is then scanned from its oldest end. With every weight finite
    and >= 0 (HOB_PRUNE), each term of P is >= 0, and fl(a + b) >= a for b >= 0, so P(e) >=
    fl(wr * R(e)); R, and so fl(wr * R), does not decrease along the list. Once fl(wr * R) of an
    entry exceeds the best P so far, neither it nor any later entry can be lower or equal: the scan
    stops. Otherwise (a negative or non-finite weight) it scans the whole list.
    """
    wr, wf, wh, wd = F[-1, 0], F[-1, 1], F[-1, 2], F[-1, 3]
    n_eids = S[-1, N_EIDS]
    n_layers = S[-1, HOB_LAYERS] if S[-1, HOB_LAYERS] > 0 else S[sc, MAXL] + 1
    pool = sc // S[-1, N_PARTS]
    cur = S[sc, CLAYER] if S[sc, CLAYER] >= 0 else 0
    head = S[-1, N_IDS] + 3 * sc
    x = M[NXT, head]  # the oldest candidate
    while x != head and M[STAMP, x] == g:
        x = M[NXT, x]
    if x == head:
        return -1
    y = M[PRV, head]  # the newest candidate
    while M[STAMP, y] == g:
        y = M[PRV, y]
    lo = M[TK, x]
    hi = M[TK, y]
    foff = S[sc, FOFF]
    hoff = S[sc, HOFF]
    S[sc, FMX] = _hist_top(H, foff, S[sc, FMX])
    S[sc, HMX] = _hist_top(H, hoff, S[sc, HMX])
    base = S[sc, BASE]
    ng = S[sc, GN] if S[sc, GST] == g else 0
    for j in range(ng):  # the group's residents are not candidates: out of the histograms ...
        k = M[GL, base + j]
        if M[RES, k]:
            eid = pool * n_eids + M[EID, k]
            H[foff + M[USES, eid]] -= 1
            H[hoff + M[HPUSES, eid]] -= 1
    fmax = _hist_top(H, foff, S[sc, FMX])
    hmax = _hist_top(H, hoff, S[sc, HMX])
    for j in range(ng):  # ... and back
        k = M[GL, base + j]
        if M[RES, k]:
            eid = pool * n_eids + M[EID, k]
            H[foff + M[USES, eid]] += 1
            H[hoff + M[HPUSES, eid]] += 1
    prune = S[-1, HOB_PRUNE] > 0
    best = -1
    best_p = 0.0
    k = x
    while k != head:
        if M[STAMP, k] != g:
            tk = M[TK, k]
            r = (tk - lo) / (hi - lo) if hi > lo else 1.0
            pr = wr * r
            if prune and best >= 0 and pr > best_p:
                break
            eid = pool * n_eids + M[EID, k]
            fv = M[USES, eid] / fmax if fmax > 0 else 0.0
            hv = M[HPUSES, eid] / hmax if hmax > 0 else 0.0
            d = 1.0 - ((M[LAYR, k] - cur) % n_layers) / n_layers
            p = pr + wf * fv + wh * hv + wd * d
            if best < 0 or p < best_p or (p == best_p and (tk < M[TK, best] or (tk == M[TK, best] and k < best))):
                best = k
                best_p = p
        k = M[NXT, k]
    return best


@numba.njit(cache=True, _nrt=False, inline="always")
def _make_room(M, S, F, H, pol, sc, k, size, prefetch, g):  # pragma: no cover - compiled
    gbytes = S[sc, GB] if S[sc, GST] == g else 0
    if size > S[sc, CAP] - gbytes:
        return False
    if pol == STATIC and (not M[PIN, k] or S[sc, USED] + size > S[sc, CAP]):
        return False
    while S[sc, USED] + size > S[sc, CAP]:
        v = _victim(M, S, F, H, pol, sc, g)
        _forget(M, S, F, H, pol, sc, v, True)
        M[RES, v] = False
        S[sc, USED] -= M[SIZE, v]
    return True


@numba.njit(cache=True, _nrt=False, inline="always")
def _place(M, S, F, H, pol, sc, k, size, prefetch, g):  # pragma: no cover - compiled
    M[RES, k] = True
    M[SIZE, k] = size
    S[sc, USED] += size
    if M[STAMP, k] == g:
        S[sc, GB] += size
    _insert(M, S, F, H, pol, sc, k, prefetch)


@numba.njit(cache=True, _nrt=False, inline="always")
def _access(M, S, F, H, pol, k, size, hp_, g):  # pragma: no cover - compiled
    """CachePolicy.access: True on a hit; on a miss make room and insert (or bypass)."""
    sc = 0 if S[-1, ONE_SC] else M[SCOF, k]  # one sub-cache (global, one pool): skip the id's row
    if pol == HOBBIT:  # _before_access: count the expert's uses in this sub-cache's sequence
        eid = (sc // S[-1, N_PARTS]) * S[-1, N_EIDS] + M[EID, k]
        v = M[USES, eid]
        M[USES, eid] = v + 1
        rc = M[RC, eid]  # its resident entries move up one value in the histogram
        if rc:
            H[S[sc, FOFF] + v] -= rc
            H[S[sc, FOFF] + v + 1] += rc
            S[sc, FMX] = max(S[sc, FMX], v + 1)
        if hp_:
            v = M[HPUSES, eid]
            M[HPUSES, eid] = v + 1
            if rc:
                H[S[sc, HOFF] + v] -= rc
                H[S[sc, HOFF] + v + 1] += rc
                S[sc, HMX] = max(S[sc, HMX], v + 1)
        S[sc, MAXL] = max(S[sc, MAXL], M[LAYR, k])
    if pol == LFU or pol == HOBBIT:  # the only policies that read the tick (last touch, TK)
        S[sc, TICK] += 1
    if M[RES, k]:
        _on_hit(M, S, F, H, pol, sc, k, hp_)
        return True
    if _make_room(M, S, F, H, pol, sc, k, size, False, g):
        _place(M, S, F, H, pol, sc, k, size, False, g)
    return False


@numba.njit(cache=True, _nrt=False, inline="always")
def _admit(M, S, F, H, pol, k, size, g):  # pragma: no cover - compiled
    """CachePolicy.admit: a prefetch; True if resident afterwards."""
    if M[RES, k]:
        return True
    sc = M[SCOF, k]
    if pol == LFU or pol == HOBBIT:  # the only policies that read the tick (last touch, TK)
        S[sc, TICK] += 1
    if not _make_room(M, S, F, H, pol, sc, k, size, True, g):
        return False
    _place(M, S, F, H, pol, sc, k, size, True, g)
    return True


@numba.njit(cache=True, _nrt=False, inline="always")
def _remove(M, S, F, H, pol, k, g):  # pragma: no cover - compiled
    if not M[RES, k]:
        return
    sc = M[SCOF, k]
    _forget(M, S, F, H, pol, sc, k, False)
    M[RES, k] = False
    S[sc, USED] -= M[SIZE, k]
    if M[STAMP, k] == g and S[sc, GST] == g:
        S[sc, GB] -= M[SIZE, k]


@numba.njit(cache=True, _nrt=False, inline="always")
def _stamp(M, S, F, H, k, g):  # pragma: no cover - compiled
    sc = M[SCOF, k]
    if S[sc, GST] != g:
        S[sc, GST] = g
        S[sc, GB] = 0
        S[sc, GN] = 0
    if M[STAMP, k] != g:
        M[STAMP, k] = g
        M[GL, S[sc, BASE] + S[sc, GN]] = k
        S[sc, GN] += 1
        if M[RES, k]:
            S[sc, GB] += M[SIZE, k]


@numba.njit(cache=True, _nrt=False)
def _stamp_group(M, S, F, H, expert, lo, hi, row, layer, hi_slots, dyn, dyn_slot, g, ns):  # pragma: no cover - compiled
    """begin_group: protect the group's keys (high slot, and the dynamic slot). The kernel calls it at the
    group's first miss (or before its prefetch), not at its start: hits change no residency, so the
    protected bytes are the same then, and a group that only hits never needs its protection."""
    for a in range(lo, hi):
        e = expert[a]
        _stamp(M, S, F, H, (row + e) * ns + hi_slots[layer, e], g)
        if dyn:
            _stamp(M, S, F, H, (row + e) * ns + dyn_slot, g)


@numba.njit(cache=True, _nrt=False, inline="always")
def _kernel(M, S, F, H, pol, start, glayer, gseq, expert, score, predicted, hi_slots, sizes, link_s,
            dyn, t1, t2, dyn_slot, serve, split, shared, result, slot_out, pf_bytes, pf_loads, pf_link, wait,
            adm_at, ns):  # pragma: no cover - compiled
    """sim.engine.replay_reference over dense ids (see there for the rules); fills the output arrays.

    Compiled without numba's reference counting (`_nrt=False`, as are its helpers): every array is
    allocated by the caller, and the atomic reference counts on each helper's array arguments cost
    more than the cache work itself on this path (measured: 0.33 s → 0.08 s on 960 k hits).
    Slots (`hi_slots`, `dyn_slot`, the columns of `sizes`/`link_s`, `slot_out`) are local: 0..ns-1.
    `serve`: HOBBIT's `serve` low-copy rule (a resident low copy serves any use, a HIGH one included).
    """
    n_experts = hi_slots.shape[1]
    n_parts = S[-1, N_PARTS]
    per_layer = S[-1, PER_LAYER] > 0
    n_eids = S[-1, N_EIDS]
    n_pools = 2 if split else 1
    G = glayer.shape[0]
    n_adm = 0  # prefetch admissions so far (none: no access can wait on a copy)
    for g in range(G):
        layer = glayer[g]
        lo = start[g]
        hi = start[g + 1]
        # begin_group on every pool's sub-cache of this layer
        for p in range(n_pools):
            sc = p * n_parts + (layer if per_layer else 0)
            S[sc, CLAYER] = layer
            if pol == HOBBIT and S[sc, CSEQ] != gseq[g]:
                S[sc, CSEQ] = gseq[g]
                e0 = layer * n_experts if per_layer else 0
                e1 = (layer + 1) * n_experts if per_layer else n_eids
                for x in range(p * n_eids + e0, p * n_eids + e1):
                    M[USES, x] = 0
                    M[HPUSES, x] = 0
                for v in range(S[sc, FMX] + 1):  # every resident now has 0 uses
                    H[S[sc, FOFF] + v] = 0
                for v in range(S[sc, HMX] + 1):
                    H[S[sc, HOFF] + v] = 0
                H[S[sc, FOFF]] = S[sc, RN]
                H[S[sc, HOFF]] = S[sc, RN]
                S[sc, FMX] = 0
                S[sc, HMX] = 0
        row = layer * n_experts
        stamped = False  # begin_group's protection, stamped at the group's first miss (see _stamp_group)
        dep = -1
        for a in range(lo, hi):
            e = expert[a]
            s_hi = hi_slots[layer, e] if ns > 1 else 0  # one slot: slot 0 (a compile-time 0 where ns is 1)
            k_hi = (row + e) * ns + s_hi
            k_lo = (row + e) * ns + dyn_slot
            choice = HIGH_C
            if dyn and score[a] > t1:
                choice = LOW_C if score[a] <= t2 else SKIP_C
            used = -1
            lo_ok = dyn and (choice != HIGH_C or serve)  # PrecisionPolicy.low_copy_serves
            if not stamped and not M[RES, k_hi] and not (lo_ok and M[RES, k_lo]):
                _stamp_group(M, S, F, H, expert, lo, hi, row, layer, hi_slots, dyn, dyn_slot, g, ns)
                stamped = True
            if M[RES, k_hi]:
                _access(M, S, F, H, pol, k_hi, sizes[layer, s_hi], s_hi == 0, g)
                result[a] = HIT
                slot_out[a] = s_hi
                used = k_hi
            elif lo_ok and M[RES, k_lo]:
                _access(M, S, F, H, pol, k_lo, sizes[layer, dyn_slot], False, g)
                result[a] = HIT
                slot_out[a] = dyn_slot
                used = k_lo
            elif choice == HIGH_C:
                _access(M, S, F, H, pol, k_hi, sizes[layer, s_hi], s_hi == 0, g)
                result[a] = LOADED
                slot_out[a] = s_hi
                adm_at[k_hi] = -1
                if dyn and shared and k_lo != k_hi and M[RES, k_lo]:
                    _remove(M, S, F, H, pol, k_lo, g)  # the high copy supersedes the low one
            elif choice == LOW_C:
                _access(M, S, F, H, pol, k_lo, sizes[layer, dyn_slot], False, g)
                result[a] = LOADED
                slot_out[a] = dyn_slot
                adm_at[k_lo] = -1
            else:
                result[a] = SKIPPED
                slot_out[a] = -1
            if n_adm and used >= 0 and adm_at[used] >= 0:
                dep = max(dep, adm_at[used])
        wait[g] = dep
        if predicted[g, 0] != -1:  # prefetch the next layer's predicted experts at high precision
            nl = layer + 1
            for j in range(predicted.shape[1]):
                e = predicted[g, j]
                if e == -1:
                    continue
                s = hi_slots[nl, e]
                k = (nl * n_experts + e) * ns + s
                if M[RES, k]:
                    continue
                if not stamped:
                    _stamp_group(M, S, F, H, expert, lo, hi, row, layer, hi_slots, dyn, dyn_slot, g, ns)
                    stamped = True
                if _admit(M, S, F, H, pol, k, sizes[nl, s], g):
                    pf_bytes[g] += sizes[nl, s]
                    pf_loads[g] += 1
                    pf_link[g] += link_s[nl, s]
                    adm_at[k] = g
                    n_adm += 1


# The kernel's specialised entry points (`_specialised`). `_kernel` is inlined into each (called from Python it
# compiles as usual: that is the generic entry); in these the policy and the precision switches are compile-time
# constants, so LLVM drops every other policy's branches, and in the one-slot entries the number of format
# slots is the constant 1 (native precision: no slot lookup, no multiply in an entry's id). lru with
# native or static precision and one pool (the like-for-like configuration of benchmarks/bench_replay.py)
# went from 15.8 to about 11 ns per access on its 1x trace with the policy constant, and from 10.9 to 9.7
# with the slot count constant too (int32 rows in both; 2-core development machine; docs/performance.md). Every other
# configuration runs `_kernel` itself, the same code with the switches read at run time.
def _specialised(policy: int, one_slot: bool):
    """`_kernel` compiled with `policy` and the precision switches (no dynamic part, one pool) as constants,
    and with `ns` = 1 where `one_slot` (the closure's values are compile-time constants to numba)."""
    @numba.njit(cache=True, _nrt=False)
    def entry(M, S, F, H, pol, start, glayer, gseq, expert, score, predicted, hi_slots, sizes, link_s,
              dyn, t1, t2, dyn_slot, serve, split, shared, result, slot_out, pf_bytes, pf_loads, pf_link, wait,
              adm_at, ns):  # pragma: no cover - compiled
        _kernel(M, S, F, H, policy, start, glayer, gseq, expert, score, predicted, hi_slots, sizes, link_s,
                False, t1, t2, 0 if one_slot else dyn_slot, False, False, True, result, slot_out, pf_bytes, pf_loads,
                pf_link, wait, adm_at, 1 if one_slot else ns)
    return entry


# (policy, one format slot) -> entry, for native or static precision in one pool
SPECIALISED = {(p, one): _specialised(p, one) for p in (LRU, SLRU) for one in (False, True)}


def _local_slots(policy, hi_slots):
    """The SLOTS indices the policy can use (0 first, ascending) and the local slot of each SLOTS index (-1: unused)."""
    used = sorted({0, *np.unique(hi_slots).tolist(), *([SLOTS.index(policy.dynamic_format)] if policy.is_dynamic else [])})
    local = np.full(NS, -1, np.int8)
    local[used] = np.arange(len(used))
    return used, local


def _static_pins(groups, hi_slots, sizes, caps, n_parts: int, per_layer: bool) -> np.ndarray:
    """int64 [ids]: 1 where the static cache that holds the id pins it (StaticPinned.fit, vectorised).

    Every pool's cache (and, per layer, every layer's sub-cache) is fit on the calibration window's
    accesses at their high-precision slot: keys by count (descending), ties to the smaller key,
    pinned greedily while they fit in that cache's capacity. Slots are local (as in `_kernel`).
    """
    n_layers, n_experts = hi_slots.shape
    ns = sizes.shape[1]
    n_ids = n_layers * n_experts * ns
    counts = np.zeros(n_ids, np.int64)
    _calib_counts(groups.start, groups.layer, groups.calib, groups.expert, hi_slots, counts, ns)
    cand = np.flatnonzero(counts)
    order = cand[np.lexsort((cand, -counts[cand]))]
    size = np.ascontiguousarray(sizes[order // ns // n_experts, order % ns], dtype=np.int64)
    part = order // ns // n_experts if per_layer else np.zeros_like(order)
    out = np.zeros(n_ids, np.int64)
    for p, cap in enumerate(caps):
        pinned = np.zeros(n_ids, np.bool_)
        _pin_greedy(order, size, part, np.full(n_parts, cap // n_parts if per_layer else cap, np.int64), pinned)
        mine = (np.arange(n_ids) % ns != 0) == (p == 1) if len(caps) == 2 else np.ones(n_ids, bool)
        out[mine & pinned] = 1
    return out


@numba.njit(cache=True)
def _calib_counts(start, layer, calib, expert, hi_slots, counts, ns):  # pragma: no cover - compiled
    """Accesses per id (at its high-precision slot) in the calibration window's groups."""
    n_experts = hi_slots.shape[1]
    for g in range(layer.shape[0]):
        if calib[g]:
            for a in range(start[g], start[g + 1]):
                e = expert[a]
                counts[(layer[g] * n_experts + e) * ns + hi_slots[layer[g], e]] += 1


@numba.njit(cache=True)
def _pin_greedy(order, size, part, left, pinned):  # pragma: no cover - compiled
    """Pin the candidates in order while each fits in what is left of its partition's capacity."""
    for i in range(order.shape[0]):
        if size[i] <= left[part[i]]:
            pinned[order[i]] = True
            left[part[i]] -= size[i]


def _uses_bound(groups, n_layers: int) -> np.ndarray:
    """int64 [layers]: the most accesses any sequence makes to the layer, a bound on an expert's uses.

    Hobbit counts an expert's uses from the sequence's start (its count resets when a group of
    another sequence comes), one per access of the expert, so no count exceeds the accesses of one
    (sequence, layer)."""
    if groups.n_groups == 0:
        return np.zeros(n_layers, np.int64)
    _, seq_i = np.unique(groups.seq, return_inverse=True)
    cell = seq_i.reshape(-1).astype(np.int64) * n_layers + groups.layer
    acc = np.bincount(cell, weights=np.diff(groups.start), minlength=(int(seq_i.max()) + 1) * n_layers)
    return np.rint(acc).astype(np.int64).reshape(-1, n_layers).max(0)


def _m_dtype(n_accesses: int, n_predicted: int, n_sent: int, sizes) -> type:
    """int32 when every row of M holds values below 2^31 by construction: ids and heap positions
    (< n_sent), group stamps, counts, uses and last-touch ticks (at most one per access or prefetch
    admission), and entry sizes; LFU's priorities are checked as they are set (K_MAX)."""
    bound = max(n_accesses + n_predicted + 1, n_sent, int(np.max(sizes, initial=0)))
    return np.int32 if bound < INT32_MAX else np.int64


def _k_max(dtype) -> int:
    """The largest LFU priority M's rows of this dtype hold (tests lower it to exercise the int64 rerun)."""
    return int(np.iinfo(dtype).max)


def replay_compiled(groups, cache, policy, hi_slots, sizes, link_s):
    """The compiled engine's Outcome, or None where the reference must run (an unknown policy; belady where
    sim.engine_belady declines)."""
    from sim.engine import Outcome

    pol = COMPILED_POLICIES.get(cache.policy)
    if pol is None and cache.policy != "belady":
        return None
    params = dict(cache.params)
    if pol is None:  # belady: its own kernel (it ranks whole future-use chains), on SLOTS-indexed slots
        return replay_belady(groups, cache, policy, hi_slots, sizes, link_s)
    used_slots, local = _local_slots(policy, hi_slots)
    ns = len(used_slots)
    hi_slots = np.ascontiguousarray(local[hi_slots])
    sizes = np.ascontiguousarray(np.asarray(sizes)[:, used_slots], dtype=np.int64)
    link_s = np.ascontiguousarray(np.asarray(link_s)[:, used_slots], dtype=np.float64)
    n_layers_tr, n_experts = hi_slots.shape
    n_eids = n_layers_tr * n_experts
    n_ids = n_eids * ns
    per_layer = cache.partition == "per-layer"
    if cache.partition not in ("global", "per-layer"):
        raise ValueError(f"unknown partition {cache.partition!r}")
    if per_layer and (cache.n_layers is None or cache.n_layers < 1):
        raise ValueError("partition='per-layer' needs n_layers >= 1")
    n_parts = int(cache.n_layers) if per_layer else 1
    if per_layer and n_parts < n_layers_tr:
        raise ValueError(f"keys of layer {n_layers_tr - 1} are outside the {n_parts} partitions")
    share = policy.low_pool_share
    split = share is not None
    pool_caps = [int(cache.capacity_bytes)] if not split else [int(cache.capacity_bytes * (1 - share)), int(cache.capacity_bytes * share)]
    n_sc = len(pool_caps) * n_parts
    # the parameters each class takes (its constructor's defaults), checked like the class does
    prm = np.zeros(N_COLS, np.int64)  # becomes S[-1]
    Pf = {"protected_share": DEFAULT_PROTECTED_SHARE, "small_share": 0.1, "ghost_share": 0.9}
    allowed = {LRU: (), SLRU: ("protected_share",), LFU: (), STATIC: (),
               S3FIFO: ("small_share", "ghost_share", "move_to_main_threshold"),
               HOBBIT: ("w_recency", "w_frequency", "w_high_precision", "w_layer_distance", "n_layers")}[pol]
    extra = sorted(set(params) - set(allowed))
    if extra:
        raise TypeError(f"{cache.policy} got unexpected parameters {extra}")
    if pol == SLRU:
        Pf["protected_share"] = float(params.get("protected_share", DEFAULT_PROTECTED_SHARE))
        if not 0.0 <= Pf["protected_share"] <= 1.0:
            raise ValueError(f"protected_share must be in [0, 1], got {Pf['protected_share']}")
    if pol == S3FIFO:
        Pf["small_share"] = float(params.get("small_share", 0.1))
        Pf["ghost_share"] = float(params.get("ghost_share", 0.9))
        if not 0.0 <= Pf["small_share"] <= 1.0 or Pf["ghost_share"] < 0.0:
            raise ValueError(f"bad shares: small_share={Pf['small_share']} ghost_share={Pf['ghost_share']}")
        prm[MOVE_THR] = int(params.get("move_to_main_threshold", 1))
    weights = (1.0, 1.0, 0.5, 1.0)
    if pol == HOBBIT:
        weights = tuple(float(params.get(n, d)) for n, d in zip(allowed[:4], weights))
        hob_layers = params.get("n_layers", cache.n_layers)
        prm[HOB_LAYERS] = int(hob_layers) if hob_layers else 0
        prm[HOB_PRUNE] = int(all(np.isfinite(w) and w >= 0 for w in weights))
    prm[PER_LAYER], prm[N_PARTS], prm[N_EXPERTS], prm[N_EIDS], prm[N_IDS] = int(per_layer), n_parts, n_experts, n_eids, n_ids
    prm[ONE_SC] = int(n_sc == 1)
    # sub-cache of every id: pool (split: slot 0 high, others low) x partition (per-layer: its layer)
    ids = np.arange(n_ids)
    slot_of = ids % ns
    layer_of = ids // ns // n_experts
    sc_of = ((slot_of != 0) & split).astype(np.int64) * n_parts + (layer_of if per_layer else 0)
    counts = np.bincount(sc_of, minlength=n_sc)
    S = np.zeros((n_sc, N_COLS), np.int64)
    F = np.zeros((n_sc, 4), np.float64)
    S[:, BASE] = np.r_[0, np.cumsum(counts)[:-1]]
    for p, cap in enumerate(pool_caps):
        sub_cap = cap // n_parts if per_layer else cap
        rows = slice(p * n_parts, (p + 1) * n_parts)
        S[rows, CAP] = sub_cap
        S[rows, PCAP] = int(Pf["protected_share"] * sub_cap)
        F[rows, STGT] = Pf["small_share"] * sub_cap
        F[rows, GCAP] = Pf["ghost_share"] * sub_cap
    if (S[:, CAP] < 0).any():
        raise ValueError("capacity_bytes must be >= 0")
    S[:, GST] = -2
    S[:, CSEQ] = NO_SEQ
    S[:, CLAYER] = -1
    S[:, MAXL] = -1
    n_sent = n_ids + 3 * n_sc
    n, n_groups = groups.expert.size, groups.n_groups
    pins = _static_pins(groups, hi_slots, sizes, pool_caps, n_parts, per_layer) if pol == STATIC else 0

    def new_rows(dtype):  # M before the replay
        M = np.zeros((N_ROWS, n_sent), dtype)
        M[PRV] = M[NXT] = np.arange(n_sent)  # sentinels point at themselves (empty lists)
        M[STAMP] = -2
        M[HPOS] = -1
        M[SCOF, :n_ids] = sc_of
        M[LAYR, :n_ids] = layer_of
        M[EID, :n_ids] = ids // ns
        M[PIN, :n_ids] = pins
        return M

    H = np.zeros(1, np.int64)
    if pol == HOBBIT:  # each sub-cache's two histograms, as wide as its uses can grow
        width = _uses_bound(groups, n_layers_tr) + 2  # per layer of the trace
        part_w = np.full(n_parts, 2 if per_layer else width.max(), np.int64)
        if per_layer:
            part_w[:n_layers_tr] = width
        w_sc = np.tile(part_w, len(pool_caps))
        off = np.r_[0, np.cumsum(2 * w_sc)[:-1]]
        S[:, FOFF] = off
        S[:, HOFF] = off + w_sc
        H = np.zeros(int(2 * w_sc.sum()), np.int64)
    S = np.vstack([S, prm[None]])
    F = np.vstack([F, np.array([weights], np.float64)])
    dyn = policy.is_dynamic
    dyn_slot = int(local[SLOTS.index(policy.dynamic_format)]) if dyn else 0
    t1 = float(policy.t1) if dyn else 0.0
    t2 = float(policy.t2) if dyn else 0.0
    kernel = SPECIALISED.get((pol, ns == 1), _kernel) if not dyn and not split else _kernel

    def run(M, S):
        out = Outcome(np.zeros(n, np.int8), np.zeros(n, np.int8), np.zeros(n_groups, np.int64),
                      np.zeros(n_groups, np.int64), np.zeros(n_groups, np.float64), np.full(n_groups, -1, np.int64))
        S[-1, K_MAX] = _k_max(M.dtype)
        kernel(M, S, F, H, pol, groups.start, groups.layer, groups.seq, groups.expert, groups.score, groups.predicted,
               hi_slots, sizes, link_s, dyn, t1, t2, dyn_slot, dyn and policy.low_copy == SERVE, split, not split,
               out.result, out.slot, out.prefetch_bytes, out.prefetch_loads, out.prefetch_link_s, out.wait_group,
               np.full(n_ids, -1, np.int64), ns)
        return out

    M = new_rows(_m_dtype(n, groups.predicted.shape[1] * n_groups, n_sent, sizes))
    S0 = S.copy() if pol == LFU and M.dtype == np.int32 else None
    out = run(M, S)
    if S[-1, K_WIDE]:  # an LFU priority outgrew the int32 rows: again from the start, with int64 rows
        out = run(new_rows(np.int64), S0)
    if used_slots != list(range(ns)):  # local slots back to SLOTS indices (skipped accesses stay -1)
        served = out.slot >= 0
        out.slot[served] = np.asarray(used_slots, np.int8)[out.slot[served]]
    return out
