"""Read topics for people, not pipelines: a whole topic (``read_all``) or its newest messages
(``streamagent tail``), then optionally new ones as they come."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TypeVar

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from streamagent.errors import BrokerError, ConfigError
from streamagent.ops.kafka import KafkaClientConfig, make_consumer

M = TypeVar("M")


def read_all(kafka: KafkaClientConfig, topic: str, idle: float = 3.0, limit: int | None = None,
             max_wait: float = 60.0) -> list:
    """Every message on ``topic`` until none has come for ``idle`` seconds (or ``limit``)."""
    c = make_consumer(kafka)
    c.subscribe([topic])
    out = []
    last = time.monotonic()
    start = last
    try:
        while time.monotonic() - last < idle and time.monotonic() - start < max_wait:
            msgs = c.consume(1000, timeout=0.2)
            for m in msgs:
                if m.error():
                    if m.error().code() != KafkaError._PARTITION_EOF:
                        raise RuntimeError(str(m.error()))
                    continue
                out.append(m)
            if msgs:
                last = time.monotonic()
            if limit and len(out) >= limit:
                break
    finally:
        c.close()
    return out


def start_offsets(watermarks: Mapping[int, tuple[int, int]], n: int) -> dict[int, int]:
    """Where to read each partition from so that the topic's newest ``n`` messages are among
    what is read: ``n`` back from its end (high watermark), never before its first offset.

    Partitions have no common order, so the newest ``n`` of the topic may all sit in one of
    them: each is read from ``n`` back, and :func:`newest` picks among them. Offsets that hold
    no message (compacted away, transaction markers) mean fewer than ``n`` may be found.
    """
    return {p: max(low, high - max(0, n)) for p, (low, high) in watermarks.items()}


def _order(m: Message) -> tuple[int, int, int]:
    return m.timestamp()[1], m.partition(), m.offset()


def newest(msgs: Iterable[M], n: int, order: Callable[[M], tuple] = _order) -> list[M]:
    """The newest ``n`` of messages read from several partitions, oldest first: by timestamp
    (producers' or broker's), ties by partition and offset so the output is stable."""
    return sorted(msgs, key=order)[-n:] if n > 0 else []


def _check(m: Message) -> bool:
    """True for a message, False for an end-of-partition event; raises on a real error."""
    err = m.error()
    if err is None:
        return True
    if err.code() == KafkaError._PARTITION_EOF:
        return False
    raise RuntimeError(str(err))


def _watermarks(c: Consumer, topic: str, timeout: float) -> dict[int, tuple[int, int]]:
    try:
        meta = c.list_topics(topic, timeout=timeout).topics.get(topic)
    except KafkaException as exc:  # unreachable, or TLS/SASL refused (librdkafka logs why)
        raise BrokerError(f"cannot read {topic!r}: {exc.args[0].str()}. Check "
                          f"STREAMAGENT_KAFKA_BOOTSTRAP and the security settings "
                          f"(STREAMAGENT_KAFKA_SECURITY_PROTOCOL, _SASL_*, _SSL_*)") from None
    if meta is None or meta.error is not None or not meta.partitions:
        raise ConfigError(f"there is no topic {topic!r} on the broker: check --topic and "
                          f"STREAMAGENT_KAFKA_BOOTSTRAP, or run `streamagent topics create`")
    return {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)
            for p in sorted(meta.partitions)}


def iter_to_end(c: Consumer, topic: str, n: int, timeout: float) -> Iterator[Message]:
    """Assign every partition ``n`` back from its end and yield what is there up to the end seen
    at the start (or for ``timeout`` seconds). No group join, so it starts at once; the
    consumer stays assigned, so following goes on from there."""
    marks = _watermarks(c, topic, timeout)
    starts = start_offsets(marks, n)
    c.assign([TopicPartition(topic, p, off) for p, off in starts.items()])
    # an end-of-partition event or the last offset present at the start ends a partition
    # (transaction markers take offsets without ever being delivered, hence the EOF event)
    pending = {p for p, off in starts.items() if off < marks[p][1]}
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for m in c.consume(1000, timeout=0.2):
            if _check(m):
                yield m
                if m.offset() < marks[m.partition()][1] - 1:
                    continue
            pending.discard(m.partition())


def _read_to_end(c: Consumer, topic: str, n: int, timeout: float) -> list[Message]:
    return list(iter_to_end(c, topic, n, timeout))


def read_to_end(kafka: KafkaClientConfig, topic: str, timeout: float = 30.0) -> Iterator[Message]:
    """Every message on ``topic`` up to its end when called, in partition order, without
    waiting for the topic to go idle (compare :func:`read_all`)."""
    c = make_consumer(kafka, **{"enable.partition.eof": True})
    try:
        yield from iter_to_end(c, topic, 2 ** 62, timeout)
    finally:
        c.close()


def _text(m: Message) -> str:
    v = m.value()
    return "null" if v is None else v.decode(errors="replace")  # None: a compaction tombstone


def tail_lines(kafka: KafkaClientConfig, topic: str, n: int = 20, timeout: float = 10.0,
               follow: bool = False) -> Iterator[str]:
    """The newest ``n`` messages of ``topic``, oldest first; with ``follow``, then every new
    message as it arrives, for as long as the caller keeps reading."""
    c = make_consumer(kafka, **{"enable.partition.eof": True})
    try:
        for m in newest(_read_to_end(c, topic, n, timeout), n):
            yield _text(m)
        while follow:
            for m in c.consume(1000, timeout=0.5):
                if _check(m):
                    yield _text(m)
    finally:
        c.close()


def tail(kafka: KafkaClientConfig, topic: str, limit: int = 20, timeout: float = 10.0,
         follow: bool = False) -> None:
    """Print the newest ``limit`` messages (then new ones with ``follow``, until Ctrl-C)."""
    for line in tail_lines(kafka, topic, limit, timeout, follow):
        print(line, flush=follow)
