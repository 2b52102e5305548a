"""Importers: routing traces from other tools → the npz trace schema (docs/trace-format.md).

Sources (`--from`, else chosen by the file's extension):
  csv     (.csv)    llama.cpp-style route CSV ("# route_trace v1"): `#` header lines with the model,
                    `n_layer/n_expert/n_expert_used` and per-layer `expert_bytes`/`dense_bytes`, then
                    rows turn,phase,step,layer,slot,expert,weight[,residency,expert_bytes]. The
                    `residency` column (1: the recording engine's cache held the expert) is kept
                    as the trace's `residency` array (`python -m sim.residency` compares a replay
                    against it). The weights per expert come from --expert-weights, the built-in
                    Qwen3-30B-A3B, or are inferred from the header's per-layer expert bytes and the
                    GGUF name's quant tag (`infer_expert_weights`); what cannot be inferred is said.
  jsonl   (.jsonl)  one JSON object per (token, layer); an optional first line {"meta": {...}}.
  logits  (.npz)    router-logit dumps as Hugging Face transformers returns them with
                    `output_router_logits=True` (one [tokens, n_experts] array per layer).

Router logits become a trace the way Qwen3-MoE / Mixtral route (transformers'
`Qwen3MoeSparseMoeBlock`): probabilities = softmax over all experts (here in float64), the k
largest are selected in descending order (ties → lower id first), and when the model sets
`norm_topk_prob` they are renormalised to sum to 1 over the k.

Steps keep the order in which the source first mentions them; a (step, layer) group the source
lacks is ABSENT (ids -1, weights 0). Every problem is one line on stderr, exit status 2, no output.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sim.formats import FORMATS, PRECISION_ORDER
from sim.io import InputError, check_output_path, exit_on_input_error
from sim.trace import ABSENT, DECODE, PREFILL, UNKNOWN, Trace, TraceMeta, describe, open_npz, save_trace

QWEN3_30B_A3B_EXPERT_WEIGHTS = 3 * 2048 * 768  # gate + up + down of one Qwen3-30B-A3B expert
_CSV_REQUIRED = ("turn", "phase", "step", "layer", "slot", "expert", "weight")
SUPERBLOCK = 256  # weights per expert must fill whole K-quant super-blocks (the low formats need it)
_QUANT_TAG = re.compile(r"(?:^|[-_.])(q[2-8]_k(?:_[sml])?|q8_0|bf16|f16|f32)(?:[-_.]|$)", re.IGNORECASE)
_PHASE_WORDS = {"prefill": PREFILL, "decode": DECODE, PREFILL: PREFILL, DECODE: DECODE}


# ---------------------------------------------------------------------------------------- helpers
def expert_format_from_bytes(nbytes: int, expert_weights: int) -> str | None:
    """Name the GGUF storage of one expert of `expert_weights` weights that takes `nbytes` bytes.

    A single format gives its name ("q4_k"); gate and up in one format with ffn_down in another
    gives "A+B_down" ("q4_k+q6_k_down", llama.cpp's Q4_K_M layers); None when nothing matches.
    """
    def size(fmt: str, n: int) -> int | None:
        f = FORMATS[fmt]
        return None if n % f.block_weights else f.nbytes(n)

    for a in PRECISION_ORDER:
        if size(a, expert_weights) == nbytes:
            return a
    if expert_weights % 3 == 0:
        third = expert_weights // 3
        for a in PRECISION_ORDER:
            sa = size(a, 2 * third)
            if sa is None:
                continue
            for b in PRECISION_ORDER:
                sb = size(b, third)
                if b != a and sb is not None and sa + sb == nbytes:
                    return f"{a}+{b}_down"
    return None


def check_expert_weights(expert_weights: int, where: str | os.PathLike | None = None) -> int:
    """`expert_weights` if it fills whole super-blocks of 256 weights, else InputError."""
    if expert_weights <= 0 or expert_weights % SUPERBLOCK:
        raise InputError(where, f"--expert-weights {expert_weights}: weights per expert must be a positive multiple "
                                f"of {SUPERBLOCK} (one K-quant super-block), e.g. 3*2048*768 = 4718592")
    return expert_weights


def _weights_for(nbytes: int) -> dict[int, str]:
    """Every weights-per-expert (a multiple of 256) for which some format (or gate/up + down pair) takes `nbytes`."""
    from fractions import Fraction

    out: dict[int, str] = {}
    per = {f: Fraction(FORMATS[f].block_bytes, FORMATS[f].block_weights) for f in PRECISION_ORDER}
    for a in PRECISION_ORDER:
        w = Fraction(nbytes) / per[a]
        if w.denominator == 1 and w % SUPERBLOCK == 0:
            out.setdefault(int(w), a)
    for a in PRECISION_ORDER:
        for b in PRECISION_ORDER:
            if a == b:
                continue
            third = Fraction(nbytes) / (2 * per[a] + per[b])
            if third.denominator == 1 and third % SUPERBLOCK == 0:
                out.setdefault(int(3 * third), f"{a}+{b}_down")
    return out


def infer_expert_weights(expert_bytes: Sequence[int], model_name: str) -> tuple[int | None, str]:
    """Weights per expert that explain every layer's expert bytes, and a one-line note saying how (or why not).

    Candidates: each weights count (a multiple of 256) at which some format, or gate/up in one
    format with ffn_down in another, takes exactly each layer's bytes. When several remain, the
    quant tag in the model's file name (Q4_K_M → q4_k) keeps those whose formats use it.
    """
    cands: dict[int, list[str]] | None = None
    for nbytes in dict.fromkeys(int(b) for b in expert_bytes):
        found = _weights_for(nbytes)
        cands = {w: [*fm, found[w]] for w, fm in (cands or {w: [] for w in found}).items() if w in found}
        if not cands:
            return None, ("weights per expert not inferred: no single weights count gives every layer's expert bytes "
                          "in a GGUF format the simulator knows; pass --expert-weights")
    assert cands is not None
    tag = _QUANT_TAG.search(model_name)
    if len(cands) > 1 and tag:
        base = tag.group(1).lower()
        base = base[:4] if base[1].isdigit() and base[2:4] == "_k" else base  # q4_k_m → q4_k
        kept = {w: fm for w, fm in cands.items() if all(base in f.split("+")[0] for f in fm)}
        cands = kept or cands
    if len(cands) != 1:
        shown = ", ".join(f"{w} ({'/'.join(dict.fromkeys(fm))})" for w, fm in sorted(cands.items())[:4])
        return None, f"weights per expert not inferred: the expert bytes fit several ({shown}); pass --expert-weights"
    (w, fm), = cands.items()
    how = f" and the name's {tag.group(1)} tag" if tag else ""
    return w, f"weights per expert {w} inferred from the header's expert bytes{how} (formats {', '.join(dict.fromkeys(fm))})"


def _renormalise(weights: np.ndarray, present: np.ndarray) -> np.ndarray:
    sums = weights.sum(axis=2, keepdims=True, dtype=np.float64)
    out = weights.astype(np.float64)
    ok = present[:, :, None] & (sums > 0)
    np.divide(out, sums, out=out, where=np.broadcast_to(ok, out.shape))
    return out


def _int(text: str, what: str, path: Path, lineno: int) -> int:
    try:
        return int(text)
    except ValueError:
        where = f"line {lineno}: " if lineno else "header: "
        raise InputError(path, f"{where}{what} {text.strip()!r} is not an integer") from None


def _model_from_path(p: str) -> str:
    name = os.path.basename(p)
    return name[:-5] if name.lower().endswith(".gguf") else name


# ------------------------------------------------------------------------------------ route CSV
def read_route_csv(path: str | os.PathLike, *, model: str | None = None, expert_weights: int | None = None,
                   renormalize: bool = False) -> Trace:
    """Import a llama.cpp-style route CSV (header `#` lines + turn,phase,step,layer,slot,expert,weight rows)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise InputError(path, "no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, f"cannot read as text ({exc})") from None

    header: dict[str, str] = {}
    model_line = ""
    version = ""
    layer_bytes: dict[int, tuple[int, int]] = {}
    columns: list[str] | None = None
    rows: list[tuple[int, list[str]]] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if line.startswith("#"):
            body = line[1:].strip()
            kv = dict(re.findall(r"(\w+)=(\S+)", body))
            if lineno == 1 and body.startswith("route_trace"):
                version = body.split()[-1]
            elif "layer" in kv and "n_layer" not in kv:
                li = _int(kv["layer"], "layer", path, lineno)
                try:
                    layer_bytes[li] = (int(kv["expert_bytes"]), int(kv["dense_bytes"]))
                except (KeyError, ValueError):
                    raise InputError(path, f"line {lineno}: layer header needs integer expert_bytes= and "
                                           f"dense_bytes=, got {body!r}") from None
            elif "n_layer" in kv or "model" in kv:
                header.update(kv)
                model_line = body
            continue
        if columns is None:
            columns = [c.strip() for c in line.split(",")]
            missing = [c for c in _CSV_REQUIRED if c not in columns]
            if missing:
                raise InputError(path, f"line {lineno}: column header lacks {', '.join(missing)} "
                                       f"(needs {','.join(_CSV_REQUIRED)})")
            continue
        rows.append((lineno, line.split(",")))
    if columns is None:
        raise InputError(path, "no CSV column header (turn,phase,step,layer,slot,expert,weight,…)")
    for key in ("n_layer", "n_expert", "n_expert_used"):
        if key not in header:
            raise InputError(path, f"header lacks {key}= (expected a '# model=… n_layer=… n_expert=… "
                                   "n_expert_used=…' line)")
    n_layers = _int(header["n_layer"], "n_layer", path, 0)
    n_experts = _int(header["n_expert"], "n_expert", path, 0)
    top_k = _int(header["n_expert_used"], "n_expert_used", path, 0)
    if min(n_layers, n_experts, top_k) < 1:
        raise InputError(path, f"header needs positive n_layer/n_expert/n_expert_used, got "
                               f"{n_layers}/{n_experts}/{top_k}")
    if not rows:
        raise InputError(path, "empty trace: no data rows")

    ci = {c: columns.index(c) for c in _CSV_REQUIRED}
    ncol = len(columns)
    n = len(rows)
    ints = np.empty((n, 6), dtype=np.int64)  # turn, phase, step, layer, slot, expert
    wts = np.empty(n, dtype=np.float64)
    int_cols = ("turn", "phase", "step", "layer", "slot", "expert")
    for r, (lineno, f) in enumerate(rows):
        if len(f) != ncol:
            raise InputError(path, f"line {lineno}: {len(f)} fields, the column header has {ncol}")
        for j, c in enumerate(int_cols):
            ints[r, j] = _int(f[ci[c]], c, path, lineno)
        try:
            wts[r] = float(f[ci["weight"]])
        except ValueError:
            raise InputError(path, f"line {lineno}: weight {f[ci['weight']].strip()!r} is not a number") from None
    linenos = np.array([ln for ln, _ in rows])
    turn, phase, step, layer, slot, expert = ints.T
    resid = None
    if "residency" in columns:
        rc = columns.index("residency")
        resid = np.array([_int(f[rc], "residency", path, ln) for ln, f in rows], dtype=np.int64)
        badr = (resid != 0) & (resid != 1)
        if badr.any():
            raise InputError(path, f"line {linenos[int(np.flatnonzero(badr)[0])]}: residency must be 0 or 1")

    def first_bad(mask: np.ndarray, msg: str) -> None:
        if mask.any():
            r = int(np.flatnonzero(mask)[0])
            raise InputError(path, f"line {linenos[r]}: {msg.format(**{c: ints[r, j] for j, c in enumerate(int_cols)})}")

    first_bad((phase != PREFILL) & (phase != DECODE), "phase {phase} (must be 0=prefill or 1=decode)")
    first_bad((layer < 0) | (layer >= n_layers), f"layer {{layer}} outside [0, {n_layers})")
    first_bad((slot < 0) | (slot >= top_k), f"slot {{slot}} outside [0, {top_k}) (n_expert_used={top_k})")
    first_bad((expert < 0) | (expert >= n_experts), f"expert id {{expert}} outside [0, {n_experts})")

    # steps: (turn, step) in order of first appearance
    uniq, first_row, sidx = np.unique(np.stack([turn, step], axis=1), axis=0, return_index=True,
                                      return_inverse=True)
    sidx = sidx.reshape(-1)
    order = np.argsort(first_row, kind="stable")  # unique key index → position by first appearance
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    s = rank[sidx]
    S = len(uniq)
    step_phase = np.full(S, -1, dtype=np.int64)
    step_phase[s] = phase  # last writer wins; check consistency below
    first_bad(step_phase[s] != phase, "turn {turn} step {step}: phase differs from another row of this step")
    step_seq = turn[first_row[order]]

    flat = (s * n_layers + layer) * top_k + slot
    seen, first_idx, counts = np.unique(flat, return_index=True, return_counts=True)
    if (counts > 1).any():
        dup_flat = seen[counts > 1]
        dup_rows = np.flatnonzero(np.isin(flat, dup_flat))
        r = next(int(x) for x in dup_rows if first_idx[np.searchsorted(seen, flat[x])] != x)
        raise InputError(path, f"line {linenos[r]}: duplicate row for turn {turn[r]} step {step[r]} "
                               f"layer {layer[r]} slot {slot[r]}")
    experts = np.full((S, n_layers, top_k), ABSENT, dtype=np.int64)
    weights = np.zeros((S, n_layers, top_k), dtype=np.float64)
    experts.reshape(-1)[flat] = expert
    weights.reshape(-1)[flat] = wts
    residency = None
    if resid is not None:
        residency = np.full((S, n_layers, top_k), UNKNOWN, dtype=np.int64)
        residency.reshape(-1)[flat] = resid
    filled = np.zeros((S, n_layers, top_k), dtype=bool)
    filled.reshape(-1)[flat] = True
    nfill = filled.sum(axis=2)
    partial = (nfill > 0) & (nfill < top_k)
    if partial.any():
        si, li = np.argwhere(partial)[0]
        r = int(np.flatnonzero((s == si) & (layer == li))[0])
        raise InputError(path, f"turn {turn[r]} step {step[r]} layer {li}: rows for only {nfill[si, li]} of "
                               f"{top_k} slots (line {linenos[r]})")
    present = nfill == top_k
    if renormalize:
        weights = _renormalise(weights, present)

    # meta
    model_path = header.get("model", "")
    name = model or (_model_from_path(model_path) if model_path else path.stem)
    if expert_weights is not None:
        check_expert_weights(expert_weights)
    elif "qwen3-30b-a3b" in name.lower():
        expert_weights = QWEN3_30B_A3B_EXPERT_WEIGHTS
    eb = db = fmt = None
    notes: list[str] = []
    if layer_bytes:
        missing_l = [li for li in range(n_layers) if li not in layer_bytes]
        extra_l = [li for li in layer_bytes if not 0 <= li < n_layers]
        if missing_l or extra_l:
            raise InputError(path, f"header has per-layer bytes for layers {sorted(layer_bytes)[:3]}… but "
                                   f"{'lacks layer ' + str(missing_l[0]) if missing_l else 'has layer ' + str(extra_l[0])}"
                                   f" (n_layer={n_layers})")
        eb = tuple(layer_bytes[li][0] for li in range(n_layers))
        db = tuple(layer_bytes[li][1] for li in range(n_layers))
        if expert_weights is None:
            expert_weights, note = infer_expert_weights(eb, _model_from_path(model_path) if model_path else name)
            notes.append(note)
        if expert_weights is not None:
            names = [expert_format_from_bytes(b, expert_weights) for b in eb]
            fmt = tuple(names) if all(names) else None  # type: ignore[arg-type]
            if fmt is None:
                notes.append(f"expert format not named: some layer's expert bytes match no format at {expert_weights} "
                             "weights per expert")
    else:
        notes.append("no per-layer expert_bytes in the header: the trace has no sizes; replay needs a built-in --model")
    extra: dict[str, Any] = {"source_format": "route_csv"}
    if notes:
        extra["import_notes"] = notes
    if version:
        extra["route_trace_version"] = version
    for k in ("arch",):
        if k in header:
            extra[k] = header[k]
    meta = TraceMeta(
        model=name, n_layers=n_layers, n_experts=n_experts, top_k=top_k,
        provenance=f"{path.name}: {model_line}".rstrip(": "),
        expert_weights=expert_weights, expert_bytes=eb, expert_format=fmt, dense_bytes=db, extra=extra,
    )
    return Trace.from_arrays(experts, weights, step_phase, step_seq, meta, residency=residency, path=path, copy=False)


# ----------------------------------------------------------------------------------------- JSONL
def read_jsonl(path: str | os.PathLike, *, n_experts: int | None = None, model: str | None = None,
               renormalize: bool = False) -> Trace:
    """Import JSONL, one {"seq","token","layer","phase","experts","weights"[,"predicted"]} object per line."""
    path = Path(path)
    try:
        fh = path.open()
    except FileNotFoundError:
        raise InputError(path, "no such file") from None
    except OSError as exc:
        raise InputError(path, f"cannot read ({exc})") from None
    meta_d: dict[str, Any] = {}
    step_of: dict[tuple[int, int], int] = {}
    step_phase: list[int] = []
    step_seq: list[int] = []
    recs: list[tuple[int, int, int, list, list, list | None]] = []  # lineno, step, layer, ids, w, pred
    top_k: int | None = None
    with fh:
        try:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise InputError(path, f"line {lineno}: not valid JSON ({exc.msg})") from None
                if not isinstance(obj, dict):
                    raise InputError(path, f"line {lineno}: expected a JSON object, got {type(obj).__name__}")
                if "meta" in obj:
                    if recs or meta_d or len(obj) != 1:
                        raise InputError(path, f"line {lineno}: a {{\"meta\": …}} object must be alone on the "
                                               "first line")
                    if not isinstance(obj["meta"], dict):
                        raise InputError(path, f"line {lineno}: meta must be a JSON object")
                    meta_d = dict(obj["meta"])
                    continue
                missing = [k for k in ("seq", "token", "layer", "phase", "experts", "weights") if k not in obj]
                if missing:
                    raise InputError(path, f"line {lineno}: record lacks {', '.join(missing)}")
                for k in ("seq", "token", "layer"):
                    if not isinstance(obj[k], int) or isinstance(obj[k], bool):
                        raise InputError(path, f"line {lineno}: {k} must be an integer, got {obj[k]!r}")
                ph = obj["phase"]
                if isinstance(ph, bool) or ph not in _PHASE_WORDS:
                    raise InputError(path, f"line {lineno}: phase {ph!r} (must be \"prefill\"/\"decode\" or 0/1)")
                ids, w, pred = obj["experts"], obj["weights"], obj.get("predicted")
                for k, v, kind in (("experts", ids, int), ("weights", w, (int, float)), ("predicted", pred, int)):
                    if v is None and k == "predicted":
                        continue
                    if not isinstance(v, list) or not all(isinstance(x, kind) and not isinstance(x, bool)
                                                          for x in v):
                        raise InputError(path, f"line {lineno}: {k} must be a list of "
                                               f"{'integers' if kind is int else 'numbers'}, got {v!r}")
                k_here = len(ids)
                if top_k is None:
                    top_k = k_here
                if k_here != top_k or len(w) != top_k or (pred is not None and len(pred) != top_k):
                    raise InputError(path, f"line {lineno}: experts/weights/predicted have lengths "
                                           f"{len(ids)}/{len(w)}/{'-' if pred is None else len(pred)}, "
                                           f"expected top_k={top_k} each")
                key = (obj["seq"], obj["token"])
                st = step_of.get(key)
                if st is None:
                    st = step_of[key] = len(step_phase)
                    step_phase.append(_PHASE_WORDS[ph])
                    step_seq.append(obj["seq"])
                elif step_phase[st] != _PHASE_WORDS[ph]:
                    raise InputError(path, f"line {lineno}: seq {key[0]} token {key[1]}: phase differs from "
                                           "an earlier record of this token")
                recs.append((lineno, st, obj["layer"], ids, w, pred))
        except UnicodeDecodeError as exc:
            raise InputError(path, f"not UTF-8 text ({exc.reason})") from None

    meta_d = {k: v for k, v in meta_d.items()}
    if n_experts is not None:
        meta_d["n_experts"] = n_experts
    if "n_experts" not in meta_d:
        raise InputError(path, "n_experts unknown: pass --n-experts or start the file with "
                               "{\"meta\": {\"n_experts\": …}}")
    if model is not None:
        meta_d["model"] = model
    meta_d.setdefault("model", path.stem)
    if not recs:
        raise InputError(path, "empty trace: no records")
    max_layer = max(r[2] for r in recs)
    meta_d.setdefault("n_layers", max_layer + 1)
    if "top_k" in meta_d and meta_d["top_k"] != top_k:
        raise InputError(path, f"records hold {top_k} experts each but meta.top_k={meta_d['top_k']}")
    meta_d.setdefault("top_k", top_k)
    meta_d.setdefault("provenance", path.name)
    meta_d.setdefault("extra", {})
    meta = TraceMeta.from_dict(meta_d, path)
    L, K = meta.n_layers, meta.top_k
    S = len(step_phase)
    experts = np.full((S, L, K), ABSENT, dtype=np.int64)
    weights = np.zeros((S, L, K), dtype=np.float64)
    predicted = None
    if any(r[5] is not None for r in recs):
        predicted = np.full((S, L, K), ABSENT, dtype=np.int64)
    filled = np.zeros((S, L), dtype=bool)
    for lineno, st, layer, ids, w, pred in recs:
        if not 0 <= layer < L:
            raise InputError(path, f"line {lineno}: layer {layer} outside [0, {L})")
        if filled[st, layer]:
            raise InputError(path, f"line {lineno}: duplicate record for seq {step_seq[st]} token "
                                   f"{next(k for k, v in step_of.items() if v == st)[1]} layer {layer}")
        filled[st, layer] = True
        for x in ids:
            if not ABSENT <= x < meta.n_experts:
                raise InputError(path, f"line {lineno}: expert id {x} outside [0, {meta.n_experts})")
        experts[st, layer] = ids
        weights[st, layer] = w
        if pred is not None:
            for x in pred:
                if not ABSENT <= x < meta.n_experts:
                    raise InputError(path, f"line {lineno}: predicted id {x} outside [0, {meta.n_experts})")
            predicted[st, layer] = pred  # type: ignore[index]
    if renormalize:
        weights = _renormalise(weights, experts[:, :, 0] != ABSENT)
    return Trace.from_arrays(experts, weights, np.array(step_phase), np.array(step_seq), meta, predicted,
                             path=path, copy=False)


# ---------------------------------------------------------------------------------- router logits
def topk_from_logits(logits: np.ndarray, top_k: int, norm_topk: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Softmax (float64) over the last axis, the top-k ids in descending order, their (renormalised) weights."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    p = np.exp(x)
    p /= p.sum(axis=-1, keepdims=True)
    ids = np.argsort(-p, axis=-1, kind="stable")[..., :top_k]
    w = np.take_along_axis(p, ids, axis=-1)
    if norm_topk:
        w = w / w.sum(axis=-1, keepdims=True)
    return ids, w


def read_router_logits(path: str | os.PathLike, *, top_k: int | None = None, norm_topk: bool | None = None,
                       model: str | None = None) -> Trace:
    """Import router logits (`layer_0`, `layer_1`, … each [tokens, n_experts], or `router_logits` [layers, tokens, n_experts])."""
    path = Path(path)
    z = open_npz(path, "npz of router logits")
    with z:
        try:
            arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
            raise InputError(path, f"cannot read its arrays ({' '.join(str(exc).split())})") from None
    layer_keys = sorted((k for k in arrays if re.fullmatch(r"layer_\d+", k)), key=lambda k: int(k[6:]))
    known = {"router_logits", "seq", "phase", "top_k", "norm_topk_prob", "model"}
    unknown = sorted(k for k in arrays if k not in known and k not in layer_keys)
    if unknown:
        raise InputError(path, f"unknown key(s) {', '.join(unknown)} (expected layer_0, layer_1, … or "
                               "router_logits, and optionally seq, phase, top_k, norm_topk_prob, model)")
    if "router_logits" in arrays and layer_keys:
        raise InputError(path, "holds both router_logits and layer_N arrays; keep one")
    if "router_logits" in arrays:
        logits = arrays["router_logits"]
        if logits.ndim != 3:
            raise InputError(path, f"router_logits must be [layers, tokens, n_experts], got shape {logits.shape}")
    elif layer_keys:
        if [int(k[6:]) for k in layer_keys] != list(range(len(layer_keys))):
            gap = next(i for i, k in enumerate(layer_keys) if int(k[6:]) != i)
            raise InputError(path, f"layer arrays must be layer_0 … layer_{len(layer_keys) - 1} without gaps; "
                                   f"layer_{gap} is missing")
        shapes = {arrays[k].shape for k in layer_keys}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise InputError(path, f"every layer_N must be [tokens, n_experts] of one shape, got "
                                   f"{sorted(shapes)}")
        logits = np.stack([arrays[k] for k in layer_keys])
    else:
        raise InputError(path, "no router logits: expected arrays layer_0, layer_1, … or router_logits")
    if logits.dtype.kind != "f":
        raise InputError(path, f"router logits must be floating-point, got dtype {logits.dtype} "
                               "(store bf16 logits as float32)")
    L, T, E = logits.shape
    if T == 0:
        raise InputError(path, "empty trace: no tokens")
    if not np.isfinite(logits).all():
        li, ti, ei = np.argwhere(~np.isfinite(logits))[0]
        raise InputError(path, f"layer {li} token {ti} expert {ei}: logit is {logits[li, ti, ei]} (must be finite)")

    def scalar(key: str, kinds: str) -> Any:
        a = arrays[key]
        if a.shape != () or a.dtype.kind not in kinds:
            raise InputError(path, f"{key} must be a 0-d array, got dtype {a.dtype} shape {a.shape}")
        return a[()].item()

    if top_k is None:
        if "top_k" not in arrays:
            raise InputError(path, "top_k unknown: pass --top-k or store a 0-d 'top_k' array in the file")
        top_k = int(scalar("top_k", "iu"))
    if not 1 <= top_k <= E:
        raise InputError(path, f"top_k={top_k} outside [1, n_experts={E}]")
    if norm_topk is None:
        norm_topk = bool(scalar("norm_topk_prob", "bui")) if "norm_topk_prob" in arrays else True
    if model is None:
        model = str(scalar("model", "U")) if "model" in arrays else path.stem

    if "seq" in arrays:
        seq = arrays["seq"]
        if seq.shape != (T,) or seq.dtype.kind not in "iu":
            raise InputError(path, f"seq must be an integer array [tokens={T}], got dtype {seq.dtype} "
                                   f"shape {seq.shape}")
    else:
        seq = np.zeros(T, dtype=np.int64)
    if "phase" in arrays:
        ph = arrays["phase"]
        if ph.shape != (T,):
            raise InputError(path, f"phase must be [tokens={T}], got shape {ph.shape}")
        if ph.dtype.kind == "U":
            bad = ~np.isin(ph, ["prefill", "decode"])
            if bad.any():
                raise InputError(path, f"token {int(np.flatnonzero(bad)[0])}: phase "
                                       f"{str(ph[bad][0])!r} (must be 'prefill' or 'decode')")
            ph = np.where(ph == "decode", DECODE, PREFILL)
        elif ph.dtype.kind not in "iub":
            raise InputError(path, f"phase must be integers 0/1 or strings, got dtype {ph.dtype}")
    else:
        ph = np.full(T, PREFILL, dtype=np.int64)

    ids = np.empty((T, L, top_k), dtype=np.int64)
    w = np.empty((T, L, top_k), dtype=np.float64)
    for li in range(L):  # one layer at a time keeps the float64 softmax small
        ids[:, li], w[:, li] = topk_from_logits(logits[li], top_k, norm_topk)
    meta = TraceMeta(
        model=model, n_layers=L, n_experts=E, top_k=top_k,
        provenance=f"{path.name}: router logits, softmax top-{top_k}"
                   f"{', renormalised over the k' if norm_topk else ''}",
        extra={"source_format": "router_logits", "norm_topk": bool(norm_topk)},
    )
    return Trace.from_arrays(ids, w, ph, seq, meta, path=path, copy=False)


# ------------------------------------------------------------------------------------------- CLI
_BY_EXT = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".npz": "logits"}


def convert(src: str | os.PathLike, out: str | os.PathLike, source_format: str | None = None,
            **options: Any) -> Trace:
    """Import `src` (format from `source_format` or its extension) and save it as an npz trace at `out`."""
    src = Path(src)
    fmt = source_format or _BY_EXT.get(src.suffix.lower())
    if fmt is None:
        raise InputError(src, f"cannot tell the source format from extension {src.suffix!r}; pass --from "
                              "csv|jsonl|logits")
    applies = {
        "csv": {"model", "expert_weights", "renormalize"},
        "jsonl": {"model", "n_experts", "renormalize"},
        "logits": {"model", "top_k", "norm_topk"},
    }[fmt]
    given = {k: v for k, v in options.items() if v is not None}
    wrong = sorted(set(given) - applies)
    if wrong:
        flag = "--" + wrong[0].replace("_", "-")
        if wrong[0] == "norm_topk":
            flag = "--no-norm-topk"
        raise InputError(src, f"{flag} does not apply to {fmt} sources")
    if Path(out).resolve() == src.resolve():
        raise InputError(src, "output path is the source file; choose another -o")
    check_output_path(out, "-o")
    reader = {"csv": read_route_csv, "jsonl": read_jsonl, "logits": read_router_logits}[fmt]
    trace = reader(src, **{k: v for k, v in options.items() if k in applies and v is not None})
    save_trace(trace, out)
    return trace


@exit_on_input_error
def main(argv: Sequence[str] | None = None) -> None:
    """Command line: convert one source file to an npz trace and print a one-line summary."""
    ap = argparse.ArgumentParser(
        prog="python -m sim.convert",
        description="Convert a routing trace (llama.cpp route CSV, JSONL, or router-logit npz) to the "
                    "npz trace schema of docs/trace-format.md.",
        epilog="""examples:
  python -m sim.convert ../shared/traces/bigmoeonedge/qwen.route.csv -o traces/qwen3-phone.npz
  python -m sim.convert routes.jsonl -o traces/run.npz --n-experts 128
  python -m sim.convert logits.npz -o traces/hf.npz --top-k 8            # Qwen3 / Mixtral (norm_topk_prob)
  python -m sim.convert logits.npz -o traces/q2.npz --top-k 4 --no-norm-topk  # raw softmax weights""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("src", help="source file (.csv, .jsonl, .npz of router logits)")
    ap.add_argument("-o", "--out", required=True, help="output npz trace (written atomically)")
    ap.add_argument("--from", dest="source_format", choices=("csv", "jsonl", "logits"),
                    help="source format (default: from the extension: .csv, .jsonl/.ndjson, .npz)")
    ap.add_argument("--model", help="model name stored in the trace (default: from the source)")
    ap.add_argument("--n-experts", type=int, help="jsonl: experts per layer (unless the file's meta line has it)")
    ap.add_argument("--top-k", type=int, help="logits: experts per token (unless the file holds top_k)")
    ap.add_argument("--no-norm-topk", dest="norm_topk", action="store_const", const=False, default=None,
                    help="logits: keep raw softmax weights (model without norm_topk_prob)")
    ap.add_argument("--renormalize", action="store_const", const=True, default=None,
                    help="csv/jsonl: rescale each group's weights to sum to 1 (default: require it ±1e-3)")
    ap.add_argument("--expert-weights", type=int,
                    help="csv: weights per expert (a multiple of 256), to name each layer's GGUF format from its "
                         "bytes (default: known for Qwen3-30B-A3B, else inferred from the header where it can be)")
    args = ap.parse_args(argv)
    trace = convert(args.src, args.out, args.source_format, model=args.model, n_experts=args.n_experts,
                    top_k=args.top_k, norm_topk=args.norm_topk, renormalize=args.renormalize,
                    expert_weights=args.expert_weights)
    for note in trace.meta.extra.get("import_notes", ()):
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {args.out}: {describe(trace)}")


if __name__ == "__main__":
    main()
