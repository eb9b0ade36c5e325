"""A seeded synthetic stream of plausible user events, for load and latency benchmarks and
`streamagent produce`. Unlike the simulated shop it does not react to coupons."""
from __future__ import annotations

import random
from typing import Iterator

from streamagent.sim.shop import CATEGORIES, DEVICES

# a session: start, a few views/searches, sometimes a cart, rarely a purchase
_FOLLOW = (("page_view", 0.55), ("search", 0.2), ("add_to_cart", 0.15), ("purchase", 0.04),
           ("session_end", 0.06))


def synthetic_events(n: int, users: int = 1000, seed: int = 1, start_ts: int = 1767225600000,
                     step_ms: int = 1000) -> Iterator[dict]:
    """A deterministic stream of plausible user events (not the simulator: no coupon response)."""
    rng = random.Random(seed)
    in_session: dict[str, bool] = {}
    ts = start_ts
    kinds, weights = zip(*_FOLLOW)
    for i in range(n):
        u = f"u{rng.randrange(users):06d}"
        ts += rng.randrange(step_ms) + 1
        if not in_session.get(u):
            typ = "session_start"
            in_session[u] = True
        else:
            typ = rng.choices(kinds, weights)[0]
            if typ == "session_end":
                in_session[u] = False
        ev = {"event_id": f"s{seed}-{i}", "user_id": u, "type": typ, "ts": ts,
              "device": DEVICES[int(u[1:]) % 3]}
        if typ in ("page_view", "add_to_cart"):
            ev.update(item_id=f"sku-{rng.randrange(5000)}", category=rng.choice(CATEGORIES),
                      price=round(rng.uniform(3, 150), 2))
        elif typ == "search":
            ev["query"] = rng.choice(CATEGORIES)
        elif typ == "purchase":
            ev["amount"] = round(rng.uniform(10, 250), 2)
        yield ev
