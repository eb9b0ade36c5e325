"""Bootstrapped Q-heads: confidence before sending, Thompson-like exploration with exact
propensities."""
from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import orjson
import pytest
import torch

from streamagent.core import features as F
from streamagent.core.catalog import load_catalog
from streamagent.core.contracts import BudgetShare, Transition
from streamagent.core.engine import DecisionEngine, Model, initial_model
from streamagent.core.learner import QLearner
from streamagent.core.policy import (REWARD_SCALE_KEY, action_probs, confident_greedy,
                                     greedy_actions, head_choices, margin_cap,
                                     thompson_pool)
from streamagent.core.qnet import ModelSnapshot, NumpyQ, init_network
from streamagent.params import engine_params, learner_params, shipped
from streamagent.errors import ConfigError
from streamagent.units import DAY_MS

CAT = load_catalog()
T0 = 1_767_225_600_000
ALL = np.ones(4, bool)


def test_numpy_heads_equal_torch_heads():
    net = init_network(F.N_FEATURES, CAT.n_actions, (16,), 1, heads=4)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    snap = ModelSnapshot.from_bytes(ModelSnapshot.from_network(net, 1, 1, CAT.actions,
                                                               F.FEATURE_NAMES).to_bytes())
    assert snap.heads == 4
    x = np.random.default_rng(0).normal(size=F.N_FEATURES).astype(np.float32)
    with torch.no_grad():
        want = net.forward_heads(torch.from_numpy(x)).numpy()
    q = NumpyQ(snap)
    assert np.allclose(q.heads(x), want, atol=1e-5) and np.allclose(q(x), want.mean(0), atol=1e-5)


def test_a_coupon_is_greedy_only_with_confidence():
    agree = np.array([[0.0, 1.0, 0.2, 0.1], [0.0, 1.2, 0.1, 0.0], [0.0, 0.9, 0.3, 0.2]])
    assert confident_greedy(agree, ALL, 1.0) == 1
    # the same mean advantage (about 1) but the heads disagree: not sent with confidence
    spread = np.array([[0.0, 4.0, 0.2, 0.1], [0.0, -1.5, 0.1, 0.0], [0.0, 0.6, 0.3, 0.2]])
    assert confident_greedy(spread, ALL, 1.0) == 0
    assert confident_greedy(spread, ALL, 0.0) == 1  # z = 0: the argmax of the mean
    assert confident_greedy(spread[:1], ALL, 5.0) == 1  # one head: no spread, plain argmax
    masked = np.array([True, False, True, True])
    assert confident_greedy(agree, masked, 1.0) in (0, 2, 3)


def test_a_coupon_must_clear_the_greedy_margin():
    q = np.array([[10.0, 10.4, 10.2, 9.0]])  # the best coupon beats 'none' by 4% of |Q(none)|
    assert confident_greedy(q, ALL, 0.0, 0.0) == 1
    assert confident_greedy(q, ALL, 0.0, 0.03) == 1
    assert confident_greedy(q, ALL, 0.0, 0.05) == 0
    neg = np.array([[-10.0, -9.5, -11.0, -12.0]])  # relative to |Q(none)| also below zero
    assert confident_greedy(neg, ALL, 0.0, 0.04) == 1
    assert confident_greedy(neg, ALL, 0.0, 0.06) == 0
    # 'none' masked (it never is in the product, but the rule must not pick a masked action)
    no_none = np.array([False, True, True, True])
    assert confident_greedy(q, no_none, 0.0, 0.5) == 1


def test_the_margin_holds_a_coupon_back_by_at_most_its_cap():
    # a big spender: 'none' worth 100, the coupon 1.2% more, where a 2% margin wants 2.0
    q = np.array([[100.0, 101.2, 99.0, 90.0]])
    assert confident_greedy(q, ALL, 0.0, 0.02) == 0
    assert confident_greedy(q, ALL, 0.0, 0.02, cap=1.0) == 1  # the hurdle is 1.0, not 2.0
    assert confident_greedy(q, ALL, 0.0, 0.02, cap=1.5) == 0
    small = np.array([[10.0, 10.1, 9.0, 9.0]])  # a cap above the relative hurdle changes nothing
    assert confident_greedy(small, ALL, 0.0, 0.02, cap=1.0) == 0
    assert confident_greedy(small, ALL, 0.0, 0.0, cap=0.05) == 1  # no margin, no hurdle
    # the cap in Q units: GREEDY_MARGIN_MAX times the model's average reward per decision
    assert margin_cap({REWARD_SCALE_KEY: 2.0}, 0.15) == pytest.approx(0.3)
    for meta in ({}, None, {REWARD_SCALE_KEY: 0.0}, {REWARD_SCALE_KEY: -1.0},
                 {REWARD_SCALE_KEY: float("nan")}, {REWARD_SCALE_KEY: "2.0"},
                 {REWARD_SCALE_KEY: True}, {REWARD_SCALE_KEY: [2.0]}):
        assert margin_cap(meta, 0.15) == 0.0  # no figure (older models): the margin alone
    assert margin_cap({REWARD_SCALE_KEY: 2.0}, 0.0) == 0.0
    Q = np.concatenate([q, small])
    assert list(greedy_actions(Q, None, 0.02, cap=1.0)) == [1, 0]
    assert list(greedy_actions(Q, None, 0.02)) == [0, 0]


