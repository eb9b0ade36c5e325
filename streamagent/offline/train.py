"""`streamagent train-offline`: a Q-network learned from logged decisions (a warm start).

A shop that adopts streamagent has months of campaign logs; the learner should not start
from nothing. This fits a streamagent :class:`QNetwork` (the settings' hidden sizes and
Q-heads) to a :class:`LoggedData` and writes it as a :class:`ModelSnapshot` that deciders
load (``STREAMAGENT_MODEL_PATH``) and the learner continues from. The method (docs/OFFLINE.md,
"Warm start: train-offline"):

- **gamma = 0**: one importance-weighted regression of the logged reward on (context, logged
  action): each row weighs min(1 / propensity, max_weight), normalised to mean 1, so an
  action's fit stands for every context, not only those where the logging policy chose it.
- **gamma > 0**: fitted Q-iteration. Each row's s' is the next decision of the same user (or
  episode) in time order, discounted by gamma^(dt / unit) over the event-time gap (the
  learner's semi-Markov discount); no next decision within the horizon: terminal. Iteration
  k regresses r + disc * max over s''s allowed actions of Q_k(s', a'), with the same weights,
  on the same network (warm-started from the previous iteration).
- Each regression runs Adam in epochs until the loss on one user in ten, held aside, stops
  improving (a network that memorises the logged action of each context would otherwise
  make the penalty below meaningless).
- **Conservative**: a CQL penalty (Kumar et al. 2020) in every regression, alpha *
  mean(logsumexp over allowed actions of Q(x, .) - Q(x, a_logged)) in units of the Q scale:
  it lowers Q where the model would choose an action more often than the logs did, most for
  actions the logging policy rarely took in that context, without bound for actions it never
  took there.

The network trains on standardised features and targets divided by a Q scale (RMS reward
times the effective horizon, 1 / (1 - mean discount)); both are folded into the first and last
layer afterwards, so the snapshot takes raw features and gives Q in reward units.
"""
from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch
from torch import nn

from streamagent.core import ope
from streamagent.core.learner import BOOTSTRAP_P
from streamagent.core.ope import LoggedData
from streamagent.core.policy import REWARD_SCALE_KEY
from streamagent.core.qnet import ModelSnapshot, QNetwork, init_network
from streamagent.errors import OfflineDataError
from streamagent.offline import logs as logfiles
from streamagent.offline import policies
from streamagent.offline.evaluate import PolicyResult
from streamagent.units import DAY_MS, HOUR_MS

log_ = logging.getLogger("streamagent.train_offline")

# the command's defaults (gamma, its unit and the horizon come from the settings)
ALPHA = 0.1
ITERATIONS = 20
MAX_EPOCHS = 50
BATCH_SIZE = 256
LR = 1e-3
MAX_WEIGHT = 10.0
EPOCH_STEPS = 50  # an epoch is a pass over the training rows, but at least this many steps
PATIENCE = 3  # a regression stops after this many epochs without a better validation loss
MIN_VALIDATION_ROWS = 200  # smaller logs stop on the training loss
HOLDOUT = 0.3
ESTIMATORS = ("snips", "dm", "dr")


@dataclass(frozen=True)
class OfflineParams:
    """How to fit. ``gamma_unit_ms`` None: discount gamma per decision; ``horizon_ms`` None:
    a user's next decision is s' however late it comes."""

    gamma: float
    hidden: tuple[int, ...]
    heads: int = 1
    gamma_unit_ms: float | None = None
    horizon_ms: float | None = None
    alpha: float = ALPHA
    iterations: int = ITERATIONS
    max_epochs: int = MAX_EPOCHS
    batch_size: int = BATCH_SIZE
    lr: float = LR
    max_weight: float = MAX_WEIGHT
    seed: int = 0

    def __post_init__(self):
        if not 0 <= self.gamma <= 1:
            raise OfflineDataError(f"gamma must lie in [0, 1], got {self.gamma}")
        if self.alpha < 0 or self.max_weight < 1 or self.iterations < 1 or self.max_epochs < 1:
            raise OfflineDataError("alpha must be >= 0, max_weight >= 1, iterations and "
                                   "max_epochs >= 1")


