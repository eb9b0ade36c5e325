"""The decide agent's work: a batch of user events in, decisions and coupon actions out.

The Faust agent (stream/app.py) takes events in batches and hands each batch to
:meth:`DecideHandler.handle`, which

1. reads each touched user's state once, and each partition's budget and clock;
2. runs the engine's batched step (core/engine.py ``step_batch``: the same decisions as one
   event at a time, with one forward pass of the Q-network for the batch);
3. writes each touched user's state once (one table write and one changelog message per user
   per batch, not per event), and the budget, clock and user count once per partition;
4. hands decision-log records, coupon actions and dead letters to the producer without
   waiting for each delivery (stream/outputs.py, librdkafka off the event loop): the commit
   step waits for every one to be delivered before it commits the batch's offsets, so a
   crash replays the batch rather than losing its outputs;
5. sweeps a slice of each of the batch's partitions for expired users (two keys per record
   the batch brought the partition, at most ``sweep_keys``; a cursor going round the
   partition's keys): a user whose last
   event is more than the TTL behind the partition's event time is deleted (core/state.py
   ``expired``; the engine already treats such a state as absent, so when the sweep runs
   changes nothing but the table's size).

A null value keyed by a user id on user-events is an **erasure request**: the events before
it in the batch are handled first, then the user's state is deleted (a tombstone on the
changelog) and a tombstone for the user goes to decision-log (same key, so the same
partition), which tells the join agent to forget the user too (stream/join.py).

Tables come in as the typed adapters of core/tables.py over any mutable mapping (Faust tables
in the worker, dicts in tests), so the handler runs without a broker.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, ContextManager, Protocol, Sequence

from streamagent.core.constraints import budget_remaining, period_of
from streamagent.core.contracts import BudgetShare, dlq_key, encode
from streamagent.core.engine import DecisionEngine, StepResult
from streamagent.core.eventtime import OutOfBounds
from streamagent.core.pacing import target_of
from streamagent.core.state import expired
from streamagent.core.tables import (BudgetShares, StreamClocks, UserCounts, UserStates,
                                     sweep_budget)
from streamagent.core.pseudonym import Pseudonyms
from streamagent.errors import InvalidMessage
from streamagent.stream.ingress import envelope, pseudonymise, raw_key

log = logging.getLogger("streamagent.decide")

# send(topic, key, value): hand one record to the producer (awaiting the hand-over only);
# value None: a tombstone
Send = Callable[[str, "bytes | None", "bytes | None"], Awaitable[None]]


class Message(Protocol):
    """What the handler reads of a consumed record (a Faust message has all of it)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: float | None


@dataclass
class DecideTables:
    users: UserStates
    budgets: BudgetShares
    counts: UserCounts
    clocks: StreamClocks


@dataclass(frozen=True)
class DecideTopics:
    decision_log: str
    coupon_actions: str
    dlq: str  # the user-events dead-letter topic


def no_scope(partition: int) -> ContextManager:
    return contextlib.nullcontext()


