"""`streamagent bench pacing`: budget pacing against the hard budget mask alone, on the
simulated shop, with the same policy otherwise.

The policy is the MDP optimum, acted through the real DecisionEngine: a stand-in model whose
Q-values are the optimal Q*(fatigue, action) of the user's segment (value iteration on the
simulator's own MDP), looked up for the user being decided. Greedy, caps off, one partition,
24-hour budget periods; each day's sessions are decided in event-time order.

Runs per scenario and traffic shape: ``unlimited`` (no budget: what the policy would spend),
``never`` (no coupons: the baseline of incremental profit), ``mask`` (budget = ``--fraction``
of the unlimited spend, pacing off: the hard mask only) and ``paced`` (the same budget,
pacing on). Reported: profit per user per day, incremental profit (over ``never``) per unit of
budget spent, how far the spend strays from the pacing's target curve over the hours of each
period (the curve the paced run's controller followed that period: on the first day the prior
profile, i.e. the shop's known traffic shape with ``--prior-profile known``, or the straight
line with ``none``; the learned traffic shape after), whether every period of a run stays
within ±10% of it, and the share of users reached. Profit is the expected profit of (true
state, action), as in ``bench learning``.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import orjson

from streamagent.bench.learning import bench_settings
from streamagent.core.catalog import Catalog, load_catalog
from streamagent.core.contracts import BudgetShare
from streamagent.core.engine import DecisionEngine, initial_model
from streamagent.core.eventtime import StreamClock
from streamagent.core.pacing import target_of
from streamagent.params import engine_params
from streamagent.sim.mdp import value_iteration
from streamagent.sim.shop import Shop, expected_profit, mdp, scenario
from streamagent.units import DAY_MS, HOUR_MS

TRAFFIC = {"daytime": (8.0, 20.0), "uniform": (0.0, 24.0)}


def known_profile(traffic: str) -> tuple[float, ...]:
    """The shop's traffic shape as its analytics would give it: sessions per hour of the day
    (the simulator starts sessions uniformly within ``TRAFFIC[traffic]``)."""
    lo, hi = TRAFFIC[traffic]
    return tuple(max(0.0, min(h + 1.0, hi) - max(float(h), lo)) for h in range(24))


class _OracleQ:
    """Q-heads of the optimum for the user being decided (set by the benchmark loop)."""

    def __init__(self, q_by_segment: dict[str, np.ndarray]):
        self.q_by_segment = q_by_segment  # segment -> Q[action, fatigue]
        self.user = None

    def heads(self, x) -> np.ndarray:
        u = self.user
        return self.q_by_segment[u.segment.name][:, u.fatigue][None, :].astype(float)


@dataclass
class _OracleModel:
    snapshot: object
    q: _OracleQ
    version: int = 0


def optimal_q(sc, catalog: Catalog, gamma: float) -> dict[str, np.ndarray]:
    out = {}
    for seg in sc.segments:
        m = mdp(sc, seg, catalog)
        V, _ = value_iteration(m.P, m.R, gamma)
        out[seg.name] = m.R + gamma * m.P @ V
    return out


@dataclass
class RunResult:
    name: str
    daily_profit: list[float]
    spend: float  # budget reserved (catalog cost of the coupons issued)
    coupons: list[tuple[int, float]] = field(default_factory=list)  # (ts, cost)
    prices: list[tuple[int, float]] = field(default_factory=list)  # (ts, lambda)
    reached_by_day: list[int] = field(default_factory=list)
    # per period, the pacing's target curve at hours 0..24 (the straight line without pacing)
    targets: dict[int, np.ndarray] = field(default_factory=dict)
    users_reached: int = 0
    seconds: float = 0.0


def run(sname: str, traffic: str, mode: str, users: int, days: int, seed: int,
        budget: float, gamma: float, overrides: dict | None = None) -> RunResult:
    catalog = load_catalog()
    sc = scenario(sname)
    shop = Shop(sc, catalog, users, seed=seed, session_hours=TRAFFIC[traffic])
    # the MDP's exact Q: no estimation noise for the greedy margin to guard against
    s = bench_settings(exploration="greedy", budget_per_period=budget, greedy_margin=0.0,
                       pacing=mode == "paced", **(overrides or {}))
    ep = replace(engine_params(s, 1), app_id="bench-pacing")
    oracle = _OracleQ(optimal_q(sc, catalog, gamma))
    snap = initial_model(catalog, (8,), s.seed).snapshot
    eng = DecisionEngine(catalog, ep, _OracleModel(snap, oracle))
    never = (lambda x, allowed: (0, 1.0)) if mode == "never" else None
    states: dict = {}
    budget_state, clock = BudgetShare(), StreamClock()
    res = RunResult(mode, [], 0.0)
    reached: set[str] = set()
    t0 = time.perf_counter()
    for day in range(days):
        sessions = [(shop.session_events(day, u, i), u) for i, u in enumerate(shop.users)]
        sessions.sort(key=lambda e: e[0][0]["ts"])
        # one merged, time-ordered stream of the day's events (sessions interleave)
        stream = sorted(((ev, u) for evs, u in sessions for ev in evs),
                        key=lambda e: (e[0]["ts"], e[0]["event_id"]))
        profit, sent = 0.0, 0
        for ev, u in stream:
            oracle.user = u
            r = eng.step(orjson.dumps(ev), u.user_id.encode(), states.get(u.user_id),
                         budget_state, policy=never, clock=clock)
            states[u.user_id], budget_state, clock = r.state, r.budget, r.clock
            d = r.decision
            if d is None:
                continue
            if (ep.pacing is not None and day not in res.targets
                    and budget_state.period == (shop.start_ts + day * DAY_MS) // DAY_MS):
                # the first decision in the day's period (the partition's robust event time
                # enters it a few events after the day's first record)
                res.targets[day] = target_curve(budget_state, day, shop.start_ts, ep.pacing)
            a = d.action_index
            profit += expected_profit(sc, u.segment, catalog, u.fatigue, a)
            if d.shadow_price is not None:
                res.prices.append((d.ts, d.shadow_price))
            if a:
                res.spend += d.cost
                res.coupons.append((d.ts, d.cost))
                reached.add(u.user_id)
                sent += 1
            shop.respond(u, a, d.ts, d.decision_id)
        res.daily_profit.append(profit / users)
        res.reached_by_day.append(sent)
    res.users_reached = len(reached)
    res.seconds = time.perf_counter() - t0
    return res


def spend_curves(coupons: list[tuple[int, float]], start_ts: int, days: int,
                 share: float) -> np.ndarray:
    """Cumulative spend as a fraction of the share, at each hour 0..24 of each period:
    an array (days, 25)."""
    out = np.zeros((days, 25))
    for ts, cost in coupons:
        day, h = divmod((ts - start_ts) / HOUR_MS, 24.0)
        out[int(day), int(np.floor(h)) + 1:] += cost
    return out / share


LINE = np.linspace(0.0, 1.0, 25)


def target_curve(b: BudgetShare, day: int, start_ts: int, p) -> np.ndarray:
    """The pacing's target over the hours 0..24 of a period, by the profile it holds then."""
    t0 = start_ts + day * DAY_MS
    return np.array([target_of(b, t0 + h * HOUR_MS, DAY_MS, p) for h in range(24)] + [1.0])


