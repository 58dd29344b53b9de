"""The conformance kit (prefixcap.testing) run on prefixcap's own encoders, connectors and decoders, and, in a
separate pytest process enabled with `-p prefixcap.testing`, on a throwaway third-party distribution that registers
an encoder and a connector through the entry point."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest

# Before the import, so the kit's own asserts are rewritten and explain their failures (with `-p prefixcap.testing`
# pytest imports it first and does this itself).
pytest.register_assert_rewrite("prefixcap.testing")

from prefixcap.testing import ComponentConformance  # noqa: E402

from prefixcap.registry import get_component, list_components  # noqa: E402

from conftest import install_distribution, plugin_pyproject, tiny_checkpoint_options  # noqa: E402

pytest_plugins = ["pytester", "prefixcap.testing"]

# Every builtin encoder, connector and decoder passes the kit here, built the way a user's hub checkpoint is: from a
# tiny checkpoint the component writes in its own library's format (write_tiny_checkpoint), through the recipe path.
# The nine are paired into three systems, one encoder, connector and decoder each, so the kit's ONNX test exports
# three systems rather than nine (it shares an export between classes whose systems save identically) and each
# builtin is checked with other builtins as partners. Every builtin claims ONNX export, and the claim holds:
# export_system exports any prefix system whose encoder and connector trace with torch.export and whose decoder is a
# transformers causal LM with a DynamicCache (Llama, Qwen2, Phi). `causal-lm` has no class of its own: its tiny form
# is smollm's (the Llama fallback architecture). Losses and systems, which the kit does not cover, are checked by
# tests/test_components.py.
SYSTEMS = [("siglip", "linear", "smollm"), ("clip", "mlp", "qwen2"), ("vit", "qformer-lite", "phi")]
CONNECTOR_OPTIONS = {
    "linear": {"pool": "pixel-shuffle", "factor": 2},  # token reduction on: the prefix length differs from 16
    "mlp": {"hidden": 32, "pool": "avg", "factor": 2, "dropout": 0.0},
    "qformer-lite": {"queries": 4, "width": 32, "heads": 2, "layers": 1},
}  # fmt: skip
KIT_TINY = {"decoder": {"tiny": {"num_hidden_layers": 1}}}  # one layer: the decoder graph is most of the export


@functools.cache
def tiny_checkpoint(kind: str, name: str) -> dict[str, Any]:
    """Options that load a builtin from its tiny checkpoint, written once per session (removed at exit)."""
    directory = Path(tempfile.mkdtemp(prefix=f"prefixcap-kit-{kind}-{name}-"))
    atexit.register(shutil.rmtree, directory, True)
    return tiny_checkpoint_options(get_component(kind, name), directory, KIT_TINY.get(kind))


def builtin_spec(kind: str, name: str) -> dict[str, Any]:
    """Recipe section of a builtin in the kit: connectors by their options, encoders and decoders from a tiny
    checkpoint in their library's format."""
    if kind == "connector":
        return {"name": name, **CONNECTOR_OPTIONS[name]}
    lora = {"lora": {"r": 4, "dropout": 0.0}} if kind == "decoder" else {}
    return {"name": name, **tiny_checkpoint(kind, name), **lora}


class BuiltinConformance(ComponentConformance):
    """A builtin in its SYSTEMS triple, its partners the triple's other two builtins."""

    def spec(self) -> dict[str, Any]:
        return builtin_spec(self.kind, self.name)

    def recipe(self) -> dict[str, Any]:
        triple = next(t for t in SYSTEMS if self.name in t)
        slots = {kind: builtin_spec(kind, name) for kind, name in zip(("encoder", "connector", "decoder"), triple)}
        return {"system": "prefix", **slots, "losses": [{"name": "caption-ce"}],
                "generate": {"max_new_tokens": self.max_new_tokens}}  # fmt: skip


class TestSiglip(BuiltinConformance):
    kind, name, options = "encoder", "siglip", {"checkpoint": "tiny"}
    exports_onnx = True


