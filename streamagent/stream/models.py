"""Model distribution: every decider follows the compacted model-updates topic.

Each worker reads the topic itself (assign, not subscribe: no consumer group, so every worker
gets every version), builds the new model off the event loop in a thread, and swaps it into the
engine with one reference assignment, so the stream never stalls and a decision never mixes
two versions. Snapshots are tensors-only (torch.load(weights_only=True)).
"""
from __future__ import annotations

import logging
import threading
import time

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from streamagent.core.engine import Model
from streamagent.core.qnet import ModelSnapshot
from streamagent.ops.kafka import make_consumer

log = logging.getLogger("streamagent.models")


def _consumer(bootstrap: str) -> Consumer:
    return make_consumer(bootstrap, "streamagent-model-follower",
                         **{"fetch.message.max.bytes": 16 * 1024 * 1024})


def _watermarks(c: Consumer, topic: str, timeout: float) -> tuple[int, int]:
    # a topic created a moment ago may have no leader yet: retry the transient errors
    deadline = time.monotonic() + timeout
    while True:
        try:
            return c.get_watermark_offsets(TopicPartition(topic, 0), timeout=max(1.0, timeout / 4))
        except KafkaException as exc:
            if time.monotonic() > deadline or not exc.args[0].retriable() and exc.args[0].code() not in (
                    KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE,
                    KafkaError.UNKNOWN_TOPIC_OR_PART):
                raise
            time.sleep(0.25)


def latest_snapshot(bootstrap: str, topic: str, timeout: float = 10.0) -> ModelSnapshot | None:
    """The newest snapshot on the topic, or None when it has none yet."""
    c = _consumer(bootstrap)
    try:
        lo, hi = _watermarks(c, topic, timeout)
        if hi <= lo:
            return None
        c.assign([TopicPartition(topic, 0, hi - 1)])
        msg = c.poll(timeout)
        if msg is None or msg.error():
            return None
        return ModelSnapshot.from_bytes(msg.value())
    finally:
        c.close()


class ModelFollower(threading.Thread):
    def __init__(self, bootstrap: str, topic: str, engine, metrics=None, start_after: int = -1):
        super().__init__(name="model-follower", daemon=True)
        self.bootstrap, self.topic, self.engine, self.metrics = bootstrap, topic, engine, metrics
        self.start_after = start_after
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        c = _consumer(self.bootstrap)
        try:
            # from the newest snapshot on: one already loaded is skipped by its version
            lo, hi = _watermarks(c, self.topic, 30)
            c.assign([TopicPartition(self.topic, 0, max(lo, hi - 1))])
            while not self._stop.is_set():
                msg = c.poll(0.5)
                if msg is None:
                    continue
                if msg.error():
                    if msg.error().code() != KafkaError._PARTITION_EOF:
                        log.warning("model-updates: %s", msg.error())
                    continue
                self._apply(msg.value())
        except Exception:  # the follower must never take the worker down
            log.exception("model follower stopped")
        finally:
            c.close()

    def _apply(self, raw: bytes) -> None:
        try:
            snap = ModelSnapshot.from_bytes(raw)
            # the highest (promotion, version) wins: a rollback is a new promotion of an older
            # version, and it must reach the deciders too
            if snap.order <= self.engine.model.snapshot.order:
                return
            self.engine.swap_model(Model(snap))
        except Exception as exc:
            log.error("ignoring a model snapshot that cannot be used: %s", exc)
            if self.metrics:
                self.metrics.model_errors.inc()
            return
        if self.metrics:
            self.metrics.model_version.set(snap.version)
            self.metrics.model_swaps.inc()
        log.info("now deciding with model v%d (%d training steps, promotion %d)", snap.version,
                 snap.train_steps, snap.promotion)
