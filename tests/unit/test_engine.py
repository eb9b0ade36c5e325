import dataclasses

import numpy as np
import orjson
import pytest
import torch

from streamagent.core import features as F
from streamagent.core.catalog import load_catalog
from streamagent.core.constraints import CapParams
from streamagent.core.contracts import BudgetShare, validator
from streamagent.core.engine import DecisionEngine, Model, initial_model
from streamagent.core.qnet import ModelSnapshot, NumpyQ, init_network
from streamagent.errors import ConfigError
from streamagent.params import engine_params, shipped

T0 = 1_767_225_600_000
DAY = 86_400_000
CAT = load_catalog()


SHIPPED = engine_params(shipped(), 1)


def engine(**kw):
    """The shipped engine, with only what a test is about overridden."""
    return DecisionEngine(CAT, dataclasses.replace(SHIPPED, **kw), initial_model(CAT, (64, 64), 7))


def raw(eid, user, typ, ts, **kw):
    return orjson.dumps({"event_id": eid, "user_id": user, "type": typ, "ts": ts, **kw})


def run(eng, events, partition=0):
    states, budget, out = {}, BudgetShare(), []
    for off, (eid, user, typ, ts) in enumerate(events):
        r = eng.step(raw(eid, user, typ, ts), user.encode(), states.get(user), budget, partition, off)
        states[user], budget = r.state, r.budget
        out.append(r)
    return states, budget, out


def stream(n=300, users=15):
    rng = np.random.default_rng(3)
    types = ["session_start", "page_view", "add_to_cart", "search", "purchase"]
    return [(f"e{i}", f"u{rng.integers(users)}", types[rng.integers(5)], T0 + i * 600_000)
            for i in range(n)]


def test_decisions_only_on_triggers_and_outputs_validate():
    _, _, out = run(engine(), stream())
    check_d, check_a = validator("decision-log"), validator("coupon-action")
    for r in out:
        assert (r.decision is not None) == (r.event.type in ("session_start", "add_to_cart"))
        if r.decision:
            check_d(r.decision.to_doc())
            assert len(r.decision.features) == F.N_FEATURES
            assert (r.coupon_action is not None) == (r.decision.action != "none")
            if r.coupon_action:
                check_a(r.coupon_action.to_doc())
                assert r.coupon_action.coupon.id == r.decision.action


def test_same_input_same_decisions_whatever_the_partitioning():
    """Users split over two 'workers' decide exactly as on one (budget not binding)."""
    evs = stream()
    _, _, one = run(engine(), evs)
    a = [e for e in evs if int(e[1][1:]) % 2 == 0]
    b = [e for e in evs if int(e[1][1:]) % 2 == 1]
    _, _, two_a = run(engine(n_partitions=2), a, partition=0)
    _, _, two_b = run(engine(n_partitions=2), b, partition=1)
    key = lambda rs: {r.decision.decision_id: (r.decision.action, r.decision.propensity)
                      for r in rs if r.decision}
    assert key(one) == key(two_a) | key(two_b)


def test_budget_is_never_overspent():
    share = 40.0
    eng = engine(budget_per_period=share, caps=dataclasses.replace(SHIPPED.caps, min_gap_ms=0, max_coupons=100),
                 exploration="epsilon", epsilon_start=1.0, epsilon_end=1.0)
    _, _, out = run(eng, [(f"e{i}", f"u{i}", "session_start", T0 + i) for i in range(200)])
    spent = sum(r.decision.cost for r in out if r.decision)
    assert 0 < spent <= share
    assert any("budget" in r.decision.blocked_by for r in out)


def test_a_replayed_trigger_re_emits_the_same_decision_and_changes_nothing():
    eng = engine()
    r1 = eng.step(raw("e1", "u", "session_start", T0), b"u", None, BudgetShare(), 0, 5)
    r2 = eng.step(raw("e1", "u", "session_start", T0), b"u", r1.state, r1.budget, 0, 5)
    assert r2.replayed and r2.decision == r1.decision and r2.state == r1.state
    assert r2.coupon_action == r1.coupon_action


