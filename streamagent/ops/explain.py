"""`streamagent explain DECISION_ID`: why one decision went the way it did.

Finds the decision on decision-log, the model version that made it (model-candidates keeps
every version the learner produced; a model file can be given instead), and prints the Q-value
of every action, the margin over "no coupon", the rules that masked actions, and the features
that pushed the chosen action up or down (core/explain.py: integrated gradients against a new
user at the same moment, adding up exactly to the margin's difference from that user's).
"""
from __future__ import annotations

import json
import sys
from datetime import datetime, timezone

from streamagent.config import Settings
from streamagent.core.explain import Explanation, explain
from streamagent.core.policy import margin_cap
from streamagent.core.qnet import ModelSnapshot, NumpyQ
from streamagent.errors import StreamagentError
from streamagent.ops.kafka import kafka_client
from streamagent.ops.tail import read_to_end
from streamagent.params import cap_params, state_params


class DecisionNotFound(StreamagentError):
    """No decision with that id on decision-log (it may have aged out with the topic's
    retention). `streamagent tail` shows recent decision ids."""


class ModelNotFound(StreamagentError):
    """The decision's model version is not on model-candidates (compacted away, or made by a
    model file). Pass the model with --model FILE."""


def add_arguments(p) -> None:
    p.add_argument("decision_id", help="the decision's id (decision-log's decision_id)")
    p.add_argument("--model", metavar="FILE",
                   help="the model snapshot to explain with (default: the decision's version "
                        "from model-candidates)")
    p.add_argument("--top", type=int, default=8, help="features to show (default 8)")
    p.add_argument("--json", action="store_true", help="print the explanation as JSON")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="give up reading decision-log after this many seconds")


def find_decision(s: Settings, decision_id: str, timeout: float = 60.0) -> dict:
    """The decision-log document with ``decision_id``: reads every partition from its start
    to its end at the time of the call, stopping at the first match."""
    needle = decision_id.encode()
    for m in read_to_end(kafka_client(s), s.topic_decision_log, timeout):
        v = m.value()
        if v and needle in v:  # a cheap filter before parsing
            doc = json.loads(v)
            if doc.get("decision_id") == decision_id:
                return doc
    raise DecisionNotFound(f"no decision {decision_id} on {s.topic_decision_log}")


def model_of(s: Settings, version: int, path: str | None = None) -> ModelSnapshot:
    if path:
        return ModelSnapshot.load(path)
    from streamagent.stream.registry import candidates

    snap = candidates(s).get(version)
    if snap is None:
        raise ModelNotFound(f"model v{version} is not on {s.topic_model_candidates}; "
                            f"pass it with --model FILE")
    return snap


def _num(x: float, sign: bool = False) -> str:
    """Three decimals, or three significant digits for the tiny values of a young model."""
    spec = ("+" if sign else "") + (".3f" if x == 0 or abs(x) >= 0.01 else ".2e")
    return format(x, spec)


def render(e: Explanation, doc: dict, top: int) -> str:
    when = datetime.fromtimestamp(doc["ts"] / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    how = (f"explored ({doc.get('exploration', '')}), propensity {e.propensity:.3f}"
           if e.explored else f"greedy, propensity {e.propensity:.3f}")
    lines = [f"decision {e.decision_id}: user {doc.get('user_id')}, {when}, "
             f"trigger {doc.get('trigger_type')}, model v{e.policy_version}",
             f"action: {e.action} ({how})", "",
             "Q per action (long-run profit expected from here):"]
    q_none = e.q_values.get("none", 0.0)
    for a, q in e.q_values.items():
        mark = "*" if a == e.action else " "
        rel = "" if a == "none" else f"  ({_num(q - q_none, True)} vs none)"
        why = f"  blocked: {e.blocked[a]}" if a in e.blocked else ""
        lines.append(f"  {mark} {a:14} {_num(q):>10}{rel}{why}")
    if e.action == "none":
        head = (f"why none rather than {e.versus}: Q(none) - Q({e.versus}) = "
                f"{_num(e.margin_over_none, True)}")
        if e.margin_over_none < 0 and not e.explored and e.versus not in e.blocked:
            head += (f"\n  held back: a coupon must beat none by more than {_num(e.hurdle)} "
                     f"(STREAMAGENT_GREEDY_MARGIN x |Q(none)|)")
    else:
        head = f"why {e.action} rather than none: margin {_num(e.margin_over_none, True)}"
    lines += ["", head,
              f"  a new user at the same moment: {_num(e.at_reference, True)}; this user's "
              f"history moves it by {_num(e.margin_over_none - e.at_reference, True)}:"]
    for f, v, c in e.attributions[:top]:
        if c == 0:
            break
        lines.append(f"    {_num(c, True):>10}  {f} = {v:.3f}")
    rest = sum(c for _, _, c in e.attributions[top:])
    if abs(rest) > 0:
        lines.append(f"    {_num(rest, True):>10}  the other {len(e.attributions) - top} features")
    return "\n".join(lines)


def main(args) -> int:
    s = Settings()
    doc = find_decision(s, args.decision_id, args.timeout)
    snap = model_of(s, int(doc.get("policy_version", 0)), args.model)
    sp, cp = state_params(s), cap_params(s)
    e = explain(doc, NumpyQ(snap), snap.actions, sp.half_life_ms, cp.window_ms, s.greedy_margin,
                margin_cap(snap.meta, s.greedy_margin_max))
    if args.json:
        json.dump({**e.to_doc(), "user_id": doc.get("user_id"), "ts": doc["ts"]}, sys.stdout,
                  indent=2)
        print()
    else:
        print(render(e, doc, args.top))
    return 0
