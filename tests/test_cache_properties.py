"""Property tests: every cache policy against a brute-force reference model written here.

A workload is a random sequence of driver calls (begin_group / access / admit / remove) over a
small pool of (layer, expert, format) keys with fixed byte sizes. Each policy and its reference
model (plain dicts and lists, victims found by scanning every entry for the minimum of an explicit
score) replay it side by side; after every call the return value, the resident set, the bytes
used and the counters must agree, and the invariants must hold: bytes never exceed the capacity,
hits + misses = accesses, the policy's own queues hold each resident key exactly once, and a key of
the current group that is resident stays resident until the group ends (unless removed).
Then: SLRU with protected_share=0 is LRU; Belady is optimal on equal sizes (>= every policy, and
== an exhaustive search on tiny traces); LRU hits never fall as capacity grows; same input → same
result.
"""
from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sim.cache import POLICY_NAMES, make_key, make_policy
from sim.cache.base import key_expert_id, key_layer
from sim.precision import SLOTS

# How many examples each property runs is the hypothesis profile's (tests/conftest.py: `ci` 2,000, `dev` 100).
EXAMPLES = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---- workloads -------------------------------------------------------------------------
@dataclass
class Workload:
    keys: list[int]
    sizes: dict[int, int]
    capacity: int
    ops: list[tuple]

    @property
    def access_keys(self) -> list[int]:
        return [op[1] for op in self.ops if op[0] == "access"]

    @property
    def group_starts(self) -> list[int]:
        """Index into access_keys where each group begins."""
        starts, n = [], 0
        for op in self.ops:
            if op[0] == "group":
                starts.append(n)
            elif op[0] == "access":
                n += 1
        return starts


@st.composite
def workloads(draw, *, equal_sizes=False, one_fmt=False, admits=True, removes=True, max_groups=12,
              max_pool=8, max_capacity=10, distinct_members=False):
    """Random driver-call sequences: groups of up to 3 accesses, with admits and removes in between."""
    triples = draw(st.lists(
        # format ids: every format slot of the engine (sim.precision.SLOTS: native, q2_k, q3_k, q2_k_gu, q3_k_gu)
        st.tuples(st.integers(0, 2), st.integers(0, 3), st.integers(0, 0 if one_fmt else len(SLOTS) - 1)),
        min_size=1, max_size=max_pool, unique=True))
    keys = [make_key(*t) for t in triples]
    sizes = {k: 1 if equal_sizes else draw(st.integers(1, 4)) for k in keys}
    capacity = draw(st.integers(0, max_capacity))
    ops, seq = [], 0
    key = st.sampled_from(keys)
    for g in range(draw(st.integers(1, max_groups))):
        seq += draw(st.integers(0, 3)) == 0
        members = draw(st.lists(key, max_size=3, unique=distinct_members))
        layer = key_layer(members[0]) if members else draw(st.integers(0, 2))
        ops.append(("group", layer, seq, g, tuple(members)))
        for k in members:
            if admits and draw(st.integers(0, 4)) == 0:
                ops.append(("admit", draw(key)))
            if removes and draw(st.integers(0, 7)) == 0:
                ops.append(("remove", draw(key)))
            ops.append(("access", k, draw(st.booleans())))
    return Workload(keys, sizes, capacity, ops)


# ---- reference models ------------------------------------------------------------------
class Ref:
    """Shared brute-force bookkeeping; subclasses define the policy by a few plain functions."""

    def __init__(self, cap):
        self.cap, self.res, self.group, self.stats = cap, {}, set(), Counter()
        self.layer = self.seq = None
        self.clock = 0  # incremented at each touch: orders recency
        self.tick = 0  # access calls + admits of absent keys (HOBBIT's recency unit)

    def now(self):
        self.clock += 1
        return self.clock

    def used(self):
        return sum(self.res.values())

    def evictable(self):
        return [k for k in self.res if k not in self.group]

    def begin_group(self, layer, seq, step, keys):
        self.layer, self.seq, self.group = layer, seq, set(keys)
        self.on_group()

    def on_group(self):
        pass

    def admit_ok(self, key, size, need_evict, prefetch):
        return True

    def pre(self, key, hp):
        pass

    def make_room(self, key, size, prefetch):
        group_bytes = sum(s for k, s in self.res.items() if k in self.group)
        if size > self.cap - group_bytes:
            return False
        if not self.admit_ok(key, size, self.used() + size > self.cap, prefetch):
            return False
        while self.used() + size > self.cap:
            v = self.victim()
            self.drop(v, evicted=True)
            self.stats["evictions"] += 1
            self.stats["evicted_bytes"] += self.res.pop(v)
        return True

    def access(self, key, size, hp):
        self.pre(key, hp)
        self.stats["accesses"] += 1
        self.tick += 1
        if key in self.res:
            self.stats["hits"] += 1
            self.hit(key, hp)
            return True
        self.stats["misses"] += 1
        if self.make_room(key, size, False):
            self.res[key] = size
            self.stats["inserted_bytes"] += size
            self.insert(key, hp, False)
        else:
            self.stats["bypasses"] += 1
        return False

    def admit(self, key, size):
        if key in self.res:
            return True
        self.tick += 1
        if not self.make_room(key, size, True):
            return False
        self.res[key] = size
        self.stats["inserted_bytes"] += size
        self.stats["admits"] += 1
        self.insert(key, False, True)
        return True

    def remove(self, key):
        if key not in self.res:
            return False
        self.drop(key, evicted=False)
        del self.res[key]
        self.stats["removals"] += 1
        return True


