"""Budget pacing: a shadow price on coupon cost, set by a feedback controller on event time.

The hard budget mask (core/constraints.py) stops coupons once a partition's share of the
period's budget is gone: a policy that would spend twice the budget spends it all in the first
half of the period and then sends nothing, whatever the later users are worth. Pacing spreads
the spend instead: the policy scores each action by

    Q(s, a) - lambda x cost(a)

(cost: the budget the coupon reserves, from the catalog; lambda in Q units per currency unit:
with the profit reward, lambda = 0.1 means a coupon must be worth 10% of its cost more than
'no coupon'). lambda >= 0 is the shadow price of the budget constraint (the Lagrange
multiplier of "spend <= share"), found by feedback rather than solved for:

    target(t) = share x (t - period start) / period          (a straight line over the period)
    e(t)      = (spent(t) - target(t)) / share               (ahead of the line: e > 0)
    I        <- clip(I + ki x e x dt / period, 0, max_price)  (dt: event time since last update)
    lambda    = clip(kp x e + I, 0, max_price)

A PI controller: spending ahead of the line raises lambda (fewer, cheaper coupons), behind it
lowers it. Clipping the integral to [0, max_price] is the anti-windup: a long stretch behind
the line (a quiet night) cannot store up a negative price that would take hours to unwind.
A new period resets the spend, and the integral is carried over: the price that held
yesterday's spend on the line is the best first guess for today's. The hard mask stays the
last line of defence.

All of it is state of the partition (core/contracts.py BudgetShare), updated at each decision
on the partition's robust event time (never the wall clock), so it moves with the partition on
rebalance and a replay gives the same prices and decisions.

The target curve follows the partition's traffic (``bins`` > 0, the default): the controller
counts the triggers it prices in each of ``bins`` slices of the period, and at the end of a
period folds that period's shape into a traffic profile (an exponential average over periods,
weight ``memory`` for the newest). The target by time t is the profile's cumulative share of
the period's triggers up to t, blended with the straight line (weight ``line_weight``) so a
slice that was empty before still gets some budget:

    target(t) = share x [(1 - w) x profile_cum(t) + w x (t - period start) / period]

A shop busy 8:00-20:00 thus spends nothing overnight by design instead of falling behind a
line it cannot follow. Until a first period has ended there is no profile, and the target is
the straight line (docs/DECISIONS.md, docs/BENCHMARKS.md). ``bins`` = 0 keeps the line always.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from streamagent.core.contracts import BudgetShare


@dataclass(frozen=True)
class PacingParams:
    kp: float  # lambda per unit of error (error: fraction of the share ahead of the line)
    ki: float  # lambda per unit of error sustained for a whole period
    max_price: float  # lambda's upper bound
    bins: int = 24  # slices of the period the traffic profile counts (0: the straight line)
    memory: float = 0.5  # weight of the newest period in the profile's average
    line_weight: float = 0.1  # the straight line's share of the target curve


def target_fraction(now: int, period_ms: int, profile: tuple[float, ...] = (),
                    line_weight: float = 0.0) -> float:
    """How much of the share should be spent by ``now`` (0-1): the straight line, or with a
    traffic ``profile`` (shares of the period's triggers per slice, summing to 1) its
    cumulative share, blended with the line."""
    x = (now % period_ms) / period_ms
    if not profile:
        return x
    pos = x * len(profile)
    k = int(pos)
    cum = sum(profile[:k]) + (pos - k) * (profile[k] if k < len(profile) else 0.0)
    return (1.0 - line_weight) * cum + line_weight * x


def target_of(b: BudgetShare, now: int, period_ms: int, p: PacingParams) -> float:
    """The target fraction of the partition's share by ``now``, by its own profile."""
    profile = b.profile if p.bins and len(b.profile) == p.bins else ()
    return target_fraction(now, period_ms, profile, p.line_weight)


def _fold(b: BudgetShare, p: PacingParams) -> tuple[float, ...]:
    """The profile after the period whose counts ``b`` holds."""
    n = sum(b.counts)
    if not n or len(b.counts) != p.bins:
        return b.profile
    shape = np.asarray(b.counts, dtype=float) / n
    if len(b.profile) == p.bins:
        shape = (1.0 - p.memory) * np.asarray(b.profile) + p.memory * shape
    return tuple(float(v) for v in shape / shape.sum())


def pace(b: BudgetShare, now: int, period_ms: int, share: float,
         p: PacingParams) -> BudgetShare:
    """The partition's budget share with the controller updated to event time ``now`` (the
    partition's robust stream time) for one more trigger: the period rolled over if ``now`` is
    in a later one (spend reset, price carried, the traffic profile updated), the trigger
    counted in its slice, then the error against the target and a new shadow price. (One
    BudgetShare built per call: this runs at every decision.)"""
    period, spent, paced_ts = now // period_ms, b.spent, b.paced_ts
    profile, counts = b.profile, b.counts
    if period != b.period:
        # a new period: nothing spent yet; the integral (the price level) carries over, and
        # the integral counts error from the period's start only
        profile = _fold(b, p) if b.period >= 0 else profile
        spent, paced_ts, counts = 0.0, max(paced_ts, period * period_ms), ()
    if p.bins:
        slots = list(counts) if len(counts) == p.bins else [0.0] * p.bins
        slots[min(p.bins - 1, int((now % period_ms) * p.bins // period_ms))] += 1.0
        counts = tuple(slots)
    if share <= 0:
        return BudgetShare(period, spent, p.max_price, b.integral, now, profile, counts)
    shaped = profile if p.bins and len(profile) == p.bins else ()
    e = (spent - share * target_fraction(now, period_ms, shaped, p.line_weight)) / share
    dt = min(1.0, max(0.0, (now - paced_ts) / period_ms)) if paced_ts >= 0 else 0.0
    integral = min(p.max_price, max(0.0, b.integral + p.ki * e * dt))
    price = min(p.max_price, max(0.0, p.kp * e + integral))
    return BudgetShare(period, spent, price, integral, max(paced_ts, now), profile, counts)
