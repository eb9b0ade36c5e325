"""Model safety: no snapshot is used before core/modelcheck.py passes it, a refused one is
counted and leaves the decider's model in place, and nothing corrupt stops a process from
starting (issue 14, item 3). Every case starts from the shipped settings."""
from __future__ import annotations

import dataclasses
import io
import re
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from streamagent.core.catalog import load_catalog
from streamagent.core.contracts import Transition
from streamagent.core.engine import DecisionEngine, initial_model
from streamagent.core.features import FEATURE_NAMES
from streamagent.core.learner import QLearner
from streamagent.core.modelcheck import (MAX_SAFE_INT, MAX_VERSION_JUMP, PRODUCER_KEY,
                                         SnapshotCheck, decode_snapshot, read_snapshot,
                                         validate_snapshot, weights_finite)
from streamagent.core.qnet import ModelSnapshot, init_network
from streamagent.errors import ConfigError, CorruptCheckpoint, SnapshotRejected
from streamagent.metrics import Metrics
from streamagent.params import engine_params, learner_params, shipped

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/unit/conftest.py

ROOT = Path(__file__).resolve().parents[2]
S = shipped()
CAT = load_catalog(S.catalog_path)
CHECK = SnapshotCheck(CAT.actions, FEATURE_NAMES, producer=S.app_id)


def snap(version: int = 1, promotion: int = 1, **kw) -> ModelSnapshot:
    """A model of the shipped shape, as the learner publishes it."""
    net = init_network(len(FEATURE_NAMES), CAT.n_actions, tuple(S.hidden_sizes), S.seed,
                       S.q_heads)
    out = ModelSnapshot.from_network(net, version, 10 * version, CAT.actions, FEATURE_NAMES)
    out.promotion, out.created_at = promotion, time.time()
    out.meta = {PRODUCER_KEY: S.app_id}
    return dataclasses.replace(out, **kw)


def reason(bad: ModelSnapshot, current: ModelSnapshot | None = None) -> str:
    with pytest.raises(SnapshotRejected) as exc:
        CHECK.validate(bad, current)
    assert exc.value.reason in SnapshotRejected.REASONS
    return exc.value.reason


def with_weight(s: ModelSnapshot, key: str, value: torch.Tensor) -> ModelSnapshot:
    return dataclasses.replace(s, state_dict={**s.state_dict, key: value})


# ---------------------------------------------------------------- validate_snapshot

def test_a_published_model_and_the_fresh_network_pass():
    CHECK.validate(snap())
    CHECK.validate(CHECK.decode(snap().to_bytes()))
    CHECK.validate(initial_model(CAT, tuple(S.hidden_sizes), S.seed, S.q_heads).snapshot)
    # several heads, no hidden layer (linear Q): any consistent network passes
    net = init_network(len(FEATURE_NAMES), CAT.n_actions, (), 1, heads=3)
    CHECK.validate(ModelSnapshot.from_network(net, 2, 0, CAT.actions, FEATURE_NAMES))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused(bad):
    s = snap()
    w = s.state_dict["net.2.weight"].clone()
    w[3, 5] = bad
    assert reason(with_weight(s, "net.2.weight", w)) == "non_finite"
    # also after a trip through bytes, where a decider meets it
    assert reason(decode_snapshot(with_weight(s, "net.2.weight", w).to_bytes())) == "non_finite"


def test_a_non_finite_creation_time_is_refused():
    assert reason(snap(created_at=float("nan"))) == "non_finite"


def test_wrong_shapes_are_refused():
    s = snap()
    w = s.state_dict["net.0.weight"]
    assert reason(with_weight(s, "net.0.weight", w[:, :-1])) == "shape"  # one input too few
    assert reason(with_weight(s, "net.0.weight", w[:-1])) == "shape"  # hidden width mismatch
    out = s.state_dict["net.4.bias"]
    assert reason(with_weight(s, "net.4.bias", torch.zeros(len(out) + 1))) == "shape"
    assert reason(with_weight(s, "net.6.weight", torch.zeros(3, 3))) == "shape"  # extra layer
    missing = {k: v for k, v in s.state_dict.items() if k != "net.2.bias"}
    assert reason(dataclasses.replace(s, state_dict=missing)) == "shape"
    # declared sizes that the tensors do not have
    assert reason(dataclasses.replace(s, hidden=(32, 32))) == "shape"
    assert reason(dataclasses.replace(s, heads=2)) == "shape"
    assert reason(dataclasses.replace(s, heads=0)) == "shape"
    assert reason(with_weight(s, "net.0.bias", s.state_dict["net.0.bias"].to(torch.int64))) == "shape"


