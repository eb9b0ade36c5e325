import copy
import dataclasses

import numpy as np
import pytest

from streamagent.core.contracts import Transition
from streamagent.core.learner import QLearner
from streamagent.core.policy import REWARD_SCALE_KEY
from streamagent.core.qnet import ModelSnapshot, NumpyQ
from streamagent.params import learner_params, shipped

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/unit/conftest.py


ACTIONS = ("none", "a", "b")
FEATS = ("bias", "x0", "x1")
DAY = 86_400_000


def learner(**kw):
    base = dict(batch_size=32, learning_starts=32, lr=5e-3, buffer_size=5000, seed=3)
    base.update(kw)
    return QLearner(ACTIONS, FEATS, (32,), dataclasses.replace(learner_params(shipped()), **base))


def t(s, a, r, s2=None, dt=None, done=True, allowed=None, user=""):
    return Transition(decision_id=f"d{a}", user_id=user, ts=0, features=tuple(s), action_index=a,
                      reward=r, propensity=1.0, policy_version=0,
                      next_features=tuple(s2) if s2 is not None else None,
                      next_allowed=tuple(allowed) if allowed is not None else None,
                      next_ts=dt, dt_ms=dt, done=done)


A, B = [1.0, 1.0, 0.0], [1.0, 0.0, 1.0]


@pytest.mark.parametrize("prioritized,dueling", [(False, False), (True, False), (False, True)])
def test_learns_a_different_best_action_per_context(prioritized, dueling):
    L = learner(gamma=0.0, prioritized=prioritized, dueling=dueling)
    rng = np.random.default_rng(0)
    # context A: action 1 pays 1; context B: action 2 pays 1; everything else pays 0
    for _ in range(3000):
        ctx = A if rng.random() < 0.5 else B
        a = int(rng.integers(3))
        r = 1.0 if (ctx is A and a == 1) or (ctx is B and a == 2) else 0.0
        L.learn_one(t(ctx, a, r + rng.normal(0, 0.1)))
    assert int(np.argmax(L.q_values(A))) == 1 and int(np.argmax(L.q_values(B))) == 2
    q = NumpyQ(L.snapshot())  # what it publishes (a plain network) decides the same
    assert int(np.argmax(q(np.asarray(A)))) == 1 and int(np.argmax(q(np.asarray(B)))) == 2


def test_bootstraps_through_time_with_gamma_per_day():
    """s0: action 0 pays 1 and ends; action 1 pays 0 but leads (one day later) to s1, where
    action 1 pays 10. With gamma 0.9 per day the long way is worth 9 > 1; myopic learners
    (gamma 0) prefer the 1."""
    S0, S1 = [1.0, 1.0, 0.0], [1.0, 0.0, 1.0]
    for gamma, best in ((0.9, 1), (0.0, 0)):
        # one-step targets, a step per transition: what this test is about
        L = learner(gamma=gamma, target_update="soft", tau=0.05, n_step=1, train_every=1)
        rng = np.random.default_rng(1)
        for _ in range(4000):
            a = int(rng.integers(2))
            if rng.random() < 0.5:
                L.learn_one(t(S0, a, 1.0) if a == 0 else t(S0, 1, 0.0, S1, DAY, False))
            else:
                L.learn_one(t(S1, a, 10.0 if a == 1 else 0.0))
        q = L.q_values(S0)
        assert int(np.argmax(q[:2])) == best, q
        if gamma:
            assert q[1] == pytest.approx(9.0, abs=1.0)


