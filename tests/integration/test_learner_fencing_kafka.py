"""One active learner (issue 14 item 3), through the real broker: the learner lock hands over
to a standby, a newer learner's transactional id fences the older one's publishing, and a
frozen learner that comes back after a standby took over stops without publishing.

Each test fails without stream/leader.py: two learners would both publish (duplicate or
interleaved version numbers) and the resumed one would overwrite the checkpoint.
"""
from __future__ import annotations

import signal
import time

import numpy as np
import pytest
import torch

from streamagent.config import Settings
from streamagent.core.catalog import load_catalog
from streamagent.ops.kafka import plaintext
from streamagent.ops.tail import read_all
from streamagent.ops.topics import create_topics
from streamagent.stream.leader import Fenced, LearnerLock, ModelPublisher
from tests.conftest import topic_env
from tests.integration.helpers import WorkerProcess, produce
from tests.integration.test_scaleout_kafka import QUICK_LEARNER, transitions

pytestmark = [pytest.mark.kafka]

def keys(kafka: str, topic: str) -> list[bytes]:
    return [m.key() for m in read_all(plaintext(kafka), topic, idle=2.0, max_wait=30)]


def test_lock_goes_to_one_learner_and_to_the_standby_when_it_leaves(kafka, run_id):
    s = Settings(**{"kafka_bootstrap": kafka, "topic_model_updates": f"lk{run_id}-model-updates",
                    "app_id": f"sa-lk{run_id}"})
    create_topics(s, log=lambda *_: None)
    first = LearnerLock(plaintext(kafka), s.app_id, s.topic_model_updates, timeout_s=6)
    second = None
    try:
        assert first.acquire(lambda: True)
        second = LearnerLock(plaintext(kafka), s.app_id, s.topic_model_updates, timeout_s=6)
        until = time.monotonic() + 8
        assert not second.acquire(lambda: time.monotonic() < until), "two learners active"
        assert first.poll(), "a standby joining took the lock from the active learner"
        first.close()
        first = None
        until = time.monotonic() + 30
        assert second.acquire(lambda: time.monotonic() < until), "the standby never took over"
    finally:
        for lock in (first, second):
            if lock is not None:
                lock.close()


