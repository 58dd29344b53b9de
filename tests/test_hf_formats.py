"""Saved systems in Hugging Face's own formats (issue 21): a decoder's folder loads with plain transformers or peft,
with its config and tokenizer; the crossattn system's is a VisionEncoderDecoderModel folder with its image processor
and tokenizer. prefixcap still loads them, refuses them damaged, and loads what it saved before."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel, PeftModelForCausalLM
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import (AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer, VisionEncoderDecoderModel,
                          ViTConfig, ViTModel)  # fmt: skip

import prefixcap
from prefixcap import compose
from prefixcap.data import ShapesOptions
from prefixcap.data.shapes import ShapesSource
from prefixcap.decoders import SmolLMOptions
from prefixcap.decoders.causal_lm import CausalLMDecoder
from prefixcap.errors import SavedSystemError
from prefixcap.systems.crossattn import CrossAttnSystem
from prefixcap.weights import module_state, save_tensors

from conftest import fit_batch

PREFIX = {
    "encoder": {"name": "siglip", "checkpoint": "tiny"},
    "connector": {"name": "mlp", "hidden": 32, "dropout": 0.0},
    "decoder": {"name": "smollm", "checkpoint": "tiny", "lora": {"r": 4, "dropout": 0.0}},
}
CROSSATTN = {"system": {"name": "crossattn", "encoder": "tiny", "decoder": "tiny"}}
COLOURS = [Image.new("RGB", (40, 40), c) for c in ("red", "navy", "white")]
CAPTIONS = ["a red square", "a dark blue square", "a white square"]
IDS = torch.tensor([[2, 17, 5, 40, 8, 1, 120]])  # any ids of the tiny tokenizer's 615


def shapes_images() -> list[Image.Image]:
    """Shapes scenes at 64 px (resized to the tiny ViT's 32), one non-square, one grey: what resizing differs on."""
    scenes = [ShapesSource(ShapesOptions()).example("test", i).image for i in range(3)]
    return [scenes[0], scenes[1].resize((48, 40)), scenes[2].convert("L")]


def trained(recipe: dict, directory: Path, steps: int = 3, images=COLOURS, lr: float = 1e-2, **parts):
    torch.manual_seed(0)
    system = compose(recipe, **parts)
    fit_batch(system, images, CAPTIONS, steps, lr)
    system.save(directory)
    return system


def logits(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def listed(final: Path, slot: str) -> list[str]:
    return json.loads((final / "manifest.json").read_text())["files"][slot]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny Llama with the tiny tokenizer, saved as the hub holds SmolLM: a recipe's local base checkpoint."""
    directory = tmp_path_factory.mktemp("base")
    CausalLMDecoder.write_tiny_checkpoint(directory, SmolLMOptions())
    return directory


# --- decoders ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source,finetune", [("tiny", "full"), ("tiny", "frozen"), ("local", "full")])
def test_a_whole_decoder_loads_with_plain_transformers(tmp_path, base, source, finetune):
    decoder = {"name": "smollm", "checkpoint": "tiny" if source == "tiny" else str(base), "finetune": finetune}
    system = trained(PREFIX, tmp_path / "final", decoder=decoder)
    folder = tmp_path / "final" / "decoder"
    assert listed(tmp_path / "final", "decoder") == sorted(p.name for p in folder.iterdir())
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]  # transformers' own names, every one
    assert torch.equal(logits(model.eval()), logits(system.decoder.model))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer(CAPTIONS).input_ids == system.decoder.tokenizer(CAPTIONS).input_ids
    torch.manual_seed(1)  # another random init underneath: the decoder must come from the folder
    loaded = prefixcap.load(tmp_path / "final")
    assert loaded.caption(COLOURS, max_new_tokens=8) == system.caption(COLOURS, max_new_tokens=8)
    assert all(torch.equal(a, b) for a, b in zip(loaded.decoder.state_dict().values(),
                                                 system.decoder.state_dict().values()))  # fmt: skip


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # peft on transformers 5
def test_a_lora_adapter_names_the_recipes_base_and_loads_on_it_with_peft(tmp_path, base):
    system = trained(PREFIX, tmp_path / "final", decoder={"name": "causal-lm", "checkpoint": str(base),
                                                          "lora": {"r": 4, "dropout": 0.0}})  # fmt: skip
    folder = tmp_path / "final" / "decoder"
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config["task_type"]) == (str(base), "CAUSAL_LM")
    assert not (folder / "model.safetensors").exists()  # the base is the recipe's checkpoint, not saved again
    ours = logits(system.decoder.model)
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder).eval()
    assert isinstance(plain, PeftModelForCausalLM) and torch.equal(logits(plain), ours)
    with plain.disable_adapter():  # the adapter is what makes them equal
        assert not torch.allclose(logits(plain), ours)
    # transformers alone finds the base through base_model_name_or_path and puts the adapter on it
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(folder).eval()), ours)
    assert AutoTokenizer.from_pretrained(folder)(CAPTIONS).input_ids == system.decoder.tokenizer(CAPTIONS).input_ids