class DecideHandler:
    def __init__(self, engine: DecisionEngine, tables: DecideTables, topics: DecideTopics,
                 send: Send, metrics, trigger_types: Sequence[str], worker: str = "",
                 flush_tables: Callable[[], Awaitable[None]] | None = None, *,
                 sweep_keys: int = 0, partition_of: Callable[[bytes], int] | None = None,
                 pseudonyms: Pseudonyms | None = None):
        """``flush_tables()`` hands the batch's table changes to the producer (the worker's
        tables are stream/faust_internals.py DirectTables); in-memory tables need none.
        ``sweep_keys``: users the expiry sweep looks at per partition and batch, at most
        (core/tables.py ``sweep_budget``; 0: none);
        ``partition_of(key)``: a user key's partition, for tables that cannot list one
        partition's keys themselves (core/tables.py ``scan``)."""
        self.engine, self.t, self.topics, self.send, self.m = engine, tables, topics, send, metrics
        self.sweep_keys, self.partition_of = sweep_keys, partition_of
        self.sweep_from: dict[int, bytes | None] = {}  # partition -> the sweep's cursor
        self.flush_tables = flush_tables
        self.triggers = frozenset(trigger_types)
        self.worker = worker
        self.ps = pseudonyms
        self.budget_by_part: dict[int, BudgetShare] = {}  # for the budget gauges
        self.users_by_part: dict[int, int] = {}

    async def handle(self, batch: Sequence[Message],
                     scope: Callable[[int], ContextManager] = no_scope) -> None:
        """``scope(partition)`` wraps the table writes of one partition (Faust needs to know
        which partition's changelog and store a write goes to; see stream/app.py)."""
        batch = pseudonymise(batch, self.ps)
        start = 0
        for i, msg in enumerate(batch):
            if msg.value is None and msg.key:  # an erasure: in order with the events around it
                if i > start:
                    await self._handle(batch[start:i], scope)
                await self._erase(msg, scope)
                start = i + 1
        if start < len(batch) or not batch:
            await self._handle(batch[start:], scope)

    async def _erase(self, msg: Message, scope: Callable[[int], ContextManager]) -> None:
        """Delete the user's state and tell the join (a decision-log tombstone). Idempotent:
        a replayed erasure deletes nothing more and sends the tombstone again."""
        with scope(msg.partition):
            had = self.t.users.delete(msg.key)
            if had:
                self._count_users(msg.partition, -1)
        if self.flush_tables is not None:
            await self.flush_tables()
        if had:
            self.m.users.set(sum(self.users_by_part.values()))
        self.m.erasures.labels("user-state").inc()
        await self.send(self.topics.decision_log, msg.key, None)  # failing: not acknowledged

    def _count_users(self, p: int, delta: int) -> None:
        """Move the partition's user count (the users gauge); inside the partition's scope."""
        if p not in self.users_by_part:
            self.users_by_part[p] = self.t.counts.get(p)
        self.users_by_part[p] = max(0, self.users_by_part[p] + delta)
        self.t.counts.put(p, self.users_by_part[p])

    def _sweep(self, p: int, clock, records: int) -> int:
        """Delete the expired users among the partition's next few users (core/tables.py
        ``sweep_budget``: ``records`` the batch brought it); inside the partition's scope.
        Returns how many went."""
        ttl = self.engine.p.state.ttl_ms
        n = sweep_budget(self.sweep_keys, records)
        if not n or not ttl or clock.stream_time is None:
            return 0
        seen = self.t.users.last_seen(p, self.sweep_from.get(p), n, self.partition_of)
        self.sweep_from[p] = seen[-1][0] if len(seen) >= n else None
        gone = [k for k, last_ts in seen if expired(last_ts, clock.stream_time, ttl)]
        for k in gone:
            self.t.users.delete(k)
        if gone:
            self._count_users(p, -len(gone))
            self.m.expired.labels("user-state").inc(len(gone))
        return len(gone)

    async def _handle(self, batch: Sequence[Message],
                      scope: Callable[[int], ContextManager]) -> None:
        t0 = time.perf_counter()
        m, t = self.m, self.t
        states: dict = {}
        keys_by_part: dict[int, list] = {}
        for msg in batch:
            keys_by_part.setdefault(msg.partition, []).append(msg.key)
        per_part = {p: len(keys) for p, keys in keys_by_part.items()}  # records per partition
        parts = sorted(per_part)
        for p in parts:
            # in the partition's scope, a read looks in that partition's store only (outside
            # it, Faust's RocksDB store asks every partition's store for a key it has not seen)
            with scope(p):
                for key in keys_by_part[p]:
                    if key and key not in states:
                        states[key] = t.users.get(key)
        budgets = {p: t.budgets.get(p) for p in parts}
        clocks = {p: t.clocks.get(p) for p in parts}
        before = dict(budgets), dict(clocks), {k: v is None for k, v in states.items()}
        items = [(msg.value, msg.key, msg.partition, msg.offset) for msg in batch]
        results = self.engine.step_batch(items, states, budgets, clocks,
                                         now_ms=int(time.time() * 1000))
        touched: dict[int, set] = {}
        new_users: dict[int, int] = {}
        swept = 0
        outputs: list[tuple[str, bytes | None, bytes]] = []
        now = time.time()
        for msg, r in zip(batch, results):
            if isinstance(r, Exception):
                outputs.append(self._dead_letter(msg, r))
                continue
            if r.replayed:
                m.replayed.inc()
                if r.decision is None and r.event.type in self.triggers:
                    m.replay_missing.inc()
            else:
                m.events.labels(r.event.type).inc()
                touched.setdefault(msg.partition, set()).add(msg.key)
                if r.expired:
                    m.expired.labels("user-state").inc()
            d = r.decision
            if d is None:
                continue
            if r.coupon_action is not None:  # for the shop's delivery: the raw user id
                doc = r.coupon_action.to_doc()
                if self.ps is not None:
                    doc["user_id"] = raw_key(msg).decode()
                outputs.append((self.topics.coupon_actions, raw_key(msg), encode(doc)))
            raw = r.decision_raw if r.decision_raw is not None else encode(d.to_doc())
            outputs.append((self.topics.decision_log, msg.key, raw))
            if not r.replayed:
                m.decisions.labels(d.action, "true" if d.explored else "false").inc()
                for b in d.blocked_by:
                    m.blocks.labels(b).inc()
                if msg.timestamp:
                    m.e2e.observe(max(0.0, now - msg.timestamp))
        # state: each touched user once; budget, clock and user count once per partition
        for p in parts:
            with scope(p):
                for key in touched.get(p, ()):
                    t.users.put(key, states[key])
                    if before[2].get(key):
                        new_users[p] = new_users.get(p, 0) + 1
                if budgets[p] != before[0][p]:
                    t.budgets.put(p, budgets[p])
                if clocks[p] != before[1][p]:
                    t.clocks.put(p, clocks[p])
                if new_users.get(p):
                    self._count_users(p, new_users[p])
                swept += self._sweep(p, clocks[p], per_part[p])
            self.budget_by_part[p] = budgets[p]
        if self.flush_tables is not None:
            await self.flush_tables()
        if new_users or swept:
            m.users.set(sum(self.users_by_part.values()))
        self._budget_gauges(clocks)
        for topic, key, value in outputs:
            try:
                await self.send(topic, key, value)
            except Exception:
                m.errors.labels("send").inc()
                if topic != self.topics.dlq:
                    raise  # the batch is not acknowledged: it is read again after a restart
                # the dead-letter topic failing must not stop the stream
                log.exception("could not dead-letter a record of %s", batch[0].topic)
        if batch:
            m.processing.observe((time.perf_counter() - t0) / len(batch))
            m.batch_size.observe(len(batch))

    def _dead_letter(self, msg: Message, exc: Exception) -> tuple[str, bytes | None, bytes]:
        if isinstance(exc, (OutOfBounds, InvalidMessage)):
            reason, detail = exc.reason, exc.detail
        else:  # a bug must cost one message, not the worker
            self.m.errors.labels("decide").inc()
            log.error("processing %s[%s]@%s failed", msg.topic, msg.partition, msg.offset,
                      exc_info=exc)
            reason, detail = "processing_error", f"{type(exc).__name__}: {exc}"
        self.m.dlq.labels(msg.topic, reason).inc()
        env = envelope(msg, self.ps, reason=reason, detail=detail,
                       failed_at_ms=int(time.time() * 1000), worker=self.worker)
        return self.topics.dlq, dlq_key(msg.key), encode(env)

    def _budget_gauges(self, clocks: dict) -> None:
        p = self.engine.p
        ts = max((c.stream_time for c in clocks.values() if c.stream_time is not None),
                 default=None)
        if ts is None:
            return
        period = period_of(ts, p.budget_period_ms)
        shares = self.budget_by_part.values()
        self.m.budget_spent.set(sum(b.spent for b in shares if b.period == period))
        self.m.budget_remaining.set(sum(budget_remaining(b, period, p.budget_share)
                                        for b in shares))
        self.m.budget_progress.set((ts % p.budget_period_ms) / p.budget_period_ms)
        if p.pacing is None:
            return
        for part, clock in clocks.items():  # the batch's partitions, each on its own clock
            if clock.stream_time is None:
                continue
            b, label = self.budget_by_part[part], str(part)
            own = period_of(clock.stream_time, p.budget_period_ms)
            self.m.shadow_price.labels(label).set(b.shadow_price)
            self.m.pacing_spent.labels(label).set(b.spent if b.period == own else 0.0)
            self.m.pacing_target.labels(label).set(
                p.budget_share * target_of(b, clock.stream_time, p.budget_period_ms, p.pacing))


__all__ = ["DecideHandler", "DecideTables", "DecideTopics", "StepResult"]
