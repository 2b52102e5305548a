"""The cost model: each cost is a small named term, a pure function of a hardware profile.

transfer_s(nbytes): host→device copy of one expert. With a measured curve, piecewise-linear
interpolation between measured sizes (fixed + bytes/bandwidth below the smallest and above the
largest); otherwise fixed_s + nbytes / bandwidth.
expert_compute_s(format, tokens, weights): one expert's SwiGLU FFN, linear interpolation over the
measured token counts, scaled linearly by weights against the measured expert shape (decode
kernels are bandwidth-bound, so time tracks bytes). A format the profile lacks (a mixed
native format such as "q4_k+q6_k_down") is priced from the nearest measured format by bytes.
expert_launch_split: when the profile also measured one launch of G experts, a layer's experts of
one format cost a fixed launch part plus a per-expert part (see its docstring).
tensor_aware_split: a tensor-aware low copy (`q2_k_gu`: gate/up low, ffn_down native) is priced as
2/3 of its gate/up format's split plus 1/3 of its native down format's (see its docstring).
dense_s(tokens, dense_bytes): attention, router and norms of one layer, scaled by dense bytes.
head_s(head_bytes): output head of one decoded token at the profile's device bandwidth.

Pricing a replay: `slot_tables` gives the bytes and copy-engine seconds of one expert per layer and
format slot (sim.precision.SLOTS), `ComputeTable` the compute seconds per (layer, slot, tokens), and
`group_costs` assembles an engine outcome into the per-group costs the timeline schedules.
"""
from __future__ import annotations

import numba
import numpy as np

from sim.engine import LOADED, SKIPPED, UNPRICED, AccessGroups, Outcome
from sim.formats import FORMATS
from sim.precision import LOW_FORMATS, SLOTS, gate_up_format
from sim.profiles import HardwareProfile, ModelProfile
from sim.timeline import GroupCosts, TimelineModel

GB = 1e9  # bandwidths are in GB/s = 1e9 bytes/s
N_SLOTS = len(SLOTS)


def transfer_s(hw: HardwareProfile, nbytes: int | np.ndarray) -> np.ndarray | float:
    """Seconds for one host→device copy of `nbytes` on an idle copy engine."""
    nbytes = np.asarray(nbytes, dtype=np.float64)
    linear = hw.transfer_fixed_s + nbytes / (hw.transfer_gbps * GB)
    if hw.curve_nbytes is None:
        out = linear
    else:
        inside = np.interp(nbytes, hw.curve_nbytes, hw.curve_s)
        out = np.where((nbytes >= hw.curve_nbytes[0]) & (nbytes <= hw.curve_nbytes[-1]), inside, linear)
    return float(out) if out.ndim == 0 else out


def _bytes_per_weight(fmt: str) -> float:
    f = FORMATS[fmt]
    return f.block_bytes / f.block_weights


def _table_s(hw: HardwareProfile, table: dict[str, np.ndarray], fmt: str, tokens: int, weights: int,
             nbytes: int | None) -> float:
    """Interpolate a per-format table over tokens; scale by weights; price unmeasured formats by bytes."""
    scale = weights / hw.compute_shape_weights
    if fmt in table:
        return float(np.interp(tokens, hw.compute_tokens, table[fmt])) * scale
    # Unmeasured (mixed) format: price it by bytes against the measured format nearest in bytes/weight.
    bpw = (nbytes / weights) if nbytes else _bytes_per_weight(fmt.split("+")[0])
    measured = [f for f in table if f in FORMATS]
    nearest = min(measured, key=lambda f: abs(_bytes_per_weight(f) - bpw))
    base = float(np.interp(tokens, hw.compute_tokens, table[nearest])) * scale
    return base * bpw / _bytes_per_weight(nearest)


def expert_compute_s(hw: HardwareProfile, fmt: str, tokens: int, weights: int, nbytes: int | None = None) -> float:
    """Seconds to compute one expert of `weights` weights in `fmt` for `tokens` tokens (its own launch)."""
    return _table_s(hw, hw.compute_s, fmt, tokens, weights, nbytes)


def expert_launch_split(hw: HardwareProfile, fmt: str, tokens: int, weights: int,
                        nbytes: int | None = None) -> tuple[float, float]:
    """(per-launch, per-expert) seconds of a grouped expert launch in `fmt`.

    With single-expert time s and G-expert grouped time g measured, a launch of n experts costs
    a + n·b with b = (g − s)/(G − 1) and a = s − b: a latency-bound kernel has b ≈ 0, a bandwidth-
    bound one a ≈ 0. Without grouped measurements every expert is its own launch (a = 0, b = s).
    """
    single = expert_compute_s(hw, fmt, tokens, weights, nbytes)
    if not hw.grouped_s:
        return 0.0, single
    grouped = _table_s(hw, hw.grouped_s, fmt, tokens, weights, nbytes)
    per_expert = min(single, max(0.0, (grouped - single) / (hw.grouped_experts - 1)))
    return single - per_expert, per_expert


