"""Run the decide agent as a Faust worker process."""
from __future__ import annotations

import logging

from streamagent.config import Settings


def run_worker(s: Settings) -> int:
    import faust

    from streamagent.ops.topics import create_topics, partition_count
    from streamagent.stream.app import create_app

    logging.basicConfig(level=s.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from streamagent.stream.models import ModelFollower, latest_snapshot

    create_topics(s, log=logging.getLogger("streamagent.topics").info)
    n = partition_count(s.kafka_bootstrap, s.topic_user_events, s.partitions)
    snap = None if s.model_path else latest_snapshot(s.kafka_bootstrap, s.topic_model_updates)
    w = create_app(s, n_partitions=n, snapshot=snap)
    w.metrics.serve(s.metrics_port, s.metrics_host)
    if not s.model_path:  # a fixed model file means: do not follow the learner
        ModelFollower(s.kafka_bootstrap, s.topic_model_updates, w.engine, w.metrics).start()
    logging.getLogger("streamagent").info(
        "decide worker: %d partitions, model v%d, metrics on %s:%s", n, w.engine.model.version,
        s.metrics_host, s.metrics_port or "off")
    worker = faust.Worker(w.app, loglevel=s.log_level.upper(), quiet=True)
    worker.execute_from_commandline()
    return 0
