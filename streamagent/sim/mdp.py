"""Finite MDPs: value iteration, policy evaluation, and long-run average reward.

P[a, s, s'] are transition probabilities, R[a, s] expected rewards. The simulator's optimum is
the best long-run profit per user per day, i.e. the average-reward criterion; discounted value
iteration with gamma close to 1 finds that policy (and exact enumeration checks it in tests).
"""
from __future__ import annotations

import numpy as np


def value_iteration(P: np.ndarray, R: np.ndarray, gamma: float, tol: float = 1e-10,
                    max_iter: int = 100_000) -> tuple[np.ndarray, np.ndarray]:
    """Optimal state values and a greedy policy (ties to the lowest action)."""
    n_a, n_s, _ = P.shape
    V = np.zeros(n_s)
    for _ in range(max_iter):
        Q = R + gamma * P @ V  # (n_a, n_s)
        V_new = Q.max(axis=0)
        if np.max(np.abs(V_new - V)) < tol * (1 - gamma) / max(gamma, 1e-12):
            V = V_new
            break
        V = V_new
    Q = R + gamma * P @ V
    return V, Q.argmax(axis=0)


def policy_evaluation(P: np.ndarray, R: np.ndarray, policy: np.ndarray, gamma: float) -> np.ndarray:
    """Discounted values of a deterministic policy, solved exactly."""
    n_s = P.shape[1]
    idx = np.arange(n_s)
    P_pi = P[policy, idx, :]
    R_pi = R[policy, idx]
    return np.linalg.solve(np.eye(n_s) - gamma * P_pi, R_pi)


def stationary(P_pi: np.ndarray, start: int = 0, doublings: int = 20) -> np.ndarray:
    """Long-run state distribution of a Markov chain started in `start`: the Cesaro average
    (1/n) sum_k P^k over n = 2^doublings steps, so periodic chains are handled too. Built by
    doubling: S_2n = S_n + P^n S_n."""
    S = np.eye(P_pi.shape[0])
    Pn = P_pi.copy()
    for _ in range(doublings):
        S = S + Pn @ S
        Pn = Pn @ Pn
    return S[start] / 2.0 ** doublings


def average_reward(P: np.ndarray, R: np.ndarray, policy: np.ndarray, start: int = 0) -> float:
    """Long-run reward per step of a deterministic policy from state `start`."""
    idx = np.arange(P.shape[1])
    return float(stationary(P[policy, idx, :], start) @ R[policy, idx])


def history_optimum(P: np.ndarray, R: np.ndarray, gamma: float, start: int = 0,
                    steps: int = 20_000, decimals: int = 3) -> float:
    """Long-run reward per step of the best policy that knows the MDP but not its state: it
    starts in ``start`` and tracks the state distribution (the belief) from its own actions
    only, b' = b P[a], observing nothing else. In the simulator that is a policy that knows
    the user's segment and infers the hidden conditioning from the coupons it sent, not from
    what the user did: a reference, not a bound (a learner that reads purchases can know more).

    The beliefs reachable from ``start`` (rounded to ``decimals``, which keeps them finite)
    form a deterministic MDP, solved by value iteration; its greedy policy is then followed
    for ``steps`` steps and the reward averaged."""
    n_a = P.shape[0]
    first = np.eye(P.shape[1])[start]
    index = {tuple(np.round(first, decimals)): 0}
    beliefs, nxt = [first], []
    i = 0
    while i < len(beliefs):
        row = []
        for a in range(n_a):
            b2 = beliefs[i] @ P[a]
            key = tuple(np.round(b2, decimals))
            if key not in index:
                index[key] = len(beliefs)
                beliefs.append(np.array(key) / sum(key))
            row.append(index[key])
        nxt.append(row)
        i += 1
    B, T = np.array(beliefs), np.array(nxt)  # T[belief, action] -> next belief
    Rb = B @ R.T  # (beliefs, actions)
    V = np.zeros(len(B))
    for _ in range(100_000):
        V_new = (Rb + gamma * V[T]).max(axis=1)
        if np.max(np.abs(V_new - V)) < 1e-9:
            V = V_new
            break
        V = V_new
    pi = (Rb + gamma * V[T]).argmax(axis=1)
    s, total = 0, 0.0
    for _ in range(steps):
        total += Rb[s, pi[s]]
        s = T[s, pi[s]]
    return total / steps
