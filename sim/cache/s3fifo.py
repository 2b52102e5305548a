"""S3-FIFO: a small probationary FIFO, a main FIFO with reinsertion, and a ghost FIFO.

Yang, Zhang, Qiu, Yue and Vinayak, "FIFO queues are all you need for cache eviction", SOSP 2023.
Byte-sized version used here:
  * S (small) FIFO targets `small_share` of the capacity (default 10 %), M (main) the rest, and
    G (ghost) remembers keys, without data, of up to `ghost_share * capacity` bytes (default 90 %,
    "as many entries as M") in FIFO order.
  * Each resident entry has a 2-bit frequency: a hit does freq = min(freq + 1, 3); no reordering.
  * Insertion (miss or admit): a key found in G leaves G and enters M; any other key enters S.
    New entries start with freq 0.
  * Eviction, repeated by the template until the new entry fits: if S holds at least its target
    bytes (or M has no evictable entry), look at S's oldest non-group entry: if it was hit at
    least `move_to_main_threshold` times (default 1) while in S, it moves to M's tail with freq 0
    and the search goes on; else it is evicted and its key enters G. Otherwise look at M's oldest
    non-group entry: freq > 0 → freq -= 1 and it is reinserted at M's tail (the search goes on);
    freq 0 → evicted. S and M share the one byte budget: M may exceed its 90 % while S is small.
  * Group-protected entries are skipped in place (they keep their queue position and freq).
  * A driver `remove` forgets the entry without putting it in G.
"""
from __future__ import annotations

from collections import OrderedDict

from sim.cache.base import CachePolicy, register_policy

MAX_FREQ = 3


@register_policy("s3fifo")
class S3FIFO(CachePolicy):
    """Byte-capacity S3-FIFO (small FIFO, main FIFO with 2-bit reinsertion, ghost FIFO)."""

    def __init__(
        self,
        capacity_bytes: int,
        small_share: float = 0.1,
        ghost_share: float = 0.9,
        move_to_main_threshold: int = 1,
    ):
        super().__init__(capacity_bytes)
        if not 0.0 <= small_share <= 1.0 or ghost_share < 0.0:
            raise ValueError(f"bad shares: small_share={small_share} ghost_share={ghost_share}")
        self.small_target_bytes = small_share * self._capacity
        self.ghost_cap_bytes = ghost_share * self._capacity
        self.move_to_main_threshold = move_to_main_threshold
        self._small: OrderedDict[int, None] = OrderedDict()  # oldest first
        self._main: OrderedDict[int, None] = OrderedDict()
        self._ghost: OrderedDict[int, int] = OrderedDict()  # key -> bytes, oldest first
        self._small_bytes = self._main_bytes = self._ghost_bytes = 0
        self._freq: dict[int, int] = {}

    def queue_of(self, key: int) -> str:
        """"small", "main" or "ghost" (KeyError if unknown)."""
        for name, q in (("small", self._small), ("main", self._main), ("ghost", self._ghost)):
            if key in q:
                return name
        raise KeyError(key)

    def _on_hit(self, key, high_precision):
        self._freq[key] = min(self._freq[key] + 1, MAX_FREQ)

    def _insert(self, key, high_precision, prefetch):
        size = self._size[key]
        self._freq[key] = 0
        if key in self._ghost:
            self._ghost_bytes -= self._ghost.pop(key)
            self._main[key] = None
            self._main_bytes += size
        else:
            self._small[key] = None
            self._small_bytes += size

    def _first_free(self, queue):
        group = self._group
        for key in queue:
            if key not in group:
                return key
        return None

    def _victim(self):
        while True:
            s_key = self._first_free(self._small)
            m_key = self._first_free(self._main)
            if s_key is None and m_key is None:
                return None
            if s_key is not None and (self._small_bytes >= self.small_target_bytes or m_key is None):
                if self._freq[s_key] >= self.move_to_main_threshold:
                    size = self._size[s_key]
                    del self._small[s_key]
                    self._small_bytes -= size
                    self._main[s_key] = None
                    self._main_bytes += size
                    self._freq[s_key] = 0
                    continue
                return s_key
            if self._freq[m_key] > 0:
                self._freq[m_key] -= 1
                self._main.move_to_end(m_key)
                continue
            return m_key

    def _forget(self, key):
        size = self._size[key]
        del self._freq[key]
        if key in self._small:
            del self._small[key]
            self._small_bytes -= size
            return True
        del self._main[key]
        self._main_bytes -= size
        return False

    def _evict(self, key):
        if self._forget(key):  # evicted from S: remember it in G
            self._ghost[key] = self._size[key]
            self._ghost_bytes += self._size[key]
            while self._ghost_bytes > self.ghost_cap_bytes and self._ghost:
                _, size = self._ghost.popitem(last=False)
                self._ghost_bytes -= size

    def _remove(self, key):
        self._forget(key)
