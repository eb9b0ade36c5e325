"""`streamagent bench offline`: are the off-policy estimators right on real logged data?

On the Open Bandit Dataset (bench/obd.py) the value of Bernoulli Thompson Sampling is known
twice: estimated from the uniform-random policy's logs (with BTS's action-choice
probabilities), and measured in BTS's own logs (its mean click). This benchmark reports:

1. each estimator's estimate of BTS from the random logs, its 95% interval, its relative error
   against the measured value and whether the interval covers it;
2. obp's own estimators on the very same inputs (same BTS probabilities, same cross-fitted
   reward model), which must agree with ours, and obp's DM/DR with its own logistic model;
3. a policy trained offline on the earlier half of the random logs (greedy on a ridge reward
   model with the position as a feature), estimated on the later half, against the random
   policy's value there and BTS's measured value.

BTS's probabilities come from its production prior (what obp's examples use, the
distribution at the start of the logging period) and, as a check, from the item frequencies in
BTS's own logs (its average over the period, which is what its measured value averages).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import orjson

from streamagent.bench import obd as obd_data
from streamagent.core import ope
from streamagent.core.ope import BANDIT_ESTIMATORS, Estimate
from streamagent.offline.blas import small_blas


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--campaign", default="all", choices=["all", "men", "women"])
    p.add_argument("--rows", type=int, default=None, help="use the first N rows of each file (default all 10,000)")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--folds", type=int, default=5, help="cross-fitting folds of the reward model")
    p.add_argument("--ridge", type=float, default=None,
                   help="L2 penalty of DM/DR's reward model (default: chosen by cross-validation)")
    p.add_argument("--train-ridge", type=float, default=None,
                   help="L2 penalty of the offline-trained policy's reward model (default: chosen "
                        "by cross-validation on the training half)")
    p.add_argument("--n-sim", type=int, default=100_000, help="Monte Carlo draws for BTS's probabilities")
    p.add_argument("--data", default=None, help="directory with random/ and bts/ (default: inside obp)")
    p.add_argument("--no-obp", action="store_true", help="skip the comparison with obp's estimators")
    p.add_argument("--json", default="bench-results/offline.json")


def measured(logs: obd_data.OBD, n_bootstrap: int, seed: int) -> Estimate:
    return ope.on_policy_value(logs.log, n_bootstrap, seed)


def score(est: Estimate, truth: float) -> dict:
    doc = est.to_doc()
    doc["relative_error"] = abs(est.value - truth) / truth if np.isfinite(est.value) else None
    doc["covers"] = bool(est.ci_low <= truth <= est.ci_high) if np.isfinite(est.ci_low) else None
    return doc


def estimate_bts(random: obd_data.OBD, dist: np.ndarray, truth: float, n_bootstrap: int,
                 seed: int, folds: int, ridge: float) -> list[dict]:
    pi = obd_data.policy_at_positions(dist, random.position)
    ests = ope.evaluate_policy(random.log, pi, BANDIT_ESTIMATORS, n_bootstrap=n_bootstrap,
                               seed=seed, folds=folds, ridge=ridge)
    return [score(e, truth) for e in ests]


def obp_estimates(random: obd_data.OBD, dist: np.ndarray, q_hat: np.ndarray, n_bootstrap: int,
                  seed: int, folds: int) -> dict:
    """obp's IPW, SNIPW, DM and DR on our inputs (and DM/DR on obp's own reward model)."""
    try:
        from obp.ope import DirectMethod, DoublyRobust, InverseProbabilityWeighting
        from obp.ope import SelfNormalizedInverseProbabilityWeighting
    except Exception as exc:  # noqa: BLE001 (any import failure means: no comparison)
        return {"available": False, "reason": f"obp cannot be imported: {exc!r}"}
    log, pos = random.log, random.position
    n = log.n
    action_dist = np.ascontiguousarray(np.broadcast_to(dist, (n,) + dist.shape))
    q3 = np.zeros((n, log.n_actions, obd_data.N_POSITIONS))
    q3[np.arange(n), :, pos] = q_hat
    kw = dict(reward=log.rewards, action=log.actions, position=pos, pscore=log.propensities,
              action_dist=action_dist, estimated_rewards_by_reg_model=q3)
    estimators = {"ips": InverseProbabilityWeighting(), "snips": SelfNormalizedInverseProbabilityWeighting(),
                  "dm": DirectMethod(), "dr": DoublyRobust()}
    out = {"available": True, "same_inputs": {}, "own_model": {}}
    for name, est in estimators.items():
        ci = est.estimate_interval(**kw, n_bootstrap_samples=n_bootstrap, random_state=seed)
        out["same_inputs"][name] = {"value": float(est.estimate_policy_value(**kw)),
                                    "ci_low": float(ci["95.0% CI (lower)"]),
                                    "ci_high": float(ci["95.0% CI (upper)"])}
    own = obp_own_model(random, folds, seed)
    if own is not None:
        kw["estimated_rewards_by_reg_model"] = own
        for name in ("dm", "dr"):
            out["own_model"][name] = {"value": float(estimators[name].estimate_policy_value(**kw))}
    return out


def obp_own_model(random: obd_data.OBD, folds: int, seed: int) -> np.ndarray | None:
    """obp's RegressionModel (a logistic regression on context + one-hot item), cross-fitted."""
    try:
        from obp.ope import RegressionModel
        from sklearn.linear_model import LogisticRegression
    except Exception:  # noqa: BLE001
        return None
    log = random.log
    model = RegressionModel(n_actions=log.n_actions, len_list=obd_data.N_POSITIONS,
                            action_context=np.eye(log.n_actions),
                            base_model=LogisticRegression(max_iter=1000, random_state=seed))
    user = log.X[:, :-obd_data.N_POSITIONS]  # obp takes the position separately
    try:
        return model.fit_predict(context=user, action=log.actions, reward=log.rewards.astype(int),
                                 position=random.position, n_folds=folds, random_state=seed)
    except ValueError:  # a fold without a click at some position: nothing to fit
        return None


