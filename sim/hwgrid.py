"""A grid of hardware profiles: one base GPU re-priced for other VRAM sizes and PCIe links.

The decision map asks where mixed-precision expert caching pays: how much VRAM (8, 12, 16, 24 GiB)
and which host→device link (PCIe Gen3 x16, Gen4 x16, Gen4 x8, Gen5 x16). Measuring every pair is
not possible, so each grid point is DERIVED from one base profile (`sim/profiles/*.json`):

- `vram_bytes` is set to the nominal size (GiB, as GPU vendors count it); the runtime reserve stays
  the base's unless given, so the expert budget moves with the VRAM only.
- The copy curve keeps the base's fixed per-copy cost and stretches the bandwidth part:
  t_new(n) = fixed_s + max(t_base(n) − fixed_s, 0) · gbps_base / gbps_link, and `transfer.gbps`
  becomes the link's practical pinned host→device bandwidth (table `LINKS`). The fixed part is a
  property of the driver / runtime path (DMA setup, launch), not of the lane count or generation.
- Expert kernels, dense layer and VRAM bandwidth are the base GPU's, unchanged. A grid point is
  therefore "the base GPU's compute with another memory size and link", which is the question
  asked, not a model of any particular product.

Link bandwidths are practical pinned `cudaMemcpy` host→device figures, not the PCIe line rate
(Gen3 x16 15.75 GB/s, Gen4 x16 31.5 GB/s, Gen5 x16 63 GB/s after 128b/130b encoding); sources in
`LINKS`. Every derived profile says in `source` that it is derived and from what; these are
datasheet/report-derived estimates, not measurements.

`python -m sim.hwgrid BASE -o DIR` writes the 16 JSON files (atomically); from Python,
`derive(base, vram_gib, link)` returns a `HardwareProfile` and `grid(base)` all of them.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sim.io import InputError, exit_on_input_error, write_text_atomic
from sim.profiles import GIB, HardwareProfile, load_hardware


@dataclass(frozen=True)
class Link:
    """A host→device link: its name and practical pinned bandwidth (GB/s = 1e9 B/s)."""

    name: str  # "gen4x16"
    label: str  # "PCIe Gen4 x16"
    gbps: float
    source: str


LINKS: dict[str, Link] = {
    link.name: link
    for link in (
        Link("gen3x16", "PCIe Gen3 x16", 12.0,
             "report-derived: V100 on Gen3 x16 measured ≈12 GB/s ingress (ZaidQureshi/bam issue #54, "
             "maintainer reply); line rate 15.75 GB/s"),
        Link("gen4x8", "PCIe Gen4 x8", 12.5,
             "derived: half of the Gen4 x16 figure (same lane rate, half the lanes; equals Gen3 x16's "
             "line rate); no measurement at hand"),
        Link("gen4x16", "PCIe Gen4 x16", 25.0,
             "report-derived: RTX 4090 nvbandwidth host_to_device_memcpy_ce 23.9–26.4 GB/s "
             "(NVIDIA/nvbandwidth issue #15); A100 Gen4 x16 measured peak 25 GB/s (ZaidQureshi/bam "
             "issue #54); architecture.md 'PCIe 4.0 x16 ≈ 25 GB/s pinned'"),
        Link("gen5x16", "PCIe Gen5 x16", 52.0,
             "measured on the project's H100 (CuPy cudaMemcpyAsync, pinned, 16 MiB: 52 GB/s, "
             "architecture.md 2026-12-06); RTX 5090 nvbandwidth 56.3 GB/s (tinygrad/open-gpu-kernel-modules "
             "issue #29)"),
    )
}
VRAM_GIB = (8, 12, 16, 24)


def get_link(name: str) -> Link:
    """A link by name (`gen4x16`, case and separators ignored); InputError names the known ones."""
    key = name.lower().replace(" ", "").replace("_", "").replace("-", "").replace("pcie", "")
    if key not in LINKS:
        raise InputError(None, f"unknown PCIe link {name!r}; known: {', '.join(LINKS)}")
    return LINKS[key]


def profile_name(base_name: str, vram_gib: float, link: str) -> str:
    """Name of a grid point, e.g. "rtx3060-12gb@16gib-gen4x8"."""
    return f"{base_name}@{vram_gib:g}gib-{get_link(link).name}"


def derive_doc(base_doc: dict, vram_gib: float, link: str, runtime_reserve_bytes: int | None = None) -> dict:
    """The JSON document of `base_doc` re-priced for `vram_gib` GiB of VRAM and PCIe `link`."""
    lk = get_link(link)
    if not vram_gib > 0:
        raise InputError(None, f"VRAM must be > 0 GiB, got {vram_gib!r}")
    doc = copy.deepcopy(base_doc)
    base_name = str(base_doc.get("name", "base"))
    tr = doc["transfer"]
    fixed = float(tr["fixed_s"])
    base_gbps = float(tr["gbps"])
    if base_gbps <= 0:
        raise InputError(None, f"base profile {base_name}: transfer.gbps must be > 0")
    stretch = base_gbps / lk.gbps
    tr["gbps"] = lk.gbps
    curve = tr.get("curve")
    if curve:
        tr["curve"] = {
            "nbytes": list(curve["nbytes"]),
            "seconds": [fixed + max(float(t) - fixed, 0.0) * stretch for t in curve["seconds"]],
        }
    inflight = tr.get("inflight")
    if inflight and "aggregate_gbps" in inflight:
        inflight["aggregate_gbps"] = [float(g) / stretch for g in inflight["aggregate_gbps"]]
    doc["name"] = profile_name(base_name, vram_gib, lk.name)
    doc["vram_bytes"] = int(round(vram_gib * GIB))
    if runtime_reserve_bytes is not None:
        doc["runtime_reserve_bytes"] = int(runtime_reserve_bytes)
    doc["pcie"] = lk.name
    doc["derived_from"] = base_name
    doc["source"] = (
        f"derived (python -m sim.hwgrid): {base_name} with VRAM {vram_gib:g} GiB and {lk.label} at "
        f"{lk.gbps:g} GB/s pinned ({lk.source}); copy curve = base fixed cost {fixed * 1e6:.1f} µs + "
        f"base bandwidth part × {stretch:.3f}; kernels, dense layer and VRAM bandwidth from the base "
        f"GPU, whose source is: {base_doc.get('source', '?')}. NOT measured."
    )
    return doc


def derive(base: str | HardwareProfile, vram_gib: float, link: str,
           runtime_reserve_bytes: int | None = None) -> HardwareProfile:
    """A `HardwareProfile` for `vram_gib` GiB and `link`, derived from `base` (name, path or profile)."""
    base_prof = base if isinstance(base, HardwareProfile) else load_hardware(base)
    doc = derive_doc(base_prof.raw, vram_gib, link, runtime_reserve_bytes)
    # one loader validates every profile: round-trip the document through load_hardware
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{doc['name']}.json"
        path.write_text(json.dumps(doc))
        return load_hardware(str(path))


def grid(base: str | HardwareProfile, vram_gib: Iterable[float] = VRAM_GIB,
         links: Iterable[str] = tuple(LINKS), runtime_reserve_bytes: int | None = None) -> list[HardwareProfile]:
    """Every (VRAM, link) pair derived from `base`, VRAM-major in the order given."""
    base_prof = base if isinstance(base, HardwareProfile) else load_hardware(base)
    return [derive(base_prof, v, lk, runtime_reserve_bytes) for v in vram_gib for lk in links]


@exit_on_input_error
def main(argv: Sequence[str] | None = None) -> None:
    """Write the derived profiles of one base as JSON files."""
    ap = argparse.ArgumentParser(
        prog="python -m sim.hwgrid",
        description="Derive hardware profiles for VRAM sizes × PCIe links from one base profile "
                    "(kernels from the base GPU, copy curve stretched to each link's pinned bandwidth).",
        epilog="example: python -m sim.hwgrid rtx3060-12gb -o /tmp/grid --vram 8 12 16 24 "
               "--links gen3x16 gen4x16 gen4x8 gen5x16",
    )
    ap.add_argument("base", help="base hardware profile: built-in name or JSON path")
    ap.add_argument("-o", "--outdir", required=True, help="directory for the JSON files (created)")
    ap.add_argument("--vram", type=float, nargs="+", default=list(VRAM_GIB), help="VRAM sizes in GiB")
    ap.add_argument("--links", nargs="+", default=list(LINKS), help=f"links ({', '.join(LINKS)})")
    ap.add_argument("--runtime-reserve", type=int, help="runtime reserve in bytes (default: the base's)")
    a = ap.parse_args(argv)
    links = [get_link(x).name for x in a.links]  # fail on a bad name before writing anything
    out = Path(a.outdir)
    if out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a directory")
    base = load_hardware(a.base)
    docs = [derive_doc(base.raw, v, lk, a.runtime_reserve) for v in a.vram for lk in links]
    out.mkdir(parents=True, exist_ok=True)
    for doc in docs:
        write_text_atomic(out / f"{doc['name']}.json", json.dumps(doc, indent=1) + "\n")
    print(f"{out}: {len(docs)} profiles derived from {base.name}")


if __name__ == "__main__":
    main(sys.argv[1:])
