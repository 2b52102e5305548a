"""Model profiles (bytes per expert per format) and hardware profiles (what a byte and a FLOP cost).

A model profile answers "how many bytes is expert e of layer l in format f": its native GGUF
format per tensor (gate, up, down) and the weights per expert. Built-ins follow llama.cpp's
Q4_K_M recipe: ffn_down and attn_v get Q6_K in the layers `use_more_bits` picks (the first and
last eighth and every third layer between), Q4_K elsewhere; this reproduces the per-layer
expert_bytes and dense_bytes in the header of the shared Qwen3-30B-A3B trace exactly. Q5_K_M is the
same recipe on a Q5_K base (llama.cpp src/llama-quant.cpp, `llama_tensor_get_type_impl`: the
FFN_DOWN branch gives Q6_K to `use_more_bits` layers for both Q4_K_M and Q5_K_M, and
`llama_ftype_get_default_type` maps Q4_K_M → Q4_K, Q5_K_M → Q5_K). Models with exactly 8 experts
(Mixtral) get attn_k and attn_v at Q8_0 and, under Q4_K_M, attn_output at Q5_K (same function).
A trace's own metadata wins over a built-in where present.

A hardware profile is JSON in sim/profiles/ (schema in docs/hardware-profiles.md): host→device
transfer (fixed cost + bytes/bandwidth, or a measured curve; copy engines), per-expert compute time
per format and token count, dense time per layer, VRAM. `h200.json` is written by
`python -m jaxmoe.calibrate`; the RTX profiles are datasheet-scaled and say so in `source`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sim.formats import FORMATS, get_format
from sim.io import InputError
from sim.precision import LOW_FORMATS, gate_up_format

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"
GIB = 2**30
MIB = 2**20

# ---------------------------------------------------------------------------------------------
# Model profiles
# ---------------------------------------------------------------------------------------------

# LOW_FORMATS lives in sim.precision; re-exported here for code that still imports it from profiles.


def use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's Q4_K_M rule for the layers whose ffn_down / attn_v get Q6_K."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


@dataclass(frozen=True)
class ModelProfile:
    """Geometry and storage of an MoE model: what each expert costs in bytes per format."""

    name: str
    # geometry
    n_layers: int
    n_experts: int
    top_k: int
    hidden: int
    expert_ffn: int
    # storage: native format per layer of (gate, up, down), and dense (attention+router+norms) bytes
    native_formats: tuple[tuple[str, str, str], ...]
    dense_bytes: tuple[int, ...]
    head_bytes: int = 0  # token embedding row + output head read per decoded token
    kv_bytes_per_token: int = 0  # K+V cache bytes per token of context, all layers
    # a trace can pin exact native sizes (e.g. measured from the GGUF); None → from native_formats
    native_bytes_override: tuple[int, ...] | None = None
    native_names: tuple[str, ...] | None = None  # display name of each layer's native format
    notes: str = ""

    @property
    def expert_weights(self) -> int:
        """Weights in one expert: gate + up + down."""
        return 3 * self.hidden * self.expert_ffn

    def expert_bytes(self, layer: int, fmt: str | None = None) -> int:
        """Bytes of one expert of `layer`: native when `fmt` is None, else in the low format `fmt`.

        A uniform format (`q2_k`) holds all three tensors in it. A tensor-aware one (`q2_k_gu`,
        sim.precision.TENSOR_AWARE_FORMATS) holds ffn_gate and ffn_up (hidden·ffn weights each) in
        its gate/up format and ffn_down in the layer's native down format (`down_format`):
        2 × bytes(hidden·ffn at e.g. Q2_K) + bytes(hidden·ffn at the native down format). Raises
        ValueError when that down format cannot be established (see `down_format`).
        """
        if fmt is None:
            if self.native_bytes_override is not None:
                return self.native_bytes_override[layer]
            per_tensor = self.hidden * self.expert_ffn
            return sum(get_format(f).nbytes(per_tensor) for f in self.native_formats[layer])
        gate_up = gate_up_format(fmt)
        if gate_up is not None:
            per_tensor = self.hidden * self.expert_ffn
            return 2 * get_format(gate_up).nbytes(per_tensor) + get_format(self.down_format(layer)).nbytes(per_tensor)
        return get_format(fmt).nbytes(self.expert_weights)

    def _triple_bytes(self, formats) -> int | None:
        """Bytes of one expert whose (gate, up, down) tensors are in `formats` (None: not whole blocks)."""
        per_tensor = self.hidden * self.expert_ffn
        try:
            return sum(get_format(f).nbytes(per_tensor) for f in formats)
        except ValueError:
            return None

    def down_format(self, layer: int) -> str:
        """The native format of `layer`'s ffn_down (what a tensor-aware low copy keeps).

        Rule. Without pinned native sizes it is `native_formats[layer][2]`. When a trace pins the
        native bytes (`native_bytes_override`: a GGUF's measured sizes, sim.profiles.model_for_trace)
        a per-tensor format triple is trusted only if it reproduces the pinned bytes exactly: first
        the profile's own `native_formats[layer]` (a built-in recipe, e.g. Q4_K_M's Q6_K down layers),
        else the trace's declared format name (`native_names[layer]`: "q4_k", or "A+B_down" for gate/
        up in A and ffn_down in B, as sim.convert names a header's bytes). If neither agrees (a GGUF
        of another recipe, a mix the names cannot express, or no names) this raises ValueError rather
        than guess a split: the down tensor's bytes would be wrong by up to a third of the expert.
        """
        formats = tuple(self.native_formats[layer])
        pinned = None if self.native_bytes_override is None else int(self.native_bytes_override[layer])
        if pinned is None or self._triple_bytes(formats) == pinned:
            return formats[2]
        named = parse_native_name(self.native_names[layer]) if self.native_names is not None else None
        if named is not None and self._triple_bytes(named) == pinned:
            return named[2]
        said = f", declared {self.native_names[layer]!r}" if self.native_names is not None else ""
        raise ValueError(
            f"model {self.name} layer {layer}: the trace pins {pinned} native bytes per expert, which neither the "
            f"profile's formats {'/'.join(formats)} ({self._triple_bytes(formats)} bytes){said} reproduce at "
            f"{self.hidden * self.expert_ffn} weights per tensor, so ffn_down's native format (kept by a tensor-aware "
            "low format) is unknown; give the trace per-layer expert_format names that match its expert_bytes "
            "(sim.convert writes them), or use q2_k/q3_k")

    def native_name(self, layer: int) -> str:
        """Display name of the native format of `layer`'s experts (e.g. "q4_k+q6_k_down")."""
        if self.native_names is not None:
            return self.native_names[layer]
        gate, up, down = self.native_formats[layer]
        return gate if gate == up == down else f"{gate}+{down}_down"

    def native_bytes_per_layer(self) -> np.ndarray:
        """int64 [n_layers]: native bytes of one expert in each layer."""
        return np.array([self.expert_bytes(layer) for layer in range(self.n_layers)], dtype=np.int64)

    def total_expert_bytes(self) -> int:
        """Bytes of every expert of every layer at native precision."""
        return int(self.native_bytes_per_layer().sum()) * self.n_experts