class RefLRU(Ref):
    def __init__(self, cap):
        super().__init__(cap)
        self.ts = {}

    def hit(self, k, hp):
        self.ts[k] = self.now()

    insert = lambda self, k, hp, pf: self.hit(k, hp)

    def victim(self):
        return min(self.evictable(), key=self.ts.__getitem__)

    def drop(self, k, evicted):
        del self.ts[k]


class RefSLRU(Ref):
    def __init__(self, cap, protected_share=0.8):
        super().__init__(cap)
        self.pcap = int(protected_share * cap)
        self.seg, self.ts = {}, {}

    def hit(self, k, hp):
        self.seg[k], self.ts[k] = "prot", self.now()
        while sum(self.res[x] for x in self.seg if self.seg[x] == "prot") > self.pcap:
            v = min((x for x in self.seg if self.seg[x] == "prot"), key=self.ts.__getitem__)
            self.seg[v], self.ts[v] = "prob", self.now()

    def insert(self, k, hp, pf):
        self.seg[k], self.ts[k] = "prob", self.now()

    def victim(self):
        for segment in ("prob", "prot"):
            cands = [k for k in self.evictable() if self.seg[k] == segment]
            if cands:
                return min(cands, key=self.ts.__getitem__)

    def drop(self, k, evicted):
        del self.seg[k], self.ts[k]


class RefLFU(Ref):
    def __init__(self, cap):
        super().__init__(cap)
        self.L, self.count, self.prio, self.ts = 0, {}, {}, {}

    def hit(self, k, hp):
        self.count[k] += 1
        self.prio[k], self.ts[k] = self.count[k] + self.L, self.now()

    def insert(self, k, hp, pf):
        self.count[k] = 0 if pf else 1
        self.prio[k], self.ts[k] = self.count[k] + self.L, self.now()

    def victim(self):
        return min(self.evictable(), key=lambda k: (self.prio[k], self.ts[k], k))

    def drop(self, k, evicted):
        if evicted:
            self.L = self.prio[k]
        del self.count[k], self.prio[k], self.ts[k]


class RefS3FIFO(Ref):
    def __init__(self, cap, small_share=0.1, ghost_share=0.9, move_to_main_threshold=1):
        super().__init__(cap)
        self.small_target, self.ghost_cap, self.thr = small_share * cap, ghost_share * cap, move_to_main_threshold
        self.small, self.main, self.ghost, self.freq = [], [], [], {}

    def hit(self, k, hp):
        self.freq[k] = min(self.freq[k] + 1, 3)

    def insert(self, k, hp, pf):
        self.freq[k] = 0
        ghost_keys = [g for g, _ in self.ghost]
        if k in ghost_keys:
            del self.ghost[ghost_keys.index(k)]
            self.main.append(k)
        else:
            self.small.append(k)

    def victim(self):
        while True:
            s = [k for k in self.small if k not in self.group]
            m = [k for k in self.main if k not in self.group]
            if not s and not m:
                return None
            if s and (sum(self.res[k] for k in self.small) >= self.small_target or not m):
                t = s[0]
                if self.freq[t] >= self.thr:
                    self.small.remove(t)
                    self.main.append(t)
                    self.freq[t] = 0
                    continue
                return t
            t = m[0]
            if self.freq[t] > 0:
                self.freq[t] -= 1
                self.main.remove(t)
                self.main.append(t)
                continue
            return t

    def drop(self, k, evicted):
        del self.freq[k]
        if k in self.small:
            self.small.remove(k)
            if evicted:
                self.ghost.append((k, self.res[k]))
                while sum(s for _, s in self.ghost) > self.ghost_cap:
                    self.ghost.pop(0)
        else:
            self.main.remove(k)


