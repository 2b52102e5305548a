"""The routing trace: one npz schema for every source (recorded, imported, synthesized).

A trace is a grid of access groups, one per (token step, MoE layer). Each group holds the top-k
expert ids in rank order (highest gate weight first) and their gate weights renormalised over
the k used. A group the engine did not run (llama.cpp skips the last layer for prefill tokens
whose logits are not needed) is marked absent: all ids -1, all weights 0.
The full schema, with every key and its validation rule, is in docs/trace-format.md.

Files: `save_trace` / `load_trace` (npz without pickle, written atomically and byte-for-byte
deterministically), `validate` (vectorised numpy; every problem is one `InputError` line).
`python -m sim.trace TRACE.npz` validates a file and prints a one-line summary.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sim.io import InputError, atomic_path, exit_on_input_error

PREFILL, DECODE = 0, 1
PHASE_NAMES = {PREFILL: "prefill", DECODE: "decode"}
ABSENT = -1  # expert id of an absent group (and of an unknown prediction)
WEIGHT_SUM_TOL = 1e-3  # a present group's weights sum to 1 within this

# npz keys and their on-disk dtypes
ARRAY_DTYPES = {
    "experts": np.int16,
    "weights": np.float32,
    "phase": np.uint8,
    "seq": np.int32,
    "predicted": np.int16,
    "residency": np.int8,
}
REQUIRED_KEYS = ("experts", "weights", "phase", "seq", "meta")
OPTIONAL_KEYS = ("predicted", "residency")
RESIDENT, NOT_RESIDENT, UNKNOWN = 1, 0, -1  # values of the optional residency array
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed member timestamp: same trace → same bytes


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

    def to_json(self) -> str:
        """The meta as one JSON object (tuples become lists)."""
        d = dataclasses.asdict(self)
        for k in ("expert_bytes", "expert_format", "dense_bytes"):
            if d[k] is not None:
                d[k] = list(d[k])
        return json.dumps(d, sort_keys=False, allow_nan=False)

    @classmethod
    def from_dict(cls, d: Any, path: str | os.PathLike | None = None) -> TraceMeta:
        """Build and check a TraceMeta from a JSON-style dict; problems raise InputError(path, …)."""
        if not isinstance(d, dict):
            raise InputError(path, f"meta must be a JSON object, got {type(d).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in d if k not in known]
        if unknown:
            raise InputError(path, f"unknown meta field {unknown[0]!r} (known: {', '.join(known)}; "
                                   "put anything else under 'extra')")
        missing = [k for k in ("model", "n_layers", "n_experts", "top_k") if k not in d]
        if missing:
            raise InputError(path, f"meta lacks field(s) {', '.join(missing)}")
        kw = dict(d)
        for k in ("expert_bytes", "expert_format", "dense_bytes"):
            if isinstance(kw.get(k), list):
                kw[k] = tuple(kw[k])
        if kw.get("extra") is None:
            kw["extra"] = {}
        meta = cls(**kw)
        validate_meta(meta, path)
        return meta


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def validate_meta(meta: TraceMeta, path: str | os.PathLike | None = None) -> None:
    """Check the meta's types and ranges; problems raise InputError(path, …)."""
    if not isinstance(meta.model, str) or not meta.model:
        raise InputError(path, f"meta.model must be a non-empty string, got {meta.model!r}")
    for name in ("n_layers", "n_experts", "top_k"):
        v = getattr(meta, name)
        if not _is_int(v) or v < 1:
            raise InputError(path, f"meta.{name} must be a positive integer, got {v!r}")
    if meta.n_experts > np.iinfo(np.int16).max:
        raise InputError(path, f"meta.n_experts={meta.n_experts} exceeds the int16 id range")
    if meta.top_k > meta.n_experts:
        raise InputError(path, f"meta.top_k={meta.top_k} exceeds meta.n_experts={meta.n_experts}")
    if not isinstance(meta.provenance, str):
        raise InputError(path, f"meta.provenance must be a string, got {meta.provenance!r}")
    if meta.expert_weights is not None and (not _is_int(meta.expert_weights) or meta.expert_weights < 1):
        raise InputError(path, f"meta.expert_weights must be a positive integer or null, got {meta.expert_weights!r}")
    for name, ok, what in (
        ("expert_bytes", lambda v: _is_int(v) and v >= 0, "non-negative integers"),
        ("dense_bytes", lambda v: _is_int(v) and v >= 0, "non-negative integers"),
        ("expert_format", lambda v: isinstance(v, str) and v != "", "non-empty strings"),
    ):
        seq = getattr(meta, name)
        if seq is None:
            continue
        if not isinstance(seq, (tuple, list)) or len(seq) != meta.n_layers:
            n = len(seq) if isinstance(seq, (tuple, list)) else type(seq).__name__
            raise InputError(path, f"meta.{name} must list one value per layer ({meta.n_layers}), got {n}")
        bad = [v for v in seq if not ok(v)]
        if bad:
            raise InputError(path, f"meta.{name} must hold {what}, got {bad[0]!r}")
    if not isinstance(meta.extra, dict):
        raise InputError(path, f"meta.extra must be a JSON object, got {type(meta.extra).__name__}")
    try:
        json.dumps(meta.extra, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InputError(path, f"meta.extra is not JSON-serialisable: {exc}") from None


def _readonly(a: np.ndarray | None) -> np.ndarray | None:
    if a is not None:
        a.flags.writeable = False
    return a


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
    # Optional: what the recording engine's own cache held when it routed each selection (RESIDENT,
    # NOT_RESIDENT, or UNKNOWN, e.g. for absent groups). Same shape as `experts`. sim.residency
    # compares a replay against it.
    residency: np.ndarray | None = None

    @classmethod
    def from_arrays(
        cls,
        experts: Any,
        weights: Any,
        phase: Any,
        seq: Any,
        meta: TraceMeta,
        predicted: Any = None,
        residency: Any = None,
        *,
        path: str | os.PathLike | None = None,
        copy: bool = True,
    ) -> Trace:
        """Validate arrays of any integer/float dtype, then build a Trace of read-only schema-dtype copies."""
        raw = Trace(
            experts=np.asarray(experts),
            weights=np.asarray(weights, dtype=np.float32) if _is_numeric(weights) else np.asarray(weights),
            phase=np.asarray(phase),
            seq=np.asarray(seq),
            meta=meta,
            predicted=None if predicted is None else np.asarray(predicted),
            residency=None if residency is None else np.asarray(residency),
        )
        validate(raw, path)

        def conv(a: np.ndarray | None, key: str) -> np.ndarray | None:
            if a is None:
                return None
            dt = ARRAY_DTYPES[key]
            return _readonly(np.array(a, dtype=dt, copy=True) if copy else np.asarray(a, dtype=dt))

        return Trace(
            experts=conv(raw.experts, "experts"),
            weights=conv(raw.weights, "weights"),
            phase=conv(raw.phase, "phase"),
            seq=conv(raw.seq, "seq"),
            meta=meta,
            predicted=conv(raw.predicted, "predicted"),
            residency=conv(raw.residency, "residency"),
        )

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

    def select(self, steps: np.ndarray | slice) -> Trace:
        """A trace of a subset of steps (e.g. one phase, or a calibration window)."""
        return Trace(
            experts=_readonly(self.experts[steps]),
            weights=_readonly(self.weights[steps]),
            phase=_readonly(self.phase[steps]),
            seq=_readonly(self.seq[steps]),
            meta=self.meta,
            predicted=None if self.predicted is None else _readonly(self.predicted[steps]),
            residency=None if self.residency is None else _readonly(self.residency[steps]),
        )

    def only_phase(self, phase: int) -> Trace:
        """The steps of one phase (PREFILL or DECODE), in order."""
        if phase not in PHASE_NAMES:
            raise ValueError(f"phase must be {PREFILL} (prefill) or {DECODE} (decode), got {phase!r}")
        return self.select(np.flatnonzero(self.phase == phase))

    def decode_only(self) -> Trace:
        """The decode steps, in order."""
        return self.only_phase(DECODE)

    def prefill_only(self) -> Trace:
        """The prefill steps, in order."""
        return self.only_phase(PREFILL)


def _is_numeric(a: Any) -> bool:
    return np.asarray(a).dtype.kind in "biuf"


def _loc(mask: np.ndarray, names: Sequence[str]) -> str:
    """'step 3 layer 5 slot 2' for the first True of `mask`."""
    idx = np.unravel_index(int(np.flatnonzero(mask.ravel())[0]), mask.shape)
    return " ".join(f"{n} {int(i)}" for n, i in zip(names, idx))


_GROUP = ("step", "layer")
_SLOT = ("step", "layer", "slot")


def validate(trace: Trace, path: str | os.PathLike | None = None) -> None:
    """Check every schema rule (docs/trace-format.md); the first problem raises InputError(path, …)."""
    meta = trace.meta
    if not isinstance(meta, TraceMeta):
        raise InputError(path, f"meta must be a TraceMeta, got {type(meta).__name__}")
    validate_meta(meta, path)
    ex, w, ph, sq, pr = trace.experts, trace.weights, trace.phase, trace.seq, trace.predicted
    for key, a, kinds in (("experts", ex, "iu"), ("weights", w, "fiu"), ("phase", ph, "iu"),
                          ("seq", sq, "iu"), ("predicted", pr, "iu"), ("residency", trace.residency, "iub")):
        if a is None:
            continue
        if not isinstance(a, np.ndarray) or a.dtype.kind not in kinds:
            dt = a.dtype if isinstance(a, np.ndarray) else type(a).__name__
            want = "floating-point" if key == "weights" else "integer"
            raise InputError(path, f"{key} must be an {want} array, got dtype {dt}")
    # shapes
    if ex.ndim != 3:
        raise InputError(path, f"experts must be 3-D [steps, layers, k], got shape {ex.shape}")
    S, L, K = ex.shape
    if w.shape != ex.shape:
        raise InputError(path, f"weights shape {w.shape} differs from experts shape {ex.shape}")
    if ph.shape != (S,):
        raise InputError(path, f"phase shape {ph.shape} must be ({S},) (one per step of experts {ex.shape})")
    if sq.shape != (S,):
        raise InputError(path, f"seq shape {sq.shape} must be ({S},) (one per step of experts {ex.shape})")
    if pr is not None and pr.shape != ex.shape:
        raise InputError(path, f"predicted shape {pr.shape} differs from experts shape {ex.shape}")
    res = trace.residency
    if res is not None:
        if res.shape != ex.shape:
            raise InputError(path, f"residency shape {res.shape} differs from experts shape {ex.shape}")
        badr = (res != RESIDENT) & (res != NOT_RESIDENT) & (res != UNKNOWN)
        if badr.any():
            raise InputError(path, f"{_loc(badr, _SLOT)}: residency must be 1, 0 or -1 (unknown)")
    if L != meta.n_layers:
        raise InputError(path, f"experts has {L} layers but meta.n_layers={meta.n_layers}")
    if K != meta.top_k:
        raise InputError(path, f"experts has k={K} slots but meta.top_k={meta.top_k}")
    if S == 0:
        raise InputError(path, "empty trace: no steps")
    E = meta.n_experts
    # ids and absent groups
    bad = (ex < ABSENT) | (ex >= E)
    if bad.any():
        v = int(ex[np.unravel_index(int(np.flatnonzero(bad.ravel())[0]), ex.shape)])
        raise InputError(path, f"{_loc(bad, _SLOT)}: expert id {v} outside [0, {E}) (and not ABSENT={ABSENT})")
    absent_slot = ex == ABSENT
    absent = absent_slot.all(axis=2)
    partial = absent_slot.any(axis=2) & ~absent
    if partial.any():
        raise InputError(path, f"{_loc(partial, _GROUP)}: ABSENT ids ({ABSENT}) mixed with expert ids; "
                               "an absent group must be all -1")
    present = ~absent
    if not present.any():
        raise InputError(path, "empty trace: no present group (every group is ABSENT)")
    if K > 1:
        srt = np.sort(ex, axis=2)
        rep = (srt[:, :, 1:] == srt[:, :, :-1]).any(axis=2) & present
        if rep.any():
            s, l = np.unravel_index(int(np.flatnonzero(rep.ravel())[0]), rep.shape)
            raise InputError(path, f"step {s} layer {l}: expert id repeated within the top-k "
                                   f"{[int(x) for x in ex[s, l]]}")
    # weights
    nonfinite = ~np.isfinite(w)
    if nonfinite.any():
        raise InputError(path, f"{_loc(nonfinite, _SLOT)}: weight is {w[nonfinite][0]} (must be finite)")
    neg = w < 0
    if neg.any():
        raise InputError(path, f"{_loc(neg, _SLOT)}: negative weight {w[neg][0]}")
    nonzero_absent = (w != 0).any(axis=2) & absent
    if nonzero_absent.any():
        raise InputError(path, f"{_loc(nonzero_absent, _GROUP)}: absent group has nonzero weights "
                               "(must be all 0)")
    sums = w.sum(axis=2, dtype=np.float64)
    if meta.extra.get("norm_topk", True) is False:
        # the model does not renormalise its top-k: weights are raw softmax probabilities
        off = ((sums > 1 + WEIGHT_SUM_TOL) | (sums <= 0)) & present
        rule = "in (0, 1] (norm_topk is false)"
    else:
        off = (np.abs(sums - 1) > WEIGHT_SUM_TOL) & present
        rule = f"1 ± {WEIGHT_SUM_TOL:g}"
    if off.any():
        s, l = np.unravel_index(int(np.flatnonzero(off.ravel())[0]), off.shape)
        raise InputError(path, f"step {s} layer {l}: weights sum to {sums[s, l]:.6g} (must be {rule})")
    # phase and sequences
    badph = (ph != PREFILL) & (ph != DECODE)
    if badph.any():
        s = int(np.flatnonzero(badph)[0])
        raise InputError(path, f"step {s}: phase {int(ph[s])} (must be {PREFILL}=prefill or {DECODE}=decode)")
    i32 = np.iinfo(np.int32)
    if sq.min() < i32.min or sq.max() > i32.max:
        raise InputError(path, f"seq ids must fit int32, got range [{sq.min()}, {sq.max()}]")
    starts = np.flatnonzero(np.r_[True, sq[1:] != sq[:-1]])
    run_ids = sq[starts]
    uniq, first, counts = np.unique(run_ids, return_index=True, return_counts=True)
    if len(uniq) != len(run_ids):
        seen_again = np.sort(first[counts > 1])[0]  # first sequence (in step order) that recurs
        sid = run_ids[seen_again]
        runs = starts[run_ids == sid]
        raise InputError(path, f"sequence {int(sid)}'s steps are not contiguous "
                               f"(runs start at steps {int(runs[0])} and {int(runs[1])})")
    if pr is not None:
        badp = (pr < ABSENT) | (pr >= E)
        if badp.any():
            v = int(pr[np.unravel_index(int(np.flatnonzero(badp.ravel())[0]), pr.shape)])
            raise InputError(path, f"{_loc(badp, _SLOT)}: predicted id {v} outside [0, {E}) "
                                   f"(and not ABSENT={ABSENT})")


def save_trace(trace: Trace, path: str | os.PathLike, *, compact: bool = False) -> None:
    """Validate `trace` and write it atomically as an npz (no pickle; identical trace → identical bytes).

    compact: store each key in the narrowest exact dtype (`_storage_dtype`); loaders widen it back, and
    compress with LZMA instead of fast deflate (np.load reads either): a 48-layer top-8 trace of 13.4 M
    selections takes 6.2 MB instead of 14.7 MB, for ~25 s more to write and ~0.3 s more to load."""
    validate(trace, path)
    try:
        meta_json = trace.meta.to_json()
    except (TypeError, ValueError) as exc:
        raise InputError(path, f"meta is not JSON-serialisable: {exc}") from None
    arrays = {
        "experts": trace.experts,
        "weights": trace.weights,
        "phase": trace.phase,
        "seq": trace.seq,
    }
    if trace.predicted is not None:
        arrays["predicted"] = trace.predicted
    if trace.residency is not None:
        arrays["residency"] = trace.residency
    arrays = {k: np.ascontiguousarray(a, dtype=_storage_dtype(k, a) if compact else ARRAY_DTYPES[k])
              for k, a in arrays.items()}
    arrays["meta"] = np.array(meta_json)  # 0-d unicode array
    codec = ({"compress_type": zipfile.ZIP_LZMA} if compact
             else {"compress_type": zipfile.ZIP_DEFLATED, "compresslevel": 1})
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", allowZip64=True) as zf:
        for key, a in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, a, allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_DATE)
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue(), **codec)


