"""deploy/k8s: every overlay renders (`kubectl kustomize`, offline) and every object it renders is
valid against the Kubernetes API schemas (kubernetes-validate, strict: unknown fields refused)
or, for KEDA's kinds, against tests/ops/k8s_keda_schemas.yaml; and what the manifests name
exists in the code: settings, ports, probe paths, commands, queues, metrics, time limits.

No cluster is contacted. kubectl missing is a failure that says how to install it.
"""
from __future__ import annotations

import functools
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").exists())
# The oldest Kubernetes these manifests are for (native gRPC probes, appArmorProfile) and the newest
# schema kubernetes-validate ships.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
KEDA_SCHEMAS = yaml.safe_load((Path(__file__).parent / "k8s_keda_schemas.yaml").read_text())
# Secrets that production creates itself (from its secret manager), not rendered by its overlay.
EXTERNAL_SECRETS = {"marketplace-secrets", "marketplace-keda"}
# Environment variables that are not marketplace settings, and why they are set.
FOREIGN_ENV = {
    "AWS_ACCESS_KEY_ID": "boto3's S3 credentials",
    "AWS_SECRET_ACCESS_KEY": "boto3's S3 credentials",
    "AWS_DEFAULT_REGION": "boto3's region",
    "FLOWER_BASIC_AUTH": "Flower reads its --basic-auth option from it",
}
# Long-running Deployments without a PodDisruptionBudget, and why.
NO_PDB = {"marketplace-flower": "an operator tool: a drain may take it away"}
CELERY_SUBCOMMANDS = {"worker", "beat", "flower"}


def _kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.fail("`kubectl` is not installed: it renders deploy/k8s offline (`kubectl kustomize`). Run "
                    "`apt-get install kubectl` (the Makefile's system-deps target does) or install it from "
                    "pkgs.k8s.io.")
    return path


@functools.cache
def _render(overlay: str) -> tuple[dict[str, Any], ...]:
    done = subprocess.run([_kubectl(), "kustomize", str(K8S / "overlays" / overlay)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, f"kubectl kustomize overlays/{overlay} failed:\n{done.stderr}"
    return tuple(d for d in yaml.safe_load_all(done.stdout) if d)


def _of(docs: tuple[dict[str, Any], ...], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def _pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["template"]["spec"]


def _containers(docs: tuple[dict[str, Any], ...]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for obj in docs:
        if obj["kind"] in ("Deployment", "Job"):
            spec = _pod_spec(obj)
            out += [(obj["metadata"]["name"], c) for c in spec.get("initContainers", []) + spec["containers"]]
    return out


def _validate(obj: dict[str, Any]) -> list[str]:
    """What is wrong with one rendered object ([] if nothing)."""
    if obj["kind"] in KEDA_SCHEMAS:
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
                  for e in jsonschema.Draft202012Validator(KEDA_SCHEMAS[obj["kind"]]).iter_errors(obj)]
        behavior = obj["spec"].get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior")
        if behavior is not None and not errors:  # HPA behavior: the Kubernetes schema's
            hpa = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "x"},
                   "spec": {"scaleTargetRef": {"kind": "Deployment", "name": "x"}, "maxReplicas": 1,
                            "behavior": behavior}}
            errors += _validate(hpa)
        return errors
    errors = []
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            errors.append(f"no schema for {obj['apiVersion']} {obj['kind']} in Kubernetes {version}")
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"Kubernetes {version}: {'/'.join(map(str, exc.path))}: {exc.message}")
    return errors


# ---------------------------------------------------------------- rendering and schemas


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_overlay_renders_and_every_object_is_valid(overlay: str) -> None:
    docs = _render(overlay)
    assert docs, f"overlays/{overlay} rendered nothing"
    problems = {f"{d['kind']}/{d['metadata']['name']}": _validate(d) for d in docs}
    assert not {k: v for k, v in problems.items() if v}, problems
    namespaces = {d["metadata"].get("namespace") for d in docs}
    assert len(namespaces) == 1 and None not in namespaces, f"one namespace per overlay: {namespaces}"


def test_overlays_are_dev_and_production() -> None:
    assert OVERLAYS == ["dev", "production"]


