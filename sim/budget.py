"""The expert budget: one parser for every way a user names it, and one place that turns it into bytes.

A budget is the VRAM the cache may fill with experts. It can be given as
  * bytes: `9GiB`, `9.5GB`, `4000MiB` (a bare number is bytes under `--budget`);
  * a fraction of all expert bytes: `40%` (0 < X ≤ 100);
  * a count of native-size experts: `3300` under `--experts` (× the mean native expert size);
  * `vram`: derived from the GPU, VRAM − dense weights − output head − KV cache − runtime reserve
    (`sim.profiles.derived_expert_budget`); a GPU whose VRAM holds every expert has none.
`parse_budget` returns a typed `Budget` that says which kind it is; `Budget.resolve` turns it into
bytes for a model on a GPU. `sim.replay`, `analysis.sweep` and the library all use these.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sim.io import InputError
from sim.profiles import HardwareProfile, ModelProfile, derived_expert_budget, parse_bytes

BYTES, FRACTION, COUNT, DERIVED = "bytes", "fraction", "count", "derived"
VRAM = "vram"  # how a user names the derived budget
FALLBACK_PERCENT = 40.0  # the default budget when the whole model fits in VRAM


@dataclass(frozen=True)
class Budget:
    """A parsed expert budget: its kind (BYTES, FRACTION, COUNT or DERIVED), its number and its text."""

    kind: str
    value: float  # bytes, percent of all expert bytes, or native-size experts; 0 for DERIVED
    text: str

    def resolve(self, model: ModelProfile, hw: HardwareProfile, context_tokens: int) -> int | None:
        """Bytes for `model` on `hw`; None for DERIVED when the GPU's VRAM holds every expert."""
        total = model.total_expert_bytes()
        if self.kind == BYTES:
            return int(self.value)
        if self.kind == FRACTION:
            return int(self.value / 100 * total)
        if self.kind == COUNT:
            return int(self.value * native_mean_bytes(model))
        derived = derived_expert_budget(model, hw, context_tokens)
        if derived <= 0:
            raise InputError(None, f"budget {self.text}: {hw.name}'s VRAM holds no experts after the dense weights, "
                                   f"head and a KV cache of {context_tokens} tokens (lower --context or give --budget)")
        return derived if derived < total else None


def native_mean_bytes(model: ModelProfile) -> float:
    """Mean bytes of one expert at its native format (what an expert count is multiplied by)."""
    return float(np.mean(np.array([model.expert_bytes(layer) for layer in range(model.n_layers)], dtype=np.int64)))


def parse_budget(text: str, *, bare: str = BYTES, option: str = "--budget") -> Budget:
    """Parse one budget; a bare number means `bare` (BYTES or COUNT). Errors name `option`."""
    t = text.strip()
    low = t.lower()
    if low == VRAM:
        return Budget(DERIVED, 0.0, t)
    if t.endswith("%"):
        try:
            pct = float(t[:-1])
        except ValueError:
            raise InputError(None, f"{option}: cannot parse {text!r} (a share such as 40%)") from None
        if not 0 < pct <= 100:
            raise InputError(None, f"{option} {text!r}: a share of all experts must be in (0, 100]%")
        return Budget(FRACTION, pct, t)
    if bare == COUNT and low.replace(".", "", 1).isdigit():
        count = float(t)
        if count <= 0:
            raise InputError(None, f"{option} {text!r}: an expert count must be > 0")
        return Budget(COUNT, count, t)
    if bare == COUNT and not any(c.isalpha() for c in low):
        raise InputError(None, f"{option}: cannot parse {text!r} (a count such as 3300, a share such as 40%, or vram)")
    try:
        nbytes = parse_bytes(t)
    except InputError as exc:
        raise InputError(None, f"{option}: {exc.problem}") from None
    if nbytes <= 0:
        raise InputError(None, f"{option} {text!r}: a budget must be > 0 bytes")
    return Budget(BYTES, float(nbytes), t)


def parse_budget_list(text: str, *, bare: str = BYTES, option: str = "--budget") -> list[Budget]:
    """Comma-separated budgets."""
    parts = [s.strip() for s in text.split(",") if s.strip()]
    if not parts:
        raise InputError(None, f"{option}: give at least one budget")
    return [parse_budget(p, bare=bare, option=option) for p in parts]


def parse_budget_sweep(text: str) -> tuple[Budget, Budget, Budget]:
    """START:STOP:STEP in one unit: bytes (2GiB:10GiB:1GiB), shares (10%:90%:10%) or counts (1000:4000:500)."""
    parts = text.split(":")
    if len(parts) != 3:
        raise InputError(None, f"--sweep-budget {text!r}: use START:STOP:STEP, e.g. 2GiB:10GiB:1GiB or 10%:90%:10%")
    first = parts[0].strip()
    bare = COUNT if (first.endswith("%") or first.replace(".", "").isdigit()) else BYTES
    out = tuple(parse_budget(p, bare=bare, option="--sweep-budget") for p in parts)
    if len({b.kind for b in out}) != 1:
        raise InputError(None, f"--sweep-budget {text!r}: START, STOP and STEP must be in one unit")
    return out  # type: ignore[return-value]


def sweep_bytes(bounds: tuple[Budget, Budget, Budget], model: ModelProfile, hw: HardwareProfile, context_tokens: int,
                text: str = "") -> list[int]:
    """The byte budgets of a START:STOP:STEP sweep, STOP included."""
    lo, hi, step = (b.resolve(model, hw, context_tokens) for b in bounds)
    if step <= 0 or hi < lo:
        raise InputError(None, f"--sweep-budget {text!r}: need STEP > 0 and STOP ≥ START")
    return list(range(lo, hi + 1, step))


def default_budget(model: ModelProfile, hw: HardwareProfile, context_tokens: int) -> tuple[int, str]:
    """The budget when none is given, and how it was chosen: `vram`, or 40 % when every expert fits."""
    derived = Budget(DERIVED, 0.0, VRAM).resolve(model, hw, context_tokens)
    if derived is not None:
        return derived, f"derived from {hw.name} VRAM (VRAM − dense − head − KV@{context_tokens} − reserve)"
    fallback = Budget(FRACTION, FALLBACK_PERCENT, f"{FALLBACK_PERCENT:g}%").resolve(model, hw, context_tokens)
    return fallback, f"40 % of all expert bytes (the whole model fits in {hw.name}'s VRAM)"
