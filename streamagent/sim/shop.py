"""A seeded simulated shop whose users react to coupons with delay and fatigue.

Each user belongs to a segment (purchase propensity, basket, price sensitivity, category,
device, geo) and has a latent fatigue level 0..F-1. Once a day of event time the user starts a
session (a decision point). The coupon shown (or none) sets the chance of an order that day:

    p(order) = base_s * (1 - conditioning * f/(F-1))  +  uplift_s(coupon) * (1 - wear * f/(F-1))

A coupon raises fatigue by one level; a day without one lets it fall by one level with
probability `recovery`. So coupons buy orders today and cost full-price orders later: with
fatigue on, the best policy is not the myopic one. Orders arrive log-normally delayed after the
decision (hours), and their profit is margin * basket - the discount actually redeemed.

The same dynamics, per segment, form a small finite MDP over the fatigue level; `mdp()` builds
it so value iteration gives the optimal long-run profit to compare learners against.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from streamagent.core.catalog import Catalog
from streamagent.core.policy import greedy_actions
from streamagent.sim.mdp import average_reward, history_optimum, value_iteration
from streamagent.units import DAY_MS, HOUR_MS


CATEGORIES = ("shoes", "books", "electronics", "grocery", "toys", "beauty", "garden", "sports")
DEVICES = ("mobile", "desktop", "tablet")


@dataclass(frozen=True)
class Behaviour:
    """How a latent type shows in its sessions, noisily: it has to be inferred from many."""

    views: float  # mean page views per session after the first (Poisson)
    searches: float  # mean searches per session (Poisson)
    focus: float  # chance a view or search is in the type's own category (else any category)
    device_loyalty: float  # chance a session is on the type's usual device (else any device)


@dataclass(frozen=True)
class Segment:
    name: str
    share: float  # of the population
    base: float  # daily full-price order probability at fatigue 0
    basket: float  # order amount
    sensitivity: float  # how much a coupon's value moves this segment
    category: str
    device: str
    geo: str
    # None: one page view in the segment's category on its device, every session (the type
    # can be read off a single session)
    behaviour: Behaviour | None = None


@dataclass(frozen=True)
class Scenario:
    name: str
    segments: tuple[Segment, ...]
    fatigue_levels: int = 4
    conditioning: float = 0.6  # full-price propensity lost at max fatigue
    wear: float = 0.5  # coupon uplift lost at max fatigue
    recovery: float = 0.35  # chance per coupon-free day that fatigue falls one level
    margin: float = 0.3
    delay_median_h: float = 6.0
    delay_sigma: float = 0.8
    fatigue: bool = True


SEGMENTS = (
    Segment("loyal", 0.25, base=0.30, basket=70.0, sensitivity=0.4, category="grocery",
            device="desktop", geo="urban"),
    Segment("bargain", 0.35, base=0.05, basket=45.0, sensitivity=2.2, category="toys",
            device="mobile", geo="suburban"),
    Segment("big_basket", 0.15, base=0.10, basket=130.0, sensitivity=1.2, category="electronics",
            device="desktop", geo="urban"),
    Segment("casual", 0.25, base=0.08, basket=35.0, sensitivity=1.0, category="books",
            device="tablet", geo="rural"),
)


# Pulse: the optimum times its coupons. Every coupon conditions a user (one level up), a
# coupon-free day lowers conditioning by one level with probability `recovery`; conditioning
# costs full-price orders and wears a coupon's effect down almost entirely (wear 0.9). A coupon
# pays only to an unconditioned user, so for three of the four types the optimum sends one,
# rests the user until conditioning is gone, and sends again; the myopic optimum keeps them
# conditioned. Types show only through noisy behaviour (categories, searches, devices, orders).
PULSE_SEGMENTS = (
    Segment("regular", 0.20, base=0.15, basket=60.0, sensitivity=0.3, category="grocery",
            device="desktop", geo="urban", behaviour=Behaviour(1.5, 0.3, 0.5, 0.6)),
    Segment("deal_seeker", 0.40, base=0.03, basket=50.0, sensitivity=3.0, category="toys",
            device="mobile", geo="suburban", behaviour=Behaviour(2.0, 2.0, 0.4, 0.7)),
    Segment("big_spender", 0.20, base=0.06, basket=120.0, sensitivity=1.5,
            category="electronics", device="desktop", geo="urban",
            behaviour=Behaviour(0.8, 0.8, 0.5, 0.7)),
    Segment("occasional", 0.20, base=0.06, basket=35.0, sensitivity=1.2, category="books",
            device="tablet", geo="rural", behaviour=Behaviour(0.5, 0.3, 0.3, 0.6)),
)


def scenario(name: str) -> Scenario:
    if name == "fatigue":
        return Scenario("fatigue", SEGMENTS)
    if name == "no-fatigue":
        return Scenario("no-fatigue", SEGMENTS, conditioning=0.0, wear=0.0, fatigue=False)
    if name == "pulse":
        return Scenario("pulse", PULSE_SEGMENTS, fatigue_levels=4, conditioning=0.6, wear=0.9,
                        recovery=0.5)
    raise ValueError(f"unknown scenario {name!r}; choose one of {', '.join(SCENARIOS)}")


SCENARIOS = ("fatigue", "no-fatigue", "pulse")


def uplift(seg: Segment, catalog: Catalog, action: int) -> float:
    """Extra daily order probability a coupon gives at fatigue 0."""
    c = catalog.coupon(action)
    if c is None or seg.basket < c.min_spend:
        return 0.0
    value = c.discount_on(seg.basket, catalog.shipping_cost)
    # diminishing returns in the coupon's value relative to the basket
    return 0.25 * seg.sensitivity * (1 - np.exp(-4 * value / seg.basket))


def order_prob(sc: Scenario, seg: Segment, catalog: Catalog, f: int, action: int) -> float:
    frac = f / (sc.fatigue_levels - 1)
    p = seg.base * (1 - sc.conditioning * frac) + uplift(seg, catalog, action) * (1 - sc.wear * frac)
    return float(min(0.95, max(0.0, p)))


def order_profit(sc: Scenario, seg: Segment, catalog: Catalog, action: int) -> tuple[float, float]:
    """(profit, discount) of an order of this segment under this action."""
    c = catalog.coupon(action)
    discount = c.discount_on(seg.basket, catalog.shipping_cost) if c else 0.0
    return sc.margin * seg.basket - discount, discount


def expected_profit(sc: Scenario, seg: Segment, catalog: Catalog, f: int, action: int) -> float:
    """Expected profit of one decision: what the benchmarks and the demo report. It ranks
    policies like sampled profit does, with far less noise (an order is 0 or a whole basket)."""
    return order_prob(sc, seg, catalog, f, action) * order_profit(sc, seg, catalog, action)[0]


def next_fatigue_probs(sc: Scenario, f: int, action: int) -> dict[int, float]:
    top = sc.fatigue_levels - 1
    if not sc.fatigue:
        return {f: 1.0}
    if action:
        return {min(top, f + 1): 1.0}
    if f == 0:
        return {0: 1.0}
    return {f - 1: sc.recovery, f: 1 - sc.recovery}


@dataclass
class MDP:
    """P[a, s, s'] and R[a, s] (expected profit per day) for one segment."""

    P: np.ndarray
    R: np.ndarray


def mdp(sc: Scenario, seg: Segment, catalog: Catalog) -> MDP:
    n_s, n_a = sc.fatigue_levels, catalog.n_actions
    P = np.zeros((n_a, n_s, n_s))
    R = np.zeros((n_a, n_s))
    for a in range(n_a):
        profit, _ = order_profit(sc, seg, catalog, a)
        for f in range(n_s):
            R[a, f] = order_prob(sc, seg, catalog, f, a) * profit
            for f2, p in next_fatigue_probs(sc, f, a).items():
                P[a, f, f2] += p
    return MDP(P, R)


@dataclass
class SimUser:
    user_id: str
    segment: Segment
    fatigue: int = 0


@dataclass
class Shop:
    """The population, stepping one day of event time at a time."""

    scenario: Scenario
    catalog: Catalog
    n_users: int
    seed: int = 1
    start_ts: int = 1_767_225_600_000
    # sessions start uniformly between these hours of each day (event time, UTC)
    session_hours: tuple[float, float] = (8.0, 20.0)
    users: list[SimUser] = field(init=False)
    rng: np.random.Generator = field(init=False)

    def __post_init__(self):
        self.rng = np.random.default_rng(self.seed)
        shares = np.array([s.share for s in self.scenario.segments])
        idx = self.rng.choice(len(shares), size=self.n_users, p=shares / shares.sum())
        self.users = [SimUser(f"sim-{i:06d}", self.scenario.segments[k]) for i, k in enumerate(idx)]

    def session_events(self, day: int, u: SimUser, i: int) -> list[dict]:
        """The events of a user's session on a day; the first one triggers a decision."""
        lo, hi = self.session_hours
        ts = self.start_ts + day * DAY_MS + int(self.rng.integers(int(lo * HOUR_MS),
                                                                  int(hi * HOUR_MS)))
        seg = u.segment
        if seg.behaviour is not None:
            return self._noisy_session(day, u, ts, seg.behaviour)
        base = {"user_id": u.user_id, "device": seg.device, "geo": seg.geo}
        evs = [{**base, "event_id": f"{u.user_id}-d{day}-s", "type": "session_start", "ts": ts}]
        evs.append({**base, "event_id": f"{u.user_id}-d{day}-v", "type": "page_view",
                    "ts": ts + 30_000, "category": seg.category,
                    "price": round(seg.basket / 2, 2), "item_id": f"{seg.category}-1"})
        return evs

    def _noisy_session(self, day: int, u: SimUser, ts: int, b: Behaviour) -> list[dict]:
        # Only the first event triggers a decision (no add_to_cart, a trigger type): what the
        # session shows informs the user's later decisions, as in a shop.
        seg, rng = u.segment, self.rng
        device = seg.device if rng.random() < b.device_loyalty else DEVICES[rng.integers(3)]
        base = {"user_id": u.user_id, "device": device, "geo": seg.geo}

        def category() -> str:
            return seg.category if rng.random() < b.focus else CATEGORIES[rng.integers(8)]

        evs = [{**base, "event_id": f"{u.user_id}-d{day}-s", "type": "session_start", "ts": ts}]
        n_views, n_searches = 1 + rng.poisson(b.views), rng.poisson(b.searches)
        for k in range(n_views + n_searches):
            t = ts + 30_000 * (k + 1)
            if k < n_searches:
                evs.append({**base, "event_id": f"{u.user_id}-d{day}-q{k}", "type": "search",
                            "ts": t, "query": category(), "category": category()})
            else:
                cat = category()
                evs.append({**base, "event_id": f"{u.user_id}-d{day}-v{k}", "type": "page_view",
                            "ts": t, "category": cat, "item_id": f"{cat}-{rng.integers(50)}",
                            "price": round(float(seg.basket * rng.uniform(0.3, 0.8)), 2)})
        return evs

    def respond(self, u: SimUser, action: int, decision_ts: int, decision_id: str) -> dict | None:
        """The user's reaction to a decision: maybe an order (a conversion), and fatigue moves."""
        sc, seg = self.scenario, u.segment
        p = order_prob(sc, seg, self.catalog, u.fatigue, action)
        order = None
        if self.rng.random() < p:
            profit, discount = order_profit(sc, seg, self.catalog, action)
            delay = float(np.exp(np.log(sc.delay_median_h) + sc.delay_sigma * self.rng.normal()))
            ts = decision_ts + int(min(delay, 60.0) * HOUR_MS)
            order = {"order_id": f"o-{decision_id}", "user_id": u.user_id, "ts": ts,
                     "amount": seg.basket, "discount": discount,
                     "decision_id": decision_id if action else None,
                     "coupon_code": f"C-{decision_id}" if action and discount > 0 else None,
                     "_profit": profit}
        nxt = next_fatigue_probs(sc, u.fatigue, action)
        levels, probs = zip(*nxt.items())
        u.fatigue = int(self.rng.choice(levels, p=probs))
        return order


def purchase_event(order: dict) -> dict:
    """The user event of a simulated order."""
    ev = {"event_id": order["order_id"], "user_id": order["user_id"], "type": "purchase",
          "ts": order["ts"], "amount": order["amount"]}
    if order.get("coupon_code"):
        ev["coupon_code"] = order["coupon_code"]
    return ev


def segment_shares(shop: "Shop") -> dict[str, float]:
    """Each segment's share of this population (segments with no user left out)."""
    counts: dict[str, int] = {}
    for u in shop.users:
        counts[u.segment.name] = counts.get(u.segment.name, 0) + 1
    return {name: n / len(shop.users) for name, n in counts.items()}


def optimum(shop: "Shop", gamma: float = 0.995) -> dict:
    """Long-run profit per user per day of this population under the optimal policy (value
    iteration per segment, gamma near 1 for the average-reward optimum), the myopic optimum
    (gamma 0) and "never send"; and the optimal action per segment and fatigue level."""
    sc, catalog = shop.scenario, shop.catalog
    shares = segment_shares(shop)
    out = {"optimal": 0.0, "myopic_optimal": 0.0, "never": 0.0, "policies": {}, "segments": {}}
    for seg in sc.segments:
        m = mdp(sc, seg, catalog)
        w = shares.get(seg.name, 0.0)
        _, pi = value_iteration(m.P, m.R, gamma)
        _, pi0 = value_iteration(m.P, m.R, 0.0)
        best = average_reward(m.P, m.R, pi)
        never = average_reward(m.P, m.R, np.zeros(len(pi), int))
        out["optimal"] += w * best
        out["myopic_optimal"] += w * average_reward(m.P, m.R, pi0)
        out["never"] += w * never
        out["policies"][seg.name] = [catalog.actions[a] for a in pi]
        # per user of the segment: where a policy's gap to the optimum comes from
        out["segments"][seg.name] = {"share": w, "optimal": best, "never": never}
    return out


def margin_reference(shop: "Shop", gamma: float, margin: float) -> float:
    """Long-run profit per user per day of the deciders' greedy rule applied to the exact Q
    of the simulator's MDP at the learner's ``gamma`` (each user's segment and hidden level
    seen): the best action, except that a coupon gives way to "no coupon" unless it beats it
    by more than ``margin`` x |Q(no coupon)| (core/policy.py, GREEDY_MARGIN; the cap of
    GREEDY_MARGIN_MAX left out). What the rule itself costs where Q is exact: a learner can
    end above it only where its errors let a coupon through that the margin holds back."""
    def rule(m: MDP) -> float:
        V, _ = value_iteration(m.P, m.R, gamma)
        Q = m.R + gamma * m.P @ V  # (actions, levels)
        return average_reward(m.P, m.R, greedy_actions(Q.T, None, margin))
    return _population_mean(shop, rule)


def _population_mean(shop: "Shop", per_user: Callable[[MDP], float]) -> float:
    """The population's mean of a per-user figure of each segment's MDP."""
    shares = segment_shares(shop)
    return sum(w * per_user(mdp(shop.scenario, seg, shop.catalog))
               for seg in shop.scenario.segments if (w := shares.get(seg.name, 0.0)))


def history_reference(shop: "Shop", gamma: float = 0.995) -> float:
    """Long-run profit per user per day of the best policy that knows each user's segment and
    infers the hidden level only from the coupons it sent (sim/mdp.py ``history_optimum``):
    what timing coupons is worth without reading the user's behaviour. About a minute per
    segment; a reference for the learning benchmark's pulse scenario, not part of its run."""
    return _population_mean(shop, lambda m: history_optimum(m.P, m.R, gamma))
