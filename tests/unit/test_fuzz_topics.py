"""Hostile input on every consumed topic (issue 14): schema-shaped and broken messages
interleaved with good ones, through the pure handlers on in-memory tables.

Per topic, on each generated stream:

- no exception escapes the handler, and no message ends as ``processing_error`` (a bug);
- every bad message is dead-lettered with its reason or handled by a documented rule (a
  replay, an erasure, a duplicate, a late order, an ordinary event of its own user): bad in ==
  dead-lettered + handled by a rule, message by message;
- every good message is processed (its decision / reward / learned transition is there);
- the good messages' outputs and the shared tables equal those of the same stream without
  the bad messages (partition clocks excepted: a rejected timestamp is observed by rule,
  docs/RELIABILITY.md "Fuzzing");
- every dead letter stays under the producer's limit (contracts.DLQ_MAX_BYTES), with the
  original's length and sha256 when it had to be cut.

``pytest -s`` prints the per-class counts that docs/RELIABILITY.md's fault table quotes
(derandomized: the same numbers on every run).
"""
from __future__ import annotations

import asyncio
import base64
import collections
import dataclasses
import hashlib
import io
import time

import numpy as np
import orjson
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from streamagent.core.catalog import load_catalog
from streamagent.core.contracts import (DLQ_KEY_MAX, DLQ_MAX_BYTES, DLQ_ORIGINAL_MAX, Conversion,
                                        Decision, Transition, encode, validator)
from streamagent.core.engine import DecisionEngine, initial_model
from streamagent.core.features import FEATURE_NAMES, N_FEATURES
from streamagent.core.learner import QLearner
from streamagent.core.modelcheck import PRODUCER_KEY, SnapshotCheck
from streamagent.core.qnet import ModelSnapshot, init_network
from streamagent.core.tables import BudgetShares, JoinStore, StreamClocks, UserCounts, UserStates
from streamagent.metrics import Metrics
from streamagent.errors import SnapshotRejected
from streamagent.params import engine_params, join_params, learner_params, shipped
from streamagent.stream.decide import DecideHandler, DecideTables, DecideTopics
from streamagent.stream.join import JoinHandler, JoinTopics, key_partition

from .conftest import Msg

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CAT = load_catalog()
S = shipped()
T0 = 1_767_225_600_000  # 2026-01-01 00:00 UTC: every good ts of a stream is in one budget day
DAY = 86_400_000
N_PARTS = 2
NA = CAT.n_actions
ERRORS = "streamagent_stream_processing_errors_total"  # by stage: a bug, not bad input
FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))

# (topic, class) -> [streams with the class, messages, lost, duplicated, crashed]
TALLY: dict[tuple[str, str], list[int]] = collections.defaultdict(lambda: [0, 0, 0, 0, 0])


@pytest.fixture(scope="module", autouse=True)
def print_tally():
    yield
    print("\n| topic | fault or input class | cases tried | events in | lost | duplicated | "
          "crashed |\n|---|---|---|---|---|---|---|")
    for (topic, cls), (cases, n, lost, dup, crashed) in sorted(TALLY.items()):
        print(f"| {topic} | {cls} | {cases} | {n} | {lost} | {dup} | {crashed} |")


def tally(topic: str, classes: list[str], lost=None, dup=None, crashed: int = 0) -> None:
    """Count one stream: ``classes`` one entry per message; lost/dup: class -> count."""
    for cls, n in collections.Counter(classes).items():
        row = TALLY[(topic, cls)]
        row[0] += 1
        row[1] += n
        row[2] += (lost or {}).get(cls, 0)
        row[3] += (dup or {}).get(cls, 0)
        row[4] += crashed


def users_on_parts(prefix: str, per_part: int) -> list[str]:
    """User ids, ``per_part`` of them on each partition (by murmur2, as Faust puts them)."""
    out: dict[int, list[str]] = {p: [] for p in range(N_PARTS)}
    i = 0
    while any(len(v) < per_part for v in out.values()):
        u = f"{prefix}{i}"
        p = key_partition(u.encode(), N_PARTS)
        if len(out[p]) < per_part:
            out[p].append(u)
        i += 1
    return [u for p in range(N_PARTS) for u in out[p]]


PRIMERS = users_on_parts("p", 3)  # 3 good records first on each partition: the clocks' reference
GOOD_USERS = users_on_parts("g", 3)


def part_of(key: bytes | None) -> int:
    return key_partition(key, N_PARTS) if key else 0


class Stream:
    """Builds one interleaved stream: offsets per partition, each message's class and fate."""

    def __init__(self, topic_of=None):
        self.msgs: list[Msg] = []
        self.cls: list[str] = []  # "good" or the bad class
        self.fate: list[str] = []  # "ok" (good), "dlq", or the rule that handles it
        self.offsets: collections.Counter = collections.Counter()
        self.ts_outliers: collections.Counter = collections.Counter()  # per partition

    def add(self, topic: str, key, value, cls: str, fate: str, partition: int | None = None):
        p = part_of(key) if partition is None else partition
        self.msgs.append(Msg(topic, p, self.offsets[(topic, p)], key, value))
        self.offsets[(topic, p)] += 1
        self.cls.append(cls)
        self.fate.append(fate)

    def good(self) -> list[Msg]:
        return [m for m, c in zip(self.msgs, self.cls) if c == "good"]

    def bad(self, fate: str | None = None) -> list[tuple[Msg, str]]:
        return [(m, c) for m, c, f in zip(self.msgs, self.cls, self.fate)
                if c != "good" and (fate is None or f == fate)]


