"""The Q-network (torch) and its tensors-only snapshot format.

Deciders score one user at a time; a torch forward pass of a 64x64 MLP costs tens of
microseconds of dispatch overhead, so deciders run the same weights through numpy
(:class:`NumpyQ`), which a test holds equal to the torch forward pass.
"""
from __future__ import annotations

import copy
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn


class QNetwork(nn.Module):
    """MLP: features -> Q values per action, from ``heads`` output heads on a shared torso.

    Default two hidden layers of 64 ReLU units and one head. With several heads (bootstrapped
    DQN, Osband et al. 2016) each head is trained on its own bootstrap sample of the
    transitions, so where data is scarce they disagree: the spread is the model's uncertainty,
    used to send a coupon only with confidence and to explore where it matters.
    """

    def __init__(self, n_features: int, n_actions: int, hidden: tuple[int, ...] = (64, 64),
                 heads: int = 1, dueling: bool = False):
        super().__init__()
        layers: list[nn.Module] = []
        width = n_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, heads * n_actions))
        self.net = nn.Sequential(*layers)
        self.n_features, self.n_actions, self.hidden = n_features, n_actions, tuple(hidden)
        self.heads, self.dueling = heads, dueling
        # Dueling (Wang et al. 2016): per head a state value V(s) next to the advantages,
        # Q(s, a) = V(s) + A(s, a) - mean_b A(s, b). A coupon is chosen in a few percent of the
        # decisions; in the plain layer its Q row learns the state's value from those few
        # alone, while V learns from every transition and the coupon rows only carry the
        # difference. The output is still linear in the torso's features, so it folds into a
        # plain layer (``plain()``): the deciders never see the difference.
        self.value = nn.Linear(width, heads) if dueling else None

    def forward_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(..., heads, actions)."""
        if self.value is None:
            out = self.net(x)
            return out.reshape(*out.shape[:-1], self.heads, self.n_actions)
        h = self.net[:-1](x)
        adv = self.net[-1](h)
        adv = adv.reshape(*adv.shape[:-1], self.heads, self.n_actions)
        return self.value(h)[..., None] + adv - adv.mean(-1, keepdim=True)

    def plain(self) -> "QNetwork":
        """The same function as a plain network (itself when not dueling)."""
        if self.value is None:
            return self
        out = QNetwork(self.n_features, self.n_actions, self.hidden, self.heads)
        out.load_state_dict(fold_dueling(self.state_dict(), self.heads, self.n_actions))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The ensemble's mean Q values, (..., actions)."""
        return self.forward_heads(x).mean(-2)


def _out_key(sd: dict) -> str:
    """The state-dict prefix of the output layer (net.<last index>)."""
    return max((k for k in sd if k.startswith("net.") and k.endswith(".weight")),
               key=lambda k: int(k.split(".")[1]))[:-len(".weight")]


def fold_dueling(sd: dict, heads: int, n_actions: int) -> dict:
    """A dueling network's state dict as the plain network computing the same Q:
    Q_j = (w_V + W_A[j] - mean_k W_A[k]) . h + (b_V + b_A[j] - mean_k b_A[k]), per head."""
    out_key = _out_key(sd)
    out = {k: v.detach().clone() for k, v in sd.items() if not k.startswith("value.")}
    wa = sd[out_key + ".weight"].reshape(heads, n_actions, -1)
    ba = sd[out_key + ".bias"].reshape(heads, n_actions)
    wv, bv = sd["value.weight"], sd["value.bias"]  # (heads, width), (heads,)
    out[out_key + ".weight"] = (wv[:, None, :] + wa - wa.mean(1, keepdim=True)).reshape(
        heads * n_actions, -1).clone()
    out[out_key + ".bias"] = (bv[:, None] + ba - ba.mean(1, keepdim=True)).reshape(-1).clone()
    return out


