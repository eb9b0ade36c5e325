"""The decide agent's handler on in-memory tables: no broker, no Faust."""
import asyncio
import collections

import orjson

from streamagent.core.catalog import load_catalog
from streamagent.core.engine import DecisionEngine, initial_model
from streamagent.core.tables import BudgetShares, StreamClocks, UserCounts, UserStates
from streamagent.metrics import Metrics
from streamagent.params import engine_params, shipped
from streamagent.stream.decide import DecideHandler, DecideTables, DecideTopics

from .conftest import Msg

T0 = 1_767_225_600_000
CAT = load_catalog()
S = shipped()


class CountingDict(dict):
    """A table that counts writes per key."""

    def __init__(self):
        super().__init__()
        self.writes = collections.Counter()

    def __setitem__(self, k, v):
        self.writes[k] += 1
        super().__setitem__(k, v)


def make():
    users, budgets = CountingDict(), CountingDict()
    sent = []

    async def send(topic, key, value):
        sent.append((topic, key, orjson.loads(value)))
    eng = DecisionEngine(CAT, engine_params(S, 2), initial_model(CAT, (64, 64), 7))
    h = DecideHandler(eng, DecideTables(UserStates(users), BudgetShares(budgets),
                                        UserCounts(budgets), StreamClocks(budgets)),
                      DecideTopics("decision-log", "coupon-actions", "user-events.dlq"),
                      send, Metrics(), S.trigger_types)
    return h, users, budgets, sent


def batch(offset0=0):
    evs = []
    for i in range(12):
        user = f"u{i % 3}"
        typ = "session_start" if i % 4 == 0 else "page_view"
        doc = {"event_id": f"e{i}", "user_id": user, "type": typ, "ts": T0 + i * 1000}
        evs.append(Msg("user-events", i % 3 % 2, offset0 + i, user.encode(), orjson.dumps(doc)))
    evs.append(Msg("user-events", 0, offset0 + 12, b"u0", b"{broken"))
    return evs


def test_a_batch_writes_each_user_once_and_sends_every_output():
    h, users, budgets, sent = make()
    asyncio.run(h.handle(batch()))
    assert all(n == 1 for n in users.writes.values()) and set(users.writes) == {b"u0", b"u1", b"u2"}
    assert all(n == 1 for n in budgets.writes.values())  # clock and user count, once each
    topics = collections.Counter(t for t, _, _ in sent)
    assert topics["decision-log"] == 3  # one trigger each for u0, u1, u2 (events 0, 4, 8)
    assert topics["user-events.dlq"] == 1
    dl = [doc for t, _, doc in sent if t == "user-events.dlq"][0]
    assert dl["reason"] == "bad_json"
    assert UserStates(users).get(b"u0").n_events == 4
    decision = next(d for t, _, d in sent if t == "decision-log" and d["user_id"] == "u0")
    assert UserStates(users).get(b"u0").recent[-1].decision_id == decision["decision_id"]
    get = h.m.registry.get_sample_value
    assert get("streamagent_ingest_events_total", {"type": "page_view"}) == 9
    assert get("streamagent_ingest_dead_letters_total",
               {"topic": "user-events", "reason": "bad_json"}) == 1
    assert sum(get("streamagent_decision_decisions_total", {"action": a, "explored": e}) or 0
               for a in CAT.actions for e in ("true", "false")) == 3
    assert get("streamagent_decision_batch_events_count") == 1
    assert get("streamagent_state_users") == 3


def test_a_replayed_batch_changes_nothing_and_resends_the_same_decisions():
    h, users, budgets, sent = make()
    b = batch()
    asyncio.run(h.handle(b))
    first = [d["decision_id"] for t, _, d in sent if t == "decision-log"]
    snapshot = dict(users)
    sent.clear()
    asyncio.run(h.handle(b))
    assert [d["decision_id"] for t, _, d in sent if t == "decision-log"] == first
    assert dict(users) == snapshot