def tensor_aware_split(hw: HardwareProfile, gate_up: str, down: str, tokens: int, weights: int) -> tuple[float, float]:
    """(per-launch, per-expert) seconds of a tensor-aware expert: ffn_gate/ffn_up in `gate_up`, ffn_down in `down`.

    2/3 of `gate_up`'s split plus 1/3 of `down`'s, each from the profile's measured per-format tables
    (`expert_launch_split`; a format the profile lacks falls back as there, by bytes). Why: the FFN is
    three matrix products of hidden·ffn weights each (gate and up, then down), run as format-specific
    kernels whose time tracks their own tensor's bytes at their own format's measured speed, and the
    tables are per whole expert (three tensors); so each tensor costs a third of its format's expert
    time. Pricing the mix by its total bytes against the nearest measured format (what `_table_s`
    does for an unmeasured name) would charge the Q2_K gate/up tensors Q4_K's per-byte speed, or the
    Q4_K/Q6_K down tensor Q2_K's, depending on which format the mixed size happens to lie nearest.
    """
    lo_launch, lo_expert = expert_launch_split(hw, gate_up, tokens, weights)
    dn_launch, dn_expert = expert_launch_split(hw, down, tokens, weights)
    return (2 * lo_launch + dn_launch) / 3, (2 * lo_expert + dn_expert) / 3


def dense_s(hw: HardwareProfile, tokens: int, dense_bytes: int) -> float:
    """Seconds for one layer's attention, router and norms over `tokens` tokens."""
    base = float(np.interp(tokens, hw.dense_tokens, hw.dense_s))
    if hw.dense_ref_bytes and dense_bytes:
        return base * dense_bytes / hw.dense_ref_bytes
    return base


def dense_s_per_group(hw: HardwareProfile, tokens: np.ndarray, dense_bytes: np.ndarray) -> np.ndarray:
    """`dense_s` for arrays of groups (the same arithmetic, element by element)."""
    base = np.interp(tokens, hw.dense_tokens, hw.dense_s)
    if hw.dense_ref_bytes:
        return np.where(dense_bytes != 0, base * dense_bytes / hw.dense_ref_bytes, base)
    return base


def head_s(hw: HardwareProfile, head_bytes: int) -> float:
    """Seconds to read the output head once (per decoded token)."""
    return head_bytes / (hw.vram_gbps * GB) if hw.vram_gbps > 0 else 0.0



def _slot_bytes(model: ModelProfile, layer: int, fmt: str) -> int:
    try:
        return model.expert_bytes(layer, fmt)
    except ValueError:
        if gate_up_format(fmt) is None:
            raise
        return UNPRICED  # a tensor-aware format whose native down format is unknown (ModelProfile.down_format)


def slot_tables(model: ModelProfile, hw: HardwareProfile) -> tuple[np.ndarray, np.ndarray]:
    """Bytes and copy-engine seconds of one expert of each layer in each format slot ([layers, slots]).

    A tensor-aware slot the model cannot size (`ModelProfile.down_format` raises: pinned native
    sizes that no known tensor split reproduces) holds UNPRICED bytes and NaN seconds, so that
    policies without it still run; `sim.engine.check_priced` (called by sim.engine.replay and sim.simulate)
    refuses a policy that uses it.
    """
    sizes = np.array(
        [[model.expert_bytes(layer)] + [_slot_bytes(model, layer, f) for f in LOW_FORMATS] for layer in range(model.n_layers)],
        dtype=np.int64,
    )
    # Several copy engines overlap the fixed per-copy cost; the link's bandwidth stays shared.
    overlap = hw.transfer_fixed_s * (1 - 1 / hw.copy_engines)
    link = np.asarray(transfer_s(hw, sizes.astype(np.float64))) - overlap
    link[sizes == UNPRICED] = np.nan
    return sizes, link



class ComputeTable:
    """Compute seconds of expert accesses, each distinct (layer, slot, tokens) priced once and memoised."""

    def __init__(self, model: ModelProfile, hw: HardwareProfile):
        self.model, self.hw = model, hw
        self._memo: dict[tuple[int, int, int], tuple[float, float]] = {}

    def price(self, codes: np.ndarray, tok_vals: np.ndarray) -> np.ndarray:
        """float64 [len(codes), 2]: (per-launch, per-expert) seconds of each code (layer, slot, token index)."""
        out = np.zeros((codes.size, 2))
        n_slots, n_tok = len(SLOTS), tok_vals.size
        for i, c in enumerate(codes.tolist()):
            rest, ti = divmod(c, n_tok)
            lay, s = divmod(rest, n_slots)
            key = (lay, s, int(tok_vals[ti]))
            if key not in self._memo:
                self._memo[key] = self.split(lay, s, key[2])
            out[i] = self._memo[key]
        return out

    def split(self, layer: int, slot: int, tokens: int) -> tuple[float, float]:
        """(per-launch, per-expert) seconds of one expert of `layer` in format slot `slot` for `tokens` tokens."""
        model, weights = self.model, self.model.expert_weights
        gate_up = gate_up_format(SLOTS[slot])
        if gate_up is not None:  # tensor-aware: gate/up low, ffn_down at the layer's native format
            return tensor_aware_split(self.hw, gate_up, model.down_format(layer), tokens, weights)
        if slot == 0:
            fmt, nbytes = model.native_name(layer), model.expert_bytes(layer)
        else:
            fmt, nbytes = SLOTS[slot], model.expert_bytes(layer, SLOTS[slot])
        return expert_launch_split(self.hw, fmt, tokens, weights, nbytes)


