"""Build the tiny tokenizer that ships as prefixcap/assets/tiny-tokenizer.json, with this script.

Byte-level BPE whose merges are learnt from every caption the shapes world writes (see prefixcap/decoders/tokenizer.py
for why). prefixcap itself only reads the shipped file; it is built here, outside the package, because building it
needs the shapes world's words, and a decoder component must not import a dataset. Trained models depend on its ids:
a change to the corpus or the trainer must come with a new file (tests/decoders/test_tiny.py rebuilds it and
compares).

    python scripts/build_tiny_tokenizer.py            # rewrites prefixcap/assets/tiny-tokenizer.json
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from prefixcap.data.shapes import COLOURS, KINDS, SIZES, Shape, references
from prefixcap.decoders.tokenizer import BOS_ID, EOS_ID, SPECIALS, TOKENIZER_FILE


def shapes_corpus() -> Iterator[str]:
    """Every caption wording of every shapes scene, with and without sizes, plus CLIPScore's prompt."""
    yield "A photo depicts"
    for sizes in ((None,), SIZES):
        shapes = [Shape(c, k, s) for c in COLOURS for k in KINDS for s in sizes]
        for n in (1, 2, 3):
            # Every word and every wording appears with n = 1..3 already, so a sample of the 3-shape scenes is enough.
            for scene in itertools.islice(itertools.product(shapes, repeat=n), 2000):
                yield from references(scene)


def build_tiny_tokenizer() -> Tokenizer:
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