def test_a_newer_learner_fences_the_older_ones_publishing(kafka, run_id):
    s = Settings(**{"kafka_bootstrap": kafka, "app_id": f"sa-fe{run_id}",
                    "topic_model_candidates": f"fe{run_id}-model-candidates"})
    create_topics(s, log=lambda *_: None)
    topic, checkpoints = s.topic_model_candidates, []
    old = ModelPublisher(plaintext(kafka), s.app_id)
    old.publish([(topic, b"1", b"old v1")], before_commit=lambda: checkpoints.append("old 1"))
    new = ModelPublisher(plaintext(kafka), s.app_id)  # the successor starts
    with pytest.raises(Fenced):
        old.publish([(topic, b"2", b"old v2")],
                    before_commit=lambda: checkpoints.append("old 2"))
    new.publish([(topic, b"2", b"new v2")], before_commit=lambda: checkpoints.append("new 2"))
    assert checkpoints == ["old 1", "new 2"], "a fenced learner wrote its checkpoint"
    # read-committed readers (deciders, registry) never see the fenced write
    assert keys(kafka, topic) == [b"1", b"2"]
    assert [m.value() for m in read_all(plaintext(kafka), topic, idle=2.0)] == [b"old v1",
                                                                                 b"new v2"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_frozen_learner_comes_back_fenced_after_the_standby_took_over(kafka, tmp_path, run_id):
    # one data dir for both: the shared volume in which a zombie could overwrite a checkpoint
    env = topic_env("lf" + run_id, kafka, tmp_path, STREAMAGENT_PARTITIONS="2",
                    STREAMAGENT_LEARNER_LOCK_TIMEOUT_S="6",
                    **{**QUICK_LEARNER, "STREAMAGENT_SNAPSHOT_INTERVAL_S": "1"})
    n_actions = load_catalog(Settings().catalog_path).n_actions
    rng = np.random.default_rng(3)
    topic, cands = env["STREAMAGENT_TOPIC_TRANSITIONS"], env["STREAMAGENT_TOPIC_MODEL_CANDIDATES"]
    a = WorkerProcess(env, tmp_path / "a.log", command="learner",
                      ready_marker=b"learner: model v").start(ready_timeout=180)
    b = WorkerProcess(env, tmp_path / "b.log", command="learner", ready_marker=b"learner: model v")
    try:
        produce(kafka, topic, transitions(300, 0, n_actions, rng))
        deadline = time.monotonic() + 120
        while not keys(kafka, cands):
            assert time.monotonic() < deadline, a.tail()
        # the standby waits: it has started, it does not learn or publish
        b_proc = b.launch().proc
        time.sleep(10)
        assert b"learner: model v" not in (tmp_path / "b.log").read_bytes(), b.tail()
        assert b_proc.poll() is None, b.tail()

        a.proc.send_signal(signal.SIGSTOP)  # frozen: no heartbeats, no polls
        deadline = time.monotonic() + 180
        while b"learner: model v" not in (tmp_path / "b.log").read_bytes():
            assert time.monotonic() < deadline and b_proc.poll() is None, b.tail()
            time.sleep(0.5)
        # read what is there before B has anything new to learn: B may publish within a
        # second or two of the new transitions, faster than a read of the topic takes
        before = keys(kafka, cands)
        produce(kafka, topic, transitions(300, 300, n_actions, rng))
        deadline = time.monotonic() + 120
        while len(keys(kafka, cands)) <= len(before):
            assert time.monotonic() < deadline, b.tail()
        b_version = _checkpoint(env)["version"]

        a.proc.send_signal(signal.SIGCONT)
        # A either finds it lost the lock first (it learns on, publishes and checkpoints
        # nothing), or, if a publish was due before the group told it, that publish is fenced
        # by B's transactional id and A stops at once: either way it writes nothing
        deadline = time.monotonic() + 180
        while (b"lost the learner lock" not in (tmp_path / "a.log").read_bytes()
               and a.proc.poll() is None):
            assert time.monotonic() < deadline, a.tail()
            time.sleep(0.5)
        produce(kafka, topic, transitions(100, 600, n_actions, rng))
        time.sleep(5)
        assert b_proc.poll() is None, b.tail()
        assert b.stop() == 0, b.tail()
        b_last = _checkpoint(env)["version"]  # B's last, written as it stopped
        # B gone, A (if still running) holds the lock again; its producer was fenced by B's:
        # its next publish stops it before it writes anything
        produce(kafka, topic, transitions(100, 700, n_actions, rng))
        assert a.proc.wait(timeout=240) == 3, a.tail()  # FENCED_EXIT
        assert b"stopping:" in (tmp_path / "a.log").read_bytes(), a.tail()
        assert _checkpoint(env)["version"] == b_last, "the fenced learner wrote its checkpoint"
    finally:
        a.proc.send_signal(signal.SIGCONT)
        a.kill()
        b.kill()
    versions = [int(k) for k in keys(kafka, cands)]
    assert versions == sorted(set(versions)), f"two learners published over each other: {versions}"
    assert b_version in versions
    assert b"this learner is active" in (tmp_path / "b.log").read_bytes()
    print(f"\nfencing: versions {versions[0]}..{versions[-1]} ({len(versions)}), none twice; "
          f"the frozen learner published nothing after resuming and exited 3 when it got the "
          f"lock back")


def _checkpoint(env: dict) -> dict:
    from pathlib import Path

    path = Path(env["STREAMAGENT_DATA_DIR"]) / "learner" / "checkpoint.pt"
    return torch.load(path, map_location="cpu", weights_only=True)