@numba.njit(cache=True)
def _mark_codes(start, layer, result, slot, acc_tokens, tok_index, n_tok, used):  # pragma: no cover - compiled
    """used[code] = True for the (layer, slot, token index) of every served access."""
    for g in range(layer.shape[0]):
        for a in range(start[g], start[g + 1]):
            if result[a] != SKIPPED:
                used[(layer[g] * N_SLOTS + slot[a]) * n_tok + tok_index[acc_tokens[a]]] = True


@numba.njit(cache=True)
def _price_groups(start, layer, result, slot, acc_tokens, tok_index, n_tok, table, link_s, split,
                  compute, link, resident, jobs):  # pragma: no cover - compiled
    """Per group, in access order: summed compute (launch part once per slot) and demand link seconds.

    `split`: resident and missing experts of one slot are separate launches (an engine that launches
    its hits before its misses land), and `resident` gets the hits' part of the compute. `jobs`: the
    number of slots with a miss in the group."""
    seen = np.full(2 * N_SLOTS, -1, np.int64)
    seen_miss = np.full(N_SLOTS, -1, np.int64)
    for g in range(layer.shape[0]):
        la = layer[g]
        for a in range(start[g], start[g + 1]):
            r = result[a]
            if r == SKIPPED:
                continue
            s = slot[a]
            launch = 2 * s + (1 if split and r == LOADED else 0)
            c = (la * N_SLOTS + s) * n_tok + tok_index[acc_tokens[a]]
            part = table[c, 1] + (table[c, 0] if seen[launch] != g else 0.0)
            compute[g] += part
            seen[launch] = g
            if r == LOADED:
                link[g] += link_s[la, s]
                if seen_miss[s] != g:
                    jobs[g] += 1
                    seen_miss[s] = g
            elif split:
                resident[g] += part


def group_costs(groups: AccessGroups, outcome: Outcome, model: ModelProfile, hw: HardwareProfile,
                link_s: np.ndarray, compute: ComputeTable, acc_layer: np.ndarray, decode_only: bool,
                tl: TimelineModel | None = None) -> GroupCosts:
    """The per-group costs (sim.timeline.GroupCosts) of an engine outcome.

    Demand copies are the loaded accesses' link times; compute is each served access's per-expert
    time plus, once per (group, slot), the launch's fixed part (a group's served experts of one
    format share one launch); the output head runs after a token's last layer; dense time per
    layer and group (`decode_only`: every group has one token, priced once per layer). One
    compiled pass over the accesses (linear, no sort); each distinct (layer, slot, tokens) is
    priced once. `acc_layer` is unused (kept for callers). With `tl.overlap_resident` or
    `tl.split_launches` a group's resident and missing experts are separate launches and
    `resident_compute_s` holds the former. With `tl.copy_job_per_format` every format with misses
    beyond the first adds `tl.copy_job_fixed_s` to the group's demand link seconds (the timeline adds
    the first one to every demand job).
    """
    g = groups
    tokens = g.acc_tokens
    present = np.zeros(int(tokens.max()) + 1 if tokens.size else 1, dtype=bool)
    present[tokens] = True
    tok_vals = np.flatnonzero(present)
    tok_index = np.cumsum(present) - 1
    used = np.zeros(model.n_layers * N_SLOTS * tok_vals.size, dtype=bool)
    _mark_codes(g.start, g.layer, outcome.result, outcome.slot, tokens, tok_index, tok_vals.size, used)
    table = np.zeros((used.size, 2))
    codes = np.flatnonzero(used)
    table[codes] = compute.price(codes, tok_vals)
    comp = np.zeros(g.n_groups)
    link = np.zeros(g.n_groups)
    split = bool(tl is not None and tl.separate_miss_launch)
    resident = np.zeros(g.n_groups)
    jobs = np.zeros(g.n_groups, np.int64)
    _price_groups(g.start, g.layer, outcome.result, outcome.slot, tokens, tok_index, tok_vals.size, table,
                  np.ascontiguousarray(link_s, dtype=np.float64), split, comp, link, resident, jobs)
    if tl is not None and tl.copy_job_per_format:
        link = link + np.maximum(jobs - 1, 0) * tl.copy_job_fixed_s
    head = head_s(hw, model.head_bytes)
    if decode_only:
        per_layer = np.array([dense_s(hw, 1, int(b)) for b in model.dense_bytes])
        dense = per_layer[g.layer]
    else:
        dense = dense_s_per_group(hw, g.tokens, np.asarray(model.dense_bytes)[g.layer])
    return GroupCosts(
        dense_s=dense,
        compute_s=comp + np.where(g.token_end, head, 0.0),
        demand_link_s=link,
        prefetch_link_s=outcome.prefetch_link_s,
        wait_group=outcome.wait_group,
        resident_compute_s=resident if split else None,
    )
