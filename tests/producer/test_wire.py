"""The wire format (``producer.wire``): round trips, every malformed case, fuzzing, partitions.

Malformed messages are built by hand with :mod:`struct` from the layout in the module docstring
(not with the encoder), so that the tests check the documented format, not the encoder's idea of
it. Record sums after splitting are checked against plain Python integers.
"""

from __future__ import annotations

import binascii
import math
import struct
from collections import defaultdict

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from producer import wire
from producer.wire import (
    GRANT_RECORD,
    GRANT_TYPE,
    MAGIC,
    MAX_COUNT,
    MAX_RECORDS,
    USAGE_RECORD,
    USAGE_TYPE,
    VERSION,
    GrantBatch,
    UsageBatch,
    WireError,
    decode_grants,
    decode_usage,
    encode_grants,
    encode_usage,
    grant_partition,
    usage_partitions,
    usage_records,
)

U64 = 2**64 - 1
U32 = 2**32 - 1
FAST = settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])

# -- hand-built messages (the documented layout) ---------------------------------------------


def _s(raw: bytes) -> bytes:
    return bytes((len(raw),)) + raw


def usage_bytes(
    *,
    magic: bytes = MAGIC,
    version: int = VERSION,
    kind: int = USAGE_TYPE,
    server_id: bytes = b"srv-1",
    incarnation: int = 7,
    seq: int = 1,
    start: float = 10.0,
    end: float = 10.1,
    grant_seq: int = 3,
    leases: int = 2,
    records: list[tuple[int, int, int, int, int]] | None = None,
    count: int | None = None,
    tail: bytes = b"",
) -> bytes:
    records = [(5, 1, 2, 3, 4)] if records is None else records
    body = b"".join(struct.pack("<QHHHH", *r) for r in records)
    return (
        magic
        + bytes((version, kind))
        + _s(server_id)
        + struct.pack("<QQddQI", incarnation, seq, start, end, grant_seq, leases)
        + struct.pack("<I", len(records) if count is None else count)
        + body
        + tail
    )


def grant_bytes(
    *,
    magic: bytes = MAGIC,
    version: int = VERSION,
    kind: int = GRANT_TYPE,
    aggregator_id: bytes = b"agg-1",
    epoch: int = 9,
    seq: int = 4,
    issued_at: float = 100.0,
    ttl: float = 0.5,
    servers: int = 3,
    server_id: bytes = b"srv-1",
    records: list[tuple[int, int]] | None = None,
    count: int | None = None,
    tail: bytes = b"",
) -> bytes:
    records = [(5, 17)] if records is None else records
    body = b"".join(struct.pack("<QI", *r) for r in records)
    return (
        magic
        + bytes((version, kind))
        + _s(aggregator_id)
        + struct.pack("<QQdfH", epoch, seq, issued_at, ttl, servers)
        + _s(server_id)
        + struct.pack("<I", len(records) if count is None else count)
        + body
        + tail
    )


def reason_of(decode, data) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(WireError) as info:
        decode(data)
    assert isinstance(info.value, ValueError)  # documented: WireError is a ValueError
    assert str(info.value).startswith(info.value.reason + ":")
    return info.value.reason


def decodes_or_wire_error(decode, data) -> object | None:  # type: ignore[no-untyped-def]
    """The fuzz contract: a batch, or WireError; any other exception fails the test."""
    try:
        return decode(data)
    except WireError as e:
        assert e.reason in {
            "bad_magic",
            "bad_version",
            "bad_type",
            "truncated",
            "bad_length",
            "bad_field",
            "too_large",
        }, e.reason
        return None


# -- strategies --------------------------------------------------------------------------------

ids = st.text(min_size=1, max_size=80).filter(lambda s: 1 <= len(s.encode()) <= 255)
u64 = st.one_of(st.integers(0, U64), st.integers(U64 - 1000, U64), st.sampled_from([0, 1, U64]))
keys = st.one_of(st.integers(1, U64), st.integers(U64 - 1000, U64), st.integers(1, 1000))
finite = st.floats(allow_nan=False, allow_infinity=False)


