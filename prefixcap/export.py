"""Export a saved system to ONNX, for captioning with onnxruntime alone (prefixcap.onnx_captioner.OnnxCaptioner).

    export_system("runs/quickstart", "exported/quickstart", int8=True)

What is exported is what the system declares (``System.onnx_export``: an OnnxPlan, prefixcap.onnx_parts): its
graphs, how a runtime runs them and its tokens. Nothing here knows one system from another. An export directory holds:

    manifest.json          format, every graph's inputs and outputs (symbolic dims named), the runtime (which graphs
                           run once per image, what the step graph is fed and when: prefixcap.onnx_spec), tokens,
                           preprocessing, generation defaults, scoring (prefixcap.onnx_scorer), versions
    <graph>.onnx           each graph of the plan (the prefix system: vision_encoder, connector and decoder, one step
                           of the decoder with its KV cache and LoRA merged; see prefixcap/onnx_parts.py)
    image_embedding.onnx   for a system that learnt a shared image-text space (an EmbeddingLoss such as itc), any
    text_embedding.onnx    system: its contrastive score's two sides (prefixcap.onnx_parts.embedding_graphs)
    *.int8.onnx            with int8=True: the same graphs with dynamically quantised int8 weights
    tokenizer.json ...     the decoder tokenizer's save_pretrained
    README.md              the model card (prefixcap.card): the exported system's metadata, training and scores
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch

from prefixcap.card import card_name, run_metrics, system_card, write_card
from prefixcap.checkpoints import installed_versions
from prefixcap.errors import summary
from prefixcap.onnx_captioner import CLEAN_UP_PROBE
from prefixcap.onnx_parts import Graph, OnnxPlan, embedding_graphs
from prefixcap.onnx_scorer import EMBEDDING_GRAPHS, ScoringSpec, TextLayout
from prefixcap.onnx_spec import FORMAT, ExportError
from prefixcap.persist import load_system, read_manifest, saved_system_dir
from prefixcap.registry import get_component
from prefixcap.scoring import MAX_TEXT_TOKENS

RESAMPLE = ("torch.nn.functional.interpolate(mode='bicubic', antialias=True, align_corners=False) on float32 RGB in "
            "[0, 1], clamped to [0, 1] after resizing; PIL's float ('F' mode) BICUBIC reproduces it within ~2e-5, "
            "not bit for bit; an image already at the target size is not resampled")  # fmt: skip
# What every export's runtime shares (prefixcap.onnx_spec), for a reader of manifest.json.
CONVENTIONS = {
    "image": "the first image graph takes pixel_values (batch, 3, S, S); later ones pixel_values or earlier outputs",
    "step": "input_ids (batch, new tokens) and attention_mask (batch, past + first-step lengths + new tokens), int64 "
            "ones, -> logits (batch, vocab) of the last position; the first step's input_ids are tokens.prompt_ids",
    "cache": "each input runtime.cache.past + suffix comes back as runtime.cache.present + suffix, grown along "
             "runtime.cache.length_axis; the first step feeds it empty",
    "positions": "from attention_mask inside the graph: cumsum(attention_mask) - 1",
    "scoring": "a text is tokenizer.json's ids of text.strip() (no special tokens), cut to scoring.max_tokens - 1; "
               "its score feeds the step graph tokens.prompt_ids then those ids and reads log p of each id and of "
               "tokens.eos_id; the blank image is pixel_values of zeros; scoring.embedding's text graph reads "
               "prompt_ids + ids (+ eos_id when scoring.inputs_end_with_eos), right-padded, attention_mask 0 on pads",
}  # fmt: skip
# Texts whose tokens export checks the system's tokenize against: spaces to strip, case, punctuation, bytes outside
# ASCII, and one longer than MAX_TEXT_TOKENS.
PROBE_TEXTS = ["a red circle left of a blue square", "  Two small GREEN triangles, one star!  ", "caf\u00e9 \u2713 42",
               "a big blue square above " * 30]  # fmt: skip
GRAPH_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # a graph is written as <name>.onnx


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
    name = system.recipe.system.name
    plan = system.onnx_export()
    if plan is None:
        dist = get_component("system", name).provider.dist
        raise ExportError(f"system {name!r} (from distribution {dist}) declares no ONNX graphs: implement "
                          "System.onnx_export, see docs/writing-a-plugin.md")  # fmt: skip
    if not isinstance(plan, OnnxPlan):
        raise ExportError(f"system {name!r}'s onnx_export returned a {type(plan).__name__}, not a "
                          "prefixcap.onnx_parts.OnnxPlan")  # fmt: skip
    if bad := [graph for graph in plan.graphs if not GRAPH_NAME.fullmatch(graph)]:
        raise ExportError(f"system {name!r}'s ONNX plan names a graph {bad[0]!r}: use letters, digits, _ and -")
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        # Written next to ``out`` and moved in only when complete: a full disk or a failed graph leaves no
        # truncated file where a runtime would read it.
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
            manifest = write_export(system, plan, source, Path(tmp), int8=int8)
            publish(Path(tmp), out)
    except OSError as e:  # ENOSPC, EDQUOT, EROFS, EACCES: the reason is all the user needs
        raise ExportError(f"cannot write the export to {out}: {e.strerror or summary(e)}") from None
    return manifest


def write_export(system: Any, plan: OnnxPlan, source: Path, out: Path, *, int8: bool) -> dict[str, Any]:
    """Write every graph, the tokenizer and manifest.json into the (empty) directory ``out``; return the manifest."""
    described, written = {}, []
    for name, graph in plan.graphs.items():
        described[name] = write_graph(graph, out / f"{name}.onnx", written)
    try:  # checked against the graphs as written, before the slow int8 pass: a plugin's mistake is found early
        steps = [plan.runtime.step, *plan.languages.values()]
        for step in steps:  # English's step graph, then each language's in its place
            plan.runtime.model_copy(update={"step": step}).check(described, alternates=steps)
    except ValueError as e:
        raise ExportError(f"system {system.recipe.system.name!r}'s ONNX plan does not fit its graphs: {e}") from None
    if int8:
        for entry in described.values():
            write_int8(out, entry, written)
    tokens, tokenizer_files = write_tokenizer(plan, out)
    scoring, scoring_files = write_scoring(system, plan, out, int8=int8)
    written += scoring_files
    # The model card of the system exported, from its manifest and its run's metrics.json (when it is a run's final/)
    card = write_card(out, system_card(source, read_manifest(source), run_metrics(source), name=card_name(source),
                                       export={"graphs": described}))  # fmt: skip
    processor = system.encoder.preprocessing  # the recipe's resize mode (image section), not only the family's
    manifest = {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "system": system.recipe.system.name,  # for people: a runtime reads "runtime", never this
        "source": source_name(source),
        "graphs": described,
        "runtime": plan.runtime.model_dump(),
        "conventions": CONVENTIONS,
        "lora_merged": plan.lora_merged,
        "languages": plan.languages,  # language -> its step graph, in place of runtime's step (prefixcap.languages)
        "tokens": tokens,
        "image": {"size": processor.size, "mean": list(processor.mean), "std": list(processor.std),
                  "resize": processor.resize, "crop_pct": processor.crop_pct, "rescale": "uint8 / 255",
                  "fill": list(processor.padding) if processor.resize == "letterbox" else None,  # the resolved colour
                  "resample": RESAMPLE, "layout": "NCHW float32"},  # fmt: skip
        "generate": system.generate_config.model_dump(),
        "scoring": scoring,
        "files": {p.name: p.stat().st_size for p in written + tokenizer_files + [card]},
        "versions": versions(),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def write_scoring(system: Any, plan: OnnxPlan, out: Path, *, int8: bool) -> tuple[dict[str, Any] | None, list[Path]]:
    """The manifest's "scoring" section (prefixcap.onnx_scorer.ScoringSpec) and the embedding graphs it names, for
    any system; None, with a warning, when its tokenize lays texts out otherwise than the ONNX scorer rebuilds them
    (the export still captions)."""
    layout = TextLayout(tuple(plan.prompt_ids), plan.eos_id, MAX_TEXT_TOKENS, bool(system.inputs_end_with_eos))
    if problem := layout_problem(system, layout, out / "tokenizer.json"):
        warnings.warn(f"the export cannot score texts ({problem}); it captions as usual", stacklevel=3)
        return None, []
    clash = [name for name in EMBEDDING_GRAPHS.values() if name in plan.graphs]
    graphs = embedding_graphs(system)
    if graphs is not None and clash:
        raise ExportError(f"system {system.recipe.system.name!r}'s ONNX plan names a graph {clash[0]!r}, which the "
                          "export writes for the contrastive score: rename it")  # fmt: skip
    embedding, written = None, []
    if graphs is not None:
        embedding = {}
        for side, graph in graphs.items():
            with warnings.catch_warnings():
                # transformers gathers output_hidden_states through a module-level collector, which dynamo reports as
                # a side effect; the states are traced all the same (tests/test_onnx_score.py compares the scores).
                warnings.filterwarnings("ignore", message="While compiling, we found certain side effects")
                embedding[side] = write_graph(graph, out / f"{EMBEDDING_GRAPHS[side]}.onnx", written)
            if int8:
                write_int8(out, embedding[side], written)
    scoring = {"max_tokens": layout.max_tokens, "inputs_end_with_eos": layout.inputs_end_with_eos, "blank": "zeros",
               "embedding": embedding, "calibration": getattr(system, "score_calibration", None)}  # fmt: skip
    ScoringSpec.model_validate(scoring)  # what OnnxScorer will accept: a mistake here is prefixcap's, found now
    return scoring, written


def layout_problem(system: Any, layout: TextLayout, tokenizer_file: Path) -> str | None:
    """Why the ONNX scorer's tokens of PROBE_TEXTS (``layout`` over the exported tokenizer.json) would differ from
    the system's tokenize, or None when they are the same."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    try:
        input_ids, mask, labels = (t.tolist() for t in system.tokenize(PROBE_TEXTS, layout.max_tokens))
    except Exception as e:  # a plugin's tokenize: whatever it raises, the export still captions
        return f"the system's tokenize failed: {summary(e)}"
    for text, ids, row_mask, row_labels in zip(PROBE_TEXTS, input_ids, mask, labels):
        tokens, real = layout.text_ids(tokenizer, text), sum(row_mask)
        if row_mask != [1] * real + [0] * (len(row_mask) - real):
            return "the system's tokenize does not right-pad"
        if ids[:real] != layout.inputs(tokens) or [i for i in row_labels if i != -100] != layout.labels(tokens):
            return (f"the system's tokenize lays {text[:40]!r} out otherwise than [prompt] text EOS from "
                    "tokenizer.json")  # fmt: skip
    return None


