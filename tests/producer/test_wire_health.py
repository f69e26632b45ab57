"""Health reports and control messages (``producer.wire`` types 3 and 4): round trips, the
documented layout built by hand with :mod:`struct`, and every refusal."""

from __future__ import annotations

import math
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from producer import wire
from producer.wire import (
    CONTROL_TYPE,
    HEALTH_TYPE,
    LATENCY_BUCKETS,
    MAGIC,
    VERSION,
    BackendHealth,
    BreakerInfo,
    ControlMessage,
    HealthReport,
    WireError,
)

FAST = settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])
U32 = 2**32 - 1


def _s(raw: bytes) -> bytes:
    return bytes((len(raw),)) + raw


def health_bytes(
    *,
    kind: int = HEALTH_TYPE,
    start: float = 1.0,
    end: float = 2.0,
    backends: list[tuple[bytes, int, int, float, list[int]]] | None = None,
    count: int | None = None,
    tail: bytes = b"",
) -> bytes:
    if backends is None:
        backends = [(b"db", 10, 1, 0.5, [0] * LATENCY_BUCKETS)]
    out = struct.pack("<3sBB", MAGIC, VERSION, kind) + _s(b"srv-1")
    out += struct.pack("<QQdd", 7, 3, start, end)
    out += struct.pack("<H", len(backends) if count is None else count)
    for name, requests, errors, saturation, latency in backends:
        out += _s(name) + struct.pack(
            f"<IIf{len(latency)}I", requests, errors, saturation, *latency
        )
    return out + tail


def control_bytes(
    *,
    ttl: float = 1.5,
    factors: list[tuple[bytes, float]] | None = None,
    breakers: list[tuple[bytes, int, float, float]] | None = None,
    tail: bytes = b"",
) -> bytes:
    factors = [(b"*", 0.5)] if factors is None else factors
    breakers = [(b"db", 1, 0.1, 2.0)] if breakers is None else breakers
    out = struct.pack("<3sBB", MAGIC, VERSION, CONTROL_TYPE) + _s(b"agg-1")
    out += struct.pack("<QQdf", 9, 4, 100.0, ttl)
    out += struct.pack("<H", len(factors))
    for name, f in factors:
        out += _s(name) + struct.pack("<f", f)
    out += struct.pack("<H", len(breakers))
    for name, state, probe, retry in breakers:
        out += _s(name) + struct.pack("<Bff", state, probe, retry)
    return out + tail


def test_the_documented_layouts_decode() -> None:
    latency = [0] * LATENCY_BUCKETS
    latency[20] = 9
    r = wire.decode_health(health_bytes(backends=[(b"db", 10, 1, 0.5, latency)]))
    assert (r.server_id, r.incarnation, r.seq, r.start, r.end) == ("srv-1", 7, 3, 1.0, 2.0)
    assert r.backends == (BackendHealth("db", 10, 1, 0.5, tuple(latency)),)
    nan = wire.decode_health(health_bytes(backends=[(b"q", 0, 0, math.nan, [0] * LATENCY_BUCKETS)]))
    assert math.isnan(nan.backends[0].saturation)
    c = wire.decode_control(control_bytes())
    assert (c.aggregator_id, c.epoch, c.seq, c.issued_at, c.ttl) == ("agg-1", 9, 4, 100.0, 1.5)
    assert c.factors == (("*", 0.5),)
    b = c.breakers[0]
    assert (b.name, b.state, b.retry_after) == ("db", 1, 2.0) and b.probe == pytest.approx(0.1)
    assert wire.encode_control(c) == control_bytes()


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (health_bytes(kind=wire.USAGE_TYPE), "bad_type"),
        (health_bytes(start=2.0, end=1.0), "bad_field"),
        (health_bytes(start=math.nan), "bad_field"),
        (health_bytes(backends=[(b"db", 1, 2, 0.5, [0] * LATENCY_BUCKETS)]), "bad_field"),
        (health_bytes(backends=[(b"db", 1, 0, 1.5, [0] * LATENCY_BUCKETS)]), "bad_field"),
        (health_bytes(backends=[(b"", 1, 0, 0.5, [0] * LATENCY_BUCKETS)]), "bad_field"),
        (health_bytes(count=2), "truncated"),
        (health_bytes(tail=b"x"), "bad_length"),
        (health_bytes()[:-3], "truncated"),
    ],
)
def test_malformed_health_reports_are_refused(data: bytes, reason: str) -> None:
    with pytest.raises(WireError) as e:
        wire.decode_health(data)
    assert e.value.reason == reason


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (control_bytes(ttl=0.0), "bad_field"),
        (control_bytes(ttl=math.inf), "bad_field"),
        (control_bytes(factors=[(b"*", 0.0)]), "bad_field"),
        (control_bytes(factors=[(b"*", 1.5)]), "bad_field"),
        (control_bytes(breakers=[(b"db", 3, 0.1, 1.0)]), "bad_field"),
        (control_bytes(breakers=[(b"db", 2, 1.5, 1.0)]), "bad_field"),
        (control_bytes(breakers=[(b"db", 1, 0.1, -1.0)]), "bad_field"),
        (control_bytes(breakers=[(b"db", 1, 0.1, math.nan)]), "bad_field"),
        (control_bytes(tail=b"\0"), "bad_length"),
        (control_bytes()[:-1], "truncated"),
    ],
)
def test_malformed_control_messages_are_refused(data: bytes, reason: str) -> None:
    with pytest.raises(WireError) as e:
        wire.decode_control(data)
    assert e.value.reason == reason


