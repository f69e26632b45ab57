"""The server-side streaming agent: usage out to Kafka, leases in from the aggregator.

Two daemon threads, neither ever touching the request path except through the limiter's shard
locks for the few microseconds of a drain:

- the **reporter**, every ``report_interval`` seconds, drains the limiter's usage counts, packs
  one usage batch per usage-topic partition (``key mod partitions``) and hands it to the sender
  without blocking. A batch the sender cannot take (broker down, queue full) is merged into a
  pending buffer per partition and retried with the next report; past ``max_pending_records``
  the oldest records are dropped and counted. Partitions with nothing to say get an empty batch
  every ``heartbeat_interval`` so that aggregators know the server is alive.
- the **receiver** reads this server's grant partition, drops batches addressed to other
  servers, duplicates and batches too late to use, converts each lease's expiry to the limiter's
  clock and installs the leases. Grants it cannot install (a late batch, a client this server
  no longer tracks) go back in the next usage batch as ``released``: the aggregator stops
  counting them as outstanding.

Clock conversion: for each aggregator epoch the agent keeps ``offset = min(received - issued)``
over the last minute (the aggregator's clock plus the fastest delivery seen). A lease issued at
``issued`` with ``ttl`` ends at ``issued + offset + ttl`` on the limiter's clock. (The bound does
not depend on it: unspent tokens stay counted by the aggregator until reported released.)

Backend health and protection (docs/adaptive.md), only with a ``monitor``
(:class:`~producer.health.BackendMonitor`): every ``health_interval`` the reporter also sends a
health report (calls, errors, a latency histogram and a saturation per backend) to every usage
partition, so that every aggregator hears every server. The receiver takes the aggregators'
control messages from the grant partition: adaptive factors per scope, passed to the limiter's
:class:`~limiter.keylimits.ScaledKeyLimits` (its degraded share, cold-start allowance and
``Decision.limit`` follow the effective limit), and breaker states, which
:meth:`Agent.breaker` exposes as :class:`~producer.health.BreakerGate`.

Every failure in these threads is counted in :attr:`Agent.stats` and never raised to callers.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from limiter import RateLimiter
from limiter.keylimits import ScaledKeyLimits

from . import wire
from .health import BackendMonitor, BreakerGate, ControlView
from .transport import GRANTS_TOPIC, USAGE_TOPIC, QueueFull, Receiver, Sender, Transport

log = logging.getLogger(__name__)

#: Seconds between usage reports.
DEFAULT_REPORT_INTERVAL = 0.1
#: Seconds between heartbeats (empty usage batches) on partitions with nothing to report.
DEFAULT_HEARTBEAT_INTERVAL = 1.0
#: Usage records kept for retry while the broker does not take them.
DEFAULT_MAX_PENDING_RECORDS = 1_000_000
#: Seconds between health reports (with a backend monitor).
DEFAULT_HEALTH_INTERVAL = 0.25
#: How long one clock-offset estimate window lasts, seconds.
OFFSET_WINDOW = 30.0


@dataclass
class AgentStats:
    """Counters of what the agent did; read them for metrics."""

    batches_sent: int = 0
    records_sent: int = 0
    bytes_sent: int = 0
    send_retries: int = 0
    records_dropped: int = 0
    tokens_dropped: float = 0.0
    grant_batches: int = 0
    grants_installed: int = 0
    grants_unknown: int = 0
    batches_duplicate: int = 0
    batches_late: int = 0
    malformed: int = 0
    errors: int = 0
    last_error: str = ""
    offsets: dict[str, float] = field(default_factory=dict)
    #: Totals of the usage drained from the limiter, in tokens (requests at cost 1): admitted
    #: from leases, admitted outside them (cold start, degraded), refused, released unspent.
    tokens_admitted: float = 0.0
    tokens_extra: float = 0.0
    tokens_rejected: float = 0.0
    tokens_released: float = 0.0
    #: health reports sent (one per usage partition each), control messages applied
    health_reports: int = 0
    control_messages: int = 0


class _Offset:
    """min(received - issued) over the current and the previous window."""

    __slots__ = ("current", "previous", "since")

    def __init__(self, now: float) -> None:
        self.current = float("inf")
        self.previous = float("inf")
        self.since = now

    def observe(self, sample: float, now: float) -> float:
        if now - self.since > OFFSET_WINDOW:
            self.previous, self.current, self.since = self.current, float("inf"), now
        self.current = min(self.current, sample)
        return min(self.current, self.previous)


class Agent:
    """Connects one approximate-mode :class:`~limiter.RateLimiter` to the aggregators."""

    def __init__(
        self,
        limiter: RateLimiter,
        transport: Transport,
        server_id: str,
        *,
        report_interval: float = DEFAULT_REPORT_INTERVAL,
        heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
        max_pending_records: int = DEFAULT_MAX_PENDING_RECORDS,
        usage_topic: str = USAGE_TOPIC,
        grants_topic: str = GRANTS_TOPIC,
        monitor: BackendMonitor | None = None,
        health_interval: float = DEFAULT_HEALTH_INTERVAL,
    ) -> None:
        """``monitor``: the backends whose health this server reports (none: no health
        reports); ``health_interval``: seconds between them."""
        limiter.lease  # noqa: B018 -- raises for a local-mode limiter
        wire._pack_str("server_id", server_id)
        if not report_interval > 0 or not heartbeat_interval > 0 or not health_interval > 0:
            raise ValueError(
                "report_interval, heartbeat_interval and health_interval must be > 0 seconds"
            )
        self.limiter = limiter
        self.server_id = server_id
        self.report_interval = float(report_interval)
        self.heartbeat_interval = float(heartbeat_interval)
        self.max_pending_records = int(max_pending_records)
        self.usage_topic = usage_topic
        self.grants_topic = grants_topic
        self.incarnation = secrets.randbits(63)
        self.stats = AgentStats()
        self._transport = transport
        self._usage_partitions = transport.partitions(usage_topic)
        self._grant_partition = wire.grant_partition(server_id, transport.partitions(grants_topic))
        self._sender: Sender = transport.sender()
        self._receiver: Receiver = transport.receiver(
            grants_topic, partitions=[self._grant_partition]
        )
        self._seq = 0
        self._pending: dict[int, np.ndarray] = {}
        self._last_sent = [0.0] * self._usage_partitions
        self._last_report = limiter.now()
        self._grant_seq = 0
        self._leases_since_report = 0
        self._seen: dict[str, tuple[int, int]] = {}  # aggregator id -> (epoch, seq)
        self._offsets: dict[tuple[str, int], _Offset] = {}
        #: grant records this server could not install, to report as released
        self._unclaimed: list[np.ndarray] = []
        self._unclaimed_lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.monitor = monitor
        self.health_interval = float(health_interval)
        self._health_seq = 0
        self._last_health = self._last_report
        source = limiter.limit_source
        self._scaled = source if isinstance(source, ScaledKeyLimits) else None
        self.control = ControlView(limiter.now, self._factors_changed)

    def breaker(self, backend: str) -> BreakerGate:
        """The breaker of ``backend`` as the aggregators decided it: ``allow()`` before a call."""
        return self.control.gate(backend)

    def factors(self) -> dict[str, float]:
        """Scope -> the adaptive factor in force (scopes at 1 left out)."""
        return self.control.factors()

    def _factors_changed(self, factors: dict[str, float]) -> None:
        if self._scaled is not None:
            self._scaled.set_factors(factors)

    @property
    def pending_records(self) -> int:
        """Usage records kept for the next report because the producer did not take them."""
        return sum(r.size for r in list(self._pending.values()))

    @property
    def produce_queue(self) -> int:
        """Messages in the producer's queue, not yet delivered."""
        return self._sender.queued

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> Agent:
        for name, target in (("reporter", self._report_loop), ("receiver", self._receive_loop)):
            t = threading.Thread(target=target, name=f"drl-{name}-{self.server_id}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop both threads, send the last usage batch and flush it (up to ``timeout`` s)."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout)
        self._threads.clear()
        self._guarded(self.report_once)
        self._sender.flush(timeout)
        self._sender.close()
        self._receiver.close()

    def __enter__(self) -> Agent:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- one step of each loop (the threads call these; tests may too) --------------------------

    def report_once(self) -> None:
        """Drain usage, send one batch per partition with records, heartbeats where due."""
        now = self.limiter.now()
        usage = self.limiter.drain_usage()
        if len(usage):
            stats = self.stats
            stats.tokens_admitted += float(usage.admitted.sum())
            stats.tokens_extra += float(usage.extra.sum())
            stats.tokens_rejected += float(usage.rejected.sum())
            stats.tokens_released += float(usage.released.sum())
        records = wire.usage_records(
            usage.keys, usage.admitted, usage.extra, usage.rejected, usage.released
        )
        unclaimed = self._take_unclaimed()
        if unclaimed.size:
            records = np.concatenate((records, unclaimed))
        by_partition: dict[int, np.ndarray] = {}
        if records.size:
            parts = wire.usage_partitions(records["key"], self._usage_partitions)
            order = np.argsort(parts, kind="stable")
            parts, records = parts[order], records[order]
            bounds = np.flatnonzero(np.diff(parts)) + 1
            by_partition = {
                int(p): c
                for p, c in zip(parts[np.r_[0, bounds]], np.split(records, bounds), strict=True)
            }
        for p, pending in list(self._pending.items()):
            fresh = by_partition.get(p)
            by_partition[p] = pending if fresh is None else np.concatenate((pending, fresh))
        self._pending.clear()
        for p in range(self._usage_partitions):
            chunk = by_partition.get(p)
            if chunk is None:
                if now - self._last_sent[p] >= self.heartbeat_interval:
                    self._send(p, records[:0], now)
                continue
            for start in range(0, chunk.size, wire.BATCH_RECORDS):
                self._send(p, chunk[start : start + wire.BATCH_RECORDS], now)
        self._last_report = now
        self._leases_since_report = 0
        self.control.refresh()
        if self.monitor is not None and now - self._last_health >= self.health_interval:
            self._send_health(now)
        self._sender.service()

    def _send_health(self, now: float) -> None:
        """One health report, to every usage partition (every aggregator must hear it)."""
        assert self.monitor is not None
        self._health_seq += 1
        report = wire.HealthReport(
            self.server_id,
            self.incarnation,
            self._health_seq,
            min(self._last_health, now),
            now,
            self.monitor.drain(),
        )
        self._last_health = now
        data = wire.encode_health(report)
        for p in range(self._usage_partitions):
            try:
                self._sender.send(self.usage_topic, p, data)
            except QueueFull:
                self.stats.send_retries += 1  # health is not retried: the next one supersedes it
                continue
            self.stats.health_reports += 1
            self.stats.bytes_sent += len(data)

    def _send(self, partition: int, records: np.ndarray, now: float) -> None:
        self._seq += 1
        batch = wire.UsageBatch(
            self.server_id,
            self.incarnation,
            self._seq,
            min(self._last_report, now),
            now,
            self._grant_seq,
            self._leases_since_report,
            records,
        )
        data = wire.encode_usage(batch)
        try:
            self._sender.send(self.usage_topic, partition, data)
        except QueueFull:
            self.stats.send_retries += 1
            self._keep(partition, records)
            return
        self._last_sent[partition] = now
        self.stats.batches_sent += 1
        self.stats.records_sent += int(records.size)
        self.stats.bytes_sent += len(data)

    def _keep(self, partition: int, records: np.ndarray) -> None:
        """Hold unsent records for the next report, dropping the oldest past the bound."""
        if not records.size:
            return
        held = self._pending.get(partition)
        if held is not None:
            records = np.concatenate((held, records))
        self._pending[partition] = records
        total = sum(r.size for r in self._pending.values())
        excess = total - self.max_pending_records
        if excess > 0:
            kept = records[excess:]
            dropped = records[:excess]
            self._pending[partition] = kept
            self.stats.records_dropped += int(dropped.size)
            self.stats.tokens_dropped += float(
                sum(dropped[name].sum() for name in wire.COUNT_FIELDS)
            )

    def receive_once(self, timeout: float) -> int:
        """Apply the grant batches that arrive within ``timeout`` seconds; returns how many."""
        applied = 0
        for record in self._receiver.poll(timeout):
            try:
                if wire.message_type(record.value) == wire.CONTROL_TYPE:
                    if self.control.apply(wire.decode_control(record.value)):
                        self.stats.control_messages += 1
                    continue
                batch = wire.decode_grants(record.value)
            except wire.WireError as e:
                self.stats.malformed += 1
                self.stats.last_error = str(e)
                continue
            if batch.server_id != self.server_id:
                continue
            if self._apply(batch):
                applied += 1
        return applied

    def _apply(self, batch: wire.GrantBatch) -> bool:
        now = self.limiter.now()
        last = self._seen.get(batch.aggregator_id)
        if last is not None and last[0] == batch.epoch and batch.seq <= last[1]:
            self.stats.batches_duplicate += 1
            return False
        self._seen[batch.aggregator_id] = (batch.epoch, batch.seq)
        key = (batch.aggregator_id, batch.epoch)
        estimator = self._offsets.get(key)
        if estimator is None:
            estimator = self._offsets[key] = _Offset(now)
        offset = estimator.observe(now - batch.issued_at, now)
        self.stats.offsets[batch.aggregator_id] = offset
        self.stats.grant_batches += 1
        self._grant_seq = max(self._grant_seq, batch.seq)
        expiry = batch.issued_at + offset + batch.ttl
        if expiry <= now:
            # queued while the broker was away: says nothing of the stream's health now, nor of
            # the fleet's size (the degraded share keeps the last live batch's)
            self.stats.batches_late += 1
            self._unclaim(batch.records)
            return False
        self.limiter.note_grant_batch(now, batch.servers)
        if batch.records.size:
            missed: list[int] = []
            installed = self.limiter.apply_grants(
                batch.records["key"], batch.records["tokens"], expiry, unclaimed=missed
            )
            if missed:
                self._unclaim(batch.records[missed])
            self.stats.grants_installed += installed
            self.stats.grants_unknown += int(batch.records.size) - installed
            self._leases_since_report += installed
        return True

    def _unclaim(self, grants: np.ndarray) -> None:
        """Grants not installed: report their tokens as released with the next usage batch."""
        if grants.size:
            with self._unclaimed_lock:
                self._unclaimed.append(grants.copy())

    def _take_unclaimed(self) -> np.ndarray:
        """Usage records releasing the tokens of the grants not installed since the last call."""
        with self._unclaimed_lock:
            grants, self._unclaimed = self._unclaimed, []
        if not grants:
            return np.empty(0, dtype=wire.USAGE_RECORD)
        g = np.concatenate(grants)
        zero = np.zeros(g.size)
        return wire.usage_records(g["key"], zero, zero, zero, g["tokens"].astype(np.float64))

    # -- threads -------------------------------------------------------------------------------

    def _guarded(self, step: object) -> None:
        try:
            step()  # type: ignore[operator]
        except Exception as e:  # never raise into the app; count, log rarely, carry on
            self.stats.errors += 1
            if self.stats.last_error != repr(e):
                log.warning("drl agent %s: %r", self.server_id, e)
            self.stats.last_error = repr(e)

    def _report_loop(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            next_at += self.report_interval
            self._guarded(self.report_once)
            delay = next_at - time.monotonic()
            if delay < 0:
                next_at = time.monotonic()
                delay = 0.0
            self._stop.wait(delay)

    def _receive_loop(self) -> None:
        while not self._stop.is_set():
            self._guarded(lambda: self.receive_once(0.05))
