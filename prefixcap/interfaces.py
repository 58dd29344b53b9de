"""The component interfaces: Encoder, Connector, Decoder, Loss, System, DatasetSource.

Each states, as read-only properties, the facts compose() needs to wire components together (an encoder's ``dim``
and ``num_tokens``, a decoder's ``hidden_size`` and ``lora_targets``) so that mismatches are found from these facts,
before anything large is built, and never by guessing from class names.

Shapes used throughout: B batch, N visual tokens, D encoder width, K prefix tokens, H decoder width, T text tokens,
V vocabulary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from prefixcap.errors import CompositionError, SavedSystemError
from prefixcap.data.rows import Example, Rows, spool  # the row contract lives with its Arrow implementation
from prefixcap.images import ImageProcessor
from prefixcap.weights import load_into, module_state, save_tensors

if TYPE_CHECKING:
    from prefixcap.config import GenerateConfig
    from prefixcap.onnx_parts import OnnxPlan


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
    blank: Tensor | None = None  # (B,) bool: examples shown a blank image in training (train.blank_images)


@dataclass
class SystemOutput:
    logits: Tensor  # (B, T, V): position t predicts labels[:, t]
    labels: Tensor  # (B, T)
    prefix: Tensor | None = None  # (B, K, H) the image as the decoder reads it (System.visual_tokens)
    hidden: Tensor | None = None  # (B, T, H) decoder's last hidden state at the positions of ``logits``;
    # computed only when a loss sets ``needs_hidden`` (it costs memory)
    text_states: Tensor | None = None  # (B, T', H) the decoder over the text alone, no image (System.text_states);
    # computed only when a loss sets ``needs_text_states`` (it costs a second decoder pass)
    extras: dict[str, Tensor] = field(default_factory=dict)


@contextlib.contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Run ``model`` (a transformers model) with eager attention for a while: only it returns attention weights. Set on
    every config inside, not through the model's: a VisionEncoderDecoderModel gives its encoder a new config object,
    while the encoder's layers keep reading the one they were built with."""
    configs = {id(c): c for m in model.modules() if hasattr(c := getattr(m, "config", None), "_attn_implementation")}
    before = {key: config._attn_implementation for key, config in configs.items()}
    try:
        for config in configs.values():
            config._attn_implementation = "eager"
        yield
    finally:
        for key, config in configs.items():
            config._attn_implementation = before[key]


# The share of each token that stays itself through a layer (the residual path) in attention rollout. Abnar & Zuidema
# use 1/2; 3/4 placed words best on the shapes world's validation split for both quickstart systems (docs/explain.md).
ROLLOUT_RESIDUAL = 0.75


def attention_rollout(attentions: Sequence[Tensor], residual: float = ROLLOUT_RESIDUAL) -> Tensor:
    """Every layer's attention (B, heads, N, N), first to last -> (B, N, N): how much each output token draws on each
    input token through all of them. Attention rollout (Abnar & Zuidema, 2020): each layer's heads averaged, the
    residual path counted as ``residual`` of each token staying itself, and the layers multiplied."""
    rollout = None
    for layer in attentions:
        mixed = layer.float().mean(1)  # (B, N, N)
        mixed = (1 - residual) * mixed + residual * torch.eye(mixed.shape[-1], device=mixed.device)
        mixed = mixed / mixed.sum(-1, keepdim=True)
        rollout = mixed if rollout is None else mixed @ rollout
    if rollout is None:
        raise ValueError("no attention layers to roll out")
    return rollout


def vision_rollout(model: nn.Module, pixel_values: Tensor) -> Tensor:
    """``attention_rollout`` of a transformers vision model (ViT, SigLIP, CLIP's tower) on ``pixel_values``."""
    dtype = next(model.parameters()).dtype
    with eager_attention(model):
        attentions = model(pixel_values=pixel_values.to(dtype), output_attentions=True).attentions
    return attention_rollout(attentions)


