"""`python -m analysis.sweep TRACE --name NAME`: the decision document's grid of simulations.

Every configuration of the grid is one task (`sim.simulate.run_prepared` on the trace prepared once
per process and GPU). `--scheduler local` (the default) runs the tasks on a Dask LocalCluster (one
single-threaded worker process per core, a progress bar on a terminal); `--scheduler tcp://HOST:8786`
on an existing dask.distributed cluster (several machines: docs/performance.md); `--scheduler serial`
in this process without Dask. The trace is sent to every worker once (`Client.scatter(...,
broadcast=True)`), not with each task; results are gathered in grid order, so every scheduler writes
byte-identical files (tests/test_sweep_dask.py). The grid is a union of panels, each a Cartesian product of
GPUs × cache policies × precision policies × expert budgets; a configuration that two panels share
runs once, and `belady` runs only with native/static precision (it needs the future access
sequence, which dynamic skips change online; `sim.simulate.incompatible` says which pairs cannot run).

Default grid (`GRIDS["default"]`; PRIMARY is the first `--gpu`, default rtx3060-12gb):
- `budget` (PRIMARY): slru × budgets 10 %…90 % of all experts and the VRAM-derived 12 GB budget ×
  native, static:mass:30 %:{q2_k,q3_k}, dynamic:0.6:0.9, static:mass:20 %:q3_k+dynamic:0.6:0.9;
  lru × the same budgets × native and the two static policies.
- `policies` (PRIMARY): s3fifo and belady × budgets 20 %, 40 % and the derived one × native and
  static:mass:30 %:{q2_k,q3_k}.
- `precision` (PRIMARY): slru × the derived budget and 30 % × native, every
  static:{mass,freq,weight,random}:{10,20,30,50}%:{q2_k,q3_k}, dynamic:0.6:0.9[:q3_k], and
  static:mass:{20,30}%:q3_k+dynamic:0.6:0.9.
- `gpus` (every `--gpu`): slru × budgets 10 %…90 % and the derived one × native,
  static:mass:30 %:{q2_k,q3_k}, dynamic:0.6:0.9.
- `slru-share` (PRIMARY): slru with protected share 0, 0.2, 0.5 and 0.8 (0.8 is SLRU's default,
  so those rows are the `budget` panel's) × budgets 10 %…90 % and the derived one × native and
  static:mass:30 %:q2_k. Share 0 is exactly LRU (`sim/cache/slru.py`).

`--quick` (`GRIDS["quick"]`, for tests): slru and lru × 30 % and the derived budget × native,
static:mass:30 %:q2_k, dynamic:0.6:0.9, plus belady native at 30 % and slru with protected share 0
and 0.5 native at 30 %, on every `--gpu`.

SLRU's protected share is a column of its own, `protected_share` (the last one): the share of the
capacity its protected segment may hold, written for every slru row (its default, 0.8, unless a
panel sets `protected_shares`) and empty for every other cache policy. The `policy` column stays the
plain policy name, so a consumer that wants the engine's configuration filters slru rows on
`protected_share == 0.8` (`DEFAULT_PROTECTED_SHARE`, from `sim.cache.slru`).

Budget labels are parsed by `sim.budget.parse_budget`: `N%` of all expert bytes (kind `fraction`)
or `vram`, the derived budget (kind `derived`): VRAM − dense − head − KV cache at 4 k tokens −
runtime reserve; a GPU whose VRAM holds every expert has none and skips it.

Outputs (atomically, byte-identical for the same inputs): `results/sweeps/NAME.csv`, one row per
configuration with the columns of `SWEEP_COLUMNS`, derived from the fields of `sim.simulate.ReplayRecord` and
`sim.precision.PrecisionPolicy` (panels run in order, so a panel added at the end
of a grid appends rows and leaves earlier config_ids alone); `NAME.per_layer.csv`, long form
(config_id, layer, hit_rate); `NAME.json`, the provenance (trace, its metadata, grid, command).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import pandas as pd

from sim.budget import DERIVED, FRACTION, VRAM, parse_budget
from sim.cache.slru import DEFAULT_PROTECTED_SHARE
from sim.io import InputError, atomic_paths, check_output_path, exit_on_input_error
from sim.precision import PrecisionPolicy, parse_precision
from sim.profiles import load_hardware, model_for_trace
from sim.simulate import RECORD_FIELDS, Prepared, ReplayConfig, incompatible, prepare, run_prepared
from sim.trace import Trace, load_trace

OUT_DIR = Path("results/sweeps")
FRACTIONS = tuple(f"{p}%" for p in range(10, 100, 10))
SIGNALS = ("mass", "freq", "weight", "random")
STATIC_FRACTIONS = ("10%", "20%", "30%", "50%")
LOW = ("q2_k", "q3_k")
DYN = "dynamic:0.6:0.9"
STATIC_GRID = tuple(f"static:{s}:{f}:{fmt}" for s in SIGNALS for f in STATIC_FRACTIONS for fmt in LOW)
PRIMARY = "primary"  # a panel's gpus entry meaning "the first --gpu"
ALL_GPUS = "all"  # "every --gpu"
SHARED_POLICY = "slru"  # the cache policy whose protected share a panel may sweep
PROTECTED_SHARES = (0.0, 0.2, 0.5, DEFAULT_PROTECTED_SHARE)

# Columns of NAME.csv in order: sweep bookkeeping, then the fields of sim.simulate.ReplayRecord
# without its per-layer list, with the parsed precision policy's fields (to join with the quality
# measurements) right after `precision`, then SLRU's protected share (last, so that adding it left
# the earlier columns of every row as they were).
BOOKKEEPING_COLUMNS = ("config_id", "trace", "budget", "budget_kind")
PRECISION_COLUMNS = tuple(f.name for f in fields(PrecisionPolicy) if f.name not in ("low_pool_share", "low_copy"))
_RECORD = tuple(n for n in RECORD_FIELDS if n not in ("per_layer_hit_rate", "units"))
_AFTER = _RECORD.index("precision") + 1
SWEEP_COLUMNS = BOOKKEEPING_COLUMNS + _RECORD[:_AFTER] + PRECISION_COLUMNS + _RECORD[_AFTER:] + ("protected_share",)
PER_LAYER_COLUMNS = ("config_id", "layer", "hit_rate")


@dataclass(frozen=True)
class Panel:
    """One Cartesian block of the grid: gpus × policies × precisions × budgets."""

    name: str
    gpus: str  # PRIMARY or ALL_GPUS
    policies: tuple[str, ...]
    precisions: tuple[str, ...]
    budgets: tuple[str, ...]  # "30%" (of all expert bytes) or VRAM
    protected_shares: tuple[float, ...] = ()  # slru only: its protected shares; () = its default


BASIC = ("native", "static:mass:30%:q2_k", "static:mass:30%:q3_k")
GRIDS: dict[str, tuple[Panel, ...]] = {
    "default": (
        Panel("budget", PRIMARY, ("slru",), BASIC + (DYN, f"static:mass:20%:q3_k+{DYN}"), FRACTIONS + (VRAM,)),
        Panel("budget", PRIMARY, ("lru",), BASIC, FRACTIONS + (VRAM,)),
        Panel("policies", PRIMARY, ("s3fifo", "belady"), BASIC, ("20%", "40%", VRAM)),
        Panel("precision", PRIMARY, ("slru",),
              ("native",) + STATIC_GRID + (DYN, f"{DYN}:q3_k", f"static:mass:20%:q3_k+{DYN}",
                                           f"static:mass:30%:q3_k+{DYN}"),
              (VRAM, "30%")),
        Panel("gpus", ALL_GPUS, ("slru",), BASIC + (DYN,), FRACTIONS + (VRAM,)),
        Panel("slru-share", PRIMARY, ("slru",), BASIC[:2], FRACTIONS + (VRAM,), PROTECTED_SHARES),
    ),
    "quick": (
        Panel("quick", ALL_GPUS, ("slru", "lru"), ("native", "static:mass:30%:q2_k", DYN), ("30%", VRAM)),
        Panel("quick", ALL_GPUS, ("belady",), ("native",), ("30%",)),
        Panel("quick", ALL_GPUS, ("slru",), ("native",), ("30%",), (0.0, 0.5)),
    ),
}
DEFAULT_GPUS = ("rtx3060-12gb", "rtx4070-12gb")
SERIAL, LOCAL = "serial", "local"  # --scheduler values besides a Dask scheduler address


@dataclass(frozen=True)
class SweepConfig:
    """One configuration of the grid, before its budget is turned into bytes."""

    gpu: str
    policy: str
    precision: str
    budget: str
    protected_share: float | None = None  # slru: its protected share (always set); other policies: None

    @property
    def policy_params(self) -> dict:
        """The cache policy's keyword arguments (none at the policy's defaults)."""
        if self.protected_share is None or self.protected_share == DEFAULT_PROTECTED_SHARE:
            return {}
        return {"protected_share": self.protected_share}


def _shares(panel: Panel, policy: str) -> tuple[float | None, ...]:
    """The protected shares a panel runs `policy` with: slru always has one, other policies none."""
    if policy != SHARED_POLICY:
        return (None,)
    shares = tuple(float(x) for x in panel.protected_shares) or (DEFAULT_PROTECTED_SHARE,)
    bad = [x for x in shares if not 0.0 <= x <= 1.0]
    if bad:
        raise InputError(None, f"panel {panel.name!r}: protected share(s) {bad} outside [0, 1]")
    return shares


def expand_grid(panels: tuple[Panel, ...], gpus: tuple[str, ...]) -> list[SweepConfig]:
    """The grid's configurations in a fixed order, duplicates and belady+dynamic removed."""
    out: dict[SweepConfig, None] = {}
    for p in panels:
        for gpu in (gpus[:1] if p.gpus == PRIMARY else gpus):
            for budget in p.budgets:
                for pol in p.policies:
                    for share in _shares(p, pol):
                        for prec in p.precisions:
                            if incompatible(pol, parse_precision(prec)):
                                continue
                            out.setdefault(SweepConfig(gpu, pol, prec, budget, share), None)
    return list(out)