def write_graph(graph: Graph, path: Path, written: list[Path]) -> dict[str, Any]:
    """Export ``graph`` to ``path``; its manifest entry (file, inputs, outputs). Adds its files to ``written``."""
    export_graph(graph, path)
    written += with_data(path)
    return {"file": path.name, **describe(path)}


def write_int8(out: Path, entry: dict[str, Any], written: list[Path]) -> None:
    """Quantise the graph of manifest ``entry`` (in ``out``) and name its int8 file there; adds its files."""
    quantized = quantize(out / entry["file"])
    entry["int8_file"] = quantized.name
    written += with_data(quantized)


def publish(staging: Path, out: Path) -> None:
    """Move the complete export in ``staging`` into ``out`` (which may hold other files), manifest.json last: a
    reader that finds the new manifest finds every file it names."""
    out.mkdir(exist_ok=True)
    names = sorted((p.name for p in staging.iterdir()), key=lambda name: name == "manifest.json")
    for name in names:
        os.replace(staging / name, out / name)


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
        external = len(with_data(path)) > 1
        try:
            quant_pre_process(path, prepared, save_as_external_data=external)
        except Exception:  # onnxruntime's symbolic shape inference fails on some graphs' Expand (the
            # embedding graphs' F.normalize) with a bare TypeError; ONNX's own shape inference still prepares them.
            quant_pre_process(path, prepared, save_as_external_data=external, skip_symbolic_shape=True)
        quantize_dynamic(prepared, target, weight_type=QuantType.QInt8)
    return target


