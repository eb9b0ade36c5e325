"""Read a topic from the start and print its messages (for people, not for pipelines)."""
from __future__ import annotations

import time

from confluent_kafka import KafkaError

from streamagent.ops.kafka import make_consumer


def read_all(bootstrap: str, topic: str, idle: float = 3.0, limit: int | None = None,
             max_wait: float = 60.0) -> list:
    """Every message on ``topic`` until none has come for ``idle`` seconds (or ``limit``)."""
    c = make_consumer(bootstrap)
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


def tail(bootstrap: str, topic: str, limit: int = 20, timeout: float = 10.0) -> None:
    for m in read_all(bootstrap, topic, idle=timeout, limit=limit):
        print(m.value().decode(errors="replace"))