@dataclass
class Fitted:
    snapshot: ModelSnapshot
    q_scale: float  # the unit of the targets (and of alpha's penalty) while training
    losses: list[float]  # each iteration's best loss on the held-aside users (small logs: training loss)
    notes: list[str] = field(default_factory=list)
    terminal: float = 1.0  # share of the training rows without a next decision


# -- transitions and weights -----------------------------------------------------------------

def next_decisions(log: LoggedData, gamma: float, gamma_unit_ms: float | None = None,
                   horizon_ms: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each row's next decision of the same episode (user, or the episodes next_decision_id
    cuts) in ts order, -1 when none within ``horizon_ms`` (terminal), and its discount:
    gamma^(dt / gamma_unit_ms), or gamma per decision; 0 where terminal."""
    groups = log.episode_ids if log.episode_ids is not None else log.user_ids
    if groups is None or log.ts is None:
        raise OfflineDataError("fitted Q-iteration (gamma > 0) needs each decision's user_id and "
                               "ts to find the user's next decision; without them train a "
                               "bandit (--gamma 0)")
    _, codes = np.unique(groups.astype(str), return_inverse=True)
    order = np.lexsort((np.arange(log.n), log.ts, codes))
    nxt = np.full(log.n, -1, dtype=np.int64)
    same = codes[order[1:]] == codes[order[:-1]]
    nxt[order[:-1][same]] = order[1:][same]
    has = nxt >= 0
    dt = np.zeros(log.n)
    dt[has] = log.ts[nxt[has]] - log.ts[has]
    if horizon_ms is not None:
        nxt[has & (dt > horizon_ms)] = -1
        has = nxt >= 0
    disc = np.zeros(log.n)
    disc[has] = gamma ** (dt[has] / gamma_unit_ms) if gamma_unit_ms else gamma
    return nxt, disc


def row_weights(log: LoggedData, max_weight: float) -> tuple[np.ndarray, list[str]]:
    """min(1 / propensity, max_weight) per row (1 where a row has none); max_weight 1 turns
    the weighting off."""
    if log.propensities is None:
        return np.ones(log.n), ["the logs carry no propensity: the regression is unweighted "
                                "(each action fitted where the logging policy chose it)"]
    p = log.propensities
    known = np.isfinite(p)
    w = np.ones(log.n)
    w[known] = np.minimum(1.0 / p[known], max_weight)
    notes = []
    if not known.all():
        notes.append(f"{int((~known).sum())} of {log.n} decisions carry no propensity: they "
                     f"weigh 1 in the regression")
    return w, notes


# -- fitting ---------------------------------------------------------------------------------

def fit(log: LoggedData, p: OfflineParams, rows: np.ndarray | None = None) -> Fitted:
    """Fit a Q-network on the rows ``rows`` of ``log`` (all by default). The rows' next
    decisions may lie outside ``rows`` (their features serve as s'; their rewards are not
    used). The snapshot has the log's actions and feature names, version 0, 0 training steps."""
    rows = np.arange(log.n) if rows is None else np.asarray(rows)
    rows = np.flatnonzero(rows) if rows.dtype == bool else rows.astype(np.int64)
    if not len(rows):
        raise OfflineDataError("no logged decisions to train on")
    if p.gamma > 0:
        nxt, disc = next_decisions(log, p.gamma, p.gamma_unit_ms, p.horizon_ms)
    else:
        nxt, disc = np.full(log.n, -1, dtype=np.int64), np.zeros(log.n)
    w, notes = row_weights(log, p.max_weight)
    r = log.rewards[rows]
    horizon = 1.0 / (1.0 - min(float(disc[rows].mean()), 0.99))
    q_scale = float(np.sqrt(np.mean(r * r))) * horizon or 1.0
    mean, std = log.X[rows].mean(0), log.X[rows].std(0)
    std = np.where(std > 1e-12, std, 1.0)
    Z = torch.as_tensor((log.X - mean) / std, dtype=torch.float32)  # every row: s' too
    allowed = torch.as_tensor(policies.allowed_mask(log))
    boot = np.ones((len(rows), p.heads), np.float32)
    if p.heads > 1:  # each head its own bootstrap sample, as in the learner
        boot = (np.random.default_rng(p.seed).random((len(rows), p.heads)) < BOOTSTRAP_P).astype(np.float32)
    data = _Rows.of(log, rows, Z, allowed, w[rows] / w[rows].mean(), boot, r / q_scale,
                    nxt[rows], disc[rows])
    val = torch.as_tensor(_validation(log, rows, p.seed))
    train_d, val_d = data.take(~val), data.take(val)
    net = init_network(log.X.shape[1], log.n_actions, tuple(p.hidden), p.seed, p.heads)
    opt = torch.optim.Adam(net.parameters(), lr=p.lr)
    gen = torch.Generator().manual_seed(p.seed)
    losses = []
    for _ in range(p.iterations if p.gamma > 0 else 1):
        y = data.targets(net, Z, allowed)  # Q_0 = 0 (zero output layer): the first y is r
        losses.append(_regress(net, opt, train_d, y[~val], val_d, y[val], p, gen))
    _fold(net, mean, std, q_scale)
    snap = ModelSnapshot.from_network(net, 0, 0, tuple(log.action_names), tuple(log.feature_names))
    snap.created_at = time.time()
    snap.meta = {"outcome": "offline", "source": "train-offline", "gamma": float(p.gamma),
                 "alpha": float(p.alpha), "iterations": int(p.iterations if p.gamma > 0 else 1),
                 "rows": int(len(rows)), "q_scale": q_scale,
                 REWARD_SCALE_KEY: float(np.mean(log.rewards[rows], dtype=np.float64))}
    return Fitted(snap, q_scale, losses, notes, float(1.0 - (nxt[rows] >= 0).mean()))