class RefStatic(Ref):
    def fit(self, keys, sizes):
        counts, left, self.pinned = Counter(keys), self.cap, set()
        for k in sorted(counts, key=lambda k: (-counts[k], k)):
            if sizes[k] <= left:
                self.pinned.add(k)
                left -= sizes[k]

    def admit_ok(self, key, size, need_evict, prefetch):
        return key in self.pinned and not need_evict

    def hit(self, k, hp):
        pass

    def insert(self, k, hp, pf):
        pass

    def drop(self, k, evicted):
        assert not evicted


class RefHobbit(Ref):
    def __init__(self, cap, w_recency=1.0, w_frequency=1.0, w_high_precision=0.5, w_layer_distance=1.0,
                 n_layers=None):
        super().__init__(cap)
        self.w = (w_recency, w_frequency, w_high_precision, w_layer_distance)
        self.n_layers, self.max_layer, self.cur_seq = n_layers, -1, None
        self.uses, self.hp_uses, self.last = Counter(), Counter(), {}

    def on_group(self):
        if self.seq != self.cur_seq:
            self.cur_seq = self.seq
            self.uses.clear()
            self.hp_uses.clear()

    def pre(self, k, hp):
        self.max_layer = max(self.max_layer, key_layer(k))
        self.uses[key_expert_id(k)] += 1
        self.hp_uses[key_expert_id(k)] += bool(hp)

    def hit(self, k, hp):
        self.last[k] = self.tick

    def insert(self, k, hp, pf):
        self.max_layer = max(self.max_layer, key_layer(k))
        self.last[k] = self.tick

    def victim(self):
        cands = self.evictable()
        wr, wf, wh, wd = self.w
        lo, hi = min(self.last[k] for k in cands), max(self.last[k] for k in cands)
        fmax = max(self.uses[key_expert_id(k)] for k in cands)
        hmax = max(self.hp_uses[key_expert_id(k)] for k in cands)
        n = self.n_layers or self.max_layer + 1
        cur = self.layer if self.layer is not None else 0

        def score(k):
            r = (self.last[k] - lo) / (hi - lo) if hi > lo else 1.0
            f = self.uses[key_expert_id(k)] / fmax if fmax > 0 else 0.0
            h = self.hp_uses[key_expert_id(k)] / hmax if hmax > 0 else 0.0
            d = 1.0 - ((key_layer(k) - cur) % n) / n
            return (wr * r + wf * f + wh * h + wd * d, self.last[k], k)

        return min(cands, key=score)

    def drop(self, k, evicted):
        del self.last[k]


class RefBelady(Ref):
    def prepare(self, future, sizes, starts):
        self.future, self.fsizes, self.pos, self.pending = [key_expert_id(k) for k in future], sizes, -1, set()
        self.grp = [sum(s <= j for s in starts) for j in range(len(future))]

    def first_after(self, eid, pos):
        return next((j for j in range(pos + 1, len(self.future)) if self.future[j] == eid), len(self.future))

    def uses_after(self, eid, pos):
        """Groups of every later use of `eid`, then 'never': compared lexicographically (sooner = better)."""
        return [self.grp[j] for j in range(pos + 1, len(self.future)) if self.future[j] == eid] + [float("inf")]

    def rank(self, k, size):
        return (self.uses_after(key_expert_id(k), self.pos), size, k)

    def on_group(self):
        self.pending = set(self.group)

    def pre(self, k, hp):
        self.pos += 1
        self.pending.discard(k)

    def victim(self):
        return max(self.evictable(), key=lambda k: self.rank(k, self.res[k]))

    def admit_ok(self, key, size, need_evict, prefetch):
        mine = self.rank(key, size)
        if len(mine[0]) == 1:  # never used again
            return False
        need = self.used() + size - self.cap
        for m in self.pending - {key} - set(self.res):
            q = self.first_after(key_expert_id(m), self.pos)
            if q < len(self.future):
                theirs = (self.uses_after(key_expert_id(m), q), self.fsizes[q], m)
                need += self.fsizes[q] if theirs < mine else 0
        for v in sorted(self.evictable(), key=lambda k: self.rank(k, self.res[k]), reverse=True):
            if need <= 0 or self.rank(v, self.res[v]) < mine:
                break
            need -= self.res[v]
        return need <= 0

    def hit(self, k, hp):
        pass

    def insert(self, k, hp, pf):
        pass

    def drop(self, k, evicted):
        pass


