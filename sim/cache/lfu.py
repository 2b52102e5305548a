"""LFU with dynamic aging (LFU-DA): evict the entry with the lowest aged frequency.

Arlitt, Cherkasova, Dilley, Friedrich and Jin, "Evaluating content management techniques for Web
proxy caches", ACM SIGMETRICS Performance Evaluation Review 27(4), 2000. Each resident entry has
an in-cache access count `count` and a priority `K = count + L`, where `L` is the cache's
inflation ("age") value. The aging rule: `L` starts at 0 and, every time an entry is evicted,
`L` becomes that entry's priority (evicting raises the floor, so an entry that was popular long
ago but is no longer accessed eventually falls below newly inserted ones). A miss inserts with
count 1 (K = L + 1); an admit (prefetch) inserts with count 0 (K = L); a hit does count += 1 and
K = count + L with the current L. The victim is the non-group entry with the lowest K; ties go to
the least recently touched entry (access or insertion), then to the smaller key. A driver
`remove` does not change L. Counts are forgotten when an entry leaves the cache.
"""
from __future__ import annotations

import heapq

from sim.cache.base import CachePolicy, register_policy


@register_policy("lfu")
class LFU(CachePolicy):
    """Byte-capacity LFU with dynamic aging (LFU-DA)."""

    def __init__(self, capacity_bytes: int):
        super().__init__(capacity_bytes)
        self.age = 0  # L, the inflation value
        self._count: dict[int, int] = {}
        self._rec: dict[int, tuple[int, int]] = {}  # key -> (priority K, tick of last touch)
        self._heap: list[tuple[int, int, int]] = []  # (K, tick, key); stale entries skipped lazily

    def priority(self, key: int) -> int:
        """K = count + L of a resident key."""
        return self._rec[key][0]

    def _touch(self, key: int) -> None:
        rec = (self._count[key] + self.age, self._tick)
        self._rec[key] = rec
        heapq.heappush(self._heap, (rec[0], rec[1], key))
        if len(self._heap) > 4 * len(self._rec) + 64:
            self._heap = [(k_, t, key_) for key_, (k_, t) in self._rec.items()]
            heapq.heapify(self._heap)

    def _on_hit(self, key, high_precision):
        self._count[key] += 1
        self._touch(key)

    def _insert(self, key, high_precision, prefetch):
        self._count[key] = 0 if prefetch else 1
        self._touch(key)

    def _victim(self):
        heap, held, victim = self._heap, [], None
        while heap:
            prio, tick, key = heap[0]
            if self._rec.get(key) != (prio, tick):
                heapq.heappop(heap)  # stale
                continue
            if key in self._group:
                held.append(heapq.heappop(heap))
                continue
            victim = key
            break
        for item in held:
            heapq.heappush(heap, item)
        return victim

    def _evict(self, key):
        self.age = self._rec[key][0]
        self._forget(key)

    def _remove(self, key):
        self._forget(key)

    def _forget(self, key):
        del self._count[key]
        del self._rec[key]
