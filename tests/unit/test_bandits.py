"""The baseline bandits (River, Vowpal Wabbit) really learn: on a two-context problem with a
different best arm per context, each ends up choosing the right arm in both."""
import numpy as np
import pytest

from streamagent.bench.bandits import BANDITS, make

NAMES = ("bias", "ctx_a", "ctx_b")
N_ARMS = 3
# expected reward of each arm in context a and b: arm 1 is best in a, arm 2 in b
MEANS = {0: [1.0, 3.0, 0.5], 1: [1.0, 0.5, 3.0]}


def _x(c):
    return np.array([1.0, float(c == 0), float(c == 1)], np.float32)


@pytest.mark.parametrize("name", BANDITS)
def test_bandit_learns_the_best_arm_per_context(name):
    rng = np.random.default_rng(0)
    b = make(name, NAMES, N_ARMS, seed=3)
    allowed = np.ones(N_ARMS, bool)
    for _ in range(1500):
        c = int(rng.integers(2))
        a, prob = b.act(_x(c), allowed)
        assert 0 < prob <= 1 and 0 <= a < N_ARMS
        b.learn(_x(c), a, MEANS[c][a] * 10 + rng.normal(0, 5), prob)
    picks = {c: np.bincount([b.act(_x(c), allowed)[0] for _ in range(200)], minlength=N_ARMS)
             for c in (0, 1)}
    assert picks[0].argmax() == 1, picks
    assert picks[1].argmax() == 2, picks


@pytest.mark.parametrize("name", BANDITS)
def test_bandit_respects_the_mask(name):
    b = make(name, NAMES, N_ARMS, seed=1)
    allowed = np.array([True, False, False])
    assert all(b.act(_x(0), allowed)[0] == 0 for _ in range(20))


def test_unknown_bandit_is_a_clear_error():
    from streamagent.errors import ConfigError

    with pytest.raises(ConfigError, match="choose from"):
        make("thompson", NAMES, N_ARMS, seed=1)
