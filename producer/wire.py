"""The wire format: the only definition of every message on the usage and grant topics.

Every message starts with the magic ``b"DRL"``, a version byte (:data:`VERSION`) and a type byte.
All integers and floats are little-endian. Strings are one length byte plus UTF-8 (1..255
bytes). Records are packed numpy arrays (:data:`USAGE_RECORD`, :data:`GRANT_RECORD`).

Usage batch (type 1), server -> aggregator, one per usage partition per report interval::

    server_id  str      the reporting server
    incarnation u64     random per agent start: a restarted server is a new sender
    seq        u64      per sender, +1 per batch (shared by all partitions)
    start, end f64 f64  the interval reported, on the server's own clock (seconds)
    grant_seq  u64      the last grant batch sequence number the server applied (lease summary)
    leases     u32      clients holding a live lease on the server (lease summary)
    count      u32      records that follow, 16 bytes each:
        key u64, admitted u16, extra u16, rejected u16, released u16   (tokens)

Grant batch (type 2), aggregator -> one server::

    aggregator_id str   the granting aggregator
    epoch      u64      random per aggregator start
    seq        u64      per aggregator, +1 per batch
    issued_at  f64      the aggregator's clock when the grants were computed (seconds)
    ttl        f32      seconds the leases last from ``issued_at``
    servers    u16      active servers the aggregator sees (the degraded share's N)
    server_id  str      the addressee
    count      u32      records that follow, 12 bytes each: key u64, tokens u32

Health report (type 3), server -> every usage partition (so that every aggregator hears every
server), every ``health_interval``, only from agents given a backend monitor::

    server_id  str      the reporting server
    incarnation u64     as in the usage batch
    seq        u64      per sender, +1 per report (one sequence for health reports)
    start, end f64 f64  the interval reported, on the server's own clock (seconds)
    count      u16      backends that follow, each:
        name str, requests u32, errors u32, saturation f32 (0..1; NaN: not reported),
        latency u32 x LATENCY_BUCKETS   calls per latency bucket (:data:`LATENCY_EDGES`)

Control message (type 4), aggregator -> every grant partition (every server reads it), every
control interval, only from aggregators with adaptive limits or breakers configured::

    aggregator_id str   the sending aggregator
    epoch      u64      random per aggregator start
    seq        u64      per aggregator, +1 per control message
    issued_at  f64      the aggregator's clock (seconds)
    ttl        f32      seconds the state holds after it is received (then: factor 1, closed)
    scopes     u16      each: name str, factor f32 (0 < factor <= 1: the effective limit is
                        factor x the configured one)
    breakers   u16      each: name str, state u8 (:data:`BREAKER_STATES`: 0 closed, 1 open,
                        2 half-open), probe f32 (share of calls let through while half-open),
                        retry_after f32 (seconds until an open breaker half-opens)

Usage counts, in tokens since the previous batch: ``admitted`` from the server's lease,
``extra`` admitted outside a lease (cold start, degraded share), ``rejected`` (refused or waiting;
a client's demand is admitted + extra + rejected), ``released`` (left unspent in a lease that
expired). Client key 0 is reserved. Counts above 65,535 tokens per interval are split over
several records with the same key; the aggregator sums them. Anything else malformed raises
:class:`WireError` with a ``reason``.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass
from typing import cast

import numpy as np

MAGIC = b"DRL"
VERSION = 1
USAGE_TYPE = 1
GRANT_TYPE = 2
HEALTH_TYPE = 3
CONTROL_TYPE = 4

#: Upper edges of the latency histogram's buckets, seconds: ten per decade from 100 µs to
#: 100 s; bucket ``i`` counts calls with ``LATENCY_EDGES[i-1] <= latency < LATENCY_EDGES[i]``
#: (bucket 0 from 0, the last one up to infinity).
LATENCY_EDGES: tuple[float, ...] = tuple(1e-4 * 10 ** (i / 10) for i in range(61))
LATENCY_BUCKETS = len(LATENCY_EDGES) + 1
#: Breaker states in the control message, by code.
BREAKER_STATES = ("closed", "open", "half_open")
#: Most backends one health report, and scopes or breakers one control message, may carry.
MAX_NAMES = 0xFFFF

USAGE_RECORD = np.dtype(
    [
        ("key", "<u8"),
        ("admitted", "<u2"),
        ("extra", "<u2"),
        ("rejected", "<u2"),
        ("released", "<u2"),
    ]
)
GRANT_RECORD = np.dtype([("key", "<u8"), ("tokens", "<u4")])
COUNT_FIELDS = ("admitted", "extra", "rejected", "released")
MAX_COUNT = 0xFFFF
MAX_GRANT = 0xFFFFFFFF
#: Most records one batch may carry (a 16 MiB usage batch); decoders refuse more.
MAX_RECORDS = 1 << 20
#: Most records the agent puts in one usage batch: 50,000 x 16 bytes stays under Kafka's
#: default 1 MiB message size (``message.max.bytes``), before compression.
BATCH_RECORDS = 50_000

_PREFIX = struct.Struct("<3sBB")
_USAGE_HEAD = struct.Struct("<QQddQI")
_GRANT_HEAD = struct.Struct("<QQdfH")
_COUNT = struct.Struct("<I")
_HEALTH_HEAD = struct.Struct("<QQdd")
_NAMES = struct.Struct("<H")
_BACKEND = struct.Struct(f"<IIf{LATENCY_BUCKETS}I")
_CONTROL_HEAD = struct.Struct("<QQdf")
_FACTOR = struct.Struct("<f")
_BREAKER = struct.Struct("<Bff")


class WireError(ValueError):
    """A message that is not a valid batch; ``reason`` is a short metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True, slots=True)
