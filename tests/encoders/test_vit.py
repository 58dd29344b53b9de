"""The vit encoder: a timm Vision Transformer, patch tokens only, loaded from checkpoints in timm's formats."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from timm.data import create_transform, resolve_model_data_config

import prefixcap
from prefixcap import CompositionError, compose, validate
from prefixcap.encoders.vit import VitEncoder

IMAGES = [Image.new("RGB", (50, 40), "red"), np.zeros((20, 30, 3), np.uint8), torch.rand(3, 64, 48)]
REST = {"connector": "linear", "decoder": {"name": "smollm", "checkpoint": "tiny"}}
REAL_SIZE = {"encoder": {"name": "vit"}, "connector": "linear", "decoder": {"name": "smollm"}}


def assert_same_weights(encoder: VitEncoder, saved: dict[str, torch.Tensor]) -> None:
    ours = encoder.model.state_dict()
    assert ours and all(torch.equal(tensor, saved[name]) for name, tensor in ours.items())


def test_tiny_checkpoint_loads_through_registry_and_recipe(tmp_path):
    torch.manual_seed(0)
    options = VitEncoder.write_tiny_checkpoint(tmp_path)
    assert options == {"checkpoint": str(tmp_path)}
    saved = load_file(tmp_path / "model.safetensors")  # timm's hub layout: config.json (with model_args) beside it
    assert "head.weight" in saved  # saved with its classifier, like timm's checkpoints; the encoder drops it

    encoder = prefixcap.create("encoder", "vit", options, pretrained=True)
    assert isinstance(encoder, VitEncoder)
    assert_same_weights(encoder, saved)
    assert (encoder.num_tokens, encoder.dim) == (16, 64)
    assert encoder(torch.randn(2, 3, 32, 32)).shape == (2, 16, 64)

    system = compose({"encoder": {"name": "vit", **options}, **REST})
    assert_same_weights(system.encoder, saved)
    assert system.num_prefix_tokens == 16
    assert system.prefix(torch.zeros(1, 3, 32, 32)).shape == (1, 16, system.decoder.hidden_size)


def test_weights_file_for_a_named_model(tmp_path):
    """checkpoint: a local .safetensors file for the architecture ``model`` names (pretrained_cfg_overlay file)."""
    model = timm.create_model("test_vit")  # timm's own tiny test ViT: 160x160, 16x16 patches, width 64
    path = tmp_path / "model.safetensors"
    save_file(model.state_dict(), str(path))
    encoder = prefixcap.create("encoder", "vit", {"model": "test_vit", "checkpoint": str(path)})
    assert_same_weights(encoder, model.state_dict())
    assert (encoder.num_tokens, encoder.dim) == (100, 64)


def test_class_and_register_tokens_are_dropped():
    # A DINOv2 ViT with 4 register tokens, shrunk: 1 class + 4 registers in front of 16 patch tokens.
    encoder = prefixcap.create("encoder", "vit", {"model": "vit_small_patch14_reg4_dinov2", "checkpoint": "tiny"})
    assert encoder.model.num_prefix_tokens == 5
    pixels = torch.randn(2, 3, 32, 32)
    tokens = encoder(pixels)
    assert tokens.shape == (2, encoder.num_tokens, encoder.dim) == (2, 16, 64)
    assert torch.equal(tokens, encoder.model.forward_features(pixels)[:, 5:])


def test_preprocess_takes_pil_arrays_and_tensors():
    encoder = prefixcap.create("encoder", "vit", {"checkpoint": "tiny"}, pretrained=True)
    pixels = encoder.preprocess(IMAGES)
    assert pixels.shape == (3, 3, 32, 32) and pixels.dtype == torch.float32 and torch.isfinite(pixels).all()
    assert encoder(pixels).shape == (3, encoder.num_tokens, encoder.dim)


def test_preprocess_replays_timms_eval_transform_for_the_default_checkpoint():
    with torch.device("meta"):  # the pretrained config's preprocessing, without its weights
        encoder = prefixcap.create("encoder", "vit", {}, pretrained=False)
    assert encoder.image_processor.crop_pct == 0.9  # resize to 248, keep the central 224
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((400, 300))
    theirs = create_transform(**resolve_model_data_config(encoder.model))(image)
    # Not bit-exact (PIL's and torch's bicubic differ slightly); a wrong size, crop or normalisation is off by > 0.1.
    assert (encoder.preprocess([image])[0] - theirs).abs().mean() < 0.03


def test_frozen_by_default_and_unfreeze_last_trains_the_last_block():
    frozen = prefixcap.create("encoder", "vit", {"checkpoint": "tiny"}, pretrained=True)
    assert not any(p.requires_grad for p in frozen.parameters()) and frozen.param_groups() == []
    assert not frozen.train().training  # stays in eval mode while the system trains

    encoder = prefixcap.create("encoder", "vit", {"checkpoint": "tiny", "unfreeze_last": 1, "unfreeze_lr": 1e-5})
    trainable = {n for n, p in encoder.named_parameters() if p.requires_grad}
    last = {f"model.blocks.1.{n}" for n, _ in encoder.model.blocks[1].named_parameters()}
    assert trainable == last | {"model.norm.weight", "model.norm.bias"}  # and the norm every token goes through
    (group,) = encoder.param_groups()
    assert group.lr == 1e-5 and {id(p) for p in group.params} == {id(p) for n, p in encoder.named_parameters()
                                                                   if n in trainable}  # fmt: skip
    assert encoder.train().training
    with pytest.raises(CompositionError, match="unfreeze_last=3 but the encoder has 2 blocks"):
        compose({"encoder": {"name": "vit", "checkpoint": "tiny", "unfreeze_last": 3}, **REST})


def test_validate_real_size_default_offline():
    """vit_base_patch16_224: 14x14 patches of width 768; built on the meta device, so no weights to download."""
    report = validate(REAL_SIZE)
    assert report.prefix_tokens == 196
    (part,) = [c for c in report.components if c.slot == "encoder"]
    assert part.checkpoint is None and part.trainable == 0
    system = compose(REAL_SIZE, pretrained=False)
    encoder = system.encoder
    assert (encoder.num_tokens, encoder.dim) == (196, 768)
    assert all(p.is_meta for p in encoder.parameters())


def test_bad_names_are_clear_errors(tmp_path):
    with pytest.raises(CompositionError, match="is not 'tiny', an hf-hub: id, or a local directory or weights file"):
        validate({**REAL_SIZE, "encoder": {"name": "vit", "checkpoint": str(tmp_path / "missing.safetensors")}})
    with pytest.raises(CompositionError, match="unknown timm model 'vit_base_patch16_225'; did you mean"):
        validate({**REAL_SIZE, "encoder": {"name": "vit", "model": "vit_base_patch16_225"}})
    # timm's default weights, offline: the download fails, and the error names the model.
    with pytest.raises(CompositionError, match="cannot load timm 'vit_tiny_patch16_224' from checkpoint None"):
        compose({"encoder": {"name": "vit", "model": "vit_tiny_patch16_224"}, **REST})
