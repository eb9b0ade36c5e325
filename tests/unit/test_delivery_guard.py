"""A record the worker sent but could not deliver stops every later offset commit, and the
worker (stream/faust_internals.py ``DeliveryGuard``, wired in stream/app.py). No broker: a
throwaway Faust app, its consumer's commit reaching a stand-in for aiokafka's. And the watch
that counts records a stream skipped (stream/ingress.py ``OffsetWatch``).

The same on a real broker: tests/integration/test_broker_restart_kafka.py (the broker killed
under a busy worker whose producer gives records up after 3 s)."""
from __future__ import annotations

import asyncio

import pytest
from faust.types import TP

from streamagent.params import shipped
from streamagent.stream.faust_internals import DeliveryGuard, DirectTable

TPS = {TP("user-events", 0): 10, TP("user-events", 1): 7}


def worker(tmp_path):
    from streamagent.stream.app import create_app

    return create_app(shipped(table_store="memory://", metrics_port=0, data_dir=tmp_path))


def errors(w, stage: str) -> float:
    return w.metrics.errors.labels(stage)._value.get()


class Commits:
    """Stands in for the consumer thread's commit (aiokafka's), recording what reached it."""

    def __init__(self):
        self.made: list[dict] = []

    async def commit(self, offsets) -> bool:
        self.made.append(dict(offsets))
        return True


def failed_future(exc: BaseException) -> asyncio.Future:
    fut = asyncio.get_running_loop().create_future()
    fut.set_exception(exc)
    return fut


def test_a_lost_delivery_stops_every_later_commit_and_crashes_the_app(tmp_path):
    w = worker(tmp_path)
    app = w.app
    crashed: list = []

    async def crash(reason):
        crashed.append(reason)

    async def main():
        app.crash = crash
        consumer, commits = app.consumer, Commits()
        consumer._thread.commit = commits.commit
        assert await consumer._commit(TPS) is True  # nothing failed: committed
        ok = asyncio.get_running_loop().create_future()
        ok.set_result(None)
        app.streamagent_delivery_guard.watch(ok)
        assert await consumer._commit(TPS) is True
        lost = RuntimeError("KafkaTimeoutError: batch expired")
        app.streamagent_delivery_guard.watch(failed_future(lost))
        # Faust flushed the producer (every send ended) and now commits: refused, now and later
        assert await consumer._commit(TPS) is False
        assert await consumer._commit({TP("user-events", 0): 99}) is False
        await asyncio.sleep(0)
        return commits.made

    made = asyncio.run(main())
    assert made == [TPS, TPS]
    assert crashed == [app.streamagent_delivery_guard.failure]
    assert app.streamagent_delivery_guard.refused == 2


def test_the_worker_send_guards_outputs_and_not_dead_letters(tmp_path):
    w = worker(tmp_path)
    app, guard = w.app, w.app.streamagent_delivery_guard
    s = w.settings
    handed: list = []

    class Producer:  # the worker's OutputProducer.send: hands over, returns the delivery future
        def __init__(self):
            self.fail_hand_over: BaseException | None = None

        async def send(self, topic, key, value, partition=None):
            if self.fail_hand_over is not None:
                raise self.fail_hand_over
            fut = asyncio.get_running_loop().create_future()
            handed.append((topic, fut))
            return fut

    async def main():
        app.crash = lambda reason: asyncio.sleep(0)
        producer = Producer()
        app.streamagent_outputs.send = producer.send
        send = app.streamagent_send
        # a dead letter not delivered: counted (stage dlq), the stream goes on
        await send(s.dlq(s.topic_user_events), b"k", b"{}")
        handed[-1][1].set_exception(RuntimeError("dlq down"))
        await asyncio.sleep(0)
        assert guard.failure is None and errors(w, "dlq") == 1
        # a dead letter the producer refuses: the handler counts it and goes on
        producer.fail_hand_over = RuntimeError("buffer full")
        with pytest.raises(RuntimeError):
            await send(s.dlq(s.topic_user_events), b"k", b"{}")
        assert guard.failure is None
        # an output not delivered: counted once (stage send), the guard fails
        producer.fail_hand_over = None
        await send(s.topic_coupon_actions, b"k", b"{}")
        lost = RuntimeError("expired")
        handed[-1][1].set_exception(lost)
        await asyncio.sleep(0)
        assert errors(w, "send") == 1 and guard.failure is lost
        # from then on the worker is stopping: an output is refused at once, not handed over
        # (nothing more is applied whose outputs cannot go out); a dead letter still goes
        n = len(handed)
        with pytest.raises(RuntimeError, match="expired"):
            await send(s.topic_decision_log, b"k", b"{}")
        await send(s.dlq(s.topic_user_events), b"k", b"{}")
        assert len(handed) == n + 1 and handed[-1][0] == s.dlq(s.topic_user_events)

    asyncio.run(main())


