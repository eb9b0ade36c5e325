"""NEVER_FLOOR: a second network learns the value of never sending a coupon again, and every
bootstrap is at least that (no coupon is always allowed, so V*(s) >= V_never(s))."""
import dataclasses

import numpy as np
import pytest
import torch

from streamagent.core.contracts import Transition
from streamagent.core.learner import QLearner
from streamagent.params import learner_params, shipped

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/unit/conftest.py

ACTIONS = ("none", "a", "b")
FEATS = ("bias", "x0", "x1")
DAY = 86_400_000
S = (1.0, 0.5, 0.5)


def learner(**kw):
    base = dict(batch_size=32, learning_starts=32, buffer_size=5000, seed=3, train_every=1,
                n_step=1, gamma=0.95)
    base.update(kw)
    return QLearner(ACTIONS, FEATS, (32,), dataclasses.replace(learner_params(shipped()), **base))


def day(r, a=0, i=0):
    return Transition(decision_id=f"d{i}", user_id="u", ts=i * DAY, features=S,
                      action_index=a, reward=r, propensity=1.0, policy_version=0,
                      next_features=S, next_allowed=None, next_ts=(i + 1) * DAY,
                      dt_ms=DAY, done=False)


def test_the_floor_is_shipped_on():
    assert learner().p.never_floor and learner().never_online is not None


def test_never_value_is_learned_from_the_no_coupon_transitions():
    """Reward 1 a day without a coupon (gamma 0.95): never sending one is worth 20."""
    L = learner(never_floor=True)
    rng = np.random.default_rng(0)
    for i, r in enumerate(1.0 + rng.normal(0, 0.2, 1600)):
        L.learn_one(day(float(r), a=0, i=i))
    assert abs(L.never_value(S) - 20.0) < 1.5, L.never_value(S)


@pytest.mark.parametrize("floor", [False, True])
def test_the_floor_lifts_a_coupon_whose_next_state_is_undervalued(floor):
    """Only coupon transitions (reward 0) and a never-value of 50 (held there: no no-coupon
    transition trains it): with the floor a coupon's Q climbs towards 0.95 x 50 and Q(s, none)
    is held near 50 (less the slack); without it, Q bootstraps from its own ~0 and stays there
    (a faster learning rate than shipped)."""
    L = learner(never_floor=floor, center_rewards=False, lr=1e-3)
    if floor:
        with torch.no_grad():
            for net in (L.never_online, L.never_target):
                net.net[-1].bias.fill_(50.0)
    for i in range(3000):
        L.learn_one(day(0.0, a=1, i=i))
    q = L.q_values(S)
    if floor:
        assert q[1] > 20.0, q
        # no "no coupon" transition at all, yet Q(s, none) is held near the never-value
        assert q[0] > 30.0, q
    else:
        assert abs(q[1]) < 5.0 and abs(q[0]) < 5.0, q


def test_the_floor_survives_a_checkpoint_and_moves_with_the_reward_offset(tmp_path):
    L = learner(never_floor=True)
    for i in range(300):
        L.learn_one(day(1.0 + 0.1 * (i % 3), a=i % 3, i=i))
    path = tmp_path / "ck.pt"
    L.save_checkpoint(path)
    M = learner(never_floor=True)
    M.load_checkpoint(path)
    assert M.never_value(S) == pytest.approx(L.never_value(S), rel=1e-6)
    # a checkpoint without the floor's network: a fresh one, the rest restored
    P = learner(never_floor=False)
    P.load_checkpoint(path)
    N = learner(never_floor=True)
    plain = tmp_path / "plain.pt"
    P.save_checkpoint(plain)
    N.load_checkpoint(plain)
    assert N.train_steps == L.train_steps


def test_a_checkpoint_with_broken_never_weights_is_refused(tmp_path):
    from streamagent.errors import CorruptCheckpoint

    L = learner(never_floor=True)
    for i in range(100):
        L.learn_one(day(1.0, a=i % 3, i=i))
    with torch.no_grad():
        L.never_online.net[0].weight[0, 0] = float("nan")
    path = tmp_path / "ck.pt"
    L.save_checkpoint(path)
    with pytest.raises(CorruptCheckpoint, match="never-value"):
        learner(never_floor=True).load_checkpoint(path)
