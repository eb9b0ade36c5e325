"""The learning benchmark's parts: the simulator acts out the MDP it claims, and a smoke run
of `streamagent bench learning` writes its table, JSON and learning-curve PNG."""
import json

import numpy as np
import pytest

from streamagent.bench import learning as B
from streamagent.cli import main
from streamagent.core.catalog import load_catalog
from streamagent.core.simulator import Shop, optimum, scenario

CAT = load_catalog()


@pytest.mark.parametrize("name", ["fatigue", "no-fatigue"])
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
                 "--policies", "never,oracle,vw_cb_adf,river_linucb,q_gamma", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    rows = {r["policy"]: r for r in doc["scenarios"]["fatigue"]["results"]}
    assert set(rows) == {"never", "oracle", "vw_cb_adf", "river_linucb", "q_gamma"}
    assert doc["scenarios"]["fatigue"]["optimum"]["optimal"] > 0
    assert all(0 <= r["conversion_rate"] <= 1 for r in rows.values())
    png = out.with_suffix(".png")
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
