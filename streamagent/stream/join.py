"""The join agent's work: decision-log and conversions in, rewards and transitions out.

The Faust agent (stream/app.py) takes records of both inputs in batches and hands each batch
to :meth:`JoinHandler.handle`. Each input is applied all-or-nothing: the Joiner (core/join.py)
works on a staging of the join-state table (core/tables.py ``Staged``); if it fails half-way
(a poison record), its staging is dropped, the record is dead-lettered, and no other user's
state or output is touched. Successful inputs are applied to the batch's staging, which reaches
the table once per key at the end of the batch; the outputs are then handed to the producer
without waiting for each delivery (the commit step waits for them all to be delivered before
it commits offsets: stream/outputs.py).

The outbox (core/outbox.py) remembers what each input produced, so an input replayed after a
crash re-sends exactly its outputs instead of being joined twice.

A null value on decision-log (keyed by user id: the decide agent's erasure tombstone) erases
the user's join record, pending decisions and orders included, and produces nothing. After
each batch a slice of every partition it touched is swept for expired records (core/join.py
``Joiner.sweep``), as the decide agent sweeps user states.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Awaitable, Callable, ContextManager, MutableMapping, Sequence

from aiokafka.partitioner import murmur2
from orjson import Fragment

from streamagent.core.catalog import Catalog
from streamagent.core.contracts import decode_conversion, decode_decision, dlq_key, encode
from streamagent.core.pseudonym import Pseudonyms
from streamagent.stream.ingress import envelope, pseudonymise
from streamagent.core.eventtime import OutOfBounds
from streamagent.core.join import Joiner, JoinParams
from streamagent.core.outbox import Outbox
from streamagent.core.tables import DueCache, JoinStore, ReadCache, Staged, sweep_budget
from streamagent.errors import InvalidMessage
from streamagent.stream.decide import Message, Send, no_scope

log = logging.getLogger("streamagent.join")


@dataclass(frozen=True)
class JoinTopics:
    decision_log: str
    conversions: str
    rewards: str
    transitions: str
    dlq: Callable[[str], str]  # the dead-letter topic of an input topic


def key_partition(key: bytes, n_parts: int) -> int:
    """The partition Faust and the Java client put a key on (murmur2)."""
    return (murmur2(key) & 0x7FFFFFFF) % n_parts


def check_partition(msg: Message, n_parts: int) -> None:
    """A conversion must sit on the partition the Java client's murmur2 gives its key: that
    is where the user's decisions are (Faust partitions with murmur2). librdkafka's default
    partitioner (CRC32) puts keys elsewhere, and the join would silently misattribute."""
    want = key_partition(msg.key, n_parts)
    if msg.partition != want:
        raise InvalidMessage("wrong_partition",
                             f"key {msg.key[:64]!r} is on partition {msg.partition}, murmur2 says "
                             f"{want}; produce with the Java-compatible partitioner "
                             f"(librdkafka/confluent-kafka: partitioner=murmur2_random)")


def erasure_user(key: bytes) -> str:
    """The user an erasure tombstone names; a key that is no UTF-8 names no user."""
    try:
        return key.decode()
    except UnicodeDecodeError:
        raise InvalidMessage("key_mismatch", f"erasure key {key[:64]!r} is not UTF-8: it "
                             f"names no user") from None


class JoinHandler:
    def __init__(self, catalog: Catalog, params: JoinParams, table: MutableMapping[str, bytes],
                 topics: JoinTopics, send: Send, metrics, n_partitions: int, worker: str = "",
                 flush_tables: Callable[[], Awaitable[None]] | None = None, *,
                 sweep_keys: int = 0, pseudonyms: Pseudonyms | None = None):
        """``sweep_keys``: user records the expiry sweep looks at per partition and batch, at
        most (core/tables.py ``sweep_budget``).
        ``pseudonyms``: replace the user ids of conversions at ingress (decision-log records
        come from the deciders, already pseudonymous; core/pseudonym.py)."""
        self.ps = pseudonyms
        self.flush_tables = flush_tables  # as in DecideHandler
        self.catalog, self.p, self.table, self.topics = catalog, params, table, topics
        self.send, self.m, self.n_parts, self.worker = send, metrics, n_partitions, worker
        self.pending_by_part: dict[int, int] = {}
        self.sweep_keys = sweep_keys
        self.sweep_from: dict[int, str | None] = {}  # partition -> the sweep's cursor
        self.due_cache = DueCache()
        # the batch's outcomes and transitions (done or not), counted once at its end
        self._outcomes: Counter = Counter()
        self._transitions: Counter = Counter()

    def joiner(self, store: MutableMapping[str, bytes] | None = None) -> Joiner:
        return Joiner(self.catalog, self.p, JoinStore(self.table if store is None else store,
                                                       self.due_cache))

    async def handle(self, batch: Sequence[Message],
                     scope: Callable[[int], ContextManager] = no_scope) -> None:
        """``scope(partition)`` wraps the table writes of one partition (see stream/app.py)."""
        m, tp = self.m, self.topics
        batch = pseudonymise(batch, self.ps, frozenset((tp.conversions,)))
        # reads remembered for the batch (each input reads its partition's watermarks, clocks
        # and counters), each input's inside its partition's scope: Faust's RocksDB store then
        # looks in that partition's database only, not in every one it holds
        batch_stage = Staged(ReadCache(self.table))
        owner: dict[str, int] = {}  # staged key -> the partition whose input wrote it
        outputs: list[tuple[str, bytes | None, bytes]] = []
        for msg in batch:
            with scope(msg.partition):
                self._one(msg, batch_stage, owner, outputs)
        per_part = Counter(msg.partition for msg in batch)
        for p in sorted(set(owner.values())):
            with scope(p):
                batch_stage.apply([k for k, q in owner.items() if q == p])
                self._sweep(p, per_part[p])
            self.pending_by_part[p] = self.joiner().pending(p)
        if self.flush_tables is not None:
            await self.flush_tables()
        m.pending.set(sum(self.pending_by_part.values()))
        self._count_batch()
        for topic, key, value in outputs:
            try:
                await self.send(topic, key, value)
            except Exception:
                m.errors.labels("send").inc()
                if topic not in (tp.dlq(tp.decision_log), tp.dlq(tp.conversions)):
                    raise  # not acknowledged: the batch is read again after a restart
                log.exception("could not dead-letter a join input")

    def _one(self, msg: Message, batch_stage: Staged, owner: dict[str, int],
             outputs: list[tuple[str, bytes | None, bytes]]) -> None:
        """Join one input on a staging of the batch's (kept only if it succeeds)."""
        m, tp = self.m, self.topics
        stage = Staged(batch_stage)
        outbox = Outbox(stage)
        if outbox.is_replay(msg.topic, msg.partition, msg.offset):
            # processed before a crash: re-send exactly what it produced then
            m.join_events.labels("replayed_input").inc()
            for name, key, value in outbox.replayed_outputs(msg.topic, msg.partition,
                                                            msg.offset):
                topic = tp.rewards if name == "rewards" else tp.transitions
                outputs.append((topic, key.encode(), encode(value)))
            return
        joiner = Joiner(self.catalog, self.p, JoinStore(stage, self.due_cache))
        now_ms = int(time.time() * 1000)
        erasure = msg.topic == tp.decision_log and msg.value is None and bool(msg.key)
        try:
            if erasure:
                out = joiner.erase(msg.partition, erasure_user(msg.key))
            elif msg.topic == tp.decision_log:
                out = joiner.on_decision(msg.partition, decode_decision(msg.value, msg.key),
                                         now_ms=now_ms)
            else:
                conv = decode_conversion(msg.value, msg.key)
                check_partition(msg, self.n_parts)
                out = joiner.on_conversion(msg.partition, conv, now_ms=now_ms)
        except OutOfBounds as exc:
            # the partition clock has seen it (that is how a real jump is followed): the
            # clock is all the joiner wrote before refusing the record
            self._keep(stage, msg.partition, owner)
            outputs.append(self._dead_letter(msg, exc.reason, exc.detail))
            return
        except InvalidMessage as exc:
            outputs.append(self._dead_letter(msg, exc.reason, exc.detail))
            return
        except Exception as exc:  # a poison record: its staging is dropped, nothing moved
            m.errors.labels("join").inc()
            log.exception("joining %s[%s]@%s failed", msg.topic, msg.partition, msg.offset)
            outputs.append(self._dead_letter(msg, "processing_error",
                                             f"{type(exc).__name__}: {exc}"))
            return
        # each output encoded once: the outbox keeps the same bytes (as a fragment of its
        # JSON) that go to the topic
        rewards = [(r, encode(r.to_doc())) for r in out.rewards]
        transitions = [(t, encode(t.to_doc())) for t in out.transitions]
        outbox.record(msg.topic, msg.partition, msg.offset,
                      [("rewards", r.user_id, Fragment(raw)) for r, raw in rewards]
                      + [("transitions", t.user_id, Fragment(raw)) for t, raw in transitions])
        self._keep(stage, msg.partition, owner)
        if erasure:
            m.erasures.labels("join-state").inc()
        for r, raw in rewards:
            outputs.append((tp.rewards, r.user_id.encode(), raw))
            m.rewards.observe(r.reward)
            m.reward_sum.inc(r.reward)
        for t, raw in transitions:
            outputs.append((tp.transitions, t.user_id.encode(), raw))
            self._transitions["true" if t.done else "false"] += 1
        self._outcomes.update(out.counts)
        for delay in out.delays_ms:
            m.attribution_delay.observe(delay / 1000.0)

    def _count_batch(self) -> None:
        """The batch's outcomes and transitions into their counters, once per label (a
        labelled child's lookup per input and outcome cost more than the count)."""
        for counts, metric in ((self._outcomes, self.m.join_events),
                               (self._transitions, self.m.transitions)):
            for label, n in counts.items():
                metric.labels(label).inc(n)
            counts.clear()

    def _sweep(self, p: int, records: int) -> int:
        """Delete expired records among the partition's next few users (core/tables.py
        ``sweep_budget``: ``records`` the batch brought it; inside the partition's scope);
        how many went."""
        n = sweep_budget(self.sweep_keys, records)
        if not n or not self.p.ttl_ms:
            return 0
        gone, self.sweep_from[p] = self.joiner().sweep(
            p, self.sweep_from.get(p), n,
            lambda user: key_partition(user.encode(), self.n_parts))
        if gone:
            self.m.expired.labels("join-state").inc(len(gone))
        return len(gone)

    @staticmethod
    def _keep(stage: Staged, partition: int, owner: dict[str, int]) -> None:
        for k in stage.changes:
            owner[k] = partition
        stage.apply()

    def _dead_letter(self, msg: Message, reason: str, detail: str):
        self.m.dlq.labels(msg.topic, reason).inc()
        env = envelope(msg, self.ps, reason=reason, detail=detail,
                       failed_at_ms=int(time.time() * 1000), worker=self.worker)
        return self.topics.dlq(msg.topic), dlq_key(msg.key), encode(env)
