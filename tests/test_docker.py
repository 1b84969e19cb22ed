"""The container files, checked without a Docker engine: the compose stack and the Grafana
provisioning parse and fit together, the dashboard queries only metrics the server exports, the
Dockerfiles install ragserve the way the Makefile (and so CI) does, and the shell scripts parse
and dispatch as documented."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from scheduler import SchedulerStats
from server.async_engine import FinishedRequestStats, StepStats
from server.metrics import Metrics

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILES = {"cpu": DOCKER / "Dockerfile.cpu", "neuron": DOCKER / "Dockerfile.neuron"}
SCRIPTS = [DOCKER / "smoke_inf2.sh", DOCKER / "entrypoint.sh"]


def load_yaml(path: Path) -> dict:
    with path.open() as f:
        return yaml.safe_load(f)


# -- compose, Prometheus, Grafana provisioning ----------------------------------------------


def test_compose_has_ragserve_prometheus_and_grafana():
    compose = load_yaml(DOCKER / "compose.yaml")
    services = compose["services"]
    assert set(services) == {"ragserve", "prometheus", "grafana"}

    rs = services["ragserve"]
    context = (DOCKER / rs["build"]["context"]).resolve()
    assert context == ROOT
    assert (context / rs["build"]["dockerfile"]) == DOCKERFILES["cpu"]
    assert "8000:8000" in rs["ports"]
    targets = {v.split(":")[1]: v.split(":")[0] for v in rs["volumes"]}
    assert {"/var/cache/ragserve", "/models", "/indexes"} <= set(targets)
    named = set(compose["volumes"])
    assert targets["/var/cache/ragserve"] in named and targets["/models"] in named

    assert "9090:9090" in services["prometheus"]["ports"]
    assert "3000:3000" in services["grafana"]["ports"]
    for name in ("prometheus", "grafana"):
        image = services[name]["image"]
        tag = image.rsplit(":", 1)[1]
        assert re.fullmatch(r"v?\d+\.\d+\.\d+", tag), f"{name} image not pinned: {image}"
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DOCKER / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in named


def test_compose_neuron_override_passes_the_device_and_builds_the_neuron_image():
    override = load_yaml(DOCKER / "compose.neuron.yaml")["services"]["ragserve"]
    assert override["devices"] == ["/dev/neuron0"]
    assert ROOT / override["build"]["dockerfile"] == DOCKERFILES["neuron"]
    assert override["environment"]["RAGSERVE_DEVICE"] == "neuron"
    assert "RAGSERVE_TENSOR_PARALLEL_SIZE" in override["environment"]


def test_prometheus_scrapes_ragserve_every_5s():
    (job,) = load_yaml(DOCKER / "prometheus" / "prometheus.yml")["scrape_configs"]
    assert job["static_configs"][0]["targets"] == ["ragserve:8000"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["scrape_interval"] == "5s"


def test_grafana_provisioning_points_at_prometheus_and_the_dashboard():
    (ds,) = load_yaml(DOCKER / "grafana/provisioning/datasources/prometheus.yaml")["datasources"]
    assert (ds["type"], ds["url"]) == ("prometheus", "http://prometheus:9090")
    (provider,) = load_yaml(DOCKER / "grafana/provisioning/dashboards/dashboards.yaml")["providers"]
    grafana = load_yaml(DOCKER / "compose.yaml")["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"])
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert (DOCKER / "grafana/dashboards/ragserve.json").is_file()


# -- the dashboard --------------------------------------------------------------------------


def dashboard() -> dict:
    return json.loads((DOCKER / "grafana/dashboards/ragserve.json").read_text())


def exported_metric_names() -> set[str]:
    """Every series name a live Metrics renders once each observer method has been called."""
    m = Metrics("m")
    m.on_scheduler(SchedulerStats(num_running=1, num_waiting=1, num_slots=4, num_free_slots=3,
                                  kv_tokens_used=10, kv_tokens_capacity=100))
    m.on_step(StepStats(phase="prefill", bucket="128", seconds=0.01, num_prompt_tokens=100,
                        num_generation_tokens=1, num_padding_tokens=28,
                        inter_token_latencies=(0.02,)))
    m.on_finished(FinishedRequestStats(finish_reason="stop", num_prompt_tokens=100,
                                       num_generation_tokens=5, e2e=0.5, queue=0.01, ttft=0.1))
    m.observe_delivery(0.001)
    m.observe_retrieval(0.01)
    m.observe_rag(passages_used=3, invalid=0, unsupported=1)
    text = m.render().decode()
    return {re.match(r"[^{\s]+", line).group() for line in text.splitlines()
            if line and not line.startswith("#")}


def dashboard_queries(d: dict) -> list[str]:
    exprs = [t["expr"] for p in d["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in d["templating"]["list"] if v["type"] == "query"]
    return exprs


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: selectors (`name{...}`, `name[...]`) and the metric
    argument of `label_values(name, label)`."""
    names = set(re.findall(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*[{\[]", expr))
    names |= set(re.findall(r"label_values\(\s*([A-Za-z_:][A-Za-z0-9_:]*)\s*,", expr))
    return names


def test_metric_name_extraction():
    expr = ('histogram_quantile(0.95, sum by (le) (rate(vllm:x_bucket{model_name=~"$model"}'
            "[$__rate_interval]))) / sum(rate(ragserve_y_total[5m]))")
    assert metric_names(expr) == {"vllm:x_bucket", "ragserve_y_total"}
    assert metric_names("label_values(vllm:z, model_name)") == {"vllm:z"}


def test_dashboard_queries_only_metrics_the_server_exports():
    exported = exported_metric_names()
    exprs = dashboard_queries(dashboard())
    assert exprs
    for expr in exprs:
        names = metric_names(expr)
        assert names, f"no metric found in {expr!r}"
        assert names <= exported, f"{sorted(names - exported)} not exported (in {expr!r})"


def test_dashboard_covers_the_issue_panels():
    used = set().union(*map(metric_names, dashboard_queries(dashboard())))
    assert {
        "vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
        "vllm:e2e_request_latency_seconds_bucket", "vllm:generation_tokens_total",
        "vllm:prompt_tokens_total", "vllm:num_requests_waiting", "vllm:num_requests_running",
        "vllm:kv_cache_usage_perc", "ragserve_bucket_selected_total",
        "ragserve_padding_tokens_total", "ragserve_retrieval_seconds_bucket",
        "ragserve_unsupported_citations_total",
    } <= used


def test_dashboard_is_well_formed_and_uses_the_provisioned_datasource():
    d = dashboard()
    (ds,) = load_yaml(DOCKER / "grafana/provisioning/datasources/prometheus.yaml")["datasources"]
    assert d["uid"] and d["schemaVersion"] >= 36
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    for p in d["panels"]:
        assert {"h", "w", "x", "y"} <= set(p["gridPos"])
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        for source in [p.get("datasource"), *(t.get("datasource") for t in p.get("targets", []))]:
            if source is not None:
                assert source == {"type": "prometheus", "uid": ds["uid"]}


# -- the Dockerfiles install like the Makefile ------------------------------------------------

NO_DEPS = re.compile(r"pip install -q --no-deps ((?:[A-Za-z0-9_.-]+==[^\s\\]+\s*)+)")
EXTRAS = re.compile(r"pip install -q (?:-c \S+ )?(?:-e )?'\.\[([a-z,]+)\]'")
TORCH = re.compile(r"pip install -q (torch==\S+)")


def install_steps(text: str) -> tuple[set[str], set[str], list[str]]:
    """(the --no-deps packages with their pins, the extras of ragserve, the torch pins)."""
    (no_deps,) = NO_DEPS.findall(text)
    (extras,) = EXTRAS.findall(text)
    return set(no_deps.split()), set(extras.split(",")), TORCH.findall(text)


def test_dockerfiles_install_ragserve_like_the_makefile():
    make_no_deps, make_extras, make_torch = install_steps((ROOT / "Makefile").read_text())
    assert make_no_deps and "test" in make_extras and len(make_torch) == 1
    for kind, path in DOCKERFILES.items():
        no_deps, extras, torch = install_steps(path.read_text())
        assert no_deps == make_no_deps, kind
        assert extras == make_extras - {"test"}, kind
        if kind == "cpu":
            assert torch == make_torch
            assert "--index-url https://download.pytorch.org/whl/cpu" in path.read_text()
        else:
            assert torch == [], "the Neuron image must keep its own torch (torch-neuronx)"


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines = [ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in joined.splitlines()
            if ln.strip()]


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dockerfile_runtime_contract(kind):
    ins = instructions(DOCKERFILES[kind])
    args = {name: [a for n, a in ins if n == name] for name, _ in ins}
    base = args["FROM"][0]
    if kind == "neuron":
        (arg,) = [a for a in args["ARG"] if a.startswith("NEURON_BASE_IMAGE=")]
        base = arg.split("=", 1)[1]
        assert re.fullmatch(r"public\.ecr\.aws/neuron/pytorch-inference-neuronx:"
                            r"[\d.]+-neuronx-py\d+-sdk[\d.]+-ubuntu[\d.]+", base), base
    else:
        assert base.startswith("python:3.11-slim")
    users = args["USER"]
    assert users and users[-1] not in ("root", "0")
    assert set(" ".join(args["EXPOSE"]).split()) == {"8000", "8080"}
    assert set(json.loads(args["VOLUME"][0])) == {"/var/cache/ragserve", "/models", "/indexes"}
    env = " ".join(args["ENV"])
    assert "RAGSERVE_HOST=0.0.0.0" in env
    assert f"RAGSERVE_DEVICE={kind}" in env
    assert "RAGSERVE_CACHE_DIR=/var/cache/ragserve" in env
    assert "RAGSERVE_PORT" not in env  # `serve` (SageMaker) defaults it to 8080
    assert "healthcheck" in args["HEALTHCHECK"][0]
    assert json.loads(args["ENTRYPOINT"][0]) == ["/usr/local/bin/ragserve-entrypoint"]
    text = DOCKERFILES[kind].read_text()
    for source in re.findall(r"install -m \d+ (docker/\S+)", text):
        assert (ROOT / source).is_file(), source


def test_dockerignore_keeps_the_build_context_small():
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", ".cache"} <= set(ignored)
    assert any("__pycache__" in p for p in ignored)


# -- the scripts ----------------------------------------------------------------------------

needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")


@needs_bash
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", str(script)], check=True)


@needs_bash
@pytest.mark.parametrize(("argv", "expected"), [
    ([], "serve | port= model="),
    (["serve"], "serve | port=8080 model="),
    (["serve", "--max-num-seqs", "4"], "serve --max-num-seqs 4 | port=8080 model="),
    (["--max-num-seqs", "8"], "serve --max-num-seqs 8 | port= model="),
    (["ragserve", "index", "info", "/indexes/x"], "index info /indexes/x | port= model="),
])
def test_entrypoint_maps_arguments_to_ragserve_serve(tmp_path, argv, expected):
    stub = tmp_path / "ragserve"
    stub.write_text('#!/bin/sh\necho "$* | port=${RAGSERVE_PORT:-} model=${RAGSERVE_MODEL:-}"\n')
    stub.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAGSERVE_", "SAGEMAKER_"))}
    env["PATH"] = f"{tmp_path}{os.pathsep}{env['PATH']}"
    out = subprocess.run(["bash", str(DOCKER / "entrypoint.sh"), *argv], env=env,
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected


@needs_bash
def test_entrypoint_serve_keeps_an_explicit_port(tmp_path):
    stub = tmp_path / "ragserve"
    stub.write_text('#!/bin/sh\necho "port=$RAGSERVE_PORT"\n')
    stub.chmod(0o755)
    env = {"PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}", "RAGSERVE_PORT": "9000"}
    out = subprocess.run(["bash", str(DOCKER / "entrypoint.sh"), "serve"], env=env,
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "port=9000"


class _Health(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_healthcheck_script_checks_health_on_the_configured_port():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    script = str(DOCKER / "healthcheck.py")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAGSERVE_", "SAGEMAKER_"))}
    try:
        port = str(server.server_address[1])
        ok = subprocess.run([sys.executable, script], env={**env, "RAGSERVE_PORT": port})
        assert ok.returncode == 0
        sm = subprocess.run([sys.executable, script], env={**env, "SAGEMAKER_BIND_TO_PORT": port})
        assert sm.returncode == 0
    finally:
        server.shutdown()
        server.server_close()
    down = subprocess.run([sys.executable, script], env={**env, "RAGSERVE_PORT": port})
    assert down.returncode == 1