def parse_native_name(name: str) -> tuple[str, str, str] | None:
    """(gate, up, down) formats of a native format name: "q4_k" → all three, "q4_k+q6_k_down" → Q4_K
    gate/up with a Q6_K ffn_down (ModelProfile.native_name, sim.convert's names); None for any other name."""
    key = name.strip().lower()
    if key in FORMATS:
        return (key, key, key)
    gate_up, plus, down = key.partition("+")
    if plus and down.endswith("_down") and gate_up in FORMATS and down[: -len("_down")] in FORMATS:
        return (gate_up, gate_up, down[: -len("_down")])
    return None


# llama.cpp "_M" mixes: variant -> base K-quant of every 2-D weight; ffn_down and attn_v get Q6_K
# in the `use_more_bits` layers (src/llama-quant.cpp, llama_tensor_get_type_impl).
K_M_BASE = {"q4_k_m": "q4_k", "q5_k_m": "q5_k"}


def _k_m(n_layers: int, base: str) -> tuple[tuple[str, str, str], ...]:
    """Per-layer (gate, up, down) formats of a llama.cpp Q4_K_M / Q5_K_M expert FFN on `base`."""
    return tuple((base, base, "q6_k" if use_more_bits(i, n_layers) else base) for i in range(n_layers))


def _q4_k_m(n_layers: int) -> tuple[tuple[str, str, str], ...]:
    return _k_m(n_layers, "q4_k")


