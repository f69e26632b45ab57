"""Periodic checkpoints of each owned partition's window in Redis, for long windows.

A rebuild replays the usage topic from ``now - window``; for windows of hours or days that is
more than a new owner can read quickly. With a :class:`CheckpointStore` (``drl aggregator run
--redis-url``), every ``checkpoint_interval`` seconds the aggregator writes each owned, rebuilt
partition's window to Redis; a new owner restores the newest checkpoint still inside the window
and replays the topic only from the checkpoint's ``resume_from`` (the append time of the last
record it had applied, less ``REWIND_MARGIN``), so the records of that margin are counted twice
(conservative) and none is missed.

A checkpoint is the window summed into ``SLOTS`` age slots per client (see
:meth:`aggregator.partition.PartitionState.history`): charges move later by up to
``window / SLOTS`` seconds, never earlier. One Redis string per partition::

    {prefix}checkpoint:{group}:{usage topic}:{partition}

holding zlib(``HEADER`` + keys u64[n] + ages f64[n] + tokens f64[n]). A value that does not
decode, or is older than the window, is ignored (the rebuild then replays the whole window).
Writes run on one background thread; a slow or dead Redis delays checkpoints, never a tick.
"""

from __future__ import annotations

import logging
import queue
import struct
import threading
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

#: Age slots per client in a checkpoint: charges move later by at most window / SLOTS.
SLOTS = 64
#: Seconds a Redis call of the checkpoint store may take.
REDIS_TIMEOUT = 2.0
#: magic, version, taken at (epoch s), resume_from (epoch s), window (s), entries
HEADER = struct.Struct("<4sBdddI")
MAGIC = b"DRLK"
VERSION = 1


@dataclass(frozen=True)
class Checkpoint:
    """One partition's window at ``taken_at`` (epoch seconds)."""

    taken_at: float
    #: replay the topic from records appended at or after this (epoch seconds)
    resume_from: float
    window: float
    keys: np.ndarray  # uint64
    ages: np.ndarray  # seconds before taken_at, float64
    tokens: np.ndarray  # float64

    def encode(self) -> bytes:
        head = HEADER.pack(
            MAGIC, VERSION, self.taken_at, self.resume_from, self.window, self.keys.size
        )
        body = b"".join(
            (
                self.keys.astype("<u8").tobytes(),
                self.ages.astype("<f8").tobytes(),
                self.tokens.astype("<f8").tobytes(),
            )
        )
        return zlib.compress(head + body, 1)

    @classmethod
    def decode(cls, data: bytes) -> Checkpoint:
        """Raises ValueError for anything that is not a checkpoint of this version."""
        try:
            raw = zlib.decompress(data)
        except zlib.error as e:
            raise ValueError(f"not a checkpoint: {e}") from None
        if len(raw) < HEADER.size:
            raise ValueError("not a checkpoint: truncated header")
        magic, version, taken, resume, window, n = HEADER.unpack_from(raw)
        if magic != MAGIC or version != VERSION:
            raise ValueError(f"not a checkpoint of version {VERSION}: {magic!r} v{version}")
        if len(raw) != HEADER.size + 24 * n:
            raise ValueError(f"checkpoint length {len(raw)} does not hold {n} entries")
        at = HEADER.size
        keys = np.frombuffer(raw, "<u8", n, at).astype(np.uint64)
        ages = np.frombuffer(raw, "<f8", n, at + 8 * n).astype(np.float64)
        tokens = np.frombuffer(raw, "<f8", n, at + 16 * n).astype(np.float64)
        if not (np.isfinite(ages).all() and np.isfinite(tokens).all()):
            raise ValueError("checkpoint holds non-finite numbers")
        return cls(taken, resume, window, keys, ages, tokens)


class CheckpointStore:
    """Reads and (on a background thread) writes checkpoints in Redis. Thread-safe."""

    def __init__(
        self, redis_url: str, group: str, usage_topic: str, *, prefix: str = "drl:"
    ) -> None:
        import redis

        self._redis: Any = redis.Redis.from_url(
            redis_url, socket_timeout=REDIS_TIMEOUT, socket_connect_timeout=REDIS_TIMEOUT
        )
        self._key = f"{prefix}checkpoint:{group}:{usage_topic}:"
        self._queue: queue.Queue[tuple[int, Checkpoint] | None] = queue.Queue(maxsize=64)
        self.written = 0
        self.errors = 0
        self.skipped = 0  # checkpoints dropped because the writer was behind
        self._thread = threading.Thread(
            target=self._write_loop, name="drl-checkpoints", daemon=True
        )
        self._thread.start()

    def key(self, partition: int) -> str:
        return f"{self._key}{partition}"

    def load(self, partition: int) -> Checkpoint | None:
        """The partition's checkpoint, or None (none, unreadable, or Redis failed: logged)."""
        try:
            data = self._redis.get(self.key(partition))
        except Exception as e:  # Redis down: the rebuild replays the whole window instead
            self.errors += 1
            log.warning("checkpoint of partition %d not read: %s", partition, e)
            return None
        if data is None:
            return None
        try:
            return Checkpoint.decode(bytes(data))
        except ValueError as e:
            self.errors += 1
            log.warning("checkpoint of partition %d ignored: %s", partition, e)
            return None

    def save(self, partition: int, checkpoint: Checkpoint) -> None:
        """Queue a write; never blocks (dropped and counted when the writer is behind)."""
        try:
            self._queue.put_nowait((partition, checkpoint))
        except queue.Full:
            self.skipped += 1

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until the queued writes are done (tests, shutdown)."""
        done = threading.Event()

        def wait() -> None:
            self._queue.join()
            done.set()

        threading.Thread(target=wait, daemon=True).start()
        return done.wait(timeout)

    def close(self) -> None:
        self.flush()
        self._queue.put(None)
        self._thread.join(timeout=REDIS_TIMEOUT + 1)
        self._redis.close()

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                partition, checkpoint = item
                ttl_ms = max(1000, int(2 * checkpoint.window * 1000))
                self._redis.set(self.key(partition), checkpoint.encode(), px=ttl_ms)
                self.written += 1
            except Exception as e:
                self.errors += 1
                log.warning("checkpoint not written: %s", e)
            finally:
                self._queue.task_done()
