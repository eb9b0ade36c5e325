"""Event-time rules through a real broker and worker: a lapsed customer comes back and is
decided for; records dated years ahead are dead-lettered and move no shared state."""
from __future__ import annotations

import orjson
import pytest

from streamagent.sim.kafka_shop import partition_keys
from streamagent.units import DAY_MS, HOUR_MS, MINUTE_MS
from tests.conftest import topic_env
from tests.integration.helpers import WorkerProcess, event, produce, read_json

pytestmark = pytest.mark.kafka

T0 = 1_767_225_600_000  # 2026-01-01
Y2099 = 4_070_908_800_000


def conversion(order_id, user, ts, amount, **kw):
    return user.encode(), orjson.dumps({"order_id": order_id, "user_id": user, "ts": ts,
                                        "amount": amount, **kw})


def test_lapsed_customers_and_future_records(kafka, tmp_path, run_id):
    env = topic_env("t" + run_id, kafka, tmp_path, STREAMAGENT_ATTRIBUTION_WINDOW_HOURS="2",
                    STREAMAGENT_ALLOWED_LATENESS_MINUTES="1",
                    STREAMAGENT_CAP_MIN_GAP_HOURS="0")
    ue, conv = env["STREAMAGENT_TOPIC_USER_EVENTS"], env["STREAMAGENT_TOPIC_CONVERSIONS"]
    # one "other" user per partition keeps every partition's event time moving
    others = partition_keys(int(env["STREAMAGENT_PARTITIONS"]), prefix="other")
    start = T0 - 405 * DAY_MS
    items = [event("lapsed-s0", "lapsed", "session_start", start + HOUR_MS),
             event("lapsed-v0", "lapsed", "page_view", start + HOUR_MS + MINUTE_MS)]
    for day in range(406):  # the shop goes on for 400 days without the lapsed customer
        items += [event(f"{o}-{day}", o, "page_view", start + day * DAY_MS) for o in others]
    items += [event(f"{o}-today-{k}", o, "page_view", T0 + k * MINUTE_MS)
              for o in others for k in range(5)]
    items.append(event("newcomer-2099", "newcomer", "session_start", Y2099))
    items.append(event("lapsed-back", "lapsed", "session_start", T0 + HOUR_MS))
    items.append(event("lapsed-cart", "lapsed", "add_to_cart", T0 + HOUR_MS + MINUTE_MS,
                       price=40.0))
    items.append(event("regular-s", "regular", "session_start", T0 + HOUR_MS + 2 * MINUTE_MS))
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    try:
        produce(kafka, ue, items)
        log = {d["trigger_event_id"]: d for d in
               read_json(kafka, env["STREAMAGENT_TOPIC_DECISION_LOG"], 4)}
        assert {"lapsed-s0", "lapsed-back", "lapsed-cart", "regular-s"} <= set(log), worker.tail()
        assert "newcomer-2099" not in log
        # conversions: one order and one heartbeat dated 2099, then the real order of today
        hb = partition_keys(int(env["STREAMAGENT_PARTITIONS"]))
        regular = log["regular-s"]
        produce(kafka, conv, [
            *[conversion(f"hb-{k}-{i}", k, T0 + i * MINUTE_MS, 0.0, heartbeat=True)
              for k in hb for i in range(5)],
            conversion("far-order", "regular", Y2099, 50.0),
            *[conversion(f"hb-far-{k}", k, Y2099, 0.0, heartbeat=True) for k in hb],
            conversion("real-order", "regular", regular["ts"] + 30 * MINUTE_MS, 50.0,
                       decision_id=regular["decision_id"]),
            *[conversion(f"hb-later-{k}", k, T0 + 6 * HOUR_MS, 0.0, heartbeat=True)
              for k in hb],
        ])
        # later sessions move the decision-log's event time on as well (the join's watermark
        # is the smaller of its two inputs')
        produce(kafka, ue, [event(f"{o}-later", o, "session_start", T0 + 6 * HOUR_MS)
                            for o in others])
        dlq = read_json(kafka, ue + ".dlq", 1)
        assert [(d["reason"], orjson.loads(__import__("base64").b64decode(d["original_b64"]))
                 ["event_id"]) for d in dlq] == [("ts_too_far_ahead", "newcomer-2099")]
        cdlq = read_json(kafka, conv + ".dlq", 1 + len(hb))
        assert sorted(d["reason"] for d in cdlq) == ["ts_too_far_ahead"] * (1 + len(hb))
        rewards = {r["decision_id"]: r for r in
                   read_json(kafka, env["STREAMAGENT_TOPIC_REWARDS"], len(log))}
        # the real order is attributed (not late), and rewards closed on time
        assert rewards[regular["decision_id"]]["converted"], worker.tail()
        assert rewards[regular["decision_id"]]["amount"] == 50.0
        assert log["lapsed-back"]["decision_id"] in rewards
    finally:
        worker.stop()
