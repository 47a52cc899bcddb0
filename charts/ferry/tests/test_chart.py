"""What the Kubernetes schemas cannot check in the rendered chart.

Every ci/*-values.yaml is rendered with the real Helm binary; the built-in kinds are
checked against the bundled Kubernetes schemas, and the rest here: KEDA trigger fields
per scaler (all strings, as the KEDA CRD demands), names given once and used both in
ferry's configuration and in the triggers, probes on the admin port, a grace period
above every shutdown_grace, the hardened security context, and the values the chart
refuses. With a ferry binary at hand, ferry itself validates each rendered configuration.
"""

import copy
import os
import re
import subprocess
import tempfile
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

CHART = Path(__file__).resolve().parents[1]
ROOT = CHART.parents[1]
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
BUILTIN_API_GROUPS = ("v1", "apps/v1", "policy/v1", "autoscaling/v2")
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")
CRD_KINDS = {"ScaledObject", "TriggerAuthentication", "ServiceMonitor"}


def helm() -> str:
    path = os.environ.get("HELM") or str(ROOT / "target" / "tools" / "helm")
    if not Path(path).is_file():
        pytest.fail(f"no helm binary at {path}: run scripts/chart-tools.sh (or set HELM)")
    return path


def render(values: dict | None = None, files: tuple = (), expect_error: bool = False):
    """helm template with the chart's values plus `files` and `values`; the documents, or
    the error text when `expect_error`."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as extra:
        yaml.safe_dump(values or {}, extra)
        extra.flush()
        args = [helm(), "template", "rel", str(CHART), "--namespace", "work"]
        for f in files:
            args += ["-f", str(f)]
        args += ["-f", extra.name]
        run = subprocess.run(args, capture_output=True, text=True, check=False)
    if expect_error:
        assert run.returncode != 0, "the chart rendered values it should refuse"
        return run.stderr
    assert run.returncode == 0, run.stderr
    return [d for d in yaml.safe_load_all(run.stdout) if d]


def load_values(path: Path) -> dict:
    """The chart's defaults merged with one values file, as Helm does (maps merge deeply;
    a file that sets a route's map replaces nothing else)."""
    merged = yaml.safe_load((CHART / "values.yaml").read_text())
    over = yaml.safe_load(path.read_text()) or {}

    def merge(base, top):
        for k, v in top.items():
            if isinstance(v, dict) and isinstance(base.get(k), dict):
                merge(base[k], v)
            else:
                base[k] = copy.deepcopy(v)

    merge(merged, over)
    return merged


def kind(docs, name):
    return [d for d in docs if d["kind"] == name]


def one(docs, name):
    found = kind(docs, name)
    assert len(found) == 1, f"expected one {name}, got {len(found)}"
    return found[0]


def seconds(text: str) -> float:
    """A duration as ferry reads it ("500ms", "1m 30s") in seconds."""
    units = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600, "d": 86400}
    parts = re.findall(r"(\d+)\s*(ms|min|m|sec|s|hr|h|d)", text)
    assert parts, f"{text!r} is not a duration"
    return sum(int(n) * units[u] for n, u in parts)


def configs(docs):
    """Every configuration file the ConfigMap carries: {key: parsed YAML}."""
    maps = kind(docs, "ConfigMap")
    return {k: yaml.safe_load(v) for m in maps for k, v in m["data"].items()}


def ferry_container(docs):
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return pod, container


@pytest.fixture(scope="module", params=CI_VALUES, ids=lambda p: p.name)
def rendered(request):
    return request.param, load_values(request.param), render(files=(request.param,))


def test_builtin_kinds_pass_the_kubernetes_schemas(rendered):
    _, _, docs = rendered
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            continue
        assert doc["apiVersion"] in BUILTIN_API_GROUPS, doc["apiVersion"]
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


def test_only_known_kinds_are_rendered(rendered):
    _, _, docs = rendered
    known = {"ConfigMap", "Deployment", "Service", "ServiceAccount", "PodDisruptionBudget",
             "HorizontalPodAutoscaler"} | CRD_KINDS
    assert {d["kind"] for d in docs} <= known


