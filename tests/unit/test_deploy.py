"""The deploy/ files: Prometheus config and rules checked and unit-tested by promtool,
dashboards well-formed, and every metric the code exports documented."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from streamagent.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "deploy" / "prometheus"


def promtool(*args: str, cwd: Path = PROM) -> str:
    if not shutil.which("promtool"):
        pytest.fail("promtool is not installed: run `make setup` (Debian package prometheus)")
    proc = subprocess.run(["promtool", *args], cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_rules_are_valid():
    promtool("check", "rules", "rules/streamagent.rules.yml")


def test_alert_rules_unit_tests_pass():
    tests = sorted((PROM / "tests").glob("*.yml"))
    assert tests
    for t in tests:
        promtool("test", "rules", str(t.relative_to(PROM)))


@pytest.mark.parametrize("config", ["prometheus.local.yml", "prometheus.yml"])
def test_prometheus_configs_are_valid(config):
    promtool("check", "config", config)


def test_every_alert_has_a_test_and_annotations():
    rules = yaml.safe_load((PROM / "rules" / "streamagent.rules.yml").read_text())
    alerts = [r for g in rules["groups"] for r in g["rules"] if "alert" in r]
    assert len(alerts) >= 8
    tested = "".join(p.read_text() for p in (PROM / "tests").glob("*.yml"))
    for a in alerts:
        assert a["alert"] in tested, f"{a['alert']} has no promtool test"
        assert {"summary", "description"} <= set(a.get("annotations", {})), a["alert"]
        assert a.get("labels", {}).get("severity"), a["alert"]


def test_dashboards_are_well_formed():
    ds = yaml.safe_load(next((ROOT / "deploy/grafana/provisioning/datasources").glob("*.yml")).read_text())
    uids = {d.get("uid") for d in ds["datasources"]}
    boards = sorted((ROOT / "deploy/grafana/dashboards").glob("*.json"))
    assert boards
    for f in boards:
        d = json.loads(f.read_text())
        assert d.get("uid") and d.get("title")

        def walk(panels):
            for p in panels:
                yield p
                yield from walk(p.get("panels", []))

        for p in walk(d["panels"]):
            for t in p.get("targets", []):
                assert "$" not in t.get("expr", ""), f"{p.get('title')}: variables cannot be checked"
            dsref = p.get("datasource")
            if isinstance(dsref, dict) and p.get("type") != "row":
                assert dsref.get("uid") in uids, p.get("title")


def test_every_exported_metric_is_documented():
    doc = (ROOT / "docs" / "METRICS.md").read_text()
    names = {m.name for m in Metrics().registry.collect()}
    assert names
    missing = sorted(n for n in names if n not in doc and n + "_total" not in doc)
    assert not missing, f"undocumented metrics: {missing}"


def test_compose_file_parses_and_names_the_services():
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert {"kafka", "decider", "learner", "prometheus", "grafana"} <= set(doc["services"])


def test_compose_defaults_are_safe():
    """What tests/containers checks by running the stack, checked here statically: each decider
    has its own /data, monitoring is on loopback, Grafana has no default password and no
    anonymous access, and the healthchecks ask /readyz."""
    s = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    for v in s["decider"]["volumes"]:  # an anonymous volume per replica, never a shared one
        assert isinstance(v, dict) and v["type"] in ("volume", "tmpfs") and "source" not in v, v
        assert v["target"] == "/data"
    for name in ("kafka", "prometheus", "grafana"):
        for p in s[name]["ports"]:
            assert p.startswith(("127.0.0.1:", "${MONITORING_ADDR:-127.0.0.1}:")), (name, p)
    env = s["grafana"]["environment"]
    assert env["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:?")
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "${GRAFANA_ANONYMOUS_ENABLED:-false}"
    for name, port in (("decider", 9400), ("learner", 9401)):
        assert f"http://127.0.0.1:{port}/readyz" in " ".join(s[name]["healthcheck"]["test"]), name
    assert "demo" in s["shop"]["profiles"] and s["shop"]["command"][0] == "simulate"
