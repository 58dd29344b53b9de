"""Where a component's architecture and weights come from: a hub id, a local directory, or ``tiny``.

``tiny`` builds a small randomly initialised model of the same class, for offline use (tests, the shapes world).
Without weights (``prefixcap validate``), a config is enough; for the default checkpoints prefixcap ships a copy of
the published config.json under prefixcap/configs/, so validating the real-size recipes works with no network.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Literal, TypeVar

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


def known_config(checkpoint: str) -> dict[str, Any] | None:
    """The config.json of hub id ``checkpoint`` as found with no network: the copy prefixcap ships, else the Hugging
    Face cache's (what a `checkpoint: tiny` shrinks); None when neither holds it."""
    path = snapshot_path(checkpoint)
    if not path.exists():
        path = _cached(checkpoint, "config.json", "model", None) if hub_id(checkpoint) else None
    if path is None:
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise CompositionError(f"{path}: unreadable config of {checkpoint!r}: {summary(e)}") from None
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        raise CompositionError(f"{path}: the config of {checkpoint!r} names no model_type")
    return data


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
        way_out = ", or `checkpoint: tiny` for a small random model" if tiny else ""
        if path_exists(checkpoint):
            hint = "the directory exists but does not hold a usable checkpoint"
        elif not hub_id(checkpoint):
            hint = f"no such file or directory, and not a hub id (use a local directory{way_out})"
        elif (found := hub_model_found(checkpoint)).status == "missing":
            # transformers' last words here are about its last attempt ("Please do not set use_safetensors=True"
            # when the cache is empty), not about what is wrong: the weights are not on this machine.
            offline = offline_setting()
            why = f"offline ({offline} is set)" if offline else f"({summary(e)})"
            raise CompositionError(f"cannot load {what} for {checkpoint!r}: {found.detail} ({hub_cache()}), and "
                                   f"it cannot be downloaded {why}: get it with `{found.fix}` (or use a local "
                                   f"directory{way_out})") from e  # fmt: skip
        else:
            hint = f"its copy {found.detail} does not load"
        raise CompositionError(f"cannot load {what} for {checkpoint!r}: {hint} ({summary(e)})") from e


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


def read_manifest(directory: str | Path, fmt: str | tuple[str, ...], error: type[PrefixcapError], what: str
                  ) -> dict[str, Any]:  # fmt: skip
    """``directory``/manifest.json, which must declare format ``fmt`` (or one of them: the current first); ``what``
    names such a directory in errors."""
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
    formats = (fmt,) if isinstance(fmt, str) else fmt
    if found not in formats:
        raise error(f"{path}: unknown format {found!r} (this prefixcap reads {' and '.join(formats)})")
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


# --- what a component needs on disk: `prefixcap doctor` reports it, `prefixcap run` checks it before it starts -----

HF_CLI = "hf"  # huggingface_hub's command line (`hf download`), installed with it
SAFETENSORS = ("model.safetensors", "model.safetensors.index.json")
TRANSFORMERS_FILES: tuple[tuple[str, ...], ...] = (("config.json",), SAFETENSORS)
NeedKind = Literal["hub-model", "hub-dataset", "path", "package", "bundled", "nothing", "unchecked"]


@dataclass(frozen=True)
class Need:
    """One thing a component needs on disk to be built with its weights or to read its data.

    Components declare theirs through their options model's ``needs()`` (registry.ComponentOptions); ``kind`` says
    how `prefixcap doctor` looks for ``name``: "hub-model" / "hub-dataset" in the Hugging Face cache (one file of
    each group in ``files`` must be there; ``download`` names the files to fetch, none: the whole repository),
    "path" on the file system, "package" an installed Python package (``module``) holding a file matching ``pattern``
    (``install`` says how to get it), "bundled" a model that ships with prefixcap, "nothing" (``tiny``, generated data),
    "unchecked" something the component reads its own way (``note`` says what)."""

    kind: NeedKind
    name: str
    option: str = "checkpoint"  # the option naming it, under the component's section ("checkpoint", "path")
    files: tuple[tuple[str, ...], ...] = ()
    download: tuple[str, ...] = ()
    install: str = ""
    pattern: str = ""
    module: str = ""  # package: the importable name, when ``name`` is the distribution's
    revision: str | None = None
    note: str = ""


@dataclass(frozen=True)
class Found:
    """Whether a Need is on disk: ``detail`` says where, or what is missing; ``fix`` is the command that gets it."""

    status: Literal["present", "missing", "unchecked"]
    detail: str
    fix: str = ""


def checkpoint_needs(value: str | None, option: str = "checkpoint",
                     files: tuple[tuple[str, ...], ...] = TRANSFORMERS_FILES) -> list[Need]:  # fmt: skip
    """The Need of a ``checkpoint`` option read as load_config and fetch read it: ``tiny``, a model bundled with
    prefixcap, a local path, or a hub id (whose cache must hold ``files``). None names nothing."""
    if value is None:
        return []
    if value == TINY:
        return [Need("nothing", value, option, note="a small random model: nothing to load")]
    if value in BUNDLED:
        return [Need("bundled", value, option)]
    if not path_exists(value) and hub_id(value):
        return [Need("hub-model", value, option, files=files)]
    return [Need("path", value, option)]


