"""CLIP vision tower from open_clip: every patch token after the final norm (no pooling, no projection).

``load_open_clip`` is also how the clip-align loss gets its text tower, so an encoder and a loss naming the same
checkpoint read the same weights in the same way.
"""

from __future__ import annotations

import difflib
import pickle
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.constants import HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME
from open_clip.transformer import VisionTransformer
from safetensors.torch import save_file
from torch import Tensor

from prefixcap.checkpoints import TINY
from prefixcap.encoders import ClipOptions
from prefixcap.errors import CompositionError, summary
from prefixcap.images import ImageProcessor
from prefixcap.interfaces import Encoder
from prefixcap.weights import refuse_pickle_weights

HF_HUB = "hf-hub:"
# Same classes as ViT-B-32, scaled down: 32x32 images, 8x8 patches -> 16 tokens of width 64. The text tower keeps
# CLIP's vocabulary and context length, so the BPE tokenizer bundled with open_clip fits it.
TINY_CONFIG = dict(
    embed_dim=32,
    vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=32),
    text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2),
)


def load_open_clip(model: str, checkpoint: str, *, pretrained: bool) -> open_clip.model.CLIP:
    """The whole open_clip CLIP (vision + text) that ``checkpoint`` names (see ClipOptions).

    ``pretrained=False`` builds the architecture only, on the current default device: under
    ``torch.device("meta")`` (`prefixcap validate`) nothing is allocated and nothing downloaded (for an hf-hub id,
    only its small config file). "tiny" is a small random CLIP of ``model``'s class, for tests.
    """
    device = torch.get_default_device()
    if checkpoint != TINY:
        refuse_pickle_weights(checkpoint)  # open_clip would read a .bin, even one beside a .safetensors
    is_repo = checkpoint != TINY and (checkpoint.startswith(HF_HUB) or Path(checkpoint).is_dir())
    if not is_repo and model not in open_clip.list_models():
        close = difflib.get_close_matches(model, open_clip.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown open_clip model {model!r}{hint}")
    try:
        if checkpoint == TINY:
            return open_clip.create_model(model, device=device, **TINY_CONFIG)
        if is_repo:
            # Config and weights both come from the repository (hub or local copy); ``model`` plays no part.
            return open_clip.create_model(_repo_source(checkpoint, pretrained), load_weights=pretrained, device=device)
        tag = open_clip.get_pretrained_cfg(model, checkpoint)  # {} unless a known tag of ``model``
        if not tag and not Path(checkpoint).is_file():
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(model)) or "none"
            raise ValueError(f"checkpoint {checkpoint!r} is not a pretrained tag of {model!r} (tags: {tags}), an "
                             f"{HF_HUB} id, a local directory or weights file, or {TINY!r}")  # fmt: skip
        # OpenAI trained with QuickGELU but the plain configs (ViT-B-32) use GELU; open_clip only warns about the
        # mismatch, so follow the tag (as the "-quickgelu" names do). The tag also carries the preprocessing,
        # which open_clip applies only when it downloads.
        return open_clip.create_model(model, pretrained=checkpoint if pretrained else None, device=device,
                                      force_quick_gelu=tag.get("quick_gelu", False),
                                      force_preprocess_cfg=tag or None)  # fmt: skip
    except (RuntimeError, OSError, pickle.UnpicklingError) as e:  # failed downloads and bad files; a hub .bin that
        # torch's weights_only unpickler refuses
        first = summary(e)
        what = repr(checkpoint) if is_repo else f"{model!r} from checkpoint {checkpoint!r}"
        raise CompositionError(
            f"cannot load open_clip {what} (offline? use a local directory or weights file, or `checkpoint: tiny`"
            f" for a small random model): {first}"
        ) from e


def _repo_source(checkpoint: str, pretrained: bool) -> str:
    """open_clip's name for a checkpoint repository: the hub id, or "local-dir:" for a local copy."""
    if not checkpoint.startswith(HF_HUB):
        return f"local-dir:{checkpoint}"
    if pretrained:
        return checkpoint
    # Architecture only: fetch just the config; the cache folder it lands in then reads as a local directory
    # (open_clip's own hf-hub path would fetch the weights too).
    from huggingface_hub import hf_hub_download

    return f"local-dir:{Path(hf_hub_download(checkpoint[len(HF_HUB) :], HF_CONFIG_NAME)).parent}"


