"""Why a decision went the way it did: Q per action, the margin over "no coupon", the rules
that acted, and which features pushed the chosen action up or down.

Attributions are integrated gradients (Sundararajan et al. 2017) of the explained quantity
``Q(chosen) - Q(none)`` (for a "no coupon" decision: ``Q(none) - Q(best coupon)``), along the
straight path from a reference state to the decision's features. Completeness holds: the
attributions add up to the quantity at the decision minus the same at the reference, so each
is a share of a number the marketer can read off the Q table. The reference is a new user at
the same moment, with the same trigger and device: time of day, trigger and device cancel out,
and what remains is what the user's history did.

Pure numpy on the snapshot's weights (a walk along the path to find where ReLUs switch, then
one batched backward pass), no Kafka: the `streamagent explain` command finds the record and the model version.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streamagent.core import features as F
from streamagent.core.policy import margin_hurdle
from streamagent.core.qnet import NumpyQ
from streamagent.core.state import UserState

# features a new user shares with the explained one: the moment, the trigger, the device
_CONTEXT = tuple(i for i, n in enumerate(F.FEATURE_NAMES)
                 if n.startswith(("hour_", "trigger_", "device_")) or n == "bias")


def reference_features(x: np.ndarray, ts: int, trigger_type: str, half_life_ms: int,
                       cap_window_ms: int) -> np.ndarray:
    """A new user's features at ``ts``, with the context features (hour, trigger, device)
    taken from ``x``."""
    ref = F.encode(UserState(user_id="reference"), ts, trigger_type, half_life_ms,
                   cap_window_ms).astype(np.float64)
    ref[list(_CONTEXT)] = np.asarray(x, np.float64)[list(_CONTEXT)]
    return ref


def _out_grad(q: NumpyQ, plus: int, minus: int) -> np.ndarray:
    """d(mean-over-heads Q[plus] - Q[minus]) / d(network output)."""
    g = np.zeros((q.n_heads, q.n_actions))
    g[:, plus] += 1.0 / q.n_heads
    g[:, minus] -= 1.0 / q.n_heads
    return g.reshape(-1)


def gap_and_grad(q: NumpyQ, X: np.ndarray, plus: int, minus: int) -> tuple[np.ndarray, np.ndarray]:
    """``Q[plus] - Q[minus]`` (mean over heads) at each row of ``X`` and its gradient with
    respect to the features, (n,) and (n, features). float64 throughout."""
    h = np.asarray(X, np.float64)
    pre = []
    last = len(q.layers) - 1
    for i, (w, b) in enumerate(q.layers):
        z = h @ w.astype(np.float64) + b
        if i < last:
            pre.append(z)
            h = np.maximum(z, 0.0)
        else:
            h = z
    go = _out_grad(q, plus, minus)
    gap = h @ go
    g = np.broadcast_to(go, h.shape)
    for i in range(last, -1, -1):
        g = g @ q.layers[i][0].astype(np.float64).T
        if i > 0:
            g = g * (pre[i - 1] > 0)
    return gap, g


def _kinks(q: NumpyQ, x: np.ndarray, ref: np.ndarray, limit: int = 100_000) -> np.ndarray:
    """Where on the path ``ref + a (x - ref)``, a in [0, 1], some ReLU switches: between two
    of these points the network is affine in ``a`` and its gradient constant."""
    dx = x - ref
    points, a = [0.0], 0.0
    while a < 1.0 and len(points) < limit:
        probe = a + 1e-9  # the activation pattern just after ``a``
        h, dh, nxt = ref + probe * dx, dx, 1.0
        for w, b in q.layers[:-1]:
            w = w.astype(np.float64)
            z, dz = h @ w + b, dh @ w
            with np.errstate(divide="ignore", invalid="ignore"):
                t = probe - z / dz  # where this unit's pre-activation crosses zero
            t = t[np.isfinite(t) & (t > probe + 1e-12)]
            if t.size:
                nxt = min(nxt, float(t.min()))
            on = z > 0
            h, dh = np.where(on, z, 0.0), np.where(on, dz, 0.0)
        points.append(nxt)
        a = nxt
    if points[-1] < 1.0:
        points.append(1.0)
    return np.asarray(points)


def integrated_gradients(q: NumpyQ, x: np.ndarray, ref: np.ndarray, plus: int,
                         minus: int) -> np.ndarray:
    """Attribution of ``(Q[plus] - Q[minus])(x) - (same)(ref)`` to each feature, exact: the
    network is piecewise linear, so the path integral is a sum over the pieces between the
    points where a ReLU switches, each piece's gradient taken at its middle."""
    x = np.asarray(x, np.float64)
    ref = np.asarray(ref, np.float64)
    pts = _kinks(q, x, ref)
    mids, lens = (pts[:-1] + pts[1:]) / 2, np.diff(pts)
    _, grads = gap_and_grad(q, ref + mids[:, None] * (x - ref), plus, minus)
    return (x - ref) * (lens @ grads)


