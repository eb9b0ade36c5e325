"""Frequency caps and the coupon budget, both on event time, as action masks."""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from streamagent.core.contracts import BudgetShare
from streamagent.core.state import UserState, coupons_in_window


@dataclass(frozen=True)
class CapParams:
    max_coupons: int
    window_ms: int
    min_gap_ms: int


def period_of(ts: int, period_ms: int) -> int:
    return ts // period_ms


def budget_remaining(b: BudgetShare, period: int, share: float) -> float:
    # ``period`` is the partition's current period (of its robust stream time, never of one
    # record's ts, see core/eventtime.py): another period than the stored one starts afresh
    return share if period != b.period else share - b.spent


def budget_spend(b: BudgetShare, period: int, cost: float) -> BudgetShare:
    # replace(): the pacing state (core/pacing.py) rides along unchanged
    if period != b.period:
        return replace(b, period=period, spent=cost)
    return replace(b, spent=b.spent + cost)


def action_mask(state: UserState, ts: int, costs: list[float], caps: CapParams,
                remaining: float) -> tuple[np.ndarray, list[str]]:
    """Which actions are allowed (action 0, 'no coupon', always is) and what blocked others."""
    n = len(costs)
    allowed = np.ones(n, dtype=bool)
    blocked: list[str] = []
    if coupons_in_window(state, ts, caps.window_ms) >= caps.max_coupons:
        allowed[1:] = False
        blocked.append("frequency_cap")
    elif state.last_coupon_ts and ts - state.last_coupon_ts < caps.min_gap_ms:
        allowed[1:] = False
        blocked.append("min_gap")
    else:
        over = [i for i in range(1, n) if costs[i] > remaining + 1e-9]
        if over:
            allowed[over] = False
            blocked.append("budget")
    return allowed, blocked
