"""A real Prometheus (Debian's ``prometheus`` and ``promtool``, installed by ``make
install-prometheus``) against what ragserve ships: the scrape config and the HPA's adapter rules
pass ``promtool``; Prometheus scrapes a live server (each engine under test) with the shipped
scrape config while a short load runs; then every expression of the Grafana dashboard and the
HPA's query evaluate, through Prometheus's HTTP API, to data, and ``ragserve buckets plan``
plans the same from Prometheus as from the server.

A panel whose series exist on one engine only says so in its title ("(ragserve engine only)",
"(vLLM engine only)") and is checked on that engine. Without the binaries the tests skip,
unless RAGSERVE_REQUIRE_PROMETHEUS is set (``make test`` sets it: CI must run them)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from serverutil import engine_flags, free_port, start_subprocess, wait_ready

ROOT = Path(__file__).resolve().parent.parent
SCRAPE_CONFIG = ROOT / "docker" / "prometheus" / "prometheus.yml"
ADAPTER_RULES = ROOT / "docker" / "k8s" / "prometheus-adapter-rules.yaml"
HPA = ROOT / "docker" / "k8s" / "base" / "hpa.yaml"
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "ragserve.json"
MODEL = "tiny"
SCRAPE_SECONDS = 1
#: the pod the test's scrape target stands for (the labels a ServiceMonitor adds in Kubernetes)
POD = {"namespace": "test", "pod": "ragserve-0"}
ENGINE_ONLY = {"ragserve": "(vLLM engine only)", "vllm": "(ragserve engine only)"}


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed: `make install-prometheus` installs Debian's"
        if os.environ.get("RAGSERVE_REQUIRE_PROMETHEUS"):
            pytest.fail(message)
        pytest.skip(message)
    return path


# -- the adapter rules as Prometheus recording rules -------------------------------------------

def adapter_queries(matchers: str, group_by: str) -> dict[str, str]:
    """Each custom rule of the Prometheus adapter's Helm values as the PromQL it runs: the
    metric name it serves -> ``metricsQuery`` with the adapter's template filled in."""
    rules = yaml.safe_load(ADAPTER_RULES.read_text())["rules"]["custom"]
    out = {}
    for rule in rules:
        series = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", rule["seriesQuery"]).group(0)
        query = (rule["metricsQuery"].replace("<<.Series>>", series)
                 .replace("<<.LabelMatchers>>", matchers).replace("<<.GroupBy>>", group_by))
        out[rule["name"]["as"]] = query
    return out


def test_promtool_checks_the_scrape_config_and_the_adapter_rules(tmp_path: Path):
    promtool = binary("promtool")
    r = subprocess.run([promtool, "check", "config", str(SCRAPE_CONFIG)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    # the HPA asks the custom metrics API for the name the adapter serves
    hpa = yaml.safe_load(HPA.read_text())
    asked = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    queries = adapter_queries('namespace!="",pod!=""', "namespace, pod")
    assert asked and asked <= set(queries)
    # each rule as the recording rule of the name it serves
    rules = {"groups": [{"name": "prometheus-adapter", "rules": [
        {"record": name, "expr": expr} for name, expr in queries.items()]}]}
    path = tmp_path / "adapter-rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    r = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


# -- a live server scraped by Prometheus --------------------------------------------------------

@dataclass
class Scraped:
    engine: str
    server: str
    prometheus: str
    first_scrape: float = 0.0  # time.time() of the first scrape that found the server up

    def query(self, expr: str) -> list[dict]:
        r = httpx.get(f"{self.prometheus}/api/v1/query", params={"query": expr}, timeout=30)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", (expr, body)
        return body["data"]["result"]


def scrape_config(target: str) -> dict:
    """The shipped scrape config, pointed at ``target`` with the pod's labels, every second."""
    config = yaml.safe_load(SCRAPE_CONFIG.read_text())
    config["global"]["scrape_interval"] = f"{SCRAPE_SECONDS}s"
    config["global"]["evaluation_interval"] = f"{SCRAPE_SECONDS}s"
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "ragserve"]
    job["scrape_interval"] = f"{SCRAPE_SECONDS}s"
    job["scrape_timeout"] = f"{SCRAPE_SECONDS}s"
    job["static_configs"] = [{"targets": [target], "labels": POD}]
    return config


def wait_for(what: str, check, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.25)
    raise TimeoutError(f"{what} after {timeout}s")


@pytest.fixture(scope="module")
def scraped(engine_name: str, tiny_llama_dir: Path, index_dir: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scraped]:
    prometheus = binary("prometheus")
    tmp = tmp_path_factory.mktemp("prometheus")
    proc, url = start_subprocess([
        "--model", str(tiny_llama_dir), "--served-model-name", MODEL, "--dtype", "float32",
        "--max-model-len", "256", "--max-num-seqs", "4", "--index", str(index_dir),
        *engine_flags(engine_name)], tmp / "server.log")
    prom = None
    try:
        wait_ready(url, proc=proc)
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(
            scrape_config(url.removeprefix("http://"))))
        port = free_port()
        prom = subprocess.Popen(
            [prometheus, f"--config.file={tmp / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
             "--log.level=warn"],
            stdout=open(tmp / "prometheus.log", "w"), stderr=subprocess.STDOUT)  # noqa: SIM115
        s = Scraped(engine_name, url, f"http://127.0.0.1:{port}")

        def up() -> bool:
            try:
                return [r["value"][1] for r in s.query('up{job="ragserve"}')] == ["1"]
            except (httpx.TransportError, json.JSONDecodeError):
                return False

        wait_for("Prometheus has not scraped the server", up)
        s.first_scrape = time.time()

        def scraped_after(t: float) -> bool:
            return float(s.query('timestamp(up{job="ragserve"})')[0]["value"][1]) > t

        # the load twice, a scrape between: the series whose labels come with the traffic
        # (a route and status) exist before the second half, as under steady traffic; the
        # series whose labels are known up front must count the first half too
        for _ in range(2):
            load(url)
            t = time.time() + SCRAPE_SECONDS  # a whole scrape after the load
            wait_for("no scrape after the load", lambda t=t: scraped_after(t))
        yield s
    finally:
        if prom is not None:
            prom.terminate()
            prom.wait(30)
        proc.terminate()
        proc.wait(60)
        print((tmp / "server.log").read_text()[-3000:])


