"""The reward join: decisions and conversions -> one reward per decision -> transitions.

All on event time. Each partition has a watermark: for each input topic, the largest ts seen
on that partition minus the allowed lateness; the partition's watermark is the smaller of the
two (a topic with nothing yet on the partition is left out). Taking the minimum means a
conversions consumer that lags behind the decision-log consumer (after a restart, say) holds
window closing back instead of turning its records into late ones.
Things happen when the watermark passes their time, never on arrival, so the result does not
depend on arrival order as long as nothing is later than the allowed lateness:

- a conversion is attributed when the watermark reaches its ts (by then every decision that
  could have caused it has arrived): to the decision its coupon code / decision_id names, else
  by the rule (default: the latest decision of the user with ts <= conversion ts <= deadline);
- a decision closes when the watermark passes its deadline (ts + attribution window): its
  reward is the sum of what its attributed conversions earned, or the default reward if none;
- its transition is emitted once the next state is known: the features of the user's next
  decision (s'), or, if the user makes no decision within the horizon, as terminal.

Per-user pending records (JoinRecord) live in a JoinStore over a key-value store (a Faust table
in production, a dict in tests), with a due-time index of users by the event time something is
due.

A user's record stays while something is pending, then as duplicate memory until it expires
(``ttl_ms`` of event time after the user's last decision or order, by the earlier of the
partition's two input clocks:
:meth:`Joiner.lapsed`; the handler's sweep deletes expired records, and one read before the
sweep got to it counts as absent). :meth:`Joiner.erase` removes a user's record at once (an
erasure request, a null value on decision-log).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from streamagent.core.catalog import Catalog
from streamagent.core.contracts import (Conversion, Decision, JoinRecord, PendingConversion,
                                        PendingDecision, Reward, Transition)
from streamagent.core.eventtime import OutOfBounds, TimeBounds, admit
from streamagent.core.features import N_FEATURES
from streamagent.core.state import expired
from streamagent.core.tables import JoinStore
from streamagent.errors import InvalidMessage
from streamagent.units import HOUR_MS

NEVER = 2**62
_OTHER = {"decisions": "conversions", "conversions": "decisions"}
BUCKET_MS = HOUR_MS  # granularity of the due-time index
ORDER_MEMORY = 64  # order and decision ids remembered per user for duplicate detection


@dataclass(frozen=True)
class JoinParams:
    """Built from Settings by streamagent.params.join_params (no defaults of its own)."""

    window_ms: int
    lateness_ms: int
    horizon_ms: int  # longest wait for a next decision before terminal
    reward: str  # profit | revenue | conversion
    margin: float
    default_reward: float
    attribution: str  # latest | code_only
    time_bounds: TimeBounds  # what an input's ts may be, against its input's clock on the partition
    # a record with nothing pending expires this long after its user's last decision or
    # order, by the partition's event time; 0: never
    ttl_ms: int


@dataclass
class JoinOutput:
    rewards: list[Reward] = field(default_factory=list)
    transitions: list[Transition] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    delays_ms: list[int] = field(default_factory=list)  # decision -> attributed conversion

    def count(self, what: str, n: int = 1) -> None:
        self.counts[what] = self.counts.get(what, 0) + n

    def extend(self, other: "JoinOutput") -> None:
        self.rewards += other.rewards
        self.transitions += other.transitions
        self.delays_ms += other.delays_ms
        for k, v in other.counts.items():
            self.count(k, v)


def _decision_id_of(conv: Conversion) -> str | None:
    if conv.decision_id:
        return conv.decision_id
    code = conv.coupon_code or ""
    return code[2:] if code.startswith("C-") else None


class Joiner:
    def __init__(self, catalog: Catalog, params: JoinParams, store: JoinStore):
        self.catalog, self.p, self.store = catalog, params, store

    # ---------------------------------------------------------------- store helpers
    def pending(self, partition: int) -> int:
        """Open decisions on the partition (kept as a counter beside the records)."""
        return self.store.pending(partition)

    def _add_pending(self, partition: int, n: int) -> None:
        if n:
            self.store.set_pending(partition, self.pending(partition) + n)

    def watermark(self, partition: int) -> int:
        wm = self.store.watermark(partition)
        return wm if wm is not None else -NEVER

    def _index(self, partition: int, user: str, due: int) -> None:
        if due >= NEVER:
            return
        bucket = due // BUCKET_MS
        self.store.add_due(partition, bucket, user, due, bucket * BUCKET_MS)

    def lapsed(self, partition: int, doc: dict) -> bool:
        """Whether a record (as its document) has expired: nothing pending, and its last
        decision or order more than the TTL behind the partition's event time."""
        return self._lapsed(doc, self.store.event_time(partition))

    def _lapsed(self, doc: dict, event_time: int | None) -> bool:
        return (not doc["decisions"] and not doc["conversions"]
                and expired(doc.get("last_ts", 0), event_time, self.p.ttl_ms))

    def _record(self, partition: int, user: str) -> JoinRecord:
        """The user's record; an empty one for a user not seen before or whose record has
        expired (whether the sweep has deleted it yet or not)."""
        rec = self.store.record(user)
        if (self.p.ttl_ms and not rec.decisions and not rec.conversions
                and expired(rec.last_ts, self.store.event_time(partition), self.p.ttl_ms)):
            return JoinRecord(user_id=user)
        return rec

    def erase(self, partition: int, user: str) -> JoinOutput:
        """Forget the user: the record goes, with whatever was pending (no reward, no
        transition); its open decisions leave the pending count. Entries of the due-time
        index that name the user are skipped when they come due."""
        out = JoinOutput()
        if self.store.has_record(user):
            rec = self.store.record(user)
            self._add_pending(partition, -sum(1 for d in rec.decisions if not d.closed))
            self.store.delete_record(user)
        return out

    def sweep(self, partition: int, after: str | None, limit: int,
              partition_of=None) -> tuple[list[str], str | None]:
        """Delete the expired records among the next ``limit`` users of the partition after
        ``after``: (users deleted, where the next sweep starts: None = from the first again)."""
        docs = self.store.records(partition, after, limit, partition_of)
        now = self.store.event_time(partition)  # once for the slice, not per record
        gone = [user for user, doc in docs if self._lapsed(doc, now)]
        for user in gone:
            self.store.delete_record(user)
        return gone, (docs[-1][0] if len(docs) >= limit else None)

    def _next_due(self, rec: JoinRecord) -> int:
        due = NEVER
        for c in rec.conversions:
            due = min(due, c.ts)
        ds = rec.decisions
        for i, d in enumerate(ds):
            if not d.closed:
                due = min(due, d.deadline + 1)
            else:
                nxt = ds[i + 1].ts if i + 1 < len(ds) else NEVER
                due = min(due, nxt, d.ts + self.p.horizon_ms + 1)
        return due

    def _settle(self, partition: int, rec: JoinRecord, out: "JoinOutput") -> None:
        """Resolve what is already due (late arrivals), save, and index the next due time."""
        wm = self.watermark(partition)
        if self._next_due(rec) <= wm:
            rec = self._resolve(rec, wm, out)
        self.store.put_record(rec)
        self._index(partition, rec.user_id, self._next_due(rec))

    # ---------------------------------------------------------------- inputs
    def on_decision(self, partition: int, d: Decision, now_ms: int | None = None) -> JoinOutput:
        """Raises OutOfBounds (an InvalidMessage) for a decision outside the event-time bounds,
        InvalidMessage("schema") for one that does not fit the catalog and features."""
        self._check(d)
        self._admit(partition, "decisions", d.ts, now_ms)
        return self._counted(partition, self._on_decision(partition, d))

    def on_conversion(self, partition: int, c: Conversion,
                      now_ms: int | None = None) -> JoinOutput:
        """Raises OutOfBounds (an InvalidMessage) for a conversion or heartbeat outside the
        event-time bounds: one record dated years ahead must not move the watermark."""
        self._admit(partition, "conversions", c.ts, now_ms)
        return self._counted(partition, self._on_conversion(partition, c))

    def _check(self, d: Decision) -> None:
        """A decision the learner could use: an action of this catalog, by index and name,
        and vectors of its lengths (the schema cannot say how long: a feature vector of
        length 1 would otherwise travel on to the learner). Checked before the record touches
        the clock or any state."""
        n = self.catalog.n_actions
        what = None
        if not d.action_index < n:
            what = f"action_index {d.action_index} is not one of the catalog's {n} actions"
        elif d.action != self.catalog.actions[d.action_index]:
            what = (f"action {d.action[:64]!r} is not the catalog's action {d.action_index} "
                    f"({self.catalog.actions[d.action_index]!r})")
        elif len(d.features) != N_FEATURES:
            what = f"features has {len(d.features)} values, not {N_FEATURES}"
        elif len(d.allowed) != n or len(d.q_values) != n:
            what = (f"allowed/q_values have {len(d.allowed)}/{len(d.q_values)} values, not "
                    f"one per action ({n})")
        if what is not None:
            raise InvalidMessage("schema", f"decision {d.decision_id}: {what}")

    def _admit(self, partition: int, source: str, ts: int, now_ms: int | None) -> None:
        # Each input is bounded against its own clock. One clock for both dead-lettered good
        # conversions whenever decision-log trailed conversions by more than the future bound
        # in event time, which a backlog replay does (decision-log grows only as fast as the
        # decide agent works, while the orders are all there): docs/RELIABILITY.md. Until an
        # input has a reference of its own (its first records on the partition), the other
        # input's clock bounds it, so that its first record cannot come from years ahead.
        own = self.store.clock(partition, source)
        judge = own
        if own.reference() is None:
            other = self.store.clock(partition, _OTHER[source])
            if other.reference() is not None:
                judge = other
        try:
            admit(judge, ts, self.p.time_bounds, now_ms)
        finally:  # refused or not, the input's clock sees it (eventtime.py: how it recovers)
            self.store.put_clock(partition, source, own.observe(ts))

    def _counted(self, partition: int, out: JoinOutput) -> JoinOutput:
        c = out.counts
        self._add_pending(partition, c.get("decisions", 0) - c.get("rewarded", 0)
                          - c.get("defaulted", 0))
        return out

    def _on_decision(self, partition: int, d: Decision) -> JoinOutput:
        out = JoinOutput()
        rec = self._record(partition, d.user_id)
        if d.decision_id in rec.ids:
            out.count("duplicate_decision")  # a re-sent decision after a crash
            return out
        pending = PendingDecision(
            decision_id=d.decision_id, ts=d.ts, deadline=d.ts + self.p.window_ms,
            action_index=d.action_index, propensity=d.propensity,
            policy_version=d.policy_version, vectors=PendingDecision.pack(d.features, d.allowed))
        rec = rec.evolve(ids=(rec.ids + (d.decision_id,))[-ORDER_MEMORY:],
                         last_ts=max(rec.last_ts, d.ts),
                         decisions=tuple(sorted(rec.decisions + (pending,),
                                                key=lambda x: (x.ts, x.decision_id))))
        out.count("decisions")
        if d.ts + self.p.window_ms < self.watermark(partition):
            out.count("late_decision")  # closes at once; conversions may have gone elsewhere
        self._settle(partition, rec, out)
        out.extend(self._observe(partition, "decisions", d.ts))
        return out

    def _on_conversion(self, partition: int, c: Conversion) -> JoinOutput:
        if c.heartbeat:  # only moves event time on
            out = JoinOutput()
            out.count("heartbeat")
            out.extend(self._observe(partition, "conversions", c.ts))
            return out
        out = JoinOutput()
        rec = self._record(partition, c.user_id)
        if c.order_id in rec.orders:
            out.count("duplicate_conversion")
            return out
        rec = rec.evolve(orders=(rec.orders + (c.order_id,))[-ORDER_MEMORY:],
                         last_ts=max(rec.last_ts, c.ts))
        if c.ts < self.watermark(partition):
            out.count("late_conversion")  # its attribution point has passed: never re-open
            self.store.put_record(rec)
            return out
        pending = PendingConversion(order_id=c.order_id, ts=c.ts, amount=float(c.amount),
                                    discount=c.discount, decision_id=_decision_id_of(c))
        rec = rec.evolve(conversions=rec.conversions + (pending,))
        out.count("conversions")
        self._settle(partition, rec, out)
        out.extend(self._observe(partition, "conversions", c.ts))
        return out

    # ---------------------------------------------------------------- time
    def _observe(self, partition: int, input_: str, ts: int) -> JoinOutput:
        """Raise the input's watermark with an event's ts and do whatever became due."""
        mine = self.store.input_watermark(partition, input_)
        if mine is None or ts - self.p.lateness_ms > mine:
            self.store.set_input_watermark(partition, input_, ts - self.p.lateness_ms)
        marks = [wm for wm in (self.store.input_watermark(partition, "decisions"),
                               self.store.input_watermark(partition, "conversions"))
                 if wm is not None]
        old = self.watermark(partition)
        new = min(marks)
        if new <= old:
            return JoinOutput()
        self.store.set_watermark(partition, new)
        return self.advance(partition, old, new)

    def advance(self, partition: int, old: int, new: int) -> JoinOutput:
        out = JoinOutput()
        b = BUCKET_MS
        first = max(old, 0) // b if old > -NEVER else None
        last = new // b
        for bucket in self._due_buckets(partition, first, last):
            # Only the users due by now. The watermark moves a little with almost every input,
            # and taking a whole bucket (an hour) each time resolved and re-indexed every user
            # due later in the hour again and again: 11 resolutions per decision in a backlog
            # whose windows were closing (docs/BENCHMARKS.md, the ten-minute drain).
            for user in self.store.take_due(partition, bucket, new, bucket * b):
                if not self.store.has_record(user):
                    continue  # erased or expired since it was indexed
                rec = self._resolve(self.store.record(user), new, out)
                self.store.put_record(rec)
                self._index(partition, user, self._next_due(rec))
        return out

    def _due_buckets(self, partition: int, first: int | None, last: int) -> list[int]:
        if first is None or last - first > 10_000:
            # first watermark of the partition, or a jump of more than a year of buckets:
            # cheaper to look at the index keys that exist than at every bucket in between
            return [bucket for bucket in self.store.due_buckets(partition) if bucket <= last]
        return [i for i in range(first, last + 1) if self.store.has_due(partition, i)]

    def flush(self, partition: int) -> JoinOutput:
        """End of input (tests, replays): treat the watermark as +infinity."""
        self.store.set_watermark(partition, NEVER - 1)
        out = JoinOutput()
        for bucket in self.store.due_buckets(partition):
            for user in self.store.take_due(partition, bucket, None, bucket * BUCKET_MS):
                if not self.store.has_record(user):
                    continue
                rec = self._resolve(self.store.record(user), NEVER - 1, out)
                self.store.put_record(rec)
        return self._counted(partition, out)

    # ---------------------------------------------------------------- the join itself
    def _resolve(self, rec: JoinRecord, wm: int, out: JoinOutput) -> JoinRecord:
        """Do what the watermark has made due; outputs go to ``out``; returns the new record."""
        decisions = list(rec.decisions)
        # 1. attribute every conversion whose time the watermark has reached, in time order
        due = sorted((c for c in rec.conversions if c.ts <= wm),
                     key=lambda c: (c.ts, c.order_id))
        for c in due:
            i = self._attribute(decisions, c)
            if i is None:
                out.count("unmatched_conversion")
                continue
            d = decisions[i]
            discount = self._discount(d, c)
            decisions[i] = d = d.evolve(orders=d.orders + 1, amount=d.amount + c.amount,
                                        discount=d.discount + discount,
                                        reward=d.reward + self._reward(c.amount, discount))
            out.count("attributed_conversion")
            out.delays_ms.append(c.ts - d.ts)
        # 2. close decisions whose window the watermark has passed
        for i, d in enumerate(decisions):
            if not d.closed and d.deadline < wm:
                if d.orders == 0:
                    d = d.evolve(closed=True, reward=self.p.default_reward)
                    out.count("defaulted")
                else:
                    d = d.evolve(closed=True)
                    out.count("rewarded")
                decisions[i] = d
                out.rewards.append(Reward(
                    decision_id=d.decision_id, user_id=rec.user_id, ts=d.ts,
                    closed_at=d.deadline, reward=d.reward, converted=d.orders > 0,
                    orders=d.orders, amount=d.amount, discount=d.discount,
                    outcome="converted" if d.orders else "default",
                    action_index=d.action_index, policy_version=d.policy_version))
        # 3. emit transitions for closed decisions whose next state is known
        keep = []
        for i, d in enumerate(decisions):
            if not d.closed:
                keep.append(d)
                continue
            nxt = decisions[i + 1] if i + 1 < len(decisions) else None
            # the next decision is s' only once no earlier one can still arrive (ts <= wm)
            # and only within the horizon: a next decision after it makes the transition terminal
            if nxt is not None and nxt.ts <= wm and nxt.ts <= d.ts + self.p.horizon_ms:
                out.transitions.append(self._transition(rec.user_id, d, nxt))
            elif d.ts + self.p.horizon_ms < wm:
                out.transitions.append(self._transition(rec.user_id, d, None))
            else:
                keep.append(d)
        return rec.evolve(decisions=tuple(keep),
                          conversions=tuple(c for c in rec.conversions if c.ts > wm))

    def _attribute(self, decisions: list[PendingDecision], c: PendingConversion) -> int | None:
        """The index of the decision the conversion goes to, if any."""
        open_ = [i for i, d in enumerate(decisions) if d.ts <= c.ts <= d.deadline]
        if c.decision_id:
            for i in open_:
                if decisions[i].decision_id == c.decision_id:
                    return i
        if self.p.attribution == "code_only":
            return None
        return open_[-1] if open_ else None  # decisions are kept sorted by (ts, id)

    def _discount(self, d: PendingDecision, c: PendingConversion) -> float:
        if c.discount is not None:
            return float(c.discount)
        if c.decision_id == d.decision_id:
            coupon = self.catalog.coupon(d.action_index)
            if coupon is not None:
                return coupon.discount_on(c.amount, self.catalog.shipping_cost)
        return 0.0

    def _reward(self, amount: float, discount: float) -> float:
        if self.p.reward == "conversion":
            return 1.0
        if self.p.reward == "revenue":
            return amount - discount
        return self.p.margin * amount - discount

    def _transition(self, user: str, d: PendingDecision,
                    nxt: PendingDecision | None) -> Transition:
        features, allowed = d.unpacked()
        next_features, next_allowed = nxt.unpacked() if nxt else (None, None)
        return Transition(
            decision_id=d.decision_id, user_id=user, ts=d.ts, features=features,
            action_index=d.action_index, reward=d.reward, propensity=d.propensity,
            policy_version=d.policy_version,
            next_features=next_features, next_allowed=next_allowed,
            next_ts=nxt.ts if nxt else None,
            dt_ms=(nxt.ts - d.ts) if nxt else None,
            done=nxt is None, allowed=allowed,
        )