def budget_bytes(prep: Prepared, budget: str) -> int | None:
    """Expert budget in bytes for a label (`30%` of all expert bytes, or `vram`); None if not applicable."""
    parsed = parse_budget(budget, option="budget label")
    if parsed.kind not in (FRACTION, DERIVED):
        raise InputError(None, f"budget label {budget!r}: use N% or {VRAM}")
    return parsed.resolve(prep.model, prep.hw, prep.context)


def precision_columns(p: PrecisionPolicy) -> dict:
    """The parsed fields of a precision policy as flat columns (NaN/None where not used)."""
    used = {"static_signal": p.is_static, "static_fraction": p.is_static, "static_format": p.is_static,
            "t1": p.is_dynamic, "t2": p.is_dynamic, "dynamic_format": p.is_dynamic}
    numeric = {"static_fraction", "t1", "t2"}
    return {c: getattr(p, c) if used[c] else (float("nan") if c in numeric else None) for c in PRECISION_COLUMNS}


def _progress(total: int, quiet: bool):
    """A context manager yielding `advance(label)`: a rich bar on a terminal, else sparse lines."""
    import contextlib

    @contextlib.contextmanager
    def cm():
        if quiet:
            yield lambda label: None
            return
        if sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TimeRemainingColumn(), transient=True) as bar:
                task = bar.add_task("sweep", total=total)

                def adv(label: str) -> None:
                    bar.update(task, advance=1, description=label[:48])
                yield adv
            return
        done = [0]
        step = max(1, total // 20)

        def adv(label: str) -> None:
            done[0] += 1
            if done[0] % step == 0 or done[0] == total:
                print(f"  [{done[0]}/{total}] {label}", file=sys.stderr)
        yield adv

    return cm()


def _applicable(trace: Trace, configs: list[SweepConfig]) -> list[tuple[SweepConfig, int | None]]:
    """Each configuration with its budget in bytes (None: the budget does not apply to its GPU)."""
    model = model_for_trace(trace.meta, None)
    out = []
    for sc in configs:
        parsed = parse_budget(sc.budget, option="budget label")
        if parsed.kind not in (FRACTION, DERIVED):
            raise InputError(None, f"budget label {sc.budget!r}: use N% or {VRAM}")
        out.append((sc, parsed.resolve(model, load_hardware(sc.gpu), ReplayConfig.context)))
    return out


_WORKER_PREPS: dict[tuple[str, str], Prepared] = {}  # per process: (trace token, gpu) -> prepared trace


def _run_config(trace: Trace, token: str, sc: SweepConfig, cap: int) -> dict:
    """One configuration's record (a dict); the trace is prepared once per process and GPU."""
    key = (token, sc.gpu)
    if key not in _WORKER_PREPS:
        for old in [k for k in _WORKER_PREPS if k[0] != token]:
            del _WORKER_PREPS[old]  # one trace at a time per process
        _WORKER_PREPS[key] = prepare(ReplayConfig(trace=trace, gpu=sc.gpu))
    cfg = ReplayConfig(trace=trace, gpu=sc.gpu, policy=sc.policy, precision=sc.precision, capacity_bytes=cap,
                       policy_params=sc.policy_params)
    return run_prepared(_WORKER_PREPS[key], cfg).as_dict()


def _rows(sc: SweepConfig, cid: int, label: str, rec: dict) -> tuple[dict, list[dict]]:
    """The CSV row and the per-layer rows of one configuration's record."""
    per_layer = rec.pop("per_layer_hit_rate")
    rec.pop("units", None)  # per-sequence units are not a CSV column
    row = dict(config_id=cid, trace=label, budget=sc.budget,
               budget_kind=parse_budget(sc.budget, option="budget label").kind,
               **precision_columns(parse_precision(sc.precision)), **rec,
               protected_share=float("nan") if sc.protected_share is None else sc.protected_share)
    return ({k: row.get(k) for k in SWEEP_COLUMNS},
            [{"config_id": cid, "layer": i, "hit_rate": h} for i, h in enumerate(per_layer)])


def _label(sc: SweepConfig) -> str:
    share = "" if sc.protected_share is None else f"@{sc.protected_share:g}"
    return f"{sc.gpu} {sc.policy}{share} {sc.budget} {sc.precision}"


def _records_serial(trace: Trace, token: str, todo: list, quiet: bool) -> list[dict]:
    out = []
    with _progress(len(todo), quiet) as advance:
        for sc, cap in todo:
            out.append(_run_config(trace, token, sc, cap))
            advance(_label(sc))
    return out


def _records_dask(trace: Trace, token: str, todo: list, quiet: bool, scheduler: str) -> list[dict]:
    """Run the configurations as Dask tasks; the trace goes to every worker once (scatter, broadcast)."""
    from dask.distributed import Client, LocalCluster, as_completed

    cluster = None
    if scheduler == LOCAL:
        # silence_logs: a worker's heartbeat fails while the cluster shuts down and logs a traceback at
        # ERROR; a task's own exception still reaches this process through gather
        cluster = LocalCluster(n_workers=os.cpu_count() or 1, threads_per_worker=1, processes=True,
                               dashboard_address=None, silence_logs=logging.CRITICAL)
        client = Client(cluster)
    else:
        client = Client(scheduler)
    try:
        trace_f = client.scatter(trace, broadcast=True)
        futures = [client.submit(_run_config, trace_f, token, sc, cap, key=f"sweep-{token[:12]}-{i}", pure=False)
                   for i, (sc, cap) in enumerate(todo)]
        index = {f.key: i for i, f in enumerate(futures)}
        with _progress(len(todo), quiet) as advance:
            for f in as_completed(futures):
                advance(_label(todo[index[f.key]][0]))
        return client.gather(futures)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def run_sweep(trace_path: str | Path, *, gpus: tuple[str, ...] = DEFAULT_GPUS, grid: str = "default",
              quiet: bool = True, trace_label: str | None = None,
              scheduler: str = SERIAL) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Run a grid on one trace; returns (configs frame, per-layer long frame, provenance dict).

    `scheduler`: SERIAL (in this process), LOCAL (a Dask LocalCluster, one single-threaded worker
    process per core) or a Dask scheduler address (tcp://host:8786). Every path gives the same frames.
    """
    if grid not in GRIDS:
        raise InputError(None, f"unknown grid {grid!r}; known: {', '.join(GRIDS)}")
    for g in gpus:
        load_hardware(g)  # fail fast on an unknown GPU
    trace = load_trace(trace_path)
    label = trace_label or Path(trace_path).stem
    digest = hashlib.sha256(Path(trace_path).read_bytes()).hexdigest()
    todo = [(sc, cap) for sc, cap in _applicable(trace, expand_grid(GRIDS[grid], tuple(gpus))) if cap is not None]
    if scheduler == SERIAL:
        records = _records_serial(trace, digest, todo, quiet)
    else:
        records = _records_dask(trace, digest, todo, quiet, scheduler)
    rows, layer_rows = [], []
    for cid, ((sc, _), rec) in enumerate(zip(todo, records)):
        row, per_layer = _rows(sc, cid, label, rec)
        rows.append(row)
        layer_rows.extend(per_layer)
    frame = pd.DataFrame(rows, columns=list(SWEEP_COLUMNS))
    layers = pd.DataFrame(layer_rows, columns=list(PER_LAYER_COLUMNS))
    m = trace.meta
    prov = {
        "trace": label,
        "trace_file": Path(trace_path).name,
        "trace_sha256": digest,
        "model": m.model, "provenance": m.provenance, "n_layers": m.n_layers, "n_experts": m.n_experts, "top_k": m.top_k,
        "n_steps": int(trace.n_steps), "n_seqs": len(set(trace.seq.tolist())),
        "prefill_steps": int((trace.phase == 0).sum()), "decode_steps": int((trace.phase == 1).sum()),
        "grid": grid, "gpus": list(gpus), "configs": len(frame),
        "calib_fraction": ReplayConfig.calib_fraction, "context_tokens": ReplayConfig.context,
        "gpu_sources": {g: load_hardware(g).source for g in gpus},
    }
    return frame, layers, prov


def frame_to_csv(frame: pd.DataFrame) -> str:
    """The CSV text of a frame, deterministic (fixed float format, LF line ends)."""
    buf = io.StringIO()
    frame.to_csv(buf, index=False, lineterminator="\n", float_format="%.10g")
    return buf.getvalue()


def write_sweep(out_dir: str | Path, name: str, frame: pd.DataFrame, layers: pd.DataFrame, prov: dict) -> list[Path]:
    """Write NAME.csv, NAME.per_layer.csv and NAME.json atomically; returns their paths."""
    out_dir = Path(out_dir)
    paths = [out_dir / f"{name}.csv", out_dir / f"{name}.per_layer.csv", out_dir / f"{name}.json"]
    texts = [frame_to_csv(frame), frame_to_csv(layers), json.dumps(prov, indent=1, sort_keys=True) + "\n"]
    with atomic_paths(paths, make_parents=True) as tmps:  # all three or none; mode follows the umask
        for tmp, text in zip(tmps, texts):
            tmp.write_text(text)
    return paths


EPILOG = """examples:
  python -m sim.synth -o /tmp/s.npz && python -m analysis.sweep /tmp/s.npz --name synth-qwen3
  python -m sim.convert ../shared/traces/bigmoeonedge/qwen.route.csv -o /tmp/q.npz
  python -m analysis.sweep /tmp/q.npz --name real-qwen3-phone --trace-cmd "python -m sim.convert ..."
  python -m analysis.sweep /tmp/s.npz --name smoke --quick --gpu rtx3060-12gb --out /tmp/sweeps
  python -m analysis.sweep /tmp/s.npz --name with-h200 --gpu rtx3060-12gb,rtx4070-12gb,h200
  python -m analysis.sweep /tmp/s.npz --name big --scheduler tcp://10.0.0.5:8786   # an existing Dask cluster

The grid (panels, budgets, policies, precisions) is described in the module docstring:
  python -c "import analysis.sweep as s; print(s.__doc__)"
"""


def build_parser() -> argparse.ArgumentParser:
    """The analysis.sweep argument parser."""
    ap = argparse.ArgumentParser(
        prog="python -m analysis.sweep",
        description="Run the decision document's grid of simulations on one trace and write tidy CSVs "
                    "(NAME.csv, NAME.per_layer.csv, NAME.json) to results/sweeps/.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace", help="routing trace (.npz; import others with python -m sim.convert)")
    ap.add_argument("--name", required=True, help="output name: results/sweeps/NAME.csv (letters, digits, - _ .)")
    ap.add_argument("--gpu", default=",".join(DEFAULT_GPUS),
                    help="hardware profiles, comma-separated; the first is the primary one (default: %(default)s)")
    ap.add_argument("--quick", action="store_true", help="the small test grid instead of the default one")
    ap.add_argument("--out", default=str(OUT_DIR), help="output folder (default: %(default)s)")
    ap.add_argument("--trace-cmd", default="",
                    help="how TRACE was made (e.g. the sim.synth / sim.convert command); recorded in NAME.json")
    ap.add_argument("--scheduler", default=LOCAL,
                    help=f"where the configurations run: {LOCAL} (a Dask LocalCluster, one worker per core), "
                         f"{SERIAL} (this process, no Dask), or a dask.distributed scheduler address such as "
                         "tcp://10.0.0.5:8786 (default: %(default)s); every choice writes the same files")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    return ap


@exit_on_input_error
def main(argv: list[str] | None = None) -> pd.DataFrame:
    """CLI entry point."""
    args = build_parser().parse_args(argv)
    name = args.name.strip()
    if not name or any(not (c.isalnum() or c in "-_.") for c in name) or name.startswith("."):
        raise InputError(None, f"--name {args.name!r}: use letters, digits, '-', '_' and '.'")
    gpus = tuple(g.strip() for g in args.gpu.split(",") if g.strip())
    if not gpus:
        raise InputError(None, "--gpu: give at least one hardware profile")
    sched = args.scheduler.strip()
    if sched not in (SERIAL, LOCAL) and "://" not in sched:
        raise InputError(None, f"--scheduler {args.scheduler!r}: use {LOCAL}, {SERIAL} or an address like tcp://host:8786")
    for suffix in (".csv", ".per_layer.csv", ".json"):  # before the long run: the folder must exist
        check_output_path(Path(args.out) / f"{name}{suffix}", "--out")
    frame, layers, prov = run_sweep(args.trace, gpus=gpus, grid="quick" if args.quick else "default",
                                    quiet=args.quiet, trace_label=name, scheduler=sched)
    prov["command"] = (f"python -m analysis.sweep {args.trace} --name {name}" + (" --quick" if args.quick else "")
                       + (f" --gpu {','.join(gpus)}" if gpus != DEFAULT_GPUS else ""))
    prov["trace_command"] = args.trace_cmd
    paths = write_sweep(args.out, name, frame, layers, prov)
    if not args.quiet:
        print(f"wrote {paths[0]} ({len(frame)} configurations), {paths[1].name}, {paths[2].name}", file=sys.stderr)
    return frame


if __name__ == "__main__":
    main()
