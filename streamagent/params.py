"""Every parameter object of the core, built from the one Settings object.

The core's parameter dataclasses carry no defaults of their own: the shipped defaults live in
streamagent/config.py only, so what is tested, benchmarked and deployed is the same thing.
Tests start from ``Settings()`` (or ``shipped()``) and override only what they are about.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from streamagent.config import Settings
from streamagent.core.constraints import CapParams
from streamagent.core.engine import EngineParams
from streamagent.core.eventtime import TimeBounds
from streamagent.core.gate import GateParams
from streamagent.core.join import JoinParams
from streamagent.core.learner import LearnerParams
from streamagent.core.pacing import PacingParams, prior_profile
from streamagent.core.state import StateParams
from streamagent.units import DAY_MS, HOUR_MS, MINUTE_MS

if TYPE_CHECKING:
    from streamagent.core.catalog import Catalog
    from streamagent.core.engine import Model
    from streamagent.core.qnet import ModelSnapshot
    from streamagent.metrics import Metrics


def shipped(**overrides) -> Settings:
    """The shipped defaults, ignoring the environment and any .env file, with overrides."""
    return Settings(_env_file=None, **overrides)


def state_params(s: Settings) -> StateParams:
    return StateParams(half_life_ms=int(s.interest_half_life_days * DAY_MS),
                       cap_window_ms=s.cap_window_ms, dedupe_events=s.dedupe_events_per_user,
                       ttl_ms=int(s.user_state_ttl_days * DAY_MS))


def cap_params(s: Settings) -> CapParams:
    return CapParams(max_coupons=s.cap_max_coupons, window_ms=s.cap_window_ms,
                     min_gap_ms=s.cap_min_gap_ms)


def time_bounds(s: Settings, past: bool) -> TimeBounds:
    """Event-time bounds; ``past``: whether too-late records are dead-lettered (user events) or
    left to the join's lateness rules (conversions, decisions)."""
    wall = s.max_wall_clock_skew_minutes
    return TimeBounds(future_ms=int(s.max_future_skew_days * DAY_MS),
                      past_ms=int(s.max_past_skew_days * DAY_MS) if past else None,
                      wall_future_ms=int(wall * MINUTE_MS) if wall > 0 else None)


def engine_params(s: Settings, n_partitions: int) -> EngineParams:
    return EngineParams(app_id=s.app_id, trigger_types=tuple(s.trigger_types),
                        exploration=s.exploration, epsilon_start=s.epsilon_start,
                        epsilon_end=s.epsilon_end, epsilon_decay_steps=s.epsilon_decay_steps,
                        temperature=s.softmax_temperature, explore_run_mean=s.explore_run_mean,
                        explore_rest_prob=s.explore_rest_prob,
                        explore_rest_mean=s.explore_rest_decisions,
                        explore_rest_decay_steps=s.explore_rest_decay_steps,
                        explore_rest_min_pressure=s.explore_rest_min_pressure,
                        seed=s.seed, caps=cap_params(s), state=state_params(s),
                        budget_per_period=s.budget_per_period,
                        budget_period_ms=s.budget_period_ms, n_partitions=n_partitions,
                        confidence_z=s.confidence_z, greedy_margin=s.greedy_margin,
                        greedy_margin_max=s.greedy_margin_max,
                        explore_period_ms=int(s.explore_period_days * DAY_MS),
                        time_bounds=time_bounds(s, past=True), pacing=pacing_params(s))


def pacing_params(s: Settings) -> PacingParams | None:
    """Pacing is on with a budget (a positive, finite BUDGET_PER_PERIOD) unless PACING is off."""
    if not s.pacing or not 0 < s.budget_per_period < float("inf"):
        return None
    return PacingParams(kp=s.pacing_kp, ki=s.pacing_ki, max_price=s.pacing_max_price,
                        bins=s.pacing_bins, memory=s.pacing_memory,
                        line_weight=s.pacing_line_weight, first_gain=s.pacing_first_gain,
                        prior=prior_profile(s.pacing_prior_profile, s.pacing_bins))


def join_params(s: Settings) -> JoinParams:
    return JoinParams(window_ms=int(s.attribution_window_hours * HOUR_MS),
                      lateness_ms=int(s.allowed_lateness_minutes * MINUTE_MS),
                      horizon_ms=int(s.transition_horizon_days * DAY_MS),
                      reward=s.reward, margin=s.margin, default_reward=s.default_reward,
                      attribution=s.attribution_rule, time_bounds=time_bounds(s, past=False),
                      ttl_ms=int(s.user_state_ttl_days * DAY_MS))


def join_group_id(app_id: str) -> str:
    """The consumer group of the join workers (WORKER_ROLE=join) of app ``app_id``."""
    return f"{app_id}-join"


def learner_params(s: Settings) -> LearnerParams:
    return LearnerParams(gamma=s.gamma, gamma_unit_ms=int(s.gamma_unit_hours * HOUR_MS),
                         lr=s.learning_rate, batch_size=s.batch_size, buffer_size=s.replay_size,
                         learning_starts=s.learning_starts, train_every=s.train_every,
                         target_update=s.target_update, tau=s.tau, target_every=s.target_every,
                         double_dqn=s.double_dqn, advantage_alpha=s.advantage_alpha,
                         huber_delta=s.huber_delta, grad_clip=s.grad_clip,
                         publish_average=s.publish_average, n_step=s.n_step,
                         n_step_max_users=s.n_step_max_users, prioritized=s.prioritized_replay,
                         seed=s.seed, heads=s.q_heads, dueling=s.dueling,
                         center_rewards=s.reward_centering,
                         never_floor=s.never_floor,
                         never_floor_slack=s.never_floor_slack)


def gate_params_from(s: Settings) -> GateParams:
    return GateParams(margin=s.gate_margin, min_samples=s.gate_min_samples, rule=s.gate_rule,
                      greedy_margin=s.greedy_margin, greedy_margin_max=s.greedy_margin_max)


def load_model(settings: Settings, catalog: "Catalog",
               snapshot: "ModelSnapshot | None" = None) -> "Model":
    """The model a decider starts with: a file if configured, else the newest published
    snapshot (passed in by the worker), else a fresh network from the seed (version 0)."""
    from streamagent.core.engine import Model, initial_model
    from streamagent.core.qnet import ModelSnapshot

    if settings.model_path:
        return Model(ModelSnapshot.load(settings.model_path))
    if snapshot is not None:
        return Model(snapshot)
    return initial_model(catalog, tuple(settings.hidden_sizes), settings.seed, settings.q_heads)


def worker_metrics(s: Settings, catalog: "Catalog") -> "Metrics":
    """The worker's metrics, with the label values of its topics and actions pre-set."""
    from streamagent.metrics import Metrics

    return Metrics(topics=(s.topic_user_events, s.topic_conversions, s.topic_decision_log),
                   actions=catalog.actions)