REFS = {"lru": RefLRU, "slru": RefSLRU, "lfu": RefLFU, "s3fifo": RefS3FIFO, "static": RefStatic,
        "hobbit": RefHobbit, "belady": RefBelady}
CASES = [  # (policy, params)
    ("lru", {}), ("slru", {}), ("slru", {"protected_share": 0.5}), ("slru", {"protected_share": 1.0}),
    ("lfu", {}), ("s3fifo", {}), ("s3fifo", {"small_share": 0.3, "move_to_main_threshold": 2}),
    ("static", {}), ("hobbit", {}), ("hobbit", {"w_recency": 0.3, "w_high_precision": 2.0, "n_layers": 3}),
    ("belady", {}),
]
assert {c for c, _ in CASES} == set(POLICY_NAMES) == set(REFS)


# ---- driving and invariants ------------------------------------------------------------
def build(name, cap, w: Workload, **params):
    cache = make_policy(name, cap, **params)
    if name == "belady":
        cache.prepare(w.access_keys, [w.sizes[k] for k in w.access_keys], w.group_starts)
    if name == "static":
        calib = w.access_keys[: max(1, len(w.access_keys) // 2)]
        cache.fit(calib, w.sizes)
    return cache


def structure_ok(cache):
    """Each resident key lives in exactly one of the policy's own queues."""
    res = set(cache.resident_keys())
    assert len(res) == len(cache.resident_keys())
    name = cache.name
    if name == "lru":
        assert set(cache._order) == res and len(cache._order) == len(res)
    elif name == "slru":
        assert not set(cache._probation) & set(cache._protected)
        assert set(cache._probation) | set(cache._protected) == res
        assert cache.protected_bytes == sum(cache.size_of(k) for k in cache._protected) <= cache.protected_cap_bytes
    elif name == "s3fifo":
        assert not set(cache._small) & set(cache._main)
        assert set(cache._small) | set(cache._main) == res and not set(cache._ghost) & res
        assert cache._ghost_bytes == sum(cache._ghost.values()) <= cache.ghost_cap_bytes
    elif name == "static":
        assert res <= cache.pinned


def drive(cache, w: Workload, ref=None):
    """Replay `w` on `cache` (and `ref`), checking invariants after every call; returns the hit list."""
    results, held, members = [], set(), frozenset()
    for op in w.ops:
        kind = op[0]
        if kind == "group":
            _, layer, seq, step, members = op
            cache.begin_group(layer, seq, step, members)
            ref and ref.begin_group(layer, seq, step, members)
            held = {k for k in members if cache.contains(k)}  # must stay until the next group
            continue
        k = op[1]
        if kind == "access":
            got = cache.access(k, w.sizes[k], high_precision=op[2])
            want = ref.access(k, w.sizes[k], op[2]) if ref else got
            results.append(got)
            if k in members and cache.contains(k):
                held.add(k)
        elif kind == "admit":
            got = cache.admit(k, w.sizes[k])
            want = ref.admit(k, w.sizes[k]) if ref else got
        else:
            got = cache.remove(k)
            want = ref.remove(k) if ref else got
            held.discard(k)
        assert got == want, (op, got, want)
        s = cache.stats
        assert cache.used_bytes == sum(cache.size_of(x) for x in cache.resident_keys()) <= cache.capacity_bytes
        assert s.hits + s.misses == s.accesses and s.bypasses <= s.misses
        assert all(cache.contains(x) for x in held), "a protected group member was evicted"
        structure_ok(cache)
        if ref:
            assert set(cache.resident_keys()) == set(ref.res), op
            assert cache.used_bytes == ref.used()
            for field in ("accesses", "hits", "misses", "bypasses", "evictions", "inserted_bytes",
                          "evicted_bytes", "admits", "removals"):
                assert getattr(s, field) == ref.stats[field], field
    return results


def run_policy(name, w, cap=None, **params):
    cache = build(name, w.capacity if cap is None else cap, w, **params)
    return drive(cache, w), cache


# ---- properties ------------------------------------------------------------------------
@EXAMPLES
@given(w=workloads(), case=st.sampled_from(CASES))
def test_policy_matches_brute_force_reference(w, case):
    name, params = case
    cache = build(name, w.capacity, w, **params)
    ref = REFS[name](w.capacity, **params)
    if name == "belady":
        ref.prepare(w.access_keys, [w.sizes[k] for k in w.access_keys], w.group_starts)
    if name == "static":
        ref.fit(w.access_keys[: max(1, len(w.access_keys) // 2)], w.sizes)
    drive(cache, w, ref)


@EXAMPLES
@given(w=workloads())
def test_slru_with_no_protected_share_is_lru(w):
    slru_hits, slru = run_policy("slru", w, protected_share=0.0)
    lru_hits, lru = run_policy("lru", w)
    assert slru_hits == lru_hits
    assert slru.resident_keys() == lru.resident_keys() and slru.stats == lru.stats


@functools.cache
def _optimum(future: tuple, groups: tuple, cap: int, pos: int, cache: frozenset) -> int:
    """Most hits achievable from `pos` on (equal sizes): try every bypass/eviction choice."""
    if pos == len(future):
        return 0
    k, group = future[pos], groups[pos]
    if k in cache:
        return 1 + _optimum(future, groups, cap, pos + 1, cache)
    best = _optimum(future, groups, cap, pos + 1, cache)  # bypass
    if len(cache) < cap:
        best = max(best, _optimum(future, groups, cap, pos + 1, cache | {k}))
    elif cap > 0:
        for v in cache - group:
            best = max(best, _optimum(future, groups, cap, pos + 1, (cache - {v}) | {k}))
    return best


@EXAMPLES
@given(w=workloads(equal_sizes=True, one_fmt=True, admits=False, removes=False, max_groups=10, max_pool=6,
                   max_capacity=5, distinct_members=True))
def test_belady_equals_exhaustive_optimum_on_equal_sizes(w):
    hits, _ = run_policy("belady", w)
    future, groups, group = [], [], frozenset()
    for op in w.ops:
        if op[0] == "group":
            group = frozenset(op[4])
        else:
            future.append(op[1])
            groups.append(group)
    assert sum(hits) == _optimum(tuple(future), tuple(groups), w.capacity, 0, frozenset())


@EXAMPLES
@given(w=workloads(equal_sizes=True, one_fmt=True, admits=False, removes=False, max_groups=16,
                   distinct_members=True))
def test_belady_beats_every_policy_on_equal_sizes(w):
    best, _ = run_policy("belady", w)
    for name, params in CASES:
        hits, _ = run_policy(name, w, **params)
        assert sum(best) >= sum(hits), name
    for cap in range(w.capacity + 3):  # and LRU at every capacity
        assert sum(run_policy("belady", w, cap)[0]) >= sum(run_policy("lru", w, cap)[0])


@EXAMPLES
@given(w=workloads(equal_sizes=True, admits=False, removes=False, max_groups=16))
def test_lru_hits_never_fall_as_capacity_grows(w):
    hits = [sum(run_policy("lru", w, cap)[0]) for cap in range(12)]
    assert hits == sorted(hits)


@EXAMPLES
@given(w=workloads(), case=st.sampled_from(CASES))
def test_same_input_same_result(w, case):
    name, params = case
    a, ca = run_policy(name, w, **params)
    b, cb = run_policy(name, w, **params)
    assert a == b and ca.resident_keys() == cb.resident_keys() and ca.stats == cb.stats


@EXAMPLES
@given(w=workloads(admits=False))
def test_per_layer_lru_is_one_lru_per_layer(w):
    """Per-layer partition == an independent LRU of capacity//3 bytes replaying each layer's calls."""
    per_layer = make_policy("lru", w.capacity, partition="per-layer", n_layers=3)
    singles = [make_policy("lru", w.capacity // 3) for _ in range(3)]
    layer = None
    for op in w.ops:
        if op[0] == "group":
            layer = op[1]
            members = [k for k in op[4] if key_layer(k) == layer]
            per_layer.begin_group(layer, op[2], op[3], members)
            singles[layer].begin_group(layer, op[2], op[3], members)
        elif op[0] == "access":
            k = op[1]
            if key_layer(k) != layer:  # accesses stay in the group's layer, as in a real trace
                continue
            assert per_layer.access(k, w.sizes[k]) == singles[key_layer(k)].access(k, w.sizes[k])
        else:
            assert per_layer.remove(op[1]) == singles[key_layer(op[1])].remove(op[1])
    assert per_layer.resident_keys() == sorted(k for s in singles for k in s.resident_keys())
    assert per_layer.stats == sum((s.stats for s in singles[1:]), singles[0].stats)
