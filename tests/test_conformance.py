"""The conformance kit (prefixcap.testing) run on prefixcap's own encoders, connectors and decoders, and, in
separate pytest processes enabled with `-p prefixcap.testing`, on throwaway third-party distributions installed for
real: an innocent one (an encoder and a connector) that passes while another distribution registers the same name,
and one of components broken on purpose, each caught by the kit with a message that says what to fix."""

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
# transformers causal LM with a DynamicCache (Llama, Qwen2, Phi). `causal-lm` has no class of its own and no tiny
# form until a recipe names its architecture (tiny.model_type; tests/decoders/test_tiny_architectures.py). Losses
# and systems, which the kit does not cover, are checked by tests/test_components.py.
SYSTEMS = [("siglip", "linear", "smollm"), ("clip", "mlp", "qwen2"), ("vit", "qformer-lite", "phi")]
CONNECTOR_OPTIONS = {
    "linear": {"pool": "pixel-shuffle", "factor": 2},  # token reduction on: the prefix length differs from 16
    "mlp": {"hidden": 32, "pool": "avg", "factor": 2, "dropout": 0.0},
    "qformer-lite": {"queries": 4, "width": 32, "heads": 2, "layers": 1},
}  # fmt: skip
# One layer: the decoder graph is most of the export; grouped-query attention, so that its cache layout is exported too.
KIT_TINY = {"decoder": {"tiny": {"num_hidden_layers": 1, "num_key_value_heads": 2}}}


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
    covered by smollm's tests and, in GPT-NeoX form, by tests/decoders/test_tiny_architectures.py)."""
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
        from prefixcap.decoders import CausalLMOptions
        from prefixcap.encoders import SiglipOptions


        class ShapesSiglipOptions(SiglipOptions):
            checkpoint: str = "prefixcap/shapes-siglip"  # weights that ship with prefixcap (a Need of kind bundled)


        class HubOnlyOptions(CausalLMOptions):
            checkpoint: str = "prefixcap-tests/hub-only-lm"  # a hub model no cache here holds

            def tiny_config(self):
                return {"model_type": "llama"}


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
            register("shapes-siglip", factory="prefixcap.encoders.siglip:SiglipEncoder", options=ShapesSiglipOptions,
                     description="The SigLIP prefixcap bundles, trained on the shapes world")


        @hookimpl
        def register_decoders(register):
            register("hub-only-lm", factory="prefixcap.decoders.causal_lm:CausalLMDecoder", options=HubOnlyOptions,
                     description="A Llama whose weights and config are on the hub only")


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


# Installed beside the innocent plugin: it registers the same encoder name, and one of its plugin modules cannot be
# imported. Neither may change the innocent plugin's result.
KIT_CLASH_DIST = "prefixcap-kitclash"
KIT_CLASH_FILES = {
    "pyproject.toml": plugin_pyproject(KIT_CLASH_DIST, "0.1.0", "pcap_kitclash",
                                       {"kit": "pcap_kitclash", "broken": "pcap_kitclash.broken"}),  # fmt: skip
    "pcap_kitclash/__init__.py": """
        from prefixcap import hookimpl


        @hookimpl
        def register_encoders(register):
            register("patch-conv", factory="pcap_kitclash.model:Another", description="Another patch-conv")
    """,
    "pcap_kitclash/broken.py": """
        raise ImportError("this plugin module needs libfoo, which is not installed")
    """,
}