def transformers_model(module: nn.Module) -> nn.Module | None:
    """The outermost transformers model inside ``module`` (under peft's wrappers), or None. Never imports transformers:
    a module holding such a model has imported it already."""
    transformers = sys.modules.get("transformers")
    if transformers is None:
        return None
    return next((m for m in module.modules() if isinstance(m, transformers.PreTrainedModel)), None)


class Component(nn.Module):
    """What every part of a system shares: the LR of what it trains, and saving/loading what it trained.

    "Save what was trained, not what was downloaded": by default a component writes only its trainable
    parameters; a component built from random initialisation (``checkpoint: tiny``) has nothing to download
    again, so it writes everything.
    """

    lr: float | None = None  # learning rate of whatever it trains; None: the recipe's train.lr
    random_init: bool = False  # set by components built without pretrained weights (checkpoint: tiny)
    group_name = "component"

    def param_groups(self) -> list[ParamGroup]:
        return trainable_group(self, self.group_name, self.lr)

    @property
    def architecture(self) -> str:
        """What `prefixcap validate` says this part is: the class of the outermost transformers model inside it
        (``LlamaForCausalLM``), else the component's own class. Set it (or override it) to name another library's."""
        if "_architecture" in self.__dict__:
            return self.__dict__["_architecture"]
        model = transformers_model(self)
        return type(model if model is not None else self).__name__

    @architecture.setter
    def architecture(self, value: str) -> None:  # so that a part may say `self.architecture = ...` in its __init__
        self.__dict__["_architecture"] = str(value)

    def trained_state(self) -> dict[str, Tensor]:
        return module_state(self, everything=self.random_init)

    def save_trained(self, directory: Path) -> list[str]:
        """Write what this component trained under ``directory``; return the file names written."""
        state = self.trained_state()
        if not state:
            return []
        save_tensors(state, directory / "model.safetensors")
        return ["model.safetensors"]

    def load_trained(self, directory: Path) -> None:
        path = directory / "model.safetensors"
        if path.exists():
            load_into(self, path)
        elif self.trained_state():  # save_trained wrote one: without it the part would serve random weights
            raise SavedSystemError(f"{path} is missing: this part trains weights, and its saved ones are gone")


