"""What the reliability tests of untrusted files share: the source files they scan, a tiny decoder checkpoint."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from prefixcap.decoders import SmolLMOptions
from prefixcap.decoders.causal_lm import CausalLMDecoder

REPO = Path(__file__).resolve().parents[2]


def source_files() -> list[Path]:
    files = sorted(p for d in ("prefixcap", "plugins") for p in (REPO / d).rglob("*.py") if ".venv" not in p.parts)
    assert len(files) > 40 and REPO / "prefixcap" / "persist.py" in files
    return files


def write_decoder_checkpoint(path: Path) -> Path:
    """A tiny Llama saved with save_pretrained (model.safetensors, config.json, tokenizer), as the hub holds one."""
    torch.manual_seed(0)
    CausalLMDecoder.write_tiny_checkpoint(path, SmolLMOptions(checkpoint="tiny"))
    return path


def copy_of(directory: Path, tmp_path: Path, name: str) -> Path:
    return Path(shutil.copytree(directory, tmp_path / name))