def top_k_policy(scores: np.ndarray, k: int) -> np.ndarray:
    """Uniform over each row's k best-scored actions (k = 1: greedy)."""
    best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    pi = np.zeros_like(scores)
    np.put_along_axis(pi, best, 1.0 / k, axis=1)
    return pi


def train_offline(random: obd_data.OBD, dist: np.ndarray, ridge: float | None,
                  train_ridge: float | None, folds: int, n_bootstrap: int, seed: int) -> dict:
    """A ridge reward model (position as a feature) fitted on the earlier half of the random
    logs; the policies greedy on it (top 1) and uniform over its 10 best items (top 10, which
    leaves the estimators ten times the rows), estimated on the later half, whose own
    cross-fitted model serves DM and DR."""
    n = random.log.n
    train, test = np.arange(n) < n // 2, np.arange(n) >= n // 2
    tr, te = random.log.subset(train), random.log.subset(test)
    train_ridge = ope.select_ridge(tr, folds, seed) if train_ridge is None else train_ridge
    scores = ope.fit_reward_model(tr.X, tr.actions, tr.rewards, tr.n_actions, train_ridge).predict(te.X)
    kw = dict(n_bootstrap=n_bootstrap, seed=seed, folds=folds, ridge=ridge)
    out = {"train_rows": int(train.sum()), "test_rows": int(test.sum()),
           "train_ridge": train_ridge,
           "distinct_greedy_items": int(len(np.unique(scores.argmax(1))))}
    for k in (1, 10):
        out[f"top_{k}"] = [e.to_doc() for e in
                           ope.evaluate_policy(te, top_k_policy(scores, k), BANDIT_ESTIMATORS, **kw)]
    bts_pi = obd_data.policy_at_positions(dist, random.position[test])
    out["bts_estimated"] = [e.to_doc() for e in ope.evaluate_policy(te, bts_pi, BANDIT_ESTIMATORS, **kw)]
    out["random_on_policy"] = ope.on_policy_value(te, n_bootstrap, seed).to_doc()
    return out


def run(campaign: str = "all", rows: int | None = None, n_bootstrap: int = 1000, seed: int = 0,
        folds: int = 5, ridge: float | None = None, train_ridge: float | None = None,
        n_sim: int = 100_000,
        data: str | None = None, with_obp: bool = True) -> dict:
    with small_blas():
        return _run(campaign, rows, n_bootstrap, seed, folds, ridge, train_ridge, n_sim, data,
                    with_obp)


