"""`streamagent train-offline` (offline/train.py): a Q-network from logged decisions.

Synthetic logs whose best actions are known: a bandit (gamma 0), a two-step problem where
the delayed payoff is worth more than the immediate one (fitted Q-iteration), a log that never
took one action in one region of contexts (the conservative penalty), and the snapshot as the
deciders and the learner load it.
"""
from __future__ import annotations

import numpy as np
import orjson
import pytest

from streamagent import cli
from streamagent.core import features as F
from streamagent.core.catalog import load_catalog
from streamagent.core.contracts import BudgetShare
from streamagent.core.engine import DecisionEngine, Model
from streamagent.core.learner import QLearner
from streamagent.core.ope import LoggedData
from streamagent.core.qnet import ModelSnapshot, NumpyQ
from streamagent.errors import ConfigError, OfflineDataError
from streamagent.offline import logs as logfiles
from streamagent.offline import train
from streamagent.offline.train import OfflineParams, fit
from streamagent.params import engine_params, learner_params, shipped
from streamagent.units import DAY_MS

HIDDEN = tuple(shipped().hidden_sizes)  # the product's network
T0 = 1_767_225_600_000


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/unit/conftest.py


def greedy(snapshot: ModelSnapshot, X: np.ndarray) -> np.ndarray:
    return NumpyQ(snapshot).batch(X).argmax(1)


def bandit_log(n=3000, seed=0):
    """Uniform logging over 4 actions; the best action is a step function of the context
    (reward 1 for it, 0 otherwise, noise 0.5). Features on raw scales far from standard."""
    rng = np.random.default_rng(seed)
    Z = rng.standard_normal((n, 3))
    best = np.argmax(np.c_[np.zeros(n), Z[:, 0], Z[:, 1], -Z[:, 0] - 0.3], axis=1)
    a = rng.integers(0, 4, n)
    r = (a == best).astype(float) + 0.5 * rng.standard_normal(n)
    X = Z * np.array([1000.0, 0.01, 1.0]) + np.array([5000.0, -3.0, 0.0])
    log = LoggedData(X=X, actions=a, rewards=r, propensities=np.full(n, 0.25), n_actions=4,
                     action_names=("none", "a", "b", "c"), user_ids=[f"u{i}" for i in range(n)],
                     ts=T0 + np.arange(n) * 60_000)
    return log, best


def test_bandit_greedy_policy_picks_the_best_action_in_most_contexts():
    log, best = bandit_log()
    fitted = fit(log, OfflineParams(gamma=0.0, hidden=HIDDEN))
    assert np.mean(greedy(fitted.snapshot, log.X) == best) > 0.85
    assert fitted.snapshot.hidden == HIDDEN and fitted.snapshot.heads == 1
    assert len(fitted.losses) == 1  # gamma 0: one regression


