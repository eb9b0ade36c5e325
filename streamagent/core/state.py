"""Per-user state as a value: ``apply(state, event, params) -> state``.

Time-decayed aggregates are kept at a reference time (the user's latest event time) as
sum_i w_i * 2^-((T - t_i) / half_life). An event older than T is added with its own decay
weight instead of rewinding T, so the sums do not depend on arrival order, and everything
runs on event time: a month replayed in minutes gives the same state as live traffic.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field, replace

import orjson

from streamagent.core.contracts import Decision, UserEvent

N_CATEGORY_BUCKETS = 8
RECENT_DECISIONS = 4  # decisions kept for re-emission when a crash replays their triggers


@dataclass(frozen=True)
class StateParams:
    half_life_ms: int
    cap_window_ms: int


@dataclass(frozen=True, slots=True)
class UserState:
    user_id: str
    first_ts: int = 0
    last_ts: int = 0
    # (partition, offset) of the last applied event: a replayed event is recognised and not
    # applied twice, which makes state updates idempotent under at-least-once delivery.
    last_partition: int = -1
    last_offset: int = -1
    n_events: int = 0
    n_sessions: int = 0
    n_purchases: int = 0
    total_spend: float = 0.0
    last_session_ts: int = 0
    last_purchase_ts: int = 0
    # decayed aggregates, referenced to last_ts
    d_events: float = 0.0
    d_sessions: float = 0.0
    d_searches: float = 0.0
    d_views: float = 0.0
    d_spend: float = 0.0
    d_purchases: float = 0.0
    interest: tuple[float, ...] = (0.0,) * N_CATEGORY_BUCKETS
    cart_items: int = 0
    cart_value: float = 0.0
    last_price: float = 0.0
    device: str = ""
    geo: str = ""
    # coupons
    coupon_ts: tuple[int, ...] = ()  # issue times inside the cap window
    n_coupons: int = 0
    n_redeemed: int = 0
    last_coupon_ts: int = 0
    # an exploration run in progress: its action, and how many more decisions it lasts
    explore_action: int = 0
    explore_left: int = 0
    # recent decisions, newest last (stored as their decision-log documents)
    decisions: tuple[Decision, ...] = field(default=())

    def to_bytes(self) -> bytes:
        doc = {name: getattr(self, name) for name in self.__slots__}
        doc["decisions"] = [d.to_doc() for d in self.decisions]
        return orjson.dumps(doc)

    @classmethod
    def from_bytes(cls, raw: bytes) -> "UserState":
        doc = orjson.loads(raw)
        doc["interest"] = tuple(doc["interest"])
        doc["coupon_ts"] = tuple(doc["coupon_ts"])
        doc["decisions"] = tuple(Decision.from_doc(d) for d in doc["decisions"])
        return cls(**doc)


def category_bucket(category: str) -> int:
    # crc32 rather than hash(): Python's str hash is salted per process, and every worker
    # (and every replay) must bucket a category the same way.
    return zlib.crc32(category.encode()) % N_CATEGORY_BUCKETS


def decay(dt_ms: int, half_life_ms: int) -> float:
    return 0.5 ** (dt_ms / half_life_ms) if dt_ms > 0 else 1.0


def is_replay(state: UserState, partition: int, offset: int) -> bool:
    return partition == state.last_partition and offset <= state.last_offset


def apply(state: UserState, ev: UserEvent, p: StateParams,
          partition: int = -1, offset: int = -1) -> UserState:
    """Fold one event into the user's state. Pure: the caller writes the result back."""
    if ev.ts >= state.last_ts:
        k, w, ref = decay(ev.ts - state.last_ts, p.half_life_ms), 1.0, ev.ts
    else:  # late event: keep the reference time, add it with its own decay
        k, w, ref = 1.0, decay(state.last_ts - ev.ts, p.half_life_ms), state.last_ts
    t = ev.type
    interest = state.interest
    if k != 1.0:
        interest = tuple(x * k for x in interest)
    if ev.category:
        b = category_bucket(ev.category)
        bump = w * (2.0 if t in ("add_to_cart", "purchase") else 1.0)
        interest = interest[:b] + (interest[b] + bump,) + interest[b + 1:]
    changes: dict = dict(
        first_ts=min(state.first_ts, ev.ts) if state.n_events else ev.ts,
        last_ts=ref, n_events=state.n_events + 1,
        d_events=state.d_events * k + w,
        d_sessions=state.d_sessions * k + (w if t == "session_start" else 0.0),
        d_searches=state.d_searches * k + (w if t == "search" else 0.0),
        d_views=state.d_views * k + (w if t == "page_view" else 0.0),
        d_spend=state.d_spend * k, d_purchases=state.d_purchases * k,
        interest=interest,
    )
    if partition >= 0:
        changes.update(last_partition=partition, last_offset=offset)
    if ev.device:
        changes["device"] = ev.device
    if ev.geo:
        changes["geo"] = ev.geo
    if ev.price is not None:
        changes["last_price"] = ev.price
    if t == "session_start":
        changes.update(n_sessions=state.n_sessions + 1,
                       last_session_ts=max(state.last_session_ts, ev.ts))
    elif t == "add_to_cart":
        q = ev.quantity or 1
        changes.update(cart_items=state.cart_items + q,
                       cart_value=state.cart_value + q * (ev.price or 0.0))
    elif t == "remove_from_cart":
        q = ev.quantity or 1
        changes.update(cart_items=max(0, state.cart_items - q),
                       cart_value=max(0.0, state.cart_value - q * (ev.price or 0.0)))
    elif t == "purchase":
        amount = ev.amount if ev.amount is not None else state.cart_value
        changes.update(n_purchases=state.n_purchases + 1, total_spend=state.total_spend + amount,
                       last_purchase_ts=max(state.last_purchase_ts, ev.ts),
                       d_spend=changes["d_spend"] + w * amount,
                       d_purchases=changes["d_purchases"] + w,
                       cart_items=0, cart_value=0.0)
        if ev.coupon_code:
            changes["n_redeemed"] = state.n_redeemed + 1
    return replace(state, **changes)


def coupons_in_window(state: UserState, ts: int, window_ms: int) -> int:
    return sum(1 for c in state.coupon_ts if ts - window_ms < c <= ts)


def record_decision(state: UserState, decision: Decision, coupon_issued: bool,
                    p: StateParams) -> UserState:
    """Remember a decision (and the coupon it issued) in the user's state."""
    ts = decision.ts
    coupon_ts = state.coupon_ts
    changes: dict = {"decisions": (state.decisions + (decision,))[-RECENT_DECISIONS:]}
    if coupon_issued:
        coupon_ts = tuple(c for c in coupon_ts if c > ts - p.cap_window_ms) + (ts,)
        changes.update(coupon_ts=coupon_ts, n_coupons=state.n_coupons + 1,
                       last_coupon_ts=max(state.last_coupon_ts, ts))
    return replace(state, **changes)


def find_decision(state: UserState, trigger_event_id: str) -> Decision | None:
    for d in reversed(state.decisions):
        if d.trigger_event_id == trigger_event_id:
            return d
    return None