def targets_of(r: RunResult, days: int) -> np.ndarray:
    """(days, 25): each period's target curve (the line where pacing did not run)."""
    return np.stack([r.targets.get(d, LINE) for d in range(days)])


def deviation(curves: np.ndarray, targets: np.ndarray | None = None) -> np.ndarray:
    """Per period: the largest |spend - target| over the hours, as a fraction of the share."""
    return np.abs(curves - (LINE if targets is None else targets)).max(axis=1)


def engine_cost(users: int = 2000, days: int = 3, repeats: int = 5, batch: int = 500,
                budget: float = 50.0) -> dict:
    """What pacing costs the decide path: ``DecisionEngine.step_batch`` per event, with the
    shipped model and a binding budget, pacing off against on, alternating in one process
    (the best of ``repeats`` each, so other load on the machine counts least)."""
    catalog = load_catalog()
    shop = Shop(scenario("no-fatigue"), catalog, users, seed=1)
    raw = []
    for day in range(days):
        evs = [ev for i, u in enumerate(shop.users) for ev in shop.session_events(day, u, i)]
        evs.sort(key=lambda e: (e["ts"], e["event_id"]))
        raw += [(orjson.dumps(e), e["user_id"].encode()) for e in evs]
    model = initial_model(catalog, (64, 64), 7)
    best: dict[str, float] = {}
    for _ in range(repeats):
        for mode in ("off", "on"):
            s = bench_settings(budget_per_period=budget, pacing=mode == "on")
            eng = DecisionEngine(catalog, engine_params(s, 1), model)
            states: dict = {}
            budgets, clocks = {0: BudgetShare()}, {0: StreamClock()}
            t0 = time.perf_counter()
            for i in range(0, len(raw), batch):
                items = [(v, k, 0, i + j) for j, (v, k) in enumerate(raw[i:i + batch])]
                eng.step_batch(items, states, budgets, clocks)
            us = (time.perf_counter() - t0) / len(raw) * 1e6
            best[mode] = min(best.get(mode, us), us)
    return {"events": len(raw), "us_per_event_pacing_off": best["off"],
            "us_per_event_pacing_on": best["on"], "ratio_on_off": best["on"] / best["off"]}