def _attention_bytes(hidden: int, n_heads: int, n_kv: int, head_dim: int, n_experts: int, v_fmt: str,
                     base: str = "q4_k", k_fmt: str | None = None, o_fmt: str | None = None) -> int:
    """Dense bytes of one layer: Q/K/O at `base` (K, O overridable), V at `v_fmt`, f32 router and norms."""
    fb = get_format(base)
    q = fb.nbytes(hidden * n_heads * head_dim)
    k = get_format(k_fmt or base).nbytes(hidden * n_kv * head_dim)
    v = get_format(v_fmt).nbytes(hidden * n_kv * head_dim)
    o = get_format(o_fmt or base).nbytes(n_heads * head_dim * hidden)
    router = 4 * hidden * n_experts
    norms = 4 * (2 * hidden + 2 * head_dim)
    return q + k + v + o + router + norms


def _llama_cpp_moe(name: str, variant: str, *, n_layers: int, hidden: int, ffn: int, n_heads: int, n_kv: int,
                   head_dim: int, n_experts: int, top_k: int, vocab: int, qk_norm: bool) -> ModelProfile:
    """An MoE model as llama.cpp stores it: experts in Q4_K_M / Q5_K_M (or uniformly in `variant`)."""
    base = K_M_BASE.get(variant, "q4_k")
    if variant in K_M_BASE:
        native = _k_m(n_layers, base)
    else:
        get_format(variant)
        native = tuple((variant,) * 3 for _ in range(n_layers))
    no_qk_norm = 0 if qk_norm else 4 * 2 * head_dim
    # llama.cpp: an 8-expert model (Mixtral) gets attn_k and attn_v at Q8_0, and attn_output at Q5_K under Q4_K_M
    eight = n_experts == 8
    dense = tuple(
        _attention_bytes(hidden, n_heads, n_kv, head_dim, n_experts,
                         "q8_0" if eight else ("q6_k" if use_more_bits(i, n_layers) else base), base,
                         k_fmt="q8_0" if eight else None, o_fmt="q5_k" if eight else None)
        - no_qk_norm
        for i in range(n_layers)
    )
    return ModelProfile(
        name=f"{name}:{variant}",
        n_layers=n_layers,
        n_experts=n_experts,
        top_k=top_k,
        hidden=hidden,
        expert_ffn=ffn,
        native_formats=native,
        dense_bytes=dense,
        head_bytes=get_format("q6_k").nbytes(vocab * hidden) + get_format(base).nbytes(hidden),
        kv_bytes_per_token=n_layers * 2 * n_kv * head_dim * 2,
        notes=f"GGUF {variant.upper()} recipe (llama.cpp llama-quant.cpp); dense = attention + f32 router + norms "
              "per layer; head = Q6_K output + one embedding row; KV cache f16",
    )


def qwen3_30b_a3b(variant: str = "q4_k_m") -> ModelProfile:
    """Qwen3-30B-A3B: 48 layers, 128 experts, top-8; experts in Q4_K_M or uniformly in `variant`."""
    return _llama_cpp_moe("qwen3-30b-a3b", variant, n_layers=48, hidden=2048, ffn=768, n_heads=32, n_kv=4,
                          head_dim=128, n_experts=128, top_k=8, vocab=151_936, qk_norm=True)


