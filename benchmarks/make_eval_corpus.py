"""Write the more-itertools docstring corpus used by ``benchmarks/data/more_itertools``.

One markdown file per public, documented function or class of the package (the names in the
``__all__`` of ``more.py`` and ``recipes.py``): ``docs/<name>.md`` holds a title line, the
signature and the docstring. The source is parsed with ``ast``; the package is never imported.
Aliases (``padnone = pad_none``) and copied docstrings (``f.__doc__ = g.__doc__``) are
followed. Existing ``docs/*.md`` files are removed first, so a rerun gives exactly the corpus.

    python3 -m pip download --no-deps more-itertools==10.8.0 -d /tmp/mi
    python benchmarks/make_eval_corpus.py /tmp/mi/more_itertools-10.8.0-py3-none-any.whl
"""

from __future__ import annotations

import argparse
import ast
import copy
import inspect
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = "more_itertools"
MODULES = ("more.py", "recipes.py")
DEFAULT_OUT = Path(__file__).resolve().parent / "data" / "more_itertools"
Def = ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef


@dataclass
class Source:
    """The files of one more-itertools release, read from a wheel or an unpacked copy."""

    modules: dict[str, str]  # module file name -> source text
    version: str
    license_text: str
    origin: str


@dataclass
class Module:
    """What one module defines at top level (also inside top-level ``if``/``try`` blocks)."""

    exported: list[str] = field(default_factory=list)
    defs: dict[str, list[Def]] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)  # name = other
    doc_copies: dict[str, str] = field(default_factory=dict)  # name.__doc__ = other.__doc__


def read_wheel(path: Path) -> Source:
    """The modules, version and license text inside a wheel file."""
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        modules = {m: zf.read(f"{PACKAGE}/{m}").decode("utf-8") for m in MODULES}
        init = zf.read(f"{PACKAGE}/__init__.py").decode("utf-8")
        licenses = sorted(n for n in names if ".dist-info/" in n and n.endswith("LICENSE"))
        license_text = zf.read(licenses[0]).decode("utf-8") if licenses else ""
    return Source(modules, _version(init), license_text, path.name)


def read_dir(path: Path) -> Source:
    """Like ``read_wheel`` for an unpacked wheel: its root or its ``more_itertools`` folder."""
    pkg = path / PACKAGE if (path / PACKAGE).is_dir() else path
    modules = {m: (pkg / m).read_text(encoding="utf-8") for m in MODULES}
    init = (pkg / "__init__.py").read_text(encoding="utf-8")
    licenses = sorted(pkg.parent.glob("more_itertools-*.dist-info/**/LICENSE"))
    license_text = licenses[0].read_text(encoding="utf-8") if licenses else ""
    return Source(modules, _version(init), license_text, str(path))


def _version(init_source: str) -> str:
    """``__version__`` of the package's ``__init__.py``."""
    for node in ast.parse(init_source).body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)
                and node.targets[0].id == "__version__"):
            return str(ast.literal_eval(node.value))
    raise ValueError("no __version__ in __init__.py")


def _top_level(body: list[ast.stmt]) -> list[ast.stmt]:
    """Statements of a module body, with those of top-level ``if`` and ``try`` blocks inlined."""
    out: list[ast.stmt] = []
    for node in body:
        if isinstance(node, ast.If):
            out += _top_level(node.body) + _top_level(node.orelse)
        elif isinstance(node, ast.Try):
            out += _top_level(node.body)
            for handler in node.handlers:
                out += _top_level(handler.body)
            out += _top_level(node.orelse) + _top_level(node.finalbody)
        else:
            out.append(node)
    return out


def scan(source: str) -> Module:
    """The exports, definitions, aliases and docstring copies of one module's source."""
    mod = Module()
    for node in _top_level(ast.parse(source).body):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            mod.defs.setdefault(node.name, []).append(node)
        elif isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
            if isinstance(target, ast.Name) and target.id == "__all__":
                mod.exported = [str(x) for x in ast.literal_eval(value)]
            elif isinstance(target, ast.Name) and isinstance(value, ast.Name):
                mod.aliases[target.id] = value.id
            elif (isinstance(target, ast.Attribute) and target.attr == "__doc__"
                  and isinstance(target.value, ast.Name) and isinstance(value, ast.Attribute)
                  and value.attr == "__doc__" and isinstance(value.value, ast.Name)):
                mod.doc_copies[target.value.id] = value.value.id
    return mod