class UsageBatch:
    server_id: str
    incarnation: int
    seq: int
    start: float
    end: float
    grant_seq: int
    leases: int
    records: np.ndarray  # USAGE_RECORD


@dataclass(frozen=True, slots=True)
class GrantBatch:
    aggregator_id: str
    epoch: int
    seq: int
    issued_at: float
    ttl: float
    servers: int
    server_id: str
    records: np.ndarray  # GRANT_RECORD


@dataclass(frozen=True, slots=True)
class BackendHealth:
    """One backend as one server saw it over a health interval."""

    name: str
    requests: int
    errors: int
    saturation: float  # 0..1, NaN: not reported
    latency: tuple[int, ...]  # calls per bucket of LATENCY_EDGES (LATENCY_BUCKETS counts)


@dataclass(frozen=True, slots=True)
class HealthReport:
    server_id: str
    incarnation: int
    seq: int
    start: float
    end: float
    backends: tuple[BackendHealth, ...]


@dataclass(frozen=True, slots=True)
class BreakerInfo:
    """A backend's breaker as the aggregators decided it."""

    name: str
    state: int  # index into BREAKER_STATES
    probe: float  # share of calls let through while half-open
    retry_after: float  # seconds until an open breaker half-opens


@dataclass(frozen=True, slots=True)
class ControlMessage:
    aggregator_id: str
    epoch: int
    seq: int
    issued_at: float
    ttl: float
    factors: tuple[tuple[str, float], ...]  # (scope, factor)
    breakers: tuple[BreakerInfo, ...]


def _pack_str(name: str, value: str) -> bytes:
    raw = value.encode()
    if not 1 <= len(raw) <= 255:
        raise ValueError(f"{name} must be 1..255 bytes of UTF-8, got {len(raw)}")
    return bytes((len(raw),)) + raw


