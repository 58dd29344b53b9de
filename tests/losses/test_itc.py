"""itc must really train both sides of the shared space, treat equal captions as equal, and ignore the blank images
training shows for the generative score's baseline."""

from __future__ import annotations

import pytest
import torch

from prefixcap import compose
from prefixcap.interfaces import EmbeddingLoss
from prefixcap.losses.itc import ItcLoss

from conftest import CAPTIONS, IMAGES, TINY

ITC = {"name": "itc", "weight": 1.0, "dim": 16}


def system_with_itc(base=TINY):
    torch.manual_seed(0)
    return compose({**base, "losses": [ITC]})


def test_gradients_reach_the_connector_and_lora_through_both_embeddings():
    system = system_with_itc()
    (loss,) = system.losses
    assert isinstance(loss, ItcLoss) and isinstance(loss, EmbeddingLoss) and system.embedding_loss() is loss
    system.train()
    opt = torch.optim.AdamW([p for g in system.param_groups() for p in g.params], lr=3e-3)
    batch = system.make_batch(IMAGES, CAPTIONS)
    for _ in range(2):  # LoRA's B starts at zero: after one step A gets a gradient too
        opt.zero_grad()
        value, parts = system.loss(batch)
        assert set(parts) == {"ItcLoss"} and torch.isfinite(value)
        value.backward()
        opt.step()
    for name, part in (("connector", system.connector), ("lora", system.decoder), ("itc", loss)):
        grads = [p.grad for n, p in part.named_parameters() if p.requires_grad and (name != "lora" or "lora_" in n)]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads), name


def test_the_loss_falls_and_the_space_matches_images_to_their_captions():
    system = system_with_itc()
    system.train()
    opt = torch.optim.AdamW([p for g in system.param_groups() for p in g.params], lr=1e-2)
    batch = system.make_batch(IMAGES, CAPTIONS)
    first = system.loss(batch)[0].item()
    for _ in range(60):
        opt.zero_grad()
        value, _ = system.loss(batch)
        value.backward()
        opt.step()
    assert value.item() < first / 4, (first, value.item())
    system.eval()
    assert (system.score(IMAGES, CAPTIONS).contrastive.argmax(1) == torch.arange(3).numpy()).all()


def test_rows_with_the_same_caption_are_positives_of_each_other():
    system = system_with_itc()
    (loss,) = system.losses
    batch = system.make_batch(IMAGES[:2] * 2, CAPTIONS[:2] * 2)  # rows 0 and 2, 1 and 3: the same caption
    out = system(batch)
    image = loss.image_embedding(out.prefix)
    text = loss.text_embedding(out.text_states, batch.attention_mask)
    logits = image @ text.T * loss.logit_scale.exp()
    # Each row's target spreads over its two equal captions: half on each.
    targets = torch.tensor([[0.5, 0, 0.5, 0], [0, 0.5, 0, 0.5]] * 2)
    expected = (torch.nn.functional.cross_entropy(logits, targets) + torch.nn.functional.cross_entropy(logits.T, targets)) / 2
    assert loss(out, batch).item() == pytest.approx(expected.item(), rel=1e-5)


def test_blank_rows_take_no_part_and_an_all_blank_batch_costs_nothing():
    system = system_with_itc()
    (loss,) = system.losses
    batch = system.make_batch(IMAGES, CAPTIONS)
    batch.blank = torch.tensor([False, False, True])
    seen = loss(system(batch), batch).item()
    batch.pixel_values = batch.pixel_values.clone()
    batch.pixel_values[2] = torch.randn_like(batch.pixel_values[2])  # the blank row's image changes nothing
    assert loss(system(batch), batch).item() == pytest.approx(seen, rel=1e-6)
    batch.blank = torch.ones(3, dtype=torch.bool)
    value = loss(system(batch), batch)
    value.backward()
    assert value.item() == 0 and loss.image_head.weight.grad is not None  # zero, but still in the graph


def test_the_crossattn_system_learns_itc_at_its_decoders_width():
    system = system_with_itc({"system": {"name": "crossattn", "encoder": "tiny", "decoder": "tiny"}})
    (loss,) = system.losses
    width = system.decoder.hidden_size
    assert loss.image_head.in_features == width and loss.text_head.in_features == width
    batch = system.make_batch(IMAGES, CAPTIONS)
    out = system(batch)
    assert out.prefix.shape[-1] == width and out.text_states.shape[:2] == batch.input_ids.shape
    value, _ = system.loss(batch)
    value.backward()
    # The text side: GPT-2 without the image. Only its cross-attention is caption-ce's alone to train.
    text_side = [p for n, p in system.decoder.model.named_parameters() if "cross" not in n and p.requires_grad]
    assert text_side and all(p.grad is not None and p.grad.abs().sum() > 0 for p in text_side)


def test_a_system_without_text_states_is_refused_when_composed_not_at_its_first_step(monkeypatch):
    """A plugin system that never implemented System.text_states (here the prefix system with the base class's) and a
    recipe asking it for itc: compose says which method is missing, instead of training failing at step one."""
    from prefixcap.errors import CompositionError
    from prefixcap.interfaces import System
    from prefixcap.systems.prefix import PrefixSystem

    monkeypatch.setattr(PrefixSystem, "text_states", System.text_states)
    with pytest.raises(CompositionError, match=r"System\.text_states, which PrefixSystem does not implement"):
        system_with_itc()
    assert compose(TINY).embedding_loss() is None  # without itc it composes, and scores generatively
