"""Faust wiring: topics, tables and the decide and join agents, both in one worker or one of
them (WORKER_ROLE). The logic lives in streamagent.core.

Keying contract: producers key user-events by user_id (UTF-8). Faust then finds each user's
events, state-table entry and decisions on the same partition with no repartition hop. A
message with no key or a key other than its user_id is dead-lettered (reason key_mismatch).
"""
from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import faust

from streamagent.config import Settings
from streamagent.core.catalog import load_catalog
from streamagent.core.engine import DecisionEngine
from streamagent.core.qnet import ModelSnapshot
from streamagent.core.tables import BudgetShares, StreamClocks, UserCounts, UserStates
from streamagent.metrics import Metrics
from streamagent.ops.kafka import KafkaClientConfig, kafka_client, make_producer
from streamagent.params import (engine_params, join_group_id, join_params, load_model,
                                worker_metrics)
from streamagent.stream.decide import DecideHandler, DecideTables, DecideTopics
from streamagent.stream.join import JoinHandler, JoinTopics, key_partition
from streamagent.stream.outputs import OutputProducer
from streamagent.stream.ingress import OffsetWatch, pseudonyms
from streamagent.stream.faust_internals import (DeliveryGuard, DirectTable, acting_as,
                                                install_commit_guard,
                                                install_recovery_keeps_buffers,
                                                install_revoke_watchdog, read_offsets,
                                                consumption_path, set_fetch_max_wait)

log = logging.getLogger("streamagent.decide")

# RocksDB memory of each table's database per partition (a worker holding 4 partitions has 12).
# Faust's defaults are 64 MiB write buffers (up to 3 per database) and a 2 GiB block cache per
# database: in the soak (docs/RELIABILITY.md, "Soak") the worker's RSS grew past 2 GB on tables
# of a few tens of MB. The shipped settings (ROCKSDB_* in config.py, these values) bound it to
# about 12 x (2 x 2 + 4) MiB; 16 MiB x 3 and 32 MiB grew a drain's RSS by 39%.
ROCKSDB_OPTIONS = {"write_buffer_size": 2 << 20, "max_write_buffer_number": 2,
                   "block_cache_size": 4 << 20}


def table_options(store: str, s: Settings | None = None) -> dict | None:
    """Store options of a table (a fresh dict each: Faust's store pops keys from it)."""
    if not store.startswith("rocksdb"):
        return None
    if s is None:
        return dict(ROCKSDB_OPTIONS)
    return {"write_buffer_size": int(s.rocksdb_write_buffer_mb * (1 << 20)),
            "max_write_buffer_number": s.rocksdb_write_buffers,
            "block_cache_size": int(s.rocksdb_block_cache_mb * (1 << 20))}


def changelog_configs(s: Settings) -> dict:
    """Topic configs of the tables' changelogs (compacted by Faust): segments small enough
    for the log cleaner to keep up (it never compacts the active segment)."""
    return {"segment.bytes": str(s.changelog_segment_mb << 20)}


def faust_broker_url(bootstrap: str) -> str:
    return ";".join(f"kafka://{h.strip()}" for h in bootstrap.split(",") if h.strip())


def faust_broker(kafka: KafkaClientConfig) -> dict:
    """Settings -> Faust/aiokafka: ``faust.App``'s ``broker`` and ``broker_credentials``.

    Faust hands the credentials to every aiokafka client it builds (the worker's consumer,
    its producers, the admin requests that declare topics) as security_protocol,
    sasl_mechanism (PLAIN, SCRAM-SHA-256/512: aiokafka implements SCRAM itself),
    sasl_plain_username/password and an ``ssl.SSLContext`` (CA, client certificate for mTLS).
    The STREAMAGENT_KAFKA_CONFIG passthrough does not reach aiokafka, except
    ssl.endpoint.identification.algorithm=none (no hostname check).
    """
    ctx = kafka.ssl_context()
    creds = None
    if kafka.sasl:
        creds = faust.SASLCredentials(username=kafka.sasl_username, password=kafka.sasl_password,
                                      mechanism=kafka.sasl_mechanism, ssl_context=ctx)
    elif ctx is not None:
        creds = faust.SSLCredentials(ctx)
    return {"broker": faust_broker_url(kafka.bootstrap), "broker_credentials": creds}


