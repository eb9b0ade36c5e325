"""Model safety: whether a model snapshot may decide here.

A snapshot arrives as bytes, from a file or from a topic anyone with write access can produce
to, and the deciders would otherwise run whatever it holds: a NaN weight makes every Q value
NaN (the argmax then picks action 0 or garbage), a wrong layer shape fails inside numpy on
every decision, other actions or features mean Q values for another catalog, and a version of
2**62 pins every decider to it, since they follow the highest (promotion, version). So every
snapshot passes :func:`validate_snapshot` before it is used, and a refused one carries a
bounded reason (``SnapshotRejected.reason``, a metric label).

The version rule: version, promotion and training steps are ints in [0, 2**53] (beyond 2**53
floats, and so metrics and JSON readers, lose integers: no honest learner gets there), and
against the model in use, neither the version nor the promotion may jump by more than
``MAX_VERSION_JUMP`` (a million: a year of versions at the default pace of one per 30 s, or
11 days at one per second, so a run of gate rejections never trips it; a bit flip or a bogus
publisher does). A decider still on the fresh seeded network (version 0, promotion 0) has no
history to jump from and takes any version within the bounds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from streamagent.core.qnet import ModelSnapshot
from streamagent.errors import SnapshotRejected

MAX_SAFE_INT = 2 ** 53
MAX_VERSION_JUMP = 1_000_000
# the key of ModelSnapshot.meta naming who published it (the publisher's STREAMAGENT_APP_ID)
PRODUCER_KEY = "producer"
REJECT_REASONS = SnapshotRejected.REASONS


def decode_snapshot(raw: bytes | None) -> ModelSnapshot:
    """Bytes to a snapshot; anything that does not deserialize (garbage, a truncated file, a
    tombstone, a pickle that would run code) is ``SnapshotRejected("undecodable")``."""
    if not raw:
        raise SnapshotRejected("undecodable", "empty message (a tombstone?)")
    try:
        return ModelSnapshot.from_bytes(raw)
    except Exception as exc:  # torch.load raises many types; none may escape as a crash
        first = (str(exc).strip().splitlines() or [""])[0][:200]  # torch's run to pages
        raise SnapshotRejected("undecodable", f"{type(exc).__name__}: {first}") from None


def read_snapshot(path: Path | str) -> ModelSnapshot:
    """A snapshot file; unreadable or undecodable is ``SnapshotRejected("undecodable")``."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise SnapshotRejected("undecodable", f"cannot read {path}: {exc}") from None
    return decode_snapshot(raw)


def validate_snapshot(snap: ModelSnapshot, actions: tuple[str, ...],
                      feature_names: tuple[str, ...], *, current: ModelSnapshot | None = None,
                      producer: str | None = None,
                      max_version_jump: int = MAX_VERSION_JUMP) -> None:
    """Raise ``SnapshotRejected`` unless ``snap`` can decide for ``actions`` on
    ``feature_names``: from ``producer`` (when the snapshot names one), sane numbers (module
    docstring; the jump is judged against ``current``, the model in use), the same actions
    and features in the same order, exactly the layers its sizes imply, finite weights."""
    _check_producer(snap, producer)
    _check_numbers(snap, current, max_version_jump)
    if tuple(snap.actions) != tuple(actions):
        raise SnapshotRejected("actions", f"model v{snap.version} has actions "
                               f"{_short(snap.actions)}, the catalog {_short(actions)}")
    if tuple(snap.feature_names) != tuple(feature_names):
        missing = [f for f in feature_names if f not in snap.feature_names]
        extra = [f for f in snap.feature_names if f not in feature_names]
        raise SnapshotRejected("features", f"model v{snap.version} has {len(snap.feature_names)} "
                               f"features, this build {len(feature_names)}; missing "
                               f"{_short(missing)}, extra {_short(extra)}"
                               + ("" if missing or extra else " (same names, other order)"))
    _check_layers(snap)
    _check_finite(snap)


def _short(names, n: int = 8) -> str:
    names = list(names)
    return str(names[:n] + (["..."] if len(names) > n else []))


