"""Baseline: a plain confluent-kafka consume -> produce loop, no framework.

Run as ``python -m streamagent.bench.plain_loop`` with BENCH_BOOTSTRAP, BENCH_IN, BENCH_OUT,
BENCH_APP_ID. Stops on SIGTERM.
"""
from __future__ import annotations

import os
import signal

from streamagent.config import Settings
from streamagent.ops.kafka import kafka_client, make_consumer, make_producer, send


def main() -> None:
    kafka = kafka_client(Settings(), bootstrap=os.environ["BENCH_BOOTSTRAP"])
    c = make_consumer(kafka, os.environ["BENCH_APP_ID"], **{"enable.auto.commit": True})
    # the producer measured in docs/BENCHMARKS.md: no compression, not idempotent
    p = make_producer(kafka, **{"linger.ms": 1, "compression.type": "none",
                                    "enable.idempotence": False})
    c.subscribe([os.environ["BENCH_IN"]])
    out = os.environ["BENCH_OUT"]
    running = [True]
    signal.signal(signal.SIGTERM, lambda *_: running.__setitem__(0, False))
    while running[0]:
        for m in c.consume(500, timeout=0.005):
            if m.error():
                continue
            send(p, out, m.key(), m.value())
        p.poll(0)
    p.flush(10)
    c.close()


if __name__ == "__main__":
    main()