def add_arguments(p) -> None:
    p.add_argument("--users", type=int, default=300)
    p.add_argument("--days", type=int, default=60)
    p.add_argument("--seeds", default="1", help="comma-separated seeds")
    p.add_argument("--scenarios", default="no-fatigue,fatigue")
    p.add_argument("--traffic", default="uniform,daytime",
                   help="when sessions start: uniform (over 24 h) and/or daytime (8:00-20:00)")
    p.add_argument("--fraction", type=float, default=0.5,
                   help="the budget, as a fraction of what the unlimited policy spends")
    p.add_argument("--gamma", type=float, default=0.995, help="discount of the optimum's Q*")
    p.add_argument("--prior-profile", choices=("known", "none"), default="known",
                   help="the paced run's PACING_PRIOR_PROFILE (its target until a first period "
                        "has ended): known = the shop's traffic shape (sessions per hour), "
                        "none = the straight line. Default known: a shop going live knows "
                        "its traffic shape from its analytics, and the target is every "
                        "period, the first included; none measures the cold start")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="override a setting of the paced run, e.g. --set pacing_kp=4")
    p.add_argument("--engine-cost", action="store_true",
                   help="only measure what pacing costs DecisionEngine.step_batch per event "
                        "(pacing off vs on, same process) and print it")
    p.add_argument("--out", default="bench-results/pacing.json")
    p.add_argument("--plot", default="docs/img/pacing.png")


def _overrides(pairs: list[str]) -> dict:
    from streamagent.config import Settings

    out = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        if name not in Settings.model_fields:
            raise SystemExit(f"unknown setting {name!r}")
        out[name] = value
    return out


