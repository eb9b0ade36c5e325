"""Every place streamagent reaches into Faust's or aiokafka's private API.

faust-streaming is pinned in pyproject.toml; tests/unit/test_faust_internals.py fails, naming the
pin, when an upgrade takes away what this module relies on:

- ``faust.transport.drivers.aiokafka.AIOKafkaConsumerThread._create_worker_consumer`` builds the
  worker's aiokafka consumer with ``fetch_max_wait_ms=1500`` hard-coded, and aiokafka's fetcher
  reads the consumer's ``_fetch_max_wait_ms`` when it starts. With several partitions on one
  broker, the fetcher then often waits out the full 1.5 s for partitions with no new data before
  it fetches again, and events sit in the broker for up to 1.5 s at moderate load (measured: p50
  1.3 s at 600 events/s on a forwarding agent). ``set_fetch_max_wait`` lowers it after the
  consumer is built, before it starts.
- ``faust.streams._current_event``: the context variable Faust's tables read to find which
  partition's store and changelog a write belongs to. An agent that takes events in batches
  (``Stream.take_events``) writes after the batch, outside any one event: ``acting_as`` sets it
  to an event of the partition being written.
- ``faust.transport.consumer.Consumer._read_offset``: the offset of the last message read, per
  partition. Faust keeps no public accessor for it; the worker's lag gauge needs it.
"""
from __future__ import annotations

import contextlib
import weakref

from faust import streams as _streams
from faust.types import TP

_applied: dict[str, int] = {}


def set_fetch_max_wait(ms: int) -> None:
    """Make every Faust worker consumer built from now on wait at most ``ms`` for a fetch."""
    from faust.transport.drivers import aiokafka as drv

    if not _applied:
        original = drv.AIOKafkaConsumerThread._create_worker_consumer

        def _create_worker_consumer(self, transport):
            consumer = original(self, transport)
            consumer._fetch_max_wait_ms = _applied["fetch_max_wait_ms"]
            return consumer

        drv.AIOKafkaConsumerThread._create_worker_consumer = _create_worker_consumer
    _applied["fetch_max_wait_ms"] = int(ms)


def read_offsets(consumer) -> dict[TP, int]:
    """The offset of the last message read, for each partition that has one."""
    return {tp: off for tp, off in consumer._read_offset.items() if off is not None}


@contextlib.contextmanager
def acting_as(event):
    """Table writes inside the block go to ``event``'s partition (store and changelog)."""
    token = _streams._current_event.set(weakref.ref(event))
    try:
        yield
    finally:
        _streams._current_event.reset(token)
