import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from streamagent.core.constraints import CapParams, action_mask, budget_remaining, budget_spend
from streamagent.core.contracts import BudgetShare, Decision, UserEvent
from streamagent.core.policy import action_probs, decision_id, epsilon_at, sample, uniform_from
from streamagent.params import shipped, state_params
from streamagent.core.state import StateParams, UserState, apply, is_replay, record_decision

P = StateParams(half_life_ms=86_400_000, cap_window_ms=7 * 86_400_000, dedupe_events=32,
                ttl_ms=0)
T0 = 1_767_225_600_000


def ev(i, typ="page_view", ts=T0, **kw):
    return UserEvent(event_id=f"e{i}", user_id="u", type=typ, ts=ts, **kw)


def decided(ts, trigger_event_id, action_index=1):
    """A decision as the state remembers it (only ts and trigger matter to the state)."""
    return Decision(decision_id=f"d-{trigger_event_id}", user_id="u", ts=ts, action="c",
                    action_index=action_index, propensity=1.0, explored=False,
                    exploration="greedy", policy_version=0, trigger_event_id=trigger_event_id,
                    trigger_type="session_start", q_values=(0.0, 1.0), allowed=(True, True),
                    blocked_by=(), features=(0.5,), cost=1.0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["page_view", "search", "session_start", "purchase"]),
                          st.integers(0, 10 * 86_400_000)), min_size=1, max_size=8),
       st.randoms(use_true_random=False))
def test_decayed_aggregates_do_not_depend_on_arrival_order(evs, rnd):
    events = [ev(i, t, T0 + dt, amount=10.0 if t == "purchase" else None, category="c")
              for i, (t, dt) in enumerate(evs)]
    shuffled = events[:]
    rnd.shuffle(shuffled)
    a = b = UserState("u")
    for e in events:
        a = apply(a, e, P)
    for e in shuffled:
        b = apply(b, e, P)
    for f in ("d_events", "d_sessions", "d_searches", "d_views", "d_spend", "d_purchases"):
        assert math.isclose(getattr(a, f), getattr(b, f), rel_tol=1e-9, abs_tol=1e-12), f
    assert a.last_ts == b.last_ts and a.n_events == b.n_events
    assert np.allclose(a.interest, b.interest)


def test_decay_halves_after_one_half_life():
    s = apply(UserState("u"), ev(1), P)
    s = apply(s, ev(2, ts=T0 + 86_400_000), P)
    assert math.isclose(s.d_events, 1.5)


def test_cart_then_purchase_resets_cart_and_counts_spend():
    s = UserState("u")
    s = apply(s, ev(1, "add_to_cart", price=20.0, quantity=2), P)
    assert (s.cart_items, s.cart_value) == (2, 40.0)
    s = apply(s, ev(2, "purchase", ts=T0 + 5, coupon_code="C-x"), P)
    assert (s.cart_items, s.cart_value, s.total_spend, s.n_purchases, s.n_redeemed) == (0, 0.0, 40.0, 1, 1)


def test_replayed_offsets_are_recognised():
    s = apply(UserState("u"), ev(1), P, partition=3, offset=10)
    assert is_replay(s, 3, 10, "e1") and is_replay(s, 7, 99, "e1")  # by id, wherever
    assert not is_replay(s, 3, 11, "e2") and not is_replay(s, 2, 5, "e2")
    assert not is_replay(s, 3, 9, "e2")  # a new id at an old offset: the topic restarted
    # without id memory (a state of an older release): by offset
    old = UserState("u", last_partition=3, last_offset=10)
    assert is_replay(old, 3, 10, "e2") and is_replay(old, 3, 9, "e2")
    assert not is_replay(old, 3, 11, "e2") and not is_replay(old, 2, 5, "e2")


def test_state_round_trips_through_bytes():
    s = apply(UserState("u"), ev(1, category="shoes", device="mobile"), P, 0, 1)
    s = record_decision(s, decided(T0, "e1"), True, P)
    assert UserState.from_bytes(s.to_bytes()) == s


def test_decisions_kept_with_their_bytes_encode_as_the_documents_do():
    from streamagent.core.contracts import encode
    from streamagent.core.state import EncodedDoc, find_decision

    s = apply(UserState("u"), ev(1, category="shoes", device="mobile"), P, 0, 1)
    plain = encoded = s
    for i in range(6):  # more than RECENT_DECISIONS: the oldest go
        d = decided(T0 + i, f"e{i}")
        doc = d.to_doc()
        plain = record_decision(plain, d, i % 2 == 0, P, doc)
        encoded = record_decision(encoded, d, i % 2 == 0, P, EncodedDoc(encode(doc)))
    assert encoded.to_bytes() == plain.to_bytes()  # the same blob, byte for byte
    back = UserState.from_bytes(encoded.to_bytes())
    assert back == encoded == plain  # dicts read back compare equal to the encoded documents
    assert all(isinstance(x, EncodedDoc) for x in encoded.decisions)
    assert find_decision(encoded, "e5") == find_decision(plain, "e5") == decided(T0 + 5, "e5")
    assert find_decision(encoded, "e1") is None  # no longer among the recent ones
    assert {**encoded.decisions[-1]} == plain.decisions[-1]


