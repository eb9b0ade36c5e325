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
line it cannot follow. ``bins`` = 0 keeps the line always.

The first period. Until a partition's first period has ended it has no profile of its own:
the target then follows the ``prior`` profile (PACING_PRIOR_PROFILE: the shape the shop knows
from its analytics, resampled to ``bins`` slices), or the straight line when none is given,
and the first fold averages that period's shape into the prior (as into any profile before
it). The prior is a setting, not state: the BudgetShare holds a profile from the first fold
on, as before, and a replay with the same settings gives the same targets and prices. The
integral, too, starts at 0 in the first period, where later periods start from the price
carried over, so for the first period alone (no profile of its own yet, ``bins`` > 0) both
gains are multiplied by ``first_gain`` and the price finds its level within hours. Measured
on the simulated shop (docs/BENCHMARKS.md, pacing; seeds 1-4, both scenarios, uniform and
daytime traffic with the prior), the largest gap to the target in the first period was 11.5%
of the share with the normal gains (the spend ran ahead in the first hours), 6.7% with
``first_gain`` 2, 4.4% with 3 and 4.1% with 4; 3 is the smallest with a margin (stronger
gains make the price noisier, and the later periods were no closer). A configured starting
price was tried instead and not kept: it is in Q units, which a new shop cannot know, and it
helped less (seeds 1-2, uniform traffic: 7.6% with 0.1, 8.6% with 0.2, about the mean
price of the days after; 4.3% with ``first_gain`` 3).
"""
from __future__ import annotations

from dataclasses import dataclass

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
    # the traffic profile assumed until the partition has one of its own (``bins`` weights
    # summing to 1, see ``prior_profile``); empty: the straight line
    prior: tuple[float, ...] = ()
    # kp and ki are multiplied by this until the partition has a traffic profile of its own
    # (its first period): the integral starts at 0 and must find the price level within hours
    first_gain: float = 1.0


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


def prior_profile(weights, bins: int) -> tuple[float, ...]:
    """Non-negative traffic weights per slice of the period (any number of slices) as a
    profile of ``bins`` slices summing to 1: resampled through the cumulative curve (so 24
    hourly weights serve 48 half-hour slices, or 12 two-hour ones), normalised. Empty weights:
    () (the straight line). ValueError for negative, non-finite or all-zero weights, or for
    weights with ``bins`` = 0."""
    w = np.asarray(tuple(weights), dtype=float)
    if not w.size:
        return ()
    if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError("a traffic profile needs finite, non-negative weights, not all 0")
    if bins <= 0:
        raise ValueError("a traffic profile needs PACING_BINS > 0 (0: the straight line)")
    cum = np.concatenate(([0.0], np.cumsum(w) / w.sum()))
    if len(w) != bins:
        cum = np.interp(np.linspace(0.0, 1.0, bins + 1), np.linspace(0.0, 1.0, len(w) + 1),
                        cum)
    shape = np.diff(cum).clip(0.0)
    return tuple(float(v) for v in shape / shape.sum())


def _profile(b: BudgetShare, p: PacingParams) -> tuple[float, ...]:
    """The profile the partition's target follows: its own, else the prior (or (): the line)."""
    if not p.bins:
        return ()
    return b.profile if len(b.profile) == p.bins else p.prior


def target_of(b: BudgetShare, now: int, period_ms: int, p: PacingParams) -> float:
    """The target fraction of the partition's share by ``now``, by its own profile (or the
    prior until it has one)."""
    return target_fraction(now, period_ms, _profile(b, p), p.line_weight)


def _fold(b: BudgetShare, p: PacingParams) -> tuple[float, ...]:
    """The profile after the period whose counts ``b`` holds: that period's shape averaged
    into the partition's profile, or into the prior when it has none yet."""
    n = sum(b.counts)
    if not n or len(b.counts) != p.bins:
        return b.profile
    shape = np.asarray(b.counts, dtype=float) / n
    before = _profile(b, p)
    if before:
        shape = (1.0 - p.memory) * np.asarray(before) + p.memory * shape
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
    if not p.bins:
        shaped, kp, ki = (), p.kp, p.ki
    elif len(profile) == p.bins:
        shaped, kp, ki = profile, p.kp, p.ki
    else:  # the partition's first period: the prior (or the line), stronger gains
        shaped, kp, ki = p.prior, p.kp * p.first_gain, p.ki * p.first_gain
    e = (spent - share * target_fraction(now, period_ms, shaped, p.line_weight)) / share
    dt = min(1.0, max(0.0, (now - paced_ts) / period_ms)) if paced_ts >= 0 else 0.0
    integral = min(p.max_price, max(0.0, b.integral + ki * e * dt))
    price = min(p.max_price, max(0.0, kp * e + integral))
    return BudgetShare(period, spent, price, integral, max(paced_ts, now), profile, counts)
