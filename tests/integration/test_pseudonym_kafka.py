"""Pseudonymisation through a real broker and worker (issue 14 item 7): with
STREAMAGENT_PSEUDONYM_KEY set, no raw user id reaches decision-log, the dead-letter topic, the
state changelogs or the worker's log; coupon-actions carries the raw id for delivery, and an
erasure by raw id still finds the user."""
from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys

import orjson
import pytest

from streamagent.ops.kafka import plaintext
from streamagent.ops.tail import read_all
from tests.conftest import topic_env
from tests.integration.helpers import WorkerProcess, event, produce
from tests.integration.test_erasure_kafka import T0, decisions, latest

pytestmark = pytest.mark.kafka


def test_no_raw_user_id_leaves_the_worker_but_on_coupon_actions(kafka, tmp_path, run_id):
    env = topic_env("ps" + run_id, kafka, tmp_path, STREAMAGENT_PSEUDONYM_KEY="9f" * 16,
                    STREAMAGENT_EPSILON_START="0.5", STREAMAGENT_EPSILON_END="0.5")
    app_id, dlog = env["STREAMAGENT_APP_ID"], env["STREAMAGENT_TOPIC_DECISION_LOG"]
    users = [f"customer-{i:04d}" for i in range(30)]

    def eid(u: str, j: int) -> str:
        return hashlib.sha1(f"{u}/{j}".encode()).hexdigest()

    w = WorkerProcess(env, tmp_path / "worker.log").start()
    try:
        evs = []
        for u in users:
            evs += [event(eid(u, 0), u, "page_view", T0), event(eid(u, 1), u, "session_start",
                                                               T0 + 1000)]
        evs += [(b"customer-0001", b'{"user_id": "customer-0001", "oops'),  # not JSON
                (b"customer-0002", orjson.dumps({"user_id": "customer-0003", "type": "x"}))]
        produce(kafka, env["STREAMAGENT_TOPIC_USER_EVENTS"], evs)
        got = decisions(kafka, dlog, len(users))
        assert len(got) == len(users), w.tail()
        pseudonym = {doc["user_id"]: key for key, doc in got}
        assert all(k.decode().startswith("u-") for k in pseudonym.values())

        erased = users[5]
        done = subprocess.run([sys.executable, "-m", "streamagent.cli", "erase", erased],
                              env={**os.environ, **env}, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr
        tomb = [k for k, doc in decisions(kafka, dlog, len(users) + 1) if doc is None]
        assert len(tomb) == 1 and tomb[0] in pseudonym.values() and tomb[0] != erased.encode()
        states = latest(kafka, f"{app_id}-user-state-changelog", {tomb[0]: True})
        assert states[tomb[0]] is None, w.tail()
        dead = list(read_all(plaintext(kafka), env["STREAMAGENT_TOPIC_USER_EVENTS"] + ".dlq",
                             idle=2.0, max_wait=30))
        coupons = list(read_all(plaintext(kafka), env["STREAMAGENT_TOPIC_COUPON_ACTIONS"],
                                idle=2.0, max_wait=30))
    finally:
        w.stop()

    assert len(dead) == 2
    blobs = [m.key() or b"" for m in dead] + [m.value() for m in dead]
    for m in dead:
        env_doc = orjson.loads(m.value())
        blobs += [base64.b64decode(env_doc["original_b64"]), env_doc["detail"].encode()]
    for topic in (dlog, f"{app_id}-user-state-changelog", f"{app_id}-join-state-changelog"):
        blobs += [(m.key() or b"") + (m.value() or b"")
                  for m in read_all(plaintext(kafka), topic, idle=2.0, max_wait=30)]
    blobs.append((tmp_path / "worker.log").read_bytes())
    leaks = {u for u in users for b in blobs if u.encode() in b}
    assert not leaks, f"raw ids outside coupon-actions: {sorted(leaks)[:5]}"
    assert coupons, "no coupon at epsilon 0.5"
    assert all(orjson.loads(m.value())["user_id"] == m.key().decode() in users for m in coupons)
