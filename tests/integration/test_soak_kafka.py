"""`streamagent bench soak` in small: a churning population through a real worker and learner.

The full soak (`make soak`, 2,000,000 events, docs/RELIABILITY.md "Soak") is too long for
`make test`; this runs the same command on the session broker with a user population that
churns fast under a one-day TTL, so that the TTL has to expire users for the user-state
level to stay where it should."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_soak_runs_and_the_ttl_keeps_user_state_level(kafka, tmp_path):
    out = tmp_path / "soak.json"
    r = subprocess.run(
        [sys.executable, "-m", "streamagent.cli", "bench", "soak", "--bootstrap", kafka,
         "--events", "30000", "--rate", "0", "--active-users", "400", "--lifetime-days", "0.5",
         "--ttl-days", "0.5", "--sample-seconds", "3", "--png", "",
         # 6 days of event time in all, less than MAX_FUTURE_SKEW_DAYS (7): however far the
         # worker falls behind the producer (it produces everything in a few seconds), the
         # join's decisions cannot trail its conversions by more than that. With 12 days and
         # the worker 8 days behind, conversions went to the DLQ as ts_too_far_ahead
         # (docs/RELIABILITY.md, "Soak": a limit of the join for backlog replays)
         "--days", "6", "--out", str(out)],
        capture_output=True, text=True, timeout=560)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    s = json.loads(out.read_text())
    assert s["events_produced"] == 30000
    # every event processed (or dead-lettered: none should be), nothing failed
    assert s["events_processed"] == 30000, s
    assert s["dead_letters"] == 0 and s["errors"] == 0, r.stdout[-4000:]
    assert s["decisions"] > 0 and s["samples"] >= 3, s
    # about 400 * (1 + 6 / 0.5) users seen; the TTL keeps about 400 * (1 + 0.5 / 0.5)
    assert s["users_seen"] > 4000, s
    assert s["expired_user_state"] > 1000, s
    assert s["users_gauge"]["end"] < 0.5 * s["users_seen"], s
    assert out.with_suffix(".csv").exists()
    # the tables' changelogs were created compacted, in segments the cleaner can keep up with
    from confluent_kafka.admin import ConfigResource

    from streamagent.ops.kafka import make_admin, plaintext
    from streamagent.params import shipped

    admin = make_admin(plaintext(kafka))
    logs = [t for t in admin.list_topics(timeout=10).topics
            if t.startswith("sa-soak-") and t.endswith("-changelog")]
    assert len(logs) == 3, logs  # user-state, budget, join-state
    for res, fut in admin.describe_configs(
            [ConfigResource(ConfigResource.Type.TOPIC, t) for t in logs]).items():
        cfg = {k: v.value for k, v in fut.result(timeout=10).items()}
        assert "compact" in cfg["cleanup.policy"], (res, cfg["cleanup.policy"])
        assert int(cfg["segment.bytes"]) == shipped().changelog_segment_mb << 20, res
    print(f"\nsoak: {s['events_processed']:,} events in {s['wall_s']:.0f} s, users "
          f"{s['users_gauge']['end']:,} of {s['users_seen']:,} seen, "
          f"{s['expired_user_state']:,} expired")
