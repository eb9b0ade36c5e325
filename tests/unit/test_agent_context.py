"""The decide agent's wiring, driven through Faust's test_context() (no broker).

Faust's test context gives the agent a stream but no producer, so Topic.send is replaced by a
recorder; the real-broker behaviour is covered by tests/integration.
"""
import asyncio
from unittest import mock

import orjson
from prometheus_client import CollectorRegistry

from streamagent.config import Settings
from streamagent.core.tables import UserStates
from streamagent.metrics import Metrics
from streamagent.stream.app import create_app

T0 = 1_767_225_600_000


def run_agent(tmp_path, messages):
    reg = CollectorRegistry()
    w = create_app(Settings(table_store="memory://", metrics_port=0, data_dir=tmp_path),
                   metrics=Metrics(reg, topics=("user-events",)))
    sent = []

    async def record_send(self, *args, key=None, value=None, **kw):
        sent.append((self.get_topic_name(), key, orjson.loads(value)))

    async def main():
        with mock.patch("faust.topics.Topic.send", record_send):
            async with w.app.streamagent_decide.test_context() as agent:
                for key, value in messages:
                    await agent.put(key=key, value=value)

    asyncio.run(main())
    return w, reg, sent


def ev(eid, typ, **kw):
    return b"u1", orjson.dumps({"event_id": eid, "user_id": "u1", "type": typ, "ts": T0, **kw})


def test_agent_updates_state_decides_on_triggers_and_dead_letters_bad_input(tmp_path):
    w, reg, sent = run_agent(tmp_path, [
        ev("e1", "page_view", category="toys"),
        (b"u1", b"{broken"),
        ev("e2", "session_start"),
        ev("e3", "search"),
    ])
    topics = [t for t, _, _ in sent]
    assert topics.count("decision-log") == 1
    assert topics.count("user-events.dlq") == 1
    decision = next(v for t, _, v in sent if t == "decision-log")
    assert decision["trigger_event_id"] == "e2"
    assert ("coupon-actions" in topics) == (decision["action"] != "none")
    dlq = next(v for t, _, v in sent if t == "user-events.dlq")
    assert dlq["reason"] == "bad_json" and dlq["source_topic"] == "user-events"
    state = UserStates(w.app.streamagent_users).get(b"u1")
    assert state.n_events == 3 and state.decisions[-1].decision_id == decision["decision_id"]
    get = reg.get_sample_value
    assert get("streamagent_ingest_events_total", {"type": "page_view"}) == 1
    assert get("streamagent_ingest_dead_letters_total", {"topic": "user-events", "reason": "bad_json"}) == 1
    assert get("streamagent_decision_decisions_total",
               {"action": decision["action"], "explored": str(decision["explored"]).lower()}) == 1