def test_a_random_base_is_saved_whole_beside_its_adapter(tmp_path):
    system = trained(PREFIX, tmp_path / "final")
    folder = tmp_path / "final" / "decoder"
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] is None
    assert {"config.json", "model.safetensors", "adapter_model.safetensors"} <= set(listed(tmp_path / "final",
                                                                                          "decoder"))  # fmt: skip
    ours = logits(system.decoder.model)
    # transformers loads the folder's own base (it holds a config.json), then the adapter beside it
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(folder).eval()), ours)
    with system.decoder.model.disable_adapter():
        assert not torch.allclose(logits(system.decoder.model), ours)


def test_an_adapter_names_a_hub_base_by_its_id_and_a_gguf_by_the_model_it_quantises():
    system = compose(PREFIX, decoder={"name": "smollm", "lora": {"r": 4}}, weights="none")
    assert system.decoder.base_checkpoint == "HuggingFaceTB/SmolLM-135M"
    plugin = pytest.importorskip("prefixcap_smollm2.model")
    from prefixcap_smollm2 import SmolLM2Options

    with torch.device("meta"):  # its own config, no GGUF read: only the name is at stake here
        packaged = plugin.SmolLM2Decoder(SmolLM2Options(), pretrained=False)
        other = plugin.SmolLM2Decoder(SmolLM2Options(checkpoint="/models/smollm2-q8.gguf"), pretrained=False)
    assert packaged.base_checkpoint == "HuggingFaceTB/SmolLM2-135M-Instruct"  # not its local conversion
    assert other.base_checkpoint == "/models/smollm2-q8.gguf"  # what the recipe names


# --- the crossattn system ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vit_gpt2(tmp_path_factory) -> dict:
    """A crossattn recipe on local checkpoints of different widths (a ViT of 48, a GPT-2 of 64, so the pair has its
    projection), saved as the hub holds them."""
    root = tmp_path_factory.mktemp("hub")
    torch.manual_seed(0)
    decoder = CrossAttnSystem.write_tiny_checkpoint(root)["decoder"]
    ViTModel(ViTConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96, image_size=32,
                       patch_size=8)).save_pretrained(root / "vit")  # fmt: skip
    return {"system": {"name": "crossattn", "encoder": str(root / "vit"), "decoder": decoder}}