def batches(msgs: list[Msg], size: int) -> list[list[Msg]]:
    return [msgs[i:i + size] for i in range(0, len(msgs), size)]


def run_handler(h, msgs: list[Msg], size: int) -> int:
    """Feed a handler the stream in batches of ``size``; how many batches raised (a crash)."""
    crashed = 0
    for b in batches(msgs, size):
        try:
            asyncio.run(h.handle(b))
        except Exception:  # noqa: BLE001 - counted, then asserted to be 0
            crashed += 1
    return crashed


# ---------------------------------------------------------------- broken bytes, shared
def garbage_key(draw) -> bytes | None:
    return draw(st.sampled_from([None, b"", b"\xff\xfe\x00", b"k" * (DLQ_KEY_MAX + 7),
                                 b"someone-else"]))


def broken_json(draw, good_doc: dict) -> bytes:
    raw = orjson.dumps(good_doc)
    return draw(st.sampled_from([
        raw[: max(1, len(raw) // 2)], b"{broken", b"\x00\x01\xff", b"", b"[]", b"42", b'"x"',
        b"null", raw + b"}", raw.replace(b"{", b"{{", 1)]))


def non_finite(draw, good_doc: dict, field: str) -> bytes:
    """The doc with one number as NaN / Infinity / a literal beyond float64."""
    lit = draw(st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e999"]))
    marker = "__NUM__"
    doc = dict(good_doc)
    doc[field] = marker
    return orjson.dumps(doc).replace(b'"' + marker.encode() + b'"', lit)


def huge(draw, good_doc: dict) -> bytes:
    """Near 1 MB and above: garbage, or the doc padded inside a string the schema bounds."""
    n = draw(st.sampled_from([DLQ_ORIGINAL_MAX - 10, 1_000_000, 1_048_576, 1_600_000]))
    if draw(st.booleans()):
        return b"{" + b"x" * n
    doc = dict(good_doc)
    doc["user_id"] = "u" * n  # maxLength 128 on every topic
    return orjson.dumps(doc)


WRONG_TYPES = [("ts", "soon"), ("ts", 1.5e12 + 0.5), ("ts", 1e300), ("user_id", 7),
               ("user_id", ""), ("ts", None), ("user_id", ["a"]), ("ts", True),
               ("ts", {"$date": 1})]


def check_dead_letters(env_by_pos: dict, stream: Stream, topic: str) -> None:
    """Every dead letter: a valid envelope under the producer's limit, its original intact or
    cut with length and hash; exactly the messages expected (bad, fate "dlq") are there."""
    want = {(m.partition, m.offset): m for m, _ in stream.bad("dlq") if m.topic == topic}
    assert set(env_by_pos) == set(want), (sorted(set(env_by_pos) ^ set(want)))
    for pos, (key, raw) in env_by_pos.items():
        m = want[pos]
        assert len(raw) + len(key or b"") < DLQ_MAX_BYTES - 16_384
        env = orjson.loads(raw)
        validator("dlq-envelope")(env)
        assert env["reason"] != "processing_error", env["detail"]
        assert env["source_topic"] == topic and env["detail"]
        value = m.value or b""
        kept = base64.b64decode(env["original_b64"])
        if len(value) > DLQ_ORIGINAL_MAX:
            assert env["truncated"] and env["original_len"] == len(value)
            assert env["original_sha256"] == hashlib.sha256(value).hexdigest()
            assert kept == value[:DLQ_ORIGINAL_MAX]
        else:
            assert kept == value and "original_len" not in env
        if m.key is not None and len(m.key) > DLQ_KEY_MAX:
            assert env["key_sha256"] == hashlib.sha256(m.key).hexdigest()
            assert key == env["key_sha256"].encode()
        else:
            assert key == m.key


# ================================================================ user-events: DecideHandler
ENGINE = DecisionEngine(CAT, engine_params(S, N_PARTS), initial_model(CAT, (64, 64), 7))
TRIGGERS = set(S.trigger_types)
EVENT_TYPES = ("session_start", "page_view", "search", "add_to_cart", "purchase")
UE_CLASSES = ("invalid_json", "nan_infinity", "huge", "wrong_types", "extreme_ts",
              "duplicate_id", "unknown_coupon_code", "tombstone", "missing_or_garbage_key")


def ue_doc(eid: str, user: str, typ: str, ts: int) -> dict:
    doc = {"event_id": eid, "user_id": user, "type": typ, "ts": ts}
    if typ == "purchase":
        doc.update(amount=42.0, item_id="i1")
    return doc


def user_events_stream(draw) -> Stream:
    s = Stream()
    n = 0
    last_ts = T0

    def good(user, typ):
        nonlocal n, last_ts
        n += 1
        last_ts = T0 + n * 1000
        doc = ue_doc(f"e{n}", user, typ, last_ts)
        if draw(st.integers(0, 4)) == 0:
            doc["ts"] = float(last_ts)  # 1767225601000.0: an integer to JSON Schema
        s.add("user-events", user.encode(), orjson.dumps(doc), "good", "ok")

    for u in PRIMERS:  # 3 on each partition, first: the partition clocks have a reference
        good(u, "page_view")
    # at most 30 events: fewer than the 32 ids a user's state remembers (a duplicate older
    # than that is applied again: the documented limit)
    order = draw(st.lists(st.booleans(), min_size=6, max_size=30))
    n_bad = 0
    for is_good in order:
        if is_good:
            good(draw(st.sampled_from(GOOD_USERS)), draw(st.sampled_from(EVENT_TYPES)))
            continue
        n_bad += 1
        cls = draw(st.sampled_from(UE_CLASSES))
        # broken messages may carry a good user's key: they must not touch that user
        user = draw(st.sampled_from(GOOD_USERS + [f"b{n_bad}"]))
        doc = ue_doc(f"x{n_bad}", user, "session_start", last_ts)
        key = user.encode()
        if cls == "invalid_json":
            s.add("user-events", key, broken_json(draw, doc), cls, "dlq")
        elif cls == "nan_infinity":
            doc["type"] = "purchase"
            s.add("user-events", key, non_finite(draw, doc, draw(st.sampled_from(
                ["amount", "price", "ts"]))), cls, "dlq")
        elif cls == "huge":
            raw = huge(draw, doc)
            s.add("user-events", key, raw, cls, "dlq")
        elif cls == "wrong_types":
            field, value = draw(st.sampled_from(WRONG_TYPES + [
                ("type", "teleport"), ("price", "cheap"), ("quantity", 0.5), ("tags", {"a": 1}),
                ("event_id", ""), ("schema_version", 2), ("amount", -1)]))
            doc[field] = value
            s.add("user-events", key, orjson.dumps(doc), cls, "dlq")
        elif cls == "extreme_ts":
            p = part_of(key)
            in_range = [last_ts + 400 * DAY, last_ts - 400 * DAY, 4_102_444_800_000]
            # at most 2 in-range outliers per partition: a median of 5 then stays good
            pool = ([-1, 0, 2 ** 63 - 1, 2 ** 64 - 1, 946_684_799_999, 4_102_444_800_001]
                    + (in_range if s.ts_outliers[p] < 2 else []))
            doc["ts"] = draw(st.sampled_from(pool))
            if doc["ts"] in in_range:
                s.ts_outliers[p] += 1
            s.add("user-events", key, orjson.dumps(doc), cls, "dlq")
        elif cls == "duplicate_id":
            # an earlier good event again at a new offset, whole or with other content
            m = draw(st.sampled_from(s.good()))
            raw = m.value
            if draw(st.booleans()):
                d = orjson.loads(raw)
                d["type"], d["query"] = "search", "other content, same id"
                raw = orjson.dumps(d)
            s.add("user-events", m.key, raw, cls, "replay")
        elif cls == "unknown_coupon_code":
            # a valid purchase with a code nobody issued, of a user with no good messages:
            # an ordinary event of its own user (decide does not interpret codes); its ts
            # may come as 1767225600000.0, an integer to JSON Schema (decoded as an int)
            u = f"b{n_bad}"
            d = ue_doc(f"x{n_bad}", u, "purchase", last_ts)
            if draw(st.booleans()):
                d["ts"] = float(last_ts)
            d["coupon_code"] = draw(st.sampled_from(["C-" + "f" * 32, "BOGUS", "C-", "x" * 128]))
            s.add("user-events", u.encode(), orjson.dumps(d), cls, "applied")
        elif cls == "tombstone":
            if draw(st.booleans()):  # keyed: an erasure request (of a user with no good ones)
                s.add("user-events", f"b{n_bad}".encode(), None, cls, "erasure")
            else:
                s.add("user-events", draw(st.sampled_from([None, b""])), None, cls, "dlq",
                      partition=draw(st.integers(0, N_PARTS - 1)))
        else:  # missing_or_garbage_key
            k = garbage_key(draw)
            s.add("user-events", k, orjson.dumps(doc), cls, "dlq",
                  partition=draw(st.integers(0, N_PARTS - 1)))
    return s


def unpriced(state) -> dict | None:
    """A user state as its document, without the pacing price of its decisions."""
    if state is None:
        return None
    doc = orjson.loads(state.to_bytes())
    for d in doc.get("decisions") or ():
        if isinstance(d, dict):
            d.pop("shadow_price", None)
    return doc


def run_decide(msgs: list[Msg], size: int):
    users, budgets, sent = {}, {}, []

    async def send(topic, key, value):
        sent.append((topic, key, value))
    h = DecideHandler(ENGINE, DecideTables(UserStates(users), BudgetShares(budgets),
                                           UserCounts(budgets), StreamClocks(budgets)),
                      DecideTopics("decision-log", "coupon-actions", "user-events.dlq"),
                      send, Metrics(), S.trigger_types)
    crashed = run_handler(h, msgs, size)
    return users, budgets, sent, h.m, crashed


@FUZZ
@given(st.data())
def test_user_events_fuzz(data):
    draw = data.draw
    s = user_events_stream(draw)
    size = draw(st.sampled_from([1, 3, 7, 500]))
    users, budgets, sent, m, crashed = run_decide(s.msgs, size)
    users0, budgets0, sent0, m0, _ = run_decide(s.good(), size)
    get = m.registry.get_sample_value

    # dead letters: exactly the bad messages expected, each a sound envelope
    dl = {}
    for topic, key, raw in sent:
        if topic == "user-events.dlq":
            env = orjson.loads(raw)
            dl[(env["partition"], env["offset"])] = (key, raw)
    check_dead_letters(dl, s, "user-events")

    # rules: duplicates are replays, keyed tombstones erasures, valid odd events applied
    replays = s.bad("replay")
    assert (get("streamagent_ingest_replayed_events_total") or 0) == len(replays)
    erasures = s.bad("erasure")
    assert (get("streamagent_state_erasures_total", {"table": "user-state"}) or 0) == len(erasures)
    assert sorted(k for t, k, v in sent if t == "decision-log" and v is None) == \
        sorted(mm.key for mm, _ in erasures)
    for mm, _ in s.bad("applied"):
        st_ = UserStates(users).get(mm.key)
        assert st_ is not None and orjson.loads(mm.value)["event_id"] in st_.event_ids

    # good: the same decisions, coupon actions, user states and budgets as without the bad
    def by_id(out, topic):
        c, docs = collections.Counter(), {}
        for t, _, raw in out:
            if t == topic and raw is not None:
                d = orjson.loads(raw)
                c[d["decision_id"]] += 1
                docs[d["decision_id"]] = d
        return c, docs

    n_dec, dec = by_id(sent, "decision-log")
    n_dec0, dec0 = by_id(sent0, "decision-log")
    # the pacing price follows the partition clock, which observes a rejected ts (by rule):
    # it may move by the clock's one-arrival shift, nothing else may
    price = {i: (d.pop("shadow_price", None), dec0[i].pop("shadow_price", None))
             for i, d in dec.items() if i in dec0}
    assert dec == dec0
    assert all(a == b or abs(a - b) < 1e-3 for a, b in price.values())
    assert by_id(sent, "coupon-actions")[1] == by_id(sent0, "coupon-actions")[1]
    triggers = {orjson.loads(mm.value)["event_id"] for mm in s.good()
                if orjson.loads(mm.value)["type"] in TRIGGERS}
    assert {d["trigger_event_id"] for d in dec.values()} == triggers
    resent = sum(n_dec.values()) - sum(n_dec0.values())  # replays of triggers re-send
    missing = get("streamagent_ingest_replay_decision_missing_total") or 0
    assert 0 <= resent <= len(replays) - missing
    for u in PRIMERS + GOOD_USERS:  # (the decisions they keep: with the price as above)
        a, b = UserStates(users).get(u.encode()), UserStates(users0).get(u.encode())
        assert unpriced(a) == unpriced(b), u
    for u in PRIMERS + GOOD_USERS:  # every good event applied
        st_ = UserStates(users).get(u.encode())
        mine = [orjson.loads(mm.value)["event_id"] for mm in s.good() if mm.key == u.encode()]
        assert (st_.n_events if st_ else 0) == len(mine)
        assert set(mine) <= set(st_.event_ids if st_ else ())
    for p in range(N_PARTS):  # the spend (the pacing controller's time follows the clock)
        a, b = BudgetShares(budgets).get(p), BudgetShares(budgets0).get(p)
        assert (a.period, a.spent) == (b.period, b.spent)
    assert crashed == 0 and not get(ERRORS, {"stage": "decide"})

    dup = {"duplicate_id": max(0, resent - (len(replays) - missing))}
    tally("user-events", s.cls, dup=dup, crashed=crashed)


# ================================================================ decision-log, conversions: join
JP = join_params(S)
CONV_CLASSES = ("invalid_json", "nan_infinity", "huge", "wrong_types", "extreme_ts",
                "duplicate_id", "unknown_coupon_code", "tombstone", "missing_or_garbage_key")
DEC_CLASSES = CONV_CLASSES[:6] + ("unknown_action", "action_index_out_of_range",
                                  "features_wrong_length", "tombstone", "missing_or_garbage_key")


def did_of(n: int) -> str:
    return f"{n:032x}"


def dec_doc(n: int, user: str, ts: int, action: int = 1) -> dict:
    return Decision(decision_id=did_of(n), user_id=user, ts=ts, action=CAT.actions[action],
                    action_index=action, propensity=0.5, explored=False, exploration="epsilon",
                    epsilon=0.1, policy_version=1, trigger_event_id=f"e{n}",
                    trigger_type="session_start", q_values=(0.0,) * NA, allowed=(True,) * NA,
                    blocked_by=(), features=tuple(float(i % 7) / 7 for i in range(N_FEATURES)),
                    cost=1.0).to_doc()


def conv_doc(oid: str, user: str, ts: int, amount: float = 80.0, did: str | None = None) -> dict:
    return Conversion(order_id=oid, user_id=user, ts=ts, amount=amount,
                      decision_id=did).to_doc()


def join_stream(draw) -> Stream:
    s = Stream()
    n = 0
    last_ts = T0
    decided: list[tuple[str, str, int]] = []  # (user, decision id, ts) of good decisions
    conv_ts: dict[int, int] = {}  # partition -> its latest good conversion's ts

    def good_decision(user):
        nonlocal n, last_ts
        n += 1
        last_ts = T0 + n * 60_000
        doc = dec_doc(n, user, last_ts, draw(st.integers(0, NA - 1)))
        if draw(st.integers(0, 4)) == 0:
            doc["ts"] = float(last_ts)  # an integer to JSON Schema
        s.add("decision-log", user.encode(), orjson.dumps(doc), "good", "ok")
        decided.append((user, did_of(n), last_ts))

    def good_conversion():
        nonlocal n
        n += 1
        user, did, ts = draw(st.sampled_from(decided))
        p = part_of(user.encode())
        conv_ts[p] = max(conv_ts.get(p, T0), ts + 30_000)
        doc = conv_doc(f"o{n}", user, conv_ts[p], 80.0, did if draw(st.booleans()) else None)
        if draw(st.integers(0, 4)) == 0:
            doc["ts"] = float(doc["ts"])
        s.add("conversions", user.encode(), orjson.dumps(doc), "good", "ok")

    for u in PRIMERS:
        good_decision(u)
    order = draw(st.lists(st.sampled_from(["d", "c", "bad"]), min_size=6, max_size=40))
    n_bad = 0
    for what in order:
        if what == "d":
            good_decision(draw(st.sampled_from(GOOD_USERS)))
            continue
        if what == "c":
            good_conversion()
            continue
        n_bad += 1
        topic = draw(st.sampled_from(["decision-log", "conversions"]))
        cls = draw(st.sampled_from(DEC_CLASSES if topic == "decision-log" else CONV_CLASSES))
        user = draw(st.sampled_from(GOOD_USERS + [f"b{n_bad}"]))
        key = user.encode()
        doc = (dec_doc(10_000 + n_bad, user, last_ts) if topic == "decision-log"
               else conv_doc(f"x{n_bad}", user, last_ts))
        c = f"{topic}: {cls}"
        if cls == "invalid_json":
            s.add(topic, key, broken_json(draw, doc), c, "dlq")
        elif cls == "nan_infinity":
            field = draw(st.sampled_from(["propensity", "cost", "ts"] if topic == "decision-log"
                                         else ["amount", "discount", "ts"]))
            s.add(topic, key, non_finite(draw, doc, field), c, "dlq")
        elif cls == "huge":
            s.add(topic, key, huge(draw, doc), c, "dlq")
        elif cls == "wrong_types":
            field, value = draw(st.sampled_from(WRONG_TYPES + (
                [("propensity", 0), ("features", "x"), ("action_index", -1),
                 ("decision_id", "not-hex"), ("q_values", [None])] if topic == "decision-log"
                else [("amount", "80"), ("amount", -5), ("heartbeat", "yes"),
                      ("order_id", "")])))
            doc[field] = value
            s.add(topic, key, orjson.dumps(doc), c, "dlq")
        elif cls == "extreme_ts":
            p = part_of(key)
            pool = [-1, 0, 2 ** 63 - 1, 2 ** 64 - 1, 946_684_799_999, 4_102_444_800_001]
            if s.ts_outliers[p] < 2:  # far ahead, in the schema's range: out of bounds
                pool += [last_ts + 400 * DAY, 4_102_444_800_000]
            doc["ts"] = draw(st.sampled_from(pool))
            if 946_684_800_000 <= doc["ts"] <= 4_102_444_800_000:
                s.ts_outliers[p] += 1
            s.add(topic, key, orjson.dumps(doc), c, "dlq")
        elif cls == "duplicate_id":
            same = [mm for mm in s.good() if mm.topic == topic]
            if not same:  # no good conversion yet: re-send a decision instead
                topic, c = "decision-log", "decision-log: duplicate_id"
                same = [mm for mm in s.good() if mm.topic == topic]
            mm = draw(st.sampled_from(same))
            s.add(topic, mm.key, mm.value, c,
                  "duplicate_decision" if topic == "decision-log" else "duplicate_conversion")
        elif cls == "unknown_coupon_code":
            # a valid order naming a coupon nobody issued, of a user with no decisions, no
            # later than the partition's good orders (a valid order may move the watermark,
            # by rule; this one cannot): never attributed. Only where good orders came first.
            u = f"b{n_bad}"
            p = part_of(u.encode())
            if p not in conv_ts:
                s.add(topic, u.encode(), b"{", c, "dlq")
                continue
            d = conv_doc(f"x{n_bad}", u, conv_ts[p])
            d["coupon_code"] = draw(st.sampled_from(["C-" + "f" * 32, "BOGUS", "C-"]))
            if draw(st.booleans()):
                d["ts"] = float(d["ts"])  # an integer to JSON Schema
            s.add(topic, u.encode(), orjson.dumps(d), c, "unmatched_or_late")
        elif cls == "unknown_action":
            doc["action"] = "BOGUS"
            s.add(topic, key, orjson.dumps(doc), c, "dlq")
        elif cls == "action_index_out_of_range":
            doc["action_index"] = draw(st.sampled_from([NA, NA + 1, 99, 2 ** 40, 2 ** 64 - 1]))
            s.add(topic, key, orjson.dumps(doc), c, "dlq")
        elif cls == "features_wrong_length":
            field = draw(st.sampled_from(["features", "features", "allowed", "q_values"]))
            length = draw(st.sampled_from([0, 1, N_FEATURES - 1, N_FEATURES + 1, NA + 1]))
            if field == "features" and length == N_FEATURES:
                length = 1
            if field != "features" and length == NA:
                length = 1
            doc[field] = [True] * length if field == "allowed" else [0.5] * length
            s.add(topic, key, orjson.dumps(doc), c, "dlq")
        elif cls == "tombstone":
            if topic == "decision-log" and draw(st.booleans()):
                s.add(topic, f"b{n_bad}".encode(), None, c, "erasure")  # forget a bad-only user
            elif topic == "decision-log" and draw(st.booleans()):
                s.add(topic, b"\xff\xfe" + str(n_bad).encode(), None, c, "dlq")  # names nobody
            else:  # unkeyed; or a null order, keyed or not
                keys = [None, b""] + ([key] if topic == "conversions" else [])
                s.add(topic, draw(st.sampled_from(keys)), None, c, "dlq",
                      partition=draw(st.integers(0, N_PARTS - 1)))
        else:  # missing_or_garbage_key, or (conversions) the wrong partition
            if topic == "conversions" and draw(st.booleans()):
                s.add(topic, key, orjson.dumps(doc), c, "dlq",
                      partition=(part_of(key) + 1) % N_PARTS)
            else:
                s.add(topic, garbage_key(draw), orjson.dumps(doc), c, "dlq",
                      partition=draw(st.integers(0, N_PARTS - 1)))
    return s


def run_join(msgs: list[Msg], size: int):
    table, sent = {}, []

    async def send(topic, key, value):
        sent.append((topic, key, value))
    h = JoinHandler(CAT, JP, table, JoinTopics("decision-log", "conversions", "rewards",
                                               "transitions", lambda t: t + ".dlq"),
                    send, Metrics(), N_PARTS)
    crashed = run_handler(h, msgs, size)
    store = JoinStore(table)
    records = {u: store.record(u).to_doc() for u in PRIMERS + GOOD_USERS if store.has_record(u)}
    pending = [h.joiner().pending(p) for p in range(N_PARTS)]
    flushed = collections.Counter()
    for p in range(N_PARTS):  # end of input: every window closes
        out = h.joiner().flush(p)
        flushed.update(out.counts)
        sent += [("rewards", None, encode(r.to_doc())) for r in out.rewards]
        sent += [("transitions", None, encode(t.to_doc())) for t in out.transitions]
    return records, pending, sent, h.m, flushed, crashed


@FUZZ
@given(st.data())
def test_join_inputs_fuzz(data):
    draw = data.draw
    s = join_stream(draw)
    size = draw(st.sampled_from([1, 4, 500]))
    records, pending, sent, m, flushed, crashed = run_join(s.msgs, size)
    records0, pending0, sent0, m0, flushed0, _ = run_join(s.good(), size)

    def outcome(mm, what):
        return ((mm.registry.get_sample_value("streamagent_reward_join_events_total",
                                              {"outcome": what}) or 0))

    for topic in ("decision-log", "conversions"):
        dl = {}
        for t, key, raw in sent:
            if t == topic + ".dlq":
                env = orjson.loads(raw)
                dl[(env["partition"], env["offset"])] = (key, raw)
        check_dead_letters(dl, s, topic)
    # rules
    for rule in ("duplicate_decision", "duplicate_conversion"):
        assert outcome(m, rule) - outcome(m0, rule) == len(s.bad(rule)), rule
    odd = len(s.bad("unmatched_or_late"))
    assert (outcome(m, "late_conversion") + flushed["unmatched_conversion"]
            + outcome(m, "unmatched_conversion")) - (
        outcome(m0, "late_conversion") + flushed0["unmatched_conversion"]
        + outcome(m0, "unmatched_conversion")) == odd
    erased = m.registry.get_sample_value("streamagent_state_erasures_total",
                                         {"table": "join-state"}) or 0
    assert erased == len(s.bad("erasure"))

    # good: the same rewards and transitions, join records and pending counts
    def by_id(out, topic):
        c, docs = collections.Counter(), {}
        for t, _, raw in out:
            if t == topic:
                d = orjson.loads(raw)
                c[d["decision_id"]] += 1
                docs[d["decision_id"]] = d
        return c, docs

    for topic in ("rewards", "transitions"):
        n_out, docs = by_id(sent, topic)
        n_out0, docs0 = by_id(sent0, topic)
        assert docs == docs0, topic
        assert set(n_out.values()) <= {1}, topic  # exactly one each
    good_dids = {orjson.loads(mm.value)["decision_id"] for mm in s.good()
                 if mm.topic == "decision-log"}
    assert set(by_id(sent, "rewards")[1]) == good_dids  # every good decision rewarded
    assert records == records0 and pending == pending0
    assert crashed == 0
    assert not m.registry.get_sample_value(ERRORS, {"stage": "join"})
    tally("decision-log+conversions", s.cls, crashed=crashed)


# ================================================================ transitions: the learner's ingest
LP = dataclasses.replace(learner_params(S), learning_starts=10 ** 9, buffer_size=2_000)
TR_CLASSES = ("invalid_json", "nan_infinity", "huge", "wrong_types", "duplicate_id",
              "action_index_out_of_range", "features_wrong_length", "no_next_state",
              "tombstone", "garbage_key")


class KMsg:
    """A consumed record as confluent-kafka gives it to the learner."""

    def __init__(self, m: Msg):
        self.m = m

    def topic(self):
        return self.m.topic

    def partition(self):
        return self.m.partition

    def offset(self):
        return self.m.offset

    def key(self):
        return self.m.key

    def value(self):
        return self.m.value


def tr_doc(n: int, user: str, done: bool, rng: np.random.Generator) -> dict:
    f = tuple(float(round(x, 4)) for x in rng.random(N_FEATURES))
    nf = tuple(float(round(x, 4)) for x in rng.random(N_FEATURES))
    return Transition(decision_id=did_of(n), user_id=user, ts=T0 + n, features=f,
                      action_index=n % NA, reward=float(n % 3), propensity=0.5,
                      policy_version=1, next_features=None if done else nf,
                      next_allowed=None if done else (True,) * NA,
                      next_ts=None if done else T0 + n + 1000, dt_ms=None if done else 1000,
                      done=done, allowed=(True,) * NA).to_doc()


def transitions_stream(draw) -> Stream:
    s = Stream()
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 16)))
    n = 0
    order = draw(st.lists(st.booleans(), min_size=4, max_size=40))
    for is_good in [True] + order:
        n += 1
        if is_good:
            user = draw(st.sampled_from(GOOD_USERS))
            s.add("transitions", user.encode(),
                  orjson.dumps(tr_doc(n, user, draw(st.booleans()), rng)), "good", "ok")
            continue
        cls = draw(st.sampled_from(TR_CLASSES))
        user = draw(st.sampled_from(GOOD_USERS))
        doc = tr_doc(n, user, False, rng)
        key = user.encode()
        if cls == "invalid_json":
            s.add("transitions", key, broken_json(draw, doc), cls, "dlq")
        elif cls == "nan_infinity":
            how = draw(st.sampled_from(["literal", "reward", "features", "next_features"]))
            if how == "literal":
                raw = non_finite(draw, doc, draw(st.sampled_from(["reward", "propensity"])))
            else:  # finite as JSON, infinite as the float32 the learner stores
                doc[how] = 3.5e38 if how == "reward" else [1e300] * N_FEATURES
                raw = orjson.dumps(doc)
            s.add("transitions", key, raw, cls, "dlq")
        elif cls == "huge":
            if draw(st.booleans()):
                s.add("transitions", key, huge(draw, doc), cls, "dlq")
            else:  # valid JSON, schema-shaped, 1.2 MB of features
                doc["features"] = [0.123456789] * 100_000
                s.add("transitions", key, orjson.dumps(doc), cls, "dlq")
        elif cls == "wrong_types":
            field, value = draw(st.sampled_from([
                ("reward", "much"), ("features", [1, "x"]), ("done", "no"), ("dt_ms", -1),
                ("propensity", 0), ("propensity", 1.5), ("action_index", 1.5),
                ("decision_id", 5), ("schema_version", 2), ("extra", 1), ("next_allowed", [1])]))
            doc[field] = value
            s.add("transitions", key, orjson.dumps(doc), cls, "dlq")
        elif cls == "duplicate_id":
            mm = draw(st.sampled_from(s.good()))
            raw = mm.value
            if draw(st.booleans()):  # same decision, other numbers: learned once
                d = orjson.loads(raw)
                d["reward"] = 1000.0
                raw = orjson.dumps(d)
            s.add("transitions", mm.key, raw, cls, "duplicate")
        elif cls == "action_index_out_of_range":
            doc["action_index"] = draw(st.sampled_from([NA, 99, 2 ** 40, 2 ** 64 - 1]))
            s.add("transitions", key, orjson.dumps(doc), cls, "dlq")
        elif cls == "features_wrong_length":
            field = draw(st.sampled_from(["features", "features", "next_features",
                                          "next_allowed", "allowed"]))
            length = draw(st.sampled_from([1, 1, 0, 2, 34 if "features" in field else NA + 1]))
            doc[field] = ([True] * length if "allowed" in field else [0.5] * length)
            s.add("transitions", key, orjson.dumps(doc), cls, "dlq")
        elif cls == "no_next_state":
            if draw(st.booleans()):
                doc["next_features"] = None  # not done, but nothing to bootstrap from
            else:
                doc["next_allowed"] = [False] * NA
            s.add("transitions", key, orjson.dumps(doc), cls, "dlq")
        elif cls == "tombstone":
            s.add("transitions", draw(st.sampled_from([None, key])), None, cls, "dlq")
        else:  # garbage_key: the learner ignores keys, so with a broken value
            s.add("transitions", garbage_key(draw), b"\xff" + orjson.dumps(doc), cls, "dlq",
                  partition=draw(st.integers(0, N_PARTS - 1)))
    return s


