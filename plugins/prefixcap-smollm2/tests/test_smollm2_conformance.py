"""The conformance kit on smollm2-offline, in its real form (the GGUF's SmolLM2-135M-Instruct, converted once to the
prefixcap cache), plus checks that the weights really are the pretrained ones.

Run with `pytest -p prefixcap.testing plugins/prefixcap-smollm2/tests` (the kit is a pytest plugin)."""

from __future__ import annotations

import pytest
import torch

from prefixcap import create
from prefixcap.config import GenerateConfig
from prefixcap.testing import ComponentConformance


class TestSmolLM2Offline(ComponentConformance):
    # The real 135M model: the whole kit takes about a minute on 2 CPU cores, so no shrunken form is needed.
    kind, name, options = "decoder", "smollm2-offline", {"lora": {"r": 4, "dropout": 0.0}}
    distribution = "prefixcap-smollm2"
    exports_onnx = True


def test_pretrained_instruct_model_answers_through_inputs_embeds():
    """Only the real instruction-tuned weights answer this; a random or mis-loaded model does not."""
    decoder = create("decoder", "smollm2-offline", {}, pretrained=True).eval()
    assert (decoder.hidden_size, decoder.lora_targets) == (576, ["q_proj", "k_proj", "v_proj", "o_proj"])
    tok = decoder.tokenizer
    chat = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(chat, return_tensors="pt").input_ids
    with torch.no_grad():
        new = decoder.generate(decoder.embed(ids), torch.ones_like(ids), GenerateConfig(max_new_tokens=8))
    assert "Paris" in tok.decode(new[0])


def test_meta_build_needs_no_weights():
    with torch.device("meta"):
        decoder = create("decoder", "smollm2-offline", {}, pretrained=False)
    assert decoder.tokenizer is None and decoder.config.num_hidden_layers == 30
    assert sum(p.numel() for p in decoder.parameters()) > 130_000_000


def test_the_first_build_seeds_nothing_after_it(tmp_path, monkeypatch):
    """Converting the GGUF (the first build on a machine) leaves torch's generator as it found it, so the first build
    in a process trains as every later one does: a suite on a fresh machine once failed on this alone."""
    from prefixcap_smollm2.model import convert, packaged_gguf

    monkeypatch.setenv("PREFIXCAP_CACHE", str(tmp_path))
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    converted = convert(packaged_gguf())
    assert (converted / "model.safetensors").is_file() and converted.is_relative_to(tmp_path)
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.parametrize("language", ["de", "fr", "ru"])
def test_the_real_bpe_reads_and_writes_each_language_and_pretrained_rows_know_its_words(language):
    """SmolLM2's own BPE, no tiny tokenizer: every reference round-trips, and the tokens an adapter trains are a small
    set of the vocabulary. Its merges are mostly English (1.04 tokens a shapes word): measured 2.12 a German word,
    1.59 a French one and 5.14 a Russian one: a Russian caption is five times as long as its English one."""
    from prefixcap.data import ShapesOptions
    from prefixcap.data.shapes import ShapesSource
    from prefixcap.languages import caption_token_ids

    decoder = create("decoder", "smollm2-offline", {}, pretrained=True)
    tok = decoder.tokenizer
    source = ShapesSource(ShapesOptions(language=language, train_size=300))
    captions = [c for i in range(300) for c in source.example("train", i).captions]
    words = tokens = 0
    for caption in captions:
        ids = tok(caption, add_special_tokens=False).input_ids
        assert tok.decode(ids) == caption
        words, tokens = words + len(caption.split()), tokens + len(ids)
    assert tokens / words < {"de": 2.5, "fr": 2.0, "ru": 6.0}[language], tokens / words
    ids = caption_token_ids(tok, iter(captions))
    assert 30 < len(ids) < 400 and max(ids) < len(tok)
