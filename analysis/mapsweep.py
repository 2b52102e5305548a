"""`python -m analysis.mapsweep`: the decision map's grid — models × VRAM × PCIe × natives × policies.

Issue 9's map: where does holding cold experts at low precision pay? Every configuration is one
`sim.simulate` replay of a synthesized trace with capacity pressure (several sequences, the first
`CALIB_SEQS` only for calibration, `sim.synth` presets of each model's geometry) on a hardware
profile derived by `sim.hwgrid` from `BASE_GPU` for one VRAM size and PCIe link, at the derived
expert budget (VRAM − dense − head − KV cache at `context` tokens − runtime reserve).

The grid is data: `PANELS` is a tuple of `MapPanel`s (each a Cartesian product) and `run_map` is
the one function that executes a list of them, so another executor (e.g. a Dask one) can run the
same `configs(panels)` list. Panels:
- `map` (scenario `base`): 3 models × {Q4_K_M, Q5_K_M} × VRAM 8/12/16/24 GiB × 4 links × slru ×
  `PRECISIONS`, plus lru × native and the static policies at 12 GiB Gen4 x16.
- `hobbit`: Qwen3-30B-A3B Q4_K_M at 12 GiB Gen4 x16: the `hobbit` cache policy and slru, each with
  and without prefetch (the trace's next-layer predictions, 80 % accurate), × native and HOBBIT's
  dynamic rule in both low-copy variants; and a T1/T2 grid for top-8 routing × {reload, serve}.
- sensitivity scenarios (`SCENARIOS`), 3 models × Q4_K_M × 12 and 16 GiB × Gen4 x16 × slru ×
  `PRECISIONS`: low-bit compute as slow as native (`lowbit-native-speed`), runtime reserve +1 GiB,
  context 16 k tokens, SLRU protected share 0.5, and PCIe at half the link's bandwidth
  (`pcie-half`, a 12.5 GB/s link named gen4x8 but tagged with the setting's gen4x16).
- `real` (when the phone recording is given): the real Qwen3 trace, 12 GiB Gen4 x16, slru ×
  `PRECISIONS`, resampled over blocks of 16 tokens (it is one sequence).

Static fractions are 25 % and 50 % (not 30 %) because those are the fractions whose quality the
48-layer model measured (results/quality-48l.json), so that the verdict has a KLD for each policy;
the tensor-aware `q2_k_gu` policies are the ones it measured as `static-mass-0.5-ta` and
`dynamic-0.6-0.9-ta`.

Replays that cannot depend on the link (no prefetch) are shared across links and computed once;
the timeline runs per link. Outputs (atomic): `NAME.csv` (one row per configuration), `NAME.units.csv`
(config_id, unit, tokens, time_s, hits, accesses: per sequence, for bootstrap intervals) and
`NAME.json` (provenance: trace commands and statistics, grid, command, wall time).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import shlex
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from sim import cost
from sim.budget import parse_budget
from sim.engine import CacheSpec, replay
from sim.hwgrid import LINKS, VRAM_GIB, derive
from sim.io import InputError, atomic_paths, check_output_path, exit_on_input_error
from sim.precision import SLOTS, parse_precision, static_slots
from sim.profiles import get_model
from sim.simulate import Prepared, ReplayConfig, summarize
from sim.synth import preset, pressure, synthesize
from sim.trace import Trace, load_trace

BASE_GPU = "rtx3060-12gb"
MODELS = ("qwen3-30b-a3b", "mixtral-8x7b", "qwen3-235b-a22b")
NATIVES = ("q4_k_m", "q5_k_m")
BASE_SCENARIO = "base"
DYN = "dynamic:0.6:0.9:q2_k"
DYN_SERVE = "dynamic:0.6:0.9:q2_k:serve"
DYN_GU = "dynamic:0.6:0.9:q2_k_gu"  # tensor-aware: ffn_gate/ffn_up at Q2_K, ffn_down kept native
STATICS = ("static:mass:25%:q2_k", "static:mass:50%:q2_k", "static:mass:50%:q3_k", "static:mass:50%:q2_k_gu")
PRECISIONS = ("native",) + STATICS + (DYN, DYN_SERVE, DYN_GU)
T1S, T2S = (0.3, 0.45, 0.6, 0.75), (0.8, 0.9, 0.95)
# the synthesized workload: SEQS sequences of PREFILL + DECODE tokens, the first CALIB_SEQS calibrate
SEQS, CALIB_SEQS, PREFILL, DECODE, SEED, PREDICT_ACCURACY = 8, 2, 16, 160, 0, 0.8
REAL_BLOCK = 16  # tokens per resampling block of the one-sequence phone recording
OUT_DIR = Path("results/sweeps/map")  # a folder of its own: analysis.report reads results/sweeps/*.csv as analysis.sweep output


@dataclass(frozen=True)
class MapPanel:
    """One Cartesian block: models × VRAM × links × cache policies × precisions × prefetch, one scenario."""

    name: str
    models: tuple[str, ...]  # model profile names, "qwen3-30b-a3b:q4_k_m"
    vram_gib: tuple[float, ...]
    links: tuple[str, ...]
    policies: tuple[str, ...]
    precisions: tuple[str, ...]
    prefetch: tuple[str, ...] = ("none",)
    scenario: str = BASE_SCENARIO
    protected_share: float | None = None  # slru's protected share (None: its default)
    reserve_extra_gib: float = 0.0  # added to the base profile's runtime reserve
    context: int = 4096
    lowbit_native_speed: bool = False  # price low-format compute at the native format's time
    link_scale: float = 1.0  # scale the link's bandwidth (the setting keeps the link's name)
    trace: str = "synth"  # "synth" (the model's preset) or "real" (the phone recording)


@dataclass(frozen=True)
class MapConfig:
    """One configuration of the map (one CSV row)."""

    panel: MapPanel
    model: str
    vram_gib: float
    link: str
    policy: str
    precision: str
    prefetch: str


def _models(natives=NATIVES, families=MODELS) -> tuple[str, ...]:
    return tuple(f"{m}:{n}" for m in families for n in natives)


Q4 = _models(("q4_k_m",))
SCENARIOS = (
    MapPanel("sens", Q4, (12, 16), ("gen4x16",), ("slru",), PRECISIONS, scenario="lowbit-native-speed",
             lowbit_native_speed=True),
    MapPanel("sens", Q4, (12, 16), ("gen4x16",), ("slru",), PRECISIONS, scenario="reserve+1GiB",
             reserve_extra_gib=1.0),
    MapPanel("sens", Q4, (12, 16), ("gen4x16",), ("slru",), PRECISIONS, scenario="context-16k", context=16384),
    MapPanel("sens", Q4, (12, 16), ("gen4x16",), ("slru",), PRECISIONS, scenario="slru-protected-0.5",
             protected_share=0.5),
    MapPanel("sens", Q4, (12, 16), ("gen4x16",), ("slru",), PRECISIONS, scenario="pcie-half", link_scale=0.5),
)
HOBBIT_PANELS = (
    MapPanel("hobbit", ("qwen3-30b-a3b:q4_k_m",), (12,), ("gen4x16",), ("hobbit", "slru"),
             ("native", DYN, DYN_SERVE), ("none", "trace")),
    MapPanel("t1t2", ("qwen3-30b-a3b:q4_k_m",), (12,), ("gen4x16",), ("slru",),
             ("native",) + tuple(f"dynamic:{a:g}:{b:g}:q2_k{s}" for a in T1S for b in T2S for s in ("", ":serve"))),
)
PANELS: tuple[MapPanel, ...] = (
    MapPanel("map", _models(), VRAM_GIB, tuple(LINKS), ("slru",), PRECISIONS),
    MapPanel("map", _models(), (12,), ("gen4x16",), ("lru",), ("native",) + STATICS),
    *HOBBIT_PANELS,
    *SCENARIOS,
)
REAL_PANEL = MapPanel("real", ("qwen3-30b-a3b:q4_k_m",), (12,), ("gen4x16",), ("slru",), PRECISIONS, trace="real")
QUICK_PANELS = (  # for tests: two precisions, two VRAM sizes, two links, a scenario
    MapPanel("map", ("mixtral-8x7b:q4_k_m",), (8, 12), ("gen3x16", "gen5x16"), ("slru", "lru"),
             ("native", "static:mass:50%:q2_k", DYN, DYN_SERVE)),
    MapPanel("sens", ("mixtral-8x7b:q4_k_m",), (12,), ("gen3x16",), ("slru",), ("native", "static:mass:50%:q2_k"),
             scenario="lowbit-native-speed", lowbit_native_speed=True),
)


def configs(panels) -> list[MapConfig]:
    """The configurations of `panels`, in a fixed order."""
    return [MapConfig(p, m, v, lk, pol, prec, pf) for p in panels for m in p.models for v in p.vram_gib
            for lk in p.links for pol in p.policies for prec in p.precisions for pf in p.prefetch]


def synth_args(family: str, seqs: int = SEQS, decode: int = DECODE, prefill: int = PREFILL) -> dict:
    """The sim.synth preset overrides of the map's trace for a model family."""
    return {"n_seqs": seqs, "prefill_tokens": prefill, "decode_tokens": decode, "seed": SEED,
                "predict_accuracy": PREDICT_ACCURACY}


