"""The tokenizer of ``checkpoint: tiny`` models: byte-level BPE whose merges are the shapes world's words.

No pretrained tokenizer can be fetched offline, so tiny decoders, the cross-attention baseline's tiny GPT-2 and the
bundled shapes models share this one. It is byte-level, so any text round-trips (a caption of a real photo costs
one token per byte); its merges were learnt from every caption the shapes world writes, so a shapes caption costs
one token per word. That makes shapes captions ~5x shorter than with bytes alone, which is most of a tiny
decoder's training time. The file is built by scripts/build_tiny_tokenizer.py (outside the package: building it
needs the shapes world's words, reading it does not) and shipped, so it never changes under a trained model; a test
rebuilds it and compares. This module only reads it.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

# End of text before beginning of text: CLIP's text tower pools at the EOS position, except that for
# eos_token_id == 2 it keeps a legacy rule (pool at the largest token id), so EOS must not be id 2.
SPECIALS = ["<pad>", "</s>", "<s>"]  # ids 0, 1, 2
PAD_ID, EOS_ID, BOS_ID = 0, 1, 2
TOKENIZER_FILE = Path(__file__).resolve().parent.parent / "assets" / "tiny-tokenizer.json"


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh transformers tokenizer over the shipped file (read each time: callers may change its settings)."""
    return PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER_FILE), pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")  # fmt: skip


@lru_cache(maxsize=1)
def tiny_vocab_size() -> int:
    return Tokenizer.from_file(str(TOKENIZER_FILE)).get_vocab_size()

