"""State -> feature vector. Fixed length, named, bounded, and stationary.

Every feature stays in a fixed range whatever the user's age: no lifetime counters (a user's
event count only grows, so a network trained on last month's users would be extrapolating on
this month's), decayed aggregates instead, tenure capped. Log features are divided by a fixed
scale so that typical values fall in [0, 1]: unscaled, the few features that reach 5 or 6 (log
days since an event) dominate the first layer, and learning the small differences between
coupons got noticeably worse (docs/BENCHMARKS.md).
"""
from __future__ import annotations

import math

import numpy as np

from streamagent.core.state import N_CATEGORY_BUCKETS, UserState, coupons_in_window, decay
from streamagent.units import DAY_MS, HOUR_MS

NEVER_DAYS = 365.0  # "never happened" is treated as a year ago, with a flag beside it
TENURE_CAP_DAYS = 90.0
# Recent coupon pressure: coupons within the cap window, each decayed with this half-life.
# Fatigue builds with every coupon and fades over days without one; this tracks it.
COUPON_PRESSURE_HALF_LIFE_MS = 2 * DAY_MS
PRESSURE_SCALE = 3.0  # the coupon_pressure feature is the pressure divided by this
LOG_SCALE = 6.0  # log1p(365) = 5.9: a year of days, or hundreds of decayed events, maps to ~1

FEATURE_NAMES: tuple[str, ...] = (
    "bias", "log_events_decayed", "log_sessions_decayed", "log_searches_decayed",
    "log_views_decayed", "log_spend_decayed", "log_purchases_decayed",
    "log_days_since_purchase", "has_purchased", "tenure", "log_cart_value", "log_cart_items",
    "coupons_in_cap_window", "coupon_pressure", "log_days_since_coupon", "has_coupon",
    "redemption_rate",
    *(f"interest_{i}" for i in range(N_CATEGORY_BUCKETS)),
    "hour_sin", "hour_cos",
    "trigger_session_start", "trigger_add_to_cart", "trigger_other",
    "device_mobile", "device_desktop", "device_other",
)
N_FEATURES = len(FEATURE_NAMES)
PRESSURE_INDEX = FEATURE_NAMES.index("coupon_pressure")


def coupon_pressure(x: np.ndarray) -> float:
    """The user's recent coupon pressure (coupons decayed with a 2-day half-life), read back
    from an encoded feature vector."""
    return float(x[PRESSURE_INDEX]) * PRESSURE_SCALE


def _days(ts: int, then: int) -> float:
    return max(0, ts - then) / DAY_MS if then else NEVER_DAYS


def encode(state: UserState, ts: int, trigger_type: str, half_life_ms: int,
           cap_window_ms: int) -> np.ndarray:
    """Features of ``state`` as seen at event time ``ts`` (aggregates decayed to ts)."""
    k = decay(ts - state.last_ts, half_life_ms)
    s = 1.0 / LOG_SCALE

    def lg(x: float) -> float:
        return math.log1p(x) * s

    interest = state.interest
    total = sum(interest)
    shares = [x / total for x in interest] if total > 0 else [0.0] * N_CATEGORY_BUCKETS
    hour = (ts % DAY_MS) / HOUR_MS
    ang = 2 * math.pi * hour / 24
    dev = state.device
    in_window = coupons_in_window(state, ts, cap_window_ms)
    pressure = sum(decay(ts - c, COUPON_PRESSURE_HALF_LIFE_MS) for c in state.coupon_ts if c <= ts)
    v = [
        1.0, lg(state.d_events * k), lg(state.d_sessions * k), lg(state.d_searches * k),
        lg(state.d_views * k), lg(state.d_spend * k), lg(state.d_purchases * k),
        lg(_days(ts, state.last_purchase_ts)), float(state.n_purchases > 0),
        min(_days(ts, state.first_ts) if state.first_ts else 0.0, TENURE_CAP_DAYS) / TENURE_CAP_DAYS,
        lg(state.cart_value), lg(state.cart_items),
        min(in_window, 7) / 7.0, pressure / PRESSURE_SCALE,
        lg(_days(ts, state.last_coupon_ts)), float(state.n_coupons > 0),
        (state.n_redeemed + 1) / (state.n_coupons + 2),
        *shares,
        math.sin(ang), math.cos(ang),
        float(trigger_type == "session_start"), float(trigger_type == "add_to_cart"),
        float(trigger_type not in ("session_start", "add_to_cart")),
        float(dev == "mobile"), float(dev == "desktop"), float(dev not in ("mobile", "desktop")),
    ]
    return np.asarray(v, dtype=np.float32)
