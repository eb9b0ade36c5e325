"""`streamagent evaluate`: estimate candidate policies' values on logged decisions.

Reads a log (a file, or decision-log + rewards from Kafka), builds each candidate's action
probabilities (offline/policies.py), runs the estimators of core/ope.py with one seed (so
the candidates share the reward model's folds and the bootstrap resamples), then prints a table and the warnings, and writes JSON and a PNG if asked.
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson

from streamagent.core import ope
from streamagent.core.ope import Estimate, LoggedData
from streamagent.errors import OfflineDataError
from streamagent.offline import logs as logfiles
from streamagent.offline import policies
from streamagent.offline.blas import small_blas
from streamagent.units import HOUR_MS

log_ = logging.getLogger("streamagent.evaluate")


@dataclass
class PolicyResult:
    policy: str
    estimates: list[Estimate]
    warnings: list[str] = field(default_factory=list)

    def to_doc(self) -> dict:
        return {"policy": self.policy, "estimates": [e.to_doc() for e in self.estimates],
                "warnings": self.warnings}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_source_arguments(p)
    p.add_argument("--policy", action="append", required=True,
                   help="repeatable: never | always:<action> | logging | SNAPSHOT[:greedy|:epsilon=E]")
    p.add_argument("--estimators", default="ips,snips,dm,dr", help="comma-separated: ips,snips,dm,dr,pdwis")
    p.add_argument("--gamma", type=float, default=None, help="discount for the trajectory estimator (adds pdwis)")
    p.add_argument("--gamma-unit-hours", type=float, default=None,
                   help="discount gamma per this much event time between decisions (default: per decision)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--folds", type=int, default=5, help="cross-fitting folds of the reward model (2-5)")
    p.add_argument("--ridge", type=float, default=None,
                   help="L2 penalty of the ridge reward model (default: chosen by cross-validation)")
    p.add_argument("--min-propensity", type=float, default=1e-3, help="warn below this propensity")
    p.add_argument("--min-ess", type=float, default=100.0, help="warn below this effective sample size")
    p.add_argument("--json", default=None, help="write the results as JSON here")
    p.add_argument("--png", default=None, help="write a plot of the estimates and intervals here")


def add_source_arguments(p: argparse.ArgumentParser) -> None:
    """Where the log comes from (a file, or Kafka and a range): evaluate and train-offline."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--logs", help="log file: .jsonl, .csv or .parquet (schemas/logged-decision.v1.json)")
    src.add_argument("--from-kafka", action="store_true",
                     help="read decision-log joined with rewards (STREAMAGENT_KAFKA_BOOTSTRAP, topic settings)")
    p.add_argument("--since", type=int, default=None, help="with --from-kafka: decisions with ts >= this (ms)")
    p.add_argument("--until", type=int, default=None, help="with --from-kafka: decisions with ts < this (ms)")
    p.add_argument("--start-offset", type=int, default=None, help="with --from-kafka: first decision-log offset (every partition)")
    p.add_argument("--end-offset", type=int, default=None, help="with --from-kafka: decision-log offset to stop before")


def load_log(args) -> tuple[LoggedData, list[str], str]:
    """The log, notes about reading it, and a description of its source."""
    if args.logs:
        return logfiles.read_logs(args.logs), [], str(args.logs)
    from streamagent.config import Settings
    from streamagent.core.catalog import load_catalog
    from streamagent.core.features import FEATURE_NAMES
    from streamagent.offline.kafka_logs import KafkaRange, read_kafka_log
    from streamagent.ops.kafka import kafka_client

    s = Settings()
    rng = KafkaRange(args.since, args.until, args.start_offset, args.end_offset)
    kl = read_kafka_log(kafka_client(s), s.topic_decision_log, s.topic_rewards, rng=rng,
                        actions=load_catalog(s.catalog_path).actions, feature_names=FEATURE_NAMES)
    return kl.log, kl.notes, f"kafka {s.topic_decision_log} + {s.topic_rewards}"


def align_to_snapshots(log: LoggedData, specs: list[str]) -> LoggedData:
    """Put the log on the snapshots' action space (all snapshots must share one)."""
    spaces = {tuple(policies.load_snapshot(s).actions) for s in specs if policies.is_snapshot_spec(s)}
    if len(spaces) > 1:
        raise OfflineDataError(f"the snapshots have different action spaces: {sorted(spaces)}")
    return logfiles.reindex_actions(log, spaces.pop()) if spaces else log