def usage_records(
    keys: np.ndarray,
    admitted: np.ndarray,
    extra: np.ndarray,
    rejected: np.ndarray,
    released: np.ndarray,
) -> np.ndarray:
    """Pack per-client token counts (any non-negative numbers; rounded up) into records.

    Counts above 65,535 continue in further records with the same key.
    """
    counts = np.ceil(np.stack([admitted, extra, rejected, released], axis=1)).astype(np.int64)
    if counts.size and counts.min() < 0:
        raise ValueError("usage counts must be >= 0")
    keys = np.asarray(keys, dtype=np.uint64)
    parts = []
    while keys.size:
        rec = np.empty(keys.size, dtype=USAGE_RECORD)
        rec["key"] = keys
        chunk = np.minimum(counts, MAX_COUNT)
        for j, name in enumerate(COUNT_FIELDS):
            rec[name] = chunk[:, j]
        parts.append(rec)
        counts = counts - chunk
        more = counts.any(axis=1)
        keys, counts = keys[more], counts[more]
    return np.concatenate(parts) if parts else np.empty(0, dtype=USAGE_RECORD)


def _check_records(rec: np.ndarray) -> None:
    if rec.size > MAX_RECORDS:
        raise ValueError(f"{rec.size} records in one batch; the most is {MAX_RECORDS}")
    if rec.size and not rec["key"].all():
        raise ValueError("client key 0 is reserved (it marks an empty slot)")


def encode_usage(batch: UsageBatch) -> bytes:
    rec = np.ascontiguousarray(batch.records, dtype=USAGE_RECORD)
    _check_records(rec)
    return b"".join(
        (
            _PREFIX.pack(MAGIC, VERSION, USAGE_TYPE),
            _pack_str("server_id", batch.server_id),
            _USAGE_HEAD.pack(
                batch.incarnation,
                batch.seq,
                batch.start,
                batch.end,
                batch.grant_seq,
                batch.leases,
            ),
            _COUNT.pack(rec.size),
            rec.tobytes(),
        )
    )


def encode_grants(batch: GrantBatch) -> bytes:
    rec = np.ascontiguousarray(batch.records, dtype=GRANT_RECORD)
    _check_records(rec)
    return b"".join(
        (
            _PREFIX.pack(MAGIC, VERSION, GRANT_TYPE),
            _pack_str("aggregator_id", batch.aggregator_id),
            _GRANT_HEAD.pack(batch.epoch, batch.seq, batch.issued_at, batch.ttl, batch.servers),
            _pack_str("server_id", batch.server_id),
            _COUNT.pack(rec.size),
            rec.tobytes(),
        )
    )


def _names(what: str, n: int) -> bytes:
    if n > MAX_NAMES:
        raise ValueError(f"{n} {what}; the most is {MAX_NAMES}")
    return _NAMES.pack(n)


def encode_health(report: HealthReport) -> bytes:
    parts = [
        _PREFIX.pack(MAGIC, VERSION, HEALTH_TYPE),
        _pack_str("server_id", report.server_id),
        _HEALTH_HEAD.pack(report.incarnation, report.seq, report.start, report.end),
        _names("backends", len(report.backends)),
    ]
    for b in report.backends:
        if len(b.latency) != LATENCY_BUCKETS:
            raise ValueError(f"latency needs {LATENCY_BUCKETS} bucket counts, got {len(b.latency)}")
        parts.append(_pack_str("backend name", b.name))
        parts.append(_BACKEND.pack(b.requests, b.errors, b.saturation, *b.latency))
    return b"".join(parts)


