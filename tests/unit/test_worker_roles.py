"""STREAMAGENT_WORKER_ROLE: what a worker of each role builds (no broker: the app only)."""
from __future__ import annotations

import pytest

from streamagent.params import shipped
from streamagent.stream.app import create_app, group_id, join_changelog_topic, role_inputs


def _app(tmp_path, role: str):
    return create_app(shipped(table_store="memory://", metrics_port=0, data_dir=tmp_path,
                              app_id="shop", worker_role=role), n_partitions=2).app


def _changelogs(app) -> dict[str, str]:
    return {name: t.changelog_topic.get_topic_name() for name, t in app.tables.items()}


def test_all_in_one_is_the_shipped_role_with_faust_names(tmp_path):
    assert shipped().worker_role == "all"
    app = _app(tmp_path, "all")
    assert app.conf.id == "shop"
    # the names Faust gives the changelogs: an existing deployment keeps its topics
    assert _changelogs(app) == {t: f"shop-{t}-changelog"
                                for t in ("user-state", "budget", "join-state")}
    assert sorted(a.split(".")[-1] for a in app.agents) == ["decide", "join"]
    assert app.streamagent_joiner is not None and app.streamagent_users is not None


def test_a_decide_worker_has_no_join(tmp_path):
    app = _app(tmp_path, "decide")
    assert app.conf.id == "shop"
    assert _changelogs(app) == {"user-state": "shop-user-state-changelog",
                                "budget": "shop-budget-changelog"}
    assert [a.split(".")[-1] for a in app.agents] == ["decide"]
    assert app.streamagent_join is None and app.streamagent_joiner is None


def test_a_join_worker_has_its_own_group_and_the_shared_changelog(tmp_path):
    app = _app(tmp_path, "join")
    s = shipped(app_id="shop", worker_role="join")
    assert app.conf.id == group_id(s) == "shop-join"
    # the all-in-one worker's changelog, not Faust's "shop-join-join-state-changelog"
    assert join_changelog_topic(s) == "shop-join-state-changelog"
    assert _changelogs(app) == {"join-state": join_changelog_topic(s)}
    assert [a.split(".")[-1] for a in app.agents] == ["join"]
    assert app.streamagent_decide is None and app.streamagent_users is None


@pytest.mark.parametrize("role,inputs", [
    ("all", ("user-events", "decision-log", "conversions")),
    ("decide", ("user-events",)),
    ("join", ("decision-log", "conversions"))])
def test_each_role_reads_its_inputs(role, inputs):
    assert role_inputs(shipped(worker_role=role)) == inputs


def test_the_command_line_role_overrides_the_setting(monkeypatch):
    from streamagent import cli

    seen = {}
    monkeypatch.setattr("streamagent.stream.worker.run_worker",
                        lambda s: seen.setdefault("role", s.worker_role) and 0)
    monkeypatch.setenv("STREAMAGENT_WORKER_ROLE", "decide")
    assert cli.main(["worker", "--role", "join"]) == 0
    assert seen["role"] == "join"