# Components broken on purpose, each in a way the kit's first seven tests (registration, tiny build, shapes, a
# training step, save/load, ONNX) all pass. The distribution requires the innocent one, whose patch-conv and
# token-mixer it builds on: the kit loads a required plugin distribution with the one under test.
KIT_BROKEN_DIST = "prefixcap-kitbroken"
KIT_BROKEN_FILES = {
    "pyproject.toml": plugin_pyproject(KIT_BROKEN_DIST, "0.1.0", "pcap_kitbroken", {"kit": "pcap_kitbroken"},
                                       dependencies=("prefixcap", KIT_PLUGIN_DIST)),  # fmt: skip
    "pcap_kitbroken/__init__.py": """
        from pcap_kitplugin import PatchConvOptions
        from prefixcap import hookimpl
        from prefixcap.decoders import CausalLMOptions, SmolLMOptions


        class PhiLikeOptions(CausalLMOptions):
            checkpoint: str = "microsoft/phi-1_5"


        @hookimpl
        def register_encoders(register):
            register("blind-patch-conv", factory="pcap_kitbroken.model:BlindPatchConv", options=PatchConvOptions,
                     description="patch-conv that never looks at its image")
            register("meta-shy-patch-conv", factory="pcap_kitbroken.model:MetaShyPatchConv",
                     options=PatchConvOptions, description="patch-conv that cannot be built on the meta device")


        @hookimpl
        def register_decoders(register):
            for name, factory in (("checkpoint-shy", "CheckpointShy"), ("prefix-blind", "PrefixBlind"),
                                  ("prefix-detached", "PrefixDetached"), ("no-grad-lm", "NoGradLM")):
                register(name, factory=f"pcap_kitbroken.model:{factory}", options=SmolLMOptions,
                         description=f"SmolLM, broken: {name}")
            register("silent-llama", factory="pcap_kitbroken.model:SilentLlama", options=PhiLikeOptions,
                     description="Phi-1.5, whose tiny form is a Llama")
    """,
    "pcap_kitbroken/model.py": """
        from pathlib import Path

        import torch
        from safetensors.torch import load_file

        from pcap_kitplugin.model import PatchConv
        from prefixcap.decoders import SmolLMOptions
        from prefixcap.decoders.causal_lm import CausalLMDecoder


        class BlindPatchConv(PatchConv):
            def forward(self, pixel_values):
                return super().forward(pixel_values * 0)  # the bug: a leftover of a shape experiment


        class MetaShyPatchConv(PatchConv):
            def __init__(self, options, *, pretrained=True):
                super().__init__(options, pretrained=pretrained)
                self.gain = float(self.conv.weight.abs().mean())  # the bug: reads a value, which meta tensors have not


        class CheckpointShy(CausalLMDecoder):
            def __init__(self, options, *, pretrained=True):
                if pretrained and options.checkpoint != "tiny":  # the bug: only ever tried on `checkpoint: tiny`
                    load_file(Path(options.checkpoint) / "weights.safetensors")  # transformers writes model.safetensors
                super().__init__(options, pretrained=pretrained)


        class SilentLlama(CausalLMDecoder):
            def __init__(self, options, *, pretrained=True):
                if options.checkpoint == "tiny":  # the bug: the tiny form is smollm's, whatever the real model is
                    options = SmolLMOptions(**options.model_dump(exclude={"checkpoint"}), checkpoint="tiny")
                super().__init__(options, pretrained=pretrained)


        class PrefixBlind(CausalLMDecoder):
            def forward(self, inputs_embeds, attention_mask, num_logits=None, return_hidden=False):
                if num_logits:  # the bug: "only the last positions need logits", so only they are run
                    inputs_embeds, attention_mask = inputs_embeds[:, -num_logits:], attention_mask[:, -num_logits:]
                return super().forward(inputs_embeds, attention_mask, num_logits, return_hidden)


        class PrefixDetached(CausalLMDecoder):
            def forward(self, inputs_embeds, *args, **kwargs):
                return super().forward(inputs_embeds.detach(), *args, **kwargs)  # the bug: LoRA still trains


        class NoGradLM(CausalLMDecoder):
            def forward(self, *args, **kwargs):
                with torch.no_grad():  # the bug: copied from the generation path
                    return super().forward(*args, **kwargs)
    """,
}
KIT_BROKEN_TESTS = """
from prefixcap.testing import ComponentConformance

LORA = {"lora": {"r": 4, "dropout": 0.0}}


class TestBlindPatchConv(ComponentConformance):
    kind, name, options = "encoder", "blind-patch-conv", {"dim": 48}
    partner_connector = {"name": "token-mixer", "tokens": 3}  # from prefixcap-kitplugin, which kitbroken requires


class TestMetaShyPatchConv(ComponentConformance):
    kind, name = "encoder", "meta-shy-patch-conv"


class TestCheckpointShy(ComponentConformance):
    kind, name, options = "decoder", "checkpoint-shy", {"checkpoint": "tiny", **LORA}


class TestSilentLlama(ComponentConformance):
    kind, name, options = "decoder", "silent-llama", {"checkpoint": "tiny", **LORA}


class TestPrefixBlind(ComponentConformance):
    kind, name, options = "decoder", "prefix-blind", {"checkpoint": "tiny", **LORA}


class TestPrefixDetached(ComponentConformance):
    kind, name, options = "decoder", "prefix-detached", {"checkpoint": "tiny", **LORA}


class TestNoGradLM(ComponentConformance):
    kind, name, options = "decoder", "no-grad-lm", {"checkpoint": "tiny", **LORA}


class TestAmbiguousPatchConv(ComponentConformance):
    kind, name = "encoder", "patch-conv"  # registered by prefixcap-kitplugin and prefixcap-kitclash


class TestShapesSiglip(ComponentConformance):
    kind, name = "encoder", "shapes-siglip"  # its real form: the weights prefixcap bundles


class TestShapesSiglipOptOut(TestShapesSiglip):
    skip_real_weights = "too big for the CI machine (say)"


class TestHubOnlyLM(ComponentConformance):
    kind, name, options = "decoder", "hub-only-lm", {"checkpoint": "tiny", **LORA}
"""


