"""Budget pacing (core/pacing.py): the shadow price's controller, and the engine deciding by
Q - lambda x cost with exact propensities, in batches as one at a time."""
import dataclasses
from dataclasses import dataclass, replace

import numpy as np
import orjson
import pytest

from streamagent.core.contracts import BudgetShare, decode_decision, validator
from streamagent.core.engine import DecisionEngine, initial_model
from streamagent.core.pacing import (PacingParams, pace, prior_profile, target_fraction,
                                     target_of)
from streamagent.core.tables import BudgetShares
from streamagent.params import pacing_params, shipped
from streamagent.units import DAY_MS, HOUR_MS

from .test_engine_batch import (BINDING, CAT, SHIPPED, engine, messages, same_in_batches,
                                sequential, summary, trained_like_model)

T0 = 1_767_225_600_000  # a period start (24-hour periods, aligned to the epoch)
P = PacingParams(kp=2.0, ki=4.0, max_price=2.0)
SHARE = 100.0


def at(hours: float) -> int:
    return T0 + int(hours * HOUR_MS)


def on_the_line(hours: float, **kw) -> BudgetShare:
    """A share whose spend is exactly on the line at ``hours``, last paced then."""
    now = at(hours)
    return BudgetShare(now // DAY_MS, SHARE * target_fraction(now, DAY_MS), paced_ts=now, **kw)


# ------------------------------------------------------------------ the controller
def test_spending_ahead_of_the_line_raises_the_price_and_behind_lowers_it():
    b = on_the_line(6.0, integral=0.3, shadow_price=0.3)
    ahead = pace(replace(b, spent=b.spent + 20), at(7.0), DAY_MS, SHARE, P)
    behind = pace(replace(b, spent=b.spent - 20), at(7.0), DAY_MS, SHARE, P)
    on = pace(b, at(6.0), DAY_MS, SHARE, P)
    assert on.shadow_price == pytest.approx(0.3)  # on the line: the integral alone
    assert ahead.shadow_price > 0.3 and ahead.integral > 0.3
    assert behind.shadow_price < 0.3 and behind.integral < 0.3
    # the proportional part answers at once, the integral over time
    e = (b.spent + 20 - SHARE * 7 / 24) / SHARE
    assert ahead.integral == pytest.approx(0.3 + P.ki * e / 24)
    assert ahead.shadow_price == pytest.approx(P.kp * e + ahead.integral)


def test_the_price_and_the_integral_are_clamped():
    b = replace(on_the_line(1.0, integral=1.9), spent=SHARE)  # the whole share by 1:00
    for h in range(2, 20):
        b = pace(b, at(h), DAY_MS, SHARE, P)
        assert 0.0 <= b.integral <= P.max_price and 0.0 <= b.shadow_price <= P.max_price
    assert b.shadow_price == P.max_price and b.integral == P.max_price
    # far behind for a long time: the integral stops at 0 (anti-windup), and recovers at once
    quiet = BudgetShare(T0 // DAY_MS, 0.0, integral=0.5, paced_ts=T0)
    for h in range(1, 24):
        quiet = pace(quiet, at(h), DAY_MS, SHARE, P)
    assert quiet.shadow_price == 0.0 and quiet.integral == 0.0
    back = pace(replace(quiet, spent=SHARE * 23 / 24 + 10), at(23.0), DAY_MS, SHARE, P)
    assert back.shadow_price > 0


def test_a_new_period_resets_the_spend_and_carries_the_price_level():
    b = replace(on_the_line(23.0, integral=0.4), spent=SHARE)
    nxt = pace(b, at(24.5), DAY_MS, SHARE, P)
    assert nxt.period == b.period + 1 and nxt.spent == 0.0
    # only the half hour of the new period is integrated (behind the line: a little lower)
    e = -0.5 / 24
    assert nxt.integral == pytest.approx(0.4 + P.ki * e * 0.5 / 24)
    assert nxt.shadow_price == pytest.approx(max(0.0, P.kp * e + nxt.integral))


def test_settings_turn_pacing_on_with_a_budget_only():
    assert pacing_params(shipped()) == PacingParams(2.0, 4.0, 2.0, first_gain=3.0)
    assert pacing_params(shipped(budget_per_period=0)) is None
    assert pacing_params(shipped(budget_per_period=float("inf"))) is None
    assert pacing_params(shipped(pacing=False)) is None


def test_the_pacing_state_round_trips_the_budget_table_and_old_records_read():
    table = {}
    shares = BudgetShares(table)
    b = BudgetShare(20_000, 12.5, 0.25, 0.125, T0 + 7)
    shares.put(1, b)
    assert shares.get(1) == b
    shares.put(2, BudgetShare(20_000, 3.0))  # no pacing: the layout earlier releases read
    assert table[b"p2"] == b"20000:3.0" and shares.get(2) == BudgetShare(20_000, 3.0)


# ------------------------------------------------------------------ the engine
class FixedQ:
    def __init__(self, q):
        self.q = np.asarray(q, float)

    def heads(self, x):
        return self.q[None, :]

    def heads_batch(self, X):
        return np.repeat(self.q[None, None, :], len(X), axis=0)


@dataclass
class FixedModel:
    snapshot: object
    q: FixedQ
    version: int = 3


# costs: none 0, pct10 6, pct20_min80 16, amt5_min30 5, amt15_min100 15, freeship 4.9
Q = [0.0, 0.5, 0.9, 0.3, -1.0, -1.0]


def fixed_engine(q=Q, **kw):
    params = dataclasses.replace(SHIPPED, pacing=P, budget_per_period=2 * SHARE, **kw)
    snap = initial_model(CAT, (8,), 7).snapshot
    return DecisionEngine(CAT, params, FixedModel(snap, FixedQ(q)))


def decide(eng, budget, hours=6.0, user="u"):
    ev = {"event_id": f"e-{user}-{hours}", "user_id": user, "type": "session_start",
          "ts": at(hours)}
    return eng.step(orjson.dumps(ev), user.encode(), None, budget)


@pytest.mark.parametrize("price,action", [(0.0, "pct20_min80"), (0.05, "pct10"),
                                           (0.2, "none")])
def test_the_decision_takes_q_minus_price_times_cost(price, action):
    eng = fixed_engine(exploration="greedy")
    r = decide(eng, on_the_line(6.0, integral=price))  # on the line: lambda = the integral
    d = r.decision
    assert d.shadow_price == pytest.approx(price)
    assert d.action == action and d.propensity == 1.0
    assert d.q_values == tuple(Q)  # the model's values are logged; the price beside them
    if action != "none":
        assert r.budget.spent == pytest.approx(SHARE * 0.25 + d.cost)


@pytest.mark.parametrize("strategy", ["epsilon", "softmax"])
def test_propensities_are_those_of_the_priced_policy(strategy):
    eng = fixed_engine(exploration=strategy, epsilon_start=0.3, epsilon_end=0.3,
                       temperature=0.1)
    price = 0.05
    costs = np.asarray(CAT.costs())
    scores = np.asarray(Q) - price * costs
    if strategy == "epsilon":
        p = np.full(len(Q), 0.3 / len(Q))
        p[int(np.argmax(scores))] += 0.7
    else:
        z = np.exp((scores - scores.max()) / 0.1)
        p = z / z.sum()
    assert p.sum() == pytest.approx(1.0)
    counts = np.zeros(len(Q))
    for i in range(400):
        d = decide(eng, on_the_line(6.0, integral=price), user=f"u{i}").decision
        assert d.shadow_price == pytest.approx(price)
        assert d.propensity == pytest.approx(p[d.action_index])
        assert d.explored == (d.action_index != int(np.argmax(scores)))
        counts[d.action_index] += 1
    # the draws follow the logged (priced) probabilities
    assert np.abs(counts / 400 - p).max() < 0.08


def test_the_hard_mask_stays_the_last_line():
    eng = fixed_engine(exploration="greedy")
    b = replace(on_the_line(6.0), spent=2 * SHARE / 2 - 3)  # 3 left: no coupon fits
    d = decide(eng, b).decision
    assert d.action == "none" and "budget" in d.blocked_by
    assert d.shadow_price > 1.0  # far ahead of the line


def test_the_decision_log_record_carries_the_price_and_validates():
    eng = fixed_engine(exploration="greedy")
    d = decide(eng, on_the_line(6.0, integral=0.05)).decision
    doc = d.to_doc()
    assert doc["shadow_price"] == pytest.approx(0.05)
    validator("decision-log")(doc)
    back = decode_decision(orjson.dumps(doc), b"u")
    assert back == d and back.to_doc() == doc
    # pacing off: no field at all (the bytes earlier releases wrote), and such records read
    off = DecisionEngine(CAT, dataclasses.replace(SHIPPED, pacing=None),
                         initial_model(CAT, (64, 64), 7))
    old = decide(off, BudgetShare()).decision
    assert old.shadow_price is None and "shadow_price" not in old.to_doc()
    validator("decision-log")(old.to_doc())
    assert decode_decision(orjson.dumps(old.to_doc()), b"u").shadow_price is None
    with pytest.raises(Exception):
        validator("decision-log")({**doc, "shadow_price": -1.0})


# ------------------------------------------------------------------ replays and batches
PACED = dict(BINDING, budget_per_period=400.0,
             pacing=PacingParams(kp=20.0, ki=40.0, max_price=2.0))


def test_step_batch_equals_one_at_a_time_with_pacing_on():
    items = messages()
    ref = same_in_batches(items, **PACED)
    prices = [r.decision.shadow_price for r in ref
              if not isinstance(r, Exception) and r.decision and not r.replayed]
    assert all(p is not None for p in prices)
    assert max(prices) > 0 and min(prices) == 0.0  # the price moved both ways


def test_a_replay_from_scratch_gives_the_same_prices_and_decisions():
    items = messages()

    def once():
        states, budgets, clocks = {}, {}, {}
        out = sequential(engine(trained_like_model(), **PACED), items, states, budgets,
                         clocks)
        return summary(out), [r.decision.shadow_price for r in out
                              if not isinstance(r, Exception) and r.decision], budgets

    a, b = once(), once()
    assert a == b and any(a[1])


def test_the_price_changes_decisions_on_the_same_stream():
    """With a binding budget, pacing on and off decide differently (and pacing spends more
    evenly, so fewer decisions find the budget gone)."""
    items = messages()
    off_kw = dict(PACED, pacing=None)
    runs = {}
    for name, kw in (("paced", PACED), ("off", off_kw)):
        states, budgets, clocks = {}, {}, {}
        runs[name] = sequential(engine(trained_like_model(), **kw), items, states, budgets,
                                clocks)
    acts = {n: [r.decision.action for r in rs if not isinstance(r, Exception) and r.decision]
            for n, rs in runs.items()}
    assert acts["paced"] != acts["off"]
    blocked = {n: sum("budget" in r.decision.blocked_by for r in rs
                      if not isinstance(r, Exception) and r.decision)
               for n, rs in runs.items()}
    assert blocked["paced"] < blocked["off"]


def test_the_decide_handler_exports_price_spend_and_target_per_partition():
    import asyncio

    from .test_decide_handler import batch, make

    h, _, budgets, _ = make()
    asyncio.run(h.handle(batch()))
    get = h.m.registry.get_sample_value
    for part in ("0", "1"):
        b = BudgetShares(budgets).get(int(part))
        assert b.paced_ts > 0  # the controller ran and its state is in the table
        assert get("streamagent_decision_budget_shadow_price", {"partition": part}) \
            == b.shadow_price
        assert get("streamagent_decision_budget_partition_spent", {"partition": part}) \
            == b.spent
        target = get("streamagent_decision_budget_partition_target", {"partition": part})
        assert 0 <= target < h.engine.p.budget_share


def test_the_pacing_benchmark_keeps_the_budget_and_logs_prices():
    from streamagent.bench.pacing import run

    paced = run("no-fatigue", "uniform", "paced", 40, 3, 1, budget=60.0, gamma=0.995)
    mask = run("no-fatigue", "uniform", "mask", 40, 3, 1, budget=60.0, gamma=0.995)
    for r in (paced, mask):
        by_day = np.zeros(4)
        for ts, cost in r.coupons:
            by_day[(ts - 1_767_225_600_000) // DAY_MS] += cost
        assert by_day.max() <= 60.0 + 1e-9 and r.spend > 0
    assert paced.prices and max(p for _, p in paced.prices) > 0 and not mask.prices


# ------------------------------------------------------------------ the traffic-shaped target
def _day_of_traffic(b: BudgetShare, day: int, hours: tuple[float, float], p=P) -> BudgetShare:
    """Triggers every 10 minutes between ``hours`` of ``day``, priced one by one."""
    for m in range(int(hours[0] * 6), int(hours[1] * 6)):
        b = pace(b, at(day * 24 + m / 6), DAY_MS, SHARE, p)
    return b


def test_the_target_follows_the_traffic_of_the_periods_before():
    from streamagent.core.pacing import target_of

    b = _day_of_traffic(BudgetShare(), 0, (8.0, 20.0))
    assert b.profile == () and sum(b.counts) == 72  # the first period: the straight line
    assert target_of(b, at(8.0), DAY_MS, P) == pytest.approx(8 / 24)
    b = pace(b, at(24 + 1.0), DAY_MS, SHARE, P)  # the next period starts: the profile folds
    assert len(b.profile) == 24 and sum(b.profile) == pytest.approx(1.0)
    assert sum(b.profile[:8]) == 0 and sum(b.profile[20:]) == 0
    w = P.line_weight
    for h, share_of_traffic in ((8.0, 0.0), (14.0, 0.5), (20.0, 1.0)):
        assert target_of(b, at(24 + h), DAY_MS, P) == pytest.approx(
            (1 - w) * share_of_traffic + w * h / 24, abs=1e-6)
    # a quiet morning with nothing spent is only the line's part behind: the price holds
    # most of its level, where the straight line would have pulled it to 0 by 8:00
    quiet = pace(replace(b, integral=0.3), at(24 + 7.9), DAY_MS, SHARE, P)
    by_line = pace(replace(b, integral=0.3, profile=()), at(24 + 7.9), DAY_MS, SHARE, P)
    assert quiet.shadow_price > 0.15 and by_line.shadow_price == 0.0
    # a second period of another shape (the trigger at 1:00 above, six at 12:00) is averaged
    # in with weight `memory`
    b = _day_of_traffic(b, 1, (12.0, 13.0))
    b = pace(b, at(48 + 1.0), DAY_MS, SHARE, P)
    assert b.profile[12] == pytest.approx(P.memory * 6 / 7 + (1 - P.memory) / 12)
    assert b.profile[1] == pytest.approx(P.memory / 7)


def test_the_line_only_with_no_bins_and_the_profile_survives_the_table():
    line = replace(P, bins=0)
    b = _day_of_traffic(BudgetShare(), 0, (8.0, 20.0), line)
    b = pace(b, at(25.0), DAY_MS, SHARE, line)
    assert b.profile == () and b.counts == ()
    shaped = pace(_day_of_traffic(BudgetShare(), 0, (8.0, 20.0)), at(25.0), DAY_MS, SHARE, P)
    table: dict = {}
    BudgetShares(table).put(3, shaped)
    assert BudgetShares(table).get(3) == shaped
    # a record written before the profile existed reads with none
    table[next(iter(table))] = b"492:12.5:0.25:0.5:1767229200000"
    old = BudgetShares(table).get(3)
    assert (old.period, old.spent, old.shadow_price, old.profile, old.counts) == (
        492, 12.5, 0.25, (), ())


# ------------------------------------------------------------------ the first period
DAYTIME = tuple([0.0] * 8 + [1.0] * 12 + [0.0] * 4)  # sessions per hour: 8:00-20:00


def test_the_prior_profile_setting_parses_normalises_and_resamples(monkeypatch):
    from pydantic import ValidationError

    from streamagent.config import Settings

    assert shipped().pacing_prior_profile == () and pacing_params(shipped()).prior == ()
    monkeypatch.setenv("STREAMAGENT_PACING_PRIOR_PROFILE", " 0, 1 ,3 ")
    s = Settings(_env_file=None)
    assert s.pacing_prior_profile == (0.0, 1.0, 3.0)
    # three 8-hour slices onto the 24 hours: each spread evenly over its hours, summing to 1
    prior = pacing_params(s).prior
    assert len(prior) == 24 and sum(prior) == pytest.approx(1.0)
    assert prior[:8] == pytest.approx([0.0] * 8)
    assert prior[8:16] == pytest.approx([1 / 32] * 8) and prior[16:] == pytest.approx([3 / 32] * 8)
    monkeypatch.setenv("STREAMAGENT_PACING_PRIOR_PROFILE", "[2, 2]")
    assert Settings(_env_file=None).pacing_prior_profile == (2.0, 2.0)
    # the same length as the bins: only normalised; fewer bins: slices summed
    assert pacing_params(shipped(pacing_prior_profile=DAYTIME)).prior == pytest.approx(
        [w / 12 for w in DAYTIME])
    assert prior_profile(DAYTIME, 12) == pytest.approx([0.0] * 4 + [1 / 6] * 6 + [0.0] * 2)
    assert prior_profile((1.0, 0.0), 4) == pytest.approx([0.5, 0.5, 0.0, 0.0])
    for bad in ("1,-1,2", "0,0,0", "1,two", "1,nan"):
        monkeypatch.setenv("STREAMAGENT_PACING_PRIOR_PROFILE", bad)
        with pytest.raises(ValidationError, match="pacing_prior_profile"):
            Settings(_env_file=None)
    monkeypatch.setenv("STREAMAGENT_PACING_PRIOR_PROFILE", "1,2")
    with pytest.raises(ValidationError, match="PACING_BINS > 0"):
        Settings(_env_file=None, pacing_bins=0)
    with pytest.raises(ValueError):
        prior_profile((1.0, -0.5), 24)


def test_the_prior_is_the_target_until_the_first_period_ends_then_seeds_the_profile():
    p = replace(P, prior=prior_profile(DAYTIME, 24))
    w = p.line_weight
    fresh = BudgetShare()
    # before any traffic, and through the first period: the prior, not the line
    assert target_of(fresh, at(8.0), DAY_MS, p) == pytest.approx(w * 8 / 24)
    assert target_of(fresh, at(14.0), DAY_MS, p) == pytest.approx((1 - w) * 0.5 + w * 14 / 24)
    assert target_of(fresh, at(14.0), DAY_MS, P) == pytest.approx(14 / 24)  # no prior: line
    # a quiet first morning with nothing spent is not behind the prior's target: with the
    # line it would be a third behind, the price pulled to 0
    b = pace(replace(fresh, integral=0.3), at(7.0), DAY_MS, SHARE, p)
    line = pace(replace(fresh, integral=0.3), at(7.0), DAY_MS, SHARE, P)
    assert b.profile == () and b.shadow_price > 0.15 and line.shadow_price == 0.0
    # the first period's traffic runs 12:00-16:00; its shape is averaged into the prior
    b = _day_of_traffic(BudgetShare(), 0, (12.0, 16.0), p)
    assert b.profile == () and target_of(b, at(14.0), DAY_MS, p) == pytest.approx(
        (1 - w) * 0.5 + w * 14 / 24)
    b = pace(b, at(24 + 1.0), DAY_MS, SHARE, p)
    m = p.memory
    assert len(b.profile) == 24 and sum(b.profile) == pytest.approx(1.0)
    assert b.profile[9] == pytest.approx((1 - m) / 12)  # the prior's part only
    assert b.profile[13] == pytest.approx((1 - m) / 12 + m / 4)
    assert b.profile[1] == 0.0 and b.profile[20] == 0.0
    # from now on the partition's own profile is the target, whatever the prior says
    other = replace(p, prior=prior_profile((1.0,) * 24, 24))
    assert target_of(b, at(24 + 14.0), DAY_MS, other) == target_of(b, at(24 + 14.0), DAY_MS, p)
    assert pace(b, at(24 + 5.0), DAY_MS, SHARE, other) == pace(b, at(24 + 5.0), DAY_MS, SHARE, p)
    # without a prior the first fold is that period's shape alone
    plain = pace(_day_of_traffic(BudgetShare(), 0, (12.0, 16.0)), at(25.0), DAY_MS, SHARE, P)
    assert plain.profile[9] == 0.0 and plain.profile[13] == pytest.approx(1 / 4)


def test_the_first_period_has_stronger_gains_and_the_later_ones_the_normal():
    p = replace(P, first_gain=3.0)
    b = BudgetShare(T0 // DAY_MS, SHARE * 0.2, integral=0.1, paced_ts=at(1.0))  # 15% ahead
    first = pace(b, at(2.0), DAY_MS, SHARE, p)
    e = 0.2 - 2 / 24
    assert first.integral == pytest.approx(0.1 + 3 * P.ki * e / 24)
    assert first.shadow_price == pytest.approx(3 * P.kp * e + first.integral)
    normal = pace(b, at(2.0), DAY_MS, SHARE, P)
    assert normal.shadow_price == pytest.approx(P.kp * e + 0.1 + P.ki * e / 24)
    # once the partition has a profile of its own: the normal gains
    later = replace(b, profile=tuple([1 / 24] * 24))
    assert pace(later, at(2.0), DAY_MS, SHARE, p) == pace(later, at(2.0), DAY_MS, SHARE, P)
    # and the first period ends with the fold: a day of traffic, then the next period
    b = _day_of_traffic(BudgetShare(), 0, (0.0, 24.0), p)
    b = pace(b, at(24.5), DAY_MS, SHARE, p)
    assert len(b.profile) == 24
    ahead = replace(b, spent=SHARE * 0.3)
    assert pace(ahead, at(25.0), DAY_MS, SHARE, p) == pace(ahead, at(25.0), DAY_MS, SHARE, P)


def test_a_replay_with_a_prior_gives_the_same_prices_and_the_prior_is_used():
    late = prior_profile([0.0] * 20 + [1.0] * 4, 24)  # traffic expected only 20:00-24:00
    kw = dict(PACED, pacing=replace(PACED["pacing"], prior=late, first_gain=3.0))
    items = messages()

    def once(**kw):
        states, budgets, clocks = {}, {}, {}
        out = sequential(engine(trained_like_model(), **kw), items, states, budgets, clocks)
        return [r.decision.shadow_price for r in out
                if not isinstance(r, Exception) and r.decision], budgets

    a, b = once(**kw), once(**kw)
    assert a == b
    assert a[0] != once(**PACED)[0]  # the prior (and the first-period gains) changed prices
    # spending before 20:00 is ahead of a late prior: the first period is priced higher
    no_prior = once(**dict(PACED, pacing=replace(PACED["pacing"], first_gain=3.0)))[0]
    assert np.mean(a[0][:100]) > np.mean(no_prior[:100])
    assert same_in_batches(items, **kw)