def mixtral_8x7b(variant: str = "q4_k_m") -> ModelProfile:
    """Mixtral-8x7B: 32 layers, 8 experts, top-2, hidden 4096, ffn 14336 (no q/k norms)."""
    return _llama_cpp_moe("mixtral-8x7b", variant, n_layers=32, hidden=4096, ffn=14336, n_heads=32, n_kv=8,
                          head_dim=128, n_experts=8, top_k=2, vocab=32_000, qk_norm=False)


def qwen3_235b_a22b(variant: str = "q4_k_m") -> ModelProfile:
    """Qwen3-235B-A22B: 94 layers, 128 experts, top-8, hidden 4096, moe ffn 1536, 64 q / 4 kv heads.

    Geometry from its Hugging Face config.json (Qwen/Qwen3-235B-A22B: num_hidden_layers 94,
    hidden_size 4096, moe_intermediate_size 1536, num_experts 128, num_experts_per_tok 8,
    num_attention_heads 64, num_key_value_heads 4, head_dim 128, vocab_size 151936,
    tie_word_embeddings false); every layer is an MoE layer (mlp_only_layers empty).
    """
    return _llama_cpp_moe("qwen3-235b-a22b", variant, n_layers=94, hidden=4096, ffn=1536, n_heads=64, n_kv=4,
                          head_dim=128, n_experts=128, top_k=8, vocab=151_936, qk_norm=True)


MODEL_BUILDERS = {"qwen3-30b-a3b": qwen3_30b_a3b, "mixtral-8x7b": mixtral_8x7b, "qwen3-235b-a22b": qwen3_235b_a22b}
MODEL_NAMES = tuple(f"{m}:{v}" for m in MODEL_BUILDERS
                    for v in ("q4_k_m", "q5_k_m", "q4_k", "q5_k", "q3_k", "q2_k", "bf16"))


def get_model(name: str) -> ModelProfile:
    """A built-in model profile by name, e.g. "qwen3-30b-a3b" or "qwen3-30b-a3b:q2_k"."""
    base, _, variant = name.lower().partition(":")
    if base not in MODEL_BUILDERS:
        raise InputError(None, f"unknown model {name!r}; known: {', '.join(MODEL_NAMES)}")
    try:
        return MODEL_BUILDERS[base](variant or "q4_k_m")
    except ValueError as exc:
        raise InputError(None, f"model {name!r}: {exc}") from None


def model_for_trace(meta, fallback: str | None = None) -> ModelProfile:
    """The model profile of a trace: its own metadata where present, the named built-in otherwise.

    A trace recorded from Qwen3-30B-A3B (or Mixtral) takes the built-in geometry; any expert_bytes
    and expert_format in the trace override the native sizes. A trace of another model must carry
    expert_bytes and expert_weights so that the low-precision sizes can be computed. The trace's
    expert_bytes become `native_bytes_override` and its expert_format `native_names`; a tensor-aware
    low format takes ffn_down's native format from the profile's per-tensor formats or else from those
    names, whichever reproduces the pinned bytes, and is refused when neither does
    (`ModelProfile.down_format`).
    """
    if fallback is not None:
        get_model(fallback)  # an unknown --model is an error, never silently ignored
    name = (fallback or meta.model or "").lower()
    base = next((b for b in MODEL_BUILDERS if name.replace("_", "-").startswith(b)), None)
    if base is None:
        lacks = [k for k, v in (("expert_bytes", meta.expert_bytes), ("expert_weights", meta.expert_weights)) if not v]
        if lacks:
            raise InputError(
                None,
                f"trace model {meta.model!r} is not built in and the trace lacks {' and '.join(lacks)}; re-convert "
                "with python -m sim.convert ... --expert-weights N (weights per expert, a multiple of 256), or pass "
                f"--model for a trace of a built-in model ({', '.join(MODEL_BUILDERS)})",
            )
        if int(meta.expert_weights) % 256:
            raise InputError(None, f"trace meta expert_weights={meta.expert_weights} is not a multiple of 256 "
                                   "(one K-quant super-block); re-convert with a correct --expert-weights")
    if base is not None:
        prof = get_model(fallback or base)
        if (prof.n_layers, prof.n_experts) != (meta.n_layers, meta.n_experts):
            raise InputError(
                None,
                f"trace geometry {meta.n_layers} layers × {meta.n_experts} experts does not match model {prof.name}",
            )
    else:
        # A model known only from its trace: a single hidden×ffn split is not needed, only weights.
        weights = int(meta.expert_weights)
        prof = ModelProfile(
            name=meta.model,
            n_layers=meta.n_layers,
            n_experts=meta.n_experts,
            top_k=meta.top_k,
            hidden=weights // 3,
            expert_ffn=1,
            native_formats=tuple(("q4_k",) * 3 for _ in range(meta.n_layers)),
            dense_bytes=tuple(meta.dense_bytes or (0,) * meta.n_layers),
            head_bytes=int(meta.extra.get("head_bytes", 0)) if meta.extra else 0,
            kv_bytes_per_token=int(meta.extra.get("kv_bytes_per_token", 0)) if meta.extra else 0,
        )
    overrides = {}
    if meta.expert_bytes is not None:
        overrides["native_bytes_override"] = tuple(int(b) for b in meta.expert_bytes)
    if meta.expert_format is not None:
        overrides["native_names"] = tuple(meta.expert_format)
    if meta.dense_bytes is not None:
        overrides["dense_bytes"] = tuple(int(b) for b in meta.dense_bytes)
    if overrides:
        from dataclasses import replace

        prof = replace(prof, top_k=meta.top_k, **overrides)
    return prof


