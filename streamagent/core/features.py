"""State -> feature vector. Fixed length, named, bounded (log1p of counts and money)."""
from __future__ import annotations

import math

import numpy as np

from streamagent.core.state import N_CATEGORY_BUCKETS, UserState, coupons_in_window, decay

DAY_MS = 86_400_000
NEVER_DAYS = 365.0  # "never happened" is treated as a year ago, with a flag beside it

FEATURE_NAMES: tuple[str, ...] = (
    "bias", "log_events", "log_events_decayed", "log_sessions_decayed", "log_searches_decayed",
    "log_views_decayed", "log_spend_decayed", "log_purchases_decayed", "log_purchases",
    "log_days_since_purchase", "has_purchased", "log_days_since_first_seen", "log_cart_value",
    "log_cart_items", "coupons_in_cap_window", "log_days_since_coupon", "has_coupon",
    "redemption_rate", "log_coupons",
    *(f"interest_{i}" for i in range(N_CATEGORY_BUCKETS)),
    "hour_sin", "hour_cos",
    "trigger_session_start", "trigger_add_to_cart", "trigger_other",
    "device_mobile", "device_desktop", "device_other",
)
N_FEATURES = len(FEATURE_NAMES)


def _days(ts: int, then: int) -> float:
    return max(0, ts - then) / DAY_MS if then else NEVER_DAYS


def encode(state: UserState, ts: int, trigger_type: str, half_life_ms: int,
           cap_window_ms: int) -> np.ndarray:
    """Features of ``state`` as seen at event time ``ts`` (aggregates decayed to ts)."""
    k = decay(ts - state.last_ts, half_life_ms)
    l1p = math.log1p
    interest = state.interest
    total = sum(interest)
    shares = [x / total for x in interest] if total > 0 else [0.0] * N_CATEGORY_BUCKETS
    hour = (ts % DAY_MS) / 3_600_000
    ang = 2 * math.pi * hour / 24
    dev = state.device
    v = [
        1.0, l1p(state.n_events), l1p(state.d_events * k), l1p(state.d_sessions * k),
        l1p(state.d_searches * k), l1p(state.d_views * k), l1p(state.d_spend * k),
        l1p(state.d_purchases * k), l1p(state.n_purchases),
        l1p(_days(ts, state.last_purchase_ts)), float(state.n_purchases > 0),
        l1p(_days(ts, state.first_ts)), l1p(state.cart_value), l1p(state.cart_items),
        float(coupons_in_window(state, ts, cap_window_ms)),
        l1p(_days(ts, state.last_coupon_ts)), float(state.n_coupons > 0),
        (state.n_redeemed + 1) / (state.n_coupons + 2), l1p(state.n_coupons),
        *shares,
        math.sin(ang), math.cos(ang),
        float(trigger_type == "session_start"), float(trigger_type == "add_to_cart"),
        float(trigger_type not in ("session_start", "add_to_cart")),
        float(dev == "mobile"), float(dev == "desktop"), float(dev not in ("mobile", "desktop")),
    ]
    return np.asarray(v, dtype=np.float32)
