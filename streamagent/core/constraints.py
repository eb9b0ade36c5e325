"""Frequency caps and the coupon budget, both on event time, as action masks."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streamagent.core.state import UserState, coupons_in_window


@dataclass(frozen=True)
class CapParams:
    max_coupons: int = 2
    window_ms: int = 7 * 86_400_000
    min_gap_ms: int = 86_400_000


@dataclass(frozen=True, slots=True)
class BudgetState:
    """Spend of one partition's share of the budget in one event-time period."""

    period: int = -1
    spent: float = 0.0


def period_of(ts: int, period_ms: int) -> int:
    return ts // period_ms


def budget_remaining(b: BudgetState, period: int, share: float) -> float:
    # a new period starts with the full share; a late event from an older period is
    # judged against the current period's spend (budgets never reopen the past)
    return share if period > b.period else share - b.spent


def budget_spend(b: BudgetState, period: int, cost: float) -> BudgetState:
    if period > b.period:
        return BudgetState(period, cost)
    return BudgetState(b.period, b.spent + cost)


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
