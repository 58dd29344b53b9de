"""Score (image, text) pairs with an exported system on onnxruntime, as prefixcap.score.TorchScorer does in PyTorch,
with numpy, PIL and tokenizers only (`prefixcap score --onnx DIR`, `prefixcap caption --onnx DIR --min-score`).

    scorer = OnnxScorer("exported/quickstart")
    scorer.score(scorer.prepare([Image.open("photo.jpg")]), ["a red circle"])   # {kind: (images, texts)}

generative   the captioner's own graphs, teacher-forced: the image graphs once per image (and once for the blank
             image, zeros in pixel_values), then the step graph from tokens.prompt_ids, one text token a step (the
             step graph gives the last position's logits only, which is all greedy decoding reads), collecting
             log p of each text token and of EOS. Mean per token with the image minus the same with the blank one.
contrastive  two graphs the export adds for a system with an EmbeddingLoss (prefixcap.onnx_parts.embedding_graphs):
             image_embedding(pixel_values) and text_embedding(input_ids, attention_mask); the cosine of the two.

What makes the texts' tokens the same as PyTorch's is the manifest's "scoring" section (ScoringSpec), written by
prefixcap.export only after checking that the system's tokenize lays texts out as TextLayout rebuilds them from
tokenizer.json. Like the rest of the manifest it is a stranger's file: validated strictly before anything is run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from tokenizers import Tokenizer

from prefixcap.onnx_captioner import GraphSpec, OnnxCaptioner, file_inside, open_session
from prefixcap.onnx_spec import ATTENTION_MASK, INPUT_IDS, PIXELS, ExportError
from prefixcap.scoring import KINDS, Calibration

EMBEDDING_GRAPHS = {"image": "image_embedding", "text": "text_embedding"}  # the scoring graphs' file stems
EMBEDDING_INPUTS = {"image": [PIXELS], "text": [INPUT_IDS, ATTENTION_MASK]}
REEXPORT = "re-export it with this prefixcap version (prefixcap export RUN_OR_CHECKPOINT --out DIR)"


class ScoringGraph(GraphSpec):
    model_config = ConfigDict(extra="forbid", strict=True)


class EmbeddingSpec(BaseModel):
    """The contrastive score's graphs: pixel_values -> (batch, E) and input_ids, attention_mask -> (batch, E)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    image: ScoringGraph
    text: ScoringGraph

    @model_validator(mode="after")
    def wired(self) -> EmbeddingSpec:
        for side, graph in (("image", self.image), ("text", self.text)):
            names = sorted(value.name for value in graph.inputs)
            if names != sorted(EMBEDDING_INPUTS[side]):
                raise ValueError(f"the {side} graph must take {' and '.join(EMBEDDING_INPUTS[side])}, not {names}")
            if len(graph.outputs) != 1:
                raise ValueError(f"the {side} graph must give one output, its embedding, not {len(graph.outputs)}")
        return self


class ScoringSpec(BaseModel):
    """manifest.json's "scoring": how texts are laid out (TextLayout), the embedding graphs, the calibration."""

    model_config = ConfigDict(extra="forbid", strict=True)
    max_tokens: int = Field(ge=1, le=4096)
    inputs_end_with_eos: bool
    blank: Literal["zeros"]  # the no-image baseline: pixel_values all zeros (the encoder's mean colour)
    embedding: EmbeddingSpec | None
    calibration: Calibration | None


def read_scoring(directory: Path, manifest: dict[str, Any]) -> ScoringSpec:
    """The export's scoring section, checked; ExportError saying what to do when it is absent or malformed."""
    path = directory / "manifest.json"
    if "scoring" not in manifest:
        raise ExportError(f"{directory}: this export predates scoring (its manifest has no scoring section): "
                          f"{REEXPORT}")  # fmt: skip
    if manifest["scoring"] is None:
        raise ExportError(f"{directory}: this export cannot score: its system's tokenize lays texts out otherwise "
                          "than [prompt] text EOS, which the ONNX scorer rebuilds; score it with PyTorch")  # fmt: skip
    try:
        return ScoringSpec.model_validate(manifest["scoring"])
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(map(str, first["loc"]))
        raise ExportError(f"{path}: invalid manifest: scoring{'.' + where if where else ''}: {first['msg']}") from None


