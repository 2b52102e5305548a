"""Static pinning: learn the hottest entries on a calibration window, keep only those.

The offline "static" baseline of expert-offloading work (e.g. the static placements compared in
Eliseev and Mazur, "Fast inference of Mixture-of-Experts language models with offloading",
arXiv 2312.17238, and in HOBBIT, arXiv 2411.01433): `fit(calibration_keys, sizes)` counts how
often each key is accessed in the calibration window, sorts keys by count (descending; ties →
smaller key first) and pins them greedily: a key is pinned if it still fits in the remaining
capacity, otherwise it is skipped and the next one is tried (so the pinned set is "the hottest
that fit", never over capacity). Accessing a pinned key that is not resident loads it (a miss, then
resident for good); every other key bypasses (a miss and a bypass, never inserted). Nothing is
ever evicted. `fit(..., preload=True)` makes the pinned set resident at once (not counted in
the stats: the cache starts warm). Access before `fit` raises RuntimeError.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

from sim.cache.base import CachePolicy, register_policy, sizes_lookup


@register_policy("static")
class StaticPinned(CachePolicy):
    """Byte-capacity cache of a fixed set of hot entries learned by `fit`."""

    def __init__(self, capacity_bytes: int):
        super().__init__(capacity_bytes)
        self._pinned: dict[int, int] | None = None  # key -> bytes

    @property
    def pinned(self) -> frozenset[int]:
        """The pinned keys (after `fit`)."""
        return frozenset(self._need_fit())

    def fit(
        self,
        calibration_keys: Iterable[int],
        sizes: Mapping[int, int] | Iterable[int],
        *,
        preload: bool = False,
    ) -> StaticPinned:
        """Pin the most accessed calibration keys that fit; `sizes` maps key → bytes or aligns with keys."""
        keys = [int(k) for k in calibration_keys]
        size_of = sizes_lookup(keys, sizes)
        counts = Counter(keys)
        pinned: dict[int, int] = {}
        left = self._capacity
        for key in sorted(counts, key=lambda k: (-counts[k], k)):
            if size_of[key] <= left:
                pinned[key] = size_of[key]
                left -= size_of[key]
        self._pinned = pinned
        for key in list(self._size):  # refitting drops what is no longer pinned
            if key not in pinned:
                self._used -= self._size.pop(key)
        if preload:
            for key, size in pinned.items():
                if key not in self._size:
                    self._size[key] = size
                    self._used += size
        return self

    def prepare_replay(self, keys, sizes, group_starts, calibration=None) -> None:
        """Driver hook: pin the hottest entries of the calibration window `(keys, sizes)`."""
        if calibration is None:
            raise TypeError("static needs a calibration window: calibration=(calibration_keys, sizes)")
        self.fit(*calibration)

    def _need_fit(self) -> dict[int, int]:
        if self._pinned is None:
            raise RuntimeError("static policy used before fit(calibration_keys, sizes)")
        return self._pinned

    def _before_access(self, key, high_precision):
        self._need_fit()

    def _should_admit(self, key, size_bytes, need_evict, prefetch):
        return key in self._need_fit() and not need_evict

    def _on_hit(self, key, high_precision):
        pass

    def _insert(self, key, high_precision, prefetch):
        pass

    def _victim(self):
        return None

    def _evict(self, key):
        raise AssertionError("static policy never evicts")

    def _remove(self, key):
        pass