def _storage_dtype(key: str, a: np.ndarray) -> np.dtype:
    """On-disk dtype: the schema's, or a narrower one that holds `a` exactly (loaders widen it back):
    ids in int8 when they fit (≤ 127 experts … ids -1..127), weights in float16 when every value
    round-trips (e.g. gates on a 2⁻¹¹ grid). Halves to quarters a 48-layer top-8 trace's size."""
    if key in ("experts", "predicted") and a.size and a.min() >= -1 and a.max() <= np.iinfo(np.int8).max:
        return np.dtype(np.int8)
    if key == "weights" and a.size:
        w16 = a.astype(np.float16)
        if np.isfinite(w16).all() and np.array_equal(w16.astype(a.dtype), a):
            return np.dtype(np.float16)
    return np.dtype(ARRAY_DTYPES[key])


def open_npz(path: str | os.PathLike, what: str = "npz trace") -> np.lib.npyio.NpzFile:
    """np.load an npz without pickle; a missing, unreadable or non-npz file raises one-line InputError."""
    try:
        with open(path, "rb") as fh:
            magic = fh.read(6)
    except FileNotFoundError:
        raise InputError(path, "no such file") from None
    except IsADirectoryError:
        raise InputError(path, f"is a directory, not an {what}") from None
    except OSError as exc:
        raise InputError(path, f"cannot read ({_one_line(exc)})") from None
    if magic.startswith(b"\x93NUMPY"):
        raise InputError(path, f"not an {what}: a single .npy array (np.save), expected an npz archive")
    if not magic.startswith(b"PK"):
        raise InputError(path, f"not an {what}: no zip signature (expected an npz archive)")
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise InputError(path, f"not an {what} ({_one_line(exc)})") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise InputError(path, f"not an {what}")
    return z