@dataclass
class _Rows:
    """The training rows as tensors: scaled features, logged action, weight, bootstrap mask
    per head, allowed actions (the logged one always), scaled reward, next row and discount."""

    Z: torch.Tensor
    a: torch.Tensor
    w: torch.Tensor
    boot: torch.Tensor
    allowed: torch.Tensor
    r: torch.Tensor
    nxt: torch.Tensor  # index into the whole log, -1 = terminal
    disc: torch.Tensor

    @classmethod
    def of(cls, log, rows, Z, allowed, w, boot, r, nxt, disc) -> "_Rows":
        a = torch.as_tensor(log.actions[rows])
        idx = torch.as_tensor(rows)
        ok = allowed[idx].clone()
        ok[torch.arange(len(rows)), a] = True
        f32 = lambda x: torch.as_tensor(x, dtype=torch.float32)  # noqa: E731
        return cls(Z[idx], a, f32(w), f32(boot), ok, f32(r), torch.as_tensor(nxt), f32(disc))

    def take(self, mask: torch.Tensor) -> "_Rows":
        return _Rows(*(getattr(self, f.name)[mask] for f in fields(self)))

    def __len__(self) -> int:
        return len(self.Z)

    def targets(self, net: QNetwork, Z: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """r + disc * max over the allowed actions of s' of Q(s', a'), per head, (rows, heads)."""
        y = self.r[:, None].expand(-1, net.heads).clone()
        cont = self.nxt >= 0
        if cont.any():
            nxt = self.nxt[cont]
            with torch.no_grad():
                q = net.forward_heads(Z[nxt]).masked_fill(~allowed[nxt][:, None, :], -torch.inf)
                best = q.amax(-1)
            y[cont] += self.disc[cont][:, None] * torch.where(torch.isfinite(best), best, 0.0)
        return y


def _validation(log: LoggedData, rows: np.ndarray, seed: int) -> np.ndarray:
    """Which training rows are set aside to stop each regression: the rows of one user in
    ten (episodes, or rows without user ids); none for small logs."""
    none = np.zeros(len(rows), dtype=bool)
    if len(rows) < MIN_VALIDATION_ROWS:
        return none
    val = ope.fold_ids(log.subset(rows), 10, seed) == 0
    return val if 0 < val.mean() <= 0.3 else none


def _loss(net: QNetwork, d: _Rows, y: torch.Tensor, alpha: float) -> torch.Tensor:
    """Weighted squared error of Q(x, a_logged) against y, per head on its bootstrap sample,
    plus alpha times the CQL term logsumexp_a Q(x, a) - Q(x, a_logged)."""
    q = net.forward_heads(d.Z)  # (rows, heads, actions)
    qa = q.gather(-1, d.a[:, None, None].expand(-1, net.heads, 1)).squeeze(-1)
    count = d.boot.sum().clamp(min=1.0)
    loss = (d.boot * d.w[:, None] * (qa - y) ** 2).sum() / count
    if alpha > 0:
        lse = torch.logsumexp(q.masked_fill(~d.allowed[:, None, :], -torch.inf), -1)
        loss = loss + alpha * (d.boot * (lse - qa)).sum() / count
    return loss


def _regress(net: QNetwork, opt, train: _Rows, y: torch.Tensor, val: _Rows, y_val: torch.Tensor,
             p: OfflineParams, gen: torch.Generator) -> float:
    """Adam on :func:`_loss` in epochs (a pass over the rows, at least EPOCH_STEPS steps) until
    the loss on the validation rows (the training loss without them) has not improved for
    PATIENCE epochs, at most max_epochs; the best epoch's weights are kept. Its loss."""
    n = len(train)
    steps = max(math.ceil(n / p.batch_size), EPOCH_STEPS)
    best, best_state, worse = math.inf, None, 0
    perm, pos = torch.empty(0, dtype=torch.long), n
    for _ in range(p.max_epochs):
        total = 0.0
        for _ in range(steps):
            if pos >= n:
                perm, pos = torch.randperm(n, generator=gen), 0
            idx = perm[pos:pos + p.batch_size]
            pos += p.batch_size
            loss = _loss(net, train.take(idx), y[idx], p.alpha)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
        if len(val):
            with torch.no_grad():
                score = _loss(net, val, y_val, p.alpha).item()
        else:
            score = total / steps
        if best_state is None or score < best - 1e-4 * abs(best):
            best, worse = score, 0
            best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        else:
            worse += 1
            if worse >= PATIENCE:
                break
    if not math.isfinite(best):
        raise OfflineDataError(f"the regression diverged (loss {best}): lower --lr, or check "
                               f"the logs' rewards and features for huge values")
    net.load_state_dict(best_state)
    return best


def _fold(net: QNetwork, mean: np.ndarray, std: np.ndarray, q_scale: float) -> None:
    """Put the input standardisation into the first layer and the Q scale into the last, so
    the network takes raw features and answers in reward units."""
    linear = [m for m in net.net if isinstance(m, nn.Linear)]
    with torch.no_grad():
        first = linear[0]
        W = first.weight.double()
        first.bias.copy_(first.bias.double() - W @ torch.as_tensor(mean / std))
        first.weight.copy_(W / torch.as_tensor(std)[None, :])
        linear[-1].weight.mul_(q_scale)
        linear[-1].bias.mul_(q_scale)


# -- the log: actions, split -----------------------------------------------------------------

def align_to_catalog(log: LoggedData, actions: tuple[str, ...]) -> tuple[LoggedData, list[str]]:
    """The log on the catalog's action space (a model's actions are the catalog's, in its
    order). Logged actions the catalog lacks are an error; catalog actions never logged are
    kept (the penalty keeps the model off them) and noted."""
    unknown = [a for a in log.action_names if a not in actions]
    if unknown:
        raise OfflineDataError(f"the logs' actions {unknown} are not in the catalog's "
                               f"{list(actions)}: a model is trained for the catalog's actions. "
                               f"Point STREAMAGENT_CATALOG_PATH at a catalog that has them, or "
                               f"name the logged actions by the catalog's coupon ids")
    out = logfiles.reindex_actions(log, actions)
    logged = set(np.unique(out.actions).tolist())
    never = [name for i, name in enumerate(actions) if i not in logged]
    notes = [f"catalog actions never logged: {never}: the model has no data on them (the "
             f"conservative penalty keeps it off them)"] if never else []
    return out, notes


def split_by_time(log: LoggedData, holdout: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) row indices: the later ``holdout`` share of the decisions by ts (by row
    order without ts) is held out."""
    if not 0 <= holdout < 1:
        raise OfflineDataError(f"--holdout must lie in [0, 1), got {holdout}")
    order = np.argsort(log.ts, kind="stable") if log.ts is not None else np.arange(log.n)
    cut = log.n - int(round(holdout * log.n))
    return np.sort(order[:cut]), np.sort(order[cut:])


# -- the held-out estimate -------------------------------------------------------------------

def held_out_estimates(snapshot: ModelSnapshot, test: LoggedData, gamma: float,
                       gamma_unit_ms: float | None, n_bootstrap: int = 500,
                       seed: int = 0) -> list[PolicyResult]:
    """The model's greedy policy (off-policy: SNIPS, DM, DR per decision; PDWIS per user for
    gamma > 0) and the logging policy's on-policy value on the held-out decisions."""
    pi = policies.snapshot_policy(snapshot, test, where="the trained model")
    g = gamma if gamma > 0 and test.ts is not None else None
    ests = ope.evaluate_policy(test, pi, ESTIMATORS, gamma=g, gamma_unit_ms=gamma_unit_ms,
                               n_bootstrap=n_bootstrap, seed=seed)
    notes = ope.check_log(test, pi, seed=seed)
    logging_ests = [ope.on_policy_value(test, n_bootstrap, seed)]
    if g is not None:  # the logging policy's own discounted return per user: weights 1
        own = replace(test, propensities=np.ones(test.n))
        est = ope.trajectory_value(own, policies.one_hot(test.actions, test.n_actions), g,
                                   gamma_unit_ms=gamma_unit_ms, n_bootstrap=n_bootstrap, seed=seed)
        logging_ests.append(replace(est, name="pdwis (on-policy)", warnings=[]))
    return [PolicyResult("warm start (greedy)", ests, notes),
            PolicyResult("logging policy", logging_ests)]


