"""Byte-capacity expert-cache interface: keys, statistics, the template `access` loop, the registry.

An entry is one expert of one MoE layer held in one storage format, packed into an int key
(`make_key`). Every policy shares ONE template method, `CachePolicy.access`, in the style of
libCacheSim's `cache_get`: a hit calls the policy's hit hook; a miss evicts victims chosen by the
policy until the new entry fits, then inserts it. Policies only supply hooks:

    _on_hit(key, high_precision)            a resident entry was accessed
    _insert(key, high_precision, prefetch)  a new entry became resident (its size is in `_size`)
    _victim() -> key | None                 the entry to evict next (never one of the current group)
    _evict(key)                             forget an evicted entry (called before it leaves `_size`)
    _remove(key)                            forget an entry the driver dropped (default: `_evict`)
    _should_admit(key, size, need_evict, prefetch) -> bool   False: bypass the cache
    _before_access(key, high_precision)     called first on every access (Belady tracks its clock)
    _on_group(layer, seq, step, keys)       a new (token step, layer) group begins
    prepare_replay(keys, sizes, group_starts, calibration)   once, before a driver's replay:
                                            the whole access stream and the calibration window, for
                                            policies that need them (Belady: the future; static:
                                            the pinned set). Drivers call it on every policy.

Groups: the driver calls `begin_group(layer, seq, step, keys)` before serving each (token step,
layer) group. Until the next `begin_group` (or `end_group`) the resident entries whose keys are in
`keys` (exact keys, format included) cannot be evicted: the experts of the step being computed
cannot evict each other. A miss whose entry cannot fit even after evicting every evictable entry
(it is bigger than the capacity, or what is left is protected by the group) bypasses the cache:
it counts as a miss and a bypass, nothing is evicted and nothing is inserted.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import ClassVar

# Key layout, the one definition (sim.engine.make_keys and the numba kernels derive from it):
# key = layer << LAYER_SHIFT | expert << EXPERT_SHIFT | fmt_id, with FMT_BITS bits of format slot
# and EXPERT_BITS bits of expert id.
FMT_BITS = 4
EXPERT_BITS = 16
EXPERT_SHIFT = FMT_BITS
LAYER_SHIFT = EXPERT_SHIFT + EXPERT_BITS
EXPERT_MASK = (1 << EXPERT_BITS) - 1
FMT_MASK = (1 << FMT_BITS) - 1
N_FMT_IDS = 1 << FMT_BITS  # format ids per (layer, expert)


def make_key(layer: int, expert: int, fmt_id: int) -> int:
    """Pack (layer, expert, format id) into one int key (the engine's format id is the slot in sim.precision.SLOTS)."""
    if not (0 <= layer and 0 <= expert <= EXPERT_MASK and 0 <= fmt_id <= FMT_MASK):
        raise ValueError(f"key out of range: layer={layer} expert={expert} fmt_id={fmt_id}")
    return (int(layer) << LAYER_SHIFT) | (int(expert) << EXPERT_SHIFT) | int(fmt_id)


def key_layer(key: int) -> int:
    """MoE layer of a key."""
    return key >> LAYER_SHIFT


def key_expert(key: int) -> int:
    """Expert id (within its layer) of a key."""
    return (key >> EXPERT_SHIFT) & EXPERT_MASK


def key_fmt(key: int) -> int:
    """Format id of a key (in the engine: the slot in sim.precision.SLOTS)."""
    return key & FMT_MASK


def key_expert_id(key: int) -> int:
    """The (layer, expert) part of a key as one int, whatever the format."""
    return key >> EXPERT_SHIFT


@dataclass
class CacheStats:
    """Counters of one cache (bytes in bytes). Admits and driver removals are not accesses."""

    accesses: int = 0
    hits: int = 0
    misses: int = 0
    bypasses: int = 0  # misses that were not inserted (included in `misses`)
    evictions: int = 0
    inserted_bytes: int = 0  # by misses and by admits
    evicted_bytes: int = 0
    admits: int = 0  # successful prefetch insertions
    removals: int = 0  # entries dropped by the driver through `remove`

    @property
    def hit_rate(self) -> float:
        """hits / accesses (0.0 before any access)."""
        return self.hits / self.accesses if self.accesses else 0.0

    def as_dict(self) -> dict[str, int]:
        """The counters as a plain dict."""
        return asdict(self)

    def __add__(self, other: CacheStats) -> CacheStats:
        return CacheStats(**{k: v + getattr(other, k) for k, v in asdict(self).items()})


class CachePolicy:
    """Base of every byte-capacity policy: owns residency, byte accounting, groups and stats."""

    name: ClassVar[str] = ""
    needs_future: ClassVar[bool] = False  # True: prepare_replay must see the exact future access stream
    takes_n_layers: ClassVar[bool] = False  # True: the constructor takes n_layers (make_policy passes it)

    def __init__(self, capacity_bytes: int):
        capacity_bytes = int(capacity_bytes)
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        self._capacity = capacity_bytes
        self._size: dict[int, int] = {}  # resident key -> bytes
        self._used = 0
        self._group: frozenset[int] = frozenset()  # keys that cannot be evicted now
        self._group_bytes = 0  # bytes of resident keys in `_group`
        self._stats = CacheStats()
        self._tick = 0  # counts access and admit calls; a logical clock for recency
        self.layer: int | None = None  # context of the current group
        self.seq: int | None = None
        self.step: int | None = None

    # ---- read-only views -------------------------------------------------------------
    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    @property
    def used_bytes(self) -> int:
        return self._used

    @property
    def stats(self) -> CacheStats:
        return self._stats

    def contains(self, key: int) -> bool:
        """Whether `key` is resident (no side effects)."""
        return key in self._size

    def resident_keys(self) -> list[int]:
        """Resident keys, sorted."""
        return sorted(self._size)

    def size_of(self, key: int) -> int:
        """Bytes of a resident key (KeyError if absent)."""
        return self._size[key]

    # ---- driver calls ----------------------------------------------------------------
    def begin_group(self, layer: int, seq: int, step: int, keys: Iterable[int]) -> None:
        """Start a (token step, layer) group: `keys` cannot be evicted until the next group."""
        self.layer, self.seq, self.step = layer, seq, step
        self._group = frozenset(keys)
        self._group_bytes = sum(self._size[k] for k in self._group if k in self._size)
        self._on_group(layer, seq, step, self._group)

    def end_group(self) -> None:
        """Lift the current group's protection (the next `begin_group` does it too)."""
        self._group = frozenset()
        self._group_bytes = 0

    def access(self, key: int, size_bytes: int, *, high_precision: bool = True) -> bool:
        """Serve one expert access: True on a hit; on a miss evict until it fits and insert it."""
        self._before_access(key, high_precision)
        st = self._stats
        st.accesses += 1
        self._tick += 1
        if key in self._size:
            st.hits += 1
            self._on_hit(key, high_precision)
            return True
        st.misses += 1
        if self._make_room(key, size_bytes, prefetch=False):
            self._place(key, size_bytes, high_precision, prefetch=False)
        else:
            st.bypasses += 1
        return False

    def admit(self, key: int, size_bytes: int) -> bool:
        """Prefetch `key` (not an access); no-op if resident. Returns whether it is resident after."""
        if key in self._size:
            return True
        self._tick += 1
        if not self._make_room(key, size_bytes, prefetch=True):
            return False
        self._stats.admits += 1
        self._place(key, size_bytes, False, prefetch=True)
        return True

    def remove(self, key: int) -> bool:
        """Drop `key` if resident (e.g. a low-precision copy superseded); returns whether it was."""
        if key not in self._size:
            return False
        self._remove(key)
        size = self._size.pop(key)
        self._used -= size
        if key in self._group:
            self._group_bytes -= size
        self._stats.removals += 1
        return True

    # ---- the template ----------------------------------------------------------------
    def _make_room(self, key: int, size_bytes: int, *, prefetch: bool) -> bool:
        if size_bytes < 0:
            raise ValueError(f"size_bytes must be >= 0, got {size_bytes}")
        if size_bytes > self._capacity - self._group_bytes:
            return False  # cannot fit even after evicting everything evictable
        need_evict = self._used + size_bytes > self._capacity
        if not self._should_admit(key, size_bytes, need_evict, prefetch):
            return False
        while self._used + size_bytes > self._capacity:
            victim = self._victim()
            if victim is None or victim not in self._size or victim in self._group:
                raise RuntimeError(f"{self.name}: victim hook returned {victim!r} with evictable bytes left")
            self._evict(victim)
            size = self._size.pop(victim)
            self._used -= size
            self._stats.evictions += 1
            self._stats.evicted_bytes += size
        return True

    def _place(self, key: int, size_bytes: int, high_precision: bool, *, prefetch: bool) -> None:
        self._size[key] = size_bytes
        self._used += size_bytes
        self._stats.inserted_bytes += size_bytes
        if key in self._group:
            self._group_bytes += size_bytes
        self._insert(key, high_precision, prefetch)

    def prepare_replay(self, keys, sizes, group_starts, calibration=None) -> None:
        """Hook called by a driver once before replaying: the access stream and the calibration window.

        `keys`/`sizes` are the accesses in order (no admits), `group_starts` the index where each
        group begins, `calibration` (keys, sizes) of the calibration window or None. Default:
        nothing (online policies need neither).
        """

    # ---- hooks (policies override) ---------------------------------------------------
    def _before_access(self, key: int, high_precision: bool) -> None:
        pass

    def _on_group(self, layer: int, seq: int, step: int, keys: frozenset[int]) -> None:
        pass

    def _should_admit(self, key: int, size_bytes: int, need_evict: bool, prefetch: bool) -> bool:
        return True

    def _on_hit(self, key: int, high_precision: bool) -> None:
        raise NotImplementedError

    def _insert(self, key: int, high_precision: bool, prefetch: bool) -> None:
        raise NotImplementedError

    def _victim(self) -> int | None:
        raise NotImplementedError

    def _evict(self, key: int) -> None:
        raise NotImplementedError

    def _remove(self, key: int) -> None:
        self._evict(key)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(capacity_bytes={self._capacity}, used_bytes={self._used})"


# ---- registry ------------------------------------------------------------------------
_REGISTRY: dict[str, type[CachePolicy]] = {}


def register_policy(name: str) -> Callable[[type[CachePolicy]], type[CachePolicy]]:
    """Class decorator: make a policy constructible by `make_policy(name, ...)`."""

    def deco(cls: type[CachePolicy]) -> type[CachePolicy]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"cache policy {name!r} registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def sizes_lookup(keys: Iterable[int], sizes: Mapping[int, int] | Iterable[int]) -> dict[int, int]:
    """Map key -> bytes from a mapping, or from a sequence aligned with `keys` (must agree)."""
    keys = list(keys)
    if isinstance(sizes, Mapping):
        return {k: int(sizes[k]) for k in keys}
    sizes = list(sizes)
    if len(sizes) != len(keys):
        raise ValueError(f"{len(sizes)} sizes for {len(keys)} keys")
    out: dict[int, int] = {}
    for k, s in zip(keys, sizes):
        if out.setdefault(k, int(s)) != int(s):
            raise ValueError(f"key {k} has two sizes: {out[k]} and {s}")
    return out
