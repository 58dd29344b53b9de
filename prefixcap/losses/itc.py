"""Image-text contrastive learning (ITC, as in ALBEF and BLIP): the system that writes captions also learns a shared
space in which an image and a text that describes it lie close, so that it can score, rank and retrieve.

    image: visual tokens (B, K, H) -> attention pool -> (B, H) -> linear -> (B, E), unit norm
    text:  decoder states over the text alone (B, T, H) -> the last real token's -> linear -> (B, E), unit norm

The image side pools what the decoder reads (System.visual_tokens: the prefix, or the states cross-attention reads),
so the connector learns from this loss too; the text side is the same decoder run without the image
(System.text_states), so LoRA or the decoder's own weights learn it. A causal decoder's last position has read the
whole text, hence the pool. An attention pool, not a mean, because a mean of the tokens would blur which shape sits
where, and "red circle left of blue square" must not match the swapped scene.

The loss is symmetric InfoNCE over the batch with a learnt temperature (initialised at ``temperature``, clamped as
CLIP clamps its logit scale). Two rows with the same caption tokens are both positives for each other.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prefixcap.errors import CompositionError
from prefixcap.interfaces import Batch, EmbeddingLoss, SystemOutput
from prefixcap.losses import ItcOptions

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP's clamp: temperature never below 0.01


class ItcLoss(EmbeddingLoss):
    def __init__(self, options: ItcOptions, *, hidden_size: int | None, pretrained: bool = True):
        super().__init__(options.weight)
        if hidden_size is None:
            raise CompositionError("itc pools the decoder's states: this system has no decoder part")
        self.lr = options.lr
        self.image_norm, self.text_norm = nn.LayerNorm(hidden_size), nn.LayerNorm(hidden_size)
        self.query = nn.Parameter(torch.randn(hidden_size) / math.sqrt(hidden_size))  # the attention pool's
        self.image_head, self.text_head = nn.Linear(hidden_size, options.dim), nn.Linear(hidden_size, options.dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / options.temperature)))

    def image_embedding(self, visual: Tensor) -> Tensor:
        tokens = self.image_norm(visual.to(self.query.dtype))  # (B, K, H)
        weights = (tokens @ self.query / math.sqrt(tokens.shape[-1])).softmax(-1)  # (B, K)
        pooled = (weights.unsqueeze(-1) * tokens).sum(1)  # (B, H)
        return F.normalize(self.image_head(pooled).float(), dim=-1)  # (B, E)

    def text_embedding(self, states: Tensor, attention_mask: Tensor) -> Tensor:
        last = (attention_mask.long().sum(1) - 1).clamp(min=0)  # right padding: each row's last real token
        pooled = states[torch.arange(states.shape[0], device=states.device), last]  # (B, H)
        pooled = self.text_norm(pooled.to(self.query.dtype))
        return F.normalize(self.text_head(pooled).float(), dim=-1)  # (B, E)

    def forward(self, outputs: SystemOutput, batch: Batch) -> Tensor:
        if outputs.prefix is None or outputs.text_states is None:
            raise RuntimeError("itc needs SystemOutput.prefix and .text_states; the system ignored needs_text_states")
        image = self.image_embedding(outputs.prefix)
        text = self.text_embedding(outputs.text_states, batch.attention_mask)
        ids = batch.input_ids.masked_fill(batch.attention_mask == 0, -1)
        # a blank image is no example of its caption (train.blank_images)
        seen = ~batch.blank if batch.blank is not None else torch.ones(len(ids), dtype=torch.bool, device=ids.device)
        if self.training:  # evaluation runs the same rows on every process: nothing to gather then
            image, text, ids, seen = whole_micro_batch(image, text, ids, seen)
        if not seen.any():
            return (image.sum() + text.sum()) * 0  # nothing to contrast; every head stays in the graph
        image, text, ids = image[seen], text[seen], ids[seen]
        if image.shape[0] == 1:  # no negatives to contrast with
            return 1 - (image * text).sum()
        logits = image @ text.T * self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()  # (B, B)
        same = (ids[:, None] == ids[None]).all(-1)  # (B, B) the same caption, token for token
        targets = same.float() / same.sum(1, keepdim=True)  # (B, B), rows sum to 1; symmetric
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def whole_micro_batch(image: Tensor, text: Tensor, ids: Tensor, seen: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Under data parallelism each process holds a slice of the micro-batch; InfoNCE over a slice would contrast
    fewer negatives than one process taking the micro-batch whole, and train something else. So the rows of every
    process are gathered, in rank order, the embeddings with torch.distributed.nn's all_gather, whose backward hands
    each process the gradient of its own rows summed over the processes' (equal) losses: with the trainer's weights,
    which sum to the number of processes, DDP's average is the one-process gradient (training/distributed.py).
    Slices may differ in rows (an unreadable image) and in caption length: they are padded, padding rows unseen."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return image, text, ids, seen
    from torch.distributed.nn.functional import all_gather

    world = dist.get_world_size()
    shapes = [torch.zeros(2, dtype=torch.long, device=ids.device) for _ in range(world)]
    dist.all_gather(shapes, torch.tensor(ids.shape, dtype=torch.long, device=ids.device))
    rows, width = (int(v) for v in torch.stack(shapes).max(0).values)
    pad = rows - ids.shape[0]
    ids = F.pad(ids, (0, width - ids.shape[1], 0, pad), value=-1)
    seen = F.pad(seen.long(), (0, pad), value=0)
    image, text = F.pad(image, (0, 0, 0, pad)), F.pad(text, (0, 0, 0, pad))
    every_ids, every_seen = [torch.empty_like(ids) for _ in range(world)], [torch.empty_like(seen) for _ in range(world)]
    dist.all_gather(every_ids, ids)
    dist.all_gather(every_seen, seen)
    return (torch.cat(all_gather(image)), torch.cat(all_gather(text)), torch.cat(every_ids),
            torch.cat(every_seen).bool())  # fmt: skip
