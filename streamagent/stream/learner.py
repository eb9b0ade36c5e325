"""The learner process: transitions in, Q-learning updates, versioned snapshots out.

One logical learner (the deciders scale, the learner need not). It is a plain consumer loop
rather than a Faust agent so that its input offsets can be saved in the same atomic checkpoint
file as the model, optimiser and replay buffer: after a restart it resumes exactly where the
checkpoint was taken and the model has seen each transition once.

Every version goes to ``model-candidates`` with the promotion gate's verdict (core/gate.py);
only promoted ones go to ``model-updates``, which the deciders follow.
"""
from __future__ import annotations

import logging
import signal
import time

from confluent_kafka import KafkaError, KafkaException, TopicPartition

from streamagent.config import Settings
from streamagent.core.catalog import load_catalog
from streamagent.core.contracts import decode_transition, dlq_envelope, dlq_key, encode
from streamagent.core.features import FEATURE_NAMES
from streamagent.core.gate import Holdout, Verdict, held_out, judge
from streamagent.core.learner import QLearner
from streamagent.core.modelcheck import PRODUCER_KEY
from streamagent.core.policy import epsilon_at
from streamagent.core.qnet import ModelSnapshot, NumpyQ
from streamagent.errors import InvalidMessage, SnapshotRejected
from streamagent.metrics import Metrics
from streamagent.ops.kafka import kafka_client, make_consumer, make_producer, send
from streamagent.params import gate_params_from, learner_params
from streamagent.stream.leader import Fenced, LearnerLock, ModelPublisher

log = logging.getLogger("streamagent.learner")

FENCED_EXIT = 3  # the exit status of a learner that found another one active


