"""Logged decisions from files (JSONL, CSV, Parquet) as a :class:`LoggedData`.

The contract is ``schemas/logged-decision.v1.json``: one row per decision with its reward.
JSONL rows are the schema's objects; CSV and Parquet carry the same fields as columns, and
every other column is a numeric feature named by its header (``allowed`` and
``action_probs`` as ``;``-separated lists in CSV). Each row is checked against the schema,
whatever the format, so a bad file fails on the row that is wrong and not later inside an
estimator. Logs from outside streamagent are welcome: their feature names are whatever the
file says (see docs/OFFLINE.md).
"""
from __future__ import annotations

import csv
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import fastjsonschema
import numpy as np
import orjson

from streamagent.core.contracts import schemas_dir
from streamagent.core.ope import LoggedData
from streamagent.errors import OfflineDataError

SCHEMA_FILE = "logged-decision.v1.json"
COLUMNS = ("schema_version", "decision_id", "user_id", "ts", "action", "action_index",
           "propensity", "reward", "next_decision_id", "allowed", "action_probs")
NO_ACTION = "none"


@lru_cache(maxsize=None)
def schema() -> dict:
    return orjson.loads((schemas_dir() / SCHEMA_FILE).read_bytes())


@lru_cache(maxsize=None)
def _validator():
    return fastjsonschema.compile(schema())


# -- readers --------------------------------------------------------------------------------

def read_logs(path: Path | str, actions: Sequence[str] | None = None) -> LoggedData:
    """Read a log file by its extension: .jsonl/.ndjson/.json, .csv, .parquet/.pq."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return read_jsonl(p, actions)
    if suffix == ".csv":
        return read_csv(p, actions)
    if suffix in (".parquet", ".pq"):
        return read_parquet(p, actions)
    raise OfflineDataError(f"{p}: unknown log format {suffix!r} (use .jsonl, .csv or .parquet)")


def read_jsonl(path: Path | str, actions: Sequence[str] | None = None) -> LoggedData:
    docs = []
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    docs.append(orjson.loads(line))
                except orjson.JSONDecodeError as exc:
                    raise OfflineDataError(f"{path} line {lineno}: not JSON ({exc})") from None
    return from_docs(docs, actions, where=str(path))


def read_csv(path: Path | str, actions: Sequence[str] | None = None) -> LoggedData:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        features = [c for c in reader.fieldnames or () if c not in COLUMNS and c != ""]
        docs = [_flat_doc(row, features, f"{path} row {i}") for i, row in enumerate(reader, 1)]
    return from_docs(docs, actions, where=str(path))


def read_parquet(path: Path | str, actions: Sequence[str] | None = None) -> LoggedData:
    """A Parquet file with the CSV's flat columns, or with a list column ``features`` (then
    ``feature_names`` too) like the JSONL rows. Needs pyarrow (the ``offline`` extra)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise OfflineDataError("reading Parquet needs pyarrow: pip install 'streamagent[offline]' "
                               "(or pip install pyarrow), or convert the log to JSONL/CSV") from None
    table = pq.read_table(path)
    rows = table.to_pylist()
    if "features" in table.column_names:
        docs = [{k: v for k, v in r.items() if v is not None or k in ("propensity", "next_decision_id")}
                for r in rows]
    else:
        features = [c for c in table.column_names if c not in COLUMNS]
        docs = [_flat_doc(r, features, f"{path} row {i}") for i, r in enumerate(rows, 1)]
    return from_docs(docs, actions, where=str(path))


def _flat_doc(row: dict, features: list[str], where: str) -> dict:
    """A schema object from a flat row (CSV text or typed Parquet values)."""
    get = lambda k: None if row.get(k) in (None, "") else row[k]  # noqa: E731
    try:
        doc = {"decision_id": str(row["decision_id"]), "user_id": str(row["user_id"]),
               "ts": int(row["ts"]), "reward": float(row["reward"]),
               "features": [float(row[c]) for c in features], "feature_names": list(features)}
        if get("action") is not None:
            doc["action"] = str(row["action"])
        if get("action_index") is not None:
            doc["action_index"] = int(row["action_index"])
        if "propensity" in row:
            doc["propensity"] = None if get("propensity") is None else float(row["propensity"])
        if "next_decision_id" in row:
            doc["next_decision_id"] = None if get("next_decision_id") is None else str(row["next_decision_id"])
        for key, parse in (("allowed", _bool), ("action_probs", float)):
            if get(key) is not None:
                doc[key] = _list(row[key], parse)
    except KeyError as exc:
        raise OfflineDataError(f"{where}: missing column {exc}") from None
    except (TypeError, ValueError) as exc:
        raise OfflineDataError(f"{where}: {exc}") from None
    return doc


def _list(value, parse) -> list:
    items = value.split(";") if isinstance(value, str) else list(value)
    return [parse(v) for v in items]


def _bool(v) -> bool:
    if isinstance(v, str):
        if v.strip().lower() not in ("1", "0", "true", "false"):
            raise ValueError(f"not a boolean: {v!r}")
        return v.strip().lower() in ("1", "true")
    return bool(v)


