"""The Kubernetes manifests (docker/k8s), checked offline: each overlay renders, every object of
a built-in kind validates against pinned Kubernetes schemas (kubernetes-validate bundles them),
and the manifests fit the server: probe routes and the port, the shutdown grace, the RAGSERVE_*
variables, the autoscaling metric, the images, the Neuron devices and the cache volume.

kustomize is not on PyPI, so `build` below renders an overlay itself, for the few kustomize
fields these kustomizations use (a test keeps them to those); where `kustomize` or `kubectl` is
installed, a test compares the two renderings."""

from __future__ import annotations

import copy
import dataclasses
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from test_docker import DOCKERFILES, engine_exports, instructions, metric_names

from server.config import ServerConfig, add_serve_args, config_from_args, env_name
from server.openapi import OPEN_PATHS

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "docker" / "k8s"
BASE = K8S / "base"
# overlay -> the images (test_docker.DOCKERFILES keys) it runs: its own first, then the ones
# its kustomization says it may be switched to
OVERLAYS = {"cpu": ("cpu",), "inf2": ("neuron-vllm", "neuron"), "gpu": ("cuda",)}
# The oldest Kubernetes the manifests are for (EKS standard support) and the newest
# kubernetes-validate bundles: an API removed or changed in between fails one of them.
K8S_VERSIONS = ("1.32", "1.37")
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
CLAIM = "PersistentVolumeClaim"
# overlay -> its claims: the store every replica shares, and inf2's compiled-graph cache
CLAIMS = {"cpu": {"ragserve-store"}, "gpu": {"ragserve-store"},
          "inf2": {"ragserve-store", "ragserve-neuron-cache"}}
HPA_METRIC = "vllm:num_requests_waiting"
SECRET_EXAMPLE = K8S / "secret.example.yaml"
ADAPTER_RULES = K8S / "prometheus-adapter-rules.yaml"
# the flags' defaults (without building a ServerConfig, whose checks import torch)
DEFAULTS = {f.name: f.default for f in dataclasses.fields(ServerConfig)}


def load_all(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


# -- a kustomize stand-in -----------------------------------------------------------------

# The strategic-merge keys Kubernetes declares for the lists these patches touch; any other
# list in a patch replaces the base's (as tolerations do in a strategic merge).
MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
              "volumeMounts": "mountPath", "ports": "containerPort"}
KUSTOMIZE_FIELDS = {"apiVersion", "kind", "namespace", "resources", "patches", "images"}


def merge(base: Any, patch: Any, field: str = "") -> Any:
    """A strategic merge patch, as far as these manifests need it: maps merge key by key, a
    null deletes the key, a MERGE_KEYS list merges item by item on its key, anything else in
    the patch replaces the base."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            else:
                out[key] = merge(out[key], value, key) if key in out else copy.deepcopy(value)
        return out
    if isinstance(base, list) and isinstance(patch, list) and keyed(base + patch, field):
        key, out = MERGE_KEYS[field], list(base)
        for item in patch:
            at = [i for i, old in enumerate(out) if old[key] == item[key]]
            if at:
                out[at[0]] = merge(out[at[0]], item)
            else:
                out.append(copy.deepcopy(item))
        return out
    return copy.deepcopy(patch)


def keyed(items: list[Any], field: str) -> bool:
    """Whether `items` is a list merged on a key (`ports` is, in a container, not a Service)."""
    return field in MERGE_KEYS and all(isinstance(i, dict) and MERGE_KEYS[field] in i
                                       for i in items)


def set_image(image: str, rule: dict[str, str]) -> str:
    """kustomize's `images` entry applied to one image reference (`name[:tag]`)."""
    name, sep, tag = image.rpartition(":")
    if not sep or "/" in tag:  # no tag (a colon, if any, was a registry port)
        name, tag = image, ""
    if name != rule["name"]:
        return image
    tag = rule.get("newTag", tag)
    return rule.get("newName", name) + (f":{tag}" if tag else "")


