"""Event-time rules (core/eventtime.py) with the shipped bounds: any gap in a user's history is
legal; a record far from its partition's event time is rejected and moves no shared state."""
from __future__ import annotations

import dataclasses
import math

import orjson
import pytest
from hypothesis import given, settings, strategies as st

from streamagent.core.catalog import load_catalog
from streamagent.core.contracts import BudgetShare, Conversion
from streamagent.core.engine import DecisionEngine, initial_model
from streamagent.core.eventtime import WINDOW, OutOfBounds, StreamClock, TimeBounds, admit
from streamagent.core.features import FEATURE_NAMES, N_FEATURES
from streamagent.core.join import Joiner
from streamagent.core.tables import JoinStore
from streamagent.errors import InvalidMessage
from streamagent.params import engine_params, join_params, shipped
from streamagent.units import DAY_MS, HOUR_MS, MINUTE_MS

CAT = load_catalog()
T0 = 1_767_225_600_000  # 2026-01-01
Y2099 = 4_070_908_800_000
S = shipped()


def engine(**settings):
    s = shipped(**settings)
    return DecisionEngine(CAT, engine_params(s, 1), initial_model(CAT, (64, 64), 7))


def raw(eid, user, typ, ts, **kw):
    return orjson.dumps({"event_id": eid, "user_id": user, "type": typ, "ts": ts, **kw})


class Partition:
    """One partition as the worker keeps it: user states, the budget share and the clock."""

    def __init__(self, eng):
        self.eng, self.states, self.budget, self.clock = eng, {}, BudgetShare(), StreamClock()
        self.offset = 0
        self.rejected: list[str] = []

    def send(self, eid, user, typ, ts, policy=None, **kw):
        self.offset += 1
        try:
            r = self.eng.step(raw(eid, user, typ, ts, **kw), user.encode(),
                              self.states.get(user), self.budget, 0, self.offset,
                              policy=policy, clock=self.clock)
        except OutOfBounds as exc:
            self.clock = exc.clock
            self.rejected.append(exc.reason)
            return None
        except InvalidMessage as exc:  # e.g. a schema bound on ts
            self.rejected.append(exc.reason)
            return None
        self.states[user], self.budget, self.clock = r.state, r.budget, r.clock
        return r


def test_the_clock_is_a_median_no_single_record_moves():
    c = StreamClock()
    for k in range(WINDOW):
        c = c.observe(T0 + k * MINUTE_MS)
    ref = c.reference()
    c2 = c.observe(Y2099)
    assert c2.reference() <= ref + MINUTE_MS and c2.stream_time == c.stream_time + MINUTE_MS
    # a real jump (a replay of another month) is followed after half a window of records
    bounds = TimeBounds(future_ms=7 * DAY_MS, past_ms=30 * DAY_MS, wall_future_ms=None)
    later = T0 + 60 * DAY_MS
    outcomes = []
    for k in range(WINDOW):
        try:
            c = admit(c, later + k, bounds)
            outcomes.append("ok")
        except OutOfBounds as exc:
            c = exc.clock
            outcomes.append(exc.reason)
    assert outcomes[0] == "ts_too_far_ahead" and outcomes[-1] == "ok"
    assert outcomes.count("ts_too_far_ahead") == WINDOW // 2 + 1


def test_wall_clock_bound_is_off_by_default_and_works_when_set():
    assert engine().p.time_bounds.wall_future_ms is None
    eng = engine(max_wall_clock_skew_minutes=5)
    with pytest.raises(OutOfBounds) as ei:
        eng.step(raw("e", "u", "page_view", T0 + HOUR_MS), b"u", None, BudgetShare(),
                 now_ms=T0)
    assert ei.value.reason == "ts_too_far_ahead" and "wall clock" in ei.value.detail
    eng.step(raw("e", "u", "page_view", T0 + MINUTE_MS), b"u", None, BudgetShare(), now_ms=T0)