def test_probes_and_service_use_the_admin_port(rendered):
    _, values, docs = rendered
    listen = values["config"].get("admin", {}).get("listen", "0.0.0.0:8080")
    port = int(listen.rsplit(":", 1)[1])
    _, container = ferry_container(docs)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"admin": port}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    service = one(docs, "Service")
    assert service["spec"]["ports"] == [
        {"name": "admin", "port": port, "targetPort": "admin", "protocol": "TCP"}
    ]
    for monitor in kind(docs, "ServiceMonitor"):
        assert monitor["spec"]["endpoints"][0]["port"] == "admin"
        assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"


def test_grace_period_outlasts_every_shutdown_grace(rendered):
    _, values, docs = rendered
    pod, _ = ferry_container(docs)
    graces = [
        seconds(route.get("delivery", {}).get("shutdown_grace", "30s"))
        for config in configs(docs).values()
        for route in (config.get("routes") or {}).values()
    ] or [values["shutdownGraceSeconds"]]
    assert pod["terminationGracePeriodSeconds"] >= max(graces) + values["terminationGraceMarginSeconds"]


def test_pod_is_hardened(rendered):
    _, _, docs = rendered
    pod, container = ferry_container(docs)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert container["resources"]["requests"]


def test_config_mounted_at_etc_ferry_with_layers_in_place(rendered):
    _, values, docs = rendered
    pod, container = ferry_container(docs)
    mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    assert mount["mountPath"] == "/etc/ferry" and mount["readOnly"] is True
    assert container["args"][:3] == ["run", "--config-dir", "/etc/ferry"]
    volume = next(v for v in pod["volumes"] if v["name"] == "config")["configMap"]
    if values["existingConfigMap"]:
        assert volume["name"] == values["existingConfigMap"]
        assert not kind(docs, "ConfigMap")
        return
    cm = one(docs, "ConfigMap")
    assert volume["name"] == cm["metadata"]["name"]
    paths = {i["key"]: i["path"] for i in volume["items"]}
    assert paths.pop("config.yaml") == "config.yaml"
    for key, path in paths.items():
        env, _, rest = key.partition(".")
        assert path == f"{env}/{rest}"
    assert set(paths) | {"config.yaml"} == set(cm["data"])
    assert yaml.safe_load(cm["data"]["config.yaml"]) == values["config"]


def test_env_and_scope_and_secrets_come_from_values(rendered):
    _, values, docs = rendered
    _, container = ferry_container(docs)
    env = {e["name"]: e for e in container["env"]}
    for name, key in (("ENV", "ferryEnv"), ("SCOPE", "ferryScope")):
        if values[key]:
            assert env[name]["value"] == values[key]
        else:
            assert name not in env
    for name, ref in values["secretEnv"].items():
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": ref["secretName"], "key": ref["key"]}
        assert "value" not in env[name]
    assert [e["secretRef"]["name"] for e in container.get("envFrom", [])] == values["envFromSecrets"]


# What each KEDA scaler needs, and the values that must be exactly these.
SCALER_FIELDS = {
    "aws-sqs-queue": ({"queueURL", "queueLength", "awsRegion"}, {"scaleOnInFlight": "true"}),
    "rabbitmq": ({"queueName", "value"}, {"protocol": "http", "mode": "QueueLength"}),
    "kafka": ({"bootstrapServers", "consumerGroup", "lagThreshold"},
              {"allowIdleConsumers": "false", "offsetResetPolicy": "earliest"}),
    "prometheus": ({"serverAddress", "query", "threshold"}, {}),
}


def test_keda_triggers_have_their_fields_as_strings(rendered):
    path, values, docs = rendered
    keda = values["autoscaling"]["keda"]
    objects = kind(docs, "ScaledObject")
    if not keda["enabled"]:
        assert not objects and not kind(docs, "TriggerAuthentication")
        return
    (scaled,) = objects
    auths = {a["metadata"]["name"]: a["spec"] for a in kind(docs, "TriggerAuthentication")}
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == one(docs, "Deployment")["metadata"]["name"]
    assert "replicas" not in one(docs, "Deployment")["spec"]
    assert not kind(docs, "HorizontalPodAutoscaler")
    assert spec["minReplicaCount"] == keda["minReplicaCount"]
    assert len(spec["triggers"]) == len(keda["triggers"])
    for trigger, given in zip(spec["triggers"], keda["triggers"]):
        meta = trigger["metadata"]
        bad = {k: v for k, v in meta.items() if not isinstance(v, str)}
        assert not bad, f"{path.name}: KEDA rejects non-string metadata {bad}"
        required, exact = SCALER_FIELDS[trigger["type"]]
        assert required <= set(meta), f"{trigger['type']} lacks {required - set(meta)}"
        for k, v in exact.items():
            assert meta[k] == v, f"{trigger['type']}.{k} = {meta[k]!r}, not {v!r}"
        if "authenticationRef" in trigger:
            auth = auths[trigger["authenticationRef"]["name"]]
            if trigger["type"] == "rabbitmq":
                assert "host" in {r["parameter"] for r in auth["secretTargetRef"]}
        assert trigger["type"] != "rabbitmq" or "authenticationRef" in trigger
        if trigger["type"] == "kafka":
            assert spec["maxReplicaCount"] <= given["partitions"]