def test_other_actions_are_refused():
    s = snap()
    assert reason(dataclasses.replace(s, actions=s.actions[:-1])) == "actions"
    assert reason(dataclasses.replace(s, actions=s.actions[::-1])) == "actions"
    assert reason(dataclasses.replace(s, actions=(*s.actions[:-1], "other"))) == "actions"


def test_other_features_are_refused():
    s = snap()
    assert reason(dataclasses.replace(s, feature_names=s.feature_names[:-1])) == "features"
    swapped = (s.feature_names[1], s.feature_names[0], *s.feature_names[2:])
    with pytest.raises(SnapshotRejected, match="other order"):
        CHECK.validate(dataclasses.replace(s, feature_names=swapped))


@pytest.mark.parametrize("field", ["version", "promotion", "train_steps"])
@pytest.mark.parametrize("value", [2 ** 62, MAX_SAFE_INT + 1, -1])
def test_absurd_version_numbers_are_refused(field, value):
    assert reason(snap(**{field: value})) == "version"
    assert reason(decode_snapshot(snap(**{field: value}).to_bytes())) == "version"


def test_a_version_far_beyond_the_model_in_use_is_refused():
    current = snap(version=500, promotion=20)
    CHECK.validate(snap(version=500 + MAX_VERSION_JUMP, promotion=21), current)
    assert reason(snap(version=501 + MAX_VERSION_JUMP, promotion=21), current) == "version"
    assert reason(snap(version=501, promotion=21 + MAX_VERSION_JUMP), current) == "version"
    # a rollback (an older version, a new promotion) is no jump
    CHECK.validate(snap(version=3, promotion=21), current)
    # the fresh seeded network (v0, promotion 0) has no history: any sane version is taken
    fresh = initial_model(CAT, tuple(S.hidden_sizes), S.seed, S.q_heads).snapshot
    CHECK.validate(snap(version=10 * MAX_VERSION_JUMP, promotion=3), fresh)


def test_another_producer_is_refused_and_none_named_is_accepted():
    assert reason(snap(meta={PRODUCER_KEY: "someone-else"})) == "producer"
    CHECK.validate(snap(meta={}))  # e.g. a train-offline warm start
    validate_snapshot(snap(meta={PRODUCER_KEY: "x"}), CAT.actions, FEATURE_NAMES)  # no producer asked


# ---------------------------------------------------------------- bytes and files

def _evil_pickle() -> bytes:
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    buf = io.BytesIO()
    torch.save({"x": Evil()}, buf)
    return buf.getvalue()


@pytest.mark.parametrize("raw", [
    b"", None, b"\x00\xffnot a snapshot", b"PK\x03\x04" + b"\x00" * 100,  # garbage
    snap().to_bytes()[:2000],  # truncated
    snap().to_bytes()[:-100],  # truncated at the end
    _evil_pickle(),  # weights_only refuses to run code
])
def test_bytes_that_do_not_deserialize_are_refused(raw):
    with pytest.raises(SnapshotRejected) as exc:
        CHECK.decode(raw)
    assert exc.value.reason == "undecodable"


def test_a_snapshot_doc_with_missing_or_wrong_fields_is_refused():
    buf = io.BytesIO()
    torch.save({"version": 1, "hidden": [64]}, buf)  # no actions, features, weights
    with pytest.raises(SnapshotRejected, match="undecodable"):
        CHECK.decode(buf.getvalue())
    buf = io.BytesIO()
    torch.save([1, 2, 3], buf)
    with pytest.raises(SnapshotRejected, match="undecodable"):
        CHECK.decode(buf.getvalue())


