"""Every Prometheus metric streamagent exports, declared here against an injected registry,
and the small HTTP server that exposes them with the process's health.

Names: streamagent_<subsystem>_<what>_<unit>; counters end in _total; label values are
bounded (event type, action, reason, topic) and pre-initialised so dashboards show zeros
rather than gaps. Never label by user id.

The server (:class:`HealthServer`, started by :meth:`Metrics.serve`) answers on one port:
``/metrics`` (Prometheus text, as prometheus_client's own server would), ``/healthz`` (200
while the process is alive) and ``/readyz`` (200 or 503 from the named readiness checks that
the worker or learner registers with :meth:`Metrics.add_ready_check`); anything else is 404.
"""
from __future__ import annotations

import gzip
import json
import socket
import socketserver
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Union
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder, gzip_accepted

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


# A readiness check returns whether it passes, or (passes, a short human detail).
CheckResult = Union[bool, tuple[bool, str]]
ReadyCheck = Callable[[], CheckResult]


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, *, topics: tuple[str, ...] = (),
                 actions: tuple[str, ...] = ()):
        self.registry = registry if registry is not None else CollectorRegistry()
        self._checks: dict[str, ReadyCheck] = {}
        self._checks_lock = threading.Lock()
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
        self.skipped = Counter(
            "streamagent_ingest_offsets_skipped_total",
            "Offsets a stream jumped over between two records of one partition read in a row "
            "(one assignment): records never handed to the agent. A transactional producer's "
            "commit marker takes one offset per transaction; anything else is a lost record.",
            ["topic"], registry=r)
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
        # budget pacing (core/pacing.py), per partition of this worker (labels: partition
        # numbers, bounded by the user-events topic's partition count)
        self.shadow_price = Gauge("streamagent_decision_budget_shadow_price",
                                  "Budget pacing's shadow price (lambda, Q units per currency "
                                  "unit of coupon cost) at the partition's latest decision.",
                                  ["partition"], registry=r)
        self.pacing_spent = Gauge("streamagent_decision_budget_partition_spent",
                                  "Coupon budget the partition spent in its current period "
                                  "(currency units).", ["partition"], registry=r)
        self.pacing_target = Gauge("streamagent_decision_budget_partition_target",
                                   "What budget pacing's target curve (the partition's "
                                   "traffic profile, or the prior or the straight line "
                                   "before it has one) says it should have spent by its "
                                   "event time (currency units).",
                                   ["partition"], registry=r)
        self.model_age = Gauge("streamagent_decision_model_age_seconds",
                               "Wall-clock seconds since the model in use was published.",
                               registry=r)
        self.epsilon = Gauge("streamagent_decision_epsilon", "Exploration rate in use.",
                             registry=r)
        self.users = Gauge("streamagent_state_users",
                           "User-state entries on this worker's partitions.", registry=r)
        self.erasures = Counter("streamagent_state_erasures_total",
                                "Erasure requests carried out, by table (user-state: a null "
                                "user-events record; join-state: the decision-log tombstone "
                                "it causes).", ["table"], registry=r)
        self.expired = Counter("streamagent_state_expired_total",
                               "Users dropped for inactivity past the TTL (event time), by "
                               "table: deleted by the sweep, or found expired on read.",
                               ["table"], registry=r)
        self.lag = Gauge("streamagent_stream_consumer_lag_messages",
                         "Messages behind the end of each input topic.", ["topic"], registry=r)
        # the event loop (stream/runtime.py LoopWatch): every agent, the commit and Faust's
        # hand-over from its consumer thread share it, so its lag is every event's wait
        self.loop_lag = Histogram("streamagent_stream_loop_lag_seconds",
                                  "How late the worker's event loop ran a callback due every "
                                  "20 ms: the longest step it was busy with in between.",
                                  buckets=LATENCY_BUCKETS, registry=r)
        self.loop_stalls = Counter("streamagent_stream_loop_stalls_total",
                                   "Times the worker's event loop stalled for at least "
                                   "STREAMAGENT_LOOP_STALL_MS (each logged with its stack, at "
                                   "most one log every 10 s).", registry=r)
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
            self.skipped.labels(topic)
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
        for tbl in ("user-state", "join-state"):
            self.erasures.labels(tbl)
            self.expired.labels(tbl)
        for s in ("decide", "join", "learn", "dlq", "send", "changelog", "publish"):
            self.errors.labels(s)
        for reason in SnapshotRejected.REASONS:
            self.model_rejected.labels(reason)
            self.learn_rejected.labels(reason)
        for o in GATE_OUTCOMES:
            self.gate.labels(o)
        for m in ("live", "candidate"):
            self.gate_value.labels(m)

    # --- health -------------------------------------------------------------------------
    def add_ready_check(self, name: str, check: ReadyCheck) -> None:
        """Register (or replace) the readiness check ``name``. ``check()`` runs in the HTTP
        server's thread at every /readyz request: it must be quick and only read state."""
        with self._checks_lock:
            self._checks[name] = check

    def readiness(self) -> tuple[bool, dict[str, dict]]:
        """(all checks pass, {name: {"ok": bool, "detail": str}}). A check that raises fails,
        with the exception as its detail. No checks registered means ready."""
        with self._checks_lock:
            checks = list(self._checks.items())
        out: dict[str, dict] = {}
        for name, check in checks:
            try:
                result = check()
                ok, detail = result if isinstance(result, tuple) else (result, "")
                ok = bool(ok)
            except Exception as exc:  # a broken check must not break the endpoint
                ok, detail = False, f"check failed: {type(exc).__name__}: {exc}"
            out[name] = {"ok": ok, "detail": str(detail)}
        return all(c["ok"] for c in out.values()), out

    def serve(self, port: int, host: str = "127.0.0.1", *,
              setting: str = "STREAMAGENT_METRICS_PORT") -> "HealthServer | None":
        """Serve /metrics, /healthz and /readyz on ``host:port`` in a daemon thread; ``port``
        0 disables it (returns None). A port that cannot be bound is a ConfigError naming
        ``setting``."""
        if not port:
            return None
        try:
            return HealthServer(self, host, port).start()
        except OSError as exc:
            from streamagent.errors import ConfigError

            raise ConfigError(f"cannot serve /metrics on {host}:{port} ({exc}); set "
                              f"{setting} to a free port, or 0 to disable") from None


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a hung client never keeps the process alive
    metrics: Metrics

    def server_bind(self) -> None:
        # HTTPServer.server_bind also looks up the host's FQDN, a DNS query that can stall a
        # container's start; nothing here needs the name
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.0"  # one request per connection, as prometheus_client's server

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        url = urlsplit(self.path)
        if url.path == "/metrics":
            self._metrics(parse_qs(url.query))
        elif url.path == "/healthz":
            self._send(200, "text/plain; charset=utf-8", b"ok\n")
        elif url.path == "/readyz":
            ready, checks = self.server.metrics.readiness()
            body = {"ready": ready, "checks": checks,
                    "failing": [n for n, c in checks.items() if not c["ok"]]}
            self._send(200 if ready else 503, "application/json",
                       json.dumps(body).encode() + b"\n")
        else:
            self._send(404, "text/plain; charset=utf-8",
                       b"not found: try /metrics, /healthz or /readyz\n")

    def _metrics(self, params: dict) -> None:
        # what prometheus_client's own server does: the encoder the Accept header asks for
        # (OpenMetrics or text), optional name[] filtering, gzip if the client accepts it
        registry = self.server.metrics.registry
        encoder, content_type = choose_encoder(self.headers.get("Accept"))
        if "name[]" in params:
            registry = registry.restricted_registry(params["name[]"])
        output = encoder(registry)
        headers = {}
        if gzip_accepted(self.headers.get("Accept-Encoding")):
            output = gzip.compress(output)
            headers["Content-Encoding"] = "gzip"
        self._send(200, content_type, output, headers)

    def _send(self, status: int, content_type: str, body: bytes,
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the stdlib's name)
        pass  # probes every few seconds would flood the log


class HealthServer:
    """/metrics, /healthz and /readyz for one :class:`Metrics`, in a daemon thread.

    ``port`` 0 binds an ephemeral port (see :attr:`port`); :meth:`Metrics.serve` treats 0 as
    "disabled" instead, which is what the settings mean by it.
    """

    def __init__(self, metrics: Metrics, host: str = "127.0.0.1", port: int = 0):
        family = socket.AF_INET
        # an IPv6 address ("::", "::1") needs an IPv6 socket; names resolve as the OS prefers
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
        if infos:
            family = infos[0][0]
        server_class = type("_BoundServer", (_Server,), {"address_family": family})
        self.httpd: _Server = server_class((host, port), _Handler)
        self.httpd.metrics = metrics
        self._thread = threading.Thread(target=self.httpd.serve_forever,
                                        name="streamagent-http", daemon=True)

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def start(self) -> "HealthServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(5)


def scrape(port: int) -> dict[str, float]:
    """Every sample of a local /metrics page: 'name{labels}' -> value ({} if it does not
    answer)."""
    import re
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            body = resp.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for line in body.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*(?:\{[^}]*\})?) (\S+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out