def build(directory: Path) -> list[dict[str, Any]]:
    """`kustomize build directory`, for namespace, resources, patches (strategic merge patch
    files, each aimed by its own kind and name) and images."""
    k = load_all(directory / "kustomization.yaml")[0]
    objects: list[dict[str, Any]] = []
    for entry in k.get("resources", []):
        path = directory / entry
        objects += build(path) if path.is_dir() else load_all(path)
    for entry in k.get("patches", []):
        for patch in load_all(directory / entry["path"]):
            at = [i for i, o in enumerate(objects) if kind_name(o) == kind_name(patch)]
            assert len(at) == 1, f"{entry['path']} patches no single object"
            objects[at[0]] = merge(objects[at[0]], patch)
    for rule in k.get("images", []):
        for obj in objects:
            for c in containers(obj):
                c["image"] = set_image(c["image"], rule)
    if "namespace" in k:
        for obj in objects:
            obj["metadata"]["namespace"] = k["namespace"]
    return objects


def kind_name(obj: dict[str, Any]) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


def containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    if obj["kind"] != "Deployment":
        return []
    spec = obj["spec"]["template"]["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def rendered(overlay: str) -> dict[str, dict[str, Any]]:
    """The overlay's objects by kind (one of each kind here), less the claims (claims())."""
    objects = [o for o in build(K8S / "overlays" / overlay) if o["kind"] != CLAIM]
    by_kind = {o["kind"]: o for o in objects}
    assert len(by_kind) == len(objects), "two objects of one kind"
    return by_kind


def claims(overlay: str) -> dict[str, dict[str, Any]]:
    """The overlay's PersistentVolumeClaims by name."""
    return {o["metadata"]["name"]: o for o in build(K8S / "overlays" / overlay)
            if o["kind"] == CLAIM}


def server_container(overlay: str) -> dict[str, Any]:
    (c,) = rendered(overlay)["Deployment"]["spec"]["template"]["spec"]["containers"]
    return c


def plain_env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def test_merge_is_a_strategic_merge_for_what_the_overlays_patch():
    base = {"spec": {"containers": [{"name": "a", "env": [{"name": "X", "value": "1"}],
                                     "args": ["--a"]}],
                     "volumes": [{"name": "v", "emptyDir": {"sizeLimit": "1Gi"}}]}}
    patch = {"spec": {"containers": [{"name": "a", "env": [{"name": "Y", "value": "2"}],
                                      "args": ["--b"]}, {"name": "b"}],
                      "volumes": [{"name": "v", "emptyDir": None,
                                   "persistentVolumeClaim": {"claimName": "c"}}]}}
    out = merge(base, patch)
    a, b = out["spec"]["containers"]
    assert a["env"] == [{"name": "X", "value": "1"}, {"name": "Y", "value": "2"}]
    assert a["args"] == ["--b"] and b == {"name": "b"}
    assert out["spec"]["volumes"] == [{"name": "v", "persistentVolumeClaim": {"claimName": "c"}}]
    assert base["spec"]["volumes"][0]["emptyDir"] == {"sizeLimit": "1Gi"}  # not mutated
    assert set_image("ragserve:cpu", {"name": "ragserve", "newTag": "cuda"}) == "ragserve:cuda"
    assert set_image("ragserve", {"name": "ragserve", "newName": "r.io:5000/rs"}) == "r.io:5000/rs"
    assert set_image("other:1", {"name": "ragserve", "newTag": "x"}) == "other:1"


@pytest.mark.parametrize("directory", [BASE, *(K8S / "overlays" / o for o in OVERLAYS)],
                         ids=lambda p: p.name)
def test_kustomizations_use_only_what_build_implements(directory: Path):
    (k,) = load_all(directory / "kustomization.yaml")
    assert set(k) <= KUSTOMIZE_FIELDS
    assert (k["apiVersion"], k["kind"]) == ("kustomize.config.k8s.io/v1beta1", "Kustomization")
    assert k["namespace"] == "ragserve"  # overlays too: their own resources need it
    assert all(set(p) == {"path"} for p in k.get("patches", []))
    assert all(set(i) <= {"name", "newName", "newTag"} for i in k.get("images", []))
    for entry in k["resources"]:
        assert (directory / entry).exists(), entry
    if directory != BASE:
        assert "../../base" in k["resources"]


def kustomize_command() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    return ["kubectl", "kustomize"] if shutil.which("kubectl") else None


def canonical(obj: Any, field: str = "") -> Any:
    """Named lists as maps, so that the item order of a merge does not count."""
    if isinstance(obj, dict):
        return {k: canonical(v, k) for k, v in obj.items()}
    if isinstance(obj, list) and keyed(obj, field):
        return {item[MERGE_KEYS[field]]: canonical(item) for item in obj}
    return [canonical(v) for v in obj] if isinstance(obj, list) else obj


@pytest.mark.skipif(kustomize_command() is None, reason="neither kustomize nor kubectl")
@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_build_renders_what_kustomize_renders(overlay: str):
    out = subprocess.run([*kustomize_command(), str(K8S / "overlays" / overlay)],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    theirs = {kind_name(o): canonical(o) for o in yaml.safe_load_all(out) if o}
    ours = {kind_name(o): canonical(o) for o in build(K8S / "overlays" / overlay)}
    assert ours == theirs


# -- schemas and structure ------------------------------------------------------------------


def builtin(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objects if (o["apiVersion"], o["kind"]) not in CRDS]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_builtin_objects_validate_against_the_kubernetes_schema(overlay: str, version: str):
    objects = builtin(build(K8S / "overlays" / overlay)) + load_all(SECRET_EXAMPLE)
    assert {o["kind"] for o in objects} >= {"Deployment", "Service", "PodDisruptionBudget",
                                            "HorizontalPodAutoscaler", "Secret"}
    for obj in objects:
        try:  # strict: an unknown field (a typo) fails too
            assert kubernetes_validate.validate(obj, version, strict=True) == version
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            pytest.fail(f"{overlay}: {kind_name(obj)} at {path}: {e.message}")


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_overlay_renders_the_expected_objects(overlay: str):
    objects = rendered(overlay)
    expected = {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler",
                "ServiceMonitor"}
    assert set(objects) == expected
    assert set(claims(overlay)) == CLAIMS[overlay]
    assert {o["metadata"]["namespace"] for o in [*objects.values(), *claims(overlay).values()]
            } == {"ragserve"}


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_selectors_and_references_fit_together(overlay: str):
    o = rendered(overlay)
    deployment, service, monitor = o["Deployment"], o["Service"], o["ServiceMonitor"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert o["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() \
        <= pod_labels.items()
    assert monitor["spec"]["selector"]["matchLabels"].items() \
        <= service["metadata"]["labels"].items()
    target = o["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == kind_name(deployment)
    assert "replicas" not in deployment["spec"]  # the HPA owns the count


def test_servicemonitor_scrapes_metrics_with_the_api_key():
    o = rendered("cpu")
    (endpoint,) = o["ServiceMonitor"]["spec"]["endpoints"]
    assert o["ServiceMonitor"]["apiVersion"] == "monitoring.coreos.com/v1"
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {p["name"] for p in o["Service"]["spec"]["ports"]}
    # /metrics is not an open route: Prometheus sends the same key as the clients
    assert "/metrics" not in OPEN_PATHS
    auth = endpoint["authorization"]
    assert auth["type"] == "Bearer"
    assert auth["credentials"] == secret_ref(server_container("cpu"), "RAGSERVE_API_KEY")


# -- the server's side: port, probes, shutdown, variables ----------------------------------


def secret_ref(container: dict[str, Any], name: str) -> dict[str, Any]:
    (env,) = [e for e in container["env"] if e["name"] == name]
    ref = dict(env["valueFrom"]["secretKeyRef"])
    ref.pop("optional", None)
    return ref


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_probes_and_ports_match_the_server(overlay: str):
    c = server_container(overlay)
    (port,) = c["ports"]
    assert port == {"name": "http", "containerPort": DEFAULTS["port"]}
    assert plain_env(c)["RAGSERVE_PORT"] == str(port["containerPort"])
    (sport,) = rendered(overlay)["Service"]["spec"]["ports"]
    assert sport["targetPort"] in (port["name"], port["containerPort"])
    probes = {k: c[k]["httpGet"] for k in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert {p["port"] for p in probes.values()} <= {port["name"], port["containerPort"]}
    # liveness: the process answers; readiness: the model is loaded. /ping is /ready without
    # the API key (a probe cannot send a Secret).
    assert probes["livenessProbe"]["path"] == "/health"
    assert probes["readinessProbe"]["path"] == probes["startupProbe"]["path"] == "/ping"
    assert {p["path"] for p in probes.values()} <= OPEN_PATHS
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 3600  # a first compile


def test_ping_is_ready_without_the_api_key():
    from server import routes

    paths = {r.path: r.endpoint for r in routes.router.routes if "GET" in r.methods}
    assert "readiness" in paths["/ping"].__code__.co_names
    assert "readiness" in paths["/ready"].__code__.co_names
    assert "/ping" in OPEN_PATHS and "/ready" not in OPEN_PATHS


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_termination_grace_covers_the_shutdown_drain(overlay: str):
    spec = rendered(overlay)["Deployment"]["spec"]["template"]["spec"]
    c = server_container(overlay)
    grace = float(plain_env(c).get("RAGSERVE_SHUTDOWN_GRACE_SECONDS",
                                   DEFAULTS["shutdown_grace_seconds"]))
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    # the pod's countdown runs through preStop, then SIGTERM starts the server's drain
    assert spec["terminationGracePeriodSeconds"] >= int(command[1]) + grace + 5
    # a Service named ragserve would inject RAGSERVE_PORT=tcp://...: the server's --port
    assert spec["enableServiceLinks"] is False


def flag_env_names() -> set[str]:
    import argparse

    p = argparse.ArgumentParser()
    add_serve_args(p)
    return {env_name(s) for a in p._actions for s in a.option_strings if s.startswith("--")}


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_every_ragserve_variable_is_a_flag(overlay: str):
    used = {e["name"] for c in containers(rendered(overlay)["Deployment"]) for e in c["env"]}
    ours = {n for n in used if n.startswith("RAGSERVE_")}
    assert ours and ours <= flag_env_names()


def image_env(kind: str) -> dict[str, str]:
    env = " ".join(a for n, a in instructions(DOCKERFILES[kind]) if n == "ENV")
    return dict(re.findall(r"(\w+)=(\S+)", env))


@pytest.mark.parametrize(("overlay", "kind"), [(o, k) for o, ks in OVERLAYS.items() for k in ks])
def test_overlay_and_image_variables_make_a_valid_server_config(overlay: str, kind: str):
    environ = {**image_env(kind), **plain_env(server_container(overlay)),
               "RAGSERVE_API_KEY": "from-the-secret"}
    config = config_from_args([], environ)  # raises ConfigError naming the variable
    assert config.port == DEFAULTS["port"] and config.host == "0.0.0.0"
    assert str(config.cache_dir) == image_env(kind)["RAGSERVE_CACHE_DIR"]


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_volumes_have_one_source_and_every_mount_a_volume(overlay: str):
    objects = rendered(overlay)
    spec = objects["Deployment"]["spec"]["template"]["spec"]
    volumes = {v["name"]: {k for k in v if k != "name"} for v in spec["volumes"]}
    assert all(len(sources) == 1 for sources in volumes.values()), volumes
    c = server_container(overlay)
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert set(mounts.values()) <= set(volumes)
    assert mounts[plain_env(c)["RAGSERVE_CACHE_DIR"]] == "cache"
    used = {v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"]
            if "persistentVolumeClaim" in v}
    assert used == set(claims(overlay))  # every claim mounted, every mounted claim rendered


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_replicas_share_one_store_on_a_read_write_many_claim(overlay: str):
    from retrieval.index import KEEP_SUPERSEDED_SECONDS

    spec = rendered(overlay)["Deployment"]["spec"]["template"]["spec"]
    c = server_container(overlay)
    env = plain_env(c)
    config = config_from_args([], {**image_env(OVERLAYS[overlay][0]), **env,
                                   "RAGSERVE_API_KEY": "from-the-secret"})
    store_dir = str(config.store_dir)
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == store_dir]
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    claim = claims(overlay)[volume["persistentVolumeClaim"]["claimName"]]
    # pods on several nodes mount it at once; EFS speaks NFSv4.1, whose locks the store takes
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claim["spec"]["storageClassName"] == "efs-sc"
    assert not mount.get("readOnly") and not mount.get("subPath")
    # not under the cache, which is per pod (an emptyDir) in the base
    assert not store_dir.startswith(env["RAGSERVE_CACHE_DIR"].rstrip("/") + "/")
    # a pod swaps in another's index version well before the writer removes the old one
    assert 0 < config.index_refresh_seconds <= KEEP_SUPERSEDED_SECONDS / 4
    assert rendered(overlay)["HorizontalPodAutoscaler"]["spec"]["maxReplicas"] > 1


# -- images and accelerators ---------------------------------------------------------------


def dockerfile_tag(kind: str) -> str:
    """The tag the Dockerfile's own `docker build ... -t TAG .` line gives its image."""
    (tag,) = re.findall(rf"docker build -f docker/Dockerfile\.{re.escape(kind)} -t (\S+) \.",
                        DOCKERFILES[kind].read_text())
    return tag


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_overlay_runs_its_dockerfiles_image(overlay: str):
    assert server_container(overlay)["image"] == dockerfile_tag(OVERLAYS[overlay][0])
    for kind in OVERLAYS[overlay][1:]:  # the alternatives named in the kustomization
        text = (K8S / "overlays" / overlay / "kustomization.yaml").read_text()
        tag = re.escape(dockerfile_tag(kind).split(":")[1])
        assert re.search(rf"newTag: {tag}(?![\w-])", text), kind


def accelerators(resources: dict[str, dict[str, Any]]) -> set[str]:
    names = set(resources.get("requests", {})) | set(resources.get("limits", {}))
    return {n for n in names if "/" in n}


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_resources_request_the_overlays_accelerator(overlay: str):
    resources = server_container(overlay)["resources"]
    requests, limits = resources["requests"], resources["limits"]
    assert {"cpu", "memory"} <= set(requests) and "memory" in limits
    expected = {"cpu": set(), "inf2": {"aws.amazon.com/neuron"}, "gpu": {"nvidia.com/gpu"}}
    assert accelerators(resources) == expected[overlay]
    for name in expected[overlay]:  # extended resources: limits must equal requests
        assert requests[name] == limits[name] and int(requests[name]) >= 1
    tolerations = rendered(overlay)["Deployment"]["spec"]["template"]["spec"].get(
        "tolerations", [])
    assert {t["key"] for t in tolerations} == expected[overlay]


def test_inf2_overlay_shards_over_the_cores_it_requests():
    c = server_container("inf2")
    devices = int(c["resources"]["limits"]["aws.amazon.com/neuron"])
    # one aws.amazon.com/neuron device is one Inferentia2 chip, 2 NeuronCores
    assert int(plain_env(c)["RAGSERVE_TENSOR_PARALLEL_SIZE"]) <= 2 * devices
    spec = rendered("inf2")["Deployment"]["spec"]["template"]["spec"]
    assert spec["nodeSelector"]["node.kubernetes.io/instance-type"].startswith("inf2.")


def test_inf2_overlay_keeps_the_compiled_graph_cache_on_a_shared_claim():
    objects = rendered("inf2")
    c = server_container("inf2")
    (cache,) = [v for v in objects["Deployment"]["spec"]["template"]["spec"]["volumes"]
                if v["name"] == "cache"]
    claim = claims("inf2")["ragserve-neuron-cache"]
    assert cache["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    cache_dir = plain_env(c)["RAGSERVE_CACHE_DIR"]
    assert {"name": "cache", "mountPath": cache_dir} in c["volumeMounts"]
    # the images keep every compile and download cache under RAGSERVE_CACHE_DIR
    for kind in OVERLAYS["inf2"]:
        env = image_env(kind)
        assert env["RAGSERVE_CACHE_DIR"] == cache_dir
        for var in ("HF_HOME", "VLLM_CACHE_ROOT", "NEURON_COMPILE_CACHE_URL"):
            assert env.get(var, cache_dir).startswith(cache_dir), (kind, var)
    # several replicas on several nodes mount it at once
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert objects["HorizontalPodAutoscaler"]["spec"]["minReplicas"] == 1  # one compiles first


# -- autoscaling ---------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_hpa_scales_on_a_per_pod_metric_every_engine_exports(overlay: str):
    hpa = rendered(overlay)["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == HPA_METRIC
    assert metric["pods"]["target"]["type"] == "AverageValue"
    for engine, names in engine_exports().items():
        assert HPA_METRIC in names, engine
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]


def test_adapter_rule_serves_the_hpa_metric_from_exported_series():
    (rules,) = load_all(ADAPTER_RULES)
    assert rules["rules"]["default"] is False
    (rule,) = rules["rules"]["custom"]
    exports = engine_exports()
    named = metric_names(rule["seriesQuery"])
    assert named == {HPA_METRIC}
    for engine, names in exports.items():
        assert named <= names, engine
    assert re.fullmatch(rule["name"]["matches"], HPA_METRIC)
    assert rule["name"]["as"] == HPA_METRIC
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"},
                                              "pod": {"resource": "pod"}}
    # one value per pod: vLLM labels its series per engine core too
    assert "by (<<.GroupBy>>)" in rule["metricsQuery"]


# -- the Secret and the docs ---------------------------------------------------------------


def test_secret_example_is_a_placeholder_and_never_applied():
    (secret,) = load_all(SECRET_EXAMPLE)
    assert set(secret["stringData"].values()) == {"CHANGE-ME"}
    for path in K8S.rglob("kustomization.yaml"):
        listed = {(path.parent / r).resolve() for r in load_all(path)[0]["resources"]}
        assert not listed & {SECRET_EXAMPLE, ADAPTER_RULES}, path
    refs = [e["valueFrom"]["secretKeyRef"] for c in containers(rendered("inf2")["Deployment"])
            for e in c["env"] if "secretKeyRef" in e.get("valueFrom", {})]
    assert refs
    for ref in refs:
        assert ref["name"] == secret["metadata"]["name"]
        assert ref["key"] in secret["stringData"]
    assert not secret_ref(server_container("inf2"), "RAGSERVE_API_KEY").get("optional")


def test_deployment_docs_walk_through_kubernetes():
    docs = (ROOT / "docs/deployment.md").read_text()
    section = docs.split("## Kubernetes (EKS)", 1)[1].split("\n## ", 1)[0]
    for overlay in OVERLAYS:
        assert f"kubectl apply -k docker/k8s/overlays/{overlay}" in section, overlay
    for path in (SECRET_EXAMPLE, ADAPTER_RULES):
        assert str(path.relative_to(ROOT)) in section
    assert "KEDA" in section and HPA_METRIC in section and "/ping" in section
    shared = docs.split("### Several replicas: one shared store (EFS)", 1)[1].split("\n## ", 1)[0]
    for words in ("ReadWriteMany", "efs-sc", "RAGSERVE_STORE_DIR", "--index-refresh-seconds",
                  "SIGKILL", "fcntl", "SQLite", "docker/k8s/base/store-pvc.yaml"):
        assert words in shared, words
