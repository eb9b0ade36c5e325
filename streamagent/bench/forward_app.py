"""Baseline: a Faust agent that only forwards each event (same driver and settings as decide).

Run as ``python -m streamagent.bench.forward_app`` with BENCH_BOOTSTRAP, BENCH_IN, BENCH_OUT,
BENCH_APP_ID set (and STREAMAGENT_KAFKA_* security, as every client). Not part of the product; it exists to give the pipeline benchmark a ceiling.
"""
from __future__ import annotations

import json
import os

import faust

from streamagent.config import Settings
from streamagent.ops.kafka import kafka_client
from streamagent.stream.app import faust_broker
from streamagent.stream.faust_internals import make_worker, set_fetch_max_wait


def make_app(agent: bool = True) -> faust.App:
    """The baseline app; ``agent`` False: the app with its settings and no agent (count_app
    adds its own)."""
    # the same consumer tuning the decide worker gets, so the baseline is like for like
    set_fetch_max_wait(int(os.environ.get("STREAMAGENT_CONSUMER_FETCH_MAX_WAIT_MS", "20")))
    s = Settings()
    kafka = kafka_client(s, bootstrap=os.environ["BENCH_BOOTSTRAP"])
    app = faust.App(os.environ["BENCH_APP_ID"], **faust_broker(kafka),
                    store="memory://", web_enabled=False, consumer_auto_offset_reset="earliest",
                    topic_replication_factor=1, producer_linger_ms=5, broker_commit_every=10_000,
                    broker_commit_interval=2.8, datadir=os.environ.get("BENCH_DATA_DIR", "var/bench"),
                    broker_max_poll_records=s.consumer_max_poll_records,
                    stream_buffer_maxsize=s.stream_buffer_maxsize,
                    # experiments: more faust.App settings as a JSON object
                    **json.loads(os.environ.get("BENCH_FAUST_SETTINGS") or "{}"))
    if not agent:
        return app
    raw = dict(key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    src = app.topic(os.environ["BENCH_IN"], **raw)
    dst = app.topic(os.environ["BENCH_OUT"], **raw)

    @app.agent(src, concurrency=1)
    async def forward(stream):
        async for event in stream.events():
            await dst.send(key=event.message.key, value=event.message.value)

    return app


if __name__ == "__main__":
    make_worker(make_app(), "WARNING").execute_from_commandline()
