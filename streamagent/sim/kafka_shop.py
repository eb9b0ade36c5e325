"""The simulated shop against Kafka: its users' events go to user-events, their orders to
conversions, and the coupons they get are read back from coupon-actions.

Event time is fast-forwarded: a simulated day is produced as soon as the previous day's
decisions are back, so weeks of shop traffic pass in minutes and, because every rule in the
pipeline runs on event time, give the same decisions as live traffic would. The shop waits for
the decision-log entry of each session (that is its clock: "the agent has decided") and takes
the coupon from coupon-actions (what a real shop would see); a session without a coupon action
got none.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import orjson
from streamagent.sim.shop import Shop, expected_profit, purchase_event
from streamagent.units import DAY_MS
from streamagent.errors import StreamagentError
from streamagent.ops.kafka import (KafkaClientConfig, kafka_client, make_consumer,
                                   make_producer, send)


class ShopStalled(StreamagentError):
    """The agent did not decide for all of a day's sessions in time.

    Check that the decide worker runs and reads the same user-events topic (its log and its
    /metrics), and that the broker is up (`streamagent kafka status`).
    """


def shop_topics(s) -> dict[str, str]:
    """The four topics the shop talks to, from the settings."""
    return {"user_events": s.topic_user_events, "conversions": s.topic_conversions,
            "coupon_actions": s.topic_coupon_actions, "decision_log": s.topic_decision_log}


def partition_keys(n_partitions: int, prefix: str = "hb") -> list[str]:
    """One key per partition (by the Java client's murmur2), for per-partition heartbeats."""
    from aiokafka.partitioner import murmur2

    keys: dict[int, str] = {}
    i = 0
    while len(keys) < n_partitions:
        k = f"{prefix}-{i}"
        keys.setdefault((murmur2(k.encode()) & 0x7FFFFFFF) % n_partitions, k)
        i += 1
    return [keys[p] for p in range(n_partitions)]


@dataclass
class DayResult:
    day: int
    expected_profit: float  # per user, from the true order probabilities (low noise)
    realised_profit: float  # per user, sampled orders
    coupons: int
    orders: int
    discount: float
    events: int
    policy_versions: set = field(default_factory=set)
    explored: int = 0
    seconds: float = 0.0


class KafkaShop:
    def __init__(self, shop: Shop, kafka: KafkaClientConfig, topics: dict[str, str],
                 n_partitions: int,
                 decision_timeout_s: float = 120.0):
        self.shop, self.catalog = shop, shop.catalog
        self.topics, self.timeout = topics, decision_timeout_s
        self.producer = make_producer(kafka, **{"linger.ms": 5})
        self.consumer = make_consumer(kafka, f"streamagent-shop-{time.time_ns()}")
        self.consumer.subscribe([topics["decision_log"], topics["coupon_actions"]])
        self.hb_keys = partition_keys(n_partitions)
        self.decisions: dict[str, dict] = {}  # trigger_event_id -> decision-log entry
        self.coupons: dict[str, dict] = {}  # decision_id -> coupon action
        self.events_sent = 0
        self.decisions_seen = 0

    def close(self) -> None:
        self.producer.flush(30)
        self.consumer.close()

    def _send(self, topic: str, key: str, doc: dict) -> None:
        send(self.producer, topic, key.encode(), orjson.dumps(doc))

    def _poll(self, wanted: set[str], deadline: float) -> None:
        """Read decisions and coupon actions until every wanted trigger has its answer."""
        missing = set(wanted)
        while missing:
            if time.monotonic() > deadline:
                raise ShopStalled(f"{len(missing)} of {len(wanted)} sessions got no decision "
                                  f"within {self.timeout:.0f} s")
            for m in self.consumer.consume(1000, timeout=0.2):
                if m.error() or m.value() is None:  # None: an erasure tombstone
                    continue
                doc = orjson.loads(m.value())
                if m.topic() == self.topics["coupon_actions"]:
                    self.coupons.setdefault(doc["decision_id"], doc)
                else:
                    self.decisions_seen += 1
                    self.decisions.setdefault(doc["trigger_event_id"], doc)
            # done when the decision is in and, for a coupon, its coupon action too
            for t in list(missing):
                d = self.decisions.get(t)
                if d and (d["action"] == "none" or d["decision_id"] in self.coupons):
                    missing.discard(t)

    def day(self, day: int) -> DayResult:
        t0 = time.monotonic()
        shop, cat = self.shop, self.catalog
        triggers = {}
        for i, u in enumerate(shop.users):
            evs = shop.session_events(day, u, i)
            for ev in evs:
                self._send(self.topics["user_events"], u.user_id, ev)
            self.events_sent += len(evs)
            triggers[evs[0]["event_id"]] = u
        self.producer.flush(30)
        self._poll(set(triggers), time.monotonic() + self.timeout)
        res = DayResult(day, 0.0, 0.0, 0, 0, 0.0, len(triggers) * 2)
        orders = []
        for tid, u in triggers.items():
            d = self.decisions.pop(tid)
            c = self.coupons.pop(d["decision_id"], None)
            # the shop only knows the coupon it was told to deliver
            a = cat.actions.index(c["coupon"]["id"]) if c else 0
            res.coupons += a != 0
            res.explored += bool(d["explored"])
            res.policy_versions.add(d["policy_version"])
            res.expected_profit += expected_profit(shop.scenario, u.segment, cat, u.fatigue, a)
            o = shop.respond(u, a, d["ts"], d["decision_id"])
            if o:
                res.orders += 1
                res.realised_profit += o["_profit"]
                res.discount += o["discount"]
                orders.append(o)
        for o in sorted(orders, key=lambda o: o["ts"]):
            # a shop streams the purchase as a user event (the user's state and features see
            # it, as in the learning benchmark) and the order as a conversion (the reward)
            self._send(self.topics["user_events"], o["user_id"], purchase_event(o))
            doc = {k: v for k, v in o.items() if not k.startswith("_") and v is not None}
            self._send(self.topics["conversions"], o["user_id"], doc)
        self.events_sent += len(orders)
        # the day is over on every partition, orders or not: heartbeats move event time on
        end = shop.start_ts + (day + 1) * DAY_MS
        for k in self.hb_keys:
            self._send(self.topics["conversions"], k, {"order_id": f"hb-{k}-{day}", "user_id": k,
                                                       "ts": end, "amount": 0.0, "heartbeat": True})
        self.producer.flush(30)
        n = len(shop.users)
        res.expected_profit /= n
        res.realised_profit /= n
        res.seconds = time.monotonic() - t0
        return res


def simulate(s, scenario_name: str, users: int, days: int, seed: int, timeout: float,
             log=print) -> list[DayResult]:
    """`streamagent simulate`: play the shop against a running worker, a line per day."""
    from streamagent.core.catalog import load_catalog
    from streamagent.ops.topics import partition_count
    from streamagent.sim.shop import optimum, scenario

    catalog = load_catalog(s.catalog_path)
    shop = Shop(scenario(scenario_name), catalog, users, seed=seed)
    ref = optimum(shop)
    kafka = kafka_client(s)
    n_parts = partition_count(kafka, s.topic_conversions, s.partitions)
    ks = KafkaShop(shop, kafka, shop_topics(s), n_parts, decision_timeout_s=timeout)
    log(f"simulating {users} users for {days} days ({scenario_name}) against "
        f"{s.kafka_bootstrap}; optimum {ref['optimal']:.3f}, never {ref['never']:.3f} "
        f"profit/user/day")
    out: list[DayResult] = []
    try:
        for d in range(days):
            r = ks.day(d)
            out.append(r)
            week = sum(x.expected_profit for x in out[-7:]) / len(out[-7:])
            log(f"day {d + 1:4}: profit/user {r.expected_profit:6.3f} (7-day mean {week:6.3f}, "
                f"{week / ref['optimal']:5.1%} of optimum), coupons {r.coupons}, orders "
                f"{r.orders}, model v{max(r.policy_versions)}, {r.seconds:.1f} s")
    finally:
        ks.close()
    return out
