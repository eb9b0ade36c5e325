"""Faust wiring: topics, tables and the decide agent. The logic lives in streamagent.core.

Keying contract: producers key user-events by user_id (UTF-8). Faust then finds each user's
events, state-table entry and decisions on the same partition with no repartition hop. A
message with no key or a key other than its user_id is dead-lettered (reason key_mismatch).
"""
from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass

import faust
from aiokafka.partitioner import murmur2

from streamagent.config import Settings
from streamagent.core.catalog import load_catalog
from streamagent.core.constraints import budget_remaining, period_of
from streamagent.core.contracts import (BudgetShare, decode_conversion, decode_decision,
                                        dlq_envelope, encode)
from streamagent.core.engine import DecisionEngine, Model, initial_model
from streamagent.core.join import Joiner
from streamagent.core.outbox import Outbox
from streamagent.core.qnet import ModelSnapshot
from streamagent.core.eventtime import OutOfBounds
from streamagent.core.tables import BudgetShares, JoinStore, StreamClocks, UserCounts, UserStates
from streamagent.errors import InvalidMessage
from streamagent.metrics import Metrics
from streamagent.params import engine_params, join_params
from streamagent.stream.faust_internals import read_offsets, set_fetch_max_wait

log = logging.getLogger("streamagent.decide")


def faust_broker_url(bootstrap: str) -> str:
    return ";".join(f"kafka://{h.strip()}" for h in bootstrap.split(",") if h.strip())


def _check_partition(msg, n_parts: int) -> None:
    """A conversion must sit on the partition the Java client's murmur2 gives its key: that
    is where the user's decisions are (Faust partitions with murmur2). librdkafka's default
    partitioner (CRC32) puts keys elsewhere, and the join would silently misattribute."""
    want = (murmur2(msg.key) & 0x7FFFFFFF) % n_parts
    if msg.partition != want:
        raise InvalidMessage("wrong_partition",
                             f"key {msg.key[:64]!r} is on partition {msg.partition}, murmur2 says "
                             f"{want}; produce with the Java-compatible partitioner "
                             f"(librdkafka/confluent-kafka: partitioner=murmur2_random)")


@dataclass
class Wiring:
    app: faust.App
    engine: DecisionEngine
    metrics: Metrics
    settings: Settings


def load_model(settings: Settings, catalog, snapshot: ModelSnapshot | None = None) -> Model:
    """The model to start with: a file if configured, else the newest published snapshot
    (passed in by the worker), else a fresh network from the seed (version 0)."""
    if settings.model_path:
        return Model(ModelSnapshot.load(settings.model_path))
    if snapshot is not None:
        return Model(snapshot)
    return initial_model(catalog, tuple(settings.hidden_sizes), settings.seed, settings.q_heads)