@pytest.fixture(scope="module")
def kit_plugin_site(tmp_path_factory):
    """One site holding the innocent plugin, a distribution that clashes with it, and the broken one."""
    site = tmp_path_factory.mktemp("kit-site")
    for files in (KIT_PLUGIN_FILES, KIT_CLASH_FILES, KIT_BROKEN_FILES):
        install_distribution(files, tmp_path_factory.mktemp("kit-src"), site)
    return site


def run_kit(pytester, site: Path, monkeypatch, *args: str, timeout: int) -> pytest.RunResult:
    """pytest with the kit in a fresh process, every plugin of ``site`` and of this environment installed and none
    chosen (PREFIXCAP_LOAD_PLUGINS unset): the kit itself loads only what each class tests."""
    monkeypatch.setenv("PYTHONPATH", str(site))
    monkeypatch.delenv("PREFIXCAP_LOAD_PLUGINS")
    monkeypatch.setenv("COLUMNS", "300")  # summary lines are cut to the terminal's width
    return pytester.runpytest_subprocess("-p", "prefixcap.testing", *args, timeout=timeout)


def test_third_party_encoder_and_connector_pass_the_kit_enabled_with_dash_p(pytester, kit_plugin_site, monkeypatch):
    """The innocent plugin passes although prefixcap-kitclash, installed and loaded beside it, registers its
    patch-conv too and has a plugin module that does not import: the kit loads only the distribution under test."""
    pytester.makepyfile(test_kitplugin=KIT_TESTS)
    # -m: only what the plugin marked as the kit's runs, so an unmarked kit would run nothing and fail below.
    result = run_kit(pytester, kit_plugin_site, monkeypatch, "-m", "prefixcap_conformance", "-rfs", timeout=400)
    result.stdout.fnmatch_lines([
        f"prefixcap * conformance kit; third-party components from: *{KIT_PLUGIN_DIST} 0.2.0*",
        f"prefixcap broken plugin {KIT_CLASH_DIST}:*",
        "E  *AssertionError: loaded tensors differ from the saved system's: ['encoder.conv.weight', *",
        "FAILED test_kitplugin.py::TestForgetfulPatchConv::test_save_load_round_trip - *",
        "SKIPPED *encoder 'patch-conv' has no checkpoint on disk to load: pcap_kitplugin.model:PatchConv has no "
        "write_tiny_checkpoint(directory, options); its default options read nothing*",
        "SKIPPED *connector 'token-mixer' has no checkpoint option, so no tiny form*",
        "SKIPPED *TestTokenMixer does not claim that a prefix system with connector 'token-mixer' exports to ONNX*",
    ])  # fmt: skip
    # 14 tests a class. None of the three has a checkpoint: no real-checkpoint path and no tiny form to compare
    # (2 skips each), and none is a decoder, which language adapters are for (1 each). patch-conv passes the rest;
    # token-mixer all but the unclaimed export; the forgetful encoder fails exactly the round trip, and skips the
    # unclaimed export.
    result.assert_outcomes(passed=11 + 10 + 9, failed=1, skipped=3 + 4 + 4)

    bare = pytester.runpytest_subprocess("-x", timeout=120)  # the same tests without the plugin
    bare.assert_outcomes(errors=1)
    bare.stdout.fnmatch_lines(["*ComponentConformance needs its pytest plugin: run `pytest -p prefixcap.testing`*"])


