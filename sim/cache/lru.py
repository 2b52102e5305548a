"""LRU: evict the least recently used entry.

Recency order is kept in an OrderedDict (least recent first). A hit moves the entry to the most
recent end; a miss inserts at the most recent end; the victim is the least recently used entry
that is not protected by the current group (the scan skips at most the group's few keys).
An admit (prefetch) inserts at the most recent end, like a miss, and a resident admit changes
nothing. This is the policy of the llama.cpp-based engine whose trace lives in ../shared
(a global byte-capacity LRU; tests/test_cache_real_trace.py replays it exactly).
Reference: the classic demand-paging LRU, e.g. Mattson, Gecsei, Slutz and Traiger,
"Evaluation techniques for storage hierarchies", IBM Systems Journal 9(2), 1970.
"""
from __future__ import annotations

from collections import OrderedDict

from sim.cache.base import CachePolicy, register_policy


@register_policy("lru")
class LRU(CachePolicy):
    """Byte-capacity least-recently-used cache."""

    def __init__(self, capacity_bytes: int):
        super().__init__(capacity_bytes)
        self._order: OrderedDict[int, None] = OrderedDict()

    def _on_hit(self, key, high_precision):
        self._order.move_to_end(key)

    def _insert(self, key, high_precision, prefetch):
        self._order[key] = None

    def _victim(self):
        group = self._group
        for key in self._order:
            if key not in group:
                return key
        return None

    def _evict(self, key):
        del self._order[key]
