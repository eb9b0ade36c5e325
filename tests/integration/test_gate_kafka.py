"""The promotion gate and the model registry through a real broker: every version lands on
model-candidates with a verdict, promoted ones reach the worker, and an operator's rollback to
an older version reaches it too."""
from __future__ import annotations

import json
import time

import orjson
import pytest

from streamagent.cli import main
from streamagent.config import Settings
from streamagent.stream import registry
from streamagent.units import HOUR_MS
from tests.conftest import topic_env
from tests.integration.helpers import WorkerProcess, event, produce, read_json
from tests.integration.test_learning_loop import LOOP_SETTINGS

pytestmark = pytest.mark.kafka

T0 = 1_767_225_600_000


def test_gate_registry_and_rollback(kafka, tmp_path, run_id, monkeypatch, capsys):
    env = topic_env("g" + run_id, kafka, tmp_path, **LOOP_SETTINGS,
                    STREAMAGENT_GATE="true", STREAMAGENT_GATE_HOLDOUT="0.3", STREAMAGENT_GATE_MIN_SAMPLES="30")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    s = Settings(_env_file=None)
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    learner = WorkerProcess(env, tmp_path / "learner.log", command="learner",
                            ready_marker=b"learner: model v").start()
    users = [f"g-{i}" for i in range(30)]
    try:
        rounds, deadline = 0, time.monotonic() + 180
        def judged_enough() -> bool:  # three versions, and one judged on held-out decisions
            got = registry.candidates(s)
            return len(got) >= 3 and any(v.meta.get("outcome") in ("promoted", "rejected")
                                         for v in got.values())

        while time.monotonic() < deadline and not judged_enough():
            ts = T0 + rounds * 3 * HOUR_MS
            produce(kafka, s.topic_user_events,
                    [event(f"{u}-r{rounds}", u, "session_start", ts) for u in users])
            log = read_json(kafka, s.topic_decision_log, len(users) * (rounds + 1))
            produce(kafka, s.topic_conversions, [
                (d["user_id"].encode(), orjson.dumps({
                    "order_id": f"o-{d['decision_id']}", "user_id": d["user_id"],
                    "ts": d["ts"] + HOUR_MS // 2, "amount": 80.0}))
                for d in log if d["trigger_event_id"].endswith(f"-r{rounds}")
                and int(d["user_id"].split("-")[1]) % 2 == 0])
            rounds += 1
        versions = registry.candidates(s)
        assert len(versions) >= 3, learner.tail()
        outcomes = {v.meta.get("outcome") for v in versions.values()}
        assert outcomes <= {"promoted", "rejected", "unverified"} and outcomes
        judged = [v for v in versions.values() if v.meta.get("outcome") in ("promoted", "rejected")]
        assert judged, f"no version was judged on held-out decisions: {outcomes}"
        assert all(v.meta["n"] >= 30 for v in judged)

        assert main(["model", "list"]) == 0
        listing = capsys.readouterr().out
        assert "<- live" in listing and str(max(versions)) in listing

        # an operator rolls back to version 1: a new promotion of an older version (the learner
        # is stopped first, so no new version races the check)
        learner.stop()
        live_before = registry.live(s)
        assert main(["model", "promote", "1"]) == 0
        now = registry.live(s)
        assert now.version == 1 and now.promotion > live_before.promotion
        assert now.meta["promoted_by"] == "operator"
        # the worker follows: new decisions carry policy_version 1
        ts = T0 + (rounds + 1) * 3 * HOUR_MS
        seen = set()
        for k in range(10):
            produce(kafka, s.topic_user_events,
                    [event(f"{u}-after{k}", u, "session_start", ts + k * HOUR_MS) for u in users])
            time.sleep(2)
            seen = {d["policy_version"] for d in read_json(kafka, s.topic_decision_log, 1)
                    if d["trigger_event_id"].endswith(f"-after{k}")}
            if seen == {1}:
                break
        assert seen == {1}, worker.tail()

        # explain one of those decisions with the version that made it (from the registry)
        d = next(d for d in read_json(kafka, s.topic_decision_log, 1)
                 if d["policy_version"] == 1)
        capsys.readouterr()
        t = time.monotonic()
        assert main(["explain", d["decision_id"], "--json"]) == 0
        took = time.monotonic() - t
        e = json.loads(capsys.readouterr().out)
        assert e["action"] == d["action"] and e["policy_version"] == 1
        assert list(e["q_values"].values()) == pytest.approx(d["q_values"], abs=1e-4)
        assert abs(e["completeness_error"]) < 1e-6
        assert main(["explain", d["decision_id"]]) == 0
        text = capsys.readouterr().out
        assert d["decision_id"] in text and "Q per action" in text and "new user" in text
        with capsys.disabled():
            print(f"\nexplain took {took:.2f} s\n{text}")
        assert main(["explain", "0" * 32, "--timeout", "20"]) == 2
        assert "no decision" in capsys.readouterr().err

        # a model file from elsewhere (here: version 2, saved) comes in as the next version
        f = tmp_path / "elsewhere.pt"
        registry.candidates(s)[2].save(f)
        newest = max(registry.candidates(s))
        assert main(["model", "import", "--file", str(f), "--promote"]) == 0
        now = registry.live(s)
        assert now.version == newest + 1 and now.meta["promoted_by"] == "operator import"
        assert now.meta["imported_version"] == 2
        assert registry.candidates(s)[newest + 1].meta["outcome"] == "imported"
        (tmp_path / "junk.pt").write_bytes(b"not a model")
        assert main(["model", "import", "--file", str(tmp_path / "junk.pt")]) == 2
        assert "not a model snapshot" in capsys.readouterr().err
    finally:
        learner.kill()
        worker.stop()
