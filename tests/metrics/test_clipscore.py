"""CLIPScore / RefCLIPScore: the formulas on hand-computed numbers, then each loader on a tiny random model."""

from __future__ import annotations

import math

import open_clip
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    PreTrainedTokenizerFast,
    SiglipConfig,
    SiglipImageProcessor,
    SiglipModel,
)

from prefixcap.encoders.clip import ClipEncoder
from prefixcap.errors import CompositionError
from prefixcap.metrics.clipscore import (DEFAULT_CHECKPOINT, PROMPT, ClipScorer, choose_clip_model, clip_s,
                                         ref_clip_s)

# RGBA and greyscale on purpose: the scorer converts to RGB, as Hessel's preprocessing does.
IMAGES = [Image.new("RGB", (40, 50), "red"), Image.new("RGBA", (64, 32), (0, 0, 255, 255)), Image.new("L", (32, 32))]
CAPTIONS = ["a red square", "a blue circle", "a square"]
REFERENCES = [["a red square", "a red circle"], ["a blue circle"], ["a blue square", "a red circle", "a circle"]]
WORDS = ["<pad>", "</s>", "<s>", "<unk>", "A", "photo", "depicts", "a", "red", "blue", "square", "circle"]
CONTEXT = 16
TOWERS_TEXT = {"vocab_size": len(WORDS), "max_position_embeddings": CONTEXT, "pad_token_id": 0, "eos_token_id": 1,
               "bos_token_id": 2}  # fmt: skip