def _is_count(x) -> bool:
    return type(x) is int and 0 <= x <= MAX_SAFE_INT  # (bool is not a version)


def _check_producer(snap: ModelSnapshot, producer: str | None) -> None:
    got = snap.meta.get(PRODUCER_KEY)
    if producer is not None and got is not None and got != producer:
        raise SnapshotRejected("producer", f"model v{snap.version} was published by {got!r}, "
                               f"not by this deployment ({producer!r})")


def _check_numbers(snap: ModelSnapshot, current: ModelSnapshot | None, jump: int) -> None:
    for name in ("version", "promotion", "train_steps"):
        value = getattr(snap, name)
        if not _is_count(value):
            raise SnapshotRejected("version", f"{name} {value!r} is not an integer in "
                                   f"[0, 2**53]")
    if current is None or current.order <= (0, 0):  # a fresh network has nothing to jump from
        return
    for name in ("version", "promotion"):
        new, now = getattr(snap, name), getattr(current, name)
        if new > now + jump:
            raise SnapshotRejected("version", f"{name} {new} is more than {jump:,} above the "
                                   f"model in use ({name} {now})")


def _check_layers(snap: ModelSnapshot) -> None:
    """Exactly the tensors of QNetwork(features, actions, hidden, heads): the shapes come from
    the declared sizes, so a snapshot cannot claim one network and carry another."""
    hidden, heads = tuple(snap.hidden), snap.heads
    if not all(type(h) is int and h >= 1 for h in hidden) or type(heads) is not int or heads < 1:
        raise SnapshotRejected("shape", f"hidden {list(hidden)} / heads {heads!r} are not "
                               f"positive integers")
    widths = [len(snap.feature_names), *hidden, heads * len(snap.actions)]
    expected = {}
    for i in range(len(widths) - 1):
        expected[f"net.{2 * i}.weight"] = (widths[i + 1], widths[i])
        expected[f"net.{2 * i}.bias"] = (widths[i + 1],)
    sd = snap.state_dict
    if set(sd) != set(expected):
        raise SnapshotRejected("shape", f"layers missing {sorted(set(expected) - set(sd))}, "
                               f"unexpected {sorted(set(sd) - set(expected))[:8]}")
    for key, shape in expected.items():
        t = sd[key]
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise SnapshotRejected("shape", f"{key} is not a float tensor")
        if tuple(t.shape) != shape:
            raise SnapshotRejected("shape", f"{key} has shape {list(t.shape)}, the sizes "
                                   f"(hidden {list(hidden)}, {heads} heads) imply {list(shape)}")


def _check_finite(snap: ModelSnapshot) -> None:
    for key, t in snap.state_dict.items():
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise SnapshotRejected("non_finite", f"model v{snap.version}: {bad} of {t.numel()} "
                                   f"weights in {key} are NaN or infinite")
    if not math.isfinite(snap.created_at):
        raise SnapshotRejected("non_finite", f"created_at is {snap.created_at}")


def weights_finite(state_dict: dict[str, torch.Tensor]) -> bool:
    """Whether every tensor is finite (a learner that diverged is not)."""
    return all(bool(torch.isfinite(t).all()) for t in state_dict.values()
               if isinstance(t, torch.Tensor) and t.is_floating_point())


@dataclass(frozen=True)
class SnapshotCheck:
    """What a snapshot must match to decide here, bound once (the catalog's actions, this
    build's features, this deployment's producer id) so every reader applies the same rule."""

    actions: tuple[str, ...]
    feature_names: tuple[str, ...]
    producer: str | None = None
    max_version_jump: int = MAX_VERSION_JUMP

    def validate(self, snap: ModelSnapshot, current: ModelSnapshot | None = None) -> ModelSnapshot:
        validate_snapshot(snap, self.actions, self.feature_names, current=current,
                          producer=self.producer, max_version_jump=self.max_version_jump)
        return snap

    def decode(self, raw: bytes | None, current: ModelSnapshot | None = None) -> ModelSnapshot:
        """Bytes to a validated snapshot, or ``SnapshotRejected``."""
        return self.validate(decode_snapshot(raw), current)
