"""/healthz and /readyz of a real worker and a real learner on the real broker.

Each process is started with its metrics port and polled from the moment it runs: /healthz
answers while it starts, /readyz turns 200 once the worker has joined its group, recovered its
tables and loaded a model, and once the learner has read its checkpoint (none here: it starts
fresh) and polls its consumer. A second worker on a one-partition topic is an idle spare, and
still ready.
"""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest

from streamagent.ops.local import free_port
from tests.conftest import topic_env
from tests.integration.helpers import WorkerProcess

pytestmark = pytest.mark.kafka


def get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_ready(proc: WorkerProcess, port: int, timeout: float = 90.0) -> tuple[list[int], dict]:
    """Poll /readyz until 200: the statuses seen (connection refused aside) and the last body."""
    seen: list[int] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.proc.poll() is None, f"{proc.command} exited:\n{proc.tail()}"
        try:
            status, body = get(port, "/readyz")
        except OSError:  # not serving yet (imports)
            time.sleep(0.2)
            continue
        seen.append(status)
        doc = json.loads(body)
        assert set(doc) == {"ready", "checks", "failing"}, doc
        assert doc["ready"] == (status == 200)
        assert doc["failing"] == [n for n, c in doc["checks"].items() if not c["ok"]]
        if status == 200:
            return seen, doc
        assert status == 503, status
        time.sleep(0.2)
    raise AssertionError(f"{proc.command} not ready in {timeout}s; last: {doc}\n{proc.tail()}")


def start(env: dict, log, command: str = "worker") -> WorkerProcess:
    # an empty marker: return as soon as the process runs; readiness is what is under test
    return WorkerProcess(env, log, command=command, ready_marker=b"").start()


def test_worker_and_learner_become_ready(kafka, tmp_path, run_id):
    wport, lport = free_port(), free_port()
    env = topic_env("h" + run_id, kafka, tmp_path, STREAMAGENT_METRICS_PORT=str(wport),
                    STREAMAGENT_LEARNER_METRICS_PORT=str(lport))
    worker = start(env, tmp_path / "worker.log")
    learner = start(env, tmp_path / "learner.log", command="learner")
    try:
        seen, doc = wait_ready(worker, wport)
        assert set(doc["checks"]) == {"partitions", "recovery", "model"}
        assert doc["checks"]["partitions"]["detail"] == (
            f"2 partitions of {env['STREAMAGENT_TOPIC_USER_EVENTS']}: [0, 1]")
        assert doc["checks"]["model"]["detail"] == "v0, following model-updates"
        assert 503 in seen, "the worker should report not ready while it joins its group"
        assert get(wport, "/healthz") == (200, b"ok\n")
        status, body = get(wport, "/metrics")
        assert status == 200 and b"streamagent_decision_model_version" in body

        seen, doc = wait_ready(learner, lport)
        assert set(doc["checks"]) == {"checkpoint", "consumer"}
        assert "started fresh" in doc["checks"]["checkpoint"]["detail"]
        assert doc["checks"]["consumer"]["detail"].startswith(
            f"2 partitions of {env['STREAMAGENT_TOPIC_TRANSITIONS']}")
        assert get(lport, "/healthz") == (200, b"ok\n")
        assert b"streamagent_learning_replay_size" in get(lport, "/metrics")[1]
        assert get(lport, "/nope")[0] == 404
    finally:
        learner.stop()
        worker.stop()


def test_a_spare_worker_with_no_partition_is_ready(kafka, tmp_path, run_id):
    """One partition, two workers: one gets it, the other idles as a spare and is ready."""
    ports = free_port(), free_port()
    workers = []
    try:
        for i, port in enumerate(ports):
            env = topic_env("s" + run_id, kafka, tmp_path / f"w{i}", STREAMAGENT_PARTITIONS="1",
                            STREAMAGENT_METRICS_PORT=str(port))
            (tmp_path / f"w{i}").mkdir()
            workers.append(start(env, tmp_path / f"w{i}.log"))
            if i == 0:
                wait_ready(workers[0], port)
        deadline = time.monotonic() + 90
        while True:  # until both are ready after the second one joined
            docs = [wait_ready(w, p)[1] for w, p in zip(workers, ports)]
            details = sorted(d["checks"]["partitions"]["detail"] for d in docs)
            if any("idle spare" in d for d in details) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        topic = env["STREAMAGENT_TOPIC_USER_EVENTS"]
        assert details == [f"0 partitions of {topic}: an idle spare (more workers than "
                           f"partitions)", f"1 partitions of {topic}: [0]"], details
    finally:
        for w in workers:
            w.stop()