def t(*rows: tuple[float, ...]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# --- the formulas ---------------------------------------------------------------------------------------------------


def test_choose_clip_model():
    assert choose_clip_model("auto", "prefixcap/shapes-clip") == "prefixcap/shapes-clip"
    assert choose_clip_model("auto", None) == DEFAULT_CHECKPOINT
    assert choose_clip_model(None, "prefixcap/shapes-clip") is None
    assert choose_clip_model("some/clip", "prefixcap/shapes-clip") == "some/clip"


def test_clip_s_by_hand():
    image = t((1, 0), (3, 0), (1, 0), (0, 2))
    caption = t((1, 1), (2, 2), (-1, 1), (0, 5))
    # cos: 1/sqrt(2), the same unnormalised, -1/sqrt(2) (clipped to 0), 1
    expected = torch.tensor([2.5 / math.sqrt(2), 2.5 / math.sqrt(2), 0.0, 2.5])
    assert torch.allclose(clip_s(image, caption), expected)
    assert torch.allclose(clip_s(image, caption, w=1.0), expected / 2.5)


def test_ref_clip_s_by_hand():
    image = t((1, 0, 0), (1, 0, 0), (1, 0, 0))
    caption = t((1, 1, 0), (-1, 0, 0), (1, 1, 0))
    references = [
        t((0, 1, 0), (1, 1, 1)),  # cos 1/sqrt(2) and sqrt(2/3): the larger counts
        t((1, 0, 0)),  # cos -1 with the caption, which is itself opposite the image: both sides 0
        t((-1, -1, 0), (0, 0, 1)),  # cos -1 and 0: text side 0, so the harmonic mean is 0
    ]
    with_image = 2.5 / math.sqrt(2)
    with_refs = math.sqrt(2 / 3)
    harmonic = 2 * with_image * with_refs / (with_image + with_refs)
    scores = ref_clip_s(image, caption, references)
    assert not torch.isnan(scores).any()
    assert torch.allclose(scores, torch.tensor([harmonic, 0.0, 0.0]))
    # One reference: 2 * (2.5/sqrt(2)) * (1/sqrt(2)) / (2.5/sqrt(2) + 1/sqrt(2)) = 5 / (3.5 * sqrt(2))
    one = ref_clip_s(image[:1], caption[:1], [t((0, 1, 0))])
    assert torch.allclose(one, torch.tensor([5 / (3.5 * math.sqrt(2))]))


def test_ref_clip_s_needs_one_reference_list_per_image():
    with pytest.raises(ValueError):
        ref_clip_s(t((1, 0), (0, 1)), t((1, 0), (0, 1)), [t((1, 0))])


# --- end to end through from_pretrained -----------------------------------------------------------------------------


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Whole words only, EOS appended; EOS is not id 2, which CLIP's text tower would pool by a legacy rule."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def write_tiny_dual_encoder(kind: str, directory) -> tuple[torch.nn.Module, PreTrainedTokenizerFast, object]:
    """A tiny random CLIPModel or SiglipModel saved with its tokenizer and image processor, as hub repos hold them."""
    towers = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    text = {**TOWERS_TEXT, **towers}
    vision = {**towers, "image_size": 32, "patch_size": 8}
    torch.manual_seed(0)
    if kind == "clip":
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
        processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    else:
        model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
        processor = SiglipImageProcessor(size={"height": 32, "width": 32})
    tokenizer = tiny_tokenizer()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    processor.save_pretrained(directory)
    return model.eval(), tokenizer, processor


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_transformers_checkpoint_scores_with_the_models_own_features(kind, tmp_path, monkeypatch):
    model, tokenizer, processor = write_tiny_dual_encoder(kind, tmp_path)
    scorer = ClipScorer.from_pretrained(str(tmp_path))

    # The model's own features, computed here the way its model card does (SigLIP: text padded to max_length; CLIP
    # pools at EOS, so padding to the longest text must give the same).
    padding = {"padding": "max_length", "max_length": CONTEXT} if kind == "siglip" else {"padding": True}
    with torch.no_grad():
        pixels = processor(images=[im.convert("RGB") for im in IMAGES], return_tensors="pt")["pixel_values"]
        image = model.get_image_features(pixel_values=pixels).pooler_output

        def text(texts: list[str]) -> torch.Tensor:
            tokens = tokenizer(texts, **padding, return_tensors="pt")
            return model.get_text_features(**tokens).pooler_output

        captions = text([PROMPT + c for c in CAPTIONS])
        references = [text([PROMPT + r for r in refs]) for refs in REFERENCES]
        unprompted = text(CAPTIONS)

    assert torch.allclose(scorer.image_embeddings(IMAGES, batch_size=2), torch.nn.functional.normalize(image),
                          atol=1e-5)  # fmt: skip
    embeddings = scorer.text_embeddings([PROMPT + c for c in CAPTIONS])
    assert embeddings.shape == (3, image.shape[-1])
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(3))

    seen: list[str] = []
    embed = scorer.text_embeddings
    monkeypatch.setattr(scorer, "text_embeddings", lambda texts, batch_size=64: seen.extend(texts) or embed(texts, 2))
    scores = scorer.score(IMAGES, CAPTIONS, REFERENCES, batch_size=2)

    assert seen == [PROMPT + c for c in CAPTIONS] + [PROMPT + r for refs in REFERENCES for r in refs]
    expected = clip_s(image, captions)
    assert (expected > 0).any() and not torch.allclose(clip_s(image, unprompted), expected)  # the test can tell
    assert torch.allclose(torch.tensor(scores.per_image_clip_s), expected, atol=1e-5)
    expected_ref = ref_clip_s(image, captions, references)
    assert (expected_ref > 0).any()
    assert torch.allclose(torch.tensor(scores.per_image_ref_clip_s), expected_ref, atol=1e-5)
    assert scores.clip_s == pytest.approx(expected.mean().item(), abs=1e-5)
    assert scores.ref_clip_s == pytest.approx(expected_ref.mean().item(), abs=1e-5)

    no_refs = scorer.score(IMAGES, CAPTIONS)
    assert no_refs.ref_clip_s is None and no_refs.per_image_ref_clip_s is None
    assert no_refs.per_image_clip_s == pytest.approx(scores.per_image_clip_s, abs=1e-6)