class Encoder(Component, ABC):
    """Images -> visual tokens (B, N, D). Frozen unless its options unfreeze some blocks."""

    group_name = "encoder"

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

    @property
    def patch_grid(self) -> tuple[int, int, int]:
        """(first, rows, cols): tokens ``first`` to ``first + rows * cols`` of ``forward``'s output are the image's
        patches, row by row (what `prefixcap explain` draws its maps on). The default reads a square number of tokens
        as a square grid with nothing before it; an encoder that keeps a class or register token in front, or whose
        grid is not square, says so by overriding this."""
        side = math.isqrt(self.num_tokens)
        if side * side != self.num_tokens:
            raise NotImplementedError(f"{type(self).__name__} gives {self.num_tokens} tokens, not a square grid: it "
                                      "says where its patches are with Encoder.patch_grid")  # fmt: skip
        return 0, side, side

    def token_sources(self, pixel_values: Tensor) -> Tensor | None:
        """(B, 3, S, S) -> (B, N, N): how much each output token draws on each input position (its patch, or a class
        token), each row summing to 1; `prefixcap explain` maps what the decoder reads back to the patches through it.
        None (the default): each output token is its own patch, as a convolutional feature map roughly is. A
        transformer mixes its tokens, so its output token i need not be about patch i: transformer encoders give
        the attention rollout of their layers (``attention_rollout``)."""
        return None

    # The recipe's image section (resize mode, fill), set by compose through set_preprocessing; None: the family's own.
    _preprocessing_choice: tuple[str | None, tuple[float, float, float] | None] = (None, None)

    def set_preprocessing(self, resize: str | None = None, fill: Sequence[float] | None = None) -> None:
        """Resize this encoder's images as ``resize`` says (squash, crop, letterbox; None: ``image_processor``'s own
        mode), letterbox's padding ``fill`` (RGB in [0, 1]; None: the encoder's mean): the recipe's ``image`` section,
        which compose applies to every encoder, third-party ones included. ``preprocessing`` is then the result."""
        if fill is not None and resize != "letterbox":
            raise ValueError(f"fill is letterbox's padding colour: it needs resize letterbox, not {resize!r}")
        choice = (resize, tuple(fill) if fill is not None else None)
        if resize is not None:
            dataclasses.replace(self.image_processor, resize=resize)  # an unknown mode: a ValueError now, not later
        self.__dict__["_preprocessing_choice"] = choice

    @property
    def preprocessing(self) -> ImageProcessor:
        """How this system preprocesses its images: ``image_processor`` (the family's own, what its checkpoint does)
        with the recipe's ``image`` section applied (set_preprocessing). Everything that makes, caches, exports or
        times this system's pixels reads this, not ``image_processor``."""
        processor = self.image_processor
        resize, fill = self._preprocessing_choice
        if resize is None:
            return processor
        return dataclasses.replace(processor, resize=resize, **({"fill": fill} if fill is not None else {}))

    def preprocess(self, images: Sequence[Any], resize: str | None = None) -> Tensor:
        """Images -> (B, 3, S, S) by ``preprocessing``; ``resize`` (squash, crop, letterbox) overrides its mode for
        this call."""
        processor = self.preprocessing
        if resize is not None:
            processor = dataclasses.replace(processor, resize=resize)
        return processor(images)

    def freeze(self, blocks: Sequence[nn.Module], final_norm: nn.Module, unfreeze_last: int = 0) -> None:
        """Freeze everything but the last ``unfreeze_last`` blocks (and then the final norm every token passes
        through): the usual way to adapt a pretrained encoder a little to a far-off domain."""
        if unfreeze_last > len(blocks):
            raise ValueError(f"unfreeze_last={unfreeze_last} but the encoder has {len(blocks)} blocks")
        self.requires_grad_(False)
        for block in list(blocks)[len(blocks) - unfreeze_last :]:
            block.requires_grad_(True)
        if unfreeze_last:
            final_norm.requires_grad_(True)

    def train(self, mode: bool = True):
        # A frozen encoder stays in eval mode (no dropout, no drop-path) even while the system trains.
        return super().train(mode and any(p.requires_grad for p in self.parameters()))


class Connector(Component, ABC):
    """Visual tokens (B, N, D) -> decoder-width prefix (B, K, H); may change the number of tokens."""

    group_name = "connector"

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self._in_dim, self._out_dim = in_dim, out_dim

    @property
    def in_dim(self) -> int:
        """D, the encoder width it was built for."""
        return self._in_dim

    @property
    def out_dim(self) -> int:
        """H, the decoder width it produces."""
        return self._out_dim

    @abstractmethod
    def output_tokens(self, in_tokens: int) -> int:
        """K for an input of N tokens."""

    @abstractmethod
    def forward(self, tokens: Tensor) -> Tensor:
        """(B, N, D) -> (B, K, H)"""

    def source_weights(self, tokens: Tensor) -> Tensor:
        """(B, N, D) -> (B, K, N): how each output token draws on the input tokens, each row summing to 1 (a token
        pooled or stacked from 4 patches: 1/4 on each; a query: its attention over them). `prefixcap explain` spreads
        the decoder's attention to the prefix back over the patches with it."""
        raise NotImplementedError(f"the {type(self).__name__} connector does not say which patches each of its tokens "
                                  "comes from (Connector.source_weights)")  # fmt: skip


