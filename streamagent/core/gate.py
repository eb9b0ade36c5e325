"""The promotion gate: a candidate model reaches the deciders only if, on recent logged
decisions it was not trained on, it is no worse than the live model.

Both greedy policies (under the masks the deciders applied) are valued on the same held-out
decisions with the doubly robust estimator (core/ope.py: reward model cross-fitted on the
window, importance weights from the logged propensities). The test is on the *paired*
difference, candidate minus live, row by row, with a bootstrap 95% interval: an identical
candidate differs by exactly 0, and the noise both share cancels. The candidate is promoted
when the interval's lower bound is at least ``-margin x |live value|``.

Rewards here are per decision (the attributed profit in the attribution window), so the gate
catches regressions in what decisions earn soon after they are made (a model that starts
couponing loyal customers, a late collapse); the long-run value is what the learner itself
optimises. Fewer than ``min_samples`` held-out decisions: the candidate is promoted
"unverified" (a cold start has nothing to compare with), said so in the record and metrics.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from streamagent.core.ope import LoggedData, cross_fit_rewards, ratio_estimate
from streamagent.core.policy import greedy_actions, margin_cap
from streamagent.core.qnet import NumpyQ


@dataclass(frozen=True)
class GateParams:
    margin: float  # relative: the candidate may be this fraction of |live value| worse
    min_samples: int  # held-out decisions needed to judge
    # lower_bound: promote only if the difference's 95% lower bound clears the floor (the
    # candidate is shown no worse); not_worse: promote unless its upper bound is below the
    # floor (the candidate is shown worse). See LEARNING.md for when each fits.
    rule: str = "lower_bound"
    n_bootstrap: int = 500
    folds: int = 3
    greedy_margin: float = 0.0  # the deciders' margin for coupons (EngineParams.greedy_margin)
    greedy_margin_max: float = 0.0  # and its cap (EngineParams.greedy_margin_max)


@dataclass(frozen=True)
class Verdict:
    outcome: str  # promoted | rejected | unverified
    n: int
    live_value: float = float("nan")  # DR value per decision of the live greedy policy
    candidate_value: float = float("nan")
    diff: float = float("nan")  # candidate - live
    diff_low: float = float("nan")  # bootstrap 95% interval of the difference
    diff_high: float = float("nan")
    reason: str = ""

    @property
    def promote(self) -> bool:
        return self.outcome in ("promoted", "unverified")

    def to_doc(self) -> dict:
        return asdict(self)


def greedy_pi(q: NumpyQ, X: np.ndarray, allowed: np.ndarray | None,
              greedy_margin: float = 0.0, cap: float = 0.0) -> np.ndarray:
    """The greedy policy of a model as action probabilities (n, actions), masked as the
    deciders masked, with their margin for coupons and its cap (the model's: margin_cap; ties
    go to 'no coupon', as in the engine)."""
    Q = q.batch(X)
    pi = np.zeros(Q.shape, dtype=np.float64)
    pi[np.arange(len(Q)), greedy_actions(Q, allowed, greedy_margin, cap)] = 1.0
    return pi


def _dr_terms(log: LoggedData, pi: np.ndarray, q_hat: np.ndarray) -> np.ndarray:
    rows = np.arange(log.n)
    w = pi[rows, log.actions] / log.propensities
    return np.sum(pi * q_hat, axis=1) + w * (log.rewards - q_hat[rows, log.actions])


def judge(candidate: NumpyQ, live: NumpyQ, log: LoggedData, p: GateParams,
          seed: int = 0) -> Verdict:
    """Promote the candidate, or not, on the held-out decisions ``log``."""
    if log.n < p.min_samples or log.propensities is None:
        return Verdict("unverified", log.n, reason=f"{log.n} held-out decisions, "
                                                   f"{p.min_samples} needed to judge")
    q_hat = cross_fit_rewards(log, folds=p.folds, seed=seed)
    live_t = _dr_terms(log, greedy_pi(live, log.X, log.allowed, p.greedy_margin,
                                      margin_cap(live.meta, p.greedy_margin_max)), q_hat)
    cand_t = _dr_terms(log, greedy_pi(candidate, log.X, log.allowed, p.greedy_margin,
                                      margin_cap(candidate.meta, p.greedy_margin_max)), q_hat)
    est = ratio_estimate("dr-diff", cand_t - live_t, np.ones(log.n), p.n_bootstrap, seed)
    live_v = float(live_t.mean())
    floor = -p.margin * abs(live_v)
    ok = (est.ci_low if p.rule == "lower_bound" else est.ci_high) >= floor - 1e-12
    return Verdict("promoted" if ok else "rejected", log.n, live_v, float(cand_t.mean()),
                   est.value, est.ci_low, est.ci_high,
                   reason=(f"difference {est.value:+.4f} per decision, 95% interval "
                           f"[{est.ci_low:+.4f}, {est.ci_high:+.4f}], floor {floor:+.4f}"))


class Holdout:
    """A window of the most recent held-out decisions (transitions the learner does not train
    on), as a LoggedData for :func:`judge`."""

    def __init__(self, size: int, n_features: int, n_actions: int):
        self.size, self.n_actions = size, n_actions
        self.X = np.zeros((size, n_features), np.float32)
        self.a = np.zeros(size, np.int64)
        self.r = np.zeros(size, np.float64)
        self.p = np.ones(size, np.float64)
        self.allowed = np.ones((size, n_actions), bool)
        self.users = np.empty(size, object)
        self.n = self.pos = 0

    def add(self, features, action: int, reward: float, propensity: float, allowed,
            user: str) -> None:
        i = self.pos
        self.X[i], self.a[i], self.r[i], self.p[i] = features, action, reward, propensity
        self.allowed[i] = True if allowed is None else allowed
        self.users[i] = user
        self.pos = (i + 1) % self.size
        self.n = min(self.n + 1, self.size)

    def state(self) -> dict:
        """For the learner's checkpoint (tensors and plain values only)."""
        import torch

        n = self.n
        return {"X": torch.from_numpy(self.X[:n].copy()), "a": torch.from_numpy(self.a[:n].copy()),
                "r": torch.from_numpy(self.r[:n].copy()), "p": torch.from_numpy(self.p[:n].copy()),
                "allowed": torch.from_numpy(self.allowed[:n].copy()),
                "users": [str(u) for u in self.users[:n]], "pos": self.pos}

    def load(self, st: dict | None) -> None:
        if not st:
            return
        n = min(len(st["a"]), self.size)
        self.X[:n], self.a[:n] = st["X"][:n].numpy(), st["a"][:n].numpy()
        self.r[:n], self.p[:n] = st["r"][:n].numpy(), st["p"][:n].numpy()
        self.allowed[:n] = st["allowed"][:n].numpy()
        self.users[:n] = st["users"][:n]
        self.n, self.pos = n, int(st["pos"]) % self.size

    def log(self) -> LoggedData:
        n = self.n
        return LoggedData(X=self.X[:n], actions=self.a[:n], rewards=self.r[:n],
                          propensities=self.p[:n], n_actions=self.n_actions,
                          user_ids=self.users[:n], allowed=self.allowed[:n])


def held_out(decision_id: str, fraction: float) -> bool:
    """Whether a decision is held out from training for the gate: a hash of its id, so every
    learner (and every replay) holds out the same ones."""
    from streamagent.core.policy import uniform_from

    return fraction > 0 and uniform_from(0, decision_id) < fraction