@dataclass(frozen=True)
class Explanation:
    decision_id: str
    action: str
    explored: bool
    propensity: float
    policy_version: int
    q_values: dict[str, float]
    margin_over_none: float  # Q(chosen) - Q(none); for 'none': Q(none) - Q(best coupon)
    versus: str  # the action the margin is taken against
    blocked: dict[str, str]  # action -> the rules that masked it (caps, budget)
    attributions: list[tuple[str, float, float]]  # (feature, value, contribution), by |c|
    at_reference: float  # the explained gap for a new user at the same moment
    check: float  # sum of the attributions - (gap - at_reference): ~0 (completeness)
    hurdle: float = 0.0  # what a coupon had to beat 'none' by (GREEDY_MARGIN x |Q(none)|)

    def to_doc(self) -> dict:
        return {"decision_id": self.decision_id, "action": self.action,
                "explored": self.explored, "propensity": self.propensity,
                "policy_version": self.policy_version, "q_values": self.q_values,
                "margin_over_none": self.margin_over_none, "versus": self.versus,
                "blocked": self.blocked, "at_reference": self.at_reference,
                "completeness_error": self.check, "hurdle": self.hurdle,
                "attributions": [{"feature": f, "value": v, "contribution": c}
                                 for f, v, c in self.attributions]}


def explain(doc: dict, q: NumpyQ, actions: tuple[str, ...], half_life_ms: int,
            cap_window_ms: int, greedy_margin: float = 0.0,
            margin_cap: float = 0.0) -> Explanation:
    """Explain one decision-log document with the model that made it (and the deciders'
    ``greedy_margin`` with its cap for this model, policy.margin_cap, to say when it held a
    coupon back)."""
    x = np.asarray(doc["features"], np.float64)
    if len(x) != F.N_FEATURES:
        raise ValueError(f"the decision has {len(x)} features, this build {F.N_FEATURES}")
    a = int(doc["action_index"])
    allowed = np.asarray(doc.get("allowed") or [True] * len(actions), bool)
    Q = q.batch(x[None, :].astype(np.float32))[0].astype(np.float64)
    if a != 0:
        versus = 0
    else:  # 'no coupon': against the best coupon it could have sent
        coupons = [i for i in range(1, len(actions)) if allowed[i]] or list(range(1, len(actions)))
        versus = max(coupons, key=lambda i: Q[i])
    ref = reference_features(x, int(doc["ts"]), doc.get("trigger_type", ""), half_life_ms,
                             cap_window_ms)
    attr = integrated_gradients(q, x, ref, a, versus)
    gaps, _ = gap_and_grad(q, np.stack([x, ref]), a, versus)
    order = np.argsort(-np.abs(attr))
    rules = ", ".join(doc.get("blocked_by") or []) or "masked"
    blocked = {actions[i]: rules for i in range(len(actions)) if not allowed[i]}
    return Explanation(
        decision_id=doc["decision_id"], action=actions[a], explored=bool(doc.get("explored")),
        propensity=float(doc.get("propensity", 1.0)),
        policy_version=int(doc.get("policy_version", 0)),
        q_values={actions[i]: float(Q[i]) for i in range(len(actions))},
        margin_over_none=float(gaps[0]), versus=actions[versus], blocked=blocked,
        attributions=[(F.FEATURE_NAMES[i], float(x[i]), float(attr[i])) for i in order],
        at_reference=float(gaps[1]), check=float(attr.sum() - (gaps[0] - gaps[1])),
        hurdle=float(margin_hurdle(Q[0], greedy_margin, margin_cap)))
