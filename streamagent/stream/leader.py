"""One active learner: a lock held through Kafka, and a producer that a newer learner fences.

Two learners publishing at once would number versions over each other and each learn half of
the transitions twice. Two mechanisms, both the broker's own, keep one learner active:

- **The lock** (:class:`LearnerLock`): every learner joins the consumer group
  ``<app id>-learner-lock`` on the model-updates topic (never reading it: the partitions are
  paused). The member that is assigned partition 0 is the active learner; any other waits as
  a standby and takes over when the active one leaves the group (at once on a clean stop,
  after ``STREAMAGENT_LEARNER_LOCK_TIMEOUT_S`` when it was killed). The cooperative-sticky
  assignor keeps partition 0 where it is when a standby joins.
- **Fencing** (:class:`ModelPublisher`): models are published in Kafka transactions under the
  transactional id ``<app id>-learner``. A learner that becomes active initialises that id,
  which aborts whatever an earlier holder left open and makes the broker refuse that holder's
  next write. A learner that was frozen (a long GC pause, a stopped VM) and missed losing the
  lock therefore cannot publish after its successor started: its transaction fails with
  "fenced" and it stops (:class:`Fenced`). Consumers of model topics read committed records
  only (librdkafka's default), so an aborted publish is never seen.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

from confluent_kafka import KafkaError, KafkaException, Producer

from streamagent.ops.kafka import KafkaClientConfig, make_consumer, make_producer

log = logging.getLogger("streamagent.learner")

FENCED_CODES = {KafkaError._FENCED, KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH}


class Fenced(RuntimeError):
    """Another learner became active: this one must stop without publishing or checkpointing.

    Not an error to fix: run one learner (or standbys that wait for the lock). If it happens
    without a second learner, the lock timeout (STREAMAGENT_LEARNER_LOCK_TIMEOUT_S) is shorter
    than the learner's pauses, or the loop stalled longer than max.poll.interval.ms."""


def lock_group(app_id: str) -> str:
    return f"{app_id}-learner-lock"


def transactional_id(app_id: str) -> str:
    return f"{app_id}-learner"


class LearnerLock:
    """Membership of the learner-lock group; ``held`` while this learner owns partition 0.

    ``poll()`` must be called at least every few seconds (the learner's loop does): it serves
    the group's callbacks, and a member that does not poll for max.poll.interval.ms is
    dropped from the group."""

    def __init__(self, kafka: KafkaClientConfig, app_id: str, topic: str, timeout_s: float):
        self.topic = topic
        self.held = False
        self.lost = False  # held once, then taken away
        self._closing = False  # close() gives the lock up: that revocation is no loss
        self.c = make_consumer(kafka, lock_group(app_id), **{
            "partition.assignment.strategy": "cooperative-sticky",
            "session.timeout.ms": int(timeout_s * 1000),
            "heartbeat.interval.ms": max(100, int(timeout_s * 1000 / 5))})
        self.c.subscribe([topic], on_assign=self._assigned, on_revoke=self._revoked,
                         on_lost=self._revoked)

    def _assigned(self, consumer, parts) -> None:
        consumer.pause(parts)  # membership only: the records are not this consumer's business
        if any(p.partition == 0 for p in parts):
            self.held = True
            log.info("holding the learner lock (%s partition 0): this learner is active",
                     self.topic)

    def _revoked(self, consumer, parts) -> None:
        if any(p.partition == 0 for p in parts) and self.held:
            if self._closing:
                self.held = False
                log.info("released the learner lock (%s partition 0)", self.topic)
                return
            self.held, self.lost = False, True
            log.error("lost the learner lock (%s partition 0): another learner is active",
                      self.topic)

    def poll(self) -> bool:
        """Serve the group protocol; True while the lock is held."""
        self.c.poll(0)  # paused: returns nothing, runs the callbacks
        return self.held

    def acquire(self, running: Callable[[], bool], wait_log_s: float = 30.0) -> bool:
        """Block until the lock is held (True) or ``running()`` turns false (False)."""
        started = last_log = time.monotonic()
        while running():
            self.c.poll(0.2)
            if self.held:
                return True
            if time.monotonic() - last_log >= wait_log_s:
                last_log = time.monotonic()
                log.info("standby: waiting %.0f s for the learner lock (group %s); another "
                         "learner is active", last_log - started, self.c.memberid() or "?")
        return False

    def close(self) -> None:
        self._closing = True
        self.c.close()  # leaves the group: a standby takes over at once


def raise_fenced(exc: KafkaException) -> None:
    """Turn the broker's "a newer producer has this transactional id" (or any other fatal
    producer error: the producer cannot be used again) into :class:`Fenced`."""
    err = exc.args[0] if exc.args else None
    if isinstance(err, KafkaError) and (err.code() in FENCED_CODES or err.fatal()):
        raise Fenced(f"another learner took over the transactional id ({err.str()})") from None


class ModelPublisher:
    """Publishes models in transactions under the learner's transactional id. Starting one
    fences every earlier producer with that id (:class:`Fenced` there, at its next call)."""

    def __init__(self, kafka: KafkaClientConfig, app_id: str, timeout_s: float = 30.0):
        self.timeout_s = timeout_s
        self.p: Producer = make_producer(kafka, **{"transactional.id": transactional_id(app_id),
                                                   "message.max.bytes": 16 * 1024 * 1024})
        self.needs_abort = False  # a failed transaction whose abort failed too (broker away)
        try:
            self.p.init_transactions(timeout_s)
        except KafkaException as exc:
            raise_fenced(exc)
            raise

    def publish(self, records: list[tuple[str, bytes, bytes]],
                before_commit: Callable[[], None]) -> None:
        """Send ``records`` (topic, key, value) in one transaction; ``before_commit()`` (the
        checkpoint) runs once every record is acknowledged, then the transaction commits (a
        record the broker refused fails the commit after the checkpoint: that version number
        is then spent, never reused). Fenced on the way: :class:`Fenced`, nothing visible and
        ``before_commit`` not run. Any other failure (the broker away): the transaction is
        aborted (now, or before the next publish) and the KafkaException raised."""
        t = self.timeout_s
        try:
            if self.needs_abort:
                self.p.abort_transaction(t)
                self.needs_abort = False
            self.p.begin_transaction()
            # no delivery callbacks: a fenced producer's flush raises its fatal error, and a
            # Python callback called while that error is pending turns it into a SystemError
            for topic, key, value in records:
                self.p.produce(topic, key=key, value=value)
            if self.p.flush(t):
                raise KafkaException(KafkaError(KafkaError._TIMED_OUT,
                                                "model records not acknowledged"))
            before_commit()
            self.p.commit_transaction(t)
        except KafkaException as exc:
            raise_fenced(exc)
            self.needs_abort = True
            try:
                self.p.abort_transaction(t)
                self.needs_abort = False
            except KafkaException as abort_exc:
                raise_fenced(abort_exc)
            raise

    def flush(self, timeout_s: float) -> None:
        self.p.flush(timeout_s)
