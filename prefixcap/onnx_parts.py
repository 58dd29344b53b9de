"""Building blocks of a system's ONNX plan: what ``System.onnx_export`` returns, and what most systems' graphs share.

A plan names each graph's module, example arguments, input and output names and dynamic dims (torch.onnx.export's
arguments), the runtime (prefixcap.onnx_spec.Runtime: what runs once per image, what the step graph is fed and
when) and the token facts a runtime needs. prefixcap.export writes it; the prefix system's plan is the model:

    def onnx_export(self) -> OnnxPlan:
        lm, merged = merge_lora(self.decoder.model)
        pixels = example_pixels(self.encoder)
        graphs = {"vision_encoder": Graph(self.encoder, (pixels,), ["pixel_values"], ["image_tokens"], (BATCH_DIMS,)),
                  "connector": ..., "decoder": prefix_decoder_graph(lm, "prefix_embeds")}
        runtime = Runtime(image=["vision_encoder", "connector"], step="decoder", first_step={"prefix_embeds": 1})
        return OnnxPlan(graphs, runtime, tokenizer=..., prompt_ids=..., eos_id=..., pad_id=..., lora_merged=merged)

The decoder step is one merged graph, not an init + with-past pair, so its weights are stored once; the first step
feeds an empty past. Position ids come from attention_mask inside the graph (cumulative sum, as the prefix decoder
computes them), so a runtime passes only the mask. Only the last position's logits come out: greedy decoding reads
nothing else, and a 196-token prefix would otherwise cost 196 lm_head rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.export import Dim
from transformers import DynamicCache

from prefixcap.decoding import cache_keyword
from prefixcap.onnx_spec import Cache, ExportError, Runtime

__all__ = ["BATCH", "BATCH_DIM", "BATCH_DIMS", "NEW", "PAST", "PREFIX", "Cache", "ExportError", "Graph", "OnnxPlan",
           "PrefixDecoderStep", "Runtime", "embedding_graphs", "example_cache", "example_pixels", "flatten",
           "merge_lora", "output_cache", "pairs", "positions", "prefix_decoder_graph"]  # fmt: skip

# Example sizes for tracing: torch.export specialises dims of size 0 or 1, so every dynamic dim is traced at 2 or
# more (the graphs still run at 0 and 1).
BATCH, PAST, NEW, PREFIX = 2, 3, 2, 3
BATCH_DIM = Dim("batch")
BATCH_DIMS = {0: BATCH_DIM}  # dynamic_shapes of an input whose only dynamic dim is the batch


@dataclass
class Graph:
    """What torch.onnx.export needs for one graph: the module, example arguments, names and dynamic dims."""

    module: nn.Module
    args: tuple[Any, ...]
    inputs: list[str]  # one name per tensor, the lists in ``args`` flattened
    outputs: list[str]
    dims: tuple[Any, ...]  # torch.export dynamic_shapes, one entry per argument


@dataclass
class OnnxPlan:
    """A system's ONNX export: its graphs (written as <name>.onnx), how a runtime runs them, and its tokens."""

    graphs: dict[str, Graph]
    runtime: Runtime
    tokenizer: Any  # a transformers tokenizer with a tokenizer.json (a fast one): saved with the graphs
    prompt_ids: list[int]  # the step graph's first input_ids, the same for every image
    eos_id: int  # generation ends at this token
    pad_id: int | None = None
    lora_merged: bool = False  # recorded in the manifest
    # Language adapters (prefixcap.languages): each language's step graph, in place of runtime.step's, the adapter
    # merged into its weights. The other graphs are shared.
    languages: dict[str, str] = field(default_factory=dict)


def merge_lora(model: nn.Module) -> tuple[nn.Module, bool]:
    """The model with any peft LoRA adapters folded into the weights they adapt (in place), and whether it had any."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return model.merge_and_unload(), True
    return model, False


def example_pixels(encoder: nn.Module) -> Tensor:
    """(BATCH, 3, S, S) zeros at the encoder's input size."""
    size = encoder.preprocessing.size
    return torch.zeros(BATCH, 3, size, size)