def verdict(results: list[PolicyResult], min_ess: float = 100.0) -> list[str]:
    """One line per comparable pair: the model's DR (and PDWIS) interval against the logging
    policy's value."""
    model = {e.name: e for e in results[0].estimates}
    logged = {e.name: e for e in results[1].estimates}
    lines = []
    for mine, theirs, unit in (("dr", "on-policy", "per decision (immediate reward)"),
                               ("pdwis", "pdwis (on-policy)", "discounted, per user")):
        e, base = model.get(mine), logged.get(theirs)
        if e is None or base is None or not np.isfinite(e.value):
            continue
        where = ("above" if e.ci_low > base.value else "below" if e.ci_high < base.value
                 else "around")
        line = (f"{mine.upper()} {unit}: model {e.value:.4g} [{e.ci_low:.4g}, {e.ci_high:.4g}] "
                f"vs logging {base.value:.4g}: the interval lies {where} the logging policy's value")
        if e.ess is not None and e.ess < min_ess:
            line += f", but on an effective sample size of {e.ess:.0f}: not to be trusted"
        lines.append(line)
    if not lines:
        lines.append("no doubly robust estimate (the held-out logs carry no propensities): "
                     "read DM, which trusts its reward model")
    return lines


# -- the command -----------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    from streamagent.offline.evaluate import add_source_arguments

    add_source_arguments(p)
    p.add_argument("--out", required=True, help="write the model snapshot here (e.g. model.pt)")
    p.add_argument("--gamma", type=float, default=None,
                   help="discount; 0 = bandit regression (default STREAMAGENT_GAMMA, as the learner)")
    p.add_argument("--gamma-unit-hours", type=float, default=None,
                   help="gamma applies per this much event time between a user's decisions "
                        "(default STREAMAGENT_GAMMA_UNIT_HOURS); 0 = per decision")
    p.add_argument("--horizon-days", type=float, default=None,
                   help="no next decision within this: terminal (default "
                        "STREAMAGENT_TRANSITION_HORIZON_DAYS)")
    p.add_argument("--alpha", type=float, default=ALPHA,
                   help="conservative (CQL) penalty on actions the logs rarely took; 0 = none")
    p.add_argument("--iterations", type=int, default=ITERATIONS, help="fitted Q-iterations (gamma > 0)")
    p.add_argument("--max-epochs", type=int, default=MAX_EPOCHS,
                   help="at most this many passes over the rows per regression (each stops "
                        "earlier when the loss on held-aside users stops improving)")
    p.add_argument("--lr", type=float, default=LR, help="Adam learning rate")
    p.add_argument("--max-weight", type=float, default=MAX_WEIGHT,
                   help="clip of the rows' inverse-propensity weights; 1 = unweighted")
    p.add_argument("--holdout", type=float, default=HOLDOUT,
                   help="the later share of the decisions (by ts) held out for the estimate; "
                        "0 = train on all, no estimate")
    p.add_argument("--bootstrap", type=int, default=500, help="bootstrap resamples of the estimate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-steps", type=int, default=0,
                   help="training steps recorded in the snapshot: deciders' epsilon follows "
                        "them (0 = explore like a fresh model; STREAMAGENT_EPSILON_DECAY_STEPS "
                        "= start at EPSILON_END)")
    p.add_argument("--publish", action="store_true",
                   help="also put the model on model-candidates (promote it with `streamagent "
                        "model promote VERSION`)")


