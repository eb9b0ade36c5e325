"""Model distribution: every decider follows the compacted model-updates topic.

Each worker reads the topic itself (assign, not subscribe: no consumer group, so every worker
gets every version), builds the new model off the event loop in a thread, and swaps it into the
engine with one reference assignment, so the stream never stalls and a decision never mixes
two versions. Snapshots are tensors-only (torch.load(weights_only=True)).

Nothing on the topic is trusted: every snapshot passes core/modelcheck.py before it is used,
at start as in the follower, so a corrupt or absurd one is skipped (logged, and counted by the
follower) and never stops a worker or the learner from starting.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from streamagent.config import Settings
from streamagent.core.catalog import load_catalog
from streamagent.core.engine import Model
from streamagent.core.features import FEATURE_NAMES
from streamagent.core.modelcheck import SnapshotCheck, read_snapshot
from streamagent.core.qnet import ModelSnapshot
from streamagent.errors import ConfigError, SnapshotRejected
from streamagent.ops.kafka import KafkaClientConfig, make_consumer

log = logging.getLogger("streamagent.models")
# records read back from the end of model-updates at start (more only if all are refused): a
# few, so that each is judged against the one before it, as the followers judged them
START_WINDOW = 16


def _consumer(kafka: KafkaClientConfig) -> Consumer:
    # partition EOF events tell a start-up read that it has seen the last record
    return make_consumer(kafka, "streamagent-model-follower",
                         **{"fetch.message.max.bytes": 16 * 1024 * 1024,
                            "enable.partition.eof": True})


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


def snapshot_check(s: Settings) -> SnapshotCheck:
    """What a snapshot must match in this deployment: the catalog's actions, this build's
    features, and this app id as its producer (when it names one)."""
    return SnapshotCheck(load_catalog(s.catalog_path).actions, FEATURE_NAMES, producer=s.app_id)


def load_model_file(path: Path | str, check: SnapshotCheck) -> ModelSnapshot:
    """STREAMAGENT_MODEL_PATH: an operator's explicit choice, so an unusable file stops the
    process with the reason instead of quietly deciding with another model."""
    try:
        return check.validate(read_snapshot(path))
    except SnapshotRejected as exc:
        raise ConfigError(f"STREAMAGENT_MODEL_PATH={path} cannot be used ({exc}); fix the file "
                          f"or unset the setting to follow model-updates") from None


def latest_snapshot(kafka: KafkaClientConfig, topic: str, *, check: SnapshotCheck,
                    timeout: float = 10.0) -> ModelSnapshot | None:
    """The newest usable snapshot on the topic, or None when it has none.

    The last ``START_WINDOW`` records are judged in order, each against the best one before
    it, and the best (highest promotion, version) wins: what a follower that had read them
    would use. Only if all of them are refused is the topic read further back.
    """
    c = _consumer(kafka)
    try:
        lo, hi = _watermarks(c, topic, timeout)
        end, size = hi, START_WINDOW
        while end > lo:
            start = max(lo, end - size)
            best = _best_in(c, topic, start, end, check, timeout)
            if best is not None:
                return best
            # every record in [start, end) was refused on its own, whatever came before it
            end, size = start, size * 16
        return None
    finally:
        c.close()


def _best_in(c: Consumer, topic: str, start: int, end: int, check: SnapshotCheck,
             timeout: float) -> ModelSnapshot | None:
    c.assign([TopicPartition(topic, 0, start)])
    best: ModelSnapshot | None = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg = c.poll(0.5)
        if msg is None:
            continue
        if msg.error():
            if msg.error().code() == KafkaError._PARTITION_EOF:
                break
            continue
        if msg.offset() >= end:
            break
        try:
            snap = check.decode(msg.value(), current=best)
            if best is None or snap.order > best.order:
                best = snap
        except SnapshotRejected as exc:
            log.warning("skipping the model snapshot at %s offset %d: %s", topic, msg.offset(),
                        exc)
        if msg.offset() >= end - 1:
            break
    return best


class ModelFollower(threading.Thread):
    """Follows model-updates and hot-swaps every usable snapshot above the model in use.

    ``check`` (``snapshot_check(settings)`` in the worker) defaults to the engine's catalog
    and this build's features, from any producer: there is no follower without a check.
    """

    def __init__(self, kafka: KafkaClientConfig, topic: str, engine, metrics=None, start_after: int = -1,
                 *, check: SnapshotCheck | None = None):
        super().__init__(name="model-follower", daemon=True)
        self.kafka, self.topic, self.engine, self.metrics = kafka, topic, engine, metrics
        self.start_after = start_after
        self.check = check or SnapshotCheck(engine.catalog.actions, FEATURE_NAMES)
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        c = _consumer(self.kafka)
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

    def _apply(self, raw: bytes | None) -> None:
        current = self.engine.model.snapshot
        try:
            snap = self.check.decode(raw, current=current)
            # the highest (promotion, version) wins: a rollback is a new promotion of an older
            # version, and it must reach the deciders too
            if snap.order <= current.order:
                return
            self.engine.swap_model(Model(snap))
        except SnapshotRejected as exc:
            self._refuse(exc.reason, exc, current)
            return
        except Exception as exc:  # e.g. a one-head model under thompson exploration
            self._refuse(None, exc, current)
            return
        if self.metrics:
            self.metrics.model_version.set(snap.version)
            self.metrics.model_swaps.inc()
        log.info("now deciding with model v%d (%d training steps, promotion %d)", snap.version,
                 snap.train_steps, snap.promotion)

    def _refuse(self, reason: str | None, exc: Exception, current: ModelSnapshot) -> None:
        log.error("refused a model snapshot from %s (%s); still deciding with model v%d",
                  self.topic, exc, current.version)
        if self.metrics:
            self.metrics.model_errors.inc()
            if reason is not None:
                self.metrics.model_rejected.labels(reason).inc()
