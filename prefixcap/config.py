"""The recipe's plain sections (train, image, eval, generate, output): importable by components (a system's generate
takes a GenerateConfig) without importing the recipe machinery, the registry or YAML."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationInfo, field_validator


class Section(BaseModel):
    # inf and nan are never a sensible rate, size or budget (`lr: .inf` would train to NaN)
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)


class TrainConfig(Section):
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(32, ge=1, le=1_000_000, description="examples per micro-batch (a step takes grad_accum "
                            "of them) over all processes together: a data-parallel run (torchrun, accelerate launch) "
                            "splits each evenly over its processes, so it must be divisible by their number")  # fmt: skip
    steps: int = Field(1000, ge=1, le=100_000_000)
    # A wall-clock budget besides steps: training stops once this many seconds were spent in training steps
    # (evaluation and checkpoints not counted). The LR schedule still spans train.steps.
    max_seconds: float | None = Field(None, gt=0)
    # Bounded: a step is one optimiser update, and past ~1000 micro-batches a larger batch_size says the same thing
    # while a typo (1e9) would make step 1 last for ever.
    grad_accum: int = Field(1, ge=1, le=1024, description="micro-batches accumulated into one optimiser step")
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    max_caption_tokens: int = Field(32, ge=1, le=4096)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    seed: int = Field(0, ge=0, le=2**32 - 1)
    # A frozen encoder's features are computed once, cached on disk, and reused by every epoch and run.
    cache_features: bool = True
    # The system's forward and backward through torch.compile: the same losses (tests/test_compile.py), faster steps
    # after a compile of tens of seconds (quickstart) to minutes (real sizes). auto: where it measured faster over a
    # whole run, which is a CPU run of 1,000 steps or more (prefixcap/training/compiled.py says what was measured);
    # off on an accelerator until benchmarks/gpu_suite.sh has measured one. A bool, never a string such as "true".
    compile: StrictBool | Literal["auto"] = "auto"
    # The share of training examples shown a blank image (zeros after normalisation) instead of their own, as
    # classifier-free guidance trains its unconditional model: the system then learns what it expects with nothing to
    # look at, which the generative score subtracts (prefixcap/score.py). Never shown to a contrastive loss.
    blank_images: float = Field(0.1, ge=0, lt=1)
    cache_dtype: Literal["fp16", "bf16", "fp32"] = Field("fp16", description="how cached features are stored: fp16 "
                                                         "halves the disk of fp32 (docs/data.md)")  # fmt: skip
    num_workers: Annotated[int, Field(ge=0, le=64)] | Literal["auto"] = Field(
        "auto", description="DataLoader processes decoding images (0: in the training process); auto: all cores "
        "but one, at most 8, while images are decoded, none while cached features are read")  # fmt: skip


Unit = Annotated[float, Field(ge=0, le=1, strict=True)]  # a number, never a string such as "0.5" or "true"


class ImageConfig(Section):
    """How every image is resized for the encoder (prefixcap.images.ImageProcessor), for any encoder and system:
    ``resize`` squash (straight to size x size), crop (shortest edge to size, then the centre), letterbox (longest edge
    to size, aspect kept, padded with ``fill``) or null (the encoder's own: what its checkpoint was trained with)."""

    resize: Literal["squash", "crop", "letterbox"] | None = None
    fill: tuple[Unit, Unit, Unit] | None = Field(None, description="letterbox's padding colour, [r, g, b] in [0, 1]; "
                                                 "null: the encoder's mean, which normalises to 0")  # fmt: skip

    @field_validator("fill", mode="before")
    @classmethod
    def _fill_needs_letterbox(cls, value: object, info: ValidationInfo) -> object:
        if value is not None and info.data.get("resize") != "letterbox":
            raise ValueError("fill is letterbox's padding colour: set resize: letterbox with it, or remove fill")
        if value is not None and (not isinstance(value, (list, tuple)) or len(value) != 3):
            raise ValueError("fill is a list of three numbers in [0, 1] (red, green, blue), e.g. [0.5, 0.5, 0.5]")
        return value


class EvalConfig(Section):
    batch_size: int = Field(32, ge=1)
    every_steps: int | None = Field(None, ge=1)  # None: only at the end
    max_examples: int | None = Field(None, ge=1)
    metric: str = "loss"  # the validation metric that picks the best step and drives early stopping
    higher_is_better: bool = False
    patience: int | None = Field(None, ge=0)  # evaluations without improvement before stopping; None: never
    # CLIPScore's model: "auto" takes the data's own scorer (shapes: the bundled prefixcap/shapes-clip) or else the
    # paper's CLIP ViT-B/32; any transformers CLIP/SigLIP id or directory, or open_clip:<model>/<tag>; null: none.
    clip_model: str | None = "auto"


class GenerateConfig(Section):
    """Greedy by default: alt text should be the model's best guess, not a random draw (distilvit2 sampled)."""

    max_new_tokens: int = Field(32, ge=1, le=4096)
    num_beams: int = Field(1, ge=1, le=64)
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    repetition_penalty: float = Field(1.0, gt=0)
    # Greedy search through prefixcap.decoding's loop instead of transformers' generate: the same ids, without
    # generate's per-step machinery (both systems; beams and sampling always go through generate).
    fast: bool = True
    # The fast loop's steps through torch.compile with a static KV cache: the same ids. Off by default: on the CPU
    # a compiled batch-1 caption took 0.5-0.9x the time, but batch 8-64 took longer in benchmarks/real_sizes.py,
    # and each batch size compiles once (4-46 s), paid back only after ~900 captions (README, compiled training and
    # decoding). A bool, never a string such as "true".
    compile: StrictBool = False

    @property
    def fast_greedy(self) -> bool:
        """Whether these settings decode through prefixcap's greedy loop rather than generate."""
        return self.fast and self.num_beams == 1 and not self.do_sample and self.repetition_penalty == 1


class OutputConfig(Section):
    dir: str = "runs/{recipe}"
    save_every_steps: int | None = Field(None, ge=1)  # None: at the end only
    keep_last: int = Field(2, ge=1)
    log_every_steps: int = Field(10, ge=1)
    tensorboard: bool | None = None  # scalars in <run dir>/tensorboard/; None: when tensorboard is installed


# A BCP 47-like tag, lower case: "de", "fr", "ru", "pt-br". It names a folder, so nothing else gets through.
LANGUAGE_TAG = r"^[a-z]{2,3}(-[a-z0-9]{2,8})?$"


def is_language_tag(name: Any) -> bool:
    """Whether ``name`` can name a language adapter: a tag, and not "en" (the base system's own language)."""
    return isinstance(name, str) and re.match(LANGUAGE_TAG, name) is not None and name != "en"


class LanguageConfig(Section):
    """A language adapter (prefixcap.languages): trained on a frozen base system, switched at caption time."""

    name: str = Field(pattern=LANGUAGE_TAG)  # de, fr, ru, pt-br: it names adapters/<name>/
    r: int = Field(8, ge=1, le=256)  # LoRA rank on the decoder's attention layers
    mlp_r: int = Field(4, ge=0, le=256)  # LoRA rank on its MLP layers; 0: attention only
    # Train the embeddings of the tokens this language's captions use (peft's trainable tokens): tokens a base decoder
    # never produced (the tiny tokenizer's German or Russian words) have nothing learnt in them.
    tokens: bool = True
    # Start the embeddings of words the data's glossary translates (DatasetSource.glossary: "roter" -> "red") from
    # the English words' rows, where the base's grounding in the image already points; False: from the base's rows.
    seed_tokens: bool = True

    @field_validator("name")
    @classmethod
    def _not_english(cls, value: str) -> str:
        if value == "en":
            raise ValueError("en is the base system's own language, with no adapter")
        return value
