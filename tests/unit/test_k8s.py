"""The Kubernetes manifests of deploy/k8s: the base and the production overlay, rendered, are
valid Kubernetes objects (kubernetes-validate, strict) and agree with the code: every
STREAMAGENT_* variable is a setting, every command a CLI command, the probes hit /healthz and
/readyz on the port the pod's own settings serve them on.

The overlay is rendered by :func:`render`, a small kustomize for the subset deploy/k8s uses; it
refuses any kustomization field it does not implement, so it cannot silently render something
else than kustomize would. Where `kustomize` or `kubectl` is on PATH, a test also checks that
it renders exactly what the real kustomize renders. Not run on a cluster here.
"""
from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from streamagent.cli import build_parser
from streamagent.config import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
BASE = K8S / "base"
OVERLAYS = sorted(p for p in (K8S / "overlays").iterdir() if p.is_dir())
# the oldest Kubernetes still commonly run, and the newest the validator knows
K8S_VERSIONS = ("1.28.0", kubernetes_validate.latest_version())
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
CLUSTER_SCOPED = {"Namespace"}
WORKLOADS = {"StatefulSet", "Deployment", "Job", "DaemonSet"}
IMAGE_USER = 10001  # deploy/Dockerfile: useradd --uid 10001
# which setting names the HTTP port of each long-running command
PORT_SETTING = {"worker": "STREAMAGENT_METRICS_PORT", "learner": "STREAMAGENT_LEARNER_METRICS_PORT"}


# --- a kustomize for the subset we use ----------------------------------------------------------

SUPPORTED = {"apiVersion", "kind", "resources", "components", "namespace", "images", "replicas",
             "patches"}


def _load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _key(obj: dict) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