def test_a_truncated_or_missing_model_file_is_refused_with_the_setting(tmp_path):
    from streamagent.stream.models import load_model_file

    path = tmp_path / "model.pt"
    path.write_bytes(snap().to_bytes()[:1000])
    with pytest.raises(SnapshotRejected, match="undecodable"):
        read_snapshot(path)
    with pytest.raises(ConfigError, match="STREAMAGENT_MODEL_PATH"):
        load_model_file(path, CHECK)
    with pytest.raises(ConfigError, match="cannot read"):
        load_model_file(tmp_path / "absent.pt", CHECK)
    nan = snap()
    nan.state_dict["net.0.bias"][0] = float("nan")
    nan.save(path)
    with pytest.raises(ConfigError, match="non_finite"):
        load_model_file(path, CHECK)
    snap().save(path)
    assert load_model_file(path, CHECK).version == 1


# ---------------------------------------------------------------- the follower

def follower():
    from streamagent.ops.kafka import plaintext
    from streamagent.stream.models import ModelFollower

    engine = DecisionEngine(CAT, engine_params(S, 1),
                            initial_model(CAT, tuple(S.hidden_sizes), S.seed, S.q_heads))
    m = Metrics(actions=CAT.actions)
    # not started: _apply is what run() calls with every record's bytes
    return ModelFollower(plaintext("127.0.0.1:1"), "model-updates", engine, m, check=CHECK), engine, m


def rejected(m: Metrics, why: str) -> float:
    return m.registry.get_sample_value("streamagent_decision_model_rejected_total",
                                       {"reason": why})


def test_the_follower_refuses_bad_snapshots_and_keeps_deciding_with_its_model(caplog):
    f, engine, m = follower()
    f._apply(snap(version=1, promotion=1).to_bytes())
    assert engine.model.version == 1
    good = engine.model
    nan = snap(version=2, promotion=2)
    nan.state_dict["net.4.weight"][0, 0] = float("nan")
    cases = {"non_finite": nan.to_bytes(),
             "shape": dataclasses.replace(snap(version=3, promotion=3), hidden=(8,)).to_bytes(),
             "actions": snap(version=4, promotion=4, actions=CAT.actions[::-1]).to_bytes(),
             "features": snap(version=5, promotion=5,
                              feature_names=FEATURE_NAMES[:-1]).to_bytes(),
             "version": snap(version=2 ** 62, promotion=2 ** 62).to_bytes(),
             "producer": snap(version=6, promotion=6, meta={PRODUCER_KEY: "other"}).to_bytes(),
             "undecodable": b"garbage"}
    for why, raw in cases.items():
        f._apply(raw)
        assert engine.model is good, why
        assert rejected(m, why) == 1, why
    f._apply(None)  # a tombstone
    assert rejected(m, "undecodable") == 2
    assert m.registry.get_sample_value("streamagent_decision_model_load_errors_total") == 8
    assert "still deciding with model v1" in caplog.text
    # the decider goes on deciding with v1, and takes the next good version
    f._apply(snap(version=7, promotion=7).to_bytes())
    assert engine.model.version == 7
    assert m.registry.get_sample_value("streamagent_decision_model_version") == 7


def test_the_follower_survives_a_valid_snapshot_the_engine_cannot_use():
    f, engine, m = follower()
    f.engine = DecisionEngine(CAT, dataclasses.replace(engine_params(S, 1), exploration="thompson"),
                              initial_model(CAT, tuple(S.hidden_sizes), S.seed, heads=3))
    f._apply(snap(version=1, promotion=1).to_bytes())  # one head: thompson needs several
    assert f.engine.model.version == 0
    assert m.registry.get_sample_value("streamagent_decision_model_load_errors_total") == 1


# ---------------------------------------------------------------- the learner

def _transition(i: int) -> Transition:
    x = tuple(float(v) for v in np.random.default_rng(i).normal(size=len(FEATURE_NAMES)))
    return Transition(decision_id=f"d{i}", user_id=f"u{i}", ts=0, features=x,
                      action_index=i % CAT.n_actions, reward=1.0, propensity=1.0,
                      policy_version=0, next_features=None, next_allowed=None, next_ts=None,
                      dt_ms=None, done=True)


def learner() -> QLearner:
    return QLearner(CAT.actions, FEATURE_NAMES, tuple(S.hidden_sizes), learner_params(S))