def evaluate(log: LoggedData, specs: list[str], estimators: list[str], *, gamma=None,
             gamma_unit_ms=None, n_bootstrap=1000, seed=0, folds=5, ridge=None,
             min_propensity=1e-3, min_ess=100.0) -> list[PolicyResult]:
    """Every candidate on one log; the seed gives all of them the same folds of the reward
    model (hence the same model) and the same bootstrap resamples."""
    log = align_to_snapshots(log, specs)
    if ridge is None and {"dm", "dr"} & set(estimators):
        ridge = ope.select_ridge(log, folds, seed)
        log_.info("reward model: ridge penalty %g (chosen by %d-fold cross-validation)", ridge, folds)
    kw = dict(gamma=gamma, gamma_unit_ms=gamma_unit_ms, n_bootstrap=n_bootstrap, seed=seed,
              folds=folds, ridge=ridge, min_propensity=min_propensity, min_ess=min_ess)
    out = []
    for spec in specs:
        cand = policies.candidate(spec, log)
        ests = [ope.on_policy_value(log, n_bootstrap, seed)] if cand.on_policy else []
        notes = []
        if cand.pi is not None:
            ests += ope.evaluate_policy(log, cand.pi, estimators, **kw)
            notes = ope.check_log(log, cand.pi, min_propensity=min_propensity, min_ess=min_ess,
                                  seed=seed)
        else:
            notes = ["the logs carry no action_probs: the logging policy gets only its on-policy "
                     "value (the estimators need its probability of every action)"]
        out.append(PolicyResult(spec, ests, notes))
    return out


def print_table(results: list[PolicyResult], title: str) -> None:
    from streamagent.extras import require

    require("offline", "rich", what="the estimates table")
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for col in ("policy", "estimator", "value", "95% CI", "ESS", "n"):
        t.add_column(col, justify="left" if col in ("policy", "estimator") else "right",
                     overflow="fold")
    for res in results:
        for e in res.estimates:
            ess = "" if e.ess is None else f"{e.ess:,.0f}"
            t.add_row(res.policy, e.name, _num(e.value), f"[{_num(e.ci_low)}, {_num(e.ci_high)}]",
                      ess, f"{e.n:,}")
    Console().print(t)


def _num(x: float) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.4g}"


def report_warnings(results: list[PolicyResult], notes: list[str]) -> None:
    for note in notes:
        log_.warning("logs: %s", note)
    for res in results:
        for w in dict.fromkeys(res.warnings + [w for e in res.estimates for w in e.warnings]):
            log_.warning("%s: %s", res.policy, w)


def write_png(results: list[PolicyResult], path: Path | str, title: str) -> None:
    """Estimates with their intervals per policy and estimator; pdwis (a discounted value per
    trajectory, another unit) gets a panel of its own."""
    from streamagent.extras import require

    require("offline", "matplotlib", what="the estimates plot (--png)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(e.name for r in results for e in r.estimates))
    panels = [(n, u) for n, u in (([x for x in names if x != "pdwis"], "per decision"),
                                  (["pdwis"] if "pdwis" in names else [], "discounted, per trajectory"))
              if n]
    fig, axes = plt.subplots(1, len(panels), figsize=(max(6, 1.6 * len(results)) * len(panels), 4),
                             squeeze=False)
    for ax, (panel, unit) in zip(axes[0], panels):
        _panel(ax, results, panel, unit)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _panel(ax, results: list[PolicyResult], names: list[str], unit: str) -> None:
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        pts = [(i, e) for i, r in enumerate(results) for e in r.estimates
               if e.name == name and np.isfinite(e.value)]
        xs = [i - 0.4 + width * (j + 0.5) for i, _ in pts]
        ys = [e.value for _, e in pts]
        err = [[e.value - e.ci_low if np.isfinite(e.ci_low) else 0 for _, e in pts],
               [e.ci_high - e.value if np.isfinite(e.ci_high) else 0 for _, e in pts]]
        ax.errorbar(xs, ys, yerr=err, fmt="o", capsize=3, label=name)
    ax.set_xticks(range(len(results)), [r.policy for r in results], rotation=15)
    ax.set_ylabel(f"estimated value, {unit}")
    ax.legend(fontsize=8)


def main(args) -> int:
    from streamagent.extras import require

    # checked before the estimators run, which can take minutes on large logs
    require("offline", "rich", *(["matplotlib"] if args.png else []), what="streamagent evaluate")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    estimators = [e.strip() for e in args.estimators.split(",") if e.strip()]
    log, notes, source = load_log(args)
    unit = args.gamma_unit_hours * HOUR_MS if args.gamma_unit_hours else None
    try:
        with small_blas():
            results = evaluate(log, args.policy, estimators, gamma=args.gamma,
                               gamma_unit_ms=unit, n_bootstrap=args.bootstrap, seed=args.seed,
                               folds=args.folds, ridge=args.ridge,
                               min_propensity=args.min_propensity, min_ess=args.min_ess)
    except ValueError as exc:
        raise OfflineDataError(str(exc)) from None
    title = f"{source}: {log.n:,} decisions, {log.n_actions} actions"
    print_table(results, title)
    report_warnings(results, notes)
    if args.json:
        doc = {"source": source, "n": log.n, "actions": list(log.action_names),
               "feature_names": list(log.feature_names), "estimators": estimators,
               "gamma": args.gamma, "bootstrap": args.bootstrap, "seed": args.seed,
               "notes": notes, "results": [r.to_doc() for r in results]}
        Path(args.json).write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    if args.png:
        write_png(results, args.png, title)
    return 0