def test_an_output_the_producer_refuses_fails_the_guard(tmp_path):
    w = worker(tmp_path)
    app, guard = w.app, w.app.streamagent_delivery_guard
    refused = RuntimeError("Local: Unknown topic")

    async def refuse(topic, key, value, partition=None):
        raise refused

    async def main():
        app.crash = lambda reason: asyncio.sleep(0)
        app.streamagent_outputs.send = refuse
        with pytest.raises(RuntimeError):  # the handler counts it and stops the batch
            await app.streamagent_send(w.settings.topic_decision_log, b"k", b"{}")
        assert guard.failure is refused

    asyncio.run(main())


class Table:
    """What DirectTable reads of a Faust table."""

    key_type, key_serializer = bytes, "raw"

    def __init__(self):
        self.data: dict = {}

        class Topic:
            @staticmethod
            def get_topic_name():
                return "app-user-state-changelog"

        self.changelog_topic = Topic()


def test_a_changelog_record_refused_or_lost_is_reported(tmp_path):
    class Producer:  # the worker's OutputProducer
        fail: BaseException | None = None
        futures: list = []

        @classmethod
        async def send(cls, topic, key, value, partition=None):
            if cls.fail is not None:
                raise cls.fail
            fut = asyncio.get_running_loop().create_future()
            cls.futures.append(fut)
            return fut

    class App:
        producer = Producer

    reported: list = []
    t = DirectTable(Table(), App, reported.append, Producer)

    async def main():
        t.pending = [(b"u1", b"state", 0), (b"u2", b"state", 1)]
        await t.flush()
        App.producer.futures[0].set_exception(RuntimeError("lost"))
        App.producer.futures[1].set_result(None)
        await asyncio.sleep(0)
        assert [str(e) for e in reported] == ["lost"]
        App.producer.fail = RuntimeError("MessageSizeTooLargeError")
        t.pending = [(b"u3", b"x" * 10, 0)]
        with pytest.raises(RuntimeError):
            await t.flush()
        assert [str(e) for e in reported] == ["lost", "MessageSizeTooLargeError"]
        assert t.pending == []

    asyncio.run(main())


def test_a_guard_without_an_app_still_refuses_commits():
    g = DeliveryGuard()
    assert g.allows_commit(TPS)
    g.fail(RuntimeError("x"))
    g.fail(RuntimeError("y"))  # the first failure is the one kept
    assert str(g.failure) == "x"
    assert not g.allows_commit(TPS) and g.refused == 1


def test_offset_watch_counts_skipped_offsets_within_one_assignment():
    """A forward jump in one partition's offsets is counted by topic; a jump back (a replay),
    the first record of a partition and a new consumer generation are not."""
    from types import SimpleNamespace as Msg

    from prometheus_client import CollectorRegistry, Counter

    from streamagent.stream.ingress import OffsetWatch

    counter = Counter("skipped_total", "x", ["topic"], registry=CollectorRegistry())
    gen = [1]
    watch = OffsetWatch(counter, lambda: gen[0])

    def seen(*offsets, topic="ue", partition=0):
        return watch.see([Msg(topic=topic, partition=partition, offset=o) for o in offsets])

    assert seen(5, 6, 7) == 0  # the first record of a partition starts it
    assert seen(8, 9, partition=1) == 0  # partitions apart
    assert seen(8, 12) == 3  # 9, 10, 11 never came
    assert seen(4, 5, 6) == 0  # back: a replay
    assert seen(13) == 0  # forward past the replay, from the furthest read
    assert seen(14, topic="conv") == 0
    assert seen(20, partition=1) == 10
    gen[0] = 2  # a rebalance: positions start again wherever the new assignment says
    assert seen(40) == 0 and seen(41) == 0
    assert counter.labels("ue")._value.get() == 13
    assert counter.labels("conv")._value.get() == 0