def test_frequency_cap_min_gap_and_budget_masks():
    caps = CapParams(max_coupons=2, window_ms=7 * 86_400_000, min_gap_ms=86_400_000)
    costs = [0.0, 5.0, 50.0]
    s = UserState("u")
    allowed, blocked = action_mask(s, T0, costs, caps, remaining=10.0)
    assert allowed.tolist() == [True, True, False] and blocked == ["budget"]
    s = record_decision(s, decided(T0, "a"), True, P)
    allowed, blocked = action_mask(s, T0 + 3_600_000, costs, caps, 100.0)
    assert allowed.tolist() == [True, False, False] and blocked == ["min_gap"]
    s = record_decision(s, decided(T0 + 2 * 86_400_000, "b"), True, P)
    allowed, blocked = action_mask(s, T0 + 4 * 86_400_000, costs, caps, 100.0)
    assert blocked == ["frequency_cap"] and allowed.tolist() == [True, False, False]
    # the window rolls: after 7 days the first coupon no longer counts
    allowed, blocked = action_mask(s, T0 + 7 * 86_400_000 + 1, costs, caps, 100.0)
    assert blocked == [] and allowed.all()


def test_budget_rolls_over_with_the_event_time_period():
    b = budget_spend(BudgetShare(), 10, 30.0)
    assert budget_remaining(b, 10, 100.0) == 70.0
    assert budget_remaining(b, 11, 100.0) == 100.0
    # the period is the partition's (of its robust event time, never of a late record's ts):
    # any other period than the stored one starts afresh
    assert budget_remaining(b, 9, 100.0) == 100.0
    assert budget_spend(b, 11, 5.0) == BudgetShare(11, 5.0)


@pytest.mark.parametrize("strategy", ["epsilon", "softmax", "greedy"])
def test_probabilities_are_a_distribution_over_allowed_actions(strategy):
    q = np.array([0.1, 0.5, 0.3, 0.9])
    allowed = np.array([True, True, True, False])
    p, greedy = action_probs(q, allowed, strategy, 0.2, 0.5)
    assert math.isclose(p.sum(), 1.0) and p[3] == 0.0 and greedy == 1
    assert p[greedy] == p.max()
    if strategy == "epsilon":
        assert math.isclose(p[1], 0.8 + 0.2 / 3) and math.isclose(p[0], 0.2 / 3)


def test_sampling_matches_the_logged_propensities():
    q = np.array([0.0, 1.0, 0.5])
    p, _ = action_probs(q, np.ones(3, bool), "softmax", 0.0, 0.5)
    draws = [sample(p, uniform_from(7, decision_id("app", f"e{i}"))) for i in range(20000)]
    freq = np.bincount(draws, minlength=3) / len(draws)
    assert np.allclose(freq, p, atol=0.015)


def test_never_samples_a_masked_action():
    p = np.array([0.5, 0.0, 0.5, 0.0])
    for u in np.linspace(0, 1, 1001)[:-1]:
        assert p[sample(p, float(u))] > 0


def test_decision_ids_and_draws_are_deterministic():
    assert decision_id("a", "e1") == decision_id("a", "e1") != decision_id("a", "e2")
    assert len(decision_id("a", "e1")) == 32
    assert uniform_from(1, "x") == uniform_from(1, "x") != uniform_from(2, "x")


def test_epsilon_schedule():
    assert epsilon_at(0, 0.2, 0.05, 100) == 0.2
    assert math.isclose(epsilon_at(50, 0.2, 0.05, 100), 0.125)
    assert epsilon_at(10**6, 0.2, 0.05, 100) == 0.05


def _user_with_history(days: int, start_day: int = 0) -> UserState:
    p = state_params(shipped())
    s = UserState("u")
    day = 86_400_000
    for d in range(start_day, start_day + days):
        for k, typ in enumerate(("session_start", "page_view", "add_to_cart", "purchase")):
            s = apply(s, UserEvent(f"e{d}-{k}", "u", typ, T0 + d * day + k * 1000,
                                   category="books", price=20.0, amount=40.0), p)
        if d % 3 == 0:
            s = record_decision(s, decided(T0 + d * day + 5000, f"e{d}-0"), True, p)
    return s


def test_features_are_bounded_and_do_not_grow_with_a_users_age():
    from streamagent.core.features import FEATURE_NAMES, encode

    day = 86_400_000
    young = _user_with_history(120, start_day=880)  # the same last 120 days...
    old = _user_with_history(1000)  # ...after 880 more days of the same habits
    ts = T0 + 1000 * day + 10_000
    fy = encode(young, ts, "session_start", state_params(shipped()).half_life_ms, 7 * day)
    fo = encode(old, ts, "session_start", state_params(shipped()).half_life_ms, 7 * day)
    assert np.all(fo >= -1.0) and np.all(fo <= 1.5), dict(zip(FEATURE_NAMES, fo))
    # nothing counts a lifetime: a 3-year-old user looks like a 4-month-old with the same
    # habits. The one exception by design: the redemption rate is an estimate (Beta(1, 1)
    # prior) that sharpens with evidence, so it moves towards the true rate with age.
    keep = [k for k, n in enumerate(FEATURE_NAMES) if n != "redemption_rate"]
    assert np.allclose(fy[keep], fo[keep], atol=1e-3), {
        n: (a, b) for n, a, b in zip(FEATURE_NAMES, fy, fo) if abs(a - b) > 1e-3}


def test_coupon_pressure_builds_with_coupons_and_fades_without():
    from streamagent.core.features import FEATURE_NAMES, encode

    day = 86_400_000
    i = FEATURE_NAMES.index("coupon_pressure")
    p = state_params(shipped())
    s = UserState("u")
    s = apply(s, UserEvent("e0", "u", "session_start", T0), p)
    seen = []
    for d in range(4):
        s = record_decision(s, decided(T0 + d * day, f"c{d}"), True, p)
        seen.append(encode(s, T0 + d * day + 1, "session_start", p.half_life_ms, 7 * day)[i])
    assert seen == sorted(seen) and seen[-1] > seen[0]
    later = [encode(s, T0 + (3 + k) * day, "session_start", p.half_life_ms, 7 * day)[i]
             for k in (1, 3, 6)]
    assert later == sorted(later, reverse=True) and later[-1] < seen[0]