def params_from(args, s) -> OfflineParams:
    """The command's options over the settings (gamma, its unit, the horizon, the network)."""
    gamma = s.gamma if args.gamma is None else args.gamma
    unit_h = s.gamma_unit_hours if args.gamma_unit_hours is None else args.gamma_unit_hours
    horizon_d = s.transition_horizon_days if args.horizon_days is None else args.horizon_days
    return OfflineParams(gamma=gamma, hidden=tuple(s.hidden_sizes), heads=s.q_heads,
                         gamma_unit_ms=unit_h * HOUR_MS if unit_h else None,
                         horizon_ms=horizon_d * DAY_MS if horizon_d else None, alpha=args.alpha,
                         iterations=args.iterations, max_epochs=args.max_epochs, lr=args.lr,
                         max_weight=args.max_weight, seed=args.seed)


def feature_note(log: LoggedData) -> str | None:
    from streamagent.core.features import FEATURE_NAMES

    if tuple(log.feature_names) == FEATURE_NAMES:
        return None
    shown = list(log.feature_names[:6]) + (["..."] if len(log.feature_names) > 6 else [])
    return (f"the logs' features ({len(log.feature_names)}: {shown}) are not the live feature set "
            f"({len(FEATURE_NAMES)} features): the model is for the logs' features. streamagent "
            f"evaluate takes it on logs of that feature set; deciders and the learner refuse it")