def example_cache(lm: nn.Module, name: str = "past_key_values.") -> tuple[list[Tensor], list[str], list[dict]]:
    """A past of PAST positions as ``lm`` itself makes one (any transformers causal LM: the shapes come from running
    it, not from its config's names), flat as [key 0, value 0, key 1, ...], with names and dynamic dims."""
    with torch.no_grad():
        out = lm(input_ids=torch.zeros(BATCH, PAST, dtype=torch.long), use_cache=True)
    cache = output_cache(out)
    past = [t.detach().clone() for t in flatten(getattr(cache, "self_attention_cache", cache))]  # GPT-2's: its own
    names = [f"{name}{i}.{kv}" for i in range(len(past) // 2) for kv in ("key", "value")]
    length = Dim("past_sequence_length")
    return past, names, [{0: BATCH_DIM, 2: length}] * len(past)


def positions(attention_mask: Tensor, new: int) -> Tensor:
    """Position ids of the last ``new`` positions: real tokens counted, as CausalLMDecoder.forward counts them."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -new:]


def output_cache(out: Any) -> Any:
    """A model output's cache: ``cache`` since transformers renamed it (the old ``past_key_values`` warns), which
    releases prefixcap still supports do not know."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def pairs(flat: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
    return list(zip(flat[::2], flat[1::2]))


def flatten(cache: DynamicCache) -> list[Tensor]:
    return [t for layer in cache.layers for t in (layer.keys, layer.values)]


class PrefixDecoderStep(nn.Module):
    """[prefix embeddings ; embed(input_ids)] after the cached past -> last position's logits and the grown cache, for
    any transformers causal LM that takes inputs_embeds and a DynamicCache."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, prefix_embeds: Tensor, input_ids: Tensor, attention_mask: Tensor, past: list[Tensor]):
        embeds = torch.cat([prefix_embeds, self.lm.get_input_embeddings()(input_ids)], dim=1)
        cache = DynamicCache(pairs(past), config=self.lm.config)
        out = self.lm(inputs_embeds=embeds, attention_mask=attention_mask, **{cache_keyword(self.lm): cache},
                      use_cache=True, position_ids=positions(attention_mask, embeds.shape[1]),
                      logits_to_keep=1)  # fmt: skip
        return out.logits[:, -1], flatten(output_cache(out))


def prefix_decoder_graph(lm: nn.Module, prefix: str = "prefix_embeds") -> Graph:
    """The step graph of a decoder that reads a prefix of embeddings: inputs ``prefix`` (batch, prefix_length, H),
    input_ids, attention_mask and past_key_values.{i}.key/value; outputs logits and present.{i}.key/value. Its
    runtime feeds ``prefix`` on the first step only: ``first_step={prefix: 1}``."""
    if not hasattr(lm, "get_input_embeddings") or not hasattr(lm, "config"):
        raise ExportError(f"a prefix decoder exports as a transformers causal LM; this one is a {type(lm).__name__}")
    past, past_names, past_dims = example_cache(lm)
    width = lm.get_input_embeddings().embedding_dim
    embeds = torch.zeros(BATCH, PREFIX, width)
    ids = torch.zeros(BATCH, NEW, dtype=torch.long)
    mask = torch.ones(BATCH, PAST + PREFIX + NEW, dtype=torch.long)
    present = [n.replace("past_key_values.", "present.", 1) for n in past_names]
    dims = ({0: BATCH_DIM, 1: Dim("prefix_length")}, {0: BATCH_DIM, 1: Dim("sequence_length")},
            {0: BATCH_DIM, 1: Dim("total_sequence_length")}, past_dims)  # fmt: skip
    return Graph(PrefixDecoderStep(lm), (embeds, ids, mask, past), [prefix, "input_ids", "attention_mask", *past_names],
                 ["logits", *present], dims)


class ImageEmbedding(nn.Module):
    """pixel_values -> the image's embedding in the system's shared space, (B, E): its visual tokens pooled by its
    EmbeddingLoss, as prefixcap.score.TorchScorer computes it."""

    def __init__(self, system: nn.Module, loss: nn.Module):
        super().__init__()
        self.system, self.loss = system, loss

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.loss.image_embedding(self.system.visual_tokens(pixel_values))  # (B, 3, S, S) -> (B, E)


class TextEmbedding(nn.Module):
    """input_ids, attention_mask (as the system's tokenize makes them, right-padded) -> the text's embedding, (B, E):
    the decoder over the text alone, pooled by the EmbeddingLoss."""

    def __init__(self, system: nn.Module, loss: nn.Module):
        super().__init__()
        self.system, self.loss = system, loss

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.loss.text_embedding(self.system.text_states(input_ids, attention_mask), attention_mask)


def embedding_graphs(system: Any) -> dict[str, Graph] | None:
    """The contrastive score's graphs of any system that learnt a shared space (System.embedding_loss), built from
    System.visual_tokens and System.text_states, which a system implements to train one: None without one.
    prefixcap.export writes them beside the plan's graphs; the plan itself never names them."""
    loss = system.embedding_loss()
    if loss is None:
        return None
    length = Dim("sequence_length")
    text = {0: BATCH_DIM, 1: length}
    ids, mask = torch.zeros(BATCH, PAST + NEW, dtype=torch.long), torch.ones(BATCH, PAST + NEW, dtype=torch.long)
    return {
        "image": Graph(ImageEmbedding(system, loss), (example_pixels(system.encoder),), ["pixel_values"],
                       ["image_embeds"], (BATCH_DIMS,)),
        "text": Graph(TextEmbedding(system, loss), (ids, mask), ["input_ids", "attention_mask"], ["text_embeds"],
                      (text, text)),
    }  # fmt: skip
