"""`streamagent evaluate --from-kafka`: decision-log joined with rewards on a real broker."""
from __future__ import annotations

import orjson
import pytest
from confluent_kafka.admin import NewTopic

from streamagent.cli import main
from streamagent.core.contracts import validator
from streamagent.offline.kafka_logs import KafkaRange, read_kafka_log
from streamagent.ops.kafka import make_admin, plaintext
from tests.integration.helpers import produce

pytestmark = pytest.mark.kafka

T0 = 1_767_225_600_000
ACTIONS = ("none", "pct10", "amt5")


def decision(i: int) -> dict:
    a = i % 3
    return {"schema_version": 1, "decision_id": f"{i:032x}", "user_id": f"u{i % 10}",
            "ts": T0 + i * 60_000, "action": ACTIONS[a], "action_index": a, "propensity": 1 / 3,
            "explored": True, "exploration": "epsilon", "epsilon": 1.0, "policy_version": 0,
            "trigger_event_id": f"e{i}", "trigger_type": "session_start",
            "q_values": [0.0, 0.0, 0.0], "allowed": [True, True, i % 4 != 0],
            "blocked_by": [], "features": [1.0, float(i % 5), float(i % 2)], "cost": 0.0}


def reward(d: dict) -> dict:
    r = 2.0 if d["action_index"] == 1 else 0.5
    return {"schema_version": 1, "decision_id": d["decision_id"], "user_id": d["user_id"],
            "ts": d["ts"], "closed_at": d["ts"] + 3_600_000, "reward": r, "converted": True,
            "orders": 1, "amount": 10.0, "discount": 0.0, "outcome": "converted",
            "action_index": d["action_index"], "policy_version": 0}


@pytest.fixture
def topics(kafka, run_id):
    names = (f"ev-{run_id}-decision-log", f"ev-{run_id}-rewards")
    admin = make_admin(plaintext(kafka))  # kept alive until the topics exist
    for f in admin.create_topics([NewTopic(n, 2, 1) for n in names]).values():
        f.result(30)
    decisions = [decision(i) for i in range(120)]
    for d in decisions:
        validator("decision-log")(d)
    rewards = [reward(d) for d in decisions[:100]]  # the last 20 windows are still open
    produce(kafka, names[0], [(d["user_id"].encode(), orjson.dumps(d)) for d in decisions])
    produce(kafka, names[1], [(r["user_id"].encode(), orjson.dumps(r)) for r in rewards])
    produce(kafka, names[0], [(b"u1", orjson.dumps(decisions[5]))])  # a re-sent duplicate
    return names


def test_reads_the_join_in_a_range(kafka, topics):
    kl = read_kafka_log(plaintext(kafka), *topics, actions=ACTIONS, feature_names=("bias", "k", "odd"))
    log = kl.log
    assert log.n == 100 and log.action_names == ACTIONS
    assert log.feature_names == ("bias", "k", "odd")
    assert any("20 of 120 decisions have no reward yet" in n for n in kl.notes)
    assert sorted(log.decision_ids) == sorted(f"{i:032x}" for i in range(100))
    assert log.allowed.shape == (100, 3) and not log.allowed[:, 2].all()
    # an event-time range
    part = read_kafka_log(plaintext(kafka), *topics, rng=KafkaRange(since_ms=T0 + 10 * 60_000,
                                                         until_ms=T0 + 30 * 60_000)).log
    assert part.n == 20
    # features of another feature set get generic names and a note
    other = read_kafka_log(plaintext(kafka), *topics, feature_names=("only", "two"))
    assert other.log.feature_names == ("x0", "x1", "x2") and any("3 features" in n for n in other.notes)


def test_offset_range(kafka, topics):
    log = read_kafka_log(plaintext(kafka), *topics, rng=KafkaRange(start_offset=0, end_offset=10)).log
    assert 0 < log.n <= 20  # at most 10 per partition, only those with rewards


def test_evaluate_from_kafka(kafka, topics, tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMAGENT_KAFKA_BOOTSTRAP", kafka)
    monkeypatch.setenv("STREAMAGENT_TOPIC_DECISION_LOG", topics[0])
    monkeypatch.setenv("STREAMAGENT_TOPIC_REWARDS", topics[1])
    out = tmp_path / "out.json"
    assert main(["evaluate", "--from-kafka", "--policy", "never", "--policy", "always:pct10",
                 "--policy", "logging", "--bootstrap", "50", "--json", str(out)]) == 0
    doc = orjson.loads(out.read_bytes())
    assert doc["n"] == 100
    by = {r["policy"]: {e["name"]: e for e in r["estimates"]} for r in doc["results"]}
    # rewards are deterministic per action: IPS of "always pct10" is 2 where pct10 was allowed
    assert by["always:pct10"]["dr"]["value"] == pytest.approx(2.0, abs=0.05)
    assert by["never"]["dr"]["value"] == pytest.approx(0.5, abs=0.05)
    assert by["logging"]["on-policy"]["value"] == pytest.approx((33 * 2.0 + 67 * 0.5) / 100)