def sequential_log(users=600, seed=1):
    """At s0 (x = [1, 0, noise]): 'now' pays 1 and ends; 'later' pays 0 and leads a day later
    to s1 (x = [0, 1, noise]) where every action pays 2; 'none' pays 0 and ends. Uniform
    logging. With gamma 0.9 per day, Q(s0, later) = 1.8 > Q(s0, now) = 1."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(users):
        a, t0 = int(rng.integers(0, 3)), T0 + int(rng.integers(0, 30)) * DAY_MS
        rows.append(([1, 0, rng.standard_normal()], a, [0.0, 1.0, 0.0][a], f"u{u}", t0))
        if a == 2:
            rows.append(([0, 1, rng.standard_normal()], int(rng.integers(0, 3)), 2.0, f"u{u}",
                         t0 + DAY_MS))
    X, A, R, U, T = map(np.array, zip(*rows))
    R = R + 0.1 * rng.standard_normal(len(R))
    return LoggedData(X=X, actions=A, rewards=R, propensities=np.full(len(A), 1 / 3), n_actions=3,
                      action_names=("none", "now", "later"), user_ids=U, ts=T)


def test_fitted_q_iteration_prefers_the_delayed_payoff():
    log = sequential_log()
    s0 = log.X[:, 0] == 1
    kw = dict(hidden=HIDDEN, gamma_unit_ms=DAY_MS, horizon_ms=14 * DAY_MS, iterations=4)
    fqi = fit(log, OfflineParams(gamma=0.9, **kw))
    assert np.mean(greedy(fqi.snapshot, log.X[s0]) == 2) > 0.95  # later
    q = NumpyQ(fqi.snapshot).batch(log.X[s0]).mean(0)
    assert q[2] == pytest.approx(1.8, abs=0.25) and q[1] == pytest.approx(1.0, abs=0.2)
    myopic = fit(log, OfflineParams(gamma=0.0, **kw))
    assert np.mean(greedy(myopic.snapshot, log.X[s0]) == 1) > 0.95  # now


def test_next_decisions_discount_by_event_time_and_end_beyond_the_horizon():
    log = LoggedData(X=np.zeros((4, 1)), actions=[0] * 4, rewards=[0.0] * 4, propensities=None,
                     n_actions=1, user_ids=["u", "v", "u", "u"],
                     ts=[T0, T0, T0 + 2 * DAY_MS, T0 + 30 * DAY_MS])
    nxt, disc = train.next_decisions(log, 0.9, DAY_MS, 14 * DAY_MS)
    assert nxt.tolist() == [2, -1, -1, -1]  # u's third decision is 28 days later: terminal
    assert disc.tolist() == pytest.approx([0.81, 0, 0, 0])
    with pytest.raises(OfflineDataError, match="user_id and ts"):
        train.next_decisions(LoggedData(X=np.zeros((2, 1)), actions=[0, 0], rewards=[0, 0],
                                        propensities=None, n_actions=1), 0.9)


def test_the_conservative_penalty_keeps_an_action_never_logged_in_a_context_out():
    """Contexts in two clusters; 'B' (worth 3) was logged only in the right one. Without the
    penalty the network extrapolates B into the left cluster, where nothing says what it is
    worth; with the default penalty it keeps to what the logs show there ('A', worth 1)."""
    rng = np.random.default_rng(2)
    n = 3000
    left = rng.integers(0, 2, n) == 0
    X = np.c_[np.where(left, -2.0, 2.0) + 0.5 * rng.standard_normal(n), rng.standard_normal(n)]
    a = np.where(left, rng.integers(0, 2, n), rng.integers(0, 3, n))
    log = LoggedData(X=X, actions=a, rewards=np.array([0.0, 1.0, 3.0])[a] + 0.5 * rng.standard_normal(n),
                     propensities=np.where(left, 0.5, 1 / 3), n_actions=3,
                     action_names=("none", "A", "B"))
    careful = greedy(fit(log, OfflineParams(gamma=0.0, hidden=HIDDEN)).snapshot, X)
    assert np.mean(careful[left] == 2) < 0.02 and np.mean(careful[left] == 1) > 0.95
    assert np.mean(careful[~left] == 2) > 0.95  # where B was logged, it is chosen
    reckless = greedy(fit(log, OfflineParams(gamma=0.0, hidden=HIDDEN, alpha=0.0)).snapshot, X)
    assert np.mean(reckless[left] == 2) > 0.5


def live_log(n=1500, seed=3, catalog=None):
    """A log of the live feature set and the catalog's actions (names only, some unlogged)."""
    rng = np.random.default_rng(seed)
    actions = (catalog or load_catalog()).actions
    a = rng.choice([0, 1, 2], n)  # only none, pct10, pct20_min80 were ever sent
    X = rng.random((n, F.N_FEATURES))
    r = np.where(a == 1, 0.5 + X[:, 0], 0.3) + 0.1 * rng.standard_normal(n)
    return LoggedData(X=X, actions=a, rewards=r, propensities=np.full(n, 1 / 3), n_actions=3,
                      feature_names=F.FEATURE_NAMES, action_names=actions[:3],
                      user_ids=[f"u{i % 200}" for i in range(n)], ts=T0 + np.arange(n) * 3_600_000)


