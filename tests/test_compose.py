from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, LlamaConfig, SiglipConfig, SiglipModel

import prefixcap
from prefixcap import CompositionError, compose, validate
from prefixcap.decoders.tokenizer import tiny_tokenizer, tiny_vocab_size
from prefixcap.interfaces import Batch

TINY = {
    "encoder": {"name": "siglip", "checkpoint": "tiny"},
    "connector": {"name": "mlp", "hidden": 32, "dropout": 0.0},
    "decoder": {"name": "smollm", "checkpoint": "tiny", "lora": {"r": 4}},
}


def make_batch(system, captions: list[str], pad_to: int | None = None) -> Batch:
    tok = system.decoder.tokenizer
    enc = tok([c + tok.eos_token for c in captions], padding="max_length" if pad_to else True,
              max_length=pad_to, return_tensors="pt")  # fmt: skip
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    pixels = torch.randn(len(captions), 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return Batch(pixel_values=pixels, input_ids=enc.input_ids, attention_mask=enc.attention_mask, labels=labels)


def test_compose_from_dicts_builds_a_trainable_prefix_system():
    torch.manual_seed(0)
    system = compose(TINY)
    assert system.num_prefix_tokens == 16
    batch = make_batch(system, ["a red circle", "two blue squares on the left"])
    loss, parts = system.loss(batch)
    assert torch.isfinite(loss) and set(parts) == {"CaptionLoss"}
    loss.backward()
    trained = {n for n, p in system.named_parameters() if p.grad is not None}
    assert trained and all(("connector" in n) or ("lora_" in n) for n in trained)
    assert not any(p.requires_grad for p in system.encoder.parameters())  # frozen by default


def test_padding_is_never_trained_on():
    torch.manual_seed(0)
    system = compose(TINY).eval()
    short = make_batch(system, ["a red circle"], pad_to=24)
    longer_pad = make_batch(system, ["a red circle"], pad_to=40)
    garbage = make_batch(system, ["a red circle"], pad_to=24)
    garbage.input_ids = garbage.input_ids.masked_fill(garbage.attention_mask == 0, 77)  # junk under the mask
    with torch.no_grad():
        values = [float(system.loss(b)[0]) for b in (short, longer_pad, garbage)]
    assert values[0] == pytest.approx(values[1], rel=1e-5) and values[0] == pytest.approx(values[2], rel=1e-5)


def test_caption_is_greedy_and_accepts_pil_arrays_and_tensors():
    torch.manual_seed(0)
    system = compose(TINY).eval()
    images = [Image.new("RGB", (50, 40), "red"), np.zeros((20, 20), np.uint8), torch.rand(3, 64, 48)]
    first = system.caption(images, max_new_tokens=5)
    assert len(first) == 3 and all(isinstance(c, str) for c in first)
    assert system.caption(images, max_new_tokens=5) == first  # greedy: same answer every time


def test_python_api_composes_from_names_specs_and_objects_without_yaml():
    decoder = prefixcap.create("decoder", "smollm", {"checkpoint": "tiny"}, pretrained=True)
    system = compose(encoder={"name": "siglip", "checkpoint": "tiny"}, connector="linear", decoder=decoder)
    assert system.decoder is decoder
    assert system.connector.out_dim == decoder.hidden_size and system.connector.in_dim == system.encoder.dim


def test_compose_checks_dimensions_of_given_objects():
    wrong = prefixcap.create("connector", "linear", {}, in_dim=99, out_dim=64, in_tokens=16)
    with pytest.raises(CompositionError, match="connector takes D=99 but the encoder gives D=64"):
        compose(TINY, connector=wrong)


def test_token_reduction_needs_a_matching_grid():
    system = compose(TINY, connector={"name": "mlp", "pool": "pixel-shuffle", "factor": 2})
    assert system.num_prefix_tokens == 4
    assert system.prefix(torch.zeros(1, 3, 32, 32)).shape == (1, 4, 64)
    with pytest.raises(CompositionError, match="square token grid divisible by 3"):
        compose(TINY, connector={"name": "mlp", "pool": "avg", "factor": 3})


def test_missing_parts_are_clear_errors():
    with pytest.raises(CompositionError, match="the prefix system needs a connector section"):
        compose({k: v for k, v in TINY.items() if k != "connector"})
    with pytest.raises(CompositionError, match="the prefix system needs an encoder section"):
        compose({"decoder": TINY["decoder"]})
    with pytest.raises(CompositionError, match="a connector needs both an encoder and a decoder"):
        compose({"decoder": TINY["decoder"], "connector": "mlp"})


def test_bad_lora_targets_list_the_architectures_layers():
    with pytest.raises(CompositionError) as e:
        validate(TINY, ["decoder.lora.targets=[q_prj]"])
    msg = str(e.value)
    assert msg.startswith("--set decoder.lora.targets: decoder 'smollm': LoRA targets")
    assert "LoRA targets ['q_prj'] are not modules of this llama architecture" in msg
    assert "k_proj, lm_head, o_proj, q_proj" in msg


def test_validate_real_size_recipe_offline_on_meta_device():
    report = validate("siglip-smollm135")
    parts = {c.slot: c for c in report.components}
    # LoRA r=16 on q,k,v,o of 30 layers, hidden 576, 3 of 9 heads for k/v (width 192): r * (in + out) each.
    lora = 30 * 16 * ((576 + 576) + (576 + 192) + (576 + 192) + (576 + 576))
    linear = 768 * 576 + 576
    assert parts["decoder"].trainable == lora
    assert parts["connector"].trainable == parts["connector"].total == linear
    assert parts["encoder"].trainable == 0
    assert report.trainable == lora + linear
    assert report.prefix_tokens == (224 // 16) ** 2
    assert report.lora_targets == ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.mark.parametrize(
    "decoder, targets, lora_per_layer, layers",
    [("qwen2", ["q_proj", "k_proj", "v_proj", "o_proj"], (896 + 896) * 2 + (896 + 128) * 2, 24),
     ("phi", ["q_proj", "k_proj", "v_proj", "dense"], (2048 + 2048) * 4, 24)],
)  # fmt: skip
def test_named_decoders_default_checkpoints_and_lora_targets(decoder, targets, lora_per_layer, layers):
    report = validate({"encoder": "siglip", "connector": "linear", "decoder": {"name": decoder, "lora": {"r": 8}}})
    assert report.lora_targets == targets
    assert {c.slot: c.trainable for c in report.components}["decoder"] == 8 * lora_per_layer * layers


def test_hub_id_without_network_is_a_clear_error(tmp_path):
    # not transformers' last words ("Please do not set use_safetensors=True"): where it looked, and what gets it
    with pytest.raises(CompositionError, match=r"not in the Hugging Face cache \(.*\), and it cannot be downloaded "
                       r"offline \(HF_HUB_OFFLINE is set\): get it with `hf download nobody/no-such-model`"):
        compose(TINY, decoder={"name": "causal-lm", "checkpoint": "nobody/no-such-model"})
    with pytest.raises(CompositionError, match="does not hold a usable checkpoint"):
        compose(TINY, decoder={"name": "causal-lm", "checkpoint": str(tmp_path)})


def test_local_checkpoints_load_through_from_pretrained(tmp_path):
    """The hub-loading code path, on tiny checkpoints of the same classes saved locally."""
    torch.manual_seed(0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)  # fmt: skip
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=300)
    siglip = SiglipModel(SiglipConfig(vision_config=vision, text_config=text))  # saved whole, like google's
    siglip.save_pretrained(tmp_path / "siglip")
    llama = AutoModelForCausalLM.from_config(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                          num_attention_heads=4, vocab_size=tiny_vocab_size()))  # fmt: skip
    llama.save_pretrained(tmp_path / "llm")
    tiny_tokenizer().save_pretrained(tmp_path / "llm")

    system = compose({
        "encoder": {"name": "siglip", "checkpoint": str(tmp_path / "siglip")},
        "connector": "linear",
        "decoder": {"name": "causal-lm", "checkpoint": str(tmp_path / "llm"), "finetune": "frozen"},
    })  # fmt: skip
    assert system.encoder.dim == 32 and system.num_prefix_tokens == 16
    theirs = siglip.vision_model.encoder.layers[1].mlp.fc2.weight
    ours = system.encoder.model.get_submodule("encoder.layers.1.mlp.fc2").weight
    assert torch.equal(ours, theirs)
    assert torch.equal(system.decoder.model.lm_head.weight, llama.lm_head.weight)
    tok = system.decoder.tokenizer
    assert tok.decode(tok("héllo").input_ids, skip_special_tokens=True) == "héllo"


