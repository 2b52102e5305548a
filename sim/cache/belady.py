"""Belady's offline optimum (MIN), made exact under group protection: keep what is needed soonest.

Belady, "A study of replacement algorithms for a virtual-storage computer", IBM Systems Journal
5(2), 1966; with bypass as in Mattson, Gecsei, Slutz and Traiger 1970 (the cache may decline to
store an entry). `prepare(future_keys, sizes=None, group_starts=None)` must be given the whole
sequence of keys that `access` will be called with, in order (admits are not part of it), and,
when the driver uses groups, the index in that sequence where each group begins (the same groups
it will pass to begin_group). Access before `prepare`, past its end, or with a key whose
(layer, expert) differs from the prepared one raises RuntimeError. Next use is format-agnostic:
an entry's next use is the next access to its (layer, expert) in any format.

Rank (which entry is better to keep): compare the groups of ALL future uses of the two entries
lexicographically (the one used in an earlier group wins; on a tie, the next use after that, and
so on; "never" is last); then smaller size, then smaller key. Without groups this is plain "next
use sooner". Why the whole sequence: a kept entry that is hit is pinned until its group ends, so
between two entries needed in the same group the one needed again sooner after that is the one
worth pinning (found by the exhaustive-search property test; comparing only the next use loses).
Victims are evicted worst-first among the entries not protected by the current group. Admission
of k on a miss (or an admit):
  * k is never used again → bypass;
  * otherwise let P be the current group's members still to be accessed and not resident (each
    will need room and is then pinned; ranked by its uses after that access). k is stored iff
    size(k) + the bytes of P members ranked better than k + the bytes of evictable residents
    ranked better than k fit in capacity − bytes of resident group members. Room is then made
    by evicting worst-first (never an entry ranked better than k).
Exactness: with equal sizes, one format and distinct keys within each group (true of routing
traces: a token's top-k experts are distinct), the hits equal an exhaustive search over every
bypass/eviction choice in the property tests (thousands of random traces; this is a tested
claim, not a proof). With a key repeated inside a group, unequal sizes or several formats of one
expert it is a heuristic bound, not a proven optimum (the byte-capacity optimum is NP-hard).
Sizes of P members come from `prepare(..., sizes)`; without them each is assumed to be size(k).
Ranks are compared lazily along the next-use chains (usually a step or two).
"""
from __future__ import annotations

import heapq
from collections.abc import Iterable

import numpy as np

from sim.cache.base import EXPERT_SHIFT, CachePolicy, key_expert_id, register_policy

NEVER = 1 << 62  # rank of "not used again"


