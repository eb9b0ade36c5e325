"""The model registry behind `streamagent model`: every version the learner produced (the
compacted ``model-candidates`` topic, keyed by version, with the gate's verdict) and the one the
deciders use (``model-updates``). An operator's promotion or rollback is a new promotion of a
chosen version, recorded in its metadata ("promoted_by": "operator"), which every decider and
the learner's gate then follow."""
from __future__ import annotations

import logging
import time

from streamagent.config import Settings
from streamagent.core.modelcheck import MAX_SAFE_INT, PRODUCER_KEY, decode_snapshot
from streamagent.core.policy import REWARD_SCALE_KEY
from streamagent.core.qnet import ModelSnapshot
from streamagent.errors import ConfigError, SnapshotRejected, StreamagentError
from streamagent.ops.kafka import kafka_client, make_producer
from streamagent.ops.tail import read_to_end
from streamagent.stream.models import latest_snapshot, snapshot_check

log = logging.getLogger("streamagent.registry")


class UnknownVersion(StreamagentError):
    """No such model version in model-candidates. `streamagent model list` shows the versions."""


class UnusableVersion(StreamagentError):
    """The chosen version would be refused by every decider (the message says why: other
    actions or features than the catalog and this build, broken or non-finite weights).
    Promote another version; `streamagent model list` shows them."""


def candidates(s: Settings) -> dict[int, ModelSnapshot]:
    """Every version on model-candidates (the newest record per version). A record that does
    not decode or has an absurd version is skipped with a log line: it must neither stop the
    learner's start nor push its version numbers out of range. Other checks wait for
    ``promote``: a candidate of another catalog still holds its version number."""
    out: dict[int, ModelSnapshot] = {}
    try:
        msgs = list(read_to_end(kafka_client(s), s.topic_model_candidates))
    except ConfigError:  # the topic does not exist yet: no versions
        return {}
    for m in msgs:
        if m.value():
            try:
                snap = decode_snapshot(m.value())
            except SnapshotRejected as exc:
                log.warning("skipping the record at %s offset %d: %s",
                            s.topic_model_candidates, m.offset(), exc)
                continue
            if not 0 <= snap.version <= MAX_SAFE_INT:
                log.warning("skipping model v%d at %s offset %d: absurd version", snap.version,
                            s.topic_model_candidates, m.offset())
                continue
            out[snap.version] = snap
    return dict(sorted(out.items()))


def live(s: Settings) -> ModelSnapshot | None:
    return latest_snapshot(kafka_client(s), s.topic_model_updates, check=snapshot_check(s))


def promote(s: Settings, version: int, why: str = "operator") -> ModelSnapshot:
    """Make ``version`` the deciders' model, whatever the gate said (on record), provided the
    deciders' own check passes (so an operator never publishes what they would refuse)."""
    snap = candidates(s).get(version)
    if snap is None:
        raise UnknownVersion(f"model v{version} is not on {s.topic_model_candidates}")
    current = live(s)
    snap.promotion = (current.promotion if current else 0) + 1
    # the operator vouches for it: it is this deployment's now, whoever trained it
    snap.meta = {**snap.meta, "promoted_by": why, "promoted_at": time.time(),
                 "replaces": current.version if current else 0, PRODUCER_KEY: s.app_id}
    try:
        snapshot_check(s).validate(snap, current)
    except SnapshotRejected as exc:
        raise UnusableVersion(f"model v{version} cannot be promoted: {exc}") from None
    p = make_producer(kafka_client(s), **{"message.max.bytes": 16 * 1024 * 1024})
    p.produce(s.topic_model_updates, key=b"model", value=snap.to_bytes())
    if p.flush(30):
        raise StreamagentError(f"could not publish to {s.topic_model_updates} within 30 s")
    return snap


def import_model(s: Settings, path: str, promote_it: bool = False) -> ModelSnapshot:
    """Bring a model file from elsewhere (`streamagent model export`, `train-offline`) onto
    model-candidates as this deployment's next version, checked as the deciders would check it;
    with ``promote_it``, make it the deciders' model too. Run it with the learner stopped: the
    learner takes version numbers after the newest on model-candidates when it starts."""
    try:
        snap = decode_snapshot(open(path, "rb").read())
    except OSError as exc:
        raise StreamagentError(f"cannot read {path}: {exc}") from None
    except SnapshotRejected as exc:
        raise UnusableVersion(f"{path} is not a model snapshot: {exc}") from None
    existing = candidates(s)
    current = live(s)
    original = snap.version
    snap.version = max([0, *existing, current.version if current else 0]) + 1
    snap.promotion = 0
    kept = {k: snap.meta[k] for k in (REWARD_SCALE_KEY,) if k in snap.meta}
    snap.meta = {**kept, "outcome": "imported", "imported_from": str(path),
                 "imported_version": original, "imported_at": time.time(),
                 PRODUCER_KEY: s.app_id}
    try:
        snapshot_check(s).validate(snap, current)
    except SnapshotRejected as exc:
        raise UnusableVersion(f"{path} cannot decide here: {exc}") from None
    p = make_producer(kafka_client(s), **{"message.max.bytes": 16 * 1024 * 1024})
    p.produce(s.topic_model_candidates, key=str(snap.version).encode(), value=snap.to_bytes())
    if p.flush(30):
        raise StreamagentError(f"could not publish to {s.topic_model_candidates} within 30 s")
    return promote(s, snap.version, why="operator import") if promote_it else snap


def rollback(s: Settings, version: int | None = None) -> ModelSnapshot:
    """Back to ``version``, or to the version the live model replaced."""
    if version is None:
        current = live(s)
        if current is None or not current.meta.get("replaces"):
            raise UnknownVersion("the live model records no earlier version; name one")
        version = int(current.meta["replaces"])
    return promote(s, version, why="operator rollback")


def table(s: Settings) -> list[dict]:
    """One row per version: its gate verdict and estimates, and which one is live."""
    current = live(s)
    rows = []
    for v, snap in candidates(s).items():
        g = snap.meta
        rows.append({"version": v, "train_steps": snap.train_steps,
                     "created_at": snap.created_at, "gate": g.get("outcome", "-"),
                     "live_value": g.get("live_value"), "candidate_value": g.get("candidate_value"),
                     "diff_low": g.get("diff_low"), "held_out": g.get("n"),
                     "live": current is not None and current.version == v})
    return rows
