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

The straight line is simple and honest, and wrong for traffic that is not spread evenly over
the period (a shop busy 8:00-20:00 with a 24-hour period starts each morning a third behind
it): see docs/DECISIONS.md and docs/BENCHMARKS.md.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from streamagent.core.contracts import BudgetShare


@dataclass(frozen=True)
class PacingParams:
    kp: float  # lambda per unit of error (error: fraction of the share ahead of the line)
    ki: float  # lambda per unit of error sustained for a whole period
    max_price: float  # lambda's upper bound


def target_fraction(now: int, period_ms: int) -> float:
    """How much of the share the line says should be spent by ``now`` (0-1)."""
    return (now % period_ms) / period_ms


def pace(b: BudgetShare, now: int, period_ms: int, share: float,
         p: PacingParams) -> BudgetShare:
    """The partition's budget share with the controller updated to event time ``now`` (the
    partition's robust stream time): the period rolled over if ``now`` is in a later one (spend
    reset, price carried), then the error against the line and a new shadow price."""
    period = now // period_ms
    if period != b.period:
        # a new period: nothing spent yet; the integral (the price level) carries over, and
        # the integral counts error from the period's start only
        b = replace(b, period=period, spent=0.0, paced_ts=max(b.paced_ts, period * period_ms))
    if share <= 0:
        return replace(b, shadow_price=p.max_price, paced_ts=now)
    e = (b.spent - share * target_fraction(now, period_ms)) / share
    dt = min(1.0, max(0.0, (now - b.paced_ts) / period_ms)) if b.paced_ts >= 0 else 0.0
    integral = min(p.max_price, max(0.0, b.integral + p.ki * e * dt))
    price = min(p.max_price, max(0.0, p.kp * e + integral))
    return replace(b, shadow_price=price, integral=integral, paced_ts=max(b.paced_ts, now))
