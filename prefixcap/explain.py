"""Where each word comes from: for every word of a system's greedy caption, a heatmap over the image.

    explanation = system.explain(image)                     # or explain(system, images) for a batch
    explanation.words[2].text, explanation.word_maps()[2]   # "circle", (rows, cols) summing to 1
    explanation.peak(2)                                     # (x, y) in the original image's pixels

Two methods, for any system:

attention  What the decoder reads while it writes each token: ``System.attention_maps``, which each system owns (the
           cross-attention baseline's cross-attention weights; the prefix system's attention from each written token
           to the prefix positions, spread back over the patches through ``Connector.source_weights``). Kept per layer
           and head; by default averaged over both (DEFAULT_LAYERS, DEFAULT_HEADS; docs/explain.md says why).
gradient   Gradient x input on the encoder's output tokens: how strongly each token's features move the
           log-probability of the written token (the L2 size of grad * features over the width). It needs nothing
           from the system but ``System.forward`` and ``System.encoder``, so a plugin system has it too, and it does
           not see attention sinks (a decoder parks attention on its first prefix position whatever the image).

Both then go back through the encoder (``rollout``): a transformer encoder mixes its tokens, so its output token i
is not about patch i alone, and ``Encoder.token_sources`` (attention rollout for transformer encoders) says what each
output token draws on. docs/explain.md has the pointing-game figures with and without it.

Every map is over the encoder's patch grid (``Encoder.patch_grid``: class or register tokens left out), non-negative,
and sums to 1 over the grid; a map with no evidence at all (every gradient negative) is uniform. A word's map is the
mean of its tokens' maps. The maps explain the caption as ``System.tokenize`` lays it out, which is what the system
scores: the greedy caption, written out and read back.

Images of any size go through the system's own preprocessing; ``Explanation.placement`` says where the original
image lies in the model's square input (``ImageProcessor.placement``), so maps are drawn back onto the original
(prefixcap/explain_render.py) and peaks are given in its pixels whatever the resize mode.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from prefixcap.errors import PrefixcapError
from prefixcap.interfaces import Batch
from prefixcap.images import to_rgb_tensor

if TYPE_CHECKING:
    from prefixcap.interfaces import System

METHODS = ("attention", "gradient")
# The documented default aggregation of attention maps: the mean over every layer and head (docs/explain.md has the
# pointing-game figures behind the choice).
DEFAULT_LAYERS: int | None = None  # None: mean over layers; an int: that layer (negative counts from the last)
DEFAULT_HEADS: int | None = None
MAX_CAPTION_TOKENS = 64  # a longer greedy caption is explained on its start


@dataclass
class Word:
    text: str
    tokens: list[int]  # indices into Explanation.tokens


@dataclass
class Explanation:
    """One image's caption and maps. ``maps`` is (T, layers, heads, rows, cols): one map per caption token, per layer
    and head for the attention method (1 x 1 for the gradient method), as measured: attention mass on each patch, or
    gradient x input. ``token_maps`` and ``word_maps`` normalise them as the module says."""

    caption: str
    tokens: list[str]  # the caption's tokens as text, spaces kept (" circle")
    words: list[Word]
    method: str
    maps: Tensor
    image_size: tuple[int, int]  # (width, height) of the original image
    input_size: int  # the side of the model's square input
    placement: tuple[float, float, float, float]  # where the original lies in that input (ImageProcessor.placement)
    resize: str  # the resize mode that made the input
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.maps.shape[-2:])

    def token_maps(self, layer: int | None = DEFAULT_LAYERS, head: int | None = DEFAULT_HEADS) -> Tensor:
        """(T, rows, cols), each summing to 1: the maps of one layer and head, or the mean over them (None), then
        normalised. Averaged before normalising, so a head that barely looks at the image (most of its attention on
        the text) adds little, rather than its few stray weights counting as much as a head that reads the image."""
        maps = self.maps
        maps = maps.mean(1) if layer is None else maps[:, layer]
        maps = maps.mean(1) if head is None else maps[:, head]
        return _normalised(maps)

    def word_maps(self, layer: int | None = DEFAULT_LAYERS, head: int | None = DEFAULT_HEADS) -> Tensor:
        """(words, rows, cols), each summing to 1: the mean of each word's token maps."""
        tokens = self.token_maps(layer, head)
        if not self.words:
            return tokens[:0]
        return torch.stack([tokens[w.tokens].mean(0) for w in self.words])

    def peak(self, word: int, layer: int | None = DEFAULT_LAYERS, head: int | None = DEFAULT_HEADS) -> tuple[float, float]:
        """Where word ``word``'s map is highest, as (x, y) in the original image's pixels (see ``peak``)."""
        col, row = peak(self.word_maps(layer, head)[word].double().numpy())
        rows, cols = self.grid
        return self.to_image(col * self.input_size / cols, row * self.input_size / rows)

    def to_image(self, u: float, v: float) -> tuple[float, float]:
        """A point of the model's input (pixels of the square) -> the same point of the original image."""
        x0, y0, x1, y1 = self.placement
        width, height = self.image_size
        return (u - x0) * width / (x1 - x0), (v - y0) * height / (y1 - y0)

    def to_json(self, per_layer: bool = False, per_head: bool = False) -> dict[str, Any]:
        """What `prefixcap explain` writes: the caption, its tokens and words, each word's map (aggregated by
        default; per layer, or per layer and head, as asked) and peak, and the geometry to draw them back."""
        rows, cols = self.grid
        words = []
        for i, (word, grid) in enumerate(zip(self.words, self.word_maps())):
            entry = {"text": word.text, "tokens": word.tokens, "peak": [round(c, 2) for c in self.peak(i)],
                     "map": _rounded(grid)}  # fmt: skip
            if per_layer or per_head:
                maps = self.maps[word.tokens]  # (t, layers, heads, rows, cols)
                layers, heads = range(maps.shape[1]), range(maps.shape[2])
                if per_head:
                    entry["heads"] = [[_rounded(_normalised(maps[:, i, h]).mean(0)) for h in heads] for i in layers]
                else:
                    entry["layers"] = [_rounded(_normalised(maps[:, i].mean(1)).mean(0)) for i in layers]
            words.append(entry)
        return {
            "caption": self.caption, "method": self.method, "tokens": self.tokens,
            "aggregation": None if self.method != "attention" else {
                "layers": "mean" if DEFAULT_LAYERS is None else DEFAULT_LAYERS,
                "heads": "mean" if DEFAULT_HEADS is None else DEFAULT_HEADS},
            "grid": [rows, cols], "layers": int(self.maps.shape[1]), "heads": int(self.maps.shape[2]),
            "image_size": list(self.image_size), "input_size": self.input_size, "resize": self.resize,
            "placement": [round(c, 4) for c in self.placement], "words": words, **self.extra,
        }  # fmt: skip