class LearnerService:
    def __init__(self, s: Settings, metrics: Metrics | None = None,
                 lock: LearnerLock | None = None):
        """``lock``: the learner lock, already held (run_learner acquires it before the
        checkpoint is read, so a standby that takes over reads the newest one)."""
        from streamagent.stream.models import latest_snapshot, load_model_file, snapshot_check

        self.s = s
        self.lock = lock
        self.kafka = kafka_client(s)  # brokers and TLS/SASL, checked before anything starts
        self.m = metrics or Metrics(topics=(s.topic_transitions,))
        catalog = load_catalog(s.catalog_path)
        self.check = snapshot_check(s)
        # the newest valid model (corrupt or invalid ones are skipped); a model file that is
        # not usable stops the learner with the reason. A corrupt checkpoint (below) is
        # refused with what to do (CorruptCheckpoint): it holds offsets no model can replace.
        initial = (load_model_file(s.model_path, self.check) if s.model_path
                   else latest_snapshot(self.kafka, s.topic_model_updates,
                                        check=self.check))
        self.learner = QLearner(catalog.actions, FEATURE_NAMES, tuple(s.hidden_sizes),
                                learner_params(s), initial)
        self.offsets: dict[int, int] = {}
        self.gate = gate_params_from(s)
        self.holdout = Holdout(s.gate_window, len(FEATURE_NAMES), catalog.n_actions)
        if s.checkpoint_path.exists():
            extra = self.learner.load_checkpoint(s.checkpoint_path)
            self.offsets = {int(k): int(v) for k, v in extra.get("offsets", {}).items()}
            self.holdout.load(extra.get("holdout"))
            self.started_from = (f"resumed from {s.checkpoint_path}: model "
                                 f"v{self.learner.version}, {self.learner.train_steps} steps")
        else:
            self.started_from = (f"no checkpoint at {s.checkpoint_path}: started fresh from "
                                 f"model v{self.learner.version}")
        # never reuse a version number already on model-candidates (an imported model's, or
        # a checkpoint older than the topic)
        from streamagent.stream.registry import candidates

        self.learner.version = max([self.learner.version, *candidates(s)])
        log.info("%s, offsets %s", self.started_from, self.offsets)
        self.producer = make_producer(self.kafka)  # dead letters
        # models go out in transactions: starting this fences any earlier learner (leader.py)
        self.models_out = ModelPublisher(self.kafka, s.app_id)
        self.consumer = make_consumer(self.kafka, f"{s.app_id}-learner")
        md = self.consumer.list_topics(s.topic_transitions, timeout=10)
        parts = sorted(md.topics[s.topic_transitions].partitions)
        self.consumer.assign([TopicPartition(s.topic_transitions, p, self.offsets.get(p, 0))
                              for p in parts])
        # a transition re-sent after a worker crash must not be learned twice
        self._recent: dict[str, None] = {}
        self.steps_at_snapshot = self.learner.train_steps
        self.time_at_snapshot = time.monotonic()
        self._parts = parts
        self.polled_at: float | None = None  # monotonic time the last poll returned (/readyz)
        self._lag_at = 0.0
        self._running = True
        self._suspended = False  # lost the learner lock: not publishing (holds_lock)

    def _report_lag(self) -> None:
        self._lag_at = time.monotonic()
        topic = self.s.topic_transitions
        try:
            behind = 0
            for p in self._parts:
                _, hi = self.consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=2)
                behind += max(0, hi - self.offsets.get(p, 0))
            self.m.lag.labels(topic).set(behind)
        except Exception:
            log.debug("lag report failed", exc_info=True)

    @property
    def partitions(self) -> list[int]:
        """The partitions of the transitions topic this learner's consumer is assigned."""
        return self._parts

    def stop(self, *_):
        self._running = False

    def _live(self) -> ModelSnapshot:
        """The model the deciders use now (an operator may have promoted or rolled back)."""
        from streamagent.stream.models import latest_snapshot

        live = latest_snapshot(self.kafka, self.s.topic_model_updates, check=self.check)
        return live if live is not None else self.learner.initial_snapshot()

    def publish(self) -> None:
        """Judge, then publish and checkpoint: the candidate always to model-candidates, to the
        deciders (model-updates) only if promoted, in one transaction that commits after the
        checkpoint is written: a crash in between never reuses a visible version number. A version that fails the deciders' own check (weights gone
        NaN when training diverged) is neither checkpointed nor published: the last
        checkpoint stays the last good state."""
        snap = self.learner.snapshot()
        try:
            self.check.validate(snap)
            # the snapshot may be the slow average (PUBLISH_AVERAGE): the weights the
            # checkpoint keeps must be finite too, or a restart would refuse it
            if not self.learner.finite():
                raise SnapshotRejected("non_finite", f"model v{snap.version}: the learner's "
                                       f"online weights hold NaN or infinite values")
        except SnapshotRejected as exc:
            self._refuse(snap, exc)
            return
        try:
            live = self._live()
        except KafkaException as exc:  # the broker away: learning goes on, publish later
            self._publish_failed(snap, exc, spent=False)
            return
        if self.s.gate:
            verdict = judge(NumpyQ(snap), NumpyQ(live), self.holdout.log(), self.gate)
        else:
            verdict = Verdict("promoted", 0, reason="gate off (STREAMAGENT_GATE=false)")
        # trained_through: the next input offset per transitions partition, i.e. what this
        # version has seen (audits; `bench pipeline` times model freshness from it)
        snap.meta = {**snap.meta, **verdict.to_doc(), "replaces": live.version,
                     "promoted_by": "gate",
                     PRODUCER_KEY: self.s.app_id,
                     "trained_through": {str(k): int(v) for k, v in self.offsets.items()}}
        if verdict.promote:
            snap.promotion = live.promotion + 1
        raw = snap.to_bytes()
        records = [(self.s.topic_model_candidates, str(snap.version).encode(), raw)]
        if verdict.promote:
            records.append((self.s.topic_model_updates, b"model", raw))
        checkpointed = []

        def checkpoint() -> None:
            self.learner.save_checkpoint(self.s.checkpoint_path, extra={
                "offsets": {str(k): v for k, v in self.offsets.items()},
                "holdout": self.holdout.state()})
            checkpointed.append(True)

        # sent in a transaction, checkpointed once the broker has them, then committed: a
        # crash before the commit leaves nothing visible, and the version number is spent
        try:
            self.models_out.publish(records, before_commit=checkpoint)
        except KafkaException as exc:  # the broker away: learning goes on, publish later
            self._publish_failed(snap, exc, spent=bool(checkpointed))
            return
        self.steps_at_snapshot = self.learner.train_steps
        self.time_at_snapshot = time.monotonic()
        self._report_gate(snap, verdict, live)
        log.info("model v%d (%d training steps, loss %.4f): %s; %s", snap.version,
                 snap.train_steps, self.learner.last_loss, verdict.outcome, verdict.reason)

    def _publish_failed(self, snap: ModelSnapshot, exc: KafkaException, spent: bool) -> None:
        """A publish the broker did not take: counted, tried again at the next interval."""
        if not spent:
            self.learner.version = snap.version - 1  # never visible: the number stays free
        self.m.errors.labels("publish").inc()
        self.steps_at_snapshot = self.learner.train_steps
        self.time_at_snapshot = time.monotonic()
        err = exc.args[0] if exc.args else exc
        log.warning("could not publish model v%d (%s); trying again at the next interval",
                    snap.version, err.str() if hasattr(err, "str") else err)

    def _refuse(self, snap: ModelSnapshot, exc: SnapshotRejected) -> None:
        self.learner.version = snap.version - 1  # never published: the number stays free
        self.m.learn_rejected.labels(exc.reason).inc()
        # try again at the next interval, not at every poll
        self.steps_at_snapshot = self.learner.train_steps
        self.time_at_snapshot = time.monotonic()
        log.error("not publishing model v%d: %s. Nothing is checkpointed either; restart the "
                  "learner to resume from its last checkpoint (and if the weights diverged, "
                  "lower STREAMAGENT_LEARNING_RATE)", snap.version, exc)

    def _report_gate(self, snap: ModelSnapshot, verdict: Verdict, live: ModelSnapshot) -> None:
        m = self.m
        m.learn_version.set(snap.version)
        m.learn_published.set(snap.created_at)
        m.gate.labels(verdict.outcome).inc()
        m.gate_live_version.set(snap.version if verdict.promote else live.version)
        m.gate_holdout.set(verdict.n)
        if verdict.outcome in ("promoted", "rejected"):
            m.gate_value.labels("live").set(verdict.live_value)
            m.gate_value.labels("candidate").set(verdict.candidate_value)
            m.gate_diff_low.set(verdict.diff_low)
        m.learn_epsilon.set(epsilon_at(snap.train_steps, self.s.epsilon_start,
                                       self.s.epsilon_end, self.s.epsilon_decay_steps))

    def _dead_letter(self, msg, exc: InvalidMessage) -> None:
        self.m.dlq.labels(msg.topic(), exc.reason).inc()
        env = dlq_envelope(source_topic=msg.topic(), partition=msg.partition(),
                           offset=msg.offset(), key=msg.key(), value=msg.value(),
                           reason=exc.reason, detail=exc.detail,
                           failed_at_ms=int(time.time() * 1000), worker="learner")
        send(self.producer, self.s.dlq(msg.topic()), dlq_key(msg.key()), encode(env))

    def ingest(self, msg) -> str:
        """Decode, check and learn one consumed transitions record (a confluent-kafka message):
        ``"learned"``, ``"duplicate"`` (a transition re-sent after a worker crash, learned once
        already) or ``"dead_lettered"`` (undecodable, against the contract or the model's shape,
        or failing in the learner: sent to transitions.dlq with the reason). Never raises for
        what the record holds."""
        self.offsets[msg.partition()] = msg.offset() + 1
        try:
            t = decode_transition(msg.value())
            self.learner.check(t)  # before anything remembers it: a bad record moves nothing
        except InvalidMessage as exc:
            self._dead_letter(msg, exc)
            return "dead_lettered"
        if t.decision_id in self._recent:
            self.m.learn_duplicates.inc()
            return "duplicate"
        hold = self.s.gate and held_out(t.decision_id, self.s.gate_holdout)
        try:
            stats = self.learner.learn_one(t, train=not hold)
            if hold:  # the gate judges on decisions the model was not trained on
                self.holdout.add(t.features, t.action_index, t.reward, t.propensity,
                                 t.allowed, t.user_id)
        except Exception as exc:  # a bug must cost one record, not the learner
            self.m.errors.labels("learn").inc()
            log.exception("learning %s[%s]@%s failed", msg.topic(), msg.partition(), msg.offset())
            self._dead_letter(msg, InvalidMessage("processing_error",
                                                  f"{type(exc).__name__}: {exc}"))
            return "dead_lettered"
        self._recent[t.decision_id] = None
        if len(self._recent) > 200_000:
            del self._recent[next(iter(self._recent))]
        self.m.learn_transitions.inc()
        if stats:
            self.m.learn_updates.inc()
            self.m.learn_loss.set(stats["loss"])
            self.m.learn_max_q.set(stats["max_q"])
        return "learned"

    @property
    def holds_lock(self) -> bool:
        """Whether this learner may publish: it holds the learner lock (always, without one).

        Losing the lock (the broker away longer than the lock timeout, or this process frozen
        that long) suspends publishing and checkpointing, not learning: the learner goes on
        and publishes again once it holds the lock again. If another learner became active
        meanwhile, that one's transactional id has fenced this one's, and the next publish
        stops it (:class:`Fenced`) before anything is written."""
        if self.lock is None:
            return True
        held = self.lock.poll()
        if held == self._suspended:  # it changed
            self._suspended = not held
            if held:
                log.info("holding the learner lock again: publishing resumes")
            else:
                log.warning("lost the learner lock (the broker away, or another learner is "
                            "active): not publishing or checkpointing until it is held again")
        return held

    def poll_once(self, timeout: float = 0.5) -> int:
        may_publish = self.holds_lock
        n = 0
        msgs = self.consumer.consume(500, timeout=timeout)
        self.polled_at = time.monotonic()
        for msg in msgs:
            if msg.error():
                if msg.error().code() != KafkaError._PARTITION_EOF:
                    log.warning("transitions: %s", msg.error())
                continue
            n += self.ingest(msg) == "learned"
        self.m.learn_replay.set(len(self.learner.replay))
        if time.monotonic() - self._lag_at > 5.0:
            self._report_lag()
        steps = self.learner.train_steps - self.steps_at_snapshot
        due = steps >= self.s.snapshot_every_updates or (
            steps > 0 and time.monotonic() - self.time_at_snapshot >= self.s.snapshot_interval_s)
        if due and may_publish:
            self.publish()
        return n

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        log.info("learner: model v%d, consuming %s", self.learner.version, self.s.topic_transitions)
        try:
            while self._running:
                self.poll_once()
            if self.learner.train_steps > self.steps_at_snapshot and self.holds_lock:
                self.publish()
        except Fenced as exc:
            log.error("stopping: %s. Nothing more is published or checkpointed by this "
                      "learner; the active one carries on from its own checkpoint", exc)
            return FENCED_EXIT
        finally:
            self.producer.flush(30)
            self.consumer.close()
            if self.lock is not None:
                self.lock.close()
        return 0


