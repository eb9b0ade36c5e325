"""Baseline: a plain confluent-kafka consume -> produce loop, no framework.

Run as ``python -m streamagent.bench.plain_loop`` with BENCH_BOOTSTRAP, BENCH_IN, BENCH_OUT,
BENCH_APP_ID. Stops on SIGTERM.
"""
from __future__ import annotations

import os
import signal

from confluent_kafka import Consumer, Producer


def main() -> None:
    bootstrap = os.environ["BENCH_BOOTSTRAP"]
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": os.environ["BENCH_APP_ID"],
                  "auto.offset.reset": "earliest", "enable.auto.commit": True})
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 1, "partitioner": "murmur2_random"})
    c.subscribe([os.environ["BENCH_IN"]])
    out = os.environ["BENCH_OUT"]
    running = [True]
    signal.signal(signal.SIGTERM, lambda *_: running.__setitem__(0, False))
    while running[0]:
        for m in c.consume(500, timeout=0.005):
            if m.error():
                continue
            while True:
                try:
                    p.produce(out, key=m.key(), value=m.value())
                    break
                except BufferError:
                    p.poll(0.01)
        p.poll(0)
    p.flush(10)
    c.close()


if __name__ == "__main__":
    main()