PEAK_SUBCELLS = 8  # the smoothed map's resolution, per cell and axis


def peak(grid: np.ndarray) -> tuple[float, float]:
    """(x, y) in cell units (0 to cols, 0 to rows) where a map is highest once drawn smoothly: each cell's value spread
    over its area and blurred with a Gaussian of half a cell (sigma). A word whose evidence splits between two
    cells then points between them, where the thing it names straddles them, rather than at the centre of whichever
    cell is a hair higher; a prefix token spread evenly over 2x2 patches points at the middle of the four."""
    fine = np.kron(grid, np.ones((PEAK_SUBCELLS, PEAK_SUBCELLS)))
    offsets = np.arange(-2 * PEAK_SUBCELLS, 2 * PEAK_SUBCELLS + 1)
    kernel = np.exp(-0.5 * (offsets / (PEAK_SUBCELLS / 2)) ** 2)
    for axis in (0, 1):  # zero beyond the edges: the image ends there, so no evidence lies outside it
        fine = np.apply_along_axis(np.convolve, axis, fine, kernel, mode="same")
    row, col = np.unravel_index(int(fine.argmax()), fine.shape)
    return (col + 0.5) / PEAK_SUBCELLS, (row + 0.5) / PEAK_SUBCELLS


def explain(system: System, images: Sequence[Any], method: str = "attention", *, resize: str | None = None,
            captions: Sequence[str] | None = None, rollout: bool = True) -> list[Explanation]:  # fmt: skip
    """Each image's greedy caption (or the given ``captions``) and its per-token maps by ``method``; images as
    ``system.caption`` takes them, preprocessed with ``resize`` (None: the system's own mode). ``rollout``: map what
    the decoder reads back through the encoder's own mixing of its tokens (Encoder.token_sources), else leave the
    encoder's output token i standing for patch i."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    images = list(images)
    if captions is not None and len(captions) != len(images):
        raise ValueError(f"{len(captions)} captions for {len(images)} images: give one caption an image")
    if not images:
        return []
    processor = system.encoder.preprocessing
    if resize is not None:
        processor = dataclasses.replace(processor, resize=resize)
    sizes = [tuple(to_rgb_tensor(image).shape[:0:-1]) for image in images]  # (width, height)
    device = next(system.parameters()).device
    training = system.training
    system.eval()
    try:
        pixels = processor(images).to(device)
        if captions is None:
            with torch.inference_mode():
                captions = system.generate(pixels, system.generate_config.model_copy(
                    update=dict(do_sample=False, num_beams=1, repetition_penalty=1.0)))  # explain the greedy caption
        input_ids, mask, labels = system.tokenize(list(captions), MAX_CAPTION_TOKENS)
        batch = Batch(pixel_values=pixels, input_ids=input_ids.to(device), attention_mask=mask.to(device),
                      labels=labels.to(device), captions=list(captions))  # fmt: skip
        maps = _attention(system, batch) if method == "attention" else _gradient(system, batch)  # (B, L, H, T, N)
        if rollout:
            with torch.inference_mode():
                sources = system.encoder.token_sources(pixels)  # (B, N, N) or None
            if sources is not None:
                maps = maps.float() @ sources.float()[:, None, None]
    finally:
        system.train(training)
    try:
        first, rows, cols = system.encoder.patch_grid
    except NotImplementedError as e:
        raise ExplainError(str(e)) from None
    maps = maps[..., first : first + rows * cols].float().cpu()
    maps = maps.reshape(*maps.shape[:-1], rows, cols).permute(0, 3, 1, 2, 4, 5)  # (B, T, L, H, rows, cols)
    out = []
    for i, (caption, size) in enumerate(zip(captions, sizes)):
        positions = _caption_positions(labels[i], system)
        tokens = _token_texts(system, labels[i, positions].tolist())
        out.append(Explanation(caption=caption, tokens=tokens, words=_words(tokens), method=method,
                               maps=maps[i, positions], image_size=size, input_size=processor.size,
                               placement=processor.placement(*size), resize=processor.resize,
                               extra={"rollout": rollout}))  # fmt: skip
    return out


class ExplainError(PrefixcapError):
    """The system cannot be explained this way (a plugin without attention maps, an encoder without a patch grid)."""


def _attention(system: System, batch: Batch) -> Tensor:
    with torch.inference_mode():
        try:
            return system.attention_maps(batch)
        except NotImplementedError as e:
            raise ExplainError(f"{e}; --method gradient explains any system") from None


def _gradient(system: System, batch: Batch) -> Tensor:
    """(B, 1, 1, T, N): the size of grad * features (elementwise, L2 over the width) on the encoder's output, for each
    label position."""
    captured: list[Tensor] = []

    def keep(module: Any, args: Any, output: Tensor) -> Tensor:
        if not output.requires_grad:  # a frozen encoder's output: made a leaf that gradients reach
            output = output.detach().requires_grad_()
        captured.append(output)
        return output

    handle = system.encoder.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            logits = system(batch).logits  # (B, T, V): position t predicts labels[:, t]
            labels = batch.labels
            logp = logits.float().log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]  # (B, T)
            (tokens,) = captured
            maps = []
            for t in range(labels.shape[1]):
                if not bool((labels[:, t] != -100).any()):
                    maps.append(tokens.new_zeros(tokens.shape[:2]))
                    continue
                # Rows are independent, so the gradient of the batch's sum is each row's own gradient.
                (grad,) = torch.autograd.grad(logp[:, t].masked_fill(labels[:, t] == -100, 0).sum(), tokens,
                                              retain_graph=t < labels.shape[1] - 1)  # fmt: skip
                maps.append((grad * tokens).norm(dim=-1).detach())  # (B, N)
    finally:
        handle.remove()
    return torch.stack(maps, dim=1)[:, None, None]  # (B, 1, 1, T, N)


def _caption_positions(labels: Tensor, system: System) -> list[int]:
    """Label positions of the caption's own tokens: trained labels but the final EOS (no word to draw for it)."""
    positions = torch.nonzero(labels != -100).flatten().tolist()
    eos = getattr(system.decoder, "eos_id", None) or getattr(system.decoder.tokenizer, "eos_token_id", None)
    if positions and int(labels[positions[-1]]) == eos:
        positions = positions[:-1]
    return positions