def test_names_are_given_once_and_used_in_both(rendered):
    """The triggers' queue, topic and group are those of the routes they name."""
    _, values, docs = rendered
    if not values["autoscaling"]["keda"]["enabled"]:
        return
    routes = yaml.safe_load(one(docs, "ConfigMap")["data"]["config.yaml"])["routes"]
    triggers = one(docs, "ScaledObject")["spec"]["triggers"]
    for trigger, given in zip(triggers, values["autoscaling"]["keda"]["triggers"]):
        source, meta = routes[given["route"]]["source"], trigger["metadata"]
        if trigger["type"] == "aws-sqs-queue":
            assert meta["queueURL"] == source["queue_url"]
            assert meta["awsRegion"] == source["region"]
        elif trigger["type"] == "rabbitmq":
            assert meta["queueName"] == source["queue"]
        elif trigger["type"] == "kafka":
            assert meta["bootstrapServers"] == source["brokers"]
            assert meta["consumerGroup"] == source["group_id"]
            assert meta.get("topic") == (source["topics"][0] if len(source["topics"]) == 1 else None)
        else:
            assert "ferry_source_backlog{" in meta["query"]
            assert f'route="{given["route"]}"' in meta["query"]
            # SQS and RabbitMQ replicas each report the whole queue; Kafka ones their partitions.
            assert meta["query"].startswith("sum(" if source["type"] == "kafka" else "max(")


def test_ferry_accepts_every_rendered_configuration(rendered, tmp_path):
    """ferry validate, with ENV and SCOPE as the pod sets them, on the ConfigMap's tree."""
    _, values, docs = rendered
    binary = os.environ.get("FERRY_BIN") or next(
        (str(p) for p in (ROOT / "target/debug/ferry", ROOT / "target/release/ferry") if p.is_file()), None)
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("no ferry binary: build it first (cargo build -p ferry-bin --all-features)")
        pytest.skip("no ferry binary built")
    if values["existingConfigMap"]:
        return
    pod, container = ferry_container(docs)
    volume = next(v for v in pod["volumes"] if v["name"] == "config")["configMap"]
    data = one(docs, "ConfigMap")["data"]
    for item in volume["items"]:
        (tmp_path / item["path"]).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / item["path"]).write_text(data[item["key"]])
    env = {"PATH": os.environ.get("PATH", "")}
    for e in container["env"]:
        env[e["name"]] = e.get("value", "secret-from-a-secret")
    for text in data.values():  # variables the envFrom Secrets would give
        for name in re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", text):
            env.setdefault(name, "secret-from-a-secret")
    run = subprocess.run([binary, "validate", "--config-dir", str(tmp_path)],
                         capture_output=True, text=True, env=env, check=False)
    assert run.returncode == 0, run.stderr


def test_a_config_change_rolls_the_pods():
    def checksum(docs):
        return one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/config"]

    base = checksum(render())
    changed = checksum(render({"config": {"routes": {"orders": {"delivery": {"concurrency": 11}}}}}))
    assert base != changed
    assert checksum(render()) == base


def test_grace_follows_the_longest_shutdown_grace():
    docs = render({"config": {"routes": {
        "orders": {"delivery": {"shutdown_grace": "2m 5s"}},
        "slow": {"source": {"type": "sqs", "queue_url": "https://q/slow"},
                 "sink": {"type": "http", "url": "http://e/"},
                 "delivery": {"shutdown_grace": "1500ms"}},
    }}, "terminationGraceMarginSeconds": 10})
    pod, _ = ferry_container(docs)
    assert pod["terminationGracePeriodSeconds"] == 125 + 10


