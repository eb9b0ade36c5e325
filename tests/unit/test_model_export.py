"""`streamagent model export`: a learner checkpoint becomes a model file that
STREAMAGENT_MODEL_PATH accepts, holding the very model the learner last published."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from streamagent.cli import main
from streamagent.core import features as F
from streamagent.core.catalog import load_catalog
from streamagent.core.contracts import Transition
from streamagent.core.engine import DecisionEngine, Model
from streamagent.core.export import export_checkpoint, snapshot_from_checkpoint
from streamagent.core.learner import QLearner
from streamagent.core.qnet import ModelSnapshot, NumpyQ
from streamagent.errors import ConfigError
from streamagent.params import engine_params, learner_params, shipped

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/unit/conftest.py

CAT = load_catalog()


def trained(tmp_path, **kw) -> tuple[QLearner, ModelSnapshot]:
    """A learner that took gradient steps, then published and checkpointed as the service
    does (snapshot first, checkpoint right after), and trained on past that checkpoint."""
    p = dataclasses.replace(learner_params(shipped()), batch_size=16, learning_starts=16,
                            train_every=1, n_step=1, **kw)
    L = QLearner(CAT.actions, F.FEATURE_NAMES, (16, 16), p)
    rng = np.random.default_rng(0)
    for i in range(60):
        s = rng.random(F.N_FEATURES).astype(np.float32)
        L.learn_one(Transition(decision_id=f"d{i}", user_id=f"u{i % 5}", ts=i, features=tuple(s),
                               action_index=int(rng.integers(CAT.n_actions)),
                               reward=float(rng.random()), propensity=1.0, policy_version=0,
                               next_features=None, next_allowed=None, next_ts=None, dt_ms=None,
                               done=True))
    snap = L.snapshot()
    L.save_checkpoint(tmp_path / "checkpoint.pt", extra={"offsets": {"0": 60}})
    return L, snap


@pytest.mark.parametrize("publish_average,dueling", [(True, False), (False, False), (False, True)])
def test_export_is_the_model_the_checkpoint_was_taken_with(tmp_path, publish_average, dueling):
    # (the shipped learner centers rewards: the export adds the offset back, as it publishes)
    L, published = trained(tmp_path, publish_average=publish_average, dueling=dueling)
    assert L.offset != 0
    assert L.train_steps > 0
    out = tmp_path / "model.pt"
    export_checkpoint(tmp_path / "checkpoint.pt", out)
    snap = ModelSnapshot.load(out)  # how STREAMAGENT_MODEL_PATH is read
    assert (snap.version, snap.train_steps, snap.hidden, snap.heads) == \
           (published.version, published.train_steps, published.hidden, published.heads)
    assert snap.actions == CAT.actions and snap.feature_names == F.FEATURE_NAMES
    assert snap.state_dict.keys() == published.state_dict.keys()
    for k, v in published.state_dict.items():
        assert torch.equal(snap.state_dict[k], v), k
    # deciders accept it, and score exactly as with the published model
    eng = DecisionEngine(CAT, engine_params(shipped(), 1), Model(snap))
    x = np.random.default_rng(1).random(F.N_FEATURES).astype(np.float32)
    np.testing.assert_array_equal(eng.model.q(x), NumpyQ(published)(x))
    # and a learner can start from it
    QLearner(CAT.actions, F.FEATURE_NAMES, (16, 16), L.p, snap)


def test_the_cli_writes_the_file(tmp_path, capsys):
    trained(tmp_path)
    out = tmp_path / "out" / "model.pt"
    assert main(["model", "export", "--checkpoint", str(tmp_path / "checkpoint.pt"),
                 "--out", str(out)]) == 0
    assert "STREAMAGENT_MODEL_PATH" in capsys.readouterr().out
    assert ModelSnapshot.load(out).version == 1


def test_what_is_not_a_checkpoint_is_named(tmp_path, capsys):
    with pytest.raises(ConfigError, match="no learner checkpoint"):
        snapshot_from_checkpoint(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not torch")
    with pytest.raises(ConfigError, match="is not a learner checkpoint"):
        snapshot_from_checkpoint(junk)
    # a model file is not a checkpoint either: say so rather than fail in torch
    model = tmp_path / "model.pt"
    L, snap = trained(tmp_path)
    snap.save(model)
    with pytest.raises(ConfigError, match="is not a learner checkpoint"):
        snapshot_from_checkpoint(model)
    assert main(["model", "export", "--checkpoint", str(junk), "--out",
                 str(tmp_path / "x.pt")]) == 2
    assert "is not a learner checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()