@pytest.mark.parametrize("source", ["tiny", "local"])
def test_a_crossattn_system_is_a_vision_encoder_decoder_folder(tmp_path, vit_gpt2, source):
    images = shapes_images()
    system = trained(CROSSATTN if source == "tiny" else vit_gpt2, tmp_path / "final", steps=60, images=images,
                     lr=3e-3)  # fmt: skip
    folder = tmp_path / "final" / "decoder"
    assert listed(tmp_path / "final", "decoder") == sorted(p.name for p in folder.iterdir())
    assert "encoder" not in json.loads((tmp_path / "final" / "manifest.json").read_text())["files"]
    model, info = VisionEncoderDecoderModel.from_pretrained(folder, output_loading_info=True)
    assert not info["unexpected_keys"] and all(".pooler." in key for key in info["missing_keys"])  # never read
    processor, tokenizer = AutoImageProcessor.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    pixels = processor(images=images, return_tensors="pt").pixel_values
    # transformers resizes 8-bit pixels, prefixcap floats (bicubic, antialiased): about one level in 255
    assert float((pixels - system.encoder.preprocess(images)).abs().max()) < 0.02
    assert model.generation_config.max_new_tokens == system.generate_config.max_new_tokens  # not transformers' 20
    ids = model.eval().generate(pixel_values=pixels)  # the recipe's generation settings (greedy) are the folder's
    captions = [text.strip() for text in tokenizer.batch_decode(ids, skip_special_tokens=True)]
    assert captions == system.caption(images) and all(captions)
    torch.manual_seed(1)
    assert prefixcap.load(tmp_path / "final").caption(images) == captions


def test_a_damaged_crossattn_folder_is_refused_naming_the_file_and_tensor(tmp_path):
    trained(CROSSATTN, tmp_path / "final")
    weights = tmp_path / "final" / "decoder" / "model.safetensors"
    state = load_file(weights)
    legacy = "encoder.encoder.layer.1.output.dense.weight"  # ViT under the hub's older names, as transformers saves it
    assert legacy in state
    save_file({k: v for k, v in state.items() if k != legacy}, weights, metadata={"format": "pt"})
    with pytest.raises(SavedSystemError, match="missing") as error:
        prefixcap.load(tmp_path / "final")
    assert str(weights) in str(error.value) and legacy in str(error.value)
    state[legacy] = state[legacy].clone().fill_(float("nan"))
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(SavedSystemError, match=f"tensor {legacy} is not finite"):
        prefixcap.load(tmp_path / "final")


# --- folders saved before issue 21 ------------------------------------------------------------------------------------


def as_saved_before(system, final: Path) -> None:
    """Rewrite ``final`` as prefixcap wrote it before issue 21: every part's tensors under its own names (model.model.*
    for a decoder), LoRA as a peft adapter beside them, no config or tokenizer."""
    manifest = json.loads((final / "manifest.json").read_text())
    for slot, part in (("encoder", system.encoder), ("decoder", system.decoder)):
        shutil.rmtree(final / slot, ignore_errors=True)
        manifest["files"].pop(slot, None)
        if slot == "decoder" and getattr(system.decoder, "lora_targets", None):
            system.decoder.model.save_pretrained(final / slot, save_embedding_layers=False)
        if part.random_init:  # every system here is built on tiny (random) models, saved whole
            save_tensors(module_state(part, everything=True), final / slot / "model.safetensors")
        if (final / slot).is_dir():
            manifest["files"][slot] = sorted(p.name for p in (final / slot).iterdir())
    (final / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("recipe,decoder", [(PREFIX, None), (PREFIX, {"name": "smollm", "checkpoint": "tiny",
                                                                     "finetune": "full"}),
                                            (CROSSATTN, None)], ids=["lora", "full", "crossattn"])  # fmt: skip
def test_systems_saved_before_issue_21_still_load(tmp_path, recipe, decoder):
    system = trained(recipe, tmp_path / "final", **({"decoder": decoder} if decoder else {}))
    as_saved_before(system, tmp_path / "final")
    assert not (tmp_path / "final" / "decoder" / "config.json").exists()
    torch.manual_seed(1)
    loaded = prefixcap.load(tmp_path / "final")
    assert loaded.caption(COLOURS, max_new_tokens=8) == system.caption(COLOURS, max_new_tokens=8)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), system.state_dict().values()))