def signature(name: str, node: Def) -> str:
    """``name(args)`` for a function; ``class name(args of __init__ or __new__)`` for a class."""
    if not isinstance(node, ast.ClassDef):
        return f"{name}({ast.unparse(node.args)})"
    for item in node.body:
        if isinstance(item, ast.FunctionDef) and item.name in ("__init__", "__new__"):
            args = copy.copy(item.args)
            positional = args.posonlyargs + args.args
            if positional:  # drop self / cls
                if args.posonlyargs:
                    args.posonlyargs = args.posonlyargs[1:]
                else:
                    args.args = args.args[1:]
            return f"class {name}({ast.unparse(args)})"
    return f"class {name}"


def _docstring(node: Def) -> str | None:
    """The node's docstring, ``inspect.cleandoc``-ed, or None when it has none."""
    doc = ast.get_docstring(node, clean=False)
    return inspect.cleandoc(doc) if doc and doc.strip() else None


def documents(modules: dict[str, str]) -> dict[str, str]:
    """Markdown text per public documented name, in ``__all__`` order."""
    scanned = [scan(text) for text in modules.values()]
    defs: dict[str, list[Def]] = {}
    aliases: dict[str, str] = {}
    doc_copies: dict[str, str] = {}
    exported: list[str] = []
    for mod in scanned:
        for name, nodes in mod.defs.items():
            defs.setdefault(name, []).extend(nodes)
        aliases.update(mod.aliases)
        doc_copies.update(mod.doc_copies)
        exported += [n for n in mod.exported if n not in exported]

    out: dict[str, str] = {}
    for name in exported:
        if name.startswith("_"):
            continue
        own = defs.get(name, [])
        # Where the docstring may live: the name's own defs, a def whose __doc__ it copies,
        # the def it is an alias of.
        candidates = own + defs.get(doc_copies.get(name, ""), []) + defs.get(
            aliases.get(name, ""), [])
        doc = next((d for d in map(_docstring, candidates) if d), None)
        if doc is None or not candidates:
            continue
        sig = signature(name, own[0] if own else candidates[0])
        out[name] = f"# {PACKAGE}.{name}\n\n{sig}\n\n{doc}\n"
    return out


def source_note(src: Source, count: int) -> str:
    """The text of SOURCE.md: package, version, license and the regeneration command."""
    return f"""# Source of the more_itertools corpus

- Package: more-itertools (https://pypi.org/project/more-itertools/), version {src.version},
  wheel `more_itertools-{src.version}-py3-none-any.whl` from PyPI.
- License: MIT (the license text from the wheel's metadata is below).
- Content: `docs/` holds {count} markdown files, one per public documented function or class
  (the `__all__` names of `more.py` and `recipes.py`): a title line, the signature, and the
  docstring as written by the package's authors (`inspect.cleandoc`). Undocumented names are
  skipped.
- `questions.jsonl` is not generated; it was written by hand from these files.

Regenerate `docs/` and this file:

```
python3 -m pip download --no-deps more-itertools=={src.version} -d /tmp/mi
python benchmarks/make_eval_corpus.py /tmp/mi/more_itertools-{src.version}-py3-none-any.whl
```

## more-itertools license

```
{src.license_text.strip()}
```
"""


def write_corpus(src: Source, out: Path) -> int:
    """Replace ``out/docs/*.md`` with the corpus of ``src`` and write ``out/SOURCE.md``."""
    if not src.license_text:
        raise ValueError(f"{src.origin}: no LICENSE file in the wheel's metadata")
    docs = documents(src.modules)
    docs_dir = out / "docs"
    docs_dir.mkdir(parents=True, exist_ok=True)
    for stale in docs_dir.glob("*.md"):
        stale.unlink()
    for name, text in docs.items():
        (docs_dir / f"{name}.md").write_text(text, encoding="utf-8")
    (out / "SOURCE.md").write_text(source_note(src, len(docs)), encoding="utf-8")
    return len(docs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("package", type=Path,
                   help="more-itertools wheel (.whl) or unpacked wheel (root or package folder)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help=f"output folder (default: {DEFAULT_OUT})")
    args = p.parse_args(argv)
    src = read_wheel(args.package) if args.package.is_file() else read_dir(args.package)
    n = write_corpus(src, args.out)
    print(f"more-itertools {src.version}: wrote {n} documents to {args.out / 'docs'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