def test_a_customer_returning_after_400_days_is_decided_for():
    # with no TTL: the state is still there (with the default TTL of 180 days the customer
    # comes back as a new user: tests/unit/test_erasure.py)
    p = Partition(engine(cap_min_gap_hours=0, user_state_ttl_days=0))
    day = 0
    for day in range(6):  # the customer is active for a week, with others on the partition
        p.send(f"x-{day}", "x", "session_start", T0 + day * DAY_MS + 9 * HOUR_MS)
    before = p.send("x-v", "x", "page_view", T0 + 5 * DAY_MS + 10 * HOUR_MS)
    for day in range(6, 406):  # the shop goes on without them
        for i in range(3):
            p.send(f"o{i}-{day}", f"other{i}", "session_start", T0 + day * DAY_MS + i * HOUR_MS)
    back = T0 + 405 * DAY_MS + 12 * HOUR_MS
    r = p.send("x-back", "x", "session_start", back)
    assert not p.rejected
    assert r is not None and r.decision is not None and r.decision.ts == back
    f = dict(zip(FEATURE_NAMES, r.decision.features))
    old = dict(zip(FEATURE_NAMES, p.eng._decide(before.state, before.event, BudgetShare(),
                                                StreamClock()).decision.features))
    # the long gap shows: the week of sessions has decayed away (only today's counts), while
    # tenure says this is no newcomer
    assert f["log_sessions_decayed"] == pytest.approx(math.log1p(1.0) / 6.0, abs=1e-3)
    assert f["log_sessions_decayed"] < old["log_sessions_decayed"]
    assert f["tenure"] == 1.0 and old["tenure"] < 0.1
    r2 = p.send("x-cart", "x", "add_to_cart", back + MINUTE_MS, price=40.0)
    assert r2.decision is not None and not p.rejected


def test_a_new_users_event_in_2099_is_rejected_and_moves_no_budget():
    p = Partition(engine(cap_min_gap_hours=0, budget_per_period=100.0))
    for k in range(20):
        p.send(f"a{k}", f"u{k % 4}", "session_start", T0 + k * MINUTE_MS)
    budget, stream_time = p.budget, p.clock.stream_time
    assert p.send("future", "newcomer", "session_start", Y2099) is None
    assert p.rejected == ["ts_too_far_ahead"] and "newcomer" not in p.states
    # the budget and the partition's event time stay where the normal records put them
    assert p.budget == budget
    assert stream_time <= p.clock.stream_time <= T0 + 20 * MINUTE_MS
    r = p.send("next", "u1", "session_start", T0 + 21 * MINUTE_MS, policy=lambda x, ok: (1, 1.0))
    assert r.decision is not None and r.decision.action_index == 1
    assert r.budget.period == T0 // S.budget_period_ms
    assert r.budget.spent == budget.spent + CAT.costs()[1]


def test_a_late_trigger_is_judged_by_the_partitions_current_budget_period():
    p = Partition(engine(cap_min_gap_hours=0))
    for k in range(10):
        p.send(f"a{k}", f"u{k}", "page_view", T0 + 2 * DAY_MS + k * MINUTE_MS)
    coupon = lambda x, ok: (1, 1.0)  # noqa: E731
    r = p.send("late", "u0", "session_start", T0 + 12 * HOUR_MS, policy=coupon)  # 1.5 days late
    assert r.decision is not None and r.budget.period == (T0 + 2 * DAY_MS) // DAY_MS
    assert p.send("ancient", "u0", "page_view", T0 - 40 * DAY_MS) is None
    assert p.rejected == ["ts_too_far_behind"]


def _decision(did, user, ts):
    from streamagent.core.contracts import Decision

    n = len(CAT.actions)
    return Decision(decision_id=did, user_id=user, ts=ts, action="none", action_index=0,
                    propensity=0.9, explored=False, exploration="epsilon", epsilon=0.1,
                    policy_version=1, trigger_event_id="e-" + did, trigger_type="session_start",
                    q_values=(0.0,) * n, allowed=(True,) * n, blocked_by=(),
                    features=(1.0,) * N_FEATURES, cost=0.0)


