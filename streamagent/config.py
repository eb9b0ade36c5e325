"""All settings, in one place, read from STREAMAGENT_* environment variables.

Every field below is documented in docs/CONFIGURATION.md (generated from these descriptions
by ``streamagent config --markdown``). A ``.env`` file in the working directory, or the file
named by STREAMAGENT_ENV_FILE, is read too; real environment variables win.
"""
from __future__ import annotations

import math
import os
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
import json

from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from streamagent.units import DAY_MS, HOUR_MS


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="STREAMAGENT_",
        env_file=os.environ.get("STREAMAGENT_ENV_FILE", ".env"),
        extra="ignore",
        frozen=True,
    )

    # --- Kafka -------------------------------------------------------------------------
    kafka_bootstrap: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers (host:port[,host:port]).")
    kafka_port: int = Field(9092, description="Port of the local broker that `streamagent kafka start` runs (controller uses port+1).")
    data_dir: Path = Field(Path("var"), description="Where the local broker's data and the workers' table stores live.")
    app_id: str = Field("streamagent", description="Faust app id: the consumer group and the prefix of changelog topics.")
    worker_role: Literal["all", "decide", "join"] = Field("all", description="What `streamagent worker` runs. all: the decide and the reward-join agents in one process (one consumer group, APP_ID). decide: the decide agent only. join: the join agent only, in its own consumer group APP_ID-join, so the join runs on its own core (the decide agent gets the whole event loop: docs/BENCHMARKS.md) and scales apart from deciding. The join-state changelog keeps its name (APP_ID-join-state-changelog) in every role, and a join worker's first start continues from the offsets an all-in-one worker committed: a deployment moves from all to decide + join without losing or repeating a reward (docs/OPERATIONS.md).")
    partitions: int = Field(4, ge=1, description="Partitions for topics that `streamagent topics create` makes.")
    replication_factor: int = Field(1, ge=1, description="Replication factor of the topics streamagent creates and of the tables' changelog topics (Faust creates those). 1 suits the local single broker; use 3 on a production cluster, so that losing a broker loses no events, decisions or state.")
    changelog_segment_mb: int = Field(64, ge=1, le=1024, description="Segment size (MiB) of the tables' changelog topics, set when the worker creates them (existing topics keep theirs: `kafka-configs --alter --entity-type topics --add-config segment.bytes=...`). Kafka never compacts a partition's active segment, and its default of 1 GiB let the join-state changelog reach 3 GB over the 2M-event soak while the table itself held 150 MB (docs/RELIABILITY.md, soak); every restore onto an empty disk reads all of it.")
    topic_user_events: str = Field("user-events", description="Inbound user behaviour events (key: user_id).")
    topic_conversions: str = Field("conversions", description="Inbound orders (key: user_id).")
    topic_coupon_actions: str = Field("coupon-actions", description="Outbound coupons to deliver (key: user_id).")
    topic_decision_log: str = Field("decision-log", description="Every decision, 'no coupon' included (key: user_id).")
    topic_rewards: str = Field("rewards", description="One reward record per decision, when its attribution window closes (key: user_id).")
    topic_transitions: str = Field("transitions", description="(s, a, r, s', dt) per decision, for the learner (key: user_id).")
    topic_model_updates: str = Field("model-updates", description="The promoted model (compacted, one partition): deciders hot-swap to each promotion.")
    topic_model_candidates: str = Field("model-candidates", description="Every model version the learner produces, with the gate's verdict (compacted by version, one partition): what `streamagent model list` shows and `model promote|rollback` picks from.")
    dlq_suffix: str = Field(".dlq", description="Dead-letter topic name = source topic + this suffix.")

    # --- Kafka security (every client: the worker's Faust/aiokafka ones and the confluent-kafka ones) ---
    kafka_security_protocol: str = Field("PLAINTEXT", description="How every client reaches the brokers: PLAINTEXT, SSL (TLS; with a client certificate = mTLS), SASL_PLAINTEXT or SASL_SSL (SASL over TLS). See docs/OPERATIONS.md, secured Kafka.")
    kafka_sasl_mechanism: str | None = Field(None, description="SASL mechanism (needed with SASL_*): PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512.")
    kafka_sasl_username: str | None = Field(None, description="SASL user name (needed with SASL_*).")
    kafka_sasl_password: SecretStr | None = Field(None, description="SASL password (a secret: never printed or logged). Or KAFKA_SASL_PASSWORD_FILE.")
    kafka_sasl_password_file: Path | None = Field(None, description="File holding the SASL password (e.g. a mounted Kubernetes Secret; a trailing newline is ignored). Instead of KAFKA_SASL_PASSWORD.")
    kafka_ssl_ca_location: Path | None = Field(None, description="PEM file of the CA certificate(s) that signed the brokers' certificates (SSL, SASL_SSL). Default: the system's trusted CAs.")
    kafka_ssl_certificate_location: Path | None = Field(None, description="PEM file of this client's certificate, for mTLS (with KAFKA_SSL_KEY_LOCATION).")
    kafka_ssl_key_location: Path | None = Field(None, description="PEM file of this client's private key, for mTLS.")
    kafka_ssl_key_password: SecretStr | None = Field(None, description="Password of an encrypted KAFKA_SSL_KEY_LOCATION (a secret: never printed or logged).")
    pseudonym_key: SecretStr | None = Field(None, description="Pseudonymise user ids at ingress with this key (HMAC-SHA256, at least 16 bytes; a secret: never printed or logged). State, changelogs, decision-log, rewards, transitions, dead letters and logs then carry pseudonyms only; coupon-actions keeps the raw id for delivery. Changing the key makes every user new. Or PSEUDONYM_KEY_FILE. Unset: raw ids (docs/RELIABILITY.md, Pseudonymisation).")
    pseudonym_key_file: Path | None = Field(None, description="File holding the pseudonymisation key (e.g. a mounted Kubernetes Secret; a trailing newline is ignored). Instead of PSEUDONYM_KEY.")
    kafka_config: Annotated[dict[str, str], NoDecode] = Field({}, description="More librdkafka settings for the confluent-kafka clients (the worker's producer, learner, tools, model follower), as key=value,key=value or a JSON object, e.g. ssl.endpoint.identification.algorithm=none. Faust's aiokafka clients take only the settings above (and that one key). Values of keys naming a password or secret are masked by `streamagent config`.")

    # --- Decisions ---------------------------------------------------------------------
    trigger_types: Annotated[tuple[str, ...], NoDecode] = Field(("session_start", "add_to_cart"), description="Event types that trigger a decision (JSON list or comma-separated).")
    catalog_path: Path | None = Field(None, description="Coupon catalog (YAML or JSON). Default: the built-in catalog streamagent/data/coupons.yaml.")
    model_path: Path | None = Field(None, description="Q-network snapshot to start from, e.g. a warm start written by `streamagent train-offline` (docs/OFFLINE.md). The learner continues from it (its checkpoint, if any, wins); deciders given one keep to it and do not follow model-updates. Default: the newest model on model-updates, else a fresh network from `seed`.")
    hidden_sizes: Annotated[tuple[int, ...], NoDecode] = Field((64, 64), description="Hidden layer widths of the Q-network (ReLU).")
    exploration: Literal["epsilon", "softmax", "greedy", "thompson"] = Field("epsilon", description="Exploration strategy of the behaviour policy: epsilon (a uniformly random allowed action with probability epsilon), softmax, greedy, or thompson (needs Q_HEADS > 1: with probability epsilon a user explores for a whole EXPLORE_PERIOD_DAYS by following one randomly drawn Q-head; deep exploration, Osband et al. 2016).")
    q_heads: int = Field(1, ge=1, le=32, description="Q-heads on the network's shared torso, each trained on its own bootstrap sample of the transitions (bootstrapped DQN). Their spread is the model's uncertainty: see CONFIDENCE_Z and thompson exploration. 1 = one plain Q-network.")
    dueling: bool = Field(True, description="Dueling Q-heads (Wang et al. 2016): the learner trains a state value next to the actions' advantages, so the rarely chosen coupons' Q-values share what every transition teaches about the state and are less noisy. On by default since it narrowed the learning benchmark's spread over seeds under coupon fatigue (every one of ten seeds within a point of never sending a coupon, against three of ten more than a point below with plain heads), at about a point where coupons always pay (docs/BENCHMARKS.md). Published models are plain networks (the dueling form folds exactly): deciders are unaffected. Changing it converts the learner's checkpoint.")
    confidence_z: float = Field(1.0, ge=0, description="With Q_HEADS > 1, a coupon is the greedy action only if its advantage over 'no coupon', averaged over the heads, exceeds this many standard deviations of that advantage across the heads. 0 = the plain argmax of the mean.")
    greedy_margin: float = Field(0.02, ge=0, lt=1, description="A coupon is the greedy action only if its Q-value beats 'no coupon' by more than this fraction of |Q(no coupon)|. Action gaps that matter are a few percent of Q and the argmax over noisy estimates of several coupons favours a coupon; the margin bounds what being cautious can cost (at most this fraction per decision). 0.02 measured best over five seeds (docs/BENCHMARKS.md); 0 = the plain argmax. The gate judges candidates with the same rule.")
    greedy_margin_max: float = Field(0.0, ge=0, description="A cap on GREEDY_MARGIN's hurdle, for shops where coupons pay without conditioning customers: a coupon is held back only while its advantage over 'no coupon' is below the smaller of GREEDY_MARGIN x |Q(no coupon)| and this many times the average reward per decision the model's learner saw (published with each model; a model without it, from older releases, gets no cap). The relative margin alone holds back most from the users worth most: in the simulated shop without fatigue a big-basket user's 2% hurdle is 2.0 profit, and their coupon, worth 1.2 a day (+1.2% of Q), is never sent where the estimate is right. Measured on ten seeds (docs/BENCHMARKS.md), 0.15 lifted the shop where coupons always pay from 96.7% to 97.9% of the optimum, but under coupon fatigue it left three seeds of ten 1.3-1.7 points below 'never' (none with the cap off) and lost 3 points where the optimum times its coupons: off by default. 0 = no cap.")
    explore_period_days: float = Field(7.0, gt=0, description="Thompson exploration: how long (event time) an exploring user follows the head drawn for them.")
    epsilon_start: float = Field(0.2, ge=0, le=1, description="Epsilon at model training step 0.")
    epsilon_end: float = Field(0.02, ge=0, le=1, description="Epsilon after `epsilon_decay_steps` training steps.")
    explore_run_mean: float = Field(1.0, ge=1, description="Mean length, in decisions of the same user, of an exploration run: an epsilon-explored action is repeated for a geometric number of that user's next decisions (temporally extended epsilon-greedy). Long-term effects such as coupon fatigue only show under runs; 1 = classic epsilon-greedy.")
    explore_rest_prob: float = Field(0.0, ge=0, lt=1, description="Rest exploration (epsilon exploration only): where the greedy action is a coupon, 'no coupon' gets this much more probability, and when drawn the user gets no coupon for a rest of about EXPLORE_REST_DECISIONS of their next decisions (geometric). Rests show what leaving a coupon-conditioned user alone is worth, which one-day epsilon detours never do, and keep the never floor's value of rested users right. Logged propensities stay exact (1 inside a rest). 0 = off (the default). Measured (docs/BENCHMARKS.md): 0.03 with EXPLORE_REST_DECISIONS 10, EXPLORE_REST_DECAY_STEPS 24000 and HIDDEN_SIZES 128,128 beat 'never' on fatigue seeds 1-5 (96.6%) but not on seeds 6-10 (95.1%, one seed 3.5 points below) and lost the shop where coupons always pay 2.8 points (95.4%): a lead under measurement.")
    explore_rest_decisions: float = Field(7.0, ge=1, description="Mean length of a rest (EXPLORE_REST_PROB), in decisions of the same user.")
    explore_rest_decay_steps: int = Field(0, ge=0, description="EXPLORE_REST_PROB falls linearly to 0 over this many training steps of the model (as epsilon does over EPSILON_DECAY_STEPS): rests while the model is young. 0 = the rest probability stays.")
    explore_rest_min_pressure: float = Field(0.0, ge=0, description="A rest (EXPLORE_REST_PROB) may start only for a user whose recent coupon pressure (coupons, each decayed with a 2-day half-life: about 2 is three coupons on the last three days) is at least this: rests where a coupon habit can form. 0 = anywhere.")
    epsilon_decay_steps: int = Field(6_000, ge=1, description="Training steps of the model over which epsilon falls linearly (the schedule follows the model, so every worker agrees).")
    softmax_temperature: float = Field(0.5, gt=0, description="Temperature of softmax (Boltzmann) exploration, in Q units.")
    seed: int = Field(7, description="Seed of the initial network and of the per-decision exploration draws.")
    cap_max_coupons: int = Field(2, ge=0, description="At most this many coupons per user per rolling cap window.")
    cap_window_days: float = Field(7.0, gt=0, description="Rolling frequency-cap window, in days of event time.")
    cap_min_gap_hours: float = Field(24.0, ge=0, description="Minimum event-time gap between two coupons to the same user.")
    budget_per_period: float = Field(5000.0, ge=0, description="Coupon budget (currency) per budget period, shared by all partitions.")
    budget_period_hours: float = Field(24.0, gt=0, description="Length of a budget period, in hours of event time (periods are aligned to the epoch, UTC).")
    pacing: bool = Field(True, description="Budget pacing: the policy scores each action by Q - lambda x cost, where lambda >= 0 (the shadow price of the budget) is set per partition by a PI controller on event time so that the period's spend follows a target curve from 0 to the partition's share: the partition's traffic shape (PACING_BINS), or a straight line (docs/DECISIONS.md, pacing). Logged in each decision as shadow_price. Takes effect only with a budget (BUDGET_PER_PERIOD > 0); the hard budget mask stays the last line.")
    pacing_kp: float = Field(2.0, ge=0, description="Pacing: proportional gain, lambda per unit of error (error = spend minus the line's target by now, as a fraction of the partition's share). lambda is in Q units per currency unit of cost; the defaults suit the profit reward.")
    pacing_ki: float = Field(4.0, ge=0, description="Pacing: integral gain, lambda per unit of error sustained over a whole budget period. The integral is clipped to [0, PACING_MAX_PRICE] (anti-windup) and carried into the next period.")
    pacing_max_price: float = Field(2.0, gt=0, description="Pacing: the largest shadow price (lambda), in Q units per currency unit of cost.")
    pacing_bins: int = Field(24, ge=0, le=1440, description="Pacing: the target curve follows the partition's traffic, counted in this many slices of the budget period (24: hours of a day) and averaged over periods; until a first period has ended, and with 0, the target is a straight line over the period (docs/DECISIONS.md, pacing).")
    pacing_memory: float = Field(0.5, gt=0, le=1, description="Pacing: weight of the newest period in the traffic profile's average (1: the last period's shape only).")
    pacing_line_weight: float = Field(0.1, ge=0, le=1, description="Pacing: the straight line's share of the target curve, so that a slice with no traffic before still gets some budget (1: the line only).")
    pacing_first_gain: float = Field(3.0, ge=1, description="Pacing: KP and KI are multiplied by this in a partition's first period (until it has a traffic profile of its own; with PACING_BINS=0 there is no such period and it has no effect). The integral starts at 0 there, and with the normal gains the spend ran 10-11% of the share ahead of the target in the first hours before the price caught up; later periods start from the price carried over. 3 measured best (docs/BENCHMARKS.md, pacing); 1 = the same gains throughout.")
    pacing_prior_profile: Annotated[tuple[float, ...], NoDecode] = Field((), description="Pacing: the traffic profile to assume until a partition has learnt its own (its first period): non-negative weights per slice of the budget period, comma-separated (or a JSON list), e.g. the share of a day's sessions per hour from the shop's analytics. Normalised, and resampled to PACING_BINS slices if there are more or fewer. It is the target's profile until the partition's first period ends, and the start of the average that period's shape is folded into. Empty (the default): the straight line until then. Needs PACING_BINS > 0.")
    dedupe_events_per_user: int = Field(32, ge=0, le=1024, description="Ids of each user's most recent applied events kept in their state: an event whose id is among them is not applied again, whatever its offset (a crash replay, or a duplicate re-sent at a new offset), and its decision is re-sent. A crash replay stays exact for a user with at most this many events since the last commit. 0 = off: only the last applied offset is checked (a recreated topic then looks like a replay), and user state is written in the layout releases before this setting read, for a rolling upgrade from them. See docs/RELIABILITY.md.")
    user_state_ttl_days: float = Field(180.0, ge=0, description="A user's state (decide) and join record (rewards) expire after this much event time without activity: once the partition's event time (its robust clock) is more than this past the user's last event, the user counts as new, and a sweep deletes the entry (a tombstone in the table's changelog). Event time only, so a replay expires the same users. 0 = never. A join record with decisions or orders still pending never expires. See docs/RELIABILITY.md, erasure and expiry.")
    state_sweep_keys: int = Field(64, ge=0, description="Most keys of a partition's user-state and join-state the expiry sweep looks at per batch that touches the partition: two per record the batch brought the partition, up to this (a cursor goes round the partition's keys; a partition gains at most one user per record, so the sweep outpaces it). Bounds what the sweep adds to a batch; 0 = no sweep (expired users are still treated as new, but their entries stay until an erasure or their next event).")
    interest_half_life_days: float = Field(14.0, gt=0, description="Half-life of per-category interest and of decayed frequency/monetary aggregates.")
    max_future_skew_days: float = Field(7.0, gt=0, description="A record (user event, conversion, heartbeat, decision) more than this far ahead of its partition's event time (the median of the partition's recent timestamps of the same input, which no single record can move) is dead-lettered as ts_too_far_ahead. Any gap in a user's own history is legal. See docs/DECISIONS.md, event time.")
    max_past_skew_days: float = Field(30.0, gt=0, description="A user event more than this far behind its partition's event time is dead-lettered as ts_too_far_behind (later ones are applied: state is order-independent). Late conversions and decisions follow the join's lateness rules instead.")
    max_wall_clock_skew_minutes: float = Field(0.0, ge=0, description="For live traffic: a record more than this far ahead of the worker's wall clock is dead-lettered as ts_too_far_ahead. 0 = off (replays and the simulator run ahead of the wall clock).")

    # --- Rewards (the join) --------------------------------------------------------------
    attribution_window_hours: float = Field(72.0, gt=0, description="A conversion within this much event time after a decision can be attributed to it.")
    allowed_lateness_minutes: float = Field(60.0, ge=0, description="How far behind a partition's newest event time a message may arrive and still count. Watermark = newest ts - this.")
    attribution_rule: Literal["latest", "code_only"] = Field("latest", description="Conversions that name no decision/coupon: 'latest' = the user's latest decision whose window contains the order; 'code_only' = not attributed.")
    reward: Literal["profit", "revenue", "conversion"] = Field("profit", description="Reward of a conversion: profit = margin x amount - discount; revenue = amount - discount; conversion = 1.")
    margin: float = Field(0.3, ge=0, le=1, description="Gross margin used by the profit reward.")
    default_reward: float = Field(0.0, description="Reward of a decision whose window closes with no conversion.")
    transition_horizon_days: float = Field(14.0, gt=0, description="After this much event time without a next decision, a transition is emitted as terminal.")

    # --- Learning ----------------------------------------------------------------------
    gamma: float = Field(0.95, ge=0, le=1, description="Discount per `gamma_unit_hours` of event time between a user's decisions (0 = myopic bandit).")
    gamma_unit_hours: float = Field(24.0, gt=0, description="Event time over which gamma applies once.")
    learning_rate: float = Field(1e-4, gt=0, description="Adam learning rate. The action gaps that matter (a coupon's long-run cost) are a few percent of Q; at 1e-3 the per-batch jitter of Q is larger than that (docs/BENCHMARKS.md).")
    batch_size: int = Field(64, ge=1, description="Transitions per gradient step.")
    replay_size: int = Field(100_000, ge=1, description="Replay buffer capacity (transitions).")
    learning_starts: int = Field(500, ge=1, description="Transitions in the buffer before learning starts.")
    train_every: int = Field(1, ge=1, description="A gradient step every this many transitions. 1 (a step per transition) measured best with reward centering (docs/BENCHMARKS.md); the learner then needs about one gradient step (~1 ms on one core) per decision.")
    target_update: Literal["soft", "hard"] = Field("soft", description="Target network sync: soft (Polyak, tau) or hard (copy every target_every steps).")
    tau: float = Field(0.01, gt=0, le=1, description="Soft target update rate.")
    target_every: int = Field(500, ge=1, description="Hard target update period, in gradient steps.")
    double_dqn: bool = Field(True, description="Double-DQN targets (online net picks, target net values).")
    prioritized_replay: bool = Field(False, description="Proportional prioritised replay (alpha 0.6, beta 0.4) instead of uniform.")
    huber_delta: float = Field(20.0, gt=0, description="Huber loss threshold, in reward units: TD errors above it have their gradient clipped, which pulls Q from the mean reward toward the median (0 for sparse orders). Orders worth more than it are undervalued: users who buy rarely but big look worth less, and coupons that make small orders likelier look better. A threshold above the largest order (e.g. 1000) learns the mean; docs/BENCHMARKS.md measures both.")
    grad_clip: float = Field(10.0, gt=0, description="Gradient norm clip.")
    advantage_alpha: float = Field(0.0, ge=0, lt=1, description="Advantage learning (Bellemare et al. 2016): widens the gap between the best action and the others so small errors in Q flip greedy choices less often. 0 = plain Q-learning.")
    reward_centering: bool = Field(True, description="Reward centering (Naik et al. 2024): the learner's network learns Q minus a constant, the replay's average reward rate over 1 - gamma, and learns only the differences between states and actions; published models add the constant back, so deciders and GREEDY_MARGIN see the same Q scale. Exact with the per-event-time discounts (every Q moves by the same constant).")
    never_floor: bool = Field(True, description="The value of never sending a coupon again as a floor under the learner's Q: a second small network learns it from the 'no coupon' transitions (plain policy evaluation), every target bootstraps from at least it, and Q(s, no coupon) of every replayed state is held at least at it (less NEVER_FLOOR_SLACK). 'No coupon' is always allowed, so the best value is never below it; the floor carries the worth of a long rest into Q at once, which frees users a couponing policy keeps fatigued (fatigue 95.4 -> 96.1%, no-fatigue 97.5 -> 98.2% over five seeds: docs/BENCHMARKS.md). Changing it keeps the learner's checkpoint (the floor's network starts afresh).")
    never_floor_slack: float = Field(0.01, ge=0, lt=1, description="With NEVER_FLOOR: Q(s, no coupon) is held at least at the never-value less this fraction of it. Without slack a noisy never-value above Q biases the learner against coupons (no-fatigue 96.3% against 98.2% with 0.01: docs/BENCHMARKS.md).")
    n_step: int = Field(1, ge=1, le=32, description="n-step returns: a transition's target sums the rewards of the user's next n decisions before bootstrapping (each user's last n-1 transitions wait in the learner, checkpointed). 1 = one-step Q-learning, the default: with reward centering it measured best over seeds (docs/BENCHMARKS.md); returns over n > 1 decisions are not corrected for exploration and partly value the behaviour policy.")
    n_step_max_users: int = Field(200_000, ge=1, description="Users whose last n-1 transitions may wait in the learner for their n-step return; beyond this, the longest-idle user's are stored with the shorter return they have (bounds the learner's memory).")
    publish_average: bool = Field(False, description="Publish the target network (a slow Polyak average of the online weights) instead of the online weights.")
    gate: bool = Field(False, description="Promotion gate: a new model version reaches the deciders only if, on recent held-out decisions, its doubly robust value per decision is no worse than the live model's (GATE_RULE, GATE_MARGIN). Off by default: it judges attributed profit per decision, so it rejects the versions that give up a coupon-driven order today for full-price orders later, and in the learning benchmark it froze the deciders on an early model (docs/BENCHMARKS.md). Turn it on where per-decision regressions matter more than long-run learning. Off: every version is promoted; operators promote or roll back by hand (`streamagent model`) and `streamagent evaluate` estimates any model offline.")
    gate_rule: Literal["lower_bound", "not_worse"] = Field("lower_bound", description="lower_bound: promote only if the 95% lower bound of (candidate - live) clears -GATE_MARGIN x |live value| (shown no worse; needs plenty of exploration data). not_worse: promote unless the upper bound is below it (rejects only versions shown worse). See docs/LEARNING.md, the gate.")
    gate_margin: float = Field(0.02, ge=0, description="How much worse (a fraction of the live model's value per decision) a candidate's lower bound may be and still be promoted.")
    gate_holdout: float = Field(0.1, ge=0, lt=1, description="Fraction of decisions (by a hash of the decision id) the learner does not train on, kept for the gate.")
    gate_window: int = Field(20_000, ge=100, description="The gate judges on this many most recent held-out decisions.")
    gate_min_samples: int = Field(1_000, ge=1, description="Held-out decisions needed to judge; with fewer, a candidate is promoted 'unverified' (cold start).")
    snapshot_every_updates: int = Field(200, ge=1, description="Publish a new model version after this many gradient steps...")
    snapshot_interval_s: float = Field(30.0, gt=0, description="...or after this many seconds with at least one step since the last version.")
    learner_checkpoint: Path | None = Field(None, description="Learner checkpoint file (model, optimiser, replay, input offsets). Default: data_dir/learner/checkpoint.pt.")

    # --- Runtime -----------------------------------------------------------------------
    consumer_fetch_max_wait_ms: int = Field(20, ge=1, le=1500, description="Longest the broker holds a fetch open when no data is there. Lower = lower latency at low load, more idle fetch requests (Faust's hard-coded 1500 ms made p50 latency over 1 s).")
    consumer_max_poll_records: int = Field(5000, ge=1, description="Most records the worker's consumer hands over per poll (Faust's broker_max_poll_records). Faust's default (no limit but small fetches) kept the agents' batches small; measured with the counting agent of `bench pipeline`: 3,700 -> 4,900 events/s.")
    stream_buffer_maxsize: int = Field(32768, ge=1024, description="Records Faust buffers per stream ahead of the agent before it pauses fetching (Faust's default 4096). Larger keeps the agent fed between fetches (with CONSUMER_MAX_POLL_RECORDS: 3,700 -> 5,900 events/s on the counting agent); records in the buffer are not committed, so a crash replays them.")
    producer_linger_ms: int = Field(5, ge=0, description="How long the worker's producer (librdkafka's linger.ms) waits to batch sends. Higher = fewer, bigger requests (throughput), lower = less latency.")
    decide_batch_max: int = Field(500, ge=1, description="Most user events the decide agent takes in one batch (one Q-network pass, one state write per user per batch).")
    join_batch_max: int = Field(100, ge=1, description="Most decision-log and conversion records the join agent takes in one batch. The join shares the worker's event loop with the decide agent: a batch of N records holds the decide agent up for about N x 150 µs.")
    join_batch_wait_ms: float = Field(50.0, gt=0, description="Longest the join agent waits for a batch to fill. Rewards are not urgent; fewer, bigger join batches leave the worker's event loop to the decide agent.")
    stream_take: Literal["lean", "faust"] = Field("lean", description="How the decide worker consumes its events through Faust. lean: the agents take their batches straight from their queues, with Faust's per-event rules (stale events skipped, offsets acknowledged after the batch) and without its per-event stream machinery (faust_internals.take_batches), and Faust's fetch loop hands each fetched batch to them under one race against a rebalance instead of one per record (install_batched_delivery). faust: Faust's own Stream.take_events and fetch loop (docs/BENCHMARKS.md).")
    decide_batch_wait_ms: float = Field(5.0, gt=0, description="Longest the decide agent waits for a batch to fill: at low load every event waits at most this long before it is decided.")
    revoke_timeout_s: float = Field(120.0, gt=0, description="Longest a decide worker may take to give up its partitions in a rebalance (finish the batch in progress, flush the producer, commit). Past it the worker logs where it waits and exits with status 1, for its supervisor to restart it from the last commit: a worker stuck there holds its partitions without deciding, and the group does not notice.")
    exit_deadline_s: float = Field(60.0, gt=0, description="Once a decide worker crashes (a record not delivered, a stuck rebalance), the longest its shutdown may take before the process exits with status 1 anyway: a shutdown that hangs would otherwise keep a dead worker in its consumer group.")
    commit_interval_s: float = Field(2.8, gt=0, description="How often consumed offsets are committed (once the worker's producer has delivered every output and changelog record sent before). A crash replays at most this much, and replays are deduplicated.")
    table_store: str = Field("rocksdb://", description="Faust table store: rocksdb:// (durable, default) or memory:// (tests).")
    gc_freeze: bool = Field(True, description="Freeze the start-up objects of the decide worker (once built and after each partition assignment) and of the learner out of Python's cyclic garbage collector (gc.freeze): each full collection otherwise walked them all, and in a decide worker under load stopped the event loop for ~150 ms every 1-2 s (docs/BENCHMARKS.md). false = Python's default.")
    state_cache_users: int = Field(10_000, ge=0, description="Decoded user states the decide worker keeps in memory (the most recently used users; about 5.5 KB each): a user's next event in a session then skips the store lookup and the JSON decode. Writes still go to the table and its changelog every batch; the cache is emptied whenever partitions move. 0 = read every state from the table.")
    loop_stall_ms: float = Field(250.0, ge=0, description="A decide worker whose event loop runs nothing else for this long logs where it is stuck (the loop thread's stack, taken during the stall; at most one every 10 s) and counts it in streamagent_stream_loop_stalls_total. The loop's lag is always measured (streamagent_stream_loop_lag_seconds). 0 = no stall watch and no lag measurement.")
    rocksdb_write_buffer_mb: float = Field(2.0, gt=0, description="RocksDB memtable size of each table's database per partition (a worker holding 4 partitions has 12 databases). Up to ROCKSDB_WRITE_BUFFERS of them per database fill before a flush, so the worker's memory grows by up to databases x buffers x this while it works, then levels off. 2 MB kept a 1,000,000-event drain's RSS within 8.3% at the same speed; 16 MB grew it by 39% (docs/BENCHMARKS.md).")
    rocksdb_write_buffers: int = Field(2, ge=2, description="Most RocksDB memtables per database (the one being written and one waiting for its flush).")
    rocksdb_block_cache_mb: float = Field(4.0, gt=0, description="RocksDB block cache of each table's database per partition (Faust's default is 2 GiB each). Reads it misses go to the files through the operating system's page cache, which is not the worker's memory; raise it for large tables on slow disks.")
    standby_replicas: int = Field(1, ge=0, description="Standby copies of each table partition (Faust's table_standby_replicas): a worker also reads the changelogs of partitions another worker decides, so that it takes them over warm when that worker dies, instead of restoring them from the start of the changelog. Costs that changelog read traffic and the disk of the copies; has no effect with a single worker. 1 (Faust's default) suits 2+ workers; 0 saves the traffic when recovery time does not matter.")
    metrics_port: int = Field(9400, ge=0, description="Port of the worker's HTTP endpoints: Prometheus /metrics, /healthz and /readyz; 0 disables them.")
    learner_metrics_port: int = Field(9401, ge=0, description="Port of the learner's /metrics, /healthz and /readyz endpoints; 0 disables them.")
    metrics_host: str = Field("127.0.0.1", description="Address the /metrics, /healthz and /readyz endpoints bind (worker and learner). 0.0.0.0 in a container, so that Prometheus and the kubelet reach them.")
    learner_lock_timeout_s: float = Field(10.0, ge=6, le=300, description="One learner is active at a time: the one holding the learner lock (a consumer group on model-updates; stream/leader.py). A standby learner takes over this long after the active one was killed (at once after a clean stop). Shorter than the learner's longest pause and it may lose the lock while working; it then stops, fenced, without publishing (6 s is the broker's minimum session timeout).")
    learner_max_poll_gap_s: float = Field(60.0, gt=0, description="The learner's /readyz fails (check `consumer`) when its loop has not polled transitions for this long: stuck, or a publish (gate, checkpoint, send) taking longer.")
    worker_web_port: int = Field(6066, description="Port of Faust's own web server (used only if worker_web_enabled).")
    worker_web_enabled: bool = Field(False, description="Run Faust's built-in web server.")
    log_level: str = Field("info", description="Worker log level.")

    @field_validator("trigger_types", "hidden_sizes", mode="before")
    @classmethod
    def _split_csv(cls, v):
        if isinstance(v, str):
            if v.strip().startswith("["):
                return tuple(json.loads(v))
            return tuple(x.strip() for x in v.split(",") if x.strip())
        return v

    @field_validator("pacing_prior_profile", mode="before")
    @classmethod
    def _weights(cls, v):
        if isinstance(v, str):
            text = v.strip()
            if text.startswith("["):
                v = json.loads(text)
            else:
                try:
                    v = [float(x) for x in text.split(",") if x.strip()]
                except ValueError:
                    raise ValueError(f"expected comma-separated numbers, not {v!r}") from None
        if isinstance(v, (list, tuple)) and v:
            w = [float(x) for x in v]
            if any(not math.isfinite(x) or x < 0 for x in w) or not sum(w) > 0:
                raise ValueError("weights must be finite and non-negative, and not all 0")
            return tuple(w)
        return v

    @model_validator(mode="after")
    def _prior_needs_bins(self):
        if self.pacing_prior_profile and not self.pacing_bins:
            raise ValueError("PACING_PRIOR_PROFILE needs PACING_BINS > 0 (0: the straight line "
                             "always)")
        return self

    @field_validator("kafka_sasl_mechanism", "kafka_sasl_username", "kafka_sasl_password",
                     "kafka_sasl_password_file", "kafka_ssl_ca_location",
                     "kafka_ssl_certificate_location", "kafka_ssl_key_location",
                     "kafka_ssl_key_password", "pseudonym_key", "pseudonym_key_file",
                     mode="before")
    @classmethod
    def _empty_is_unset(cls, v):
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("kafka_config", mode="before")
    @classmethod
    def _kafka_config(cls, v):
        if isinstance(v, str):
            if v.strip().startswith("{"):
                return {str(k): str(x) for k, x in json.loads(v).items()}
            pairs = [x.strip() for x in v.split(",") if x.strip()]
            bad = [x for x in pairs if "=" not in x]
            if bad:
                raise ValueError(f"expected key=value,key=value or a JSON object, not {bad[0]!r}")
            return {k.strip(): x.strip() for k, x in (p.split("=", 1) for p in pairs)}
        return v

    @cached_property
    def cap_window_ms(self) -> int:
        return int(self.cap_window_days * DAY_MS)

    @cached_property
    def cap_min_gap_ms(self) -> int:
        return int(self.cap_min_gap_hours * HOUR_MS)

    @cached_property
    def budget_period_ms(self) -> int:
        return int(self.budget_period_hours * HOUR_MS)


    def dlq(self, topic: str) -> str:
        return topic + self.dlq_suffix

    @property
    def broker_dir(self) -> Path:
        return self.data_dir / "kafka"

    @property
    def checkpoint_path(self) -> Path:
        return self.learner_checkpoint or self.data_dir / "learner" / "checkpoint.pt"

    @property
    def tables_dir(self) -> Path:
        return self.data_dir / "tables"


def settings_markdown() -> str:
    """The settings reference, as a markdown table (docs/CONFIGURATION.md is made from it)."""
    rows = ["# Configuration", "",
            "Generated by `make docs` (`streamagent config --markdown`) from streamagent/config.py;",
            "a test fails when this file and the code disagree.", "",
            "Every setting is an environment variable (a `.env` file in the working directory, or",
            "the file named by `STREAMAGENT_ENV_FILE`, is read too; real variables win). Lists",
            "take JSON (`[\"a\",\"b\"]`) or commas (`a,b`). `streamagent config` prints the values",
            "in force.", "",
            "| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.default
        if isinstance(default, tuple):
            default = ",".join(map(str, default))
        # a bare | (as in |Q(no coupon)|) would end the table's cell
        text = (field.description or "").replace("|", "\\|")
        rows.append(f"| `STREAMAGENT_{name.upper()}` | `{default}` | {text} |")
    return "\n".join(rows) + "\n"
