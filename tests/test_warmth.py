"""Warmth report (cluster.engine.warmth_report): round trip, size, malformed input."""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.engine import warmth_report as warmth
from cluster.engine.cache import CacheConfig, CachePolicy
from cluster.errors import WarmthFormatError

# One quantisation step of the heat: 16 octaves over 255 levels; rounding is half a step.
HEAT_REL_TOL = 2.0 ** (0.5 * warmth.HEAT_OCTAVES / 255) - 1 + 1e-6


def counter_names() -> list[str]:
    policy = CachePolicy(1, 2, np.ones((1, 2), dtype=np.uint64), CacheConfig(budget_bytes=4), 1)
    return list(policy.counters())


def sample_report(n_layers: int = 6, n_experts: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray, bytes]:
    rng = np.random.default_rng(seed)
    resident = rng.random((n_layers, n_experts)) < 0.3
    heat = np.where(rng.random((n_layers, n_experts)) < 0.8, 2.0 ** rng.uniform(-15.9, 6, (n_layers, n_experts)), 0.0)
    data = warmth.encode(resident, heat, budget_bytes=123456, resident_bytes=7890,
                         counters={name: i for i, name in enumerate(counter_names())})
    return resident, heat, data


def repack(data: bytes, **changes: object) -> bytes:
    obj = msgpack.unpackb(data, raw=False)
    for key, value in changes.items():
        if value is _DELETE:
            del obj[key]
        else:
            obj[key] = value
    return msgpack.packb(obj, use_bin_type=True)


_DELETE = object()


def test_round_trip_keeps_resident_flags_exactly_and_heat_within_one_quantisation_step() -> None:
    resident, heat, data = sample_report()
    report = warmth.decode(data)
    assert (report.n_layers, report.n_experts) == resident.shape
    np.testing.assert_array_equal(report.resident, resident)
    assert report.heat.dtype == np.float32
    np.testing.assert_array_equal(report.heat == 0, heat == 0)
    within = heat >= heat.max() * 2.0 ** -warmth.HEAT_OCTAVES  # within 16 octaves of the hottest
    assert within.sum() > 10
    np.testing.assert_allclose(report.heat[within], heat[within], rtol=HEAT_REL_TOL)
    colder = (heat > 0) & ~within
    assert colder.any() and (report.heat[colder] > 0).all()  # clamped to the coldest level, not lost
    assert (report.heat[colder] <= heat.max() * 2.0 ** (-warmth.HEAT_OCTAVES + 1)).all()
    assert report.heat.max() == pytest.approx(heat.max(), rel=1e-6)
    assert report.budget_bytes == 123456 and report.resident_bytes == 7890
    assert report.counters == {name: i for i, name in enumerate(counter_names())}
    assert report.warm_fraction() == pytest.approx(resident.mean())


def test_heat_colder_than_sixteen_octaves_below_the_max_stays_nonzero() -> None:
    heat = np.array([[1.0, 2.0 ** -40, 0.0]])
    report = warmth.decode(warmth.encode(np.zeros((1, 3), dtype=bool), heat))
    assert report.heat[0, 0] == pytest.approx(1.0)
    assert 0 < report.heat[0, 1] <= 2.0 ** -15.9  # clamped to the coldest level, not lost
    assert report.heat[0, 2] == 0


def test_all_cold_report_decodes_to_zero_heat() -> None:
    report = warmth.decode(warmth.encode(np.ones((2, 3), dtype=bool), np.zeros((2, 3))))
    assert report.resident.all() and not report.heat.any()


def test_report_of_48_layers_and_128_experts_is_smaller_than_8_kb() -> None:
    _, _, data = sample_report(48, 128, seed=1)
    assert len(data) < 8 * 1024, f"{len(data)} bytes"


@pytest.mark.parametrize("version", [0, 1, 2, 4, "3", 3.0, True, None])
def test_wrong_version_is_rejected(version: object) -> None:
    _, _, data = sample_report()
    with pytest.raises(WarmthFormatError, match="version"):
        warmth.decode(repack(data, v=version))


@pytest.mark.parametrize("key", sorted(warmth._KEYS - {"v"}))
def test_missing_key_is_rejected(key: str) -> None:
    _, _, data = sample_report()
    with pytest.raises(WarmthFormatError, match="keys"):
        warmth.decode(repack(data, **{key: _DELETE}))


def test_unknown_key_is_rejected() -> None:
    _, _, data = sample_report()
    with pytest.raises(WarmthFormatError, match="keys"):
        warmth.decode(repack(data, extra=1))


