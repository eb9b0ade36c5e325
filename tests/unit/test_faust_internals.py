"""The Faust/aiokafka private API streamagent relies on (streamagent/stream/faust_internals.py).

An upgrade that takes it away fails here, naming the pin, instead of silently bringing back
1.5 s fetch waits or a lag gauge stuck at zero. No broker needed.
"""
from __future__ import annotations

import asyncio
import inspect
import re
import tomllib
from collections.abc import MutableMapping
from importlib.metadata import version
from pathlib import Path

import aiokafka
import faust
from faust.transport.consumer import Consumer
from faust.transport.drivers import aiokafka as drv
from faust.types import TP

from streamagent.stream.faust_internals import read_offsets, set_fetch_max_wait

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def changed(what: str) -> str:
    deps = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    pin = next(d for d in deps if d.startswith("faust-streaming"))
    return (f"streamagent is pinned to {pin} (pyproject.toml); installed are faust-streaming "
            f"{version('faust-streaming')} and aiokafka {version('aiokafka')}, where {what}. "
            f"Fix streamagent/stream/faust_internals.py for this version or keep the pin.")


def with_consumer(check) -> None:
    """Await ``check(consumer)`` on the Faust consumer of a throwaway app (built, never started)."""
    async def main():
        app = faust.App("faust-internals-test", broker="kafka://127.0.0.1:1", store="memory://",
                        web_enabled=False)
        await check(app.consumer)

    asyncio.run(main())


def test_aiokafka_fetcher_reads_fetch_max_wait_from_the_consumer():
    async def main():
        c = aiokafka.AIOKafkaConsumer(bootstrap_servers="127.0.0.1:1", fetch_max_wait_ms=1234)
        try:
            assert getattr(c, "_fetch_max_wait_ms", None) == 1234, changed(
                "AIOKafkaConsumer no longer keeps fetch_max_wait_ms in _fetch_max_wait_ms")
        finally:
            await c.stop()

    asyncio.run(main())
    assert re.search(r"fetch_max_wait_ms\s*=\s*self\._fetch_max_wait_ms",
                     inspect.getsource(aiokafka.AIOKafkaConsumer.start)), changed(
        "AIOKafkaConsumer.start no longer hands _fetch_max_wait_ms to its fetcher")


def test_set_fetch_max_wait_reaches_the_worker_consumer():
    assert callable(getattr(drv.AIOKafkaConsumerThread, "_create_worker_consumer", None)), changed(
        "AIOKafkaConsumerThread._create_worker_consumer, which builds the worker's aiokafka "
        "consumer (with fetch_max_wait_ms=1500 hard-coded), is gone")
    set_fetch_max_wait(7)

    async def check(consumer):
        built = consumer._thread._create_worker_consumer(consumer.transport)
        assert isinstance(built, aiokafka.AIOKafkaConsumer), changed(
            f"_create_worker_consumer returns a {type(built).__name__}, not an aiokafka consumer")
        await built.stop()
        assert built._fetch_max_wait_ms == 7

    with_consumer(check)


def test_read_offsets_come_from_the_mapping_faust_updates():
    assert re.search(r"self\._read_offset(\[|\.__setitem__)", inspect.getsource(Consumer)), changed(
        "faust.transport.consumer.Consumer no longer records read offsets in _read_offset")

    async def check(consumer):
        offsets = getattr(consumer, "_read_offset", None)
        assert isinstance(offsets, MutableMapping), changed(
            f"the Faust consumer's _read_offset is {offsets!r}, not a mapping of TP to offset")
        offsets[TP("t", 0)] = 41
        offsets[TP("t", 1)] = None  # Faust's value for a partition with nothing read yet
        assert read_offsets(consumer) == {TP("t", 0): 41}

    with_consumer(check)


def test_table_writes_follow_the_current_event_and_direct_tables_reach_the_store():
    """acting_as sets what Faust's tables read to pick a partition; DirectTable writes the
    store and queues one changelog record per change, with that partition."""
    from faust import streams

    from streamagent.stream.faust_internals import DirectTable, acting_as

    assert hasattr(streams, "_current_event"), \
        changed("faust.streams has no _current_event context variable")
    assert "current_event" in inspect.getsource(faust.tables.base.Collection.partition_for_key), \
        changed("tables no longer pick a key's partition from the current event")

    class Event:  # what the store reads of the current event
        class message:
            partition = 3

    async def main():
        app = faust.App("faust-internals-test-2", broker="kafka://127.0.0.1:1",
                        store="memory://", web_enabled=False)
        table = app.Table("t", default=None, partitions=4, key_type=bytes, value_type=bytes)
        for attr in ("data", "changelog_topic"):
            assert hasattr(table, attr), changed(f"a Table has no {attr}")
        direct = DirectTable(table, app)
        ev = Event()
        with acting_as(ev):
            direct[b"k"] = b"v"
            assert streams.current_event() is ev
        assert direct.get(b"k") == b"v" and table.data[b"k"] == b"v"
        assert direct.pending == [(b"k", b"v", 3)]
        with acting_as(ev):
            del direct[b"k"]
        assert direct.get(b"k") is None and direct.pending[-1] == (b"k", None, 3)

    asyncio.run(main())


