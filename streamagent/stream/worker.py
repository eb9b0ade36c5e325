"""Run the decide agent as a Faust worker process."""
from __future__ import annotations

import logging

from streamagent.config import Settings


def run_worker(s: Settings) -> int:
    from streamagent.ops.topics import create_topics, partition_count
    from streamagent.stream.app import create_app
    from streamagent.stream.faust_internals import make_worker

    logging.basicConfig(level=s.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from streamagent.stream.models import (ModelFollower, latest_snapshot, load_model_file,
                                           snapshot_check)

    create_topics(s, log=logging.getLogger("streamagent.topics").info)
    n = partition_count(s.kafka_bootstrap, s.topic_user_events, s.partitions)
    check = snapshot_check(s)
    if s.model_path:  # checked here: an unusable file stops the worker with the reason
        load_model_file(s.model_path, check)
        snap = None
    else:  # the newest valid snapshot: corrupt or invalid ones are skipped (and logged)
        snap = latest_snapshot(s.kafka_bootstrap, s.topic_model_updates, check=check)
    w = create_app(s, n_partitions=n, snapshot=snap)
    w.metrics.serve(s.metrics_port, s.metrics_host)
    if not s.model_path:  # a fixed model file means: do not follow the learner
        ModelFollower(s.kafka_bootstrap, s.topic_model_updates, w.engine, w.metrics,
                      check=check).start()
    logging.getLogger("streamagent").info(
        "decide worker: %d partitions, model v%d, metrics on %s:%s", n, w.engine.model.version,
        s.metrics_host, s.metrics_port or "off")
    make_worker(w.app, s.log_level.upper()).execute_from_commandline()
    return 0
