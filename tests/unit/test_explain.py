"""Explanations: integrated gradients on the decider's own network, and the decision view."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from streamagent.core import features as F
from streamagent.core.explain import explain, gap_and_grad, integrated_gradients
from streamagent.core.qnet import ModelSnapshot, NumpyQ, init_network
from streamagent.units import DAY_MS, HOUR_MS

ACTIONS = ("none", "pct10", "amt5", "freeship")


def model(heads: int = 1, seed: int = 0) -> NumpyQ:
    net = init_network(F.N_FEATURES, len(ACTIONS), (16, 16), seed, heads=heads)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # a trained-looking network: every layer non-zero
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return NumpyQ(ModelSnapshot.from_network(net, 3, 100, ACTIONS, F.FEATURE_NAMES))


def test_the_gradient_is_the_networks_own():
    q = model(heads=3)
    rng = np.random.default_rng(0)
    X = rng.random((5, F.N_FEATURES))
    gap, grad = gap_and_grad(q, X, 2, 0)
    Q = q.batch(X.astype(np.float32))
    assert np.allclose(gap, Q[:, 2] - Q[:, 0], atol=1e-4)
    eps = 1e-5
    for j in (0, 7, 13, F.N_FEATURES - 1):
        d = np.zeros(F.N_FEATURES)
        d[j] = eps
        fd = (gap_and_grad(q, X + d, 2, 0)[0] - gap_and_grad(q, X - d, 2, 0)[0]) / (2 * eps)
        assert np.allclose(grad[:, j], fd, atol=1e-6)


@pytest.mark.parametrize("heads", [1, 4])
def test_attributions_add_up_to_the_gap_they_explain(heads):
    q = model(heads=heads, seed=heads)
    rng = np.random.default_rng(heads)
    for _ in range(5):
        x, ref = rng.random(F.N_FEATURES), rng.random(F.N_FEATURES)
        attr = integrated_gradients(q, x, ref, 1, 0)
        g = gap_and_grad(q, np.stack([x, ref]), 1, 0)[0]
        assert attr.sum() == pytest.approx(g[0] - g[1], abs=1e-9 * max(1.0, abs(g[0] - g[1])))
    # a feature the decision shares with the reference gets nothing
    x = rng.random(F.N_FEATURES)
    ref = x.copy()
    ref[5] += 1.0
    attr = integrated_gradients(q, x, ref, 1, 0)
    assert np.count_nonzero(attr) == 1 and attr[5] != 0


def decision_doc(action_index: int, allowed=(True,) * 4, blocked_by=()) -> dict:
    ts = 1_767_225_600_000 + 40 * DAY_MS + 19 * HOUR_MS
    x = np.zeros(F.N_FEATURES)
    x[:] = np.random.default_rng(7).random(F.N_FEATURES)
    return {"decision_id": "d1", "user_id": "u1", "ts": ts, "action": ACTIONS[action_index],
            "action_index": action_index, "propensity": 0.97, "explored": False,
            "policy_version": 3, "trigger_type": "session_start", "allowed": list(allowed),
            "blocked_by": list(blocked_by), "features": x.tolist()}


def test_a_decision_is_explained_against_no_coupon_or_the_best_coupon():
    q = model()
    sent = explain(decision_doc(2), q, ACTIONS, 14 * DAY_MS, 7 * DAY_MS)
    Q = sent.q_values
    assert sent.versus == "none"
    assert sent.margin_over_none == pytest.approx(Q["amt5"] - Q["none"], abs=1e-4)
    assert abs(sent.check) < 1e-9 * max(1.0, abs(sent.margin_over_none))
    contrib = [c for _, _, c in sent.attributions]
    assert contrib == sorted(contrib, key=abs, reverse=True)
    assert len(sent.attributions) == F.N_FEATURES
    # context features are the reference's too: they explain nothing
    by_name = {f: c for f, _, c in sent.attributions}
    assert by_name["hour_sin"] == 0 and by_name["trigger_session_start"] == 0
    # 'no coupon' while coupons were capped: the best allowed coupon is the comparison
    held = explain(decision_doc(0, allowed=(True, False, True, True), blocked_by=("budget",)),
                   q, ACTIONS, 14 * DAY_MS, 7 * DAY_MS)
    best = max(("amt5", "freeship"), key=lambda a: held.q_values[a])
    assert held.versus == best and held.blocked == {"pct10": "budget"}
    assert held.margin_over_none == pytest.approx(held.q_values["none"] - held.q_values[best],
                                                  abs=1e-4)
    assert held.to_doc()["attributions"][0]["feature"] == held.attributions[0][0]


def test_a_record_of_another_feature_layout_is_refused():
    doc = decision_doc(1)
    doc["features"] = doc["features"][:-1]
    with pytest.raises(ValueError, match="features"):
        explain(doc, model(), ACTIONS, 14 * DAY_MS, 7 * DAY_MS)


def test_the_text_says_when_the_greedy_margin_held_a_coupon_back():
    from streamagent.ops.explain import render

    q = model()
    doc = decision_doc(0)
    e = explain(doc, q, ACTIONS, 14 * DAY_MS, 7 * DAY_MS, greedy_margin=0.5)
    assert e.hurdle == pytest.approx(0.5 * abs(e.q_values["none"]))
    capped = explain(doc, q, ACTIONS, 14 * DAY_MS, 7 * DAY_MS, greedy_margin=0.5,
                     margin_cap=e.hurdle / 4)  # GREEDY_MARGIN_MAX with the model's scale
    assert capped.hurdle == pytest.approx(e.hurdle / 4)
    text = render(e, doc, 5)
    assert f"rather than {e.versus}" in text and "Q per action" in text
    assert ("held back" in text) == (e.margin_over_none < 0)
    assert text.count("\n    ") >= 5  # the top features, one line each
