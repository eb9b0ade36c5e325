"""The worker's producer (stream/outputs.py): delivery reports come back to the loop as futures,
``flush`` waits for every record handed over, a full queue makes sends wait, not fail, and
``close`` stops the poller. No broker: a stand-in for confluent-kafka's Producer (the worker on
a real broker: tests/integration, e.g. test_crash.py and test_broker_restart_kafka.py)."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from streamagent.stream.outputs import Delivered, DeliveryFailed, OutputProducer


class Err:
    def __init__(self, text):
        self.text = text

    def str(self):
        return self.text


class Msg:
    def __init__(self, topic, partition, offset):
        self._t, self._p, self._o = topic, partition, offset

    def topic(self):
        return self._t

    def partition(self):
        return self._p

    def offset(self):
        return self._o


class FakeProducer:
    """Records produce() calls; poll() delivers those released by the test (or fails them)."""

    def __init__(self, capacity=1000):
        self.capacity = capacity
        self.queued: list = []  # (topic, key, value, partition, on_delivery)
        self.release = 0  # how many of the queued ones poll() may report
        self.fail: set[bytes] = set()  # keys whose records fail
        self.lock = threading.Lock()
        self.offsets: dict = {}
        self.poller_threads: set[str] = set()

    def __len__(self):
        return len(self.queued)

    def produce(self, topic, value=None, key=None, on_delivery=None, partition=-1):
        with self.lock:
            if len(self.queued) >= self.capacity:
                raise BufferError("Local: Queue full")
            self.queued.append((topic, key, value, partition, on_delivery))

    def poll(self, timeout):
        self.poller_threads.add(threading.current_thread().name)
        with self.lock:
            n = min(self.release, len(self.queued))
            done, self.queued = self.queued[:n], self.queued[n:]
            self.release -= n
        for topic, key, value, partition, cb in done:
            part = 0 if partition == -1 else partition
            if key in self.fail:
                cb(Err("Local: Message timed out"), Msg(topic, part, -1))
            else:
                off = self.offsets[(topic, part)] = self.offsets.get((topic, part), -1) + 1
                cb(None, Msg(topic, part, off))
        if not done:
            time.sleep(min(timeout, 0.005))
        return len(done)


def test_deliveries_and_failures_reach_their_futures_and_flush_waits_for_all():
    fake = FakeProducer()
    out = OutputProducer(fake)

    async def main():
        a = await out.send("decision-log", b"u1", b"{}")
        b = await out.send("user-state-changelog", b"u1", b"s", partition=3)
        fake.fail.add(b"u2")
        c = await out.send("coupon-actions", b"u2", b"{}")
        assert out.in_flight == 3 and not a.done()
        flushed = asyncio.ensure_future(out.flush())
        await asyncio.sleep(0.05)
        assert not flushed.done()  # nothing delivered yet: the commit must wait
        fake.release = 2
        await asyncio.sleep(0.05)
        assert not flushed.done() and a.done() and b.done() and not c.done()
        fake.release = 1
        await asyncio.wait_for(flushed, 2)
        assert out.in_flight == 0
        assert a.result() == Delivered("decision-log", 0, 0)
        assert b.result() == Delivered("user-state-changelog", 3, 0)
        with pytest.raises(DeliveryFailed, match="coupon-actions: Local: Message timed out"):
            c.result()
        assert await out.close(1.0) == 0

    asyncio.run(main())
    assert fake.poller_threads == {"streamagent-outputs"}  # reports served off the loop
    assert [q[3] for q in fake.queued] == []


def test_a_full_queue_makes_sends_wait_not_fail():
    fake = FakeProducer(capacity=2)
    out = OutputProducer(fake)

    async def main():
        await out.send("t", b"a", b"1")
        await out.send("t", b"b", b"2")
        third = asyncio.ensure_future(out.send("t", b"c", b"3"))
        await asyncio.sleep(0.1)
        assert not third.done()  # waiting for room, not raising
        fake.release = 1
        fut = await asyncio.wait_for(third, 2)
        fake.release = 10
        await asyncio.wait_for(out.flush(), 2)
        assert fut.result().offset == 2  # the third record, delivered after the first two
        await out.close(1.0)

    asyncio.run(main())


def test_close_reports_what_was_not_delivered_in_time():
    fake = FakeProducer()
    out = OutputProducer(fake)

    async def main():
        await out.send("t", b"a", b"1")
        return await out.close(0.1)

    assert asyncio.run(main()) == 1
    assert asyncio.run(OutputProducer(FakeProducer()).close(0.1)) == 0  # never started


def test_sends_wait_while_too_many_records_are_undelivered():
    """The bound on records in flight: a broker away stops the worker's sends (and so its
    handler) instead of letting it run through its fetched backlog."""
    fake = FakeProducer()
    out = OutputProducer(fake, max_in_flight=2)

    async def main():
        await out.send("t", b"a", b"1")
        await out.send("t", b"b", b"2")
        third = asyncio.ensure_future(out.send("t", b"c", b"3"))
        await asyncio.sleep(0.1)
        assert not third.done() and len(fake.queued) == 2  # not even handed to librdkafka
        fake.release = 1
        await asyncio.wait_for(third, 2)
        assert len(fake.queued) == 2 and out.in_flight == 2
        fake.release = 10
        await asyncio.wait_for(out.flush(), 2)
        await out.close(1.0)

    asyncio.run(main())
