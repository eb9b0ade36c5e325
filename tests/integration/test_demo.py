"""The quick start's first command, `streamagent demo`, end to end on a small shop: its own
broker, worker and learner, the simulated shop through Kafka, the dead letters, the report."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time

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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by its parent) counts as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_terminated_demo_stops_its_broker_worker_and_learner(tmp_path):
    """`kill <demo>` (SIGTERM, as a cancelled job sends) must not leave a broker and two
    processes running: the demo stops them as it does on Ctrl-C."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMAGENT_")}
    env["STREAMAGENT_DATA_DIR"] = str(tmp_path / "data")
    demo = subprocess.Popen([sys.executable, "-m", "streamagent.cli", "demo", "--days", "60",
                             "--users", "40", "--out", str(tmp_path / "report")], env=env,
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    seen, pids = [], {}
    try:
        for line in demo.stdout:  # the broker's pid, then the worker's and the learner's
            seen.append(line)
            text = "".join(seen).replace("\n", " ")
            # (the console wraps long lines anywhere between words)
            for name, pattern in (("broker", r"ready\s+on\s+\S+\s+\(pid\s+(\d+)\)"),
                                  ("worker", r"worker\s+pid\s+(\d+)"),
                                  ("learner", r"learner\s+pid\s+(\d+)")):
                found = re.search(pattern, text)
                if found:
                    pids[name] = int(found.group(1))
            if len(pids) == 3:
                break
        assert len(pids) == 3, "".join(seen)
        assert all(_alive(pid) for pid in pids.values())
        time.sleep(5)  # inside the run (the worker starting, the first day)
        demo.terminate()
        rest = demo.communicate(timeout=180)[0]
    finally:
        if demo.poll() is None:
            demo.kill()
    assert demo.returncode == 1, "".join(seen) + rest
    assert "interrupted" in rest, rest
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not [name for name, pid in pids.items() if _alive(pid)], rest
