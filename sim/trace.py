"""The routing trace: one npz schema for every source (recorded, imported, synthesized).

A trace is a grid of access groups, one per (token step, MoE layer). Each group holds the top-k
expert ids in rank order (highest gate weight first) and their gate weights renormalised over
the k used. A group the engine did not run (llama.cpp skips the last layer for prefill tokens
whose logits are not needed) is marked absent: all ids -1, all weights 0.
The full schema, with every key and its validation rule, is in docs/trace-format.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

PREFILL, DECODE = 0, 1
PHASE_NAMES = {PREFILL: "prefill", DECODE: "decode"}
ABSENT = -1  # expert id of an absent group (and of an unknown prediction)


@dataclass(frozen=True, eq=False)
class TraceMeta:
    """What produced the trace and the geometry of the model it routes."""

    model: str
    n_layers: int
    n_experts: int
    top_k: int
    provenance: str = ""
    expert_weights: int | None = None  # weights in one expert (gate + up + down); sizes other formats
    # Per MoE layer, when the source knows them; None means "take them from the model profile".
    expert_bytes: tuple[int, ...] | None = None
    expert_format: tuple[str, ...] | None = None  # native GGUF format of each layer's experts, e.g. "q4_k_m"
    dense_bytes: tuple[int, ...] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # anything else the source recorded


@dataclass(frozen=True, eq=False)
class Trace:
    """Routing of `n_steps` token steps through `n_layers` MoE layers (arrays are read-only views)."""

    experts: np.ndarray  # int16 [steps, layers, k]   expert ids in rank order; ABSENT for absent groups
    weights: np.ndarray  # float32 [steps, layers, k] gate weights, each present group sums to 1
    phase: np.ndarray  # uint8 [steps]               PREFILL or DECODE
    seq: np.ndarray  # int32 [steps]                 sequence id; a sequence's steps are contiguous
    meta: TraceMeta
    # Optional: ids the router of layer l would pick from layer l-1's hidden state (prefetch hint);
    # row l=0 is ABSENT. Same shape as `experts`.
    predicted: np.ndarray | None = None

    @property
    def n_steps(self) -> int:
        return int(self.experts.shape[0])

    @property
    def present(self) -> np.ndarray:
        """bool [steps, layers]: the group was run."""
        return self.experts[:, :, 0] != ABSENT

    @property
    def n_accesses(self) -> int:
        """Number of (step, layer, expert) selections in present groups."""
        return int(self.present.sum()) * self.meta.top_k

    def select(self, steps: np.ndarray | slice) -> "Trace":
        """A trace of a subset of steps (e.g. one phase, or a calibration window)."""
        return Trace(
            experts=self.experts[steps],
            weights=self.weights[steps],
            phase=self.phase[steps],
            seq=self.seq[steps],
            meta=self.meta,
            predicted=None if self.predicted is None else self.predicted[steps],
        )
