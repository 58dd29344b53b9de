"""Tiny forms of decoders beyond Llama: `checkpoint: tiny` builds the architecture the decoder states (GPT-NeoX, Qwen2,
Phi: the real transformers classes, small), LoRA lands on each one's attention projections by one rule, and each
trains, captions and round-trips through save and load. A decoder plugin states its own tiny architecture; a decoder
that states none is an error, never a silent Llama; `prefixcap validate` says which architecture each part is."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM

import prefixcap
from prefixcap.compose import validate
from prefixcap.decoders import CausalLMOptions, TinySizes
from prefixcap.decoders.causal_lm import CausalLMDecoder, attention_linears
from prefixcap.errors import CompositionError
from prefixcap.registry import reload_registry

from conftest import CAPTIONS, IMAGES, fit_batch, install_distribution, plugin_pyproject, run_cli

ENCODER = {"name": "siglip", "checkpoint": "tiny"}
CONNECTOR = {"name": "mlp", "hidden": 32, "dropout": 0.0}
SIZES = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4}
LORA = {"r": 4, "dropout": 0.0}
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
# decoder section, the transformers class it must build, the projections LoRA must adapt
ARCHITECTURES = {
    "gpt_neox": ({"name": "causal-lm", "tiny": {"model_type": "gpt_neox", **SIZES}}, "GPTNeoXForCausalLM",
                 ["query_key_value", "dense"]),
    "qwen2": ({"name": "qwen2", "tiny": {**SIZES, "num_key_value_heads": 2}}, "Qwen2ForCausalLM", QKVO),  # grouped
    "phi": ({"name": "phi", "tiny": SIZES}, "PhiForCausalLM", ["q_proj", "k_proj", "v_proj", "dense"]),
}  # fmt: skip


def tiny_recipe(decoder: dict) -> dict:
    return {"encoder": ENCODER, "connector": CONNECTOR,
            "decoder": {"checkpoint": "tiny", "lora": LORA, **decoder}}  # fmt: skip


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_tiny_decoder_is_its_architecture_trains_captions_and_round_trips(arch, tmp_path):
    decoder, cls, targets = ARCHITECTURES[arch]
    recipe = tiny_recipe(decoder)
    torch.manual_seed(0)
    system = prefixcap.compose(recipe)
    assert system.decoder.architecture == cls and system.decoder.config.model_type == arch
    assert {c.slot: c.architecture for c in validate(recipe).components}["decoder"] == cls  # what validate shows

    # LoRA on exactly the attention projections, and nothing else of the decoder trains
    assert system.decoder.lora_targets == targets
    trainable = [n for n, p in system.decoder.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable} == set(targets)

    # one step: LoRA's B matrices (zero at the start, so the only ones with a gradient) move, the base does not
    before = {n: p.detach().clone() for n, p in system.named_parameters()}
    batch = system.make_batch(IMAGES, CAPTIONS)
    system.train()
    optimizer = torch.optim.AdamW([p for g in system.param_groups() for p in g.params], lr=1e-2)
    loss, _ = system.loss(batch)
    loss.backward()
    optimizer.step()
    after = dict(system.named_parameters())
    lora_b = [n for n in before if n.startswith("decoder.") and ".lora_B." in n]
    assert lora_b and all(not torch.equal(before[n], after[n]) for n in lora_b)
    frozen = [n for n, p in after.items() if not p.requires_grad]
    assert frozen and all(torch.equal(before[n], after[n]) for n in frozen)

    captions = system.caption(IMAGES, max_new_tokens=5)
    assert len(captions) == len(IMAGES) and all(isinstance(c, str) for c in captions)
    assert system.caption(IMAGES, max_new_tokens=5) == captions

    system.save(tmp_path / "saved")
    torch.manual_seed(123)  # another random base underneath: all of it must come from the files
    loaded = prefixcap.load(tmp_path / "saved")
    assert loaded.decoder.architecture == cls
    with torch.no_grad():
        assert torch.equal(system.eval()(batch).logits, loaded(batch).logits)
    assert loaded.caption(IMAGES, max_new_tokens=5) == captions


def test_a_tiny_gpt_neox_prefix_system_exports_and_captions_as_in_pytorch(tmp_path):
    from prefixcap.export import export_system
    from prefixcap.onnx_captioner import OnnxCaptioner

    torch.manual_seed(0)
    system = prefixcap.compose(tiny_recipe(ARCHITECTURES["gpt_neox"][0]))
    fit_batch(system, IMAGES, CAPTIONS, steps=60)  # LoRA far from zero, so merging it into the export matters
    system.save(tmp_path / "saved")
    export_system(tmp_path / "saved", tmp_path / "onnx")
    captions = system.caption(IMAGES, max_new_tokens=8)
    assert len(set(captions)) > 1  # trained enough that the image matters
    assert OnnxCaptioner(tmp_path / "onnx").caption(IMAGES, max_new_tokens=8) == captions


@pytest.mark.parametrize("model_type, targets", [
    ("llama", QKVO), ("qwen2", QKVO), ("phi", ["q_proj", "k_proj", "v_proj", "dense"]),
    ("gpt_neox", ["query_key_value", "dense"]), ("gpt2", ["c_attn", "c_proj"]),
])  # fmt: skip
def test_default_lora_targets_are_the_linear_layers_of_the_attention_modules(model_type, targets):
    config = AutoConfig.for_model(model_type, **SIZES)  # GPT-2 maps hidden_size to n_embd, and so on
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert attention_linears(model) == targets


def test_gpt2_conv1d_layers_get_lora_with_their_transposed_layout():
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # peft warns when it has to guess Conv1D's layout itself
        gpt2 = {"model_type": "gpt2", **{k: v for k, v in SIZES.items() if k != "intermediate_size"}}  # n_inner
        decoder = prefixcap.create("decoder", "causal-lm", {"checkpoint": "tiny", "lora": LORA, "tiny": gpt2})
    assert decoder.architecture == "GPT2LMHeadModel" and decoder.lora_targets == ["c_attn", "c_proj"]
    layer = decoder.model.get_submodule("base_model.model.transformer.h.0.attn.c_attn")
    assert layer.fan_in_fan_out
    out = decoder(decoder.embed(torch.tensor([[5, 6, 7]])), torch.ones(1, 3, dtype=torch.long))
    assert out.shape[:2] == (1, 3) and torch.isfinite(out).all()


def test_lora_targets_still_override_and_name_the_architectures_layers():
    neox = {"checkpoint": "tiny", "lora": {**LORA, "targets": ["dense_h_to_4h"]}, "tiny": {"model_type": "gpt_neox"}}
    assert prefixcap.create("decoder", "causal-lm", neox).lora_targets == ["dense_h_to_4h"]
    with pytest.raises(CompositionError, match=r"LoRA targets \['q_proj'\] are not modules of this gpt_neox "
                                               r"architecture; its linear layers are: .*query_key_value"):
        prefixcap.create("decoder", "causal-lm", {**neox, "lora": {"targets": ["q_proj"]}})


def test_causal_lm_tiny_without_an_architecture_is_an_error_naming_both_fixes():
    with pytest.raises(CompositionError) as e:
        validate(tiny_recipe({"name": "causal-lm"}))  # a dry run said ok and built a Llama, once
    msg = str(e.value)
    assert msg.startswith("decoder 'causal-lm': `checkpoint: tiny` needs an architecture to shrink")
    assert "`tiny: {model_type: llama}`" in msg and "tiny_config() method" in msg
    with pytest.raises(CompositionError, match=r"tiny model_type 'gptneox' is no causal LM architecture "
                                               r"transformers .* knows; did you mean 'gpt_neox'"):
        validate(tiny_recipe({"name": "causal-lm", "tiny": {"model_type": "gptneox"}}))


class UnknownDefault(CausalLMOptions):
    """A plugin's options whose default checkpoint prefixcap ships no config for, and no tiny_config of its own."""

    checkpoint: str = "someone/unknown-lm"


