"""House rule: scheduler/ and bucketing/ import only the standard library (and each other)."""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PURE = ("scheduler", "bucketing")


def imported_modules(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def non_stdlib_imports(path: Path) -> list[str]:
    allowed = set(sys.stdlib_module_names) | set(PURE) | {"__future__"}
    return [n for n in imported_modules(path) if n.split(".")[0] not in allowed]


@pytest.mark.parametrize("package", PURE)
def test_pure_packages_import_only_stdlib(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package}/ has no modules"
    bad = {str(f.relative_to(ROOT)): non_stdlib_imports(f) for f in files}
    assert {f: b for f, b in bad.items() if b} == {}


def test_checker_catches_a_third_party_import(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import os\nimport torch.nn\nfrom numpy import array\nfrom . import sibling\n")
    assert non_stdlib_imports(f) == ["torch.nn", "numpy"]