def service(tmp_path, L: QLearner):
    """A LearnerService without Kafka: publish() must refuse before it touches the broker."""
    from streamagent.stream.learner import LearnerService

    svc = LearnerService.__new__(LearnerService)
    svc.s = shipped(learner_checkpoint=tmp_path / "ck.pt")
    svc.m, svc.check, svc.learner = Metrics(), CHECK, L
    svc.steps_at_snapshot, svc.time_at_snapshot = 0, 0.0
    svc.producer = SimpleNamespace(produce=lambda *a, **k: pytest.fail("published"))
    return svc


def test_the_learner_refuses_to_checkpoint_or_publish_non_finite_weights(tmp_path, caplog):
    L = learner()
    L.version, L.train_steps = 4, 50
    with torch.no_grad():
        L.online.net[0].weight[0, 0] = float("nan")
    svc = service(tmp_path, L)
    svc.publish()
    assert not (tmp_path / "ck.pt").exists()
    assert svc.m.registry.get_sample_value("streamagent_learning_model_rejected_total",
                                           {"reason": "non_finite"}) == 1
    assert L.version == 4  # the refused number stays free
    assert svc.steps_at_snapshot == 50  # retried at the next interval, not at every poll
    assert "not publishing model v5" in caplog.text


def test_with_the_average_published_a_diverged_online_network_is_still_refused(tmp_path, caplog):
    # PUBLISH_AVERAGE: the snapshot is the slow average, still finite for a while after the
    # online weights went NaN; the checkpoint keeps the online weights, so nothing goes out
    L = QLearner(CAT.actions, FEATURE_NAMES, tuple(S.hidden_sizes),
                 dataclasses.replace(learner_params(S), publish_average=True))
    L.version, L.train_steps = 4, 50
    with torch.no_grad():
        L.online.net[0].weight[0, 0] = float("nan")
    assert weights_finite(L.snapshot().state_dict)  # what would be published looks fine
    L.version = 4
    svc = service(tmp_path, L)
    svc.publish()
    assert not (tmp_path / "ck.pt").exists()
    assert svc.m.registry.get_sample_value("streamagent_learning_model_rejected_total",
                                           {"reason": "non_finite"}) == 1
    assert L.version == 4 and "online weights" in caplog.text


