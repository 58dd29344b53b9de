"""BLEU-4 and CIDEr from pycocoevalcap (the COCO caption evaluation code), plus caption length statistics.

pycocoevalcap's PTB tokenizer shells out to Java; captions here are tokenised as it would tokenise plain English
(case folded, punctuation dropped, "don't" one word) so the scores need no JVM, and in any script: a word is a run of
letters, marks and digits of any alphabet (café, собака, नमस्ते stay whole, NFKC-normalised so that é typed as e + an
accent is é), and scripts written without spaces between words (Chinese, Japanese, Thai, Lao, Khmer, Myanmar) count
each character as a word, as Chinese caption benchmarks (COCO-CN, AIC-ICC) score by character. METEOR and SPICE need
Java and are not computed.
"""

from __future__ import annotations

import statistics
import unicodedata
from typing import Sequence

# Unicode character-name prefixes of the scripts written without spaces between words.
_UNSPACED = ("CJK UNIFIED IDEOGRAPH", "CJK COMPATIBILITY IDEOGRAPH", "HIRAGANA", "KATAKANA", "THAI", "LAO", "KHMER",
             "MYANMAR")  # fmt: skip
_APOSTROPHES = "'\u2019"
# An empty caption or reference is scored as a placeholder word (the scorers assert every entry is non-empty); the two
# differ, so that an empty caption never matches an empty reference (nor, before, a caption with no ASCII letter).
EMPTY_CAPTION, EMPTY_REFERENCE = "<nocaption>", "<noreference>"  # one token each: they share no word


def _tokens(text: str) -> str:
    words: list[str] = []
    word: list[str] = []
    unspaced = False  # whether the last word is a character of an unspaced script (a mark after it joins it)
    text = unicodedata.normalize("NFKC", text).casefold()
    for i, char in enumerate(text):
        kind = unicodedata.category(char)[0]
        if kind in "LN" and unicodedata.name(char, "").startswith(_UNSPACED):
            words += ["".join(word), char] if word else [char]
            word, unspaced = [], True
            continue
        if kind == "M" and unspaced and not word:
            words[-1] += char  # a Thai vowel or tone mark belongs to its letter
            continue
        unspaced = False
        if kind in "LMN":
            word.append(char)
        elif char in _APOSTROPHES and word and i + 1 < len(text) and unicodedata.category(text[i + 1])[0] == "L":
            word.append("'")  # don't, l'école: one word, whichever apostrophe was typed
        elif word:
            words.append("".join(word))
            word = []
    if word:
        words.append("".join(word))
    return " ".join(words)


def caption_metrics(captions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU-4 and CIDEr-D of generated captions against all references of each image."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if len(captions) != len(references):
        raise ValueError(f"{len(captions)} captions but {len(references)} reference lists")
    if not captions:
        return {}
    res = {i: [_tokens(c) or EMPTY_CAPTION] for i, c in enumerate(captions)}
    gts = {i: [_tokens(r) or EMPTY_REFERENCE for r in refs] for i, refs in enumerate(references)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    words = [len(_tokens(c).split()) for c in captions]  # words as scored: a Chinese caption has more than one
    return {
        "bleu4": float(bleu[3]),
        "cider": float(cider),
        "caption_words_mean": float(statistics.fmean(words)),
        "caption_words_max": float(max(words)),
        "empty_captions": float(sum(1 for c in captions if not c.strip())),
    }
