"""GGUF tensor formats as byte arithmetic: the one place the simulator and jaxmoe read block sizes.

Sizes are ggml's (gguf-py `GGML_QUANT_SIZES`): a K-quant super-block holds 256 weights.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Format:
    """A GGUF storage format: `block_bytes` bytes hold `block_weights` weights."""

    name: str  # lower-case, as used on the CLI and in JSON: "q4_k"
    block_weights: int
    block_bytes: int

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.block_bytes / self.block_weights

    def nbytes(self, n_weights: int) -> int:
        """Bytes for `n_weights` weights (must be a whole number of blocks)."""
        if n_weights % self.block_weights:
            raise ValueError(f"{n_weights} weights is not a multiple of {self.name}'s block of {self.block_weights}")
        return n_weights // self.block_weights * self.block_bytes


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("q2_k", 256, 84),
        Format("q3_k", 256, 110),
        Format("q4_k", 256, 144),
        Format("q5_k", 256, 176),
        Format("q6_k", 256, 210),
        Format("q8_0", 32, 34),
        Format("f16", 1, 2),
        Format("bf16", 1, 2),
        Format("f32", 1, 4),
    )
}

# Rank by precision: a policy asking for "lower precision" moves down this order.
PRECISION_ORDER = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q8_0", "f16", "bf16", "f32")


def get_format(name: str) -> Format:
    """Look up a format by (case-insensitive) name; ValueError names the known ones."""
    key = name.lower()
    if key not in FORMATS:
        raise ValueError(f"unknown format {name!r}; known: {', '.join(FORMATS)}")
    return FORMATS[key]
