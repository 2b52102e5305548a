"""HOBBIT-style multi-dimensional priority: evict the entry with the lowest weighted score.

Tang et al., "HOBBIT: A Mixed Precision Expert Offloading System for Fast MoE Inference",
arXiv 2411.01433 (2024), §"sequence-level multidimensional expert caching": an expert's priority
combines its recency (LRU), its use frequency within the current sequence (LFU), how often it was
used at high precision (LHU) and its layer distance to the layer being computed (FLD). Our form
(the paper gives the four factors, not these exact normalisations): for each candidate entry e
(resident and not protected by the current group)

    P(e) = w_recency * R + w_frequency * F + w_high_precision * H + w_layer_distance * D

  R = (last_touch(e) - min last_touch) / (max - min) over the candidates (1.0 if all equal), where
      last_touch is the logical time of the entry's last access or insertion;
  F = uses of e's expert (any format) in the current sequence / max over the candidates (0 if 0);
  H = high-precision uses of e's expert in the current sequence / max over candidates (0 if 0);
  D = 1 - ((layer(e) - current layer) mod n_layers) / n_layers: 1 for the layer being computed,
      smallest for the layer just computed (needed again only after a full pass).
Uses count every access, hit or miss (an admit is not a use); both counts reset when begin_group
brings a new sequence id. The victim is the lowest P; ties → least recently touched, then the
smaller key. `n_layers=None` uses 1 + the largest layer seen so far. The victim is found by one
compiled (numba) O(resident) pass over slot arrays per eviction; `priorities()` shows the scores.
"""
from __future__ import annotations

import numba
import numpy as np

from sim.cache.base import CachePolicy, key_expert_id, key_layer, register_policy


