"""clip-align must really train: gradients reach the connector and LoRA, never the frozen CLIP text tower."""

from __future__ import annotations

import pytest
import torch

import prefixcap
from prefixcap import compose
from prefixcap.interfaces import Batch
from prefixcap.losses import ClipAlignOptions
from prefixcap.losses.clip_align import ClipAlignLoss

CLIP = {"name": "clip-align", "checkpoint": "tiny", "model": "ViT-B-32", "weight": 1.0}
TINY = {
    "encoder": {"name": "siglip", "checkpoint": "tiny"},
    "connector": {"name": "mlp", "hidden": 32, "dropout": 0.0},
    "decoder": {"name": "smollm", "checkpoint": "tiny", "lora": {"r": 4}},
    "losses": [CLIP],
}
CAPTIONS = ["a red circle", "two blue squares on the left", "a green triangle above a yellow star", "nothing"]


def make_batch(system, captions: list[str]) -> Batch:
    tok = system.decoder.tokenizer
    enc = tok([c + tok.eos_token for c in captions], padding=True, return_tensors="pt")
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    pixels = torch.randn(len(captions), 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return Batch(pixel_values=pixels, input_ids=enc.input_ids, attention_mask=enc.attention_mask, labels=labels,
                 captions=list(captions))  # fmt: skip


def optimizer(system) -> torch.optim.Optimizer:
    return torch.optim.AdamW([{"params": g.params, "lr": g.lr or 3e-3} for g in system.param_groups()])


@pytest.fixture
def system():
    torch.manual_seed(0)
    return compose(TINY)


def test_gradients_reach_connector_and_lora_but_not_clip(system):
    (loss,) = system.losses
    assert isinstance(loss, ClipAlignLoss) and loss.needs_hidden
    clip = loss._text.model
    clip_before = {n: p.detach().clone() for n, p in clip.named_parameters()}
    opt = optimizer(system)
    batch = make_batch(system, CAPTIONS)
    # LoRA's B starts at zero, so on the very first step only B gets a gradient (A's is B^T times something).
    # One step makes B non-zero; the second backward must then reach both.
    for _ in range(2):
        opt.zero_grad()
        value, parts = system.loss(batch)
        assert set(parts) == {"ClipAlignLoss"} and torch.isfinite(value)
        value.backward()
        opt.step()

    connector = dict(system.connector.named_parameters())
    assert connector and all(p.grad is not None and p.grad.abs().sum() > 0 for p in connector.values())
    lora = {n: p for n, p in system.decoder.named_parameters() if "lora_" in n}
    assert any("lora_A" in n for n in lora) and any("lora_B" in n for n in lora)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.values())
    assert loss.head.weight.grad is not None and loss.head.weight.grad.abs().sum() > 0

    # The text tower: frozen, in no param group, no gradients, unchanged by the optimiser, never trained state.
    assert all(p.grad is None and not p.requires_grad for p in clip.parameters())
    assert all(torch.equal(p, clip_before[n]) for n, p in clip.named_parameters())
    grouped = {id(p) for g in system.param_groups() for p in g.params}
    assert not grouped & {id(p) for p in clip.parameters()}
    assert {n for n in system.state_dict() if n.startswith("losses.")} == {"losses.0.head.weight", "losses.0.head.bias"}
    assert set(loss.trained_state()) == {"head.weight", "head.bias"}
    system.train()
    assert not clip.training


@pytest.mark.parametrize("train_head", [True, False])
def test_loss_decreases_on_a_fixed_batch(system, train_head):
    batch = make_batch(system, CAPTIONS)
    if not train_head:
        # With the head frozen, only the connector and LoRA can lower the loss: they must be what it trains.
        with torch.no_grad():
            system.loss(batch)  # gives the head its shape if compose did not pass the decoder width
        system.losses[0].head.requires_grad_(False)
    opt = optimizer(system)
    values = []
    for _ in range(20):
        opt.zero_grad()
        value, _ = system.loss(batch)
        value.backward()
        opt.step()
        values.append(float(value.detach()))
    assert values[-1] < 0.5 * values[0], values


def test_one_example_and_duplicate_captions(system):
    (loss,) = system.losses
    single = system(make_batch(system, ["a red circle"]))
    value = loss(single, make_batch(system, ["a red circle"]))
    assert 0 <= float(value.detach()) <= 2  # 1 - cosine similarity
    twice = make_batch(system, ["a red circle", "a red circle", "nothing"])
    value = loss(system(twice), twice)
    assert torch.isfinite(value) and value > 0


def test_padding_does_not_change_the_loss(system):
    system.eval()
    (loss,) = system.losses
    batch = make_batch(system, CAPTIONS)
    padded = make_batch(system, CAPTIONS)

    def pad(x: torch.Tensor, value: int) -> torch.Tensor:  # 7 more padding positions on the right
        return torch.cat([x, x.new_full((x.shape[0], 7), value)], 1)

    padded.input_ids, padded.attention_mask = pad(batch.input_ids, 0), pad(batch.attention_mask, 0)
    padded.labels = pad(batch.labels, -100)
    with torch.no_grad():
        assert float(loss(system(batch), batch)) == pytest.approx(float(loss(system(padded), padded)), rel=1e-5)


def test_needs_captions(system):
    batch = make_batch(system, CAPTIONS)
    batch.captions = None
    with pytest.raises(ValueError, match="needs batch.captions"):
        system.loss(batch)


def test_defaults_and_a_head_sized_by_the_decoder_width():
    options = ClipAlignOptions()
    assert (options.model, options.checkpoint, options.weight, options.temperature) == ("ViT-B-32", "openai", 0.1,
                                                                                        0.07)  # fmt: skip
    options = {k: v for k, v in CLIP.items() if k != "name"}
    loss = prefixcap.create("loss", "clip-align", options, hidden_size=64)
    assert isinstance(loss.head, torch.nn.Linear) and loss.head.in_features == 64
    assert sum(p.numel() for p in loss.parameters()) == 65 * loss.head.out_features  # only the head
    with pytest.raises(prefixcap.CompositionError, match="has no decoder"):
        prefixcap.create("loss", "clip-align", options, hidden_size=None)


def test_validate_counts_the_head(tmp_path):
    recipe = {"encoder": {"name": "siglip", "checkpoint": "tiny"}, "connector": "linear",
              "decoder": {"name": "smollm", "checkpoint": "tiny"},
              "losses": [{"name": "caption-ce"}, {"name": "clip-align"}]}  # fmt: skip
    report = prefixcap.validate(recipe)  # ViT-B-32's text tower on the meta device: nothing downloaded
    head = {c.slot: c for c in report.components}["losses.1"]
    assert head.total == head.trainable == 64 * 512 + 512