@dataclass
class Wiring:
    app: faust.App
    engine: DecisionEngine
    metrics: Metrics
    settings: Settings


def group_id(s: Settings) -> str:
    """The worker's Faust app id (its consumer group): a join-only worker has its own group, as
    it reads other topics than the deciders (Faust assigns every subscribed topic's partitions
    to every member of a group, so the roles cannot share one)."""
    return join_group_id(s.app_id) if s.worker_role == "join" else s.app_id


def join_changelog_topic(s: Settings) -> str:
    """The join-state table's changelog, the same in every role: the name Faust gives it in
    an all-in-one worker (APP_ID-join-state-changelog), so a join worker restores the state an
    all-in-one worker wrote."""
    return f"{s.app_id}-join-state-changelog"


def role_inputs(s: Settings) -> tuple[str, ...]:
    """The input topics of the worker's role."""
    decide = (s.topic_user_events,)
    join = (s.topic_decision_log, s.topic_conversions)
    return {"all": decide + join, "decide": decide, "join": join}[s.worker_role]


def _table_with_changelog(app: faust.App, name: str, changelog: str, **kwargs):
    """app.Table(name, ...) whose changelog topic is named ``changelog`` (Faust names it
    after the app id); everything else about the topic is Faust's default."""
    table = app.conf.Table(app, name=name, beacon=app.tables.beacon, **kwargs)
    table._changelog_topic_name = lambda: changelog  # read once, when the table is added
    return app.tables.add(table)


@dataclass
class _Wires:
    """What the agents are wired to, the same for both."""

    app: faust.App
    s: Settings
    m: Metrics
    n_parts: int
    take: Callable  # faust_internals.consumption_path
    send: Callable  # (topic, key, value) -> awaitable: hand a record over (create_app)
    flush_tables: Callable
    worker_name: str
    watch: OffsetWatch
    pseudonyms: object  # ingress.Pseudonyms or None

    def topic(self, *names: str):
        return self.app.topic(*names, partitions=self.n_parts, key_type=bytes, value_type=bytes,
                              key_serializer="raw", value_serializer="raw")

    async def feed(self, stream, handler, max_n: int, wait_s: float) -> None:
        """Hand the stream's batches to ``handler``, each record acting as its own event
        (faust_internals.acting_as: the tables' changelogs and offsets follow it)."""
        async for events in self.take(stream, max_n, wait_s):
            msgs = [e.message for e in events]
            self.watch.see(msgs)
            by_part = {m.partition: e for m, e in zip(msgs, events)}
            await handler.handle(msgs, scope=lambda p: acting_as(by_part[p]))


def _decide_agent(w: _Wires, engine: DecisionEngine, users_t, budgets_t, partition_of):
    """The decide agent on user-events, and its state cache."""
    s, app = w.s, w.app
    user_states = UserStates(users_t, s.state_cache_users)

    # a rebalance's recovery writes the store from the changelog, behind the cache's back
    @app.on_partitions_revoked.connect
    async def _forget_revoked(sender, revoked, **kwargs) -> None:
        user_states.clear()

    @app.on_partitions_assigned.connect
    async def _forget_assigned(sender, assigned, **kwargs) -> None:
        user_states.clear()
    tables = DecideTables(user_states, BudgetShares(budgets_t), UserCounts(budgets_t),
                          StreamClocks(budgets_t))
    handler = DecideHandler(
        engine, tables,
        DecideTopics(s.topic_decision_log, s.topic_coupon_actions, s.dlq(s.topic_user_events)),
        w.send, w.m, s.trigger_types, w.worker_name, w.flush_tables,
        sweep_keys=s.state_sweep_keys, partition_of=partition_of, pseudonyms=w.pseudonyms)
    outputs = [w.topic(t) for t in (s.topic_coupon_actions, s.topic_decision_log,
                                    s.dlq(s.topic_user_events))]

    # concurrency=1: faust-streaming #606 — with more, offsets are committed past messages
    # still in flight, and a crash loses them. take_batches (and Faust's take_events)
    # acknowledges a batch after the handler returns (or raises: then the delivery guard
    # holds back every commit).
    @app.agent(w.topic(s.topic_user_events), concurrency=1)
    async def decide(stream):
        for t in outputs:
            await t.maybe_declare()  # outputs go straight to the producer: make sure they exist
        await w.feed(stream, handler, s.decide_batch_max, s.decide_batch_wait_ms / 1000.0)
    return decide


