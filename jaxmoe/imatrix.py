"""Importance matrices (llama.cpp's imatrix) from calibration activations, for weighted quantization.

llama.cpp's `llama-imatrix` hooks every matrix multiplication y = W x of the model. For each weight
tensor it sums x_j² per input column j over the calibration tokens and counts the rows it summed.
For a merged expert tensor (`*_exps`, a MUL_MAT_ID) it keeps one sum and one count per expert, and a
token adds its input only to the experts it was routed to, once per routing slot. The input of
`ffn_gate_exps` and `ffn_up_exps` is the token's normed hidden state, the same vector for each of its
top-k experts. The input of `ffn_down_exps` is each expert's own hidden activation act(gate)·up.

`llama-quantize` then divides each sum by its count, so the weights are the mean of x_j², and it
gives an expert with count 0 the weight 1 for every column. It passes that row (one per expert) to
ggml's `quantize_q*_K(..., quant_weights)`; `jaxmoe.quants` takes the same vector as `quant_weights`.

Here the sums are accumulated in float64 and the division is done in float32, on the float32-rounded
sum, as llama-quantize does after reading an imatrix file. llama.cpp accumulates in float32, so its
sums can differ from ours in the last bits on long calibration runs.
Source read: tools/imatrix/imatrix.cpp (collect_imatrix) and tools/quantize/quantize.cpp
(load_imatrix) of ggml-org/llama.cpp, 2026.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Imatrix:
    """Per-column Σx² and row counts of one weight tensor: in_sum2 (E, K) float64, counts (E,) int64.

    `n_experts` is None for a dense tensor (E = 1), else E. Two Imatrix of the same tensor add (`+`)."""

    in_sum2: np.ndarray
    counts: np.ndarray
    n_experts: int | None = None

    def __add__(self, other: Imatrix) -> Imatrix:
        if self.in_sum2.shape != other.in_sum2.shape or self.n_experts != other.n_experts:
            raise ValueError(f"cannot add imatrices of shapes {self.in_sum2.shape} and {other.in_sum2.shape}")
        return Imatrix(self.in_sum2 + other.in_sum2, self.counts + other.counts, self.n_experts)

    def quant_weights(self) -> np.ndarray:
        """llama-quantize's importance: float32 Σx²/count per column; (K,) dense, (E, K) per expert.

        A row with count 0 (an expert no calibration token reached) gets weight 1 in every column."""
        sums = self.in_sum2.astype(np.float32)
        counts = self.counts.astype(np.float32)[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            w = np.where(counts > 0, sums / counts, np.float32(1)).astype(np.float32)
        return w[0] if self.n_experts is None else w


def accumulate(x: np.ndarray, experts: np.ndarray | None = None, n_experts: int | None = None) -> Imatrix:
    """Imatrix of one weight tensor from the inputs `x` it multiplies (last axis = its input columns K).

    Dense tensor: experts=None; x (..., K), every row counts once.
    Expert tensor: experts (..., k) int routing ids in [0, n_experts) of each token's k slots, and either
      x (..., K): one input per token, added to each of its k experts (ffn_gate_exps, ffn_up_exps), or
      x (..., k, K): one input per token and slot (ffn_down_exps: the expert's hidden activation).
    ValueError on non-finite x (llama-imatrix stops on them too), bad ids or mismatched shapes."""
    x = np.asarray(x)
    if x.ndim < 1 or x.shape[-1] == 0:
        raise ValueError(f"imatrix: activations need a last axis of input columns, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("imatrix: activations hold non-finite values (NaN or Inf)")
    k_cols = x.shape[-1]
    if experts is None:
        rows = x.reshape(-1, k_cols).astype(np.float64)
        return Imatrix(np.einsum("ij,ij->j", rows, rows)[None, :], np.array([rows.shape[0]], np.int64))
    ids = np.asarray(experts)
    if not np.issubdtype(ids.dtype, np.integer) or ids.ndim < 1:
        raise ValueError(f"imatrix: experts must be integer ids of shape (..., k), got {ids.dtype} "
                         f"{ids.shape}")
    if n_experts is None or int(n_experts) < 1:
        raise ValueError("imatrix: n_experts (the tensor's expert count) is required with experts")
    n_experts = int(n_experts)
    if ids.size and (ids.min() < 0 or ids.max() >= n_experts):
        raise ValueError(f"imatrix: expert ids must lie in [0, {n_experts}), got [{ids.min()}, {ids.max()}]")
    if x.shape[:-1] == ids.shape:  # per token and slot
        rows = x.reshape(-1, k_cols)
        row_of_slot = np.arange(ids.size)
    elif x.shape[:-1] == ids.shape[:-1]:  # per token, shared by its slots
        rows = x.reshape(-1, k_cols)
        row_of_slot = np.repeat(np.arange(rows.shape[0]), ids.shape[-1])
    else:
        raise ValueError(f"imatrix: activations {x.shape} fit neither (..., K) nor (..., k, K) for experts "
                         f"{ids.shape}")
    flat = ids.reshape(-1)
    order = np.argsort(flat, kind="stable")
    bounds = np.searchsorted(flat[order], np.arange(n_experts + 1))
    in_sum2 = np.zeros((n_experts, k_cols), np.float64)
    for e in range(n_experts):
        sel = row_of_slot[order[bounds[e]:bounds[e + 1]]]
        if sel.size:
            xe = rows[sel].astype(np.float64)
            in_sum2[e] = np.einsum("ij,ij->j", xe, xe)
    return Imatrix(in_sum2, np.diff(bounds).astype(np.int64), n_experts)
