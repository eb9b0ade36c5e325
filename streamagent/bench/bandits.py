"""Myopic contextual bandits people would use instead of Q-learning, for the learning benchmark.

They see the same features our Q-network sees and learn from the same reward records (the
joiner's attributed profit of each decision), but optimise only that immediate reward: they
cannot know that today's coupon costs tomorrow's full-price order.

- ``river_linucb``: River's LinUCBDisjoint (a Bayesian linear regression per arm, optimism by
  one posterior standard deviation).
- ``river_eps_greedy``: epsilon-greedy over River online linear regressions, one per arm (River's
  own ``bandit.EpsilonGreedy`` is context-free, so this is the contextual form people build
  with River's regressors).
- ``vw_cb_adf``: Vowpal Wabbit ``--cb_explore_adf`` (action-dependent features, shared context
  crossed with the action, epsilon-greedy exploration, IPS-style cost learning).

Rewards are divided by ``reward_scale`` before learning (VW and LinUCB's priors assume unit
scale); that changes no ranking. The libraries are optional: missing ones raise a clear error.
"""
from __future__ import annotations

import numpy as np

from streamagent.errors import ConfigError

BANDITS = ("river_linucb", "river_eps_greedy", "vw_cb_adf")


def _need(module: str, pip_name: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ConfigError(f"the {pip_name!r} baseline needs `pip install {pip_name}` "
                          f"(or `pip install -e '.[bench]'`)") from e


class Bandit:
    """act(x) -> (action, probability); learn(x, action, reward, probability)."""

    name = "bandit"

    def act(self, x: np.ndarray, allowed: np.ndarray) -> tuple[int, float]:
        raise NotImplementedError

    def learn(self, x: np.ndarray, a: int, reward: float, prob: float) -> None:
        raise NotImplementedError


class RiverLinUCB(Bandit):
    name = "river_linucb"

    def __init__(self, feature_names, n_actions: int, seed: int, alpha: float = 1.0,
                 beta: float = 1.0, reward_scale: float = 10.0, burn_in: int = 30):
        river = _need("river.bandit", "river")
        # River 0.26's LinUCBDisjoint passes its burn_in to the base class in the reward
        # scaler's place (update() then crashes), so the burn-in is done here: each arm is
        # pulled `burn_in` times first. Without it, its upper bound (posterior mean + one
        # predictive sd, which includes the noise) keeps the first arm ahead of untried ones.
        self.policy = river.LinUCBDisjoint(alpha=alpha, beta=beta, seed=seed)
        self.names, self.n, self.scale, self.burn_in = list(feature_names), n_actions, reward_scale, burn_in
        self.pulls = np.zeros(n_actions, int)
        self.rng = np.random.default_rng(seed)

    def _ctx(self, x):
        return dict(zip(self.names, map(float, x)))

    def act(self, x, allowed):
        arms = [a for a in range(self.n) if allowed[a]]
        young = [a for a in arms if self.pulls[a] < self.burn_in]
        if young:
            a = int(self.rng.choice(young))
            self.pulls[a] += 1
            return a, 1.0 / len(young)
        return int(self.policy._pull(arms, self._ctx(x))), 1.0  # deterministic given its state

    def learn(self, x, a, reward, prob):
        self.policy.update(a, self._ctx(x), reward / self.scale)


class RiverEpsGreedy(Bandit):
    name = "river_eps_greedy"

    def __init__(self, feature_names, n_actions: int, seed: int, epsilon: float = 0.05,
                 lr: float = 0.01, reward_scale: float = 10.0):
        _need("river", "river")
        from river import linear_model, optim, preprocessing

        self.models = [preprocessing.StandardScaler()
                       | linear_model.LinearRegression(optimizer=optim.SGD(lr), intercept_lr=lr)
                       for _ in range(n_actions)]
        self.names, self.n, self.eps, self.scale = list(feature_names), n_actions, epsilon, reward_scale
        self.rng = np.random.default_rng(seed)

    def _ctx(self, x):
        return dict(zip(self.names, map(float, x)))

    def act(self, x, allowed):
        ctx = self._ctx(x)
        q = np.array([self.models[a].predict_one(ctx) if allowed[a] else -np.inf
                      for a in range(self.n)])
        greedy = int(np.argmax(q))
        k = int(allowed.sum())
        if self.rng.random() < self.eps:
            a = int(self.rng.choice(np.flatnonzero(allowed)))
        else:
            a = greedy
        prob = self.eps / k + (1 - self.eps if a == greedy else 0.0)
        return a, prob

    def learn(self, x, a, reward, prob):
        self.models[a].learn_one(self._ctx(x), reward / self.scale)


class VWCbAdf(Bandit):
    name = "vw_cb_adf"

    def __init__(self, feature_names, n_actions: int, seed: int, epsilon: float = 0.05,
                 reward_scale: float = 10.0):
        vw = _need("vowpalwabbit", "vowpalwabbit")
        self.ws = vw.Workspace(f"--cb_explore_adf --epsilon {epsilon} -q sa --quiet "
                               f"--random_seed {seed}")
        self.names, self.n, self.scale = list(feature_names), n_actions, reward_scale
        self.rng = np.random.default_rng(seed)

    def _lines(self, x, allowed, label: tuple[int, float, float] | None = None):
        shared = "shared |s " + " ".join(f"{n}:{float(v):.6g}" for n, v in zip(self.names, x))
        lines, acts = [shared], [a for a in range(self.n) if allowed[a]]
        for a in acts:
            lab = ""
            if label and label[0] == a:
                lab = f"0:{label[1]:.6g}:{label[2]:.6g} "
            lines.append(f"{lab}|a act{a}")
        return lines, acts

    def act(self, x, allowed):
        lines, acts = self._lines(x, allowed)
        pmf = np.asarray(self.ws.predict(lines), dtype=float)
        pmf /= pmf.sum()
        i = int(self.rng.choice(len(acts), p=pmf))
        return acts[i], float(pmf[i])

    def learn(self, x, a, reward, prob):
        # VW minimises cost: a reward is a negative cost
        lines, _ = self._lines(x, np.ones(self.n, bool), (a, -reward / self.scale, prob))
        self.ws.learn(lines)


def make(name: str, feature_names, n_actions: int, seed: int) -> Bandit:
    cls = {"river_linucb": RiverLinUCB, "river_eps_greedy": RiverEpsGreedy, "vw_cb_adf": VWCbAdf}
    if name not in cls:
        raise ConfigError(f"unknown bandit {name!r}; choose from {', '.join(BANDITS)}")
    return cls[name](feature_names, n_actions, seed)
