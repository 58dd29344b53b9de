"""The shapes world's glossary (DatasetSource.glossary): each German, French and Russian word that names a colour, a
kind or a size, with its English word, which a language run starts that word's embedding from."""

from __future__ import annotations

import pytest

from prefixcap.data import ShapesOptions
from prefixcap.data.shapes import ShapesSource
from prefixcap.data.shapes_languages import _COLOURS, _KINDS, _SIZES, GRAMMARS


@pytest.mark.parametrize("language", ["de", "fr", "ru"])
def test_the_glossary_gives_each_attribute_word_its_english_word_and_nothing_else(language):
    glossary = ShapesSource(ShapesOptions(language=language)).glossary()
    english = {*_COLOURS, *_KINDS, *_SIZES}
    phrases = GRAMMARS[language].surfaces  # every noun phrase, normalised, with the shape it names
    for word, gloss in glossary.items():
        assert gloss in english, (word, gloss)
        # every phrase using the word names a shape with that attribute, and shapes with it do use such words
        using = [shape for phrase, (_, shape) in phrases.items() if GRAMMARS[language].normalise(word) in phrase.split()]
        assert using and all(gloss in shape for shape in using), word
    # each English word is reached (German needs "roter" and "rotes", named with one noun only, as well)
    assert set(glossary.values()) == english
    assert {"de": {"roter": "red", "rotes": "red", "roten": "red", "Kreis": "circle", "kleinen": "small"},
            "fr": {"rouge": "red", "carré": "square", "petit": "small"},
            "ru": {"красного": "red", "треугольник": "triangle", "большой": "large"}}[language].items() <= glossary.items()
    for function_word in {"de": ["ein", "einem"], "fr": ["un"], "ru": []}[language]:
        assert function_word not in glossary


def test_english_has_no_glossary():
    assert ShapesSource().glossary() == {}