def publish(snapshot: ModelSnapshot, s) -> ModelSnapshot:
    """Put the snapshot on model-candidates as the next version (not promoted)."""
    from streamagent.core.features import FEATURE_NAMES
    from streamagent.ops.kafka import kafka_client, make_producer
    from streamagent.stream.registry import candidates

    if tuple(snapshot.feature_names) != FEATURE_NAMES:
        raise OfflineDataError("--publish: the model is for another feature set than the live "
                               "one; deciders would refuse it (the snapshot file is written)")
    snapshot.version = max([0, *candidates(s)]) + 1
    p = make_producer(kafka_client(s), **{"message.max.bytes": 16 * 1024 * 1024})
    p.produce(s.topic_model_candidates, key=str(snapshot.version).encode(),
              value=snapshot.to_bytes())
    if p.flush(30):
        raise OfflineDataError(f"could not publish to {s.topic_model_candidates} within 30 s")
    return snapshot


def main(args) -> int:
    from streamagent.config import Settings
    from streamagent.core.catalog import load_catalog
    from streamagent.offline.blas import small_blas
    from streamagent.extras import require
    from streamagent.offline.evaluate import load_log, print_table, report_warnings

    require("offline", "rich", what="streamagent train-offline")  # its held-out table, after training
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    s = Settings()
    p = params_from(args, s)
    log, notes, source = load_log(args)
    log, more = align_to_catalog(log, load_catalog(s.catalog_path).actions)
    notes += more
    train, test = split_by_time(log, args.holdout)
    method = (f"fitted Q-iteration, gamma {p.gamma:g}"
              + (f" per {p.gamma_unit_ms / HOUR_MS:g} h" if p.gamma_unit_ms else " per decision")
              + f", {p.iterations} iterations" if p.gamma > 0 else "reward regression (gamma 0)")
    print(f"{source}: training on {len(train):,} decisions, holding out {len(test):,}; {method}, "
          f"alpha {p.alpha:g}, network {list(p.hidden)} x {p.heads} head(s)", flush=True)
    t0 = time.monotonic()
    with small_blas():
        fitted = fit(log, p, train)
    snap = fitted.snapshot
    snap.train_steps = args.train_steps
    losses = " -> ".join(f"{x:.4g}" for x in dict.fromkeys([fitted.losses[0], fitted.losses[-1]]))
    print(f"trained in {time.monotonic() - t0:.1f} s; loss {losses} (Q-scale units, first -> "
          f"last iteration)" + (f"; {fitted.terminal:.0%} of the transitions terminal"
                                if p.gamma > 0 else ""))
    note = feature_note(log)
    if note:
        notes.append(note)
    if len(test):
        try:
            with small_blas():
                results = held_out_estimates(snap, log.subset(test), p.gamma, p.gamma_unit_ms,
                                             args.bootstrap, args.seed)
        except ValueError as exc:
            raise OfflineDataError(str(exc)) from None
        print_table(results, f"held out: the later {len(test):,} decisions by ts")
        report_warnings(results, [])
        for line in verdict(results):
            print(line)
        dr = {e.name: e for e in results[0].estimates}.get("dr")
        if dr is not None and np.isfinite(dr.value):
            snap.meta.update({"candidate_value": dr.value,
                              "live_value": results[1].estimates[0].value, "n": int(len(test))})
    else:
        notes.append("--holdout 0: no held-out estimate; evaluate the model on other logs "
                     "(streamagent evaluate --policy MODEL)")
    for n in notes:
        log_.warning("%s", n)
    snap.save(args.out)
    use = ("streamagent evaluate --policy FILE on logs of its feature set" if note else
           "STREAMAGENT_MODEL_PATH for the learner (or deciders, pinned), or --publish")
    print(f"wrote {args.out}: {len(snap.feature_names)} features, actions {list(snap.actions)}; "
          f"use it with {use}")
    if args.publish:
        snap = publish(snap, s)
        snap.save(args.out)  # the file says which version it is
        print(f"published as model v{snap.version} on {s.topic_model_candidates}; promote it "
              f"with: streamagent model promote {snap.version}")
    return 0