@register_policy("belady")
class Belady(CachePolicy):
    """Offline optimal byte-capacity cache (keeps what is needed soonest); needs `prepare(...)`."""

    needs_future = True

    def __init__(self, capacity_bytes: int):
        super().__init__(capacity_bytes)
        self._eids: np.ndarray | None = None
        self._next: np.ndarray | None = None
        self._future_sizes: np.ndarray | None = None
        self._pos = -1  # index of the access being served
        self._nu: dict[int, int] = {}  # resident key -> position of its next use (len = never)
        self._by_eid: dict[int, set[int]] = {}
        self._heap: list[_Worst] = []  # worst rank on top; stale entries skipped lazily
        self._pending: set[int] = set()  # group members not yet accessed in this group

    def prepare(
        self,
        future_keys: Iterable[int],
        sizes: Iterable[int] | None = None,
        group_starts: Iterable[int] | None = None,
    ) -> Belady:
        """Give the whole future access sequence (keys in order; optionally sizes and group starts)."""
        eids = np.asarray(list(future_keys), dtype=np.int64) >> EXPERT_SHIFT
        n = len(eids)
        if group_starts is None:
            self._grp = np.arange(n, dtype=np.int64)
        else:
            starts = np.asarray(list(group_starts), dtype=np.int64)
            self._grp = np.searchsorted(starts, np.arange(n), side="right").astype(np.int64)
        if sizes is not None:
            self._future_sizes = np.asarray(list(sizes), dtype=np.int64)
            if len(self._future_sizes) != n:
                raise ValueError(f"{len(self._future_sizes)} sizes for {n} future keys")
        nxt = np.full(n, n, dtype=np.int64)
        order = np.lexsort((np.arange(n), eids))  # by eid, then position
        same = eids[order[1:]] == eids[order[:-1]]
        nxt[order[:-1][same]] = order[1:][same]
        self._eids, self._next, self._pos = eids, nxt, -1
        self._next_list, self._grp_list = nxt.tolist(), self._grp.tolist()
        self._sorted_eids, self._sorted_pos = eids[order], order
        for key in self._nu:  # entries already resident: next use from the start
            self._set_nu(key, self._first_after(key_expert_id(key), -1))
        return self

    def prepare_replay(self, keys, sizes, group_starts, calibration=None) -> None:
        """Driver hook: the future is the replay's own access stream."""
        self.prepare(keys, sizes, group_starts)

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

    def _first_after(self, eid: int, pos: int) -> int:
        lo = np.searchsorted(self._sorted_eids, eid, side="left")
        hi = np.searchsorted(self._sorted_eids, eid, side="right")
        i = lo + np.searchsorted(self._sorted_pos[lo:hi], pos, side="right")
        return int(self._sorted_pos[i]) if i < hi else len(self._eids)

    def _cmp_future(self, a: int, b: int) -> int:
        """Compare two next uses by the groups of all their future uses: -1 if a is needed sooner."""
        grp, nxt, n = self._grp_list, self._next_list, len(self._next_list)
        while True:
            ga = grp[a] if a < n else NEVER
            gb = grp[b] if b < n else NEVER
            if ga != gb:
                return -1 if ga < gb else 1
            if a >= n or a == b:
                return 0
            a, b = nxt[a], nxt[b]

    def _rank(self, nu: int, size: int, key: int) -> _Rank:
        return _Rank(self, nu, size, key)

    def _set_nu(self, key: int, nu: int) -> None:
        self._nu[key] = nu
        heapq.heappush(self._heap, _Worst(self._rank(nu, self._size[key], key)))
        if len(self._heap) > 4 * len(self._nu) + 64:
            self._heap = [_Worst(self._rank(v, self._size[k], k)) for k, v in self._nu.items()]
            heapq.heapify(self._heap)

    def _on_group(self, layer, seq, step, keys):
        self._pending = set(keys)

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
        self._pending.discard(key)
        nu = int(self._next[pos])
        for k in self._by_eid.get(eid, ()):
            self._set_nu(k, nu)

    def _incoming_nu(self, key: int, prefetch: bool) -> int:
        if prefetch:
            return self._first_after(key_expert_id(key), self._pos)
        return int(self._next[self._pos])

    def _worst_first(self):
        """Yield evictable resident keys worst-first (the heap is restored when the caller stops)."""
        heap, taken, seen = self._heap, [], set()
        try:
            while heap:
                item = heapq.heappop(heap)
                r = item.rank
                if self._nu.get(r.key) != r.nu or self._size.get(r.key) != r.size:
                    continue  # stale
                key = r.key
                if key in seen:
                    # a second item of the same rank: left from an earlier stay of the key with the same next
                    # use (evicted, then admitted again before that use). Yielding it twice made
                    # _should_admit count the key's bytes twice.
                    continue
                seen.add(key)
                taken.append(item)
                if key not in self._group:
                    yield key
        finally:
            for item in taken:
                heapq.heappush(heap, item)

    def _should_admit(self, key, size_bytes, need_evict, prefetch):
        self._need_prepare()
        n = len(self._eids)
        nu = self._incoming_nu(key, prefetch)
        rank = self._rank(nu, size_bytes, key)
        if nu >= n:
            return False  # never used again: storing it can only take room
        need = self._used + size_bytes - self._capacity
        for member in self._pending:
            if member == key or member in self._size:
                continue
            q = self._first_after(key_expert_id(member), self._pos)  # its access in this group
            if q >= n:
                continue
            m_size = int(self._future_sizes[q]) if self._future_sizes is not None else size_bytes
            if self._rank(self._next_list[q], m_size, member) < rank:
                need += m_size
        if need <= 0:
            return True
        got, victims = 0, self._worst_first()
        try:
            for victim in victims:
                if self._rank(self._nu[victim], self._size[victim], victim) < rank:
                    return False  # what would have to go is needed sooner than k
                got += self._size[victim]
                if got >= need:
                    return True
            return False
        finally:
            victims.close()

    def _on_hit(self, key, high_precision):
        pass  # _before_access already moved its next use

    def _insert(self, key, high_precision, prefetch):
        self._by_eid.setdefault(key_expert_id(key), set()).add(key)
        self._set_nu(key, self._incoming_nu(key, prefetch))

    def _victim(self):
        victims = self._worst_first()
        try:
            return next(victims, None)
        finally:
            victims.close()

    def _evict(self, key):
        del self._nu[key]
        ks = self._by_eid[key_expert_id(key)]
        ks.discard(key)
        if not ks:
            del self._by_eid[key_expert_id(key)]


class _Rank:
    """How soon an entry is needed: `a < b` means a is better to keep (see the module docstring)."""

    __slots__ = ("key", "nu", "owner", "size")

    def __init__(self, owner: Belady, nu: int, size: int, key: int):
        self.owner, self.nu, self.size, self.key = owner, nu, size, key

    def __lt__(self, other: _Rank) -> bool:
        c = self.owner._cmp_future(self.nu, other.nu)
        return c < 0 if c else (self.size, self.key) < (other.size, other.key)


class _Worst:
    """Heap item ordering ranks worst first."""

    __slots__ = ("rank",)

    def __init__(self, rank: _Rank):
        self.rank = rank

    def __lt__(self, other: _Worst) -> bool:
        return other.rank < self.rank
