"""Every Prometheus metric streamagent exports, declared here against an injected registry.

Names: streamagent_<subsystem>_<what>_<unit>; counters end in _total; label values are
bounded (event type, action, reason, topic) and pre-initialised so dashboards show zeros
rather than gaps. Never label by user id.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from streamagent.core.contracts import EVENT_TYPES
from streamagent.errors import SnapshotRejected

DLQ_REASONS = ("bad_json", "not_an_object", "schema", "key_mismatch", "ts_too_far_ahead",
               "ts_too_far_behind", "wrong_partition", "processing_error")
JOIN_OUTCOMES = ("decisions", "conversions", "attributed_conversion", "unmatched_conversion",
                 "late_conversion", "duplicate_conversion", "duplicate_decision", "late_decision",
                 "rewarded", "defaulted", "replayed_input", "heartbeat")
BLOCK_REASONS = ("frequency_cap", "min_gap", "budget")
GATE_OUTCOMES = ("promoted", "rejected", "unverified", "operator")
# Buckets around the 50 ms p99 target: fine below it, coarse above.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0)
PROCESSING_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, *, topics: tuple[str, ...] = (),
                 actions: tuple[str, ...] = ()):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.events = Counter("streamagent_ingest_events_total",
                              "User events accepted, by event type.", ["type"], registry=r)
        self.dlq = Counter("streamagent_ingest_dead_letters_total",
                           "Messages sent to a dead-letter topic, by source topic and reason.",
                           ["topic", "reason"], registry=r)
        self.replayed = Counter("streamagent_ingest_replayed_events_total",
                                "Events seen before: a crash replay or a duplicate re-sent at a new offset "
                                "(already applied; not re-applied).",
                                registry=r)
        self.replay_missing = Counter(
            "streamagent_ingest_replay_decision_missing_total",
            "Replayed trigger events whose earlier decision was no longer in the user's state "
            "(so it could not be re-sent).", registry=r)
        self.decisions = Counter("streamagent_decision_decisions_total",
                                 "Decisions made, by action and whether it explored.",
                                 ["action", "explored"], registry=r)
        self.blocks = Counter("streamagent_decision_blocked_total",
                              "Decisions in which caps or budget masked coupons, by reason.",
                              ["reason"], registry=r)
        self.processing = Histogram("streamagent_decision_processing_seconds",
                                    "Time to process one user event in the decide agent (a "
                                    "batch's handling time over its size).",
                                    buckets=PROCESSING_BUCKETS, registry=r)
        self.batch_size = Histogram("streamagent_decision_batch_events",
                                    "User events per batch the decide agent handles.",
                                    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000),
                                    registry=r)
        self.e2e = Histogram("streamagent_decision_event_to_decision_seconds",
                             "From the trigger event's Kafka timestamp to its decision being sent.",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.budget_spent = Gauge("streamagent_decision_budget_spent",
                                  "Coupon budget spent in the current period by this worker's "
                                  "partitions (currency units).", registry=r)
        self.budget_remaining = Gauge("streamagent_decision_budget_remaining",
                                      "Coupon budget left in the current period on this worker's "
                                      "partitions (currency units).", registry=r)
        self.budget_progress = Gauge("streamagent_decision_budget_period_progress",
                                     "How far the current event-time budget period has run (0-1), "
                                     "from the latest event.", registry=r)
        self.model_age = Gauge("streamagent_decision_model_age_seconds",
                               "Wall-clock seconds since the model in use was published.",
                               registry=r)
        self.epsilon = Gauge("streamagent_decision_epsilon", "Exploration rate in use.",
                             registry=r)
        self.users = Gauge("streamagent_state_users",
                           "User-state entries on this worker's partitions.", registry=r)
        self.lag = Gauge("streamagent_stream_consumer_lag_messages",
                         "Messages behind the end of each input topic.", ["topic"], registry=r)
        self.model_version = Gauge("streamagent_decision_model_version",
                                   "Model version this decider uses.", registry=r)
        self.model_swaps = Counter("streamagent_decision_model_swaps_total",
                                   "New model versions this decider switched to.", registry=r)
        self.model_errors = Counter("streamagent_decision_model_load_errors_total",
                                    "Model snapshots that could not be used (kept the old one).",
                                    registry=r)
        self.model_rejected = Counter("streamagent_decision_model_rejected_total",
                                      "Model snapshots this decider refused before use (it kept "
                                      "its model), by reason.", ["reason"], registry=r)
        # --- rewards (the join) ---
        self.join_events = Counter("streamagent_reward_join_events_total",
                                   "What the reward join did, by outcome (decisions, conversions, "
                                   "attributed_conversion, unmatched_conversion, late_conversion, "
                                   "duplicate_conversion, duplicate_decision, late_decision, "
                                   "rewarded, defaulted).", ["outcome"], registry=r)
        self.rewards = Histogram("streamagent_reward_value", "Reward per closed decision.",
                                 buckets=(-50, -10, -1, 0, 1, 5, 10, 25, 50, 100, 250),
                                 registry=r)
        # Rewards can be negative, and prometheus_client then exposes no _sum for a histogram
        # (it would not be a counter); the running sum is a gauge of its own.
        self.reward_sum = Gauge("streamagent_reward_sum",
                                "Sum of the rewards of all decisions closed since start (can "
                                "fall: rewards can be negative).", registry=r)
        self.attribution_delay = Histogram(
            "streamagent_reward_attribution_delay_seconds",
            "Event time from a decision to a conversion attributed to it.",
            buckets=(60, 300, 900, 1800, 3600, 7200, 14400, 43200, 86400, 172800, 259200, 604800),
            registry=r)
        self.pending = Gauge("streamagent_reward_pending_decisions",
                             "Decisions waiting for their attribution window to close, on this "
                             "worker's partitions.", registry=r)
        self.transitions = Counter("streamagent_reward_transitions_total",
                                   "Transitions emitted for the learner, by terminal or not.",
                                   ["done"], registry=r)
        # --- learning ---
        self.learn_transitions = Counter("streamagent_learning_transitions_total",
                                         "Transitions the learner consumed.", registry=r)
        self.learn_duplicates = Counter("streamagent_learning_duplicate_transitions_total",
                                        "Transitions seen again (re-sent after a crash), skipped.",
                                        registry=r)
        self.learn_updates = Counter("streamagent_learning_updates_total",
                                     "Gradient steps taken.", registry=r)
        self.learn_loss = Gauge("streamagent_learning_td_loss",
                                "Huber TD loss of the latest gradient step.", registry=r)
        self.learn_max_q = Gauge("streamagent_learning_mean_max_q",
                                 "Mean over the batch of max_a Q_target(s', a).", registry=r)
        self.learn_replay = Gauge("streamagent_learning_replay_size",
                                  "Transitions in the replay buffer.", registry=r)
        self.learn_version = Gauge("streamagent_learning_model_version",
                                   "Latest model version the learner published.", registry=r)
        self.learn_published = Gauge("streamagent_learning_last_publish_timestamp_seconds",
                                     "Unix time of the last model version published.",
                                     registry=r)
        self.learn_epsilon = Gauge("streamagent_learning_epsilon",
                                   "Epsilon deciders use with the latest published model.",
                                   registry=r)
        self.learn_rejected = Counter("streamagent_learning_model_rejected_total",
                                      "Model versions the learner refused to checkpoint and "
                                      "publish (e.g. weights gone NaN), by reason.", ["reason"],
                                      registry=r)
        self.gate = Counter("streamagent_learning_gate_verdicts_total",
                            "Model versions judged by the promotion gate, by outcome.",
                            ["outcome"], registry=r)
        self.gate_live_version = Gauge("streamagent_learning_live_model_version",
                                       "The model version the deciders are told to use.",
                                       registry=r)
        self.gate_value = Gauge("streamagent_learning_gate_value",
                                "Doubly robust value per decision on held-out decisions, of "
                                "the live model and of the latest candidate.", ["model"],
                                registry=r)
        self.gate_diff_low = Gauge("streamagent_learning_gate_difference_lower_bound",
                                   "95% lower bound of (candidate - live) value per decision "
                                   "of the latest candidate.", registry=r)
        self.gate_holdout = Gauge("streamagent_learning_gate_holdout_size",
                                  "Held-out decisions the gate judges on.", registry=r)
        self.errors = Counter("streamagent_stream_processing_errors_total",
                              "Unexpected errors while processing, by stage.", ["stage"],
                              registry=r)
        for t in EVENT_TYPES:
            self.events.labels(t)
        for topic in topics:
            self.lag.labels(topic)
        for topic in topics:
            for reason in DLQ_REASONS:
                self.dlq.labels(topic, reason)
        for a in actions:
            for e in ("true", "false"):
                self.decisions.labels(a, e)
        for b in BLOCK_REASONS:
            self.blocks.labels(b)
        for o in JOIN_OUTCOMES:
            self.join_events.labels(o)
        for d in ("true", "false"):
            self.transitions.labels(d)
        for s in ("decide", "join", "learn", "dlq", "send", "changelog"):
            self.errors.labels(s)
        for reason in SnapshotRejected.REASONS:
            self.model_rejected.labels(reason)
            self.learn_rejected.labels(reason)
        for o in GATE_OUTCOMES:
            self.gate.labels(o)
        for m in ("live", "candidate"):
            self.gate_value.labels(m)

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        if port:
            try:
                start_http_server(port, addr=host, registry=self.registry)
            except OSError as exc:
                from streamagent.errors import ConfigError

                raise ConfigError(f"cannot serve /metrics on {host}:{port} ({exc}); set "
                                  f"STREAMAGENT_METRICS_PORT to a free port, or 0 to disable") from None
