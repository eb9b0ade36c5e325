"""Off-policy evaluation: what a candidate policy would have earned on logged decisions.

A model must not reach users before we know, from past traffic, roughly what it would earn.
Everything here is pure numpy on arrays: a :class:`LoggedData` (contexts, logged actions,
their propensities, rewards) and the candidate's action probabilities ``pi`` (n, n_actions)
in every logged context. Each estimate comes as an :class:`Estimate` with a seeded bootstrap
95% interval, the effective sample size of the importance weights and warnings that say when
not to trust it.

With ``w_i = pi(a_i | x_i) / p_i`` (the importance weight of the logged action):

- ``ips``: mean(w r). Unbiased if every action the candidate takes had p > 0 in its context;
  its variance grows with the weights.
- ``snips``: sum(w r) / sum(w). A little biased, much steadier when the weights are large.
- ``dm``: mean over rows of sum_a pi(a|x) q(x, a), with a reward model q fitted on other folds
  (cross-fitting). Low variance, but as wrong as the model, and it extrapolates where the
  logs never tried an action.
- ``dr``: dm + mean(w (r - q(x, a_i))). Unbiased if either the propensities or the model are
  right; the estimator to read first.
- ``pdwis`` (gamma > 0): per-decision weighted importance sampling over each user's
  time-ordered decisions, the discounted value per user (Precup et al. 2000).

Bandit estimates are values per decision; ``pdwis`` is a discounted return per user (or per
episode), a different unit.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Iterator, Sequence

import numpy as np

from streamagent.errors import OfflineDataError

BANDIT_ESTIMATORS = ("ips", "snips", "dm", "dr")
ESTIMATORS = BANDIT_ESTIMATORS + ("pdwis",)
MAX_TRAJECTORY_CELLS = 50_000_000  # users x longest trajectory, the padded matrices' size
RIDGE_GRID = (0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0)  # penalties select_ridge chooses from


@dataclass(frozen=True)
class LoggedData:
    """Logged decisions joined with their rewards, one row per decision.

    ``propensities`` holds the logging policy's probability of the logged action (NaN where a
    row has none; None when no row has one). ``allowed`` (n, n_actions) is the mask of actions
    the logging system allowed; ``action_probs`` (n, n_actions) the logging policy's whole
    distribution, when logged. ``episode_ids`` groups rows into trajectories (default: the
    user ids).
    """

    X: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    propensities: np.ndarray | None
    n_actions: int
    feature_names: tuple[str, ...] = ()
    action_names: tuple[str, ...] = ()
    user_ids: np.ndarray | None = None
    ts: np.ndarray | None = None
    allowed: np.ndarray | None = None
    action_probs: np.ndarray | None = None
    episode_ids: np.ndarray | None = None
    decision_ids: np.ndarray | None = None

    def __post_init__(self):
        X = np.asarray(self.X, dtype=np.float64)
        X = X.reshape(len(X), -1) if X.ndim != 2 else X
        n = len(X)
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        set_("X", X)
        set_("actions", _column(self.actions, n, "actions", np.int64))
        set_("rewards", _column(self.rewards, n, "rewards", np.float64))
        if self.propensities is not None:
            p = _column(self.propensities, n, "propensities", np.float64)
            set_("propensities", None if np.isnan(p).all() else p)
        for name in ("user_ids", "episode_ids", "decision_ids"):
            if getattr(self, name) is not None:
                set_(name, _column(getattr(self, name), n, name, object))
        if self.ts is not None:
            set_("ts", _column(self.ts, n, "ts", np.int64))
        for name, dtype in (("allowed", bool), ("action_probs", np.float64)):
            if getattr(self, name) is not None:
                set_(name, _matrix(getattr(self, name), n, self.n_actions, name, dtype))
        set_("feature_names", tuple(self.feature_names) or tuple(f"x{i}" for i in range(X.shape[1])))
        set_("action_names", tuple(self.action_names) or tuple(str(i) for i in range(self.n_actions)))
        self._check()

    def _check(self) -> None:
        if len(self.feature_names) != self.X.shape[1]:
            raise OfflineDataError(f"{len(self.feature_names)} feature names for "
                                   f"{self.X.shape[1]} features")
        if len(self.action_names) != self.n_actions:
            raise OfflineDataError(f"{len(self.action_names)} action names for "
                                   f"{self.n_actions} actions")
        if self.n and (self.actions.min() < 0 or self.actions.max() >= self.n_actions):
            raise OfflineDataError(f"logged action indices must lie in [0, {self.n_actions})")
        p = self.propensities
        if p is not None and np.any((p <= 0) | (p > 1 + 1e-9)):
            raise OfflineDataError("propensities must lie in (0, 1]")

    @property
    def n(self) -> int:
        return len(self.X)

    def subset(self, idx) -> "LoggedData":
        """The rows ``idx`` (indices or a boolean mask) as a new log."""
        arrays = {f.name: getattr(self, f.name)[idx] for f in fields(self)
                  if isinstance(getattr(self, f.name), np.ndarray)}
        return replace(self, **arrays)


def _column(values, n: int, name: str, dtype) -> np.ndarray:
    a = np.asarray(values, dtype=dtype)
    if a.shape != (n,):
        raise OfflineDataError(f"{name} must have shape ({n},), got {a.shape}")
    return a


def _matrix(values, n: int, width: int, name: str, dtype) -> np.ndarray:
    a = np.asarray(values, dtype=dtype)
    if a.shape != (n, width):
        raise OfflineDataError(f"{name} must have shape ({n}, {width}), got {a.shape}")
    return a


@dataclass
class Estimate:
    """One estimator's value of one policy: the point estimate, its bootstrap 95% interval,
    the effective sample size of the importance weights (None where there are none), the
    number of rows (decisions; users or episodes for pdwis) and why not to trust it."""

    name: str
    value: float
    ci_low: float
    ci_high: float
    ess: float | None
    n: int
    warnings: list[str] = field(default_factory=list)

    def to_doc(self) -> dict:
        f = lambda x: None if x is None or not np.isfinite(x) else float(x)  # noqa: E731
        return {"name": self.name, "value": f(self.value), "ci_low": f(self.ci_low),
                "ci_high": f(self.ci_high), "ess": f(self.ess), "n": int(self.n),
                "warnings": list(self.warnings)}


# -- weights and their diagnostics ----------------------------------------------------------

def importance_weights(log: LoggedData, pi: np.ndarray) -> np.ndarray:
    """pi(a_i | x_i) / p_i per row; NaN where the row has no propensity."""
    if log.propensities is None:
        return np.full(log.n, np.nan)
    return pi[np.arange(log.n), log.actions] / log.propensities


def effective_sample_size(w: np.ndarray) -> float:
    """Kish's (sum w)^2 / sum w^2: how many equally weighted rows the weights are worth.
    n when every weight is equal; about n / max(w) when a few large weights dominate."""
    w = w[np.isfinite(w)]
    s2 = float(np.sum(w * w))
    return float(np.sum(w)) ** 2 / s2 if s2 > 0 else 0.0


def check_pi(log: LoggedData, pi: np.ndarray) -> np.ndarray:
    """``pi`` as a float array, after checking it is a distribution over actions per row."""
    pi = np.asarray(pi, dtype=np.float64)
    if pi.shape != (log.n, log.n_actions):
        raise OfflineDataError(f"pi must have shape ({log.n}, {log.n_actions}), got {pi.shape}")
    if np.any(pi < 0) or not np.allclose(pi.sum(1), 1.0, atol=1e-6):
        raise OfflineDataError("pi must be non-negative and sum to 1 over actions in every row")
    return pi


def unsupported_mass(log: LoggedData, pi: np.ndarray, seed: int = 0,
                     rows_per_cell_action: int = 20) -> tuple[float, list[int]]:
    """The share of pi's probability on actions the logs never took in similar contexts, and
    the actions pi uses that were never logged at all.

    "Similar contexts" are cells cut by random hyperplanes through the standardised contexts;
    there are as many cells as leave about ``rows_per_cell_action`` rows per action in each
    (one cell for small logs), so a logging policy that does try every action is not flagged
    by chance. IPS cannot see rewards in unsupported cells; DM and DR extrapolate into them.
    """
    n_bits = int(np.clip(np.floor(np.log2(max(log.n, 1) / (rows_per_cell_action * log.n_actions))), 0, 8))
    cells = _hyperplane_cells(log.X, n_bits, seed)
    seen = np.zeros((2 ** n_bits, log.n_actions), dtype=bool)
    seen[cells, log.actions] = True
    mass = float(np.mean(np.sum(np.where(seen[cells], 0.0, pi), axis=1))) if log.n else 0.0
    never = np.flatnonzero(~seen.any(0) & (pi.sum(0) > 0))
    return mass, [int(a) for a in never]


def _hyperplane_cells(X: np.ndarray, n_bits: int, seed: int) -> np.ndarray:
    if n_bits == 0 or X.shape[1] == 0:
        return np.zeros(len(X), dtype=np.int64)
    Z = (X - X.mean(0)) / np.where(X.std(0) > 0, X.std(0), 1.0)
    planes = np.random.default_rng(seed).standard_normal((X.shape[1], n_bits))
    bits = (Z @ planes) > 0
    return bits.astype(np.int64) @ (1 << np.arange(n_bits))


def _diagnose(log: LoggedData, pi: np.ndarray, w: np.ndarray, min_propensity: float,
              min_ess: float, max_unsupported: float, seed: int) -> dict[str, list[str]]:
    """Warnings by kind: 'propensity', 'support' and 'ess'."""
    out = {"propensity": _propensity_warnings(log, w, min_propensity), "support": [], "ess": []}
    mass, never = unsupported_mass(log, pi, seed)
    if mass > max_unsupported:
        out["support"].append(
            f"the policy puts {mass:.1%} of its probability on actions the logs never took in "
            f"similar contexts: IPS/SNIPS cannot see that part (biased), DM/DR extrapolate "
            f"the reward model into it")
    if never:
        names = [log.action_names[a] for a in never]
        out["support"].append(f"the policy uses actions never logged at all: {names}")
    if log.propensities is not None:
        out["ess"] = _ess_warnings(effective_sample_size(w), int(np.isfinite(w).sum()), min_ess,
                                   "decisions")
    return out


def _propensity_warnings(log: LoggedData, w: np.ndarray, min_propensity: float) -> list[str]:
    p = log.propensities
    if p is None:
        return ["the logs carry no propensity: IPS, SNIPS, DR and PDWIS are impossible, only "
                "DM (which trusts its reward model) is left; log the behaviour policy's "
                "probability of each logged action"]
    out = []
    missing = int(np.isnan(p).sum())
    if missing:
        out.append(f"{missing} of {log.n} decisions carry no propensity: the weighted "
                   f"estimators use the other {log.n - missing}")
    tiny = np.isfinite(p) & (p < min_propensity)
    if tiny.any():
        out.append(f"{int(tiny.sum())} decisions have a propensity below {min_propensity:g} "
                   f"(smallest {np.nanmin(p):.2g}); their weights reach {np.nanmax(w):.3g} and "
                   f"can dominate IPS and DR")
    return out


def _ess_warnings(ess: float, n: int, min_ess: float, rows: str) -> list[str]:
    if ess >= min_ess:
        return []
    return [f"effective sample size {ess:.0f} of {n} {rows}: the weighted estimate rests on few "
            f"{rows} and its interval is unreliable"]


def check_log(log: LoggedData, pi: np.ndarray, *, min_propensity: float = 1e-3,
              min_ess: float = 100.0, max_unsupported: float = 0.05, seed: int = 0) -> list[str]:
    """Every warning about evaluating ``pi`` on ``log``: missing or tiny propensities, missing
    support, a small effective sample size."""
    pi = check_pi(log, pi)
    diag = _diagnose(log, pi, importance_weights(log, pi), min_propensity, min_ess,
                     max_unsupported, seed)
    return diag["propensity"] + diag["support"] + diag["ess"]


# -- the reward model ------------------------------------------------------------------------

@dataclass(frozen=True)
class RidgeRewardModel:
    """q(x, a) = pooled(x) + delta_a(x) on standardised features.

    ``pooled`` is a ridge regression of the reward on all rows (intercept not penalised);
    ``delta_a`` a ridge regression of the pooled model's residuals on the rows of action a,
    every coefficient penalised towards 0. An action with few rows therefore falls back to
    the pooled model instead of to noise; with many rows it is a plain per-action ridge.
    Linear on purpose: DR only needs a model that is roughly right, and a linear one is fast,
    deterministic and works on any feature set. Predictions are not clipped to the rewards'
    range: clipping a noisy model of rare clicks at 0 biases every average upwards.
    """

    mean: np.ndarray
    scale: np.ndarray
    pooled: np.ndarray  # (d + 1,), intercept first
    per_action: np.ndarray  # (n_actions, d + 1)

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Predicted reward of every action, (n, n_actions)."""
        Z = _design(np.asarray(X, dtype=np.float64), self.mean, self.scale)
        return (Z @ self.pooled)[:, None] + Z @ self.per_action.T