def test_a_conversion_and_a_heartbeat_years_ahead_are_rejected_and_time_goes_on():
    j = Joiner(CAT, join_params(S), JoinStore({}))
    window = join_params(S).window_ms
    for k in range(10):
        j.on_decision(0, _decision(f"d{k}", f"u{k}", T0 + k * MINUTE_MS))
        j.on_conversion(0, Conversion(order_id=f"hb{k}", user_id="hb", ts=T0 + k * MINUTE_MS,
                                      amount=0.0, heartbeat=True))
    wm = j.watermark(0)
    for bad in (Conversion(order_id="far", user_id="u1", ts=Y2099, amount=50.0),
                Conversion(order_id="hbfar", user_id="hb", ts=Y2099, amount=0.0,
                           heartbeat=True)):
        with pytest.raises(OutOfBounds):
            j.on_conversion(0, bad)
    assert j.watermark(0) == wm
    out = j.on_conversion(0, Conversion(order_id="real", user_id="u1", ts=T0 + HOUR_MS,
                                        amount=50.0))
    assert out.counts.get("conversions") == 1 and "late_conversion" not in out.counts
    # rewards close on time: once both inputs pass the window, every decision has its reward
    rewards = []
    t = T0 + HOUR_MS
    while t < T0 + window + 4 * HOUR_MS:
        t += HOUR_MS
        rewards += j.on_decision(0, _decision(f"x{t}", "other", t)).rewards
        rewards += j.on_conversion(0, Conversion(order_id=f"h{t}", user_id="hb", ts=t,
                                                 amount=0.0, heartbeat=True)).rewards
    got = {r.decision_id: r for r in rewards}
    assert {f"d{k}" for k in range(10)} <= set(got)
    assert got["d1"].converted and got["d1"].amount == 50.0


def test_conversions_far_ahead_of_the_decisions_of_a_backlog_wait_for_them():
    """A backlog replay: the orders are on conversions already, decision-log grows only as fast
    as the decide agent works, so the join reads the orders further and further ahead of the
    decisions (here the orders advance 1.5 days for every day of decisions, until they lead
    by 10, beyond MAX_FUTURE_SKEW_DAYS), interleaved with more numerous decisions. Each input
    is bounded by its own clock, so the orders are neither refused (one clock for both, set
    by the decisions, dead-lettered them as ts_too_far_ahead) nor attributed early: the
    watermark waits for the decisions, and every order reaches its decision."""
    j = Joiner(CAT, join_params(S), JoinStore({}))
    days, users = 30, 5
    assert (days - days / 1.5) * DAY_MS > join_params(S).time_bounds.future_ms
    rewards, refused, bought = {}, [], set()

    def take(out):
        rewards.update((r.decision_id, r) for r in out.rewards)

    after = join_params(S).window_ms // DAY_MS + 3  # until every window has closed
    for d in range(days + after):
        for k in range(users):  # the decisions of day d
            take(j.on_decision(0, _decision(f"d{d}-{k}", f"u{k}", T0 + d * DAY_MS)))
        at = d * 3 * DAY_MS // 2  # the orders are at day 1.5 d: user u0 buys then
        if at < days * DAY_MS:
            order = Conversion(order_id=f"o{d}", user_id="u0", ts=T0 + at + HOUR_MS,
                               amount=40.0)
            bought.add(f"d{at // DAY_MS}-0")  # u0's latest decision before it
        else:
            order = Conversion(order_id=f"hb{d}", user_id="hb", amount=0.0, heartbeat=True,
                               ts=T0 + d * DAY_MS)
        try:
            take(j.on_conversion(0, order))
        except OutOfBounds as exc:
            refused.append(exc.reason)
    assert refused == []
    closed = {f"d{d}-{k}" for d in range(days) for k in range(users)}
    assert closed <= set(rewards)
    assert {i for i in closed if rewards[i].converted} == bought
    assert all(rewards[i].amount == 40.0 for i in bought)
    # a record years ahead of the conversions' own clock is still refused
    with pytest.raises(OutOfBounds):
        j.on_conversion(0, Conversion(order_id="far", user_id="u1", ts=Y2099, amount=5.0))


