"""Reward centering: the network learns Q - offset; what the learner publishes is Q."""
import dataclasses

import numpy as np
import pytest
import torch

from streamagent.core.contracts import Transition
from streamagent.core.learner import QLearner
from streamagent.core.qnet import NumpyQ, init_network, shift_output
from streamagent.params import learner_params, shipped

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/unit/conftest.py

ACTIONS = ("none", "a", "b")
FEATS = ("bias", "x0", "x1")
DAY = 86_400_000
S = [1.0, 0.5, 0.5]


def learner(**kw):
    # publish_average off: these tests compare the published model with the online Q
    base = dict(batch_size=32, learning_starts=32, buffer_size=5000, seed=3, train_every=1,
                publish_average=False)
    base.update(kw)
    return QLearner(ACTIONS, FEATS, (32,), dataclasses.replace(learner_params(shipped()), **base))


def day(r, a=0, i=0):
    return Transition(decision_id=f"d{i}", user_id="u", ts=i * DAY, features=tuple(S),
                      action_index=a, reward=r, propensity=1.0, policy_version=0,
                      next_features=tuple(S), next_allowed=None, next_ts=(i + 1) * DAY,
                      dt_ms=DAY, done=False)


@pytest.mark.parametrize("dueling,heads", [(False, 1), (True, 1), (False, 3), (True, 3)])
def test_shift_output_adds_to_every_q_value(dueling, heads):
    net = init_network(3, 3, (8,), seed=1, heads=heads, dueling=dueling)
    with torch.no_grad():  # a non-trivial network: random output layer
        for prm in net.parameters():
            prm.add_(torch.randn_like(prm) * 0.3)
    x = torch.tensor([S, [1.0, 0.0, 1.0]])
    before = net.forward_heads(x).clone()
    shift_output(net, 2.5)
    assert torch.allclose(net.forward_heads(x), before + 2.5, atol=1e-5)


def test_centering_learns_the_long_run_value_sooner_and_publishes_it_uncentered():
    """One state, reward 1 a day, gamma 0.95 a day: Q = 20 for every action. At the product's
    learning rate a plain learner is far from 20 after 1,500 steps; the centered one starts
    at the data's average value (offset = mean reward / (1 - gamma) = 20)."""
    rng = np.random.default_rng(0)
    rewards = 1.0 + rng.normal(0, 0.2, 1600)
    out = {}
    for centered in (False, True):
        L = learner(center_rewards=centered, gamma=0.95, n_step=1)
        for i, r in enumerate(rewards):
            L.learn_one(day(float(r), a=i % 3, i=i))
        out[centered] = (L.q_values(S), NumpyQ(L.snapshot())(np.asarray(S)))
    plain, centered = out[False][0], out[True][0]
    assert np.all(np.abs(centered - 20.0) < 1.5), centered
    assert np.all(np.abs(plain - 20.0) > 5.0), plain  # what centering saves
    # the published network is the uncentered Q the learner reports
    assert np.allclose(out[True][1], centered, atol=1e-3)


def test_a_new_offset_is_absorbed_without_moving_q():
    L = learner(center_rewards=True, gamma=0.9, n_step=1, learning_starts=8, batch_size=8)
    for i in range(60):
        L.learn_one(day(1.0, a=i % 3, i=i))
    first = L.offset
    assert first == pytest.approx(10.0, rel=1e-3)  # 1 / (1 - 0.9)
    q = L.q_values(S)
    for i in range(60, 200):  # rewards double: the offset follows at the next recentering
        L.replay.add(np.asarray(S, np.float32), 0, 2.0, np.asarray(S, np.float32), 0.9,
                     np.ones(3, bool))
    L.train_steps = 100  # a multiple of RECENTER_EVERY: this step recenters
    L.opt.param_groups[0]["lr"] = 0.0  # isolate the recentering from the gradient step
    L.update()
    assert L.offset > first
    assert np.allclose(L.q_values(S), q, atol=1e-4)


def _restored(tmp_path, centered: bool) -> tuple[QLearner, QLearner]:
    """A centered learner after 40 steps, and a learner (centered or not) loaded from its
    checkpoint."""
    kw = dict(gamma=0.9, n_step=1, learning_starts=8, batch_size=8)
    L = learner(center_rewards=True, **kw)
    for i in range(40):
        L.learn_one(day(1.0 + i % 2, a=i % 3, i=i))
    L.save_checkpoint(tmp_path / "ck.pt")
    M = learner(center_rewards=centered, **kw)
    M.load_checkpoint(tmp_path / "ck.pt")
    return L, M


def test_offset_survives_a_checkpoint(tmp_path):
    L, M = _restored(tmp_path, centered=True)
    assert M.offset == L.offset != 0
    assert np.allclose(M.q_values(S), L.q_values(S))


def test_turning_centering_off_folds_the_offset_into_the_networks(tmp_path):
    L, M = _restored(tmp_path, centered=False)
    assert M.offset == 0.0 and L.offset != 0.0
    assert np.allclose(M.q_values(S), L.q_values(S), atol=1e-4)
    assert np.allclose(NumpyQ(M.snapshot())(np.asarray(S)), L.q_values(S), atol=1e-3)