def main(args) -> int:
    from streamagent.extras import require

    require("bench", "matplotlib", "rich", what="bench pacing")
    from rich.console import Console

    con = Console(width=max(Console().width, 150))
    if args.engine_cost:
        c = engine_cost()
        con.print(f"step_batch over {c['events']:,} events (batches of 500, best of 5): "
                  f"pacing off {c['us_per_event_pacing_off']:.1f} µs/event, on "
                  f"{c['us_per_event_pacing_on']:.1f} µs/event, ratio {c['ratio_on_off']:.3f}")
        return 0
    over = _overrides(args.set)
    seeds = [int(x) for x in args.seeds.split(",") if x]
    report: dict = {"users": args.users, "days": args.days, "seeds": seeds,
                    "fraction": args.fraction, "gamma": args.gamma, "overrides": over,
                    "prior_profile": args.prior_profile, "runs": []}
    curves_for_plot: dict = {}
    for sname in args.scenarios.split(","):
        for traffic in args.traffic.split(","):
            prior = ({"pacing_prior_profile": known_profile(traffic)}
                     if args.prior_profile == "known" else {})
            for seed in seeds:
                un = run(sname, traffic, "unlimited", args.users, args.days, seed, 1e12,
                         args.gamma)
                budget = args.fraction * un.spend / args.days
                nv = run(sname, traffic, "never", args.users, args.days, seed, budget,
                         args.gamma)
                runs = [un, nv,
                        run(sname, traffic, "mask", args.users, args.days, seed, budget,
                            args.gamma),
                        run(sname, traffic, "paced", args.users, args.days, seed, budget,
                            args.gamma, {**prior, **over})]
                base = float(np.mean(nv.daily_profit))
                start = Shop(scenario(sname), load_catalog(), 1).start_ts
                for r in runs:
                    row = {"scenario": sname, "traffic": traffic, "seed": seed,
                           "policy": r.name, "budget_per_day": budget,
                           "profit_per_user_day": float(np.mean(r.daily_profit)),
                           "spend_per_day": r.spend / args.days,
                           "budget_used": r.spend / args.days / budget,
                           "incremental_profit_per_budget":
                               (float(np.mean(r.daily_profit)) - base) * args.users * args.days
                               / r.spend if r.spend else None,
                           "reached_per_day": float(np.mean(r.reached_by_day)) / args.users,
                           "users_reached": r.users_reached / args.users,
                           "seconds": r.seconds}
                    if r.name in ("mask", "paced"):
                        c = spend_curves(r.coupons, start, args.days, budget)
                        tg = targets_of(r, args.days)
                        # against the paced run's own target (mask: the same, for comparison)
                        dev = deviation(c, targets_of(runs[3], args.days))
                        row.update(every_period_within_10pct=bool(dev.max() <= 0.10),
                                   max_deviation=float(dev.max()),
                                   max_deviation_day1=float(dev[0]),
                                   max_deviation_after_day1=float(dev[1:].max()),
                                   periods_within_10pct=float((dev <= 0.10).mean()),
                                   periods_within_10pct_after_day1=float(
                                       (dev[1:] <= 0.10).mean()),
                                   max_deviation_from_line=float(deviation(c).max()),
                                   mean_curve=c[1:].mean(0).tolist(),
                                   mean_target=tg[1:].mean(0).tolist())
                        if seed == seeds[0]:
                            curves_for_plot[(sname, traffic, r.name)] = (c, r.prices, start,
                                                                         tg)
                    report["runs"].append(row)
                    con.print(f"  {sname:10} {traffic:8} seed {seed} {r.name:9} "
                              f"{row['profit_per_user_day']:.3f}/user/day, "
                              f"spend {row['spend_per_day']:.1f}/day ({r.seconds:.0f}s)")
    _table(con, report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    con.print(f"wrote {out}")
    if args.plot:
        _plot(curves_for_plot, Path(args.plot))
        con.print(f"wrote {args.plot}")
    return 0


def _table(con, report: dict) -> None:
    from rich.table import Table

    table = Table(title=f"budget pacing: budget = {report['fraction']:.0%} of the unlimited "
                        f"spend ({report['users']} users x {report['days']} days, means over "
                        f"seeds {report['seeds']}; prior profile: "
                        f"{report.get('prior_profile', 'none')})")
    cols = ["scenario", "traffic", "policy", "profit/user/day", "budget used",
            "Δprofit per budget", "reached/day", "max |spend-target| (after day 1)",
            "periods within ±10% (all / after day 1)", "max |spend-target| day 1",
            "runs with every period within ±10%"]
    for c in cols:
        table.add_column(c, justify="right" if c not in ("scenario", "traffic", "policy")
                         else "left")
    keys = dict.fromkeys((r["scenario"], r["traffic"], r["policy"]) for r in report["runs"])
    for sname, traffic, pol in keys:
        rs = [r for r in report["runs"] if (r["scenario"], r["traffic"], r["policy"])
              == (sname, traffic, pol)]

        def mean(k):
            v = [r[k] for r in rs if r.get(k) is not None]
            return float(np.mean(v)) if v else None
        inc = mean("incremental_profit_per_budget")
        dev = mean("max_deviation_after_day1")
        within = mean("periods_within_10pct")
        within1 = mean("periods_within_10pct_after_day1")
        table.add_row(sname, traffic, pol, f"{mean('profit_per_user_day'):.3f}",
                      f"{mean('budget_used'):.0%}" if pol not in ("unlimited", "never")
                      else f"({mean('spend_per_day'):.0f}/day)",
                      f"{inc:.3f}" if inc is not None else "-",
                      f"{mean('reached_per_day'):.1%}",
                      f"{dev:.1%}" if dev is not None else "-",
                      f"{within:.0%} / {within1:.0%}" if within is not None else "-",
                      f"{mean('max_deviation_day1'):.1%}" if within is not None else "-",
                      f"{sum(r['every_period_within_10pct'] for r in rs)}/{len(rs)}"
                      if within is not None else "-")
    con.print(table)


def _plot(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    combos = list(dict.fromkeys((s, t) for s, t, _ in curves))
    fig, axes = plt.subplots(2, len(combos), figsize=(5.5 * len(combos), 8), squeeze=False)
    hours = np.arange(25)
    for k, (sname, traffic) in enumerate(combos):
        ax = axes[0][k]
        paced = curves.get((sname, traffic, "paced"))
        target = paced[3][1:].mean(0) if paced is not None else LINE
        ax.plot(hours, target, color="black", ls="--", label="paced target (mean, days 2+)")
        ax.fill_between(hours, target - 0.1, target + 0.1,
                        color="grey", alpha=0.15, label="±10% of budget")
        for pol, color in (("mask", "tab:red"), ("paced", "tab:blue")):
            if (sname, traffic, pol) not in curves:
                continue
            c = curves[(sname, traffic, pol)][0][1:]
            ax.plot(hours, c.mean(0), color=color, label=f"{pol} (mean)")
            ax.fill_between(hours, c.min(0), c.max(0), color=color, alpha=0.2)
        if paced is not None:
            ax.plot(hours, paced[0][0], color="tab:blue", ls=":",
                    label="paced, day 1 (the first period)")
        ax.set_title(f"{sname}, {traffic} traffic: spend over the period")
        ax.set_xlabel("hour of the 24 h budget period")
        ax.set_ylabel("spent / budget share (band: min-max over days 2+)")
        ax.legend(fontsize=8)
        ax = axes[1][k]
        if (sname, traffic, "paced") in curves:
            _, prices, start, _ = curves[(sname, traffic, "paced")]
            if prices:
                ts, lam = zip(*prices)
                ax.plot((np.array(ts) - start) / DAY_MS, lam, lw=0.7, color="tab:blue")
        ax.set_title("paced: shadow price λ over event time")
        ax.set_xlabel("simulated day")
        ax.set_ylabel("λ (Q units per unit of cost)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