def _join_agent(w: _Wires, catalog, join_t):
    """The reward join on decision-log and conversions, and its handler."""
    s = w.s
    handler = JoinHandler(
        catalog, join_params(s), join_t,
        JoinTopics(s.topic_decision_log, s.topic_conversions, s.topic_rewards,
                   s.topic_transitions, s.dlq), w.send, w.m, w.n_parts, w.worker_name,
        w.flush_tables, sweep_keys=s.state_sweep_keys, pseudonyms=w.pseudonyms)
    outputs = [w.topic(t) for t in (s.topic_rewards, s.topic_transitions,
                                    s.dlq(s.topic_decision_log), s.dlq(s.topic_conversions))]

    @w.app.agent(w.topic(s.topic_decision_log, s.topic_conversions), concurrency=1)
    async def join(stream):
        for t in outputs:
            await t.maybe_declare()
        # rewards are not urgent: a longer wait makes fewer, bigger batches, which leaves a
        # shared event loop to the decide agent (measured: p50 event->decision 961 ms at
        # 600 events/s with a 5 ms join wait, 153 ms with 50 ms)
        await w.feed(stream, handler, s.join_batch_max, s.join_batch_wait_ms / 1000.0)
    return join, handler


def create_app(settings: Settings | None = None, *, metrics: Metrics | None = None,
               n_partitions: int | None = None,
               snapshot: ModelSnapshot | None = None) -> Wiring:
    s = settings or Settings()
    catalog = load_catalog(s.catalog_path)
    n_parts = n_partitions or s.partitions
    engine = DecisionEngine(catalog, engine_params(s, n_parts),
                            load_model(s, catalog, snapshot))
    m = metrics or worker_metrics(s, catalog)
    m.model_version.set(engine.model.version)
    m.model_age.set_function(lambda: max(0.0, time.time() - engine.model.snapshot.created_at))
    m.epsilon.set_function(engine.epsilon)
    worker_name = f"{socket.gethostname()}:{os.getpid()}"
    s.tables_dir.mkdir(parents=True, exist_ok=True)  # Faust makes only the last level

    set_fetch_max_wait(s.consumer_fetch_max_wait_ms)
    take = consumption_path(s.stream_take)  # lean: Faust's fetch loop batched (faust_internals)
    install_commit_guard()
    install_recovery_keeps_buffers()  # no record skipped after a restart's recovery (issue 14)
    deciding, joining = s.worker_role in ("all", "decide"), s.worker_role in ("all", "join")
    app = faust.App(
        group_id(s),
        **faust_broker(kafka_client(s)),
        store=s.table_store,
        datadir=str(s.tables_dir),
        topic_partitions=n_parts,
        topic_replication_factor=s.replication_factor,
        web_enabled=s.worker_web_enabled,
        web_port=s.worker_web_port,
        web_bind=s.metrics_host,  # loopback by default, as /metrics (Faust's own: 0.0.0.0)
        consumer_auto_offset_reset="earliest",
        # outputs go out as soon as they are sent, not batched until the next commit
        stream_publish_on_commit=False,
        producer_linger_ms=s.producer_linger_ms,
        broker_commit_every=10_000,
        broker_commit_interval=s.commit_interval_s,
        table_cleanup_interval=3600.0,
        table_standby_replicas=s.standby_replicas,  # warm copies on the other workers
        # keep the agents fed: bigger polls and stream buffers than Faust's defaults
        broker_max_poll_records=s.consumer_max_poll_records,
        stream_buffer_maxsize=s.stream_buffer_maxsize,
    )

    # before anything builds app.consumer, which takes the revocation callback (faust_internals)
    install_revoke_watchdog(app, s.revoke_timeout_s)

    # key_type/value_type bytes make Faust use the raw codec for the store and changelog
    users = budgets = join_state = None
    if deciding:
        users = app.Table("user-state", default=None, partitions=n_parts, key_type=bytes,
                          value_type=bytes, options=table_options(s.table_store, s),
                          extra_topic_configs=changelog_configs(s))
        budgets = app.Table("budget", default=None, partitions=n_parts, key_type=bytes,
                            value_type=bytes, options=table_options(s.table_store, s),
                            extra_topic_configs=changelog_configs(s))
    if joining:
        # pending decisions and conversions per user, watermarks and the due-time index
        join_state = _table_with_changelog(
            app, "join-state", join_changelog_topic(s), default=None, partitions=n_parts,
            key_type=str, value_type=bytes, options=table_options(s.table_store, s),
            extra_topic_configs=changelog_configs(s))

    # a record sent but not delivered stops the commits and the worker (faust_internals.py)
    guard = app.streamagent_delivery_guard = DeliveryGuard(app)
    # outputs and changelog records go through librdkafka, off the event loop (outputs.py);
    # the commit step waits for every one of them to end first
    outputs = app.streamagent_outputs = OutputProducer(make_producer(
        kafka_client(s), **{"linger.ms": s.producer_linger_ms,
                            "message.timeout.ms": int(app.conf.producer_request_timeout * 1000),
                            "message.max.bytes": app.conf.producer_max_request_size}))

    @app.on_before_shutdown.connect
    async def _deliver_outputs(app, **kwargs) -> None:
        await outputs.close(timeout_s=s.exit_deadline_s / 2)
    dlq_topics = frozenset(s.dlq(t) for t in (s.topic_user_events, s.topic_conversions,
                                              s.topic_decision_log))

    def changelog_failed(exc: BaseException) -> None:
        m.errors.labels("changelog").inc()
        log.error("a changelog record could not be sent: %r", exc)
        guard.fail(exc)

    # read and written through their stores, changelogs sent per batch (faust_internals)
    users_t, budgets_t, join_t = (DirectTable(t, app, changelog_failed, outputs)
                                  if t is not None else None
                                  for t in (users, budgets, join_state))
    direct_tables = [t for t in (users_t, budgets_t, join_t) if t is not None]

    async def flush_tables() -> None:
        for t in direct_tables:
            await t.flush()

    async def send(topic: str, key: bytes | None, value: bytes) -> None:
        # hand over without waiting for delivery; the commit step waits for every output
        # to end, and the guard refuses the commit if any of them failed
        dead_letter = topic in dlq_topics
        if guard.failure is not None and not dead_letter:
            # the worker is stopping: apply nothing more whose outputs cannot go out
            raise guard.failure
        try:
            fut = await outputs.send(topic, key, value)
        except Exception as exc:  # counted by the handler, which stops the batch
            if not dead_letter:
                guard.fail(exc)
            raise
        if dead_letter:  # a dead-letter topic failing must not stop the stream
            fut.add_done_callback(_count_failed_dead_letter)
        else:
            guard.watch(fut, _count_failed_send)

    def _count_failed_send(exc: BaseException) -> None:
        m.errors.labels("send").inc()
        log.error("send failed: %r", exc)

    def _count_failed_dead_letter(fut) -> None:
        if not fut.cancelled() and fut.exception() is not None:
            m.errors.labels("dlq").inc()
            log.error("a dead letter could not be delivered: %r", fut.exception())

    partition_of = lambda key: key_partition(key, n_parts)  # noqa: E731
    w = _Wires(app, s, m, n_parts, take, send, flush_tables, worker_name,
               # records of a partition never handed to the agents (counted and logged)
               OffsetWatch(m.skipped, lambda: app.consumer_generation_id),
               pseudonyms(s, partition_of))  # None unless STREAMAGENT_PSEUDONYM_KEY[_FILE]
    decide = join = join_handler = None
    if deciding:
        decide = _decide_agent(w, engine, users_t, budgets_t, partition_of)
    if joining:
        join, join_handler = _join_agent(w, catalog, join_t)

    inputs = frozenset(role_inputs(s))

    @app.timer(interval=5.0)
    async def report_lag():
        """Messages behind the end, per input topic, from what the consumer has fetched.
        Only the input topics: the assignment also holds the tables' changelog partitions,
        read only while recovering (their "lag" is no backlog, and they are no label of
        the gauge's: docs/METRICS.md)."""
        try:
            consumer = app.consumer
            lag: dict[str, int] = {}
            offsets = read_offsets(consumer)
            for tp in consumer.assignment():
                if tp.topic not in inputs:
                    continue
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
    app.streamagent_send = send
    app.streamagent_join = join
    app.streamagent_joiner = join_handler.joiner() if join_handler is not None else None
    app.streamagent_users = users
    return Wiring(app, engine, m, s)
