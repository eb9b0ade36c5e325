"""All settings, in one place, read from STREAMAGENT_* environment variables.

Every field below is documented in docs/CONFIGURATION.md (generated from these descriptions
by ``streamagent config --markdown``). A ``.env`` file in the working directory, or the file
named by STREAMAGENT_ENV_FILE, is read too; real environment variables win.
"""
from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
import json

from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DAY_MS = 86_400_000
HOUR_MS = 3_600_000


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
    partitions: int = Field(4, ge=1, description="Partitions for topics that `streamagent topics create` makes.")
    topic_user_events: str = Field("user-events", description="Inbound user behaviour events (key: user_id).")
    topic_conversions: str = Field("conversions", description="Inbound orders (key: user_id).")
    topic_coupon_actions: str = Field("coupon-actions", description="Outbound coupons to deliver (key: user_id).")
    topic_decision_log: str = Field("decision-log", description="Every decision, 'no coupon' included (key: user_id).")
    dlq_suffix: str = Field(".dlq", description="Dead-letter topic name = source topic + this suffix.")

    # --- Decisions ---------------------------------------------------------------------
    trigger_types: Annotated[tuple[str, ...], NoDecode] = Field(("session_start", "add_to_cart"), description="Event types that trigger a decision (JSON list or comma-separated).")
    catalog_path: Path | None = Field(None, description="Coupon catalog (YAML or JSON). Default: the built-in catalog streamagent/data/coupons.yaml.")
    model_path: Path | None = Field(None, description="Q-network weights to load at start (a file written by `streamagent model init` or the learner). Default: a fresh network from `seed`.")
    hidden_sizes: Annotated[tuple[int, ...], NoDecode] = Field((64, 64), description="Hidden layer widths of the Q-network (ReLU).")
    exploration: Literal["epsilon", "softmax", "greedy"] = Field("epsilon", description="Exploration strategy of the behaviour policy.")
    epsilon_start: float = Field(0.2, ge=0, le=1, description="Epsilon at model training step 0.")
    epsilon_end: float = Field(0.05, ge=0, le=1, description="Epsilon after `epsilon_decay_steps` training steps.")
    epsilon_decay_steps: int = Field(50_000, ge=1, description="Training steps of the model over which epsilon falls linearly (the schedule follows the model, so every worker agrees).")
    softmax_temperature: float = Field(0.5, gt=0, description="Temperature of softmax (Boltzmann) exploration, in Q units.")
    seed: int = Field(7, description="Seed of the initial network and of the per-decision exploration draws.")
    cap_max_coupons: int = Field(2, ge=0, description="At most this many coupons per user per rolling cap window.")
    cap_window_days: float = Field(7.0, gt=0, description="Rolling frequency-cap window, in days of event time.")
    cap_min_gap_hours: float = Field(24.0, ge=0, description="Minimum event-time gap between two coupons to the same user.")
    budget_per_period: float = Field(5000.0, ge=0, description="Coupon budget (currency) per budget period, shared by all partitions.")
    budget_period_hours: float = Field(24.0, gt=0, description="Length of a budget period, in hours of event time (periods are aligned to the epoch, UTC).")
    interest_half_life_days: float = Field(14.0, gt=0, description="Half-life of per-category interest and of decayed frequency/monetary aggregates.")
    max_future_skew_days: float = Field(30.0, gt=0, description="An event this far ahead of the user's latest event time is rejected to the DLQ as absurd.")

    # --- Runtime -----------------------------------------------------------------------
    consumer_fetch_max_wait_ms: int = Field(20, ge=1, le=1500, description="Longest the broker holds a fetch open when no data is there. Lower = lower latency at low load, more idle fetch requests (Faust's hard-coded 1500 ms made p50 latency over 1 s).")
    producer_linger_ms: int = Field(5, ge=0, description="How long the worker's producer waits to batch sends. Higher = fewer, bigger requests (throughput), lower = less latency.")
    commit_interval_s: float = Field(2.8, gt=0, description="How often consumed offsets are committed (Faust flushes the producer first). A crash replays at most this much, and replays are deduplicated.")
    table_store: str = Field("rocksdb://", description="Faust table store: rocksdb:// (durable, default) or memory:// (tests).")
    metrics_port: int = Field(9400, ge=0, description="Port of the worker's Prometheus /metrics endpoint; 0 disables it.")
    metrics_host: str = Field("127.0.0.1", description="Address the /metrics endpoint binds.")
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

    @cached_property
    def cap_window_ms(self) -> int:
        return int(self.cap_window_days * DAY_MS)

    @cached_property
    def cap_min_gap_ms(self) -> int:
        return int(self.cap_min_gap_hours * HOUR_MS)

    @cached_property
    def budget_period_ms(self) -> int:
        return int(self.budget_period_hours * HOUR_MS)

    @cached_property
    def max_future_skew_ms(self) -> int:
        return int(self.max_future_skew_days * DAY_MS)

    def dlq(self, topic: str) -> str:
        return topic + self.dlq_suffix

    @property
    def broker_dir(self) -> Path:
        return self.data_dir / "kafka"

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
        rows.append(f"| `STREAMAGENT_{name.upper()}` | `{default}` | {field.description} |")
    return "\n".join(rows) + "\n"
