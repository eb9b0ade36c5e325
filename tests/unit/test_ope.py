"""Off-policy estimators (core/ope.py) on logged data whose true value is known, the log
readers against the logged-decision schema, and the candidate policies."""
from __future__ import annotations

import jsonschema
import numpy as np
import orjson
import pytest

from streamagent.core import ope
from streamagent.core.contracts import schemas_dir
from streamagent.core.ope import LoggedData, evaluate_policy
from streamagent.errors import OfflineDataError
from streamagent.offline import logs, policies

N_ACTIONS = 4


def bandit_log(n=20_000, seed=0, propensity=True, floor=0.05):
    """Contexts x ~ N(0, 1)^3; the logging policy is a softmax of a linear score, mixed with
    ``floor`` of uniform so every action has p >= floor / 4; the reward is linear in x per
    action plus noise. Returns the log and the true mean reward mu (n, actions)."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, 3))
    theta = rng.standard_normal((3, N_ACTIONS))
    logits = X @ theta
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs = (1 - floor) * probs / probs.sum(1, keepdims=True) + floor / N_ACTIONS
    a = np.array([rng.choice(N_ACTIONS, p=p) for p in probs])
    beta = rng.standard_normal((3, N_ACTIONS))
    mu = 1.0 + X @ beta + np.arange(N_ACTIONS) * 0.3
    r = mu[np.arange(n), a] + rng.standard_normal(n)
    log = LoggedData(X=X, actions=a, rewards=r,
                     propensities=probs[np.arange(n), a] if propensity else None,
                     n_actions=N_ACTIONS, feature_names=("f0", "f1", "f2"),
                     action_names=("none", "c1", "c2", "c3"), action_probs=probs)
    return log, mu


def target_policy(X):
    """A stochastic target policy: mostly the action of the largest of a few scores."""
    scores = np.c_[X[:, 0], X[:, 1], -X[:, 0], X[:, 2]]
    e = np.exp(2 * scores)
    return e / e.sum(1, keepdims=True)


@pytest.fixture(scope="module")
def synthetic():
    log, mu = bandit_log()
    pi = target_policy(log.X)
    truth = float(np.mean(np.sum(pi * mu, axis=1)))
    return log, pi, truth, evaluate_policy(log, pi, n_bootstrap=400, seed=1)


def test_ips_snips_dr_are_unbiased_within_their_intervals(synthetic):
    log, pi, truth, estimates = synthetic
    by = {e.name: e for e in estimates}
    assert [e.name for e in estimates] == ["ips", "snips", "dm", "dr"]
    for name in ("ips", "snips", "dr"):
        e = by[name]
        assert e.ci_low <= truth <= e.ci_high, (name, e, truth)
        assert abs(e.value - truth) < 0.1 * abs(truth)
        assert e.n == log.n and not e.warnings
    # DR with a good model is tighter than IPS
    assert by["dr"].ci_high - by["dr"].ci_low < by["ips"].ci_high - by["ips"].ci_low


def test_dm_with_a_correct_model_is_close(synthetic):
    _, _, truth, estimates = synthetic
    dm = next(e for e in estimates if e.name == "dm")
    assert abs(dm.value - truth) < 0.02 * abs(truth)
    assert dm.ci_low <= truth <= dm.ci_high


def test_ridge_selection_shrinks_noise_and_keeps_signal():
    log, _ = bandit_log(n=4000, seed=12)
    assert ope.select_ridge(log) <= 10.0  # a real linear signal: little shrinkage
    noise = LoggedData(log.X, log.actions, np.random.default_rng(0).standard_normal(log.n),
                       log.propensities, N_ACTIONS)
    assert ope.select_ridge(noise) >= 1000.0  # pure noise: shrink to the mean


def test_dm_interval_refits_the_model_and_says_so_when_it_cannot():
    log, _ = bandit_log(n=3000, seed=13)
    pi = target_policy(log.X)
    own = evaluate_policy(log, pi, ("dm",), n_bootstrap=100)[0]
    given = evaluate_policy(log, pi, ("dm",), n_bootstrap=100,
                            q_hat=ope.cross_fit_rewards(log, ridge=1.0))[0]
    assert own.ci_high - own.ci_low > given.ci_high - given.ci_low
    assert any("holds the given reward model fixed" in w for w in given.warnings)
    assert not own.warnings


def test_the_logging_policy_on_its_own_distribution_has_weights_of_one(synthetic):
    log = synthetic[0]
    est = {e.name: e for e in evaluate_policy(log, log.action_probs, ("ips", "snips"), n_bootstrap=50)}
    mean = ope.on_policy_value(log, n_bootstrap=50)
    assert est["ips"].value == pytest.approx(log.rewards.mean())
    assert est["snips"].value == pytest.approx(mean.value)
    assert est["ips"].ess == pytest.approx(log.n)


def test_effective_sample_size():
    assert ope.effective_sample_size(np.ones(50)) == pytest.approx(50)
    w = np.r_[np.full(99, 1e-9), 1.0]
    assert ope.effective_sample_size(w) == pytest.approx(1.0, abs=1e-6)
    assert ope.effective_sample_size(np.zeros(5)) == 0.0


def test_bootstrap_is_seeded():
    log, _ = bandit_log(n=2000, seed=3)
    pi = target_policy(log.X)
    a = evaluate_policy(log, pi, ("ips",), n_bootstrap=100, seed=7)[0]
    b = evaluate_policy(log, pi, ("ips",), n_bootstrap=100, seed=7)[0]
    c = evaluate_policy(log, pi, ("ips",), n_bootstrap=100, seed=8)[0]
    assert (a.ci_low, a.ci_high) == (b.ci_low, b.ci_high) != (c.ci_low, c.ci_high)


def test_tiny_propensities_warn():
    log, _ = bandit_log(n=3000, seed=2, floor=0.0)
    pi = target_policy(log.X)
    est = evaluate_policy(log, pi, ("ips", "dm"), n_bootstrap=20, min_propensity=1e-2)
    ips, dm = est
    assert any("propensity below" in w for w in ips.warnings)
    assert not any("propensity below" in w for w in dm.warnings)  # DM does not weight


def test_missing_support_warns():
    """The logs never take action 3 where x0 > 0; a policy that takes it there is flagged."""
    log, _ = bandit_log(n=8000, seed=4)
    keep = ~((log.X[:, 0] > 0) & (log.actions == 3))
    log = log.subset(keep)
    pi = policies.one_hot(np.where(log.X[:, 0] > 0, 3, 0), N_ACTIONS)
    warnings = ope.check_log(log, pi)
    assert any("never took in similar contexts" in w for w in warnings), warnings
    # a policy inside the logged support is not flagged
    assert not any("never took" in w for w in ope.check_log(log, policies.one_hot(
        np.zeros(log.n, dtype=int), N_ACTIONS)))


def test_never_logged_action_is_named():
    log, _ = bandit_log(n=2000, seed=5)
    log = log.subset(log.actions != 2)
    warnings = ope.check_log(log, policies.one_hot(np.full(log.n, 2), N_ACTIONS))
    assert any("never logged at all: ['c2']" in w for w in warnings), warnings


def test_missing_propensities_leave_only_dm():
    log, mu = bandit_log(n=4000, seed=6, propensity=False)
    pi = target_policy(log.X)
    est = {e.name: e for e in evaluate_policy(log, pi, n_bootstrap=50)}
    for name in ("ips", "snips", "dr"):
        assert np.isnan(est[name].value) and est[name].warnings
        assert est[name].ess is None
    assert any("no propensity" in w for w in ope.check_log(log, pi))
    truth = float(np.mean(np.sum(pi * mu, axis=1)))
    assert abs(est["dm"].value - truth) < 0.05 * abs(truth)


def test_partly_missing_propensities_use_the_other_rows():
    log, _ = bandit_log(n=4000, seed=6)
    p = log.propensities.copy()
    p[:100] = np.nan
    log2 = LoggedData(log.X, log.actions, log.rewards, p, log.n_actions)
    ips = evaluate_policy(log2, target_policy(log.X), ("ips",), n_bootstrap=20)[0]
    assert ips.n == 3900 and any("100 of 4000" in w for w in ips.warnings)


def test_small_ess_warns():
    log, _ = bandit_log(n=300, seed=8, floor=0.02)
    pi = policies.one_hot(np.full(log.n, 3), N_ACTIONS)
    ips = evaluate_policy(log, pi, ("ips",), n_bootstrap=20, min_ess=100)[0]
    assert any("effective sample size" in w for w in ips.warnings)


def test_bad_inputs_are_refused():
    log, _ = bandit_log(n=100, seed=9)
    with pytest.raises(OfflineDataError):
        evaluate_policy(log, np.ones((log.n, N_ACTIONS)))  # rows do not sum to 1
    with pytest.raises(ValueError):
        evaluate_policy(log, target_policy(log.X), ("magic",))
    with pytest.raises(ValueError):
        ope.cross_fit_rewards(log, folds=6)
    with pytest.raises(OfflineDataError):
        LoggedData(log.X, log.actions, log.rewards, np.zeros(log.n), N_ACTIONS)


def test_cross_fitting_never_predicts_a_row_with_its_own_reward():
    """A row's prediction must not change when its own reward does (a fixed penalty: the
    chosen one depends on every reward)."""
    log, _ = bandit_log(n=500, seed=10)
    q = ope.cross_fit_rewards(log, folds=2, ridge=1.0, seed=3)
    r = log.rewards.copy()
    fold = ope.fold_ids(log, 2, seed=3)
    r[fold == 0] += 100.0
    q2 = ope.cross_fit_rewards(LoggedData(log.X, log.actions, r, log.propensities, N_ACTIONS),
                               folds=2, ridge=1.0, seed=3)
    assert np.allclose(q[fold == 0], q2[fold == 0])


# -- the trajectory estimator ----------------------------------------------------------------

def two_step_log(users=6000, seed=0, gap_hours=48):
    """Each user decides twice (the feature is the step), uniformly at random between two
    actions (p = 0.5). r0 = 1 + noise if a0 = 1; r1 = 2 + noise if a0 = 1 and a1 = 0, else
    0.5 + noise if a1 = 1. The target takes a0 = 1, then a1 = 0: its value is 1 + g * 2."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2, size=(users, 2))
    r0 = (a[:, 0] == 1) * 1.0
    r1 = np.where((a[:, 0] == 1) & (a[:, 1] == 0), 2.0, np.where(a[:, 1] == 1, 0.5, 0.0))
    noise = rng.normal(0, 0.3, size=(users, 2))
    t0 = 1_767_225_600_000 + rng.integers(0, 10**9, users)
    ts = np.c_[t0, t0 + gap_hours * 3_600_000]
    X = np.tile([[0.0], [1.0]], (users, 1))
    log = LoggedData(X=X, actions=a.ravel(), rewards=(np.c_[r0, r1] + noise).ravel(),
                     propensities=np.full(2 * users, 0.5), n_actions=2,
                     user_ids=np.repeat([f"u{i}" for i in range(users)], 2), ts=ts.ravel())
    pi = policies.one_hot(np.tile([1, 0], users), 2)
    return log, pi


