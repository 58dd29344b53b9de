"""BLEU-4 and CIDEr from pycocoevalcap (the COCO caption evaluation code), plus caption length statistics.

pycocoevalcap's PTB tokenizer shells out to Java; captions here are tokenised the way it would for plain English
(lowercase, punctuation dropped) so the scores need no JVM. METEOR and SPICE need Java and are not computed.
"""

from __future__ import annotations

import re
import statistics
from typing import Sequence

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def _tokens(text: str) -> str:
    return " ".join(_WORD.findall(text.lower()))


def caption_metrics(captions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU-4 and CIDEr-D of generated captions against all references of each image."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if len(captions) != len(references):
        raise ValueError(f"{len(captions)} captions but {len(references)} reference lists")
    if not captions:
        return {}
    # Both scorers assert every entry is non-empty; an empty generation is scored as a lone unknown token.
    res = {i: [_tokens(c) or "<empty>"] for i, c in enumerate(captions)}
    gts = {i: [_tokens(r) or "<empty>" for r in refs] for i, refs in enumerate(references)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    words = [len(c.split()) for c in captions]
    return {
        "bleu4": float(bleu[3]),
        "cider": float(cider),
        "caption_words_mean": float(statistics.fmean(words)),
        "caption_words_max": float(max(words)),
        "empty_captions": float(sum(1 for c in captions if not c.strip())),
    }
