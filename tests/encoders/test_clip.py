"""The clip encoder: open_clip's ViT image tower, every patch token, loaded from checkpoints in open_clip's formats."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image
from safetensors.torch import load_file, save_file

import prefixcap
from prefixcap import CompositionError, compose, validate
from prefixcap.encoders.clip import ClipEncoder, load_open_clip, load_open_clip_tokenizer

IMAGES = [Image.new("RGB", (50, 40), "red"), np.zeros((20, 30, 3), np.uint8), torch.rand(3, 64, 48)]
REST = {"connector": "linear", "decoder": {"name": "smollm", "checkpoint": "tiny"}}
REAL_SIZE = {"encoder": {"name": "clip"}, "connector": "linear", "decoder": {"name": "smollm"}}


def assert_same_weights(encoder: ClipEncoder, saved: dict[str, torch.Tensor]) -> None:
    ours = encoder.model.state_dict()
    assert ours and all(torch.equal(tensor, saved[f"visual.{name}"]) for name, tensor in ours.items())


def test_tiny_checkpoint_loads_through_registry_and_recipe(tmp_path):
    torch.manual_seed(0)
    options = ClipEncoder.write_tiny_checkpoint(tmp_path)
    assert options == {"checkpoint": str(tmp_path)}
    saved = load_file(tmp_path / "open_clip_model.safetensors")  # open_clip's hub layout, config beside it

    encoder = prefixcap.create("encoder", "clip", options, pretrained=True)
    assert isinstance(encoder, ClipEncoder)
    assert_same_weights(encoder, saved)
    assert (encoder.num_tokens, encoder.dim) == (16, 64)
    assert encoder(torch.randn(2, 3, 32, 32)).shape == (2, 16, 64)

    system = compose({"encoder": {"name": "clip", **options}, **REST})
    assert_same_weights(system.encoder, saved)
    assert system.num_prefix_tokens == 16
    assert system.prefix(torch.zeros(1, 3, 32, 32)).shape == (1, 16, system.decoder.hidden_size)


def test_tokens_are_the_last_blocks_patch_tokens():
    clip = load_open_clip("ViT-B-32", "tiny", pretrained=True).eval()
    encoder = prefixcap.create("encoder", "clip", {"checkpoint": "tiny"}, pretrained=True)
    encoder.model.load_state_dict(clip.visual.state_dict(), strict=False)  # the projection is pruned from ours
    pixels = torch.randn(2, 3, 32, 32)
    clip.visual.output_tokens = True
    _, tokens = clip.visual(pixels)  # open_clip's own forward: (pooled, patch tokens after ln_post)
    assert torch.allclose(encoder(pixels), tokens, atol=1e-5)


def test_weights_file_for_a_named_model(tmp_path):
    """checkpoint: a local weights file, for the architecture ``model`` names (open_clip's pretrained=<path>)."""
    clip = open_clip.create_model("ViT-S-32-alt")  # the smallest built-in ViT config
    save_file(clip.state_dict(), str(tmp_path / "weights.safetensors"))
    encoder = prefixcap.create("encoder", "clip", {"model": "ViT-S-32-alt",
                                                   "checkpoint": str(tmp_path / "weights.safetensors")})  # fmt: skip
    assert_same_weights(encoder, clip.state_dict())
    assert (encoder.num_tokens, encoder.dim) == (49, 384)


def test_preprocess_takes_pil_arrays_and_tensors():
    encoder = prefixcap.create("encoder", "clip", {"checkpoint": "tiny"}, pretrained=True)
    pixels = encoder.preprocess(IMAGES)
    assert pixels.shape == (3, 3, 32, 32) and pixels.dtype == torch.float32 and torch.isfinite(pixels).all()
    assert encoder(pixels).shape == (3, encoder.num_tokens, encoder.dim)


def test_preprocess_replays_open_clips_transform_for_the_default_checkpoint():
    with torch.device("meta"):  # the tag's preprocessing, without its weights
        encoder = prefixcap.create("encoder", "clip", {}, pretrained=False)
    cfg = open_clip.get_model_preprocess_cfg(encoder.model)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((400, 300))
    theirs = image_transform_v2(PreprocessCfg(**cfg), is_train=False)(image)
    # Not bit-exact (PIL's and torch's bicubic differ slightly); a wrong size, crop or normalisation is off by > 0.1.
    assert (encoder.preprocess([image])[0] - theirs).abs().mean() < 0.03


def test_frozen_by_default_and_unfreeze_last_trains_the_last_block():
    frozen = prefixcap.create("encoder", "clip", {"checkpoint": "tiny"}, pretrained=True)
    assert not any(p.requires_grad for p in frozen.parameters()) and frozen.param_groups() == []
    assert not frozen.train().training  # stays in eval mode while the system trains

    encoder = prefixcap.create("encoder", "clip", {"checkpoint": "tiny", "unfreeze_last": 1, "unfreeze_lr": 1e-5})
    trainable = {n for n, p in encoder.named_parameters() if p.requires_grad}
    last = {f"model.transformer.resblocks.1.{n}" for n, _ in encoder.model.transformer.resblocks[1].named_parameters()}
    assert trainable == last | {"model.ln_post.weight", "model.ln_post.bias"}  # and the norm every token goes through
    (group,) = encoder.param_groups()
    assert group.lr == 1e-5 and {id(p) for p in group.params} == {id(p) for n, p in encoder.named_parameters()
                                                                   if n in trainable}  # fmt: skip
    assert encoder.train().training
    with pytest.raises(CompositionError, match="unfreeze_last=3 but the encoder has 2 blocks"):
        compose({"encoder": {"name": "clip", "checkpoint": "tiny", "unfreeze_last": 3}, **REST})


def test_validate_real_size_default_offline():
    """ViT-B-32 at 224: 7x7 patches of width 768; built on the meta device, so no weights exist to download."""
    report = validate(REAL_SIZE)
    assert report.prefix_tokens == 49
    (part,) = [c for c in report.components if c.slot == "encoder"]
    assert part.checkpoint == "openai" and part.trainable == 0
    system = compose(REAL_SIZE, pretrained=False)
    encoder = system.encoder
    assert (encoder.num_tokens, encoder.dim) == (49, 768)
    assert all(p.is_meta for p in encoder.parameters())
    # OpenAI's weights need QuickGELU, which the plain ViT-B-32 config lacks: taken from the tag.
    assert isinstance(encoder.model.transformer.resblocks[0].mlp.gelu, open_clip.model.QuickGELU)


def test_bad_names_are_clear_errors():
    with pytest.raises(CompositionError, match="'no-such-tag' is not a pretrained tag of 'ViT-B-32'"):
        validate({**REAL_SIZE, "encoder": {"name": "clip", "checkpoint": "no-such-tag"}})
    with pytest.raises(CompositionError, match="unknown open_clip model 'ViT-B-33'; did you mean"):
        validate({**REAL_SIZE, "encoder": {"name": "clip", "model": "ViT-B-33"}})
    # A real tag, offline: open_clip tries to download it, and the failure names the checkpoint.
    tag = "commonpool_s_s13m_b4k"
    with pytest.raises(CompositionError, match=f"cannot load open_clip 'ViT-B-32' from checkpoint '{tag}'"):
        compose({"encoder": {"name": "clip", "checkpoint": tag}, **REST})


def test_tokenizer_fits_the_text_tower(tmp_path):
    """What the clip-align loss uses: open_clip's bundled BPE tokenizer, and the text tower of the same CLIP."""
    for checkpoint in ("tiny", ClipEncoder.write_tiny_checkpoint(tmp_path)["checkpoint"]):
        clip = load_open_clip("ViT-B-32", checkpoint, pretrained=True)
        tokens = load_open_clip_tokenizer("ViT-B-32", checkpoint)(["a red circle", "two blue squares"])
        assert tokens.shape == (2, 77)
        assert clip.encode_text(tokens).shape == (2, 32)
    with torch.device("meta"):
        assert isinstance(load_open_clip("ViT-B-32", "openai", pretrained=False), open_clip.CLIP)
    assert load_open_clip_tokenizer("ViT-B-32", "openai")(["a cat"]).shape == (1, 77)