def test_pdwis_recovers_the_value_of_a_two_step_problem():
    log, pi = two_step_log()
    est = evaluate_policy(log, pi, ("pdwis",), gamma=0.9, n_bootstrap=300)[0]
    assert est.name == "pdwis" and est.n == 6000
    assert est.ci_low <= 1 + 0.9 * 2 <= est.ci_high
    assert est.value == pytest.approx(2.8, abs=0.05)
    assert 0 < est.ess < est.n  # only a quarter of the users follow the target policy


def test_pdwis_discounts_by_event_time():
    """Two decisions 48 h apart, gamma 0.9 per 24 h: the second reward counts 0.81."""
    log, pi = two_step_log(gap_hours=48)
    est = evaluate_policy(log, pi, ("pdwis",), gamma=0.9, gamma_unit_ms=24 * 3_600_000,
                          n_bootstrap=300)[0]
    assert est.ci_low <= 1 + 0.81 * 2 <= est.ci_high


def test_gamma_adds_pdwis_and_pdwis_needs_gamma():
    log, pi = two_step_log(users=200)
    names = [e.name for e in evaluate_policy(log, pi, ("ips",), gamma=0.5, n_bootstrap=10)]
    assert names == ["ips", "pdwis"]
    with pytest.raises(ValueError):
        evaluate_policy(log, pi, ("pdwis",), n_bootstrap=10)


