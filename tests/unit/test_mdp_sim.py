import itertools

import numpy as np
import pytest

from streamagent.core.catalog import load_catalog
from streamagent.sim.mdp import average_reward, policy_evaluation, value_iteration
from streamagent.sim.shop import SCENARIOS, Shop, mdp, optimum, order_prob, scenario

CAT = load_catalog()


def two_state():
    # s0 --a0--> s0 (r=1);  s0 --a1--> s1 (r=0);  s1 --any--> s0 with r=3 (a0) or r=0 (a1)
    P = np.zeros((2, 2, 2))
    P[0, 0, 0] = 1
    P[1, 0, 1] = 1
    P[:, 1, 0] = 1
    R = np.array([[1.0, 3.0], [0.0, 0.0]])
    return P, R


def test_value_iteration_matches_the_closed_form():
    P, R = two_state()
    g = 0.9
    V, pi = value_iteration(P, R, g)
    # staying pays 1/(1-g) = 10; the detour pays (0 + g*3)/(1-g^2) = 14.2: detour is optimal
    assert pi[0] == 1 and pi[1] == 0
    assert V[0] == pytest.approx(g * 3 / (1 - g * g), rel=1e-6)
    assert V[1] == pytest.approx(3 + g * V[0], rel=1e-6)
    assert np.allclose(policy_evaluation(P, R, pi, g), V)
    # myopic (gamma 0) takes the immediate 1
    assert value_iteration(P, R, 0.0)[1][0] == 0


def test_average_reward_of_known_policies():
    P, R = two_state()
    assert average_reward(P, R, np.array([0, 0])) == pytest.approx(1.0)
    assert average_reward(P, R, np.array([1, 0])) == pytest.approx(1.5, rel=1e-3)


@pytest.mark.parametrize("name", SCENARIOS)
def test_value_iteration_finds_the_best_policy_of_the_simulator(name):
    sc = scenario(name)
    for seg in sc.segments:
        m = mdp(sc, seg, CAT)
        assert np.allclose(m.P.sum(axis=2), 1.0)
        _, pi = value_iteration(m.P, m.R, 0.995)
        best = max(average_reward(m.P, m.R, np.array(p))
                   for p in itertools.product(range(CAT.n_actions), repeat=m.P.shape[1]))
        assert average_reward(m.P, m.R, pi) == pytest.approx(best, rel=1e-3), seg.name


def test_fatigue_makes_the_optimum_differ_from_the_myopic_policy():
    sc = scenario("fatigue")
    differs = False
    for seg in sc.segments:
        m = mdp(sc, seg, CAT)
        _, far = value_iteration(m.P, m.R, 0.995)
        _, myopic = value_iteration(m.P, m.R, 0.0)
        gap = average_reward(m.P, m.R, far) - average_reward(m.P, m.R, myopic)
        assert gap >= -1e-9
        differs |= gap > 0.05
    assert differs, "with fatigue on, some segment must gain from looking ahead"


def test_without_fatigue_myopic_is_optimal():
    sc = scenario("no-fatigue")
    for seg in sc.segments:
        m = mdp(sc, seg, CAT)
        _, far = value_iteration(m.P, m.R, 0.995)
        _, myopic = value_iteration(m.P, m.R, 0.0)
        assert average_reward(m.P, m.R, far) == pytest.approx(average_reward(m.P, m.R, myopic), rel=1e-6)


def test_the_shop_is_seeded_and_reacts_to_coupons():
    a, b = Shop(scenario("fatigue"), CAT, 200, seed=3), Shop(scenario("fatigue"), CAT, 200, seed=3)
    assert [u.segment.name for u in a.users] == [u.segment.name for u in b.users]
    u = a.users[0]
    assert order_prob(a.scenario, u.segment, CAT, 0, 3) >= order_prob(a.scenario, u.segment, CAT, 0, 0)
    for _ in range(3):
        a.respond(u, 3, 0, "x")
    assert u.fatigue == 3  # three coupons in a row: fully fatigued


def test_pulse_optimum_times_its_coupons_and_types_show_only_through_behaviour():
    sc = scenario("pulse")
    pulsing = 0
    for seg in sc.segments:
        m = mdp(sc, seg, CAT)
        _, pi = value_iteration(m.P, m.R, 0.995)
        _, myopic = value_iteration(m.P, m.R, 0.0)
        if pi[0] != 0 and all(a == 0 for a in pi[1:]):
            pulsing += 1  # a coupon only to an unconditioned user
            assert any(a != 0 for a in myopic[1:])  # the myopic optimum keeps conditioning
    assert pulsing >= 2
    shop = Shop(sc, CAT, 200, seed=3)
    ref = optimum(shop)
    assert ref["never"] < 0.85 * ref["optimal"] and ref["myopic_optimal"] < ref["never"]
    # one session does not give the type away: categories and devices are noisy
    off_type = sum(ev.get("category") not in (None, u.segment.category)
                   or ev["device"] != u.segment.device
                   for u in shop.users for ev in shop.session_events(0, u, 0))
    assert off_type > 0


def test_the_history_optimum_is_the_full_optimum_when_nothing_is_hidden_and_below_it_else():
    from streamagent.sim.mdp import average_reward, history_optimum, value_iteration

    # deterministic: action 1 moves 0 -> 1 (reward 0), action 0 stays (reward 1 in state 1)
    P = np.zeros((2, 2, 2))
    P[0, 0, 0] = P[0, 1, 1] = 1.0
    P[1, 0, 1] = P[1, 1, 1] = 1.0
    R = np.array([[0.0, 1.0], [0.0, 0.5]])
    _, pi = value_iteration(P, R, 0.99)
    assert history_optimum(P, R, 0.99) == pytest.approx(average_reward(P, R, pi), abs=1e-3)
    # hidden: action 1 ("coupon") pays 1 in state 0 and moves to 1 with probability 0.5;
    # there it pays -1 and "rest" (action 0) returns to 0 with probability 0.3
    P = np.zeros((2, 2, 2))
    P[0, 0] = [1.0, 0.0]
    P[0, 1] = [0.3, 0.7]
    P[1, 0] = [0.5, 0.5]
    P[1, 1] = [0.0, 1.0]
    R = np.array([[0.0, 0.0], [1.0, -1.0]])
    _, pi = value_iteration(P, R, 0.99)
    full, never = average_reward(P, R, pi), average_reward(P, R, np.zeros(2, int))
    h = history_optimum(P, R, 0.99)
    assert never < h < full


def test_the_margin_reference_is_the_optimum_without_a_margin_and_loses_what_it_holds_back():
    from streamagent.sim.shop import margin_reference

    catalog = load_catalog()
    shop = Shop(scenario("no-fatigue"), catalog, 200, seed=3)
    opt = optimum(shop)["optimal"]
    # no margin: the greedy rule on exact Q at gamma 0.95 is the optimum here (the best
    # coupon of each segment does not depend on the horizon when nothing conditions)
    assert margin_reference(shop, 0.95, 0.0) == pytest.approx(opt, rel=1e-6)
    # 2% of Q: big-basket and casual users' coupons (+1.2, +1.3% of Q) are held back
    held = margin_reference(shop, 0.95, 0.02)
    assert held < 0.95 * opt
    # a shorter horizon shrinks Q, and the same margin holds nothing back
    assert margin_reference(shop, 0.85, 0.02) == pytest.approx(opt, rel=1e-6)