def _rare_big_order_against_frequent_small_ones(**kw):
    """Action 0 ("no coupon"): one decision in ten ends in an order worth 50 (mean 5.0).
    Action 1 (a coupon): three in ten end in an order worth 12 (mean 3.6). Rewards cycle
    exactly, so the replay's means are the true ones and only the loss decides what Q
    converges to."""
    L = learner(gamma=0.0, lr=1e-3, **kw)
    for i in range(2000):
        a, k = i % 2, (i // 2) % 10
        L.learn_one(t(A, a, (50.0 if k == 0 else 0.0) if a == 0 else (12.0 if k < 3 else 0.0)))
    return L.q_values(A)[:2]


def test_a_huber_threshold_above_the_order_size_values_a_rare_large_order_at_its_mean():
    """Q is the mean reward only where the Huber threshold is above the orders' size. Below it
    every order's gradient is clipped and Q is pulled toward the median (0 for sparse orders):
    the rare big order then looks worse than a coupon that makes small orders likelier
    (docs/BENCHMARKS.md, "The loss undervalued big orders")."""
    q_none, q_coupon = _rare_big_order_against_frequent_small_ones(huber_delta=1000.0)
    assert q_none == pytest.approx(5.0, abs=0.8) and q_coupon == pytest.approx(3.6, abs=0.5)
    assert q_none > q_coupon
    q_none, q_coupon = _rare_big_order_against_frequent_small_ones(huber_delta=20.0)
    assert q_none < 3.0 < q_coupon


def test_discount_follows_event_time_gaps():
    L = learner(gamma=0.9)
    assert L.discount(DAY, False) == pytest.approx(0.9)
    assert L.discount(2 * DAY, False) == pytest.approx(0.81)
    assert L.discount(DAY / 24, False) == pytest.approx(0.9 ** (1 / 24))
    assert L.discount(DAY, True) == 0.0


def test_masked_next_actions_are_not_bootstrapped_from():
    L = learner(gamma=0.9, double_dqn=False, learning_starts=1, batch_size=1, n_step=1,
                train_every=1)
    with __import__("torch").no_grad():
        L.target.net[-1].bias.copy_(__import__("torch").tensor([0.0, 0.0, 100.0]))
        L.target.net[-1].weight.zero_()
    L.learn_one(t(A, 0, 0.0, B, DAY, False, allowed=[True, True, False]))
    # if the masked action 2 (worth 100) leaked into the target, max_q would be ~100
    assert L.last_max_q < 1.0


def test_learn_one_does_not_mutate_its_input_and_is_seeded():
    tr = t(A, 1, 1.0, B, DAY, False)
    before = copy.deepcopy(tr)
    L1, L2 = learner(learning_starts=4, batch_size=4), learner(learning_starts=4, batch_size=4)
    for _ in range(20):
        L1.learn_one(tr)
        L2.learn_one(tr)
    assert tr == before
    assert np.allclose(L1.q_values(A), L2.q_values(A))


def test_checkpoint_round_trip(tmp_path):
    L = learner(learning_starts=8, batch_size=8, train_every=1)
    for i in range(50):
        L.learn_one(t(A, i % 3, float(i % 2)))
    snap = L.snapshot()
    L.save_checkpoint(tmp_path / "ck.pt", extra={"offsets": {"0": 50}})
    M = learner(learning_starts=8, batch_size=8, train_every=1)
    extra = M.load_checkpoint(tmp_path / "ck.pt")
    assert extra == {"offsets": {"0": 50}}
    assert (M.version, M.train_steps, len(M.replay)) == (snap.version, L.train_steps, 50)
    assert np.allclose(M.q_values(B), L.q_values(B))
    # and it goes on learning from where it was
    M.learn_one(t(A, 1, 1.0))
    assert M.train_steps == L.train_steps + 1


def test_snapshots_are_versioned_and_loadable():
    L = learner()
    s1, s2 = L.snapshot(), L.snapshot()
    assert (s1.version, s2.version) == (1, 2)
    from streamagent.core.qnet import ModelSnapshot

    back = ModelSnapshot.from_bytes(s2.to_bytes())
    assert back.actions == ACTIONS and back.version == 2
    assert REWARD_SCALE_KEY not in s1.meta  # nothing seen yet: no scale for the margin's cap


def test_a_snapshot_carries_the_average_reward_per_decision_its_replay_holds():
    L = learner(learning_starts=8, batch_size=8, train_every=1)
    rewards = [0.0, 3.0, 0.0, 0.0, 9.0, 0.0] * 5
    for i, r in enumerate(rewards):
        L.learn_one(t(A, i % 3, r))
    snap = ModelSnapshot.from_bytes(L.snapshot().to_bytes())
    assert snap.meta[REWARD_SCALE_KEY] == pytest.approx(np.mean(rewards))


def _chain(user, rewards, last_done=False):
    """Transitions of one user on consecutive days: features [1, k, 0] for decision k."""
    out = []
    for k, r in enumerate(rewards):
        done = last_done and k == len(rewards) - 1
        out.append(t([1.0, float(k), 0.0], k % 3, r, None if done else [1.0, float(k + 1), 0.0],
                     None if done else DAY, done, user=user))
    return out


def _stored(L):
    rb = L.replay
    return [(rb.s[i][1], round(float(rb.r[i]), 6), rb.s2[i][1], round(float(rb.disc[i]), 6))
            for i in range(len(rb))]


def test_n_step_returns_sum_discounted_rewards_then_bootstrap():
    L = learner(gamma=0.5, n_step=3, learning_starts=10_000)
    for x in _chain("u", [1.0, 2.0, 3.0, 4.0]):
        L.learn_one(x)
    # from decision 0: 1 + .5*2 + .25*3, then bootstrap from decision 3 with .5^3
    assert _stored(L) == [(0.0, 2.75, 3.0, 0.125), (1.0, 4.5, 4.0, 0.125)]
    assert len(L.pending["u"]) == 2


def test_an_ending_episode_flushes_shorter_returns_without_bootstrap():
    L = learner(gamma=0.5, n_step=3, learning_starts=10_000)
    for x in _chain("u", [1.0, 2.0, 4.0], last_done=True):
        L.learn_one(x)
    assert _stored(L) == [(0.0, 3.0, 0.0, 0.0), (1.0, 4.0, 0.0, 0.0), (2.0, 4.0, 0.0, 0.0)]
    assert "u" not in L.pending


def test_users_do_not_mix_and_the_oldest_waiting_user_flushes_first():
    L = learner(gamma=0.5, n_step=3, learning_starts=10_000, n_step_max_users=2)
    a, b, c = _chain("a", [1.0, 1.0]), _chain("b", [2.0, 2.0]), _chain("c", [8.0])
    for x in (a[0], b[0], a[1], b[1]):
        L.learn_one(x)
    assert len(L.replay) == 0  # two users, two transitions each: both still waiting
    L.learn_one(c[0])  # a third user: "a" (least recently updated) is flushed
    assert set(L.pending) == {"b", "c"}
    assert _stored(L) == [(0.0, 1.5, 2.0, 0.25), (1.0, 1.0, 2.0, 0.5)]


def test_waiting_transitions_survive_a_checkpoint(tmp_path):
    xs = _chain("u", [1.0, 2.0, 3.0, 4.0])
    L = learner(gamma=0.5, n_step=3, learning_starts=10_000)
    for x in xs[:2]:
        L.learn_one(x)
    L.save_checkpoint(tmp_path / "c.pt")
    L2 = learner(gamma=0.5, n_step=3, learning_starts=10_000)
    L2.load_checkpoint(tmp_path / "c.pt")
    for x in xs[2:]:
        L2.learn_one(x)
    ref = learner(gamma=0.5, n_step=3, learning_starts=10_000)
    for x in xs:
        ref.learn_one(x)
    assert _stored(L2) == _stored(ref)
