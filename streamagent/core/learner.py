"""Online Q-learning from transitions: replay (uniform or prioritised), target network,
Double-DQN targets, Huber loss, Adam, gradient clipping, explicit seeds.

Decisions come at irregular event times, so this is a semi-Markov problem: the discount for a
transition is gamma ** (dt / gamma_unit), dt being the event time to the user's next decision.
"""
from __future__ import annotations

import io
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from streamagent.core.contracts import Transition
from streamagent.core.modelcheck import MAX_SAFE_INT, weights_finite
from streamagent.core.policy import REWARD_SCALE_KEY
from streamagent.core.qnet import (ModelSnapshot, QNetwork, as_network, init_network,
                                   published, shift_output)
from streamagent.errors import InvalidMessage

log = logging.getLogger("streamagent.learner")

# proportional prioritised replay (Schaul et al. 2016), their published values
PER_ALPHA = 0.6
PER_BETA = 0.4
PER_EPS = 1e-3
BOOTSTRAP_P = 0.5  # chance that a transition is in one head's bootstrap sample
RECENTER_EVERY = 50  # gradient steps between two recomputations of the reward offset


@dataclass(frozen=True)
class LearnerParams:
    """Built from Settings by streamagent.params.learner_params (no defaults of its own)."""

    gamma: float
    gamma_unit_ms: int  # gamma applies once per this much event time between decisions
    lr: float
    batch_size: int
    buffer_size: int
    learning_starts: int
    train_every: int  # gradient steps happen every this many transitions
    target_update: str  # soft | hard
    tau: float  # soft update rate
    target_every: int  # hard update period, in gradient steps
    double_dqn: bool
    # Advantage learning (Bellemare et al. 2016): subtract alpha * (V(s) - Q(s, a)) from the
    # target. It widens the gap between the best action and the rest, so small errors in Q
    # (noisy rewards, function approximation) flip the greedy action less often. 0 = off.
    advantage_alpha: float
    # in reward units: with sparse rewards (mostly 0, sometimes a 20-unit profit) a delta of 1
    # makes the loss act like L1 and Q regress to the median (0) instead of the mean
    huber_delta: float
    grad_clip: float
    # Publish the target network (a slow moving average of the online weights) rather than
    # the online one: the online weights jitter from batch to batch, and with action gaps of
    # a few percent of Q that jitter flips deciders' greedy actions back and forth.
    publish_average: bool
    # n-step returns: learn from the rewards of a user's next n decisions before bootstrapping.
    # A coupon's cost (fatigue, lost full-price orders) shows in the rewards of the following
    # days; one-step targets must carry it through a noisy estimate of V(s'), n-step ones see
    # it directly. Transitions of a user wait (at most n - 1 of them) until n are in.
    n_step: int
    n_step_max_users: int  # users with waiting transitions; beyond, the oldest flush
    prioritized: bool
    seed: int
    # Bootstrapped DQN (Osband et al. 2016): Q-heads on a shared torso, each trained on its own
    # bootstrap sample of the transitions (each transition is in a head's sample with
    # probability BOOTSTRAP_P). 1 = one plain Q-network.
    heads: int
    # Dueling heads (qnet.QNetwork): a state value learned from every transition, the actions'
    # advantages on top. Published snapshots are plain networks either way.
    dueling: bool = False
    # Reward centering (Naik et al. 2024), exact for our semi-Markov discounts: the network
    # learns Q - C, with C = the replay's reward per unit of (1 - discount), i.e. the average
    # reward rate over 1 - gamma. See QLearner.offset.
    center_rewards: bool = False
    # The value of never sending a coupon again as a floor. "No coupon" is always allowed, so
    # V*(s) >= V_never(s); a second small network learns V_never by plain policy evaluation
    # (no max, so no maximisation bias) from the transitions whose action was "no coupon".
    # Targets bootstrap from max(max_a Q(s', a), V_never(s')), and a one-sided loss holds
    # Q(s, none) of every replayed state at least at V_never(s) less ``never_floor_slack`` of
    # it (a noisy V_never above Q would otherwise bias against coupons). It carries the value
    # of a long rest (a fatigued user left alone for weeks) into Q(s, none) at once, where
    # Q-learning alone needs the rest's every state visited under the greedy policy, and the
    # states a trap keeps a user in have almost no "no coupon" transitions of their own: the
    # casual users' trap of docs/BENCHMARKS.md.
    never_floor: bool = False
    never_floor_slack: float = 0.0


