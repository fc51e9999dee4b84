"""Layers import only downward (docs: README "Layout"): checked from every module's imports."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "divprec"

# Lowest first. A module may import its own package and any package of a lower layer. Each
# package's config dataclass lives in it (``divprec.<package>.config``); the config package
# (schema, compose, validation) collects and checks them all, data files included, so it sits
# above them, and everything that composes or validates a run sits above it.
LAYERS = [
    ["parallel"],
    ["loss", "data", "metrics"],
    ["model"],
    ["config"],
    ["checkpoint"],
    ["train"],
    ["eval"],
    ["rl"],
    ["study", "interop"],
    ["pretrain"],
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def _divprec_imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found += [(node.lineno, n) for n in names if n == "divprec" or n.startswith("divprec.")]
    return found


def _package(module: str) -> str:
    return module.split(".")[1]


def _allowed(importer: str, imported: str) -> bool:
    if imported.count(".") < 1:
        return False  # "import divprec" says nothing about the layer
    mine, theirs = _package(importer), _package(imported)
    if mine == theirs:
        return True
    # The schema collects each group's config dataclass, which lives next to what it configures.
    if mine == "config" and imported.endswith(".config"):
        return True
    return LAYER[theirs] < LAYER[mine]


def test_every_package_has_a_layer():
    packages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    packages |= {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    assert packages <= set(LAYER), f"give these a layer in LAYERS: {sorted(packages - set(LAYER))}"


def test_no_module_imports_a_higher_layer():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        for line, imported in _divprec_imports(path):
            if not _allowed(module, imported):
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {imported}")
    assert not upward, "imports that run back up the layers:\n" + "\n".join(upward)


def test_the_check_catches_an_upward_import():
    assert not _allowed("divprec.parallel.deepspeed_engine", "divprec.train.config")
    assert not _allowed("divprec.model.builder", "divprec.checkpoint.layout")
    assert not _allowed("divprec.loss.config", "divprec.data.config")
    assert not _allowed("divprec.data.dataset", "divprec.config.schema")
    assert _allowed("divprec.train.step", "divprec.parallel.deepspeed_engine")
    assert _allowed("divprec.config.schema", "divprec.train.config")