def _token_texts(system: System, ids: list[int]) -> list[str]:
    """Each token as the text it adds to the caption (decoded incrementally, so byte-level pieces come out whole)."""
    tokenizer = system.decoder.tokenizer
    texts, before = [], ""
    for k in range(len(ids)):
        text = tokenizer.decode(ids[: k + 1], skip_special_tokens=True)
        texts.append(text[len(before) :])
        before = text
    return texts


def _words(tokens: list[str]) -> list[Word]:
    """Tokens grouped into words: a token that starts with a space (or the first) starts a word; punctuation and
    word pieces join the word before them."""
    words: list[Word] = []
    for i, piece in enumerate(tokens):
        if not words or piece[:1].isspace():
            words.append(Word(piece.strip(), [i]))
        else:
            words[-1].text += piece.strip()
            words[-1].tokens.append(i)
    return [w for w in words if w.text]


def _normalised(maps: Tensor) -> Tensor:
    """Each map (the last two dims) divided by its sum; a map that sums to 0 becomes uniform."""
    total = maps.sum((-2, -1), keepdim=True)
    uniform = torch.full_like(maps, 1.0 / (maps.shape[-1] * maps.shape[-2]))
    return torch.where(total > 0, maps / total.clamp(min=1e-30), uniform)


def _rounded(grid: Tensor) -> list[list[float]]:
    return [[round(float(v), 5) for v in row] for row in grid]