# -- documents to arrays --------------------------------------------------------------------

def from_docs(docs: Sequence[dict], actions: Sequence[str] | None = None, where: str = "logs",
              feature_names: Sequence[str] | None = None) -> LoggedData:
    """Schema objects (one per decision) as a :class:`LoggedData`.

    ``actions`` fixes the action space (names in index order, e.g. a model's or the catalog's
    actions); without it the rows' action_index values fix it, or, when rows only name their
    action, 'none' first and then the names in sorted order.
    """
    if not docs:
        raise OfflineDataError(f"{where}: no logged decisions")
    validate = _validator()
    for i, d in enumerate(docs, 1):
        try:
            validate(d)
        except fastjsonschema.JsonSchemaException as exc:
            raise OfflineDataError(f"{where} row {i}: {exc.message} ({SCHEMA_FILE})") from None
    names = tuple(feature_names) if feature_names is not None else _feature_names(docs, where)
    X = _features(docs, len(names), where)
    action_names, idx = _action_space(docs, actions, where)
    n_actions = len(action_names)
    return LoggedData(
        X=X, actions=idx, rewards=[d["reward"] for d in docs],
        propensities=[np.nan if d.get("propensity") is None else d["propensity"] for d in docs],
        n_actions=n_actions, feature_names=names, action_names=action_names,
        user_ids=[d["user_id"] for d in docs], ts=[d["ts"] for d in docs],
        allowed=_optional_matrix(docs, "allowed", n_actions, True, where),
        action_probs=_action_probs(docs, n_actions, where),
        episode_ids=_episodes(docs), decision_ids=[d["decision_id"] for d in docs])


def _feature_names(docs: Sequence[dict], where: str) -> tuple[str, ...]:
    first = docs[0].get("feature_names")
    for i, d in enumerate(docs, 1):
        if "feature_names" in d and d["feature_names"] != first:
            raise OfflineDataError(f"{where} row {i}: feature_names differ from the first row's "
                                   f"(a file holds one feature set)")
    if first is None:
        return tuple(f"x{i}" for i in range(len(docs[0]["features"])))
    return tuple(first)


def _features(docs: Sequence[dict], d: int, where: str) -> np.ndarray:
    for i, doc in enumerate(docs, 1):
        if len(doc["features"]) != d:
            raise OfflineDataError(f"{where} row {i}: {len(doc['features'])} features, "
                                   f"expected {d} (one per feature name)")
    return np.array([doc["features"] for doc in docs], dtype=np.float64).reshape(len(docs), d)


def _action_space(docs: Sequence[dict], actions: Sequence[str] | None,
                  where: str) -> tuple[tuple[str, ...], np.ndarray]:
    if actions is not None:
        names = tuple(actions)
    elif all("action_index" in d for d in docs):
        names = _names_by_index(docs, where)
    else:
        if not all("action" in d for d in docs):
            raise OfflineDataError(f"{where}: some rows give only action_index, others only "
                                   f"action: give both, or pass the action list")
        seen = {d["action"] for d in docs}
        names = tuple(([NO_ACTION] if NO_ACTION in seen else []) + sorted(seen - {NO_ACTION}))
    return names, _indices(docs, names, where)


def _names_by_index(docs: Sequence[dict], where: str) -> tuple[str, ...]:
    width = max([d["action_index"] + 1 for d in docs]
                + [len(d[k]) for d in docs for k in ("allowed", "action_probs") if k in d])
    names: list[str | None] = [None] * width
    for i, d in enumerate(docs, 1):
        if "action" in d:
            known = names[d["action_index"]]
            if known is not None and known != d["action"]:
                raise OfflineDataError(f"{where} row {i}: action_index {d['action_index']} is "
                                       f"{known!r} elsewhere but {d['action']!r} here")
            names[d["action_index"]] = d["action"]
    return tuple(n if n is not None else f"action_{i}" for i, n in enumerate(names))


def _indices(docs: Sequence[dict], names: tuple[str, ...], where: str) -> np.ndarray:
    lookup = {n: i for i, n in enumerate(names)}
    out = np.empty(len(docs), dtype=np.int64)
    for i, d in enumerate(docs, 1):
        if "action" in d and d["action"] not in lookup:
            raise OfflineDataError(f"{where} row {i}: action {d['action']!r} is not in the action "
                                   f"space {list(names)}")
        idx = lookup[d["action"]] if "action" in d else d["action_index"]
        if "action_index" in d and d["action_index"] != idx:
            raise OfflineDataError(f"{where} row {i}: action {d['action']!r} is index {idx} in "
                                   f"{list(names)}, but the row says {d['action_index']}")
        if idx >= len(names):
            raise OfflineDataError(f"{where} row {i}: action_index {idx} outside the "
                                   f"{len(names)} actions {list(names)}")
        out[i - 1] = idx
    return out