def test_episodes_split_trajectories():
    log, pi = two_step_log(users=300)
    split = LoggedData(log.X, log.actions, log.rewards, log.propensities, 2,
                       user_ids=log.user_ids, ts=log.ts,
                       episode_ids=[f"{u}#{s}" for u, s in zip(log.user_ids, np.tile([0, 1], 300))])
    assert ope.trajectory_value(split, pi, 0.9, n_bootstrap=10).n == 600


# -- readers ---------------------------------------------------------------------------------

def small_log():
    log, _ = bandit_log(n=40, seed=11)
    rng = np.random.default_rng(0)
    allowed = rng.random((40, N_ACTIONS)) > 0.2
    allowed[np.arange(40), log.actions] = True
    users = np.array([f"u{i % 7}" for i in range(40)], dtype=object)
    return LoggedData(log.X, log.actions, log.rewards, log.propensities, N_ACTIONS,
                      ("f0", "f1", "f2"), log.action_names, users,
                      1_767_225_600_000 + np.arange(40) * 60_000, allowed, log.action_probs,
                      episode_ids=None, decision_ids=[f"d{i}" for i in range(40)])


def assert_same(a: LoggedData, b: LoggedData):
    assert a.feature_names == b.feature_names and a.action_names == b.action_names
    np.testing.assert_allclose(a.X, b.X)
    np.testing.assert_array_equal(a.actions, b.actions)
    np.testing.assert_allclose(a.rewards, b.rewards)
    np.testing.assert_allclose(a.propensities, b.propensities)
    np.testing.assert_array_equal(a.allowed, b.allowed)
    np.testing.assert_allclose(a.action_probs, b.action_probs)
    np.testing.assert_array_equal(a.ts, b.ts)
    assert list(a.user_ids) == list(b.user_ids) and list(a.decision_ids) == list(b.decision_ids)


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_readers_round_trip(tmp_path, fmt):
    log = small_log()
    path = tmp_path / f"log.{fmt}"
    (logs.write_jsonl if fmt == "jsonl" else logs.write_csv)(log, path)
    assert_same(log, logs.read_logs(path))