def valid_repo_id(text: str) -> bool:
    """Whether the hub would accept ``text`` as a repository id (huggingface_hub's own rules)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def hub_id(text: str) -> bool:
    """Whether ``text`` reads as a hub repository id (``org/name``, or a legacy bare name) rather than a path."""
    if text.startswith(("/", "./", "../", "~")) or text.count("/") > 1 or Path(text).suffix in _FILE_SUFFIXES:
        return False
    return valid_repo_id(text)


_FILE_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".json", ".jsonl", ".yaml", ".npz"}


def offline_setting() -> str | None:
    """The environment variable that keeps the hub libraries offline (nothing will be downloaded), if one is set.
    Read now, not at import: huggingface_hub reads it once, when it is first imported."""
    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(variable, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return variable
    if "huggingface_hub.constants" in sys.modules:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:  # set before import, then removed from the environment: still offline
            return "HF_HUB_OFFLINE"
    return None


def hub_cache() -> Path:
    """The Hugging Face hub cache (HF_HUB_CACHE, else HF_HOME/hub) that every loader here reads."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def download_command(repo_id: str, repo_type: str = "model", files: tuple[str, ...] = (),
                     revision: str | None = None) -> str:  # fmt: skip
    """The `hf download` command line that puts ``repo_id`` (or just ``files`` of it) into the hub cache."""
    import shlex

    parts = [HF_CLI, "download", *(["--repo-type", repo_type] if repo_type != "model" else []), repo_id, *files]
    parts += ["--revision", revision] if revision else []
    return " ".join(shlex.quote(p) for p in parts)


def _cached(repo_id: str, filename: str, repo_type: str, revision: str | None) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename, revision=revision, repo_type=repo_type)
    return Path(found) if isinstance(found, str) and Path(found).is_file() else None  # a dangling link is not there


def hub_model_found(repo_id: str, files: tuple[tuple[str, ...], ...] = TRANSFORMERS_FILES,
                    download: tuple[str, ...] = (), revision: str | None = None) -> Found:  # fmt: skip
    """Whether the hub cache holds ``repo_id`` completely enough to load offline: one file of each group of
    ``files`` (a sharded safetensors index counts only with every shard it lists)."""
    lacking: list[str] = []
    snapshot = None
    for group in files:
        for filename in group:
            path = _cached(repo_id, filename, "model", revision)
            if path is not None and filename.endswith(".index.json"):
                path = path if _shards_cached(repo_id, path, revision) else None
            if path is not None:
                snapshot = snapshot or path.parent
                break
        else:
            lacking.append(" or ".join(group))
    fix = download_command(repo_id, "model", download, revision)
    if not lacking:
        return Found("present", f"in the Hugging Face cache ({snapshot})")
    if snapshot is None:
        return Found("missing", "not in the Hugging Face cache", fix)
    return Found("missing", f"in the Hugging Face cache ({snapshot}) without {', '.join(lacking)}", fix)


def _shards_cached(repo_id: str, index: Path, revision: str | None) -> bool:
    try:
        shards = set(json.loads(index.read_text())["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return all(_cached(repo_id, shard, "model", revision) is not None for shard in shards)


def dataset_snapshot(repo_id: str, revision: str | None = None) -> Path | None:
    """The hub cache's snapshot of dataset ``repo_id`` (`hf download --repo-type dataset`), if it holds a data
    file: datasets reads hub sets offline only from its own cache of prepared sets, so prefixcap's hf source falls
    back to this snapshot, read as a local folder."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        snapshot = Path(snapshot_download(repo_id, repo_type="dataset", revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError, ValueError):
        return None
    if not snapshot.is_dir():
        return None
    data = (p for p in snapshot.rglob("*") if p.is_file() and p.name not in ("README.md", ".gitattributes"))
    return snapshot if next(data, None) is not None else None


def prepared_dataset(repo_id: str) -> Path | None:
    """datasets' own cache of ``repo_id`` prepared by an earlier load (what load_dataset reads offline): the
    directory datasets.load.CachedDatasetModuleFactory looks for, found the same way, without its warning."""
    import datasets
    from datasets.naming import camelcase_to_snakecase

    parts = repo_id.split("/")
    parts[-1] = camelcase_to_snakecase(parts[-1])
    root = Path(datasets.config.HF_DATASETS_CACHE).expanduser() / "___".join(parts)
    found = sorted(p for p in root.glob("*/*/*") if p.is_dir())
    return found[0] if found else None


def hub_dataset_found(repo_id: str, revision: str | None = None) -> Found:
    snapshot = dataset_snapshot(repo_id, revision)
    if snapshot is not None:
        return Found("present", f"in the Hugging Face cache ({snapshot})")
    prepared = prepared_dataset(repo_id)
    if prepared is not None:
        return Found("present", f"prepared in the datasets cache ({prepared})")
    import datasets

    return Found("missing", f"not in the Hugging Face cache, nor prepared in the datasets cache "
                 f"({datasets.config.HF_DATASETS_CACHE})", download_command(repo_id, "dataset", revision=revision))


def package_found(module: str, pattern: str, install: str) -> Found:
    """Whether the installed package ``module`` holds a file matching ``pattern`` (found as packaged_file finds it)."""
    try:
        path = packaged_file(module, pattern, f"package {module} is not installed")
    except CompositionError as e:
        return Found("missing", str(e), install)
    return Found("present", f"installed: {path}")


def path_exists(path: str) -> bool:
    try:
        return Path(path).exists()
    except (OSError, ValueError):  # a name too long for the file system, or one with a NUL byte
        return False
