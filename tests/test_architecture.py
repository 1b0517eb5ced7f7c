"""The library's layers and what each may import (README "Architecture"), checked on the source.

Imports are read statically (also those inside functions), so a lazy import cannot hide a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "ldke_peft"

#: plain data every layer may use (requests, probes, negatives pool, errors)
DATA = {"errors", "requests"}
#: runs packs (PEFT tuner, routing, family knowledge, storage); knows nothing of fitting them
TUNER = {"tuner", "families"}
#: makes edits: scope, delta fit, router fit, localization, pack-level guards, checks, the orchestrating editor
EDITING = {"editing"}
#: the product around edits and the benchmark; never imported by the layers above
OUTER = {"bench", "testing", "cli", "cli_front", "demo", "hub", "merge", "merge_sources", "distributed_launch", "distributed", "metrics", "plots"}
#: math on tensors or text only: import nothing of the library (``package.module`` inside a layer's package)
LEAVES = {"tuner.projection", "tuner.text_anchors", "editing.router_fit", "editing.augment", "errors"}
#: where each top-level name sits (a subpackage's modules are in its layer)
LAYER_OF = {**{m: "data" for m in DATA}, **{m: "tuner" for m in TUNER}, **{m: "editing" for m in EDITING},
            **{m: "product" for m in OUTER}}


def _imports(path: Path) -> set[str]:
    """Top-level ``ldke_peft`` modules (or subpackages) that ``path`` imports, relative imports resolved."""
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    pkg = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - (node.level - 1)]
                names = base + (node.module.split(".") if node.module else [])
                if node.module is None:
                    out.update(".".join(names + [a.name]) for a in node.names)
                else:
                    out.add(".".join(names))
            elif node.module and node.module.split(".")[0] == "ldke_peft":
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "ldke_peft")
    return {m.split(".")[1] for m in out if m.count(".") >= 1}


def _imports_anything(path: Path) -> bool:
    """Whether ``path`` imports any module of ``ldke_peft`` (a leaf must not)."""
    return bool(_imports(path))


def _module(name: str) -> list[Path]:
    p = PKG / name.replace(".", "/")
    return sorted(p.rglob("*.py")) if p.is_dir() else [p.with_suffix(".py")]


def test_every_library_module_is_in_a_layer():
    top = {p.stem for p in PKG.glob("*.py") if p.stem not in ("__init__", "__main__")} | {
        p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    layers = DATA | TUNER | EDITING | OUTER
    assert top <= layers, sorted(top - layers)


@pytest.mark.parametrize("layer,forbidden", [("data", TUNER | EDITING | OUTER), ("tuner", EDITING | OUTER),
                                             ("editing", OUTER)])
def test_layers_import_only_downwards(layer, forbidden):
    mods = {"data": DATA, "tuner": TUNER, "editing": EDITING}[layer]
    bad = {f"{p.relative_to(PKG)} imports {sorted(_imports(p) & forbidden)}"
           for m in mods for p in _module(m) if _imports(p) & (forbidden - {m})}
    assert not bad, sorted(bad)


def test_leaves_import_nothing_of_the_library():
    bad = [str(p.relative_to(PKG)) for m in LEAVES for p in _module(m) if _imports_anything(p)]
    assert not bad, bad


def test_the_layout_is_the_documented_one():
    """The tuner and the editing code are packages of their own, and nothing else of theirs stays at the top."""
    assert (PKG / "tuner" / "__init__.py").is_file() and (PKG / "editing" / "__init__.py").is_file()
    for m in ("model", "layer", "routing", "config"):
        assert (PKG / "tuner" / f"{m}.py").is_file() and not (PKG / f"{m}.py").exists()
    for m in ("editor", "delta_fit", "scope_fit", "scope", "localization"):
        assert (PKG / "editing" / f"{m}.py").is_file() and not (PKG / f"{m}.py").exists()


def test_the_checker_sees_lazy_imports(tmp_path):
    """The check cannot pass vacuously: an import inside a function is found."""
    fake = PKG / "_architecture_probe.py"
    try:
        fake.write_text("def f():\n    from .bench import run\n    from . import demo\n")
        assert _imports(fake) == {"bench", "demo"}
    finally:
        fake.unlink()


def test_every_module_docstring_names_its_layer():
    """Each module says in its opening docstring which layer it belongs to and what it may import, and that
    claim is the one this file enforces (a module moved to another layer must change its docstring too)."""
    wrong = []
    for p in sorted(PKG.rglob("*.py")):
        rel = p.relative_to(PKG)
        top = rel.parts[0][:-3] if len(rel.parts) == 1 else rel.parts[0]
        if top in ("bench", "testing", "__init__", "__main__"):
            continue
        doc = ast.get_docstring(ast.parse(p.read_text())) or ""
        line = next((ln for ln in doc.splitlines() if ln.startswith("Layer: ")), "")
        layer = LAYER_OF[top]
        dotted = ".".join(rel.with_suffix("").parts)
        leaf = dotted in LEAVES or top in LEAVES
        if not line.startswith(f"Layer: {layer}{', a leaf' if leaf else ' ('}") or (
                leaf and "imports nothing of the library" not in line):
            wrong.append(f"{rel}: {line or 'no Layer: line'}")
    assert not wrong, wrong
