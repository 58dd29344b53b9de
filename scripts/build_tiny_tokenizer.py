"""Build the tiny tokenizer that ships as prefixcap/assets/tiny-tokenizer.json, with this script.

Byte-level BPE whose merges are learnt from every caption the shapes world writes (see prefixcap/decoders/tokenizer.py
for why): first from the English captions, then, appended after those, from the words of its other languages
(German, French, Russian), so that a caption costs one token per word in each and English is tokenized exactly as
before the languages came. prefixcap itself only reads the shipped file; it is built here, outside the package,
because building it needs the shapes world's words, and a decoder component must not import a dataset. Trained models depend on its ids:
a change to the corpus or the trainer must come with a new file (tests/decoders/test_tiny.py rebuilds it and
compares).

    python scripts/build_tiny_tokenizer.py            # rewrites prefixcap/assets/tiny-tokenizer.json
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from prefixcap.data.shapes import COLOURS, KINDS, LANGUAGES, SIZES, Shape, references
from prefixcap.decoders.tokenizer import BOS_ID, EOS_ID, SPECIALS, TOKENIZER_FILE


def shapes_corpus(language: str = "en") -> Iterator[str]:
    """Every caption wording of every shapes scene, with and without sizes, plus (English) CLIPScore's prompt."""
    if language == "en":
        yield "A photo depicts"
    for sizes in ((None,), SIZES):
        shapes = [Shape(c, k, s) for c in COLOURS for k in KINDS for s in sizes]
        for n in (1, 2, 3):
            # Every word and every wording appears with n = 1..3 already, so a sample of the 3-shape scenes is enough.
            for scene in itertools.islice(itertools.product(shapes, repeat=n), 2000):
                yield from references(scene, language)


def build_tiny_tokenizer() -> Tokenizer:
    """The shipped tokenizer: the English one, its merges followed by those of the other languages' words."""
    tok = english_tokenizer()
    words = Counter(word for language in LANGUAGES[1:] for text in shapes_corpus(language)
                    for word, _ in tok.pre_tokenizer.pre_tokenize_str(text))  # fmt: skip
    return with_words(tok, words)


def with_words(tok: Tokenizer, words: Counter[str]) -> Tokenizer:
    """``tok`` with merges appended until each of ``words`` (pre-tokens: "Ġroter") is one token.

    The appended merges are BPE's own (the most frequent pair across the words first; ties by the pair, so the file
    is reproducible), learnt from where ``tok`` leaves each word. They rank after every merge ``tok`` had, and a word
    of ``tok``'s corpus is already one token, so no text of that corpus is tokenized differently; ids are appended."""
    data = json.loads(tok.to_str())
    vocab, merges = data["model"]["vocab"], [tuple(m) for m in data["model"]["merges"]]
    pieces = {word: [token.value for token in tok.model.tokenize(word)] for word in words}
    while True:
        pairs = Counter()
        for word, parts in pieces.items():
            for pair in zip(parts, parts[1:]):
                pairs[pair] += words[word]
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        vocab.setdefault(best[0] + best[1], len(vocab))
        pieces = {word: _merge(parts, best) for word, parts in pieces.items()}
    data["model"]["merges"] = [list(m) for m in merges]
    extended = Tokenizer.from_str(json.dumps(data))
    for word in words:  # the file is only written if the BPE model reads the merges as they were learnt
        if len(extended.model.tokenize(word)) != 1:
            raise RuntimeError(f"{word!r} is not one token of the extended tokenizer")
    return extended


def _merge(parts: Iterable[str], pair: tuple[str, str]) -> list[str]:
    out: list[str] = []
    for part in parts:
        if out and (out[-1], part) == pair:  # a merged piece is never pair[0] again: "a a a" -> "aa a"
            out[-1] += part
        else:
            out.append(part)
    return out


def english_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # words keep their leading space
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(shapes_corpus(), trainer)
    # Only called with add_special_tokens=True (CLIP-style text towers) does it add them; decoders add their own.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", BOS_ID), ("</s>", EOS_ID)]
    )
    return tok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=TOKENIZER_FILE)
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tok = build_tiny_tokenizer()
    tok.save(str(args.out))
    print(f"{args.out}: {tok.get_vocab_size()} tokens")


if __name__ == "__main__":
    main()
