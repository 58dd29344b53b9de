"""Where a component's architecture and weights come from: a hub id, a local directory, or ``tiny``.

``tiny`` builds a small randomly initialised model of the same class, for offline use (tests, the shapes world).
Without weights (``prefixcap validate``), a config is enough; for the default checkpoints prefixcap ships a copy of
the published config.json under prefixcap/configs/, so validating the real-size recipes works with no network.
"""

from __future__ import annotations

import importlib.util
import json
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, TypeVar

from prefixcap.errors import CompositionError, PrefixcapError, summary

TINY = "tiny"
_SNAPSHOTS = Path(__file__).parent / "configs"
_ASSETS = Path(__file__).parent / "assets"
# Models that ship inside the package, trained on the shapes world by scripts/pretrain_shapes.py. Recipes name
# them like hub ids; they resolve to the package's own directory, so they load offline and wherever it is installed.
BUNDLED = {"prefixcap/shapes-siglip": _ASSETS / "shapes-siglip", "prefixcap/shapes-clip": _ASSETS / "shapes-clip"}
T = TypeVar("T")


def resolve(checkpoint: str) -> str:
    """A bundled model's directory; any other checkpoint as given."""
    return str(BUNDLED[checkpoint]) if checkpoint in BUNDLED else checkpoint


def snapshot_path(checkpoint: str) -> Path:
    return _SNAPSHOTS / (checkpoint.replace("/", "--") + ".json")


def load_config(checkpoint: str, config_cls: Any, tiny: dict[str, Any]) -> Any:
    """The architecture config of ``checkpoint`` (a transformers PretrainedConfig subclass or AutoConfig)."""
    if checkpoint == TINY:
        return config_cls(**tiny) if config_cls.__name__ != "AutoConfig" else _auto_from_dict(config_cls, tiny)
    if not Path(checkpoint).exists() and snapshot_path(checkpoint).exists():
        data = json.loads(snapshot_path(checkpoint).read_text())
        if config_cls.__name__ == "AutoConfig":
            return _auto_from_dict(config_cls, data)
        return config_cls(**{k: v for k, v in data.items() if k != "model_type"})
    # trust_remote_code=False, said explicitly: unset, transformers asks on a terminal whether to run the code a
    # checkpoint's auto_map names, and a "y" would run it though no recipe asked for it.
    return fetch(lambda: config_cls.from_pretrained(checkpoint, trust_remote_code=False), checkpoint, "config")


def _auto_from_dict(auto_cls: Any, data: dict[str, Any]) -> Any:
    data = dict(data)
    return auto_cls.for_model(data.pop("model_type"), **data)


def fetch(load: Callable[[], T], checkpoint: str, what: str, tiny: bool = True) -> T:
    """Run a from_pretrained-style loader, turning "no network / no such repo / bad files" into one clear error;
    ``tiny``: whether ``checkpoint: tiny`` is an offline way out worth suggesting."""
    try:
        return load()
    except (OSError, ValueError, EnvironmentError) as e:
        local = Path(checkpoint).exists()
        hint = (
            "the directory exists but does not hold a usable checkpoint"
            if local
            else "it is neither a local directory nor reachable on the model hub (offline? use a local directory"
            + (", or `checkpoint: tiny` for a small random model)" if tiny else ")")
        )
        first = summary(e)
        raise CompositionError(f"cannot load {what} for {checkpoint!r}: {hint} ({first})") from e


def packaged_file(module: str, pattern: str, missing: str) -> Path:
    """The first file matching ``pattern`` inside the installed package ``module``, found without importing it (a
    weights-carrying package's __init__ may import what a --no-deps install left out); ``missing`` says how to get it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise CompositionError(missing)
    location = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(location.glob(pattern))
    if not found:
        raise CompositionError(f"no {pattern} file in the {module} package at {location}")
    return found[0]


# Far deeper than any manifest prefixcap writes (a recipe nests a few levels), far shallower than the recursion limit.
MAX_MANIFEST_DEPTH = 64


def nesting_depth(value: Any) -> int:
    """How many lists and dicts deep ``value`` nests, counted without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is not None:
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in children)
    return deepest


def read_manifest(directory: str | Path, fmt: str, error: type[PrefixcapError], what: str) -> dict[str, Any]:
    """``directory``/manifest.json, which must declare format ``fmt``; ``what`` names such a directory in errors."""
    path = Path(directory) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise error(f"{directory}: not {what} (no manifest.json)") from None
    except (OSError, ValueError) as e:  # ValueError: bad JSON, or bytes that are not UTF-8
        raise error(f"{path}: unreadable manifest: {e}") from None
    except RecursionError:  # the JSON parser recurses once per level of [ or {
        raise error(f"{path}: unreadable manifest: nested too deeply") from None
    if nesting_depth(manifest) > MAX_MANIFEST_DEPTH:  # what reads it next walks it recursively
        raise error(f"{path}: unreadable manifest: nested deeper than {MAX_MANIFEST_DEPTH} levels")
    found = manifest.get("format") if isinstance(manifest, dict) else None
    if found != fmt:
        raise error(f"{path}: unknown format {found!r} (this prefixcap reads {fmt})")
    return manifest


def installed_versions(dists: tuple[str, ...]) -> dict[str, str]:
    """Version of each of ``dists`` that is installed (a manifest or a figure names the code it came from)."""
    found = {}
    for dist in dists:
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return found