def merge(base, patch):
    """Strategic merge, for the shapes we patch: maps merge key by key; a list of maps that all
    have a `name` (containers, env, volumes, volumeMounts) merges item by item on that name;
    any other list, and any scalar, is replaced. `null` deletes a key."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)
            else:
                out[k] = merge(base[k], v) if k in base else copy.deepcopy(v)
        return out
    if (isinstance(base, list) and isinstance(patch, list) and base and patch
            and all(isinstance(x, dict) and "name" in x for x in base + patch)):
        out = [copy.deepcopy(x) for x in base]
        names = [x["name"] for x in out]
        for item in patch:
            if item["name"] in names:
                i = names.index(item["name"])
                out[i] = merge(out[i], item)
            else:
                out.append(copy.deepcopy(item))
        return out
    return copy.deepcopy(patch)


def _pod_specs(obj: dict) -> list[dict]:
    if obj["kind"] in WORKLOADS:
        return [obj["spec"]["template"]["spec"]]
    return []


def _set_image(image: str, rule: dict) -> str:
    name, sep, tag = image.rpartition(":") if ":" in image.split("/")[-1] else (image, "", "")
    if name != rule["name"]:
        return image
    return f"{rule.get('newName', name)}:{rule.get('newTag', tag)}" if (
        rule.get("newTag") or tag) else rule.get("newName", name)


def render(directory: Path) -> list[dict]:
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(k) - SUPPORTED
    assert not unknown, f"{directory}: the test's renderer does not implement {unknown}"
    objs: list[dict] = []
    for res in k.get("resources", []):
        p = (directory / res).resolve()
        objs += render(p) if p.is_dir() else _load_docs(p)
    for comp in k.get("components", []):
        objs += render((directory / comp).resolve())
    for patch in k.get("patches", []):
        assert set(patch) == {"path"}, f"only strategic-merge patch files are supported: {patch}"
        for doc in _load_docs(directory / patch["path"]):
            hits = [i for i, o in enumerate(objs) if _key(o) == _key(doc)]
            assert len(hits) == 1, f"patch {patch['path']} matches {len(hits)} objects"
            objs[hits[0]] = merge(objs[hits[0]], doc)
    for rule in k.get("replicas", []):
        hits = [o for o in objs if o["kind"] in WORKLOADS and o["metadata"]["name"] == rule["name"]]
        assert hits, f"replicas: no workload named {rule['name']}"
        for o in hits:
            o["spec"]["replicas"] = rule["count"]
    for rule in k.get("images", []):
        for o in objs:
            for spec in _pod_specs(o):
                for c in spec.get("containers", []) + spec.get("initContainers", []):
                    c["image"] = _set_image(c["image"], rule)
    if "namespace" in k:
        for o in objs:
            if o["kind"] not in CLUSTER_SCOPED:
                o["metadata"]["namespace"] = k["namespace"]
    keys = [_key(o) for o in objs]
    assert len(keys) == len(set(keys)), f"{directory}: duplicate objects"
    return objs


RENDERS = {"base": BASE, **{f"overlays/{p.name}": p for p in OVERLAYS}}


@pytest.fixture(scope="module", params=sorted(RENDERS))
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, render(RENDERS[request.param])


def find(objs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objs if o["kind"] == kind and name in (None, o["metadata"]["name"])]


def containers(objs: list[dict]):
    """(workload, pod spec, container) for every container of every workload."""
    for o in objs:
        for spec in _pod_specs(o):
            for c in spec.get("containers", []):
                yield o, spec, c


def resolved_env(objs: list[dict], c: dict) -> dict[str, str | None]:
    """The container's environment as the kubelet would set it: envFrom ConfigMaps and
    Secrets, then env (literals; secretKeyRef values, or None when an optional key is absent)."""
    env: dict[str, str | None] = {}
    for src in c.get("envFrom", []):
        kind, ref = (("ConfigMap", src["configMapRef"]) if "configMapRef" in src
                     else ("Secret", src["secretRef"]))
        [cm] = find(objs, kind, ref["name"])
        env.update(cm.get("data") or cm.get("stringData") or {})
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        else:
            ref = e["valueFrom"]["secretKeyRef"]
            [secret] = find(objs, "Secret", ref["name"])
            value = {**(secret.get("stringData") or {}), **(secret.get("data") or {})}.get(ref["key"])
            assert value is not None or ref.get("optional"), f"{e['name']}: {ref} is missing"
            env[e["name"]] = value
    return env


# --- the tests --------------------------------------------------------------------------------


def test_the_renderer_refuses_what_it_does_not_implement(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: []\ncommonLabels: {a: b}\n")
    with pytest.raises(AssertionError, match="commonLabels"):
        render(tmp_path)


def test_strategic_merge_merges_named_lists_and_replaces_others():
    base = {"containers": [{"name": "a", "image": "x", "args": ["1"]}, {"name": "b"}],
            "data": {"K": "1", "L": "2"}}
    patch = {"containers": [{"name": "a", "args": ["2"]}], "data": {"L": "3", "K": None}}
    assert merge(base, patch) == {"containers": [{"name": "a", "image": "x", "args": ["2"]},
                                                 {"name": "b"}], "data": {"L": "3"}}


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_manifest_is_a_valid_kubernetes_object(rendered, version):
    where, objs = rendered
    assert len(objs) >= 8
    for o in objs:
        if (o["apiVersion"], o["kind"]) in CRDS:
            continue  # not in the validator's schemas: test_servicemonitor checks it
        kubernetes_validate.validate(o, version, strict=True)


def test_the_validator_catches_a_misspelt_field():
    [sts] = find(render(BASE), "StatefulSet", "streamagent-decider")
    sts["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(sts, K8S_VERSIONS[0], strict=True)


def test_every_streamagent_variable_is_a_setting(rendered):
    _, objs = rendered
    fields = set(Settings.model_fields)
    seen = set()
    for cm in find(objs, "ConfigMap"):
        seen |= {k for k in cm.get("data", {}) if k.startswith("STREAMAGENT_")}
    for _, _, c in containers(objs):
        seen |= {k for k in resolved_env(objs, c) if k.startswith("STREAMAGENT_")}
    assert seen
    unknown = sorted(k for k in seen if k.removeprefix("STREAMAGENT_").lower() not in fields)
    assert not unknown, f"not settings of streamagent.config.Settings: {unknown}"


def test_each_pods_settings_load_and_make_a_valid_kafka_client(rendered, tmp_path):
    """The settings a pod gets are accepted by Settings and by the Kafka client config (no
    SASL credentials with PLAINTEXT, no password without a file...). Secret files are read from
    the rendered Secret, as the pod's mount would show them."""
    from streamagent.ops.kafka import kafka_client

    _, objs = rendered
    for w, spec, c in containers(objs):
        env = {k: v for k, v in resolved_env(objs, c).items()
               if k.startswith("STREAMAGENT_") and v is not None}
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
        vols = {v["name"]: v for v in spec.get("volumes", [])}
        for k, v in list(env.items()):
            for path, vol in mounts.items():
                if v.startswith(path + "/") and "secret" in vols[vol]:
                    [secret] = find(objs, "Secret", vols[vol]["secret"]["secretName"])
                    content = (secret.get("stringData") or {}).get(v[len(path) + 1:])
                    assert content is not None, f"{k}={v}: no such key in the Secret"
                    local = tmp_path / v.strip("/").replace("/", "_")
                    local.write_text(content)
                    env[k] = str(local)
        s = Settings(_env_file=None, **{k.removeprefix("STREAMAGENT_").lower(): v
                                        for k, v in env.items()})
        kafka_client(s)


def test_every_command_is_a_cli_command(rendered):
    _, objs = rendered
    commands = set()
    for _, _, c in containers(objs):
        args = c["args"]
        parsed = build_parser().parse_args(args)  # SystemExit on an unknown command
        assert parsed.cmd == args[0]
        commands.add(tuple(args))
    assert commands == {("worker",), ("learner",), ("topics", "create")}