def load_trace(path: str | os.PathLike) -> Trace:
    """Read and validate an npz trace; every problem raises one-line InputError(path, …)."""
    z = open_npz(path, "npz trace")
    with z:
        keys = set(z.files)
        missing = [k for k in REQUIRED_KEYS if k not in keys]
        if missing:
            raise InputError(path, f"missing key(s) {', '.join(missing)} (has: {', '.join(sorted(keys)) or 'none'})")
        unknown = sorted(keys - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS))
        if unknown:
            raise InputError(path, f"unknown key(s) {', '.join(unknown)} "
                                   f"(known: {', '.join(REQUIRED_KEYS + OPTIONAL_KEYS)})")
        arrays: dict[str, np.ndarray] = {}
        for k in sorted(keys):
            try:
                arrays[k] = z[k]
            except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
                raise InputError(path, f"cannot read key {k!r} ({_one_line(exc)})") from None
    m = arrays.pop("meta")
    if m.shape != () or m.dtype.kind != "U":
        raise InputError(path, f"meta must be a 0-d unicode array of JSON, got dtype {m.dtype} shape {m.shape}")
    try:
        d = json.loads(str(m[()]))
    except json.JSONDecodeError as exc:
        raise InputError(path, f"meta is not valid JSON ({exc})") from None
    meta = TraceMeta.from_dict(d, path)
    return Trace.from_arrays(
        arrays["experts"], arrays["weights"], arrays["phase"], arrays["seq"], meta,
        arrays.get("predicted"), arrays.get("residency"), path=path, copy=False,
    )


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def concat_traces(traces: Sequence[Trace], provenance: str | None = None) -> Trace:
    """Join traces of one model end to end; later traces' seq ids are shifted past earlier ones."""
    if not traces:
        raise ValueError("concat_traces needs at least one trace")
    m0 = traces[0].meta
    for t in traces[1:]:
        for f in ("model", "n_layers", "n_experts", "top_k"):
            if getattr(t.meta, f) != getattr(m0, f):
                raise ValueError(f"cannot concatenate traces with different meta.{f}: "
                                 f"{getattr(m0, f)!r} vs {getattr(t.meta, f)!r}")
    seqs, nxt = [], 0
    for t in traces:
        s = t.seq.astype(np.int64)
        s = s - s.min() + nxt
        seqs.append(s)
        nxt = int(s.max()) + 1
    if any(t.predicted is not None for t in traces):
        pred = np.concatenate([t.predicted if t.predicted is not None
                               else np.full(t.experts.shape, ABSENT, np.int16) for t in traces])
    else:
        pred = None
    if any(t.residency is not None for t in traces):
        res = np.concatenate([t.residency if t.residency is not None
                              else np.full(t.experts.shape, UNKNOWN, np.int8) for t in traces])
    else:
        res = None
    prov = provenance if provenance is not None else " + ".join(t.meta.provenance for t in traces)
    meta = dataclasses.replace(m0, provenance=prov)
    return Trace.from_arrays(
        np.concatenate([t.experts for t in traces]),
        np.concatenate([t.weights for t in traces]),
        np.concatenate([t.phase for t in traces]),
        np.concatenate(seqs),
        meta,
        pred,
        res,
        copy=False,
    )


