"""The cross-attention baseline with real transformers classes (ViTModel, GPT2LMHeadModel, SiglipVisionModel,
VisionEncoderDecoderModel): tiny checkpoints written locally with save_pretrained and loaded through the recipe path,
as a user's hub ids would be."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, VisionEncoderDecoderModel,
                          ViTConfig, ViTModel)  # fmt: skip

import prefixcap
from prefixcap import CompositionError, compose
from prefixcap.decoders.tokenizer import tiny_tokenizer, tiny_vocab_size
from prefixcap.encoders.siglip import SiglipEncoder

from conftest import fit_batch

REPO = Path(__file__).resolve().parents[2]
IMAGES = [Image.new("RGB", (40, 30), "red"), Image.new("L", (20, 20), 200), Image.new("RGB", (32, 48), "navy")]
CAPTIONS = ["a red square", "a grey square", "a tall dark blue rectangle"]
TINY = {"system": {"name": "crossattn", "encoder": "tiny", "decoder": "tiny"}}


SAVED: dict[str, dict[str, torch.Tensor]] = {}  # what the hub fixture saved, by model


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> dict:
    """A tiny ViT of width 48 and a tiny GPT-2 of width 64 (so the pair needs its projection) with GPT-2's special
    tokens (one token both starts and ends text; no pad token), saved as the hub holds them; the recipe loading them."""
    root = tmp_path_factory.mktemp("hub")
    torch.manual_seed(0)
    vit = ViTModel(ViTConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96,
                             image_size=32, patch_size=8))  # fmt: skip
    vit.save_pretrained(root / "vit")  # with its pooler, as google's checkpoints have it
    tok = tiny_tokenizer()
    tok.bos_token, tok.pad_token = tok.eos_token, None
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=2, n_positions=64, vocab_size=len(tok),
                                      bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id))  # fmt: skip
    gpt2.save_pretrained(root / "gpt2")
    tok.save_pretrained(root / "gpt2")
    SAVED.update(vit=vit.state_dict(), gpt2=gpt2.state_dict())
    return {"system": {"name": "crossattn", "encoder": str(root / "vit"), "decoder": str(root / "gpt2")}}


def local(hub: dict, **options) -> dict:
    return {"system": {**hub["system"], **options}}


def train_steps(system, steps: int, images=IMAGES, captions=CAPTIONS, lr: float = 1e-2) -> None:
    fit_batch(system, images, captions, steps, lr)


def test_local_checkpoints_load_through_the_recipe_path(hub):
    system = compose(hub)
    assert isinstance(system.hf_model, VisionEncoderDecoderModel)
    assert system.hf_model.encoder is system.encoder.model and system.hf_model.decoder is system.decoder.model

    saved = SAVED["vit"]
    vit = system.encoder.model.state_dict()
    assert set(vit) == {k for k in saved if not k.startswith("pooler.")}  # the unused pooler is dropped
    assert all(torch.equal(vit[k], saved[k]) for k in vit)

    saved = SAVED["gpt2"]
    gpt2 = system.decoder.model.state_dict()
    assert all(torch.equal(gpt2[k], saved[k]) for k in saved)
    new = {k.split(".", 3)[-1].rsplit(".", 1)[0] for k in set(gpt2) - set(saved)}
    assert new == {"crossattention.c_attn", "crossattention.q_attn", "crossattention.c_proj", "ln_cross_attn"}
    assert system.decoder.model.lm_head.weight is system.decoder.model.transformer.wte.weight  # still tied

    # Widths differ (48 -> 64): the pair's projection exists and belongs to the decoder part.
    assert system.decoder.enc_to_dec_proj is system.hf_model.enc_to_dec_proj
    assert system.decoder.enc_to_dec_proj.in_features == 48 and system.decoder.hidden_size == 64
    assert system.encoder.num_tokens == 17 and system.encoder.dim == 48  # 16 patches + the class token
    processor = system.encoder.image_processor
    assert (processor.size, processor.mean, processor.std, processor.resize) == (32, (0.5,) * 3, (0.5,) * 3, "squash")


def test_batch_starts_at_bos_and_masks_padding_by_attention_not_by_id(hub):
    torch.manual_seed(0)
    system = compose(hub).eval()
    tok = system.decoder.tokenizer
    eos = tok.eos_token_id  # GPT-2: BOS, EOS and (lacking a pad token) padding are all this one id
    batch = system.make_batch(IMAGES[:2], ["ab", "abcdef"], max_tokens=4)
    ab, abc = (tok(t, add_special_tokens=False).input_ids for t in ("ab", "abc"))
    assert batch.input_ids.tolist() == [[eos, *ab, eos], [eos, *abc]]
    assert batch.labels.tolist() == [[*ab, eos, -100], [*abc, eos]]  # the real EOS is a target, the padding is not
    assert batch.attention_mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    out = system(batch)
    assert out.logits.shape == (2, 4, len(tok)) and out.labels is batch.labels
    junk = system.make_batch(IMAGES[:2], ["ab", "abcdef"], max_tokens=4)
    junk.input_ids[0, 3] = 77  # what sits under the mask is never trained on
    with torch.no_grad():
        assert float(system.loss(junk)[0]) == pytest.approx(float(system.loss(batch)[0]), rel=1e-6)


def test_one_adamw_step_trains_the_decoder_and_leaves_the_frozen_encoder(hub):
    torch.manual_seed(0)
    system = compose(local(hub, lr=1e-3))
    groups = system.param_groups()
    assert [(g.name, g.lr) for g in groups] == [("decoder", 1e-3)]
    in_groups = {id(p) for g in groups for p in g.params}
    assert in_groups == {id(p) for p in system.parameters() if p.requires_grad} == {
        id(p) for p in system.decoder.parameters()
    }  # fmt: skip
    before = {n: p.detach().clone() for n, p in system.named_parameters()}
    train_steps(system, 1, lr=1e-3)
    moved = {n for n, p in system.named_parameters() if not torch.equal(before[n], p.detach())}
    assert not any(n.startswith("encoder.") for n in moved)
    assert {n for n in before if n.startswith("decoder.")} == moved  # all of it: GPT-2, cross-attention, projection

    unfrozen = compose(local(hub, freeze_encoder=False))
    assert [g.name for g in unfrozen.param_groups()] == ["encoder", "decoder"]
    assert unfrozen.train().encoder.model.training


def test_tiny_system_learns_a_caption_and_generates_it_back():
    # Teacher forcing ([BOS] + caption -> caption + [EOS]) and generation (start at BOS, stop at EOS) must agree,
    # or a memorised caption comes back shifted, truncated or endless.
    torch.manual_seed(0)
    system = compose(TINY)
    assert system.encoder.random_init and system.decoder.random_init
    train_steps(system, 60, IMAGES[:1], ["a red square"], lr=3e-3)
    assert system.caption(IMAGES[:1], max_new_tokens=20) == ["a red square"]
    assert system.caption(IMAGES[:1], max_new_tokens=20, num_beams=3) == ["a red square"]
    torch.manual_seed(1)
    hot = system.caption(IMAGES, max_new_tokens=8, do_sample=True, temperature=5.0, top_p=0.95)
    torch.manual_seed(1)
    assert system.caption(IMAGES, max_new_tokens=8, do_sample=True, temperature=5.0, top_p=0.95) == hot
    assert hot != system.caption(IMAGES, max_new_tokens=8)


@pytest.mark.parametrize("source", ["tiny", "local"])
def test_save_and_load_give_identical_greedy_captions(source, hub, tmp_path):
    torch.manual_seed(0)
    recipe = TINY if source == "tiny" else hub
    system = compose(recipe)
    train_steps(system, 2)
    greedy = system.caption(IMAGES, max_new_tokens=10)
    beams = system.caption(IMAGES, max_new_tokens=10, num_beams=3)
    out = system.save(tmp_path / "final")
    files = json.loads((out / "manifest.json").read_text())["files"]
    # The decoder's folder holds the whole pair as a VisionEncoderDecoderModel (tests/test_hf_formats.py)
    assert "encoder" not in files and {"config.json", "model.safetensors"} <= set(files["decoder"])
    torch.manual_seed(123)  # a different random init underneath: what matters must come from the files
    loaded = prefixcap.load(out)
    assert loaded.caption(IMAGES, max_new_tokens=10) == greedy
    assert loaded.caption(IMAGES, max_new_tokens=10, num_beams=3) == beams
    for (name, a), (_, b) in zip(system.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_hf_model_saves_as_a_plain_transformers_captioner(hub, tmp_path):
    # distilvit shipped VisionEncoderDecoderModel checkpoints: the pair, start/end/pad ids included, is one too.
    torch.manual_seed(0)
    system = compose(hub)
    train_steps(system, 2)
    system.hf_model.save_pretrained(tmp_path / "hf")
    plain = VisionEncoderDecoderModel.from_pretrained(tmp_path / "hf").eval()
    ids = plain.generate(system.encoder.preprocess(IMAGES), max_new_tokens=10)
    texts = [t.strip() for t in system.decoder.tokenizer.batch_decode(ids, skip_special_tokens=True)]
    assert texts == system.caption(IMAGES, max_new_tokens=10)


def vit_params(width: int, layers: int, mlp: int, image: int, patch: int) -> int:
    """ViTModel without its pooler: embeddings (class token, positions, patch conv), blocks, final norm."""
    embeddings = width + ((image // patch) ** 2 + 1) * width + (3 * patch * patch * width + width)
    attention = 4 * (width * width + width)  # query, key, value, output
    block = 2 * (2 * width) + attention + (width * mlp + mlp) + (mlp * width + width)
    return embeddings + layers * block + 2 * width


def gpt2_params(width: int, layers: int, vocab: int, positions: int) -> int:
    """GPT2LMHeadModel, its lm_head tied to the token embeddings."""
    attention = (width * 3 * width + 3 * width) + (width * width + width)  # c_attn (q, k, v), c_proj
    block = 2 * (2 * width) + attention + (width * 4 * width + 4 * width) + (4 * width * width + width)
    return vocab * width + positions * width + layers * block + 2 * width


def cross_attention_params(width: int) -> int:
    """What add_cross_attention adds to a GPT-2 block: keys+values, queries, output projection, and a layer norm."""
    return (width * 2 * width + 2 * width) + (width * width + width) + (width * width + width) + 2 * width


def test_validate_counts_the_real_size_recipe_offline():
    vit = vit_params(768, layers=12, mlp=3072, image=224, patch=16)
    gpt2 = gpt2_params(768, layers=6, vocab=50257, positions=1024)
    assert vit + (768 * 768 + 768) == 86_389_248  # with the pooler: ViT-B/16's published 86.4M
    assert gpt2 == 81_912_576  # distilgpt2's published 82M
    cross = 6 * cross_attention_params(768)

    report = prefixcap.validate(REPO / "recipes" / "crossattn-vit-distilgpt2.yaml")  # HF_HUB_OFFLINE=1 (conftest)
    assert (report.system, report.total, report.trainable) == ("crossattn", vit + gpt2 + cross, gpt2 + cross)

    system = compose(REPO / "recipes" / "crossattn-vit-distilgpt2.yaml", pretrained=False)
    assert {p.device.type for p in system.parameters()} == {"meta"}
    block = system.decoder.model.transformer.h[0]
    added = [*block.crossattention.parameters(), *block.ln_cross_attn.parameters()]
    assert sum(p.numel() for p in added) == cross_attention_params(768)
    assert system.encoder.num_tokens == 197 and system.decoder.tokenizer is None


def test_encoder_or_decoder_sections_are_a_clear_error():
    sections = {"encoder": {"name": "siglip", "checkpoint": "tiny"},
                "decoder": {"name": "smollm", "checkpoint": "tiny"}}  # fmt: skip
    with pytest.raises(CompositionError, match=r"builds its own models: remove the encoder and decoder section"):
        compose({**TINY, **sections})


def test_siglip_encoder_works_and_decoders_without_cross_attention_are_refused(tmp_path):
    SiglipEncoder.write_tiny_checkpoint(tmp_path / "siglip")  # a whole SiglipModel, text tower included
    torch.manual_seed(0)
    system = compose({"system": {"name": "crossattn", "encoder": str(tmp_path / "siglip"), "decoder": "tiny"}})
    assert type(system.encoder.model).__name__ == "SiglipVisionModel"
    assert system.encoder.num_tokens == 16  # patches only: SigLIP has no class token
    # the decoder reads the SigLIP tokens: trained on two images, it tells them apart
    train_steps(system, 60, IMAGES[:2], CAPTIONS[:2], lr=3e-3)
    assert system.caption(IMAGES[:2], max_new_tokens=8) == CAPTIONS[:2]

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=tiny_vocab_size())  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    tiny_tokenizer().save_pretrained(tmp_path / "llama")
    with pytest.raises(CompositionError, match="is a llama model, which has no cross-attention"):
        compose({"system": {"name": "crossattn", "encoder": "tiny", "decoder": str(tmp_path / "llama")}})
    with pytest.raises(CompositionError, match="offline"):
        compose({"system": {"name": "crossattn", "encoder": "tiny", "decoder": "nobody/no-such-model"}})


def test_quickstart_baseline_reads_the_bundled_encoder_through_a_sized_tiny_gpt2():
    # recipes/quickstart-crossattn.yaml, bench's `crossattn` preset: the quickstart's own frozen SigLIP weights
    # (bundled, loaded offline) and a GPT-2 of the size decoder_tiny asks for.
    system = compose(REPO / "recipes" / "quickstart-crossattn.yaml")
    prefix = compose(REPO / "recipes" / "quickstart.yaml")
    ours, theirs = system.encoder.model.state_dict(), prefix.encoder.model.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    config = system.decoder.model.config
    assert (config.n_embd, config.n_inner, config.n_layer, config.n_head) == (128, 256, 2, 4)
    assert not any(p.requires_grad for p in system.encoder.parameters())
