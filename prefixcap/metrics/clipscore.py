"""CLIPScore and RefCLIPScore (Hessel et al., EMNLP 2021, https://arxiv.org/abs/2104.08718).

CLIP-S(c, v) = w * max(cos(E_image(v), E_text(PROMPT + c)), 0) with w = 2.5, and RefCLIP-S is the harmonic mean of
CLIP-S and max(max_r cos(E_text(PROMPT + c), E_text(PROMPT + r)), 0). As in the reference implementation
(github.com/jmhessel/clipscore, clipscore.py), every candidate and every reference is prefixed with "A photo depicts "
before tokenisation (truncated to the text tower's context), and corpus scores are means of per-image scores.

w = 2.5 stretches the cosines of the paper's CLIP ViT-B/32 (DEFAULT_CHECKPOINT), which the paper observed between
roughly 0 and 0.4; scores from other models (another CLIP, SigLIP) are not comparable with the paper's numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from prefixcap.checkpoints import Need, checkpoint_needs, fetch, path_exists, resolve
from prefixcap.errors import CompositionError, summary

PROMPT = "A photo depicts "  # Hessel's prefix 'A photo depicts', to which his code appends the missing space
DEFAULT_CHECKPOINT = "openai/clip-vit-base-patch32"  # the paper's CLIP ViT-B/32
OPEN_CLIP = "open_clip:"
W = 2.5

Encode = Callable[[list[Any]], Tensor]  # one batch of images or texts -> (B, D) unnormalised embeddings


def choose_clip_model(setting: str | None, data_default: str | None) -> str | None:
    """The CLIPScore model that eval.clip_model ``setting`` names: "auto" picks the data's own scorer
    (``data_default``, a DatasetSource's clip_model, e.g. prefixcap/shapes-clip), else the paper's CLIP ViT-B/32;
    None (no CLIPScore) stays None; any other name is taken as given."""
    if setting == "auto":
        return data_default or DEFAULT_CHECKPOINT
    return setting


def scorer_needs(checkpoint: str, option: str = "clip_model") -> list[Need]:
    """What ``ClipScorer.from_pretrained(checkpoint)`` reads from disk (`prefixcap doctor`), loading nothing."""
    from prefixcap.encoders import HF_HUB, open_clip_needs

    if not checkpoint.startswith(OPEN_CLIP):
        return checkpoint_needs(checkpoint, option)  # transformers: a bundled scorer, a local directory or a hub id
    source = checkpoint[len(OPEN_CLIP) :].removeprefix("local-dir:")
    if source.startswith(HF_HUB) or path_exists(source):
        return open_clip_needs("", source, option)
    if "/" in source:
        return open_clip_needs(*source.split("/", 1), option)
    return [Need("unchecked", checkpoint, option, note="names no weights (see eval.clip_model)")]


def clip_s(image_emb: Tensor, caption_emb: Tensor, w: float = W) -> Tensor:
    """CLIP-S of each row pair of (N, D) embeddings, unnormalised on input: (N,)."""
    cos = (_unit(image_emb) * _unit(caption_emb)).sum(-1)
    return w * cos.clamp(min=0)


def ref_clip_s(image_emb: Tensor, caption_emb: Tensor, reference_embs: list[Tensor], w: float = W) -> Tensor:
    """RefCLIP-S of each row: ``reference_embs[i]`` is (R_i, D), the references of image i (R_i >= 1): (N,)."""
    with_image = clip_s(image_emb, caption_emb, w)
    captions = _unit(caption_emb)
    with_refs = torch.stack([(_unit(refs) @ c).max() for c, refs in zip(captions, reference_embs, strict=True)])
    with_refs = with_refs.clamp(min=0)  # as in the paper; Hessel's code leaves it unclipped (rarely differs)
    total = with_image + with_refs
    # A caption unrelated to both image and references scores 0, not 0/0.
    return torch.where(total > 0, 2 * with_image * with_refs / total.where(total > 0, 1), 0)


def _unit(x: Tensor) -> Tensor:
    return F.normalize(x.float(), dim=-1)  # fp16 features (GPU) would lose precision in the dot products


@dataclass
class ClipScores:
    clip_s: float
    ref_clip_s: float | None
    per_image_clip_s: list[float]
    per_image_ref_clip_s: list[float] | None


class ClipScorer:
    """A frozen CLIP-style dual encoder, scoring captions of images. Build it with ``from_pretrained``."""

    def __init__(self, encode_images: Encode, encode_texts: Encode, checkpoint: str):
        self._encode_images, self._encode_texts, self.checkpoint = encode_images, encode_texts, checkpoint

    @classmethod
    def from_pretrained(cls, checkpoint: str, device: str | torch.device = "cpu") -> ClipScorer:
        """``checkpoint``: a transformers CLIPModel/SiglipModel (hub id or local directory), or an open_clip model as
        ``open_clip:<model>/<pretrained tag or weights file>``, ``open_clip:hf-hub:<id>`` or ``open_clip:<directory>``,
        or ``prefixcap/shapes-clip``, the scorer that ships with prefixcap for the shapes world.
        """
        if checkpoint.startswith(OPEN_CLIP):
            encode_images, encode_texts = _open_clip_encoders(checkpoint, torch.device(device))
        else:
            encode_images, encode_texts = _transformers_encoders(resolve(checkpoint), torch.device(device))
        return cls(encode_images, encode_texts, checkpoint)

    def image_embeddings(self, images: Sequence[Image.Image], batch_size: int = 64) -> Tensor:
        """(N, D) unit-norm float32 embeddings, on the CPU."""
        return self._embed(self._encode_images, [image.convert("RGB") for image in images], batch_size)

    def text_embeddings(self, texts: Sequence[str], batch_size: int = 64) -> Tensor:
        """(N, D) unit-norm float32 embeddings of ``texts`` as given (``score`` adds PROMPT), on the CPU."""
        return self._embed(self._encode_texts, list(texts), batch_size)

    @staticmethod
    def _embed(encode: Encode, items: list[Any], batch_size: int) -> Tensor:
        if not items:
            raise ValueError("nothing to embed")
        with torch.no_grad():
            return torch.cat([_unit(encode(items[i : i + batch_size])).cpu() for i in range(0, len(items), batch_size)])

    def score(
        self,
        images: Sequence[Image.Image],
        captions: Sequence[str],
        references: Sequence[Sequence[str]] | None = None,
        batch_size: int = 64,
    ) -> ClipScores:
        """CLIP-S of each caption against its image, and RefCLIP-S when each image has at least one reference."""
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        if not captions:
            raise ValueError("no captions to score")
        return self.score_embedded(self.image_embeddings(images, batch_size), captions, references, batch_size)

    def score_embedded(
        self,
        image_emb: Tensor,
        captions: Sequence[str],
        references: Sequence[Sequence[str]] | None = None,
        batch_size: int = 64,
    ) -> ClipScores:
        """``score`` for images already embedded with ``image_embeddings``: a trainer embeds its held-out images
        once and scores every evaluation's captions against them."""
        if len(image_emb) != len(captions):
            raise ValueError(f"{len(image_emb)} image embeddings but {len(captions)} captions")
        caption_emb = self.text_embeddings([PROMPT + c for c in captions], batch_size)
        per_image = clip_s(image_emb, caption_emb)
        if references is None:
            return ClipScores(per_image.mean().item(), None, per_image.tolist(), None)

        if len(references) != len(captions):
            raise ValueError(f"{len(captions)} captions but {len(references)} reference lists")
        if any(not refs for refs in references):
            raise ValueError("RefCLIP-S needs at least one reference per image")
        flat = self.text_embeddings([PROMPT + r for refs in references for r in refs], batch_size)
        reference_embs = list(flat.split([len(refs) for refs in references]))
        per_image_ref = ref_clip_s(image_emb, caption_emb, reference_embs)
        return ClipScores(per_image.mean().item(), per_image_ref.mean().item(), per_image.tolist(),
                          per_image_ref.tolist())  # fmt: skip


def _transformers_encoders(checkpoint: str, device: torch.device) -> tuple[Encode, Encode]:
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    model = fetch(lambda: AutoModel.from_pretrained(checkpoint, use_safetensors=True, trust_remote_code=False),
                  checkpoint, "CLIP model", tiny=False)
    if not (hasattr(model, "get_image_features") and hasattr(model, "get_text_features")):
        raise CompositionError(f"{checkpoint!r} holds a {type(model).__name__}, not an image-text dual encoder "
                               "such as CLIPModel or SiglipModel")  # fmt: skip
    tokenizer = fetch(lambda: AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=False), checkpoint,
                      "tokenizer", tiny=False)
    processor = fetch(lambda: AutoImageProcessor.from_pretrained(checkpoint, trust_remote_code=False), checkpoint,
                      "image processor", tiny=False)  # fmt: skip
    model = model.to(device).eval()
    # Saved tokenizers without a limit report a huge model_max_length; the text tower's positions are the real one.
    text_config = getattr(model.config, "text_config", model.config)
    max_length = min(tokenizer.model_max_length, getattr(text_config, "max_position_embeddings", 10**9))

    def encode_images(images: list[Image.Image]) -> Tensor:
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        return embeddings_of(model.get_image_features(pixel_values=pixels.to(device, model.dtype)))

    def encode_texts(texts: list[str]) -> Tensor:
        # SigLIP was trained on max_length-padded text and pools the last position, so pad to it; for CLIP, which
        # pools at EOS under a causal mask, the padding changes nothing (and clip.tokenize pads the same way).
        tokens = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
        return embeddings_of(model.get_text_features(**tokens.to(device)))

    return encode_images, encode_texts