def test_left_and_right_padding_give_the_same_caption_logits():
    torch.manual_seed(0)
    system = compose(TINY).eval()
    batch = make_batch(system, ["a red circle", "two blue squares on the left"])
    prefix = system.prefix(batch.pixel_values)
    text = system.decoder.embed(batch.input_ids)
    k, t = prefix.shape[1], batch.input_ids.shape[1]
    ones = torch.ones(2, k, dtype=torch.long)
    right = system.decoder(torch.cat([prefix, text], 1), torch.cat([ones, batch.attention_mask], 1))
    # the same short caption, padded on the left of the prefix instead of after the caption
    n = int(batch.attention_mask[0].sum())
    pad = t - n
    left_inputs = torch.cat([text[:1, n:], prefix[:1], text[:1, :n]], 1)
    left_mask = torch.cat([torch.zeros(1, pad, dtype=torch.long), torch.ones(1, k + n, dtype=torch.long)], 1)
    left = system.decoder(left_inputs, left_mask)
    assert torch.allclose(left[0, pad:], right[0, : k + n], atol=1e-5)


def test_sampling_is_opt_in():
    torch.manual_seed(0)
    system = compose(TINY).eval()
    images = [Image.new("RGB", (32, 32), "blue")] * 4
    greedy = system.caption(images, max_new_tokens=8)
    assert len(set(greedy)) == 1  # same image, greedy: same caption
    sampled = system.caption(images, max_new_tokens=8, do_sample=True, top_k=50, temperature=2.0)
    assert len(set(sampled)) > 1  # a random model at temperature 2 does not repeat itself


def test_random_weights_build_real_parameters_drawn_from_the_seed():
    assert all(p.is_meta for p in compose(TINY, weights="none").parameters())
    torch.manual_seed(0)
    first = compose(TINY, weights="random")
    torch.manual_seed(0)
    same_seed = compose(TINY, weights="random")
    next_draw = compose(TINY, weights="random")
    params = dict(first.named_parameters())
    assert params and not any(p.is_meta for p in params.values())
    assert all(torch.equal(p, q) for p, q in zip(params.values(), same_seed.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(params.values(), next_draw.parameters()))
    assert all(part.random_init for _, part in first.parts())  # saved whole: random weights cannot be re-fetched
    loss, _ = first.loss(make_batch(first, ["a red circle"]))
    assert torch.isfinite(loss)