def load(url: str) -> None:
    """A minute of traffic's kinds in a few seconds: chat and completions, streamed and not,
    RAG with sources, a retrieval, and requests the server refuses."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
    greedy = dict(temperature=0, extra_body={"ignore_eos": True})
    msg = [{"role": "user", "content": "Where is the capital of Zorvania?"}]
    for i in range(3):
        client.chat.completions.create(model=MODEL, messages=msg, max_tokens=8 + i, **greedy)
    list(client.chat.completions.create(model=MODEL, messages=msg, max_tokens=12, stream=True,
                                        **greedy))
    client.completions.create(model=MODEL, prompt="Once upon a time " * (4 + 8), max_tokens=6,
                              **greedy)
    client.chat.completions.create(model=MODEL, messages=msg, max_tokens=16,
                                   extra_body={"rag": {"top_k": 2}, "ignore_eos": True},
                                   temperature=0)
    r = httpx.post(f"{url}/v1/retrieve", json={"query": "capital of Zorvania", "k": 2},
                   timeout=60)
    assert r.status_code == 200
    for bad in ({"model": MODEL, "messages": msg, "max_tokens": -1},
                {"model": MODEL, "messages": "not a list"}):
        r = httpx.post(f"{url}/v1/chat/completions", json=bad, timeout=60)
        assert r.status_code == 400


def dashboard_targets() -> list[tuple[str, str]]:
    """(panel title, expression) of every query in the dashboard, rows' panels included."""
    def walk(panels: list[dict]) -> Iterator[dict]:
        for p in panels:
            yield p
            yield from walk(p.get("panels", []))

    board = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in walk(board["panels"])
            for t in p.get("targets", []) if t.get("expr")]


def grafana(expr: str, window: str) -> str:
    """``expr`` as Grafana sends it: every model, the rate interval and range of the test."""
    return (expr.replace('"$model"', '".*"').replace("$__rate_interval", window)
            .replace("$__range", window))


def numbers(result: list[dict]) -> list[float]:
    return [float(r["value"][1]) for r in result]


def test_every_dashboard_expression_has_data(scraped: Scraped):
    window = "5m"
    targets = dashboard_targets()
    assert len(targets) >= 40
    empty, checked = [], 0
    for title, expr in targets:
        if ENGINE_ONLY[scraped.engine] in title:
            continue  # the other engine's series
        checked += 1
        values = numbers(scraped.query(grafana(expr, window)))
        # a quantile or ratio of no observations is NaN: no data either
        if not any(math.isfinite(v) for v in values):
            empty.append(f"{title}: {expr}")
    assert checked >= 30 and not empty, "\n".join(empty)
    # the model variable's query lists the served model
    names = {r["metric"]["model_name"] for r in scraped.query("vllm:num_requests_running")}
    assert names == {MODEL}


def test_the_hpa_query_has_a_value_per_pod(scraped: Scraped):
    matchers = ",".join(f'{k}="{v}"' for k, v in POD.items())
    queries = adapter_queries(matchers, "pod")
    result = scraped.query(queries["vllm:num_requests_waiting"])
    assert [r["metric"] for r in result] == [{"pod": POD["pod"]}]
    assert numbers(result) == [0.0]  # the load is over: nothing waits


def test_buckets_plan_from_prometheus_equals_the_plan_from_the_server(
        scraped: Scraped, capsys: pytest.CaptureFixture[str]):
    from server.cli import main

    # increase() extrapolates to the window's end (up to a scrape interval past the last
    # sample): by a factor (T + 1 s) / T over T seconds of samples. With T >= 40 s no count of
    # this load (each under 20) moves by half a request, so the counts read back are exact.
    time.sleep(max(0.0, scraped.first_scrape + 40 - time.time()))
    args = ["--align", "32", "--device", "cpu", "--json"]
    assert main(["buckets", "plan", "--from", f"prometheus+{scraped.prometheus}",
                 "--window", "5m", "--model", MODEL, *args]) == 0
    from_prometheus = json.loads(capsys.readouterr().out)
    assert main(["buckets", "plan", "--from", f"{scraped.server}/metrics", *args]) == 0
    from_metrics = json.loads(capsys.readouterr().out)
    info = from_prometheus.pop("prometheus")
    assert info["window"] == "5m" and all("[5m]" in q for q in info["queries"])
    for report in (from_prometheus, from_metrics):
        report.pop("source")
        report.pop("prometheus", None)
    assert from_prometheus == from_metrics
    # and the buckets the server's own sample of exact lengths gives (with --align 32 the
    # histograms' bins lose nothing; the costs differ: the server adds its prefill timings)
    assert main(["buckets", "plan", "--from", scraped.server, *args]) == 0
    from_server = json.loads(capsys.readouterr().out)
    for key in ("context_encoding", "token_generation"):
        assert from_prometheus[key]["binned_inexact"] == 0
        assert [p["buckets"] for p in from_prometheus[key]["plans"]] == [
            p["buckets"] for p in from_server[key]["plans"]]
    assert urllib.parse.urlparse(info["url"]).hostname == "127.0.0.1"