def learner_service():
    from types import SimpleNamespace

    from streamagent.core.gate import Holdout
    from streamagent.stream.learner import LearnerService

    svc = LearnerService.__new__(LearnerService)
    svc.s, svc.m = S, Metrics()
    svc.learner = QLearner(CAT.actions, FEATURE_NAMES, tuple(S.hidden_sizes), LP)
    svc.offsets, svc._recent = {}, {}
    svc.holdout = Holdout(64, N_FEATURES, NA)
    out = []
    svc.producer = SimpleNamespace(
        produce=lambda topic, key=None, value=None, on_delivery=None: out.append(
            (topic, key, value)), poll=lambda t: 0)
    return svc, out


def run_learner(msgs: list[Msg]):
    svc, out = learner_service()
    fates, crashed = [], 0
    for mm in msgs:
        try:
            fates.append(svc.ingest(KMsg(mm)))
        except Exception:  # noqa: BLE001 - counted, then asserted to be 0
            crashed += 1
            fates.append("crashed")
    return svc, out, fates, crashed


@FUZZ
@given(st.data())
def test_transitions_fuzz(data):
    s = transitions_stream(data.draw)
    svc, out, fates, crashed = run_learner(s.msgs)
    svc0, _, fates0, _ = run_learner(s.good())
    assert crashed == 0
    want = {"ok": "learned", "dlq": "dead_lettered", "duplicate": "duplicate"}
    assert fates == [want[f] for f in s.fate]  # message by message
    assert fates0 == ["learned"] * len(s.good())
    dl = {}
    for topic, key, raw in out:
        assert topic == "transitions.dlq"
        env = orjson.loads(raw)
        dl[(env["partition"], env["offset"])] = (key, raw)
    check_dead_letters(dl, s, "transitions")
    # the learner's state is that of the good transitions alone
    L, L0 = svc.learner, svc0.learner
    assert L.seen == L0.seen and len(L.replay) == len(L0.replay)
    for name in ("s", "a", "r", "s2", "disc", "mask2", "prio"):
        assert np.array_equal(getattr(L.replay, name), getattr(L0.replay, name)), name
    assert L.pending.keys() == L0.pending.keys()
    for u, q in L.pending.items():
        for it, it0 in zip(q, L0.pending[u], strict=True):
            assert all(np.array_equal(x, y) for x, y in zip(it, it0))
    assert np.array_equal(svc.holdout.X, svc0.holdout.X) and svc.holdout.n == svc0.holdout.n
    assert svc._recent == svc0._recent
    assert not svc.m.registry.get_sample_value(ERRORS, {"stage": "learn"})
    tally("transitions", s.cls, lost={"good": sum(f != "learned" for f, c in zip(fates, s.cls)
                                                  if c == "good")}, crashed=crashed)