def test_probes_hit_healthz_and_readyz_on_the_pods_own_metrics_port(rendered):
    _, objs = rendered
    checked = set()
    for w, spec, c in containers(objs):
        cmd = c["args"][0]
        if cmd not in PORT_SETTING:
            assert "livenessProbe" not in c and "readinessProbe" not in c
            continue
        env = resolved_env(objs, c)
        port = int(env[PORT_SETTING[cmd]])
        assert env["STREAMAGENT_METRICS_HOST"] == "0.0.0.0", "the kubelet cannot reach loopback"
        named = {p["name"]: p["containerPort"] for p in c["ports"]}
        for probe, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"),
                            ("readinessProbe", "/readyz")):
            get = c[probe]["httpGet"]
            assert get["path"] == path, (cmd, probe)
            assert named.get(get["port"], get["port"]) == port, (cmd, probe)
        ann = w["spec"]["template"]["metadata"]["annotations"]
        assert (ann["prometheus.io/scrape"], int(ann["prometheus.io/port"]),
                ann["prometheus.io/path"]) == ("true", port, "/metrics")
        checked.add(cmd)
    assert checked == set(PORT_SETTING)


def test_pods_run_unprivileged_with_a_read_only_root(rendered):
    _, objs = rendered
    for w, spec, c in containers(objs):
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] == IMAGE_USER, w["metadata"]
        assert psc["seccompProfile"]["type"] == "RuntimeDefault"  # Pod Security "restricted"
        assert spec["automountServiceAccountToken"] is False
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        tmp = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
        vols = {v["name"]: v for v in spec["volumes"]}
        assert len(tmp) == 1 and "emptyDir" in vols[tmp[0]["name"]], "/tmp must be writable"
        assert c["resources"]["requests"] and c["resources"]["limits"]


def test_state_lives_on_the_statefulsets_volumes(rendered):
    _, objs = rendered
    for sts in find(objs, "StatefulSet"):
        [c] = sts["spec"]["template"]["spec"]["containers"]
        data_dir = resolved_env(objs, c)["STREAMAGENT_DATA_DIR"]
        claims = {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]}
        assert {m["name"] for m in c["volumeMounts"] if m["mountPath"] == data_dir} <= claims
        assert any(m["mountPath"] == data_dir for m in c["volumeMounts"]), sts["metadata"]
        [svc] = find(objs, "Service", sts["spec"]["serviceName"])
        assert svc["spec"]["clusterIP"] == "None"
        labels = sts["spec"]["template"]["metadata"]["labels"]
        assert svc["spec"]["selector"].items() <= labels.items()


def test_deciders_fit_the_partitions_and_the_learner_is_one(rendered):
    _, objs = rendered
    [decider] = find(objs, "StatefulSet", "streamagent-decider")
    [learner] = find(objs, "StatefulSet", "streamagent-learner")
    [cm] = find(objs, "ConfigMap", "streamagent-config")
    assert 1 <= decider["spec"]["replicas"] <= int(cm["data"]["STREAMAGENT_PARTITIONS"])
    assert learner["spec"]["replicas"] == 1
    [pdb] = find(objs, "PodDisruptionBudget")
    labels = decider["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert not pdb["spec"]["selector"]["matchLabels"].items() <= (
        learner["spec"]["template"]["metadata"]["labels"].items())


def test_servicemonitor_scrapes_the_metrics_ports_of_both_services():
    objs = render(K8S / "overlays" / "production")
    [sm] = find(objs, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    sel = sm["spec"]["selector"]["matchLabels"]
    selected = [s for s in find(objs, "Service") if sel.items() <= s["metadata"]["labels"].items()]
    assert {s["metadata"]["name"] for s in selected} == {"streamagent-decider", "streamagent-learner"}
    for ep in sm["spec"]["endpoints"]:
        assert ep["path"] == "/metrics"
        for s in selected:
            assert ep["port"] in {p["name"] for p in s["spec"]["ports"]}


def test_the_production_overlay_changes_what_it_says():
    objs = render(K8S / "overlays" / "production")
    images = {c["image"] for _, _, c in containers(objs)}
    assert images == {"registry.example.com/streamagent:0.1.0"}
    assert all(o["metadata"].get("namespace") == "streamagent" for o in objs
               if o["kind"] not in CLUSTER_SCOPED)
    [cm] = find(objs, "ConfigMap")
    assert cm["data"]["STREAMAGENT_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    assert cm["data"]["STREAMAGENT_KAFKA_BOOTSTRAP"] != "kafka:9092"
    assert cm["data"]["STREAMAGENT_APP_ID"] == "streamagent"  # kept from the base
    [decider] = find(objs, "StatefulSet", "streamagent-decider")
    assert decider["spec"]["replicas"] == 8
    [c] = decider["spec"]["template"]["spec"]["containers"]
    assert c["resources"]["limits"]["memory"] == "3Gi" and c["readinessProbe"]  # merged
    base_images = {c["image"] for _, _, c in containers(render(BASE))}
    assert base_images == {"streamagent:local"}


def _kustomize() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


@pytest.mark.skipif(_kustomize() is None, reason="neither kustomize nor kubectl is on PATH")
@pytest.mark.parametrize("name", sorted(RENDERS))
def test_the_renderer_agrees_with_kustomize(name):
    proc = subprocess.run([*_kustomize(), str(RENDERS[name])], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    theirs = {_key(o): o for o in yaml.safe_load_all(proc.stdout) if o}
    ours = {_key(o): o for o in render(RENDERS[name])}
    assert theirs == ours