class Decoder(Component, ABC):
    """A causal LM that takes a prefix of embeddings in front of the text embeddings."""

    group_name = "decoder"

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
    def tokenize(self, captions: Sequence[str], max_tokens: int) -> tuple[Tensor, Tensor, Tensor]:
        """Captions -> (input_ids, attention_mask, labels), each (B, T): [BOS][prompt] caption EOS, right-padded;
        labels are -100 on BOS, prompt and padding, so only the caption and its EOS are trained."""

    @abstractmethod
    def prompt_ids(self) -> Tensor:
        """(P,) ids that follow the prefix before the caption ([BOS][prompt]); generation starts after them."""

    @abstractmethod
    def forward(self, inputs_embeds: Tensor, attention_mask: Tensor, num_logits: int | None = None,
                return_hidden: bool = False) -> Tensor | tuple[Tensor, Tensor]:  # fmt: skip
        """(B, L, H), (B, L) -> logits (B, L', V) for the last L' = num_logits (default all) positions;
        with ``return_hidden``, also the last hidden state at those positions (B, L', H)."""

    @abstractmethod
    def generate(self, inputs_embeds: Tensor, attention_mask: Tensor, config: GenerateConfig) -> Tensor:
        """Continue from embeddings; returns new token ids (B, T_new)."""

    def attentions(self, inputs_embeds: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, L, H), (B, L) -> (B, layers, heads, L, L): every layer's self-attention weights (queries, keys). The
        default asks the transformers model inside for them, with eager attention (the fused kernels return none)."""
        model = transformers_model(self)
        if model is None:
            raise NotImplementedError(f"the {type(self).__name__} decoder does not give its attention weights "
                                      "(Decoder.attentions)")  # fmt: skip
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        with eager_attention(model):
            out = model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                        use_cache=False, output_attentions=True, logits_to_keep=1)  # fmt: skip
        return torch.stack(out.attentions, dim=1)

    # --- languages: named LoRA adapters on the frozen decoder (prefixcap.languages) -----------------------------
    # The defaults work on the transformers model inside any decoder, a plugin's too; a decoder without one says so.

    def _language_model(self) -> nn.Module:
        model = transformers_model(self)
        if model is None:
            raise CompositionError(f"the {type(self).__name__} decoder holds no transformers model to put language "
                                   "adapters on (Decoder.add_language)")  # fmt: skip
        return model

    @property
    def languages(self) -> list[str]:
        """The languages this decoder has adapters for, in the order they were added (English, the base, is not one)."""
        return list(self.__dict__.get("_language_configs", {}))

    @property
    def language(self) -> str | None:
        """The active language adapter; None: the base decoder's own language."""
        return self.__dict__.get("_language")

    def add_language(self, options: Any, token_ids: Sequence[int] = (), config: Any = None) -> None:
        """Add a LoRA adapter named ``options.name`` (prefixcap.config.LanguageConfig) beside the base layers, with
        trainable embeddings for ``token_ids``; or the adapter ``config`` (a peft LoraConfig, as read from a save).
        Nothing else changes: the active language stays what it was."""
        from prefixcap.languages import add_language

        add_language(self, options, token_ids, config)

    def set_language(self, name: str | None) -> None:
        from prefixcap.languages import activate

        if name is not None and name not in self.languages:
            known = ", ".join(self.languages) or "none"
            raise CompositionError(f"no {name!r} language adapter in this system (it has: {known}; English is the "
                                   "base, no adapter)")  # fmt: skip
        if name == self.language:
            return
        model = self._language_model()
        activate(model, [*self.__dict__.get("_base_adapters", []), *([name] if name else [])])
        self.__dict__["_language"] = name

    def seed_language(self, name: str, glossary: Mapping[str, str]) -> int:
        """Start adapter ``name``'s trainable embeddings of glossed words ({"roter": "red"}) from the English words'
        base rows (DatasetSource.glossary); returns how many tokens were seeded. The base rows stay as they are."""
        from prefixcap.languages import seed_tokens

        return seed_tokens(self._language_model(), self.tokenizer, name, glossary)

    def language_parameters(self, name: str) -> list[nn.Parameter]:
        from prefixcap.languages import adapter_parameters

        return adapter_parameters(self._language_model(), name)

    def save_language(self, name: str, directory: Path) -> list[str]:
        """Adapter ``name`` in peft's format: adapter_config.json and adapter_model.safetensors."""
        from prefixcap.languages import save_language

        return save_language(self, name, directory)

    def load_language(self, name: str, directory: Path) -> None:
        """Add adapter ``name`` as saved in ``directory`` (if this decoder lacks it) and load its tensors."""
        from prefixcap.languages import load_language

        load_language(self, name, directory)