def synth_command(family: str, **kw) -> str:
    a = synth_args(family, **kw)
    return (f"python -m sim.synth --model {family} --seqs {a['n_seqs']} --prefill {a['prefill_tokens']} "
            f"--decode {a['decode_tokens']} --seed {a['seed']} --predict-accuracy {a['predict_accuracy']} "
            f"--calib-seqs {CALIB_SEQS} -o TRACE.npz")


class _LowAsNative(cost.ComputeTable):
    """Compute priced as if every low format ran as fast as the native one (sensitivity scenario)."""

    def price(self, codes: np.ndarray, tok_vals: np.ndarray) -> np.ndarray:
        n_slots, n_tok = len(SLOTS), tok_vals.size
        rest, ti = np.divmod(np.asarray(codes), n_tok)
        return super().price((rest // n_slots * n_slots) * n_tok + ti, tok_vals)  # every slot priced as slot 0


def _reprice(prep: Prepared, hw, lowbit_native_speed: bool) -> Prepared:
    """`prep` on another hardware profile: same trace and groups, new copy times and compute table."""
    out = copy.copy(prep)
    out.hw = hw
    out.sizes, out.link_s = cost.slot_tables(prep.model, hw)
    out.compute = (_LowAsNative if lowbit_native_speed else cost.ComputeTable)(prep.model, hw)
    return out


def _hw(p: MapPanel, vram: float, link: str):
    base = derive(BASE_GPU, vram, link)
    reserve = base.runtime_reserve_bytes + int(p.reserve_extra_gib * 2**30)
    hw = derive(BASE_GPU, vram, link, runtime_reserve_bytes=reserve)
    if p.link_scale != 1.0:
        doc = copy.deepcopy(hw.raw)
        doc["transfer"]["gbps"] = float(doc["transfer"]["gbps"]) * p.link_scale
        fixed = float(doc["transfer"]["fixed_s"])
        curve = doc["transfer"].get("curve")
        if curve:
            curve["seconds"] = [fixed + (float(t) - fixed) / p.link_scale for t in curve["seconds"]]
        inflight = doc["transfer"].get("inflight")
        if inflight and "aggregate_gbps" in inflight:
            inflight["aggregate_gbps"] = [float(g) * p.link_scale for g in inflight["aggregate_gbps"]]
        hw = _load_doc(doc)
    return hw


def _load_doc(doc: dict):
    import tempfile

    from sim.profiles import load_hardware
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{doc['name']}.json"
        path.write_text(json.dumps(doc))
        return load_hardware(str(path))


def run_map(panels, traces: dict[str, Trace], *, quiet: bool = True) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Run `panels` on `traces` ({"qwen3-30b-a3b": Trace, ..., "real": Trace}); returns (rows, units, facts).

    A panel whose trace is missing is skipped (listed in facts["skipped"]); a setting whose VRAM holds
    every expert is listed in facts["fits"] and has no rows.
    """
    rows, unit_rows = [], []
    facts: dict = {"skipped": [], "fits": [], "pressure": {}}
    preps: dict = {}
    outcomes: dict = {}
    cfgs = configs(panels)
    t0 = time.perf_counter()
    for i, c in enumerate(cfgs):
        p = c.panel
        family = "real" if p.trace == "real" else c.model.split(":")[0]
        trace = traces.get(family)
        if trace is None:
            facts["skipped"].append(f"{p.name}/{c.model}: no trace")
            continue
        model = get_model(c.model)
        hw = _hw(p, c.vram_gib, c.link)
        capacity = parse_budget("vram", option="budget").resolve(model, hw, p.context)
        setting = f"{c.model} {c.vram_gib:g}GiB"
        if capacity is None:
            if (p.scenario, setting) not in facts["fits"]:
                facts["fits"].append((p.scenario, setting))
            continue
        calib = CALIB_SEQS / len(set(trace.seq.tolist())) if family != "real" else 0.25
        pkey = (family, c.model, c.prefetch)
        if pkey not in preps:
            preps[pkey] = Prepared(trace, model, derive(BASE_GPU, 12, "gen4x16"), calib_fraction=calib, ubatch=512,
                                   prefetch=c.prefetch, seed=SEED, context=p.context)
        prep = _reprice(preps[pkey], hw, p.lowbit_native_speed)
        prep.context = p.context
        if family != "real" and (p.scenario, setting) not in facts["pressure"]:
            pr = pressure(trace, capacity, model.native_bytes_per_layer(), CALIB_SEQS)
            facts["pressure"][(p.scenario, setting)] = round(pr["touched_over_fit"], 3)
        params = {} if p.protected_share is None or c.policy != "slru" else {"protected_share": p.protected_share}
        pol = parse_precision(c.precision)
        okey = (pkey, capacity, c.policy, tuple(params.items()), pol.name)
        out = outcomes.get(okey) if c.prefetch == "none" else None
        if out is None:
            slots = static_slots(prep.calib_trace, pol, model.n_layers, model.n_experts, SEED)
            spec = CacheSpec(c.policy, int(capacity), "global", model.n_layers, params)
            out = replay(prep.groups, spec, pol, slots, prep.sizes, prep.link_s)
            if c.prefetch == "none":
                outcomes[okey] = out
        cfg = ReplayConfig(trace=trace, policy=c.policy, precision=pol, prefetch=c.prefetch, context=p.context,
                           calib_fraction=calib, policy_params=params,
                           unit_block=REAL_BLOCK if family == "real" else ReplayConfig.unit_block)
        rec = summarize(prep, cfg, pol.name, capacity, out).as_dict()
        units = rec.pop("units")
        cid = len(rows)
        rows.append({
            "config_id": cid, "panel": p.name, "scenario": p.scenario, "trace": family,
            "model": c.model.split(":")[0], "native": c.model.split(":")[1], "vram_gb": c.vram_gib, "pcie": c.link,
            "policy": c.policy, "protected_share": p.protected_share if c.policy == "slru" else None,
            "prefetch": c.prefetch, "precision": pol.name, "low_copy": pol.low_copy if pol.is_dynamic else "",
            "capacity_bytes": int(capacity), "capacity_fraction": rec["capacity_fraction"],
            "hit_rate": rec["hit_rate"], "tokens_per_s": rec["tokens_per_s"], "stall_fraction": rec["stall_fraction"],
            "bytes_per_token": rec["bytes_per_token"], "low_precision_mass": rec["low_precision_mass"],
            "skipped_mass": rec["skipped_mass"], "tokens": rec["tokens"], "accesses": rec["accesses"],
        })
        for u, tok, ts, h, a in zip(units["unit"], units["tokens"], units["time_s"], units["hits"], units["accesses"]):
            unit_rows.append({"config_id": cid, "unit": u, "tokens": tok, "time_s": ts, "hits": h, "accesses": a})
        if not quiet and (i % 20 == 0 or i == len(cfgs) - 1):
            print(f"  [{i + 1}/{len(cfgs)}] {time.perf_counter() - t0:.0f} s {p.name}/{p.scenario} {c.model} "
                  f"{c.vram_gib:g} {c.link} {c.policy} {pol.name} {c.prefetch}", file=sys.stderr, flush=True)
    facts["fits"] = [f"{s}: {x}" for s, x in facts["fits"]]
    facts["pressure"] = {f"{s}: {x}": v for (s, x), v in facts["pressure"].items()}
    return pd.DataFrame(rows), pd.DataFrame(unit_rows, columns=["config_id", "unit", "tokens", "time_s", "hits",
                                                                "accesses"]), facts


def _csv(frame: pd.DataFrame) -> str:
    return frame.to_csv(index=False, lineterminator="\n", float_format="%.8g")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m analysis.mapsweep", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="map", help="output name: OUT/NAME.csv, NAME.units.csv, NAME.json")
    ap.add_argument("--out", default=str(OUT_DIR))
    ap.add_argument("--panels", default="all",
                    help="comma list of panel groups: map, hobbit, sens, real, or all (default), or quick")
    ap.add_argument("--models", default="", help="comma list of model families to keep (default: all); "
                    "lets a long grid run as several processes whose NAME.csv files the report joins")
    ap.add_argument("--real", default="", help="the phone recording as a .npz trace (sim.convert); skipped if absent")
    ap.add_argument("--real-cmd", default="", help="how --real was made (recorded in NAME.json)")
    ap.add_argument("-q", "--quiet", action="store_true")
    return ap


GROUPS = {"map": PANELS[:2], "hobbit": HOBBIT_PANELS, "sens": SCENARIOS, "real": (REAL_PANEL,)}


@exit_on_input_error
def main(argv=None) -> pd.DataFrame:
    a = build_parser().parse_args(argv)
    names = ["map", "hobbit", "sens", "real"] if a.panels == "all" else [x.strip() for x in a.panels.split(",")]
    if names == ["quick"]:
        panels = QUICK_PANELS
    else:
        bad = [n for n in names if n not in GROUPS]
        if bad:
            raise InputError(None, f"--panels: unknown {bad}; use {', '.join(GROUPS)}, all or quick")
        panels = tuple(p for n in names for p in GROUPS[n])
    if a.models:
        keep = {m.strip() for m in a.models.split(",") if m.strip()}
        panels = tuple(replace(p, models=tuple(m for m in p.models if m.split(":")[0] in keep)) for p in panels)
    out = Path(a.out)
    paths = [out / f"{a.name}.csv", out / f"{a.name}.units.csv", out / f"{a.name}.json"]
    for path in paths:
        check_output_path(path, "--out")
    t0 = time.perf_counter()
    families = sorted({m.split(":")[0] for p in panels if p.trace == "synth" for m in p.models})
    traces: dict[str, Trace] = {}
    prov_traces = {}
    for f in families:
        tr = synthesize(preset(f, **synth_args(f)))
        traces[f] = tr
        prov_traces[f] = {"command": synth_command(f), "steps": int(tr.n_steps), "sequences": SEQS,
                          "calib_seqs": CALIB_SEQS, "decode_per_seq": DECODE, "prefill_per_seq": PREFILL,
                          "sha256": hashlib.sha256(tr.experts.tobytes() + tr.weights.tobytes()).hexdigest()[:16]}
    if any(p.trace == "real" for p in panels) and a.real and Path(a.real).exists():
        traces["real"] = load_trace(a.real)
        prov_traces["real"] = {"command": a.real_cmd, "file": Path(a.real).name,
                               "steps": int(traces["real"].n_steps), "block_tokens": REAL_BLOCK,
                               "sha256": hashlib.sha256(Path(a.real).read_bytes()).hexdigest()[:16]}
    rows, units, facts = run_map(panels, traces, quiet=a.quiet)
    prov = {
        "command": "python -m analysis.mapsweep " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "base_gpu": BASE_GPU, "traces": prov_traces, "panels": [asdict(p) for p in panels],
        "configs": len(rows), "wall_s": round(time.perf_counter() - t0, 1), "cores": 1, **facts,
    }
    with atomic_paths(paths, make_parents=True) as tmps:
        tmps[0].write_text(_csv(rows))
        tmps[1].write_text(_csv(units))
        tmps[2].write_text(json.dumps(prov, indent=1, sort_keys=True, default=str) + "\n")
    if not a.quiet:
        print(f"wrote {paths[0]} ({len(rows)} configurations) in {prov['wall_s']} s", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