def test_the_other_decoders_refuse_the_new_types() -> None:
    with pytest.raises(WireError, match="bad_type"):
        wire.decode_usage(health_bytes())
    with pytest.raises(WireError, match="bad_type"):
        wire.decode_grants(control_bytes())
    with pytest.raises(WireError, match="bad_type"):
        wire.decode_control(health_bytes())


def test_encoders_refuse_what_the_decoders_would() -> None:
    with pytest.raises(ValueError, match="bucket"):
        wire.encode_health(
            HealthReport("s", 1, 1, 0.0, 1.0, (BackendHealth("db", 1, 0, 0.0, (1,)),))
        )
    with pytest.raises(ValueError, match="factor"):
        wire.encode_control(ControlMessage("a", 1, 1, 0.0, 1.0, (("*", 0.0),), ()))
    with pytest.raises(ValueError, match="state"):
        wire.encode_control(ControlMessage("a", 1, 1, 0.0, 1.0, (), (BreakerInfo("db", 5, 0, 0),)))


names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=20)
counts = st.integers(0, U32)


@FAST
@given(
    st.lists(
        st.tuples(
            names,
            counts,
            st.one_of(st.just(math.nan), st.floats(0.0, 1.0, width=32)),
            st.lists(counts, min_size=LATENCY_BUCKETS, max_size=LATENCY_BUCKETS),
        ),
        max_size=5,
    ),
    st.floats(0, 1e9),
    st.floats(0, 1e3),
)
def test_health_round_trip(
    backends: list[tuple[str, int, float, list[int]]], start: float, span: float
) -> None:
    items = tuple(BackendHealth(n, r, r // 2, s, tuple(lat)) for n, r, s, lat in backends)
    report = HealthReport("srv", 5, 6, start, start + span, items)
    back = wire.decode_health(wire.encode_health(report))
    assert len(back.backends) == len(items)
    for a, b in zip(back.backends, items, strict=True):
        assert (a.name, a.requests, a.errors, a.latency) == (
            b.name,
            b.requests,
            b.errors,
            b.latency,
        )
        assert a.saturation == b.saturation or (
            math.isnan(a.saturation) and math.isnan(b.saturation)
        )


@FAST
@given(
    st.lists(st.tuples(names, st.floats(0.0, 1.0, width=32, exclude_min=True)), max_size=5),
    st.lists(
        st.tuples(
            names, st.integers(0, 2), st.floats(0.0, 1.0, width=32), st.floats(0, 1e4, width=32)
        ),
        max_size=5,
    ),
)
def test_control_round_trip(
    factors: list[tuple[str, float]], breakers: list[tuple[str, int, float, float]]
) -> None:
    message = ControlMessage(
        "agg", 1, 2, 3.5, 1.5, tuple(factors), tuple(BreakerInfo(*b) for b in breakers)
    )
    assert wire.decode_control(wire.encode_control(message)) == message