def write_tokenizer(plan: OnnxPlan, out: Path) -> tuple[dict[str, Any], list[Path]]:
    """Save the plan's tokenizer; return the special ids and decoding settings a runtime needs, and the files."""
    tokenizer = plan.tokenizer
    files = [Path(f) for f in tokenizer.save_pretrained(str(out))]
    if not (out / "tokenizer.json").is_file():
        raise ExportError(f"the decoder's tokenizer ({type(tokenizer).__name__}) has no tokenizer.json to export")
    # Whether decode() cleans up spaces before punctuation on top of the tokenizers library's decode depends on the
    # tokenizer's settings, its model type and the transformers version: ask it.
    probe = tokenizer(CLEAN_UP_PROBE, add_special_tokens=False).input_ids
    clean_up = tokenizer.decode(probe) != tokenizer.backend_tokenizer.decode(probe)
    tokens = {"tokenizer": "tokenizer.json", "bos_id": tokenizer.bos_token_id, "eos_id": plan.eos_id,
              "pad_id": plan.pad_id, "prompt_ids": list(plan.prompt_ids),
              "decode": {"skip_special_tokens": True, "clean_up_tokenization_spaces": clean_up,
                         "strip": True}}  # fmt: skip
    return tokens, files


def versions() -> dict[str, str]:
    return installed_versions(("prefixcap", "torch", "transformers", "peft", "onnx", "onnxscript", "onnxruntime"))
