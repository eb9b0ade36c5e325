"""Send user events to Kafka, from any iterable of events (a JSON-lines file, the synthetic
stream of streamagent.sim.synthetic), and erasure requests (`streamagent erase`)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

import orjson

from streamagent.errors import BrokerError, StreamagentError
from streamagent.ops.kafka import KafkaClientConfig, make_producer, send


def read_jsonl(path: Path) -> Iterator[dict]:
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                yield orjson.loads(line)


def _deliver(kafka: KafkaClientConfig, topic: str, records: Iterable[tuple[bytes, bytes | None]],
             what: str, log=None) -> int:
    """Produce ``(key, value)`` records and wait for every delivery; returns how many."""
    p = make_producer(kafka)
    errors: list[str] = []

    def on_delivery(err, _msg):
        if err is not None:
            errors.append(str(err))

    n = 0
    for key, value in records:
        send(p, topic, key, value, on_delivery)
        n += 1
        if log and n % 10000 == 0:
            log(f"sent {n} {what}")
    left = p.flush(60)
    if left:
        raise BrokerError(f"{left} of {n} {what} were still undelivered after 60 s: is Kafka at "
                          f"{kafka.bootstrap} reachable, and do the security settings "
                          f"(STREAMAGENT_KAFKA_SECURITY_PROTOCOL, _SASL_*, _SSL_*) match it?")
    if errors:
        raise BrokerError(f"{len(errors)} of {n} {what} were not delivered, first: {errors[0]}")
    return n


def send_events(kafka: KafkaClientConfig, topic: str, events: Iterable[dict], log=None) -> int:
    """Produce events keyed by user_id; returns how many were delivered."""
    return _deliver(kafka, topic, ((str(ev.get("user_id", "")).encode(), orjson.dumps(ev))
                                   for ev in events), "events", log)


def send_erasures(kafka: KafkaClientConfig, topic: str, user_ids: Iterable[str]) -> int:
    """An erasure request per user: a null value keyed by the user id on user-events, on the
    user's partition (murmur2, as their events). The worker deletes the user's state and join
    records (docs/OPERATIONS.md, erasure). Returns how many were delivered."""
    users = list(user_ids)
    if not all(users):
        raise StreamagentError("an empty user id erases nobody: nothing was sent")
    return _deliver(kafka, topic, ((u.encode(), None) for u in users), "erasure requests")
