"""The reward join on event time: exactly one reward per decision, order does not matter."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
from hypothesis import given, settings, strategies as st

from streamagent.core.catalog import load_catalog
from streamagent.core.contracts import Conversion, Decision
from streamagent.core.features import N_FEATURES
from streamagent.core.join import Joiner
from streamagent.core.tables import JoinStore
from streamagent.params import join_params, shipped

CAT = load_catalog()
H = 3_600_000
# These tests are about attribution and ordering, on sparse made-up streams (a handful of
# records over days), so the event-time bounds are widened; tests/unit/test_event_time.py
# holds the join to the shipped bounds.
P = replace(join_params(shipped(max_future_skew_days=3650)), window_ms=48 * H,
            lateness_ms=2 * H, horizon_ms=100 * H, margin=0.3)
T0 = 1_767_225_600_000


def decision(did, user, ts, action=0):
    return Decision(decision_id=did, user_id=user, ts=ts, action=CAT.actions[action],
                    action_index=action, propensity=0.5, explored=False, exploration="epsilon",
                    epsilon=0.1, policy_version=1, trigger_event_id=f"e-{did}",
                    trigger_type="session_start", q_values=(0.0,) * CAT.n_actions,
                    allowed=(True,) * CAT.n_actions, blocked_by=(),
                    features=(float(ts % 97),) + (0.0,) * (N_FEATURES - 1),
                    cost=0.0)


def conversion(oid, user, ts, amount, did=None, discount=None):
    return Conversion(order_id=oid, user_id=user, ts=ts, amount=amount, decision_id=did,
                      discount=discount)


def heartbeat(user, ts):
    return Conversion(order_id="hb", user_id=user, ts=ts, amount=0.0, heartbeat=True)


def joiner(params=P):
    return Joiner(CAT, params, JoinStore({}))


def run(items, params=P):
    j = joiner(params)
    rewards, transitions, counts = [], [], {}
    for kind, doc in items:
        out = j.on_decision(0, doc) if kind == "d" else j.on_conversion(0, doc)
        rewards += out.rewards
        transitions += out.transitions
        for k, v in out.counts.items():
            counts[k] = counts.get(k, 0) + v
    out = j.flush(0)
    rewards += out.rewards
    transitions += out.transitions
    for k, v in out.counts.items():
        counts[k] = counts.get(k, 0) + v
    return rewards, transitions, counts


def expected_attribution(items, params=P):
    """The rule, written the slow and obvious way: per conversion, latest open decision."""
    ds = [d for k, d in items if k == "d"]
    total = 0.0
    for k, c in items:
        if k != "c":
            continue
        cands = [d for d in ds if d.user_id == c.user_id
                 and d.ts <= c.ts <= d.ts + params.window_ms]
        named = [d for d in cands if d.decision_id == c.decision_id]
        if named or cands:
            total += params.margin * c.amount - (c.discount or 0.0)
    return total


@st.composite
def streams(draw):
    """Decisions and conversions for 3 users, then an arrival order whose disorder stays
    within the allowed lateness (each item's arrival is its ts plus a delay < lateness)."""
    items = []
    n_dec = draw(st.integers(1, 8))
    for i in range(n_dec):
        items.append(("d", decision(f"d{i}", f"u{draw(st.integers(0, 2))}",
                                    T0 + draw(st.integers(0, 200)) * H + i)))
    for i in range(draw(st.integers(0, 8))):
        user = f"u{draw(st.integers(0, 2))}"
        named = draw(st.booleans())
        did = draw(st.sampled_from([d.decision_id for _, d in items if d.user_id == user]
                                   or [None])) if named else None
        disc = draw(st.sampled_from([None, 0.0, 5.0]))
        items.append(("c", conversion(f"o{i}", user, T0 + draw(st.integers(0, 260)) * H + 7,
                                      float(draw(st.integers(1, 300))), did, disc)))
    delays = [draw(st.integers(0, P.lateness_ms - 1)) for _ in items]
    arrival = sorted(range(len(items)), key=lambda k: (items[k][1].ts + delays[k], k))
    return items, [items[k] for k in arrival]


@settings(max_examples=150, deadline=None)
@given(streams())
def test_every_decision_gets_exactly_one_reward_whatever_the_order(data):
    items, shuffled = data
    in_ts_order = sorted(items, key=lambda it: (it[1].ts, it[0]))
    r1, t1, _ = run(in_ts_order)
    r2, t2, _ = run(shuffled)
    decisions = {d.decision_id for k, d in items if k == "d"}
    for rewards in (r1, r2):
        ids = [r.decision_id for r in rewards]
        assert sorted(ids) == sorted(decisions)  # exactly one each
    by_id = lambda rs: {r.decision_id: (round(r.reward, 9), r.orders) for r in rs}
    assert by_id(r1) == by_id(r2)
    tr = lambda ts: {t.decision_id: (t.next_ts, t.done) for t in ts}
    assert tr(t1) == tr(t2)
    assert sorted(t.decision_id for t in t1) == sorted(decisions)  # one transition each
    total = sum(r.reward for r in r1 if r.converted)
    assert math.isclose(total, expected_attribution(items), abs_tol=1e-6)


def test_named_decision_wins_over_the_latest():
    items = [("d", decision("a", "u", T0)), ("d", decision("b", "u", T0 + H)),
             ("c", conversion("o1", "u", T0 + 2 * H, 100.0, did="a", discount=10.0))]
    rewards, _, _ = run(items)
    got = {r.decision_id: r.reward for r in rewards}
    assert got == {"a": pytest.approx(0.3 * 100 - 10), "b": 0.0}


def test_unnamed_conversion_goes_to_the_latest_open_decision():
    items = [("d", decision("a", "u", T0)), ("d", decision("b", "u", T0 + H)),
             ("c", conversion("o1", "u", T0 + 2 * H, 100.0))]
    rewards, _, _ = run(items)
    assert {r.decision_id: r.reward for r in rewards} == {"a": 0.0, "b": pytest.approx(30.0)}


def test_no_coupon_then_full_price_order_earns_the_full_margin():
    rewards, _, _ = run([("d", decision("a", "u", T0, action=0)),
                         ("c", conversion("o", "u", T0 + H, 200.0))])
    assert rewards[0].reward == pytest.approx(60.0) and rewards[0].discount == 0.0


def test_redeemed_coupon_discount_comes_from_the_catalog_when_not_given():
    idx = CAT.actions.index("amt15_min100")
    rewards, _, _ = run([("d", decision("a", "u", T0, action=idx)),
                         ("c", conversion("o", "u", T0 + H, 120.0, did="a"))])
    assert rewards[0].discount == 15.0
    assert rewards[0].reward == pytest.approx(0.3 * 120 - 15)


def test_duplicates_late_and_unmatched_are_counted_never_double_counted():
    items = [("d", decision("a", "u", T0)),
             ("c", conversion("o1", "u", T0 + H, 100.0)),
             ("c", conversion("o1", "u", T0 + H, 100.0)),          # duplicate order
             ("d", decision("a", "u", T0)),                          # re-sent decision
             ("c", conversion("o2", "v", T0 + H, 50.0)),            # user with no decision
             ("d", decision("z", "u", T0 + 200 * H)),               # pushes the watermark on,
             ("c", heartbeat("w", T0 + 200 * H)),                  # on both inputs
             ("c", conversion("o3", "u", T0 + 2 * H, 70.0))]        # far too late now
    rewards, _, counts = run(items)
    assert counts["duplicate_conversion"] == 1 and counts["duplicate_decision"] == 1
    assert counts["unmatched_conversion"] == 1 and counts["late_conversion"] == 1
    a = next(r for r in rewards if r.decision_id == "a")
    assert a.orders == 1 and a.reward == pytest.approx(30.0)


def test_window_closes_on_event_time_not_on_arrival():
    j = joiner()
    assert not j.on_decision(0, decision("a", "u", T0)).rewards
    # another user's events move the partition's event time: nothing closes before the deadline
    assert not j.on_decision(0, decision("b", "v", T0 + P.window_ms)).rewards
    out = j.on_decision(0, decision("c", "w", T0 + P.window_ms + P.lateness_ms + 1))
    assert [r.decision_id for r in out.rewards] == ["a"]
    assert out.rewards[0].outcome == "default" and out.rewards[0].reward == 0.0


def test_transition_links_to_the_users_next_decision():
    _, transitions, _ = run([("d", decision("a", "u", T0)), ("d", decision("b", "u", T0 + 5 * H))])
    t = {x.decision_id: x for x in transitions}
    assert t["a"].next_ts == T0 + 5 * H and t["a"].dt_ms == 5 * H and not t["a"].done
    assert t["a"].next_features == decision("b", "u", T0 + 5 * H).features
    assert t["b"].done and t["b"].next_features is None


@pytest.mark.parametrize("mode,expect", [("conversion", 1.0), ("revenue", 90.0), ("profit", 20.0)])
def test_reward_modes(mode, expect):
    p = replace(P, reward=mode)
    rewards, _, _ = run([("d", decision("a", "u", T0)),
                         ("c", conversion("o", "u", T0 + H, 100.0, discount=10.0))], p)
    assert rewards[0].reward == pytest.approx(expect)


def test_a_lagging_conversions_input_holds_windows_open_and_heartbeats_move_it():
    j = joiner()
    j.on_decision(0, decision("a", "u", T0))
    j.on_conversion(0, conversion("o1", "v", T0 + H, 10.0))  # unrelated, sets the conversions clock
    # decisions run far ahead; the conversions input has not caught up: nothing may close yet,
    # or an order of u at T0 + 1.5 h still on its way would arrive 'late'
    assert not j.on_decision(0, decision("b", "w", T0 + 100 * H)).rewards
    assert j.on_conversion(0, conversion("o2", "u", T0 + H + H // 2, 100.0)).counts.get("late_conversion") is None
    out = j.on_conversion(0, heartbeat("x", T0 + 100 * H))
    a = next(r for r in out.rewards if r.decision_id == "a")
    assert a.orders == 1 and a.reward == pytest.approx(30.0)


def test_pending_count_and_attribution_delays():
    j = joiner()
    j.on_decision(0, decision("a", "u", T0))
    j.on_decision(0, decision("b", "v", T0))
    assert j.pending(0) == 2
    j.on_conversion(0, conversion("o", "u", T0 + 3 * H, 10.0))
    out = j.flush(0)
    assert j.pending(0) == 0 and out.delays_ms == [3 * H]


def test_pending_decisions_keep_their_vectors_as_text_and_old_records_still_join():
    """A pending decision's features and mask are stored as JSON text (not decoded with every
    input of its user); a record written by a release that kept them as lists joins to the
    same transitions."""
    import orjson

    a, b = decision("a", "u", T0), decision("b", "u", T0 + 5 * H)
    j = joiner()
    j.on_decision(0, a)
    stored = orjson.loads(j.store.table["u:u"])
    (pending,) = stored["decisions"]
    assert isinstance(pending["vectors"], str) and pending["features"] is None
    assert orjson.loads(pending["vectors"]) == [list(a.features), list(a.allowed)]
    # the same record as the earlier release wrote it: lists, no "vectors"
    del pending["vectors"]
    pending["features"], pending["allowed"] = list(a.features), list(a.allowed)
    j.store.table["u:u"] = orjson.dumps(stored)
    out = j.on_decision(0, b)
    out.extend(j.flush(0))
    _, expected, _ = run([("d", a), ("d", b)])
    assert sorted(out.transitions, key=lambda t: t.decision_id) == \
        sorted(expected, key=lambda t: t.decision_id)
    first = next(t for t in expected if t.decision_id == "a")
    assert first.features == a.features and first.allowed == a.allowed
    assert first.next_features == b.features and first.next_allowed == b.allowed


def test_watermark_moving_within_an_hour_leaves_users_due_later_in_it_alone():
    """Users whose window closes later in the current hour of the due-time index are not
    resolved (read and rewritten) by every input that moves the watermark within the hour:
    only once they are due."""
    from streamagent.core.join import BUCKET_MS

    class Counting(dict):
        writes = 0

        def __setitem__(self, key, value):
            if key.startswith("u:u"):  # the ten users' records
                Counting.writes += 1
            super().__setitem__(key, value)

    hour = (T0 + P.window_ms) // BUCKET_MS * BUCKET_MS + BUCKET_MS  # an hour boundary
    j = Joiner(CAT, P, JoinStore(Counting()))
    # ten users whose windows close 40..49 minutes into that hour
    for i in range(10):
        j.on_decision(0, decision(f"d{i}", f"u{i}", hour - P.window_ms + (40 + i) * 60_000))
    j.on_conversion(0, heartbeat("x", hour + P.lateness_ms))
    before = Counting.writes
    rewards = []
    # the watermark walks through the hour a minute at a time (decisions of another user)
    for m in range(1, 60):
        out = j.on_decision(0, decision(f"w{m}", "w", hour + P.lateness_ms + m * 60_000))
        out.extend(j.on_conversion(0, heartbeat("x", hour + P.lateness_ms + m * 60_000)))
        rewards += [r.decision_id for r in out.rewards if r.user_id != "w"]
    assert sorted(rewards) == [f"d{i}" for i in range(10)]
    # each of the ten records is written once, when its window closes
    assert Counting.writes - before == 10
