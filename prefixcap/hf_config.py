"""The config.json beside a saved system's manifest.json: what transformers' Auto classes read first.

    final/config.json    {"model_type": "prefixcap", "architectures": ["PrefixcapForImageTextToText"],
                          "system": "prefix", "prefixcap_format": "prefixcap-system/1"}

It names the model type that ``import prefixcap.hf`` registers, so that ``AutoModelForImageTextToText
.from_pretrained(final)`` and ``pipeline("alt-text", model=final)`` find prefixcap's classes. It holds no weights and
no recipe (manifest.json has those; the classes load through prefixcap.persist), and never an ``auto_map``: a
transformers that has not imported prefixcap.hf refuses the folder rather than fetching code to run.

Written with plain JSON, so that saving a system does not import the transformers classes (prefixcap.hf does).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CONFIG_NAME = "config.json"
MODEL_TYPE = "prefixcap"
ARCHITECTURE = "PrefixcapForImageTextToText"  # the class prefixcap.hf defines and registers


def hf_config(manifest: dict[str, Any]) -> dict[str, Any]:
    """config.json's contents for the saved system whose manifest is ``manifest``."""
    return {"model_type": MODEL_TYPE, "architectures": [ARCHITECTURE], "system": manifest["system"],
            "prefixcap_format": manifest["format"]}  # fmt: skip


def write_hf_config(directory: Path, manifest: dict[str, Any]) -> Path:
    path = Path(directory) / CONFIG_NAME
    path.write_text(json.dumps(hf_config(manifest), indent=2) + "\n")
    return path