def _design(X: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return np.hstack([np.ones((len(X), 1)), (X - mean) / scale])


def _ridge(Z: np.ndarray, y: np.ndarray, wt: np.ndarray, lam: float,
           penalise_intercept: bool) -> np.ndarray:
    penalty = np.full(Z.shape[1], lam)
    if not penalise_intercept:
        penalty[0] = 1e-9 * max(lam, 1.0)  # keeps the system solvable for a constant column
    Zw = Z * wt[:, None]
    return np.linalg.solve(Zw.T @ Z + np.diag(penalty), Zw.T @ y)


def _blocks(Z: np.ndarray, actions: np.ndarray, n_actions: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per action: its rows and their design rows (gathered once, reused by every refit)."""
    rows_of = [np.flatnonzero(actions == a) for a in range(n_actions)]
    return [(rows, Z[rows]) for rows in rows_of]


def _fit_parts(Z: np.ndarray, blocks: list, rewards: np.ndarray, wt: np.ndarray,
               ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """(pooled, per_action) coefficients on the design Z with row weights ``wt``; the
    per-action systems are solved in one batch (an action without rows gets 0)."""
    pooled = _ridge(Z, rewards, wt, ridge, penalise_intercept=False)
    d = Z.shape[1]
    grams, rhs = np.empty((len(blocks), d, d)), np.empty((len(blocks), d))
    for a, (rows, Za) in enumerate(blocks):
        Zw = Za * wt[rows, None]
        grams[a], rhs[a] = Zw.T @ Za, Zw.T @ (rewards[rows] - Za @ pooled)
    grams += ridge * np.eye(d)
    return pooled, np.linalg.solve(grams, rhs[..., None])[..., 0]


def _standardiser(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if not len(X):
        return np.zeros(X.shape[1]), np.ones(X.shape[1])
    std = X.std(0)
    return X.mean(0), np.where(std > 0, std, 1.0)


def fit_reward_model(X: np.ndarray, actions: np.ndarray, rewards: np.ndarray, n_actions: int,
                     ridge: float = 1.0) -> RidgeRewardModel:
    """Fit :class:`RidgeRewardModel` (``ridge`` = the L2 penalty of both parts)."""
    if ridge <= 0:
        raise ValueError("ridge must be positive")
    X, rewards = np.asarray(X, dtype=np.float64), np.asarray(rewards, dtype=np.float64)
    mean, scale = _standardiser(X)
    Z = _design(X, mean, scale)
    pooled, per_action = _fit_parts(Z, _blocks(Z, actions, n_actions), rewards, np.ones(len(Z)),
                                    ridge)
    return RidgeRewardModel(mean, scale, pooled, per_action)


def fold_ids(log: LoggedData, folds: int, seed: int = 0) -> np.ndarray:
    """A fold number per row; all rows of one episode (or user) share a fold, so no user's
    own rewards help predict that user's other decisions."""
    groups = log.episode_ids if log.episode_ids is not None else log.user_ids
    if groups is None:
        codes, n_groups = np.arange(log.n), log.n
    else:
        _, codes = np.unique(groups.astype(str), return_inverse=True)
        n_groups = int(codes.max()) + 1 if log.n else 0
    of_group = np.random.default_rng(seed).permutation(n_groups) % folds
    return of_group[codes]


def _out_of_fold(log: LoggedData, fold: np.ndarray, ridge: float) -> np.ndarray:
    q = np.zeros((log.n, log.n_actions))
    for k in np.unique(fold):
        test = fold == k
        if (~test).any():
            model = fit_reward_model(log.X[~test], log.actions[~test], log.rewards[~test],
                                     log.n_actions, ridge)
            q[test] = model.predict(log.X[test])
    return q


def select_ridge(log: LoggedData, folds: int = 5, seed: int = 0,
                 grid: Sequence[float] = RIDGE_GRID) -> float:
    """The penalty of ``grid`` whose out-of-fold predictions of the logged rewards have the
    smallest squared error. Rewards differ by orders of magnitude between logs (rare clicks,
    profits in euros) and so does the right amount of shrinkage; one fixed penalty either
    lets 80 per-action models fit the noise of a handful of clicks or flattens real effects."""
    fold, rows = fold_ids(log, folds, seed), np.arange(log.n)
    errors = [np.sum((log.rewards - _out_of_fold(log, fold, lam)[rows, log.actions]) ** 2)
              for lam in grid]
    return float(grid[int(np.argmin(errors))])


def cross_fit_rewards(log: LoggedData, folds: int = 5, ridge: float | None = None,
                      seed: int = 0) -> np.ndarray:
    """Out-of-fold predictions q(x_i, a) for every row and action, (n, n_actions).

    Each fold is predicted by a model fitted on the other folds (cross-fitting): a model that
    has seen a row's own reward would make DR's correction term look smaller than it is.
    ``ridge`` None chooses the penalty with :func:`select_ridge` (on the same folds).
    """
    if not 2 <= folds <= 5:
        raise ValueError("cross-fitting takes 2 to 5 folds")
    if ridge is None:
        ridge = select_ridge(log, folds, seed)
    return _out_of_fold(log, fold_ids(log, folds, seed), ridge)


# -- bootstrap -------------------------------------------------------------------------------

def _resample_counts(n: int, n_bootstrap: int, seed: int,
                     cells: int = 2_000_000) -> Iterator[np.ndarray]:
    """Bootstrap resamples of n rows as counts, (b, n) per chunk. The same seed gives the same
    resamples to every estimator and policy, so their intervals are comparable."""
    rng = np.random.default_rng(seed)
    step = max(1, cells // max(n, 1))
    for start in range(0, n_bootstrap, step):
        b = min(step, n_bootstrap - start)
        idx = rng.integers(0, n, size=(b, n)) + (np.arange(b) * n)[:, None]
        yield np.bincount(idx.ravel(), minlength=b * n).reshape(b, n).astype(np.float64)


def _percentile_ci(boots: np.ndarray) -> tuple[float, float]:
    boots = boots[np.isfinite(boots)]
    if not len(boots):
        return float("nan"), float("nan")
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return float(lo), float(hi)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray | float:
    with np.errstate(invalid="ignore", divide="ignore"):
        return num / den


def ratio_estimate(name: str, num: np.ndarray, den: np.ndarray, n_bootstrap: int, seed: int,
                   ess: float | None = None, warnings: Sequence[str] = ()) -> Estimate:
    """sum(num) / sum(den) with a percentile bootstrap interval over rows (a mean when den is
    all ones). Every bandit estimator is one of these."""
    value = float(_ratio(num.sum(), den.sum())) if len(num) else float("nan")
    boots = [_ratio(c @ num, c @ den) for c in _resample_counts(len(num), n_bootstrap, seed)]
    lo, hi = _percentile_ci(np.concatenate(boots)) if boots and len(num) else (np.nan, np.nan)
    return Estimate(name, value, lo, hi, ess, len(num), list(warnings))


def _unavailable(name: str, n: int, reason: str) -> Estimate:
    nan = float("nan")
    return Estimate(name, nan, nan, nan, None, n, [reason])


# -- estimators ------------------------------------------------------------------------------

def on_policy_value(log: LoggedData, n_bootstrap: int = 1000, seed: int = 0) -> Estimate:
    """The mean logged reward: the logging policy's own value (no weights, no model)."""
    return ratio_estimate("on-policy", log.rewards, np.ones(log.n), n_bootstrap, seed,
                          ess=float(log.n))


def dm_refit_interval(log: LoggedData, pi: np.ndarray, ridge: float = 1.0,
                      n_bootstrap: int = 200, seed: int = 0) -> tuple[float, float]:
    """DM's 95% interval with the reward model refitted on every resample.

    Resampling rows under a fixed model shows only how the contexts vary, not how wrong the
    model may be: on the Open Bandit Dataset such an interval is 1/60 as wide as the
    measured truth's own interval and misses it. Refitting (bootstrap counts as row weights) puts the model's own
    estimation error in the interval. The refits are in-sample (no cross-fitting inside a
    resample), which matters little for a ridge model.
    """
    mean, scale = _standardiser(log.X)
    Z = _design(log.X, mean, scale)
    blocks = _blocks(Z, log.actions, log.n_actions)
    vals = []
    for chunk in _resample_counts(log.n, n_bootstrap, seed):
        for c in chunk:
            pooled, per_action = _fit_parts(Z, blocks, log.rewards, c, ridge)
            # sum_i c_i sum_a pi_ia q(x_i, a), without the (n, actions) matrix of q
            per = np.sum((Z.T @ (c[:, None] * pi)) * per_action.T)
            vals.append(((c @ Z) @ pooled + per) / c.sum())
    return _percentile_ci(np.asarray(vals))


def _bandit_terms(name: str, log: LoggedData, pi: np.ndarray, w: np.ndarray,
                  q_hat: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(numerator, denominator) per row of a bandit estimator."""
    r, rows = log.rewards, np.arange(log.n)
    if name == "ips":
        return w * r, np.ones(log.n)
    if name == "snips":
        return w * r, w
    dm = np.sum(pi * q_hat, axis=1)
    if name == "dm":
        return dm, np.ones(log.n)
    return dm + w * (r - q_hat[rows, log.actions]), np.ones(log.n)


def bandit_estimate(name: str, log: LoggedData, pi: np.ndarray, *, q_hat: np.ndarray | None = None,
                    n_bootstrap: int = 1000, seed: int = 0, warnings: Sequence[str] = ()) -> Estimate:
    """One of ips, snips, dm, dr for ``pi`` (weighted ones on the rows that have a propensity)."""
    w = importance_weights(log, pi)
    weighted = name != "dm"
    if weighted and log.propensities is None:
        return _unavailable(name, log.n, "no propensities in the logs: impossible without them")
    if name in ("dm", "dr") and q_hat is None:
        raise ValueError(f"{name} needs the reward model's predictions q_hat")
    num, den = _bandit_terms(name, log, pi, np.nan_to_num(w), q_hat)
    keep = np.isfinite(w) if weighted else np.ones(log.n, dtype=bool)
    ess = effective_sample_size(w) if log.propensities is not None else None
    return ratio_estimate(name, num[keep], den[keep], n_bootstrap, seed, ess, warnings)


def _trajectory_order(log: LoggedData) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row order by (episode, ts), each row's episode number and its step within the episode."""
    groups = log.episode_ids if log.episode_ids is not None else log.user_ids
    if groups is None or log.ts is None:
        raise OfflineDataError("the trajectory estimator needs user ids (or episode ids) and "
                               "timestamps in the logs")
    _, codes = np.unique(groups.astype(str), return_inverse=True)
    order = np.lexsort((log.ts, codes))
    ep = codes[order]
    starts = np.r_[0, np.flatnonzero(np.diff(ep)) + 1]
    step = np.arange(log.n) - np.repeat(starts, np.diff(np.r_[starts, log.n]))
    return order, ep, step


def trajectory_matrices(log: LoggedData, w: np.ndarray, gamma: float,
                        gamma_unit_ms: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per episode and step: the discounted reward times the cumulative weight, and the
    cumulative weight, (episodes, longest episode) each. A shorter episode is padded as if
    absorbed: its weight stays, its reward is 0.

    The discount of step t is gamma^t, or gamma^((ts_t - ts_0) / gamma_unit_ms) when a unit
    is given (the learner's semi-Markov discount over event time).
    """
    order, ep, step = _trajectory_order(log)
    n_ep, length = int(ep.max()) + 1, int(step.max()) + 1
    if n_ep * length > MAX_TRAJECTORY_CELLS:
        raise OfflineDataError(f"{n_ep} episodes of up to {length} decisions are too many "
                               f"for the trajectory estimator: split episodes (next_decision_id) "
                               f"or evaluate a shorter time range")
    W, R, D = np.ones((n_ep, length)), np.zeros((n_ep, length)), np.zeros((n_ep, length))
    W[ep, step], R[ep, step] = w[order], log.rewards[order]
    if gamma_unit_ms:
        t0 = np.zeros(n_ep)
        t0[ep[step == 0]] = log.ts[order][step == 0]
        D[ep, step] = gamma ** ((log.ts[order] - t0[ep]) / gamma_unit_ms)
    else:
        D[ep, step] = gamma ** step.astype(np.float64)
    rho = np.cumprod(W, axis=1)
    return rho * D * R, rho


def _pdwis_value(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """sum over steps of sum(num) / sum(den); a step where every weight is 0 adds 0. Works on
    (steps,) sums or (b, steps) bootstrap sums."""
    with np.errstate(invalid="ignore", divide="ignore"):
        per_step = np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)
    return per_step.sum(-1)


def trajectory_value(log: LoggedData, pi: np.ndarray, gamma: float, *,
                     gamma_unit_ms: float | None = None, n_bootstrap: int = 1000, seed: int = 0,
                     min_ess: float = 100.0, warnings: Sequence[str] = ()) -> Estimate:
    """Per-decision weighted importance sampling (PDWIS): the candidate's expected discounted
    return per episode (a user's decisions in time order, or the episodes next_decision_id
    cuts). Each step's reward is weighted by the product of the weights up to that step,
    normalised over the episodes at that step; the interval comes from resampling episodes,
    since a user's decisions are not independent of each other."""
    if log.propensities is None or np.isnan(log.propensities).any():
        return _unavailable("pdwis", log.n, "the trajectory estimator needs a propensity on "
                            "every decision")
    num, den = trajectory_matrices(log, importance_weights(log, pi), gamma, gamma_unit_ms)
    value = float(_pdwis_value(num.sum(0), den.sum(0)))
    boots = [_pdwis_value(c @ num, c @ den) for c in _resample_counts(len(num), n_bootstrap, seed)]
    lo, hi = _percentile_ci(np.concatenate(boots))
    ess = effective_sample_size(den[:, -1])
    notes = list(warnings) + _ess_warnings(ess, len(num), min_ess, "trajectories")
    return Estimate("pdwis", value, lo, hi, ess, len(num), notes)


def evaluate_policy(log: LoggedData, pi: np.ndarray, estimators: Sequence[str] = BANDIT_ESTIMATORS,
                    gamma: float | None = None, *, gamma_unit_ms: float | None = None,
                    n_bootstrap: int = 1000, seed: int = 0, folds: int = 5,
                    ridge: float | None = None, q_hat: np.ndarray | None = None, min_propensity: float = 1e-3,
                    min_ess: float = 100.0, max_unsupported: float = 0.05,
                    max_refits: int = 200) -> list[Estimate]:
    """Estimate the value of the policy ``pi`` (n, n_actions) on ``log`` with each estimator.

    ``gamma`` > 0 adds ``pdwis`` (discount per decision, or per ``gamma_unit_ms`` of event
    time). DM and DR use a ridge reward model cross-fitted on ``folds`` folds, its penalty
    ``ridge`` chosen by :func:`select_ridge` unless given. ``q_hat`` (n, n_actions) replaces that
    model (it
    must be out-of-fold); DM's interval then holds it fixed (too narrow, and said so), while
    with the built-in model DM's interval refits the model on up to ``max_refits`` resamples.
    Every estimate carries the warnings that concern it; a seed gives the same bootstrap
    resamples to every estimator.
    """
    pi = check_pi(log, pi)
    names = _estimator_names(estimators, gamma)
    w = importance_weights(log, pi)
    diag = _diagnose(log, pi, w, min_propensity, min_ess, max_unsupported, seed)
    own_model = q_hat is None
    if own_model and {"dm", "dr"} & set(names):
        ridge = select_ridge(log, folds, seed) if ridge is None else ridge
        q_hat = cross_fit_rewards(log, folds, ridge, seed)
    out = []
    for name in names:
        if name == "pdwis":
            notes = diag["propensity"] + diag["support"]
            out.append(trajectory_value(log, pi, gamma, gamma_unit_ms=gamma_unit_ms,
                                        n_bootstrap=n_bootstrap, seed=seed, min_ess=min_ess,
                                        warnings=notes))
        elif name == "dm":
            out.append(_dm_estimate(log, pi, q_hat, own_model, diag["support"], ridge,
                                    n_bootstrap, seed, max_refits))
        else:
            notes = diag["propensity"] + diag["support"] + diag["ess"]
            out.append(bandit_estimate(name, log, pi, q_hat=q_hat, n_bootstrap=n_bootstrap,
                                       seed=seed, warnings=notes))
    return out


def _dm_estimate(log: LoggedData, pi: np.ndarray, q_hat: np.ndarray, own_model: bool,
                 notes: list[str], ridge: float, n_bootstrap: int, seed: int,
                 max_refits: int) -> Estimate:
    est = bandit_estimate("dm", log, pi, q_hat=q_hat, n_bootstrap=n_bootstrap, seed=seed,
                          warnings=notes)
    if own_model:
        est.ci_low, est.ci_high = dm_refit_interval(log, pi, ridge, min(n_bootstrap, max_refits), seed)
    else:
        est.warnings.append("DM's interval holds the given reward model fixed: it leaves out the "
                            "model's own error and is too narrow")
    return est


def _estimator_names(estimators: Sequence[str], gamma: float | None) -> list[str]:
    names = list(dict.fromkeys(estimators))
    unknown = [e for e in names if e not in ESTIMATORS]
    if unknown:
        raise ValueError(f"unknown estimators {unknown}; choose from {list(ESTIMATORS)}")
    if gamma is not None and not 0 <= gamma <= 1:
        raise ValueError("gamma must lie in [0, 1]")
    if gamma and "pdwis" not in names:
        names.append("pdwis")
    if "pdwis" in names and not gamma:
        raise ValueError("pdwis is the estimator for gamma > 0: give a gamma")
    return names
