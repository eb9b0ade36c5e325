"""Candidate policies as action probabilities ``pi`` (n, n_actions) on a log's contexts.

Specs (as `streamagent evaluate --policy` takes them):

- ``never``: always 'none' (no coupon).
- ``always:<action>``: that action wherever the log allowed it, else 'none'.
- ``logging``: the logging policy itself. Its on-policy value is the mean logged reward (a
  sanity line); with the logging policy's whole distribution in the log (``action_probs``)
  the estimators run on it too, and IPS must then equal the mean.
- ``<snapshot file>`` or ``<file>:greedy``: a model snapshot's masked argmax of its Q values
  (the logged ``allowed`` mask, when there is one; ties go to the lowest index, as in the
  deciders). ``<file>:epsilon=0.05``: its epsilon-greedy probabilities at that epsilon.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streamagent.core.ope import LoggedData
from streamagent.core.qnet import ModelSnapshot, NumpyQ
from streamagent.errors import OfflineDataError
from streamagent.offline.logs import NO_ACTION


@dataclass(frozen=True)
class Candidate:
    """A named policy; ``pi`` None means only its on-policy value can be given (the logging
    policy without a logged distribution)."""

    name: str
    pi: np.ndarray | None
    on_policy: bool = False


def allowed_mask(log: LoggedData) -> np.ndarray:
    return log.allowed if log.allowed is not None else np.ones((log.n, log.n_actions), dtype=bool)


def one_hot(actions: np.ndarray, n_actions: int) -> np.ndarray:
    pi = np.zeros((len(actions), n_actions))
    pi[np.arange(len(actions)), actions] = 1.0
    return pi


def action_index(log: LoggedData, name: str) -> int:
    if name not in log.action_names:
        raise OfflineDataError(f"action {name!r} is not among the logged actions "
                               f"{list(log.action_names)}")
    return log.action_names.index(name)


def never_policy(log: LoggedData) -> np.ndarray:
    return one_hot(np.full(log.n, action_index(log, NO_ACTION)), log.n_actions)


def always_policy(log: LoggedData, action: str) -> np.ndarray:
    """``action`` where allowed; 'none' where caps or budget blocked it (as a decider would)."""
    a, none = action_index(log, action), action_index(log, NO_ACTION)
    return one_hot(np.where(allowed_mask(log)[:, a], a, none), log.n_actions)


def logging_policy(log: LoggedData) -> np.ndarray | None:
    return log.action_probs


def check_snapshot(snapshot: ModelSnapshot, log: LoggedData, where: str = "the model") -> None:
    """A model scores only the features it was trained on, in the same order: say exactly
    what differs, so a backtest on another system's logs fails with something to fix."""
    model, logged = tuple(snapshot.feature_names), tuple(log.feature_names)
    if model == logged:
        return
    missing = [f for f in model if f not in logged]
    extra = [f for f in logged if f not in model]
    detail = (f"missing from the logs: {missing}; in the logs but not in the model: {extra}"
              if missing or extra else "the same names in a different order")
    raise OfflineDataError(f"{where} was trained on {len(model)} features, the logs carry "
                           f"{len(logged)}: {detail}. Evaluate it on logs with its feature set, "
                           f"or train a model for the logs' features")


def q_values(snapshot: ModelSnapshot, log: LoggedData) -> np.ndarray:
    """The snapshot's Q values in every logged context, (n, n_actions), via NumpyQ (the
    deciders' forward pass)."""
    nq = NumpyQ(snapshot)
    X = log.X.astype(np.float32)
    return np.stack([nq(x) for x in X]) if log.n else np.zeros((0, log.n_actions))


def greedy_policy(q: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Masked argmax; ties go to the lowest index ('none' first), as in the deciders."""
    return one_hot(np.argmax(np.where(allowed, q, -np.inf), axis=1), q.shape[1])


def epsilon_greedy_policy(q: np.ndarray, allowed: np.ndarray, epsilon: float) -> np.ndarray:
    """core.policy.action_probs's 'epsilon' strategy for every row at once: epsilon spread
    over the allowed actions, the rest on the greedy one."""
    if not 0 <= epsilon <= 1:
        raise OfflineDataError(f"epsilon must lie in [0, 1], got {epsilon}")
    pi = np.where(allowed, epsilon / allowed.sum(1, keepdims=True), 0.0)
    return pi + (1.0 - epsilon) * greedy_policy(q, allowed)


def snapshot_policy(snapshot: ModelSnapshot, log: LoggedData, epsilon: float | None = None,
                    where: str = "the model") -> np.ndarray:
    """pi of a model snapshot on ``log`` (whose actions must be the model's, in its order)."""
    check_snapshot(snapshot, log, where)
    if tuple(snapshot.actions) != tuple(log.action_names):
        raise OfflineDataError(f"{where} has actions {list(snapshot.actions)}, the logs "
                               f"{list(log.action_names)}: re-index the logs on the model's "
                               f"actions first (offline.logs.reindex_actions)")
    q = q_values(snapshot, log)
    allowed = allowed_mask(log)
    return greedy_policy(q, allowed) if epsilon is None else epsilon_greedy_policy(q, allowed, epsilon)


def split_snapshot_spec(spec: str) -> tuple[Path, float | None]:
    """'model.pt' / 'model.pt:greedy' -> (path, None); 'model.pt:epsilon=0.05' -> (path, 0.05)."""
    path, _, mode = spec.rpartition(":") if ":" in spec else (spec, "", "greedy")
    if mode == "greedy":
        return Path(path), None
    if mode.startswith("epsilon="):
        try:
            return Path(path), float(mode.split("=", 1)[1])
        except ValueError:
            pass
    raise OfflineDataError(f"policy {spec!r}: a snapshot is PATH, PATH:greedy or PATH:epsilon=E")


def is_snapshot_spec(spec: str) -> bool:
    return spec not in ("never", "logging") and not spec.startswith("always:")


def load_snapshot(spec: str) -> ModelSnapshot:
    path, _ = split_snapshot_spec(spec)
    if not path.is_file():
        raise OfflineDataError(f"policy {spec!r}: no such snapshot file {path} (other policies: "
                               f"never, always:<action>, logging)")
    return ModelSnapshot.load(path)


def candidate(spec: str, log: LoggedData) -> Candidate:
    """The policy named by ``spec`` (see the module docstring) on ``log``."""
    if spec == "never":
        return Candidate(spec, never_policy(log))
    if spec.startswith("always:"):
        return Candidate(spec, always_policy(log, spec.split(":", 1)[1]))
    if spec == "logging":
        return Candidate(spec, logging_policy(log), on_policy=True)
    _, epsilon = split_snapshot_spec(spec)
    return Candidate(spec, snapshot_policy(load_snapshot(spec), log, epsilon, where=spec))