def unfold_dueling(sd: dict, heads: int, n_actions: int) -> dict:
    """A plain network's state dict as a dueling one computing the same Q (V = the mean of
    the actions' rows, A = each row minus it)."""
    out_key = _out_key(sd)
    out = {k: v.detach().clone() for k, v in sd.items()}
    w = sd[out_key + ".weight"].reshape(heads, n_actions, -1)
    b = sd[out_key + ".bias"].reshape(heads, n_actions)
    out["value.weight"], out["value.bias"] = w.mean(1).clone(), b.mean(1).clone()
    out[out_key + ".weight"] = (w - w.mean(1, keepdim=True)).reshape(heads * n_actions, -1).clone()
    out[out_key + ".bias"] = (b - b.mean(1, keepdim=True)).reshape(-1).clone()
    return out


def as_network(sd: dict, n_features: int, n_actions: int, hidden: tuple[int, ...],
               heads: int, dueling: bool) -> QNetwork:
    """A network of the wanted kind from a plain or a dueling state dict (converted exactly)."""
    has_value = "value.weight" in sd
    if has_value and not dueling:
        sd = fold_dueling(sd, heads, n_actions)
    elif dueling and not has_value:
        sd = unfold_dueling(sd, heads, n_actions)
    net = QNetwork(n_features, n_actions, hidden, heads, dueling)
    net.load_state_dict(sd)
    return net


def shift_output(net: QNetwork, delta: float) -> QNetwork:
    """Add ``delta`` to every Q-value ``net`` computes (all heads, all actions): to the state
    value's bias in a dueling network, to every output bias in a plain one. (A learner with
    reward centering publishes Q - offset + offset this way.)"""
    with torch.no_grad():
        if net.value is not None:
            net.value.bias.add_(delta)
        else:
            net.net[-1].bias.add_(delta)
    return net


def published(net: QNetwork, offset: float = 0.0) -> QNetwork:
    """What deciders get of ``net``: the plain network computing its Q plus ``offset`` (a
    learner's reward-centering offset). ``net`` itself when there is nothing to change, else a
    copy: ``net`` is never modified."""
    if net.value is None and not offset:
        return net
    out = net.plain()
    if out is net:
        out = copy.deepcopy(net)
    return shift_output(out, offset) if offset else out


def init_network(n_features: int, n_actions: int, hidden: tuple[int, ...], seed: int,
                 heads: int = 1, dueling: bool = False) -> QNetwork:
    # Its own generator, so every worker that starts without a model file builds the very
    # same network from the same seed (and nothing else's random state is touched).
    gen = torch.Generator().manual_seed(seed)
    net = QNetwork(n_features, n_actions, hidden, heads, dueling)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Linear):
                bound = 1.0 / np.sqrt(m.in_features)
                m.weight.uniform_(-bound, bound, generator=gen)
                m.bias.zero_()
        # A zero output layer: every action starts at Q = 0, ties go to action 0, so an
        # untrained agent sends no coupons (plus exploration) instead of whichever coupon a
        # random network happens to prefer. The hidden layers stay random, so the first
        # gradient steps still have features to work with.
        net.net[-1].weight.zero_()
        if net.value is not None:  # (drawn after the rest: the torso equals the plain one's)
            net.value.weight.zero_()
            net.value.bias.zero_()
    return net