def test_direct_tables_on_rocksdb_store_what_faust_s_store_reads(tmp_path):
    """On RocksDB, DirectTable reads and writes the current partition's database straight;
    what it writes is what Faust's own store path reads back, and the other way round (bytes
    keys raw, str keys JSON as Faust's serializer writes them), in that partition only."""
    from streamagent.stream.app import table_options
    from streamagent.stream.faust_internals import DirectTable, acting_as

    class Event:
        def __init__(self, partition):
            self.message = type("M", (), {"partition": partition})()

    async def main():
        app = faust.App("faust-internals-test-5", broker="kafka://127.0.0.1:1",
                        store="rocksdb://", datadir=str(tmp_path), web_enabled=False)
        raw = app.Table("r", default=None, partitions=4, key_type=bytes, value_type=bytes,
                        options=table_options("rocksdb://"))
        text = app.Table("s", default=None, partitions=4, key_type=str, value_type=bytes,
                         options=table_options("rocksdb://"))
        for table, key in ((raw, b"user-1"), (text, "u:user-1")):
            direct = DirectTable(table, app)
            with acting_as(Event(2)):
                direct[key] = b"v1"
                assert direct._partition_db()[1] is not None  # the straight path is taken
                assert table.data[key] == b"v1"  # Faust's own read finds it
                table.data[key] = b"v2"  # Faust's own write...
                assert direct[key] == b"v2" and direct.get(key) == b"v2" and key in direct
                stored = direct.pending[-1][0]
                assert table.data._db_for_partition(2).get(stored) == b"v2"
            with acting_as(Event(1)):  # another partition's database has no such key
                assert direct.get(key) is None and key not in direct
            with acting_as(Event(2)):
                del direct[key]
                assert direct.get(key) is None and table.data.get(key) is None
            assert direct.pending == [(stored, b"v1", 2), (stored, None, 2)]
            assert stored == (key if isinstance(key, bytes) else b'"u:user-1"')

    asyncio.run(main())


def test_take_batches_takes_what_is_queued_waits_once_skips_stale_and_acks_after():
    """The lean batching of the agents (take_batches) on a real Faust app's stream, channel
    queue, consumer and events: queued events come in one batch without waiting, a lone one
    after one wait of ``within``; events of an older consumer generation are acknowledged and
    never handed over; a handed-over event is tracked as unacknowledged until its batch is
    done, then acknowledged (its offset committable)."""
    from faust.types.tuples import ConsumerMessage

    from streamagent.stream.faust_internals import take_batches

    async def main():
        app = faust.App("faust-internals-test-6", broker="kafka://127.0.0.1:1",
                        store="memory://", web_enabled=False)
        stream = app.stream(app.topic("t", key_type=bytes, value_type=bytes))
        queue, consumer = stream.channel.queue, app.consumer
        for attr in ("_acking_topics",):
            assert hasattr(app.topics, attr), changed(f"the conductor has no {attr}")
        for attr in ("_unacked_messages", "_acked", "_committed_offset"):
            assert hasattr(consumer, attr), changed(f"the consumer has no {attr}")
        app.topics._acking_topics.add("t")  # (the subscription does this in a worker)
        app.flow_control.resume()
        offsets = iter(range(1000))

        def put(n: int, generation: int = 0) -> list:
            out = []
            for _ in range(n):
                msg = ConsumerMessage("t", 0, next(offsets), 0.0, 0, None, b"k", b"v", None,
                                      generation_id=generation)
                msg.incref()  # one channel delivers it (the conductor's count)
                event = app.create_event(b"k", b"v", None, msg)
                queue.put_nowait(event)
                out.append(event)
            return out

        batches = take_batches(stream, 4, 0.05)
        loop = asyncio.get_running_loop()
        first = put(6)
        t0 = loop.time()
        b1 = await batches.__anext__()
        assert [e.message.offset for e in b1] == [0, 1, 2, 3]  # max_n, no wait: all queued
        assert loop.time() - t0 < 0.04
        assert all(e.message.tracked and e.message in consumer._unacked_messages for e in b1)
        assert not any(e.message.acked for e in b1)  # in the handler's hands
        b2 = await batches.__anext__()  # the last two, after one wait of within
        assert all(e.message.acked for e in b1)  # the previous batch is done: acknowledged
        assert [e.message.offset for e in b2] == [4, 5]
        stale = put(1, generation=-1)  # fetched before a rebalance
        put(1)
        t0 = loop.time()
        b3 = await batches.__anext__()
        assert [e.message.offset for e in b3] == [7] and loop.time() - t0 >= 0.04
        assert stale[0].message.acked and stale[0].message not in consumer._unacked_messages
        await batches.aclose()  # the handler raised or the agent stops: acknowledged anyway
        assert all(e.message.acked for e in first + b3)
        assert list(consumer._acked[TP("t", 0)]) == [0, 1, 2, 3, 4, 5, 6, 7]
        waiting = asyncio.ensure_future(take_batches(stream, 4, 0.05).__anext__())
        await asyncio.sleep(0.01)
        await queue.throw(StopAsyncIteration())  # how Faust closes a channel
        try:
            await waiting
        except StopAsyncIteration:  # the generator ended, it did not crash the agent
            pass
        else:
            raise AssertionError("take_batches went on after its channel closed")

    asyncio.run(main())


