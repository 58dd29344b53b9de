"""Export a saved system to ONNX, for captioning with onnxruntime alone (prefixcap.onnx_captioner.OnnxCaptioner).

    export_system("runs/quickstart", "exported/quickstart", int8=True)

An export directory holds:

    manifest.json          format, every graph's inputs and outputs (symbolic dims named), tokens, preprocessing,
                           generation defaults, versions
    vision_encoder.onnx    prefix:    pixel_values (batch, 3, S, S) -> image_tokens (batch, N, D)
                           crossattn: pixel_values -> cross_key_values.{i}.key/value (batch, heads, N, head_dim):
                           the ViT, the width projection if any, and every block's cross-attention keys and values,
                           all the per-image work, done once per image rather than once per generated token
    connector.onnx         prefix only: image_tokens -> prefix_embeds (batch, K, H)
    decoder.onnx           one step of the decoder with its KV cache (below); LoRA merged into the weights
    *.int8.onnx            with int8=True: the same graphs with dynamically quantised int8 weights
    tokenizer.json ...     the decoder tokenizer's save_pretrained
    README.md              the model card (prefixcap.card): the exported system's metadata, training and scores

The decoder is one merged graph, not an init + with-past pair, so its weights are stored once. Every step feeds
``past_key_values.{i}.key/value`` (batch, kv_heads, past_sequence_length, head_dim) and gets back
``present.{i}.key/value`` with the step's positions appended; the first step feeds an empty past (length 0). The
token embedding is inside the decoder: it takes ``input_ids`` and embeds them itself, and the prefix system's
decoder also takes ``prefix_embeds``, put in front of the embedded ids (the prefix and the prompt ids on the first
step, an empty prefix after). The crossattn decoder takes the image's ``cross_key_values`` on every step. Position
ids come from ``attention_mask`` inside the graph (cumulative sum, as the prefix decoder computes them), so a
runtime passes only the mask, (batch, past + prefix + new tokens). Only the last position's logits come out
(batch, vocab): greedy decoding reads nothing else, and a 196-token prefix would otherwise cost 196 lm_head rows.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch
from peft import PeftModel
from torch import Tensor, nn
from torch.export import Dim
from transformers import DynamicCache, EncoderDecoderCache

from prefixcap.checkpoints import installed_versions
from prefixcap.decoding import cache_keyword
from prefixcap.errors import summary
from prefixcap.onnx_captioner import CLEAN_UP_PROBE, FORMAT, ExportError
from prefixcap.card import card_name, run_metrics, system_card, write_card
from prefixcap.persist import load_system, read_manifest, saved_system_dir
from prefixcap.systems.crossattn import CrossAttnSystem
from prefixcap.systems.prefix import PrefixSystem

RESAMPLE = ("torch.nn.functional.interpolate(mode='bicubic', antialias=True, align_corners=False) on float32 RGB in "
            "[0, 1], clamped to [0, 1] after resizing; PIL's float ('F' mode) BICUBIC reproduces it within ~2e-5, "
            "not bit for bit; an image already at the target size is not resampled")  # fmt: skip

PREFIX_STEPS = ("vision_encoder: pixel_values -> image_tokens; connector: image_tokens -> prefix_embeds; decoder, "
                "first step: prefix_embeds, input_ids = tokens.prompt_ids, an empty past; every later step: an empty "
                "prefix_embeds (batch, 0, H), input_ids = the last token, the past = the previous step's present")
CROSSATTN_STEPS = ("vision_encoder: pixel_values -> cross_key_values.*, fed to every decoder step; decoder, first step: "
                   "input_ids = tokens.prompt_ids (the start token), an empty past; every later step: input_ids = the "
                   "last token, the past = the previous step's present")  # fmt: skip

# Example sizes for tracing: torch.export specialises dims of size 0 or 1, so every dynamic dim is traced at 2 or
# more (the graphs still run at 0 and 1).
BATCH, PAST, NEW, PREFIX = 2, 3, 2, 3


def source_name(source: Path) -> str:
    """What a manifest records as the exported system's source, without the exporting machine's layout: its path
    relative to the current directory when inside it (runs/quickstart/final), else only its run's name and its own
    (quickstart/final), or its own name for a saved system that is no run's final/."""
    path, here = source.resolve(), Path.cwd().resolve()
    if here != Path(here.anchor) and path != here and path.is_relative_to(here):
        return path.relative_to(here).as_posix()
    return "/".join(path.parts[-2:] if path.name == "final" else path.parts[-1:])


