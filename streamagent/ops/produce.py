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


def send_events(kafka: KafkaClientConfig, topic: str, events: Iterable[dict], log=None) -> int:
    """Produce events keyed by user_id; returns how many were delivered."""
    p = make_producer(kafka)
    errors: list[str] = []

    def on_delivery(err, _msg):
        if err is not None:
            errors.append(str(err))

    n = 0
    for ev in events:
        send(p, topic, str(ev.get("user_id", "")).encode(), orjson.dumps(ev), on_delivery)
        n += 1
        if log and n % 10000 == 0:
            log(f"sent {n} events")
    left = p.flush(60)
    if left:
        raise BrokerError(f"{left} events were still undelivered after 60 s: is Kafka at "
                          f"{kafka.bootstrap} reachable, and do the security settings "
                          f"(STREAMAGENT_KAFKA_SECURITY_PROTOCOL, _SASL_*, _SSL_*) match it?")
    if errors:
        raise RuntimeError(f"{len(errors)} events were not delivered, first: {errors[0]}")
    return n


def send_erasures(kafka: KafkaClientConfig, topic: str, user_ids: Iterable[str]) -> int:
    """An erasure request per user: a null value keyed by the user id on user-events, on the
    user's partition (murmur2, as their events). The worker deletes the user's state and join
    records (docs/OPERATIONS.md, erasure). Returns how many were delivered."""
    users = list(user_ids)
    if not all(users):
        raise StreamagentError("an empty user id erases nobody: nothing was sent")
    p = make_producer(kafka)
    errors: list[str] = []

    def on_delivery(err, _msg):
        if err is not None:
            errors.append(str(err))

    n = 0
    for user in users:
        send(p, topic, user.encode(), None, on_delivery)
        n += 1
    left = p.flush(60)
    if left or errors:
        raise BrokerError(f"{left + len(errors)} of {n} erasure requests were not delivered"
                          + (f", first error: {errors[0]}" if errors else
                             f" after 60 s: is Kafka at {kafka.bootstrap} reachable?"))
    return n