def test_the_kit_catches_components_broken_on_purpose(pytester, kit_plugin_site, monkeypatch):
    """Each broken component fails the one kit test that looks for its bug, with a message that says what to fix;
    the blind encoder still passes the shapes test with a partner from the distribution its own requires. A
    component whose default options read weights bundled on this machine is built with them, unless its class opts
    out; that, and what cannot be checked offline, the end of the run reports."""
    pytester.makepyfile(test_kitbroken=KIT_BROKEN_TESTS)
    nodes = [f"test_kitbroken.py::Test{cls}::test_{test}" for cls, test in [
        ("BlindPatchConv", "output_depends_on_its_input"), ("BlindPatchConv", "shapes_with_builtin_partners"),
        ("MetaShyPatchConv", "builds_without_weights_as_validate_does"), ("CheckpointShy", "real_checkpoint_path"),
        ("SilentLlama", "tiny_form_is_the_real_architecture"), ("PrefixBlind", "output_depends_on_its_input"),
        ("PrefixDetached", "output_depends_on_its_input"), ("NoGradLM", "output_depends_on_its_input"),
        ("AmbiguousPatchConv", "builds_from_its_tiny_form"), ("ShapesSiglip", "real_checkpoint_path"),
        ("ShapesSiglipOptOut", "real_checkpoint_path"), ("HubOnlyLM", "builds_without_weights_as_validate_does"),
        ("HubOnlyLM", "tiny_form_is_the_real_architecture"),
    ]]  # fmt: skip
    result = run_kit(pytester, kit_plugin_site, monkeypatch, *nodes, timeout=300)
    result.stdout.fnmatch_lines_random([
        "encoder 'blind-patch-conv' built from {'name': 'blind-patch-conv', 'dim': 48} gives the same tokens for two "
        "different noise images: its forward must compute them from pixel_values*",
        "prefixcap validate builds your component with pretrained=False on the meta device: {'name': "
        "'meta-shy-patch-conv'} raised RuntimeError: *meta*; make pcap_kitbroken.model:MetaShyPatchConv build the "
        "architecture alone when pretrained=False*",
        "decoder 'checkpoint-shy' built with pretrained=True from the tiny checkpoint its write_tiny_checkpoint wrote "
        "({'checkpoint': '*'}) raised *weights.safetensors*: that is how a user's checkpoint loads; fix the "
        "pretrained=True path of pcap_kitbroken.model:CheckpointShy",
        "`checkpoint: tiny` builds a LlamaForCausalLM (model_type 'llama'), but the default checkpoint "
        "'microsoft/phi-1_5' is a PhiForCausalLM (model_type 'phi'): the tiny form must be a small random model of "
        "the same class*tiny_config() returns {'model_type': 'phi'}*",
        "the caption loss of decoder 'prefix-blind' * has no gradient with respect to prefix positions [[]0, 1, 2] "
        "of 4: its forward ignores them (does it cut inputs_embeds or attention_mask down to the last num_logits "
        "positions?*",
        "the caption loss of decoder 'prefix-detached' * has no gradient with respect to the prefix: its forward "
        "detaches inputs_embeds*",
        "decoder 'no-grad-lm' * computes its logits without autograd (under torch.no_grad()*",
        "TestAmbiguousPatchConv: *encoder 'patch-conv'*prefixcap-kit*prefixcap-kit*. Set "
        "distribution = '<the one under test>' on TestAmbiguousPatchConv: the kit then loads only that "
        "distribution (and the prefixcap plugins it requires)",
        "*= prefixcap conformance kit: not checked =*",
        "TestShapesSiglipOptOut: not built with the weights its default options ship (prefixcap/shapes-siglip): too "
        "big for the CI machine (say)",
        "TestHubOnlyLM: not built without weights from its default options {'name': 'hub-only-lm', 'lora': *}: its "
        "config would come from the hub (prefixcap-tests/hub-only-lm (not in the Hugging Face cache))",
        "TestHubOnlyLM: `checkpoint: tiny` not compared with the default checkpoint, whose config is not on this "
        "machine (prefixcap-tests/hub-only-lm *)",
    ])  # fmt: skip
    # The shapes encoder loads both its tiny checkpoint and its bundled weights; opted out, the tiny checkpoint only.
    # The hub-only decoder passes what can be checked offline and says what cannot.
    result.assert_outcomes(passed=4, failed=7, skipped=1, errors=1)
