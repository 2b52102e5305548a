"""Byte-capacity expert-cache policies behind one interface (see sim/cache/base.py).

Policies are registered by name; which ones run is data: `make_policy(name, capacity_bytes, ...)`
for name in POLICY_NAMES (sim/cache/registry.py). `sim.cache.fast.replay_hits` replays a key stream with
numba (lru, slru); `replay_hits_python` is the reference that drives the policy objects.
"""
from sim.cache import belady, hobbit, lfu, lru, s3fifo, slru, static  # noqa: F401  (registers them)
from sim.cache.base import (
    _REGISTRY,
    CachePolicy,
    CacheStats,
    key_expert,
    key_expert_id,
    key_fmt,
    key_layer,
    make_key,
    register_policy,
)
from sim.cache.registry import make_policy, policy_class

POLICY_NAMES: tuple[str, ...] = tuple(sorted(_REGISTRY))

__all__ = [
    "POLICY_NAMES",
    "CachePolicy",
    "CacheStats",
    "key_expert",
    "key_expert_id",
    "key_fmt",
    "key_layer",
    "make_key",
    "make_policy",
    "policy_class",
    "register_policy",
]
