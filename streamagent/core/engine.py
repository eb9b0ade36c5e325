"""The decision step, free of Kafka and Faust: one event in, new state and outputs out.

The Faust agent is wiring around :meth:`DecisionEngine.step`: it reads the user's state and
the partition's budget from tables, calls step, writes both back and sends the outputs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from streamagent.core import features as F
from streamagent.core.catalog import Catalog
from streamagent.core.constraints import (CapParams, action_mask, budget_remaining, budget_spend,
                                          period_of)
from streamagent.core.contracts import (BudgetShare, CouponAction, CouponOffer, Decision,
                                        UserEvent, decode_user_event, encode)
from streamagent.core.eventtime import OutOfBounds, StreamClock, TimeBounds, admit
from streamagent.core.pacing import PacingParams, pace
from streamagent.core.policy import (action_probs, confident_greedy, decision_id, epsilon_at,
                                     head_choices, margin_cap, sample, thompson_pool,
                                     uniform_from)
from streamagent.core.qnet import ModelSnapshot, NumpyQ, init_network
from streamagent.core.state import (EncodedDoc, StateParams, UserState, apply, evolve, expired,
                                    find_decision, is_replay, record_decision, remember)
from streamagent.errors import ConfigError
from streamagent.units import DAY_MS


@dataclass(frozen=True)
class EngineParams:
    """Built from Settings by streamagent.params.engine_params (no defaults of its own)."""

    app_id: str
    trigger_types: tuple[str, ...]
    exploration: str
    epsilon_start: float
    epsilon_end: float
    epsilon_decay_steps: int
    temperature: float
    # Temporally extended epsilon-greedy (Dabney et al. 2021): an exploratory action is kept
    # for a run of the user's next decisions, of geometric length with this mean. Coupon
    # fatigue builds and fades over days; one-day detours never show the learner what a week
    # without coupons (or with many) does. 1 = classic epsilon-greedy.
    explore_run_mean: float
    seed: int
    caps: CapParams
    state: StateParams
    budget_per_period: float
    budget_period_ms: int
    n_partitions: int
    # Q-heads (bootstrapped ensemble): a coupon is greedy only if its advantage over "no
    # coupon" minus confidence_z standard deviations over the heads is positive
    confidence_z: float
    # thompson exploration: an exploring user follows one head for this much event time
    explore_period_ms: int
    time_bounds: TimeBounds  # what a user event's ts may be, against its partition's clock
    # a coupon is greedy only if its Q beats "no coupon" by this fraction of |Q(none)|
    greedy_margin: float = 0.0
    greedy_margin_max: float = 0.0  # the margin's cap, times the model's reward per decision
    # budget pacing (core/pacing.py): a shadow price on coupon cost; None = off
    pacing: PacingParams | None = None
    # Rest exploration: where the greedy action is a coupon, "no coupon" gets this much more
    # probability, and when drawn it starts a rest of the user's next decisions (geometric,
    # with explore_rest_mean as mean). A user conditioned by daily coupons only shows what
    # resting is worth after several coupon-free days in a row, which one-day epsilon
    # detours almost never make; they are what the never floor's value of a rested user is
    # learnt from. 0 = off.
    explore_rest_prob: float = 0.0
    explore_rest_mean: float = 7.0
    # the rest probability falls linearly to 0 over this many training steps of the model
    # (as epsilon does): rests while the model is young, none once it knows; 0 = it stays
    explore_rest_decay_steps: int = 0
    # a rest may start only for a user whose recent coupon pressure (features.coupon_pressure)
    # is at least this: rests spent where a coupon habit can form, not on users a coupon
    # reaches now and then; 0 = anywhere
    explore_rest_min_pressure: float = 0.0

    @property
    def budget_share(self) -> float:
        # The budget is split evenly over the input partitions: each partition's share is
        # state of that partition, so it moves with it on rebalance and needs no locking
        # between workers. The price: a busy partition cannot borrow an idle one's share.
        return self.budget_per_period / self.n_partitions


@dataclass
class StepResult:
    state: UserState
    budget: BudgetShare
    clock: StreamClock  # the partition's event-time clock, having seen this event
    event: UserEvent
    decision: Decision | None = None
    coupon_action: CouponAction | None = None
    replayed: bool = False  # the event had been applied before (crash replay, duplicate)
    expired: bool = False  # the user's stored state had expired (StateParams.ttl_ms): dropped
    # the decision's decision-log record, as sent (None for a replayed decision: re-encoded)
    decision_raw: bytes | None = None


class _Seen:
    """What :func:`state.is_replay` and the expiry check read of a user's state, as the first
    pass of :meth:`DecisionEngine.step_batch` follows it past the user's first trigger
    (cheaper than a whole new UserState per event)."""

    __slots__ = ("last_partition", "last_offset", "event_ids", "last_ts")

    def __init__(self, state: UserState):
        self.last_partition, self.last_offset = state.last_partition, state.last_offset
        self.event_ids, self.last_ts = state.event_ids, state.last_ts

    def follow(self, ev: UserEvent, partition: int, offset: int, lapsed: bool,
               p: StateParams) -> None:
        """As :func:`state.apply` moves them (on a new state if ``lapsed``)."""
        if lapsed:
            self.last_partition, self.last_offset, self.event_ids, self.last_ts = -1, -1, (), 0
        self.last_ts = max(self.last_ts, ev.ts)
        if partition >= 0:
            self.last_partition, self.last_offset = partition, offset
            self.event_ids = remember(self.event_ids, ev.event_id, p)


@dataclass
class Model:
    snapshot: ModelSnapshot
    q: NumpyQ = field(init=False)

    def __post_init__(self):
        self.q = NumpyQ(self.snapshot)

    @property
    def version(self) -> int:
        return self.snapshot.version


def initial_model(catalog: Catalog, hidden: tuple[int, ...], seed: int, heads: int = 1) -> Model:
    import time

    net = init_network(F.N_FEATURES, catalog.n_actions, hidden, seed, heads)
    snap = ModelSnapshot.from_network(net, 0, 0, catalog.actions, F.FEATURE_NAMES)
    snap.created_at = time.time()
    return Model(snap)


def check_compatible(snapshot: ModelSnapshot, catalog: Catalog) -> None:
    if tuple(snapshot.actions) != catalog.actions:
        raise ConfigError(f"model v{snapshot.version} was trained for actions {snapshot.actions} "
                          f"but the catalog has {catalog.actions}; use a matching "
                          f"STREAMAGENT_CATALOG_PATH or start from a fresh model")
    if tuple(snapshot.feature_names) != F.FEATURE_NAMES:
        raise ConfigError(f"model v{snapshot.version} expects other features than this build; "
                          f"start from a fresh model")


class DecisionEngine:
    def __init__(self, catalog: Catalog, params: EngineParams, model: Model):
        self._check_heads(model.snapshot, params)
        check_compatible(model.snapshot, catalog)
        self.catalog, self.p, self.model = catalog, params, model
        self._cap = margin_cap(model.snapshot.meta, params.greedy_margin_max)
        self._costs = catalog.costs()
        self._cost_arr = np.asarray(self._costs, dtype=float)
        self._triggers = frozenset(params.trigger_types)

    @staticmethod
    def _check_heads(snapshot: ModelSnapshot, p: EngineParams) -> None:
        if p.exploration == "thompson" and snapshot.heads < 2:
            raise ConfigError(f"thompson exploration needs a model with several Q-heads; model "
                              f"v{snapshot.version} has {snapshot.heads}: set STREAMAGENT_Q_HEADS "
                              f"> 1 (and start from a fresh model) or another exploration")

    def epsilon(self) -> float:
        p = self.p
        if p.exploration not in ("epsilon", "thompson"):
            return 0.0
        return epsilon_at(self.model.snapshot.train_steps, p.epsilon_start, p.epsilon_end,
                          p.epsilon_decay_steps)

    def swap_model(self, model: Model) -> None:
        """Use new weights from the next decision on (one reference assignment: atomic)."""
        self._check_heads(model.snapshot, self.p)
        check_compatible(model.snapshot, self.catalog)
        self._cap = margin_cap(model.snapshot.meta, self.p.greedy_margin_max)
        self.model = model

    def step(self, raw: bytes | None, key: bytes | None, state: UserState | None,
             budget: BudgetShare, partition: int = -1, offset: int = -1,
             policy=None, clock: StreamClock | None = None,
             now_ms: int | None = None) -> StepResult:
        """Validate, fold into state, and decide if the event is a trigger.

        ``clock`` is the partition's event-time clock (core/eventtime.py; the caller keeps the
        one the result carries, or the one an OutOfBounds error carries): the event's ts must
        lie within the bounds around it, and the budget period follows it. ``now_ms`` is the
        wall clock, for the optional wall-clock bound.
        ``policy(features, allowed) -> (action, propensity)`` replaces the Q-network's choice
        (the benchmark's baselines use it, so that state, caps and logs see their actions).
        Raises InvalidMessage for input that belongs on the dead-letter topic.
        """
        ev, state, clock, done, lapsed = self._admit(raw, key, state, budget, partition,
                                                     offset, clock or StreamClock(), now_ms)
        if done is not None:
            return done
        state = apply(state, ev, self.p.state, partition, offset)
        if ev.type not in self._triggers:
            return StepResult(state, budget, clock, ev, expired=lapsed)
        r = self._decide(state, ev, budget, clock, policy)
        r.expired = lapsed
        return r

    def _admit(self, raw, key, state, budget, partition, offset, clock, now_ms, seen=None):
        """Decode and check one event: (event, state, clock having seen it, result if it is a
        replay, whether the stored state had expired). ``seen``: what to recognise a replay and
        expiry by, if not ``state`` (a ``_Seen``). ``clock`` is the partition's clock before
        the event. Raises InvalidMessage / OutOfBounds as :meth:`step` does."""
        ev = decode_user_event(raw, key)
        # a state idle longer than the TTL, by the partition's event time, is dropped: the
        # user starts anew (state.expired; the sweep deletes such states, see decide.py)
        lapsed = state is not None and expired((seen or state).last_ts, clock.stream_time,
                                               self.p.state.ttl_ms)
        if state is None or lapsed:
            state = UserState(user_id=ev.user_id)
        elif partition >= 0 and is_replay(seen or state, partition, offset, ev.event_id):
            return ev, state, clock, self._replayed(state, ev, budget, clock), False
        # any gap in the user's own history is legal (a customer may return after a year):
        # the bounds are against the partition's event time, never the user's
        clock = admit(clock, ev.ts, self.p.time_bounds, now_ms)
        return ev, state, clock, None, lapsed

    def _replayed(self, state: UserState, ev: UserEvent, budget: BudgetShare,
                  clock: StreamClock) -> StepResult:
        """An event applied before (a crash replay, or a duplicate re-sent at another offset):
        not applied again, and its decision (same id) re-sent, since the first sending may
        have been lost with an uncommitted batch. Consumers dedupe by decision_id."""
        prior = find_decision(state, ev.event_id) if ev.type in self._triggers else None
        return StepResult(state, budget, clock, ev, prior, self._action_for(prior),
                          replayed=True)

    def step_batch(self, items: list[tuple[bytes | None, bytes | None, int, int]],
                   states: dict, budgets: dict[int, BudgetShare],
                   clocks: dict[int, StreamClock],
                   now_ms: int | None = None) -> list[StepResult | Exception]:
        """Many events at once: the same decisions as :meth:`step` on each in turn, with the
        Q-network run once for the batch instead of once per trigger.

        ``items`` are (value, key, partition, offset) in the order they were consumed (offset
        order within a partition). ``states`` maps each key to the user's state (None: new
        user), ``budgets`` and ``clocks`` each partition's; all three are updated in place to
        their values after the batch. The result per item is its StepResult or the exception
        :meth:`step` would have raised (InvalidMessage, OutOfBounds, or a bug's).

        How it stays exact: a user's events are applied in order, and only each user's first
        trigger of the batch is scored in the batched forward pass (its features depend on
        nothing the other users do); the decisions are then taken in consumption order, so the
        partition budget is spent in the same order as one event at a time. A user's later
        triggers in the same batch depend on the first decision and are scored alone. Whether
        an event is a replay depends only on the user's identity fields (partition, offset,
        recent event ids), which the first pass follows for every user, so a duplicate later
        in the batch is recognised there; its result is built in the ordered pass.
        """
        n = len(items)
        out: list = [None] * n
        evs: list = [None] * n
        seen_clock: list = [None] * n
        # users whose first trigger awaits the batched forward pass -> their identity fields,
        # followed by this pass (the rest of their state is left to the ordered pass)
        blocked: dict[bytes, _Seen] = {}
        replays: set[int] = set()  # replays of such users, built in the ordered pass
        lapses: set[int] = set()  # such users' events that found their state expired
        first: list[int] = []  # items that are such first triggers
        feats: list[np.ndarray] = []
        for i, (raw, key, part, off) in enumerate(items):
            clock = clocks.get(part) or StreamClock()
            seen = blocked.get(key)
            try:
                ev, state, clock, done, lapsed = self._admit(raw, key, states.get(key),
                                                             budgets.get(part) or BudgetShare(),
                                                             part, off, clock, now_ms, seen)
            except OutOfBounds as exc:
                clocks[part] = exc.clock  # seen: a real jump is followed
                out[i] = exc
                continue
            except Exception as exc:  # noqa: BLE001 - the caller dead-letters it
                out[i] = exc
                continue
            clocks[part], evs[i], seen_clock[i] = clock, ev, clock
            if seen is not None:  # after the user's first trigger: taken in the ordered pass
                if done is not None:
                    replays.add(i)
                else:  # as apply will set them
                    seen.follow(ev, part, off, lapsed, self.p.state)
                    if lapsed:
                        lapses.add(i)
                continue
            if done is not None:
                out[i] = done
                continue
            try:
                state = apply(state, ev, self.p.state, part, off)
                states[key] = state
                if ev.type in self._triggers:
                    feats.append(F.encode(state, ev.ts, ev.type, self.p.state.half_life_ms,
                                          self.p.caps.window_ms))
                    first.append(i)
                    blocked[key] = _Seen(state)
                    if lapsed:
                        lapses.add(i)
                else:
                    out[i] = StepResult(state, budgets.get(part) or BudgetShare(), clock, ev,
                                        expired=lapsed)
            except Exception as exc:  # noqa: BLE001
                out[i] = exc
        model = self.model  # one read: the whole batch decides with one version
        scored = dict(zip(first, model.q.heads_batch(np.stack(feats)) if feats else []))
        feat_of = dict(zip(first, feats))
        for i, (raw, key, part, off) in enumerate(items):
            r = out[i]
            if isinstance(r, Exception):
                continue
            budget = budgets.get(part) or BudgetShare()
            if r is not None:  # taken in the first pass: the budget is the one at this point
                r.budget = budget
                continue
            ev, clock = evs[i], seen_clock[i]
            try:
                state = states[key]
                if i in replays:
                    r = self._replayed(state, ev, budget, clock)
                elif i in scored:
                    r = self._decide(state, ev, budget, clock, model=model, x=feat_of[i],
                                     q_heads=scored[i])
                else:  # a later event of a user whose first trigger came earlier in the batch
                    if i in lapses:  # idle past the TTL within the batch: starts anew
                        state = UserState(user_id=ev.user_id)
                    state = apply(state, ev, self.p.state, part, off)
                    r = (self._decide(state, ev, budget, clock, model=model)
                         if ev.type in self._triggers else StepResult(state, budget, clock, ev))
            except Exception as exc:  # noqa: BLE001
                out[i] = exc
                continue
            r.expired = i in lapses
            states[key], budgets[part], out[i] = r.state, r.budget, r
        return out

    def _decide(self, state: UserState, ev: UserEvent, budget: BudgetShare, clock: StreamClock,
                policy=None, model: Model | None = None, x: np.ndarray | None = None,
                q_heads: np.ndarray | None = None) -> StepResult:
        p, ts = self.p, ev.ts
        # one read: a concurrent swap cannot mix two versions in a decision
        model = model or self.model
        if x is None:
            x = F.encode(state, ts, ev.type, p.state.half_life_ms, p.caps.window_ms)
        if q_heads is None:
            q_heads = model.q.heads(x)
        # the budget period of the partition's robust event time, not of this one record (a
        # record ahead of its partition must not open a later period's budget for everyone)
        now = clock.stream_time if clock.stream_time is not None else ts
        period = period_of(now, p.budget_period_ms)
        # what the model says: logged as q_values (one head: no mean to take)
        q_model = q_heads[0] if len(q_heads) == 1 else q_heads.mean(0)
        price = None
        if p.pacing is not None:
            # the partition's pacing controller, moved to this event time; the policy scores
            # Q - price x cost, so greedy, exploration and the logged propensities all follow
            # the priced values (the hard budget mask below stays the last line)
            budget = pace(budget, now, p.budget_period_ms, p.budget_share, p.pacing)
            price = budget.shadow_price
            if price > 0:
                q_heads = q_heads - price * self._cost_arr
        q = q_heads[0] if len(q_heads) == 1 else q_heads.mean(0)
        remaining = budget_remaining(budget, period, p.budget_share)
        allowed, blocked = action_mask(state, ts, self._costs, p.caps, remaining)
        eps = epsilon_at(model.snapshot.train_steps, p.epsilon_start, p.epsilon_end,
                         p.epsilon_decay_steps)
        greedy = confident_greedy(q_heads, allowed, p.confidence_z, p.greedy_margin,
                                  self._cap)
        head_greedy = head_choices(q_heads, allowed) if len(q_heads) > 1 else None
        probs, greedy = action_probs(q, allowed, p.exploration, eps, p.temperature, greedy,
                                     head_greedy)
        did = decision_id(p.app_id, ev.event_id)
        run = p.exploration == "epsilon" and p.explore_run_mean > 1.0
        rest_p = p.explore_rest_prob
        if p.explore_rest_decay_steps:
            rest_p *= max(0.0, 1.0 - model.snapshot.train_steps / p.explore_rest_decay_steps)
        resting = p.exploration == "epsilon" and rest_p > 0.0
        rest = resting and greedy != 0 and bool(allowed[0])  # a rest may start here
        if rest and p.explore_rest_min_pressure > 0:
            rest = F.coupon_pressure(x) >= p.explore_rest_min_pressure
        if policy is not None:
            a, prop = policy(x, allowed)
            if not allowed[a]:
                raise ValueError(f"the external policy chose masked action {a}")
            probs = np.zeros(len(q))
            probs[a] = prop
        elif p.exploration == "thompson":
            # Deep exploration (bootstrapped DQN): an exploring user follows one head for a
            # whole period, so a rest (or a run of coupons) lasts long enough to show what it
            # does. Both draws come from (user, period), uniformly: the logged propensity
            # (epsilon x share of heads choosing a, + 1 - epsilon if a is greedy) is exact.
            key = f"{ev.user_id}|{ts // p.explore_period_ms}"
            pool = thompson_pool(head_greedy, allowed)
            explore = uniform_from(p.seed, key) < eps
            a = int(pool[int(uniform_from(p.seed + 1, key) * len(pool))]) if explore else greedy
        elif (run or resting) and state.explore_left > 0 and allowed[state.explore_action]:
            # inside a run the action is fixed by the user's state: the behaviour policy gives
            # it probability 1, and that is what the log says
            a = state.explore_action
            probs = np.zeros(len(q))
            probs[a] = 1.0
            state = evolve(state, {"explore_left": state.explore_left - 1})
        else:
            if rest:  # (the logged propensity of "no coupon" includes the rest's share)
                probs = probs * (1.0 - rest_p)
                probs[0] += rest_p
            a = sample(probs, uniform_from(p.seed, did))
            left = 0
            mean = (p.explore_rest_mean if rest and a == 0 else p.explore_run_mean) \
                if a != greedy else 1.0
            if mean > 1.0:
                # geometric run length with the configured mean, from the decision's own draw
                u = uniform_from(p.seed + 1, did)
                left = int(np.log1p(-u) / np.log1p(-1.0 / mean))
            state = evolve(state, {"explore_action": a, "explore_left": left})
        cost = self._costs[a]
        decision = Decision(
            decision_id=did, user_id=ev.user_id, ts=ts,
            action=self.catalog.actions[a], action_index=a,
            propensity=float(probs[a]), explored=a != greedy,
            exploration=p.exploration,
            epsilon=eps if p.exploration in ("epsilon", "thompson") else None,
            policy_version=model.version, trigger_event_id=ev.event_id,
            trigger_type=ev.type, q_values=tuple([round(v, 6) for v in q_model.tolist()]),
            allowed=tuple(allowed.tolist()), blocked_by=tuple(blocked),
            features=tuple([round(v, 6) for v in x.tolist()]), cost=cost,
            shadow_price=None if price is None else float(price),
        )
        if a:
            budget = budget_spend(budget, period, cost)
        raw = encode(decision.to_doc())  # the decision-log record, and the state's copy
        # bytes only: a cached state holds no decoded copy (only a replay decodes one)
        state = record_decision(state, decision, a != 0, p.state, EncodedDoc(raw))
        return StepResult(state, budget, clock, ev, decision, self._action_for(decision),
                          decision_raw=raw)

    def _action_for(self, decision: Decision | None) -> CouponAction | None:
        if decision is None or decision.action_index == 0:
            return None
        c = self.catalog.coupon(decision.action_index)
        did, ts = decision.decision_id, decision.ts
        return CouponAction(
            decision_id=did, user_id=decision.user_id, ts=ts,
            coupon=CouponOffer(id=c.id, kind=c.kind, value=c.value, min_spend=c.min_spend,
                               expires_ts=ts + int(c.valid_days * DAY_MS), code=f"C-{did}"),
            policy_version=decision.policy_version,
            trigger_event_id=decision.trigger_event_id,
        )

