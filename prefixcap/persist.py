"""Saving and loading systems: what was trained, in Hugging Face's formats, plus a manifest.json a human can read.

    run/final/
      manifest.json            format, versions, the fully resolved recipe, base checkpoints and their revisions
      connector/model.safetensors
      decoder/                 LoRA: adapter_config.json + adapter_model.safetensors naming its base (plain peft
                               loads it); fully trained or random: a whole transformers model (config.json +
                               model.safetensors); the tokenizer beside either. crossattn: the whole
                               VisionEncoderDecoderModel with its image processor (plain transformers loads it)
      encoder/...              only if it trained something or was randomly initialised
      config.json              model_type "prefixcap" for transformers' Auto classes (prefixcap.hf; names no code)
      README.md                the model card: hub metadata, how it was trained and scored (prefixcap.card)

``load(directory)`` rebuilds the system through compose() from the manifest's recipe (base weights come from their
checkpoints, as when it was first built) and loads the trained tensors on top. Only safetensors and JSON are read:
no pickle, so a checkpoint from a stranger cannot run code.

Each component writes and reads its own tensors (prefixcap.weights); the directory is published all at once
(prefixcap.files). This module reaches components only through the registry and compose(), lazily.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from prefixcap import checkpoints
from prefixcap.card import card_name, system_card, write_card
from prefixcap.config import is_language_tag
from prefixcap.errors import RecipeError, SavedSystemError
from prefixcap.files import publish_dir, temporary_sibling
from prefixcap.hf_config import write_hf_config
from prefixcap.hub import resolve
from prefixcap.scoring import parse_calibration
from prefixcap.weights import PICKLE_WEIGHTS, trained_names

FORMAT = "prefixcap-system/1"


def _versions() -> dict[str, str]:
    return checkpoints.installed_versions(
        ("prefixcap", "torch", "transformers", "peft", "timm", "open_clip_torch", "safetensors"))


def _components(system: Any) -> dict[str, Any]:
    from prefixcap.registry import get_component

    out = {}
    for loc, kind, spec in system.recipe.components():
        provider = get_component(kind, spec.name).provider
        slot = ".".join(map(str, loc))
        part = dict(system.parts()).get(slot)
        revision = getattr(getattr(part, "config", None), "_commit_hash", None)  # set by from_pretrained from the hub
        out[slot] = {"kind": kind, "name": spec.name, "distribution": provider.dist, "version": provider.version,
                     "checkpoint": getattr(spec.options, "checkpoint", None), "revision": revision}  # fmt: skip
    return out


def save_system(system: Any, directory: Path, metrics: dict[str, Any] | None = None) -> Path:
    """Write into a temporary sibling directory, then swap it in: a crash never leaves a half-written checkpoint
    where a complete one was. The model card (README.md, prefixcap.card) goes in with the rest, ``metrics`` (the
    run's metrics.json, when there is one) in its evaluation."""
    directory = Path(directory)
    refuse_unrebuildable(system)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(directory)
    try:
        tmp.mkdir()
        files: dict[str, list[str]] = {}
        for slot, part in system.parts():
            written = part.save_trained(tmp / slot)
            if written:
                files[slot] = written
        languages = save_languages(system, tmp)
        manifest = {
            "format": FORMAT,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "system": system.recipe.system.name,
            "versions": _versions(),
            "components": _components(system),
            "files": files,
            "recipe": system.recipe.to_dict(resolved=True),
        }
        if languages:
            manifest["languages"] = languages
        if getattr(system, "score_calibration", None):  # `prefixcap caption --min-score`'s default
            manifest["score_calibration"] = system.score_calibration
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        write_hf_config(tmp, manifest)  # config.json: what transformers' Auto classes read (prefixcap.hf)
        write_card(tmp, system_card(tmp, manifest, metrics, name=card_name(directory)))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk leaves nothing behind but the previous save
        raise
    return publish_dir(tmp, directory)


def refuse_unrebuildable(system: Any) -> None:
    """Refuse, before anything is written, a system whose recipe does not name every part: load() rebuilds a system
    from its recipe, so a part compose() was given as an object built by hand would come back missing."""
    if not getattr(system, "uses_components", True):  # it builds its parts itself, from its own options
        return
    from prefixcap.recipe import SLOTS

    named = {".".join(map(str, loc)) for loc, _, _ in system.recipe.components()}
    # Only the recipe's slots: a part a system builds itself (a plugin system's own trained token) comes back with it.
    missing = [slot for slot, _ in system.parts() if slot not in named and slot.split(".")[0] in (*SLOTS, "losses")]
    if missing:
        raise SavedSystemError(
            f"cannot save this system: its {', '.join(missing)} {'was' if len(missing) == 1 else 'were'} given to "
            "compose() as built objects that do not say how to build them again, so prefixcap.load could not rebuild "
            "it; build each with prefixcap.create(kind, name, options) (or give compose() its name and options)")


def _remote_code_settings(recipe: Any, path: str = "") -> list[str]:
    """Where a recipe (as saved in a manifest) sets trust_remote_code to anything but false, as dotted paths. Not only
    JSON true: "yes", "true" or 1 would reach a lax loader as True, so any value but false (or none) counts as on."""
    if isinstance(recipe, dict):
        value = recipe.get("trust_remote_code", False)
        found = [path + "trust_remote_code"] if value is not False and value is not None else []
        return found + [p for k, v in recipe.items() for p in _remote_code_settings(v, f"{path}{k}.")]
    if isinstance(recipe, list):
        return [p for i, v in enumerate(recipe) for p in _remote_code_settings(v, f"{path}{i}.")]
    return []


def read_manifest(directory: Path) -> dict[str, Any]:
    return checkpoints.read_manifest(directory, FORMAT, SavedSystemError, "a saved prefixcap system")


def saved_system_dir(path: str | Path) -> Path:
    """The saved system that ``path`` names: a run directory's final/, or a saved system itself."""
    given, path = path, resolve(path)  # a hub id (user/repo) that is no local path: its downloaded snapshot
    if not path.is_dir():
        found = "not a directory" if path.exists() else "no such directory"
        raise SavedSystemError(f"{given}: {found}; expected a run directory or a saved system")
    if (path / "manifest.json").exists():
        return path
    if (path / "final").is_dir():
        return path / "final"
    if (path / "checkpoints").is_dir():
        raise SavedSystemError(f"{given}: this run has no final/ yet; finish it with `prefixcap run` first")
    return path  # load_system says what it is not


def _listed_files(directory: Path, files: Any) -> dict[str, list[str]]:
    """The manifest's files (part -> names), each a plain name of a file that exists, none a pickle: the manifest is
    a stranger's file, and it says which weights to read."""
    if not isinstance(files, dict) or not all(
            isinstance(slot, str) and isinstance(names, list) and all(isinstance(n, str) for n in names)
            for slot, names in files.items()):  # fmt: skip
        raise SavedSystemError(f"{directory}: the manifest's files must map each part to a list of file names")
    for slot, names in files.items():
        for name in names:
            if name in ("", ".", "..") or Path(name).name != name or "\\" in name:
                raise SavedSystemError(f"{directory}: the manifest lists {slot}/{name}, which is not a file name")
            if name.lower().endswith(PICKLE_WEIGHTS):
                raise SavedSystemError(f"{directory}: the manifest lists {slot}/{name}; prefixcap reads weights from "
                                       ".safetensors files only (a pickle-based file can run code when loaded)")
            if not (directory / slot / name).is_file():
                raise SavedSystemError(f"{directory}: {slot}/{name} listed in the manifest is missing")
    return files


def _check_trained_parts(directory: Path, system: Any, files: dict[str, list[str]]) -> None:
    """Every part that trains something has its weights listed (and so present): a manifest that lists none would
    otherwise serve random weights as a trained model."""
    parts = dict(system.parts())
    unknown = sorted(set(files) - set(parts))
    if unknown:
        raise SavedSystemError(f"{directory}: the manifest lists files for {', '.join(unknown)}, which its recipe "
                               f"has no part for")  # fmt: skip
    for slot, part in parts.items():
        if trained_names(part) and not any(name.endswith(".safetensors") for name in files.get(slot, [])):
            raise SavedSystemError(f"{directory}: the manifest lists no weights for {slot}, which its recipe trains; "
                                   "the saved system is incomplete")


def _check_providers(directory: Path, manifest: dict[str, Any]) -> None:
    """Every component the manifest records is registered here; if one is not, say which distribution provided it
    and how to get it back (compose would only say "unknown decoder")."""
    from prefixcap.registry import KINDS, why_unregistered

    recorded = manifest.get("components")
    for entry in recorded.values() if isinstance(recorded, dict) else []:
        if isinstance(entry, dict) and entry.get("kind") in KINDS and isinstance(entry.get("name"), str):
            problem = why_unregistered(entry["kind"], entry["name"], entry.get("distribution"), entry.get("version"))
            if problem is not None:
                raise SavedSystemError(f"{directory}: {problem}")


def load_system(directory: str | Path, device: str | torch.device | None = None, *,
                trust_remote_code: bool = False) -> Any:  # fmt: skip
    """Rebuild a saved system: compose from the manifest's recipe, then load the trained tensors."""
    from prefixcap.compose import compose

    directory = Path(directory)
    manifest = read_manifest(directory)
    remote = _remote_code_settings(manifest.get("recipe"))
    if remote and not trust_remote_code:  # the manifest is a stranger's file: it may not switch code execution on
        raise SavedSystemError(f"{directory}: its recipe sets trust_remote_code ({', '.join(remote)}), which would "
                               "run code from the checkpoints it names; load it with prefixcap.load(..., "
                               "trust_remote_code=True) only if you trust them")  # fmt: skip
    if not isinstance(manifest.get("recipe"), dict):
        raise SavedSystemError(f"{directory / 'manifest.json'}: no recipe to rebuild the system from")
    _check_providers(directory, manifest)
    files = _listed_files(directory, manifest.get("files", {}))
    try:
        system = compose(manifest["recipe"])
    except RecipeError as e:  # the recipe is the manifest's: name it, each line (a dict recipe has no file to name)
        where = directory / "manifest.json"
        raise SavedSystemError("\n".join(f"{where}: recipe: {line}" for line in str(e).splitlines())) from e
    _check_trained_parts(directory, system, files)
    system.load_trained(directory)
    load_languages(system, directory, manifest.get("languages"))
    system.score_calibration = parse_calibration(manifest.get("score_calibration"), str(directory / "manifest.json"),
                                                 SavedSystemError)  # fmt: skip
    if device is not None:
        system.to(device)
    return system.eval()


def save_languages(system: Any, directory: Path) -> dict[str, Any]:
    """Each language adapter into adapters/<name>/ (peft's format); returns the manifest's "languages" entry."""
    decoder = getattr(system, "decoder", None)
    names = getattr(decoder, "languages", [])
    info = getattr(system, "language_info", {})
    out = {}
    for name in names:
        files = decoder.save_language(name, directory / "adapters" / name)
        out[name] = {**info.get(name, {}), "files": files}
    return out


def load_languages(system: Any, directory: Path, languages: Any) -> None:
    """Add and load the adapters the manifest lists. Names and file names are checked before any path is built from
    them: the manifest is a stranger's file."""
    if languages is None:
        system.language_info = {}
        return
    if not isinstance(languages, dict):
        raise SavedSystemError(f"{directory}: the manifest's languages must map each language to its entry")
    decoder = getattr(system, "decoder", None)
    for name, entry in languages.items():
        if not is_language_tag(name) or not isinstance(entry, dict):
            raise SavedSystemError(f"{directory}: the manifest lists language {name!r}, which is no language tag "
                                   "with an entry (de, fr, ru, pt-br)")  # fmt: skip
        _listed_files(directory, {f"adapters/{name}": entry.get("files")} if isinstance(entry.get("files"), list)
                      else {name: None})  # fmt: skip
        if decoder is None or not hasattr(decoder, "load_language"):
            raise SavedSystemError(f"{directory}: it has language adapters, and this system has no decoder to take them")
        decoder.load_language(name, directory / "adapters" / name)
    system.language_info = {name: {k: v for k, v in entry.items() if k != "files"} for name, entry in languages.items()}
