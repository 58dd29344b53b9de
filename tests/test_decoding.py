"""prefixcap.decoding.greedy writes transformers' greedy ids token for token, and the captions a run scores with it
are the ones generate gives (issue 8: the fast path changes speed, never output)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from prefixcap import compose, create
from prefixcap.decoding import greedy
from prefixcap.config import GenerateConfig
from prefixcap.data.loader import index_split
from prefixcap.training import evaluate

from conftest import fit_batch

IMAGES = [Image.new("RGB", (40, 40), c) for c in ("red", "navy", "white", "green")]
# Captions of different lengths, so that rows end (EOS, then padding) at different steps of one batch.
CAPTIONS = ["a red square", "a navy circle on the left", "white", "a green triangle above a red square"]


def fitted(finetune: str):
    torch.manual_seed(0)
    lora = {"lora": {"r": 4, "dropout": 0.0}} if finetune == "lora" else {}
    system = compose({"encoder": {"name": "siglip", "checkpoint": "tiny"},
                      "connector": {"name": "mlp", "hidden": 32, "dropout": 0.0},
                      "decoder": {"name": "smollm", "checkpoint": "tiny", "finetune": finetune, **lora}})  # fmt: skip
    fit_batch(system, IMAGES, CAPTIONS, 40, lr=3e-3)
    return system


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_greedy_ids_equal_generate_for_every_row_and_cache(finetune):
    system = fitted(finetune)
    with torch.inference_mode():
        pixels = torch.stack(list(system.encoder.preprocess(IMAGES)))
        inputs = system.generation_inputs(pixels)
    mask = torch.ones(inputs.shape[:2], dtype=torch.long)
    tokenizer = system.decoder.tokenizer
    for new_tokens in (1, 12):
        expected = system.decoder.generate(inputs, mask, GenerateConfig(max_new_tokens=new_tokens, fast=False))
        if new_tokens == 12:
            ends = [row.tolist().index(tokenizer.eos_token_id) if tokenizer.eos_token_id in row else None
                    for row in expected]  # fmt: skip
            assert len(set(ends)) > 1 and any(e is not None for e in ends), ends  # rows end at different steps
        for cache in ("dynamic", "static"):
            for rows in (slice(None), slice(0, 1)):  # the batch, and one image alone
                ids = greedy(system.decoder.model, inputs[rows], max_new_tokens=new_tokens,
                             eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, cache=cache)  # fmt: skip
                reference = expected[rows]
                if rows == slice(0, 1):  # alone, a row stops at its own EOS rather than the batch's last one
                    reference = system.decoder.generate(inputs[rows], mask[rows],
                                                        GenerateConfig(max_new_tokens=new_tokens, fast=False))
                assert torch.equal(ids, reference), (cache, rows)


def test_the_fast_path_is_on_by_default_and_changes_no_caption_or_metric(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFIXCAP_CACHE", str(tmp_path / "cache"))
    assert GenerateConfig().fast
    system = fitted("lora").eval()
    pixels = torch.stack(list(system.encoder.preprocess(IMAGES)))
    fast = system.generate(pixels, GenerateConfig(max_new_tokens=12))
    slow = system.generate(pixels, GenerateConfig(max_new_tokens=12, fast=False))
    assert fast == slow and any(fast)
    # a run's evaluation (exact-scene accuracy, CIDEr, ... on the shapes world) is the same number either way
    quickstart = compose("quickstart")
    source = create("dataset", "shapes", {"test_size": 16})
    split = index_split(source, "test")
    recipe = quickstart.recipe
    on, _ = evaluate(quickstart, source, split, recipe)
    off, _ = evaluate(quickstart, source, split, recipe.model_copy(
        update={"generate": recipe.generate.model_copy(update={"fast": False})}))
    assert on == off


def fitted_crossattn():
    torch.manual_seed(0)
    system = compose({"system": {"name": "crossattn", "encoder": "tiny", "decoder": "tiny"}})
    fit_batch(system, IMAGES, CAPTIONS, 40, lr=3e-3)
    return system


@pytest.mark.parametrize("make", [lambda: fitted("full"), fitted_crossattn], ids=["prefix", "crossattn"])
def test_fast_and_compiled_decoding_write_generates_captions_in_both_systems(make):
    """The fast loop (the cross-attention system's too, reading the image's keys and values from the cache) and its
    compiled form on a static cache write transformers' generate's captions, rows ending at different steps."""
    system = make().eval()
    pixels = torch.stack(list(system.encoder.preprocess(IMAGES)))
    reference = system.generate(pixels, GenerateConfig(max_new_tokens=12, fast=False))
    assert reference == CAPTIONS  # learnt, so the rows really end at different steps
    assert system.generate(pixels, GenerateConfig(max_new_tokens=12)) == reference
    compiled = GenerateConfig(max_new_tokens=12, compile=True)
    assert system.generate(pixels, compiled) == reference
    assert system.generate(pixels[:1], compiled) == reference[:1]  # another batch size: compiled again, same words


def test_a_compiled_step_needs_the_static_cache():
    """Compiled, greedy takes the static cache unless told otherwise; told a growing one, it refuses."""
    system = fitted("full")
    with pytest.raises(ValueError, match="static"):
        greedy(system.decoder.model, torch.zeros(1, 2, 128), max_new_tokens=2, eos_id=None, pad_id=0, compile=True,
               cache="dynamic")
