"""Model safety through a real broker: a corrupt newest snapshot on model-updates stops
neither the learner nor a worker from starting (both take the newest valid one), and bad
snapshots published while the worker runs are refused and counted while it keeps deciding
with the model it has; the next good one still reaches it."""
from __future__ import annotations

import time
import urllib.request

import pytest
import torch

from streamagent.config import Settings
from streamagent.core.catalog import load_catalog
from streamagent.core.features import FEATURE_NAMES
from streamagent.core.modelcheck import PRODUCER_KEY
from streamagent.core.qnet import ModelSnapshot, init_network
from streamagent.ops.local import free_port
from streamagent.ops.topics import create_topics
from streamagent.params import shipped
from streamagent.units import HOUR_MS
from tests.conftest import topic_env
from tests.integration.helpers import WorkerProcess, event, produce, read_json

pytestmark = pytest.mark.kafka

T0 = 1_767_225_600_000
S = shipped()
CAT = load_catalog(S.catalog_path)


def snapshot(version: int, promotion: int, app_id: str, **kw) -> ModelSnapshot:
    net = init_network(len(FEATURE_NAMES), CAT.n_actions, tuple(S.hidden_sizes), version)
    snap = ModelSnapshot.from_network(net, version, 100 * version, CAT.actions, FEATURE_NAMES)
    snap.promotion, snap.created_at, snap.meta = promotion, time.time(), {PRODUCER_KEY: app_id}
    for k, v in kw.items():
        setattr(snap, k, v)
    return snap


def rejected(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("streamagent_decision_model_rejected_total{"):
            label, value = line.split("} ")
            out[label.split('reason="')[1].rstrip('"')] = float(value)
    return out


def test_bad_snapshots_are_refused_and_the_worker_keeps_deciding(kafka, tmp_path, run_id,
                                                                 monkeypatch):
    port = free_port()
    prefix = "ms" + run_id
    env = topic_env(prefix, kafka, tmp_path, STREAMAGENT_METRICS_PORT=str(port))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    create_topics(Settings(_env_file=None), log=lambda *_: None)  # model-updates: 1 partition
    updates, app_id = env["STREAMAGENT_TOPIC_MODEL_UPDATES"], env["STREAMAGENT_APP_ID"]
    users = [f"ms-{i}" for i in range(8)]

    def decide_round(k: int) -> set[int]:
        produce(kafka, env["STREAMAGENT_TOPIC_USER_EVENTS"],
                [event(f"{u}-r{k}", u, "session_start", T0 + k * HOUR_MS) for u in users])
        log = read_json(kafka, env["STREAMAGENT_TOPIC_DECISION_LOG"], len(users) * (k + 1))
        mine = [d for d in log if d["trigger_event_id"].endswith(f"-r{k}")]
        assert len(mine) == len(users), worker.tail()
        return {d["policy_version"] for d in mine}

    # v1 is good; the newest record is garbage (a crash-looping start before this change)
    produce(kafka, updates, [(b"model", snapshot(1, 1, app_id).to_bytes()),
                             (b"model", b"\x00not a snapshot")])

    learner = WorkerProcess(env, tmp_path / "learner.log", command="learner",
                            ready_marker=b"learner: model v").start()
    learner.stop()
    assert "learner: model v1," in learner.tail(200), learner.tail()
    assert "skipping the model snapshot" in learner.tail(200)

    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    try:
        assert decide_round(0) == {1}
        # the follower re-read the newest record (the garbage) when it started
        assert rejected(port)["undecodable"] == 1

        nan = snapshot(2, 2, app_id)
        with torch.no_grad():
            nan.state_dict["net.0.weight"][0, 0] = float("nan")
        bad = [nan,
               snapshot(3, 2 ** 62, app_id),  # would pin every decider forever
               snapshot(4, 3, app_id, actions=CAT.actions[::-1]),
               snapshot(5, 3, "another-deployment")]
        produce(kafka, updates, [(b"model", s.to_bytes()) for s in bad]
                + [(b"model", snapshot(6, 3, app_id).to_bytes()[:500])])  # truncated
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and sum(rejected(port).values()) < 6:
            time.sleep(0.5)
        assert rejected(port) == {"undecodable": 2, "shape": 0, "non_finite": 1, "actions": 1,
                                  "features": 0, "version": 1, "producer": 1}, worker.tail()
        assert decide_round(1) == {1}, "a refused snapshot reached the decider"

        # the next good version is taken as usual
        produce(kafka, updates, [(b"model", snapshot(7, 3, app_id).to_bytes())])
        seen: set[int] = set()
        for k in range(2, 12):
            seen = decide_round(k)
            if seen == {7}:
                break
            time.sleep(1)
        assert seen == {7}, worker.tail()
        log = worker.tail(400)
        assert "refused a model snapshot" in log and "still deciding with model v1" in log
    finally:
        worker.stop()
