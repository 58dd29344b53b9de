"""The component interfaces: Encoder, Connector, Decoder, Loss, System, DatasetSource.

Each states, as read-only properties, the facts compose() needs to wire components together (an encoder's ``dim``
and ``num_tokens``, a decoder's ``hidden_size`` and ``lora_targets``) so that mismatches are found from these facts,
before anything large is built, and never by guessing from class names.

Shapes used throughout: B batch, N visual tokens, D encoder width, K prefix tokens, H decoder width, T text tokens,
V vocabulary.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from prefixcap.images import ImageProcessor

if TYPE_CHECKING:
    from prefixcap.recipe import GenerateConfig


@dataclass
class ParamGroup:
    """What a component trains and at which learning rate (``lr=None``: the recipe's ``train.lr``)."""

    name: str
    params: list[nn.Parameter]
    lr: float | None = None
    weight_decay: float | None = None


def trainable_group(module: nn.Module, name: str, lr: float | None = None) -> list[ParamGroup]:
    params = [p for p in module.parameters() if p.requires_grad]
    return [ParamGroup(name, params, lr)] if params else []


@dataclass
class Batch:
    """A training/eval batch. ``labels`` is ``input_ids`` with padding set to -100, so padding is never trained."""

    pixel_values: Tensor | None  # (B, 3, S, S); None when ``features`` come from the feature cache
    input_ids: Tensor  # (B, T)
    attention_mask: Tensor  # (B, T), 1 for real tokens
    labels: Tensor  # (B, T)
    features: Tensor | None = None  # (B, N, D) cached encoder output
    captions: list[str] | None = None  # the caption text behind input_ids (one per image)
    references: list[list[str]] | None = None  # every reference caption, for evaluation


@dataclass
class SystemOutput:
    logits: Tensor  # (B, T, V): position t predicts labels[:, t]
    labels: Tensor  # (B, T)
    prefix: Tensor | None = None  # (B, K, H) what the decoder was conditioned on
    hidden: Tensor | None = None  # (B, T, H) decoder's last hidden state at the positions of ``logits``;
    # computed only when a loss sets ``needs_hidden`` (it costs memory)
    extras: dict[str, Tensor] = field(default_factory=dict)


class Encoder(nn.Module, ABC):
    """Images -> visual tokens (B, N, D). Frozen unless its options unfreeze some blocks."""

    lr: float | None = None  # learning rate of whatever it trains; None: the recipe's train.lr

    @property
    @abstractmethod
    def dim(self) -> int: ...

    @property
    @abstractmethod
    def num_tokens(self) -> int: ...

    @property
    @abstractmethod
    def image_processor(self) -> ImageProcessor: ...

    @abstractmethod
    def forward(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, S, S) -> (B, N, D)"""

    def preprocess(self, images: Sequence[Any]) -> Tensor:
        return self.image_processor(images)

    def param_groups(self) -> list[ParamGroup]:
        return trainable_group(self, "encoder", self.lr)


class Connector(nn.Module, ABC):
    """Visual tokens (B, N, D) -> decoder-width prefix (B, K, H); may change the number of tokens."""

    lr: float | None = None

    @property
    @abstractmethod
    def in_dim(self) -> int: ...

    @property
    @abstractmethod
    def out_dim(self) -> int: ...

    @abstractmethod
    def output_tokens(self, in_tokens: int) -> int:
        """K for an input of N tokens."""

    @abstractmethod
    def forward(self, tokens: Tensor) -> Tensor:
        """(B, N, D) -> (B, K, H)"""

    def param_groups(self) -> list[ParamGroup]:
        return trainable_group(self, "connector", self.lr)


class Decoder(nn.Module, ABC):
    """A causal LM that takes a prefix of embeddings in front of the text embeddings."""

    lr: float | None = None

    @property
    @abstractmethod
    def hidden_size(self) -> int: ...

    @property
    @abstractmethod
    def tokenizer(self) -> Any:
        """A Hugging Face tokenizer (None when built without weights, as `prefixcap validate` does)."""

    @property
    @abstractmethod
    def lora_targets(self) -> list[str]:
        """Module-name suffixes LoRA adapts (empty when LoRA is off)."""

    @abstractmethod
    def embed(self, input_ids: Tensor) -> Tensor:
        """(B, T) -> (B, T, H)"""

    @abstractmethod
    def forward(self, inputs_embeds: Tensor, attention_mask: Tensor, num_logits: int | None = None,
                return_hidden: bool = False) -> Tensor | tuple[Tensor, Tensor]:  # fmt: skip
        """(B, L, H), (B, L) -> logits (B, L', V) for the last L' = num_logits (default all) positions;
        with ``return_hidden``, also the last hidden state at those positions (B, L', H)."""

    @abstractmethod
    def generate(self, inputs_embeds: Tensor, attention_mask: Tensor, config: GenerateConfig) -> Tensor:
        """Continue from embeddings; returns new token ids (B, T_new)."""

    def param_groups(self) -> list[ParamGroup]:
        return trainable_group(self, "decoder", self.lr)


class Loss(nn.Module, ABC):
    """A training objective; the system sums ``weight * loss`` over its losses."""

    lr: float | None = None  # for losses with trainable parts (e.g. a projection head)
    needs_hidden: bool = False  # ask the system to fill SystemOutput.hidden

    def __init__(self, weight: float = 1.0):
        super().__init__()
        self.weight = weight

    @abstractmethod
    def forward(self, outputs: SystemOutput, batch: Batch) -> Tensor:
        """-> scalar"""

    def param_groups(self) -> list[ParamGroup]:
        return trainable_group(self, f"loss.{type(self).__name__}", self.lr)


class System(nn.Module, ABC):
    """A trainable captioner assembled by compose(): the thing recipes describe and `prefixcap run` trains."""

    encoder: Encoder
    decoder: Decoder
    losses: nn.ModuleList

    recipe: Any  # the resolved Recipe it was composed from (set by compose)
    generate_config: GenerateConfig  # generation defaults from the recipe (set by compose)

    @abstractmethod
    def forward(self, batch: Batch) -> SystemOutput: ...

    @abstractmethod
    def generate(self, pixel_values: Tensor, config: GenerateConfig) -> list[str]: ...

    def loss(self, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        """Weighted sum of the system's losses, and each term for logging."""
        outputs = self(batch)
        total, parts = None, {}
        for loss in self.losses:
            value = loss(outputs, batch)
            parts[type(loss).__name__] = float(value.detach())
            total = value * loss.weight if total is None else total + value * loss.weight
        if total is None:
            raise RuntimeError("this system has no losses to train on")
        return total, parts

    def caption(self, images: Sequence[Any], **generate: Any) -> list[str]:
        """Alt text for PIL images, arrays or tensors; ``generate`` overrides the recipe's generation options."""
        from prefixcap.recipe import GenerateConfig

        config = GenerateConfig.model_validate({**self.generate_config.model_dump(), **generate})
        device = next(self.parameters()).device
        with torch.inference_mode():
            return self.generate(self.encoder.preprocess(images).to(device), config)

    def param_groups(self) -> list[ParamGroup]:
        groups: list[ParamGroup] = []
        for child in self.children():
            if hasattr(child, "param_groups"):
                groups += child.param_groups()
            elif isinstance(child, nn.ModuleList):
                for m in child:
                    groups += m.param_groups()
        return groups

    def parameter_counts(self) -> tuple[int, int]:
        """(total, trainable); works on the meta device, so `validate` counts without allocating."""
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return total, trainable


@dataclass
class Example:
    image: Any  # PIL image, path, or array
    captions: list[str]  # one or more references


class DatasetSource(ABC):
    """Where (image, captions) examples come from; the training issue builds loaders on top."""

    @abstractmethod
    def examples(self, split: str) -> Iterator[Example]: ...
