"""An erasure request through a real broker and worker: `streamagent erase USER_ID` puts a null
record on user-events; the worker deletes the user's state and join record (tombstones in both
changelogs) and puts a tombstone on decision-log; a worker that restores its tables from the
changelogs into an empty data directory then knows nothing of the user."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import orjson
import pytest

from streamagent.core.features import FEATURE_NAMES
from streamagent.ops.kafka import plaintext
from streamagent.ops.tail import read_all
from tests.conftest import topic_env
from tests.integration.helpers import WorkerProcess, event, produce

pytestmark = pytest.mark.kafka

T0 = 1_767_225_600_000
DAY = 86_400_000
LOG_VIEWS = FEATURE_NAMES.index("log_views_decayed")
TENURE = FEATURE_NAMES.index("tenure")


def latest(kafka: str, topic: str, want: dict[bytes, bool], max_wait: float = 60.0) -> dict:
    """The newest value per key of ``topic`` (None: a tombstone), read until every key of
    ``want`` has a latest record that is a tombstone (True) or a value (False)."""
    deadline = time.monotonic() + max_wait
    last: dict = {}
    while time.monotonic() < deadline:
        last = {}
        for m in read_all(plaintext(kafka), topic, idle=2.0, max_wait=30):
            last[m.key()] = m.value()
        if all(k in last and (last[k] is None) == tomb for k, tomb in want.items()):
            break
        time.sleep(1.0)
    return last


def decisions(kafka: str, topic: str, expect: int, max_wait: float = 60.0) -> list:
    """(key, document or None) of every record on decision-log, once ``expect`` are there."""
    deadline = time.monotonic() + max_wait
    out: list = []
    while time.monotonic() < deadline:
        out = [(m.key(), None if m.value() is None else orjson.loads(m.value()))
               for m in read_all(plaintext(kafka), topic, idle=2.0, max_wait=30)]
        if len(out) >= expect:
            break
        time.sleep(1.0)
    return out


def test_an_erased_user_is_gone_from_tables_changelogs_and_a_restored_worker(kafka, tmp_path,
                                                                              run_id):
    env = topic_env("e" + run_id, kafka, tmp_path / "first", STREAMAGENT_TABLE_STORE="rocksdb://")
    app_id, dlog = env["STREAMAGENT_APP_ID"], env["STREAMAGENT_TOPIC_DECISION_LOG"]
    users = [f"e-{i}" for i in range(6)]
    gone = "e-2"

    w = WorkerProcess(env, tmp_path / "worker.log").start()
    try:
        first = []
        for u in users:
            first += [event(f"{u}-v{j}", u, "page_view", T0 + j * 1000, category="books")
                      for j in range(3)]
            first.append(event(f"{u}-s", u, "session_start", T0 + 10_000))
        produce(kafka, env["STREAMAGENT_TOPIC_USER_EVENTS"], first)
        assert len(decisions(kafka, dlog, len(users))) == len(users), w.tail()

        # the operator's command: a null record keyed by the user id on user-events
        t0 = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "streamagent.cli", "erase", gone],
                              env={**os.environ, **env}, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr
        assert "sent 1 erasure request" in done.stdout

        log = decisions(kafka, dlog, len(users) + 1)
        assert (gone.encode(), None) in log, w.tail()  # the join's cue, on the user's partition
        states = latest(kafka, f"{app_id}-user-state-changelog",
                        {gone.encode(): True, b"e-1": False})
        assert states[gone.encode()] is None, "the user's latest user-state record is no tombstone"
        assert states[b"e-1"] is not None
        joins = latest(kafka, f"{app_id}-join-state-changelog",
                       {b'"u:e-2"': True, b'"u:e-1"': False})
        assert joins[b'"u:e-2"'] is None, "the user's join record was not erased"
        assert joins[b'"u:e-1"'] is not None
        erased_in = time.monotonic() - t0
        assert w.stop() == 0, w.tail()
    finally:
        w.kill()

    # a new worker, empty data directory: every table comes back from its changelog
    env2 = {**env, "STREAMAGENT_DATA_DIR": str(tmp_path / "second")}
    w2 = WorkerProcess(env2, tmp_path / "worker2.log").start()
    try:
        produce(kafka, env["STREAMAGENT_TOPIC_USER_EVENTS"],
                [event(f"{u}-back", u, "session_start", T0 + DAY) for u in (gone, "e-1")])
        log = decisions(kafka, dlog, len(users) + 3)
        back = {k: d for k, d in log if d is not None and d["trigger_event_id"].endswith("-back")}
        assert set(back) == {gone.encode(), b"e-1"}, w2.tail()
        # e-1's three page views survived the restore; e-2 comes back as a new user
        assert back[b"e-1"]["features"][LOG_VIEWS] > 0 and back[b"e-1"]["features"][TENURE] > 0
        assert back[gone.encode()]["features"][LOG_VIEWS] == 0
        assert back[gone.encode()]["features"][TENURE] == 0
        assert w2.stop() == 0, w2.tail()
    finally:
        w2.kill()
    print(f"erasure: command to both changelog tombstones seen in {erased_in:.1f} s")