def load_open_clip_tokenizer(model: str, checkpoint: str) -> Any:
    """open_clip's tokenizer for that CLIP; the BPE vocabulary ships inside open_clip, so it works offline."""
    if checkpoint == TINY:
        return open_clip.SimpleTokenizer()  # CLIP's own BPE and context length, which TINY_CONFIG keeps
    if checkpoint.startswith(HF_HUB):
        return open_clip.get_tokenizer(checkpoint)
    if Path(checkpoint).is_dir():
        return open_clip.get_tokenizer(f"local-dir:{checkpoint}")
    return open_clip.get_tokenizer(model)


class ClipEncoder(Encoder):
    def __init__(self, options: ClipOptions, *, pretrained: bool = True):
        super().__init__()
        self.options = options
        self.lr = options.unfreeze_lr
        visual = load_open_clip(options.model, options.checkpoint, pretrained=pretrained).visual  # text tower dropped
        if not isinstance(visual, VisionTransformer) or visual.attn_pool is not None:
            raise ValueError(f"the clip encoder takes open_clip's own ViT image towers; {options.model!r} has a "
                             f"{type(visual).__name__} (for timm towers use the vit encoder)")  # fmt: skip
        visual.prune_intermediate_layers(indices=1, prune_head=True)  # the projection only serves the pooled vector
        self.model = visual
        self.random_init = options.checkpoint == TINY  # random weights cannot be fetched again: save them
        self.freeze(visual.transformer.resblocks, visual.ln_post, options.unfreeze_last)

    @property
    def dim(self) -> int:
        return self.model.transformer.width

    @property
    def num_tokens(self) -> int:
        rows, cols = self.model.grid_size
        return rows * cols

    @property
    def image_processor(self) -> ImageProcessor:
        # What open_clip attached to the model from the checkpoint's (or tag's) config. Interpolation is bicubic
        # in ImageProcessor, as in every CLIP tag.
        cfg = open_clip.get_model_preprocess_cfg(self.model)
        size = cfg["size"] if isinstance(cfg["size"], int) else tuple(cfg["size"])
        resize = {"shortest": "crop", "squash": "squash"}.get(cfg.get("resize_mode", "shortest"))
        if resize is None or (isinstance(size, tuple) and size[0] != size[1]):
            raise ValueError(f"unsupported open_clip preprocessing for a square image processor: {cfg}")
        side = size if isinstance(size, int) else size[0]
        return ImageProcessor(side, tuple(cfg["mean"]), tuple(cfg["std"]), resize=resize)

    def forward(self, pixel_values: Tensor) -> Tensor:
        dtype = next(self.model.parameters()).dtype
        out = self.model.forward_intermediates(pixel_values.to(dtype), indices=1, normalize_intermediates=True,
                                               intermediates_only=True, output_fmt="NLC")  # fmt: skip
        return out["image_intermediates"][-1]  # (B, N, D): last block, through ln_post, class token dropped

    @classmethod
    def write_tiny_checkpoint(cls, directory: Path, options: ClipOptions | None = None) -> dict[str, Any]:
        """Save a tiny random CLIP of ``options.model``'s class as open_clip's hub repositories hold one
        (open_clip_config.json + open_clip_model.safetensors); the returned options load it from there."""
        from open_clip.push_to_hf_hub import save_config_for_hf

        model = (options or ClipOptions()).model
        clip = load_open_clip(model, TINY, pretrained=True)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(clip.state_dict(), str(directory / HF_SAFE_WEIGHTS_NAME))
        save_config_for_hf(clip, directory / HF_CONFIG_NAME, model_config={**open_clip.get_model_config(model),
                                                                            **TINY_CONFIG})  # fmt: skip
        return {"checkpoint": str(directory)}