def _run(campaign, rows, n_bootstrap, seed, folds, ridge, train_ridge, n_sim, data,
         with_obp) -> dict:
    t0 = time.monotonic()
    random = obd_data.load_obd("random", campaign, data, rows)
    bts = obd_data.load_obd("bts", campaign, data, rows)
    truth = measured(bts, n_bootstrap, seed)
    prior = obd_data.bts_action_dist(campaign, n_sim, seed, data)
    freq = np.zeros_like(prior)
    np.add.at(freq, (bts.log.actions, bts.position), 1.0)
    freq /= freq.sum(0, keepdims=True)
    ridge = ope.select_ridge(random.log, folds, seed) if ridge is None else ridge
    q_hat = ope.cross_fit_rewards(random.log, folds, ridge, seed)  # the one evaluate_policy fits
    out = {"dataset": f"Open Bandit Dataset sample, campaign {campaign!r}",
           "rows": {"random": random.log.n, "bts": bts.log.n}, "n_items": random.log.n_actions,
           "bootstrap": n_bootstrap, "seed": seed, "folds": folds, "ridge": ridge,
           "truth": {"bts_measured": truth.to_doc(),
                     "random_measured": measured(random, n_bootstrap, seed).to_doc()},
           "bts_prior": estimate_bts(random, prior, truth.value, n_bootstrap, seed, folds, ridge),
           "bts_logged_frequencies": estimate_bts(random, freq, truth.value, n_bootstrap, seed,
                                                  folds, ridge)}
    if with_obp:
        out["obp"] = obp_estimates(random, prior, q_hat, n_bootstrap, seed, folds)
    out["offline_policy"] = train_offline(random, prior, ridge, train_ridge, folds, n_bootstrap, seed)
    out["seconds"] = round(time.monotonic() - t0, 1)
    return out


def _f(x, digits=5) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def print_report(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    t = res["truth"]["bts_measured"]
    con.print(f"{res['dataset']}: {res['rows']['random']:,} random and {res['rows']['bts']:,} BTS "
              f"impressions, {res['n_items']} items. BTS measured (mean click in its own logs): "
              f"{_f(t['value'])} [{_f(t['ci_low'])}, {_f(t['ci_high'])}]")
    obp = res.get("obp", {})
    for key, title in (("bts_prior", "BTS value from the random logs (BTS production prior)"),
                       ("bts_logged_frequencies", "BTS value from the random logs (BTS's logged item frequencies)")):
        tab = Table(title=title)
        for col in ("estimator", "estimate", "95% CI", "rel. error", "covers truth", "ESS", "obp (same inputs)"):
            tab.add_column(col, justify="left" if col == "estimator" else "right")
        for e in res[key]:
            o = obp.get("same_inputs", {}).get(e["name"]) if key == "bts_prior" else None
            tab.add_row(e["name"], _f(e["value"]), f"[{_f(e['ci_low'])}, {_f(e['ci_high'])}]",
                        f"{e['relative_error']:.1%}", "yes" if e["covers"] else "NO",
                        f"{e['ess']:,.0f}", _f(o["value"]) if o else "")
        con.print(tab)
    if obp and not obp.get("available"):
        con.print(f"obp comparison skipped: {obp['reason']}")
    elif obp.get("own_model"):
        con.print("obp with its own logistic reward model: "
                  + ", ".join(f"{k} {_f(v['value'])}" for k, v in obp["own_model"].items()))
    print_offline(res["offline_policy"], t["value"], con)


def print_offline(off: dict, truth: float, con) -> None:
    from rich.table import Table

    tab = Table(title=f"Trained offline on the earlier {off['train_rows']:,} random impressions, "
                      f"estimated on the later {off['test_rows']:,}")
    for col in ("policy", "estimator", "estimate", "95% CI", "ESS"):
        tab.add_column(col, justify="left" if col in ("policy", "estimator") else "right")
    for label, ests in (("trained: greedy (top 1)", off["top_1"]),
                        ("trained: top 10 uniform", off["top_10"]),
                        ("BTS (prior)", off["bts_estimated"])):
        for e in ests:
            tab.add_row(label, e["name"], _f(e["value"]), f"[{_f(e['ci_low'])}, {_f(e['ci_high'])}]",
                        f"{e['ess']:,.0f}")
    r = off["random_on_policy"]
    tab.add_row("random (logged)", "on-policy", _f(r["value"]), f"[{_f(r['ci_low'])}, {_f(r['ci_high'])}]", "")
    tab.add_row("BTS (measured)", "on-policy", _f(truth), "", "")
    con.print(tab)


def main(args) -> int:
    from streamagent.extras import require

    require("bench", "rich", what="streamagent bench offline")
    res = run(args.campaign, args.rows, args.bootstrap, args.seed, args.folds, args.ridge,
              args.train_ridge, args.n_sim, args.data, not args.no_obp)
    print_report(res)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_bytes(orjson.dumps(res, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
        print(f"wrote {args.json}")
    return 0