def test_greedy_actions_is_the_row_wise_rule_of_the_engine():
    rng = np.random.default_rng(3)
    Q = 10 + rng.normal(0, 0.5, size=(400, 4))
    allowed = rng.random((400, 4)) < 0.8
    allowed[:, 0] = True
    for margin, cap in ((0.0, 0.0), (0.02, 0.0), (0.05, 0.0), (0.05, 0.2)):
        rows = greedy_actions(Q, allowed, margin, cap)
        assert list(rows) == [confident_greedy(Q[i:i + 1], allowed[i], 0.0, margin, cap)
                              for i in range(len(Q))]
    assert (greedy_actions(Q, allowed, 0.05) == 0).sum() > (greedy_actions(Q, allowed, 0.0) == 0).sum()


def test_thompson_propensities_are_exact():
    q_heads = np.array([[0.0, 1.0, 0.2, 0.1], [0.0, -1.0, 0.5, 0.0], [0.3, 0.0, 0.1, 0.2],
                        [0.0, 0.9, 0.3, 0.2]])
    allowed = np.array([True, True, True, False])
    hg = head_choices(q_heads, allowed)
    assert list(hg) == [1, 2, 0, 1]
    greedy = confident_greedy(q_heads, allowed, 1.0)
    p, g = action_probs(q_heads.mean(0), allowed, "thompson", 0.3, 0.5, greedy, hg)
    assert g == greedy and p.sum() == pytest.approx(1.0) and p[3] == 0.0
    # the engine's draw: explore with probability eps, then one uniform pick from the pool
    pool = thompson_pool(hg, allowed)
    rng = np.random.default_rng(1)
    n = 200_000
    explore = rng.random(n) < 0.3
    picks = np.where(explore, pool[rng.integers(len(pool), size=n)], greedy)
    freq = np.bincount(picks, minlength=4) / n
    assert np.allclose(freq, p, atol=0.005)


def test_the_engine_logs_thompson_propensities_and_refuses_a_one_head_model():
    s = shipped(exploration="thompson", q_heads=3, cap_min_gap_hours=0, cap_max_coupons=100)
    params = engine_params(s, 1)
    with pytest.raises(ConfigError):
        DecisionEngine(CAT, params, initial_model(CAT, (16,), 1, heads=1))
    eng = DecisionEngine(CAT, params, initial_model(CAT, (16,), 1, heads=3))
    seen = Counter()
    for k in range(60):
        ev = orjson.dumps({"event_id": f"e{k}", "user_id": f"u{k % 20}", "type": "session_start",
                           "ts": T0 + k * DAY_MS})
        r = eng.step(ev, f"u{k % 20}".encode(), None, BudgetShare())
        d = r.decision
        assert d.exploration == "thompson" and 0 < d.propensity <= 1
        seen[d.explored] += 1
    assert seen[True] > 0  # an untrained ensemble still explores (the pool has every action)


def test_heads_learn_on_their_own_bootstrap_samples():
    p = dataclasses.replace(learner_params(shipped()), heads=4, learning_starts=16,
                            batch_size=16, n_step=1, train_every=1, lr=5e-3)
    L = QLearner(("none", "a"), ("bias", "x"), (8,), p)
    rng = np.random.default_rng(0)
    for k in range(300):
        a = int(rng.integers(2))
        L.learn_one(Transition(decision_id=f"d{k}", user_id="u", ts=T0, features=(1.0, 0.0),
                               action_index=a, reward=float(rng.normal(a, 1.0)), propensity=0.5,
                               policy_version=0, next_features=None, next_allowed=None,
                               next_ts=None, dt_ms=None, done=True))
    assert 0.2 < L.replay.boot[:L.replay.n].mean() < 0.8  # about half of each head's sample
    with torch.no_grad():
        qh = L.online.forward_heads(torch.tensor([1.0, 0.0])).numpy()
    assert qh.shape == (4, 2) and qh[:, 1].std() > 1e-3  # different samples, different heads
    assert np.all(qh[:, 1] > qh[:, 0])  # and each learned that "a" pays more


def test_one_head_models_decide_as_before():
    # heads=1 is the plain network: the mean over one head is that head
    m = initial_model(CAT, (16,), 3)
    x = np.ones(F.N_FEATURES, np.float32)
    assert m.snapshot.heads == 1 and np.array_equal(m.q(x), m.q.heads(x)[0])
    assert isinstance(Model(m.snapshot).q, NumpyQ)