@dataclass(frozen=True)
class TextLayout:
    """A text's tokens as prefixcap's systems tokenize it (Decoder.tokenize): the step graph is fed ``prompt_ids``
    then the text's tokens, and the text's tokens then EOS are scored; the text-alone embedding reads ``prompt_ids``,
    the text's tokens and, where the system's inputs end with it, EOS."""

    prompt_ids: tuple[int, ...]
    eos_id: int
    max_tokens: int
    inputs_end_with_eos: bool

    def text_ids(self, tokenizer: Tokenizer, text: str) -> list[int]:
        # EOS counts in max_tokens: a longer text is judged on its start, and still ends.
        return tokenizer.encode(text.strip(), add_special_tokens=False).ids[: max(self.max_tokens - 1, 0)]

    def labels(self, ids: list[int]) -> list[int]:
        return [*ids, self.eos_id]

    def inputs(self, ids: list[int]) -> list[int]:
        return [*self.prompt_ids, *ids, *([self.eos_id] if self.inputs_end_with_eos else [])]


@dataclass
class OnnxImageState:
    """A group of images, encoded once: what the step graph is fed of each (batch first) and their embeddings."""

    encoded: dict[str, np.ndarray]
    embedding: np.ndarray | None  # (G, E) unit norm, or None
    count: int = 1  # G

    def take(self, rows: Sequence[int]) -> dict[str, np.ndarray]:
        return {name: np.take(value, list(rows), axis=0) for name, value in self.encoded.items()}