@st.composite
def usage_batches(draw: st.DrawFn) -> UsageBatch:
    n = draw(st.integers(0, 40))
    rec = np.empty(n, dtype=USAGE_RECORD)
    rec["key"] = draw(st.lists(keys, min_size=n, max_size=n))
    for name in wire.COUNT_FIELDS:
        rec[name] = draw(st.lists(st.integers(0, MAX_COUNT), min_size=n, max_size=n))
    a, b = sorted(draw(st.lists(finite, min_size=2, max_size=2)))
    return UsageBatch(
        draw(ids),
        draw(u64),
        draw(u64),
        a,
        b,
        draw(u64),
        draw(st.integers(0, U32)),
        rec,
    )


@st.composite
def grant_batches(draw: st.DrawFn) -> GrantBatch:
    n = draw(st.integers(0, 40))
    rec = np.empty(n, dtype=GRANT_RECORD)
    rec["key"] = draw(st.lists(keys, min_size=n, max_size=n))
    rec["tokens"] = draw(
        st.lists(st.one_of(st.integers(0, U32), st.just(U32)), min_size=n, max_size=n)
    )
    ttl = draw(
        st.floats(
            min_value=0.0,
            exclude_min=True,
            allow_infinity=False,
            allow_nan=False,
            width=32,
        )
    )
    return GrantBatch(
        draw(ids),
        draw(u64),
        draw(u64),
        draw(finite),
        ttl,
        draw(st.integers(0, 0xFFFF)),
        draw(ids),
        rec,
    )


def same_usage(a: UsageBatch, b: UsageBatch) -> None:
    assert (a.server_id, a.incarnation, a.seq, a.grant_seq, a.leases) == (
        b.server_id,
        b.incarnation,
        b.seq,
        b.grant_seq,
        b.leases,
    )
    # bit-identical floats (keeps -0.0 apart from 0.0)
    assert struct.pack("<dd", a.start, a.end) == struct.pack("<dd", b.start, b.end)
    assert a.records.dtype == USAGE_RECORD and b.records.dtype == USAGE_RECORD
    assert a.records.tobytes() == b.records.tobytes()


def same_grants(a: GrantBatch, b: GrantBatch) -> None:
    assert (a.aggregator_id, a.epoch, a.seq, a.servers, a.server_id) == (
        b.aggregator_id,
        b.epoch,
        b.seq,
        b.servers,
        b.server_id,
    )
    assert struct.pack("<df", a.issued_at, a.ttl) == struct.pack("<df", b.issued_at, b.ttl)
    assert a.records.dtype == GRANT_RECORD and b.records.dtype == GRANT_RECORD
    assert a.records.tobytes() == b.records.tobytes()


# -- record sizes --------------------------------------------------------------------------------


def test_record_sizes() -> None:
    # the design's budget: at most 16 bytes per client record on the usage topic
    assert USAGE_RECORD.itemsize == 16
    assert GRANT_RECORD.itemsize == 12
    assert [USAGE_RECORD.fields[f][1] for f in USAGE_RECORD.names] == [0, 8, 10, 12, 14]
    assert [GRANT_RECORD.fields[f][1] for f in GRANT_RECORD.names] == [0, 8]
    assert all(USAGE_RECORD.fields[f][0].str[0] == "<" for f in USAGE_RECORD.names)
    assert all(GRANT_RECORD.fields[f][0].str[0] == "<" for f in GRANT_RECORD.names)
    assert MAX_COUNT == 65535 and wire.MAX_GRANT == U32


def test_hand_built_messages_decode() -> None:
    """The documented layout, written independently of the encoder, is what the decoder reads."""
    u = decode_usage(usage_bytes(records=[(U64, 65535, 0, 1, 2), (3, 0, 0, 0, 0)]))
    assert (u.server_id, u.incarnation, u.seq, u.start, u.end, u.grant_seq, u.leases) == (
        "srv-1",
        7,
        1,
        10.0,
        10.1,
        3,
        2,
    )
    assert u.records["key"].tolist() == [U64, 3]
    assert u.records[0].tolist() == (U64, 65535, 0, 1, 2)
    g = decode_grants(grant_bytes(records=[(U64, U32), (2, 0)]))
    assert (g.aggregator_id, g.epoch, g.seq, g.issued_at, g.ttl, g.servers, g.server_id) == (
        "agg-1",
        9,
        4,
        100.0,
        0.5,
        3,
        "srv-1",
    )
    assert g.records.tolist() == [(U64, U32), (2, 0)]
    # and the encoder writes exactly that layout
    assert encode_usage(u) == usage_bytes(records=[(U64, 65535, 0, 1, 2), (3, 0, 0, 0, 0)])
    assert encode_grants(g) == grant_bytes(records=[(U64, U32), (2, 0)])


