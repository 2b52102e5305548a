"""Building a cache policy by name: the registry lookup and the global / per-layer partition.

Kept apart from `sim.cache.base` so that the base class does not import the partition (which is
itself a CachePolicy): base ← partition ← registry, one direction.
"""
from __future__ import annotations

from sim.cache.base import _REGISTRY, CachePolicy
from sim.cache.partition import PerLayerCache

PARTITIONS = ("global", "per-layer")


def policy_class(name: str) -> type[CachePolicy]:
    """The class registered under `name` (ValueError lists the known names)."""
    import sim.cache  # noqa: F401  (importing the package registers every policy)

    if name not in _REGISTRY:
        raise ValueError(f"unknown cache policy {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def make_policy(
    name: str,
    capacity_bytes: int,
    *,
    partition: str = "global",
    n_layers: int | None = None,
    **params,
) -> CachePolicy:
    """Build a policy by name; partition="per-layer" gives each of `n_layers` layers an equal share.

    `n_layers` is also passed to policies that take it (`takes_n_layers`: hobbit's layer distance).
    """
    cls = policy_class(name)
    if n_layers is not None and cls.takes_n_layers:
        params.setdefault("n_layers", n_layers)
    if partition == "global":
        return cls(capacity_bytes, **params)
    if partition == "per-layer":
        if n_layers is None or n_layers < 1:
            raise ValueError("partition='per-layer' needs n_layers >= 1")
        return PerLayerCache(lambda cap: cls(cap, **params), capacity_bytes, n_layers)
    raise ValueError(f"unknown partition {partition!r}; known: {', '.join(PARTITIONS)}")