class TestClip(BuiltinConformance):
    kind, name, options = "encoder", "clip", {"checkpoint": "tiny"}
    exports_onnx = True


class TestVit(BuiltinConformance):
    kind, name, options = "encoder", "vit", {"checkpoint": "tiny"}  # crop_pct 0.9: the kit's images are 35x35
    exports_onnx = True


class TestLinear(BuiltinConformance):
    kind, name, options = "connector", "linear", CONNECTOR_OPTIONS["linear"]
    exports_onnx = True


class TestMLP(BuiltinConformance):
    kind, name, options = "connector", "mlp", CONNECTOR_OPTIONS["mlp"]
    exports_onnx = True


class TestQFormerLite(BuiltinConformance):
    kind, name, options = "connector", "qformer-lite", CONNECTOR_OPTIONS["qformer-lite"]
    exports_onnx = True


class TestSmolLM(BuiltinConformance):
    kind, name, options = "decoder", "smollm", {"checkpoint": "tiny"}
    exports_onnx = True


class TestQwen2(BuiltinConformance):
    kind, name, options = "decoder", "qwen2", {"checkpoint": "tiny"}
    exports_onnx = True


class TestPhi(BuiltinConformance):
    kind, name, options = "decoder", "phi", {"checkpoint": "tiny"}
    exports_onnx = True


def test_every_builtin_encoder_connector_and_decoder_has_a_kit_class():
    """A new builtin is not done until it passes the kit (causal-lm is smollm's class without a default checkpoint,
    and is covered by smollm's tests)."""
    classes = {(c.kind, c.name) for c in BuiltinConformance.__subclasses__()}
    builtins = {(r.kind, r.name) for r in list_components() if r.provider.dist == "prefixcap"
                and r.kind in ("encoder", "connector", "decoder")}  # fmt: skip
    assert builtins - {("decoder", "causal-lm")} == classes
    assert {name for triple in SYSTEMS for name in triple} == {name for _, name in classes}