def export_system(source: str | Path, out: str | Path, *, int8: bool = False) -> dict[str, Any]:
    """Export the system saved in ``source`` (a saved system, or a run directory: its final/) to ``out``; returns
    the manifest written there."""
    source = saved_system_dir(source)
    system = load_system(source)
    lora = isinstance(system.decoder.model, PeftModel)
    if isinstance(system, PrefixSystem):
        graphs, steps = prefix_graphs(system), PREFIX_STEPS
    elif isinstance(system, CrossAttnSystem):
        graphs, steps = crossattn_graphs(system), CROSSATTN_STEPS
    else:
        raise ExportError(f"{source}: cannot export a {type(system).__name__} (prefix and crossattn systems only)")
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        # Written next to ``out`` and moved in only when complete: a full disk or a failed graph leaves no
        # truncated file where a runtime would read it.
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
            manifest = write_export(system, graphs, steps, source, Path(tmp), int8=int8, lora=lora)
            publish(Path(tmp), out)
    except OSError as e:  # ENOSPC, EDQUOT, EROFS, EACCES: the reason is all the user needs
        raise ExportError(f"cannot write the export to {out}: {e.strerror or summary(e)}") from None
    return manifest


def write_export(system: PrefixSystem | CrossAttnSystem, graphs: dict[str, Graph], steps: str, source: Path,
                 out: Path, *, int8: bool, lora: bool) -> dict[str, Any]:  # fmt: skip
    """Write every graph, the tokenizer and manifest.json into the (empty) directory ``out``; return the manifest."""
    described, written = {}, []
    for name, graph in graphs.items():
        path = out / f"{name}.onnx"
        export_graph(graph, path)
        described[name] = {"file": path.name, **describe(path)}
        written += with_data(path)
        if int8:
            quantized = quantize(path)
            described[name]["int8_file"] = quantized.name
            written += with_data(quantized)
    tokens, tokenizer_files = write_tokenizer(system, out)
    # The model card of the system exported, from its manifest and its run's metrics.json (when it is a run's final/)
    card = write_card(out, system_card(source, read_manifest(source), run_metrics(source), name=card_name(source),
                                       export={"graphs": described}))  # fmt: skip
    processor = system.encoder.image_processor
    manifest = {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "system": "prefix" if isinstance(system, PrefixSystem) else "crossattn",
        "source": source_name(source),
        "graphs": described,
        "decoder": {"layout": "merged: one graph for every step, the first with an empty past", "steps": steps,
                    "lora_merged": lora,
                    "cache": "past_key_values.{i}.key/value in, present.{i}.key/value out, "
                             "(batch, kv_heads, past_sequence_length, head_dim)",
                    "positions": "from attention_mask inside the graph: cumsum(attention_mask) - 1",
                    "logits": "last position only, (batch, vocab)"},  # fmt: skip
        "tokens": tokens,
        "image": {"size": processor.size, "mean": list(processor.mean), "std": list(processor.std),
                  "resize": processor.resize, "crop_pct": processor.crop_pct, "rescale": "uint8 / 255",
                  "resample": RESAMPLE, "layout": "NCHW float32"},  # fmt: skip
        "generate": system.generate_config.model_dump(),
        "files": {p.name: p.stat().st_size for p in written + tokenizer_files + [card]},
        "versions": versions(),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def publish(staging: Path, out: Path) -> None:
    """Move the complete export in ``staging`` into ``out`` (which may hold other files), manifest.json last: a
    reader that finds the new manifest finds every file it names."""
    out.mkdir(exist_ok=True)
    names = sorted((p.name for p in staging.iterdir()), key=lambda name: name == "manifest.json")
    for name in names:
        os.replace(staging / name, out / name)


@dataclass
class Graph:
    """What torch.onnx.export needs for one graph: the module, example arguments, names and dynamic dims."""

    module: nn.Module
    args: tuple[Any, ...]
    inputs: list[str]  # one name per tensor, the lists in ``args`` flattened
    outputs: list[str]
    dims: tuple[Any, ...]  # torch.export dynamic_shapes, one entry per argument


def prefix_graphs(system: PrefixSystem) -> dict[str, Graph]:
    lm = system.decoder.model
    if isinstance(lm, PeftModel):  # LoRA: fold the adapters into the weights they adapt
        lm = lm.merge_and_unload()
    size = system.encoder.image_processor.size
    pixels = torch.zeros(BATCH, 3, size, size)
    with torch.no_grad():
        tokens = system.encoder(pixels)
    batch = Dim("batch")
    past, past_names, past_shapes = example_cache(lm.config, "past_key_values", batch)
    embeds = torch.zeros(BATCH, PREFIX, lm.config.hidden_size)
    ids = torch.zeros(BATCH, NEW, dtype=torch.long)
    mask = torch.ones(BATCH, PAST + PREFIX + NEW, dtype=torch.long)
    present_names = [n.replace("past_key_values", "present") for n in past_names]
    return {
        "vision_encoder": Graph(system.encoder, (pixels,), ["pixel_values"], ["image_tokens"], ({0: batch},)),
        "connector": Graph(system.connector, (tokens,), ["image_tokens"], ["prefix_embeds"], ({0: batch},)),
        "decoder": Graph(PrefixDecoderStep(lm), (embeds, ids, mask, past),
                         ["prefix_embeds", "input_ids", "attention_mask", *past_names], ["logits", *present_names],
                         ({0: batch, 1: Dim("prefix_length")}, {0: batch, 1: Dim("sequence_length")},
                          {0: batch, 1: Dim("total_sequence_length")}, past_shapes)),
    }  # fmt: skip


def crossattn_graphs(system: CrossAttnSystem) -> dict[str, Graph]:
    lm = system.decoder.model
    if lm.config.model_type != "gpt2":
        raise ExportError(f"crossattn export supports GPT-2 decoders; this one is a {lm.config.model_type!r} model")
    size = system.encoder.image_processor.size
    pixels = torch.zeros(BATCH, 3, size, size)
    image = CrossAttnImage(system)
    with torch.no_grad():
        cross = image(pixels)
    batch = Dim("batch")
    past, past_names, past_shapes = example_cache(lm.config, "past_key_values", batch)
    cross_names = [f"cross_key_values.{i}.{kv}" for i in range(len(cross) // 2) for kv in ("key", "value")]
    present_names = [n.replace("past_key_values", "present") for n in past_names]
    ids = torch.zeros(BATCH, NEW, dtype=torch.long)
    mask = torch.ones(BATCH, PAST + NEW, dtype=torch.long)
    return {
        "vision_encoder": Graph(image, (pixels,), ["pixel_values"], cross_names, ({0: batch},)),
        "decoder": Graph(CrossAttnDecoderStep(lm), (ids, mask, past, cross),
                         ["input_ids", "attention_mask", *past_names, *cross_names], ["logits", *present_names],
                         ({0: batch, 1: Dim("sequence_length")}, {0: batch, 1: Dim("total_sequence_length")},
                          past_shapes, [{0: batch}] * len(cross))),
    }  # fmt: skip


def example_cache(config: Any, prefix: str, batch: Dim) -> tuple[list[Tensor], list[str], list[dict[int, Any]]]:
    """A past of PAST positions for every layer, flat as [key 0, value 0, key 1, ...], with names and dims."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    layers = config.num_hidden_layers
    past = [torch.zeros(BATCH, kv_heads, PAST, head_dim) for _ in range(2 * layers)]
    names = [f"{prefix}.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    length = Dim("past_sequence_length")
    return past, names, [{0: batch, 2: length}] * len(past)


def positions(attention_mask: Tensor, new: int) -> Tensor:
    """Position ids of the last ``new`` positions: real tokens counted, as CausalLMDecoder.forward counts them."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -new:]


def pairs(flat: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
    return list(zip(flat[::2], flat[1::2]))


def flatten(cache: DynamicCache) -> list[Tensor]:
    return [t for layer in cache.layers for t in (layer.keys, layer.values)]


class PrefixDecoderStep(nn.Module):
    """[prefix_embeds ; embed(input_ids)] after the cached past -> last position's logits and the grown cache."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, prefix_embeds: Tensor, input_ids: Tensor, attention_mask: Tensor, past: list[Tensor]):
        embeds = torch.cat([prefix_embeds, self.lm.get_input_embeddings()(input_ids)], dim=1)
        cache = DynamicCache(pairs(past), config=self.lm.config)
        out = self.lm(inputs_embeds=embeds, attention_mask=attention_mask, **{cache_keyword(self.lm): cache},
                      use_cache=True, position_ids=positions(attention_mask, embeds.shape[1]),
                      logits_to_keep=1)  # fmt: skip
        return out.logits[:, -1], flatten(out.past_key_values)


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
        return out.logits[:, -1], flatten(out.past_key_values.self_attention_cache)


def export_graph(graph: Graph, path: Path) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        # Dims shared by several inputs (batch, past length) warn once per extra use, which is the point.
        warnings.filterwarnings("ignore", message=".*shares the same shape constraints.*")
        program = torch.onnx.export(graph.module.eval(), graph.args, dynamo=True, dynamic_shapes=graph.dims,
                                    input_names=graph.inputs, output_names=graph.outputs, verbose=False)  # fmt: skip
    for node in program.model.graph.all_nodes():
        node.metadata_props.clear()  # the exporter's debug notes (FX node, stack): half of a small graph's file
    program.save(path)  # over 1.5 GB of weights: in a separate <file>.data (protobuf stops at 2 GB)


def with_data(path: Path) -> list[Path]:
    """A graph file and its external weights, if it has them."""
    data = path.with_name(path.name + ".data")
    return [path, data] if data.is_file() else [path]


def describe(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Inputs and outputs as the saved graph declares them: name, element type, shape (named symbolic dims)."""
    graph = onnx.load(str(path), load_external_data=False).graph

    def one(value: onnx.ValueInfoProto) -> dict[str, Any]:
        tensor = value.type.tensor_type
        shape = [d.dim_param or d.dim_value for d in tensor.shape.dim]
        return {"name": value.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name,
                "shape": shape}  # fmt: skip

    return {"inputs": [one(v) for v in graph.input], "outputs": [one(v) for v in graph.output]}


def quantize(path: Path) -> Path:
    """Dynamic int8 (onnxruntime's defaults): weights stored as int8, activations quantised on the fly."""
    from onnxruntime.quantization import QuantType, quant_pre_process, quantize_dynamic

    target = path.with_suffix(".int8.onnx")
    with tempfile.TemporaryDirectory() as tmp:
        # onnxruntime's recommended preparation: shapes inferred and constants folded, so that weights reached
        # through a Transpose (a tied lm_head) become constants the quantiser can see.
        prepared = Path(tmp) / path.name
        quant_pre_process(path, prepared, save_as_external_data=len(with_data(path)) > 1)
        quantize_dynamic(prepared, target, weight_type=QuantType.QInt8)
    return target


def write_tokenizer(system: PrefixSystem | CrossAttnSystem, out: Path) -> tuple[dict[str, Any], list[Path]]:
    """Save the decoder's tokenizer; return the special ids and decoding settings a runtime needs, and the files."""
    decoder = system.decoder
    tokenizer = decoder.tokenizer
    files = [Path(f) for f in tokenizer.save_pretrained(str(out))]
    if not (out / "tokenizer.json").is_file():
        raise ExportError(f"the decoder's tokenizer ({type(tokenizer).__name__}) has no tokenizer.json to export")
    if isinstance(system, PrefixSystem):
        # The prefix system's decoder reads the prefix, then these ([BOS][prompt]), then writes the caption.
        prompt, eos, pad = decoder.prompt_ids().tolist(), tokenizer.eos_token_id, tokenizer.pad_token_id
    else:
        prompt, eos, pad = [decoder.start_id], decoder.eos_id, decoder.pad_id  # generation starts at BOS
    # Whether decode() cleans up spaces before punctuation on top of the tokenizers library's decode depends on the
    # tokenizer's settings, its model type and the transformers version: ask it.
    probe = tokenizer(CLEAN_UP_PROBE, add_special_tokens=False).input_ids
    clean_up = tokenizer.decode(probe) != tokenizer.backend_tokenizer.decode(probe)
    tokens = {"tokenizer": "tokenizer.json", "bos_id": tokenizer.bos_token_id, "eos_id": eos, "pad_id": pad,
              "prompt_ids": prompt,
              "decode": {"skip_special_tokens": True, "clean_up_tokenization_spaces": clean_up, "strip": True}}
    return tokens, files


def versions() -> dict[str, str]:
    return installed_versions(("prefixcap", "torch", "transformers", "peft", "onnx", "onnxscript", "onnxruntime"))
