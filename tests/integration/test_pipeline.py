"""Events in, decisions out, through a real broker and a real worker process."""
from __future__ import annotations

import base64

import orjson
import pytest

from streamagent.core.contracts import validator
from streamagent.units import DAY_MS
from tests.conftest import topic_env
from tests.integration.helpers import WorkerProcess, event, produce, read_json

pytestmark = pytest.mark.kafka

T0 = 1_767_225_600_000  # 2026-01-01


@pytest.fixture(scope="module")
def worker(kafka, tmp_path_factory):
    import uuid

    prefix = "p" + uuid.uuid4().hex[:6]
    d = tmp_path_factory.mktemp("worker")
    env = topic_env(prefix, kafka, d)
    w = WorkerProcess(env, d / "worker.log").start()
    yield env, w
    w.stop()


def test_events_in_schema_valid_decisions_out(kafka, worker):
    env, w = worker
    users = [f"good-{i}" for i in range(20)]
    items = []
    triggers = set()
    for i, u in enumerate(users):
        ts = T0 + i * 1000
        items.append(event(f"{u}-s", u, "session_start", ts, device="mobile"))
        items.append(event(f"{u}-v", u, "page_view", ts + 10, category="shoes", price=30.0))
        items.append(event(f"{u}-c", u, "add_to_cart", ts + 20, category="shoes", price=120.0))
        triggers |= {f"{u}-s", f"{u}-c"}
    produce(kafka, env["STREAMAGENT_TOPIC_USER_EVENTS"], items)

    log = [d for d in read_json(kafka, env["STREAMAGENT_TOPIC_DECISION_LOG"], len(triggers))
           if d["user_id"].startswith("good-")]
    assert {d["trigger_event_id"] for d in log} == triggers, w.tail()
    assert len(log) == len(triggers)  # one decision per trigger, none for page views
    check = validator("decision-log")
    for d in log:
        key = d.pop("_key")
        assert key == d["user_id"].encode()
        check(d)
        assert 0 < d["propensity"] <= 1
        assert d["policy_version"] == 0
    coupons = {d["decision_id"] for d in log if d["action"] != "none"}
    actions = [a for a in read_json(kafka, env["STREAMAGENT_TOPIC_COUPON_ACTIONS"], len(coupons))
               if a["user_id"].startswith("good-")]
    check_a = validator("coupon-action")
    for a in actions:
        a.pop("_key")
        check_a(a)
    # coupon-actions carry exactly the decisions that chose a real coupon
    assert {a["decision_id"] for a in actions} == coupons
    # the same user's second trigger sees the first decision: the min-gap cap holds
    by_user: dict[str, list] = {}
    for d in sorted(log, key=lambda d: d["ts"]):
        by_user.setdefault(d["user_id"], []).append(d)
    for u, ds in by_user.items():
        if ds[0]["action"] != "none":
            assert ds[1]["blocked_by"] == ["min_gap"] and ds[1]["action"] == "none"


BAD = {
    "bad_json": (b"bad-1", b"{not json"),
    "not_an_object": (b"bad-2", b"[1, 2, 3]"),
    "schema_missing": (b"bad-3", orjson.dumps({"event_id": "x3", "user_id": "bad-3", "ts": T0})),
    "schema_negative_price": event("x4", "bad-4", "page_view", T0, price=-5.0),
    "schema_unknown_type": event("x5", "bad-5", "teleport", T0),
    "schema_ts_years_away": event("x6", "bad-6", "page_view", 9_999_999_999_999),
    "key_mismatch": (b"someone-else", orjson.dumps({"event_id": "x7", "user_id": "bad-7",
                                                     "type": "page_view", "ts": T0})),
    "no_key": (None, orjson.dumps({"event_id": "x8", "user_id": "bad-8", "type": "page_view",
                                   "ts": T0})),
}


def test_bad_messages_go_to_dlq_and_good_ones_keep_flowing(kafka, worker):
    env, w = worker
    topic = env["STREAMAGENT_TOPIC_USER_EVENTS"]
    items = []
    # good, bad, good, bad, ...: the stream must go on past every bad message
    for i, (name, item) in enumerate(BAD.items()):
        u = f"flow-{i}"
        items.append(event(f"{u}-s", u, "session_start", T0 + i))
        items.append(item)
    # an event absurdly far ahead of the same user's history
    items.append(event("far-1", "flow-0", "page_view", T0 + 400 * DAY_MS))
    produce(kafka, topic, items)

    dlq = read_json(kafka, topic + ".dlq", len(BAD) + 1)
    validate = validator("dlq-envelope")
    got = {}
    for env_ in dlq:
        env_.pop("_key")
        validate(env_)
        assert env_["source_topic"] == topic
        got[base64.b64decode(env_["original_b64"])] = env_["reason"]
    expected_reason = {"bad_json": "bad_json", "not_an_object": "not_an_object",
                       "key_mismatch": "key_mismatch", "no_key": "key_mismatch"}
    for name, (_, value) in BAD.items():
        assert value in got, f"{name} missing from DLQ"
        assert got[value] == expected_reason.get(name, "schema"), name
    far = event("far-1", "flow-0", "page_view", T0 + 400 * DAY_MS)[1]
    assert got[far] == "ts_too_far_ahead"

    log = read_json(kafka, env["STREAMAGENT_TOPIC_DECISION_LOG"], len(BAD))
    flowed = {d["trigger_event_id"] for d in log if d["user_id"].startswith("flow-")}
    assert flowed == {f"flow-{i}-s" for i in range(len(BAD))}, w.tail()
    assert w.proc.poll() is None, "worker died on bad input"