@pytest.mark.parametrize(("changes", "needle"), [
    ({"resident": b"\x00"}, "resident"),
    ({"heat": b"\x00" * 59}, "heat"),
    ({"heat": b"\x00" * 61}, "heat"),
    ({"n_layers": 7}, "resident"),
    ({"n_experts": 0}, "n_experts"),
    ({"n_layers": -1}, "n_layers"),
    ({"heat_max": float("nan")}, "heat_max"),
    ({"heat_max": -1.0}, "heat_max"),
    ({"heat_max": 1e39}, "heat_max"),  # finite, but beyond float32
    ({"budget_bytes": -5}, "budget_bytes"),
    ({"counters": {"n_steps": "many"}}, "counters"),
    ({"resident": "text, not bytes"}, "resident"),
])
def test_wrong_lengths_and_types_are_rejected(changes: dict[str, object], needle: str) -> None:
    _, _, data = sample_report()  # 6 x 10: 8 bytes of bits, 60 bytes of heat
    with pytest.raises(WarmthFormatError, match=needle):
        warmth.decode(repack(data, **changes))


@pytest.mark.parametrize("data", [b"", b"\xc1", b"\x93\x01\x02\x03", msgpack.packb([1, 2]), "str", None, 12])
def test_non_reports_are_rejected(data: object) -> None:
    with pytest.raises(WarmthFormatError):
        warmth.decode(data)  # type: ignore[arg-type]


def _decode_only_format_errors(data: bytes) -> None:
    try:
        report = warmth.decode(data)
    except WarmthFormatError:
        return
    assert report.heat is None or report.resident.shape == report.heat.shape  # accepted: a coherent report


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_decoding_arbitrary_bytes_raises_only_warmth_format_error(data: bytes) -> None:
    _decode_only_format_errors(data)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64), st.integers(min_value=0, max_value=200))
def test_decoding_a_corrupted_valid_report_raises_only_warmth_format_error(noise: bytes, at: int) -> None:
    _, _, data = sample_report()
    at = at % len(data)
    _decode_only_format_errors(data[:at] + noise + data[at + len(noise):])


_scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
            | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8) | st.binary(max_size=80))
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3)
                       | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
_keys = st.sampled_from(sorted(warmth._KEYS)) | st.text(max_size=6)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(_keys, _values, max_size=12))
def test_decoding_msgpack_of_random_maps_raises_only_warmth_format_error(obj: dict[str, object]) -> None:
    _decode_only_format_errors(msgpack.packb(obj, use_bin_type=True))


@settings(max_examples=200, deadline=None)
@given(
    st.fixed_dictionaries({
        "v": st.sampled_from([2, 2, 2, 1, 2.0, True]),
        "n_layers": st.integers(min_value=-2, max_value=5) | st.integers(min_value=4090, max_value=70000),
        "n_experts": st.integers(min_value=-2, max_value=9) | st.integers(min_value=65530, max_value=2**40),
        "resident": st.binary(max_size=8) | st.text(max_size=3),
        "heat": st.binary(max_size=50),
        "heat_max": st.floats(allow_nan=True, allow_infinity=True) | st.integers(min_value=-(2**63), max_value=2**64 - 1),
        "budget_bytes": st.integers(min_value=-(2**63), max_value=2**64 - 1) | st.floats(),
        "resident_bytes": st.integers(min_value=-5, max_value=2**64 - 1),
        "counters": st.dictionaries(st.text(max_size=5), st.integers(min_value=-(2**63), max_value=2**64 - 1)
                                    | st.text(max_size=2), max_size=3)
        | st.lists(st.integers(min_value=-5, max_value=5), max_size=2),
    })
)
def test_decoding_near_valid_reports_raises_only_warmth_format_error(obj: dict[str, object]) -> None:
    _decode_only_format_errors(msgpack.packb(obj, use_bin_type=True))
    if isinstance(obj["heat_max"], float) and not math.isfinite(obj["heat_max"]):
        with pytest.raises(WarmthFormatError):
            warmth.decode(msgpack.packb(obj, use_bin_type=True))


def test_the_resident_bitmap_is_in_the_little_bit_order_the_router_packs_its_rows_in():
    resident = np.zeros((2, 8), dtype=bool)
    resident[0, 0] = resident[1, 7] = True
    data = warmth.encode(resident, np.zeros((2, 8), dtype=np.float32))
    raw = msgpack.unpackb(data, raw=False)["resident"]
    assert raw == bytes([0b00000001, 0b10000000])
    np.testing.assert_array_equal(warmth.decode(data).resident, resident)


def test_a_report_without_heat_round_trips_and_is_much_smaller() -> None:
    resident, heat, with_heat = sample_report(48, 128)
    data = warmth.encode(resident, budget_bytes=123456, resident_bytes=7890)
    report = warmth.decode(data)
    assert report.heat is None and report.budget_bytes == 123456
    np.testing.assert_array_equal(report.resident, resident)
    assert len(data) < 1024 < 6 * 1024 < len(with_heat)


@pytest.mark.parametrize("missing", ["heat", "heat_max"])
def test_heat_comes_with_its_scale_or_not_at_all(missing: str) -> None:
    _, _, data = sample_report()
    with pytest.raises(WarmthFormatError, match="keys"):
        warmth.decode(repack(data, **{missing: _DELETE}))
