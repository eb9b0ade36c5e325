"""The learning benchmark's parts: the simulator acts out the MDP it claims, and a smoke run
of `streamagent bench learning` writes its table, JSON and learning-curve PNG."""
import json

import numpy as np
import pytest

from streamagent.bench import learning as B
from streamagent.cli import main
from streamagent.core.catalog import load_catalog
from streamagent.sim.shop import SCENARIOS, Shop, optimum, scenario

CAT = load_catalog()


@pytest.mark.parametrize("name", SCENARIOS)
def test_the_optimal_policy_acted_out_in_the_simulator_earns_the_optimum(name):
    sc = scenario(name)
    shop = Shop(sc, CAT, 300, seed=5)
    opt = optimum(shop)
    pol = {seg: [CAT.actions.index(a) for a in acts] for seg, acts in opt["policies"].items()}
    res = B.run("oracle", sc, CAT, 300, 80, 5, choose=lambda u, d: pol[u.segment.name][u.fatigue])
    longrun = np.mean(res.daily_profit[30:])  # past the start-up transient
    assert longrun == pytest.approx(opt["optimal"], rel=0.06)
    never = B.run("never", sc, CAT, 300, 80, 5, choose=lambda u, d: 0)
    assert np.mean(never.daily_profit[30:]) < longrun


def test_smoke_run_writes_table_json_and_plot(tmp_path):
    out = tmp_path / "learning.json"
    assert main(["bench", "learning", "--users", "40", "--days", "12", "--scenarios", "fatigue",
                 "--policies", "never,oracle,vw_cb_adf,river_linucb,q_gamma", "--quick", "--jobs", "2",
                 "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    rows = {r["policy"]: r for r in doc["scenarios"]["fatigue"]["results"]}
    assert set(rows) == {"never", "oracle", "vw_cb_adf", "river_linucb", "q_gamma"}
    assert doc["scenarios"]["fatigue"]["optimum"]["optimal"] > 0
    assert all(0 <= r["conversion_rate"] <= 1 for r in rows.values())
    png = out.with_suffix(".png")
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # where each policy sent coupons in the last quarter, by true type and hidden level
    runs = {r["policy"]: r for r in doc["scenarios"]["fatigue"]["runs"]}
    never = runs["never"]["actions_last_quarter"]
    assert set(never) <= {"loyal", "bargain", "big_basket", "casual"}
    assert all(set(acts) == {"none"} for by in never.values() for acts in by.values())
    # 40 users, the last 3 of 12 days: every decision is counted once
    assert sum(n for by in never.values() for acts in by.values() for n in acts.values()) == 120
    oracle = B.coupon_shares(list(runs.values()), "oracle")
    assert all(share == 1.0 and top == "amt5_min30" for share, top, _ in oracle["bargain"].values())
    # the learner's own values where it acted, beside the MDP's; none for a fixed rule
    assert not runs["never"]["values_last_quarter"]
    values = runs["q_gamma"]["values_last_quarter"]
    n = sum(v["n"] for by in values.values() for v in by.values())
    assert n == sum(k for by in runs["q_gamma"]["actions_last_quarter"].values()
                    for acts in by.values() for k in acts.values()) == 120
    assert all({"q_none", "q_coupon", "v_never"} <= set(v) for by in values.values()
               for v in by.values())
    # where the gap goes: the oracle loses nothing on any type, never loses on the bargain
    # hunters (whom the optimum coupons) and nothing on loyal customers (whom it does not)
    gaps = doc["scenarios"]["fatigue"]["gap_by_type"]
    assert all(abs(g["points_lost"]) < 0.02 for g in gaps["oracle"].values())
    assert gaps["never"]["bargain"]["points_lost"] > 0.02
    assert gaps["never"]["loyal"]["points_lost"] == pytest.approx(0.0, abs=1e-9)
    assert gaps["never"]["bargain"]["profit"] == pytest.approx(gaps["never"]["bargain"]["never"])
    # the coupon shares over the run, per 10 days (12 days: two blocks): none for never, every
    # bargain hunter's decision for the oracle
    assert all(shares == [0.0, 0.0] for shares in runs["never"]["coupon_share_by_block"].values())
    assert runs["oracle"]["coupon_share_by_block"]["bargain"] == [1.0, 1.0]
    assert len(runs["q_gamma"]["coupon_share_by_block"]["casual"]) == 2
    mdp_v = doc["scenarios"]["fatigue"]["mdp_values"]
    # the MDP's values (gamma 0.95): casual users are best never couponed, bargain hunters
    # always; the value of never couponing is at most the optimum's
    assert mdp_v["casual"]["3"]["q_none"] > mdp_v["casual"]["3"]["q_coupon"]
    assert mdp_v["bargain"]["0"]["q_coupon"] > mdp_v["bargain"]["0"]["q_none"]
    assert all(v["v_never"] <= max(v["q_none"], v["q_coupon"]) + 1e-9
               for by in mdp_v.values() for v in by.values())


def test_interval_and_fixed_policy_check():
    lo, hi = B.interval95([0.9, 0.92, 0.94])
    assert lo < 0.92 < hi and hi - 0.92 == pytest.approx(0.92 - lo)
    assert B.interval95([0.5]) == (0.5, 0.5)
    rows = [{"seed": s, "policy": p, "fraction_of_optimum": f}
            for s, p, f in [(1, "never", 0.95), (1, "static", 0.90), (1, "q_gamma", 0.945),
                            (2, "never", 0.95), (2, "static", 0.97), (2, "q_gamma", 0.95)]]
    check = B.fixed_policy_check(rows)
    assert check["margin_by_seed"][1] == pytest.approx(-0.005)  # within the 1-point tolerance
    assert check["margin_by_seed"][2] == pytest.approx(-0.02)  # static was better on seed 2
    assert not check["passed"] and check["worst_margin"] == pytest.approx(-0.02)
