"""Built-in decoders: causal LMs (any AutoModelForCausalLM) with a frozen base and LoRA through peft."""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, model_validator

from prefixcap.checkpoints import TINY, known_config
from prefixcap.errors import CompositionError
from prefixcap.hookspecs import hookimpl
from prefixcap.registry import CheckpointOptions


class LoraOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    r: int = Field(16, ge=1, le=4096)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    # Module-name suffixes to adapt; None picks the attention projections of the architecture (see causal_lm.py).
    targets: list[str] | None = None


class TinySizes(BaseModel):
    """The sizes of a random ``checkpoint: tiny`` model (its vocabulary is the tiny tokenizer's). Each is passed to the
    architecture's config under this name, and only to an architecture that has it."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    hidden_size: int = Field(64, ge=8, le=4096)
    intermediate_size: int = Field(128, ge=8, le=16384)
    num_hidden_layers: int = Field(2, ge=1, le=64)
    num_attention_heads: int = Field(4, ge=1, le=64)
    # Grouped-query attention, for the architectures that have it (Llama, Qwen2, Phi, ...; GPT-NeoX and GPT-2 do not).
    # None: the architecture's default, which for those is one key/value head per attention head.
    num_key_value_heads: int | None = Field(None, ge=1, le=64)

    @model_validator(mode="after")
    def _heads_fit(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads")
        if self.num_key_value_heads is not None and self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be divisible by num_key_value_heads")
        return self


class TinyOptions(TinySizes):
    """What ``checkpoint: tiny`` builds: an architecture, at these sizes."""

    # A transformers model_type (llama, qwen2, phi, gpt_neox, ...) with transformers' defaults for all but the sizes;
    # None: the architecture the decoder's options state (CausalLMOptions.tiny_config).
    model_type: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")


class CausalLMOptions(CheckpointOptions):
    checkpoint: str  # any AutoModelForCausalLM hub id or local directory, or "tiny"
    tiny: TinyOptions = Field(TinyOptions(), description="architecture and sizes of the random model that "
                              "`checkpoint: tiny` builds")
    # lora: frozen base + LoRA adapters (default); full: train every weight; frozen: train nothing here.
    finetune: Literal["lora", "full", "frozen"] = "lora"
    lora: LoraOptions = LoraOptions()
    lr: float | None = Field(None, gt=0, description="learning rate of LoRA (or all) weights; default train.lr")
    # Text between the visual prefix and the caption; a pretrained LM often captions better when told what
    # comes next. Never a training target.
    prompt: str = ""
    add_bos: bool = False
    # A security switch: on only for a real boolean true. pydantic's lax bool would read "yes", "true" or 1 as True,
    # and a recipe or a saved system's manifest is anyone's file.
    trust_remote_code: StrictBool = False

    def tiny_config(self) -> dict[str, Any]:
        """The transformers config (config.json as a dict, with its ``model_type``) of the architecture that
        ``checkpoint: tiny`` builds, shrunk to ``tiny``'s sizes with the tiny tokenizer's vocabulary (a recipe's
        ``tiny.model_type`` overrides it). By default: the config of this model's default checkpoint, as prefixcap ships
        it (prefixcap/configs/) or the Hugging Face cache holds it. A decoder plugin whose default checkpoint is neither
        overrides it, e.g. ``return {"model_type": "gpt_neox"}`` (transformers' defaults fill in the rest)."""
        default = type(self).model_fields["checkpoint"].default
        found = known_config(default) if isinstance(default, str) and default != TINY else None
        if found is not None:
            return found
        why = (f"its default checkpoint {default!r} has no config prefixcap ships or the Hugging Face cache holds"
               if isinstance(default, str) else "it has no default checkpoint")
        raise CompositionError(
            f"`checkpoint: tiny` needs an architecture to shrink and {type(self).__name__} states none ({why}): "
            f"name one in the recipe, e.g. `tiny: {{model_type: llama}}` (any transformers model_type), or, in a "
            f"decoder plugin, give the options class a tiny_config() method (see docs/writing-a-plugin.md)"
        )


class SmolLMOptions(CausalLMOptions):
    checkpoint: str = "HuggingFaceTB/SmolLM-135M"


class Qwen2Options(CausalLMOptions):
    checkpoint: str = "Qwen/Qwen2-0.5B"


class PhiOptions(CausalLMOptions):
    checkpoint: str = "microsoft/phi-1_5"


@hookimpl
def register_decoders(register):
    register("causal-lm", factory="prefixcap.decoders.causal_lm:CausalLMDecoder", options=CausalLMOptions,
             description="Any transformers AutoModelForCausalLM (checkpoint required), LoRA via peft")
    # The named variants differ only in their default checkpoint: rows of data, not subclasses of the model.
    register("smollm", factory="prefixcap.decoders.causal_lm:CausalLMDecoder", options=SmolLMOptions,
             description="SmolLM-135M (Llama architecture), LoRA on q/k/v/o by default")
    register("qwen2", factory="prefixcap.decoders.causal_lm:CausalLMDecoder", options=Qwen2Options,
             description="Qwen2-0.5B, LoRA on q/k/v/o by default")
    register("phi", factory="prefixcap.decoders.causal_lm:CausalLMDecoder", options=PhiOptions,
             description="Phi-1.5 (1.3B), LoRA on q/k/v/dense by default")
