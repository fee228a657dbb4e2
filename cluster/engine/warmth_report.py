"""Warmth report: what a node's expert cache holds, as small versioned msgpack.

Wire format, version 3 (a msgpack map; every other key is an error):
    v             int    3
    n_layers      int    L, 1..4096
    n_experts     int    E, 1..65536
    resident      bin    bit-packed [L x E] (numpy.packbits, row-major, little bit order: the order of
                         every expert bitmap of the project — the router's residency rows, its predictions)
    heat          bin    optional, uint8 [L x E]: 0 = cold, else heat_max * 2**(16 * (q/255 - 1))
    heat_max      float  with heat: heat of the hottest unit (recency-weighted selections)
    budget_bytes  int    the cache's budget
    resident_bytes int   footprint the cache holds
    counters      map    str -> int, names as in csrc/telemetry.h
Routing reads the resident flags only, so the reports a node sends on its own carry no heat
(a 48-layer, 128-expert model's is under 1 KB); heat is in the reports asked for it (the
``status --plot`` heat map; then about 7 KB). ``decode`` never raises anything but
``WarmthFormatError`` on untrusted bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import msgpack
import numpy as np

from cluster.errors import WarmthFormatError

WARMTH_VERSION = 3
HEAT_OCTAVES = 16
MAX_LAYERS = 4096
MAX_EXPERTS = 65536
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_KEYS = {"v", "n_layers", "n_experts", "resident", "budget_bytes", "resident_bytes", "counters"}
_HEAT_KEYS = {"heat", "heat_max"}  # both or neither


@dataclass(frozen=True)
class Warmth:
    """A decoded warmth report: resident flags (and heat, when it was asked for) per (layer, expert)."""

    resident: np.ndarray  # bool [L, E]
    heat: np.ndarray | None  # float32 [L, E]; None in a report sent without it
    budget_bytes: int = 0
    resident_bytes: int = 0
    counters: dict[str, int] = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return int(self.resident.shape[0])

    @property
    def n_experts(self) -> int:
        return int(self.resident.shape[1])

    def warm_fraction(self) -> float:
        """Fraction of all (layer, expert) units resident."""
        return float(self.resident.mean()) if self.resident.size else 0.0


def _quantize_heat(heat: np.ndarray) -> tuple[bytes, float]:
    heat = np.asarray(heat, dtype=np.float64)
    heat_max = float(heat.max()) if heat.size else 0.0
    if not heat_max > 0.0 or not math.isfinite(heat_max):
        return bytes(heat.size), 0.0
    with np.errstate(divide="ignore"):
        octaves = np.log2(np.maximum(heat, 1e-300) / heat_max)  # <= 0
    q = np.where(heat > 0.0, np.clip(np.rint(255.0 * (1.0 + octaves / HEAT_OCTAVES)), 1, 255), 0)
    return q.astype(np.uint8).tobytes(), heat_max


def _dequantize_heat(q: np.ndarray, heat_max: float) -> np.ndarray:
    out = heat_max * np.exp2(HEAT_OCTAVES * (q.astype(np.float64) / 255.0 - 1.0))
    return np.where(q > 0, out, 0.0).astype(np.float32)


def encode(resident: np.ndarray, heat: np.ndarray | None = None, *, budget_bytes: int = 0, resident_bytes: int = 0,
           counters: dict[str, int] | None = None) -> bytes:
    """Encodes a report from ``[L, E]`` resident flags, and heat if given."""
    resident = np.asarray(resident, dtype=bool)
    if resident.ndim != 2:
        raise ValueError(f"resident must be [L, E], got {resident.shape}")
    obj: dict[str, object] = {
        "v": WARMTH_VERSION,
        "n_layers": int(resident.shape[0]),
        "n_experts": int(resident.shape[1]),
        "resident": np.packbits(resident.ravel(), bitorder="little").tobytes(),
        "budget_bytes": int(budget_bytes),
        "resident_bytes": int(resident_bytes),
        "counters": {str(k): int(v) for k, v in (counters or {}).items()},
    }
    if heat is not None:
        heat = np.asarray(heat)
        if heat.shape != resident.shape:
            raise ValueError(f"resident and heat must both be [L, E], got {resident.shape} and {heat.shape}")
        obj["heat"], obj["heat_max"] = _quantize_heat(heat)
    return msgpack.packb(obj, use_bin_type=True)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise WarmthFormatError(message)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def decode(data: bytes) -> Warmth:
    """Decodes a report; raises ``WarmthFormatError`` (and nothing else) on any malformed input."""
    _check(isinstance(data, (bytes, bytearray, memoryview)), f"warmth report must be bytes, got {type(data).__name__}")
    _check(len(data) <= 64 << 20, f"warmth report of {len(data)} bytes is larger than 64 MiB")
    try:
        obj = msgpack.unpackb(bytes(data), raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises many types on garbage: all mean "not a report"
        raise WarmthFormatError(f"not msgpack: {type(exc).__name__}: {exc}") from None
    _check(isinstance(obj, dict), f"warmth report must be a map, got {type(obj).__name__}")
    _check(obj.get("v") == WARMTH_VERSION and _is_int(obj.get("v")),
           f"unsupported warmth report version {obj.get('v')!r} (expected {WARMTH_VERSION})")
    _check(set(obj) in (_KEYS, _KEYS | _HEAT_KEYS),
           f"warmth report keys {sorted(map(str, obj))} != {sorted(_KEYS)} (and optionally {sorted(_HEAT_KEYS)})")
    n_layers, n_experts = obj["n_layers"], obj["n_experts"]
    _check(_is_int(n_layers) and 1 <= n_layers <= MAX_LAYERS, f"n_layers must be an int in [1, {MAX_LAYERS}]")
    _check(_is_int(n_experts) and 1 <= n_experts <= MAX_EXPERTS, f"n_experts must be an int in [1, {MAX_EXPERTS}]")
    n_units = n_layers * n_experts
    resident = obj["resident"]
    _check(isinstance(resident, bytes) and len(resident) == (n_units + 7) // 8,
           f"resident must be {(n_units + 7) // 8} bytes of bits")
    heat = None
    if "heat" in obj:
        heat_bytes, heat_max = obj["heat"], obj["heat_max"]
        _check(isinstance(heat_bytes, bytes) and len(heat_bytes) == n_units, f"heat must be {n_units} bytes")
        _check(isinstance(heat_max, (int, float)) and not isinstance(heat_max, bool)
               and math.isfinite(heat_max) and 0 <= heat_max <= _FLOAT32_MAX,
               f"heat_max must be a number in [0, {_FLOAT32_MAX:.3g}] (heat is float32)")
        q = np.frombuffer(heat_bytes, dtype=np.uint8)
        heat = _dequantize_heat(q, float(heat_max)).reshape(n_layers, n_experts)
    for key in ("budget_bytes", "resident_bytes"):
        _check(_is_int(obj[key]) and obj[key] >= 0, f"{key} must be an int >= 0")
    counters = obj["counters"]
    _check(isinstance(counters, dict) and all(isinstance(k, str) and _is_int(v) for k, v in counters.items()),
           "counters must map str to int")
    bits = np.unpackbits(np.frombuffer(resident, dtype=np.uint8), bitorder="little")[:n_units].astype(bool)
    return Warmth(
        resident=bits.reshape(n_layers, n_experts),
        heat=heat,
        budget_bytes=obj["budget_bytes"],
        resident_bytes=obj["resident_bytes"],
        counters=dict(counters),
    )