def encode_control(message: ControlMessage) -> bytes:
    parts = [
        _PREFIX.pack(MAGIC, VERSION, CONTROL_TYPE),
        _pack_str("aggregator_id", message.aggregator_id),
        _CONTROL_HEAD.pack(message.epoch, message.seq, message.issued_at, message.ttl),
        _names("scopes", len(message.factors)),
    ]
    for scope, factor in message.factors:
        if not 0.0 < factor <= 1.0:
            raise ValueError(f"factor of scope {scope!r} must be in (0, 1], got {factor!r}")
        parts.append(_pack_str("scope", scope))
        parts.append(_FACTOR.pack(factor))
    parts.append(_names("breakers", len(message.breakers)))
    for b in message.breakers:
        if not 0 <= b.state < len(BREAKER_STATES):
            raise ValueError(f"breaker state {b.state} is not one of 0..{len(BREAKER_STATES) - 1}")
        parts.append(_pack_str("backend name", b.name))
        parts.append(_BREAKER.pack(b.state, b.probe, b.retry_after))
    return b"".join(parts)


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int, what: str) -> memoryview:
        end = self.pos + n
        if end > len(self.data):
            raise WireError(
                "truncated", f"{what} needs {n} bytes, {len(self.data) - self.pos} left"
            )
        view = memoryview(self.data)[self.pos : end]
        self.pos = end
        return view

    def unpack(self, s: struct.Struct, what: str) -> tuple[object, ...]:
        return s.unpack(self.take(s.size, what))

    def string(self, what: str) -> str:
        n = self.take(1, what)[0]
        if n == 0:
            raise WireError("bad_field", f"{what} is empty")
        try:
            return bytes(self.take(n, what)).decode()
        except UnicodeDecodeError as e:
            raise WireError("bad_field", f"{what} is not UTF-8") from e

    def records(self, dtype: np.dtype, what: str) -> np.ndarray:
        (count,) = cast(tuple[int], self.unpack(_COUNT, what))
        if count > MAX_RECORDS:
            raise WireError("too_large", f"{count} {what} records (max {MAX_RECORDS})")
        if len(self.data) - self.pos != count * dtype.itemsize:
            raise WireError(
                "bad_length",
                f"{count} {what} records need {count * dtype.itemsize} bytes, "
                f"{len(self.data) - self.pos} remain",
            )
        rec = np.frombuffer(self.take(count * dtype.itemsize, what), dtype=dtype).copy()
        if count and not rec["key"].all():
            raise WireError("bad_field", f"a {what} record has client key 0 (reserved)")
        return rec