def embeddings_of(output: Any) -> Tensor:
    # transformers 4 returns the projected embeddings; 5 returns the tower's output with them as pooler_output.
    return output if isinstance(output, Tensor) else output.pooler_output


def _open_clip_encoders(checkpoint: str, device: torch.device) -> tuple[Encode, Encode]:
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    # The clip encoder's loader, not open_clip.create_model_and_transforms: for OpenAI's tags it sets QuickGELU,
    # which open_clip 3's plain "ViT-B-32" config lacks (it only warns), and it checks the tag before any download.
    from prefixcap.encoders.clip import HF_HUB, load_open_clip, load_open_clip_tokenizer

    source = checkpoint[len(OPEN_CLIP) :].removeprefix("local-dir:")
    if source.startswith(HF_HUB) or Path(source).is_dir():
        name, weights = "", source  # the repository holds the config, weights and tokenizer
    elif "/" in source:
        name, weights = source.split("/", 1)
    else:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(source)) or "none"
        raise CompositionError(f"{checkpoint!r} names no weights: use open_clip:{source}/<tag> (tags: {tags}), "
                               f"open_clip:hf-hub:<id> or open_clip:<directory>")  # fmt: skip
    try:
        model = load_open_clip(name, weights, pretrained=True)
        tokenizer = load_open_clip_tokenizer(name, weights)
    except (ValueError, OSError, RuntimeError) as e:  # CompositionError passes through untouched
        raise CompositionError(f"cannot load CLIPScore model {checkpoint!r}: {summary(e)}") from e
    model = model.to(device).eval()
    preprocess = image_transform_v2(PreprocessCfg(**open_clip.get_model_preprocess_cfg(model)), is_train=False)
    dtype = next(model.parameters()).dtype

    def encode_images(images: list[Image.Image]) -> Tensor:
        return model.encode_image(torch.stack([preprocess(image) for image in images]).to(device, dtype))

    def encode_texts(texts: list[str]) -> Tensor:
        return model.encode_text(tokenizer(texts).to(device))  # open_clip truncates to the context, EOT kept

    return encode_images, encode_texts
