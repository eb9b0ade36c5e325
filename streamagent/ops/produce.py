"""Send user events to Kafka, from any iterable of events (a JSON-lines file, the synthetic
stream of streamagent.sim.synthetic)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

import orjson

from streamagent.ops.kafka import make_producer, send


def read_jsonl(path: Path) -> Iterator[dict]:
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                yield orjson.loads(line)


def send_events(bootstrap: str, topic: str, events: Iterable[dict], log=None) -> int:
    """Produce events keyed by user_id; returns how many were delivered."""
    p = make_producer(bootstrap)
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
        raise RuntimeError(f"{left} events were still undelivered after 60 s: is Kafka at "
                           f"{bootstrap} reachable?")
    if errors:
        raise RuntimeError(f"{len(errors)} events were not delivered, first: {errors[0]}")
    return n