def describe(trace: Trace) -> str:
    """A one-line summary: steps per phase, sequences, layers, top-k, accesses, absent groups."""
    m = trace.meta
    n_pre = int((trace.phase == PREFILL).sum())
    n_dec = trace.n_steps - n_pre
    n_seq = len(np.unique(trace.seq))
    present = trace.present
    n_absent = int(present.size - present.sum())
    pred = ", with predictions" if trace.predicted is not None else ""
    return (f"{m.model}: {trace.n_steps:,} steps ({n_pre:,} prefill, {n_dec:,} decode) in "
            f"{n_seq:,} sequence{'s' if n_seq != 1 else ''}, {m.n_layers} layers, top-{m.top_k} of "
            f"{m.n_experts} experts: {trace.n_accesses:,} accesses in {int(present.sum()):,} groups "
            f"({n_absent:,} absent){pred}")


@exit_on_input_error
def main(argv: Sequence[str] | None = None) -> None:
    """Validate npz traces and print a one-line summary of each."""
    ap = argparse.ArgumentParser(
        prog="python -m sim.trace",
        description="Validate routing traces (npz, docs/trace-format.md) and summarise them.",
        epilog="example:\n  python -m sim.trace traces/qwen3.npz",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("traces", nargs="+", help="npz trace file(s)")
    args = ap.parse_args(argv)
    for p in args.traces:
        print(f"{p}: {describe(load_trace(p))}")


if __name__ == "__main__":
    main()
