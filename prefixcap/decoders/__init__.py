"""Built-in decoders: causal LMs (any AutoModelForCausalLM) with a frozen base and LoRA through peft."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, model_validator

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
    """The architecture of a ``checkpoint: tiny`` decoder (its vocabulary is the tiny tokenizer's)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    hidden_size: int = Field(64, ge=8, le=4096)
    intermediate_size: int = Field(128, ge=8, le=16384)
    num_hidden_layers: int = Field(2, ge=1, le=64)
    num_attention_heads: int = Field(4, ge=1, le=64)
    num_key_value_heads: int = Field(2, ge=1, le=64)

    @model_validator(mode="after")
    def _heads_fit(self):
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads, and that by num_key_value_heads")
        return self


class CausalLMOptions(CheckpointOptions):
    checkpoint: str  # any AutoModelForCausalLM hub id or local directory, or "tiny"
    tiny: TinySizes = Field(TinySizes(), description="sizes of the random model that `checkpoint: tiny` builds")
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