def create_app(settings: Settings | None = None, *, metrics: Metrics | None = None,
               n_partitions: int | None = None,
               snapshot: ModelSnapshot | None = None) -> Wiring:
    s = settings or Settings()
    catalog = load_catalog(s.catalog_path)
    n_parts = n_partitions or s.partitions
    engine = DecisionEngine(catalog, engine_params(s, n_parts),
                            load_model(s, catalog, snapshot))
    m = metrics or Metrics(topics=(s.topic_user_events, s.topic_conversions, s.topic_decision_log),
                           actions=catalog.actions)
    m.model_version.set(engine.model.version)
    m.model_age.set_function(lambda: max(0.0, time.time() - engine.model.snapshot.created_at))
    m.epsilon.set_function(engine.epsilon)
    params = engine.p
    budget_by_part: dict[int, BudgetShare] = {}
    users_by_part: dict[int, int] = {}
    pending_by_part: dict[int, int] = {}

    def update_budget_gauges(ts: int) -> None:
        period = period_of(ts, params.budget_period_ms)
        share = params.budget_share
        spent = sum(b.spent for b in budget_by_part.values() if b.period == period)
        m.budget_spent.set(spent)
        m.budget_remaining.set(sum(budget_remaining(b, period, share)
                                   for b in budget_by_part.values()))
        m.budget_progress.set((ts % params.budget_period_ms) / params.budget_period_ms)
    worker_name = f"{socket.gethostname()}:{os.getpid()}"
    s.tables_dir.mkdir(parents=True, exist_ok=True)  # Faust makes only the last level

    set_fetch_max_wait(s.consumer_fetch_max_wait_ms)
    app = faust.App(
        s.app_id,
        broker=faust_broker_url(s.kafka_bootstrap),
        store=s.table_store,
        datadir=str(s.tables_dir),
        topic_partitions=n_parts,
        topic_replication_factor=1,
        web_enabled=s.worker_web_enabled,
        web_port=s.worker_web_port,
        consumer_auto_offset_reset="earliest",
        # outputs go out as soon as they are sent, not batched until the next commit
        stream_publish_on_commit=False,
        producer_linger_ms=s.producer_linger_ms,
        broker_commit_every=10_000,
        broker_commit_interval=s.commit_interval_s,
        table_cleanup_interval=3600.0,
    )

    raw = dict(key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    user_events = app.topic(s.topic_user_events, partitions=n_parts, **raw)
    coupon_actions = app.topic(s.topic_coupon_actions, partitions=n_parts, **raw)
    decision_log = app.topic(s.topic_decision_log, partitions=n_parts, **raw)
    dlqs = {t: app.topic(s.dlq(t), partitions=n_parts, **raw)
            for t in (s.topic_user_events, s.topic_conversions, s.topic_decision_log)}
    join_in = app.topic(s.topic_decision_log, s.topic_conversions, partitions=n_parts, **raw)
    rewards = app.topic(s.topic_rewards, partitions=n_parts, **raw)
    transitions = app.topic(s.topic_transitions, partitions=n_parts, **raw)
    # key_type/value_type bytes make Faust use the raw codec for the store and changelog
    users = app.Table("user-state", default=None, partitions=n_parts, key_type=bytes,
                      value_type=bytes)
    budgets = app.Table("budget", default=None, partitions=n_parts, key_type=bytes,
                        value_type=bytes)
    # pending decisions and conversions per user, watermarks and the due-time index
    join_state = app.Table("join-state", default=None, partitions=n_parts, key_type=str,
                           value_type=bytes)
    user_states = UserStates(users)
    budget_shares, user_counts = BudgetShares(budgets), UserCounts(budgets)
    stream_clocks = StreamClocks(budgets)
    joiner = Joiner(catalog, join_params(s), JoinStore(join_state))
    outbox = Outbox(join_state)

    async def dead_letter(msg, reason: str, detail: str) -> None:
        m.dlq.labels(msg.topic, reason).inc()
        env = dlq_envelope(source_topic=msg.topic, partition=msg.partition, offset=msg.offset,
                           key=msg.key, value=msg.value, reason=reason, detail=detail,
                           failed_at_ms=int(time.time() * 1000), worker=worker_name)
        try:
            await dlqs[msg.topic].send(key=msg.key, value=encode(env))
        except Exception:  # the DLQ itself failing must not stop the stream either
            m.errors.labels("dlq").inc()
            log.exception("could not dead-letter %s[%s]@%s", msg.topic, msg.partition, msg.offset)

    # concurrency=1: faust-streaming #606 — with more, offsets are committed past messages
    # still in flight, and a crash loses them.
    @app.agent(user_events, concurrency=1)
    async def decide(stream):
        async for event in stream.events():
            msg = event.message
            t0 = time.perf_counter()
            key = msg.key
            try:
                prev = user_states.get(key) if key else None
                budget = budget_shares.get(msg.partition)
                clock = stream_clocks.get(msg.partition)
                r = engine.step(msg.value, key, prev, budget, msg.partition, msg.offset,
                                clock=clock, now_ms=int(time.time() * 1000))
            except OutOfBounds as exc:
                stream_clocks.put(msg.partition, exc.clock)  # seen: a real jump is followed
                await dead_letter(msg, exc.reason, exc.detail)
                continue
            except InvalidMessage as exc:
                await dead_letter(msg, exc.reason, exc.detail)
                continue
            except Exception as exc:  # a bug must cost one message, not the worker
                m.errors.labels("decide").inc()
                log.exception("processing %s[%s]@%s failed", msg.topic, msg.partition, msg.offset)
                await dead_letter(msg, "processing_error", f"{type(exc).__name__}: {exc}")
                continue
            p_ = msg.partition
            if p_ not in users_by_part:  # first event of a partition here: read its counters
                users_by_part[p_] = user_counts.get(p_)
            budget_by_part[p_] = r.budget
            if prev is None and not r.replayed:
                users_by_part[p_] += 1
                user_counts.put(p_, users_by_part[p_])
                m.users.set(sum(users_by_part.values()))
            update_budget_gauges(r.clock.stream_time or r.event.ts)
            if r.replayed:
                m.replayed.inc()
                if r.decision is None and r.event.type in s.trigger_types:
                    m.replay_missing.inc()
            else:
                m.events.labels(r.event.type).inc()
                user_states.put(key, r.state)
                if r.budget != budget:
                    budget_shares.put(p_, r.budget)
                stream_clocks.put(p_, r.clock)
            d = r.decision
            if d is not None:
                if r.coupon_action is not None:
                    await coupon_actions.send(key=key, value=encode(r.coupon_action.to_doc()))
                await decision_log.send(key=key, value=encode(d.to_doc()))
                if not r.replayed:
                    m.decisions.labels(d.action, "true" if d.explored else "false").inc()
                    for b in d.blocked_by:
                        m.blocks.labels(b).inc()
                    if msg.timestamp:
                        m.e2e.observe(max(0.0, time.time() - msg.timestamp))
            m.processing.observe(time.perf_counter() - t0)

    @app.agent(join_in, concurrency=1)
    async def join(stream):
        async for event in stream.events():
            msg = event.message
            if outbox.is_replay(msg.topic, msg.partition, msg.offset):
                # processed before a crash: re-send exactly what it produced then
                m.join_events.labels("replayed_input").inc()
                for topic_name, key, value in outbox.replayed_outputs(msg.topic, msg.partition,
                                                                      msg.offset):
                    out_topic = rewards if topic_name == "rewards" else transitions
                    await out_topic.send(key=key.encode(), value=encode(value))
                continue
            try:
                if msg.topic == s.topic_decision_log:
                    out = joiner.on_decision(msg.partition, decode_decision(msg.value, msg.key),
                                             now_ms=int(time.time() * 1000))
                else:
                    conv = decode_conversion(msg.value, msg.key)
                    _check_partition(msg, n_parts)
                    out = joiner.on_conversion(msg.partition, conv, now_ms=int(time.time() * 1000))
            except InvalidMessage as exc:
                await dead_letter(msg, exc.reason, exc.detail)
                continue
            except Exception as exc:
                m.errors.labels("join").inc()
                log.exception("joining %s[%s]@%s failed", msg.topic, msg.partition, msg.offset)
                await dead_letter(msg, "processing_error", f"{type(exc).__name__}: {exc}")
                continue
            outbox.record(msg.topic, msg.partition, msg.offset,
                          [("rewards", r.user_id, r.to_doc()) for r in out.rewards]
                          + [("transitions", t.user_id, t.to_doc()) for t in out.transitions])
            for r in out.rewards:
                await rewards.send(key=r.user_id.encode(), value=encode(r.to_doc()))
                m.rewards.observe(r.reward)
                m.reward_sum.inc(r.reward)
            for t in out.transitions:
                await transitions.send(key=t.user_id.encode(), value=encode(t.to_doc()))
                m.transitions.labels("true" if t.done else "false").inc()
            for outcome, n in out.counts.items():
                m.join_events.labels(outcome).inc(n)
            for delay in out.delays_ms:
                m.attribution_delay.observe(delay / 1000.0)
            pending_by_part[msg.partition] = joiner.pending(msg.partition)
            m.pending.set(sum(pending_by_part.values()))

    @app.timer(interval=5.0)
    async def report_lag():
        """Messages behind the end, per input topic, from what the consumer has fetched."""
        try:
            consumer = app.consumer
            lag: dict[str, int] = {}
            offsets = read_offsets(consumer)
            for tp in consumer.assignment():
                hw = consumer.highwater(tp)
                read = offsets.get(tp)
                if hw is None:
                    continue
                behind = hw - (read + 1 if read is not None else 0)
                lag[tp.topic] = lag.get(tp.topic, 0) + max(0, behind)
            for topic, n in lag.items():
                m.lag.labels(topic).set(n)
        except Exception:
            log.debug("lag report failed", exc_info=True)

    app.streamagent_decide = decide  # handles for tests
    app.streamagent_join = join
    app.streamagent_joiner = joiner
    app.streamagent_users = users
    return Wiring(app, engine, m, s)