def test_the_batched_fetch_loop_mirrors_faust_s():
    """install_batched_delivery replaces Faust's fetch loop by a copy that races a suspension
    once per fetch: the loop it copies must still be the one it copied (same steps, same
    private attributes), or the copy would drift from Faust's semantics silently."""
    from faust.transport.consumer import Consumer as FaustConsumer

    from streamagent.stream.faust_internals import install_batched_delivery

    install_batched_delivery()
    install_batched_delivery()  # idempotent: one wrapper, the original kept
    patched = FaustConsumer._drain_messages
    original = patched.streamagent_original
    assert getattr(original, "streamagent_original", None) is None
    src = inspect.getsource(original)
    for step in ("getmany(timeout=1.0)", "self.wait_first(", "callback(message)",
                 "self.suspend_flow.wait()", "_add_gap(", "self._n_acked >= commit_every",
                 "set_read_offset(tp, offset)", "consumer_stopped_errors",
                 "yield_every = 100"):
        assert step in src, changed(f"Faust's fetch loop no longer has {step!r}")
    for attr in ("_read_offset", "_commit_every", "_n_acked", "suspend_flow", "diag",
                 "_add_gap", "callback"):
        assert attr in src or hasattr(FaustConsumer, attr), changed(f"no {attr}")


def test_the_worker_can_be_built_without_its_debug_spinner():
    from streamagent.stream.faust_internals import make_worker

    assert "setLevel(logging.DEBUG)" in inspect.getsource(faust.Worker._setup_spinner_handler), \
        changed("the worker's spinner no longer sets the root logger to DEBUG (drop the "
                "workaround)")
    app = faust.App("faust-internals-test-3", broker="kafka://127.0.0.1:1", store="memory://",
                    web_enabled=False)
    assert make_worker(app, "WARNING").spinner is None


def test_the_end_of_recovery_keeps_what_the_streams_hold():
    """Faust's end of recovery resumes the stream partitions, seeks them, then resumes the flow,
    which clears the streams' buffers: records fetched during the seek were lost with the
    position past them (the broker-kill test lost 9 to 872 of 30,000 that way). Patched, that
    resumption clears nothing. Faust's own order is checked too: when it changes, this says so."""
    from faust.tables.recovery import Recovery

    from streamagent.stream.faust_internals import install_recovery_keeps_buffers

    install_recovery_keeps_buffers()
    fixed = Recovery.on_recovery_completed
    original = getattr(fixed, "streamagent_original", None)
    assert original is not None
    stream_tp = TP("user-events", 0)

    async def run(method) -> list[str]:
        app = faust.App("faust-internals-test-4", broker="kafka://127.0.0.1:1",
                        store="memory://", web_enabled=False)
        consumer, calls = app.consumer, []
        cls = type(consumer)
        saved = {n: cls.__dict__.get(n) for n in ("resume_partitions", "perform_seek",
                                                   "assignment")}

        async def perform_seek(self):
            calls.append("seek")

        cls.resume_partitions = lambda self, tps: calls.append(f"resume {sorted(tps)}")
        cls.perform_seek = perform_seek
        cls.assignment = lambda self: {stream_tp}
        flow = app.flow_control
        flow_cls = type(flow)
        clear, resume = flow_cls.clear, flow_cls.resume
        flow_cls.clear = lambda self: (calls.append("clear"), clear(self))
        flow_cls.resume = lambda self: (calls.append("flow"), resume(self))

        async def no_fetcher():
            calls.append("fetcher")

        app._fetcher.maybe_start = no_fetcher
        try:
            rec = app.tables.recovery
            assert hasattr(rec, "completed") and hasattr(rec, "_is_changelog_tp"), changed(
                "Recovery has no completed event or _is_changelog_tp")
            await method(rec, app.consumer_generation_id)
        finally:
            for n, v in saved.items():
                if v is None:
                    delattr(cls, n)
                else:
                    setattr(cls, n, v)
            flow_cls.clear, flow_cls.resume = clear, resume
        assert "clear" not in vars(flow), "the shadow was left behind"
        return calls

    before = asyncio.run(run(original))
    resumed = f"resume {[stream_tp]}"
    assert (before.index(resumed) < before.index("seek") < before.index("flow")
            < before.index("clear")), changed(
        f"Recovery.on_recovery_completed calls {before}: it no longer resumes the stream "
        "partitions, seeks and then clears the streams' buffers (drop "
        "install_recovery_keeps_buffers if the race is gone)")
    after = asyncio.run(run(fixed))
    assert "clear" not in after, after
    assert after.index(resumed) < after.index("seek") < after.index("flow"), after