def test_score_checks_its_inputs(tmp_path):
    write_tiny_dual_encoder("clip", tmp_path)
    scorer = ClipScorer.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="2 images but 3 captions"):
        scorer.score(IMAGES[:2], CAPTIONS)
    with pytest.raises(ValueError, match="reference lists"):
        scorer.score(IMAGES, CAPTIONS, REFERENCES[:2])
    with pytest.raises(ValueError, match="at least one reference"):
        scorer.score(IMAGES, CAPTIONS, [["a"], [], ["a"]])
    with pytest.raises(ValueError, match="no captions"):
        scorer.score([], [])


def test_open_clip_checkpoint_scores_like_open_clip(tmp_path):
    torch.manual_seed(0)
    ClipEncoder.write_tiny_checkpoint(tmp_path)  # open_clip's hub layout: open_clip_config.json + weights
    scorer = ClipScorer.from_pretrained(f"open_clip:{tmp_path}")

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tmp_path}")
    with torch.no_grad():
        image = model.eval().encode_image(torch.stack([preprocess(im) for im in IMAGES]))
        captions = model.encode_text(tokenizer([PROMPT + c for c in CAPTIONS]))
        references = [model.encode_text(tokenizer([PROMPT + r for r in refs])) for refs in REFERENCES]

    scores = scorer.score(IMAGES, CAPTIONS, REFERENCES, batch_size=2)
    expected, expected_ref = clip_s(image, captions), ref_clip_s(image, captions, references)
    assert (expected > 0).any() and (expected_ref > 0).any()
    assert torch.allclose(torch.tensor(scores.per_image_clip_s), expected, atol=1e-5)
    assert torch.allclose(torch.tensor(scores.per_image_ref_clip_s), expected_ref, atol=1e-5)
    # The same directory through open_clip's own schema name.
    again = ClipScorer.from_pretrained(f"open_clip:local-dir:{tmp_path}").score(IMAGES, CAPTIONS)
    assert again.per_image_clip_s == pytest.approx(scores.per_image_clip_s, abs=1e-6)


# --- loading failures -----------------------------------------------------------------------------------------------


def test_missing_or_unusable_directory_is_a_composition_error(tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    with pytest.raises(CompositionError, match="no-such-checkpoint"):
        ClipScorer.from_pretrained(str(missing))
    with pytest.raises(CompositionError, match="does not hold a usable checkpoint") as empty:
        ClipScorer.from_pretrained(str(tmp_path))
    assert str(tmp_path) in str(empty.value)

    text_only = tmp_path / "text-only"
    config = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                            **TOWERS_TEXT)  # fmt: skip
    CLIPTextModel(config).save_pretrained(text_only)
    with pytest.raises(CompositionError, match="CLIPTextModel, not an image-text dual encoder"):
        ClipScorer.from_pretrained(str(text_only))


def test_hub_id_offline_is_a_composition_error():
    with pytest.raises(CompositionError, match=f"{DEFAULT_CHECKPOINT!r}.*offline"):
        ClipScorer.from_pretrained(DEFAULT_CHECKPOINT)


def test_open_clip_names_without_usable_weights(tmp_path, monkeypatch):
    with pytest.raises(CompositionError, match=r"names no weights.*tags: .*openai"):
        ClipScorer.from_pretrained("open_clip:ViT-B-32")
    with pytest.raises(CompositionError, match=r"'no-such-tag' is not a pretrained tag of 'ViT-B-32'.*openai"):
        ClipScorer.from_pretrained("open_clip:ViT-B-32/no-such-tag")
    with pytest.raises(CompositionError, match="unknown open_clip model 'ViT-B-33'"):
        ClipScorer.from_pretrained("open_clip:ViT-B-33/openai")
    # A real tag, offline, with an empty hub cache: the download fails before any model is built.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(CompositionError, match="'ViT-B-32' from checkpoint 'openai'"):
        ClipScorer.from_pretrained("open_clip:ViT-B-32/openai")