# ================================================================ model-updates: the follower
CHECK = SnapshotCheck(CAT.actions, FEATURE_NAMES, producer=S.app_id)


def snap(version: int, **kw) -> ModelSnapshot:
    net = init_network(N_FEATURES, NA, tuple(S.hidden_sizes), version, S.q_heads)
    out = ModelSnapshot.from_network(net, version, 10 * version, CAT.actions, FEATURE_NAMES)
    out.promotion, out.created_at, out.meta = version, time.time(), {PRODUCER_KEY: S.app_id}
    return dataclasses.replace(out, **kw)


def _saved(doc: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(doc, buf)
    return buf.getvalue()


def _bad_snapshots() -> dict[str, list[bytes]]:
    """Refused snapshots by class, built once (versions far above any good one's)."""
    v = 500
    nan, inf = snap(v), snap(v)
    nan.state_dict["net.0.weight"][0, 0] = float("nan")
    inf.state_dict["net.2.bias"][:] = float("inf")
    good = snap(v).to_bytes()
    one = snap(v)
    one.state_dict["net.0.bias"] = one.state_dict["net.0.bias"][:1].clone()  # would broadcast
    doc = {"version": v, "train_steps": 1, "hidden": list(S.hidden_sizes),
           "actions": list(CAT.actions), "feature_names": list(FEATURE_NAMES),
           "state_dict": snap(v).state_dict}
    return {
        "invalid_bytes": [b"garbage", b"\x80\x02}q\x00.", good[: len(good) // 2], good[:-9],
                          b"PK\x03\x04" + b"\x00" * 64],
        "nan_infinity": [nan.to_bytes(), inf.to_bytes(),
                         dataclasses.replace(snap(v), created_at=float("inf")).to_bytes()],
        "huge": [b"\x00" * 1_100_000, good + b"\x00" * 1_000_000],
        "wrong_types": [_saved({**doc, "version": "seven"}), _saved({**doc, "hidden": ["64"]}),
                        _saved({**doc, "state_dict": {"net.0.weight": [[1.0]]}}),
                        _saved([1, 2, 3]), _saved({**doc, "version": float("nan")})],
        "wrong_shape": [one.to_bytes(), dataclasses.replace(snap(v), hidden=(8,)).to_bytes(),
                        dataclasses.replace(snap(v), heads=3).to_bytes()],
        "other_actions_or_features": [
            snap(v, actions=CAT.actions[::-1]).to_bytes(),
            snap(v, feature_names=FEATURE_NAMES[:1]).to_bytes()],
        "extreme_version": [snap(2 ** 62, promotion=2 ** 62).to_bytes(),
                            dataclasses.replace(snap(v), version=-1).to_bytes(),
                            snap(v, train_steps=2 ** 60).to_bytes()],
        "other_producer": [snap(v, meta={PRODUCER_KEY: "someone-else"}).to_bytes()],
        "tombstone": [None, b""],
    }


BAD_SNAPS = _bad_snapshots()
GOOD_SNAPS = [snap(v).to_bytes() for v in range(1, 7)]


@settings(FUZZ, max_examples=60)
@given(st.data())
def test_model_updates_fuzz(data):
    from streamagent.ops.kafka import plaintext
    from streamagent.stream.models import ModelFollower

    draw = data.draw
    engine = DecisionEngine(CAT, engine_params(S, 1), initial_model(CAT, tuple(S.hidden_sizes),
                                                                    S.seed, S.q_heads))
    m = Metrics(actions=CAT.actions)
    f = ModelFollower(plaintext("127.0.0.1:1"), "model-updates", engine, m, check=CHECK)
    order = draw(st.lists(st.booleans(), min_size=3, max_size=25))
    version, classes, crashed, lost = 0, [], 0, 0
    for is_good in order:
        before = engine.model
        if is_good and version < len(GOOD_SNAPS):
            version += 1
            raw, cls = GOOD_SNAPS[version - 1], "good"
        else:
            cls = draw(st.sampled_from(sorted(BAD_SNAPS)))
            raw = draw(st.sampled_from(BAD_SNAPS[cls]))
        classes.append(cls)
        try:
            f._apply(raw)
        except Exception:  # noqa: BLE001 - counted, then asserted to be 0
            crashed += 1
        if cls == "good":
            lost += engine.model.version != version
        else:
            assert engine.model is before, cls  # the follower keeps its model
    n_bad = sum(c != "good" for c in classes)
    get = m.registry.get_sample_value
    refused = sum(get("streamagent_decision_model_rejected_total", {"reason": r}) or 0
                  for r in SnapshotRejected.REASONS)
    assert refused == n_bad == (get("streamagent_decision_model_load_errors_total") or 0)
    assert crashed == 0 and lost == 0
    tally("model-updates", classes, lost={"good": lost}, crashed=crashed)
