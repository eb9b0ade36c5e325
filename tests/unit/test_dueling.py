"""Dueling Q-heads: an exact fold into the plain network the deciders run, a checkpoint that
converts when the setting changes, and a learner that learns with them."""
import dataclasses

import numpy as np
import pytest
import torch

from streamagent.core.learner import QLearner
from streamagent.core.qnet import ModelSnapshot, NumpyQ, as_network, init_network
from streamagent.params import learner_params, shipped

from .test_learner import A, ACTIONS, B, FEATS, t

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _jiggled(heads: int):
    net = init_network(6, 4, (16, 16), seed=2, heads=heads, dueling=True)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=gen))
    return net


@pytest.mark.parametrize("heads", [1, 3])
def test_a_dueling_network_folds_into_the_plain_one_the_deciders_run(heads):
    net = _jiggled(heads)
    x = torch.randn(20, 6, generator=torch.Generator().manual_seed(1))
    want = net.forward_heads(x).detach()
    snap = ModelSnapshot.from_network(net, 1, 1, tuple("nabc"), tuple(f"f{i}" for i in range(6)))
    assert not any(k.startswith("value.") for k in snap.state_dict), "a dueling tensor published"
    got = NumpyQ(snap).heads_batch(x.numpy().astype(np.float64))
    assert np.abs(got - want.numpy()).max() < 1e-4
    # and back: the plain weights unfold into a dueling network with the same Q
    back = as_network(snap.state_dict, 6, 4, (16, 16), heads, dueling=True)
    assert back.value is not None
    assert torch.allclose(back.forward_heads(x), want, atol=1e-4)


def test_a_fresh_dueling_network_is_the_plain_version_0():
    plain = init_network(6, 4, (16, 16), seed=9)
    duel = init_network(6, 4, (16, 16), seed=9, dueling=True).plain()
    for (k, a), (k2, b) in zip(plain.state_dict().items(), duel.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k


def _learner(**kw):
    base = dict(batch_size=32, learning_starts=32, lr=5e-3, buffer_size=5000, seed=3,
                dueling=True)
    base.update(kw)
    return QLearner(ACTIONS, FEATS, (32,), dataclasses.replace(learner_params(shipped()), **base))


@pytest.mark.parametrize("before,after", [(False, True), (True, False)])
def test_a_checkpoint_converts_when_dueling_is_switched(tmp_path, before, after):
    L = _learner(gamma=0.0, dueling=before)
    rng = np.random.default_rng(1)
    for _ in range(400):
        L.learn_one(t(A, int(rng.integers(3)), float(rng.normal())))
    path = tmp_path / "ck.pt"
    L.save_checkpoint(path)
    M = _learner(gamma=0.0, dueling=after)
    M.load_checkpoint(path)
    assert (M.online.value is not None) == after
    for ctx in (A, B):
        assert np.allclose(M.q_values(ctx), L.q_values(ctx), atol=1e-4)
    assert M.train_steps == L.train_steps and len(M.replay) == len(L.replay)
    M.learn_one(t(A, 1, 1.0))  # and it trains on, with its fresh optimiser
    M.update()