# -- round trips ---------------------------------------------------------------------------------


@FAST
@given(usage_batches())
def test_usage_round_trip(batch: UsageBatch) -> None:
    data = encode_usage(batch)
    assert data[:5] == MAGIC + bytes((VERSION, USAGE_TYPE))
    assert len(data) == 5 + 1 + len(batch.server_id.encode()) + 44 + 4 + 16 * batch.records.size
    same_usage(decode_usage(data), batch)
    same_usage(decode_usage(bytearray(data)), batch)
    same_usage(decode_usage(memoryview(data)), batch)


@FAST
@given(grant_batches())
def test_grant_round_trip(batch: GrantBatch) -> None:
    data = encode_grants(batch)
    assert data[:5] == MAGIC + bytes((VERSION, GRANT_TYPE))
    back = decode_grants(data)
    same_grants(back, batch)
    same_grants(decode_grants(bytearray(data)), batch)


def test_empty_batches_round_trip() -> None:
    u = UsageBatch("s", 0, 0, 0.0, 0.0, 0, 0, np.empty(0, dtype=USAGE_RECORD))
    same_usage(decode_usage(encode_usage(u)), u)
    g = GrantBatch("a", 0, 0, 0.0, 1.0, 0, "s", np.empty(0, dtype=GRANT_RECORD))
    same_grants(decode_grants(encode_grants(g)), g)


def test_longest_and_multibyte_strings_round_trip() -> None:
    longest = "é" * 127 + "x"  # 255 bytes of UTF-8
    assert len(longest.encode()) == 255
    u = UsageBatch(longest, 1, 2, 0.0, 1.0, 3, 4, np.empty(0, dtype=USAGE_RECORD))
    assert decode_usage(encode_usage(u)).server_id == longest
    g = GrantBatch("🦀" * 63, 1, 2, 0.0, 1.0, 5, longest, np.empty(0, dtype=GRANT_RECORD))
    back = decode_grants(encode_grants(g))
    assert back.aggregator_id == "🦀" * 63 and back.server_id == longest


@pytest.mark.parametrize("bad", ["", "x" * 256, "é" * 128])
def test_encoder_refuses_strings_outside_1_to_255_bytes(bad: str) -> None:
    with pytest.raises(ValueError):
        encode_usage(UsageBatch(bad, 1, 1, 0.0, 1.0, 0, 0, np.empty(0, dtype=USAGE_RECORD)))
    with pytest.raises(ValueError):
        encode_grants(GrantBatch(bad, 1, 1, 0.0, 1.0, 0, "s", np.empty(0, dtype=GRANT_RECORD)))
    with pytest.raises(ValueError):
        encode_grants(GrantBatch("a", 1, 1, 0.0, 1.0, 0, bad, np.empty(0, dtype=GRANT_RECORD)))


# -- usage_records: splitting large counts -------------------------------------------------------

count_values = st.one_of(
    st.integers(0, 3 * MAX_COUNT + 5).map(float),
    st.floats(min_value=0.0, max_value=400_000.0, allow_nan=False),
    st.sampled_from([0.0, 0.25, 65535.0, 65535.5, 65536.0, 131070.0, 131071.0]),
)