# A second throwaway distribution (the one in conftest.py is a catalogue of broken plugins, not a kit subject): an
# encoder and a connector written from scratch on prefixcap.interfaces, plus an encoder
# with the bug the kit found in prefixcap's own clip and vit encoders, random weights that save() did not keep.
KIT_PLUGIN_DIST = "prefixcap-kitplugin"
KIT_PLUGIN_FILES = {
    "pyproject.toml": plugin_pyproject(KIT_PLUGIN_DIST, "0.2.0", "pcap_kitplugin", {"kit": "pcap_kitplugin"},
                                       dependencies=("prefixcap",)),
    "pcap_kitplugin/__init__.py": """
        from pydantic import Field

        from prefixcap import ComponentOptions, hookimpl


        class PatchConvOptions(ComponentOptions):
            image_size: int = Field(32, ge=8)
            patch: int = Field(8, ge=1)
            dim: int = Field(48, ge=1)


        class TokenMixerOptions(ComponentOptions):
            tokens: int = Field(4, ge=1)


        @hookimpl
        def register_encoders(register):
            register("patch-conv", factory="pcap_kitplugin.model:PatchConv", options=PatchConvOptions,
                     description="One strided convolution over patches, then LayerNorm (random, frozen)")
            register("forgetful-patch-conv", factory="pcap_kitplugin.model:ForgetfulPatchConv",
                     options=PatchConvOptions, description="patch-conv whose random weights save() forgets")


        @hookimpl
        def register_connectors(register):
            register("token-mixer", factory="pcap_kitplugin.model:TokenMixer", options=TokenMixerOptions,
                     description="A linear map across tokens (N -> K), then one to decoder width")
    """,
    "pcap_kitplugin/model.py": """
        from torch import nn

        from prefixcap.images import ImageProcessor
        from prefixcap.interfaces import Connector, Encoder


        class PatchConv(Encoder):
            random_init = True  # no pretrained weights to fetch again: save() keeps them all

            def __init__(self, options, *, pretrained=True):
                super().__init__()
                self.options = options
                self.conv = nn.Conv2d(3, options.dim, options.patch, stride=options.patch)
                self.norm = nn.LayerNorm(options.dim)
                self.requires_grad_(False)

            @property
            def dim(self):
                return self.options.dim

            @property
            def num_tokens(self):
                return (self.options.image_size // self.options.patch) ** 2

            @property
            def image_processor(self):
                return ImageProcessor(self.options.image_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

            def forward(self, pixel_values):
                return self.norm(self.conv(pixel_values).flatten(2).transpose(1, 2))


        class ForgetfulPatchConv(PatchConv):
            random_init = False


        class TokenMixer(Connector):
            def __init__(self, options, *, in_dim, out_dim, in_tokens):
                super().__init__(in_dim, out_dim)
                self.mix = nn.Linear(in_tokens, options.tokens)
                self.proj = nn.Linear(in_dim, out_dim)

            def output_tokens(self, in_tokens):
                return self.mix.out_features

            def forward(self, tokens):
                return self.proj(self.mix(tokens.transpose(1, 2)).transpose(1, 2))
    """,
}
KIT_TESTS = f"""
from prefixcap.testing import ComponentConformance


class TestPatchConv(ComponentConformance):
    kind, name, options = "encoder", "patch-conv", {{"dim": 48}}
    distribution = "{KIT_PLUGIN_DIST}"
    exports_onnx = True


class TestTokenMixer(ComponentConformance):
    kind, name, options = "connector", "token-mixer", {{"tokens": 3}}
    distribution = "{KIT_PLUGIN_DIST}"
    # exports_onnx not claimed (it would hold): the kit's one skip


class TestForgetfulPatchConv(ComponentConformance):
    kind, name = "encoder", "forgetful-patch-conv"
"""


@pytest.fixture(scope="module")
def kit_plugin_site(tmp_path_factory):
    return install_distribution(KIT_PLUGIN_FILES, tmp_path_factory.mktemp("kit-src"),
                                tmp_path_factory.mktemp("kit-site"))  # fmt: skip


def test_third_party_encoder_and_connector_pass_the_kit_enabled_with_dash_p(pytester, kit_plugin_site, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(kit_plugin_site))
    monkeypatch.setenv("PREFIXCAP_LOAD_PLUGINS", KIT_PLUGIN_DIST)
    monkeypatch.setenv("COLUMNS", "300")  # summary lines are cut to the terminal's width
    pytester.makepyfile(test_kitplugin=KIT_TESTS)
    # -m: only what the plugin marked as the kit's runs, so an unmarked kit would run nothing and fail below.
    result = pytester.runpytest_subprocess("-p", "prefixcap.testing", "-m", "prefixcap_conformance", "-rfs",
                                           timeout=400)  # fmt: skip
    result.stdout.fnmatch_lines([
        f"prefixcap * conformance kit; third-party components from: {KIT_PLUGIN_DIST} 0.2.0 *",
        "E  *AssertionError: loaded tensors differ from the saved system's: ['encoder.conv.weight', *",
        "FAILED test_kitplugin.py::TestForgetfulPatchConv::test_save_load_round_trip - *",
        "SKIPPED *TestTokenMixer does not claim that a prefix system with connector 'token-mixer' exports to ONNX*",
    ])  # fmt: skip
    # 7 tests a class: patch-conv passes all, token-mixer all but the unclaimed export, the forgetful encoder
    # fails exactly the round trip.
    result.assert_outcomes(passed=18, failed=1, skipped=2)

    bare = pytester.runpytest_subprocess("-x", timeout=120)  # the same tests without the plugin
    bare.assert_outcomes(errors=1)
    bare.stdout.fnmatch_lines(["*ComponentConformance needs its pytest plugin: run `pytest -p prefixcap.testing`*"])
