"""Greedy decoding with a KV cache, written out: the loop HF ``generate`` runs for greedy search, without its
per-step machinery (logits processors, stopping criteria, output bookkeeping), which dominates the step time of
small decoders.

    new_ids = greedy(model, inputs_embeds, max_new_tokens=24, eos_id=2, pad_id=0)   # (B, T_new)

The first step (prefill) runs the whole prefix + prompt at once; every later step feeds one token per row. A row
that has written EOS gets ``pad_id`` from then on, and the loop ends when every row has ended, as HF's does, so the
ids are HF's token for token (tests/test_decoding.py checks it against ``generate``). ``cache="static"`` keeps the
keys and values in preallocated tensors of a fixed length, the form a compiled or CUDA-graph-captured step needs;
``"dynamic"`` grows them, which is cheaper on the CPU for short captions. ``compile=True`` runs every step after the
prefill through ``torch.compile`` (static cache, fixed shapes: one graph per batch size, compiled on first use and
kept with the model). ``encoder_hidden_states`` is for a decoder that cross-attends (the GPT-2 family): the prefill
computes every block's keys and values of the image once, and the steps read them from the cache.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn
from transformers import DynamicCache, EncoderDecoderCache, StaticCache


@torch.inference_mode()
def greedy(model: nn.Module, inputs_embeds: Tensor, *, max_new_tokens: int, eos_id: int | None, pad_id: int,
           cache: Literal["dynamic", "static"] | None = None, compile: bool = False,
           encoder_hidden_states: Tensor | None = None) -> Tensor:  # fmt: skip
    """Greedy ids (B, T_new) after ``inputs_embeds`` (B, L, H), every position of which is a real token (the prefix
    system has no padding: every row is K prefix embeddings and the same prompt; the cross-attention one starts from
    its start token alone). ``cache``: None takes the static one when compiled, else the dynamic one."""
    cache = cache or ("static" if compile else "dynamic")
    if compile and cache != "static":
        raise ValueError("a compiled step needs cache='static': a growing cache changes its shapes every step")
    batch, length, _ = inputs_embeds.shape
    device = inputs_embeds.device
    config = model.config
    kv = StaticCache(config=config, max_cache_len=length + max_new_tokens) if cache == "static" else DynamicCache()
    extra = {}
    if encoder_hidden_states is not None:  # the cross-attention keys and values never grow: a plain cache holds them
        kv = EncoderDecoderCache(kv, DynamicCache())
        extra = {"encoder_hidden_states": encoder_hidden_states}
    kv_arg = {cache_keyword(model): kv, **extra}
    positions = torch.arange(length, device=device)
    logits = model(inputs_embeds=inputs_embeds, **kv_arg, use_cache=True, cache_position=positions,
                   position_ids=positions.expand(batch, -1), logits_to_keep=1).logits  # fmt: skip
    step = compiled_step(model) if compile else model
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    tokens: list[Tensor] = []
    for i in range(max_new_tokens):
        new = logits[:, -1].argmax(-1)
        new = new.masked_fill(finished, pad_id)
        tokens.append(new)
        if eos_id is not None:
            finished |= new == eos_id
        if i == max_new_tokens - 1 or bool(finished.all()):  # one host sync a step, as HF's loop has
            break
        position = torch.tensor([length + i], device=device)
        logits = step(input_ids=new[:, None], **kv_arg, use_cache=True, cache_position=position,
                      position_ids=position.expand(batch, 1), logits_to_keep=1).logits  # fmt: skip
    return torch.stack(tokens, dim=1)


# One compiled step per model, kept as long as the model is: compiling costs seconds to minutes, a step milliseconds.
_COMPILED: weakref.WeakKeyDictionary[nn.Module, Callable[..., object]] = weakref.WeakKeyDictionary()


def compiled_step(model: nn.Module) -> Callable[..., object]:
    """``model``'s forward through torch.compile. Shapes are fixed (the static cache's length, one new token), so
    ``dynamic=False``: a new batch size or cache length compiles once more rather than a slower shape-generic graph."""
    if model not in _COMPILED:
        _COMPILED[model] = torch.compile(model, dynamic=False)
    return _COMPILED[model]


def cache_keyword(model: nn.Module) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` (the old name warns, and goes in 5.40); older releases,
    which prefixcap still supports, know only the old one. Asked of the model's own forward (under any peft wrapper)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