def test_snapshot_loads_and_serves_deciders_and_the_learner(tmp_path):
    catalog, s = load_catalog(), shipped()
    log, notes = train.align_to_catalog(live_log(), catalog.actions)
    assert log.action_names == catalog.actions and "never logged" in notes[0]
    fitted = fit(log, OfflineParams(gamma=s.gamma, hidden=tuple(s.hidden_sizes), heads=s.q_heads,
                                    gamma_unit_ms=DAY_MS, horizon_ms=14 * DAY_MS, iterations=2))
    fitted.snapshot.save(tmp_path / "model.pt")
    snap = ModelSnapshot.load(tmp_path / "model.pt")
    assert snap.actions == catalog.actions and snap.feature_names == F.FEATURE_NAMES
    eng = DecisionEngine(catalog, engine_params(s, 1), Model(snap))
    ev = orjson.dumps({"event_id": "e1", "user_id": "u1", "type": "session_start", "ts": T0})
    res = eng.step(ev, b"u1", None, BudgetShare(), 0, 0)
    assert res.decision is not None and res.decision.action in catalog.actions
    learner = QLearner(catalog.actions, F.FEATURE_NAMES, tuple(s.hidden_sizes), learner_params(s), snap)
    assert learner.snapshot().state_dict.keys() == snap.state_dict.keys()
    with pytest.raises(ConfigError, match="STREAMAGENT_HIDDEN_SIZES"):
        QLearner(catalog.actions, F.FEATURE_NAMES, (32,), learner_params(s), snap)


def test_logs_with_actions_the_catalog_lacks_are_refused_other_features_are_noted():
    log, _ = bandit_log(n=50)
    with pytest.raises(OfflineDataError, match=r"not in the catalog.*STREAMAGENT_CATALOG_PATH"):
        train.align_to_catalog(log, load_catalog().actions)
    assert train.feature_note(live_log(n=10)) is None
    assert "the model is for the logs' features" in train.feature_note(log)


def test_the_command_trains_estimates_on_held_out_logs_and_writes_the_model(tmp_path, capsys,
                                                                            monkeypatch):
    monkeypatch.delenv("STREAMAGENT_MODEL_PATH", raising=False)
    path, out = tmp_path / "logs.jsonl", tmp_path / "model.pt"
    logfiles.write_jsonl(live_log(), path)
    code = cli.main(["train-offline", "--logs", str(path), "--out", str(out), "--gamma", "0",
                     "--bootstrap", "50", "--train-steps", "6000"])
    assert code == 0
    text = capsys.readouterr().out
    assert "held out: the later 450 decisions" in text and "DR per decision" in text
    snap = ModelSnapshot.load(out)
    assert snap.train_steps == 6000 and snap.meta["outcome"] == "offline"
    assert snap.meta["n"] == 450 and np.isfinite(snap.meta["candidate_value"])
    # the greedy policy sends pct10 where it pays (X0 > -0.2 always: everywhere)
    assert np.mean(greedy(snap, live_log().X) == 1) > 0.9


def test_publish_puts_the_model_on_model_candidates_as_the_next_version(monkeypatch):
    from streamagent.ops import kafka
    from streamagent.stream import registry

    sent = []

    class Producer:
        def produce(self, topic, key, value):
            sent.append((topic, key, ModelSnapshot.from_bytes(value)))

        def flush(self, timeout):
            return 0

    monkeypatch.setattr(registry, "candidates", lambda s: {3: None, 7: None})
    monkeypatch.setattr(kafka, "make_producer", lambda *a, **kw: Producer())
    log, _ = train.align_to_catalog(live_log(n=300), load_catalog().actions)
    snap = fit(log, OfflineParams(gamma=0.0, hidden=(8,), max_epochs=1)).snapshot
    s = shipped()
    train.publish(snap, s)
    assert [(t, k, m.version, m.promotion) for t, k, m in sent] == [
        (s.topic_model_candidates, b"8", 8, 0)]
    other = fit(bandit_log(n=300)[0], OfflineParams(gamma=0.0, hidden=(8,), max_epochs=1)).snapshot
    with pytest.raises(OfflineDataError, match="another feature set"):
        train.publish(other, s)
