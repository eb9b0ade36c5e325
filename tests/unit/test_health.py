"""The HTTP endpoints of a worker or learner: /metrics, /healthz, /readyz (streamagent/metrics.py),
and the readiness checks the worker and learner register. No broker needed."""
from __future__ import annotations

import asyncio
import gzip
import json
import socket
import threading
import types
import urllib.error
import urllib.request

import faust
import pytest
from prometheus_client import CollectorRegistry

from streamagent.errors import ConfigError
from streamagent.metrics import HealthServer, Metrics
from streamagent.stream.faust_internals import group_state
from streamagent.stream.learner import LearnerHealth
from streamagent.stream.worker import WorkerHealth


def get(port: int, path: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


@pytest.fixture
def served():
    m = Metrics(CollectorRegistry(), topics=("user-events",))
    server = HealthServer(m, "127.0.0.1", 0).start()  # port 0: an ephemeral port
    try:
        yield m, server.port
    finally:
        server.stop()


def test_metrics_are_served_as_prometheus_text(served):
    m, port = served
    m.events.labels("session_start").inc(3)
    status, headers, body = get(port, "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert 'streamagent_ingest_events_total{type="session_start"} 3.0' in body.decode()


def test_metrics_negotiate_openmetrics_gzip_and_name_filter_like_prometheus_client(served):
    m, port = served
    status, headers, body = get(port, "/metrics",
                                {"Accept": "application/openmetrics-text; version=1.0.0",
                                 "Accept-Encoding": "gzip"})
    assert status == 200
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    assert headers.get("Content-Encoding") == "gzip"
    assert gzip.decompress(body).rstrip().endswith(b"# EOF")
    _, _, body = get(port, "/metrics?name[]=streamagent_decision_epsilon")
    assert b"streamagent_decision_epsilon" in body
    assert b"streamagent_ingest_events_total" not in body


def test_healthz_answers_ok(served):
    _, port = served
    status, headers, body = get(port, "/healthz")
    assert (status, body) == (200, b"ok\n")
    assert headers["Content-Type"].startswith("text/plain")


def test_readyz_is_503_naming_failing_checks_then_200_when_they_pass(served):
    m, port = served
    state = {"partitions": False, "model": True}
    m.add_ready_check("partitions", lambda: (state["partitions"], "waiting"))
    m.add_ready_check("model", lambda: state["model"])
    status, headers, body = get(port, "/readyz")
    doc = json.loads(body)
    assert status == 503 and headers["Content-Type"] == "application/json"
    assert doc["ready"] is False and doc["failing"] == ["partitions"]
    assert doc["checks"] == {"partitions": {"ok": False, "detail": "waiting"},
                             "model": {"ok": True, "detail": ""}}
    state["partitions"] = True
    status, _, body = get(port, "/readyz")
    doc = json.loads(body)
    assert status == 200 and doc["ready"] is True and doc["failing"] == []
    assert set(doc["checks"]) == {"partitions", "model"}


def test_a_check_that_raises_fails_readiness_not_the_server(served):
    m, port = served
    m.add_ready_check("broken", lambda: 1 / 0)
    status, _, body = get(port, "/readyz")
    doc = json.loads(body)
    assert status == 503 and doc["failing"] == ["broken"]
    assert "ZeroDivisionError" in doc["checks"]["broken"]["detail"]
    assert get(port, "/healthz")[0] == 200


def test_unknown_paths_are_404(served):
    _, port = served
    for path in ("/", "/health", "/metrics/x", "/readyz/"):
        assert get(port, path)[0] == 404, path


def test_serve_port_0_disables_and_a_taken_port_is_a_config_error():
    m = Metrics(CollectorRegistry())
    assert m.serve(0) is None
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match="STREAMAGENT_LEARNER_METRICS_PORT"):
            m.serve(port, "127.0.0.1", setting="STREAMAGENT_LEARNER_METRICS_PORT")
        with pytest.raises(ConfigError, match=f"127.0.0.1:{port}.*STREAMAGENT_METRICS_PORT"):
            m.serve(port)


def test_serving_binds_loopback_by_default():
    m = Metrics(CollectorRegistry())
    server = HealthServer(m)
    try:
        assert server.httpd.server_address[0] == "127.0.0.1"
    finally:
        server.httpd.server_close()


# --- the worker's checks, on a stand-in for the Faust app ------------------------------------


class FakeApp:
    def __init__(self):
        self.rebalancing_count, self.rebalancing, self.in_recovery = 0, False, False
        self.tables = types.SimpleNamespace(_recovery=None)
        self.on_partitions_assigned = types.SimpleNamespace(connect=self._connect)
        self.receivers = []

    def _connect(self, fn):
        self.receivers.append(fn)

    def assign(self, *parts: int, topic: str = "user-events") -> None:
        tps = {faust.types.TP(topic, p) for p in parts} | {faust.types.TP("other", 0)}
        for fn in self.receivers:
            asyncio.run(fn(self, tps))


def worker_checks(m: Metrics) -> dict:
    return m.readiness()[1]


def test_worker_checks_follow_the_group_recovery_and_model():
    m = Metrics(CollectorRegistry())
    health = WorkerHealth(m, "user-events")
    ready, checks = m.readiness()
    assert not ready and set(checks) == {"partitions", "recovery", "model"}
    assert not any(c["ok"] for c in checks.values())

    app = FakeApp()
    engine = types.SimpleNamespace(model=types.SimpleNamespace(version=3))
    follower = types.SimpleNamespace(is_alive=lambda: True)
    health.attach(app, engine, follower)
    checks = worker_checks(m)
    assert checks["model"] == {"ok": True, "detail": "v3, following model-updates"}
    assert not checks["partitions"]["ok"] and "join" in checks["partitions"]["detail"]

    app.rebalancing_count, app.rebalancing = 1, True  # the first join: revoked, then assigned
    app.assign(1, 0)
    app.in_recovery = True
    checks = worker_checks(m)
    assert not checks["partitions"]["ok"] and not checks["recovery"]["ok"]
    assert "restoring" in checks["recovery"]["detail"]

    app.tables._recovery = types.SimpleNamespace(completed=threading.Event())  # Faust built it
    assert not worker_checks(m)["recovery"]["ok"]
    app.in_recovery, app.rebalancing = False, False  # recovery done, "Worker ready"
    app.tables._recovery.completed.set()
    ready, checks = m.readiness()
    assert ready, checks
    assert checks["partitions"]["detail"] == "2 partitions of user-events: [0, 1]"

    app.rebalancing_count, app.rebalancing = 2, True  # a later rebalance: not ready meanwhile
    assert not m.readiness()[0]
    app.assign()  # this worker is now a spare: no partition of user-events
    app.rebalancing = False
    ready, checks = m.readiness()
    assert ready and "idle spare" in checks["partitions"]["detail"]


def test_worker_model_check_fails_when_the_follower_died_but_not_when_pinned():
    m = Metrics(CollectorRegistry())
    health = WorkerHealth(m, "user-events")
    engine = types.SimpleNamespace(model=types.SimpleNamespace(version=7))
    health.attach(FakeApp(), engine, types.SimpleNamespace(is_alive=lambda: False))
    assert not worker_checks(m)["model"]["ok"]
    health.attach(FakeApp(), engine, None, pinned=True)
    assert worker_checks(m)["model"] == {"ok": True, "detail": "v7, pinned by STREAMAGENT_MODEL_PATH"}


def test_group_state_reads_a_real_faust_app_without_building_its_recovery():
    """The flags group_state reads exist on this Faust (a throwaway app, never started), and
    reading them does not build the Recovery service (built on the HTTP server's thread, it
    would be bound to the wrong event loop and the worker would never join its group)."""
    async def main():
        app = faust.App("health-test", broker="kafka://127.0.0.1:1", store="memory://",
                        web_enabled=False)
        app.Table("t", default=None, partitions=1)
        before = await asyncio.to_thread(group_state, app)  # as the HTTP server reads it
        assert app.tables._recovery is None, "group_state built the Recovery service"
        recovery = app.tables.recovery  # what Faust does when the table manager starts
        assert app.tables._recovery is recovery, "TableManager no longer keeps it in _recovery"
        recovery.completed.set()
        return before, group_state(app)

    before, after = asyncio.run(main())
    assert (before.rebalances, before.rebalancing, before.recovered) == (0, False, False)
    assert after.recovered


# --- the learner's checks ---------------------------------------------------------------------


def test_learner_checks_checkpoint_then_polling_within_the_bound(monkeypatch):
    m = Metrics(CollectorRegistry())
    health = LearnerHealth(m, "transitions", max_poll_gap_s=30)
    ready, checks = m.readiness()
    assert not ready and set(checks) == {"checkpoint", "consumer"}

    svc = types.SimpleNamespace(started_from="no checkpoint at x: started fresh from model v0",
                                partitions=[0, 1], polled_at=None)
    health.svc = svc
    checks = worker_checks(m)
    assert checks["checkpoint"]["ok"] and "started fresh" in checks["checkpoint"]["detail"]
    assert not checks["consumer"]["ok"] and "not polled yet" in checks["consumer"]["detail"]

    now = [1000.0]
    monkeypatch.setattr("streamagent.stream.learner.time.monotonic", lambda: now[0])
    svc.polled_at = 999.0
    assert m.readiness()[0]
    now[0] = 1031.0  # 32 s since the last poll: over the 30 s bound
    ready, checks = m.readiness()
    assert not ready and checks["consumer"]["detail"].startswith("last poll 32 s ago")
    svc.partitions, svc.polled_at = [], 1031.0
    assert "no partition" in worker_checks(m)["consumer"]["detail"]