# ---------------------------------------------------------------------------------------------
# Hardware profiles
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HardwareProfile:
    """What moving and computing an expert costs on one GPU (read from sim/profiles/*.json)."""

    name: str
    source: str
    vram_bytes: int
    vram_gbps: float  # effective device-memory bandwidth, GB/s; prices the output head when not measured
    copy_engines: int
    transfer_fixed_s: float
    transfer_gbps: float
    curve_nbytes: np.ndarray | None  # measured single-copy times, when present
    curve_s: np.ndarray | None
    compute_shape_weights: int  # weights of the expert the compute table was measured on
    compute_tokens: np.ndarray  # token counts of the compute table
    compute_s: dict[str, np.ndarray]  # format -> seconds per expert call at each token count
    grouped_s: dict[str, np.ndarray]  # format -> seconds of one launch computing `grouped_experts` experts
    grouped_experts: int
    dense_tokens: np.ndarray
    dense_s: np.ndarray  # seconds per layer (attention + router + norms) at each token count
    dense_ref_bytes: int  # dense bytes of the layer the dense table was measured on (0: no scaling)
    runtime_reserve_bytes: int = 0
    raw: dict = field(default_factory=dict, repr=False)


def _array(doc: dict, key: str, path: Path) -> np.ndarray:
    try:
        arr = np.asarray(doc[key], dtype=np.float64)
    except KeyError:
        raise InputError(path, f"hardware profile lacks {key!r}") from None
    except (TypeError, ValueError):
        raise InputError(path, f"hardware profile {key!r} is not a list of numbers") from None
    if arr.ndim != 1 or arr.size == 0 or not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise InputError(path, f"hardware profile {key!r} must be a non-empty list of finite numbers ≥ 0")
    return arr