@st.composite
def outlier_streams(draw):
    """A normal day of a few users (sessions, views, orders), and where to put outliers (at
    most two: the clock's median of five ignores two outliers; tests above show a third among
    five records would be followed as a real jump)."""
    n_users = draw(st.integers(2, 5))
    events = []
    for k in range(draw(st.integers(15, 40))):
        u = f"u{draw(st.integers(0, n_users - 1))}"
        typ = draw(st.sampled_from(["session_start", "page_view", "add_to_cart", "purchase"]))
        events.append((f"e{k}", u, typ, T0 + k * 10 * MINUTE_MS))
    # from the fourth record on: a brand-new partition has no event time to compare with yet
    # (its first MIN_SAMPLES records set it; the wall-clock bound covers that in live traffic)
    outliers = draw(st.lists(st.tuples(st.integers(3, len(events)),
                                       st.sampled_from([Y2099, T0 + 3 * 365 * DAY_MS,
                                                        T0 - 5 * 365 * DAY_MS, 946_684_800_000]),
                                       st.sampled_from(["session_start", "page_view"])),
                             max_size=2))
    return events, outliers


def _play(events, outliers):
    eng = engine(cap_min_gap_hours=0)
    p = Partition(eng)
    j = Joiner(CAT, join_params(S), JoinStore({}))
    jclock = []
    at = {}
    for pos, ts, typ in outliers:
        at.setdefault(pos, []).append((ts, typ))
    decisions, rewards = {}, {}

    def join(fn, rec):
        try:
            for r in fn(0, rec).rewards:
                rewards[r.decision_id] = r.to_doc()
        except InvalidMessage:
            jclock.append(rec)

    for k in range(3):  # the conversions input has its event time before any outlier comes
        join(j.on_conversion, Conversion(order_id=f"hb{k}", user_id="hb", ts=T0 + k,
                                         amount=0.0, heartbeat=True))

    for k, (eid, u, typ, ts) in enumerate(events + [("end", "u0", "page_view",
                                                        events[-1][3] + 2 * MINUTE_MS)]):
        for n, (ots, otyp) in enumerate(at.get(k, [])):
            p.send(f"out-{k}-{n}", f"intruder{n}", otyp, ots)
            join(j.on_conversion, Conversion(order_id=f"oo-{k}-{n}", user_id="u0", ts=ots,
                                             amount=99.0))
        kw = {"amount": 40.0} if typ == "purchase" else {}
        r = p.send(eid, u, typ, ts, **kw)
        if r is not None and r.decision is not None:
            decisions[r.decision.decision_id] = r.decision.to_doc()
            join(j.on_decision, r.decision)
        if typ == "purchase":
            join(j.on_conversion, Conversion(order_id=f"o-{eid}", user_id=u, ts=ts, amount=40.0))
    for r in j.flush(0).rewards:
        rewards[r.decision_id] = r.to_doc()
    return decisions, rewards


@settings(max_examples=60, deadline=None)
@given(outlier_streams())
def test_outliers_change_nothing_for_the_normal_records(data):
    events, outliers = data
    assert _play(events, outliers) == _play(events, [])


def test_shipped_bounds():
    b = engine().p.time_bounds
    assert b.future_ms == int(S.max_future_skew_days * DAY_MS)
    assert b.past_ms == int(S.max_past_skew_days * DAY_MS)
    assert join_params(S).time_bounds.past_ms is None  # late joins follow the join's rules
    assert dataclasses.replace(b, wall_future_ms=1).wall_future_ms == 1
