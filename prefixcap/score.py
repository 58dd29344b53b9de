"""How well a text matches an image, judged by the system that writes the captions: two scores, both reported.

generative   mean log p(text | image) - mean log p(text | blank image), per text token (EOS included). The first
             term alone would favour a fluent or frequent caption whatever the image; subtracting what the system
             expects with nothing to look at (a blank image: every pixel the encoder's mean colour, zeros after
             normalisation) leaves what the image adds. Every system has it: it reads only System.forward's logits,
             and an ONNX export computes it with the graphs it captions with. Higher is better; 0 means the image
             makes the text no likelier.
contrastive  cosine of the image and text embeddings a system learnt with an EmbeddingLoss (the ``itc`` loss) beside
             caption-ce, in [-1, 1]; None for a system that learnt none.

    scores = system.score(images, ["a red circle", "a blue square"])   # Scores: (images, texts) matrices
    scores.generative[0, 1], scores.contrastive[0, 1]

Texts are scored up to MAX_TEXT_TOKENS tokens (about 250 characters of English: twice the longest alt text); a
longer text is judged on its start. Nothing here holds more than one batch of texts: ``TorchScorer`` is what
`prefixcap score` streams through (prefixcap.score_rows), as the ONNX scorer is.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from prefixcap.interfaces import Batch

if TYPE_CHECKING:
    from prefixcap.interfaces import System

from prefixcap.scoring import KINDS, MAX_TEXT_TOKENS, score_groups  # noqa: F401  (KINDS: re-exported for callers)


@dataclass
class Scores:
    """Scores of every (image, text) pair: matrices of shape (images, texts)."""

    generative: np.ndarray
    contrastive: np.ndarray | None  # None: the system learnt no shared space

    def of(self, kind: str) -> np.ndarray:
        value = getattr(self, kind)
        if value is None:
            raise ValueError(f"this system has no {kind} score (train it with the itc loss for one)")
        return value


@dataclass
class ImageState:
    """What scoring texts against a group of images needs, computed once per image."""

    visual: Tensor  # (G, N, D) encoder features when the system starts from them, else (G, 3, S, S) pixels
    from_features: bool
    embedding: Tensor | None  # (G, E) unit norm, or None


class TorchScorer:
    """Scores texts against images with a System in PyTorch, a group of images and a chunk of texts at a time."""

    def __init__(self, system: System, max_tokens: int = MAX_TEXT_TOKENS):
        self.system, self.max_tokens = system, max_tokens
        self.device = next(system.parameters()).device
        self.embedder = system.embedding_loss()
        self.kinds = KINDS if self.embedder is not None else KINDS[:1]
        size = system.encoder.preprocessing.size
        self._blank = self.prepare_pixels(torch.zeros(1, 3, size, size))

    @torch.inference_mode()
    def prepare(self, images: Sequence[Any]) -> ImageState:
        """Images (PIL, arrays or tensors, as the encoder's processor takes them) -> their state for scoring."""
        return self.prepare_pixels(self.system.encoder.preprocess(images))

    @torch.inference_mode()
    def prepare_pixels(self, pixels: Tensor) -> ImageState:
        system = self.system
        system.eval()
        pixels = pixels.to(self.device)
        # The encoder runs once per image, not once per text, wherever the system can start from its output.
        features = system.encoder(pixels) if system.accepts_features else None
        visual = features if features is not None else pixels
        embedding = None
        if self.embedder is not None:
            tokens = system.visual_tokens(features=features) if features is not None else system.visual_tokens(pixels)
            embedding = self.embedder.image_embedding(tokens)
        return ImageState(visual, features is not None, embedding)

    @torch.inference_mode()
    def score(self, state: ImageState, texts: Sequence[str], images: Sequence[int] | None = None) -> dict[str, np.ndarray]:
        """{kind: (G, C) scores} for the state's images (those at ``images``, default all G) against C non-empty
        texts."""
        if any(not t.strip() for t in texts):
            raise ValueError("an empty text has nothing to score")
        system = self.system
        ids, mask, labels = (t.to(self.device) for t in system.tokenize(list(texts), self.max_tokens))
        blank = self._log_likelihood(self._blank, 0, ids, mask, labels)  # (C,)
        rows = list(range(len(state.visual))) if images is None else list(images)
        generative = torch.stack([self._log_likelihood(state, g, ids, mask, labels) - blank for g in rows])
        out = {"generative": generative.float().cpu().numpy()}
        if self.embedder is not None and state.embedding is not None:
            text = self.embedder.text_embedding(system.text_states(ids, mask), mask)  # (C, E)
            out["contrastive"] = (state.embedding[rows] @ text.T).float().cpu().numpy()
        return out

    @torch.inference_mode()
    def score_pairs(self, state: ImageState, texts: Sequence[str], images: Sequence[int]) -> dict[str, np.ndarray]:
        """{kind: (C,)}: text ``i`` scored against image ``images[i]`` of the state only (no (G, C) matrix), as
        reranking and calibration need; also "likelihood", the generative score's first term (mean log p(text |
        image)), which reranking adds to the contrastive score (prefixcap/judge.py)."""
        if any(not t.strip() for t in texts):
            raise ValueError("an empty text has nothing to score")
        system = self.system
        ids, mask, labels = (t.to(self.device) for t in system.tokenize(list(texts), self.max_tokens))
        rows = torch.tensor(list(images), device=self.device)
        paired = ImageState(state.visual[rows], state.from_features, None)
        likelihood = self._log_likelihood(paired, None, ids, mask, labels)
        generative = likelihood - self._log_likelihood(self._blank, 0, ids, mask, labels)
        out = {"generative": generative.float().cpu().numpy(), "likelihood": likelihood.float().cpu().numpy()}
        if self.embedder is not None and state.embedding is not None:
            text = self.embedder.text_embedding(system.text_states(ids, mask), mask)  # (C, E)
            out["contrastive"] = (state.embedding[rows] * text).sum(-1).float().cpu().numpy()
        return out

    def _log_likelihood(self, state: ImageState, g: int | None, ids: Tensor, mask: Tensor, labels: Tensor) -> Tensor:
        """Mean log-probability of each text's tokens (its labels) given image ``g`` of ``state`` (None: text i given
        image i): (C,)."""
        # contiguous: a system may view() its input (GPT-2's cross-attention does), which an expanded tensor refuses
        visual = state.visual if g is None else state.visual[g : g + 1].expand(len(ids), *state.visual.shape[1:])
        visual = visual.contiguous()
        batch = Batch(pixel_values=None if state.from_features else visual, input_ids=ids, attention_mask=mask,
                      labels=labels, features=visual if state.from_features else None)  # fmt: skip
        out = self.system(batch)
        return token_log_likelihood(out.logits, out.labels)


def token_log_likelihood(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean log-probability of the labelled tokens of each row (labels -100 are not scored): (B, T, V) -> (B,)."""
    scored = labels != -100
    logp = -F.cross_entropy(logits.float().transpose(1, 2), labels.clamp(min=0), reduction="none")  # (B, T)
    return (logp * scored).sum(1) / scored.sum(1).clamp(min=1)


def score_matrix(system: System, images: Sequence[Any], texts: Sequence[str], *, batch_size: int = 64,
                 max_tokens: int = MAX_TEXT_TOKENS) -> Scores:  # fmt: skip
    """Every (image, text) pair's scores: ``System.score``. Raises ValueError for an empty text (naming it)."""
    if empty := [i for i, t in enumerate(texts) if not str(t).strip()]:
        raise ValueError(f"text {empty[0]} is empty: there is nothing to score")
    if not len(images) or not len(texts):
        raise ValueError("give at least one image and one text")
    scorer = TorchScorer(system, max_tokens)
    training = system.training
    try:
        rows: dict[str, list[np.ndarray]] = {kind: [] for kind in scorer.kinds}
        for i in range(0, len(images), batch_size):
            state = scorer.prepare(images[i : i + batch_size])
            chunks = [scorer.score(state, texts[j : j + batch_size]) for j in range(0, len(texts), batch_size)]
            for kind in scorer.kinds:
                rows[kind].append(np.concatenate([c[kind] for c in chunks], axis=1))
    finally:
        system.train(training)
    matrices = {kind: np.concatenate(parts, axis=0) for kind, parts in rows.items()}
    return Scores(matrices["generative"], matrices.get("contrastive"))


def score_candidates(system: System, images: Sequence[Any], candidates: Sequence[Sequence[str]], *,
                     max_tokens: int = MAX_TEXT_TOKENS) -> list[dict[str, np.ndarray]]:  # fmt: skip
    """Each image's own candidate texts scored against it (reranking): one {kind: (K_i,)} per image."""
    if len(images) != len(candidates):
        raise ValueError(f"{len(images)} images but {len(candidates)} candidate lists")
    scorer = TorchScorer(system, max_tokens)
    training = system.training
    try:
        return score_groups(scorer, scorer.prepare(images), candidates)
    finally:
        system.train(training)


CALIBRATION_QUANTILE = 0.05


def calibrate(scorer: TorchScorer, batches: Iterable[tuple[Tensor, list[str]]],
              quantile: float = CALIBRATION_QUANTILE) -> dict[str, dict[str, float]]:  # fmt: skip
    """The default ``--min-score`` of each score type: the score that ``1 - quantile`` of held-out images' own
    reference captions reach (so 95% of true captions pass). ``batches``: (pixels, one reference per image)."""
    found: dict[str, list[np.ndarray]] = {kind: [] for kind in scorer.kinds}
    for pixels, texts in batches:
        state = scorer.prepare_pixels(pixels)
        scores = scorer.score_pairs(state, texts, range(len(texts)))
        for kind in found:  # score_pairs also gives the raw likelihood, which has no threshold of its own
            found[kind].append(scores[kind])
    out = {}
    for kind, parts in found.items():
        values = np.concatenate(parts) if parts else np.zeros(0)
        if len(values):
            out[kind] = {"min_score": round(float(np.quantile(values, quantile)), 6), "quantile": quantile,
                         "pairs": int(len(values))}  # fmt: skip
    return out