def test_the_validators_refuse_a_misspelt_field() -> None:
    """The schemas are strict: a test that any YAML passed would prove nothing."""
    api = _of(_render("production"), "Deployment")["marketplace-api"]
    bad = yaml.safe_load(yaml.safe_dump(api))
    bad["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {"httpGet": {"path": "/healthz", "port": 8000}}
    assert any("livenesProbe" in e for e in _validate(bad)), _validate(bad)
    scaled = next(iter(_of(_render("production"), "ScaledObject").values()))
    bad = yaml.safe_load(yaml.safe_dump(scaled))
    bad["spec"]["triggers"][0]["metadata"]["threshold"] = 4  # KEDA reads strings only
    bad["spec"]["minReplicas"] = 0
    errors = _validate(bad)
    assert any("threshold" in e for e in errors) and any("minReplicas" in e for e in errors), errors


# ---------------------------------------------------------------- names that must exist in the code


def _settings_env_names() -> set[str]:
    from pydantic import AliasChoices

    from marketplace.settings import Settings

    names = set()
    for field, info in Settings.model_fields.items():
        alias = info.validation_alias
        if isinstance(alias, AliasChoices):
            names |= {a for a in alias.choices if isinstance(a, str)}
        elif isinstance(alias, str):
            names.add(alias)
        else:
            names.add(f"MARKETPLACE_{field.upper()}")
    return names


def _env_file_keys(path: Path) -> list[str]:
    return [line.split("=", 1)[0] for line in path.read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def _env_sources(docs: tuple[dict[str, Any], ...]) -> dict[tuple[str, str], set[str]]:
    """(kind, name) -> the keys each ConfigMap and Secret holds; production's own Secrets from the
    example file that documents them."""
    out: dict[tuple[str, str], set[str]] = {}
    for d in docs:
        if d["kind"] == "ConfigMap":
            out[("ConfigMap", d["metadata"]["name"])] = set(d.get("data") or {})
        elif d["kind"] == "Secret":
            out[("Secret", d["metadata"]["name"])] = set(d.get("data") or {}) | set(d.get("stringData") or {})
    out.setdefault(("Secret", "marketplace-secrets"), set(_env_file_keys(K8S / "secrets.env.example")))
    out.setdefault(("Secret", "marketplace-keda"), {"redis-address", "redis-password"})
    return out


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_environment_variable_is_a_setting_and_every_reference_resolves(overlay: str) -> None:
    docs = _render(overlay)
    known = _settings_env_names()
    sources = _env_sources(docs)
    rendered_secrets = set(_of(docs, "Secret"))
    for name, container in _containers(docs):
        visible: set[str] = set()
        for ref in container.get("envFrom", []):
            kind, target = ("ConfigMap", ref["configMapRef"]["name"]) if "configMapRef" in ref \
                else ("Secret", ref["secretRef"]["name"])
            if kind == "Secret":
                assert target in rendered_secrets or target in EXTERNAL_SECRETS, f"{name}: Secret {target}"
            visible |= sources[(kind, target)]
        for var in container.get("env", []):
            for ref in re.findall(r"\$\((\w+)\)", var.get("value", "")):
                assert ref in visible, f"{name}: {var['name']} refers to $({ref}), which is not set before it"
            visible.add(var["name"])
        for var in sorted(visible):
            if var.startswith("MARKETPLACE_") or var in ("PROMETHEUS_MULTIPROC_DIR",) or var.startswith("OTEL_"):
                assert var in known, f"{name}: {var} is not a field of marketplace/settings.py"
            else:
                assert var in FOREIGN_ENV, f"{name}: {var} is neither a setting nor a known foreign variable"
    for obj in _of(docs, "TriggerAuthentication").values():
        for ref in obj["spec"]["secretTargetRef"]:
            assert ref["key"] in sources[("Secret", ref["name"])], ref


def test_the_documented_secret_keys_are_the_ones_dev_generates() -> None:
    documented = _env_file_keys(K8S / "secrets.env.example")
    assert sorted(documented) == sorted(_env_file_keys(K8S / "overlays" / "dev" / "secrets.env"))
    for key in ("MARKETPLACE_DATABASE_URL", "MARKETPLACE_REDIS_URL", "MARKETPLACE_S3_ENDPOINT_URL",
                "MARKETPLACE_KAFKA_BOOTSTRAP_SERVERS", "MARKETPLACE_JWT_SECRET", "MARKETPLACE_AUDIT_SIGNING_KEY"):
        assert key in documented
    config = _of(_render("production"), "ConfigMap")["marketplace-config"]["data"]
    assert not set(config) & set(documented), "a secret in the ConfigMap"


def _command(container: dict[str, Any]) -> list[str]:
    return list(container.get("command", [])) + list(container.get("args", []))


def _option(argv: list[str], *names: str) -> str | None:
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name and i + 1 < len(argv):
                return argv[i + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def _check_marketplace_command(argv: list[str]) -> None:
    """The `marketplace` CLI parses this command line (the command, its groups and options exist)."""
    import click

    from marketplace.cli.main import main

    command: click.Command = main
    args = argv[1:]
    while isinstance(command, click.Group):
        assert args, f"{shlex.join(argv)}: a group needs a command"
        sub = command.get_command(click.Context(command), args[0])
        assert sub is not None, f"{shlex.join(argv)}: no command {args[0]!r}"
        command, args = sub, args[1:]
    command.make_context(argv[0], list(args))  # raises on an unknown option or a bad value


def _queues(argv: list[str]) -> list[str]:
    return (_option(argv, "-Q", "--queues") or "").split(",")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_command_exists(overlay: str) -> None:
    from marketplace.catalog import CONTROL_QUEUES, get_catalog

    queues = set(CONTROL_QUEUES) | set(get_catalog().queues)
    for name, container in _containers(_render(overlay)):
        probes = [container.get(p, {}).get("exec", {}).get("command")
                  for p in ("startupProbe", "livenessProbe", "readinessProbe")]
        for argv in [_command(container), *[p for p in probes if p]]:
            assert argv, f"{name}: no command (the image's default is the API's)"
            if argv[0] == "marketplace":
                _check_marketplace_command(argv)
            elif argv[0] == "celery":
                assert argv[1:3] == ["-A", "marketplace"] and argv[3] in CELERY_SUBCOMMANDS, argv
                if argv[3] == "worker":
                    assert set(_queues(argv)) <= queues, argv
            elif argv[0] != "sleep":  # preStop pauses
                pytest.fail(f"{name}: unknown program {argv[0]!r}")


def test_every_queue_has_its_nodes_and_every_node_checks_its_own_name() -> None:
    """Each catalog queue is consumed by exactly one Deployment in production; the control
    Deployment consumes every control queue; each worker's liveness probe checks the node name
    that worker runs as (`-n`)."""
    from marketplace.catalog import CONTROL_QUEUES, get_catalog

    consumers: dict[str, list[str]] = {}
    for name, dep in _of(_render("production"), "Deployment").items():
        container = _pod_spec(dep)["containers"][0]
        argv = _command(container)
        if argv[:4] != ["celery", "-A", "marketplace", "worker"]:
            continue
        for queue in _queues(argv):
            consumers.setdefault(queue, []).append(name)
        node = _option(argv, "-n", "--hostname")
        assert node and node.endswith("@%h"), f"{name}: a node name per pod ({node})"
        for probe in ("startupProbe", "livenessProbe"):
            check = container[probe]["exec"]["command"]
            assert check[:2] == ["marketplace", "worker-check"] and _option(check, "--node", "-n") == node, check
        assert "--no-ping" not in container["livenessProbe"]["exec"]["command"]
    assert {q: len(c) for q, c in consumers.items()} == dict.fromkeys([*CONTROL_QUEUES, *get_catalog().queues], 1)
    assert len({consumers[q][0] for q in CONTROL_QUEUES}) == 1


def _compute_workers(docs: tuple[dict[str, Any], ...]) -> dict[str, dict[str, Any]]:
    return {name: d for name, d in _of(docs, "Deployment").items()
            if d["metadata"]["labels"].get("marketplace.io/role") == "compute-worker"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_compute_workers_outlive_their_longest_subtask_and_gpu_ones_get_a_gpu(overlay: str) -> None:
    from marketplace.catalog import get_catalog
    from marketplace.scheduling.dispatch import hard_time_limit

    catalog = get_catalog()
    workers = _compute_workers(_render(overlay))
    assert workers
    for name, dep in workers.items():
        spec = _pod_spec(dep)
        container = spec["containers"][0]
        (queue,) = _queues(_command(container))
        assert dep["metadata"]["labels"]["marketplace.io/queue"] == queue
        hard = max(hard_time_limit(catalog.time_limit(m)) for m in catalog.models_for_queue(queue))
        # Warm shutdown: what runs may finish (the hard limit) before the kubelet's SIGKILL.
        assert spec["terminationGracePeriodSeconds"] > hard, (name, spec["terminationGracePeriodSeconds"], hard)
        assert "replicas" not in dep["spec"], f"{name}: its ScaledObject owns the replica count"
        gpu = queue.startswith("gpu.")
        resources = container["resources"]
        assert ("nvidia.com/gpu" in resources["limits"]) is gpu and ("nvidia.com/gpu" in resources["requests"]) is gpu
        if gpu:
            assert spec["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"]), name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_compute_queue_scales_from_zero_on_the_schedulers_gauges(overlay: str) -> None:
    metrics_source = (ROOT / "marketplace" / "observability" / "metrics.py").read_text()
    for gauge in ("marketplace_subtasks_queued", "marketplace_subtasks_running"):
        assert f'"{gauge}"' in metrics_source, gauge
    docs = _render(overlay)
    workers = _compute_workers(docs)
    scaled = {d["spec"]["scaleTargetRef"]["name"]: d for d in _of(docs, "ScaledObject").values()}
    assert set(scaled) == set(workers)
    auths = _of(docs, "TriggerAuthentication")
    for name, obj in scaled.items():
        (queue,) = _queues(_command(_pod_spec(workers[name])["containers"][0]))
        spec = obj["spec"]
        assert spec["minReplicaCount"] == 0 and spec["cooldownPeriod"] >= 60, name
        triggers = {t["type"]: t for t in spec["triggers"]}
        assert set(triggers) == {"prometheus", "redis"}, name
        prom = triggers["prometheus"]["metadata"]
        assert {"serverAddress", "query", "threshold"} <= set(prom)
        for gauge in ("marketplace_subtasks_queued", "marketplace_subtasks_running"):
            assert f'{gauge}{{queue="{queue}"}}' in prom["query"], prom["query"]
        redis = triggers["redis"]
        # Messages are published without a priority: they wait in the list named as the queue.
        assert redis["metadata"]["listName"] == queue and redis["authenticationRef"]["name"] in auths


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ports_and_probes_are_the_ones_the_processes_serve(overlay: str) -> None:
    from api import create_app
    from marketplace.settings import get_settings

    docs = _render(overlay)
    routes = {r.rule for r in create_app(get_settings()).url_map.iter_rules()}
    config = _of(docs, "ConfigMap")["marketplace-config"]["data"]
    services = _of(docs, "Service")
    for name, container in _containers(docs):
        argv = _command(container)
        ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
        if "metrics" in ports:
            assert str(ports["metrics"]) == config["MARKETPLACE_METRICS_PORT"], name
        if argv[:2] in (["marketplace", "api"], ["marketplace", "grpc"]):
            port_name = "http" if argv[1] == "api" else "grpc"
            assert str(ports[port_name]) == _option(argv, "--port") and _option(argv, "--host") == "0.0.0.0", name
        if argv[:4] == ["celery", "-A", "marketplace", "flower"]:
            assert str(ports["http"]) == _option(argv, "--port"), name
            env = {e["name"]: e.get("value") for e in container["env"]}
            assert env["FLOWER_BASIC_AUTH"] == "$(MARKETPLACE_FLOWER_USER):$(MARKETPLACE_FLOWER_PASSWORD)"
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            spec = container.get(probe)
            if not spec:
                continue
            if "httpGet" in spec:
                port = spec["httpGet"]["port"]
                assert port in ports or port in ports.values(), (name, probe, port)
                if argv[:2] == ["marketplace", "api"]:
                    assert spec["httpGet"]["path"] in routes and spec["httpGet"]["path"] in ("/healthz", "/readyz")
                else:
                    import flower.urls

                    patterns = [h[0] if isinstance(h, tuple) else h.regex.pattern for h in flower.urls.handlers]
                    assert any(re.fullmatch(p.rstrip("$"), spec["httpGet"]["path"])
                               for p in patterns if p != ".*"), spec
            if "grpc" in spec:
                assert argv[:2] == ["marketplace", "grpc"] and spec["grpc"]["port"] == ports["grpc"], name
            if "tcpSocket" in spec:
                assert spec["tcpSocket"]["port"] in ports, name
        if argv[:2] == ["marketplace", "api"]:
            assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
            assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for name, svc in services.items():
        (dep,) = [d for d in _of(docs, "Deployment").values()
                  if all(d["spec"]["template"]["metadata"]["labels"].get(k) == v
                         for k, v in svc["spec"]["selector"].items())]
        ports = {p["name"] for c in _pod_spec(dep)["containers"] for p in c.get("ports", [])}
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= ports, name


def test_the_grpc_server_answers_the_health_check_the_probes_ask() -> None:
    """Kubernetes' gRPC probe calls grpc.health.v1.Health/Check with service "" on the port."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from marketplace.rpc.server import build_server

    server = build_server(host="127.0.0.1", port=0, max_workers=2)
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop(grace=0)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_resources_disruption_budgets_and_the_single_beat(overlay: str) -> None:
    docs = _render(overlay)
    for name, container in _containers(docs):
        for bound in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"].get(bound, {})), (name, bound)
    pdbs = _of(docs, "PodDisruptionBudget")
    for name, dep in _of(docs, "Deployment").items():
        labels = dep["spec"]["template"]["metadata"]["labels"]
        covered = [p for p in pdbs.values()
                   if all(labels.get(k) == v for k, v in p["spec"]["selector"]["matchLabels"].items())]
        assert len(covered) == (0 if name in NO_PDB else 1), name
        if dep["spec"].get("replicas") == 1:
            assert all(p["spec"].get("minAvailable") != 1 for p in covered), f"{name}: a drain could never evict it"
    beat = _of(docs, "Deployment")["marketplace-beat"]
    assert beat["spec"]["replicas"] == 1 and beat["spec"]["strategy"] == {"type": "Recreate"}
    (job,) = _of(docs, "Job").values()
    assert _command(_pod_spec(job)["containers"][0]) == ["marketplace", "db", "upgrade"]