@FAST
@given(
    st.lists(
        st.tuples(keys, count_values, count_values, count_values, count_values),
        max_size=20,
    )
)
def test_usage_records_split_and_sum(rows: list[tuple[int, float, float, float, float]]) -> None:
    ks = np.array([r[0] for r in rows], dtype=np.uint64)
    cols = [np.array([r[j] for r in rows], dtype=np.float64) for j in range(1, 5)]
    rec = usage_records(ks, *cols)
    assert rec.dtype == USAGE_RECORD
    # reference: per key, the sum of the ceiled inputs (exact integers)
    want: dict[int, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    pieces: dict[int, int] = defaultdict(int)
    for r in rows:
        ceiled = [math.ceil(v) for v in r[1:]]
        for j in range(4):
            want[r[0]][j] += ceiled[j]
        pieces[r[0]] += max(1, -(-max(ceiled) // MAX_COUNT))
    got: dict[int, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    seen: dict[int, int] = defaultdict(int)
    for r in rec.tolist():
        seen[r[0]] += 1
        for j in range(4):
            assert 0 <= r[1 + j] <= MAX_COUNT
            got[r[0]][j] += r[1 + j]
    assert dict(got) == dict(want)
    # split only as far as needed: one record per MAX_COUNT of the largest count (at least one)
    assert dict(seen) == dict(pieces)
    # and the records survive the wire
    batch = UsageBatch("s", 1, 1, 0.0, 1.0, 0, 0, rec)
    same_usage(decode_usage(encode_usage(batch)), batch)


def test_usage_records_edges() -> None:
    empty = usage_records(np.zeros(0, dtype=np.uint64), *(np.zeros(0),) * 4)
    assert empty.dtype == USAGE_RECORD and empty.size == 0
    with pytest.raises(ValueError):
        usage_records(np.array([1], dtype=np.uint64), np.array([-1.0]), *(np.zeros(1),) * 3)
    rec = usage_records(
        np.array([U64], dtype=np.uint64),
        np.array([65536.0]),
        np.array([0.1]),
        np.array([0.0]),
        np.array([0.0]),
    )
    assert rec.tolist() == [(U64, 65535, 1, 0, 0), (U64, 1, 0, 0, 0)]


# -- malformed: each reason ----------------------------------------------------------------------


@pytest.mark.parametrize("decode", [decode_usage, decode_grants])
@pytest.mark.parametrize("magic", [b"XYZ", b"drl", b"\x00\x00\x00", b"DRM"])
def test_bad_magic(decode, magic: bytes) -> None:  # type: ignore[no-untyped-def]
    data = usage_bytes(magic=magic) if decode is decode_usage else grant_bytes(magic=magic)
    assert reason_of(decode, data) == "bad_magic"


@pytest.mark.parametrize("decode", [decode_usage, decode_grants])
@pytest.mark.parametrize("version", [0, 2, 3, 255])
def test_unknown_version_is_refused_clearly(decode, version: int) -> None:  # type: ignore[no-untyped-def]
    data = usage_bytes(version=version) if decode is decode_usage else grant_bytes(version=version)
    with pytest.raises(WireError) as info:
        decode(data)
    assert info.value.reason == "bad_version"
    message = str(info.value)
    assert str(version) in message and str(VERSION) in message and "version" in message


@pytest.mark.parametrize(
    ("decode", "data"),
    [
        (decode_usage, grant_bytes()),
        (decode_grants, usage_bytes()),
        (decode_usage, usage_bytes(kind=0)),
        (decode_usage, usage_bytes(kind=3)),
        (decode_grants, grant_bytes(kind=255)),
    ],
)
def test_bad_type(decode, data: bytes) -> None:  # type: ignore[no-untyped-def]
    assert reason_of(decode, data) == "bad_type"


@pytest.mark.parametrize("decode", [decode_usage, decode_grants])
@pytest.mark.parametrize("value", ["DRL\x01\x01", None, 12345, [68, 82, 76, 1, 1]])
def test_bad_type_for_non_bytes(decode, value: object) -> None:  # type: ignore[no-untyped-def]
    assert reason_of(decode, value) == "bad_type"


@pytest.mark.parametrize("decode", [decode_usage, decode_grants])
def test_every_prefix_is_truncated_or_bad_length(decode) -> None:  # type: ignore[no-untyped-def]
    if decode is decode_usage:
        data = usage_bytes(records=[(1, 2, 3, 4, 5), (6, 7, 8, 9, 10)])
        head = len(data) - 2 * USAGE_RECORD.itemsize
    else:
        data = grant_bytes(records=[(1, 2), (3, 4)])
        head = len(data) - 2 * GRANT_RECORD.itemsize
    for n in range(len(data)):
        # before the record count the header is cut short; after it, records are missing
        want = "truncated" if n < head else "bad_length"
        assert reason_of(decode, data[:n]) == want, n


@pytest.mark.parametrize("decode", [decode_usage, decode_grants])
@pytest.mark.parametrize("tail", [b"\x00", b"\x00" * 11, b"\x01" * 16, b"\x00" * 32])
def test_trailing_bytes_are_bad_length(decode, tail: bytes) -> None:  # type: ignore[no-untyped-def]
    data = usage_bytes(tail=tail) if decode is decode_usage else grant_bytes(tail=tail)
    assert reason_of(decode, data) == "bad_length"


@pytest.mark.parametrize("count", [0, 2, 5, MAX_RECORDS])
def test_count_disagreeing_with_payload_is_bad_length(count: int) -> None:
    assert reason_of(decode_usage, usage_bytes(count=count)) == "bad_length"
    assert reason_of(decode_grants, grant_bytes(count=count)) == "bad_length"


@pytest.mark.parametrize("count", [MAX_RECORDS + 1, 2**31, U32])
def test_too_many_records_is_too_large(count: int) -> None:
    assert reason_of(decode_usage, usage_bytes(count=count, records=[])) == "too_large"
    assert reason_of(decode_grants, grant_bytes(count=count, records=[])) == "too_large"


NONFINITE = [math.nan, math.inf, -math.inf]


@pytest.mark.parametrize("bad", NONFINITE)
def test_non_finite_interval_is_bad_field(bad: float) -> None:
    assert reason_of(decode_usage, usage_bytes(start=bad)) == "bad_field"
    assert reason_of(decode_usage, usage_bytes(end=bad)) == "bad_field"
    assert reason_of(decode_usage, usage_bytes(start=bad, end=bad)) == "bad_field"


@pytest.mark.parametrize("bad", NONFINITE)
def test_non_finite_grant_times_are_bad_field(bad: float) -> None:
    assert reason_of(decode_grants, grant_bytes(issued_at=bad)) == "bad_field"
    assert reason_of(decode_grants, grant_bytes(ttl=bad)) == "bad_field"


def test_interval_ending_before_it_starts_is_bad_field() -> None:
    assert reason_of(decode_usage, usage_bytes(start=10.0, end=9.999)) == "bad_field"
    assert reason_of(decode_usage, usage_bytes(start=0.0, end=-5e-324)) == "bad_field"
    # an empty interval is fine (a report at the same instant)
    assert decode_usage(usage_bytes(start=3.0, end=3.0)).end == 3.0


@pytest.mark.parametrize("ttl", [0.0, -0.0, -1.0, -1e-30])
def test_non_positive_ttl_is_bad_field(ttl: float) -> None:
    assert reason_of(decode_grants, grant_bytes(ttl=ttl)) == "bad_field"


def test_tiny_positive_ttl_is_accepted() -> None:
    tiny = struct.unpack("<f", struct.pack("<I", 1))[0]  # the smallest f32 subnormal
    assert decode_grants(grant_bytes(ttl=tiny)).ttl == tiny


@pytest.mark.parametrize("raw", [b"", b"\xff", b"\xc3", b"a\x80b", b"\xed\xa0\x80"])
def test_empty_or_non_utf8_strings_are_bad_field(raw: bytes) -> None:
    assert reason_of(decode_usage, usage_bytes(server_id=raw)) == "bad_field"
    assert reason_of(decode_grants, grant_bytes(aggregator_id=raw)) == "bad_field"
    assert reason_of(decode_grants, grant_bytes(server_id=raw)) == "bad_field"


def test_checks_come_in_order() -> None:
    """The first thing wrong is reported: magic, version, type, then the body."""
    assert reason_of(decode_usage, usage_bytes(magic=b"XXX", version=9, kind=9)) == "bad_magic"
    assert reason_of(decode_usage, usage_bytes(version=9, kind=9)) == "bad_version"
    assert reason_of(decode_usage, usage_bytes(kind=9, start=math.nan)) == "bad_type"
    assert reason_of(decode_usage, b"DRL") == "truncated"
    assert reason_of(decode_usage, b"") == "truncated"


# -- fuzzing: anything decodes or raises WireError ------------------------------------------------

DECODERS = [decode_usage, decode_grants]
VALID = [
    usage_bytes(),
    usage_bytes(records=[]),
    usage_bytes(records=[(U64, 65535, 65535, 65535, 65535)] * 3),
    grant_bytes(),
    grant_bytes(records=[]),
    grant_bytes(records=[(U64, U32)] * 3),
]
prefixes = st.sampled_from(
    [b"", MAGIC, MAGIC + bytes((VERSION, USAGE_TYPE)), MAGIC + bytes((VERSION, GRANT_TYPE))]
)


@settings(deadline=None, max_examples=400)
@given(prefixes, st.binary(max_size=200))
def test_fuzz_any_bytes(prefix: bytes, tail: bytes) -> None:
    data = prefix + tail
    for decode in DECODERS:
        batch = decodes_or_wire_error(decode, data)
        if isinstance(batch, UsageBatch):
            assert encode_usage(batch) == data  # the encoding is canonical
        elif isinstance(batch, GrantBatch):
            assert encode_grants(batch) == data


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "truncate", "extend", "insert", "delete"]))
        if op in ("flip", "set") and data:
            i = draw(st.integers(0, len(data) - 1))
            if op == "flip":
                data[i] ^= 1 << draw(st.integers(0, 7))
            else:
                data[i] = draw(st.integers(0, 255))
        elif op == "truncate":
            del data[draw(st.integers(0, len(data))) :]
        elif op == "extend":
            data += draw(st.binary(min_size=1, max_size=40))
        elif op == "insert":
            i = draw(st.integers(0, len(data)))
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and data:
            i = draw(st.integers(0, len(data) - 1))
            del data[i : i + draw(st.integers(1, 8))]
    return bytes(data)


@settings(deadline=None, max_examples=400)
@given(mutated())
def test_fuzz_mutated_valid_messages(data: bytes) -> None:
    for decode in DECODERS:
        batch = decodes_or_wire_error(decode, data)
        if isinstance(batch, UsageBatch):
            assert encode_usage(batch) == data
        elif isinstance(batch, GrantBatch):
            assert encode_grants(batch) == data


@pytest.mark.timeout(10)
@pytest.mark.parametrize("count", [MAX_RECORDS, MAX_RECORDS - 1, 1 << 19])
def test_huge_claimed_count_is_refused_fast(count: int) -> None:
    """A count within bounds but with no payload must fail on length, not allocate or hang."""
    assert reason_of(decode_usage, usage_bytes(count=count, records=[])) == "bad_length"
    assert reason_of(decode_grants, grant_bytes(count=count, records=[])) == "bad_length"


def test_decoded_records_do_not_alias_the_input() -> None:
    buf = bytearray(usage_bytes(records=[(1, 1, 1, 1, 1)]))
    batch = decode_usage(buf)
    buf[-16:] = b"\xff" * 16
    assert batch.records.tolist() == [(1, 1, 1, 1, 1)]
    batch.records["admitted"] += 1  # writable


# -- partitioning ----------------------------------------------------------------------------


@FAST
@given(st.lists(keys, max_size=50), st.integers(1, 1024))
def test_usage_partitions_are_key_mod_partitions(ks: list[int], partitions: int) -> None:
    arr = np.array(ks, dtype=np.uint64)
    got = usage_partitions(arr, partitions)
    assert got.tolist() == [k % partitions for k in ks]
    assert ((got >= 0) & (got < partitions)).all()
    assert np.array_equal(got, usage_partitions(arr.copy(), partitions))


@FAST
@given(ids, st.integers(1, 1 << 16))
def test_grant_partition_is_crc32_of_utf8(server_id: str, partitions: int) -> None:
    p = grant_partition(server_id, partitions)
    assert 0 <= p < partitions
    assert p == grant_partition(server_id, partitions)
    assert p == binascii.crc32(server_id.encode("utf-8")) % partitions


def test_grant_partition_known_vector() -> None:
    # CRC-32 (IEEE) check value of "123456789" is 0xCBF43926: any implementation must agree
    assert grant_partition("123456789", 1 << 32) == 0xCBF43926
    assert grant_partition("123456789", 1000) == 0xCBF43926 % 1000
    assert grant_partition("anything", 1) == 0


def test_usage_partitions_of_extreme_keys() -> None:
    arr = np.array([1, 2**63, U64, U64 - 1], dtype=np.uint64)
    assert usage_partitions(arr, 7).tolist() == [1 % 7, 2**63 % 7, U64 % 7, (U64 - 1) % 7]


# -- the encoder and the decoder agree on the largest batch -------------------------------------


def test_a_batch_the_encoder_writes_is_one_the_decoder_reads() -> None:
    """``encode_usage`` accepts any number of records but ``decode_usage`` refuses more than
    MAX_RECORDS: the largest legal batch must still round-trip."""
    rec = np.zeros(MAX_RECORDS, dtype=USAGE_RECORD)
    rec["key"] = 1
    batch = UsageBatch("s", 1, 1, 0.0, 1.0, 0, 0, rec)
    assert decode_usage(encode_usage(batch)).records.size == MAX_RECORDS


def test_encoder_never_writes_a_batch_the_decoder_refuses() -> None:
    """More than MAX_RECORDS records: the encoders refuse to write what every decoder would
    refuse as too_large (the agent splits a partition's records into BATCH_RECORDS batches)."""
    rec = np.zeros(MAX_RECORDS + 1, dtype=USAGE_RECORD)
    rec["key"] = 1
    with pytest.raises(ValueError, match="records"):
        encode_usage(UsageBatch("s", 1, 1, 0.0, 1.0, 0, 0, rec))
    grants = np.zeros(MAX_RECORDS + 1, dtype=GRANT_RECORD)
    grants["key"] = 1
    with pytest.raises(ValueError, match="records"):
        encode_grants(GrantBatch("a", 1, 1, 0.0, 1.0, 1, "s", grants))
    # the largest legal grant batch still round-trips
    assert (
        decode_grants(
            encode_grants(GrantBatch("a", 1, 1, 0.0, 1.0, 1, "s", grants[:MAX_RECORDS]))
        ).records.size
        == MAX_RECORDS
    )


def test_agent_batches_fit_the_decoder() -> None:
    assert 0 < wire.BATCH_RECORDS <= MAX_RECORDS
    assert wire.BATCH_RECORDS * USAGE_RECORD.itemsize < 1 << 20  # Kafka's default message size


# -- client key 0 is reserved --------------------------------------------------------------------


@pytest.mark.parametrize("where", [0, 1, 2])
def test_decoders_refuse_a_record_with_key_0_as_bad_field(where: int) -> None:
    usage = [(5, 1, 2, 3, 4), (U64, 0, 0, 1, 0), (7, 0, 0, 0, 9)]
    usage[where] = (0, *usage[where][1:])
    assert reason_of(decode_usage, usage_bytes(records=usage)) == "bad_field"
    grants = [(5, 17), (U64, U32), (7, 0)]
    grants[where] = (0, grants[where][1])
    assert reason_of(decode_grants, grant_bytes(records=grants)) == "bad_field"
    # the length is checked first
    assert reason_of(decode_usage, usage_bytes(records=usage, tail=b"\x00")) == "bad_length"
    assert reason_of(decode_grants, grant_bytes(records=grants, count=2)) == "bad_length"


def test_a_key_0_record_with_zero_counts_is_refused_too() -> None:
    assert reason_of(decode_usage, usage_bytes(records=[(0, 0, 0, 0, 0)])) == "bad_field"
    assert reason_of(decode_grants, grant_bytes(records=[(0, 0)])) == "bad_field"


@pytest.mark.parametrize("n", [1, 3])
def test_encoders_refuse_client_key_0(n: int) -> None:
    rec = np.zeros(n, dtype=USAGE_RECORD)
    rec["key"] = np.arange(n)  # key 0 first; the others are fine
    rec["rejected"] = 1
    with pytest.raises(ValueError, match="key 0"):
        encode_usage(UsageBatch("s", 1, 1, 0.0, 1.0, 0, 0, rec))
    grants = np.zeros(n, dtype=GRANT_RECORD)
    grants["key"] = np.arange(n)[::-1]  # key 0 last
    grants["tokens"] = 5
    with pytest.raises(ValueError, match="key 0"):
        encode_grants(GrantBatch("a", 1, 1, 0.0, 1.0, 1, "s", grants))
    # without key 0 the same records encode and decode
    rec["key"] += 1
    assert decode_usage(encode_usage(UsageBatch("s", 1, 1, 0.0, 1.0, 0, 0, rec))).records.size == n
