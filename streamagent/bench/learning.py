"""`streamagent bench learning`: policies on the simulated shop, against the MDP optimum.

In-process, on the pure core: the simulator's events go through the real DecisionEngine (state,
features, Q-network, exploration), orders through the real Joiner (event-time attribution,
rewards, transitions) into the real QLearner, whose snapshots are swapped into the engine, as
the workers do through Kafka. Baselines act on the same users. Profit is the simulator's ground
truth per user per day; the optimum is value iteration on the simulator's own MDP.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import orjson

from streamagent.bench.bandits import BANDITS
from streamagent.bench.bandits import make as make_bandit
from streamagent.core import features as F
from streamagent.core.catalog import Catalog, load_catalog
from streamagent.core.contracts import BudgetShare, Conversion
from streamagent.core.eventtime import StreamClock
from streamagent.core.gate import Holdout, held_out, judge
from streamagent.core.engine import DecisionEngine, Model, initial_model
from streamagent.core.join import Joiner
from streamagent.core.learner import QLearner
from streamagent.core.qnet import NumpyQ
from streamagent.core.tables import JoinStore
from streamagent.params import (engine_params, gate_params_from, join_params, learner_params,
                                shipped)
from streamagent.sim.mdp import average_reward, policy_evaluation, value_iteration
from streamagent.sim.report import moving_mean
from streamagent.sim.shop import (Shop, expected_profit, margin_reference, mdp, optimum,
                                  purchase_event, scenario)
from streamagent.units import DAY_MS


@dataclass
class Result:
    name: str
    daily_profit: list[float]
    spend: float
    orders: int
    decisions: int
    seconds: float
    realised: float = 0.0  # sampled order profit over the whole run (the learner's reward)
    gate: dict = field(default_factory=dict)  # the promotion gate's verdicts, by outcome
    # the last quarter's decisions by the user's true type and hidden level: segment ->
    # level -> action -> count (what a policy does where, beside what the optimum does)
    actions: dict = field(default_factory=dict)
    # a learner's own values at the end, over the last quarter's decisions by true type and
    # hidden level: segment -> level -> n, q_none, q_coupon (the best coupon's), v_never
    values: dict = field(default_factory=dict)
    # the last quarter's expected profit per decision (a user's day) by true type
    by_type: dict = field(default_factory=dict)
    # share of each true type's decisions with a coupon, per BLOCK_DAYS of the run: when a
    # trap forms (a type couponed every day from some block on), and whether it lasts
    coupon_blocks: dict = field(default_factory=dict)

    def summary(self, opt: float, n_users: int, tail: float = 0.25) -> dict:
        d = np.array(self.daily_profit)
        k = max(1, int(len(d) * tail))
        longrun = float(d[-k:].mean())
        smooth = moving_mean(d, 7)

        def reach(frac):
            hit = np.nonzero(smooth >= frac * opt)[0]
            return int((hit[0] + 7) * n_users * 2) if hit.size else None  # ~2 events/user/day
        return {"policy": self.name, "profit_per_user_day": longrun,
                "fraction_of_optimum": longrun / opt if opt else None,
                "coupon_spend_per_user_day": self.spend / n_users / len(d),
                "conversion_rate": self.orders / max(1, self.decisions),
                "events_to_90pct": reach(0.9), "events_to_95pct": reach(0.95),
                "gate_verdicts": dict(self.gate),
                "realised_profit_per_user_day": self.realised / n_users / len(d),
                "actions_last_quarter": self.actions, "values_last_quarter": self.values,
                "profit_by_type_last_quarter": self.by_type,
                "coupon_share_by_block": self.coupon_blocks, "block_days": BLOCK_DAYS,
                "seconds": self.seconds}


def bench_settings(**overrides):
    """The product's defaults (docs/CONFIGURATION.md), with caps and budget (and so budget
    pacing) off: the optimum knows neither, so a fair race has neither. Benchmarked = shipped."""
    base = dict(cap_max_coupons=10_000, cap_min_gap_hours=0, budget_per_period=1e12, pacing=False,
                attribution_window_hours=24, allowed_lateness_minutes=1,
                transition_horizon_days=3)
    return shipped(**{**base, **overrides})


BLOCK_DAYS = 10  # the coupon shares over time: one figure per type and this many days


def run(name: str, sc, catalog: Catalog, n_users: int, days: int, seed: int,
        gamma: float | None = None, choose=None, log=None, bandit=None,
        settings=None, joiner_feed: str = "time") -> Result:
    """One policy over the horizon: ``gamma`` set: our Q-learner; ``bandit``: a baseline
    bandit learning from the same reward records; else ``choose(user, decision)``.

    ``joiner_feed``: how decisions and orders reach the joiner. "day-end" (the harness before
    2026-11-26 evening, kept to reproduce older figures): each decision when it is made (users
    in population order, at random hours), the day's orders after all of them. The decision-log watermark is then at the day's last session
    (~20:00) before any order arrives, so every order dated before it is a late conversion,
    never attributed: about 40% of the orders (pulse, seed 1). "time": each day's decisions
    and orders in event-time order (orders dated after the day carried into the next), as a
    live shop's topics deliver them; no order is late (the default). Decisions and user state
    are the same either way (the model only changes at the end of a day)."""
    if joiner_feed not in ("day-end", "time"):
        raise ValueError(f"joiner_feed must be day-end or time, not {joiner_feed!r}")
    in_time = joiner_feed == "time"
    feed: list = []  # (ts, kind, record) for the joiner in time order: 0 decision, 1 order
    s = settings or bench_settings()
    shop = Shop(sc, catalog, n_users, seed=seed)
    learning = gamma is not None
    joining = learning or bandit is not None
    contexts: dict = {}  # decision_id -> (features, action, probability) awaiting its reward
    ep = replace(engine_params(s, 1), app_id="bench",
                 exploration=s.exploration if learning else "greedy")
    eng = DecisionEngine(catalog, ep, initial_model(catalog, tuple(s.hidden_sizes), s.seed,
                                                      s.q_heads))
    store: dict = {}
    joiner = Joiner(catalog, replace(join_params(s), margin=sc.margin), JoinStore(store))
    lp = replace(learner_params(s), gamma=gamma or 0.0, seed=seed)
    learner = QLearner(catalog.actions, F.FEATURE_NAMES, tuple(s.hidden_sizes), lp) \
        if learning else None
    states: dict = {}
    budget = BudgetShare()
    daily, spend, orders, decisions, realised = [], 0.0, 0, 0, 0.0
    t0 = time.perf_counter()
    last_snap = 0
    # the promotion gate, as the learner service runs it (STREAMAGENT_GATE)
    holdout = Holdout(s.gate_window, F.N_FEATURES, catalog.n_actions) \
        if learning and s.gate else None
    held = (holdout, s.gate_holdout)
    gate_params = gate_params_from(s)
    gate_counts: dict = {}
    clock = StreamClock()  # the one partition's event-time clock
    actions: dict = {}
    tail_features: dict = {}  # (segment, level) -> the last quarter's decision features
    tail_profit: dict = {}  # segment -> [expected profit, decisions] over the last quarter
    blocks: dict = {}  # segment -> [[coupons, decisions] per BLOCK_DAYS]
    n_blocks = -(-days // BLOCK_DAYS)
    tail_from = days - max(1, days // 4)
    for day in range(days):
        profit_today = 0.0
        pending_orders = []
        for i, u in enumerate(shop.users):
            evs = shop.session_events(day, u, i)
            decision = None
            if bandit is not None:
                def policy(x, allowed):
                    return bandit.act(np.asarray(x, np.float32), allowed)
            elif choose is not None:
                def policy(x, allowed, u=u):
                    return choose(u, None), 1.0
            else:
                policy = None
            for ev in evs:
                # the engine keeps state (coupons received included) for whatever policy acts
                r = eng.step(orjson.dumps(ev), u.user_id.encode(), states.get(u.user_id), budget,
                             policy=policy, clock=clock)
                states[u.user_id], clock = r.state, r.clock
                if r.decision:
                    decision = r.decision
            a = decision.action_index
            if bandit is not None:
                contexts[decision.decision_id] = (np.asarray(decision.features, np.float32),
                                                  a, decision.propensity)
            decisions += 1
            if joining and in_time:
                feed.append((decision.ts, 0, decision))
            elif joining:
                _consume(joiner.on_decision(0, decision), learner, bandit, contexts, *held)
            # Report the expected profit of (true state, action), not the sampled one: the
            # same ranking, far less noise (realised order profit is 0 or a whole basket).
            expected = expected_profit(sc, u.segment, catalog, u.fatigue, a)
            profit_today += expected
            block = blocks.setdefault(u.segment.name, [[0, 0] for _ in range(n_blocks)])[
                day // BLOCK_DAYS]
            block[0] += a != 0
            block[1] += 1
            if day >= tail_from:
                tp = tail_profit.setdefault(u.segment.name, [0.0, 0])
                tp[0] += expected
                tp[1] += 1
                by = actions.setdefault(u.segment.name, {}).setdefault(str(u.fatigue), {})
                by[catalog.actions[a]] = by.get(catalog.actions[a], 0) + 1
                if learning:
                    tail_features.setdefault((u.segment.name, u.fatigue), []).append(
                        decision.features)
            order = shop.respond(u, a, decision.ts, decision.decision_id)
            if order:
                orders += 1
                realised += order["_profit"]
                spend += order["discount"]
                pending_orders.append(order)
        for o in sorted(pending_orders, key=lambda o: o["ts"]):
            r = eng.step(orjson.dumps(purchase_event(o)), o["user_id"].encode(),
                         states.get(o["user_id"]), budget, clock=clock)
            states[o["user_id"]], clock = r.state, r.clock
            if joining:
                conv = Conversion.from_doc({k: v for k, v in o.items() if not k.startswith("_")})
                if in_time:
                    feed.append((conv.ts, 1, conv))
                else:
                    _consume(joiner.on_conversion(0, conv), learner, bandit, contexts, *held)
        if joining and in_time:
            end = shop.start_ts + (day + 1) * DAY_MS
            feed.sort(key=lambda x: (x[0], x[1]))
            for ts, kind, rec in feed:
                if ts >= end:
                    continue
                out = joiner.on_decision(0, rec) if kind == 0 else joiner.on_conversion(0, rec)
                _consume(out, learner, bandit, contexts, *held)
            feed = [x for x in feed if x[0] >= end]  # orders dated after today: tomorrow
        if joining:
            # end of day: event time moves on for the conversions input as well
            _consume(joiner.on_conversion(0, Conversion(order_id=f"hb-{day}", user_id="hb",
                                                        ts=shop.start_ts + (day + 1) * DAY_MS,
                                                        amount=0.0, heartbeat=True)),
                     learner, bandit, contexts, *held)
        if learning:
            if learner.train_steps - last_snap >= s.snapshot_every_updates:
                snap = learner.snapshot()
                verdict = (judge(NumpyQ(snap), eng.model.q, holdout.log(), gate_params)
                           if holdout is not None else None)
                if verdict is None or verdict.promote:  # as the learner service does
                    eng.swap_model(Model(snap))
                if verdict is not None:
                    gate_counts[verdict.outcome] = gate_counts.get(verdict.outcome, 0) + 1
                last_snap = learner.train_steps
        daily.append(profit_today / n_users)
        if log and (day + 1) % 10 == 0:
            log(f"    {name:14} day {day + 1:4}/{days}: {profit_today / n_users:6.3f} per user")
    values = learned_values(learner, tail_features) if learning else {}
    by_type = {seg: total / n for seg, (total, n) in tail_profit.items()}
    coupon_blocks = {seg: [c / n if n else 0.0 for c, n in per] for seg, per in blocks.items()}
    return Result(name, daily, spend, orders, decisions, time.perf_counter() - t0, realised,
                  gate_counts, actions, values, by_type, coupon_blocks)


def learned_values(learner: QLearner, features: dict) -> dict:
    """The learner's Q(no coupon), best coupon Q and never-value (the floor), averaged over
    the decisions of each (segment, level): what it believes where it acts."""
    out: dict = {}
    for (seg, level), rows in sorted(features.items()):
        X = np.asarray(rows, np.float32)
        q = learner.q_values(X)
        v = {"n": len(rows), "q_none": float(q[:, 0].mean()),
             "q_coupon": float(q[:, 1:].max(1).mean())}
        if learner.p.never_floor:
            v["v_never"] = float(learner.never_values(X).mean())
        out.setdefault(seg, {})[str(level)] = v
    return out


def mdp_values(sc, catalog: Catalog, gamma: float) -> dict:
    """The same figures from the simulator's MDP at ``gamma``: Q*(no coupon), the best
    coupon's Q* and the value of never couponing, per segment and level."""
    out: dict = {}
    for seg in sc.segments:
        m = mdp(sc, seg, catalog)
        V, _ = value_iteration(m.P, m.R, gamma)
        Q = m.R + gamma * m.P @ V
        never = policy_evaluation(m.P, m.R, np.zeros(m.P.shape[1], int), gamma)
        out[seg.name] = {str(f): {"q_none": float(Q[0, f]), "q_coupon": float(Q[1:, f].max()),
                                  "v_never": float(never[f])} for f in range(m.P.shape[1])}
    return out