def test_written_rows_validate_against_the_schema(tmp_path):
    schema = orjson.loads((schemas_dir() / "logged-decision.v1.json").read_bytes())
    jsonschema.Draft202012Validator.check_schema(schema)
    for d in logs.to_docs(small_log()):
        jsonschema.validate(d, schema)
    for line in (schemas_dir() / "examples" / "logged-decision.v1.jsonl").read_bytes().splitlines():
        jsonschema.validate(orjson.loads(line), schema)


def test_parquet_reader(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    log = small_log()
    docs = logs.to_docs(log)
    flat = {c: [d.get(c) for d in docs] for c in ("decision_id", "user_id", "ts", "action",
                                                 "propensity", "reward", "allowed")}
    for j, name in enumerate(log.feature_names):
        flat[name] = [d["features"][j] for d in docs]
    pq.write_table(pa.table(flat), tmp_path / "log.parquet")
    back = logs.read_logs(tmp_path / "log.parquet", actions=log.action_names)
    np.testing.assert_allclose(back.X, log.X)
    np.testing.assert_array_equal(back.actions, log.actions)
    np.testing.assert_array_equal(back.allowed, log.allowed)


def test_examples_read_and_episodes_follow_next_links():
    ex = schemas_dir() / "examples"
    j = logs.read_logs(ex / "logged-decision.v1.jsonl")
    c = logs.read_logs(ex / "logged-decision.v1.csv", actions=j.action_names)
    assert j.feature_names == c.feature_names == ("bias", "log_spend", "has_coupon")
    np.testing.assert_array_equal(j.actions, c.actions)
    assert np.isnan(c.propensities[2])  # an empty cell is a missing propensity
    assert len(set(j.episode_ids)) == 2


def test_bad_rows_name_the_row(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"decision_id": "a", "user_id": "u", "ts": 1, "action": "none", "reward": 0,'
                  b' "features": [1.0], "feature_names": ["x"]}\n'
                  b'{"decision_id": "b", "user_id": "u", "ts": 2, "reward": 0, "features": [1.0]}\n')
    with pytest.raises(OfflineDataError, match="row 2"):
        logs.read_logs(p)
    p.write_bytes(b'{"decision_id": "a", "user_id": "u", "ts": 1, "action": "none", "reward": 0,'
                  b' "features": [1.0, 2.0], "feature_names": ["x"]}\n')
    with pytest.raises(OfflineDataError, match="expected 1"):
        logs.read_logs(p)


def test_reindex_on_a_models_action_space():
    log = logs.read_logs(schemas_dir() / "examples" / "logged-decision.v1.jsonl")
    names = ("none", "amt10_min50", "free_ship", "pct10")
    r = logs.reindex_actions(log, names)
    assert [names[a] for a in r.actions] == [log.action_names[a] for a in log.actions]
    assert r.allowed.shape == (3, 4) and r.allowed[:, 2].all()
    with pytest.raises(OfflineDataError, match="pct10"):
        logs.reindex_actions(log, ("none", "amt10_min50"))


# -- candidate policies ----------------------------------------------------------------------

def test_fixed_policies_respect_the_allowed_mask():
    log = small_log()
    never = policies.candidate("never", log).pi
    assert (never[:, 0] == 1).all()
    always = policies.candidate("always:c2", log).pi
    np.testing.assert_array_equal(always[:, 2] == 1, log.allowed[:, 2])
    assert (always[~log.allowed[:, 2], 0] == 1).all()
    with pytest.raises(OfflineDataError, match="c9"):
        policies.candidate("always:c9", log)
    assert policies.candidate("logging", log).on_policy


def test_epsilon_greedy_matches_the_deciders_action_probs():
    from streamagent.core.policy import action_probs

    rng = np.random.default_rng(1)
    q = rng.standard_normal((50, 5))
    allowed = rng.random((50, 5)) > 0.3
    allowed[:, 0] = True
    pi = policies.epsilon_greedy_policy(q, allowed, 0.1)
    for i in range(50):
        p, _ = action_probs(q[i], allowed[i], "epsilon", 0.1, 1.0)
        np.testing.assert_allclose(pi[i], p)


def snapshot_for(features, actions, seed=0):
    from streamagent.core.qnet import ModelSnapshot, init_network

    net = init_network(len(features), len(actions), (8,), seed)
    import torch

    with torch.no_grad():  # a non-zero output layer, so the greedy action depends on x
        net.net[-1].weight.normal_(generator=torch.Generator().manual_seed(seed))
    return ModelSnapshot.from_network(net, 1, 0, tuple(actions), tuple(features))


def test_snapshot_policy_greedy_and_exploring(tmp_path):
    log = small_log()
    snap = snapshot_for(log.feature_names, log.action_names)
    path = tmp_path / "m.pt"
    snap.save(path)
    greedy = policies.candidate(str(path), log).pi
    q = policies.q_values(snap, log)
    assert (greedy.sum(1) == 1).all() and log.allowed[greedy == 1].all()
    np.testing.assert_array_equal(greedy.argmax(1), np.argmax(np.where(log.allowed, q, -np.inf), 1))
    explore = policies.candidate(f"{path}:epsilon=0.2", log).pi
    np.testing.assert_allclose(explore.sum(1), 1.0)
    assert (explore[~log.allowed] == 0).all()


def test_snapshot_on_logs_of_another_feature_set_names_the_difference(tmp_path):
    log = small_log()
    snap = snapshot_for(("f0", "f1", "tenure"), log.action_names)
    with pytest.raises(OfflineDataError, match=r"missing from the logs: \['tenure'\].*not in the model: \['f2'\]"):
        policies.snapshot_policy(snap, log)
    snap = snapshot_for(("f1", "f0", "f2"), log.action_names)
    with pytest.raises(OfflineDataError, match="different order"):
        policies.snapshot_policy(snap, log)


# -- the command -----------------------------------------------------------------------------

def test_evaluate_command_end_to_end(tmp_path):
    """streamagent evaluate on a JSONL log of two-step users: fixed policies, the logging
    policy, a snapshot greedy and exploring; table, JSON, PNG and warnings."""
    from streamagent.cli import main

    log, _ = bandit_log(n=3000, seed=14)
    users = np.array([f"u{i // 2}" for i in range(log.n)], dtype=object)
    log = LoggedData(log.X, log.actions, log.rewards, log.propensities, N_ACTIONS,
                     log.feature_names, log.action_names, users,
                     1_767_225_600_000 + np.arange(log.n) * 3_600_000,
                     action_probs=log.action_probs, decision_ids=[f"d{i}" for i in range(log.n)])
    logs.write_jsonl(log, tmp_path / "log.jsonl")
    snap = snapshot_for(log.feature_names, log.action_names)
    snap.save(tmp_path / "m.pt")
    out, png = tmp_path / "out.json", tmp_path / "out.png"
    rc = main(["evaluate", "--logs", str(tmp_path / "log.jsonl"), "--policy", "never",
               "--policy", "always:c3", "--policy", "logging", "--policy", str(tmp_path / "m.pt"),
               "--policy", f"{tmp_path / 'm.pt'}:epsilon=0.1", "--gamma", "0.5",
               "--bootstrap", "50", "--json", str(out), "--png", str(png)])
    assert rc == 0 and png.stat().st_size > 1000
    doc = orjson.loads(out.read_bytes())
    by = {r["policy"]: {e["name"]: e for e in r["estimates"]} for r in doc["results"]}
    assert set(by["logging"]) == {"on-policy", "ips", "snips", "dm", "dr", "pdwis"}
    assert by["logging"]["ips"]["value"] == pytest.approx(by["logging"]["on-policy"]["value"])
    assert set(by["never"]) == {"ips", "snips", "dm", "dr", "pdwis"}
    # a snapshot trained on other features is refused with the difference named
    other = snapshot_for(("a", "b", "c"), log.action_names)
    other.save(tmp_path / "other.pt")
    assert main(["evaluate", "--logs", str(tmp_path / "log.jsonl"), "--policy",
                 str(tmp_path / "other.pt")]) == 2