class Replay:
    """A ring buffer of transitions; proportional prioritised sampling when alpha > 0."""

    def __init__(self, capacity: int, n_features: int, n_actions: int, prioritized: bool,
                 alpha: float, rng: np.random.Generator, heads: int = 1):
        self.capacity, self.prioritized, self.alpha, self.rng = capacity, prioritized, alpha, rng
        self.s = np.zeros((capacity, n_features), np.float32)
        self.s2 = np.zeros((capacity, n_features), np.float32)
        self.a = np.zeros(capacity, np.int64)
        self.r = np.zeros(capacity, np.float32)
        self.disc = np.zeros(capacity, np.float32)  # gamma^(dt/unit), 0 when terminal
        self.mask2 = np.ones((capacity, n_actions), bool)
        self.prio = np.zeros(capacity, np.float64)
        self.boot = np.ones((capacity, heads), np.float32)  # which heads learn from it
        self.n = 0
        self.pos = 0

    def __len__(self) -> int:
        return self.n

    def add(self, s, a, r, s2, disc, mask2, boot=None) -> None:
        i = self.pos
        self.s[i], self.a[i], self.r[i], self.s2[i], self.disc[i] = s, a, r, s2, disc
        self.mask2[i] = mask2
        self.boot[i] = 1.0 if boot is None else boot
        # new transitions get the largest priority seen, so each is replayed at least once soon
        self.prio[i] = self.prio[: self.n].max() if self.n else 1.0
        self.pos = (i + 1) % self.capacity
        self.n = min(self.n + 1, self.capacity)

    def sample(self, k: int, beta: float) -> tuple[np.ndarray, np.ndarray]:
        if not self.prioritized:
            return self.rng.integers(0, self.n, size=k), np.ones(k, np.float32)
        p = self.prio[: self.n] ** self.alpha
        p /= p.sum()
        idx = self.rng.choice(self.n, size=k, p=p)
        w = (self.n * p[idx]) ** (-beta)
        return idx, (w / w.max()).astype(np.float32)

    def update(self, idx: np.ndarray, td: np.ndarray, eps: float) -> None:
        if self.prioritized:
            self.prio[idx] = np.abs(td) + eps

    def state(self) -> dict:
        n = self.n
        return {"s": torch.from_numpy(self.s[:n].copy()), "s2": torch.from_numpy(self.s2[:n].copy()),
                "a": torch.from_numpy(self.a[:n].copy()), "r": torch.from_numpy(self.r[:n].copy()),
                "disc": torch.from_numpy(self.disc[:n].copy()),
                "mask2": torch.from_numpy(self.mask2[:n].copy()),
                "prio": torch.from_numpy(self.prio[:n].copy()),
                "boot": torch.from_numpy(self.boot[:n].copy()), "pos": self.pos}

    def load(self, st: dict) -> None:
        n = len(st["a"])
        for name in ("s", "s2", "a", "r", "disc", "mask2", "prio", "boot"):
            if name in st:  # checkpoints from before the heads have no "boot": all ones
                getattr(self, name)[:n] = st[name].numpy()
        self.n, self.pos = n, int(st["pos"])


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:200]  # torch's messages run to pages