class LearnerHealth:
    """The learner's readiness checks (/readyz), registered on its Metrics before it starts.

    - ``checkpoint``: the checkpoint is loaded, or there was none and the learner started
      fresh (from the newest valid model); fails while that is still being read.
    - ``consumer``: the transitions consumer has partitions assigned and the loop polled it
      within ``max_poll_gap_s`` (STREAMAGENT_LEARNER_MAX_POLL_GAP_S): fails when the loop is
      stuck, or a publish (gate, checkpoint, send) takes longer than that.
    """

    def __init__(self, metrics: Metrics, topic: str, max_poll_gap_s: float):
        self.topic, self.max_gap = topic, max_poll_gap_s
        self.svc: LearnerService | None = None
        self.lock: LearnerLock | None = None
        metrics.add_ready_check("checkpoint", self.checkpoint)
        metrics.add_ready_check("consumer", self.consumer)

    def checkpoint(self) -> tuple[bool, str]:
        if self.svc is None:
            if self.lock is not None and not self.lock.held:
                return False, "standby: another learner holds the learner lock"
            return False, "loading the checkpoint and the newest model"
        return True, self.svc.started_from

    def consumer(self) -> tuple[bool, str]:
        svc = self.svc
        if svc is None:
            return False, "not started"
        n = len(svc.partitions)
        if not n:
            return False, f"no partition of {self.topic} assigned"
        if svc.polled_at is None:
            return False, f"{n} partitions of {self.topic} assigned, not polled yet"
        gap = time.monotonic() - svc.polled_at
        if gap > self.max_gap:
            return False, (f"last poll {gap:.0f} s ago, more than {self.max_gap:g} s: the loop "
                           f"is stuck or busy")
        return True, f"{n} partitions of {self.topic}, last poll {gap:.1f} s ago"


