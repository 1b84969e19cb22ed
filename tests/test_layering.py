"""The map's "who may import whom" table (docs/architecture.md), enforced on every import in
the packages, lazy ones inside functions included."""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("bucketing", "scheduler", "runtime", "retrieval", "engine", "planning", "server",
            "benchmarks")
#: the first-party packages (or single modules) each package may import
MAY_IMPORT = {
    "bucketing": {"bucketing"},
    "scheduler": {"scheduler", "bucketing"},
    "runtime": {"runtime", "scheduler", "bucketing"},
    "retrieval": {"retrieval", "runtime"},
    "engine": {"engine", "scheduler", "bucketing", "runtime"},
    "planning": {"planning", "bucketing", "runtime.neuron_plan"},
    "server": {"server", "engine", "planning", "retrieval", "runtime", "scheduler", "bucketing"},
    "benchmarks": set(PACKAGES),
}
#: packages that import nothing but the standard library (and the first-party ones above)
PURE = ("scheduler", "bucketing")
#: third-party imports allowed in planning/: it runs where only the server's URL is reachable
PLANNING_THIRD_PARTY = {"prometheus_client"}
#: the HTTP stack: server/ only
HTTP = {"fastapi", "starlette", "pydantic", "uvicorn"}


def imported_modules(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def third_party(name: str) -> bool:
    top = name.split(".")[0]
    return top not in sys.stdlib_module_names and top not in PACKAGES and top != "__future__"


def first_party_violations(package: str, path: Path) -> list[str]:
    allowed = MAY_IMPORT[package]
    bad = []
    for name in imported_modules(path):
        parts = name.split(".")
        if parts[0] in PACKAGES and not any(
                ".".join(parts[:i]) in allowed for i in range(1, len(parts) + 1)):
            bad.append(name)
    return bad


def non_stdlib_imports(path: Path) -> list[str]:
    return [n for n in imported_modules(path) if third_party(n) or (
        n.split(".")[0] in PACKAGES and n.split(".")[0] not in PURE)]


def modules(package: str) -> list[Path]:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package}/ has no modules"
    return files


@pytest.mark.parametrize("package", PACKAGES)
def test_packages_import_only_what_the_table_allows(package: str):
    bad = {str(f.relative_to(ROOT)): first_party_violations(package, f)
           for f in modules(package)}
    assert {f: b for f, b in bad.items() if b} == {}


@pytest.mark.parametrize("package", PURE)
def test_pure_packages_import_only_stdlib(package: str):
    bad = {str(f.relative_to(ROOT)): non_stdlib_imports(f) for f in modules(package)}
    assert {f: b for f, b in bad.items() if b} == {}


def test_planning_imports_no_third_party_but_prometheus_client():
    bad = {str(f.relative_to(ROOT)): [n for n in imported_modules(f) if third_party(n)
                                      and n.split(".")[0] not in PLANNING_THIRD_PARTY]
           for f in modules("planning")}
    assert {f: b for f, b in bad.items() if b} == {}


@pytest.mark.parametrize("package", [p for p in PACKAGES if p not in ("server", "benchmarks")])
def test_only_server_imports_the_http_stack(package: str):
    bad = {str(f.relative_to(ROOT)): [n for n in imported_modules(f) if n.split(".")[0] in HTTP]
           for f in modules(package)}
    assert {f: b for f, b in bad.items() if b} == {}


def test_the_table_covers_every_package():
    on_disk = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert on_disk == set(PACKAGES)


def test_checkers_catch_what_they_should(tmp_path: Path):
    f = tmp_path / "m.py"
    f.write_text("import os\nimport torch.nn\nfrom numpy import array\nfrom . import sibling\n"
                 "def lazy():\n    from server.config import ServerConfig\n"
                 "    import runtime.neuron_plan\n    import runtime.model\n")
    assert non_stdlib_imports(f) == ["torch.nn", "numpy", "server.config", "runtime.neuron_plan",
                                     "runtime.model"]
    assert first_party_violations("engine", f) == ["server.config"]
    assert first_party_violations("planning", f) == ["server.config", "runtime.model"]
