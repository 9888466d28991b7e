"""Static checks of the deployment files (Dockerfile, deploy/), and promtool on the alert rules.

Nothing here builds an image or starts a container: these tests catch the drift that breaks a
deployment quietly — a renamed metric under a dashboard, a probe on the wrong port, a config path
that is not mounted, alert rules that no longer parse or fire.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
PROMETHEUS = DEPLOY / "prometheus"
ALERTS = PROMETHEUS / "alerts.yml"
ALERTS_TEST = PROMETHEUS / "alerts_test.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "liqmon.json"
K8S = DEPLOY / "k8s" / "base"

METRICS_PORT = 9464

# Every metric liqmon exports (SPEC §8 and monitor/service/metrics.py). Dashboards and alerts may
# only use these: a typo or a renamed metric would otherwise be an empty panel or a silent alert.
EXPECTED_METRICS = {
    "liqmon_records_consumed_total",
    "liqmon_records_rejected_total",
    "liqmon_stale_ticks_total",
    "liqmon_unused_ticks_total",
    "liqmon_duplicates_total",
    "liqmon_events_emitted_total",
    "liqmon_event_latency_seconds",
    "liqmon_consumer_lag_records",
    "liqmon_delivery_retries_total",
    "liqmon_checkpoint_duration_seconds",
    "liqmon_last_checkpoint_timestamp_seconds",
    "liqmon_checkpoint_age_seconds",
    "liqmon_restore_duration_seconds",
    "liqmon_rebalance_partitions_total",
    "liqmon_ready",
    "liqmon_accounts",
    "liqmon_positions",
    "liqmon_accounts_by_state",
    "liqmon_isolated_positions_by_state",
    "liqmon_price_age_seconds",
    "liqmon_kafka_reachable",
    "liqmon_input_offset",
    "liqmon_conflated_ticks_total",
    "liqmon_config_info",
    "liqmon_merge_forced_releases_total",
    "liqmon_records_late_total",
    "liqmon_records_stamped_ahead_total",
    "liqmon_records_miskeyed_total",
    "liqmon_input_stalled",
    "liqmon_input_logs_replaced_total",
    "liqmon_input_records_lost_total",
}

REQUIRED_ALERTS = {
    "LiqmonDown",
    "LiqmonNotReady",
    "LiqmonConsumerLagGrowing",
    "LiqmonNoTicks",
    "LiqmonLiquidationSpike",
    "LiqmonDeadLetters",
    "LiqmonCheckpointStale",
    "LiqmonDeliveryRetries",
    "LiqmonOutOfOrder",
    "LiqmonLateInputs",
    "LiqmonInputsStampedAhead",
    "LiqmonInputStalled",
    "LiqmonInputLogReplaced",
    "LiqmonInputRecordsLost",
}

DEFAULT_TOPICS = ("prices", "fills", "ledger", "margin-calls", "liquidations",
                  "liqmon.dead-letter", "liqmon.state")


# -- helpers --------------------------------------------------------------------------------------


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def metric_names(text: str) -> set[str]:
    """liqmon_* names in PromQL text, histogram series folded into their metric."""
    return {re.sub(r"_(bucket|sum|count)$", "", name)
            for name in re.findall(r"liqmon_[a-z_]+", text)}


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    current = ""
    for raw in (ROOT / "Dockerfile").read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        keyword, _, rest = current.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        current = ""
    return instructions


def k8s_docs() -> dict[str, dict[str, Any]]:
    """Kind -> manifest, for the single-document manifests of the base."""
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        doc = load_yaml(path)
        docs[doc["kind"]] = doc
    return docs


def liqmon_container() -> dict[str, Any]:
    containers = k8s_docs()["Deployment"]["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "liqmon")


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def promtool() -> str:
    """promtool's path; skipped without it, except in CI (CI=true), where that is a failure."""
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is not on PATH (CI=true): run deploy/ci-install-promtool.sh")
        pytest.skip("promtool is not on PATH (deploy/ci-install-promtool.sh installs it)")
    return path