class QLearner:
    """learn_one(transition) -> stats; snapshot() -> a versioned, tensors-only model."""

    def __init__(self, actions: tuple[str, ...], feature_names: tuple[str, ...],
                 hidden: tuple[int, ...], params: LearnerParams, initial: ModelSnapshot | None = None):
        self.p, self.actions, self.feature_names, self.hidden = params, actions, feature_names, hidden
        torch.manual_seed(params.seed)  # torch's global generator drives nothing else here
        self.rng = np.random.default_rng(params.seed)
        nf, na = len(feature_names), len(actions)
        if initial is not None:
            self._check_initial(initial)
        k = params.heads
        duel = params.dueling
        self.online = (as_network(initial.state_dict, nf, na, tuple(initial.hidden), k, duel)
                       if initial else init_network(nf, na, hidden, params.seed, k, duel))
        self.target = init_network(nf, na, hidden, params.seed, k, duel)
        self.target.load_state_dict(self.online.state_dict())
        self.opt = torch.optim.Adam(self.online.parameters(), lr=params.lr)
        self.replay = Replay(params.buffer_size, nf, na, params.prioritized, PER_ALPHA, self.rng,
                             heads=k)
        # V_never (see LearnerParams.never_floor): one output, its own seed and optimiser
        self.never_online = self.never_target = self.never_opt = None
        if params.never_floor:
            self.never_online = init_network(nf, 1, hidden, params.seed + 1)
            self.never_target = init_network(nf, 1, hidden, params.seed + 1)
            self.never_opt = torch.optim.Adam(self.never_online.parameters(), lr=params.lr)
        self.version = initial.version if initial else 0
        self.train_steps = initial.train_steps if initial else 0
        self.seen = 0
        # user -> the user's latest transitions, oldest first, waiting to form n-step returns
        self.pending: dict[str, list[tuple]] = {}
        self.last_loss = float("nan")
        self.last_max_q = float("nan")
        # Reward centering: the networks compute Q - offset. Every reward a transition brings
        # is r - offset * (1 - disc); summed along a trajectory the (1 - disc) terms telescope
        # to 1, so every Q (any state, any action) moves by exactly -offset and the greedy
        # choice does not change. What changes is what the network has to represent: Q is
        # r_bar / (1 - gamma) (about 20 days of profit) plus the action gaps (a few percent),
        # and at the learning rate that keeps those gaps steady the big common part takes
        # the whole run to grow (regulars' Q still rising at day 120). With the offset the
        # network starts at the data's average value and learns only the differences.
        # Published models add it back (uncentered Q for the deciders and the margin).
        self.offset = 0.0
        # the first offset is a jump start (the untrained network outputs 0: "the average");
        # after it, and from a trained initial model, a change of offset is absorbed by the
        # output biases so that the uncentered Q stays what it was
        self._offset_set = initial is not None and initial.train_steps > 0

    def _check_initial(self, initial: ModelSnapshot) -> None:
        """The starting model (STREAMAGENT_MODEL_PATH, model-updates) must have this learner's
        network shape, actions and features: say which differs instead of failing in torch."""
        from streamagent.errors import ConfigError

        v = f"model v{initial.version}"
        if initial.heads != self.p.heads:
            raise ConfigError(f"{v} has {initial.heads} Q-heads but STREAMAGENT_Q_HEADS is "
                              f"{self.p.heads}; set it to match or start from a fresh model")
        if tuple(initial.hidden) != tuple(self.hidden):
            raise ConfigError(f"{v} has hidden layers {list(initial.hidden)} but "
                              f"STREAMAGENT_HIDDEN_SIZES is {list(self.hidden)}; set it to match "
                              f"or start from a fresh model")
        if tuple(initial.actions) != tuple(self.actions):
            raise ConfigError(f"{v} was trained for actions {list(initial.actions)} but the "
                              f"catalog has {list(self.actions)}; use a matching "
                              f"STREAMAGENT_CATALOG_PATH or start from a fresh model")
        if tuple(initial.feature_names) != tuple(self.feature_names):
            raise ConfigError(f"{v} was trained on other features ({len(initial.feature_names)}) "
                              f"than this build's ({len(self.feature_names)}); start from a fresh "
                              f"model or train one on logs of this feature set")

    def discount(self, dt_ms: float | None, done: bool) -> float:
        if done or dt_ms is None:
            return 0.0
        return float(self.p.gamma ** (max(0.0, dt_ms) / self.p.gamma_unit_ms))

    def check(self, t: Transition) -> None:
        """Raise ``InvalidMessage("schema")`` unless the transition fits this model: feature
        vectors of exactly its length (numpy would broadcast a length-1 vector over a replay
        row), an action index and masks of its actions, values finite as float32 (1e300
        passes JSON and becomes inf in the replay buffer), a next state unless done."""
        nf, na = len(self.feature_names), len(self.actions)

        def fail(what: str) -> None:
            raise InvalidMessage("schema", f"transition {str(t.decision_id)[:64]!r}: {what}")

        if len(t.features) != nf:
            fail(f"features has {len(t.features)} values, the model {nf}")
        if not 0 <= t.action_index < na:
            fail(f"action_index {t.action_index} is not one of the {na} actions")
        if not t.done and t.next_features is None:
            fail("next_features is null but done is false")
        if t.next_features is not None and len(t.next_features) != nf:
            fail(f"next_features has {len(t.next_features)} values, the model {nf}")
        for name in ("allowed", "next_allowed"):
            mask = getattr(t, name)
            if mask is not None and len(mask) != na:
                fail(f"{name} has {len(mask)} values, the model {na} actions")
        if not t.done and t.next_allowed is not None and not any(t.next_allowed):
            fail("next_allowed allows no action")
        with np.errstate(over="ignore"):
            values = np.asarray((*t.features, *(t.next_features or ()), t.reward), np.float32)
        if not np.isfinite(values).all():
            fail("a feature or the reward is not finite as float32")

    def learn_one(self, t: Transition, train: bool = True) -> dict | None:
        """Store one transition; take a gradient step when one is due.

        ``train`` False: a held-out decision (core/gate.py): it still links its user's n-step
        returns (its reward is part of the previous decisions' returns), but no replay item
        starts at it, so the model never learns its own (s, a) from it.
        """
        self.check(t)
        na = len(self.actions)
        s = np.asarray(t.features, np.float32)
        done = bool(t.done)
        s2 = np.asarray(t.next_features, np.float32) if not done else np.zeros_like(s)
        mask2 = np.asarray(t.next_allowed or [True] * na, bool)
        item = (s, int(t.action_index), float(t.reward), s2, self.discount(t.dt_ms, done), mask2,
                train)
        if self.p.n_step <= 1:
            return self._store(*item[:6]) if train else None
        user = str(t.user_id)
        q = self.pending.pop(user, [])  # re-inserted last: the dict stays in recency order
        q.append(item)
        out = None
        if done:
            out = self._flush(q)
        else:
            if len(q) >= self.p.n_step:
                out = self._store_first(q)
                q.pop(0)
            self.pending[user] = q
            while len(self.pending) > self.p.n_step_max_users:
                oldest = next(iter(self.pending))
                out = self._flush(self.pending.pop(oldest)) or out
        return out

    @staticmethod
    def _n_step(q: list[tuple]) -> tuple:
        """(s0, a0, sum_i G_i r_i, s_m, G_m, mask_m) over the m = len(q) transitions of q, G_i
        being the product of the discounts before step i (0 once an episode ends)."""
        s0, a0 = q[0][0], q[0][1]
        ret, g = 0.0, 1.0
        for _, _, r, _, disc, _, _ in q:
            ret += g * r
            g *= disc
        return s0, a0, ret, q[-1][3], g, q[-1][5]

    def _flush(self, q: list[tuple]) -> dict | None:
        """Store every waiting transition with the (shorter) return it has: nothing is lost."""
        out = None
        while q:
            out = self._store_first(q) or out
            q.pop(0)
        return out

    def _store_first(self, q: list[tuple]) -> dict | None:
        """Store the n-step item that starts at q's first transition, unless it is held out."""
        return self._store(*self._n_step(q)) if q[0][6] else None

    def _store(self, s, a, r, s2, disc, mask2) -> dict | None:
        boot = None
        if self.p.heads > 1:  # (one head: no draw, so the replay's random stream is as before)
            boot = (self.rng.random(self.p.heads) < BOOTSTRAP_P).astype(np.float32)
        self.replay.add(s, a, r, s2, disc, mask2, boot)
        self.seen += 1
        if len(self.replay) < self.p.learning_starts or self.seen % self.p.train_every:
            return None
        return self.update()

    def update(self) -> dict:
        """One gradient step of every head on a minibatch (each on its bootstrap share)."""
        p = self.p
        idx, w = self.replay.sample(p.batch_size, PER_BETA)
        rb = self.replay
        s, a, r = torch.from_numpy(rb.s[idx]), torch.from_numpy(rb.a[idx]), torch.from_numpy(rb.r[idx])
        s2, disc = torch.from_numpy(rb.s2[idx]), torch.from_numpy(rb.disc[idx])
        mask2 = torch.from_numpy(rb.mask2[idx])[:, None, :]  # (batch, 1, actions)
        boot = torch.from_numpy(rb.boot[idx])  # (batch, heads)
        a_h = a[:, None, None].expand(-1, p.heads, 1)  # the taken action, per head
        if p.center_rewards:
            self._recenter()
            r = r - self.offset * (1.0 - disc)
        with torch.no_grad():
            q2_target = self.target.forward_heads(s2).masked_fill(~mask2, -1e9)
            if p.double_dqn:
                a2 = self.online.forward_heads(s2).masked_fill(~mask2, -1e9).argmax(-1, keepdim=True)
                q2 = q2_target.gather(-1, a2).squeeze(-1)
            else:
                q2 = q2_target.max(-1).values
            if p.never_floor:
                v2_never = self.never_target(s2).squeeze(-1)  # (batch,)
                q2 = torch.maximum(q2, v2_never[:, None])
            # disc is 0 for terminal transitions, so they do not bootstrap
            td_target = r[:, None] + disc[:, None] * q2  # (batch, heads)
            if p.advantage_alpha:
                q_s = self.target.forward_heads(s)
                td_target -= p.advantage_alpha * (q_s.max(-1).values - q_s.gather(-1, a_h).squeeze(-1))
        q_all = self.online.forward_heads(s)
        q = q_all.gather(-1, a_h).squeeze(-1)  # (batch, heads)
        per_item = torch.from_numpy(w)[:, None] * nn.functional.huber_loss(
            q, td_target, reduction="none", delta=p.huber_delta) * boot
        # the mean over the (transition, head) pairs in the heads' samples
        loss = per_item.mean() * (boot.numel() / max(float(boot.sum()), 1.0))
        if p.never_floor:
            with torch.no_grad():
                v_s = self.never_target(s).squeeze(-1)[:, None]
                if p.never_floor_slack:
                    v_s = v_s - p.never_floor_slack * (v_s + self.offset).abs()
            q_none = q_all[..., 0]
            # zero where Q(s, none) is already at or above the floor
            loss = loss + nn.functional.huber_loss(
                q_none, torch.maximum(q_none.detach(), v_s), delta=p.huber_delta)
        self.opt.zero_grad()
        # V_never's loss joins the same backward pass (the networks share no parameter, so
        # each one's gradients are what separate passes give; one pass costs less)
        never_loss = None
        if p.never_floor:
            self.never_opt.zero_grad()
            never_loss = self._never_loss(s, a, r, disc, v2_never)
        (loss if never_loss is None else loss + never_loss).backward()
        nn.utils.clip_grad_norm_(self.online.parameters(), p.grad_clip)
        self.opt.step()
        if never_loss is not None:
            nn.utils.clip_grad_norm_(self.never_online.parameters(), p.grad_clip)
            self.never_opt.step()
        self.train_steps += 1
        rb.update(idx, (td_target - q).detach().mean(-1).numpy(), PER_EPS)
        self._sync_target()
        self.last_loss = float(loss.detach())
        self.last_max_q = float(q2_target.max(-1).values.mean()) + self.offset
        return {"loss": self.last_loss, "max_q": self.last_max_q, "train_steps": self.train_steps}

    def _never_loss(self, s, a, r, disc, v2):
        """V_never's TD(0) loss on the minibatch's "no coupon" transitions (action 0),
        V(s) <- r + disc * V_target(s'): the value of following "never" from s; None when the
        minibatch has none."""
        rest = a == 0
        if not bool(rest.any()):
            return None
        target = r[rest] + disc[rest] * v2[rest]
        v = self.never_online(s[rest]).squeeze(-1)
        return nn.functional.huber_loss(v, target, delta=self.p.huber_delta)

    def _nets(self) -> tuple[QNetwork, ...]:
        """Every network whose output is a (centered) value."""
        nets = (self.online, self.target)
        return nets + ((self.never_online, self.never_target) if self.p.never_floor else ())

    def _recenter(self) -> None:
        """offset = sum(r) / sum(1 - disc) over the replay, so that the centered rewards
        average 0 there; a change after the first is moved into the networks' output biases."""
        if self.train_steps % RECENTER_EVERY and self._offset_set:
            return
        n = len(self.replay)
        weight = float(np.sum(1.0 - self.replay.disc[:n], dtype=np.float64))
        if weight <= 0:
            return
        new = float(np.sum(self.replay.r[:n], dtype=np.float64)) / weight
        if self._offset_set:
            for net in self._nets():
                shift_output(net, self.offset - new)
        self.offset, self._offset_set = new, True

    def _sync_target(self) -> None:
        pairs = [(self.target, self.online)]
        if self.p.never_floor:
            pairs.append((self.never_target, self.never_online))
        if self.p.target_update == "hard":
            if self.train_steps % self.p.target_every == 0:
                for target, online in pairs:
                    target.load_state_dict(online.state_dict())
            return
        with torch.no_grad():
            for target, online in pairs:  # (the same elementwise ops as per tensor, fewer calls)
                tp, op = list(target.parameters()), list(online.parameters())
                torch._foreach_mul_(tp, 1 - self.p.tau)
                torch._foreach_add_(tp, op, alpha=self.p.tau)

    def q_values(self, features) -> np.ndarray:
        with torch.no_grad():
            q = self.online(torch.as_tensor(np.asarray(features, np.float32))).numpy()
        return q + np.float32(self.offset)

    def _never_centered(self, X) -> np.ndarray:
        """The never-value network's outputs for ``X`` (one row or many), flat, centered."""
        if self.never_online is None:
            raise ValueError("no never-value network: STREAMAGENT_NEVER_FLOOR is off")
        with torch.no_grad():
            v = self.never_online(torch.as_tensor(np.asarray(X, np.float32)))
        return v.numpy().reshape(-1)

    def never_values(self, X) -> np.ndarray:
        """V_never of each row of ``X`` (see never_value)."""
        return self._never_centered(X) + np.float32(self.offset)

    def never_value(self, features) -> float:
        """V_never(s): the learnt value of never sending a coupon again (NEVER_FLOOR)."""
        return float(self._never_centered(features)[0]) + self.offset

    def initial_snapshot(self) -> ModelSnapshot:
        """Version 0: the network every decider starts from without a model (same seed)."""
        net = init_network(len(self.feature_names), len(self.actions), self.hidden, self.p.seed,
                           self.p.heads)
        return ModelSnapshot.from_network(net, 0, 0, self.actions, self.feature_names)

    def finite(self) -> bool:
        """Whether every network's weights are finite (what a checkpoint must hold)."""
        return all(weights_finite(n.state_dict()) for n in self._nets())

    def snapshot(self) -> ModelSnapshot:
        """A new model version from the current weights."""
        import time

        self.version += 1
        net = self.target if self.p.publish_average else self.online
        # the deciders get uncentered Q
        snap = ModelSnapshot.from_network(published(net, self.offset), self.version,
                                          self.train_steps, self.actions, self.feature_names)
        snap.created_at = time.time()
        n = len(self.replay)
        if n:  # the scale of the deciders' cap on the greedy margin (policy.margin_cap)
            snap.meta[REWARD_SCALE_KEY] = float(np.mean(self.replay.r[:n], dtype=np.float64))
        return snap

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_bytes(self, extra: dict | None = None) -> bytes:
        buf = io.BytesIO()
        torch.save({"online": self.online.state_dict(), "target": self.target.state_dict(),
                    "opt": self.opt.state_dict(), "replay": self.replay.state(),
                    "version": self.version, "train_steps": self.train_steps, "seen": self.seen,
                    "offset": self.offset, "offset_set": self._offset_set,
                    "pending": self._pending_state(),
                    "never": ({"online": self.never_online.state_dict(),
                               "target": self.never_target.state_dict(),
                               "opt": self.never_opt.state_dict()} if self.p.never_floor else None),
                    "params": asdict(self.p), "hidden": list(self.hidden),
                    "actions": list(self.actions), "feature_names": list(self.feature_names),
                    "extra": extra or {}}, buf)
        return buf.getvalue()

    def _pending_state(self) -> dict:
        # the waiting transitions belong to the checkpoint: their input offsets are committed
        return {u: [[torch.from_numpy(s), a, r, torch.from_numpy(s2), disc,
                     torch.from_numpy(m.copy()), keep] for s, a, r, s2, disc, m, keep in q]
                for u, q in self.pending.items()}

    def _load_pending(self, st: dict) -> None:
        # (checkpoints from before held-out decisions have 6 fields: every item trained)
        self.pending = {u: [(it[0].numpy(), int(it[1]), float(it[2]), it[3].numpy(),
                             float(it[4]), it[5].numpy(), bool(it[6]) if len(it) > 6 else True)
                            for it in q] for u, q in st.items()}

    def save_checkpoint(self, path: Path, extra: dict | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(self.checkpoint_bytes(extra))
        tmp.replace(path)  # atomic: a crash leaves the previous checkpoint whole

    def load_checkpoint(self, path: Path) -> dict:
        """Restore everything from ``path``; returns its ``extra``. A file that cannot be read
        or holds unusable weights raises ``CorruptCheckpoint`` naming it (this learner is then
        half-restored and must not be used)."""
        from streamagent.errors import ConfigError, CorruptCheckpoint

        what = f"checkpoint {path}"
        todo = (f"move it away (e.g. mv {path} {path}.corrupt) and start the learner again: it "
                f"then starts from the newest valid model and reads transitions from the oldest "
                f"one retained")
        try:
            doc = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch.load raises many types for a damaged file
            raise CorruptCheckpoint(f"{what} cannot be read ({type(exc).__name__}: "
                                    f"{_first_line(exc)}); {todo}") from None
        try:
            if (tuple(doc["actions"]) != self.actions
                    or tuple(doc["feature_names"]) != self.feature_names):
                raise ConfigError(f"{what} is for other actions/features; move it away "
                                  f"to start a fresh learner")
            for name in ("online", "target"):
                if not weights_finite(doc[name]):
                    raise CorruptCheckpoint(f"{what} holds NaN or infinite {name} weights; {todo}")
            counts = int(doc["version"]), int(doc["train_steps"]), int(doc["seen"])
            if not all(0 <= n <= MAX_SAFE_INT for n in counts):
                raise CorruptCheckpoint(f"{what} holds absurd counts (version, steps, seen) "
                                        f"{counts}; {todo}")
            kind = ("value.weight" in doc["online"], "value.weight" in doc["target"])
            if kind == (self.p.dueling, self.p.dueling):
                self.online.load_state_dict(doc["online"])
                self.target.load_state_dict(doc["target"])
                self.opt.load_state_dict(doc["opt"])
            else:  # DUELING changed since: the same functions in the other form, a fresh Adam
                nf, na, k = len(self.feature_names), len(self.actions), self.p.heads
                for name, net in (("online", self.online), ("target", self.target)):
                    net.load_state_dict(as_network(doc[name], nf, na, self.hidden, k,
                                                   self.p.dueling).state_dict())
                log.info("checkpoint %s: converted to %s heads (STREAMAGENT_DUELING changed); "
                         "the optimiser starts afresh", path,
                         "dueling" if self.p.dueling else "plain")
            never = doc.get("never")
            if never and not all(weights_finite(never[n]) for n in ("online", "target")):
                raise CorruptCheckpoint(f"{what} holds NaN or infinite never-value weights; "
                                        f"{todo}")
            if self.p.never_floor and never:
                self.never_online.load_state_dict(never["online"])
                self.never_target.load_state_dict(never["target"])
                self.never_opt.load_state_dict(never["opt"])
            elif self.p.never_floor:  # NEVER_FLOOR turned on since: V_never learns from the replay
                # (a fresh one outputs 0: the centered average value, a fair start)
                log.info("checkpoint %s has no never-value network (STREAMAGENT_NEVER_FLOOR "
                         "was off); it starts afresh and learns from the replay", path)
            self.replay.load(doc["replay"])
            self.version, self.train_steps, self.seen = counts
            # (checkpoints from before centering have no offset: their networks are uncentered)
            self.offset = float(doc.get("offset", 0.0))
            self._offset_set = bool(doc.get("offset_set", self.train_steps > 0))
            if not np.isfinite(self.offset):
                raise CorruptCheckpoint(f"{what} holds a non-finite reward offset; {todo}")
            if self.offset and not self.p.center_rewards:
                # REWARD_CENTERING turned off since: the offset goes into the networks
                for net in self._nets():
                    shift_output(net, self.offset)
                self.offset = 0.0
            self._load_pending(doc.get("pending") or {})
            return dict(doc["extra"])
        except ConfigError:
            raise
        except Exception as exc:  # a missing part, a wrong shape, a wrong type
            raise CorruptCheckpoint(f"{what} is damaged ({type(exc).__name__}: "
                                    f"{_first_line(exc)}); {todo}") from None