class Loss(Component, ABC):
    """A training objective; the system sums ``weight * loss`` over its losses."""

    group_name = "loss"
    needs_hidden: bool = False  # ask the system to fill SystemOutput.hidden
    needs_text_states: bool = False  # ask the system to fill SystemOutput.text_states (and .prefix)

    def __init__(self, weight: float = 1.0):
        super().__init__()
        self.weight = weight

    @abstractmethod
    def forward(self, outputs: SystemOutput, batch: Batch) -> Tensor:
        """-> scalar"""


class EmbeddingLoss(Loss):
    """A loss that learns a shared image-text space (the ``itc`` loss): what ``System.score`` reads for its
    contrastive score. A plugin's contrastive loss subclasses it and is scored, reranked and exported the same way."""

    needs_text_states = True

    @abstractmethod
    def image_embedding(self, visual: Tensor) -> Tensor:
        """(B, K, H) visual tokens (System.visual_tokens) -> (B, E), unit norm."""

    @abstractmethod
    def text_embedding(self, states: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, T, H) text-alone decoder states (System.text_states) and their mask -> (B, E), unit norm."""


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

    accepts_features = False  # True when forward can start from cached encoder features (Batch.features)

    def onnx_export(self) -> OnnxPlan | None:
        """This system's ONNX graphs, how a runtime runs them and its tokens (prefixcap.onnx_parts builds one; see
        docs/writing-a-plugin.md); None: it does not export. `prefixcap export` calls it on a system loaded for the
        purpose, so it may change the system in place (merge LoRA into the weights)."""
        return None

    def visual_tokens(self, pixel_values: Tensor | None = None, features: Tensor | None = None) -> Tensor:
        """(B, K, H): the image as the decoder reads it (a prefix, or the encoder states cross-attention reads, at the
        decoder's width), from pixels or cached encoder features. A contrastive score pools these."""
        raise NotImplementedError(f"{type(self).__name__} does not say how its decoder reads the image "
                                  "(System.visual_tokens), so it cannot learn a contrastive score")  # fmt: skip

    def text_states(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, T, H): the decoder's last hidden state over the text alone, no image; ``input_ids`` and
        ``attention_mask`` as ``tokenize`` makes them. A contrastive score pools these."""
        raise NotImplementedError(f"{type(self).__name__} cannot run its decoder on text alone "
                                  "(System.text_states), so it cannot learn a contrastive score")  # fmt: skip

    def attention_maps(self, batch: Batch) -> Tensor:
        """(B, layers, heads, T, N): the attention the decoder pays to each of the encoder's N output tokens while it
        predicts ``batch.labels[:, t]``, per layer and head (what `prefixcap explain --method attention` draws; see
        prefixcap/explain.py). Rows need not sum to 1: the rest went to the text."""
        raise NotImplementedError(f"{type(self).__name__} does not give the attention its decoder pays to the image "
                                  "(System.attention_maps)")  # fmt: skip

    def explain(self, image: Any, method: str = "attention", **options: Any) -> Any:
        """The greedy caption of one image with a heatmap per word: ``prefixcap.explain.Explanation``; see
        prefixcap/explain.py for the methods and ``explain`` there for a batch."""
        from prefixcap.explain import explain

        return explain(self, [image], method, **options)[0]

    # Each score type's default --min-score, measured on the held-out split when a run finishes and saved with the
    # system (prefixcap.score.calibrate); None until then.
    score_calibration: dict[str, dict[str, Any]] | None = None

    # Whether ``tokenize``'s input ids end each text with EOS (the prefix system's [BOS][prompt] caption EOS do; the
    # crossattn system's [BOS] caption do not): an ONNX runtime builds ``text_states``'s inputs from this.
    inputs_end_with_eos = True

    def embedding_loss(self) -> EmbeddingLoss | None:
        """The loss that learnt this system's shared image-text space, if any (the first)."""
        return next((loss for loss in self.losses if isinstance(loss, EmbeddingLoss)), None)

    def check_embedding_loss(self) -> None:
        """An embedding loss (itc) learns from visual_tokens and text_states, which a plugin system may lack: compose
        calls this so that the recipe is refused with the missing method's name."""
        if (loss := self.embedding_loss()) is None:
            return
        missing = [name for name in ("visual_tokens", "text_states") if getattr(type(self), name) is getattr(System, name)]
        if missing:
            raise CompositionError(f"{type(loss).__name__} learns a shared image-text space from "
                                   f"System.{' and System.'.join(missing)}, which {type(self).__name__} does not "
                                   "implement (docs/writing-a-plugin.md, Scoring): drop the loss from the recipe")

    def score(self, images: Sequence[Any], texts: Sequence[str], **options: Any) -> Any:
        """How well each text matches each image: ``prefixcap.score.Scores`` with a (len(images), len(texts)) matrix
        per score type (generative always; contrastive when the system learnt one); see prefixcap/score.py."""
        from prefixcap.score import score_matrix

        return score_matrix(self, images, texts, **options)

    def loss(self, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        """Weighted sum of the system's losses, and each term for logging."""
        return self.compute_loss(self(batch), batch)

    def training_losses(self) -> list[Loss]:
        """The losses a step trains on. While a language adapter trains (prefixcap.languages.only_language_trains)
        the embedding losses sit out: their heads were trained on English text and stay frozen."""
        if self.__dict__.get("_language_run"):
            return [loss for loss in self.losses if not isinstance(loss, EmbeddingLoss)]
        return list(self.losses)

    def compute_loss(self, outputs: SystemOutput, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        """The losses of outputs already computed (a trainer calls the, possibly wrapped, forward itself), and each
        loss's value."""
        values = self._loss_values(outputs, batch)
        return self._weighted_total(values), {type(loss).__name__: float(value.detach()) for loss, value in values}

    def total_loss(self, outputs: SystemOutput, batch: Batch) -> Tensor:
        """compute_loss's total alone: no value is read back to the host, which would wait for a GPU every step."""
        return self._weighted_total(self._loss_values(outputs, batch))

    def _loss_values(self, outputs: SystemOutput, batch: Batch) -> list[tuple[Loss, Tensor]]:
        values = [(loss, loss(outputs, batch)) for loss in self.training_losses()]
        if not values:
            raise RuntimeError("this system has no losses to train on")
        return values

    @staticmethod
    def _weighted_total(values: list[tuple[Loss, Tensor]]) -> Tensor:
        total = values[0][1] * values[0][0].weight
        for loss, value in values[1:]:
            total = total + value * loss.weight
        return total

    def tokenize(self, captions: Sequence[str], max_tokens: int) -> tuple[Tensor, Tensor, Tensor]:
        """(input_ids, attention_mask, labels) for captions; see Decoder.tokenize."""
        return self.decoder.tokenize(captions, max_tokens)

    def make_batch(self, images: Sequence[Any], captions: Sequence[str], max_tokens: int = 32) -> Batch:
        """A training batch from images (anything the encoder's processor takes) and one caption each."""
        input_ids, mask, labels = self.tokenize(captions, max_tokens)
        return Batch(pixel_values=self.encoder.preprocess(images), input_ids=input_ids, attention_mask=mask,
                     labels=labels, captions=list(captions))  # fmt: skip

    def caption(self, images: Sequence[Any], **generate: Any) -> list[str]:
        """Alt text for PIL images, arrays or tensors; ``generate`` overrides the recipe's generation options,
        ``resize`` (squash, crop, letterbox) the encoder's resize mode for this call, and ``lang`` the language (a
        language adapter's name, prefixcap.languages; "en": the base system's own; None: the active one)."""
        from prefixcap.config import GenerateConfig

        resize = generate.pop("resize", None)
        lang = generate.pop("lang", None)
        config = GenerateConfig.model_validate({**self.generate_config.model_dump(), **generate})
        device = next(self.parameters()).device
        training = self.training
        self.eval()  # no dropout: the same image gets the same caption, even in the middle of training
        try:
            with torch.inference_mode(), self.speaking(lang):
                pixels = self.encoder.preprocess(images) if resize is None else self.encoder.preprocess(images, resize)
                return self.generate(pixels.to(device), config)
        finally:
            self.train(training)

    @property
    def languages(self) -> list[str]:
        """The languages this system captions in besides its own (English): its decoder's language adapters."""
        decoder = getattr(self, "decoder", None)
        return decoder.languages if isinstance(decoder, Decoder) else []

    def set_language(self, lang: str | None) -> None:
        """Caption in ``lang`` from now on (None or "en": the base); ``speaking`` for one block."""
        lang = None if lang == "en" else lang
        decoder = getattr(self, "decoder", None)
        if isinstance(decoder, Decoder):
            decoder.set_language(lang)
        elif lang is not None:
            raise CompositionError(f"this {type(self).__name__} has no language adapters (it has no decoder part)")

    @contextlib.contextmanager
    def speaking(self, lang: str | None) -> Iterator[None]:
        """Caption in ``lang`` (a language adapter's name; "en": the base; None: whichever is active, set_language's)
        inside the block, then switch back: nothing is reloaded, the adapter is only made active."""
        decoder = getattr(self, "decoder", None)
        if lang is None or lang == "en" and not isinstance(decoder, Decoder):  # None: whatever is active stays
            yield
            return
        lang = None if lang == "en" else lang
        if not isinstance(decoder, Decoder):
            raise CompositionError(f"this {type(self).__name__} has no decoder to switch to language {lang!r}")
        before = decoder.language
        if lang == before:
            yield
            return
        decoder.set_language(lang)
        try:
            yield
        finally:
            decoder.set_language(before)

    def parts(self) -> list[tuple[str, Component]]:
        """(slot, component) for every component, slots named as in the recipe: encoder, ..., losses.0."""
        found = [(name, m) for name, m in self.named_children() if isinstance(m, Component)]
        return found + [(f"losses.{i}", loss) for i, loss in enumerate(self.losses)]

    def param_groups(self) -> list[ParamGroup]:
        return [group for _, part in self.parts() for group in part.param_groups()]

    def save(self, directory: str | Path) -> Path:
        """Write what was trained (safetensors, per component) and manifest.json; see prefixcap.persist."""
        from prefixcap.persist import save_system

        return save_system(self, Path(directory))

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device | None = None) -> System:
        """Rebuild a saved system (same as prefixcap.load: a hub id too); ``PrefixSystem.load`` also checks what it
        got."""
        from prefixcap.hub import resolve
        from prefixcap.persist import load_system

        system = load_system(resolve(directory), device)
        if not isinstance(system, cls):
            raise SavedSystemError(f"{directory} holds a {type(system).__name__}, not a {cls.__name__}")
        return system

    def load_trained(self, directory: str | Path) -> None:
        for slot, part in self.parts():
            part.load_trained(Path(directory) / slot)
        for name in self.languages:  # adapters this system has (a resumed language run's): their saved weights
            if (Path(directory) / "adapters" / name).is_dir():
                self.decoder.load_language(name, Path(directory) / "adapters" / name)

    def parameter_counts(self) -> tuple[int, int]:
        """(total, trainable); works on the meta device, so `validate` counts without allocating."""
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return total, trainable


Box = tuple[float, float, float, float]  # x0, y0, x1, y1: pixel edges, so a one-pixel box at (3, 4) is (3, 4, 4, 5)


@dataclass(frozen=True)
class Metric:
    """A data set's own headline metric, computed by its ``task_metrics``: what `prefixcap run` prints beside the
    loss, what `prefixcap bench` ranks by and times ``target`` against (its default --target), what curves.png
    draws. The core names no data set's metric; each declares its own."""

    name: str  # the key task_metrics returns, e.g. "accuracy"
    label: str  # how tables and plots call it, e.g. "exact-scene accuracy"
    higher_is_better: bool = True
    target: float | None = None  # the quality `prefixcap bench` times by default (None: no default target)
    bounds: tuple[float, float] | None = None  # the range a plot shows, e.g. (0, 1) for a share

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"a metric name is a plain identifier, e.g. accuracy, not {self.name!r}")


class DatasetSource(ABC):
    """Where (image, captions) examples come from, by split ("train", "val", "test").

    ``examples`` is all a source must write. The trainer reads ``rows``: a source that can look an example up by its
    position (a file index, an Arrow table, a generator with a seed per example) returns its own ``Rows``; the
    default writes ``examples`` once to an Arrow file in a temporary directory and reads it memory-mapped."""

    clip_model: str | None = None  # a CLIPScore model suited to this data (eval.clip_model: auto); None: CLIP B/32
    headline: Metric | None = None  # the metric of task_metrics that says most about this data (None: none)

    @abstractmethod
    def examples(self, split: str) -> Iterator[Example]: ...

    def rows(self, split: str) -> Rows | None:
        """Random access to ``split`` (None: this source has no such split)."""
        return spool(self.examples(split))

    def task_metrics(self, split: str, indices: Sequence[int], captions: Sequence[str]) -> dict[str, float]:
        """Metrics only this data can compute (e.g. the shapes oracle's exact-scene accuracy): ``captions[k]`` was
        generated for example ``indices[k]`` of the split (in ``examples(split)`` order)."""
        return {}

    def word_boxes(self, split: str, index: int, words: Sequence[str]) -> list[tuple[int, Box]]:
        """Optional: for a caption of example ``index`` given as its words, the words that name something drawn in
        the image, each with that thing's box (x0, y0, x1, y1, pixel edges of the image): `prefixcap bench`'s
        pointing game checks that a word's map peaks inside its box. Only a caption that states the image correctly
        gets boxes (a wrong one: []), and only a source that knows where things are offers them (the shapes world)."""
        raise NotImplementedError(f"the {type(self).__name__} data set does not say where things are in its images "
                                  "(DatasetSource.word_boxes)")  # fmt: skip

    def hard_negatives(self, split: str, index: int) -> list[str]:
        """Optional: minimal edits of example ``index``'s first reference that describe something else (another
        colour, object or order), for `prefixcap bench`'s hard-negative test. Only a source that can check an edit
        really changes the meaning should offer them (the shapes world parses its captions)."""
        raise NotImplementedError(f"the {type(self).__name__} data set has no hard negatives (a data set offers them "
                                  "with DatasetSource.hard_negatives)")  # fmt: skip

    def glossary(self) -> dict[str, str]:
        """Optional: words of this data's captions with the English word each translates ({"roter": "red"}). A
        language run starts those words' token embeddings from the English word's (the base decoder's own row), so
        an adapter begins where the base already grounds the word in the image; {}: every new token starts as it is."""
        return {}
