import dataclasses
import subprocess
import sys

import jsonschema
import orjson
import pytest

from streamagent.core import contracts as C
from streamagent.errors import InvalidMessage


@pytest.mark.parametrize("name", sorted(C.SCHEMA_FILES))
def test_schema_is_valid_and_example_validates(name):
    schema = C.load_schema(name)
    jsonschema.Draft202012Validator.check_schema(schema)
    example = orjson.loads((C.schemas_dir() / "examples" / C.SCHEMA_FILES[name]).read_bytes())
    jsonschema.validate(example, schema)
    C.validator(name)(example)  # the fast validator the workers use agrees


INPUTS = [("user-event", C.UserEvent), ("conversion", C.Conversion)]
OUTPUTS = [("decision-log", C.Decision), ("coupon-action", C.CouponAction),
           ("reward", C.Reward), ("transition", C.Transition)]


def example(name: str) -> dict:
    return orjson.loads((C.schemas_dir() / "examples" / C.SCHEMA_FILES[name]).read_bytes())


@pytest.mark.parametrize("name,model", INPUTS)
def test_models_agree_with_schemas(name, model):
    schema = C.load_schema(name)
    fields = {f.name for f in dataclasses.fields(model)}
    assert fields == set(schema["properties"])
    required = {f.name for f in dataclasses.fields(model)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    assert required == set(schema["required"])


@pytest.mark.parametrize("name,model", OUTPUTS)
def test_output_records_agree_with_schemas(name, model):
    schema = C.load_schema(name)
    assert {f.name for f in dataclasses.fields(model)} == set(schema["properties"])
    # the engine and the join write every field, so every field is in the document
    assert set(schema["required"]) <= set(C._field_names(model))


def test_coupon_offer_agrees_with_the_schema():
    coupon = C.load_schema("coupon-action")["properties"]["coupon"]
    assert {f.name for f in dataclasses.fields(C.CouponOffer)} == set(coupon["properties"])


@pytest.mark.parametrize("name,model", INPUTS + OUTPUTS)
def test_records_round_trip_the_examples(name, model):
    doc = example(name)
    record = model.from_doc(doc)
    assert record.to_doc() == doc
    # the same bytes on the topic: the field order is the document's key order
    assert C.encode(record.to_doc()) == orjson.dumps(doc)
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.user_id = "someone else"


def test_decoders_return_records():
    d = C.decode_decision(orjson.dumps(example("decision-log")), b"u-42")
    assert isinstance(d, C.Decision) and d.features == (0.0, 1.0, 0.5)
    t = C.decode_transition(orjson.dumps(example("transition")))
    assert isinstance(t, C.Transition) and t.next_allowed == (True, False, False)
    c = C.decode_conversion(orjson.dumps({"order_id": "o", "user_id": "u", "ts": 1_767_225_600_000,
                                          "amount": 3, "heartbeat": None}), b"u")
    assert c == C.Conversion("o", "u", 1_767_225_600_000, 3.0)
    assert c.to_doc() == {"order_id": "o", "user_id": "u", "ts": 1_767_225_600_000, "amount": 3.0}


def test_table_records_round_trip():
    pd = C.PendingDecision(decision_id="d", ts=1, deadline=2, action_index=1, propensity=0.5,
                           features=(0.1, 0.2), policy_version=3, allowed=(True, False))
    pc = C.PendingConversion(order_id="o", ts=2, amount=9.5, discount=None, decision_id="d")
    rec = C.JoinRecord(user_id="u", decisions=(pd,), conversions=(pc,), orders=("o",), ids=("d",))
    assert C.JoinRecord.from_doc(orjson.loads(orjson.dumps(rec.to_doc()))) == rec
    assert list(rec.to_doc()) == ["user_id", "decisions", "conversions", "orders", "ids",
                                  "last_ts"]
    # a record of a release before last_ts reads with last_ts 0, and the other way round the
    # field is ignored (from_doc takes the fields it knows)
    old = {k: v for k, v in rec.to_doc().items() if k != "last_ts"}
    assert C.JoinRecord.from_doc(old).last_ts == 0


def test_event_types_match_schema():
    assert tuple(C.load_schema("user-event")["properties"]["type"]["enum"]) == C.EVENT_TYPES


def test_dlq_reasons_match_schema():
    from streamagent.metrics import DLQ_REASONS

    assert tuple(C.load_schema("dlq-envelope")["properties"]["reason"]["enum"]) == DLQ_REASONS


GOOD = {"event_id": "e1", "user_id": "u1", "type": "page_view", "ts": 1_767_225_600_000}


@pytest.mark.parametrize("raw,reason", [
    (b"{", "bad_json"), (None, "bad_json"), (b"42", "not_an_object"),
    (orjson.dumps({**GOOD, "price": -1}), "schema"),
    (orjson.dumps({**GOOD, "type": "nope"}), "schema"),
    (orjson.dumps({**GOOD, "ts": "yesterday"}), "schema"),
    (orjson.dumps({**GOOD, "ts": 10}), "schema"),
    (orjson.dumps({k: v for k, v in GOOD.items() if k != "user_id"}), "schema"),
    (orjson.dumps({**GOOD, "event_id": ""}), "schema"),
])
def test_bad_user_events_are_rejected_with_a_reason(raw, reason):
    with pytest.raises(InvalidMessage) as ei:
        C.decode_user_event(raw, b"u1")
    assert ei.value.reason == reason


def test_keys_must_match_user_id():
    raw = orjson.dumps(GOOD)
    assert C.decode_user_event(raw, b"u1").user_id == "u1"
    for key in (b"u2", None):
        with pytest.raises(InvalidMessage) as ei:
            C.decode_user_event(raw, key)
        assert ei.value.reason == "key_mismatch"


def test_unknown_extra_fields_are_tolerated():
    ev = C.decode_user_event(orjson.dumps({**GOOD, "shiny_new_field": {"a": 1}}), b"u1")
    assert ev.event_id == "e1"


def test_dlq_envelope_validates():
    env = C.dlq_envelope(source_topic="t", partition=1, offset=5, key=None, value=b"\x00\xff",
                         reason="bad_json", detail="x" * 5000, failed_at_ms=1)
    C.validator("dlq-envelope")(env)
    assert len(env["detail"]) <= 1000


def test_learning_core_imports_no_kafka_or_faust():
    code = ("import sys, streamagent.core.engine, streamagent.core.features, "
            "streamagent.core.policy, streamagent.core.state, streamagent.core.qnet, "
            "streamagent.core.catalog, streamagent.core.constraints, streamagent.core.contracts, "
            "streamagent.core.join, streamagent.core.tables\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in "
            "('faust', 'aiokafka', 'confluent_kafka', 'mode')]\n"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def _generic_to_doc(rec):
    """The field-by-field to_doc the written-out codecs replace (contracts._codec)."""
    doc = {f.name: C._plain(getattr(rec, f.name)) for f in dataclasses.fields(rec)}
    for name in ("shadow_price", "conditions"):  # the overrides' own rule
        if name in doc and doc[name] is None and type(rec) in (C.Decision, C.CouponOffer):
            del doc[name]
    return doc


def _records():
    pd = C.PendingDecision(decision_id="d1", ts=5, deadline=9, action_index=2, propensity=0.25,
                           features=(0.5, 1, -2.0), policy_version=3, allowed=(True, False),
                           closed=True, reward=1.5, orders=1, amount=20, discount=2.0)
    pc = C.PendingConversion(order_id="o1", ts=7, amount=12.5, discount=None, decision_id="d1")
    yield pd
    yield dataclasses.replace(pd, features=None, allowed=None,
                              vectors=C.PendingDecision.pack((0.5, 1, -2.0), (True, False)))
    yield pc
    yield C.JoinRecord(user_id="u", decisions=(pd, dataclasses.replace(pd, allowed=None)),
                       conversions=(pc,), orders=("o1",), ids=("d1",), last_ts=7)
    yield C.JoinRecord(user_id="v")
    for name in ("decision-log", "reward", "transition", "coupon-action"):
        example = orjson.loads((C.schemas_dir() / "examples" / C.SCHEMA_FILES[name]).read_bytes())
        cls = {"decision-log": C.Decision, "reward": C.Reward, "transition": C.Transition,
               "coupon-action": C.CouponAction}[name]
        yield cls._from_doc_generic(example)


@pytest.mark.parametrize("rec", list(_records()), ids=lambda r: type(r).__name__)
def test_written_out_codecs_equal_the_generic_ones(rec):
    doc = rec.to_doc()
    assert doc == _generic_to_doc(rec)
    assert orjson.dumps(doc) == orjson.dumps(_generic_to_doc(rec))  # same bytes, same order
    back = type(rec).from_doc(doc)
    assert back == type(rec)._from_doc_generic(doc) == rec
    # a document without a defaulted field: the field's default, as before
    fields = dataclasses.fields(rec)
    optional = [f.name for f in fields if f.default is not dataclasses.MISSING]
    if optional:
        short = {k: v for k, v in doc.items() if k != optional[-1]}
        assert type(rec).from_doc(short) == type(rec)._from_doc_generic(short)


@pytest.mark.parametrize("rec", list(_records()), ids=lambda r: type(r).__name__)
def test_evolve_is_dataclasses_replace(rec):
    fields = [f.name for f in dataclasses.fields(rec)]
    assert rec.evolve() == rec and rec.evolve() is not rec
    changes = {fields[0]: getattr(rec, fields[-1]), fields[-1]: getattr(rec, fields[0])}
    new = rec.evolve(**changes)
    assert new == dataclasses.replace(rec, **changes)
    assert type(new) is type(rec)
    assert rec == type(rec).from_doc(rec.to_doc())  # the original is untouched
    with pytest.raises(TypeError, match="no field"):
        rec.evolve(no_such_field=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        new.__setattr__(fields[0], None)  # still frozen


@pytest.mark.parametrize("rec", [r for r in _records() if isinstance(r, C.JoinRecord)],
                         ids=lambda r: r.user_id)
def test_a_join_record_encodes_natively_as_its_document(rec):
    """JoinStore.put_record writes orjson.dumps(record), read back through to_doc's layout."""
    assert orjson.dumps(rec) == orjson.dumps(rec.to_doc())
    assert C.JoinRecord.from_doc(orjson.loads(orjson.dumps(rec))) == rec