def load_hardware(name_or_path: str) -> HardwareProfile:
    """Load a hardware profile by built-in name (`rtx3060-12gb`) or JSON path; bad input → InputError."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PROFILE_DIR / f"{name_or_path}.json"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in PROFILE_DIR.glob("*.json")))
        raise InputError(path, f"no such hardware profile (built in: {known})")
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(path, f"cannot read hardware profile: {exc}") from None
    try:
        transfer = doc["transfer"]
        expert = doc["expert_compute"]
        dense = doc["dense_compute"]
        curve = transfer.get("curve")
        shape = expert.get("shape", {"hidden": 2048, "ffn": 768})
        tokens = _array(expert, "tokens", path)
        compute_s = {}
        for fmt in expert["seconds"]:
            arr = _array(expert["seconds"], fmt, path)
            if arr.size != tokens.size:
                raise InputError(path, f"expert_compute.seconds.{fmt} has {arr.size} values for {tokens.size} token counts")
            compute_s[fmt.lower()] = arr
        grouped_s = {}
        for fmt in expert.get("grouped_seconds") or {}:
            arr = _array(expert["grouped_seconds"], fmt, path)
            if arr.size != tokens.size:
                raise InputError(path, f"expert_compute.grouped_seconds.{fmt} has {arr.size} values for {tokens.size} token counts")
            grouped_s[fmt.lower()] = arr
        grouped_experts = int(expert.get("grouped_experts", 8))
        if grouped_s and grouped_experts < 2:
            raise InputError(path, "expert_compute.grouped_experts must be ≥ 2")
        dense_tokens = _array(dense, "tokens", path)
        dense_s = _array(dense, "seconds", path)
        if dense_s.size != dense_tokens.size:
            raise InputError(path, "dense_compute.seconds and tokens differ in length")
        prof = HardwareProfile(
            name=str(doc.get("name", path.stem)),
            source=str(doc.get("source", "")),
            vram_bytes=int(doc["vram_bytes"]),
            vram_gbps=float(doc.get("vram_gbps", doc.get("hbm_gbps", 0.0))),
            copy_engines=int(transfer.get("copy_engines", 1)),
            transfer_fixed_s=float(transfer["fixed_s"]),
            transfer_gbps=float(transfer["gbps"]),
            curve_nbytes=None if not curve else _array(curve, "nbytes", path),
            curve_s=None if not curve else _array(curve, "seconds", path),
            compute_shape_weights=3 * int(shape["hidden"]) * int(shape["ffn"]),
            compute_tokens=tokens,
            compute_s=compute_s,
            grouped_s=grouped_s,
            grouped_experts=grouped_experts,
            dense_tokens=dense_tokens,
            dense_s=dense_s,
            dense_ref_bytes=int(dense.get("ref_dense_bytes", 0)),
            runtime_reserve_bytes=int(doc.get("runtime_reserve_bytes", 0)),
            raw=doc,
        )
    except InputError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise InputError(path, f"malformed hardware profile: missing or bad field {exc}") from None
    if prof.transfer_gbps <= 0 or prof.copy_engines < 1:
        raise InputError(path, "transfer.gbps must be > 0 and copy_engines ≥ 1")
    if not prof.compute_s:
        raise InputError(path, "expert_compute.seconds is empty")
    return prof


def hardware_names() -> list[str]:
    """Names of the built-in hardware profiles."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.json"))


def parse_bytes(text: str) -> int:
    """Parse a byte count such as "9GiB", "9.5 GB", "4000MiB" or "123456"."""
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
    s = text.strip().lower().replace(" ", "")
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num):]
    if unit not in units or not num:
        raise InputError(None, f"cannot parse byte size {text!r} (use e.g. 9GiB, 9.5GB, 4000MiB)")
    try:
        value = float(num) * units[unit]
    except ValueError:
        raise InputError(None, f"cannot parse byte size {text!r}") from None
    if value < 0:
        raise InputError(None, f"byte size {text!r} is negative")
    return int(value)


def derived_expert_budget(model: ModelProfile, hw: HardwareProfile, context_tokens: int = 4096) -> int:
    """VRAM left for experts: VRAM − dense weights − output head − KV cache − runtime reserve."""
    dense = sum(model.dense_bytes) + model.head_bytes
    kv = model.kv_bytes_per_token * context_tokens
    return max(0, hw.vram_bytes - dense - kv - hw.runtime_reserve_bytes)


__all__ = [
    "FORMATS",
    "GIB",
    "LOW_FORMATS",
    "MIB",
    "HardwareProfile",
    "ModelProfile",
    "derived_expert_budget",
    "get_model",
    "hardware_names",
    "load_hardware",
    "model_for_trace",
    "parse_bytes",
    "parse_native_name",
    "use_more_bits",
]