class OnnxScorer:
    """The scorer protocol of prefixcap.score_rows (kinds, prepare, score) and of reranking (score_pairs,
    calibration), over an export directory."""

    def __init__(self, directory: str | Path, *, int8: bool = False, threads: int | None = None,
                 captioner: OnnxCaptioner | None = None):  # fmt: skip
        """``captioner``: the OnnxCaptioner of the same directory, already open (caption --onnx --min-score), whose
        graphs the generative score runs: they are not opened twice."""
        self.captioner = captioner or OnnxCaptioner(directory, int8=int8, threads=threads)
        int8 = self.captioner.int8
        directory = self.captioner.directory
        spec = read_scoring(directory, self.captioner.manifest)
        tokens = self.captioner.tokens
        self.layout = TextLayout(tuple(tokens["prompt_ids"]), tokens["eos_id"], spec.max_tokens,
                                 spec.inputs_end_with_eos)  # fmt: skip
        pad = tokens.get("pad_id")
        self.pad_id = pad if isinstance(pad, int) else self.layout.eos_id  # padding is masked: any real id will do
        self.calibration = spec.calibration.model_dump(exclude_none=True) if spec.calibration else None
        self.kinds = KINDS if spec.embedding is not None else KINDS[:1]
        self.embedders: dict[str, Any] = {}
        if spec.embedding is not None:
            options = self.captioner.session_options
            for side in ("image", "text"):
                graph = getattr(spec.embedding, side)
                name = graph.int8_file if int8 else graph.file
                if name is None:
                    raise ExportError(f"{directory}: no int8 {side} embedding graph (export with int8=True)")
                self.embedders[side] = open_session(file_inside(directory, name), graph.model_dump(), options)
        size = self.captioner.manifest["image"]["size"]
        self._blank = OnnxImageState(self.captioner.encode(np.zeros((1, 3, size, size), dtype=np.float32)), None)

    def prepare(self, images: Sequence[Image.Image]) -> OnnxImageState:
        """RGB PIL images -> their state for scoring (the image graphs and the image embedding run once each)."""
        pixels = self.captioner.pixel_values(list(images))
        embedding = self._embed("image", {PIXELS: pixels}) if self.embedders else None
        return OnnxImageState(self.captioner.encode(pixels), embedding, len(pixels))

    def score(self, state: OnnxImageState, texts: Sequence[str], images: Sequence[int] | None = None
              ) -> dict[str, np.ndarray]:  # fmt: skip
        """{kind: (G, C) scores} for the state's images (those at ``images``, default all) against C texts."""
        ids = self._tokenize(texts)
        rows = list(range(state.count)) if images is None else list(images)
        if not ids:
            return {kind: np.zeros((len(rows), 0), dtype=np.float32) for kind in self.kinds}
        blank = self._log_likelihood(self._blank.take([0] * len(ids)), ids)
        generative = [self._log_likelihood(state.take([g] * len(ids)), ids) - blank for g in rows]
        out = {"generative": np.stack(generative).astype(np.float32)}
        if state.embedding is not None:
            out["contrastive"] = state.embedding[rows] @ self._text_embedding(ids).T
        return out

    def score_pairs(self, state: OnnxImageState, texts: Sequence[str], images: Sequence[int]) -> dict[str, np.ndarray]:
        """{kind: (C,)}: text ``i`` against image ``images[i]`` only, and "likelihood" (mean log p(text | image)),
        as TorchScorer.score_pairs."""
        ids, rows = self._tokenize(texts), list(images)
        if not ids:
            return {kind: np.zeros(0, dtype=np.float32) for kind in (*self.kinds, "likelihood")}
        likelihood = self._log_likelihood(state.take(rows), ids)
        generative = likelihood - self._log_likelihood(self._blank.take([0] * len(ids)), ids)
        out = {"generative": generative.astype(np.float32), "likelihood": likelihood.astype(np.float32)}
        if state.embedding is not None:
            out["contrastive"] = (state.embedding[rows] * self._text_embedding(ids)).sum(-1)
        return out

    def _tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        if any(not t.strip() for t in texts):
            raise ValueError("an empty text has nothing to score")
        return [self.layout.text_ids(self.captioner.tokenizer, text) for text in texts]

    def _log_likelihood(self, encoded: dict[str, np.ndarray], ids: list[list[int]]) -> np.ndarray:
        """Mean log-probability of each text's tokens and EOS, text ``i`` given row ``i`` of ``encoded``: (C,)."""
        # Longest first, so that the rows still being fed are always the first ``active``: a finished text leaves
        # the batch instead of being stepped through padding.
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        labels = [self.layout.labels(ids[i]) for i in order]
        width = len(labels[0])
        fed = np.full((len(ids), width), self.pad_id, dtype=np.int64)
        for row, label in enumerate(labels):
            fed[row, : len(label) - 1] = label[:-1]
        total = np.zeros(len(ids))
        logits, feed = self.captioner.begin({k: v[order] for k, v in encoded.items()}, len(ids))
        for t in range(width):
            active = sum(len(label) > t for label in labels)
            logp = log_softmax(logits[:active].astype(np.float64))
            total[:active] += logp[np.arange(active), [label[t] for label in labels[:active]]]
            if t + 1 == width:
                break
            active = sum(len(label) > t + 1 for label in labels)
            feed = {name: value[:active] for name, value in feed.items()}
            logits, feed = self.captioner.step(feed, fed[:active, t : t + 1])
        out = np.empty(len(ids))
        out[order] = total / [len(label) for label in labels]
        return out

    def _text_embedding(self, ids: list[list[int]]) -> np.ndarray:
        rows = [self.layout.inputs(row) for row in ids]
        width = max(map(len, rows))
        input_ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):  # right-padded, as tokenize pads: the pool reads each row's last real token
            input_ids[i, : len(row)], mask[i, : len(row)] = row, 1
        return self._embed("text", {INPUT_IDS: input_ids, ATTENTION_MASK: mask})

    def _embed(self, side: str, feed: dict[str, np.ndarray]) -> np.ndarray:
        session = self.embedders[side]
        return session.run(None, {i.name: feed[i.name] for i in session.get_inputs()})[0]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