def _optional_matrix(docs: Sequence[dict], key: str, width: int, default, where: str):
    if not any(key in d for d in docs):
        return None
    rows = []
    for i, d in enumerate(docs, 1):
        row = d.get(key, [default] * width)
        if len(row) != width:
            raise OfflineDataError(f"{where} row {i}: {key} has {len(row)} entries for "
                                   f"{width} actions")
        rows.append(row)
    return np.array(rows)


def _action_probs(docs: Sequence[dict], width: int, where: str) -> np.ndarray | None:
    """The logging policy's whole distribution, only if every row carries it."""
    if not all("action_probs" in d for d in docs):
        return None
    probs = _optional_matrix(docs, "action_probs", width, 0.0, where).astype(np.float64)
    if not np.allclose(probs.sum(1), 1.0, atol=1e-6):
        raise OfflineDataError(f"{where}: action_probs must sum to 1 in every row")
    return probs


def _episodes(docs: Sequence[dict]) -> list[str] | None:
    """Episode ids from next_decision_id: a null link ends the user's episode after that row.
    None when no row has the field (a user's decisions are then one episode)."""
    if not any("next_decision_id" in d for d in docs):
        return None
    order = sorted(range(len(docs)), key=lambda i: (docs[i]["user_id"], docs[i]["ts"]))
    out: list[str] = [""] * len(docs)
    user, k = None, 0
    for i in order:
        d = docs[i]
        if d["user_id"] != user:
            user, k = d["user_id"], 0
        out[i] = f"{user}#{k}"
        if "next_decision_id" in d and d["next_decision_id"] is None:
            k += 1
    return out


# -- writers and re-indexing -----------------------------------------------------------------

def to_docs(log: LoggedData) -> list[dict]:
    """The log as schema objects (the inverse of :func:`from_docs`)."""
    ids = log.decision_ids if log.decision_ids is not None else [f"d-{i}" for i in range(log.n)]
    nxt = _next_links(log, ids)
    docs = []
    for i in range(log.n):
        a = int(log.actions[i])
        d = {"schema_version": 1, "decision_id": str(ids[i]),
             "user_id": str(log.user_ids[i]) if log.user_ids is not None else "unknown",
             "ts": int(log.ts[i]) if log.ts is not None else 0,
             "action": log.action_names[a], "action_index": a,
             "reward": float(log.rewards[i]), "features": log.X[i].tolist()}
        p = log.propensities[i] if log.propensities is not None else np.nan
        d["propensity"] = None if np.isnan(p) else float(p)
        if i == 0:
            d["feature_names"] = list(log.feature_names)
        if log.allowed is not None:
            d["allowed"] = log.allowed[i].tolist()
        if log.action_probs is not None:
            d["action_probs"] = log.action_probs[i].tolist()
        if nxt is not None:
            d["next_decision_id"] = nxt[i]
        docs.append(d)
    return docs


def _next_links(log: LoggedData, ids) -> list[str | None] | None:
    if log.episode_ids is None:
        return None
    ts = log.ts if log.ts is not None else np.zeros(log.n, dtype=np.int64)
    order = sorted(range(log.n), key=lambda i: (str(log.episode_ids[i]), ts[i]))
    out: list[str | None] = [None] * log.n
    for i, j in zip(order, order[1:]):
        if log.episode_ids[i] == log.episode_ids[j]:
            out[i] = str(ids[j])
    return out


def write_jsonl(log: LoggedData, path: Path | str) -> None:
    with open(path, "wb") as f:
        for d in to_docs(log):
            f.write(orjson.dumps(d) + b"\n")


def write_csv(log: LoggedData, path: Path | str) -> None:
    clash = sorted(set(log.feature_names) & set(COLUMNS))
    if clash:
        raise OfflineDataError(f"feature names {clash} collide with the CSV's fixed columns")
    docs = to_docs(log)
    fixed = [c for c in COLUMNS if any(c in d for d in docs)]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(fixed + list(log.feature_names))
        for d in docs:
            w.writerow([_cell(d.get(c)) for c in fixed] + [repr(x) for x in d["features"]])


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, list):
        return ";".join(str(int(x)) if isinstance(x, bool) else repr(x) for x in v)
    return repr(v) if isinstance(v, float) else str(v)


def reindex_actions(log: LoggedData, names: Iterable[str]) -> LoggedData:
    """The log on another action space (e.g. a model's): same rows, actions renumbered by name.
    Actions the log never had get allowed = True and logging probability 0."""
    names = tuple(names)
    if names == log.action_names:
        return log
    unknown = sorted(set(log.action_names) - set(names))
    if unknown:
        raise OfflineDataError(f"the logs have actions {unknown} that the action space "
                               f"{list(names)} lacks")
    cols = np.array([names.index(a) for a in log.action_names], dtype=np.int64)
    allowed = probs = None
    if log.allowed is not None:
        allowed = np.ones((log.n, len(names)), dtype=bool)
        allowed[:, cols] = log.allowed
    if log.action_probs is not None:
        probs = np.zeros((log.n, len(names)))
        probs[:, cols] = log.action_probs
    return replace(log, actions=cols[log.actions], n_actions=len(names), action_names=names,
                   allowed=allowed, action_probs=probs)