def test_keda_defaults_start_from_one_replica_and_pause_when_asked():
    trigger = {"route": "orders"}
    docs = render({"autoscaling": {"keda": {"enabled": True, "triggers": [trigger]}}})
    scaled = one(docs, "ScaledObject")
    assert scaled["spec"]["minReplicaCount"] == 1
    assert "annotations" not in scaled["metadata"]
    paused = render({"autoscaling": {"keda": {"enabled": True, "paused": True, "triggers": [trigger]}}})
    assert one(paused, "ScaledObject")["metadata"]["annotations"] == {"autoscaling.keda.sh/paused": "true"}
    held = render({"autoscaling": {"keda": {"enabled": True, "pausedReplicas": 0, "triggers": [trigger]}}})
    assert one(held, "ScaledObject")["metadata"]["annotations"] == {"autoscaling.keda.sh/paused-replicas": "0"}


def test_extra_trigger_metadata_is_rendered_as_strings():
    docs = render({"autoscaling": {"keda": {"enabled": True, "triggers": [
        {"route": "orders", "target": 7, "metadata": {"activationQueueLength": 0, "scaleOnDelayed": True}}]}}})
    meta = one(docs, "ScaledObject")["spec"]["triggers"][0]["metadata"]
    assert meta["queueLength"] == "7"
    assert meta["activationQueueLength"] == "0"
    assert meta["scaleOnDelayed"] == "true"


KAFKA_ROUTE = {"source": {"type": "kafka", "brokers": "k:9092", "group_id": "g", "topics": ["t"]},
               "sink": {"type": "http", "url": "http://e/"}}
AMQP_ROUTE = {"source": {"type": "amqp", "uri": "amqp://r/%2f", "queue": "q"},
              "sink": {"type": "http", "url": "http://e/"}}


@pytest.mark.parametrize("values, message", [
    ({"autoscaling": {"keda": {"enabled": True, "triggers": [{"route": "orders"}]},
                      "hpa": {"enabled": True}}},
     "keda.enabled and hpa.enabled together"),
    ({"config": {"routes": {"clicks": KAFKA_ROUTE}},
      "autoscaling": {"keda": {"enabled": True, "maxReplicaCount": 8,
                               "triggers": [{"route": "clicks", "partitions": 6}]}}},
     "maxReplicaCount 8 is above autoscaling.keda.triggers[0].partitions 6"),
    ({"config": {"routes": {"clicks": KAFKA_ROUTE}},
      "autoscaling": {"keda": {"enabled": True, "triggers": [{"route": "clicks"}]}}},
     "partitions is required for kafka"),
    ({"config": {"routes": {"events": AMQP_ROUTE}},
      "autoscaling": {"keda": {"enabled": True, "triggers": [{"route": "events"}]}}},
     "needs parameter host"),
    ({"autoscaling": {"keda": {"enabled": True, "triggers": [{"route": "orders", "type": "kafka", "partitions": 9}]}}},
     "kafka does not measure route \"orders\", whose source is sqs"),
    ({"autoscaling": {"keda": {"enabled": True, "triggers": [{"route": "nope"}]}}},
     "\"nope\" is not a route of config.routes"),
    ({"autoscaling": {"keda": {"enabled": True, "triggers": []}}}, "KEDA is enabled without a trigger"),
    ({"autoscaling": {"keda": {"enabled": True, "triggers": [{"route": "orders", "type": "prometheus"}]}}},
     "serverAddress is required for prometheus"),
    ({"config": {"routes": {"orders": {"source": {"region": None}}}},
      "autoscaling": {"keda": {"enabled": True, "triggers": [{"route": "orders"}]}}},
     "gives no value for the trigger's awsRegion"),
    ({"config": {"routes": {"orders": {"delivery": {"shutdown_grace": "soon"}}}}}, "shutdown_grace"),
    ({"config": {"admin": {"listen": "everywhere"}}}, "/config/admin/listen"),
    ({"config": {"routes": None}}, "no route configured"),
    ({"autoscaling": {"keda": {"enabled": True, "triggers": [{"route": "orders", "typo": 1}]}}},
     "additional properties 'typo' not allowed"),
])
def test_refused_values_name_what_is_wrong(values, message):
    error = render(values, expect_error=True)
    assert message in error, error
