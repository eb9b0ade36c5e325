"""The reward join: decisions and conversions -> one reward per decision -> transitions.

All on event time. Each partition has a watermark: for each input topic, the largest ts seen
on that partition minus the allowed lateness; the partition's watermark is the smaller of the
two (a topic with nothing yet on the partition is left out). Taking the minimum means a
conversions consumer that lags behind the decision-log consumer (after a restart, say) holds
window closing back instead of turning its records into late ones.
Things happen when the watermark passes their time, never on arrival, so the result does not
depend on arrival order as long as nothing is later than the allowed lateness:

- a conversion is attributed when the watermark reaches its ts (by then every decision that
  could have caused it has arrived): to the decision its coupon code / decision_id names, else
  by the rule (default: the latest decision of the user with ts <= conversion ts <= deadline);
- a decision closes when the watermark passes its deadline (ts + attribution window): its
  reward is the sum of what its attributed conversions earned, or the default reward if none;
- its transition is emitted once the next state is known: the features of the user's next
  decision (s'), or, if the user makes no decision within the horizon, as terminal.

Per-user pending records live in a key-value store (a Faust table in production, a dict in
tests); ``due:<partition>:<bucket>`` keys index users by the event time something is due.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import MutableMapping

import orjson

from streamagent.core.catalog import Catalog

NEVER = 2**62


@dataclass(frozen=True)
class JoinParams:
    window_ms: int = 3 * 86_400_000
    lateness_ms: int = 3_600_000
    horizon_ms: int = 14 * 86_400_000  # longest wait for a next decision before terminal
    reward: str = "profit"  # profit | revenue | conversion
    margin: float = 0.3
    default_reward: float = 0.0
    attribution: str = "latest"  # latest | code_only
    bucket_ms: int = 3_600_000
    order_memory: int = 64  # order ids remembered per user for duplicate detection


@dataclass
class JoinOutput:
    rewards: list[dict] = field(default_factory=list)
    transitions: list[dict] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    delays_ms: list[int] = field(default_factory=list)  # decision -> attributed conversion

    def count(self, what: str, n: int = 1) -> None:
        self.counts[what] = self.counts.get(what, 0) + n

    def extend(self, other: "JoinOutput") -> None:
        self.rewards += other.rewards
        self.transitions += other.transitions
        self.delays_ms += other.delays_ms
        for k, v in other.counts.items():
            self.count(k, v)


def _decision_id_of(conv: dict) -> str | None:
    if conv.get("decision_id"):
        return conv["decision_id"]
    code = conv.get("coupon_code") or ""
    return code[2:] if code.startswith("C-") else None


class Joiner:
    def __init__(self, catalog: Catalog, params: JoinParams, store: MutableMapping[str, bytes]):
        self.catalog, self.p, self.store = catalog, params, store

    # ---------------------------------------------------------------- store helpers
    def _load(self, user: str) -> dict:
        raw = self.store.get("u:" + user)
        if raw:
            return orjson.loads(raw)
        return {"user_id": user, "decisions": [], "conversions": [], "orders": [], "ids": []}

    def _save(self, rec: dict) -> None:
        # kept even with nothing pending: the order/decision ids are the duplicate memory
        self.store["u:" + rec["user_id"]] = orjson.dumps(rec)

    def pending(self, partition: int) -> int:
        """Open decisions on the partition (kept as a counter beside the records)."""
        raw = self.store.get(f"pending:{partition}")
        return int(raw) if raw else 0

    def _add_pending(self, partition: int, n: int) -> None:
        if n:
            self.store[f"pending:{partition}"] = str(self.pending(partition) + n).encode()

    def watermark(self, partition: int) -> int:
        raw = self.store.get(f"wm:{partition}")
        return int(raw) if raw else -NEVER

    def _index(self, partition: int, user: str, due: int) -> None:
        if due >= NEVER:
            return
        key = f"due:{partition}:{due // self.p.bucket_ms}"
        users = orjson.loads(self.store.get(key) or b"[]")
        if user not in users:
            users.append(user)
            self.store[key] = orjson.dumps(users)

    def _next_due(self, rec: dict) -> int:
        due = NEVER
        for c in rec["conversions"]:
            due = min(due, c["ts"])
        ds = rec["decisions"]
        for i, d in enumerate(ds):
            if not d["closed"]:
                due = min(due, d["deadline"] + 1)
            else:
                nxt = ds[i + 1]["ts"] if i + 1 < len(ds) else NEVER
                due = min(due, nxt, d["ts"] + self.p.horizon_ms + 1)
        return due

    def _settle(self, partition: int, rec: dict, out: "JoinOutput") -> None:
        """Resolve what is already due (late arrivals), save, and index the next due time."""
        wm = self.watermark(partition)
        if self._next_due(rec) <= wm:
            out.extend(self._resolve(rec, wm))
        self._save(rec)
        self._index(partition, rec["user_id"], self._next_due(rec))

    # ---------------------------------------------------------------- inputs
    def on_decision(self, partition: int, d: dict) -> JoinOutput:
        return self._counted(partition, self._on_decision(partition, d))

    def on_conversion(self, partition: int, c: dict) -> JoinOutput:
        return self._counted(partition, self._on_conversion(partition, c))

    def _counted(self, partition: int, out: JoinOutput) -> JoinOutput:
        c = out.counts
        self._add_pending(partition, c.get("decisions", 0) - c.get("rewarded", 0)
                          - c.get("defaulted", 0))
        return out

    def _on_decision(self, partition: int, d: dict) -> JoinOutput:
        out = JoinOutput()
        rec = self._load(d["user_id"])
        if d["decision_id"] in rec["ids"]:
            out.count("duplicate_decision")  # a re-sent decision after a crash
            return out
        rec["ids"] = (rec["ids"] + [d["decision_id"]])[-self.p.order_memory:]
        rec["decisions"].append({
            "decision_id": d["decision_id"], "ts": d["ts"], "deadline": d["ts"] + self.p.window_ms,
            "action_index": d["action_index"], "propensity": d["propensity"],
            "features": d["features"], "policy_version": d["policy_version"],
            "allowed": d.get("allowed"), "closed": False, "reward": 0.0, "orders": 0, "amount": 0.0, "discount": 0.0,
        })
        rec["decisions"].sort(key=lambda x: (x["ts"], x["decision_id"]))
        out.count("decisions")
        if d["ts"] + self.p.window_ms < self.watermark(partition):
            out.count("late_decision")  # closes at once; conversions may have gone elsewhere
        self._settle(partition, rec, out)
        out.extend(self._observe(partition, "d", d["ts"]))
        return out

    def _on_conversion(self, partition: int, c: dict) -> JoinOutput:
        if c.get("heartbeat"):  # only moves event time on
            out = JoinOutput()
            out.count("heartbeat")
            out.extend(self._observe(partition, "c", c["ts"]))
            return out
        out = JoinOutput()
        rec = self._load(c["user_id"])
        if c["order_id"] in rec["orders"]:
            out.count("duplicate_conversion")
            return out
        rec["orders"] = (rec["orders"] + [c["order_id"]])[-self.p.order_memory:]
        if c["ts"] < self.watermark(partition):
            out.count("late_conversion")  # its attribution point has passed: never re-open
            self._save(rec)
            return out
        rec["conversions"].append({"order_id": c["order_id"], "ts": c["ts"],
                                   "amount": float(c["amount"]),
                                   "discount": c.get("discount"),
                                   "decision_id": _decision_id_of(c)})
        out.count("conversions")
        self._settle(partition, rec, out)
        out.extend(self._observe(partition, "c", c["ts"]))
        return out

    # ---------------------------------------------------------------- time
    def _observe(self, partition: int, kind: str, ts: int) -> JoinOutput:
        """Raise the input's watermark with an event's ts and do whatever became due."""
        key = f"wm{kind}:{partition}"
        mine = self.store.get(key)
        if mine is None or ts - self.p.lateness_ms > int(mine):
            self.store[key] = str(ts - self.p.lateness_ms).encode()
        marks = [int(v) for v in (self.store.get(f"wmd:{partition}"),
                                  self.store.get(f"wmc:{partition}")) if v is not None]
        old = self.watermark(partition)
        new = min(marks)
        if new <= old:
            return JoinOutput()
        self.store[f"wm:{partition}"] = str(new).encode()
        return self.advance(partition, old, new)

    def advance(self, partition: int, old: int, new: int) -> JoinOutput:
        out = JoinOutput()
        b = self.p.bucket_ms
        first = max(old, 0) // b if old > -NEVER else None
        last = new // b
        keys = self._due_keys(partition, first, last)
        for key in keys:
            users = orjson.loads(self.store.get(key) or b"[]")
            del self.store[key]
            for user in users:
                rec = self._load(user)
                out.extend(self._resolve(rec, new))
                self._save(rec)
                self._index(partition, user, self._next_due(rec))
        return out

    def _scan_due(self, partition: int) -> list[tuple[int, str]]:
        prefix = f"due:{partition}:"
        return sorted((int(k[len(prefix):]), k) for k in list(self.store.keys())
                      if isinstance(k, str) and k.startswith(prefix))

    def _due_keys(self, partition: int, first: int | None, last: int) -> list[str]:
        if first is None or last - first > 10_000:
            # first watermark of the partition, or a jump of more than a year of buckets:
            # cheaper to look at the index keys that exist than at every bucket in between
            return [k for bucket, k in self._scan_due(partition) if bucket <= last]
        return [f"due:{partition}:{i}" for i in range(first, last + 1)
                if f"due:{partition}:{i}" in self.store]

    def flush(self, partition: int) -> JoinOutput:
        """End of input (tests, replays): treat the watermark as +infinity."""
        self.store[f"wm:{partition}"] = str(NEVER - 1).encode()
        out = JoinOutput()
        for _, k in self._scan_due(partition):
            users = orjson.loads(self.store.get(k) or b"[]")
            del self.store[k]
            for user in users:
                rec = self._load(user)
                out.extend(self._resolve(rec, NEVER - 1))
                self._save(rec)
        return self._counted(partition, out)

    # ---------------------------------------------------------------- the join itself
    def _resolve(self, rec: dict, wm: int) -> JoinOutput:
        out = JoinOutput()
        # 1. attribute every conversion whose time the watermark has reached, in time order
        due = sorted((c for c in rec["conversions"] if c["ts"] <= wm),
                     key=lambda c: (c["ts"], c["order_id"]))
        rec["conversions"] = [c for c in rec["conversions"] if c["ts"] > wm]
        for c in due:
            d = self._attribute(rec, c)
            if d is None:
                out.count("unmatched_conversion")
                continue
            discount = self._discount(d, c)
            d["orders"] += 1
            d["amount"] += c["amount"]
            d["discount"] += discount
            d["reward"] += self._reward(c["amount"], discount)
            out.count("attributed_conversion")
            out.delays_ms.append(c["ts"] - d["ts"])
        # 2. close decisions whose window the watermark has passed
        for d in rec["decisions"]:
            if not d["closed"] and d["deadline"] < wm:
                d["closed"] = True
                if d["orders"] == 0:
                    d["reward"] = self.p.default_reward
                    out.count("defaulted")
                else:
                    out.count("rewarded")
                out.rewards.append({
                    "schema_version": 1, "decision_id": d["decision_id"],
                    "user_id": rec["user_id"], "ts": d["ts"], "closed_at": d["deadline"],
                    "reward": d["reward"], "converted": d["orders"] > 0, "orders": d["orders"],
                    "amount": d["amount"], "discount": d["discount"],
                    "outcome": "converted" if d["orders"] else "default",
                    "action_index": d["action_index"], "policy_version": d["policy_version"],
                })
        # 3. emit transitions for closed decisions whose next state is known
        keep = []
        ds = rec["decisions"]
        for i, d in enumerate(ds):
            if not d["closed"]:
                keep.append(d)
                continue
            nxt = ds[i + 1] if i + 1 < len(ds) else None
            # the next decision is s' only once no earlier one can still arrive (ts <= wm)
            # and only within the horizon: a next decision after it makes the transition terminal
            if nxt is not None and nxt["ts"] <= wm and nxt["ts"] <= d["ts"] + self.p.horizon_ms:
                out.transitions.append(self._transition(rec["user_id"], d, nxt))
            elif d["ts"] + self.p.horizon_ms < wm:
                out.transitions.append(self._transition(rec["user_id"], d, None))
            else:
                keep.append(d)
        rec["decisions"] = keep
        return out

    def _attribute(self, rec: dict, c: dict) -> dict | None:
        open_ = [d for d in rec["decisions"] if d["ts"] <= c["ts"] <= d["deadline"]]
        if c["decision_id"]:
            for d in open_:
                if d["decision_id"] == c["decision_id"]:
                    return d
        if self.p.attribution == "code_only":
            return None
        return open_[-1] if open_ else None  # decisions are kept sorted by (ts, id)

    def _discount(self, d: dict, c: dict) -> float:
        if c["discount"] is not None:
            return float(c["discount"])
        if c["decision_id"] == d["decision_id"]:
            coupon = self.catalog.coupon(d["action_index"])
            if coupon is not None:
                return coupon.discount_on(c["amount"], self.catalog.shipping_cost)
        return 0.0

    def _reward(self, amount: float, discount: float) -> float:
        if self.p.reward == "conversion":
            return 1.0
        if self.p.reward == "revenue":
            return amount - discount
        return self.p.margin * amount - discount

    def _transition(self, user: str, d: dict, nxt: dict | None) -> dict:
        return {
            "schema_version": 1, "decision_id": d["decision_id"], "user_id": user,
            "ts": d["ts"], "features": d["features"], "action_index": d["action_index"],
            "reward": d["reward"], "propensity": d["propensity"],
            "policy_version": d["policy_version"],
            "next_features": nxt["features"] if nxt else None,
            "next_allowed": nxt["allowed"] if nxt else None,
            "next_ts": nxt["ts"] if nxt else None,
            "dt_ms": (nxt["ts"] - d["ts"]) if nxt else None,
            "done": nxt is None,
        }
