"""Run the decide agent as a Faust worker process, and say when it is ready (/readyz)."""
from __future__ import annotations

import asyncio
import logging

from streamagent.config import Settings


class WorkerHealth:
    """The decide worker's readiness checks, registered on its Metrics before anything starts.

    - ``partitions``: the worker has joined its consumer group and no rebalance is under way
      (Faust's rebalance lasts until the new assignment's tables are recovered). A worker
      given no partition of user-events (more replicas than partitions) is ready: a healthy,
      idle spare that takes over partitions at the next rebalance. Failing it while idle
      would stall a StatefulSet's rolling update on a spare for good.
    - ``recovery``: Faust's table recovery has completed and is not running now, so the user
      state, budget and join tables of its partitions are rebuilt from their changelogs.
    - ``model``: a model is loaded, and, unless STREAMAGENT_MODEL_PATH pins one, the thread
      that follows model-updates is alive.

    The checks only read flags (from the HTTP server's thread); Faust and the follower set them.
    """

    def __init__(self, metrics, topic: str, needs_model: bool = True):
        self.topic = topic
        self.needs_model = needs_model
        self.app = None
        self.engine = None
        self.follower = None
        self.pinned = False
        self.assigned: tuple[int, ...] | None = None  # partitions of `topic`, last assignment
        metrics.add_ready_check("partitions", self.partitions)
        metrics.add_ready_check("recovery", self.recovery)
        metrics.add_ready_check("model", self.model)

    def attach(self, app, engine, follower=None, *, pinned: bool = False) -> None:
        """Watch ``app`` (before its worker starts), ``engine`` and the model ``follower``."""

        async def on_assigned(sender, assigned, **kwargs) -> None:
            self.assigned = tuple(sorted(tp.partition for tp in assigned
                                         if tp.topic == self.topic))

        app.on_partitions_assigned.connect(on_assigned)  # held strongly by the signal
        self.engine, self.follower, self.pinned = engine, follower, pinned
        self.app = app

    def partitions(self) -> tuple[bool, str]:
        from streamagent.stream.faust_internals import group_state

        if self.app is None:
            return False, "starting: the Faust app is not built yet"
        st = group_state(self.app)
        if st.rebalances == 0:
            return False, "waiting to join the consumer group"
        if st.rebalancing:
            return False, "rebalance under way (partitions being assigned, tables recovered)"
        parts = self.assigned or ()
        if not parts:
            return True, (f"0 partitions of {self.topic}: an idle spare (more workers than "
                          f"partitions)")
        return True, f"{len(parts)} partitions of {self.topic}: {list(parts)}"

    def recovery(self) -> tuple[bool, str]:
        from streamagent.stream.faust_internals import group_state

        if self.app is None:
            return False, "starting: the Faust app is not built yet"
        if group_state(self.app).recovered:
            return True, "tables recovered from their changelogs"
        if self.app.in_recovery:
            return False, "restoring tables from their changelog topics"
        return False, "waiting for an assignment to recover"

    def model(self) -> tuple[bool, str]:
        if not self.needs_model:
            return True, "a join worker: no model"
        if self.engine is None:
            return False, "loading the model"
        version = self.engine.model.version
        if self.pinned:
            return True, f"v{version}, pinned by STREAMAGENT_MODEL_PATH"
        if self.follower is not None and not self.follower.is_alive():
            return False, (f"v{version}, but the model follower has stopped (see the log): "
                           f"new versions are not followed")
        return True, f"v{version}, following model-updates"


def seed_join_group(s: Settings, kafka) -> None:
    """A join worker's group (APP_ID-join) starts where the all-in-one workers' group (APP_ID)
    left the join's inputs, the first time it runs (ops.kafka.seed_group_offsets)."""
    from streamagent.ops.kafka import seed_group_offsets
    from streamagent.stream.app import group_id, role_inputs

    log = logging.getLogger("streamagent.worker")
    # a failure stops the worker (its supervisor restarts it): started without the copy, it
    # would read decision-log and conversions from their beginning and send rewards again
    copied = seed_group_offsets(kafka, s.app_id, group_id(s), list(role_inputs(s)))
    if copied:
        log.info("join group %s starts where group %s stopped: %d partitions, %d records "
                 "before them", group_id(s), s.app_id, len(copied), sum(copied.values()))


def run_worker(s: Settings) -> int:
    from streamagent.core.catalog import load_catalog
    from streamagent.ops.kafka import kafka_client
    from streamagent.ops.topics import create_topics, partition_count
    from streamagent.params import worker_metrics
    from streamagent.stream.app import create_app, group_id, role_inputs
    from streamagent.stream.faust_internals import make_worker

    logging.basicConfig(level=s.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from streamagent.stream.models import (ModelFollower, latest_snapshot, load_model_file,
                                           snapshot_check)

    kafka = kafka_client(s)  # brokers and TLS/SASL: a bad mix stops the worker here
    # serve first: /healthz answers and /readyz says what is missing while the worker starts
    metrics = worker_metrics(s, load_catalog(s.catalog_path))
    deciding = s.worker_role != "join"
    health = WorkerHealth(metrics, role_inputs(s)[0], needs_model=deciding)
    metrics.serve(s.metrics_port, s.metrics_host)
    create_topics(s, log=logging.getLogger("streamagent.topics").info)
    n = partition_count(kafka, s.topic_user_events, s.partitions)
    if s.worker_role == "join":
        seed_join_group(s, kafka)
    check = snapshot_check(s)
    if not deciding:  # the join needs the catalog only
        snap = None
    elif s.model_path:  # checked here: an unusable file stops the worker with the reason
        load_model_file(s.model_path, check)
        snap = None
    else:  # the newest valid snapshot: corrupt or invalid ones are skipped (and logged)
        snap = latest_snapshot(kafka, s.topic_model_updates, check=check)
    w = create_app(s, metrics=metrics, n_partitions=n, snapshot=snap)
    follower = None
    if deciding and not s.model_path:  # a fixed model file means: do not follow the learner
        follower = ModelFollower(kafka, s.topic_model_updates, w.engine, w.metrics,
                                 check=check)
        follower.start()
    health.attach(w.app, w.engine, follower, pinned=bool(s.model_path))
    logging.getLogger("streamagent").info(
        "worker (role %s, group %s): %d partitions, model v%d, metrics on %s:%s",
        s.worker_role, group_id(s), n, w.engine.model.version, s.metrics_host,
        s.metrics_port or "off")
    if s.gc_freeze:
        from streamagent.stream.runtime import freeze_gc

        freeze_gc()

        async def freeze_after_assignment(sender, assigned, **kwargs) -> None:
            freeze_gc()

        w.app.on_partitions_assigned.connect(freeze_after_assignment)
    if s.loop_stall_ms > 0:
        from streamagent.stream.runtime import LoopWatch

        watch = LoopWatch(metrics.loop_lag.observe, metrics.loop_stalls.inc,
                          stall_s=s.loop_stall_ms / 1000.0)

        @w.app.task
        async def watch_the_loop() -> None:
            watch.start(asyncio.get_running_loop())

        @w.app.on_before_shutdown.connect
        async def stop_watching(app, **kwargs) -> None:
            watch.stop()
    # the process is the worker: a crash or a stuck rebalance ends it within the deadline
    make_worker(w.app, s.log_level.upper(),
                exit_deadline_s=s.exit_deadline_s).execute_from_commandline()
    return 0
