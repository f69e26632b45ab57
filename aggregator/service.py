"""The aggregator: usage in from the consumer group, allocation every tick, grants out.

Time is the aggregator's own monotonic clock (``clock``); servers' clocks are never trusted for
anything but an upper bound. For each server the aggregator keeps
``offset = max(interval end on the server's clock - time received)`` over the last minute: the
server's clock offset minus the fastest delivery seen, so ``end - offset`` is never earlier than
when the interval really ended. A batch's admissions are charged at
``min(now, end - offset)``: tighter than the receive time by the delivery delay's jitter, and
never earlier than any admission it reports. A sample more than ``OFFSET_STEP`` below the
estimate (the server's clock stepped back, or that batch was late) restarts the estimate from
it; a step back smaller than that can make a charge up to ``OFFSET_STEP`` early.
:meth:`Aggregator.server_offsets` exposes the estimates (a server whose clock is 5 s fast
shows +5 s).

A newly assigned partition is **rebuilt** before it is granted from (``rebuild``, on by
default): the consumer starts it at the first record appended at or after
``now - window - rewind margin`` (Kafka's ``offsets_for_times``), the records older than the
assignment are *replayed* into the window only (charged at their interval's end when the
server's clock offset is known, else at their Kafka timestamp; no demand, no outstanding), and
the partition grants nothing until (1) it is caught up (a record appended after the assignment
arrived, or nothing arrived for ``server_timeout``) and, (2) if the replay found any usage,
``takeover_wait`` (one lease TTL and three ticks) after the assignment: by then every lease the
previous owner granted has expired and what it admitted is reported, so the new owner never
grants on top of tokens it cannot see. Meanwhile servers spend the leases
they hold, then fall back to their cold-start allowance. docs/failure-modes.md has the bound.

With a :class:`~aggregator.control.Controller` (``control=``), health reports on the usage topic
feed it, every tick steps it (adaptive factors scale the limits granted by, at the same tick)
and the control messages it returns go to every grant partition (docs/adaptive.md). Without
one, health reports are skipped.

Usage batches are applied at most once per (server, incarnation, partition): a batch whose
sequence number is not above the last one applied is a duplicate or out of order and is skipped
(counted). A malformed message is counted, logged and skipped.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from limiter import Policy
from limiter.keylimits import LimitSource
from producer import wire
from producer.transport import GRANTS_TOPIC, USAGE_TOPIC, QueueFull, Record, Transport

from .checkpoint import SLOTS, Checkpoint, CheckpointStore
from .control import Controller
from .partition import MAX_SERVERS, PartitionState

log = logging.getLogger(__name__)

#: Seconds between allocation ticks.
DEFAULT_TICK = 0.1
#: Seconds a lease lives after its last grant, as a multiple of the tick...
DEFAULT_TTL_TICKS = 10.0
#: ...and at least this many seconds.
MIN_DEFAULT_TTL = 1.0
#: A server not heard from for this many seconds no longer counts as active; its leases (which
#: expire ``lease_ttl`` after their last grant, and it gets no more) are taken back.
DEFAULT_SERVER_TIMEOUT = 3.0
#: A (client, server) pair keeps getting grants (a small lease) for up to a window after its last
#: demand, at most this many ticks.
MAX_KEEPALIVE_TICKS = 600
#: Seconds the loop waits after a consumer poll raised, before the next try.
POLL_RETRY = 0.1
#: Consumer group of the aggregators.
DEFAULT_GROUP = "drl-aggregators"
#: A rebuild rewinds the usage topic by the window plus this many seconds (at least one lease
#: TTL): batches from servers whose clocks run late, and the demand behind leases still live.
REWIND_MARGIN = 10.0
#: Ticks a takeover waits beyond one lease TTL: the reports of the last tokens the previous
#: owner's leases admitted (one report interval, 100 ms by default, plus delivery) arrive.
TAKEOVER_TICKS = 3


def _default_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"[:255]


@dataclass(frozen=True)
class AggregatorConfig:
    """What an aggregator enforces and how often; all times in seconds."""

    policy: Policy
    tick: float = DEFAULT_TICK
    lease_ttl: float | None = None  # default: DEFAULT_TTL_TICKS * tick
    server_timeout: float = DEFAULT_SERVER_TIMEOUT
    usage_topic: str = USAGE_TOPIC
    grants_topic: str = GRANTS_TOPIC
    group: str = DEFAULT_GROUP
    aggregator_id: str = field(default_factory=_default_id)
    #: Rebuild a newly assigned partition's window from the usage topic before granting.
    rebuild: bool = True
    #: Seconds between checkpoints of each partition's window (with a checkpoint store);
    #: default: window / 60, within [5 s, 300 s].
    checkpoint_interval: float | None = None

    def __post_init__(self) -> None:
        for name in ("tick", "server_timeout"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number of seconds >= 0, got {v!r}")
        if self.tick <= 0:
            raise ValueError("tick must be > 0 seconds")
        if self.checkpoint_interval is not None and not self.checkpoint_interval > 0:
            raise ValueError(
                f"checkpoint_interval must be > 0 seconds, got {self.checkpoint_interval!r}"
            )
        if self.lease_ttl is not None and not self.lease_ttl > 0:
            raise ValueError(f"lease_ttl must be > 0 seconds, got {self.lease_ttl!r}")
        if self.server_timeout <= self.ttl:
            raise ValueError(
                f"server_timeout ({self.server_timeout} s) must exceed the lease ttl "
                f"({self.ttl} s): a silent server's leases must have expired before they are "
                "taken back"
            )

    @property
    def ttl(self) -> float:
        """Seconds a lease lives after its last grant: ``lease_ttl``, else the longer of
        ``DEFAULT_TTL_TICKS`` ticks and ``MIN_DEFAULT_TTL`` (short ticks must not mean leases
        that lapse between two grants)."""
        if self.lease_ttl is not None:
            return self.lease_ttl
        return max(DEFAULT_TTL_TICKS * self.tick, MIN_DEFAULT_TTL)

    @property
    def bucket(self) -> float:
        """Width of a window bucket: about half a tick, or window/128 for long windows, so that
        the window is a whole number of buckets."""
        raw = max(self.tick / 2, self.policy.window / 128)
        return self.policy.window / math.ceil(self.policy.window / raw)

    @property
    def checkpoint_every(self) -> float:
        """Seconds between checkpoints (see ``checkpoint_interval``)."""
        if self.checkpoint_interval is not None:
            return self.checkpoint_interval
        return min(max(self.policy.window / 60, 5.0), 300.0)

    @property
    def takeover_wait(self) -> float:
        """Seconds a rebuilt partition whose replay found usage waits after its assignment
        before it grants: one lease TTL (the previous owner's last leases expire) plus
        ``TAKEOVER_TICKS`` ticks (what they admitted last is reported)."""
        return self.ttl + TAKEOVER_TICKS * self.tick

    @property
    def rewind(self) -> float | None:
        """Seconds of the usage topic a rebuild replays (None: no rebuild)."""
        if not self.rebuild:
            return None
        return self.policy.window + max(REWIND_MARGIN, self.ttl)


@dataclass
class AggregatorStats:
    batches: int = 0
    records: int = 0
    duplicates: int = 0
    malformed: int = 0
    ticks: int = 0
    last_tick_seconds: float = 0.0
    grant_batches: int = 0
    grants: int = 0
    tokens_granted: int = 0
    grant_bytes: int = 0
    produce_errors: int = 0
    errors: int = 0
    malformed_reasons: dict[str, int] = field(default_factory=dict)
    #: consumer polls and commits that raised (the loop goes on)
    poll_errors: int = 0
    #: usage records replayed into rebuilt partitions' windows, and partitions rebuilt
    replayed_records: int = 0
    rebuilds: int = 0
    #: rebuilds that started from a checkpoint
    checkpoint_restores: int = 0


#: Seconds one window of the server clock-offset estimate lasts (the estimate spans two).
OFFSET_WINDOW = 30.0
#: A sample this many seconds below the estimate means the server's clock stepped back (or a
#: batch was that late): the estimate restarts from it.
OFFSET_STEP = 0.1


class _Server:
    __slots__ = ("active", "index", "last_seen", "name", "offset", "seqs")

    def __init__(self, name: str, index: int) -> None:
        self.name = name
        self.index = index
        self.active = True
        self.last_seen = -math.inf
        self.seqs: dict[int, tuple[int, int]] = {}  # partition -> (incarnation, seq)
        # (current window max, previous window max, window start)
        self.offset = (-math.inf, -math.inf, -math.inf)

    def estimate(self) -> float:
        """The current offset estimate (-inf before the first sample)."""
        return max(self.offset[0], self.offset[1])

    def observe_offset(self, sample: float, now: float) -> float:
        """Fold in ``end - received``; return the estimate (max over about a minute)."""
        current, previous, since = self.offset
        if sample < max(current, previous) - OFFSET_STEP:
            current, previous, since = -math.inf, -math.inf, now  # the clock stepped back
        elif now - since > OFFSET_WINDOW:
            current, previous, since = -math.inf, current, now
        current = max(current, sample)
        self.offset = (current, previous, since)
        return max(current, previous)


class _Rebuild:
    """A newly assigned partition that does not grant yet (see the module docstring)."""

    __slots__ = ("assigned", "last_replay", "live", "replayed", "wall")

    def __init__(self, assigned: float, wall: float) -> None:
        self.assigned = assigned  # aggregator clock
        self.wall = wall  # epoch seconds: records appended before this are history
        self.last_replay = assigned
        self.replayed = 0  # usage records replayed
        self.live = False  # a record appended after the assignment arrived

    def done(self, now: float, server_timeout: float, wait: float) -> bool:
        caught_up = self.live or now - self.last_replay >= server_timeout
        return caught_up and (self.replayed == 0 or now >= self.assigned + wait)


class Aggregator:
    """One member of the aggregator group. Call :meth:`run` (blocking) or :meth:`step`."""

    def __init__(
        self,
        config: AggregatorConfig,
        transport: Transport,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        checkpoints: CheckpointStore | None = None,
        limits: LimitSource | None = None,
        control: Controller | None = None,
    ) -> None:
        """``clock``: the aggregator's time (monotonic seconds); ``wall``: epoch seconds, the
        clock of the usage records' append times (the broker's). ``limits``: each client's own
        limit (per client and tier, from the configuration
        service: :class:`limiter.keylimits.ServiceKeyLimits`); default: ``config.policy``'s
        limit for everyone. ``control``: adaptive limits and breakers (the limits granted by are
        then ``control.wrap(limits)``)."""
        self.config = config
        self.control = control
        if control is not None:
            limits = control.wrap(limits, config.policy.limit)
        self.stats = AggregatorStats()
        self.checkpoints = checkpoints
        self.limits = limits
        self._limits_version = None if limits is None else limits.current().version
        #: checkpoints loaded while partitions were assigned, restored in ``_assigned``
        self._restores: dict[int, Checkpoint] = {}
        #: partition -> append time (epoch s) of the newest usage record applied
        self._appended: dict[int, float] = {}
        self._next_checkpoint = clock() + config.checkpoint_every
        self.epoch = secrets.randbits(63)
        self._clock = clock
        self._wall = wall
        self._transport = transport
        self._seq = 0
        self._servers: dict[str, _Server] = {}
        self._by_index: list[_Server] = []
        self._partitions: dict[int, PartitionState] = {}
        self._rebuilding: dict[int, _Rebuild] = {}
        self._lock = threading.Lock()
        self._grant_partitions = transport.partitions(config.grants_topic)
        self._sender = transport.sender()
        self._receiver = transport.receiver(
            config.usage_topic,
            group=config.group,
            on_assign=self._assigned,
            on_revoke=self._revoked,
            rewind=self._rewind if config.rebuild else None,
        )
        self._next_tick = clock()
        self._ticks_since_compact = 0

    # -- membership of partitions --------------------------------------------------------------

    def _assigned(self, partitions: list[int]) -> None:
        now = self._clock()
        with self._lock:
            for p in partitions:
                if p in self._partitions:
                    continue
                state = self._partitions[p] = self._new_partition()
                self._appended.pop(p, None)
                if self.config.rebuild:
                    rebuild = self._rebuilding[p] = _Rebuild(now, self._wall())
                    for server in self._by_index:  # the replay starts the sequences over
                        server.seqs.pop(p, None)
                    checkpoint = self._restores.pop(p, None)
                    if checkpoint is not None:
                        ages = checkpoint.ages + max(0.0, rebuild.wall - checkpoint.taken_at)
                        state.restore(checkpoint.keys, ages, checkpoint.tokens, now)
                        rebuild.replayed += int(checkpoint.keys.size)
                        self.stats.checkpoint_restores += 1
        log.info("aggregator %s assigned %s", self.config.aggregator_id, partitions)

    def _revoked(self, partitions: list[int]) -> None:
        with self._lock:
            for p in partitions:
                self._partitions.pop(p, None)
                self._rebuilding.pop(p, None)
                self._appended.pop(p, None)
        log.info("aggregator %s revoked %s", self.config.aggregator_id, partitions)

    def _rewind(self, partition: int) -> float | None:
        """Seconds of ``partition`` a rebuild replays (called as the partition is assigned):
        the window and a margin, or less from a checkpoint still inside the window."""
        back = self.config.rewind
        if self.checkpoints is None or back is None:
            return back
        checkpoint = self.checkpoints.load(partition)
        wall = self._wall()
        window = self.config.policy.window
        if checkpoint is None or checkpoint.window != window or checkpoint.taken_at < wall - window:
            return back
        self._restores[partition] = checkpoint
        return min(back, max(0.0, wall - checkpoint.resume_from))

    def rebuilding(self) -> list[int]:
        """Owned partitions that do not grant yet: replaying, or waiting out old leases."""
        with self._lock:
            return sorted(self._rebuilding)

    def _new_partition(self) -> PartitionState:
        c = self.config
        memory = max(1, math.ceil(c.ttl / c.tick))
        keepalive = min(max(memory, math.ceil(c.policy.window / c.tick)), MAX_KEEPALIVE_TICKS)
        source = self.limits
        limit_of = None if source is None else (lambda keys: source.current().lookup(keys))
        return PartitionState(
            c.policy.limit, c.policy.window, c.bucket, memory, keepalive, limit_of=limit_of
        )

    @property
    def partitions(self) -> list[int]:
        with self._lock:
            return sorted(self._partitions)

    def active_servers(self, now: float) -> list[str]:
        cutoff = now - self.config.server_timeout
        return [s.name for s in self._by_index if s.last_seen > cutoff]

    def server_clock_offsets(self) -> dict[str, float]:
        """:meth:`server_offsets` against the aggregator's wall clock (``wall``) instead of its
        (monotonic) ``clock``: the server's clock error, less the fastest delivery (s)."""
        shift = self._wall() - self._clock()
        return {name: offset - shift for name, offset in self.server_offsets().items()}

    def server_offsets(self) -> dict[str, float]:
        """Each server's clock minus the aggregator's, less the fastest delivery seen (s)."""
        return {s.name: s.estimate() for s in self._by_index}

    def grant_queue(self) -> int:
        """Grant messages in the producer's queue, not yet delivered."""
        return self._sender.queued

    def clients(self) -> int:
        with self._lock:
            return sum(len(p) for p in self._partitions.values())

    # -- usage in ------------------------------------------------------------------------------

    def handle(self, record: Record) -> bool:
        """Apply one usage record; False if it was skipped (malformed, duplicate, unowned)."""
        return self.handle_many([record]) == 1

    def handle_many(self, records: Sequence[Record]) -> int:
        """Apply usage records (one poll's); returns how many were applied, not skipped.

        Each record is checked and counted in order; the live batches of each partition are
        then folded in together (:meth:`PartitionState.apply_many`). An error in one record is
        counted and logged, never raised: it must not stop the aggregator.
        """
        live: dict[int, list[tuple[np.ndarray, int, float]]] = {}
        applied = 0
        for record in records:
            try:
                applied += self._accept(record, live)
            except Exception as e:
                self.stats.errors += 1
                log.exception("error applying usage record: %r", e)
        if live:
            now = self._clock()
            with self._lock:
                for partition, batches in live.items():
                    state = self._partitions.get(partition)
                    if state is None:
                        continue
                    try:
                        state.apply_many(batches, now)
                    except Exception as e:
                        self.stats.errors += 1
                        log.exception("error applying usage batches: %r", e)
        return applied

    def _accept(self, record: Record, live: dict[int, list[tuple[np.ndarray, int, float]]]) -> bool:
        """Check one record; apply it if it is history, else add its batch to ``live``."""
        try:
            if wire.message_type(record.value) == wire.HEALTH_TYPE:
                if self.control is None:
                    return False
                report = wire.decode_health(record.value)
                return self.control.observe(report, record.timestamp, self._wall())
            batch = wire.decode_usage(record.value)
        except wire.WireError as e:
            self.stats.malformed += 1
            reasons = self.stats.malformed_reasons
            reasons[e.reason] = reasons.get(e.reason, 0) + 1
            log.warning(
                "skipping malformed usage record at %s/%d: %s", record.partition, record.offset, e
            )
            return False
        now = self._clock()
        server = self._server(batch.server_id)
        if server is None:
            return False
        last = server.seqs.get(record.partition)
        if last is not None and last[0] == batch.incarnation and batch.seq <= last[1]:
            self.stats.duplicates += 1
            return False
        server.seqs[record.partition] = (batch.incarnation, batch.seq)
        with self._lock:
            state = self._partitions.get(record.partition)
            if state is None:
                return False
            if record.timestamp > self._appended.get(record.partition, -math.inf):
                self._appended[record.partition] = record.timestamp
            rebuild = self._rebuilding.get(record.partition)
            if rebuild is not None and record.timestamp < rebuild.wall:
                # history: into the window only, at the interval's end (or the append time)
                known = server.estimate()
                if math.isfinite(known):
                    at = batch.end - known
                else:
                    at = now - max(0.0, self._wall() - record.timestamp)
                state.apply(batch.records, server.index, now, min(now, at), replay=True)
                rebuild.last_replay = now
                rebuild.replayed += int(batch.records.size)
                self.stats.replayed_records += int(batch.records.size)
                return True
            if rebuild is not None:
                rebuild.live = True
            server.last_seen = now
            server.active = True
            offset = server.observe_offset(batch.end - now, now)
            at = min(now, batch.end - offset)
            live.setdefault(record.partition, []).append((batch.records, server.index, at))
        self.stats.batches += 1
        self.stats.records += int(batch.records.size)
        return True

    def _server(self, name: str) -> _Server | None:
        server = self._servers.get(name)
        if server is None:
            if len(self._by_index) >= MAX_SERVERS:
                self.stats.errors += 1
                return None
            server = self._servers[name] = _Server(name, len(self._by_index))
            self._by_index.append(server)
        return server

    # -- the tick ------------------------------------------------------------------------------

    def tick(self) -> None:
        """Allocate every owned partition and send one grant batch per active server."""
        started = time.perf_counter()
        now = self._clock()
        c = self.config
        per_server: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
        cutoff = now - c.server_timeout
        control = None if self.control is None else self.control.step(now)
        with self._lock:
            states = list(self._partitions.values())
            if control is not None and not states:
                control = None  # owning no partition, it heard no health: it has nothing to say
            if self.limits is not None:
                version = self.limits.current().version
                if version != self._limits_version:  # the configuration changed
                    self._limits_version = version
                    for state in states:
                        state.relimit()
            for server in self._by_index:
                if server.active and server.last_seen <= cutoff:
                    server.active = False
                    for state in states:
                        state.forget_server(server.index)
            for p, rebuild in list(self._rebuilding.items()):
                if rebuild.done(now, c.server_timeout, c.takeover_wait):
                    del self._rebuilding[p]
                    self.stats.rebuilds += 1
                    log.info(
                        "aggregator %s rebuilt partition %d: %d records replayed, granting "
                        "%.2f s after the assignment",
                        c.aggregator_id,
                        p,
                        rebuild.replayed,
                        now - rebuild.assigned,
                    )
            for p, state in self._partitions.items():
                keys, servers, tokens = state.tick(now, grant=p not in self._rebuilding)
                if not keys.size:
                    continue
                order = np.argsort(servers, kind="stable")
                servers, keys, tokens = servers[order], keys[order], tokens[order]
                bounds = np.flatnonzero(np.diff(servers)) + 1
                for s, k, t in zip(
                    servers[np.r_[0, bounds]],
                    np.split(keys, bounds),
                    np.split(tokens, bounds),
                    strict=True,
                ):
                    per_server.setdefault(int(s), []).append((k, t))
            if self.checkpoints is not None and now >= self._next_checkpoint:
                self._next_checkpoint = now + c.checkpoint_every
                self._checkpoint(now)
            self._ticks_since_compact += 1
            if self._ticks_since_compact >= 100:
                self._ticks_since_compact = 0
                for state in states:
                    state.compact(now)
        active = self.active_servers(now)
        for name in active:
            server = self._servers[name]
            parts = per_server.get(server.index, [])
            records = np.empty(sum(k.size for k, _ in parts), dtype=wire.GRANT_RECORD)
            if parts:
                records["key"] = np.concatenate([k for k, _ in parts])
                records["tokens"] = np.minimum(
                    np.concatenate([t for _, t in parts]), wire.MAX_GRANT
                )
            self._send_grants(name, records, now, len(active))
        if control is not None:
            data = wire.encode_control(control)
            for partition in range(self._grant_partitions):
                try:
                    self._sender.send(c.grants_topic, partition, data)
                except QueueFull:
                    self.stats.produce_errors += 1
        self.stats.ticks += 1
        self.stats.last_tick_seconds = time.perf_counter() - started

    def _checkpoint(self, now: float) -> None:
        """Queue a checkpoint of every rebuilt partition (holding ``_lock``)."""
        assert self.checkpoints is not None
        wall = self._wall()
        window = self.config.policy.window
        for p, state in self._partitions.items():
            if p in self._rebuilding:
                continue
            keys, ages, tokens = state.history(now, window / SLOTS)
            resume = self._appended.get(p, wall) - REWIND_MARGIN
            self.checkpoints.save(p, Checkpoint(wall, resume, window, keys, ages, tokens))

    def _send_grants(self, server: str, records: np.ndarray, now: float, active: int) -> None:
        self._seq += 1
        batch = wire.GrantBatch(
            self.config.aggregator_id,
            self.epoch,
            self._seq,
            now,
            self.config.ttl,
            min(active, 0xFFFF),
            server,
            records,
        )
        partition = wire.grant_partition(server, self._grant_partitions)
        data = wire.encode_grants(batch)
        try:
            self._sender.send(self.config.grants_topic, partition, data)
        except QueueFull:
            self.stats.produce_errors += 1
            return
        self.stats.grant_bytes += len(data)
        self.stats.grant_batches += 1
        self.stats.grants += int(records.size)
        self.stats.tokens_granted += int(records["tokens"].sum())

    # -- the loop ------------------------------------------------------------------------------

    def step(self) -> None:
        """Poll usage until the next tick is due, then tick (once)."""
        timeout = max(0.0, self._next_tick - self._clock())
        try:
            records = self._receiver.poll(timeout)
        except Exception as e:  # a consumer error (joining, a broker away): tick on, retry
            self.stats.poll_errors += 1
            log.warning("polling the usage topic failed: %s: %s", type(e).__name__, e)
            records = []
            time.sleep(min(timeout, POLL_RETRY))
        self.handle_many(records)
        if self._clock() >= self._next_tick:
            self._next_tick += self.config.tick
            if self._next_tick < self._clock():
                self._next_tick = self._clock() + self.config.tick
            self.tick()
            self._sender.service()
            if self.stats.ticks % 10 == 0:
                try:
                    self._receiver.commit()
                except Exception as e:  # the next commit covers it
                    self.stats.poll_errors += 1
                    log.warning("committing usage offsets failed: %s: %s", type(e).__name__, e)
        self.stats.produce_errors = max(self.stats.produce_errors, self._sender.errors)

    def run(self, stop: threading.Event) -> None:
        """Step until ``stop`` is set; then flush grants and leave the group."""
        try:
            while not stop.is_set():
                self.step()
        finally:
            self.close()

    def close(self) -> None:
        self._sender.flush(2.0)
        self._sender.close()
        self._receiver.commit()
        self._receiver.close()
