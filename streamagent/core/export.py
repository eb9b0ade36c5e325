"""A learner checkpoint as a model snapshot file, the format STREAMAGENT_MODEL_PATH takes.

A checkpoint (``QLearner.save_checkpoint``, core/learner.py) is the learner's whole state:
both networks, optimiser, replay, waiting n-step transitions. Deciders and a fresh learner
start from a :class:`ModelSnapshot` instead. The service checkpoints right after taking a
snapshot, so the weights the learner publishes (the target network with ``publish_average``,
else the online one) under the checkpoint's version and step count are the model it last
published: that is what the export writes, as the learner publishes it (a dueling network
folded into the plain form, the reward-centering offset added back).
"""
from __future__ import annotations

from pathlib import Path

import torch

from streamagent.core.qnet import ModelSnapshot, as_network, published
from streamagent.errors import ConfigError

# what a checkpoint must hold to be exported (it holds more: optimiser, replay, ...)
NEEDED = ("online", "target", "params", "hidden", "actions", "feature_names", "version",
          "train_steps")


def snapshot_from_checkpoint(path: Path) -> ModelSnapshot:
    """The model a learner checkpoint was taken with; ConfigError naming the file otherwise."""
    if not path.is_file():
        raise ConfigError(f"no learner checkpoint at {path} (STREAMAGENT_LEARNER_CHECKPOINT, "
                          f"default $STREAMAGENT_DATA_DIR/learner/checkpoint.pt)")
    try:
        # weights_only: reading a file must never run code from it
        doc = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a file that is not its format
        raise ConfigError(f"{path} is not a learner checkpoint: {exc}") from None
    missing = [k for k in NEEDED if not isinstance(doc, dict) or k not in doc]
    if missing:
        raise ConfigError(f"{path} is not a learner checkpoint (no {', '.join(missing)}); a model "
                          f"file (train-offline, model-updates) is used as it is")
    params = doc["params"]
    weights = doc["target"] if params.get("publish_average") else doc["online"]
    if not all(torch.isfinite(t).all() for t in weights.values()):
        raise ConfigError(f"{path} holds NaN or infinite weights: no decider would take them")
    heads, offset = int(params.get("heads", 1)), float(doc.get("offset", 0.0))
    if "value.weight" in weights or offset:
        try:
            net = as_network(weights, len(doc["feature_names"]), len(doc["actions"]),
                             tuple(doc["hidden"]), heads, "value.weight" in weights)
        except RuntimeError as exc:
            raise ConfigError(f"{path}: its weights do not fit its own network shape: "
                              f"{exc}") from None
        weights = published(net, offset).state_dict()
    snap = ModelSnapshot(int(doc["version"]), int(doc["train_steps"]), tuple(doc["hidden"]),
                         tuple(doc["actions"]), tuple(doc["feature_names"]), dict(weights),
                         created_at=path.stat().st_mtime,  # about when that model was published
                         heads=heads,
                         meta={"exported_from": str(path)})
    try:
        snap.network()  # the weights must fit the shape they claim, or no decider can load them
    except RuntimeError as exc:
        raise ConfigError(f"{path}: its weights do not fit its own network shape: {exc}") from None
    return snap


def export_checkpoint(checkpoint: Path, out: Path) -> ModelSnapshot:
    """Write the model of ``checkpoint`` to ``out`` (atomically) and return it."""
    snap = snapshot_from_checkpoint(checkpoint)
    out.parent.mkdir(parents=True, exist_ok=True)
    snap.save(out)
    return snap
