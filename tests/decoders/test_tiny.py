"""The tiny tokenizer and tiny decoder sizes: what `checkpoint: tiny` decoders are made of."""

import importlib.util
import itertools
import json
import re
from pathlib import Path

import pytest
from prefixcap.compose import compose
from prefixcap.data import ShapesOptions
from prefixcap.data.shapes import LANGUAGES, ShapesSource
from prefixcap.decoders.tokenizer import TOKENIZER_FILE, tiny_tokenizer
from prefixcap.errors import RecipeError

TINY = {"encoder": {"name": "siglip", "checkpoint": "tiny"}, "connector": "linear",
        "decoder": {"name": "smollm", "checkpoint": "tiny"}}  # fmt: skip


@pytest.fixture(scope="module")
def builder():
    script = Path(__file__).resolve().parents[2] / "scripts" / "build_tiny_tokenizer.py"
    spec = importlib.util.spec_from_file_location("build_tiny_tokenizer", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shipped_tokenizer_is_what_the_builder_makes(builder):
    # Trained models depend on these ids: a change to the corpus or the trainer must come with a new file.
    assert json.loads(builder.build_tiny_tokenizer().to_str()) == json.loads(TOKENIZER_FILE.read_text())


def test_other_languages_words_leave_english_as_it_was(builder):
    # Their merges come after the English ones: every English caption keeps its ids, so English models trained before
    # the languages came still read their captions, and only the vocabulary grows.
    english, shipped = builder.english_tokenizer(), tiny_tokenizer()
    assert len(shipped) > english.get_vocab_size()
    for text in itertools.islice(builder.shapes_corpus("en"), 0, None, 7):
        assert shipped(text).input_ids == english.encode(text).ids, text


@pytest.mark.parametrize("text", ["a photo of a dog, 3 cats and 🐈 on a sofa", "ÉTÉ\tnaïve\n", ""])
def test_any_text_round_trips(text):
    tok = tiny_tokenizer()
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text


@pytest.mark.parametrize("language", LANGUAGES)
def test_shapes_captions_cost_one_token_per_word(language):
    tok = tiny_tokenizer()
    for example in ShapesSource(ShapesOptions(language=language)).examples("val"):
        for caption in example.captions:
            words = re.sub(r"([,:']) ?", r" \1 ", caption).split()  # "d'un" is three words: d ' un
            assert len(tok(caption, add_special_tokens=False).input_ids) == len(words), caption
        if example.scene and len(example.scene) == 3:
            break


def test_special_tokens_wrap_text_for_clip_style_text_towers():
    tok = tiny_tokenizer()
    ids = tok("a red circle").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.eos_token_id != 2  # CLIPTextTransformer pools at the largest id when eos_token_id == 2


def test_tiny_sizes_shape_the_random_decoder():
    sizes = {"hidden_size": 96, "intermediate_size": 160, "num_hidden_layers": 3, "num_attention_heads": 4,
             "num_key_value_heads": 2}  # fmt: skip
    system = compose({**TINY, "decoder": {**TINY["decoder"], "tiny": sizes}})
    config = system.decoder.config
    assert {k: getattr(config, k) for k in sizes} == sizes
    assert config.vocab_size == len(system.decoder.tokenizer)
    assert system.decoder.embed(tiny_tokenizer()("a", return_tensors="pt").input_ids).shape[-1] == 96


def test_tiny_sizes_are_validated():
    with pytest.raises(RecipeError, match="divisible"):
        compose({**TINY, "decoder": {**TINY["decoder"], "tiny": {"hidden_size": 100, "num_attention_heads": 3}}})
