"""Belady's offline optimum (MIN): evict the entry whose next use lies furthest in the future.

Belady, "A study of replacement algorithms for a virtual-storage computer", IBM Systems Journal
5(2), 1966; with bypass as in Mattson et al. 1970 (the cache may decline to store an entry).
`prepare(future_keys)` must be given the whole sequence of keys that `access` will be called
with, in order (admits are not part of it); access before `prepare`, past its end, or with a key
whose (layer, expert) differs from the prepared one raises RuntimeError. Next use is
format-agnostic: an entry's next use is the next access to its (layer, expert) in any format.
Rules: on a miss that needs room, if the incoming entry's next use is not sooner than the next
use of the first victim (the non-group resident entry used furthest in the future; ties →
larger size, then larger key) the entry bypasses the cache; otherwise victims are evicted in that
order until it fits. A prefetch admit follows the same rule with the next use after the current
position. With equal sizes and one format this is exactly optimal, also under group protection
(a property test checks it against exhaustive search); with unequal sizes, or with several
formats of one expert, it is a heuristic bound, not a proven optimum (the byte-capacity optimum
is NP-hard in general).
"""
from __future__ import annotations

import heapq
from typing import Iterable

import numpy as np

from sim.cache.base import EXPERT_SHIFT, CachePolicy, key_expert_id, register_policy


@register_policy("belady")
class Belady(CachePolicy):
    """Offline optimal (furthest next use) byte-capacity cache; needs `prepare(future_keys)`."""

    def __init__(self, capacity_bytes: int):
        super().__init__(capacity_bytes)
        self._eids: np.ndarray | None = None
        self._next: np.ndarray | None = None
        self._pos = -1  # index of the access being served
        self._nu: dict[int, int] = {}  # resident key -> position of its next use (len = never)
        self._by_eid: dict[int, set[int]] = {}
        self._heap: list[tuple[int, int, int]] = []  # (-next use, -size, -key), stale skipped lazily

    def prepare(self, future_keys: Iterable[int]) -> "Belady":
        """Give the whole future access sequence (keys, in order); resets the position to its start."""
        eids = np.asarray(list(future_keys), dtype=np.int64) >> EXPERT_SHIFT
        n = len(eids)
        nxt = np.full(n, n, dtype=np.int64)
        if n:
            order = np.lexsort((np.arange(n), eids))  # by eid, then position
            same = eids[order[1:]] == eids[order[:-1]]
            nxt[order[:-1][same]] = order[1:][same]
        self._eids, self._next, self._pos = eids, nxt, -1
        self._sorted_eids = eids[order] if n else eids
        self._sorted_pos = order if n else np.zeros(0, np.int64)
        for key in self._nu:  # entries already resident: next use from the start
            self._set_nu(key, self._next_after(key_expert_id(key), -1))
        return self

    @property
    def position(self) -> int:
        """Index (into the prepared future) of the last access served; -1 before the first."""
        return self._pos

    def next_use(self, key: int) -> int:
        """Position of the next use of a resident key (len(future) if never)."""
        return self._nu[key]

    def _need_prepare(self):
        if self._eids is None:
            raise RuntimeError("belady policy used before prepare(future_keys): it needs the future")

    def _next_after(self, eid: int, pos: int) -> int:
        lo = np.searchsorted(self._sorted_eids, eid, side="left")
        hi = np.searchsorted(self._sorted_eids, eid, side="right")
        i = lo + np.searchsorted(self._sorted_pos[lo:hi], pos, side="right")
        return int(self._sorted_pos[i]) if i < hi else len(self._eids)

    def _set_nu(self, key: int, nu: int) -> None:
        self._nu[key] = nu
        heapq.heappush(self._heap, (-nu, -self._size[key], -key))
        if len(self._heap) > 4 * len(self._nu) + 64:
            self._heap = [(-v, -self._size[k], -k) for k, v in self._nu.items()]
            heapq.heapify(self._heap)

    def _before_access(self, key, high_precision):
        self._need_prepare()
        self._pos += 1
        pos, eid = self._pos, key_expert_id(key)
        if pos >= len(self._eids):
            raise RuntimeError(f"belady: access #{pos} is past the prepared future of {len(self._eids)}")
        if self._eids[pos] != eid:
            raise RuntimeError(
                f"belady: access #{pos} is to expert id {eid}, the prepared future says {int(self._eids[pos])}"
            )
        nu = int(self._next[pos])
        for k in self._by_eid.get(eid, ()):
            self._set_nu(k, nu)

    def _incoming_nu(self, key: int, prefetch: bool) -> int:
        if prefetch:
            return self._next_after(key_expert_id(key), self._pos)
        return int(self._next[self._pos])

    def _peek(self):
        heap, held, found = self._heap, [], None
        while heap:
            neg_nu, neg_size, neg_key = heap[0]
            key = -neg_key
            if self._nu.get(key) != -neg_nu or self._size.get(key) != -neg_size:
                heapq.heappop(heap)
                continue
            if key in self._group:
                held.append(heapq.heappop(heap))
                continue
            found = key
            break
        for item in held:
            heapq.heappush(heap, item)
        return found

    def _should_admit(self, key, size_bytes, need_evict, prefetch):
        self._need_prepare()
        if not need_evict:
            return True
        victim = self._peek()
        return victim is not None and self._incoming_nu(key, prefetch) < self._nu[victim]

    def _on_hit(self, key, high_precision):
        pass  # _before_access already moved its next use

    def _insert(self, key, high_precision, prefetch):
        self._by_eid.setdefault(key_expert_id(key), set()).add(key)
        self._set_nu(key, self._incoming_nu(key, prefetch))

    def _victim(self):
        return self._peek()

    def _evict(self, key):
        del self._nu[key]
        ks = self._by_eid[key_expert_id(key)]
        ks.discard(key)
        if not ks:
            del self._by_eid[key_expert_id(key)]
