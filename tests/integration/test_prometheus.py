"""The dashboards and rules against a real Prometheus scraping a real worker and learner.

Prometheus (Debian's package; `make test` installs it) runs on loopback with the project's own
deploy/prometheus/prometheus.local.yml, its file-based targets pointed at the processes of this
test. While a short run pushes decisions, conversions, rewards, transitions and model versions
through the real broker, the test waits until every target is up, then asserts that every PromQL
expression of the dashboards and every recording rule returns data.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import orjson
import pytest
import yaml

from streamagent.ops.local import free_port, terminate
from streamagent.units import HOUR_MS
from tests.conftest import topic_env
from tests.integration.helpers import TopicReader, WorkerProcess, event, produce

pytestmark = pytest.mark.kafka

ROOT = Path(__file__).resolve().parents[2]
PROM_DIR = ROOT / "deploy" / "prometheus"
DASHBOARDS = sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"))
T0 = 1_767_225_600_000


def dashboard_exprs() -> list[tuple[str, str]]:
    out = []

    def walk(panels, board):
        for p in panels:
            walk(p.get("panels", []), board)
            for t in p.get("targets", []):
                if t.get("expr"):
                    out.append((f"{board} / {p.get('title')}", t["expr"]))

    for f in DASHBOARDS:
        d = json.loads(f.read_text())
        walk(d.get("panels", []), f.name)
    return out


def recording_rules() -> list[str]:
    doc = yaml.safe_load((PROM_DIR / "rules" / "streamagent.rules.yml").read_text())
    return [r["record"] for g in doc["groups"] for r in g["rules"] if "record" in r]


def query(base: str, expr: str) -> list:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as resp:
        doc = json.loads(resp.read())
    assert doc["status"] == "success", doc
    return doc["data"]["result"]


def targets_up(base: str) -> dict[str, str]:
    with urllib.request.urlopen(f"{base}/api/v1/targets", timeout=10) as resp:
        doc = json.loads(resp.read())
    return {t["labels"]["job"]: t["health"] for t in doc["data"]["activeTargets"]}


@pytest.fixture
def prometheus(tmp_path):
    if not shutil.which("prometheus"):
        pytest.fail("prometheus is not installed: run `make setup` (it installs Debian's package)")
    conf = tmp_path / "prom"
    shutil.copytree(PROM_DIR, conf)
    port = free_port()
    proc = subprocess.Popen(
        ["prometheus", f"--config.file={conf / 'prometheus.local.yml'}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=open(tmp_path / "prometheus.log", "wb"), stderr=subprocess.STDOUT, cwd=conf)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{base}/-/ready", timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    else:
        terminate(proc)
        pytest.fail((tmp_path / "prometheus.log").read_text()[-3000:])
    yield base, conf
    terminate(proc)


def test_every_dashboard_query_and_recording_rule_returns_data(kafka, tmp_path, run_id, prometheus):
    base, conf = prometheus
    wport, lport = free_port(), free_port()
    (conf / "targets" / "worker.json").write_text(json.dumps([{"targets": [f"127.0.0.1:{wport}"]}]))
    (conf / "targets" / "learner.json").write_text(json.dumps([{"targets": [f"127.0.0.1:{lport}"]}]))
    env = topic_env("m" + run_id, kafka, tmp_path, STREAMAGENT_METRICS_PORT=str(wport),
                    STREAMAGENT_LEARNER_METRICS_PORT=str(lport),
                    STREAMAGENT_ATTRIBUTION_WINDOW_HOURS="1", STREAMAGENT_ALLOWED_LATENESS_MINUTES="1",
                    STREAMAGENT_LEARNING_STARTS="16", STREAMAGENT_BATCH_SIZE="16",
                    STREAMAGENT_SNAPSHOT_EVERY_UPDATES="10", STREAMAGENT_SNAPSHOT_INTERVAL_S="1",
                    STREAMAGENT_CAP_MIN_GAP_HOURS="1", STREAMAGENT_BUDGET_PER_PERIOD="200")
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    learner = WorkerProcess(env, tmp_path / "learner.log", command="learner",
                            ready_marker=b"learner: model v").start()
    reader = TopicReader(kafka, env["STREAMAGENT_TOPIC_DECISION_LOG"])
    users = [f"m-{i}" for i in range(30)]
    try:
        start = time.monotonic()
        rnd = 0
        # traffic for long enough that rates over [1m] have several scrapes (every 5 s)
        while time.monotonic() - start < 45 or rnd < 6:
            ts = T0 + rnd * 2 * HOUR_MS
            items = []
            for u in users:
                items.append(event(f"{u}-{rnd}", u, "session_start", ts, device="mobile"))
                items.append(event(f"{u}-{rnd}-v", u, "page_view", ts + 1, category="toys", price=9.0))
                items.append(event(f"{u}-{rnd}-c", u, "add_to_cart", ts + 2, category="toys", price=9.0))
            items.append((b"m-bad", b"{not json"))
            produce(kafka, env["STREAMAGENT_TOPIC_USER_EVENTS"], items)
            decisions = reader.read(2 * len(users), timeout=30)
            produce(kafka, env["STREAMAGENT_TOPIC_CONVERSIONS"], [
                (d["user_id"].encode(), orjson.dumps({
                    "order_id": f"o-{d['decision_id']}", "user_id": d["user_id"],
                    "ts": d["ts"] + 600_000, "amount": 40.0, "decision_id": d["decision_id"]}))
                for d in decisions if d["trigger_type"] == "session_start"
                and int(d["user_id"].split("-")[1]) % 2 == 0])
            rnd += 1
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            up = targets_up(base)
            if up.get("streamagent-worker") == "up" and up.get("streamagent-learner") == "up":
                break
            time.sleep(1)
        assert up == {"streamagent-worker": "up", "streamagent-learner": "up"}, up
        time.sleep(12)  # a few more scrapes and rule evaluations after the last traffic

        exprs = dashboard_exprs()
        assert len(exprs) >= 20, "the overview dashboard should have many panels"
        empty = [(where, e) for where, e in exprs if not query(base, e)]
        assert not empty, "dashboard queries with no data:\n" + "\n".join(f"{w}: {e}" for w, e in empty)
        rules = recording_rules()
        assert rules
        missing = [r for r in rules if not query(base, r)]
        assert not missing, f"recording rules with no data: {missing}"
    finally:
        reader.close()
        learner.stop()
        worker.stop()