def run_learner(s: Settings) -> int:
    from streamagent.ops.topics import create_topics

    logging.basicConfig(level=s.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # serve first: /healthz answers and /readyz says what is missing while the learner starts
    metrics = Metrics(topics=(s.topic_transitions,))
    health = LearnerHealth(metrics, s.topic_transitions, s.learner_max_poll_gap_s)
    metrics.serve(s.learner_metrics_port, s.metrics_host,
                  setting="STREAMAGENT_LEARNER_METRICS_PORT")
    create_topics(s, log=log.info)
    running = [True]

    def stop(*_):
        running[0] = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    # one active learner: wait for the lock as a standby, then fence any earlier holder
    lock = LearnerLock(kafka_client(s), s.app_id, s.topic_model_updates, s.learner_lock_timeout_s)
    health.lock = lock
    try:
        if not lock.acquire(lambda: running[0]):
            lock.close()
            return 0
        svc = LearnerService(s, metrics, lock)
    except Fenced as exc:
        log.error("stopping: %s", exc)
        lock.close()
        return FENCED_EXIT
    except BaseException:
        lock.close()
        raise
    health.svc = svc
    if not running[0]:
        svc.stop()
    if s.gc_freeze:
        from streamagent.stream.runtime import freeze_gc

        freeze_gc()
    return svc.run()