def test_a_gap_in_the_users_own_history_is_legal():
    """A user's history is no clock (tests/unit/test_event_time.py has the partition rules)."""
    eng = engine()
    r = eng.step(raw("e1", "u", "page_view", T0), b"u", None, BudgetShare())
    r2 = eng.step(raw("e2", "u", "session_start", T0 + 400 * 86_400_000), b"u", r.state,
                  r.budget)
    assert r2.decision is not None and r2.state.n_events == 2


def test_numpy_forward_equals_torch_forward():
    net = init_network(F.N_FEATURES, CAT.n_actions, (64, 64), 1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    snap = ModelSnapshot.from_network(net, 3, 10, CAT.actions, F.FEATURE_NAMES)
    x = np.random.default_rng(0).normal(size=(F.N_FEATURES,)).astype(np.float32)
    with torch.no_grad():
        expect = net(torch.from_numpy(x)).numpy()
    assert np.allclose(NumpyQ(snap)(x), expect, atol=1e-5)


def test_snapshot_round_trip_is_weights_only(tmp_path):
    net = init_network(F.N_FEATURES, CAT.n_actions, (32,), 2)
    snap = ModelSnapshot.from_network(net, 4, 99, CAT.actions, F.FEATURE_NAMES)
    snap.save(tmp_path / "m.pt")
    back = ModelSnapshot.load(tmp_path / "m.pt")
    assert (back.version, back.train_steps, back.hidden) == (4, 99, (32,))
    for k, v in snap.state_dict.items():
        assert torch.equal(v, back.state_dict[k])
    # a pickle that would run code is refused by weights_only loading
    import io

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    buf = io.BytesIO()
    torch.save({"x": Evil()}, buf)
    with pytest.raises(Exception):
        ModelSnapshot.from_bytes(buf.getvalue())


def test_same_seed_same_initial_network():
    a, b = initial_model(CAT, (64, 64), 7), initial_model(CAT, (64, 64), 7)
    for k in a.snapshot.state_dict:
        assert torch.equal(a.snapshot.state_dict[k], b.snapshot.state_dict[k])


def test_a_model_for_another_catalog_is_refused():
    net = init_network(F.N_FEATURES, 3, (8,), 1)
    snap = ModelSnapshot.from_network(net, 1, 0, ("none", "a", "b"), F.FEATURE_NAMES)
    with pytest.raises(ConfigError, match="catalog"):
        DecisionEngine(CAT, SHIPPED, Model(snap))


def test_swap_model_takes_effect_on_the_next_decision():
    eng = engine(exploration="greedy")
    net = init_network(F.N_FEATURES, CAT.n_actions, (64, 64), 1)
    with torch.no_grad():
        net.net[-1].bias.copy_(torch.tensor([0, 0, 0, 9.0, 0, 0]))
    eng.swap_model(Model(ModelSnapshot.from_network(net, 5, 0, CAT.actions, F.FEATURE_NAMES)))
    r = eng.step(raw("e1", "u", "session_start", T0), b"u", None, BudgetShare())
    assert r.decision.policy_version == 5 and r.decision.action_index == 3


def test_an_untrained_agent_sends_no_coupons_but_explores():
    # a fresh network has a zero output layer: all Q equal, ties go to "none"
    _, _, out = run(engine(exploration="greedy", caps=CapParams(1000, 7 * DAY, 0)), stream())
    assert {r.decision.action for r in out if r.decision} == {"none"}
    _, _, out = run(engine(epsilon_start=0.5, caps=CapParams(1000, 7 * DAY, 0)), stream())
    acts = [r.decision for r in out if r.decision]
    assert any(d.action != "none" and d.explored for d in acts)


def _daily_sessions(eng, days=60, users=6):
    evs = [(f"{u}-{d}", u, "session_start", T0 + d * DAY + i * 1000)
           for d in range(days) for i, u in enumerate(f"v{k}" for k in range(users))]
    _, _, out = run(eng, evs)
    by_user: dict = {}
    for r in out:
        by_user.setdefault(r.decision.user_id, []).append(r.decision)
    return by_user


def test_exploration_runs_repeat_the_explored_action_for_a_while():
    caps = CapParams(1000, 7 * DAY, 0)
    plain = _daily_sessions(engine(epsilon_start=0.3, epsilon_end=0.3, caps=caps))
    runs = _daily_sessions(engine(epsilon_start=0.3, epsilon_end=0.3, caps=caps,
                                  explore_run_mean=6.0))

    def mean_explored_streak(by_user):
        streaks = []
        for ds in by_user.values():
            n, prev = 0, None
            for d in ds:
                if d.explored and d.action == prev:
                    n += 1
                else:
                    if n:
                        streaks.append(n)
                    n = 1 if d.explored else 0
                prev = d.action if d.explored else None
            if n:
                streaks.append(n)
        return np.mean(streaks)

    assert mean_explored_streak(runs) > 2 * mean_explored_streak(plain)
    for ds in runs.values():
        for prev, d in zip(ds, ds[1:]):
            if d.propensity == 1.0 and d.explored:
                # inside a run: the same action as the decision before, logged with probability 1
                assert d.action == prev.action


def test_exploration_runs_are_deterministic_per_decision():
    caps = CapParams(1000, 7 * DAY, 0)
    a = _daily_sessions(engine(epsilon_start=0.3, caps=caps, explore_run_mean=4.0), days=20)
    b = _daily_sessions(engine(epsilon_start=0.3, caps=caps, explore_run_mean=4.0), days=20)
    assert a == b


def test_an_external_policy_acts_and_the_state_remembers_its_coupons():
    eng = engine(caps=CapParams(1000, 7 * DAY, 0))
    states, budget = {}, BudgetShare()
    for d in range(3):
        r = eng.step(raw(f"x{d}", "w", "session_start", T0 + d * DAY), b"w", states.get("w"),
                     budget, policy=lambda x, allowed: (2, 0.25))
        states["w"], budget = r.state, r.budget
        assert r.decision.action_index == 2 and r.decision.propensity == 0.25
        assert r.coupon_action.coupon.id == CAT.actions[2]
    assert states["w"].n_coupons == 3
    # a policy may not pick what caps or budget forbid (the default caps allow 2 a week)
    capped = engine()
    st, b = None, BudgetShare()
    for d in range(2):
        r = capped.step(raw(f"c{d}", "z", "session_start", T0 + d * DAY), b"z", st, b,
                        policy=lambda x, allowed: (1, 1.0))
        st, b = r.state, r.budget
    with pytest.raises(ValueError, match="masked"):
        capped.step(raw("c2", "z", "session_start", T0 + 2 * DAY), b"z", st, b,
                    policy=lambda x, allowed: (1, 1.0))


def _couponing_engine(**kw):
    """An engine whose model prefers coupon 3 for everyone (Q 9 against 0); rest exploration
    as ``kw`` sets it, off otherwise (whatever the shipped defaults)."""
    kw = {"explore_rest_prob": 0.0, "explore_rest_decay_steps": 0,
          "explore_rest_min_pressure": 0.0, **kw}
    eng = engine(caps=CapParams(1000, 7 * DAY, 0), epsilon_start=0.02, epsilon_end=0.02, **kw)
    net = init_network(F.N_FEATURES, CAT.n_actions, (64, 64), 1)
    with torch.no_grad():
        net.net[-1].bias.copy_(torch.tensor([0, 0, 0, 9.0, 0, 0]))
    eng.swap_model(Model(ModelSnapshot.from_network(net, 5, 0, CAT.actions, F.FEATURE_NAMES)))
    return eng


def test_rest_exploration_rests_couponed_users_for_a_while_with_exact_propensities():
    rest_prob, n = 0.05, CAT.n_actions
    plain = _daily_sessions(_couponing_engine(), days=120)
    rests = _daily_sessions(_couponing_engine(explore_rest_prob=rest_prob,
                                              explore_rest_mean=6.0), days=120)

    def none_streaks(by_user):
        out = []
        for ds in by_user.values():
            k = 0
            for d in ds:
                if d.action == "none":
                    k += 1
                elif k:
                    out.append(k)
                    k = 0
        return out

    assert max(none_streaks(plain), default=0) <= 2
    streaks = none_streaks(rests)
    assert len(streaks) >= 10 and np.mean(streaks) > 3
    for ds in rests.values():
        for prev, d in zip(ds, ds[1:]):
            if d.action != "none":
                continue
            if d.propensity == 1.0:  # inside a rest: started by the decision before or earlier
                assert prev.action == "none" and d.explored
            else:  # a rest may start here: its share, plus epsilon's for "none"
                assert d.propensity == pytest.approx(rest_prob + (1 - rest_prob) * 0.02 / n)
    # a user the model would not coupon never rests (nothing to rest from) and is unchanged
    quiet = _daily_sessions(engine(caps=CapParams(1000, 7 * DAY, 0), epsilon_start=0.02,
                                   epsilon_end=0.02, explore_rest_prob=rest_prob,
                                   explore_rest_decay_steps=0, explore_rest_min_pressure=0.0),
                            days=30)
    same = _daily_sessions(engine(caps=CapParams(1000, 7 * DAY, 0), epsilon_start=0.02,
                                  epsilon_end=0.02, explore_rest_prob=0.0), days=30)
    assert quiet == same


def test_rests_start_only_where_the_coupon_pressure_is_high_enough():
    rest_prob, n, floor = 0.05, CAT.n_actions, 2.0
    by_user = _daily_sessions(_couponing_engine(explore_rest_prob=rest_prob,
                                                explore_rest_mean=6.0,
                                                explore_rest_min_pressure=floor), days=120)
    starts = {True: 0, False: 0}  # decisions where a rest could start, by pressure >= floor
    for ds in by_user.values():
        for d in ds:
            if d.propensity == 1.0:  # inside a rest
                continue
            high = F.coupon_pressure(np.array(d.features)) >= floor
            share = rest_prob if high else 0.0  # the rest's share of "no coupon"
            if d.action == "none":
                assert d.propensity == pytest.approx(share + (1 - share) * 0.02 / n)
            elif d.action_index == 3:  # the greedy coupon
                assert d.propensity == pytest.approx((1 - share) * (1 - 0.02 + 0.02 / n))
            starts[high] += 1
    assert starts[True] >= 100 and starts[False] >= 10  # both kinds were seen
    # a floor no user reaches: the same decisions as without rest exploration
    never = _daily_sessions(_couponing_engine(explore_rest_prob=rest_prob, explore_rest_mean=6.0,
                                              explore_rest_min_pressure=99.0), days=60)
    assert never == _daily_sessions(_couponing_engine(), days=60)


def test_rest_exploration_fades_with_the_models_training_steps():
    rest_prob, n = 0.05, CAT.n_actions

    def at(steps: int, prob: float = rest_prob):
        eng = _couponing_engine(explore_rest_prob=prob, explore_rest_mean=6.0,
                                explore_rest_decay_steps=1000)
        net = eng.model.snapshot.network()
        eng.swap_model(Model(ModelSnapshot.from_network(net, 6, steps, CAT.actions,
                                                        F.FEATURE_NAMES)))
        return _daily_sessions(eng, days=60)

    # half-way through the decay a rest starts with half the probability
    starts = [d for ds in at(500).values() for d in ds
              if d.action == "none" and d.propensity != 1.0]
    assert starts and all(d.propensity == pytest.approx(rest_prob / 2 + (1 - rest_prob / 2)
                                                         * 0.02 / n) for d in starts)
    # past it the rests are over: the same decisions as without rest exploration
    assert at(1000) == at(1000, prob=0.0)
