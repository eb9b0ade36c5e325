"""A worker stopped and restarted keeps its users' state and repeats no decision."""
from __future__ import annotations

import math
from collections import Counter

import pytest

from streamagent.core.features import FEATURE_NAMES, LOG_SCALE
from tests.conftest import topic_env
from tests.integration.helpers import WorkerProcess, event, produce, read_json

pytestmark = pytest.mark.kafka

T0 = 1_767_225_600_000
DAY = 86_400_000
LOG_VIEWS = FEATURE_NAMES.index("log_views_decayed")
COUPONS_IN_WINDOW = FEATURE_NAMES.index("coupons_in_cap_window")
HALF_LIFE = 14 * 86_400_000  # STREAMAGENT_INTEREST_HALF_LIFE_DAYS default


@pytest.mark.parametrize("store", ["rocksdb://"])
def test_restart_keeps_state_and_makes_no_duplicate_decisions(kafka, tmp_path, run_id, store):
    env = topic_env("r" + run_id, kafka, tmp_path, STREAMAGENT_TABLE_STORE=store,
                    # every trigger may issue a coupon: the cap (2 per 7 days) is what binds
                    STREAMAGENT_CAP_MIN_GAP_HOURS="0", STREAMAGENT_EXPLORATION="greedy")
    topic = env["STREAMAGENT_TOPIC_USER_EVENTS"]
    users = [f"r-{i}" for i in range(12)]

    w = WorkerProcess(env, tmp_path / "worker.log").start()
    first = []
    for u in users:
        for j in range(5):  # five views, then a session start: 6 events before the restart
            first.append(event(f"{u}-a{j}", u, "page_view", T0 + j * 1000, category="books"))
        first.append(event(f"{u}-a5", u, "session_start", T0 + 10_000))
    produce(kafka, topic, first)
    before = read_json(kafka, env["STREAMAGENT_TOPIC_DECISION_LOG"], len(users))
    assert len(before) == len(users), w.tail()
    assert w.stop() == 0, w.tail()

    w2 = WorkerProcess(env, tmp_path / "worker.log").start()
    second = [event(f"{u}-b0", u, "session_start", T0 + DAY) for u in users]
    produce(kafka, topic, second)
    log = read_json(kafka, env["STREAMAGENT_TOPIC_DECISION_LOG"], 2 * len(users))
    w2.stop()

    ids = Counter(d["decision_id"] for d in log)
    assert max(ids.values()) == 1, "a decision was emitted twice"
    assert len(log) == 2 * len(users), "decisions missing or repeated after restart"
    after = {d["user_id"]: d for d in log if d["trigger_event_id"].endswith("-b0")}
    first_by_user = {d["user_id"]: d for d in log if d["trigger_event_id"].endswith("-a5")}
    for u in users:
        # the five views before the restart are in the state, decayed to the new session
        views = sum(0.5 ** ((DAY - j * 1000) / HALF_LIFE) for j in range(5))
        assert math.isclose(after[u]["features"][LOG_VIEWS], math.log1p(views) / LOG_SCALE,
                            rel_tol=1e-5)
        issued = first_by_user[u]["action"] != "none"
        assert after[u]["features"][COUPONS_IN_WINDOW] == pytest.approx(float(issued) / 7)
