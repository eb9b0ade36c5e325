"""The pipeline benchmark's arithmetic: rates between 10% and 90%, RSS drift, the JSON keys."""
import math

from streamagent.bench.pipeline import _conversions, _rate, figures, rss_figures


def test_rate_is_measured_between_a_tenth_and_nine_tenths():
    # 100 records: slow start-up (10 s for the first 10), then 10 a second
    points = [(0.0, 0), (10.0, 10), (18.0, 90), (30.0, 100)]
    assert _rate(points, 100) == 10.0
    assert math.isnan(_rate([(0.0, 0), (1.0, 5)], 100))  # never got to 90%


def test_rss_drift_compares_the_first_and_last_fifth():
    samples = [(float(t), 100.0 if t < 10 else 120.0) for t in range(50)]
    r = rss_figures(samples, 0.0, 49.0)
    assert r["first_fifth_mib"] == 100.0 and r["last_fifth_mib"] == 120.0
    assert abs(r["growth"] - 1.2) < 1e-9 and r["max_mib"] == 120.0
    assert rss_figures(samples[:5], 0.0, 4.0) is None  # too few samples to say


def test_figures_keep_their_stable_keys():
    results = {
        "decide": {"events_per_s": 4000.0, "rss": {"growth": 1.05, "last_fifth_mib": 600.0},
                   "latency_by_load": {"50pct": {"p50": 20.0, "p95": 40.0, "p99": 60.0}}},
        "count": {"events_per_s": 10000.0},
        "decide2": {"events_per_s": 6000.0},
        "join": {"records_per_s": 3000.0},
        "decide_core": {"events_per_s": 12000.0},
        "join_core": {"records_per_s": 7000.0},
        "learner": {"transitions_per_s": 250.0, "gradient_steps_per_s": 250.0,
                    "freshness_s": {"p50": 2.0, "p99": 4.0, "max": 5.0}},
    }
    f = figures(results)
    assert f["decide.latency_ms.p99_at_50pct"] == 60.0
    assert f["decide.vs_faust_count"] == 0.4
    assert f["decide_2_workers.vs_decide"] == 1.5
    assert f["join.records_per_s"] == 3000.0
    assert f["decide_core.events_per_s"] == 12000.0 and f["decide_core.vs_faust_count"] == 1.2
    assert f["join_core.records_per_s"] == 7000.0
    assert f["model_freshness_s.max"] == 5.0 and f["decide.rss.growth"] == 1.05


def test_generated_orders_fall_inside_the_attribution_window():
    decisions = [{"user_id": f"u{i}", "ts": 1_000_000 + i, "decision_id": f"d{i}"}
                 for i in range(40)]
    orders = _conversions(decisions, every=4, seed=7)
    assert len(orders) == 10
    for o, d in zip(orders, decisions[::4]):
        assert o["user_id"] == d["user_id"]
        assert 3_600_000 <= o["ts"] - d["ts"] < 48 * 3_600_000
    assert sum("decision_id" in o for o in orders) == 4  # every third names its decision


def test_loop_figures_are_the_phase_s_own_buckets():
    from streamagent.bench.pipeline import loop_figures

    def page(counts, stalls):
        out, n = {}, 0
        for le, c in zip(("0.001", "0.01", "0.1", "1.0", "+Inf"), counts):
            n += c
            out[f'streamagent_stream_loop_lag_seconds_bucket{{le="{le}"}}'] = float(n)
        out["streamagent_stream_loop_stalls_total"] = float(stalls)
        return out
    before = page([500, 0, 0, 0, 0], 1)  # the drain: fast ticks, one stall
    after = page([590, 0, 9, 1, 0], 3)  # the phase: 90 fast, 9 in (10, 100] ms, 1 in (0.1, 1] s
    f = loop_figures(before, after)
    assert f["samples"] == 100 and f["stalls"] == 2
    assert 0 < f["p50"] <= 1.0  # half of the phase's ticks were late by under a millisecond
    assert 10.0 < f["p99"] <= 100.0
    assert loop_figures(before, before) is None  # nothing in the phase: no figure


def test_latency_figures_show_where_in_the_phase_the_tail_is():
    from streamagent.bench.pipeline import latency_figures

    # 1,000 events, appended in order (given shuffled); the first 100 slow (a transient)
    pairs = [(float(t), 500.0 if t < 100 else 10.0) for t in range(1000)][::-1]
    f = latency_figures(pairs)
    assert f["n"] == 1000 and f["p99"] == 500.0 and f["p50"] == 10.0
    assert f["after_first_quarter"]["p99"] == 10.0  # steady once the first quarter is past
    assert f["p99_by_tenth"][0] == 500.0 and set(f["p99_by_tenth"][1:]) == {10.0}
    assert latency_figures([]) is None
