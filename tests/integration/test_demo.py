"""The quick start's first command, `streamagent demo`, end to end on a small shop: its own
broker, worker and learner, the simulated shop through Kafka, the dead letters, the report."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.kafka, pytest.mark.slow, pytest.mark.timeout(900)]


def test_demo_runs_the_loop_and_writes_its_report(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMAGENT_")}
    env["STREAMAGENT_DATA_DIR"] = str(tmp_path / "data")
    out = tmp_path / "report"
    r = subprocess.run([sys.executable, "-m", "streamagent.cli", "demo", "--days", "4",
                        "--users", "40", "--out", str(out)], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = (out / "report.md").read_text()
    assert "optimum" in report.lower() and (out / "learning-curve.png").stat().st_size > 1000
    assert "dead-letter" in report.lower() or "dlq" in report.lower(), report
