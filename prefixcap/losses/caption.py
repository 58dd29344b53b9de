"""Captioning cross-entropy. Labels carry -100 on padding, so a batch of short captions trains on text only."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from prefixcap.interfaces import Batch, Loss, SystemOutput
from prefixcap.losses import CaptionLossOptions


class CaptionLoss(Loss):
    def __init__(self, options: CaptionLossOptions, *, hidden_size: int | None = None, pretrained: bool = True):
        super().__init__(options.weight)
        self.label_smoothing = options.label_smoothing

    def forward(self, outputs: SystemOutput, batch: Batch) -> Tensor:
        logits = outputs.logits.float()  # (B, T, V); fp32 so the softmax is stable under bf16 training
        return F.cross_entropy(logits.flatten(0, 1), outputs.labels.flatten(), ignore_index=-100,
                               label_smoothing=self.label_smoothing)  # fmt: skip
