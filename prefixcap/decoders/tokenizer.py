"""The tokenizer of ``checkpoint: tiny`` models: byte-level BPE whose merges are the shapes world's words.

No pretrained tokenizer can be fetched offline, so tiny decoders, the cross-attention baseline's tiny GPT-2 and the
bundled shapes models share this one. It is byte-level, so any text round-trips (a caption of a real photo costs
one token per byte); its merges were learnt from every caption the shapes world writes, so a shapes caption costs
one token per word. That makes shapes captions ~5x shorter than with bytes alone, which is most of a tiny
decoder's training time. The file is built by ``build_tiny_tokenizer`` and shipped, so it never changes under a
trained model; a test rebuilds it and compares.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

# End of text before beginning of text: CLIP's text tower pools at the EOS position, except that for
# eos_token_id == 2 it keeps a legacy rule (pool at the largest token id), so EOS must not be id 2.
SPECIALS = ["<pad>", "</s>", "<s>"]  # ids 0, 1, 2
PAD_ID, EOS_ID, BOS_ID = 0, 1, 2
TOKENIZER_FILE = Path(__file__).resolve().parent.parent / "assets" / "tiny-tokenizer.json"


def shapes_corpus() -> Iterator[str]:
    """Every caption wording of every shapes scene, with and without sizes, plus CLIPScore's prompt."""
    from prefixcap.data.shapes import COLOURS, KINDS, SIZES, Shape, references

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


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh transformers tokenizer over the shipped file (read each time: callers may change its settings)."""
    return PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER_FILE), pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")  # fmt: skip


@lru_cache(maxsize=1)
def tiny_vocab_size() -> int:
    return Tokenizer.from_file(str(TOKENIZER_FILE)).get_vocab_size()


if __name__ == "__main__":  # python -m prefixcap.decoders.tokenizer: rebuild the shipped file
    TOKENIZER_FILE.parent.mkdir(exist_ok=True)
    build_tiny_tokenizer().save(str(TOKENIZER_FILE))
    print(f"{TOKENIZER_FILE}: {tiny_vocab_size()} tokens")
