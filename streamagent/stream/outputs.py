"""The worker's outputs and changelog records, sent through librdkafka off the event loop.

Faust's own producer (aiokafka) builds every produce request in Python on the worker's one
event loop: with about 1.3 records per input event (the decision-log, coupon actions, and a
changelog record for each touched user), sending took a large share of the loop (measured:
the decide worker drained 3,633 events/s with its changelog records through aiokafka, 5,623
with none sent at all; docs/BENCHMARKS.md). Here a record costs the loop one ``produce()``
call: librdkafka batches, compresses and writes on its own threads, and a poller thread of
ours serves its delivery reports and hands them back to the loop in bulk.

What stays as it was with Faust's producer:

- **Nothing is committed before it is delivered.** The worker's commit step (faust_internals
  ``install_commit_guard``) awaits :meth:`OutputProducer.flush` (every record handed over has
  ended, delivered or failed) before it asks the delivery guard, which refuses the commit and
  stops the worker if any record failed.
- **Order**: one producer, idempotent, so records of one partition arrive in the order sent.
- **Partitions**: keys are hashed with the Java client's murmur2, as Faust, aiokafka and the
  shops' producers do, so a user's decision-log records land on the partition number of the
  user's events and conversions.
- **Backpressure**: at most ``MAX_IN_FLIGHT`` records undelivered; then sends wait.
- **How long a record may wait for the broker**: Faust's ``producer_request_timeout``
  (``PRODUCER_REQUEST_TIMEOUT``, 20 min by default) as librdkafka's ``message.timeout.ms``.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import NamedTuple

log = logging.getLogger("streamagent.outputs")

POLL_S = 0.05  # the poller's wait for delivery reports; also how soon it notices a stop
# Records handed over and not yet delivered, at most: past it a send waits. It bounds how far
# the worker runs ahead of what the broker has, so a broker away does not let it apply its
# whole fetched backlog to its tables with every output stuck (a restart replays that stretch,
# and re-sends a replayed trigger's decision only while the user's state still holds it:
# core/state.py RECENT_DECISIONS). Measured: 2,953 of 30,000 triggers lost their decision
# without a bound (tests/integration/test_broker_restart_kafka.py). Steady state needs a
# batch's records (~1.3 per event) and a few ms of deliveries: far below it.
MAX_IN_FLIGHT = 2000


class Delivered(NamedTuple):
    """What a delivered record's future holds (as aiokafka's RecordMetadata, the part used)."""

    topic: str
    partition: int
    offset: int


class DeliveryFailed(Exception):
    """librdkafka gave a record up (the broker away longer than the producer's message
    timeout, a record over the size limit, an unknown topic): the worker's delivery guard
    stops the commits and the worker, which a restart reprocesses from its last commit."""


class OutputProducer:
    """``await send(...)`` hands a record over and returns a future of its delivery;
    ``await flush()`` returns once every record handed over has ended.

    ``producer`` is a confluent-kafka Producer (ops/kafka.py ``make_producer``); the poller
    thread starts with the first send, on that send's event loop."""

    def __init__(self, producer, max_in_flight: int = MAX_IN_FLIGHT):
        self.p = producer
        self.max_in_flight = max_in_flight
        self._room: asyncio.Event | None = None  # set while in_flight < max_in_flight
        self._full_logged = 0.0  # when a full queue was last logged
        self.in_flight = 0
        self._idle: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reports: list = []  # (future, error, topic, partition, offset), poller thread
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._idle, self._room = asyncio.Event(), asyncio.Event()
        self._idle.set()
        self._room.set()
        self._thread = threading.Thread(target=self._poll, name="streamagent-outputs",
                                        daemon=True)
        self._thread.start()

    async def send(self, topic: str, key: bytes | None, value: bytes | None,
                   partition: int | None = None) -> asyncio.Future:
        if self._thread is None:
            self._start()
        while self.in_flight >= self.max_in_flight:  # the broker is behind, or away
            self._room.clear()
            await self._room.wait()
        fut = self._loop.create_future()
        on_delivery = lambda err, msg: self._reports.append((fut, err, msg))  # noqa: E731
        extra = {} if partition is None else {"partition": partition}
        while True:
            try:
                self.p.produce(topic, value=value, key=key, on_delivery=on_delivery, **extra)
                break
            except BufferError:  # librdkafka's queue is full: wait for it to drain
                if time.monotonic() - self._full_logged > 60:
                    self._full_logged = time.monotonic()
                    log.warning("the producer's queue is full (%d records waiting for the "
                                "broker): sends wait", len(self.p))
                await asyncio.sleep(POLL_S)
        self.in_flight += 1
        self._idle.clear()
        return fut

    async def flush(self) -> None:
        """Return once every record handed over so far has been delivered or has failed
        (and its future says which)."""
        if self._idle is not None:
            await self._idle.wait()

    def _poll(self) -> None:
        """The poller thread: serve delivery reports and hand them to the loop in bulk."""
        while not self._stop.is_set():
            self.p.poll(POLL_S)
            if self._reports:
                done, self._reports = self._reports, []
                try:
                    self._loop.call_soon_threadsafe(self._ended, done)
                except RuntimeError:  # the loop is closed: nobody waits for these any more
                    return

    def _ended(self, done: list) -> None:
        for fut, err, msg in done:
            self.in_flight -= 1
            if fut.done():  # cancelled by its waiter
                continue
            if err is not None:
                fut.set_exception(DeliveryFailed(f"{msg.topic()}: {err.str()}"))
            else:
                fut.set_result(Delivered(msg.topic(), msg.partition(), msg.offset()))
        if self.in_flight < self.max_in_flight:
            self._room.set()
        if self.in_flight <= 0:
            self._idle.set()

    async def close(self, timeout_s: float) -> int:
        """Deliver what is waiting (up to ``timeout_s``) and stop the poller. Returns how
        many records had not ended by then (0: all were delivered or failed)."""
        left = 0
        if self._thread is not None:
            try:
                await asyncio.wait_for(self.flush(), timeout_s)
            except asyncio.TimeoutError:
                left = self.in_flight
                log.error("%d records not delivered within %.0f s of stopping", left, timeout_s)
            self._stop.set()
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
        return left


__all__ = ["Delivered", "DeliveryFailed", "OutputProducer"]