@register_policy("hobbit")
class HobbitPriority(CachePolicy):
    """Byte-capacity cache evicting the lowest HOBBIT-style multi-factor priority."""

    takes_n_layers = True

    def __init__(
        self,
        capacity_bytes: int,
        w_recency: float = 1.0,
        w_frequency: float = 1.0,
        w_high_precision: float = 0.5,
        w_layer_distance: float = 1.0,
        n_layers: int | None = None,
    ):
        super().__init__(capacity_bytes)
        self.weights = (float(w_recency), float(w_frequency), float(w_high_precision), float(w_layer_distance))
        self.n_layers = n_layers
        self._max_layer = -1
        self._cur_seq = None
        self._uses: dict[int, int] = {}  # expert id -> uses in the current sequence
        self._hp_uses: dict[int, int] = {}  # expert id -> high-precision uses in the current sequence
        self._slot: dict[int, int] = {}  # resident key -> slot
        self._by_eid: dict[int, list[int]] = {}  # expert id -> slots of its resident keys
        n = 64
        self._free: list[int] = list(range(n - 1, -1, -1))
        self._keys = np.zeros(n, np.int64)
        self._last = np.zeros(n, np.int64)
        self._f = np.zeros(n, np.int64)
        self._h = np.zeros(n, np.int64)
        self._layer = np.zeros(n, np.int64)
        self._valid = np.zeros(n, bool)

    def _grow(self):
        n = len(self._keys)
        for name in ("_keys", "_last", "_f", "_h", "_layer", "_valid"):
            old = getattr(self, name)
            new = np.zeros(2 * n, old.dtype)
            new[:n] = old
            setattr(self, name, new)
        self._free.extend(range(2 * n - 1, n - 1, -1))

    def _on_group(self, layer, seq, step, keys):
        if seq != self._cur_seq:
            self._cur_seq = seq
            self._uses.clear()
            self._hp_uses.clear()
            self._f[:] = 0
            self._h[:] = 0

    def _before_access(self, key, high_precision):
        eid = key_expert_id(key)
        self._max_layer = max(self._max_layer, key_layer(key))
        u = self._uses[eid] = self._uses.get(eid, 0) + 1
        h = self._hp_uses.get(eid, 0) + (1 if high_precision else 0)
        self._hp_uses[eid] = h
        for s in self._by_eid.get(eid, ()):
            self._f[s] = u
            self._h[s] = h

    def _on_hit(self, key, high_precision):
        self._last[self._slot[key]] = self._tick

    def _insert(self, key, high_precision, prefetch):
        if not self._free:
            self._grow()
        s = self._free.pop()
        eid = key_expert_id(key)
        self._slot[key] = s
        self._by_eid.setdefault(eid, []).append(s)
        self._keys[s] = key
        self._last[s] = self._tick
        self._f[s] = self._uses.get(eid, 0)
        self._h[s] = self._hp_uses.get(eid, 0)
        self._layer[s] = key_layer(key)
        self._max_layer = max(self._max_layer, key_layer(key))
        self._valid[s] = True

    def priorities(self) -> dict[int, float]:
        """Priority P of every candidate (resident, not in the current group)."""
        slots, p = self._scores()
        return {int(self._keys[s]): float(v) for s, v in zip(slots, p)}

    def _scores(self):
        mask = self._valid.copy()
        for k in self._group:
            s = self._slot.get(k)
            if s is not None:
                mask[s] = False
        slots = np.flatnonzero(mask)
        if slots.size == 0:
            return slots, np.zeros(0)
        wr, wf, wh, wd = self.weights
        last = self._last[slots]
        lo, hi = last.min(), last.max()
        r = (last - lo) / (hi - lo) if hi > lo else np.ones(slots.size)
        f = self._f[slots]
        f = f / f.max() if f.max() > 0 else np.zeros(slots.size)
        h = self._h[slots]
        h = h / h.max() if h.max() > 0 else np.zeros(slots.size)
        n_layers = self.n_layers or (self._max_layer + 1)
        cur = self.layer if self.layer is not None else 0
        d = 1.0 - ((self._layer[slots] - cur) % n_layers) / n_layers
        return slots, wr * r + wf * f + wh * h + wd * d

    def _victim(self):
        held = [s for s in (self._slot.get(k) for k in self._group) if s is not None]
        self._valid[held] = False  # the group's entries are not candidates
        try:
            n_layers = self.n_layers or (self._max_layer + 1)
            cur = self.layer if self.layer is not None else 0
            best = _lowest_priority(self._valid, self._last, self._f, self._h, self._layer, self._keys,
                                    cur, n_layers, *self.weights)
        finally:
            self._valid[held] = True
        return None if best < 0 else int(self._keys[best])

    def _evict(self, key):
        s = self._slot.pop(key)
        self._valid[s] = False
        lst = self._by_eid[key_expert_id(key)]
        lst.remove(s)
        if not lst:
            del self._by_eid[key_expert_id(key)]
        self._free.append(s)


@numba.njit(cache=True)
def _lowest_priority(valid, last, f, h, layer, keys, cur, n_layers, wr, wf, wh, wd):  # pragma: no cover
    """Slot of the lowest P among valid slots (ties: older last touch, then smaller key); -1 if none."""
    lo = np.iinfo(np.int64).max
    hi = np.iinfo(np.int64).min
    fmax = 0
    hmax = 0
    for s in range(valid.shape[0]):
        if valid[s]:
            lo = min(lo, last[s])
            hi = max(hi, last[s])
            fmax = max(fmax, f[s])
            hmax = max(hmax, h[s])
    best = -1
    best_p = 0.0
    for s in range(valid.shape[0]):
        if not valid[s]:
            continue
        r = (last[s] - lo) / (hi - lo) if hi > lo else 1.0
        fv = f[s] / fmax if fmax > 0 else 0.0
        hv = h[s] / hmax if hmax > 0 else 0.0
        d = 1.0 - ((layer[s] - cur) % n_layers) / n_layers
        p = wr * r + wf * fv + wh * hv + wd * d
        if (best < 0 or p < best_p or (p == best_p and (last[s] < last[best]
                                                         or (last[s] == last[best] and keys[s] < keys[best])))):
            best = s
            best_p = p
    return best
