"""Behaviour policy: masked greedy / epsilon-greedy / softmax with logged propensities.

Random draws come from the decision id, not from a process-wide generator: the same
trigger event gets the same draw on any worker, in any replay, so a one-worker and a
two-worker run make the same decisions.
"""
from __future__ import annotations

import hashlib

import numpy as np


def decision_id(app_id: str, event_id: str) -> str:
    return hashlib.blake2b(f"{app_id}|{event_id}".encode(), digest_size=16).hexdigest()


def uniform_from(seed: int, decision_id_: str) -> float:
    """A uniform number in [0, 1) that depends only on (seed, decision id)."""
    h = hashlib.blake2b(f"{seed}|{decision_id_}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2.0 ** 64


def epsilon_at(train_steps: int, start: float, end: float, decay_steps: int) -> float:
    if train_steps >= decay_steps:
        return end
    return start + (end - start) * train_steps / decay_steps


# ModelSnapshot.meta: the learner's average reward per decision (replay), for margin_cap
REWARD_SCALE_KEY = "reward_per_decision"


def margin_cap(meta: dict | None, margin_max: float) -> float:
    """The most the greedy margin may hold a coupon back by, in Q units, for a model with
    ``meta`` (ModelSnapshot.meta): ``margin_max`` times the average reward per decision its
    learner saw (``reward_per_decision``); 0 (no cap) without a usable figure, or with
    margin_max 0. Metadata is not checked like weights: anything but a positive finite number
    counts as none, so a model with odd metadata is used with the margin alone."""
    scale = meta.get(REWARD_SCALE_KEY) if isinstance(meta, dict) else None
    if (not margin_max or isinstance(scale, bool) or not isinstance(scale, (int, float))
            or not np.isfinite(scale) or scale <= 0):
        return 0.0
    return float(margin_max * scale)


def margin_hurdle(q_none, margin: float, cap: float = 0.0):
    """How much a coupon's advantage over 'no coupon' must exceed to be greedy: ``margin x
    |Q(none)|``, at most ``cap`` if that is above 0 (:func:`margin_cap`). A number or, for
    rows, an array."""
    hurdle = margin * np.abs(q_none)
    return np.minimum(hurdle, cap) if cap > 0 else hurdle


def confident_greedy(q_heads: np.ndarray, allowed: np.ndarray, z: float,
                     margin: float = 0.0, cap: float = 0.0) -> int:
    """The greedy action of the ensemble's mean, except that a coupon must beat 'no coupon'
    (action 0) clearly: its mean advantage must exceed ``margin x |Q(none)|`` (or ``cap``,
    if that is less and above 0: :func:`margin_cap`), and, with several heads, the mean
    advantage minus ``z`` standard deviations over the heads must be positive. With one head
    and margin 0 it is the plain masked argmax."""
    q = q_heads.mean(0)
    best = int(np.argmax(np.where(allowed, q, -np.inf)))  # ties go to the lowest: 'none'
    if best == 0 or not allowed[0]:
        return best
    adv = q_heads[:, best] - q_heads[:, 0]
    if margin > 0 and adv.mean() <= margin_hurdle(q[0], margin, cap):
        return 0
    if z <= 0 or q_heads.shape[0] < 2:
        return best
    return best if adv.mean() - z * adv.std(ddof=1) > 0 else 0


def greedy_actions(Q: np.ndarray, allowed: np.ndarray | None, margin: float = 0.0,
                   cap: float = 0.0) -> np.ndarray:
    """Row-wise :func:`confident_greedy` for one head: the masked argmax, except that a coupon
    whose advantage over 'no coupon' is at most ``margin x |Q(none)|`` (at most ``cap``, if
    above 0) gives way to it."""
    Qm = Q if allowed is None else np.where(allowed, Q, -np.inf)
    best = np.argmax(Qm, axis=1)
    if margin > 0:
        none_ok = np.ones(len(Q), bool) if allowed is None else allowed[:, 0]
        rows = np.arange(len(Q))
        weak = (Q[rows, best] - Q[:, 0]) <= margin_hurdle(Q[:, 0], margin, cap)
        best = np.where((best != 0) & none_ok & weak, 0, best)
    return best


def head_choices(q_heads: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Each head's masked greedy action."""
    return np.argmax(np.where(allowed[None, :], q_heads, -np.inf), axis=1)


def thompson_pool(head_greedy: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """What an exploring user may follow: each head's greedy action, and each allowed action
    once. The heads carry the model's uncertainty (where they disagree); the allowed actions
    keep every action tried even where the heads agree, as they all do before any training."""
    return np.concatenate([head_greedy, np.flatnonzero(allowed)])


def action_probs(q: np.ndarray, allowed: np.ndarray, strategy: str, epsilon: float,
                 temperature: float, greedy: int | None = None,
                 head_greedy: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """Probabilities over all actions (0 where not allowed) and the greedy action.

    ``greedy`` overrides the masked argmax of ``q`` (the confident greedy action of an
    ensemble); ``thompson`` explores with probability epsilon by following one draw from the
    pool of the heads' choices and the allowed actions (see :func:`thompson_pool`).
    """
    masked = np.where(allowed, q, -np.inf)
    if greedy is None:
        greedy = int(np.argmax(masked))  # ties go to the lowest index: 'none' first
    n = int(allowed.sum())
    if strategy == "greedy" or n == 1:
        p = np.zeros(len(q))
        p[greedy] = 1.0
    elif strategy == "epsilon":
        p = np.where(allowed, epsilon / n, 0.0)
        p[greedy] += 1.0 - epsilon
    elif strategy == "thompson":
        if head_greedy is None or len(head_greedy) < 2:
            raise ValueError("thompson exploration needs a model with several Q-heads "
                             "(STREAMAGENT_Q_HEADS > 1)")
        pool = thompson_pool(head_greedy, allowed)
        p = np.bincount(pool, minlength=len(q)) * (epsilon / len(pool))
        p[greedy] += 1.0 - epsilon
    elif strategy == "softmax":
        z = np.where(allowed, (q - masked[greedy]) / temperature, -np.inf)
        e = np.exp(z)
        p = e / e.sum()
    else:
        raise ValueError(f"unknown exploration strategy {strategy!r}")
    return p, greedy


def sample(p: np.ndarray, u: float) -> int:
    """Inverse-CDF draw with a given uniform number; never picks a zero-probability action."""
    c = np.cumsum(p)
    idx = int(np.searchsorted(c, u * c[-1], side="right"))
    idx = min(idx, len(p) - 1)
    while p[idx] == 0.0:  # float edge: step back onto an action with mass
        idx -= 1
    return idx