def message_type(data: bytes) -> int:
    """The type byte of a message, after checking magic and version."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise WireError("bad_type", f"expected bytes, got {type(data).__name__}")
    if len(data) < _PREFIX.size:
        raise WireError("truncated", f"{len(data)} bytes is shorter than the header")
    magic, version, kind = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise WireError("bad_magic", f"magic {bytes(magic)!r} is not {MAGIC!r}")
    if version != VERSION:
        raise WireError("bad_version", f"version {version} is not supported (this reads {VERSION})")
    assert isinstance(kind, int)
    return kind


def _finite(what: str, *values: float) -> None:
    if not all(math.isfinite(v) for v in values):
        raise WireError("bad_field", f"{what} is not finite")


def _open(data: bytes, kind: int, what: str) -> _Reader:
    """A reader past the prefix of a message of type ``kind`` (``what`` names it in errors)."""
    if message_type(data) != kind:
        raise WireError("bad_type", f"not {what}")
    r = _Reader(bytes(data))
    r.pos = _PREFIX.size
    return r


def decode_usage(data: bytes) -> UsageBatch:
    r = _open(data, USAGE_TYPE, "a usage batch")
    server_id = r.string("server_id")
    incarnation, seq, start, end, grant_seq, leases = cast(
        tuple[int, int, float, float, int, int], r.unpack(_USAGE_HEAD, "usage header")
    )
    _finite("interval", start, end)
    if end < start:
        raise WireError("bad_field", f"interval ends ({end}) before it starts ({start})")
    records = r.records(USAGE_RECORD, "usage")
    return UsageBatch(server_id, incarnation, seq, start, end, grant_seq, leases, records)


def decode_grants(data: bytes) -> GrantBatch:
    r = _open(data, GRANT_TYPE, "a grant batch")
    aggregator_id = r.string("aggregator_id")
    epoch, seq, issued_at, ttl, servers = cast(
        tuple[int, int, float, float, int], r.unpack(_GRANT_HEAD, "grant header")
    )
    _finite("grant times", issued_at, ttl)
    if ttl <= 0:
        raise WireError("bad_field", f"ttl {ttl} is not positive")
    server_id = r.string("server_id")
    records = r.records(GRANT_RECORD, "grant")
    return GrantBatch(aggregator_id, epoch, seq, issued_at, ttl, servers, server_id, records)


def _end(r: _Reader, what: str) -> None:
    if r.pos != len(r.data):
        raise WireError("bad_length", f"{len(r.data) - r.pos} bytes after the {what}")


def decode_health(data: bytes) -> HealthReport:
    r = _open(data, HEALTH_TYPE, "a health report")
    server_id = r.string("server_id")
    incarnation, seq, start, end = cast(
        tuple[int, int, float, float], r.unpack(_HEALTH_HEAD, "health header")
    )
    _finite("interval", start, end)
    if end < start:
        raise WireError("bad_field", f"interval ends ({end}) before it starts ({start})")
    (n,) = cast(tuple[int], r.unpack(_NAMES, "backend count"))
    backends = []
    for _ in range(n):
        name = r.string("backend name")
        fields = cast(tuple[int | float, ...], r.unpack(_BACKEND, "backend"))
        requests, errors, saturation = int(fields[0]), int(fields[1]), float(fields[2])
        latency = tuple(int(v) for v in fields[3:])
        if errors > requests:
            raise WireError("bad_field", f"backend {name!r}: {errors} errors of {requests} calls")
        if not (math.isnan(saturation) or 0.0 <= saturation <= 1.0):
            raise WireError("bad_field", f"backend {name!r}: saturation {saturation} not in 0..1")
        backends.append(BackendHealth(name, requests, errors, saturation, latency))
    _end(r, "health report")
    return HealthReport(server_id, incarnation, seq, start, end, tuple(backends))


def decode_control(data: bytes) -> ControlMessage:
    r = _open(data, CONTROL_TYPE, "a control message")
    aggregator_id = r.string("aggregator_id")
    epoch, seq, issued_at, ttl = cast(
        tuple[int, int, float, float], r.unpack(_CONTROL_HEAD, "control header")
    )
    _finite("control times", issued_at, ttl)
    if ttl <= 0:
        raise WireError("bad_field", f"ttl {ttl} is not positive")
    (n,) = cast(tuple[int], r.unpack(_NAMES, "scope count"))
    factors = []
    for _ in range(n):
        scope = r.string("scope")
        (factor,) = cast(tuple[float], r.unpack(_FACTOR, "factor"))
        if not 0.0 < factor <= 1.0:
            raise WireError("bad_field", f"factor {factor} of scope {scope!r} not in (0, 1]")
        factors.append((scope, factor))
    (n,) = cast(tuple[int], r.unpack(_NAMES, "breaker count"))
    breakers = []
    for _ in range(n):
        name = r.string("backend name")
        state, probe, retry_after = cast(tuple[int, float, float], r.unpack(_BREAKER, "breaker"))
        if state >= len(BREAKER_STATES):
            raise WireError("bad_field", f"breaker {name!r}: unknown state {state}")
        _finite(f"breaker {name!r}", probe, retry_after)
        if not 0.0 <= probe <= 1.0 or retry_after < 0:
            raise WireError("bad_field", f"breaker {name!r}: probe {probe}, retry {retry_after}")
        breakers.append(BreakerInfo(name, state, probe, retry_after))
    _end(r, "control message")
    return ControlMessage(
        aggregator_id, epoch, seq, issued_at, ttl, tuple(factors), tuple(breakers)
    )


def usage_partitions(keys: np.ndarray, partitions: int) -> np.ndarray:
    """The usage-topic partition of each stable client key: ``key mod partitions``."""
    return (np.asarray(keys, dtype=np.uint64) % np.uint64(partitions)).astype(np.int64)


def grant_partition(server_id: str, partitions: int) -> int:
    """The grant-topic partition that carries ``server_id``'s grants: CRC-32 of its UTF-8."""
    return zlib.crc32(server_id.encode()) % partitions