def test_a_corrupt_checkpoint_is_refused_with_what_to_do(tmp_path):
    L = learner()
    for i in range(40):
        L.learn_one(_transition(i))
    path = tmp_path / "ck.pt"
    L.save_checkpoint(path)
    good = path.read_bytes()
    learner().load_checkpoint(path)  # the intact file loads
    damaged = {"truncated": good[: len(good) // 2], "garbage": b"\x00" * 64, "empty": b""}
    for name, raw in damaged.items():
        path.write_bytes(raw)
        with pytest.raises(CorruptCheckpoint, match=re.escape(f"mv {path}")):
            learner().load_checkpoint(path)
    with torch.no_grad():
        L.target.net[2].bias[0] = float("inf")
    L.save_checkpoint(path)
    with pytest.raises(CorruptCheckpoint, match="infinite target weights"):
        learner().load_checkpoint(path)
    doc = torch.load(io.BytesIO(good), weights_only=True)
    doc["version"] = 2 ** 62
    torch.save(doc, path)
    with pytest.raises(CorruptCheckpoint, match="absurd counts"):
        learner().load_checkpoint(path)
    del doc["online"]
    doc["version"] = 1
    torch.save(doc, path)
    with pytest.raises(CorruptCheckpoint, match="damaged"):
        learner().load_checkpoint(path)


# ---------------------------------------------------------------- registry, metrics, deps

def test_candidates_skip_records_that_do_not_decode(monkeypatch):
    from streamagent.stream import registry

    records = [snap(version=1).to_bytes(), b"garbage", snap(version=2 ** 62).to_bytes(),
               snap(version=2, actions=CAT.actions[::-1]).to_bytes()]
    msgs = [SimpleNamespace(value=lambda r=r: r, offset=lambda i=i: i)
            for i, r in enumerate(records)]
    monkeypatch.setattr(registry, "read_to_end", lambda *a, **k: iter(msgs))
    # a candidate of another catalog keeps its version number (never reused); garbage and an
    # absurd version are skipped
    assert list(registry.candidates(S)) == [1, 2]


def test_an_operator_cannot_promote_a_version_the_deciders_would_refuse(monkeypatch):
    from streamagent.stream import registry

    nan = snap(version=2)
    nan.state_dict["net.0.weight"][0, 0] = float("nan")
    monkeypatch.setattr(registry, "candidates", lambda s: {1: snap(version=1), 2: nan})
    monkeypatch.setattr(registry, "live", lambda s: snap(version=1, promotion=1))
    monkeypatch.setattr(registry, "make_producer",
                        lambda *a, **k: pytest.fail("an unusable version was published"))
    with pytest.raises(registry.UnusableVersion, match="non_finite"):
        registry.promote(S, 2)


def test_rejection_metrics_start_at_zero_for_every_reason():
    m = Metrics()
    for why in SnapshotRejected.REASONS:
        assert rejected(m, why) == 0
        assert m.registry.get_sample_value("streamagent_learning_model_rejected_total",
                                           {"reason": why}) == 0


def test_torch_is_at_least_2_6():
    """CVE-2025-32434: before 2.6, torch.load(weights_only=True) could still run code."""
    assert '"torch>=2.6' in (ROOT / "pyproject.toml").read_text()
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    assert (major, minor) >= (2, 6)


class _BrokerAway:
    """A ModelPublisher whose broker is gone: the records never acknowledged (``at`` =
    "flush") or the commit refused after the checkpoint (``at`` = "commit")."""

    def __init__(self, at: str):
        self.at = at

    def publish(self, records, before_commit):
        if self.at == "commit":
            before_commit()
        raise self.error()

    @staticmethod
    def error():
        from confluent_kafka import KafkaError, KafkaException

        return KafkaException(KafkaError(KafkaError._TRANSPORT, "broker away"))


@pytest.mark.parametrize("at", ["live", "flush", "commit"])
def test_a_publish_that_fails_leaves_the_learner_learning(tmp_path, caplog, at):
    from streamagent.core.gate import Holdout

    L = learner()
    L.version, L.train_steps = 4, 50
    svc = service(tmp_path, L)
    svc.s = shipped(learner_checkpoint=tmp_path / "ck.pt", gate=False)
    svc.offsets, svc.holdout = {0: 10}, Holdout(10, len(FEATURE_NAMES), CAT.n_actions)
    svc._live = lambda: L.initial_snapshot()
    if at == "live":  # reading the live model fails first
        def away():
            raise _BrokerAway.error()
        svc._live = away
    svc.models_out = _BrokerAway(at)
    svc.publish()  # does not raise: the loop goes on and tries at the next interval
    assert svc.m.registry.get_sample_value("streamagent_stream_processing_errors_total",
                                           {"stage": "publish"}) == 1
    assert svc.steps_at_snapshot == 50
    assert "could not publish model v5" in caplog.text
    # never visible: the number is free unless the checkpoint already spent it
    assert L.version == (5 if at == "commit" else 4)
    assert (tmp_path / "ck.pt").exists() == (at == "commit")


def test_the_published_model_keeps_its_reward_scale_beside_the_gate_s_verdict(tmp_path):
    # the deciders cap the greedy margin with the model's reward per decision
    # (GREEDY_MARGIN_MAX): the gate's metadata must not replace it
    from streamagent.core.gate import Holdout
    from streamagent.core.policy import REWARD_SCALE_KEY
    from streamagent.core.qnet import ModelSnapshot

    L = learner()
    for i in range(40):
        L.learn_one(_transition(i))  # reward 1.0 each
    svc = service(tmp_path, L)
    svc.s = shipped(learner_checkpoint=tmp_path / "ck.pt", gate=False)
    svc.offsets, svc.holdout = {0: 40}, Holdout(10, len(FEATURE_NAMES), CAT.n_actions)
    svc._live = lambda: L.initial_snapshot()
    sent = []

    class _Out:
        @staticmethod
        def publish(records, before_commit):
            before_commit()
            sent.extend(records)
    svc.models_out = _Out()
    svc.publish()
    snap = ModelSnapshot.from_bytes(sent[-1][2])
    assert snap.meta["promoted_by"] == "gate" and snap.meta["outcome"] == "promoted"
    assert snap.meta[REWARD_SCALE_KEY] == pytest.approx(1.0)
