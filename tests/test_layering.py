"""The import graph has layers and no arrow points up; components reach only what sits under them.

Every import counts, including those inside functions (a lazy import is still a dependency, only a later one).
docs/ARCHITECTURE.md draws these layers; a new module must be placed in one here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "prefixcap"

# Bottom to top. A module may import its own layer and the layers below it, never one above.
LAYERS: list[tuple[str, list[str]]] = [
    ("base", ["errors", "hookspecs", "config", "yaml_text", "files", "decoding", "metrics", "metrics.captioning",
              "retrieval", "scoring"]),
    ("plumbing", ["registry", "checkpoints", "images", "weights", "data.rows", "card", "hf_config"]),
    # Assembly sits under the contracts: recipe, compose and persist reach components through the registry, by
    # registered name ("module:factory"), never by import; so System.save and System.load can call them.
    # hub resolves hub ids for persist and pushes what persist saved.
    ("assembly", ["recipe", "compose", "persist", "hub"]),
    # score is System.score's engine: interfaces calls it, and it runs a System through Batch, so the two share a layer
    # explain is System.explain's engine, as score is System.score's
    # languages is Decoder's language methods' engine, as explain is System.explain's
    ("contracts", ["interfaces", "onnx_spec", "onnx_parts", "score", "explain", "languages"]),
    ("components", ["encoders*", "connectors*", "decoders*", "losses*", "systems*", "data", "data.shapes",
                    "data.shapes_languages", "data.sources", "metrics.clipscore"]),
    ("data path", ["data.cache", "data.loader"]),
    ("workflows", ["training*", "bench", "bench_report", "caption", "export", "onnx_captioner", "web_demo", "hf",
                   "doctor", "matching", "judge", "score_rows", "onnx_scorer", "pointing", "explain_render"]),
    # "" is prefixcap/__init__.py, the Python API; the conformance kit tests plugins through it, as their users will
    ("surface", ["", "cli", "__main__", "testing"]),
]
# What a leaf component may import besides its own family: nothing above the contracts, and no assembly either.
COMPONENT_MAY_IMPORT = {"base", "plumbing", "contracts"}
# Families that build on another's models: a system names decoders.TinySizes and shares the tiny tokenizer; the
# clip-align loss and CLIPScore load CLIP towers through encoders.clip's open_clip loader.
CROSS_FAMILY = {("systems", "decoders"), ("losses", "encoders"), ("metrics", "encoders")}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    for number, (_, patterns) in enumerate(LAYERS):
        for pattern in patterns:
            if module == pattern or (pattern.endswith("*") and module.split(".")[0] == pattern[:-1]):
                return number
    raise AssertionError(f"prefixcap.{module} is in no layer: place it in tests/test_layering.py LAYERS")


def imports(module: str) -> set[str]:
    """The prefixcap modules ``module`` imports, anywhere in its body."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.startswith("prefixcap"):
            base = node.module.removeprefix("prefixcap").lstrip(".")
            for alias in node.names:  # `from prefixcap.data import shapes` imports the module data.shapes
                sub = f"{base}.{alias.name}".lstrip(".")
                found.add(sub if sub in MODULES else base)
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("prefixcap").lstrip(".") for a in node.names if a.name.startswith("prefixcap")}
    found.discard(module)
    return {m for m in found if m in MODULES}


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_import_points_up(module):
    mine = layer_of(module)
    upward = sorted(m for m in imports(module) if layer_of(m) > mine)
    assert not upward, (f"prefixcap.{module} ({LAYERS[mine][0]}) imports "
                        + ", ".join(f"prefixcap.{m} ({LAYERS[layer_of(m)][0]})" for m in upward))  # fmt: skip


@pytest.mark.parametrize("module", sorted(m for m in MODULES if LAYERS[layer_of(m)][0] == "components"))
def test_components_import_only_what_sits_under_them(module):
    family = module.split(".")[0]
    wrong = []
    for dep in imports(module):
        other = dep.split(".")[0]
        if LAYERS[layer_of(dep)][0] in COMPONENT_MAY_IMPORT or other == family or (family, other) in CROSS_FAMILY:
            continue
        wrong.append(f"prefixcap.{dep} ({LAYERS[layer_of(dep)][0]})")
    assert not wrong, f"prefixcap.{module} is a component and imports {', '.join(sorted(wrong))}"


def test_the_core_names_no_data_set():
    """A data set declares its own headline metric (DatasetSource.headline); the core may not know any by name."""
    core = [m for m in MODULES if m not in ("data", "data.shapes")]  # the world itself, and its registration
    for module in core:
        for node in ast.walk(ast.parse(MODULES[module].read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert node.value != "shapes" and "oracle_accuracy" not in node.value, (
                    f"prefixcap.{module} names a data set or its metric: {node.value[:80]!r}")
