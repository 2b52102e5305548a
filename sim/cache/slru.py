"""SLRU: segmented LRU with a probationary and a protected segment.

Karedla, Love and Wherry, "Caching strategies to improve disk system performance", IEEE Computer
27(3), 1994. Both segments are LRU lists. The protected segment may hold at most
`floor(protected_share * capacity_bytes)` bytes (default `DEFAULT_PROTECTED_SHARE` = 0.8, the
engine's setting; the numba kernel and the sweep read the same constant); the probationary segment holds
the rest. The exact rules used here:
  * a miss (or an admit) inserts the entry at the MRU end of the probationary segment;
  * a hit in the probationary segment moves the entry to the MRU end of the protected segment;
    then, while the protected segment holds more bytes than its share, its LRU entry is demoted
    to the MRU end of the probationary segment (so a protected entry is never evicted directly
    by overflow, it gets a second life in probation);
  * a hit in the protected segment moves the entry to the protected MRU end;
  * the victim is the LRU entry of the probationary segment not protected by the current group;
    only if the probationary segment has no such entry is the protected segment's LRU
    (non-group) entry evicted.
With protected_share = 0 every promoted entry is demoted straight back to probation MRU, so SLRU
is exactly LRU (a property test checks it).
"""
from __future__ import annotations

from collections import OrderedDict

from sim.cache.base import CachePolicy, register_policy

DEFAULT_PROTECTED_SHARE = 0.8  # share of the capacity the protected segment may hold by default


@register_policy("slru")
class SLRU(CachePolicy):
    """Byte-capacity segmented LRU (probation + protected)."""

    def __init__(self, capacity_bytes: int, protected_share: float = DEFAULT_PROTECTED_SHARE):
        super().__init__(capacity_bytes)
        if not 0.0 <= protected_share <= 1.0:
            raise ValueError(f"protected_share must be in [0, 1], got {protected_share}")
        self.protected_share = protected_share
        self.protected_cap_bytes = int(protected_share * self._capacity)
        self._probation: OrderedDict[int, None] = OrderedDict()
        self._protected: OrderedDict[int, None] = OrderedDict()
        self._protected_bytes = 0

    @property
    def protected_bytes(self) -> int:
        """Bytes in the protected segment."""
        return self._protected_bytes

    def segment_of(self, key: int) -> str:
        """"probation" or "protected" for a resident key."""
        if key in self._protected:
            return "protected"
        if key in self._probation:
            return "probation"
        raise KeyError(key)

    def _on_hit(self, key, high_precision):
        if key in self._protected:
            self._protected.move_to_end(key)
            return
        del self._probation[key]
        self._protected[key] = None
        self._protected_bytes += self._size[key]
        while self._protected_bytes > self.protected_cap_bytes:
            demoted, _ = self._protected.popitem(last=False)
            self._protected_bytes -= self._size[demoted]
            self._probation[demoted] = None

    def _insert(self, key, high_precision, prefetch):
        self._probation[key] = None

    def _victim(self):
        group = self._group
        for key in self._probation:
            if key not in group:
                return key
        for key in self._protected:
            if key not in group:
                return key
        return None

    def _evict(self, key):
        if key in self._probation:
            del self._probation[key]
        else:
            del self._protected[key]
            self._protected_bytes -= self._size[key]