def _consume(out, learner: QLearner | None, bandit=None, contexts=None, holdout=None,
             fraction: float = 0.0) -> None:
    if learner is not None:
        for t in out.transitions:
            hold = holdout is not None and held_out(t.decision_id, fraction)
            learner.learn_one(t, train=not hold)
            if hold:
                holdout.add(t.features, t.action_index, t.reward, t.propensity, t.allowed,
                            t.user_id)
    if bandit is not None:
        for r in out.rewards:
            x, a, prob = contexts.pop(r.decision_id)
            bandit.learn(x, a, r.reward, prob)


def static_best(sc, catalog: Catalog, shop: Shop) -> int:
    """The single coupon (or none) with the best long-run profit if always sent (by the MDP)."""
    counts: dict = {}
    for u in shop.users:
        counts[u.segment] = counts.get(u.segment, 0) + 1
    mdps = [(n, mdp(sc, seg, catalog)) for seg, n in counts.items()]
    values = [sum(n * average_reward(m.P, m.R, np.full(sc.fatigue_levels, a)) for n, m in mdps)
              for a in range(catalog.n_actions)]
    return int(np.argmax(values))  # ties: the lowest index, "no coupon" first


DEFAULT_SEEDS = "1,2,3,4,5"
FIXED = ("never", "static")  # the simple rules a shop would otherwise use
# two-sided 97.5% quantiles of Student's t for 1..10 degrees of freedom (normal beyond)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def add_arguments(p) -> None:
    p.add_argument("--users", type=int, default=300)
    p.add_argument("--days", type=int, default=120)
    p.add_argument("--seeds", default=DEFAULT_SEEDS,
                   help="comma-separated seeds (population and learner); the table shows means, "
                        "the worst seed and a 95%% interval; curves show the first seed")
    p.add_argument("--quick", action="store_true", help="one seed (--seed) instead of five")
    p.add_argument("--seed", type=int, default=1, help="the seed of --quick")
    p.add_argument("--scenarios", default="fatigue,no-fatigue,pulse")
    p.add_argument("--policies", default="random,never,static,oracle,river_linucb,"
                   "river_eps_greedy,vw_cb_adf,q_myopic,q_gamma",
                   help="comma-separated; bandits need river / vowpalwabbit (the bench extra)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="override a setting for our learner, e.g. --set learning_rate=3e-4 "
                        "--set explore_run_mean=5 (names as in docs/CONFIGURATION.md, lower case)")
    p.add_argument("--gamma", type=float, default=None,
                   help="discount of q_gamma (default: the product's STREAMAGENT_GAMMA)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="runs in parallel, one process each (default: one per core)")
    p.add_argument("--joiner-feed", choices=("day-end", "time"), default="time",
                   help="time (default): decisions and orders reach the joiner in event-time "
                        "order, as live topics deliver them; day-end (the harness of the figures "
                        "before 2026-11-26 evening): the day's orders after all its decisions, so "
                        "those dated before the last decision are late and never attributed "
                        "(~40%% of orders; see run())")
    p.add_argument("--out", default="bench-results/learning.json")


def _run_one(task: tuple) -> dict:
    """One policy on one scenario and seed: a worker process's unit of work."""
    sname, seed, pname, users, days, gamma, overrides, feed = task
    import torch

    # One thread: the network is small, and several runs (or a run and a broker) on a 2-core
    # machine with torch's default threads spend their time spinning.
    torch.set_num_threads(1)
    catalog = load_catalog()
    sc = scenario(sname)
    shop = Shop(sc, catalog, users, seed=seed)
    opt = optimum(shop)
    if pname in ("q_myopic", "q_gamma"):
        res = run(pname, sc, catalog, users, days, seed,
                  gamma=0.0 if pname == "q_myopic" else gamma,
                  settings=bench_settings(**overrides), joiner_feed=feed)
    elif pname in BANDITS:
        b = make_bandit(pname, F.FEATURE_NAMES, catalog.n_actions, seed)
        res = run(pname, sc, catalog, users, days, seed, bandit=b, joiner_feed=feed)
    else:
        rng = np.random.default_rng(seed + 99)
        static = static_best(sc, catalog, shop)
        pol_by_seg = {name: [catalog.actions.index(a) for a in acts]
                      for name, acts in opt["policies"].items()}
        choosers = {
            "random": lambda u, d: int(rng.integers(catalog.n_actions)),
            "never": lambda u, d: 0,
            "static": lambda u, d: static,
            # the optimum acted out with the true latent state: checks simulator and MDP agree
            "oracle": lambda u, d: pol_by_seg[u.segment.name][u.fatigue],
        }
        res = run(pname, sc, catalog, users, days, seed, choose=choosers[pname])
    return {"scenario": sname, "row": {**res.summary(opt["optimal"], users), "seed": seed},
            "curve": res.daily_profit}


def _check_policies(names: list[str]) -> None:
    known = ("random", "never", "static", "oracle", *BANDITS, "q_myopic", "q_gamma")
    for n in names:
        if n not in known:
            raise SystemExit(f"unknown policy {n!r}; choose from {', '.join(known)}")


def interval95(values: list[float]) -> tuple[float, float]:
    """Student-t 95% interval of the mean (a point when there is one value)."""
    v = np.asarray(values, float)
    m = float(v.mean())
    if len(v) < 2:
        return m, m
    t = _T975[len(v) - 2] if len(v) - 1 <= len(_T975) else 1.96
    h = t * float(v.std(ddof=1)) / np.sqrt(len(v))
    return m - h, m + h


def _aggregate(rows: list[dict]) -> list[dict]:
    """One row per policy: means over seeds, the worst seed and a 95% interval of the
    fraction of the optimum."""
    out = []
    for pname in dict.fromkeys(r["policy"] for r in rows):
        rs = sorted((r for r in rows if r["policy"] == pname), key=lambda r: r["seed"])
        fr = [r["fraction_of_optimum"] for r in rs]
        lo, hi = interval95(fr)
        agg = {"policy": pname, "seeds": [r["seed"] for r in rs], "fraction_min": min(fr),
               "fraction_max": max(fr), "fraction_ci95": [lo, hi],
               "fraction_by_seed": fr}
        for k in ("profit_per_user_day", "fraction_of_optimum", "coupon_spend_per_user_day",
                  "conversion_rate", "realised_profit_per_user_day", "seconds"):
            agg[k] = float(np.mean([r[k] for r in rs]))
        for k in ("events_to_90pct", "events_to_95pct"):
            vals = [r[k] for r in rs]
            # reached on every seed: the mean; on some only: not claimed
            agg[k] = int(np.mean(vals)) if all(v is not None for v in vals) else None
        out.append(agg)
    return out


def fixed_policy_check(rows: list[dict], policy: str = "q_gamma",
                       tolerance: float = 0.01) -> dict | None:
    """Per seed: is ``policy`` at least the best fixed rule (never / best static coupon) minus
    ``tolerance`` (as a fraction of the optimum)?"""
    by_seed: dict = {}
    for r in rows:
        by_seed.setdefault(r["seed"], {})[r["policy"]] = r["fraction_of_optimum"]
    seeds = {}
    for seed, fr in sorted(by_seed.items()):
        fixed = [fr[f] for f in FIXED if f in fr]
        if policy not in fr or not fixed:
            return None
        seeds[seed] = fr[policy] - max(fixed)
    return {"policy": policy, "tolerance": tolerance, "margin_by_seed": seeds,
            "worst_margin": min(seeds.values()),
            "passed": all(m >= -tolerance for m in seeds.values())}


def main(args) -> int:
    import sys
    from concurrent.futures import ProcessPoolExecutor

    from streamagent.extras import require

    # before the minutes of simulation, not at the plot that ends them
    require("bench", "rich", "matplotlib", what="streamagent bench learning")
    from rich.console import Console

    # a wide table even when piped to a file (rich would otherwise truncate to 80 columns)
    con = Console() if sys.stdout.isatty() else Console(width=160)
    catalog = load_catalog()
    overrides = dict(kv.split("=", 1) for kv in args.set)
    if args.gamma is None:
        args.gamma = bench_settings().gamma
    seeds = [args.seed] if args.quick else [int(x) for x in str(args.seeds).split(",") if x.strip()]
    snames = [x.strip() for x in args.scenarios.split(",") if x.strip()]
    pnames = [x.strip() for x in args.policies.split(",") if x.strip()]
    _check_policies(pnames)
    report: dict = {"users": args.users, "days": args.days, "seeds": seeds,
                    "joiner_feed": args.joiner_feed,
                    "settings_overrides": overrides, "scenarios": {}}
    per_seed: dict = {sn: [] for sn in snames}
    margin = bench_settings(**overrides).greedy_margin
    for sn in snames:
        for seed in seeds:
            shop = Shop(scenario(sn), catalog, args.users, seed=seed)
            opt = optimum(shop)
            opt["margin_reference"] = margin_reference(shop, args.gamma, margin)
            per_seed[sn].append({"seed": seed, "optimum": opt,
                                 "static_coupon": catalog.actions[static_best(shop.scenario,
                                                                              catalog, shop)]})
            if seed == seeds[0]:
                con.print(f"[bold]{sn}[/]: optimum {opt['optimal']:.3f} profit/user/day (myopic "
                          f"optimum {opt['myopic_optimal']:.3f}, never {opt['never']:.3f}); "
                          f"optimal policy by hidden level: {opt['policies']}")
                con.print(f"  the deciders' rule on the exact Q (gamma {args.gamma}, greedy "
                          f"margin {margin:g}, hidden level seen): "
                          f"{opt['margin_reference'] / opt['optimal']:.1%} of the optimum")
    tasks = [(sn, seed, pn, args.users, args.days, args.gamma, overrides, args.joiner_feed)
             for sn in snames for seed in seeds for pn in pnames]
    con.print(f"{len(tasks)} runs ({len(snames)} scenarios x {len(seeds)} seeds x "
              f"{len(pnames)} policies), {args.jobs} at a time ...")
    results: list[dict] = []
    t0 = time.monotonic()
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for task, res in zip(tasks, pool.map(_run_one, tasks)):
            results.append(res)
            r = res["row"]
            con.print(f"  [{len(results)}/{len(tasks)}, {time.monotonic() - t0:5.0f} s] "
                      f"{task[0]:10} seed {task[1]} {task[2]:16} {r['fraction_of_optimum']:6.1%} "
                      f"of optimum")
    curves: dict = {}
    for sn in snames:
        rows = [res["row"] for res in results if res["scenario"] == sn]
        for res in results:
            if res["scenario"] == sn and res["row"]["seed"] == seeds[0]:
                curves[(sn, res["row"]["policy"])] = res["curve"]
        agg = _aggregate(rows)
        check = fixed_policy_check(rows)
        report["scenarios"][sn] = {"optimum": per_seed[sn][0]["optimum"],
                                   "per_seed": per_seed[sn], "results": agg, "runs": rows,
                                   "fixed_policy_check": check}
        _print_table(con, sn, args, seeds, agg, check)
        _print_actions(con, sn, rows, per_seed[sn][0]["optimum"]["policies"])
        report["scenarios"][sn]["gap_by_type"] = gaps = gap_by_type(rows, per_seed[sn])
        _print_gaps(con, sn, gaps)
        _print_blocks(con, sn, rows)
        mdp_v = mdp_values(scenario(sn), catalog, args.gamma)
        report["scenarios"][sn]["mdp_values"] = mdp_v
        _print_values(con, sn, rows, mdp_v)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    png = out.with_suffix(".png")
    _plot(curves, report, png)
    con.print(f"wrote {out} and {png}")
    return 0


def _print_table(con, sname: str, args, seeds: list[int], agg: list[dict],
                 check: dict | None) -> None:
    from rich.table import Table

    multi = len(seeds) > 1
    title = (f"learning benchmark: {sname} ({args.users} users, {args.days} days"
             + (f", mean of seeds {','.join(map(str, seeds))})" if multi else ")"))
    table = Table(title=title)
    cols = ["policy", "profit/user/day", "of optimum"] + (["worst seed", "95% interval"]
                                                          if multi else []) + [
        "spend/user/day", "conv. rate", "events to 90%", "events to 95%", "seconds"]
    for col in cols:
        table.add_column(col, justify="right")
    for r in agg:
        cells = [r["policy"], f"{r['profit_per_user_day']:.3f}", f"{r['fraction_of_optimum']:.1%}"]
        if multi:
            lo, hi = r["fraction_ci95"]
            cells += [f"{r['fraction_min']:.1%}", f"{lo:.1%}–{hi:.1%}"]
        cells += [f"{r['coupon_spend_per_user_day']:.3f}", f"{r['conversion_rate']:.1%}",
                  str(r["events_to_90pct"] or "-"), str(r["events_to_95pct"] or "-"),
                  f"{r['seconds']:.1f}"]
        table.add_row(*cells)
    con.print(table)
    if check:
        worst = min(check["margin_by_seed"], key=check["margin_by_seed"].get)
        con.print(f"  {check['policy']} >= best fixed rule - {check['tolerance']:.0%} on every "
                  f"seed: [bold]{'yes' if check['passed'] else 'NO'}[/] (worst: seed {worst}, "
                  f"{check['worst_margin']:+.1%})")


def coupon_shares(rows: list[dict], policy: str) -> dict:
    """Of ``policy``'s last-quarter decisions over all seeds: user type -> hidden level ->
    (share of decisions with a coupon, the most sent coupon, decisions)."""
    counts: dict = {}
    for r in rows:
        if r["policy"] != policy:
            continue
        for seg, levels in (r.get("actions_last_quarter") or {}).items():
            for lv, acts in levels.items():
                c = counts.setdefault(seg, {}).setdefault(int(lv), {})
                for a, n in acts.items():
                    c[a] = c.get(a, 0) + n
    out: dict = {}
    for seg, levels in counts.items():
        for lv, c in sorted(levels.items()):
            n = sum(c.values())
            sent = {a: k for a, k in c.items() if a != "none"}
            out.setdefault(seg, {})[lv] = ((n - c.get("none", 0)) / n,
                                           max(sent, key=sent.get) if sent else "-", n)
    return out


def _learns(policy: str) -> bool:
    """Whether a policy learns (our Q-learners and the bandits), not a fixed rule."""
    return policy.startswith("q_") or policy in BANDITS


def _worst_run(rows: list[dict], policy: str) -> dict:
    """The policy's run on its worst seed."""
    return min((r for r in rows if r["policy"] == policy),
               key=lambda r: r["fraction_of_optimum"] or 0.0)


def gap_by_type(rows: list[dict], per_seed: list[dict]) -> dict:
    """Where each policy's gap to the optimum goes: policy -> type -> its last-quarter profit
    per user and day, the optimum's and never's there, and the points of the optimum the
    policy loses on that type (share x shortfall / optimum), each a mean over the seeds."""
    opt_of = {p["seed"]: p["optimum"] for p in per_seed}
    acc: dict = {}
    for r in rows:
        opt = opt_of.get(r["seed"])
        if not opt or not opt.get("segments") or not r.get("profit_by_type_last_quarter"):
            continue
        for seg, got in r["profit_by_type_last_quarter"].items():
            ref = opt["segments"].get(seg)
            if not ref:
                continue
            lost = ref["share"] * (ref["optimal"] - got) / opt["optimal"]
            acc.setdefault(r["policy"], {}).setdefault(seg, []).append(
                (got, ref["optimal"], ref["never"], lost))
    return {pol: {seg: dict(zip(("profit", "optimal", "never", "points_lost"),
                                (float(np.mean(col)) for col in zip(*vals))))
                  for seg, vals in by.items()}
            for pol, by in acc.items()}


def _print_gaps(con, sname: str, gaps: dict) -> None:
    from rich.table import Table

    for pol, by in gaps.items():
        if not _learns(pol):
            continue
        table = Table(title=f"{sname}: where {pol}'s gap to the optimum goes (last quarter, "
                            f"mean over seeds; profit per user and day)")
        for col in ("type", "profit", "optimum", "never", "points of the optimum lost"):
            table.add_column(col, justify="left" if col == "type" else "right")
        for seg, g in sorted(by.items(), key=lambda kv: -kv[1]["points_lost"]):
            table.add_row(seg, f"{g['profit']:.3f}", f"{g['optimal']:.3f}", f"{g['never']:.3f}",
                          f"{100 * g['points_lost']:+.1f}")
        con.print(table)


def _print_blocks(con, sname: str, rows: list[dict]) -> None:
    """Each learner's coupon share by type over the run, on its worst seed: when a type
    came to be couponed (or left alone), which the last quarter's figures do not show."""
    for pol in dict.fromkeys(r["policy"] for r in rows if r.get("coupon_share_by_block")):
        if not _learns(pol):
            continue
        worst = _worst_run(rows, pol)
        con.print(f"{sname}: {pol}'s share of decisions with a coupon, by type, per "
                  f"{worst['block_days']} days, on its worst seed ({worst['seed']}, "
                  f"{worst['fraction_of_optimum']:.1%}):")
        width = max(len(seg) for seg in worst["coupon_share_by_block"])
        for seg, shares in worst["coupon_share_by_block"].items():
            con.print(f"  {seg:{width}}  " + " ".join(f"{x:.2f}".lstrip("0") or "0"
                                                       for x in shares))


def _print_actions(con, sname: str, rows: list[dict], optimal: dict) -> None:
    """Where each learner sends coupons, by the users' true type and hidden level, beside
    the optimum's action there: the diagnosis a figure of merit alone does not give."""
    from rich.table import Table

    learners = [p for p in dict.fromkeys(r["policy"] for r in rows) if _learns(p)]
    for pol in learners:
        shares = coupon_shares(rows, pol)
        levels = sorted({lv for by in shares.values() for lv in by})
        table = Table(title=f"{sname}: {pol}'s coupons in the last quarter, by true type and "
                            f"hidden level (share of decisions, most sent; optimum's action)")
        table.add_column("type")
        for lv in levels:
            table.add_column(f"level {lv}", justify="right")
        for seg, by in shares.items():
            cells = []
            for lv in levels:
                opt = optimal.get(seg, [])[lv] if lv < len(optimal.get(seg, [])) else "?"
                if lv in by:
                    share, top, n = by[lv]
                    what = f"{share:.0%} {top}" if share else "0%"
                    cells.append(f"{what} (n {n}; opt {opt})")
                else:
                    cells.append(f"- (opt {opt})")
            table.add_row(seg, *cells)
        con.print(table)


def _print_values(con, sname: str, rows: list[dict], mdp_v: dict) -> None:
    """Each learner's own values on its worst seed, beside the MDP's: where a trap comes from
    (a coupon valued above a rest, a never-value too low to act as the floor)."""
    from rich.table import Table

    for pol in dict.fromkeys(r["policy"] for r in rows if r.get("values_last_quarter")):
        worst = _worst_run(rows, pol)
        values = worst["values_last_quarter"]
        levels = sorted({int(lv) for by in values.values() for lv in by})
        table = Table(title=f"{sname}: {pol}'s values on its worst seed ({worst['seed']}, "
                            f"{worst['fraction_of_optimum']:.1%}), last quarter, by true type and "
                            f"level: Q(no coupon) / best coupon (advantage) / never-value; "
                            f"MDP below")
        table.add_column("type")
        for lv in levels:
            table.add_column(f"level {lv}", justify="right")

        def cell(v: dict) -> str:
            adv = (v["q_coupon"] - v["q_none"]) / abs(v["q_none"]) if v["q_none"] else 0.0
            floor = f" / {v['v_never']:.1f}" if "v_never" in v else ""
            return f"{v['q_none']:.1f} / {v['q_coupon']:.1f} ({adv:+.1%}){floor}"
        for seg, by in values.items():
            learnt, model = [], []
            for lv in levels:
                v = by.get(str(lv))
                learnt.append(f"{cell(v)} (n {v['n']})" if v else "-")
                m = mdp_v.get(seg, {}).get(str(lv))
                model.append(f"MDP {cell(m)}" if m else "-")
            table.add_row(seg, *learnt)
            table.add_row("", *model, style="dim")
        con.print(table)


def _plot(curves: dict, report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["scenarios"])
    fig, axes = plt.subplots(1, len(names), figsize=(7 * len(names), 4.5), squeeze=False)
    for ax, sname in zip(axes[0], names):
        for (s, pname), d in curves.items():
            if s != sname:
                continue
            d = np.array(d)
            smooth = moving_mean(d, 7)
            ax.plot(np.arange(len(smooth)) + 7, smooth, label=pname)
        ax.axhline(report["scenarios"][sname]["optimum"]["optimal"], color="black", ls="--",
                   label="optimum (value iteration)")
        ax.set_title(f"{sname}: profit per user per day (7-day mean)")
        ax.set_xlabel("simulated day")
        ax.set_ylabel("profit / user / day")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
