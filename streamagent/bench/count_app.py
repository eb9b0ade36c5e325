"""Baseline: a Faust agent that only counts events, batched as the decide agent is.

The ceiling of the Faust per-message path for the pipeline benchmark: the same driver,
consumer tuning, commit settings and batching (STREAMAGENT_STREAM_TAKE, with
STREAMAGENT_DECIDE_BATCH_MAX and _DECIDE_BATCH_WAIT_MS) as the decide worker, and nothing
else: per batch it sends one record ``{"n": <events in the batch>}``, so the benchmark sees how many events went through and
when. Run as ``python -m streamagent.bench.count_app`` with the BENCH_* variables of
forward_app. Not part of the product.
"""
from __future__ import annotations

import os

import faust
import orjson

from streamagent.bench.forward_app import make_app as _forward_app
from streamagent.config import Settings
from streamagent.stream.faust_internals import consumption_path, make_worker


def make_app() -> faust.App:
    s = Settings()
    take = consumption_path(s.stream_take)  # the decide worker's (stream/app.py)
    app = _forward_app(agent=False)
    raw = dict(key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    src = app.topic(os.environ["BENCH_IN"], **raw)
    dst = app.topic(os.environ["BENCH_OUT"], **raw)

    @app.agent(src, concurrency=1)
    async def count(stream):
        async for events in take(stream, s.decide_batch_max, s.decide_batch_wait_ms / 1000.0):
            await dst.send(key=None, value=orjson.dumps({"n": len(events)}))

    return app


if __name__ == "__main__":
    make_worker(make_app(), "WARNING").execute_from_commandline()