def run_promtool(*args: str) -> None:
    result = subprocess.run([promtool(), *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, (
        f"promtool {' '.join(args)} exited {result.returncode}:\n{result.stdout}{result.stderr}")


# -- every file parses ----------------------------------------------------------------------------

YAML_FILES = sorted(p for pattern in ("*.yml", "*.yaml") for p in DEPLOY.rglob(pattern))


def test_deploy_has_yaml_files() -> None:
    assert len(YAML_FILES) >= 10, YAML_FILES


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    assert docs, f"{path} is empty"


def test_dashboard_is_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard["uid"] == "liqmon"
    assert dashboard["panels"]


# -- Dockerfile -----------------------------------------------------------------------------------


def test_dockerfile_is_multi_stage_on_python_311_slim() -> None:
    froms = [args for keyword, args in dockerfile_instructions() if keyword == "FROM"]
    assert len(froms) == 2, froms
    assert all(args.split()[0] == "python:3.11-slim" for args in froms), froms
    runs = " ".join(args for keyword, args in dockerfile_instructions() if keyword == "RUN")
    assert "pip wheel --no-deps -w /dist ." in runs
    assert re.search(r"pip install --no-cache-dir /dist/\*\.whl(?!\[)", runs), (
        "the runtime stage installs the wheel without extras (no broker)")


def test_dockerfile_exposes_metrics_port() -> None:
    exposed = {port.split("/")[0] for keyword, args in dockerfile_instructions()
               if keyword == "EXPOSE" for port in args.split()}
    assert str(METRICS_PORT) in exposed


def test_dockerfile_runs_as_non_root() -> None:
    users = [args for keyword, args in dockerfile_instructions() if keyword == "USER"]
    assert users, "no USER: the container would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    # Numeric, so that Kubernetes' runAsNonRoot can verify it, and the one the Deployment sets.
    assert user == "10001"
    pod_security = k8s_docs()["Deployment"]["spec"]["template"]["spec"]["securityContext"]
    assert pod_security["runAsNonRoot"] is True
    assert str(pod_security["runAsUser"]) == user


def test_dockerfile_compiles_the_kernels_for_any_cpu_before_the_runtime_user_takes_over(
        ) -> None:
    """Compiled for the generic CPU, the image's kernels are loaded on every node rather than
    compiled again at each start (numba keys its cache by CPU), from the cache set here."""
    instructions = dockerfile_instructions()
    env: dict[str, str] = {}
    for keyword, args in instructions:
        if keyword == "ENV":
            env.update(pair.split("=", 1) for pair in args.split())
        if keyword == "RUN" and "warm_up_kernels" in args:
            break
    else:
        pytest.fail("the Dockerfile does not compile the kernels")
    assert env.get("NUMBA_CPU_NAME") == "generic"
    assert env.get("NUMBA_CACHE_DIR")
    keywords = [keyword for keyword, _ in instructions]
    warm_up = next(n for n, (keyword, args) in enumerate(instructions)
                   if keyword == "RUN" and "warm_up_kernels" in args)
    assert warm_up < keywords.index("USER")


def test_dockerfile_healthcheck_gets_healthz() -> None:
    checks = [args for keyword, args in dockerfile_instructions() if keyword == "HEALTHCHECK"]
    assert len(checks) == 1
    assert "/healthz" in checks[0]
    assert "urllib" in checks[0], "python:3.11-slim has no curl or wget"
    assert str(METRICS_PORT) in checks[0]


def test_dockerfile_entrypoint_and_default_config() -> None:
    instructions = dockerfile_instructions()
    assert ("ENTRYPOINT", '["liqmon"]') in instructions
    assert ("CMD", '["run"]') in instructions
    env = " ".join(args for keyword, args in instructions if keyword == "ENV")
    config = re.search(r"LIQMON_CONFIG=(\S+)", env)
    assert config, "ENV LIQMON_CONFIG missing"
    copies = [shlex.split(args) for keyword, args in instructions if keyword == "COPY"]
    assert ["examples/risk.toml", config.group(1)] in copies
    assert (ROOT / "examples" / "risk.toml").is_file()


def test_dockerignore_keeps_what_the_build_copies() -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for needed in (".venv", ".git"):
        assert needed in patterns, f"{needed} must not be sent to the Docker daemon"
    copied = [src for keyword, args in dockerfile_instructions() if keyword == "COPY"
              and "--from" not in args for src in shlex.split(args)[:-1]]
    assert copied
    for src in copied:
        assert (ROOT / src).exists(), src
        parts = PurePosixPath(src).parts
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        for pattern in patterns:
            assert not any(fnmatch.fnmatch(p, pattern.lstrip("/")) for p in prefixes), (
                f".dockerignore pattern {pattern!r} excludes {src!r}, which the Dockerfile copies")


# -- docker compose -------------------------------------------------------------------------------


def compose_services() -> dict[str, Any]:
    return load_yaml(COMPOSE)["services"]


def test_compose_builds_liqmon_from_the_repo_dockerfile() -> None:
    build = compose_services()["liqmon"]["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    assert context == ROOT
    assert (context / build.get("dockerfile", "Dockerfile")).is_file()


def test_compose_liqmon_port_env_and_config_mount() -> None:
    liqmon = compose_services()["liqmon"]
    assert f"{METRICS_PORT}:{METRICS_PORT}" in [str(p) for p in liqmon["ports"]]
    env = liqmon["environment"]
    assert env["LIQMON_BOOTSTRAP"] == "kafka:9092"
    assert str(env.get("LIQMON_METRICS_PORT", METRICS_PORT)) == str(METRICS_PORT)
    mounts = {target: source for source, target, *_ in
              (volume.split(":") for volume in liqmon["volumes"])}
    assert env["LIQMON_CONFIG"] in mounts, "LIQMON_CONFIG must be the mounted config"
    assert (COMPOSE.parent / mounts[env["LIQMON_CONFIG"]]).resolve().is_file()


# Seconds of a grace period left after liqmon's shutdown budget: signal delivery, interpreter
# exit, a loaded node.
GRACE_MARGIN = 5.0


def shutdown_budget(env: dict[str, Any]) -> float:
    """What `liqmon run` with this environment may spend between SIGTERM and exit."""
    from monitor.service.settings import ServiceSettings

    settings = ServiceSettings(config_path=Path("risk.toml"))
    if "LIQMON_SHUTDOWN_TIMEOUT" in env:
        settings = replace(settings, shutdown_timeout=float(env["LIQMON_SHUTDOWN_TIMEOUT"]))
    return settings.shutdown_budget


def test_compose_stop_grace_period_exceeds_the_shutdown_budget() -> None:
    liqmon = compose_services()["liqmon"]
    grace = int(liqmon["stop_grace_period"].rstrip("s"))
    assert grace >= shutdown_budget(liqmon["environment"]) + GRACE_MARGIN


def test_compose_bind_mounts_exist() -> None:
    for name, service in compose_services().items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (COMPOSE.parent / source).exists(), f"{name}: {source} does not exist"


def test_compose_kafka_is_kraft_and_reachable_as_kafka_9092() -> None:
    kafka = compose_services()["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = kafka["environment"]
    assert "controller" in env["KAFKA_PROCESS_ROLES"]
    assert "PLAINTEXT://kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"].split(",")


def test_compose_creates_every_topic_and_a_compacted_state() -> None:
    topics = compose_services()["topics"]
    script = "\n".join(topics["command"]) if isinstance(topics["command"], list) else topics[
        "command"]
    for topic in DEFAULT_TOPICS:
        assert re.search(rf"(?<![\w.-]){re.escape(topic)}(?![\w.-])", script), topic
    assert re.search(r"create liqmon\.state .*cleanup\.policy=compact", script)
    depends = compose_services()["liqmon"]["depends_on"]
    assert depends["topics"]["condition"] == "service_completed_successfully"


def test_compose_prometheus_and_grafana_provisioning() -> None:
    services = compose_services()
    assert services["prometheus"]["image"].startswith("prom/prometheus:")
    assert services["grafana"]["image"].startswith("grafana/grafana:")
    config = load_yaml(PROMETHEUS / "prometheus.yml")
    assert "alerts.yml" in config["rule_files"]
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "liqmon")
    assert f"liqmon:{METRICS_PORT}" in job["static_configs"][0]["targets"]
    provisioning = DEPLOY / "grafana" / "provisioning"
    datasources = [d for f in (provisioning / "datasources").glob("*.yml")
                   for d in load_yaml(f)["datasources"]]
    assert any(d["uid"] == "prometheus" and d["url"] == "http://prometheus:9090"
               for d in datasources)
    providers = [p for f in (provisioning / "dashboards").glob("*.yml")
                 for p in load_yaml(f)["providers"]]
    assert providers
    mounted = {v.split(":")[1] for v in services["grafana"]["volumes"]}
    assert all(p["options"]["path"] in mounted for p in providers)


# -- Kubernetes -----------------------------------------------------------------------------------


def test_kustomization_files_exist() -> None:
    kustomization = load_yaml(K8S / "kustomization.yaml")
    for resource in kustomization["resources"]:
        assert (K8S / resource).is_file(), resource
    generated = [f for g in kustomization.get("configMapGenerator", []) for f in g["files"]]
    assert generated
    for entry in generated:
        assert (K8S / entry.split("=")[-1]).is_file(), entry


def test_k8s_risk_config_is_a_valid_risk_config() -> None:
    from monitor.config import load_config

    load_config(K8S / "risk.toml")


def test_probes_hit_health_endpoints_on_the_service_port() -> None:
    container = liqmon_container()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}

    def port_number(port: int | str) -> int:
        return ports[port] if isinstance(port, str) else port

    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    service_ports = k8s_docs()["Service"]["spec"]["ports"]
    metrics = next(p for p in service_ports if p["name"] == "metrics")
    assert metrics["port"] == METRICS_PORT
    target = port_number(metrics.get("targetPort", metrics["port"]))
    assert target == METRICS_PORT
    for probe in ("livenessProbe", "readinessProbe"):
        assert port_number(container[probe]["httpGet"]["port"]) == target, probe
    assert str(env_of(container).get("LIQMON_METRICS_PORT", METRICS_PORT)) == str(METRICS_PORT)


def test_service_and_monitor_select_the_pods() -> None:
    docs = k8s_docs()
    pod_labels = docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    selectors = [docs["Deployment"]["spec"]["selector"]["matchLabels"],
                 docs["Service"]["spec"]["selector"],
                 docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"]]
    monitor = docs.get("PodMonitor") or docs["ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    selectors.append(monitor["spec"]["selector"]["matchLabels"])
    for selector in selectors:
        assert selector.items() <= pod_labels.items(), selector
    # The alert rules select job="liqmon".
    assert pod_labels[monitor["spec"]["jobLabel"]] == "liqmon"
    endpoints = monitor["spec"].get("podMetricsEndpoints") or monitor["spec"]["endpoints"]
    assert endpoints[0]["port"] == "metrics"


def test_config_env_matches_the_configmap_mount() -> None:
    deployment = k8s_docs()["Deployment"]
    container = liqmon_container()
    config = PurePosixPath(env_of(container)["LIQMON_CONFIG"])
    assert config == PurePosixPath("/etc/liqmon/risk.toml")
    mount = next(m for m in container["volumeMounts"]
                 if PurePosixPath(m["mountPath"]) == config.parent)
    volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"]
                  if v["name"] == mount["name"])
    generators = load_yaml(K8S / "kustomization.yaml")["configMapGenerator"]
    generator = next(g for g in generators if g["name"] == volume["configMap"]["name"])
    keys = {entry.split("=")[0].split("/")[-1] for entry in generator["files"]}
    assert config.name in keys
    assert container.get("args", ["run"])[0] == "run"


def test_termination_grace_period_exceeds_the_shutdown_budget() -> None:
    spec = k8s_docs()["Deployment"]["spec"]["template"]["spec"]
    budget = shutdown_budget(env_of(liqmon_container()))
    assert spec["terminationGracePeriodSeconds"] >= budget + GRACE_MARGIN


def test_deployment_has_resources_and_hardening() -> None:
    container = liqmon_container()
    assert {"cpu", "memory"} <= container["resources"]["requests"].keys()
    assert "memory" in container["resources"]["limits"]
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert env_of(container)["LIQMON_BOOTSTRAP"]


def test_kernel_threads_are_capped_at_the_cpu_limit() -> None:
    """numba starts one thread per CPU of the node unless told otherwise; more threads than
    the pod may run would throttle the shock tick they are there to speed up."""
    container = liqmon_container()
    assert env_of(container)["NUMBA_NUM_THREADS"] == str(container["resources"]["limits"]["cpu"])


def kafka_security_env_is_valid(env: dict[str, Any]) -> None:
    """The security settings of a deployment are ones liqmon accepts (the files aside)."""
    from monitor.service.security import MECHANISMS, PROTOCOLS

    assert env["LIQMON_SECURITY_PROTOCOL"] in PROTOCOLS
    if env["LIQMON_SECURITY_PROTOCOL"].startswith("SASL_"):
        assert env["LIQMON_SASL_MECHANISM"] in MECHANISMS
        assert env["LIQMON_SASL_USERNAME"]
        assert "LIQMON_SASL_PASSWORD_FILE" in env


def no_literal_password(env: dict[str, Any]) -> None:
    """A password in a manifest is a password in git: it may only come from a Secret."""
    for name, value in env.items():
        if "PASSWORD" in name and not name.endswith("_FILE"):
            assert isinstance(value, dict) and "secretKeyRef" in value, (
                f"{name} must come from a Secret (valueFrom.secretKeyRef), not a literal")


def k8s_secret_mount(path: str) -> tuple[dict[str, Any], str]:
    """The Secret volume of the liqmon container mounted over a file's directory, and the
    file's name in it."""
    file = PurePosixPath(path)
    mount = next(m for m in liqmon_container()["volumeMounts"]
                 if PurePosixPath(m["mountPath"]) == file.parent)
    volume = next(v for v in k8s_docs()["Deployment"]["spec"]["template"]["spec"]["volumes"]
                  if v["name"] == mount["name"])
    assert "secret" in volume, f"{file.parent} must be a Secret volume"
    return volume["secret"], file.name


def test_k8s_kafka_security_settings_are_valid() -> None:
    kafka_security_env_is_valid(env_of(liqmon_container()))


def test_k8s_sasl_password_is_a_file_from_a_secret_never_a_literal() -> None:
    env = env_of(liqmon_container())
    no_literal_password(env)
    secret, name = k8s_secret_mount(env["LIQMON_SASL_PASSWORD_FILE"])
    assert name in [item["path"] for item in secret.get("items", [])] or not secret.get("items")
    # Readable by liqmon through its group, not by every user of the container.
    assert secret["defaultMode"] & 0o007 == 0
    assert k8s_docs()["Deployment"]["spec"]["template"]["spec"]["securityContext"][
        "fsGroup"] == 10001


def test_k8s_kafka_ca_is_mounted_from_a_secret() -> None:
    secret, name = k8s_secret_mount(env_of(liqmon_container())["LIQMON_SSL_CAFILE"])
    assert name in [item["path"] for item in secret.get("items", [])] or not secret.get("items")


SECURE_COMPOSE = DEPLOY / "docker-compose.secure.yml"


def test_secure_compose_settings_are_valid() -> None:
    kafka_security_env_is_valid(load_yaml(SECURE_COMPOSE)["services"]["liqmon"]["environment"])


def test_secure_compose_password_and_ca_are_git_ignored_compose_secrets() -> None:
    override = load_yaml(SECURE_COMPOSE)
    liqmon = override["services"]["liqmon"]
    env = liqmon["environment"]
    no_literal_password(env)
    assert "LIQMON_SASL_PASSWORD" not in env  # docker inspect would show it
    for variable in ("LIQMON_SASL_PASSWORD_FILE", "LIQMON_SSL_CAFILE"):
        path = PurePosixPath(env[variable])
        assert path.parent == PurePosixPath("/run/secrets"), variable
        assert path.name in liqmon["secrets"], variable
        source = PurePosixPath(override["secrets"][path.name]["file"])
        assert source.parent == PurePosixPath("secrets"), variable
    ignored = (ROOT / ".gitignore").read_text(encoding="utf-8").splitlines()
    assert "deploy/secrets/" in ignored


def test_prometheusrule_matches_alerts_yml() -> None:
    rule = load_yaml(K8S / "prometheusrule.yaml")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["kind"] == "PrometheusRule"
    assert rule["spec"]["groups"] == load_yaml(ALERTS)["groups"], (
        "prometheusrule.yaml is out of date: python3 deploy/k8s/sync_prometheusrule.py")
    spec = importlib.util.spec_from_file_location(
        "sync_prometheusrule", DEPLOY / "k8s" / "sync_prometheusrule.py")
    assert spec is not None and spec.loader is not None
    sync = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sync)
    assert (K8S / "prometheusrule.yaml").read_text(encoding="utf-8") == sync.render(), (
        "prometheusrule.yaml was edited by hand: python3 deploy/k8s/sync_prometheusrule.py")


# -- alert rules and dashboard --------------------------------------------------------------------


def alert_rules() -> list[dict[str, Any]]:
    return [r for g in load_yaml(ALERTS)["groups"] for r in g["rules"] if "alert" in r]


def test_alerts_are_complete_and_documented() -> None:
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    assert set(names) >= REQUIRED_ALERTS
    readme = (DEPLOY / "README.md").read_text(encoding="utf-8")
    for rule in rules:
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert {"summary", "description", "runbook"} <= rule["annotations"].keys(), rule["alert"]
        assert f"### {rule['alert']}\n" in readme, f"no runbook entry for {rule['alert']}"
        assert f"#{rule['alert'].lower()}" in rule["annotations"]["runbook"]
        assert 'job="liqmon"' in rule["expr"], rule["alert"]


def test_alert_unit_tests_cover_every_alert_firing_and_quiet() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in load_yaml(ALERTS_TEST)["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {r["alert"] for r in alert_rules()}
    assert names - firing == set(), "alerts never tested firing"
    assert names - quiet == set(), "alerts never tested staying quiet"


def test_alerts_use_only_exported_metrics() -> None:
    used = metric_names(ALERTS.read_text(encoding="utf-8"))
    assert used, "no liqmon metric found in alerts.yml"
    assert used <= EXPECTED_METRICS, used - EXPECTED_METRICS


def dashboard_targets() -> list[tuple[str, dict[str, Any]]]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return [(panel["title"], target) for panel in dashboard["panels"]
            for target in panel.get("targets", [])]


def test_dashboard_uses_only_exported_metrics() -> None:
    used = metric_names(DASHBOARD.read_text(encoding="utf-8"))
    assert used <= EXPECTED_METRICS, used - EXPECTED_METRICS
    # The panels the operations issue asks for.
    for metric in ("liqmon_records_consumed_total", "liqmon_consumer_lag_records",
                   "liqmon_event_latency_seconds", "liqmon_accounts_by_state",
                   "liqmon_events_emitted_total", "liqmon_records_rejected_total",
                   "liqmon_price_age_seconds", "liqmon_checkpoint_age_seconds"):
        assert metric in used, metric
    exprs = [target["expr"] for _, target in dashboard_targets()]
    assert any("histogram_quantile(0.99" in e and "liqmon_event_latency_seconds_bucket" in e
               for e in exprs)
    assert any("histogram_quantile(0.5" in e and "liqmon_event_latency_seconds_bucket" in e
               for e in exprs)


def test_dashboard_uses_the_provisioned_datasource() -> None:
    text = DASHBOARD.read_text(encoding="utf-8")
    assert "${DS_" not in text, "use the provisioned uid, not an import-time input"
    dashboard = json.loads(text)
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "prometheus"}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "prometheus", panel["title"]


def test_expected_metrics_are_declared_by_the_service() -> None:
    """The expected set is not a list of wishes: each name is declared in monitor/service."""
    source = "\n".join(p.read_text(encoding="utf-8")
                       for p in (ROOT / "monitor" / "service").glob("*.py"))
    for metric in EXPECTED_METRICS:
        declared = metric.removesuffix("_total")  # prometheus_client adds _total to counters
        assert f'"{declared}"' in source, f"{metric} is not exported by monitor/service"


# -- promtool -------------------------------------------------------------------------------------


def test_promtool_check_rules() -> None:
    run_promtool("check", "rules", str(ALERTS.relative_to(ROOT)))


def test_promtool_test_rules() -> None:
    run_promtool("test", "rules", str(ALERTS_TEST.relative_to(ROOT)))


def test_promtool_check_config() -> None:
    run_promtool("check", "config", str((PROMETHEUS / "prometheus.yml").relative_to(ROOT)))


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """Each panel's PromQL, with Grafana's variables filled in, parses as a recording rule."""
    rules = [{"record": f"dashboard_query_{i}",
              "expr": target["expr"].replace("$__rate_interval", "1m")
                                    .replace("$instance", ".*")}
             for i, (_, target) in enumerate(dashboard_targets())]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    run_promtool("check", "rules", str(path))


def test_ci_install_script_is_executable() -> None:
    script = DEPLOY / "ci-install-promtool.sh"
    assert os.access(script, os.X_OK)
    assert "command -v promtool" in script.read_text(encoding="utf-8")
