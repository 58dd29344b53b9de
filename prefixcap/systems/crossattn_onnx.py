"""The cross-attention baseline's ONNX plan (CrossAttnSystem.onnx_export): GPT-2 internals, so it lives here.

    vision_encoder   pixel_values -> cross_key_values.{i}.key/value (batch, heads, N, head_dim): the ViT, the width
                     projection if any, and every block's cross-attention keys and values: all the per-image work,
                     done once per image rather than once per generated token
    decoder          input_ids after the cached past, cross-attending to those keys and values (fed on every step)
                     -> logits and the grown cache; the first step's input is the start token
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.export import Dim
from transformers import DynamicCache, EncoderDecoderCache

from prefixcap.decoding import cache_keyword
from prefixcap.onnx_parts import (BATCH, BATCH_DIM, BATCH_DIMS, NEW, PAST, ExportError, Graph, OnnxPlan, Runtime,
                                  example_cache, example_pixels, flatten, output_cache, pairs, positions)  # fmt: skip

if TYPE_CHECKING:
    from prefixcap.systems.crossattn import CrossAttnSystem


def onnx_plan(system: CrossAttnSystem) -> OnnxPlan:
    lm = system.decoder.model
    if lm.config.model_type != "gpt2":
        raise ExportError(f"crossattn export supports GPT-2 decoders; this one is a {lm.config.model_type!r} model")
    pixels = example_pixels(system.encoder)
    image = CrossAttnImage(system)
    with torch.no_grad():
        cross = image(pixels)
    past, past_names, past_dims = example_cache(lm)
    cross_names = [f"cross_key_values.{i}.{kv}" for i in range(len(cross) // 2) for kv in ("key", "value")]
    present_names = [n.replace("past_key_values.", "present.", 1) for n in past_names]
    ids = torch.zeros(BATCH, NEW, dtype=torch.long)
    mask = torch.ones(BATCH, PAST + NEW, dtype=torch.long)
    graphs = {
        "vision_encoder": Graph(image, (pixels,), ["pixel_values"], cross_names, (BATCH_DIMS,)),
        "decoder": Graph(CrossAttnDecoderStep(lm), (ids, mask, past, cross),
                         ["input_ids", "attention_mask", *past_names, *cross_names], ["logits", *present_names],
                         ({0: BATCH_DIM, 1: Dim("sequence_length")}, {0: BATCH_DIM, 1: Dim("total_sequence_length")},
                          past_dims, [BATCH_DIMS] * len(cross))),
    }  # fmt: skip
    decoder = system.decoder
    runtime = Runtime(image=["vision_encoder"], step="decoder", every_step=cross_names)
    # Generation starts at the start token (BOS) and reads the image through cross-attention only.
    return OnnxPlan(graphs, runtime, tokenizer=decoder.tokenizer, prompt_ids=[decoder.start_id], eos_id=decoder.eos_id,
                    pad_id=decoder.pad_id)  # fmt: skip


class CrossAttnImage(nn.Module):
    """Pixels -> every GPT-2 block's cross-attention keys and values, computed by the blocks' own attention code."""

    def __init__(self, system: CrossAttnSystem):
        super().__init__()
        self.encoder = system.encoder
        # VisionEncoderDecoderModel projects the encoder output to the decoder's width when they differ.
        self.proj = getattr(system.decoder, "enc_to_dec_proj", None)
        self.blocks = system.decoder.model.transformer.h
        self.width = system.decoder.hidden_size

    def forward(self, pixel_values: Tensor) -> list[Tensor]:
        memory = self.encoder(pixel_values)  # (B, N, D)
        if self.proj is not None:
            memory = self.proj(memory)
        # GPT2Attention fills an empty cross-attention cache from the encoder output; the attention output it also
        # computes (for one dummy query) is unused, and dropped from the graph.
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        query = memory.new_zeros(memory.shape[0], 1, self.width)
        for block in self.blocks:
            block.crossattention(query, **{cache_keyword(block.crossattention): cache}, encoder_hidden_states=memory)
        return flatten(cache.cross_attention_cache)


class CrossAttnDecoderStep(nn.Module):
    """input_ids after the cached past, cross-attending to the image's keys and values -> logits, grown cache."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: Tensor, attention_mask: Tensor, past: list[Tensor], cross: list[Tensor]):
        cache = EncoderDecoderCache(DynamicCache(pairs(past), config=self.lm.config),
                                    DynamicCache(pairs(cross), config=self.lm.config))  # fmt: skip
        # With its cross-attention cache filled GPT-2 never reads encoder_hidden_states, but it takes the
        # cross-attention branch only when they are given: a (B, N, H) stand-in made from the keys.
        memory = cross[0].transpose(1, 2).flatten(2)
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, **{cache_keyword(self.lm): cache},
                      use_cache=True, position_ids=positions(attention_mask, input_ids.shape[1]),
                      encoder_hidden_states=memory, logits_to_keep=1)  # fmt: skip
        return out.logits[:, -1], flatten(output_cache(out).self_attention_cache)
