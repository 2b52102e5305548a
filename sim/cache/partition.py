"""Per-layer partitioning: one independent sub-cache per MoE layer, capacity split evenly.

Each of the `n_layers` sub-caches gets `capacity_bytes // n_layers` bytes (the remainder,
< n_layers bytes, is unused, so `capacity_bytes` of the partitioned cache reports the sum of the
shares). An access, admit, contains or remove is routed by `key_layer(key)`; `begin_group` goes to
the group's layer and ends the protection of the previous group's layer, so exactly the current
group is protected, as in a global cache. Stats are the sums of the
sub-caches' stats. `prepare` (Belady) and `fit` (static) split their input by layer.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from sim.cache.base import CachePolicy, CacheStats, key_layer, sizes_lookup


class PerLayerCache(CachePolicy):
    """A cache made of one sub-policy per layer, each with an equal byte share."""

    def __init__(self, factory: Callable[[int], CachePolicy], capacity_bytes: int, n_layers: int):
        super().__init__(capacity_bytes)
        self.n_layers = n_layers
        share = int(capacity_bytes) // n_layers
        self.subs = [factory(share) for _ in range(n_layers)]
        self._group_layer: int | None = None
        self.name = f"{self.subs[0].name}/per-layer"
        self._capacity = share * n_layers

    def _sub(self, key: int) -> CachePolicy:
        layer = key_layer(key)
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"key {key} is in layer {layer}, outside the {self.n_layers} partitions")
        return self.subs[layer]

    @property
    def used_bytes(self) -> int:
        return sum(s.used_bytes for s in self.subs)

    @property
    def stats(self) -> CacheStats:
        total = CacheStats()
        for s in self.subs:
            total = total + s.stats
        return total

    def contains(self, key: int) -> bool:
        """Whether `key` is resident in its layer's sub-cache."""
        return self._sub(key).contains(key)

    def resident_keys(self) -> list[int]:
        """Resident keys of all layers, sorted."""
        return sorted(k for s in self.subs for k in s.resident_keys())

    def size_of(self, key: int) -> int:
        """Bytes of a resident key."""
        return self._sub(key).size_of(key)

    def begin_group(self, layer: int, seq: int, step: int, keys: Iterable[int]) -> None:
        """Start a group in layer `layer`'s sub-cache."""
        self.layer, self.seq, self.step = layer, seq, step
        keys = list(keys)
        for k in keys:
            if key_layer(k) != layer:
                raise ValueError(f"group of layer {layer} holds key {k} of layer {key_layer(k)}")
        if self._group_layer is not None:
            self.subs[self._group_layer].end_group()
        self._group_layer = layer if 0 <= layer < self.n_layers else None
        if self._group_layer is not None:
            self.subs[layer].begin_group(layer, seq, step, keys)
        elif keys:
            raise ValueError(f"group layer {layer} is outside the {self.n_layers} partitions")

    def end_group(self) -> None:
        """Lift every sub-cache's group protection."""
        for s in self.subs:
            s.end_group()
        self._group_layer = None

    def access(self, key: int, size_bytes: int, *, high_precision: bool = True) -> bool:
        """Access `key` in its layer's sub-cache."""
        return self._sub(key).access(key, size_bytes, high_precision=high_precision)

    def admit(self, key: int, size_bytes: int) -> bool:
        """Prefetch `key` into its layer's sub-cache."""
        return self._sub(key).admit(key, size_bytes)

    def remove(self, key: int) -> bool:
        """Drop `key` from its layer's sub-cache."""
        return self._sub(key).remove(key)

    def _split_stream(self, keys, sizes, group_starts):
        """Each layer's part of an access stream: (keys, sizes or None, group starts or None) per layer."""
        keys = [int(k) for k in keys]
        sizes = None if sizes is None else [int(s) for s in sizes]
        starts = [] if group_starts is None else sorted(int(s) for s in group_starts)
        parts: list[list[int]] = [[] for _ in self.subs]
        part_sizes: list[list[int]] = [[] for _ in self.subs]
        part_starts: list[list[int]] = [[] for _ in self.subs]
        last_gid = [None] * self.n_layers
        gid = 0
        for i, k in enumerate(keys):
            layer = key_layer(k)
            if layer >= self.n_layers:
                raise ValueError(f"key {k} is in layer {layer}, outside the {self.n_layers} partitions")
            while gid < len(starts) and starts[gid] <= i:
                gid += 1  # gid = number of group starts <= i
            if last_gid[layer] != gid:  # this layer's accesses of a new group begin here
                part_starts[layer].append(len(parts[layer]))
                last_gid[layer] = gid
            parts[layer].append(k)
            if sizes is not None:
                part_sizes[layer].append(sizes[i])
        return [(parts[la], None if sizes is None else part_sizes[la], None if group_starts is None else part_starts[la])
                for la in range(self.n_layers)]

    def prepare(self, future_keys: Iterable[int], sizes=None, group_starts=None) -> PerLayerCache:
        """Belady: give each layer's sub-cache its own part of the future (and of sizes and groups)."""
        for s, part in zip(self.subs, self._split_stream(future_keys, sizes, group_starts)):
            s.prepare(*part)
        return self

    def fit(self, calibration_keys: Iterable[int], sizes: Mapping[int, int] | Iterable[int], **kw) -> PerLayerCache:
        """Static: fit each layer's sub-cache on its own calibration keys."""
        keys = [int(k) for k in calibration_keys]
        size_of = sizes_lookup(keys, sizes)
        parts: list[list[int]] = [[] for _ in self.subs]
        for k in keys:
            parts[key_layer(k)].append(k)
        for s, part in zip(self.subs, parts):
            s.fit(part, size_of, **kw)
        return self

    def prepare_replay(self, keys, sizes, group_starts, calibration=None) -> None:
        """Driver hook: each layer's sub-cache gets its own part of the stream and of the calibration window."""
        if type(self.subs[0]).prepare_replay is CachePolicy.prepare_replay:
            return  # an online policy: nothing to hand over
        calib_parts = [None] * self.n_layers
        if calibration is not None:
            ckeys = [int(k) for k in calibration[0]]
            size_of = sizes_lookup(ckeys, calibration[1])
            split: list[list[int]] = [[] for _ in self.subs]
            for k in ckeys:
                split[key_layer(k)].append(k)
            calib_parts = [(part, size_of) for part in split]
        for s, part, calib in zip(self.subs, self._split_stream(keys, sizes, group_starts), calib_parts):
            s.prepare_replay(*part, calibration=calib)