@dataclass
class ModelSnapshot:
    """A versioned set of Q-network weights plus what is needed to use them safely."""

    version: int
    train_steps: int
    hidden: tuple[int, ...]
    actions: tuple[str, ...]
    feature_names: tuple[str, ...]
    state_dict: dict[str, torch.Tensor]
    created_at: float = 0.0  # wall-clock publish time (for the model-age metric only)
    heads: int = 1
    # The deciders' order of models: each promotion (by the gate or an operator) takes the
    # next number, so a rollback to an older version still reaches every decider.
    promotion: int = 0
    # how it got there: the gate's verdict, who promoted it, the version it replaced (strings
    # and numbers only: snapshots load with weights_only)
    meta: dict = field(default_factory=dict)

    @property
    def order(self) -> tuple[int, int]:
        """Deciders follow the highest (promotion, version)."""
        return self.promotion, self.version

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        torch.save({"version": self.version, "train_steps": self.train_steps,
                    "hidden": list(self.hidden), "actions": list(self.actions),
                    "feature_names": list(self.feature_names), "created_at": float(self.created_at),
                    "heads": int(self.heads), "promotion": int(self.promotion),
                    "meta": dict(self.meta),
                    "state_dict": {k: v.detach().cpu() for k, v in self.state_dict.items()}}, buf)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, raw: bytes) -> "ModelSnapshot":
        # weights_only: a snapshot from a file or a topic can never run code when loaded
        doc = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        return cls(int(doc["version"]), int(doc["train_steps"]), tuple(doc["hidden"]),
                   tuple(doc["actions"]), tuple(doc["feature_names"]), dict(doc["state_dict"]),
                   float(doc.get("created_at", 0.0)), int(doc.get("heads", 1)),
                   int(doc.get("promotion", 0)), dict(doc.get("meta", {})))

    def save(self, path: Path | str) -> None:
        p = Path(path)
        tmp = p.with_suffix(p.suffix + ".tmp")
        tmp.write_bytes(self.to_bytes())
        tmp.replace(p)  # atomic: a reader never sees half a file

    @classmethod
    def load(cls, path: Path | str) -> "ModelSnapshot":
        return cls.from_bytes(Path(path).read_bytes())

    @classmethod
    def from_network(cls, net: QNetwork, version: int, train_steps: int,
                     actions: tuple[str, ...], feature_names: tuple[str, ...]) -> "ModelSnapshot":
        net = net.plain()  # deciders run plain networks (a dueling one folds exactly)
        return cls(version, train_steps, net.hidden, actions, feature_names,
                   {k: v.detach().clone() for k, v in net.state_dict().items()}, heads=net.heads)

    def network(self) -> QNetwork:
        net = QNetwork(len(self.feature_names), len(self.actions), self.hidden, self.heads)
        net.load_state_dict(self.state_dict)
        return net


class NumpyQ:
    """Forward pass of a QNetwork's weights in numpy, for one feature vector at a time."""

    def __init__(self, snapshot: ModelSnapshot):
        sd = snapshot.state_dict
        n_layers = len(snapshot.hidden) + 1
        # float64 for one vector and for a batch alike: a float32 batch and a float64 vector
        # (float64 features upcast) differed in the 7th digit, and so did the logged Q-values
        self.layers = [(sd[f"net.{2 * i}.weight"].numpy().astype(np.float64).T.copy(),
                        sd[f"net.{2 * i}.bias"].numpy().astype(np.float64).copy())
                       for i in range(n_layers)]
        self.n_heads, self.n_actions = snapshot.heads, len(snapshot.actions)
        self.meta = snapshot.meta  # what the gate needs of the model besides its weights

    def heads(self, x: np.ndarray) -> np.ndarray:
        """Q values of every head, (heads, actions)."""
        h = np.asarray(x, np.float64)
        last = len(self.layers) - 1
        for i, (w, b) in enumerate(self.layers):
            h = h @ w + b
            if i < last:
                np.maximum(h, 0.0, out=h)
        return h.reshape(self.n_heads, self.n_actions)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """The ensemble's mean Q values, (actions,)."""
        return self.heads(x).mean(0)

    def heads_batch(self, X: np.ndarray) -> np.ndarray:
        """Q values of every head for many feature vectors at once, (n, heads, actions)."""
        h = np.asarray(X, np.float64)
        last = len(self.layers) - 1
        for i, (w, b) in enumerate(self.layers):
            h = h @ w + b
            if i < last:
                np.maximum(h, 0.0, out=h)
        return h.reshape(len(h), self.n_heads, self.n_actions)

    def batch(self, X: np.ndarray) -> np.ndarray:
        """Mean Q values for many feature vectors at once, (n, actions)."""
        return self.heads_batch(X).mean(1)
