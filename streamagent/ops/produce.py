"""Send user events to Kafka: a seeded synthetic stream or a JSON-lines file."""
from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Iterable, Iterator

import orjson
from confluent_kafka import Producer

CATEGORIES = ("shoes", "books", "electronics", "grocery", "toys", "beauty", "garden", "sports")
DEVICES = ("mobile", "desktop", "tablet")
# a session: start, a few views/searches, sometimes a cart, rarely a purchase
_FOLLOW = (("page_view", 0.55), ("search", 0.2), ("add_to_cart", 0.15), ("purchase", 0.04),
           ("session_end", 0.06))


def synthetic_events(n: int, users: int = 1000, seed: int = 1, start_ts: int = 1767225600000,
                     step_ms: int = 1000) -> Iterator[dict]:
    """A deterministic stream of plausible user events (not the simulator: no coupon response)."""
    rng = random.Random(seed)
    in_session: dict[str, bool] = {}
    ts = start_ts
    kinds, weights = zip(*_FOLLOW)
    for i in range(n):
        u = f"u{rng.randrange(users):06d}"
        ts += rng.randrange(step_ms) + 1
        if not in_session.get(u):
            typ = "session_start"
            in_session[u] = True
        else:
            typ = rng.choices(kinds, weights)[0]
            if typ == "session_end":
                in_session[u] = False
        ev = {"event_id": f"s{seed}-{i}", "user_id": u, "type": typ, "ts": ts,
              "device": DEVICES[int(u[1:]) % 3]}
        if typ in ("page_view", "add_to_cart"):
            ev.update(item_id=f"sku-{rng.randrange(5000)}", category=rng.choice(CATEGORIES),
                      price=round(rng.uniform(3, 150), 2))
        elif typ == "search":
            ev["query"] = rng.choice(CATEGORIES)
        elif typ == "purchase":
            ev["amount"] = round(rng.uniform(10, 250), 2)
        yield ev


def read_jsonl(path: Path) -> Iterator[dict]:
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                yield orjson.loads(line)


_rdkafka_log = logging.getLogger("streamagent.rdkafka")
_rdkafka_log.setLevel(logging.ERROR)  # "coordinator load in progress" at start-up is noise


def make_producer(bootstrap: str, **extra) -> Producer:
    conf = {"bootstrap.servers": bootstrap, "linger.ms": 5, "enable.idempotence": True,
            # the Java client's partitioner (murmur2), which Faust/aiokafka use too: a user's
            # conversions must land on the partition number of the user's decisions
            "partitioner": "murmur2_random",
            "compression.type": "lz4", "queue.buffering.max.messages": 500000,
            "logger": _rdkafka_log}
    conf.update(extra)
    return Producer(conf)


def send_events(bootstrap: str, topic: str, events: Iterable[dict], log=None) -> int:
    """Produce events keyed by user_id; returns how many were delivered."""
    p = make_producer(bootstrap)
    errors: list[str] = []

    def on_delivery(err, _msg):
        if err is not None:
            errors.append(str(err))

    n = 0
    for ev in events:
        while True:
            try:
                p.produce(topic, key=str(ev.get("user_id", "")).encode(), value=orjson.dumps(ev),
                          on_delivery=on_delivery)
                break
            except BufferError:
                p.poll(0.05)
        n += 1
        if n % 10000 == 0:
            p.poll(0)
            if log:
                log(f"sent {n} events")
    left = p.flush(60)
    if left:
        raise RuntimeError(f"{left} events were still undelivered after 60 s: is Kafka at "
                           f"{bootstrap} reachable?")
    if errors:
        raise RuntimeError(f"{len(errors)} events were not delivered, first: {errors[0]}")
    return n
