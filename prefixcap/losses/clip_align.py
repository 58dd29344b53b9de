"""CLIP alignment: pull the decoder's pooled caption state towards the frozen CLIP text embedding of that caption.

Gradients flow from the loss through a trainable head into the decoder's hidden states, hence into LoRA and, through
the prefix, into the connector; only the CLIP text embedding (the target) is computed without grad. distilvit2
computed its whole CLIP term under no_grad and so trained nothing: tests/losses/test_clip_align.py checks that the
connector and LoRA get gradients and, with the head frozen, lower this loss on their own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prefixcap.encoders.clip import load_open_clip, load_open_clip_tokenizer
from prefixcap.errors import CompositionError
from prefixcap.interfaces import Batch, Loss, SystemOutput
from prefixcap.losses import ClipAlignOptions


@dataclass
class _FrozenTextTower:
    """Held in a plain attribute, not as a submodule: then the CLIP weights are in no param group, no state_dict
    (they are downloaded, not trained) and system.train() cannot switch them out of eval mode."""

    model: nn.Module
    names: tuple[str, str]  # (model, checkpoint), for the tokenizer
    tokenizer: Any = None


class ClipAlignLoss(Loss):
    needs_hidden = True

    def __init__(self, options: ClipAlignOptions, *, hidden_size: int | None, pretrained: bool = True):
        super().__init__(options.weight)
        if hidden_size is None:
            raise CompositionError("clip-align works on the decoder's hidden states: this system has no decoder")
        self.lr = options.lr
        self.temperature = options.temperature
        # CLIP loads here, not on the first step, so a missing checkpoint fails compose() with the recipe's line
        # number rather than at the first training step.
        clip = load_open_clip(options.model, options.checkpoint, pretrained=pretrained)
        embed_dim = clip.visual.output_dim
        clip.visual = None  # only the text tower is used; the image tower would be half the memory for nothing
        clip.requires_grad_(False).eval()
        self._text = _FrozenTextTower(clip, (options.model, options.checkpoint))
        self.head = nn.Linear(hidden_size, embed_dim)  # decoder width H -> CLIP space E

    def forward(self, outputs: SystemOutput, batch: Batch) -> Tensor:
        if outputs.hidden is None:
            raise RuntimeError("clip-align needs SystemOutput.hidden; the system ignored needs_hidden")
        if batch.captions is None or len(batch.captions) != outputs.hidden.shape[0]:
            raise ValueError("clip-align needs batch.captions: the caption text of each example in the batch")
        mask = (outputs.labels != -100).unsqueeze(-1)  # (B, T, 1): positions that predict a caption token
        # fp32 from here: a bf16 sum over T positions loses digits, and the similarities are divided by 0.07.
        hidden = outputs.hidden.float().masked_fill(~mask, 0)  # (B, T, H)
        pooled = hidden.sum(1) / mask.sum(1).clamp(min=1)  # (B, T, H) -> (B, H)
        image = F.normalize(self.head(pooled.to(self.head.weight.dtype)).float(), dim=-1)  # (B, H) -> (B, E)
        text = self.text_embeddings(batch.captions, image.device)  # (B, E)
        if image.shape[0] == 1:  # no negatives to contrast with
            return 1 - (image * text).sum()
        logits = image @ text.T / self.temperature  # (B, B)
        # Two examples with the same caption are both positives for it, not each other's negatives.
        same = torch.tensor([[a == b for b in batch.captions] for a in batch.captions], device=logits.device)
        targets = same.float() / same.sum(1, keepdim=True)  # (B, B), rows sum to 1; symmetric
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2

    @torch.no_grad()  # not inference_mode: its output is saved for the backward of ``image @ text.T``
    def text_embeddings(self, captions: list[str], device: torch.device) -> Tensor:
        """Frozen CLIP text embeddings, L2-normalised: (B,) strings -> (B, E)."""
        tower = self._text
        if tower.tokenizer is None:  # loaded when first needed, so `validate` never loads a vocabulary
            tower.tokenizer = load_open_clip_tokenizer(*tower.names)
        if next(tower.model.parameters()).device != device:
            tower.model.to(device)  # not a submodule, so system.to(device) did not move it
        tokens = tower.tokenizer(captions).to(device)  # (B, context_length)
        return F.normalize(tower.model.encode_text(tokens).float(), dim=-1)

    @classmethod
    def write_tiny_checkpoint(cls, directory: Path, options: ClipAlignOptions | None = None) -> dict[str, Any]:
        """A tiny random CLIP of ``options.model``'s class saved as open_clip's repositories hold one; the returned
        options load the loss's text tower from there (the clip encoder writes it, so both read CLIP alike)."""
        from prefixcap.encoders import ClipOptions
        from prefixcap.encoders.clip import ClipEncoder

        model = (options or ClipAlignOptions()).model
        return {"model": model, **ClipEncoder.write_tiny_checkpoint(directory, ClipOptions(model=model))}
