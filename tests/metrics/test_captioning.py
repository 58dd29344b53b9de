"""BLEU-4 and CIDEr tokenise words of any script: a wrong caption earns no credit for being in another alphabet, and
a right one earns what the same caption in English would."""

from __future__ import annotations

import pytest

from prefixcap.metrics.captioning import _tokens, caption_metrics

WORDS = [  # (script, text, its words)
    ("latin", "A red square, don't!", "a red square don't"),
    ("latin with accents", "Un CARRÉ rouge à l’école", "un carré rouge à l'école"),
    ("decomposed accents", "Cafe\u0301 au lait", "café au lait"),  # e + a combining accent is é
    ("cyrillic", "СОБАКА бежит по траве.", "собака бежит по траве"),
    ("greek", "Ένας κόκκινος κύκλος", "ένασ κόκκινοσ κύκλοσ"),  # casefolded: final sigma is sigma
    ("devanagari", "एक लाल वृत्त", "एक लाल वृत्त"),  # vowel signs are marks: they stay in their word
    ("arabic", "دائرة حمراء", "دائرة حمراء"),
    ("hebrew", "עיגול אדום", "עיגול אדום"),
    ("chinese", "一个红色的圆", "一 个 红 色 的 圆"),  # no spaces between words: a character each
    ("japanese", "赤い丸", "赤 い 丸"),
    ("thai", "วงกลมสีแดง", "ว ง ก ล ม สี แ ด ง"),  # the vowel mark stays with its letter
    ("mixed", "a 東京 tower", "a 東 京 tower"),
    ("fullwidth", "ＡＢＣ１２３", "abc123"),  # NFKC
    ("nothing to read", " ,.!? ", ""),
]


@pytest.mark.parametrize("script, text, words", WORDS, ids=[w[0] for w in WORDS])
def test_words_of_every_script_are_kept_whole(script, text, words):
    assert _tokens(text) == words


def test_a_wrong_caption_in_another_alphabet_earns_what_a_wrong_english_one_does():
    references = [["кошка спит на диване", "белая кошка"], ["a red square"]]
    russian = caption_metrics(["собака бежит", "a red square"], references)
    english = caption_metrics(["a dog runs", "a red square"], references)
    # Before, both Russian texts became one placeholder token, so the wrong caption "matched" its references.
    assert russian["cider"] == pytest.approx(english["cider"]) == pytest.approx(3.75)


@pytest.mark.parametrize("caption, references", [
    ("белая кошка спит на диване", ["белая кошка спит на диване", "кошка спит на диване"]),
    ("un carré rouge à gauche", ["un carré rouge à gauche", "à gauche un carré rouge"]),
    ("一个红色的圆", ["一个红色的圆", "红色的圆"]),
])  # fmt: skip
def test_a_right_caption_scores_as_the_same_caption_in_english_would(caption, references):
    found = caption_metrics([caption, "a blue circle"], [references, ["a blue circle"]])
    assert found["bleu4"] > 0.5 and found["cider"] > 1.0, found
    wrong = caption_metrics(["a blue circle", caption], [references, ["a blue circle"]])
    assert wrong["cider"] < found["cider"] / 2 and wrong["bleu4"] < found["bleu4"] / 2, (wrong, found)


def test_caption_length_counts_the_words_as_scored():
    assert caption_metrics(["一个红色的圆", "a red, square"], [["圆"], ["a red square"]])["caption_words_max"] == 6
    assert caption_metrics(["a red, square"], [["a red square"]])["caption_words_mean"] == 3


def test_an_empty_caption_never_matches_an_empty_reference():
    empty = caption_metrics(["", "a red square"], [["!!!"], ["a red square"]])
    assert empty["empty_captions"] == 1
    filled = caption_metrics(["a cat", "a red square"], [["!!!"], ["a red square"]])
    assert empty["cider"] == pytest.approx(filled["cider"])  # no credit for two texts that both read as nothing