def test_a_default_checkpoint_found_nowhere_is_an_error_and_the_hub_cache_copy_is_used(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # huggingface_hub reads it at each call
    with pytest.raises(CompositionError, match=r"UnknownDefault states none \(its default checkpoint "
                                               r"'someone/unknown-lm' has no config prefixcap ships or the Hugging "
                                               r"Face cache holds\)"):  # fmt: skip
        CausalLMDecoder(UnknownDefault(checkpoint="tiny"), pretrained=False)
    repo = tmp_path / "hub" / "models--someone--unknown-lm"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    real = {"model_type": "gpt_neox", "hidden_size": 512, "num_hidden_layers": 6, "num_attention_heads": 8,
            "intermediate_size": 2048, "rotary_pct": 0.5, "torch_dtype": "float16", "vocab_size": 50304}  # fmt: skip
    (repo / "snapshots" / ("0" * 40) / "config.json").write_text(json.dumps(real))
    decoder = CausalLMDecoder(UnknownDefault(checkpoint="tiny", tiny=SIZES), pretrained=False)
    assert decoder.architecture == "GPTNeoXForCausalLM"
    assert decoder.config.rope_parameters["partial_rotary_factor"] == 0.5  # the cached config's (rotary_pct)
    assert decoder.hidden_size == 32 and next(decoder.parameters()).dtype == torch.float32  # shrunk, in float32


class StatedLlama(CausalLMOptions):
    """A plugin's tiny_config returning a saved checkpoint's config: head_dim and grouping for 576 wide, 9 heads."""

    checkpoint: str = "someone/gguf-llama"

    def tiny_config(self) -> dict:
        return {"model_type": "llama", "hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3,
                "head_dim": 64, "tie_word_embeddings": True}  # fmt: skip


def test_tiny_sizes_reach_an_architecture_only_under_names_it_has():
    assert TinySizes(hidden_size=48, num_attention_heads=3).num_key_value_heads is None  # no grouping asked
    with pytest.raises(ValueError, match="num_attention_heads must be divisible by num_key_value_heads"):
        TinySizes(num_attention_heads=4, num_key_value_heads=3)
    # Unset, num_key_value_heads is the architecture's default (no grouping), not the stated checkpoint's 3; the
    # head width follows the tiny sizes, not the checkpoint's 64; what the sizes do not cover is the checkpoint's.
    config = CausalLMDecoder(StatedLlama(checkpoint="tiny", tiny=SIZES), pretrained=False).config
    assert (config.num_key_value_heads, config.head_dim, config.tie_word_embeddings) == (4, 8, True)
    grouped = StatedLlama(checkpoint="tiny", tiny={**SIZES, "num_key_value_heads": 2})
    assert CausalLMDecoder(grouped, pretrained=False).config.num_key_value_heads == 2
    with pytest.raises(CompositionError, match="the gpt_neox architecture has no num_key_value_heads: leave "
                                               "decoder.tiny.num_key_value_heads out"):  # fmt: skip
        prefixcap.create("decoder", "causal-lm", {"checkpoint": "tiny", "tiny": {"model_type": "gpt_neox",
                                                                                 "num_key_value_heads": 2}})


# A GPT-NeoX decoder as a plugin author writes one: the builtin decoder class, an options subclass with a default
# checkpoint prefixcap ships no config for, and the tiny architecture stated by the options themselves.
NEOX_DIST = "prefixcap-neoxtest"
NEOX_FILES = {
    "pyproject.toml": plugin_pyproject(NEOX_DIST, "0.1.0", "pcap_neoxtest", {"neox": "pcap_neoxtest"},
                                       dependencies=("prefixcap",)),
    "pcap_neoxtest/__init__.py": """
        from prefixcap import hookimpl
        from prefixcap.decoders import CausalLMOptions


        class NeoXOptions(CausalLMOptions):
            checkpoint: str = "EleutherAI/pythia-70m"

            def tiny_config(self) -> dict:
                # Pythia's architecture; transformers' GPTNeoXConfig defaults fill in the rest, the sizes are tiny's.
                return {"model_type": "gpt_neox", "rotary_pct": 0.5, "use_parallel_residual": True}


        @hookimpl
        def register_decoders(register):
            register("neox", factory="prefixcap.decoders.causal_lm:CausalLMDecoder", options=NeoXOptions,
                     description="Pythia (GPT-NeoX), LoRA via peft")
    """,
}


@pytest.fixture(scope="module")
def neox_site(tmp_path_factory):
    return install_distribution(NEOX_FILES, tmp_path_factory.mktemp("neox-src"), tmp_path_factory.mktemp("neox-site"))


def test_a_plugin_states_its_tiny_architecture_and_validate_shows_it(neox_site, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(neox_site))
    monkeypatch.setenv("PREFIXCAP_LOAD_PLUGINS", NEOX_DIST)
    reload_registry()
    decoder = prefixcap.create("decoder", "neox", {"checkpoint": "tiny", "tiny": SIZES, "lora": LORA})
    assert decoder.architecture == "GPTNeoXForCausalLM"
    assert decoder.config.rope_parameters["partial_rotary_factor"] == 0.5  # what the plugin's tiny_config states
    assert decoder.lora_targets == ["query_key_value", "dense"] and decoder.hidden_size == 32

    recipe = tmp_path / "neox.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe({"name": "neox", "tiny": SIZES})))
    env = {"PYTHONPATH": str(neox_site), "PREFIXCAP_LOAD_PLUGINS": NEOX_DIST}
    table = run_cli("validate", str(recipe), env=env)
    assert table.returncode == 0, table.stderr
    header = next(line for line in table.stdout.splitlines() if "section" in line)
    assert [cell.strip() for cell in header.split("┃")[1:-1]] == ["section", "component", "architecture", "checkpoint",
                                                                   "params", "trainable"]  # fmt: skip
    decoder_row = next(line for line in table.stdout.splitlines() if line.startswith("│ decoder"))
    assert [cell.strip() for cell in decoder_row.split("│")[1:5]] == ["decoder", "neox", "GPTNeoXForCausalLM", "tiny"]
    report = json.loads(run_cli("validate", str(recipe), "--json", env=env).stdout)
    assert {c["slot"]: c["architecture"] for c in report["components"]} == {
        "encoder": "SiglipVisionModel", "connector": "MLPConnector", "decoder": "GPTNeoXForCausalLM",
        "losses.0": "CaptionLoss"}  # fmt: skip


def test_a_part_not_made_of_a_transformers_model_is_its_own_class_or_says_what_it_is():
    from prefixcap.interfaces import Component

    class Plain(Component):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(2, 2)

    class Wrapped(Plain):
        def __init__(self):
            super().__init__()
            self.architecture = "timm convnext_atto"  # a model of another library, named by the part itself

    assert (Plain().architecture, Wrapped().architecture) == ("Plain", "timm convnext_atto")
